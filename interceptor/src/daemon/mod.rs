//! `interceptor daemon`: the node-level service that replaces istio-init. It loads the programs
//! once (pinned, so interception survives the daemon), serves pods over a root-only control
//! socket, applies the iptables/nftables fallback inside a pod's netns when eBPF cannot serve it,
//! and on start re-adopts what an earlier instance left: pods whose netns is gone are forgotten.

pub mod client;
pub mod metrics;
mod prefill;
pub mod protocol;
mod server;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use interceptor_common::config::ConfigError;

use crate::backend::ebpf::Pins;
use crate::backend::netfilter::Mode;
use crate::model::PodSpec;
use crate::model::{BackendKind, EbpfSettings};
use crate::service::install::{self, Installed, Request as Install};
use protocol::{PodStatus, Request, Response};

pub use server::run;

/// What the daemon runs with (`cli::daemon` fills it from the flags).
#[derive(Debug, Clone)]
pub struct Settings {
    /// Control socket (root only, mode 0600).
    pub socket: PathBuf,
    /// Where registered pods are recorded.
    pub state_dir: PathBuf,
    /// Address of the metrics and health endpoint; empty disables.
    pub metrics_addr: String,
    /// Load the programs with decision logging on.
    pub ebpf_log: bool,
    pub ebpf: EbpfSettings,
    pub k8s: crate::k8s::ApiAccess,
}

/// The daemon's shared state; one lock serialises registrations.
pub struct Daemon {
    args: Settings,
    pins: Option<Pins>,
    /// Probed once at start: why eBPF cannot serve pods here, if it cannot.
    ebpf_missing: Option<String>,
    /// The pods of this node from the Kubernetes API (with `--node-name`).
    watcher: Option<crate::k8s::PodWatcher>,
    /// Open handles on the pinned maps (reopening them per pod would dominate the add cost).
    maps: Mutex<Option<crate::backend::ebpf::PodMaps>>,
    /// Loads per-pod sk_lookup programs ahead of time (with eBPF).
    prefill: Option<prefill::Prefill>,
}

fn state_file(dir: &Path, netns: &Path) -> PathBuf {
    // One file per netns path; the path itself is the key users give. Why the escaping and the
    // hash: mapping every other character to '_' made `/run/netns/pod-a` and `/run/netns/pod_a`
    // share one record, so adding one pod overwrote the other's and removing it unregistered
    // the other pod; and a path longer than NAME_MAX failed the record after the pod was
    // registered (half-registered). Now distinct paths give distinct, bounded names.
    use std::os::unix::ffi::OsStrExt;
    let bytes = netns.as_os_str().as_bytes();
    let mut name = String::new();
    for &b in bytes {
        if b.is_ascii_alphanumeric() {
            name.push(b as char);
        } else {
            name.push_str(&format!("_{b:02x}"));
        }
    }
    if name.len() > 150 {
        let mut h: u64 = 0xcbf29ce484222325; // FNV-1a of the full path
        for &b in bytes {
            h = (h ^ u64::from(b)).wrapping_mul(0x100000001b3);
        }
        name.truncate(128);
        name.push_str(&format!("-{h:016x}"));
    }
    dir.join(format!("{name}.json"))
}

impl Daemon {
    /// Loads (or finds loaded) programs and re-adopts the recorded pods.
    pub fn start(args: Settings) -> Result<Arc<Self>> {
        std::fs::create_dir_all(&args.state_dir)
            .with_context(|| format!("creating {}", args.state_dir.display()))?;
        // Why: the records hold every pod's config; no pod or other user needs to read them.
        std::fs::set_permissions(&args.state_dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("chmod 0700 {}", args.state_dir.display()))?;
        let ebpf_missing =
            crate::service::probe::ebpf_missing(&args.ebpf.bpffs, args.ebpf.cgroup.as_deref());
        let pins = match &ebpf_missing {
            None => {
                let pins = Pins::new(&args.ebpf.bpffs);
                let loaded = install::load_programs(&pins, &args.ebpf, args.ebpf_log)?;
                tracing::info!(bpffs = %args.ebpf.bpffs.display(), loaded_now = loaded, "eBPF datapath ready");
                Some(pins)
            }
            Some(why) => {
                tracing::warn!(%why, "eBPF unavailable: every pod gets the iptables/nftables fallback");
                None
            }
        };
        let maps = pins.as_ref().map(Pins::maps).transpose()?;
        let prefill = match &maps {
            Some(m) => Some(prefill::Prefill::start(m.program_pool())?),
            None => None,
        };
        let watcher = match &args.k8s.node_name {
            Some(node) => {
                let w = crate::k8s::PodWatcher::start(args.k8s.config_blocking()?, node.clone())?;
                tracing::info!(node = %node, "watching this node's pods");
                Some(w)
            }
            None => None,
        };
        let d = Arc::new(Self {
            args,
            pins,
            ebpf_missing,
            watcher,
            maps: Mutex::new(maps),
            prefill,
        });
        d.readopt()?;
        Ok(d)
    }

    fn pods_on_disk(&self) -> Vec<(PathBuf, PodStatus)> {
        let Ok(dir) = std::fs::read_dir(&self.args.state_dir) else {
            return vec![];
        };
        dir.flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
            .filter_map(|e| {
                let text = std::fs::read_to_string(e.path()).ok()?;
                Some((e.path(), serde_json::from_str(&text).ok()?))
            })
            .collect()
    }

    /// Keeps recorded pods whose netns still exists (same cookie), forgets the others, and
    /// drops map entries nobody recorded.
    fn readopt(&self) -> Result<()> {
        let mut live = Vec::new();
        for (mut file, pod) in self.pods_on_disk() {
            // Records written under an earlier naming scheme move to today's name.
            let want = state_file(&self.args.state_dir, &pod.netns);
            if file != want && std::fs::rename(&file, &want).is_ok() {
                file = want;
            }
            if pod.removing {
                // Killed mid-removal: finish it.
                let mut maps = self.maps.lock().unwrap_or_else(|e| e.into_inner());
                self.uninstall(&pod, maps.as_mut())?;
                let _ = std::fs::remove_file(file);
                tracing::info!(netns = %pod.netns.display(), "finished an interrupted removal");
                continue;
            }
            let alive = crate::netns::is_netns(&pod.netns)
                && crate::netns::identity(&pod.netns).is_ok_and(|c| c == pod.netns_cookie);
            if alive {
                live.push(pod.netns_cookie);
                tracing::info!(netns = %pod.netns.display(), backend = ?pod.backend, "re-adopted pod");
            } else {
                tracing::info!(netns = %pod.netns.display(), "forgetting pod whose netns is gone");
                let _ = std::fs::remove_file(file);
            }
        }
        if let Some(maps) = self.maps.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            for (cookie, _) in maps.pods() {
                if !live.contains(&cookie) {
                    maps.remove_cookie(cookie)?;
                    tracing::info!(cookie, "removed map entries of an unrecorded pod");
                }
            }
        }
        Ok(())
    }

    fn lookup(&self, netns: &Path) -> Option<PodStatus> {
        let text = std::fs::read_to_string(state_file(&self.args.state_dir, netns)).ok()?;
        serde_json::from_str(&text).ok()
    }

    fn record(&self, pod: &PodStatus) -> Result<()> {
        let file = state_file(&self.args.state_dir, &pod.netns);
        let tmp = file.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec(pod)?)?;
        std::fs::rename(&tmp, &file)?;
        Ok(())
    }

    /// Registers a pod. Validation errors come back as `Ok(Err(..))`: nothing was applied.
    pub fn add(&self, spec: &PodSpec) -> Result<Result<PodStatus, ConfigError>> {
        let start = Instant::now();
        tracing::debug!("add start");
        let cfg = match spec.config.parse() {
            Ok(c) => c,
            Err(e) => return Ok(Err(e)),
        };
        if !crate::netns::is_netns(&spec.netns) {
            return Ok(Err(ConfigError::new(
                "netns",
                spec.netns.display().to_string(),
                "is not a network namespace",
            )));
        }
        let mut choice = match (&self.pins, spec.backend) {
            (None, BackendKind::Ebpf) => {
                return Ok(Err(ConfigError::new(
                    "backend",
                    "ebpf",
                    "eBPF is unavailable on this node (see `interceptor doctor`)",
                )))
            }
            _ => match install::choose(spec.backend, false, || self.ebpf_missing.clone(), &cfg) {
                Ok(c) => c,
                Err(e) => return Ok(Err(e)),
            },
        };
        let mut maps = self.maps.lock().unwrap_or_else(|e| e.into_inner());
        // A pod moving between backends must not keep the old one's interception.
        if let Some(old) = self.lookup(&spec.netns) {
            if old.backend != choice.backend {
                self.uninstall(&old, maps.as_mut())?;
                // Its record goes with it: a failure below must not leave a record of
                // interception that is no longer installed.
                let _ = std::fs::remove_file(state_file(&self.args.state_dir, &spec.netns));
            }
        }
        let req = Install {
            requested: spec.backend,
            netns: Some(&spec.netns),
            cfg: &cfg,
            forced: None,
            mode: Mode {
                reconcile: true,
                ..Mode::default()
            },
        };
        // The pod's own user namespace, if it has one: registration translates through its id
        // maps and `pod show` shows them.
        let userns_maps = crate::userns::maps_of(&spec.netns)?;
        // eBPF registration reads the netns cookie itself: one netns visit, not two. It is all
        // or nothing: a failure leaves nothing registered (and, with `auto`, falls back).
        let ebpf = || match maps.as_mut() {
            Some(maps) => {
                let ips = (!spec.ips.is_empty()).then_some(spec.ips.as_slice());
                install::register_in(maps, &spec.netns, &cfg, ips, userns_maps.as_ref())
            }
            None => bail!("eBPF is unavailable on this node"),
        };
        let (pod_id, cookie) = match install::install(&req, &mut choice, ebpf)? {
            Installed::Ebpf(h) => (h.pod_id, h.netns_cookie),
            Installed::Netfilter(_) => (0, crate::netns::identity(&spec.netns)?),
        };
        // Shown by `pod show`; the registration above translated through the same maps.
        let userns = userns_maps
            .as_ref()
            .map(|m| crate::userns::UsernsView::new(m, &cfg));
        let status = PodStatus {
            netns: spec.netns.clone(),
            netns_cookie: cookie,
            pod_id,
            backend: choice.backend,
            why: choice.why,
            ips: spec.ips.clone(),
            identity: spec.identity.clone(),
            config: spec.config.clone(),
            add_micros: start.elapsed().as_micros() as u64,
            userns,
            removing: false,
        };
        self.record(&status)?;
        tracing::info!(netns = %status.netns.display(), backend = ?status.backend, micros = status.add_micros, "pod added");
        Ok(Ok(status))
    }

    fn uninstall(
        &self,
        pod: &PodStatus,
        maps: Option<&mut crate::backend::ebpf::PodMaps>,
    ) -> Result<()> {
        match (pod.backend, maps) {
            (BackendKind::Ebpf, Some(maps)) => {
                maps.remove_cookie_in(pod.netns_cookie, Some(&pod.netns))?;
            }
            (BackendKind::Ebpf, None) => {}
            (backend, _) => {
                if crate::netns::is_netns(&pod.netns) {
                    let cfg = pod.config.parse()?;
                    let mode = Mode {
                        cleanup_only: true,
                        ..Mode::default()
                    };
                    install::apply_netfilter(backend, Some(&pod.netns), &cfg, None, mode)?;
                }
            }
        }
        Ok(())
    }

    /// Unregisters a pod; idempotent (false when it was not registered).
    pub fn remove(&self, netns: &Path) -> Result<bool> {
        let mut maps = self.maps.lock().unwrap_or_else(|e| e.into_inner());
        let Some(mut pod) = self.lookup(netns) else {
            return Ok(false);
        };
        pod.removing = true;
        self.record(&pod)?;
        self.uninstall(&pod, maps.as_mut())?;
        let _ = std::fs::remove_file(state_file(&self.args.state_dir, netns));
        tracing::info!(netns = %netns.display(), "pod removed");
        Ok(true)
    }

    pub fn list(&self) -> Vec<PodStatus> {
        let mut pods: Vec<_> = self.pods_on_disk().into_iter().map(|(_, p)| p).collect();
        pods.sort_by(|a, b| a.netns.cmp(&b.netns));
        pods
    }

    /// After an add or removal was answered: loads the programs the next adds will take.
    pub(super) fn after_change(&self) {
        if let Some(p) = &self.prefill {
            p.poke();
        }
    }

    pub(super) fn handle(&self, req: Request) -> Response {
        let err = |e: anyhow::Error| Response::Error {
            message: format!("{e:#}"),
            bad_input: false,
        };
        match req {
            Request::Ping => Response::Pong,
            Request::PodInfo { namespace, name } => match &self.watcher {
                None => Response::Error {
                    message: "no Kubernetes pod watcher (--node-name not set)".into(),
                    bad_input: false,
                },
                // A CNI ADD can arrive before the watch event: wait a little for it.
                Some(w) => match w.wait_for(&namespace, &name, std::time::Duration::from_secs(5)) {
                    None => Response::Error {
                        message: format!("pod {namespace}/{name} is not known on this node"),
                        bad_input: false,
                    },
                    Some(m) => {
                        let (annotations, proxy_env, run_as_user, run_as_group) = m.into_inputs();
                        Response::PodInfo {
                            annotations,
                            proxy_env,
                            run_as_user,
                            run_as_group,
                        }
                    }
                },
            },
            Request::List => Response::Pods { pods: self.list() },
            Request::Show { netns } => match self.lookup(&netns) {
                Some(p) => Response::Pod(Box::new(p)),
                None => Response::Error {
                    message: format!("pod {} is not registered", netns.display()),
                    bad_input: true,
                },
            },
            Request::Remove { netns } => self
                .remove(&netns)
                .map_or_else(err, |removed| Response::Removed { removed }),
            Request::Add(spec) => match self.add(&spec) {
                Ok(Ok(p)) => Response::Pod(Box::new(p)),
                Ok(Err(e)) => Response::Error {
                    message: e.to_string(),
                    bad_input: true,
                },
                Err(e) => err(e),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_files_are_distinct_and_bounded() {
        let d = Path::new("/state");
        let a = state_file(d, Path::new("/run/netns/pod-a"));
        assert_ne!(a, state_file(d, Path::new("/run/netns/pod_a")));
        assert_ne!(a, state_file(d, Path::new("/run/netns/pod.a")));
        let long = format!("/run/netns/{}", "./".repeat(300));
        let f = state_file(d, Path::new(&long));
        assert!(f.file_name().unwrap().len() <= 200, "{}", f.display());
        assert_ne!(f, state_file(d, Path::new(&format!("{long}x"))));
    }
}
