//! `interceptor doctor` (being written).
use anyhow::{bail, Result};

use crate::cli::EbpfArgs;

pub fn run(_args: &EbpfArgs) -> Result<()> {
    bail!("doctor is not implemented in this build yet")
}

/// Why the eBPF backend cannot run here, if it cannot (probe being written).
pub fn ebpf_missing(_args: &EbpfArgs) -> Option<String> {
    None
}
