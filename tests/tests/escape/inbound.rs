//! Escape scenarios: inbound (filled in by its area).
