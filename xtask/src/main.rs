//! Dev tasks: `cargo xtask demo` (the live side-by-side demo).

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
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Demo => demo::run(),
    }
}
