//! `interceptor explain`: one connection's verdict from the shared decision model.

use anyhow::Result;
use clap::Args;
use interceptor_common::config::ConfigError;
use interceptor_common::decision::{Conn, Proto};

use super::args::{ApplyArgs, OutputFormat};
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
    /// `text` for people, `json` for tools (long form only: `-o` is Istio's flag).
    #[arg(long, value_enum, default_value = "text")]
    pub output: OutputFormat,
    /// The pod's interception config, exactly as for `apply`.
    #[command(flatten)]
    pub apply: ApplyArgs,
}

/// `apply`'s flags that act rather than describe the pod's config: `explain` takes `apply`'s
/// flags so a pod's istio-iptables line can be pasted, but these would do nothing here, so they
/// are hidden from its help and refused when given (`errors::parse_from`).
const APPLY_ONLY: &[&str] = &[
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
    "socket",
    "ebpf_log",
    "no_counters",
    "bpffs",
    "cgroup",
];

pub(super) fn hide_apply_only(a: clap::Arg) -> clap::Arg {
    if APPLY_ONLY.contains(&a.get_id().as_str()) {
        a.hide(true)
    } else {
        a
    }
}

/// Validation errors come back as `Ok(Err(ConfigError))` (exit 2).
pub fn run(args: &ExplainArgs) -> Result<Result<(), ConfigError>> {
    let cfg = match args.apply.load() {
        Ok(c) => c,
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
    let report = explain::report(&cfg, args.apply.network_namespace.as_deref(), &conn)?;
    match args.output {
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        OutputFormat::Text => print!("{}", explain::text(&report)),
    }
    Ok(Ok(()))
}
