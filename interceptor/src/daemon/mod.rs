//! `interceptor daemon`: the node-level service that replaces istio-init. It loads the programs
//! once (pinned, so interception survives the daemon), serves pods over a root-only control
//! socket, applies the iptables/nftables fallback inside a pod's netns when eBPF cannot serve it,
//! and on start re-adopts what an earlier instance left: pods whose netns is gone are forgotten.
//! Restart fails closed: a record it cannot read keeps its pod's interception (and is reported),
//! and a removal that cannot be finished is kept for retry without stopping the daemon.

pub mod client;
mod mesh;
pub mod metrics;
mod prefill;
pub mod protocol;
mod records;
mod repair;
pub mod repair_policy;
mod server;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use interceptor_common::config::ConfigError;

use crate::backend::ebpf::{Layout, Loaded, Pins};
use crate::backend::netfilter::Mode;
use crate::model::PodSpec;
use crate::model::{BackendKind, EbpfSettings};
use crate::service::install::{self, Installed, Request as Install};
use protocol::{PodStatus, Request, Response, UnreadableRecord};
use records::state_file;

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
    /// Keep the programs' run-time statistics on while running (metrics show them).
    pub program_stats: bool,
    pub ebpf: EbpfSettings,
    pub k8s: crate::k8s::ApiAccess,
    /// What to do with pods of this node that escaped setup (needs `k8s.node_name`).
    pub repair: repair_policy::Settings,
}

/// The daemon's shared state; one lock serialises registrations.
pub struct Daemon {
    args: Settings,
    pins: Option<Pins>,
    /// What loading the programs did at start ("loaded", "kept", "upgraded") and the pins'
    /// layout and program identity after it (metrics).
    programs: Option<(&'static str, Option<Layout>)>,
    /// Probed once at start: why eBPF cannot serve pods here, if it cannot.
    ebpf_missing: Option<String>,
    /// The pods of this node from the Kubernetes API (with `--node-name`).
    watcher: Option<crate::k8s::PodWatcher>,
    /// Open handles on the pinned maps (reopening them per pod would dominate the add cost).
    maps: Mutex<Option<crate::backend::ebpf::PodMaps>>,
    /// Loads per-pod sk_lookup programs ahead of time (with eBPF).
    prefill: Option<prefill::Prefill>,
    /// Repair's counts, and what the control socket tells it (ADDs in flight, DELs done).
    repair: repair_policy::Shared,
    /// Held while the daemon runs with `program_stats`.
    stats: Option<crate::backend::ebpf::stats::StatsOn>,
}

/// What an add did.
pub(crate) enum Added {
    Pod(Box<PodStatus>),
    /// Invalid input: nothing was applied.
    Invalid(ConfigError),
    /// Not added: the netns is registered already, or a remove took its pod away (repair's
    /// adds only).
    Registered,
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
        let (pins, programs) = match &ebpf_missing {
            None => {
                let pins = Pins::new(&args.ebpf.bpffs);
                let loaded = install::load_programs(&pins, &args.ebpf, args.ebpf_log)?;
                let how = match &loaded {
                    Loaded::Already => "kept",
                    Loaded::Fresh => "loaded",
                    Loaded::Upgraded(_) => "upgraded",
                };
                let layout = pins.layout().ok().flatten();
                tracing::info!(bpffs = %args.ebpf.bpffs.display(), programs = how,
                    layout = %layout.as_ref().map(ToString::to_string).unwrap_or_default(),
                    "eBPF datapath ready");
                (Some(pins), Some((how, layout)))
            }
            Some(why) => {
                tracing::warn!(%why, "eBPF unavailable: every pod gets the iptables/nftables fallback");
                (None, None)
            }
        };
        let maps = pins.as_ref().map(Pins::maps).transpose()?;
        let stats = match (&pins, args.program_stats) {
            (Some(_), true) => Some(crate::backend::ebpf::stats::stats_on()?),
            _ => None,
        };
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
            programs,
            ebpf_missing,
            watcher,
            maps: Mutex::new(maps),
            prefill,
            repair: repair_policy::Shared::default(),
            stats,
        });
        d.readopt()?;
        Ok(d)
    }

    /// Keeps recorded pods whose netns still exists (same cookie), forgets the others, finishes
    /// interrupted removals, and drops map entries nobody recorded. Fails closed and never
    /// stops the start: a record that cannot be read keeps every unrecorded entry (it may be
    /// that pod's), and a removal that fails is kept for retry; both are logged and reported
    /// (`pod list`, metrics).
    fn readopt(&self) -> Result<()> {
        let (pods, unreadable) = records::scan(&self.args.state_dir);
        for u in &unreadable {
            let netns = u
                .netns
                .as_ref()
                .map_or_else(|| "unknown".into(), |n| n.display().to_string());
            tracing::error!(file = %u.file.display(), netns = %netns, error = %u.error,
                "unreadable pod record: its pod keeps its interception; remove the pod or the file");
        }
        let mut live = Vec::new();
        for (mut file, mut pod) in pods {
            // Records written under an earlier naming scheme move to today's name.
            let want = state_file(&self.args.state_dir, &pod.netns);
            if file != want && std::fs::rename(&file, &want).is_ok() {
                file = want;
            }
            if pod.removing {
                // Killed mid-removal (or a removal that failed): finish it.
                let mut maps = self.maps.lock().unwrap_or_else(|e| e.into_inner());
                match self.uninstall(&pod, maps.as_mut()) {
                    Ok(()) => {
                        let _ = std::fs::remove_file(file);
                        tracing::info!(netns = %pod.netns.display(), "finished an interrupted removal");
                    }
                    Err(e) => {
                        tracing::error!(netns = %pod.netns.display(), error = %format!("{e:#}"),
                            "cannot finish the removal of a pod: kept, retried by its next remove or restart");
                        live.push(pod.netns_cookie);
                        pod.removal_error = Some(format!("{e:#}"));
                        if let Err(e) = records::write(&self.args.state_dir, &pod) {
                            tracing::warn!(netns = %pod.netns.display(), "recording the failed removal: {e:#}");
                        }
                    }
                }
                continue;
            }
            let alive = crate::netns::is_netns(&pod.netns)
                && crate::netns::is_recorded(&pod.netns, pod.netns_cookie);
            if alive {
                live.push(pod.netns_cookie);
                tracing::info!(netns = %pod.netns.display(), backend = %pod.backend, "re-adopted pod");
            } else {
                tracing::info!(netns = %pod.netns.display(), "forgetting pod whose netns is gone");
                let _ = std::fs::remove_file(file);
            }
        }
        if let Some(maps) = self.maps.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            let unrecorded: Vec<u64> = maps
                .pods()
                .into_iter()
                .map(|(cookie, _)| cookie)
                .filter(|c| !live.contains(c))
                .collect();
            if !unreadable.is_empty() {
                // Which pod an unreadable record was is unknown: deleting "unrecorded" policy
                // could take a live pod's interception away. Kept until no record is unreadable.
                if !unrecorded.is_empty() {
                    tracing::warn!(
                        entries = unrecorded.len(),
                        unreadable = unreadable.len(),
                        "keeping map entries no readable record claims, as a record is unreadable"
                    );
                }
                return Ok(());
            }
            for cookie in unrecorded {
                match maps.remove_cookie(cookie) {
                    Ok(_) => tracing::info!(cookie, "removed map entries of an unrecorded pod"),
                    Err(e) => {
                        tracing::warn!(cookie, "removing map entries of an unrecorded pod: {e:#}")
                    }
                }
            }
        }
        Ok(())
    }

    fn lookup(&self, netns: &Path) -> Option<PodStatus> {
        records::read(&self.args.state_dir, netns).ok().flatten()
    }

    fn record(&self, pod: &PodStatus) -> Result<()> {
        records::write(&self.args.state_dir, pod)
    }

    /// Registers a pod. Validation errors come back as `Ok(Err(..))`: nothing was applied.
    pub fn add(&self, spec: &PodSpec) -> Result<Result<PodStatus, ConfigError>> {
        match self.add_inner(spec, None)? {
            Added::Pod(p) => Ok(Ok(*p)),
            Added::Invalid(e) => Ok(Err(e)),
            Added::Registered => bail!("{} is registered already", spec.netns.display()),
        }
    }

    /// Repair's add: registers the pod of netns `cookie` unless a record has that netns or a
    /// remove took it away (checked under the lock every add and remove holds, so a CNI ADD
    /// or DEL of the same pod is never raced).
    pub(crate) fn add_unregistered(&self, spec: &PodSpec, cookie: u64) -> Result<Added> {
        self.add_inner(spec, Some(cookie))
    }

    fn add_inner(&self, spec: &PodSpec, unless_registered: Option<u64>) -> Result<Added> {
        let start = Instant::now();
        tracing::debug!("add start");
        let cfg = match spec.config.parse() {
            Ok(c) => c,
            Err(e) => return Ok(Added::Invalid(e)),
        };
        // Opened once for every step below.
        let Some(ns) = crate::netns::Netns::open(&spec.netns) else {
            return Ok(Added::Invalid(ConfigError::new(
                "netns",
                spec.netns.display().to_string(),
                "is not a network namespace",
            )));
        };
        let mut choice = match (&self.pins, spec.backend) {
            (None, BackendKind::Ebpf) => {
                return Ok(Added::Invalid(ConfigError::new(
                    "backend",
                    "ebpf",
                    "eBPF is unavailable on this node (see `interceptor doctor`)",
                )))
            }
            _ => match install::choose(spec.backend, false, || self.ebpf_missing.clone(), &cfg) {
                Ok(c) => c,
                Err(e) => return Ok(Added::Invalid(e)),
            },
        };
        let mut maps = self.maps.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(cookie) = unless_registered {
            let (pods, _) = records::scan(&self.args.state_dir);
            if self.repair.was_removed(cookie) || pods.iter().any(|(_, p)| p.netns_cookie == cookie)
            {
                return Ok(Added::Registered);
            }
        }
        // A pod moving between backends: make before break (below).
        let earlier = self.lookup(&spec.netns);
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
        let userns_maps = crate::userns::maps_of_open(&ns.file, &ns.path)?;
        // eBPF registration reads the netns cookie itself: one netns visit, not two. It is all
        // or nothing: a failure leaves nothing registered (and, with `auto`, falls back).
        let ebpf = || match maps.as_mut() {
            Some(maps) => {
                let ips = (!spec.ips.is_empty()).then_some(spec.ips.as_slice());
                install::register_in(maps, &ns, &cfg, ips, userns_maps.as_ref())
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
            removal_error: None,
        };
        self.record(&status)?;
        if let Some(old) = earlier.filter(|old| old.backend != status.backend) {
            // The new backend is in place: only now does the old one's interception come out,
            // so no connection meets neither. Both at once is safe: eBPF's connect rewrite to
            // the proxy on 127.0.0.1 is RETURNed by ISTIO_OUTPUT (nft likewise), and inbound
            // NAT REDIRECT to the proxy port happens before sk_lookup, which then finds that
            // same proxy.
            if let Err(e) = self.uninstall(&old, maps.as_mut()) {
                // Keep the pod as it was rather than with both: take the new one out again.
                let undo = self.uninstall(&status, maps.as_mut());
                self.record(&old)?;
                return Err(match undo {
                    Ok(()) => e.context(format!(
                        "removing the earlier {} interception failed; the pod keeps it",
                        old.backend
                    )),
                    Err(u) => e.context(format!(
                        "removing the earlier {} interception failed, and so did taking the new \
                         one out again ({u:#}): both are in place",
                        old.backend
                    )),
                });
            }
        }
        tracing::info!(netns = %status.netns.display(), backend = %status.backend, micros = status.add_micros, "pod added");
        Ok(Added::Pod(Box::new(status)))
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
        let mut pod = match records::read(&self.args.state_dir, netns) {
            Ok(Some(pod)) => pod,
            Ok(None) => return Ok(false),
            Err(u) => return self.remove_unreadable(netns, &u, maps.as_mut()),
        };
        pod.removing = true;
        self.record(&pod)?;
        if let Err(e) = self.uninstall(&pod, maps.as_mut()) {
            // Kept as `removing` with the reason: reported, and retried by the next remove or
            // restart.
            pod.removal_error = Some(format!("{e:#}"));
            let _ = self.record(&pod);
            return Err(e);
        }
        let _ = std::fs::remove_file(state_file(&self.args.state_dir, netns));
        self.repair.note_removed(pod.netns_cookie);
        tracing::info!(netns = %netns.display(), "pod removed");
        Ok(true)
    }

    /// A remove of a pod whose record cannot be read: the pod is going away, so its eBPF
    /// entries (found by the netns' cookie, while the netns exists) go and so does the record;
    /// iptables/nftables rules live in the netns and go with it.
    fn remove_unreadable(
        &self,
        netns: &Path,
        u: &UnreadableRecord,
        maps: Option<&mut crate::backend::ebpf::PodMaps>,
    ) -> Result<bool> {
        let cookie = crate::netns::is_netns(netns)
            .then(|| crate::netns::identity(netns).ok())
            .flatten();
        if let Some(cookie) = cookie {
            self.repair.note_removed(cookie);
        }
        if let (Some(cookie), Some(maps)) = (cookie, maps) {
            maps.remove_cookie_in(cookie, Some(netns))?;
        }
        std::fs::remove_file(&u.file)?;
        tracing::warn!(netns = %netns.display(), error = %u.error, "removed a pod whose record was unreadable");
        Ok(true)
    }

    pub fn list(&self) -> Vec<PodStatus> {
        self.inventory().0
    }

    /// The recorded pods (by netns) and the records that cannot be read.
    pub fn inventory(&self) -> (Vec<PodStatus>, Vec<UnreadableRecord>) {
        let (pods, unreadable) = records::scan(&self.args.state_dir);
        let mut pods: Vec<_> = pods.into_iter().map(|(_, p)| p).collect();
        pods.sort_by(|a, b| a.netns.cmp(&b.netns));
        (pods, unreadable)
    }

    /// What `Request::PodInfo` answers: by uid when the client gives one (never a predecessor
    /// of the same name), else by name.
    fn pod_info(&self, namespace: &str, name: &str, uid: Option<&str>) -> Response {
        use crate::k8s::Lookup;
        let Some(w) = &self.watcher else {
            return Response::Error {
                message: "no Kubernetes pod watcher (--node-name not set)".into(),
                bad_input: false,
            };
        };
        if let Some(uid) = uid.filter(|u| !u.is_empty()) {
            // A CNI ADD is under way for this pod: repair leaves it to the ADD.
            self.repair.note_asked(uid);
        }
        // A CNI ADD can arrive before the watch event: wait a little for it.
        let wait = std::time::Duration::from_secs(5);
        let found = match uid.filter(|u| !u.is_empty()) {
            Some(uid) => w.wait_for_uid(namespace, name, uid, wait),
            None => w
                .wait_for(namespace, name, wait)
                .map_or(Lookup::Unknown, |m| Lookup::Found(Box::new(m))),
        };
        match found {
            Lookup::Found(m) => {
                let skip = mesh::not_mesh(&m);
                let (annotations, proxy_env, run_as_user, run_as_group) = (*m).into_inputs();
                Response::PodInfo {
                    annotations,
                    proxy_env,
                    run_as_user,
                    run_as_group,
                    skip,
                }
            }
            Lookup::OtherUid(known) => Response::Retry {
                message: format!(
                    "pod {namespace}/{name} is known on this node only as uid {known}, not uid {}: \
                     the pod watch has not caught up with the recreated pod; its predecessor's \
                     annotations are not used",
                    uid.unwrap_or_default()
                ),
            },
            Lookup::Unknown => Response::Error {
                message: format!("pod {namespace}/{name} is not known on this node"),
                bad_input: false,
            },
        }
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
            Request::PodInfo {
                namespace,
                name,
                uid,
            } => self.pod_info(&namespace, &name, uid.as_deref()),
            Request::List => {
                let (pods, unreadable) = self.inventory();
                Response::Pods { pods, unreadable }
            }
            Request::Show { netns } => match records::read(&self.args.state_dir, &netns) {
                Ok(Some(p)) => Response::Pod(Box::new(p)),
                Err(u) => Response::Error {
                    message: format!(
                        "the record of pod {} is unreadable ({}): its interception is kept",
                        netns.display(),
                        u.error
                    ),
                    bad_input: false,
                },
                Ok(None) => Response::Error {
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
