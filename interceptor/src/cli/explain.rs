//! `interceptor explain`: one connection's verdict from the shared decision model, the config
//! entry that decided it and the istio-iptables rule that decides the same.

use anyhow::Result;
use clap::parser::ValueSource;
use clap::Args;
use interceptor_common::config::{Config, ConfigError};
use interceptor_common::decision::{Conn, Proto};

use super::args::{ApplyArgs, OutputFormat};
use super::pod_ref;
use crate::service::explain;

#[derive(Args, Debug, Clone)]
pub struct ExplainArgs {
    /// uid of the connecting process.
    #[arg(long)]
    pub uid: u32,
    /// gid of the connecting process (default: the uid).
    #[arg(long)]
    pub gid: Option<u32>,
    /// Destination IP:PORT ([v6]:port for IPv6).
    #[arg(long)]
    pub dst: std::net::SocketAddr,
    /// Source address the socket is bound to, if any (e.g. 127.0.0.6).
    #[arg(long)]
    pub src: Option<std::net::IpAddr>,
    /// Decide for UDP instead of TCP.
    #[arg(long)]
    pub udp: bool,
    /// A pod registered with the daemon, as namespace/name: explain with its netns and its
    /// registered config (the config flags are then refused).
    #[arg(long, value_name = "NAMESPACE/NAME")]
    pub pod: Option<String>,
    /// `text` (words, the default) or `json` (stable fields, for tools). Long form only: `-o`
    /// is Istio's --istio-local-outbound-ports-exclude here.
    #[arg(long, value_enum, default_value = "text")]
    pub output: OutputFormat,
    /// The pod's interception config, exactly as for `apply`.
    #[command(flatten)]
    pub apply: ApplyArgs,
}

/// `apply`'s flags that act rather than describe the pod's config: `explain` takes `apply`'s
/// flags so a pod's istio-iptables line can be pasted, but these would do nothing here, so they
/// are hidden from its help and refused when given (`errors::parse_from`). `--socket` stays: it
/// is the daemon `--pod` asks.
pub(super) const APPLY_ONLY: &[&str] = &[
    "dry_run",
    "run_validation",
    "iptables_probe_port",
    "probe_timeout",
    "cni_mode",
    "skip_rule_apply",
    "reconcile",
    "cleanup_only",
    "force_apply",
    "native_nftables",
    "force_iptables_binary",
    "backend",
    "host",
    "ebpf_log",
    "no_counters",
    "probe",
    "bpffs",
    "cgroup",
];

/// The config flags given on this process's command line (`interceptor explain …`), read
/// again from argv: only clap's matches know where a value came from.
fn config_flags_given() -> Vec<String> {
    let cmd = ExplainArgs::augment_args(clap::Command::new("explain"));
    // argv[1] is the subcommand: it stands in for the program name here.
    let Ok(m) = cmd
        .clone()
        .try_get_matches_from(std::env::args_os().skip(1))
    else {
        return vec![];
    };
    const OWN: [&str; 8] = ["uid", "gid", "dst", "src", "udp", "pod", "output", "socket"];
    cmd.get_arguments()
        .filter(|a| !OWN.contains(&a.get_id().as_str()))
        .filter(|a| m.value_source(a.get_id().as_str()) == Some(ValueSource::CommandLine))
        .map(|a| match (a.get_long(), a.get_short()) {
            (Some(l), _) => format!("--{l}"),
            (None, Some(s)) => format!("-{s}"),
            (None, None) => a.get_id().to_string(),
        })
        .collect()
}

/// The config and netns to explain with: the registered pod's (`--pod`) or the flags'.
fn target(args: &ExplainArgs) -> Result<Result<(Config, Option<std::path::PathBuf>), ConfigError>> {
    let Some(pod) = &args.pod else {
        return Ok(args
            .apply
            .load()
            .map(|c| (c, args.apply.network_namespace.clone())));
    };
    let given = config_flags_given();
    if !given.is_empty() {
        return Ok(Err(ConfigError::new(
            "--pod",
            pod,
            format!(
                "explains with the pod's registered config; leave out {}",
                given.join(", ")
            ),
        )));
    }
    let status = match pod_ref::registered(&args.apply.socket, pod)? {
        Ok(s) => s,
        Err(e) => return Ok(Err(e)),
    };
    Ok(status.config.parse().map(|c| (c, Some(status.netns))))
}

/// Validation errors come back as `Ok(Err(ConfigError))` (exit 2).
pub fn run(args: &ExplainArgs) -> Result<Result<(), ConfigError>> {
    let (cfg, netns) = match target(args)? {
        Ok(t) => t,
        Err(e) => return Ok(Err(e)),
    };
    let conn = Conn {
        proto: if args.udp { Proto::Udp } else { Proto::Tcp },
        dst: args.dst.ip().into(),
        dport: args.dst.port(),
        src: args.src.map(Into::into),
        uid: args.uid,
        gid: args.gid.unwrap_or(args.uid),
    };
    let mut report = explain::report(&cfg, netns.as_deref(), &conn)?;
    report.pod = args.pod.clone();
    match args.output {
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        OutputFormat::Text => print!("{}", explain::text(&report)),
    }
    Ok(Ok(()))
}
