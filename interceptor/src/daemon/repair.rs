//! Repair in place: pods of this node that escaped setup (started before the plugin was chained
//! on a new node, or while it was being upgraded) are found and, by policy, registered live
//! (`repair`, the default), labelled as Istio's repair controller does (`label`), deleted so
//! their owner recreates them through the CNI chain (`delete`), or left alone (`off`).
//!
//! A pass compares the pod watcher's view with the daemon's records: a pod of this node that
//! is running, not host-network, not terminating, that the CNI path would capture (the plugin's
//! own decision, `cni::annotations`, plus what Istio's plugin reads from the pod object:
//! [`not_mesh`]) and that no record names (by uid, or by netns once found)
//! is a candidate. Its netns comes from its processes (`pod_netns`); it is registered through
//! the daemon's one add path ([`Daemon::add`]'s code, the install service), with the config
//! its annotations give, and recorded. Connections opened before the repair are not captured
//! (eBPF decides at connect, and the iptables fallback's NAT only sees new connections).
//!
//! Passes run on watcher events and every `interval`, on one thread, never two at once.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::cni::annotations::{NodeEnv, Redirect};
use crate::k8s::{PodMeta, PodWatcher};
use crate::model::{BackendKind, PodIdentity, PodSpec};
use crate::pod_netns::{self, ProcFs};

use super::mesh::{not_mesh, pod_info};
use super::repair_policy::{Policy, Settings, LABEL_KEY, LABEL_VALUE};
use super::{Added, Daemon};

/// Where runtimes pin pods' network namespaces: a repaired pod is recorded under its pin when
/// it has one, the path a CNI DEL will name.
const NETNS_DIRS: [&str; 2] = ["/var/run/netns", "/run/netns"];

/// Passes triggered by watcher events are at least this far apart (a burst of events is one
/// pass).
const DEBOUNCE: Duration = Duration::from_millis(200);

/// Starts the repair thread (nothing with `off`, or without a pod watcher).
pub(super) fn start(daemon: &Arc<Daemon>) -> std::io::Result<()> {
    let s = daemon.args.repair.clone();
    let Some(watcher) = daemon.watcher.clone() else {
        if s.policy != Policy::Off {
            tracing::info!("no repair of pods that escaped setup: it needs --node-name");
        }
        return Ok(());
    };
    let daemon = daemon.clone();
    if s.policy == Policy::Off {
        tracing::info!("repair of pods that escaped setup is off");
        return Ok(());
    }
    tracing::info!(
        policy = s.policy.as_str(),
        interval_s = s.interval.as_secs_f64(),
        grace_s = s.grace.as_secs_f64(),
        "repairing pods that escaped setup"
    );
    std::thread::Builder::new()
        .name("repair".into())
        .spawn(move || {
            let mut r = Repairer {
                daemon,
                watcher,
                s,
                retry_at: HashMap::new(),
                refused: HashMap::new(),
                warned_unreadable: false,
            };
            r.run()
        })?;
    Ok(())
}

struct Repairer {
    daemon: Arc<Daemon>,
    watcher: PodWatcher,
    s: Settings,
    /// Pod uid → when a failed action may be tried again (failures wait one interval).
    retry_at: HashMap<String, Instant>,
    /// Pod uid → why its netns was refused, as last reported (reported again only if it
    /// changes).
    refused: HashMap<String, String>,
    warned_unreadable: bool,
}

impl Repairer {
    fn run(&mut self) {
        loop {
            let seen = self.watcher.generation();
            let wait = self.pass().unwrap_or(self.s.interval).min(self.s.interval);
            self.watcher.wait_changed(seen, wait);
            std::thread::sleep(DEBOUNCE);
        }
    }

    /// One pass; returns when the next is due if sooner than the interval (a pod in its grace
    /// period).
    fn pass(&mut self) -> Option<Duration> {
        if !self.watcher.is_synced() {
            return None;
        }
        let now = Instant::now();
        self.retry_at.retain(|_, t| *t > now);
        let (records, unreadable) = self.daemon.inventory();
        let recorded: HashSet<&str> = records
            .iter()
            .filter_map(|p| p.identity.as_ref().map(|i| i.uid.as_str()))
            .collect();
        let pods: Vec<PodMeta> = self
            .watcher
            .list()
            .into_iter()
            .filter(|m| !recorded.contains(m.uid.as_str()))
            .filter(|m| self.candidate(m))
            .collect();
        let live: HashSet<&str> = pods.iter().map(|m| m.uid.as_str()).collect();
        self.refused.retain(|uid, _| live.contains(uid.as_str()));
        if pods.is_empty() {
            return None;
        }
        if !unreadable.is_empty() {
            // Which pod an unreadable record holds is unknown: it may be one of these.
            if !std::mem::replace(&mut self.warned_unreadable, true) {
                tracing::warn!(
                    unreadable = unreadable.len(),
                    "not repairing pods while a pod record is unreadable (see `pod list`)"
                );
            }
            return None;
        }
        self.warned_unreadable = false;
        let cookies: HashSet<u64> = records.iter().map(|p| p.netns_cookie).collect();
        let uids: Vec<&str> = pods.iter().map(|m| m.uid.as_str()).collect();
        let found = ProcFs::default().find(&uids);
        let mut next: Option<Duration> = None;
        for m in &pods {
            match found.get(&m.uid) {
                // No process yet (or not this node's after all): nothing to repair.
                None => {}
                Some(Err(why)) => {
                    let why = why.to_string();
                    if self.refused.get(&m.uid) != Some(&why) {
                        self.report(m, "refused", &why);
                        self.refused.insert(m.uid.clone(), why);
                    }
                }
                Some(Ok(p)) => {
                    // Why a grace period as well as the checks under the lock: a CNI ADD
                    // in flight has no record yet. With the runtimes that create the netns
                    // first (containerd), no process of the pod runs before its ADD has
                    // finished; with those that start the sandbox first, the ADD follows
                    // within seconds (the plugin waits at most 5 s for the watch). A pod
                    // whose oldest process has run for the grace period has no ADD coming.
                    // The PodInfo the plugin asks for marks an ADD in flight too, and the
                    // registration itself re-checks the records under the daemon's pod
                    // lock, which every ADD and DEL holds.
                    let age = p.age.unwrap_or_default();
                    if age < self.s.grace {
                        let left = self.s.grace - age;
                        next = Some(next.map_or(left, |n| n.min(left)));
                        continue;
                    }
                    let Ok(ids) = crate::netns::identities(&p.path) else {
                        continue; // the process exited: found again next pass
                    };
                    if ids
                        .iter()
                        .any(|c| cookies.contains(c) || self.daemon.repair.was_removed(*c))
                    {
                        continue; // registered without its uid, or torn down by a DEL
                    }
                    let Some(&cookie) = ids.last() else {
                        continue;
                    };
                    self.act(m, p, cookie);
                }
            }
        }
        next
    }

    /// A pod repair would act on: running on this node, not host-network, not terminating,
    /// a mesh pod (as the CNI plugin decides), not in an ADD, not failed just now.
    fn candidate(&self, m: &PodMeta) -> bool {
        let on_node = m
            .node_name
            .as_deref()
            .is_none_or(|n| n == self.watcher.node());
        on_node
            && m.running
            && !m.host_network
            && !m.deleted
            && not_mesh(m).is_none()
            && !self.daemon.repair.in_flight(&m.uid)
            && !self.retry_at.contains_key(&m.uid)
            && !(self.s.policy == Policy::Label && m.labels.contains_key(LABEL_KEY))
    }

    fn act(&mut self, m: &PodMeta, p: &pod_netns::PodNetns, cookie: u64) {
        let result = match self.s.policy {
            Policy::Repair => self.register(m, p, cookie),
            Policy::Label => self
                .watcher
                .label(&m.namespace, &m.name, LABEL_KEY, LABEL_VALUE)
                .map(|()| format!("labelled {LABEL_KEY}={LABEL_VALUE}")),
            Policy::Delete => self
                .watcher
                .delete(&m.namespace, &m.name, &m.uid)
                .map(|()| "deleted: its owner recreates it through the CNI chain".into()),
            Policy::Off => return,
        };
        match result {
            Ok(what) if what.is_empty() => {}
            Ok(what) => self.report(m, "ok", &what),
            Err(why) => {
                self.retry_at
                    .insert(m.uid.clone(), Instant::now() + self.s.interval);
                self.report(m, "failed", &format!("{why:#}"));
            }
        }
    }

    /// Registers the pod live; `Ok("")` when a CNI ADD registered it meanwhile.
    fn register(
        &self,
        m: &PodMeta,
        p: &pod_netns::PodNetns,
        cookie: u64,
    ) -> anyhow::Result<String> {
        let netns = pod_netns::pinned(&NETNS_DIRS.map(PathBuf::from), p.ns)
            .unwrap_or_else(|| p.path.clone());
        let config = derive(m, &netns)?;
        let spec = PodSpec {
            netns: netns.clone(),
            ips: m.pod_ips.clone(),
            config,
            backend: BackendKind::Auto,
            identity: Some(PodIdentity {
                namespace: m.namespace.clone(),
                name: m.name.clone(),
                uid: m.uid.clone(),
            }),
        };
        match self.daemon.add_unregistered(&spec, cookie)? {
            Added::Pod(s) => Ok(format!(
                "registered {} ({}: {}); connections opened before now are not captured",
                s.netns.display(),
                s.backend,
                s.why
            )),
            Added::Registered => Ok(String::new()),
            Added::Invalid(e) => Err(anyhow::anyhow!("the daemon refused the config: {e}")),
        }
    }

    /// One human line per action: the pod, the action, its result and why.
    fn report(&self, m: &PodMeta, result: &'static str, what: &str) {
        let action = self.s.policy.as_str();
        self.daemon.repair.count(action, result);
        let line = format!(
            "repair: pod {}/{} (uid {}) escaped setup: {action} {result}: {what}",
            m.namespace, m.name, m.uid
        );
        match result {
            "ok" => tracing::info!("{line}"),
            _ => tracing::warn!("{line}"),
        }
    }
}

/// The config the CNI ADD would have registered for the pod (the plugin's mapping, its IPv6
/// detection in the pod's netns); the node-level env is the daemon's.
fn derive(
    m: &PodMeta,
    netns: &std::path::Path,
) -> anyhow::Result<interceptor_common::config::RawConfig> {
    let pi = pod_info(m);
    let redirect = Redirect::from_pod(&pi)?;
    for w in &redirect.warnings {
        tracing::warn!(pod = %format!("{}/{}", m.namespace, m.name), "{w}");
    }
    let addrs = crate::netns::local_addrs(Some(netns))?;
    let ipv6 = interceptor_common::plan::ipv6_enabled(&addrs, redirect.dual_stack);
    Ok(redirect.validated(ipv6, &NodeEnv::from_process())?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cni::annotations;

    /// An injected sidecar pod as the watcher gives it.
    fn mesh() -> PodMeta {
        PodMeta {
            namespace: "shop".into(),
            name: "web".into(),
            uid: "u1".into(),
            annotations: [(annotations::keys::STATUS.to_string(), "{}".to_string())].into(),
            containers: ["app", "istio-proxy"].map(String::from).into(),
            proxy_type: Some("sidecar".into()),
            running: true,
            ..PodMeta::default()
        }
    }

    #[test]
    fn only_mesh_pods_are_repaired() {
        assert_eq!(not_mesh(&mesh()), None);
        type Change = fn(&mut PodMeta);
        let cases: [(&str, Change); 7] = [
            ("no sidecar.istio.io/status", |m| m.annotations.clear()),
            ("istio-init", |m| {
                m.containers.insert("istio-init".into());
            }),
            ("no istio-proxy container", |m| {
                m.containers.remove("istio-proxy");
            }),
            ("router, not a sidecar", |m| {
                m.proxy_type = Some("router".into())
            }),
            ("namespace kube-system", |m| {
                m.namespace = "kube-system".into()
            }),
            ("label sidecar.istio.io/inject=false", |m| {
                m.labels
                    .insert(annotations::keys::INJECT.into(), "false".into());
            }),
            ("DISABLE_ENVOY", |m| {
                m.proxy_env.insert("DISABLE_ENVOY".into(), "true".into());
            }),
        ];
        for (want, change) in cases {
            let mut m = mesh();
            change(&mut m);
            let why = not_mesh(&m).unwrap_or_else(|| panic!("{want}: repaired"));
            assert!(why.contains(want), "{want}: {why}");
        }
    }
}
