//! The CNI specification's types as this plugin needs them (spec 1.0.0, also 0.3.0, 0.3.1 and
//! 0.4.0): the runtime's environment, our network configuration, `CNI_ARGS`, `prevResult`, the
//! VERSION answer and the error object.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;

use serde::Deserialize;
use serde_json::{json, Value};

use crate::model::BackendKind;

/// Spec versions whose configuration and result formats we accept. 0.1.0/0.2.0 predate chaining
/// (no `prevResult`); 1.1.0 adds GC and STATUS, which this plugin does not implement.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0"];

/// The version our own VERSION answer (and errors without a usable config) are written in.
pub const IMPLEMENTED_VERSION: &str = "1.0.0";

/// Default control socket of the daemon (as `interceptor daemon --socket`).
pub const DEFAULT_SOCKET: &str = "/run/interceptor/interceptor.sock";
/// Default bpffs folder of the daemon's pins (as `--bpffs`), used by CHECK.
pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf/interceptor";

/// The `type` of our entry in a conflist, and the binary's name in the CNI bin dir.
pub const PLUGIN_TYPE: &str = "interceptor";

/// containerd's capability that puts the pod's annotations into `runtimeConfig`.
pub const CRI_POD_ANNOTATIONS: &str = "io.kubernetes.cri.pod-annotations";

/// Error codes: 1-99 are the spec's, 100 and up are ours.
pub mod code {
    /// Incompatible CNI version.
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    /// Container unknown or does not exist.
    pub const UNKNOWN_CONTAINER: u32 = 3;
    /// Invalid necessary environment variables.
    pub const INVALID_ENV: u32 = 4;
    /// I/O failure.
    pub const IO: u32 = 5;
    /// Failed to decode content.
    pub const DECODE: u32 = 6;
    /// Invalid network config.
    pub const INVALID_CONFIG: u32 = 7;
    /// Try again later (a transient condition, such as the daemon being down).
    pub const TRY_AGAIN: u32 = 11;
    /// CHECK: the pod is not registered (or registered differently) with the daemon.
    pub const NOT_REGISTERED: u32 = 100;
    /// CHECK: the pod is registered but its programs or rules are not in place.
    pub const NOT_ATTACHED: u32 = 101;
    /// ADD/DEL: the daemon failed to register or unregister the pod.
    pub const DAEMON_FAILED: u32 = 102;
}

/// A CNI error: printed as the spec's error object on stdout, and the plugin exits non-zero.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }

    /// `{"cniVersion":…,"code":N,"msg":…,"details":…}`.
    pub fn to_json(&self, cni_version: &str) -> String {
        let mut v = json!({
            "cniVersion": cni_version,
            "code": self.code,
            "msg": self.msg,
        });
        if !self.details.is_empty() {
            v["details"] = Value::String(self.details.clone());
        }
        v.to_string()
    }
}

impl std::fmt::Display for CniError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CNI error {}: {}", self.code, self.msg)?;
        if !self.details.is_empty() {
            write!(f, " ({})", self.details)?;
        }
        Ok(())
    }
}

/// `CNI_COMMAND`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
}

impl Command {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "ADD" => Self::Add,
            "DEL" => Self::Del,
            "CHECK" => Self::Check,
            "VERSION" => Self::Version,
            _ => return None,
        })
    }
}

/// The runtime's `CNI_*` environment; empty values count as missing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CniEnv {
    pub command: String,
    pub container_id: Option<String>,
    pub netns: Option<PathBuf>,
    pub ifname: Option<String>,
    pub args: Option<String>,
    pub path: Option<String>,
}

impl CniEnv {
    pub fn from_process() -> Self {
        let get = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        Self {
            command: get("CNI_COMMAND").unwrap_or_default(),
            container_id: get("CNI_CONTAINERID"),
            netns: get("CNI_NETNS").map(PathBuf::from),
            ifname: get("CNI_IFNAME"),
            args: get("CNI_ARGS"),
            path: get("CNI_PATH"),
        }
    }
}

/// The Kubernetes keys of `CNI_ARGS` (kubelet/containerd set them; others are ignored).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct K8sArgs {
    pub namespace: String,
    pub name: String,
    pub infra_container_id: String,
    pub uid: String,
}

/// Parses `CNI_ARGS` (`K=V;K=V`). A pair without `=` is an error, as in libcni.
pub fn parse_cni_args(args: Option<&str>) -> Result<K8sArgs, CniError> {
    let mut out = K8sArgs::default();
    for pair in args.unwrap_or("").split(';').filter(|p| !p.is_empty()) {
        let Some((k, v)) = pair.split_once('=') else {
            return Err(CniError::new(
                code::INVALID_ENV,
                format!("invalid CNI_ARGS pair {pair:?}: want KEY=VALUE"),
                "",
            ));
        };
        match k {
            "K8S_POD_NAMESPACE" => out.namespace = v.into(),
            "K8S_POD_NAME" => out.name = v.into(),
            "K8S_POD_INFRA_CONTAINER_ID" => out.infra_container_id = v.into(),
            "K8S_POD_UID" => out.uid = v.into(),
            _ => {}
        }
    }
    Ok(out)
}

fn default_socket() -> PathBuf {
    DEFAULT_SOCKET.into()
}

fn default_bpffs() -> PathBuf {
    DEFAULT_BPFFS.into()
}

fn default_backend() -> BackendKind {
    BackendKind::Auto
}

/// Per-pod values a runtime passes in `runtimeConfig` (for capabilities the conflist entry
/// declares): containerd's `io.kubernetes.cri.pod-annotations`, or our own keys.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RuntimeConfig {
    #[serde(default)]
    pub pod_annotations: Option<BTreeMap<String, String>>,
    #[serde(default, rename = "io.kubernetes.cri.pod-annotations")]
    pub cri_pod_annotations: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub proxy_env: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub run_as_user: Option<i64>,
    #[serde(default)]
    pub run_as_group: Option<i64>,
}

/// Our network configuration (one entry of a conflist, as the runtime hands it to us with
/// `cniVersion`, `name` and `prevResult` filled in). Unknown keys are ignored.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    #[serde(default)]
    pub cni_version: String,
    #[serde(default)]
    pub name: String,
    #[serde(default, rename = "type")]
    pub plugin_type: String,
    /// The daemon's control socket.
    #[serde(default = "default_socket")]
    pub socket: PathBuf,
    /// Interception backend the daemon should use (auto, ebpf, iptables, nftables).
    #[serde(default = "default_backend")]
    pub backend: BackendKind,
    /// The daemon's bpffs folder (CHECK looks at the pinned programs there).
    #[serde(default = "default_bpffs")]
    pub bpffs: PathBuf,
    /// The pod's annotations, when the runtime knows them.
    #[serde(default)]
    pub pod_annotations: Option<BTreeMap<String, String>>,
    /// The environment of the pod's `istio-proxy` container.
    #[serde(default)]
    pub proxy_env: Option<BTreeMap<String, String>>,
    /// `securityContext.runAsUser` of the `istio-proxy` container.
    #[serde(default)]
    pub run_as_user: Option<i64>,
    /// `securityContext.runAsGroup` of the `istio-proxy` container.
    #[serde(default)]
    pub run_as_group: Option<i64>,
    /// What a pod gets when nothing tells its annotations (no `runtimeConfig` annotations, no
    /// Kubernetes identity in `CNI_ARGS`): a runtime outside Kubernetes (`ctr run --cni`,
    /// another CNI runtime). Absent (the default), such a pod is left alone.
    #[serde(default)]
    pub default_interception: Option<DefaultInterception>,
    #[serde(default)]
    pub runtime_config: Option<RuntimeConfig>,
    #[serde(default)]
    pub prev_result: Option<Value>,
}

/// `defaultInterception`: the pod as if Istio had injected a sidecar with these annotations
/// (Istio's keys and meanings, e.g. `traffic.sidecar.istio.io/excludeOutboundPorts`) and this
/// proxy environment; `{}` means Istio's defaults. Validated as a pod's annotations are.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DefaultInterception {
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    #[serde(default)]
    pub proxy_env: BTreeMap<String, String>,
    /// The proxy's uid (Istio's `runAsUser` of `istio-proxy`; 1337 when absent).
    #[serde(default)]
    pub run_as_user: Option<i64>,
    #[serde(default)]
    pub run_as_group: Option<i64>,
}

/// Decodes stdin: malformed JSON is code 6, well-formed JSON of the wrong shape (a bad
/// `backend`, an annotation that is not a string, …) code 7; both name what is wrong.
pub fn parse_netconf(stdin: &[u8]) -> Result<NetConf, CniError> {
    serde_json::from_slice::<NetConf>(stdin).map_err(|e| {
        use serde_json::error::Category;
        let code = match e.classify() {
            Category::Data => code::INVALID_CONFIG,
            _ => code::DECODE,
        };
        CniError::new(
            code,
            format!("failed to parse the network configuration on stdin: {e}"),
            "",
        )
    })
}

/// The `cniVersion` of a config whose decoding may have failed, for the error object.
pub fn sniff_version(stdin: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(stdin).ok()?;
    let s = v.get("cniVersion")?.as_str()?;
    SUPPORTED_VERSIONS.contains(&s).then(|| s.to_string())
}

fn triple(v: &str) -> Option<(u32, u32, u32)> {
    let mut it = v.split('.').map(|p| p.parse::<u32>().ok());
    let t = (it.next()??, it.next()??, it.next()??);
    it.next().is_none().then_some(t)
}

/// Whether `v` is at least `min` (both `a.b.c`).
pub fn version_at_least(v: &str, min: &str) -> bool {
    matches!((triple(v), triple(min)), (Some(a), Some(b)) if a >= b)
}

/// Refuses a config whose `cniVersion` we do not implement.
pub fn check_version(v: &str) -> Result<(), CniError> {
    if SUPPORTED_VERSIONS.contains(&v) {
        return Ok(());
    }
    Err(CniError::new(
        code::INCOMPATIBLE_VERSION,
        format!(
            "incompatible CNI version {v:?}: this plugin supports {}",
            SUPPORTED_VERSIONS.join(", ")
        ),
        "",
    ))
}

/// The VERSION answer.
pub fn version_info() -> String {
    json!({
        "cniVersion": IMPLEMENTED_VERSION,
        "supportedVersions": SUPPORTED_VERSIONS,
    })
    .to_string()
}

/// The pod's addresses from `prevResult.ips[].address` (CIDR notation), in order.
pub fn prev_result_ips(prev: Option<&Value>) -> Result<Vec<IpAddr>, CniError> {
    let Some(prev) = prev else {
        return Ok(vec![]);
    };
    let bad = |msg: String| CniError::new(code::INVALID_CONFIG, msg, "");
    let ips = match prev.get("ips") {
        None | Some(Value::Null) => return Ok(vec![]),
        Some(Value::Array(a)) => a,
        Some(_) => return Err(bad("prevResult.ips is not an array".into())),
    };
    ips.iter()
        .enumerate()
        .map(|(i, ip)| {
            let addr = ip
                .get("address")
                .and_then(Value::as_str)
                .ok_or_else(|| bad(format!("prevResult.ips[{i}].address is missing")))?;
            addr.split('/')
                .next()
                .and_then(|a| a.parse::<IpAddr>().ok())
                .filter(|_| addr.contains('/'))
                .ok_or_else(|| {
                    bad(format!(
                        "prevResult.ips[{i}].address {addr:?} is not an address/prefix"
                    ))
                })
        })
        .collect()
}

/// ADD's output for a chained plugin: `prevResult` unchanged but for `cniVersion`, which is the
/// config's (the runtime gave `prevResult` in that version already). Without a `prevResult`,
/// an empty result.
pub fn pass_through(prev: Option<&Value>, cni_version: &str) -> String {
    let mut out = match prev {
        Some(Value::Object(m)) => Value::Object(m.clone()),
        _ => json!({ "dns": {} }),
    };
    out["cniVersion"] = Value::String(cni_version.to_string());
    out.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions() {
        assert!(version_at_least("1.0.0", "0.4.0"));
        assert!(version_at_least("0.4.0", "0.4.0"));
        assert!(!version_at_least("0.3.1", "0.4.0"));
        assert!(!version_at_least("x", "0.4.0"));
        assert!(check_version("1.0.0").is_ok());
        assert_eq!(check_version("2.0.0").unwrap_err().code, 1);
        assert_eq!(check_version("").unwrap_err().code, 1);
    }

    #[test]
    fn cni_args() {
        let a = parse_cni_args(Some(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;K8S_POD_UID=u1",
        ))
        .unwrap();
        assert_eq!(
            (a.namespace.as_str(), a.name.as_str()),
            ("default", "web-0")
        );
        assert_eq!(a.uid, "u1");
        assert_eq!(parse_cni_args(Some("oops")).unwrap_err().code, 4);
        assert_eq!(parse_cni_args(None).unwrap(), K8sArgs::default());
    }

    #[test]
    fn decode_errors_are_classified() {
        assert_eq!(parse_netconf(b"{").unwrap_err().code, 6);
        let e = parse_netconf(br#"{"cniVersion":"1.0.0","backend":"bogus"}"#).unwrap_err();
        assert_eq!(e.code, 7);
        assert!(e.msg.contains("bogus"), "{}", e.msg);
        let c =
            parse_netconf(br#"{"cniVersion":"1.0.0","name":"n","type":"interceptor"}"#).unwrap();
        assert_eq!(c.socket, PathBuf::from(DEFAULT_SOCKET));
        assert_eq!(c.backend, BackendKind::Auto);
    }

    #[test]
    fn prev_result() {
        let prev = json!({"cniVersion":"1.0.0","ips":[{"address":"10.1.0.5/16","interface":2},{"address":"fd00::5/64"}]});
        let ips = prev_result_ips(Some(&prev)).unwrap();
        assert_eq!(ips.len(), 2);
        assert_eq!(ips[0].to_string(), "10.1.0.5");
        let out: Value = serde_json::from_str(&pass_through(Some(&prev), "0.4.0")).unwrap();
        assert_eq!(out["cniVersion"], "0.4.0");
        assert_eq!(out["ips"], prev["ips"]);
        let bad = json!({"ips":[{"address":"10.1.0.5"}]});
        assert_eq!(prev_result_ips(Some(&bad)).unwrap_err().code, 7);
    }

    #[test]
    fn error_object() {
        let e = CniError::new(7, "bad", "why");
        let v: Value = serde_json::from_str(&e.to_json("1.0.0")).unwrap();
        assert_eq!(
            v,
            json!({"cniVersion":"1.0.0","code":7,"msg":"bad","details":"why"})
        );
    }
}
