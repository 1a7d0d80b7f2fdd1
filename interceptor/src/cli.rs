//! Command-line surface. `ApplyArgs` accepts istio-iptables' flags verbatim (long and short
//! forms, defaults, environment variables; the flag wins over the env).

use std::path::PathBuf;

use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser};
use clap::{Args, Parser, Subcommand, ValueEnum};

use interceptor_common::plan::defaults;

use crate::model::{BackendKind, EbpfSettings, IptablesFlavor};

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
    Remove(RemoveArgs),
    /// Detach and unpin every eBPF program, link and map of ours.
    Cleanup(EbpfArgs),
    /// Run the node-level daemon (control socket, re-adoption, per-pod fallback).
    Daemon(crate::daemon::DaemonArgs),
    /// Talk to the daemon: add, remove, list or show pods.
    #[command(subcommand)]
    Pod(PodCommand),
    /// Print the eBPF programs' decision log (programs loaded with `apply --ebpf-log`).
    Logs(LogsArgs),
    /// Which backend `auto` would use and why: the kernel features each hook needs.
    Doctor(crate::doctor::DoctorArgs),
    /// The verdict for one connection of a pod (redirect to which port, or pass) and the rule
    /// that decided it, from the same decision model the eBPF programs follow.
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

/// Where the eBPF state lives.
#[derive(Args, Debug, Clone)]
pub struct EbpfArgs {
    /// bpffs folder holding our pinned programs, links and maps.
    #[arg(
        long,
        env = "INTERCEPTOR_BPFFS",
        default_value = "/sys/fs/bpf/interceptor"
    )]
    pub bpffs: PathBuf,
    /// cgroup v2 directory the programs attach to (default: the cgroup v2 root, detected).
    #[arg(long, env = "INTERCEPTOR_CGROUP")]
    pub cgroup: Option<PathBuf>,
    /// Load the programs without per-pod counters (the verifier prunes the counting code);
    /// for measuring what counting costs. Applies when the programs are loaded.
    #[arg(long)]
    pub no_counters: bool,
}

impl EbpfArgs {
    /// The neutral settings the services take.
    pub fn settings(&self) -> EbpfSettings {
        EbpfSettings {
            bpffs: self.bpffs.clone(),
            cgroup: self.cgroup.clone(),
            no_counters: self.no_counters,
        }
    }
}

/// `--backend`: the model's names, listed (with their help) as clap lists a value enum.
fn backend_parser() -> impl TypedValueParser<Value = BackendKind> {
    PossibleValuesParser::new(BackendKind::ALL.map(|k| {
        let v = PossibleValue::new(k.as_str());
        match k.help() {
            Some(h) => v.help(h),
            None => v,
        }
    }))
    .map(|s| {
        s.parse::<BackendKind>()
            .expect("one of the possible values")
    })
}

/// `--force-iptables-binary`.
fn flavor_parser() -> impl TypedValueParser<Value = IptablesFlavor> {
    PossibleValuesParser::new(IptablesFlavor::ALL.map(|f| PossibleValue::new(f.as_str()))).map(
        |s| {
            s.parse::<IptablesFlavor>()
                .expect("one of the possible values")
        },
    )
}

#[derive(Subcommand, Debug)]
pub enum PodCommand {
    /// Register a pod (the same flags as `apply`; --network-namespace is required).
    Add(Box<PodAddArgs>),
    /// Unregister a pod.
    Remove(PodRefArgs),
    /// List registered pods.
    List(SocketArgs),
    /// Show one pod: backend, why, config (and its user namespace's id mapping, if any).
    Show(PodShowArgs),
}

#[derive(Args, Debug, Clone)]
pub struct SocketArgs {
    /// The daemon's control socket.
    #[arg(
        long,
        env = "INTERCEPTOR_SOCKET",
        default_value = "/run/interceptor/interceptor.sock"
    )]
    pub socket: PathBuf,
}

#[derive(Args, Debug, Clone)]
pub struct PodRefArgs {
    #[arg(long, env = "NETWORK_NAMESPACE")]
    pub network_namespace: PathBuf,
    #[command(flatten)]
    pub socket: SocketArgs,
}

#[derive(Args, Debug, Clone)]
pub struct PodShowArgs {
    #[command(flatten)]
    pub pod: PodRefArgs,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value = "json")]
    pub output: OutputFormat,
}

/// Output of `pod show`: JSON (the default, for tools) or words for people.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Json,
    Text,
}

#[derive(Args, Debug, Clone)]
pub struct PodAddArgs {
    /// Pod IPs (comma list); default: read from the netns.
    #[arg(long, value_delimiter = ',')]
    pub ips: Vec<std::net::IpAddr>,
    /// Kubernetes identity namespace/name[/uid], when known.
    #[arg(long)]
    pub pod: Option<String>,
    #[command(flatten)]
    pub apply: ApplyArgs,
}

#[derive(Args, Debug, Clone)]
pub struct LogsArgs {
    /// Stop after this many seconds (default: run until interrupted).
    #[arg(long)]
    pub seconds: Option<f64>,
    #[command(flatten)]
    pub ebpf: EbpfArgs,
}

#[derive(Args, Debug, Clone)]
pub struct RemoveArgs {
    /// The pod's network namespace.
    #[arg(long, env = "NETWORK_NAMESPACE")]
    pub network_namespace: PathBuf,
    #[command(flatten)]
    pub ebpf: EbpfArgs,
}

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

/// Where `cni-install` / `cni-uninstall` work.
#[derive(Args, Debug, Clone)]
pub struct CniInstallArgs {
    /// The folder the container runtime runs CNI plugins from.
    #[arg(long, env = "INTERCEPTOR_CNI_BIN_DIR", default_value = "/opt/cni/bin")]
    pub cni_bin_dir: PathBuf,
    /// The folder the container runtime reads network configs from.
    #[arg(
        long,
        env = "INTERCEPTOR_CNI_CONF_DIR",
        default_value = "/etc/cni/net.d"
    )]
    pub cni_conf_dir: PathBuf,
    /// The daemon's control socket, written into our conflist entry.
    #[arg(
        long,
        env = "INTERCEPTOR_SOCKET",
        default_value = "/run/interceptor/interceptor.sock"
    )]
    pub socket: PathBuf,
}

#[derive(Args, Debug, Clone)]
pub struct ValidateArgs {
    /// Validate inside this network namespace (a path such as /var/run/netns/NAME).
    #[arg(long, env = "NETWORK_NAMESPACE")]
    pub network_namespace: Option<PathBuf>,
    /// Outbound redirect target port (listened on).
    #[arg(short = 'p', long = "envoy-port", default_value_t = defaults::PROXY_PORT.to_string())]
    pub envoy_port: String,
    /// Inbound redirect target port (listened on).
    #[arg(
        short = 'z',
        long,
        env = "INBOUND_CAPTURE_PORT",
        default_value_t = defaults::INBOUND_CAPTURE_PORT.to_string()
    )]
    pub inbound_capture_port: String,
    /// Port the probes dial (127.0.0.6:PORT inbound, 192.0.2.1:PORT outbound).
    #[arg(long, default_value = "15002")]
    pub iptables_probe_port: String,
    /// Give up after this long (Go duration, e.g. 5s); probes are sent every second.
    #[arg(long, default_value = "5s")]
    pub probe_timeout: String,
    /// uid the listeners and the inbound probe run as.
    #[arg(long, default_value_t = defaults::PROXY_UID.to_string())]
    pub proxy_uid: String,
    /// gid the listeners and the inbound probe run as (default: the uid).
    #[arg(long)]
    pub proxy_gid: Option<String>,
}

#[derive(Args, Debug, Clone)]
pub struct ApplyArgs {
    /// Outbound redirect target port.
    #[arg(short = 'p', long = "envoy-port", default_value_t = defaults::PROXY_PORT.to_string())]
    pub envoy_port: String,
    /// Inbound redirect / TPROXY target port.
    #[arg(
        short = 'z',
        long,
        env = "INBOUND_CAPTURE_PORT",
        default_value_t = defaults::INBOUND_CAPTURE_PORT.to_string()
    )]
    pub inbound_capture_port: String,
    /// HBONE tunnel port, always excluded from inbound capture.
    #[arg(
        short = 'e',
        long,
        env = "INBOUND_TUNNEL_PORT",
        default_value_t = defaults::INBOUND_TUNNEL_PORT.to_string()
    )]
    pub inbound_tunnel_port: String,
    /// Comma list of proxy uids never redirected (default: uid of $ENVOY_USER, else 1337).
    #[arg(short = 'u', long, env = "PROXY_UID")]
    pub proxy_uid: Option<String>,
    /// Comma list of proxy gids (default: the uid list).
    #[arg(short = 'g', long, env = "PROXY_GID")]
    pub proxy_gid: Option<String>,
    /// Inbound interception mode: REDIRECT or TPROXY.
    #[arg(
        short = 'm',
        long,
        env = "ISTIO_INBOUND_INTERCEPTION_MODE",
        default_value = ""
    )]
    pub istio_inbound_interception_mode: String,
    /// Inbound ports to capture: `*` for all, a comma list, or empty for none.
    #[arg(
        short = 'b',
        long,
        env = "ISTIO_INBOUND_PORTS",
        default_value = "",
        allow_hyphen_values = true
    )]
    pub istio_inbound_ports: String,
    /// Inbound ports not captured when `-b '*'`.
    #[arg(
        short = 'd',
        long,
        env = "ISTIO_LOCAL_EXCLUDE_PORTS",
        default_value = ""
    )]
    pub istio_local_exclude_ports: String,
    /// Interfaces skipped in both directions.
    #[arg(
        short = 'c',
        long,
        env = "ISTIO_EXCLUDE_INTERFACES",
        default_value = ""
    )]
    pub istio_exclude_interfaces: String,
    /// Outbound CIDRs to capture: `*` for all, a comma list, or empty for none.
    #[arg(short = 'i', long, env = "ISTIO_SERVICE_CIDR", default_value = "")]
    pub istio_service_cidr: String,
    /// Outbound CIDRs never captured.
    #[arg(
        short = 'x',
        long,
        env = "ISTIO_SERVICE_EXCLUDE_CIDR",
        default_value = ""
    )]
    pub istio_service_exclude_cidr: String,
    /// Outbound ports always captured.
    #[arg(short = 'q', long, env = "ISTIO_OUTBOUND_PORTS", default_value = "")]
    pub istio_outbound_ports: String,
    /// Outbound ports never captured (tcp and udp).
    #[arg(
        short = 'o',
        long,
        env = "ISTIO_LOCAL_OUTBOUND_PORTS_EXCLUDE",
        default_value = ""
    )]
    pub istio_local_outbound_ports_exclude: String,
    /// Interfaces whose inbound traffic is treated as outbound.
    #[arg(short = 'k', long, env = "KUBE_VIRT_INTERFACES", default_value = "")]
    pub kube_virt_interfaces: String,
    /// TPROXY mark.
    #[arg(
        short = 't',
        long,
        env = "ISTIO_INBOUND_TPROXY_MARK",
        default_value_t = defaults::TPROXY_MARK.to_string()
    )]
    pub istio_inbound_tproxy_mark: String,
    /// TPROXY routing table.
    #[arg(
        short = 'r',
        long,
        env = "ISTIO_INBOUND_TPROXY_ROUTE_TABLE",
        default_value_t = defaults::TPROXY_ROUTE_TABLE.to_string()
    )]
    pub istio_inbound_tproxy_route_table: String,
    /// Print what would be applied; apply nothing.
    #[arg(short = 'n', long, env = "DRY_RUN")]
    pub dry_run: bool,
    /// Redirect DNS to the proxy's DNS port 15053 (also env ISTIO_META_DNS_CAPTURE).
    #[arg(long, env = "REDIRECT_DNS")]
    pub redirect_dns: bool,
    /// Capture all port-53 traffic, not only to the resolv.conf servers.
    #[arg(long, env = "CAPTURE_ALL_DNS")]
    pub capture_all_dns: bool,
    /// Drop conntrack-INVALID packets (also env INVALID_DROP).
    #[arg(long, env = "DROP_INVALID")]
    pub drop_invalid: bool,
    /// Check that redirection works; apply nothing.
    #[arg(long, env = "RUN_VALIDATION")]
    pub run_validation: bool,
    /// Validation probe port.
    #[arg(long, default_value = "15002")]
    pub iptables_probe_port: String,
    /// Validation timeout (Go duration, e.g. 5s).
    #[arg(long, default_value = "5s")]
    pub probe_timeout: String,
    /// Skip applying rules.
    #[arg(long, env = "SKIP_RULE_APPLY")]
    pub skip_rule_apply: bool,
    /// Apply inside this network namespace (a path such as /var/run/netns/NAME).
    #[arg(long, env = "NETWORK_NAMESPACE")]
    pub network_namespace: Option<PathBuf>,
    /// Re-apply when the installed rules drifted from the wanted ones.
    #[arg(long, env = "RECONCILE")]
    pub reconcile: bool,
    /// Remove every rule and chain this tool owns, then stop.
    #[arg(long, env = "CLEANUP_ONLY")]
    pub cleanup_only: bool,
    /// Re-apply even when the installed rules are identical.
    #[arg(long, env = "FORCE_APPLY")]
    pub force_apply: bool,
    /// Use nftables instead of iptables (Istio's flag; the same as --backend nftables).
    #[arg(long, env = "NATIVE_NFTABLES")]
    pub native_nftables: bool,
    /// Force the iptables variant: legacy or nft.
    #[arg(long, env = "FORCE_IPTABLES_BINARY", value_parser = flavor_parser())]
    pub force_iptables_binary: Option<IptablesFlavor>,
    /// Interception backend.
    #[arg(long, env = "INTERCEPTOR_BACKEND", value_parser = backend_parser(), default_value = "auto")]
    pub backend: BackendKind,
    /// IPv6 rules on or off (default: detected from the target netns's addresses, as Istio does).
    #[arg(long, value_parser = clap::builder::BoolishValueParser::new())]
    pub ipv6: Option<bool>,
    /// DNS servers to capture, comma list of v4/v6 (default: the resolv.conf in effect).
    #[arg(long)]
    pub dns_servers: Option<String>,
    /// eBPF path: ports only the proxy uid/gid may bind in the pod (plus -p/-z/-e); empty
    /// disables the guard.
    #[arg(long, env = "INTERCEPTOR_BIND_GUARD_PORTS", default_value_t = interceptor_common::plan::default_bind_guard_ports())]
    pub bind_guard_ports: String,
    /// eBPF path: app↔proxy loopback connections hand their data straight to the peer socket
    /// (sockops + sk_msg), skipping the loopback TCP stack. Refused with --backend
    /// iptables/nftables; ignored (with a warning) when `auto` falls back.
    #[arg(long, env = "INTERCEPTOR_ACCELERATE", value_parser = clap::builder::BoolishValueParser::new(), default_value = "false", num_args = 0..=1, default_missing_value = "true")]
    pub accelerate: bool,
    /// The daemon's control socket: when a daemon answers there, `apply` registers through it.
    #[arg(
        long,
        env = "INTERCEPTOR_SOCKET",
        default_value = "/run/interceptor/interceptor.sock"
    )]
    pub socket: PathBuf,
    /// Log decisions from the eBPF programs (compiled out of the hot path unless set at load).
    #[arg(long, env = "INTERCEPTOR_EBPF_LOG")]
    pub ebpf_log: bool,
    #[command(flatten)]
    pub ebpf: EbpfArgs,
}
