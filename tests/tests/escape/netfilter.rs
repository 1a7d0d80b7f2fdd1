//! Escape scenarios: netfilter (filled in by its area).
