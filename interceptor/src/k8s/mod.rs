//! Where a pod's annotations come from in a cluster: the daemon watches the pods of its own node
//! through the Kubernetes API ([`PodWatcher`]) and keeps what interception needs of each
//! ([`PodMeta`]) in memory, keyed by uid (a pod recreated under the same name is another pod),
//! with the uid last seen under each (namespace, name).
//!
//! Only the pods of this node are requested (field selector `spec.nodeName=<node>`), so the
//! API server does the filtering and the RBAC needed is `get`/`list`/`watch` on pods
//! (deploy/rbac.yaml). Turning annotations into an interception config is not done here: that
//! mapping is the CNI plugin's (`cni::annotations`); [`PodMeta::into_inputs`] hands it the raw
//! material.

mod watcher;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::{Container, Pod};

pub use watcher::{Lookup, PodWatcher};

/// The name of Istio's sidecar container, whose env and uid/gid the interception follows.
pub const PROXY_CONTAINER: &str = "istio-proxy";

/// How the daemon reaches the Kubernetes API (`cli::K8sArgs` fills it from the flags).
#[derive(Debug, Clone, Default)]
pub struct ApiAccess {
    /// This node's name: only pods with `spec.nodeName` equal to it are watched; none: no pods
    /// are watched.
    pub node_name: Option<String>,
    /// A kubeconfig file to reach the API with; default: the in-cluster service account, else
    /// `$KUBECONFIG` / `~/.kube/config` (kube-rs' `Config::infer`).
    pub kubeconfig: Option<PathBuf>,
}

impl ApiAccess {
    /// The client configuration these flags select (reads files only; no request is made).
    pub async fn config(&self) -> Result<kube::Config> {
        match &self.kubeconfig {
            Some(path) => {
                let kc = kube::config::Kubeconfig::read_from(path)
                    .with_context(|| format!("reading the kubeconfig {}", path.display()))?;
                kube::Config::from_custom_kubeconfig(kc, &Default::default())
                    .await
                    .with_context(|| format!("loading the kubeconfig {}", path.display()))
            }
            None => kube::Config::infer()
                .await
                .context("no in-cluster service account and no kubeconfig"),
        }
    }

    /// [`Self::config`] for callers without a tokio runtime (runs one just for this).
    pub fn config_blocking(&self) -> Result<kube::Config> {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(self.config())
    }
}

/// What the daemon needs to know of one pod of this node.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PodMeta {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub annotations: BTreeMap<String, String>,
    /// The pod's labels (Istio's plugin prefers the `sidecar.istio.io/inject` label over the
    /// annotation of the same name).
    pub labels: BTreeMap<String, String>,
    /// The names of the pod's containers and init containers (Istio's plugin leaves alone a
    /// pod with an `istio-init` container, or without an `istio-proxy` one).
    pub containers: BTreeSet<String>,
    /// The `env` of the `istio-proxy` container, as Istio's plugin reads it: an entry set with
    /// `valueFrom` (resolved by the kubelet, not in the API object) has the empty value.
    pub proxy_env: BTreeMap<String, String>,
    /// The second argument of the `istio-proxy` container when the first is `proxy`
    /// (`sidecar`, `router`): Istio's plugin captures `sidecar` pods only.
    pub proxy_type: Option<String>,
    /// `runAsUser` of the `istio-proxy` container's securityContext, else the pod's (the uid
    /// the proxy really runs as; Istio's plugin reads the container's only).
    pub run_as_user: Option<i64>,
    /// `runAsGroup` of the `istio-proxy` container's securityContext, else the pod's.
    pub run_as_group: Option<i64>,
    /// `status.podIPs` (else `status.podIP`); empty until the pod has a sandbox.
    pub pod_ips: Vec<IpAddr>,
    /// The API has marked the pod for deletion (`metadata.deletionTimestamp` is set): it is
    /// terminating. Once the API object is gone (a watch DELETED event) it leaves the cache.
    pub deleted: bool,
    /// `spec.nodeName` (the watch asks for one node's pods; repair checks it again).
    pub node_name: Option<String>,
    /// `spec.hostNetwork`: the pod has no netns of its own.
    pub host_network: bool,
    /// `status.phase` is Running, or a container of the pod has started (`state.running`).
    pub running: bool,
}

/// What the annotation mapping takes: (annotations, proxy env, run_as_user, run_as_group).
pub type PodInputs = (
    BTreeMap<String, String>,
    BTreeMap<String, String>,
    Option<i64>,
    Option<i64>,
);

impl PodMeta {
    /// Extracts what interception needs; `None` for an object without namespace, name or uid
    /// (never the case for a pod the API serves).
    pub fn from_pod(pod: &Pod) -> Option<Self> {
        let md = &pod.metadata;
        let spec = pod.spec.as_ref();
        // The sidecar is a regular container, or (Istio's native sidecars, k8s >= 1.29) an
        // init container with restartPolicy Always.
        let proxy: Option<&Container> = spec.and_then(|s| {
            s.containers
                .iter()
                .chain(s.init_containers.iter().flatten())
                .find(|c| c.name == PROXY_CONTAINER)
        });
        let proxy_sc = proxy.and_then(|c| c.security_context.as_ref());
        let pod_sc = spec.and_then(|s| s.security_context.as_ref());
        let run_as_user = proxy_sc
            .and_then(|sc| sc.run_as_user)
            .or_else(|| pod_sc.and_then(|sc| sc.run_as_user));
        let run_as_group = proxy_sc
            .and_then(|sc| sc.run_as_group)
            .or_else(|| pod_sc.and_then(|sc| sc.run_as_group));
        let proxy_env = proxy
            .and_then(|c| c.env.as_ref())
            .into_iter()
            .flatten()
            .map(|e| (e.name.clone(), e.value.clone().unwrap_or_default()))
            .collect();
        let proxy_type = proxy
            .and_then(|c| c.args.as_deref())
            .filter(|a| a.len() >= 2 && a[0] == "proxy")
            .map(|a| a[1].clone());
        let containers = spec
            .into_iter()
            .flat_map(|s| {
                s.containers
                    .iter()
                    .chain(s.init_containers.iter().flatten())
            })
            .map(|c| c.name.clone())
            .collect();
        let status = pod.status.as_ref();
        let mut pod_ips: Vec<IpAddr> = status
            .and_then(|s| s.pod_ips.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|p| p.ip.parse().ok())
            .collect();
        if pod_ips.is_empty() {
            pod_ips.extend(
                status
                    .and_then(|s| s.pod_ip.as_deref())
                    .and_then(|ip| ip.parse::<IpAddr>().ok()),
            );
        }
        let started = status
            .into_iter()
            .flat_map(|s| {
                s.container_statuses
                    .iter()
                    .flatten()
                    .chain(s.init_container_statuses.iter().flatten())
            })
            .any(|c| c.state.as_ref().is_some_and(|st| st.running.is_some()));
        let running = started || status.and_then(|s| s.phase.as_deref()) == Some("Running");
        Some(Self {
            namespace: md.namespace.clone()?,
            name: md.name.clone()?,
            uid: md.uid.clone()?,
            annotations: md.annotations.clone().unwrap_or_default(),
            labels: md.labels.clone().unwrap_or_default(),
            containers,
            proxy_env,
            proxy_type,
            run_as_user,
            run_as_group,
            pod_ips,
            deleted: md.deletion_timestamp.is_some(),
            node_name: spec.and_then(|s| s.node_name.clone()),
            host_network: spec.and_then(|s| s.host_network) == Some(true),
            running,
        })
    }

    /// The inputs of the annotation → config mapping (`cni::annotations`).
    pub fn into_inputs(self) -> PodInputs {
        (
            self.annotations,
            self.proxy_env,
            self.run_as_user,
            self.run_as_group,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(v: serde_json::Value) -> Pod {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn native_sidecar_and_pod_level_ids() {
        // Istio's native sidecar: istio-proxy is an init container with restartPolicy Always;
        // it sets no uid, so the pod's securityContext gives both ids.
        let p = pod(serde_json::json!({
            "metadata": {"namespace": "ns", "name": "p", "uid": "u",
                         "deletionTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {
                "securityContext": {"runAsUser": 2000, "runAsGroup": 3000},
                "initContainers": [{"name": "istio-proxy", "restartPolicy": "Always",
                                    "args": ["proxy", "router"],
                                    "env": [{"name": "ISTIO_DUAL_STACK", "value": "true"}]}],
                "containers": [{"name": "app", "securityContext": {"runAsUser": 1}}]
            },
            "status": {"podIP": "10.0.0.9"}
        }));
        let m = PodMeta::from_pod(&p).unwrap();
        assert_eq!((m.run_as_user, m.run_as_group), (Some(2000), Some(3000)));
        assert_eq!(m.proxy_env["ISTIO_DUAL_STACK"], "true");
        assert_eq!(m.proxy_type.as_deref(), Some("router"));
        assert_eq!(m.pod_ips, vec!["10.0.0.9".parse::<IpAddr>().unwrap()]);
        assert!(m.deleted && !m.running && !m.host_network);
        let (annotations, env, uid, gid) = m.into_inputs();
        assert!(annotations.is_empty());
        assert_eq!((env.len(), uid, gid), (1, Some(2000), Some(3000)));
    }

    #[test]
    fn no_sidecar_no_ids_no_ips() {
        let p = pod(serde_json::json!({
            "metadata": {"namespace": "ns", "name": "p", "uid": "u"},
            "spec": {"containers": [{"name": "app"}]}
        }));
        let m = PodMeta::from_pod(&p).unwrap();
        assert_eq!(
            (m.run_as_user, m.run_as_group, m.proxy_type),
            (None, None, None)
        );
        assert!(m.proxy_env.is_empty() && m.pod_ips.is_empty() && !m.deleted);
        assert_eq!(m.containers.into_iter().collect::<Vec<_>>(), ["app"]);
        let no_uid = pod(serde_json::json!({"metadata": {"namespace": "ns", "name": "p"}}));
        assert_eq!(PodMeta::from_pod(&no_uid), None);
    }

    #[test]
    fn running_host_network_and_node() {
        let m = |v| PodMeta::from_pod(&pod(v)).unwrap();
        let md = serde_json::json!({"namespace": "ns", "name": "p", "uid": "u"});
        let phase = m(
            serde_json::json!({"metadata": md.clone(), "spec": {"containers": [],
            "nodeName": "n1", "hostNetwork": true}, "status": {"phase": "Running"}}),
        );
        assert!(phase.running && phase.host_network);
        assert_eq!(phase.node_name.as_deref(), Some("n1"));
        // Pending, but a container has started (a native sidecar, or status lagging).
        let started = m(
            serde_json::json!({"metadata": md.clone(), "spec": {"containers": []},
            "status": {"phase": "Pending", "initContainerStatuses": [{"name": "istio-proxy",
              "image": "i", "imageID": "", "ready": false, "restartCount": 0,
              "state": {"running": {"startedAt": "2026-01-01T00:00:00Z"}}}]}}),
        );
        assert!(started.running && !started.host_network);
        let pending = m(serde_json::json!({"metadata": md, "status": {"phase": "Pending"}}));
        assert!(!pending.running);
    }
}
