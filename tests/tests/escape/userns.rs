//! Escape scenarios: userns (filled in by its area).
