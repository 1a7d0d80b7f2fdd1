//! ADD, DEL, CHECK and VERSION: the plugin's side of the CNI protocol, talking to the daemon.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use interceptor_common::config::RawConfig;

use super::annotations::{keys, skip_reason, AnnotationError, NodeEnv, PodInfo, Redirect};
use super::spec::{
    self, code, parse_cni_args, parse_netconf, pass_through, prev_result_ips, CniEnv, CniError,
    Command, K8sArgs, NetConf,
};
use crate::backend::ebpf::Pins;
use crate::daemon::client::call;
use crate::daemon::protocol::{PodStatus, Request, Response};
use crate::model::{BackendKind, PodIdentity, PodSpec};

/// What the plugin prints on stdout and whether it succeeded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub stdout: String,
    pub ok: bool,
}

fn note(msg: impl std::fmt::Display) {
    // stdout belongs to the protocol; the runtime logs stderr.
    eprintln!("interceptor-cni: {msg}");
}

/// Runs one plugin invocation: `env` as the runtime set it, `stdin` the network config.
pub fn execute(env: &CniEnv, stdin: &[u8]) -> Outcome {
    let version = spec::sniff_version(stdin).unwrap_or_else(|| spec::IMPLEMENTED_VERSION.into());
    match dispatch(env, stdin) {
        Ok(stdout) => Outcome { stdout, ok: true },
        Err(e) => {
            note(&e);
            Outcome {
                stdout: e.to_json(&version),
                ok: false,
            }
        }
    }
}

fn dispatch(env: &CniEnv, stdin: &[u8]) -> Result<String, CniError> {
    let Some(command) = Command::parse(&env.command) else {
        return Err(CniError::new(
            code::INVALID_ENV,
            format!(
                "unknown CNI_COMMAND {:?}: want ADD, DEL, CHECK or VERSION",
                env.command
            ),
            "",
        ));
    };
    if command == Command::Version {
        return Ok(spec::version_info());
    }
    let conf = parse_netconf(stdin)?;
    spec::check_version(&conf.cni_version)?;
    require(env.container_id.as_deref(), "CNI_CONTAINERID")?;
    require(env.ifname.as_deref(), "CNI_IFNAME")?;
    let k8s = parse_cni_args(env.args.as_deref())?;
    match command {
        Command::Add => add(env, &conf, &k8s),
        Command::Del => del(env, &conf, &k8s),
        Command::Check => check(env, &conf, &k8s),
        Command::Version => unreachable!(),
    }
}

fn require<'a>(v: Option<&'a str>, name: &str) -> Result<&'a str, CniError> {
    v.ok_or_else(|| CniError::new(code::INVALID_ENV, format!("{name} is missing or empty"), ""))
}

/// CNI_NETNS for ADD and CHECK: required, and it must be a network namespace.
fn require_netns(env: &CniEnv) -> Result<&Path, CniError> {
    let netns = env
        .netns
        .as_deref()
        .ok_or_else(|| CniError::new(code::INVALID_ENV, "CNI_NETNS is missing or empty", ""))?;
    if !netns.exists() {
        return Err(CniError::new(
            code::UNKNOWN_CONTAINER,
            format!("CNI_NETNS {} does not exist", netns.display()),
            "",
        ));
    }
    if !crate::netns::is_netns(netns) {
        return Err(CniError::new(
            code::UNKNOWN_CONTAINER,
            format!("CNI_NETNS {} is not a network namespace", netns.display()),
            "",
        ));
    }
    Ok(netns)
}

/// The pod as far as the config tells: `runtimeConfig` (per pod, from the runtime) wins over
/// the keys at the top level (static in the conflist).
pub fn pod_info(conf: &NetConf) -> PodInfo {
    let rc = conf.runtime_config.clone().unwrap_or_default();
    let annotations = match (
        &conf.pod_annotations,
        &rc.cri_pod_annotations,
        &rc.pod_annotations,
    ) {
        (None, None, None) => None,
        (top, cri, ours) => {
            let mut merged = BTreeMap::new();
            for m in [top, cri, ours].into_iter().flatten() {
                merged.extend(m.iter().map(|(k, v)| (k.clone(), v.clone())));
            }
            Some(merged)
        }
    };
    let mut proxy_env = conf.proxy_env.clone().unwrap_or_default();
    proxy_env.extend(rc.proxy_env.unwrap_or_default());
    PodInfo {
        annotations,
        proxy_env,
        run_as_user: rc.run_as_user.or(conf.run_as_user),
        run_as_group: rc.run_as_group.or(conf.run_as_group),
    }
}

fn bad_annotation(e: AnnotationError) -> CniError {
    CniError::new(
        code::INVALID_CONFIG,
        e.to_string(),
        "the pod's Istio annotations/env give an invalid interception config; nothing was registered",
    )
}

/// Istio's IPv6 detection in the pod netns: the first non-loopback, non-link-local address
/// decides; with ISTIO_DUAL_STACK any IPv6 address does.
fn detect_ipv6(netns: &Path, dual_stack: bool) -> Result<bool, CniError> {
    let addrs = crate::netns::local_addrs(Some(netns)).map_err(|e| {
        CniError::new(
            code::IO,
            format!("cannot read the addresses of {}", netns.display()),
            format!("{e:#}"),
        )
    })?;
    Ok(interceptor_common::plan::ipv6_enabled(&addrs, dual_stack))
}

/// The pod as the config tells, or — when the runtime passed no annotations and the pod's
/// identity is known — as the daemon's Kubernetes pod watcher knows it, which also tells when
/// Istio's plugin would skip the pod for what only the pod object shows (`Ok(None)`). When
/// neither can tell, the ADD fails for a retry: a pod is never captured blindly (one without a
/// proxy would have every connection refused). The uid goes along: a
/// watcher that still knows only an earlier pod of the same name fails the call (the kubelet
/// retries the ADD) rather than give the new pod its predecessor's annotations. A pod with no
/// Kubernetes identity gets the conflist's `defaultInterception`, or none: `Ok(None)`.
fn resolved_pod_info(conf: &NetConf, k8s: &K8sArgs) -> Result<Option<PodInfo>, CniError> {
    let pi = pod_info(conf);
    let Some(id) = identity(k8s) else {
        return Ok(outside_kubernetes(conf, pi));
    };
    if pi.annotations.is_some() {
        return Ok(Some(pi));
    }
    let req = Request::PodInfo {
        namespace: id.namespace,
        name: id.name,
        uid: (!id.uid.is_empty()).then_some(id.uid),
    };
    let unknown = |why: String| {
        CniError::new(
            code::TRY_AGAIN,
            format!(
                "cannot tell whether pod {}/{} is a mesh pod: {why}",
                k8s.namespace, k8s.name
            ),
            "nothing was registered; the runtime retries. The pod's annotations come from the \
             runtime (containerd's io.kubernetes.cri.pod-annotations capability) or from the \
             daemon's pod watcher (--node-name)",
        )
    };
    match call(&conf.socket, &req) {
        Ok(Response::PodInfo {
            annotations,
            proxy_env,
            run_as_user,
            run_as_group,
            skip,
        }) => {
            if let Some(why) = skip {
                note(format!(
                    "not capturing the pod: {why} (as Istio's CNI plugin)"
                ));
                return Ok(None);
            }
            Ok(Some(PodInfo {
                annotations: Some(annotations),
                proxy_env,
                run_as_user,
                run_as_group,
            }))
        }
        Ok(Response::Retry { message }) => Err(unknown(message)),
        Ok(Response::Error { message, .. }) => Err(unknown(message)),
        Ok(_) => Err(unknown("the daemon gave an unexpected answer".into())),
        Err(e) => Err(unreachable(&conf.socket, e)),
    }
}

/// A pod without a Kubernetes identity (a runtime outside Kubernetes). Istio's annotations
/// passed by the runtime decide as for any pod; without a sidecar status the conflist's
/// `defaultInterception` stands in for an injected sidecar (the runtime's annotations still
/// override it key by key, `sidecar.istio.io/inject: "false"` included). Neither → left alone:
/// nothing says this container runs a proxy, and capturing it would refuse all its traffic.
fn outside_kubernetes(conf: &NetConf, mut pi: PodInfo) -> Option<PodInfo> {
    let has_status = |a: &BTreeMap<String, String>| a.contains_key(keys::STATUS);
    if pi.annotations.as_ref().is_some_and(has_status) {
        return Some(pi);
    }
    let Some(d) = &conf.default_interception else {
        if pi.annotations.is_none() {
            note(
                "not capturing the pod: no Kubernetes identity and no annotations \
                 (set defaultInterception in the conflist to mesh pods of this runtime)",
            );
            return None;
        }
        return Some(pi);
    };
    let mut annotations = d.annotations.clone();
    annotations
        .entry(keys::STATUS.into())
        .or_insert_with(|| "{}".into());
    annotations.extend(pi.annotations.take().unwrap_or_default());
    let mut proxy_env = d.proxy_env.clone();
    proxy_env.extend(std::mem::take(&mut pi.proxy_env));
    Some(PodInfo {
        annotations: Some(annotations),
        proxy_env,
        run_as_user: pi.run_as_user.or(d.run_as_user),
        run_as_group: pi.run_as_group.or(d.run_as_group),
    })
}

/// The config the daemon gets for this pod, or why there is none (skipped: `Ok(None)`).
fn derive(conf: &NetConf, k8s: &K8sArgs, netns: &Path) -> Result<Option<RawConfig>, CniError> {
    let Some(pi) = resolved_pod_info(conf, k8s)? else {
        return Ok(None);
    };
    if let Some(why) = skip_reason(&pi) {
        note(format!(
            "not capturing the pod: {why} (as Istio's CNI plugin)"
        ));
        return Ok(None);
    }
    let redirect = Redirect::from_pod(&pi).map_err(bad_annotation)?;
    for w in &redirect.warnings {
        note(w);
    }
    let ipv6 = detect_ipv6(netns, redirect.dual_stack)?;
    redirect
        .validated(ipv6, &NodeEnv::from_process())
        .map(Some)
        .map_err(bad_annotation)
}

fn identity(k8s: &K8sArgs) -> Option<PodIdentity> {
    (!k8s.namespace.is_empty() && !k8s.name.is_empty()).then(|| PodIdentity {
        namespace: k8s.namespace.clone(),
        name: k8s.name.clone(),
        uid: k8s.uid.clone(),
    })
}

fn unreachable(socket: &Path, e: anyhow::Error) -> CniError {
    CniError::new(
        code::TRY_AGAIN,
        format!(
            "the interceptor daemon is unreachable at {}; refusing to start the pod without traffic interception",
            socket.display()
        ),
        format!("{e:#}"),
    )
}

fn add(env: &CniEnv, conf: &NetConf, k8s: &K8sArgs) -> Result<String, CniError> {
    let netns = require_netns(env)?;
    let out = pass_through(conf.prev_result.as_ref(), &conf.cni_version);
    let ips = prev_result_ips(conf.prev_result.as_ref())?;
    let Some(config) = derive(conf, k8s, netns)? else {
        return Ok(out);
    };
    let spec = PodSpec {
        netns: netns.to_path_buf(),
        ips,
        config,
        backend: conf.backend,
        identity: identity(k8s),
    };
    match call(&conf.socket, &Request::Add(Box::new(spec))) {
        Err(e) => Err(unreachable(&conf.socket, e)),
        Ok(Response::Pod(p)) => {
            note(format!(
                "registered {} ({}: {})",
                p.netns.display(),
                p.backend.words(),
                p.why
            ));
            Ok(out)
        }
        Ok(Response::Error {
            message,
            bad_input: true,
        }) => Err(CniError::new(
            code::INVALID_CONFIG,
            format!("the interceptor daemon refused the pod: {message}"),
            "nothing was registered",
        )),
        Ok(Response::Error { message, .. }) => Err(CniError::new(
            code::DAEMON_FAILED,
            format!("the interceptor daemon failed to register the pod: {message}"),
            "",
        )),
        Ok(other) => Err(CniError::new(
            code::DAEMON_FAILED,
            "unexpected answer from the interceptor daemon",
            serde_json::to_string(&other).unwrap_or_default(),
        )),
    }
}

/// DEL: idempotent. A pod that is not registered, a netns that is gone, or a daemon that is
/// down (it forgets pods whose netns is gone when it starts) all succeed.
fn del(env: &CniEnv, conf: &NetConf, k8s: &K8sArgs) -> Result<String, CniError> {
    let targets: Vec<PathBuf> = match &env.netns {
        Some(netns) => vec![netns.clone()],
        // Without CNI_NETNS the runtime has already lost the netns: unregister what the daemon
        // still holds for this pod (same identity) whose netns no longer exists.
        None => {
            let Some(id) = identity(k8s) else {
                return Ok(String::new());
            };
            match call(&conf.socket, &Request::List) {
                Ok(Response::Pods { pods, .. }) => pods
                    .into_iter()
                    .filter(|p| same_pod(p, &id) && !crate::netns::is_netns(&p.netns))
                    .map(|p| p.netns)
                    .collect(),
                Ok(_) => vec![],
                Err(e) => {
                    note(format!(
                        "DEL without CNI_NETNS: daemon unreachable ({e:#}); nothing to do"
                    ));
                    vec![]
                }
            }
        }
    };
    for netns in targets {
        match call(&conf.socket, &Request::Remove { netns: netns.clone() }) {
            Ok(Response::Removed { removed }) => {
                if removed {
                    note(format!("unregistered {}", netns.display()));
                }
            }
            Ok(Response::Error { message, .. }) => {
                return Err(CniError::new(
                    code::DAEMON_FAILED,
                    format!(
                        "the interceptor daemon failed to unregister {}: {message}",
                        netns.display()
                    ),
                    "",
                ))
            }
            Ok(other) => note(format!(
                "unexpected answer to remove: {}",
                serde_json::to_string(&other).unwrap_or_default()
            )),
            Err(e) => note(format!(
                "daemon unreachable at {} ({e:#}); nothing to undo now (the daemon forgets pods whose netns is gone when it starts)",
                conf.socket.display()
            )),
        }
    }
    Ok(String::new())
}

fn same_pod(p: &PodStatus, id: &PodIdentity) -> bool {
    p.identity.as_ref().is_some_and(|pi| {
        pi.namespace == id.namespace
            && pi.name == id.name
            && (id.uid.is_empty() || pi.uid.is_empty() || pi.uid == id.uid)
    })
}

/// CHECK: the pod is registered for this very netns with the config its annotations give,
/// and what serves it is in place.
fn check(env: &CniEnv, conf: &NetConf, k8s: &K8sArgs) -> Result<String, CniError> {
    if !spec::version_at_least(&conf.cni_version, "0.4.0") {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!(
                "CHECK needs cniVersion 0.4.0 or later, not {:?}",
                conf.cni_version
            ),
            "",
        ));
    }
    let netns = require_netns(env)?;
    let Some(want) = derive(conf, k8s, netns)? else {
        return Ok(String::new());
    };
    let pod = match call(
        &conf.socket,
        &Request::Show {
            netns: netns.to_path_buf(),
        },
    ) {
        Err(e) => return Err(unreachable(&conf.socket, e)),
        Ok(Response::Pod(p)) => p,
        Ok(Response::Error { message, .. }) => {
            return Err(CniError::new(
                code::NOT_REGISTERED,
                format!("the pod is not registered with the interceptor daemon: {message}"),
                "",
            ))
        }
        Ok(other) => {
            return Err(CniError::new(
                code::NOT_REGISTERED,
                "unexpected answer from the interceptor daemon",
                serde_json::to_string(&other).unwrap_or_default(),
            ))
        }
    };
    let cookie = crate::netns::identity(netns)
        .map_err(|e| CniError::new(code::IO, "cannot read the netns cookie", format!("{e:#}")))?;
    if cookie != pod.netns_cookie && !crate::netns::is_recorded(netns, pod.netns_cookie) {
        return Err(CniError::new(
            code::NOT_REGISTERED,
            format!(
                "{} was registered for another namespace instance (cookie {} != {cookie})",
                netns.display(),
                pod.netns_cookie
            ),
            "",
        ));
    }
    if pod.config != want {
        return Err(CniError::new(
            code::NOT_REGISTERED,
            "the pod is registered with a different config than its annotations give",
            format!(
                "registered {}, want {}",
                serde_json::to_string(&pod.config).unwrap_or_default(),
                serde_json::to_string(&want).unwrap_or_default()
            ),
        ));
    }
    attached(conf, netns, &pod).map_err(|why| {
        CniError::new(
            code::NOT_ATTACHED,
            format!(
                "the pod is registered ({}) but its interception is not in place: {why}",
                pod.backend.words()
            ),
            "",
        )
    })?;
    Ok(String::new())
}

/// Whether what serves the pod is in place: the pinned, attached programs and the pod's policy
/// entry (eBPF), or our chains/tables in its netns (iptables/nftables).
fn attached(conf: &NetConf, netns: &Path, pod: &PodStatus) -> Result<(), String> {
    use crate::backend::{exec, netfilter, nftables};
    match pod.backend {
        BackendKind::Ebpf => {
            let pins = Pins::new(&conf.bpffs);
            if !pins.loaded() {
                return Err(format!(
                    "the programs are not attached (no pins under {})",
                    conf.bpffs.display()
                ));
            }
            let maps = pins.maps().map_err(|e| format!("{e:#}"))?;
            if !maps.pods().iter().any(|(c, _)| *c == pod.netns_cookie) {
                return Err(format!(
                    "no policy entry for netns cookie {}",
                    pod.netns_cookie
                ));
            }
            Ok(())
        }
        BackendKind::Iptables => {
            let bin = netfilter::choose_binaries(Some(netns), None);
            let save = format!("iptables{}-save", bin.suffix);
            let dump = exec::run(Some(netns), &save, &[], None).map_err(|e| format!("{e:#}"))?;
            if dump.lines().any(|l| l.starts_with(":ISTIO_")) {
                Ok(())
            } else {
                Err(format!("no ISTIO_* chains in {save}"))
            }
        }
        BackendKind::Nftables => {
            let found = nftables::TABLES.iter().any(|t| {
                exec::run(Some(netns), "nft", &["list", "table", "inet", t], None).is_ok()
            });
            if found {
                Ok(())
            } else {
                Err("none of our nftables tables exists in the netns".into())
            }
        }
        BackendKind::Auto => Err("the daemon recorded no concrete backend".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(cmd: &str) -> CniEnv {
        CniEnv {
            command: cmd.into(),
            container_id: Some("c1".into()),
            netns: None,
            ifname: Some("eth0".into()),
            args: None,
            path: None,
        }
    }

    fn err_of(o: &Outcome) -> serde_json::Value {
        assert!(!o.ok, "{}", o.stdout);
        serde_json::from_str(&o.stdout).unwrap()
    }

    #[test]
    fn version() {
        let o = execute(&env("VERSION"), br#"{"cniVersion":"1.0.0"}"#);
        assert!(o.ok);
        let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
        assert!(v["supportedVersions"]
            .as_array()
            .unwrap()
            .contains(&"0.4.0".into()));
    }

    #[test]
    fn bad_input() {
        assert_eq!(err_of(&execute(&env("ADD"), b"{nope"))["code"], 6);
        let v = err_of(&execute(&env("ADD"), br#"{"cniVersion":"9.9.9"}"#));
        assert_eq!(v["code"], 1);
        assert_eq!(v["cniVersion"], "1.0.0");
        let v = err_of(&execute(&env("ADD"), br#"{"cniVersion":"0.4.0"}"#));
        assert_eq!(v["code"], 4, "{v}");
        assert_eq!(v["cniVersion"], "0.4.0");
        assert!(v["msg"].as_str().unwrap().contains("CNI_NETNS"));
        assert_eq!(err_of(&execute(&env("GC"), b"{}"))["code"], 4);
    }

    #[test]
    fn del_without_netns_or_daemon_succeeds() {
        let o = execute(
            &env("DEL"),
            br#"{"cniVersion":"1.0.0","socket":"/nonexistent/interceptor.sock"}"#,
        );
        assert!(o.ok, "{}", o.stdout);
        assert!(o.stdout.is_empty());
    }

    #[test]
    fn runtime_config_wins() {
        let conf = parse_netconf(
            br#"{"cniVersion":"1.0.0","podAnnotations":{"a":"1","b":"1"},"runAsUser":5,
                 "runtimeConfig":{"io.kubernetes.cri.pod-annotations":{"b":"2"},"runAsUser":6}}"#,
        )
        .unwrap();
        let pi = pod_info(&conf);
        let a = pi.annotations.unwrap();
        assert_eq!((a["a"].as_str(), a["b"].as_str()), ("1", "2"));
        assert_eq!(pi.run_as_user, Some(6));
        let conf = parse_netconf(br#"{"cniVersion":"1.0.0"}"#).unwrap();
        assert!(pod_info(&conf).annotations.is_none());
    }

    #[test]
    fn outside_kubernetes_needs_a_default() {
        let conf = |extra: &str| {
            parse_netconf(format!(r#"{{"cniVersion":"1.0.0"{extra}}}"#).as_bytes()).unwrap()
        };
        let none = K8sArgs::default();
        // No identity, no annotations, no default: left alone.
        assert_eq!(resolved_pod_info(&conf(""), &none).unwrap(), None);
        // Annotations without a sidecar status: Istio's screening decides (skipped later).
        let plain = conf(r#","podAnnotations":{"app":"x"}"#);
        let pi = resolved_pod_info(&plain, &none).unwrap().unwrap();
        assert!(skip_reason(&pi).is_some());
        // The default stands in for an injected sidecar; the runtime's keys override it.
        let d = r#","defaultInterception":{"annotations":
            {"traffic.sidecar.istio.io/excludeOutboundPorts":"9999"},"runAsUser":1500}"#;
        let pi = resolved_pod_info(&conf(d), &none).unwrap().unwrap();
        assert_eq!(skip_reason(&pi), None);
        let a = pi.annotations.as_ref().unwrap();
        assert_eq!(a[keys::STATUS], "{}");
        assert_eq!(a["traffic.sidecar.istio.io/excludeOutboundPorts"], "9999");
        assert_eq!(pi.run_as_user, Some(1500));
        let off = conf(&format!(
            r#"{d},"podAnnotations":{{"sidecar.istio.io/inject":"false"}}"#
        ));
        let pi = resolved_pod_info(&off, &none).unwrap().unwrap();
        assert!(skip_reason(&pi).unwrap().contains("inject"));
        // A misspelt field is an error naming it, not a silently ignored default.
        let e = parse_netconf(br#"{"cniVersion":"1.0.0","defaultInterception":{"annotation":{}}}"#)
            .unwrap_err();
        assert_eq!(e.code, 7);
        assert!(e.msg.contains("annotation"), "{}", e.msg);
    }
}
