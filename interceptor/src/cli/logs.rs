//! `interceptor logs`: the programs' decision log.

use anyhow::{Context, Result};
use clap::Args;

use super::args::EbpfArgs;
use crate::backend::ebpf::Pins;

#[derive(Args, Debug, Clone)]
pub struct LogsArgs {
    /// Stop after this many seconds (default: run until interrupted).
    #[arg(long)]
    pub seconds: Option<f64>,
    #[command(flatten)]
    pub ebpf: EbpfArgs,
}

/// `interceptor logs`: drains the programs' aya-log ring buffer to stderr. The programs only
/// write to it when loaded with `--ebpf-log`.
pub fn run(args: &LogsArgs) -> Result<()> {
    let id = Pins::new(&args.ebpf.bpffs).connect4_program_id()?;
    let mut logger =
        aya_log::EbpfLogger::init_from_id(id).context("opening the programs' log buffer")?;
    eprintln!(
        "interceptor: reading eBPF logs (empty unless the programs were loaded with --ebpf-log)"
    );
    let start = std::time::Instant::now();
    while args
        .seconds
        .is_none_or(|s| start.elapsed().as_secs_f64() < s)
    {
        logger.flush();
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    logger.flush();
    Ok(())
}
