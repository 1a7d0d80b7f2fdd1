//! Dev tasks: `cargo xtask demo` (the live side-by-side demo).

mod bench;
mod demo;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Build a demo pod (app, sidecar, upstream in their own netns) and run a handful of
    /// connections under the eBPF and the iptables backend, side by side; then clean up.
    Demo,
    /// Quick connect-rate and 1-byte request/response comparison: eBPF vs explicit vs iptables.
    BenchQuick {
        /// Seconds per measurement.
        #[arg(long, default_value_t = 2.0)]
        secs: f64,
        /// Interleaved rounds (the spread between them shows the machine's noise).
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Demo => demo::run(),
        Task::BenchQuick { secs, rounds } => bench::run(secs, rounds),
    }
}
