//! The install service: choose a pod's backend, install it — eBPF (all or nothing: a failed
//! registration undoes its writes), under `auto` falling back to the netfilter rules when eBPF
//! fails — and say why. `apply` and the daemon both install through here.

use std::path::{Path, PathBuf};

use anyhow::Result;
use interceptor_common::config::{Config, ConfigError};
use interceptor_common::{idmap, policy};

use crate::backend::ebpf::{detect_cgroup2_root, Loaded, Pins, PodHandle, PodMaps};
use crate::backend::netfilter::{self, Mode, Outcome};
use crate::backend::{exec, iptables, nftables};
use crate::model::{BackendKind, EbpfSettings, IptablesFlavor};
use crate::service::probe::coexist::{neighbours, Kind};
use crate::tables;

/// Why `auto` takes eBPF.
pub const EBPF_READY: &str = "the kernel supports every eBPF hook needed";

/// The backend that will serve the pod, and why it was chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choice {
    pub backend: BackendKind,
    pub why: String,
}

/// Resolves the requested backend (and Istio's `--native-nftables`) to a concrete one. `auto`
/// takes eBPF when the kernel offers every hook and the config needs nothing eBPF cannot do,
/// and says why when it falls back. `ebpf_missing` says why eBPF cannot run here (probed only
/// when `auto` needs to know; the daemon probes once).
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
            format!("conflicts with --backend {backend}"),
        ));
    }
    let choice = |backend, why: String| Ok(Choice { backend, why });
    if cfg.accelerate && matches!(backend, BackendKind::Iptables | BackendKind::Nftables) {
        return Err(ConfigError::new(
            "--accelerate",
            "true",
            format!("needs the eBPF backend (sockops + sk_msg), not --backend {backend}"),
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
    // Acceleration tells sockets of different pods apart by the netns cookie, which sock_ops
    // and sk_msg programs can read from 5.15 on.
    let accel_unsupported = cfg.accelerate && !crate::backend::ebpf::netns_helper();
    match backend {
        BackendKind::Ebpf => match policy::ebpf_unsupported(cfg) {
            Some(why) => Err(ConfigError::new(
                "--backend",
                "ebpf",
                format!("refused: {why}"),
            )),
            None if accel_unsupported => Err(ConfigError::new(
                "--accelerate",
                "true",
                format!("not supported on this kernel: {ACCEL_NEEDS}"),
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
                None if accel_unsupported => choice(
                    BackendKind::Ebpf,
                    format!("{EBPF_READY}; --accelerate ignored: {ACCEL_NEEDS}"),
                ),
                None => choice(BackendKind::Ebpf, EBPF_READY.into()),
            }
        }
    }
}

/// Why `--accelerate` needs a newer kernel.
const ACCEL_NEEDS: &str =
    "sock_ops and sk_msg programs cannot read the netns cookie before Linux 5.15";

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
        BackendKind::Ebpf => super::ebpf_entries::text(cfg, &tables::pod_tables(cfg, netns)?),
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

/// The cgroup the programs attach to: the configured one, else the cgroup v2 root.
pub fn cgroup_of(a: &EbpfSettings) -> Result<PathBuf> {
    match &a.cgroup {
        Some(c) => Ok(c.clone()),
        None => detect_cgroup2_root(),
    }
}

/// Loads and attaches the programs unless this binary's are loaded already (pinned under a
/// private folder), replacing an earlier binary's in place; says which. Having changed them,
/// warns about any program that runs before ours where it could rewrite destinations first
/// (`doctor` says more).
pub fn load_programs(pins: &Pins, ebpf: &EbpfSettings, log: bool) -> Result<Loaded> {
    super::pin_dir::ensure_private(&pins.dir)?;
    let cgroup = cgroup_of(ebpf)?;
    let loaded = pins.ensure_loaded_with(&cgroup, log, !ebpf.no_counters)?;
    if loaded.changed() {
        let beside = neighbours(&pins.dir, Some(&cgroup));
        for f in beside.findings.iter().filter(|f| f.kind != Kind::Note) {
            tracing::warn!(program = %f.name, id = f.id, hook = f.hook, fix = %f.fix, "{}", f.what);
        }
    }
    Ok(loaded)
}

/// What the caller installs and how: the backend it asked for (`auto` may fall back), the pod's
/// netns (None: this process's own) and config, and what to do about rules already there.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub requested: BackendKind,
    pub netns: Option<&'a Path>,
    pub cfg: &'a Config,
    pub forced: Option<IptablesFlavor>,
    pub mode: Mode,
}

/// What `install` did.
#[derive(Debug)]
pub enum Installed<T> {
    /// The eBPF step's result.
    Ebpf(T),
    Netfilter(Outcome),
}

/// Installs `choice` for the pod. The eBPF step is the caller's (the CLI loads the programs if
/// needed, the daemon writes through the maps it keeps open); it must be all or nothing. When it
/// fails and `auto` was asked for, the pod gets the netfilter fallback and `choice` says why.
pub fn install<T>(
    req: &Request<'_>,
    choice: &mut Choice,
    ebpf: impl FnOnce() -> Result<T>,
) -> Result<Installed<T>> {
    if choice.backend == BackendKind::Ebpf {
        match ebpf() {
            Ok(t) => return Ok(Installed::Ebpf(t)),
            Err(e) if req.requested == BackendKind::Auto && !req.mode.cleanup_only => {
                let why = format!("eBPF registration failed: {e:#}");
                match req.netns {
                    Some(ns) => tracing::warn!(netns = %ns.display(), "{why}; falling back"),
                    None => tracing::warn!("{why}; falling back"),
                }
                *choice = match netfilter_fallback(why) {
                    Ok(c) => c,
                    Err(fe) => return Err(e.context(fe.to_string())),
                };
            }
            Err(e) => return Err(e),
        }
    }
    crate::progress::step(format!(
        "{} the {} rules{}",
        if req.mode.cleanup_only {
            "removing"
        } else {
            "applying"
        },
        choice.backend.words(),
        req.netns
            .map(|ns| format!(" in netns {}", ns.display()))
            .unwrap_or_default()
    ));
    apply_netfilter(choice.backend, req.netns, req.cfg, req.forced, req.mode)
        .map(Installed::Netfilter)
}

/// Registers a pod in loaded programs' maps. `ips` adds addresses to those read from the netns
/// (the CNI plugin knows them from prevResult).
pub fn register_ebpf(
    pins: &Pins,
    netns: &Path,
    cfg: &Config,
    ips: Option<&[std::net::IpAddr]>,
) -> Result<PodHandle> {
    let ns = crate::netns::Netns::open_or_fail(netns)?;
    let userns = crate::userns::maps_of_open(&ns.file, &ns.path)?;
    register_in(&mut pins.maps()?, &ns, cfg, ips, userns.as_ref())
}

/// `register_ebpf` with maps the caller keeps open (the daemon).
/// `userns`: the id maps of the netns's own user namespace (`userns::maps_of`), read by the
/// caller, which shows them too.
pub fn register_in(
    maps: &mut PodMaps,
    ns: &crate::netns::Netns,
    cfg: &Config,
    ips: Option<&[std::net::IpAddr]>,
    userns: Option<&idmap::UsernsMaps>,
) -> Result<PodHandle> {
    let t = std::time::Instant::now();
    let netns = ns.path.as_path();
    // One visit for the cookie, the addresses and the existing listeners.
    let facts = crate::netns::pod_netns(ns)?;
    tracing::debug!(micros = t.elapsed().as_micros() as u64, "netns visit");
    let mut local = facts.local.clone();
    for ip in ips.unwrap_or_default() {
        if !local.contains(ip) {
            local.push(*ip);
        }
    }
    let groups = tables::owner_gids(cfg)?;
    // A pod with its own user namespace: the programs see host ids.
    match userns {
        None => maps.register(netns, &facts, cfg, &local, &groups),
        Some(m) => {
            let host = idmap::host_config(cfg, m).map_err(anyhow::Error::msg)?;
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
    forced: Option<IptablesFlavor>,
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
