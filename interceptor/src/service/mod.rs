//! Services between the front ends (CLI, daemon, CNI) and the backends.

pub mod probe;
