//! `interceptor apply`: validate, choose the backend, then print (dry run) or install.

use anyhow::{bail, Context, Result};
use std::path::Path;

use interceptor_common::config::{Config, ConfigError};
use interceptor_common::plan::defaults;
use interceptor_common::{idmap, policy};

use crate::backend::ebpf::{detect_cgroup2_root, Pins};
use crate::backend::netfilter::{self, Mode, Outcome};
use crate::backend::{exec, iptables, nftables};
use crate::cli::{ApplyArgs, LogsArgs, RemoveArgs};
use crate::model::{BackendKind, EbpfSettings};

/// The backend that will serve the pod, and why it was chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choice {
    pub backend: BackendKind,
    pub why: String,
}

/// Resolves `--backend` (and Istio's `--native-nftables`) to a concrete backend. `auto` takes
/// eBPF when the kernel offers every hook and the config needs nothing eBPF cannot do, and says
/// why when it falls back.
pub fn choose_backend(args: &ApplyArgs, cfg: &Config) -> Result<Choice, ConfigError> {
    choose(
        args.backend,
        args.native_nftables,
        || crate::service::probe::ebpf_missing(&args.ebpf.bpffs, args.ebpf.cgroup.as_deref()),
        cfg,
    )
}

/// `choose_backend` for callers without a command line (the daemon). `ebpf_missing` says why
/// eBPF cannot run here (probed only when `auto` needs to know; the daemon probes once).
pub fn choose(
    backend: BackendKind,
    native_nftables: bool,
    ebpf_missing: impl FnOnce() -> Option<String>,
    cfg: &Config,
) -> Result<Choice, ConfigError> {
    if native_nftables && !matches!(backend, BackendKind::Auto | BackendKind::Nftables) {
        return Err(ConfigError::new(
            "--native-nftables",
            "true",
            format!("conflicts with --backend {backend:?}").to_lowercase(),
        ));
    }
    let choice = |backend, why: String| Ok(Choice { backend, why });
    if cfg.accelerate && matches!(backend, BackendKind::Iptables | BackendKind::Nftables) {
        return Err(ConfigError::new(
            "--accelerate",
            "true",
            format!("needs the eBPF backend (sockops + sk_msg), not --backend {backend:?}")
                .to_lowercase(),
        ));
    }
    // An optimisation only: a pod that falls back keeps its interception, not the shortcut.
    let ignored = if cfg.accelerate {
        "; --accelerate ignored"
    } else {
        ""
    };
    let netfilter = |why: String| {
        netfilter_fallback(why).map(|mut c| {
            c.why.push_str(ignored);
            c
        })
    };
    match backend {
        BackendKind::Ebpf => match policy::ebpf_unsupported(cfg) {
            Some(why) => Err(ConfigError::new(
                "--backend",
                "ebpf",
                format!("refused: {why}"),
            )),
            None => choice(BackendKind::Ebpf, "requested with --backend ebpf".into()),
        },
        BackendKind::Iptables => choice(
            BackendKind::Iptables,
            "requested with --backend iptables".into(),
        ),
        BackendKind::Nftables => choice(
            BackendKind::Nftables,
            "requested with --backend nftables".into(),
        ),
        BackendKind::Auto if native_nftables => {
            choice(BackendKind::Nftables, format!("--native-nftables{ignored}"))
        }
        BackendKind::Auto => {
            if let Some(why) = policy::ebpf_unsupported(cfg) {
                return netfilter(format!("eBPF cannot honour this config ({why})"));
            }
            match ebpf_missing() {
                Some(why) => netfilter(format!("eBPF unavailable ({why})")),
                None => choice(
                    BackendKind::Ebpf,
                    "the kernel supports every eBPF hook needed".into(),
                ),
            }
        }
    }
}

/// `auto`'s fallback when eBPF cannot serve a pod (`why`): iptables if installed, else nftables.
pub fn netfilter_fallback(why: String) -> Result<Choice, ConfigError> {
    if exec::available("iptables-restore") {
        Ok(Choice {
            backend: BackendKind::Iptables,
            why: format!("{why}; iptables-restore found"),
        })
    } else if exec::available("nft") {
        Ok(Choice {
            backend: BackendKind::Nftables,
            why: format!("{why}; nft found"),
        })
    } else {
        Err(ConfigError::new(
            "--backend",
            "auto",
            format!("{why}, and neither iptables-restore nor nft is installed"),
        ))
    }
}

/// What `--dry-run` prints: exactly the documents that would be fed to the tools, or for eBPF
/// the map entries that would be written.
pub fn render(backend: BackendKind, cfg: &Config, netns: Option<&Path>) -> Result<String> {
    Ok(match backend {
        BackendKind::Nftables => nftables::render(cfg),
        BackendKind::Ebpf => {
            let t = crate::explain::pod_tables(cfg, netns)?;
            let p = policy::pod_policy(cfg, 0);
            let mut out = format!(
                "# eBPF map entries for this pod (keyed by its netns cookie)\npolicy: {p:?}\n"
            );
            let mut sorted = |name: &str, items: Vec<String>| {
                let mut items = items;
                items.sort();
                out.push_str(&format!("{name}: [{}]\n", items.join(", ")));
            };
            sorted(
                "ports_excluded",
                t.ports_excluded.iter().map(u16::to_string).collect(),
            );
            sorted(
                "ports_included",
                t.ports_included.iter().map(u16::to_string).collect(),
            );
            sorted(
                "cidrs_excluded",
                t.cidrs_excluded.iter().map(ToString::to_string).collect(),
            );
            sorted(
                "cidrs_included",
                t.cidrs_included.iter().map(ToString::to_string).collect(),
            );
            sorted(
                "local_addrs",
                t.local.iter().map(ToString::to_string).collect(),
            );
            sorted(
                "dns_servers",
                t.dns_servers.iter().map(ToString::to_string).collect(),
            );
            sorted("owner_gids", t.groups.iter().map(u32::to_string).collect());
            out
        }
        _ => {
            let docs = iptables::render(cfg);
            let mut out = docs.v4;
            if let Some(v6) = docs.v6 {
                out.push_str(&v6);
            }
            out
        }
    })
}

pub fn cgroup_of(a: &EbpfSettings) -> Result<std::path::PathBuf> {
    match &a.cgroup {
        Some(c) => Ok(c.clone()),
        None => detect_cgroup2_root(),
    }
}

/// The netns a command targets: the given one, else this process's own.
fn netns_or_self(p: Option<&Path>) -> &Path {
    p.unwrap_or(Path::new("/proc/self/ns/net"))
}

fn apply_ebpf(args: &ApplyArgs, cfg: &Config) -> Result<&'static str> {
    let pins = Pins::new(&args.ebpf.bpffs);
    let netns = netns_or_self(args.network_namespace.as_deref());
    if args.cleanup_only {
        if !pins.loaded() {
            return Ok("eBPF programs not loaded; nothing to remove");
        }
        return Ok(if pins.maps()?.remove(netns)? {
            "pod unregistered"
        } else {
            "pod was not registered"
        });
    }
    crate::backend::pin_dir::ensure_private(&pins.dir)?;
    let loaded = pins.ensure_loaded_with(
        &cgroup_of(&args.ebpf.settings())?,
        args.ebpf_log,
        !args.ebpf.no_counters,
    )?;
    let handle = register_ebpf(&pins, netns, cfg, None)?;
    tracing::info!(
        cookie = handle.netns_cookie,
        pod_id = handle.pod_id,
        "pod registered"
    );
    Ok(if loaded {
        "programs loaded and attached; pod registered"
    } else {
        "pod registered"
    })
}

/// Registers a pod in loaded programs' maps. `ips` adds addresses to those read from the netns
/// (the CNI plugin knows them from prevResult).
pub fn register_ebpf(
    pins: &Pins,
    netns: &Path,
    cfg: &Config,
    ips: Option<&[std::net::IpAddr]>,
) -> Result<crate::backend::ebpf::PodHandle> {
    register_in(&mut pins.maps()?, netns, cfg, ips)
}

/// `register_ebpf` with maps the caller keeps open (the daemon).
pub fn register_in(
    maps: &mut crate::backend::ebpf::PodMaps,
    netns: &Path,
    cfg: &Config,
    ips: Option<&[std::net::IpAddr]>,
) -> Result<crate::backend::ebpf::PodHandle> {
    let t = std::time::Instant::now();
    // One visit for the cookie, the addresses and the existing listeners.
    let facts = crate::netns::pod_netns(netns)?;
    tracing::debug!(micros = t.elapsed().as_micros() as u64, "netns visit");
    let mut local = facts.local.clone();
    for ip in ips.unwrap_or_default() {
        if !local.contains(ip) {
            local.push(*ip);
        }
    }
    let groups = crate::explain::owner_gids(cfg)?;
    // A pod with its own user namespace: the programs see host ids.
    match crate::userns::maps_of(netns)? {
        None => maps.register(netns, &facts, cfg, &local, &groups),
        Some(m) => {
            let host = idmap::host_config(cfg, &m).map_err(anyhow::Error::msg)?;
            let groups = idmap::translate_ids(&groups, &m.gid_map, "owner group")
                .map_err(anyhow::Error::msg)?;
            tracing::debug!(uid_map = %m.uid_map.render(), "pod in its own user namespace");
            maps.register(netns, &facts, &host, &local, &groups)
        }
    }
}

/// Applies (or removes) the iptables/nftables fallback for a pod.
pub fn apply_netfilter(
    backend: BackendKind,
    netns: Option<&Path>,
    cfg: &Config,
    forced: Option<crate::model::IptablesFlavor>,
    mode: Mode,
) -> Result<Outcome> {
    match backend {
        BackendKind::Nftables => netfilter::apply_nftables(netns, cfg, mode),
        _ => {
            let bin = netfilter::choose_binaries(netns, forced);
            netfilter::apply_iptables(netns, cfg, &bin, mode)
        }
    }
}

/// `interceptor remove`: unregisters a pod from the eBPF datapath.
pub fn remove(args: &RemoveArgs) -> Result<()> {
    let pins = Pins::new(&args.ebpf.bpffs);
    if !pins.loaded() {
        bail!(
            "the eBPF programs are not loaded under {}",
            args.ebpf.bpffs.display()
        );
    }
    let removed = pins.maps()?.remove(&args.network_namespace)?;
    eprintln!(
        "interceptor: {}",
        if removed {
            "pod unregistered"
        } else {
            "pod was not registered"
        }
    );
    Ok(())
}

/// `interceptor cleanup`: detaches and unpins every program, link and map of ours.
pub fn cleanup(args: &EbpfSettings) -> Result<()> {
    let removed = Pins::new(&args.bpffs).cleanup(&cgroup_of(args)?)?;
    eprintln!(
        "interceptor: {}",
        if removed {
            "eBPF programs detached and unpinned"
        } else {
            "nothing to clean up"
        }
    );
    Ok(())
}

/// Runs `apply` after validation. Validation errors come back as `Err(ConfigError)` so that
/// main can exit 2 having applied nothing.
pub fn run(args: &ApplyArgs) -> Result<Result<(), ConfigError>> {
    let cfg = match crate::config::load(args) {
        Ok(c) => c,
        Err(e) => return Ok(Err(e)),
    };
    let mut choice = match choose_backend(args, &cfg) {
        Ok(c) => c,
        Err(e) => return Ok(Err(e)),
    };
    if args.run_validation {
        // Istio's validation mode: check that interception works, apply nothing.
        let v = crate::cli::ValidateArgs {
            network_namespace: args.network_namespace.clone(),
            envoy_port: args.envoy_port.clone(),
            inbound_capture_port: args.inbound_capture_port.clone(),
            iptables_probe_port: args.iptables_probe_port.clone(),
            probe_timeout: args.probe_timeout.clone(),
            proxy_uid: cfg
                .proxy_uid
                .first()
                .map_or_else(|| defaults::PROXY_UID.to_string(), u32::to_string),
            proxy_gid: cfg.proxy_gid.first().map(u32::to_string),
        };
        return crate::validate::run(&v);
    }
    if args.dry_run {
        eprintln!("# backend: {:?} ({})", choice.backend, choice.why);
        print!(
            "{}",
            render(choice.backend, &cfg, args.network_namespace.as_deref())?
        );
        return Ok(Ok(()));
    }
    if args.skip_rule_apply {
        eprintln!("--skip-rule-apply: nothing applied");
        return Ok(Ok(()));
    }
    let netns = args.network_namespace.as_deref();
    let mode = Mode {
        reconcile: args.reconcile,
        force_apply: args.force_apply,
        cleanup_only: args.cleanup_only,
    };
    if choice.backend == BackendKind::Ebpf
        && !args.cleanup_only
        && crate::daemon::client::running(&args.socket)
    {
        // A daemon owns the datapath on this node: register through it.
        return via_daemon(args);
    }
    if choice.backend == BackendKind::Ebpf {
        match apply_ebpf(args, &cfg) {
            Ok(what) => {
                eprintln!("interceptor: {what} (Ebpf backend: {})", choice.why);
                return Ok(Ok(()));
            }
            // `auto`: a load or registration that failed (and was undone) falls back.
            Err(e) if args.backend == BackendKind::Auto && !args.cleanup_only => {
                let why = format!("eBPF registration failed: {e:#}");
                tracing::warn!("{why}; falling back");
                choice = match netfilter_fallback(why) {
                    Ok(c) => c,
                    Err(fe) => return Err(e.context(fe.to_string())),
                };
            }
            Err(e) => return Err(e),
        }
    }
    let outcome = apply_netfilter(
        choice.backend,
        netns,
        &cfg,
        args.force_iptables_binary,
        mode,
    )?;
    let what = match outcome {
        Outcome::Applied => "rules applied",
        Outcome::AlreadyInPlace => "rules already in place; nothing to do",
        Outcome::Reconciled => "rules replaced",
        Outcome::Removed => "rules removed",
        Outcome::NothingToRemove => "no rules of ours found; nothing to remove",
    };
    eprintln!(
        "interceptor: {what} ({:?} backend: {})",
        choice.backend, choice.why
    );
    Ok(Ok(()))
}

/// `interceptor logs`: drains the programs' aya-log ring buffer to stderr. The programs only
/// write to it when loaded with `--ebpf-log`.
pub fn logs(args: &LogsArgs) -> Result<()> {
    let id = Pins::new(&args.ebpf.bpffs).connect4_program_id()?;
    let mut logger =
        aya_log::EbpfLogger::init_from_id(id).context("opening the programs' log buffer")?;
    eprintln!(
        "interceptor: reading eBPF logs (empty unless the programs were loaded with --ebpf-log)"
    );
    let start = std::time::Instant::now();
    while args
        .seconds
        .is_none_or(|s| start.elapsed().as_secs_f64() < s)
    {
        logger.flush();
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    logger.flush();
    Ok(())
}

fn via_daemon(args: &ApplyArgs) -> Result<Result<(), ConfigError>> {
    let cmd = crate::cli::PodCommand::Add(Box::new(crate::cli::PodAddArgs {
        ips: vec![],
        pod: None,
        apply: args.clone(),
    }));
    eprintln!(
        "interceptor: registering through the daemon at {}",
        args.socket.display()
    );
    pod(&cmd)
}

/// `interceptor pod …`: the daemon's client.
pub fn pod(cmd: &crate::cli::PodCommand) -> Result<Result<(), ConfigError>> {
    use crate::cli::PodCommand;
    use crate::daemon::client::call;
    use crate::daemon::protocol::{Request, Response};
    use crate::model::{PodIdentity, PodSpec};
    let (socket, req) = match cmd {
        PodCommand::Add(a) => {
            let Some(netns) = a.apply.network_namespace.clone() else {
                return Ok(Err(ConfigError::new(
                    "--network-namespace",
                    "",
                    "is required for pod add",
                )));
            };
            let config = match crate::config::raw_config(&a.apply) {
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
            (a.apply.socket.clone(), Request::Add(Box::new(spec)))
        }
        PodCommand::Remove(r) => (
            r.socket.socket.clone(),
            Request::Remove {
                netns: r.network_namespace.clone(),
            },
        ),
        PodCommand::Show(r) => (
            r.pod.socket.socket.clone(),
            Request::Show {
                netns: r.pod.network_namespace.clone(),
            },
        ),
        PodCommand::List(s) => (s.socket.clone(), Request::List),
    };
    match call(&socket, &req)? {
        Response::Error {
            message,
            bad_input: true,
        } => Ok(Err(ConfigError::new("request", "", message))),
        Response::Error { message, .. } => bail!("{message}"),
        Response::Pod(p) => {
            match cmd {
                PodCommand::Show(a) if a.output == crate::cli::OutputFormat::Text => {
                    print!("{}", pod_text(&p))
                }
                _ => println!("{}", serde_json::to_string_pretty(&p)?),
            }
            Ok(Ok(()))
        }
        Response::Pods { pods } => {
            println!(
                "{:<40} {:<9} {:>8} {:<30} why",
                "netns", "backend", "pod_id", "identity"
            );
            for p in pods {
                let id = p
                    .identity
                    .map(|i| format!("{}/{}", i.namespace, i.name))
                    .unwrap_or_else(|| "-".into());
                println!(
                    "{:<40} {:<9} {:>8} {:<30} {}",
                    p.netns.display(),
                    format!("{:?}", p.backend).to_lowercase(),
                    p.pod_id,
                    id,
                    p.why
                );
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
        Response::Pong | Response::PodInfo { .. } => Ok(Ok(())),
    }
}

/// `pod show -o text`: one `key: value` line each, in words.
fn pod_text(p: &crate::daemon::protocol::PodStatus) -> String {
    let mut out = format!(
        "netns: {}\nbackend: {} ({})\npod id: {}\n",
        p.netns.display(),
        format!("{:?}", p.backend).to_lowercase(),
        p.why,
        p.pod_id
    );
    if let Some(i) = &p.identity {
        out.push_str(&format!("pod: {}/{}\n", i.namespace, i.name));
    }
    if !p.ips.is_empty() {
        let ips: Vec<String> = p.ips.iter().map(ToString::to_string).collect();
        out.push_str(&format!("ips: {}\n", ips.join(", ")));
    }
    match &p.userns {
        Some(u) => out.push_str(&format!(
            "user namespace: own (uid_map {}; gid_map {})\nproxy uid: {}\nproxy gid: {}\n",
            u.uid_map.render(),
            u.gid_map.render(),
            u.proxy_uid,
            u.proxy_gid
        )),
        None => out.push_str("user namespace: the node's\n"),
    }
    out.push_str(&format!("registered in: {} µs\n", p.add_micros));
    out
}
