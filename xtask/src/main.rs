//! Dev tasks: `cargo xtask demo` (the live side-by-side demo), `cargo xtask bench`,
//! `cargo xtask vm-test` (the e2e suite on Debian kernels in QEMU), `cargo xtask image` (the
//! node image, OCI, from pinned Debian packages).

mod bench;
mod demo;
mod image;
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
    /// The performance comparison: explicit addressing, no proxy, eBPF, eBPF + sk_msg,
    /// iptables-nft, iptables-legacy and nftables side by side in one run (connect rate, RR
    /// latency, bulk, CPU, conntrack, scaling in rules and pods, pod setup cost); writes JSON,
    /// Markdown and SVG charts. `--quick` is the CI size.
    Bench(bench::Args),
    /// Boot Debian kernels (default 5.10, 6.1, 6.12, 7.2) in QEMU and run the e2e suite in
    /// each: eBPF path, iptables/nftables fallbacks, bpf()-denied runs; prints the kernel ×
    /// feature × result matrix and writes it as Markdown (KERNELS.md).
    VmTest(Box<vm::Args>),
    /// Build the node image (OCI layout and archive under target/image) offline from the
    /// Debian packages pinned in deploy/image/packages.lock plus the static `interceptor`;
    /// the same inputs give the same digest. Prints the digest and the size.
    Image(image::Args),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Demo => demo::run(),
        Task::Bench(args) => bench::run(args),
        Task::VmTest(args) => vm::run(*args),
        Task::Image(args) => image::run(args),
    }
}
