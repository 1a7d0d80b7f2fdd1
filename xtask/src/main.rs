//! Dev tasks: `cargo xtask demo` (the live side-by-side demo), `cargo xtask bench-quick`,
//! `cargo xtask vm-test` (the e2e suite on Debian kernels in QEMU).

mod bench;
mod demo;
mod vm;

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
    /// Boot Debian kernels (default 5.10, 6.1, 6.12, 7.2) in QEMU and run the e2e suite in
    /// each: eBPF path, iptables/nftables fallbacks, bpf()-denied runs; prints the kernel ×
    /// feature × result matrix and writes it as Markdown (KERNELS.md).
    VmTest(Box<vm::Args>),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Demo => demo::run(),
        Task::BenchQuick { secs, rounds } => bench::run(secs, rounds),
        Task::VmTest(args) => vm::run(*args),
    }
}
