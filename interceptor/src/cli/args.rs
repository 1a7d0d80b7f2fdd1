//! Arguments several commands share: where the eBPF state lives, the daemon's socket, the output
//! format, and a pod's interception config (`apply`, `pod add` and `explain` take the same flags).

use std::path::PathBuf;
use std::time::Duration;

use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser};
use clap::{Args, ValueEnum};
use interceptor_common::config::{Config, ConfigError, RawConfig};
use interceptor_common::defaults;

use crate::config::{self, Input};
use crate::model::{BackendKind, EbpfSettings, IptablesFlavor};
use crate::validate;

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
}

impl EbpfArgs {
    /// The neutral settings the services take, for commands that never load programs.
    pub fn settings(&self) -> EbpfSettings {
        self.loading(false)
    }

    /// The settings of a command that may load the programs (`apply`, `daemon`).
    pub fn loading(&self, no_counters: bool) -> EbpfSettings {
        EbpfSettings {
            bpffs: self.bpffs.clone(),
            cgroup: self.cgroup.clone(),
            no_counters,
        }
    }
}

/// For `Command::mut_args` on a command that takes a shared flag set but not the flags `ids`:
/// they are hidden from its help, and so refused when given (`errors::parse_from`).
pub(super) fn hide(ids: &'static [&'static str]) -> impl FnMut(clap::Arg) -> clap::Arg {
    move |a| {
        if ids.contains(&a.get_id().as_str()) {
            a.hide(true)
        } else {
            a
        }
    }
}

/// `--no-counters`, on the commands that load the programs.
pub const NO_COUNTERS_HELP: &str = "Load the programs without per-pod counters (the verifier prunes the counting code); for measuring what counting costs. Applies when the programs are loaded";

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

/// Output of the operator commands (`doctor`, `explain`, `pod list`, `pod show`): words for
/// people (their default) or JSON for tools.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Json,
    Text,
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
/// An istio-iptables boolean flag as Go's pflag reads it: bare (`--dry-run`) or with a value
/// after `=` in strconv.ParseBool's spellings (`--dry-run=false`, `DRY_RUN=1`).
fn go_bool(v: &str) -> Result<bool, String> {
    match v {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Ok(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Ok(false),
        _ => Err("not a boolean: use true or false (also 1/0, t/f)".into()),
    }
}

fn flavor_parser() -> impl TypedValueParser<Value = IptablesFlavor> {
    PossibleValuesParser::new(IptablesFlavor::ALL.map(|f| PossibleValue::new(f.as_str()))).map(
        |s| {
            s.parse::<IptablesFlavor>()
                .expect("one of the possible values")
        },
    )
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
    #[arg(short = 'n', long, env = "DRY_RUN", value_parser = go_bool, num_args = 0..=1, require_equals = true, default_value = "false", default_missing_value = "true")]
    pub dry_run: bool,
    /// Redirect DNS to the proxy's DNS port 15053 (also env ISTIO_META_DNS_CAPTURE).
    #[arg(long, env = "REDIRECT_DNS", value_parser = go_bool, num_args = 0..=1, require_equals = true, default_value = "false", default_missing_value = "true")]
    pub redirect_dns: bool,
    /// Capture all port-53 traffic, not only to the resolv.conf servers.
    #[arg(long, env = "CAPTURE_ALL_DNS", value_parser = go_bool, num_args = 0..=1, require_equals = true, default_value = "false", default_missing_value = "true")]
    pub capture_all_dns: bool,
    /// Drop conntrack-INVALID packets (also env INVALID_DROP).
    #[arg(long, env = "DROP_INVALID", value_parser = go_bool, num_args = 0..=1, require_equals = true, default_value = "false", default_missing_value = "true")]
    pub drop_invalid: bool,
    /// Check that redirection works; apply nothing.
    #[arg(long, env = "RUN_VALIDATION", value_parser = go_bool, num_args = 0..=1, require_equals = true, default_value = "false", default_missing_value = "true")]
    pub run_validation: bool,
    /// Validation probe port.
    #[arg(long, env = "IPTABLES_PROBE_PORT", default_value = "15002")]
    pub iptables_probe_port: String,
    /// Validation timeout (Go duration, e.g. 5s).
    #[arg(long, env = "PROBE_TIMEOUT", default_value = "5s")]
    pub probe_timeout: String,
    /// IPv6 rules when any of the pod's addresses is IPv6, not only when its first one is
    /// (also env ISTIO_DUAL_STACK).
    #[arg(long, env = "DUAL_STACK", value_parser = go_bool, num_args = 0..=1, require_equals = true, default_value = "false", default_missing_value = "true")]
    pub dual_stack: bool,
    /// Run as Istio's CNI plugin does: the pod's netns (--network-namespace) seen from the
    /// host's filesystem, with the xtables lock scoped to that netns (legacy iptables) instead
    /// of the node-wide one. Rules are the same; eBPF and nftables take no lock.
    #[arg(long, env = "CNI_MODE", value_parser = go_bool, num_args = 0..=1, require_equals = true, default_value = "false", default_missing_value = "true")]
    pub cni_mode: bool,
    /// Skip applying rules.
    #[arg(long, env = "SKIP_RULE_APPLY", value_parser = go_bool, num_args = 0..=1, require_equals = true, default_value = "false", default_missing_value = "true")]
    pub skip_rule_apply: bool,
    /// Apply inside this network namespace (a path such as /var/run/netns/NAME). `apply` needs
    /// it, or `--host`.
    #[arg(long, env = "NETWORK_NAMESPACE")]
    pub network_namespace: Option<PathBuf>,
    /// Act on this process's own network namespace: on a node, the HOST's (or, run inside a
    /// pod as istio-init is, that pod's). Without it `apply` needs --network-namespace.
    #[arg(long, conflicts_with = "network_namespace")]
    pub host: bool,
    /// Re-apply when the installed rules drifted from the wanted ones.
    #[arg(long, env = "RECONCILE", value_parser = go_bool, num_args = 0..=1, require_equals = true, default_value = "false", default_missing_value = "true")]
    pub reconcile: bool,
    /// Remove every rule and chain this tool owns, then stop.
    #[arg(long, env = "CLEANUP_ONLY", value_parser = go_bool, num_args = 0..=1, require_equals = true, default_value = "false", default_missing_value = "true")]
    pub cleanup_only: bool,
    /// Re-apply even when the installed rules are identical.
    #[arg(long, env = "FORCE_APPLY", value_parser = go_bool, num_args = 0..=1, require_equals = true, default_value = "false", default_missing_value = "true")]
    pub force_apply: bool,
    /// Use nftables instead of iptables (Istio's flag; the same as --backend nftables).
    #[arg(long, env = "NATIVE_NFTABLES", value_parser = go_bool, num_args = 0..=1, require_equals = true, default_value = "false", default_missing_value = "true")]
    pub native_nftables: bool,
    /// Force the iptables variant: legacy or nft.
    #[arg(long, env = "FORCE_IPTABLES_BINARY", value_parser = flavor_parser())]
    pub force_iptables_binary: Option<IptablesFlavor>,
    /// Interception backend.
    #[arg(long, env = "INTERCEPTOR_BACKEND", value_parser = backend_parser(), default_value = "auto")]
    pub backend: BackendKind,
    /// IPv6 rules on or off (default: detected from the target netns's addresses, as Istio does).
    #[arg(long, value_parser = go_bool)]
    pub ipv6: Option<bool>,
    /// DNS servers to capture, comma list of v4/v6 (default: the resolv.conf in effect).
    #[arg(long)]
    pub dns_servers: Option<String>,
    /// eBPF path: ports only the proxy uid/gid may bind in the pod (plus -p/-z/-e); empty
    /// disables the guard.
    #[arg(long, env = "INTERCEPTOR_BIND_GUARD_PORTS", default_value_t = interceptor_common::defaults::default_bind_guard_ports())]
    pub bind_guard_ports: String,
    /// eBPF path: app↔proxy loopback connections hand their data straight to the peer socket
    /// (sockops + sk_msg), skipping the loopback TCP stack. Refused with --backend
    /// iptables/nftables; ignored (with a warning) when `auto` falls back.
    #[arg(long, env = "INTERCEPTOR_ACCELERATE", value_parser = go_bool, default_value = "false", num_args = 0..=1, default_missing_value = "true")]
    pub accelerate: bool,
    /// The daemon's control socket: when a daemon answers there, `apply` registers through it
    /// (`explain --pod` looks the pod up there).
    #[arg(
        long,
        env = "INTERCEPTOR_SOCKET",
        default_value = "/run/interceptor/interceptor.sock"
    )]
    pub socket: PathBuf,
    /// Log decisions from the eBPF programs (compiled out of the hot path unless set at load).
    #[arg(long, env = "INTERCEPTOR_EBPF_LOG", value_parser = go_bool, num_args = 0..=1, require_equals = true, default_value = "false", default_missing_value = "true")]
    pub ebpf_log: bool,
    #[arg(long, help = NO_COUNTERS_HELP)]
    pub no_counters: bool,
    /// With --dry-run and `auto`: probe the kernel as `doctor` does (each program loaded into
    /// the verifier and unloaded again; nothing attached or pinned) to show the backend `auto`
    /// would really pick. Without it a dry run loads nothing into the kernel.
    #[arg(long)]
    pub probe: bool,
    #[command(flatten)]
    pub ebpf: EbpfArgs,
}

/// An env-only alias of a boolean flag (Istio's `flag.AdditionalEnv`), read as the flag's own
/// env variable is: Go's spellings; anything else is an error naming the variable.
fn env_bool(name: &'static str) -> Result<bool, ConfigError> {
    match std::env::var(name) {
        Err(_) => Ok(false),
        Ok(v) => go_bool(&v).map_err(|why| ConfigError::new(name, v, why)),
    }
}

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

impl ApplyArgs {
    /// The config as given: the flags, plus the env-only variables istio-iptables reads (a
    /// boolean one that is not a boolean is an error naming it).
    pub fn input(&self) -> Result<Input, ConfigError> {
        let a = self;
        Ok(Input {
            netns: a.network_namespace.clone(),
            proxy_uid: a.proxy_uid.clone(),
            ipv6: a.ipv6,
            dual_stack: a.dual_stack || env_bool("ISTIO_DUAL_STACK")?,
            dns_servers: a.dns_servers.clone(),
            raw: RawConfig {
                proxy_port: a.envoy_port.clone(),
                inbound_capture_port: a.inbound_capture_port.clone(),
                inbound_tunnel_port: a.inbound_tunnel_port.clone(),
                proxy_uid: String::new(),
                proxy_gid: a.proxy_gid.clone().unwrap_or_default(),
                inbound_interception_mode: a.istio_inbound_interception_mode.clone(),
                inbound_ports_include: a.istio_inbound_ports.clone(),
                inbound_ports_exclude: a.istio_local_exclude_ports.clone(),
                exclude_interfaces: a.istio_exclude_interfaces.clone(),
                outbound_ip_ranges_include: a.istio_service_cidr.clone(),
                outbound_ip_ranges_exclude: a.istio_service_exclude_cidr.clone(),
                outbound_ports_include: a.istio_outbound_ports.clone(),
                outbound_ports_exclude: a.istio_local_outbound_ports_exclude.clone(),
                reroute_virtual_interfaces: a.kube_virt_interfaces.clone(),
                inbound_tproxy_mark: a.istio_inbound_tproxy_mark.clone(),
                inbound_tproxy_route_table: a.istio_inbound_tproxy_route_table.clone(),
                redirect_dns: a.redirect_dns || env_bool("ISTIO_META_DNS_CAPTURE")?,
                capture_all_dns: a.capture_all_dns,
                drop_invalid: a.drop_invalid || env_bool("INVALID_DROP")?,
                owner_groups_include: env_or("ISTIO_OUTBOUND_OWNER_GROUPS", "*"),
                owner_groups_exclude: env_or("ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE", ""),
                host_ipv4_loopback_cidr: env_or(
                    "ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR",
                    "127.0.0.1/32",
                ),
                enable_ipv6: false,
                dns_servers: String::new(),
                bind_guard_ports: a.bind_guard_ports.clone(),
                accelerate: a.accelerate,
            },
        })
    }

    /// The raw (string) config exactly as istio-iptables would see it, detection included.
    pub fn raw_config(&self) -> Result<RawConfig, ConfigError> {
        config::raw_config(self.input()?)
    }

    /// Validates the whole command line: the config plus the operational flags.
    pub fn load(&self) -> Result<Config, ConfigError> {
        let cfg = self.raw_config()?.parse()?;
        self.probe()?;
        Ok(cfg)
    }

    /// `--iptables-probe-port` and `--probe-timeout`, parsed.
    fn probe(&self) -> Result<(u16, Duration), ConfigError> {
        let port = self
            .iptables_probe_port
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| {
                ConfigError::new(
                    "--iptables-probe-port",
                    &self.iptables_probe_port,
                    "not a port number (1-65535)",
                )
            })?;
        let timeout = config::parse_go_duration(&self.probe_timeout).ok_or_else(|| {
            ConfigError::new(
                "--probe-timeout",
                &self.probe_timeout,
                "not a duration such as 5s or 500ms",
            )
        })?;
        Ok((port, timeout))
    }

    /// `--run-validation`: what `validate` checks, from the loaded config (typed ids and ports,
    /// the first proxy uid/gid).
    pub fn validate_params(&self, cfg: &Config) -> Result<validate::Params, ConfigError> {
        let (probe_port, timeout) = self.probe()?;
        let proxy_uid = cfg
            .proxy_uid
            .first()
            .copied()
            .unwrap_or(defaults::PROXY_UID);
        validate::Params {
            netns: self.network_namespace.clone(),
            proxy_port: cfg.proxy_port,
            inbound_capture_port: cfg.inbound_capture_port,
            probe_port,
            timeout,
            timeout_text: self.probe_timeout.trim().to_string(),
            proxy_uid,
            proxy_gid: cfg.proxy_gid.first().copied().unwrap_or(proxy_uid),
        }
        .checked()
    }
}
