//! `interceptor pod …`: the daemon's client.

use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use interceptor_common::config::ConfigError;

use super::args::{ApplyArgs, OutputFormat, SocketArgs};
use super::pod_ref::PodTarget;
use super::pod_text::{list_text, pod_text};
use crate::daemon::client::call;
use crate::daemon::protocol::{Request, Response};
use crate::model::{PodIdentity, PodSpec};

#[derive(Subcommand, Debug)]
pub enum PodCommand {
    /// Register a pod (the same flags as `apply`; --network-namespace is required).
    #[command(mut_args(super::args::hide(DAEMON_OWNED)))]
    Add(Box<PodAddArgs>),
    /// Unregister a pod.
    Remove(PodRefArgs),
    /// List registered pods (and records the daemon cannot read).
    List(PodListArgs),
    /// Show one pod: backend, why, config (and its user namespace's id mapping, if any).
    Show(PodShowArgs),
}

/// `apply`'s flags that the daemon, not `pod add`, decides (where the programs are pinned and
/// how they are loaded) or that mean nothing for a registration (`--host`, `--probe`): hidden
/// from `pod add --help` and refused when given (`errors::parse_from`). istio-iptables' own
/// flags all stay, as the CNI path relays them verbatim.
const DAEMON_OWNED: &[&str] = &[
    "host",
    "probe",
    "no_counters",
    "ebpf_log",
    "bpffs",
    "cgroup",
];

#[derive(Args, Debug, Clone)]
pub struct PodRefArgs {
    #[command(flatten)]
    pub target: PodTarget,
    #[command(flatten)]
    pub socket: SocketArgs,
}

#[derive(Args, Debug, Clone)]
pub struct PodListArgs {
    #[command(flatten)]
    pub socket: SocketArgs,
    /// Output: `text` (a table, the default) or `json` (for tools).
    #[arg(short = 'o', long, value_enum, default_value = "text")]
    pub output: OutputFormat,
}

#[derive(Args, Debug, Clone)]
pub struct PodShowArgs {
    #[command(flatten)]
    pub pod: PodRefArgs,
    /// Output: `text` (words, the default) or `json` (for tools).
    #[arg(short = 'o', long, value_enum, default_value = "text")]
    pub output: OutputFormat,
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

/// `pod add --dry-run`: the registration the daemon would get, validated as the daemon
/// validates its config; the daemon is not asked and nothing is registered.
fn dry_run_add(spec: &PodSpec) -> Result<Result<(), ConfigError>> {
    if let Err(e) = spec.config.parse() {
        return Ok(Err(e));
    }
    println!("{}", serde_json::to_string_pretty(spec)?);
    eprintln!("dry run: the registration above was not sent to the daemon; nothing was registered");
    Ok(Ok(()))
}

/// `interceptor pod …`: the daemon's client.
pub fn run(cmd: &PodCommand) -> Result<Result<(), ConfigError>> {
    let (socket, req) = match cmd {
        PodCommand::Add(a) => {
            let Some(netns) = a.apply.network_namespace.clone() else {
                return Ok(Err(ConfigError::new(
                    "--network-namespace",
                    "",
                    "is required for pod add",
                )));
            };
            let config = match a.apply.raw_config() {
                Ok(c) => c,
                Err(e) => return Ok(Err(e)),
            };
            let identity = match a.pod.as_deref().map(|p| p.split('/').collect::<Vec<_>>()) {
                None => None,
                Some(parts) if (2..=3).contains(&parts.len()) => Some(PodIdentity {
                    namespace: parts[0].into(),
                    name: parts[1].into(),
                    uid: parts.get(2).copied().unwrap_or_default().into(),
                }),
                Some(_) => {
                    return Ok(Err(ConfigError::new(
                        "--pod",
                        a.pod.clone().unwrap_or_default(),
                        "want namespace/name[/uid]",
                    )))
                }
            };
            let spec = PodSpec {
                netns,
                ips: a.ips.clone(),
                config,
                backend: a.apply.backend,
                identity,
            };
            if a.apply.dry_run {
                return dry_run_add(&spec);
            }
            (a.apply.socket.clone(), Request::Add(Box::new(spec)))
        }
        PodCommand::Remove(r) => match r.target.netns(&r.socket.socket)? {
            Ok(netns) => (r.socket.socket.clone(), Request::Remove { netns }),
            Err(e) => return Ok(Err(e)),
        },
        PodCommand::Show(r) => match r.pod.target.netns(&r.pod.socket.socket)? {
            Ok(netns) => (r.pod.socket.socket.clone(), Request::Show { netns }),
            Err(e) => return Ok(Err(e)),
        },
        PodCommand::List(l) => (l.socket.socket.clone(), Request::List),
    };
    match call(&socket, &req)? {
        Response::Error {
            message,
            bad_input: true,
        } => Ok(Err(ConfigError::new("request", "", message))),
        Response::Error { message, .. } => bail!("{message}"),
        Response::Pod(p) => {
            match cmd {
                PodCommand::Show(a) if a.output == OutputFormat::Text => {
                    print!("{}", pod_text(&p))
                }
                _ => println!("{}", serde_json::to_string_pretty(&p)?),
            }
            Ok(Ok(()))
        }
        Response::Pods { pods, unreadable } => {
            match cmd {
                PodCommand::List(l) if l.output == OutputFormat::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({
                        "pods": pods,
                        "unreadable_records": unreadable,
                    }))?
                ),
                _ => print!("{}", list_text(&pods, &unreadable)),
            }
            Ok(Ok(()))
        }
        Response::Removed { removed } => {
            eprintln!(
                "interceptor: {}",
                if removed {
                    "pod removed"
                } else {
                    "pod was not registered"
                }
            );
            Ok(Ok(()))
        }
        Response::Retry { message } => bail!("{message}"),
        Response::Pong | Response::PodInfo { .. } => Ok(Ok(())),
    }
}
