//! Escape scenarios: state (filled in by its area).
