//! Escape scenarios: semantics (filled in by its area).
