//! `interceptor daemon`'s flags, turned into the daemon's settings.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use super::args::EbpfArgs;
use crate::daemon::repair_policy::{self as repair, Policy};
use crate::daemon::Settings;
use crate::k8s::ApiAccess;

#[derive(Args, Debug, Clone)]
pub struct DaemonArgs {
    /// Control socket (root only, mode 0600).
    #[arg(
        long,
        env = "INTERCEPTOR_SOCKET",
        default_value = "/run/interceptor/interceptor.sock"
    )]
    pub socket: PathBuf,
    /// Where registered pods are recorded (tmpfs: state lives as long as the bpffs pins do).
    #[arg(
        long,
        env = "INTERCEPTOR_STATE_DIR",
        default_value = "/run/interceptor/pods"
    )]
    pub state_dir: PathBuf,
    /// Address of the HTTP endpoint for Prometheus (/metrics) and probes (/healthz); keep it on
    /// loopback. Empty disables.
    #[arg(
        long,
        env = "INTERCEPTOR_METRICS_ADDR",
        default_value = "127.0.0.1:15099"
    )]
    pub metrics_addr: String,
    /// Log as JSON lines instead of human-readable text.
    #[arg(long)]
    pub log_json: bool,
    /// Load the programs with decision logging on (see `interceptor logs`).
    #[arg(long)]
    pub ebpf_log: bool,
    #[arg(long, help = super::args::NO_COUNTERS_HELP)]
    pub no_counters: bool,
    /// Keep the kernel's run-time statistics of BPF programs on while the daemon runs, so the
    /// metrics show each program's runs and run time (interceptor_program_*). They cost two
    /// clock reads per program run, so they are off by default; with the kernel.bpf_stats_enabled
    /// sysctl on they are shown without this flag.
    #[arg(long, env = "INTERCEPTOR_PROGRAM_STATS")]
    pub program_stats: bool,
    #[command(flatten)]
    pub ebpf: EbpfArgs,
    #[command(flatten)]
    pub k8s: K8sArgs,
    /// Running mesh pods of this node without interception (started before the plugin was
    /// chained, or while it was upgraded): `repair` registers them live (connections opened
    /// before that are not captured), `label` sets Istio's `cni.istio.io/uninitialized=true`,
    /// `delete` deletes them (their owner recreates them), `off` leaves them. Needs --node-name.
    #[arg(long, env = "INTERCEPTOR_REPAIR", default_value = "repair", value_parser = parse_policy)]
    pub repair: Policy,
    /// Seconds between repair passes when no pod event comes (1 to 3600).
    #[arg(long, env = "INTERCEPTOR_REPAIR_INTERVAL", default_value = "30",
          value_parser = |s: &str| seconds(s, 1, "--repair-interval"))]
    pub repair_interval: Duration,
    /// Seconds a pod's oldest process must have run before repair acts on it, so that a CNI
    /// ADD under way is never raced (0 to 3600).
    #[arg(long, env = "INTERCEPTOR_REPAIR_GRACE", default_value = "30",
          value_parser = |s: &str| seconds(s, 0, "--repair-grace"))]
    pub repair_grace: Duration,
}

fn parse_policy(s: &str) -> Result<Policy, String> {
    s.parse()
}

/// Whole seconds from `min` to 3600.
fn seconds(s: &str, min: u64, flag: &str) -> Result<Duration, String> {
    match s.parse::<u64>() {
        Ok(n) if (min..=3600).contains(&n) => Ok(Duration::from_secs(n)),
        _ => Err(format!(
            "invalid {flag} value {s:?}: want whole seconds from {min} to 3600"
        )),
    }
}

/// How the daemon reaches the Kubernetes API (flattened into the daemon's flags).
#[derive(Args, Debug, Clone, Default)]
pub struct K8sArgs {
    /// This node's name: only pods with `spec.nodeName` equal to it are watched. Set it from
    /// the downward API (`spec.nodeName`); without it the daemon watches no pods.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// A kubeconfig file to reach the API with; default: the in-cluster service account, else
    /// `$KUBECONFIG` / `~/.kube/config` (kube-rs' `Config::infer`).
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
}

impl K8sArgs {
    pub fn access(&self) -> ApiAccess {
        ApiAccess {
            node_name: self.node_name.clone(),
            kubeconfig: self.kubeconfig.clone(),
        }
    }
}

impl DaemonArgs {
    pub fn settings(&self) -> Settings {
        Settings {
            socket: self.socket.clone(),
            state_dir: self.state_dir.clone(),
            metrics_addr: self.metrics_addr.clone(),
            ebpf_log: self.ebpf_log,
            program_stats: self.program_stats,
            ebpf: self.ebpf.loading(self.no_counters),
            k8s: self.k8s.access(),
            repair: repair::Settings {
                policy: self.repair,
                interval: self.repair_interval,
                grace: self.repair_grace,
            },
        }
    }
}
