//! The control protocol: one JSON request per line on a Unix socket, one JSON response line.

use std::net::IpAddr;
use std::path::PathBuf;

use interceptor_common::config::RawConfig;
use serde::{Deserialize, Serialize};

use crate::model::{BackendKind, PodIdentity, PodSpec};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Request {
    Add(Box<PodSpec>),
    Remove {
        netns: PathBuf,
    },
    List,
    Show {
        netns: PathBuf,
    },
    /// What the daemon's Kubernetes pod watcher knows of a pod (annotations, proxy env and
    /// uid/gid): the CNI plugin's source when the runtime passes no annotations.
    PodInfo {
        namespace: String,
        name: String,
        /// The pod's uid (`K8S_POD_UID`): with it the answer is for that very pod, never for
        /// an earlier pod of the same name (a recreated StatefulSet pod). Optional for older
        /// clients, which are answered by name.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        uid: Option<String>,
    },
    Ping,
}

/// A registered pod as the daemon knows it (also its on-disk state).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodStatus {
    pub netns: PathBuf,
    pub netns_cookie: u64,
    /// eBPF pod id (0 for netfilter pods).
    pub pod_id: u32,
    pub backend: BackendKind,
    /// Why this backend serves the pod.
    pub why: String,
    pub ips: Vec<IpAddr>,
    pub identity: Option<PodIdentity>,
    pub config: RawConfig,
    /// How long the registration took, in microseconds.
    pub add_micros: u64,
    /// The pod's own user namespace (`hostUsers: false`), if it has one: its id maps and the
    /// proxy ids as the eBPF programs see them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub userns: Option<crate::userns::UsernsView>,
    /// Set on disk before a removal starts: a daemon killed mid-removal finishes it on restart
    /// instead of keeping a record of a half-removed pod.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub removing: bool,
    /// Why the last attempt to finish a removal failed: the record is kept (the pod is
    /// reported, not forgotten) and the removal retried by the next remove or restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub removal_error: Option<String>,
}

/// A record in the state dir that the daemon cannot read or parse. Its pod keeps whatever
/// interception it has (nothing is purged while such a record exists); it is reported until a
/// remove of its netns or an operator deletes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnreadableRecord {
    pub file: PathBuf,
    /// The netns the record's file name stands for (none for a hashed long name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<PathBuf>,
    pub error: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "lowercase")]
pub enum Response {
    Pod(Box<PodStatus>),
    Pods {
        pods: Vec<PodStatus>,
        /// Records that cannot be read (absent from older daemons' answers).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        unreadable: Vec<UnreadableRecord>,
    },
    Removed {
        removed: bool,
    },
    PodInfo {
        annotations: std::collections::BTreeMap<String, String>,
        proxy_env: std::collections::BTreeMap<String, String>,
        run_as_user: Option<i64>,
        run_as_group: Option<i64>,
        /// Why Istio's CNI plugin would leave this pod alone, from the pod object (excluded
        /// namespace, an `istio-init` container, no `istio-proxy`, a gateway's proxy, the
        /// inject label, the annotations): the plugin then does not capture it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        skip: Option<String>,
    },
    Pong,
    /// The daemon cannot answer correctly yet (a pod's own watch event has not arrived): the
    /// caller fails and is retried (a CNI ADD fails; the kubelet retries it).
    Retry {
        message: String,
    },
    /// `bad_input`: the request itself was invalid (flag + value named in `message`).
    Error {
        message: String,
        bad_input: bool,
    },
}
