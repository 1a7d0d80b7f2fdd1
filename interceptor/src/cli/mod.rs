//! The command-line front end: clap types, each command's arguments beside its command, turned
//! into `model`/`config` input at this edge. Nothing below imports this module.

mod apply;
mod args;
mod cni;
mod daemon;
pub mod doctor;
mod errors;
mod explain;
mod logs;
mod pod;
mod pod_ref;
mod pod_text;
mod remove;
mod validate;

use anyhow::Result;
use clap::{Parser, Subcommand};
use interceptor_common::config::ConfigError;

pub use args::{ApplyArgs, EbpfArgs, OutputFormat, SocketArgs};
pub use cni::CniInstallArgs;
pub use daemon::{DaemonArgs, K8sArgs};
pub use doctor::DoctorArgs;
pub use errors::{parse_from, Parsed, Stop};
pub use explain::ExplainArgs;
pub use logs::LogsArgs;
pub use pod::{PodAddArgs, PodCommand, PodRefArgs, PodShowArgs};
pub use remove::RemoveArgs;
pub use validate::ValidateArgs;

#[derive(Parser, Debug)]
#[command(
    name = "interceptor",
    version,
    about = "eBPF replacement for istio-init's traffic interception"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Install a pod's interception (istio-iptables' flags and env are accepted verbatim).
    // As with istio-iptables (pflag), a repeated flag is not an error: the last one wins.
    #[command(args_override_self = true)]
    Apply(Box<ApplyArgs>),
    /// Unregister a pod from the eBPF datapath (its netns is left untouched otherwise).
    // --cgroup: where programs attach; removing one pod's entries never touches that.
    #[command(mut_args(args::hide(&["cgroup"])))]
    Remove(RemoveArgs),
    /// Detach and unpin every eBPF program, link and map of ours.
    Cleanup(EbpfArgs),
    /// Run the node-level daemon (control socket, re-adoption, per-pod fallback).
    Daemon(DaemonArgs),
    /// Talk to the daemon: add, remove, list or show pods.
    #[command(subcommand)]
    Pod(PodCommand),
    /// Print the eBPF programs' decision log (programs loaded with `apply --ebpf-log`).
    #[command(mut_args(args::hide(&["cgroup"])))]
    Logs(LogsArgs),
    /// Which backend `auto` would use and why: the kernel features each hook needs.
    Doctor(DoctorArgs),
    /// The verdict for one connection of a pod (redirect to which port, or pass) and the rule
    /// that decided it, from the same decision model the eBPF programs follow.
    #[command(mut_args(args::hide(explain::APPLY_ONLY)))]
    Explain(Box<ExplainArgs>),
    /// Check that interception works in a pod, as Istio's istio-validation does: exit 0 when
    /// it does, 126 when not. Runs as the proxy uid/gid with no capabilities.
    Validate(ValidateArgs),
    /// Install the CNI plugin: the binary into the CNI bin dir, our entry chained into the
    /// node's primary network config (idempotent).
    CniInstall(CniInstallArgs),
    /// Remove our entry from the node's network configs and the binary from the CNI bin dir.
    CniUninstall(CniInstallArgs),
}

/// Runs a command. Bad input comes back as `Ok(Err(ConfigError))`: nothing was applied, and
/// main exits 2.
pub fn run(command: &Command) -> Result<Result<(), ConfigError>> {
    // Step lines on stderr for the long operations people run by hand.
    crate::progress::enable(matches!(
        command,
        Command::Apply(_) | Command::Cleanup(_) | Command::CniInstall(_) | Command::CniUninstall(_)
    ));
    match command {
        Command::Apply(args) => apply::run(args),
        Command::Remove(args) => remove::remove(args).map(Ok),
        Command::Cleanup(args) => remove::cleanup(&args.settings()).map(Ok),
        Command::Daemon(args) => crate::daemon::run(&args.settings()).map(Ok),
        Command::Pod(cmd) => pod::run(cmd),
        Command::Logs(args) => logs::run(args).map(Ok),
        Command::Doctor(args) => doctor::run(args).map(Ok),
        Command::Explain(args) => explain::run(args),
        Command::Validate(args) => match args.resolved()?.and_then(|a| a.params()) {
            Ok(p) => crate::validate::run(&p),
            Err(e) => Ok(Err(e)),
        },
        Command::CniInstall(args) => cni::install(args).map(Ok),
        Command::CniUninstall(args) => cni::uninstall(args).map(Ok),
    }
}
