//! "Mesh this pod?" from the pod object the watcher holds, as Istio's CNI plugin decides it:
//! shared by repair in place and by the daemon's answer to the CNI plugin.

use crate::cni::annotations::{self, PodInfo};
use crate::k8s::PodMeta;

/// Istio's CNI plugin's defaults for namespaces it never sets up (its `exclude_namespaces`:
/// the Helm chart's `kube-system` plus the release's own `istio-system`).
const EXCLUDED_NAMESPACES: [&str; 2] = ["kube-system", "istio-system"];

/// Why a pod is not a mesh pod (repair leaves it alone, a CNI ADD passes it through), if it is
/// not: everything the CNI path decides on (Istio's annotations and proxy env, `cni::annotations::skip_reason`), and what Istio's
/// plugin checks beyond them from the pod object: its excluded namespaces, an `istio-init`
/// container (that pod sets up its own interception), no `istio-proxy` container, a proxy that
/// is not a sidecar (a gateway's `router`), the `sidecar.istio.io/inject` label set false.
pub fn not_mesh(m: &PodMeta) -> Option<String> {
    if EXCLUDED_NAMESPACES.contains(&m.namespace.as_str()) {
        return Some(format!("namespace {} is excluded", m.namespace));
    }
    if m.containers.contains(INIT_CONTAINER) {
        return Some(format!(
            "it has an {INIT_CONTAINER} container (it sets up its own interception)"
        ));
    }
    if !m.containers.contains(crate::k8s::PROXY_CONTAINER) {
        return Some(format!("no {} container", crate::k8s::PROXY_CONTAINER));
    }
    if let Some(t) = m.proxy_type.as_deref().filter(|t| *t != "sidecar") {
        return Some(format!("its proxy is a {t}, not a sidecar"));
    }
    if let Some(v) = m.labels.get(annotations::keys::INJECT) {
        if annotations::go_parse_bool(v) == Some(false) {
            return Some(format!("label {}={v}", annotations::keys::INJECT));
        }
    }
    annotations::skip_reason(&pod_info(m))
}

/// The container Istio injects when it sets up interception itself (no CNI).
const INIT_CONTAINER: &str = "istio-init";

/// What Istio's plugin knows of the pod, from the watcher (the annotations are known).
pub fn pod_info(m: &PodMeta) -> PodInfo {
    let (annotations, proxy_env, run_as_user, run_as_group) = m.clone().into_inputs();
    PodInfo {
        annotations: Some(annotations),
        proxy_env,
        run_as_user,
        run_as_group,
    }
}
