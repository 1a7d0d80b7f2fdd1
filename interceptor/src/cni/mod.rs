//! The `interceptor` binary as a chained CNI plugin (spec 1.0.0; also 0.3.0, 0.3.1, 0.4.0):
//! the Istio CNI plugin's sidecar mode, registering pods with the node daemon instead of
//! writing iptables rules.
//!
//! When the runtime runs the binary with `CNI_COMMAND` set, `main` hands over to [`main`] here
//! before any command-line parsing. Chained after the primary plugin (bridge, Calico, …):
//!
//! - **ADD** registers the pod with the daemon (`Request::Add`): the netns from `CNI_NETNS`,
//!   the IPs from `prevResult.ips`, the interception config derived from the pod's Istio
//!   annotations and proxy env ([`annotations`]), the identity from `CNI_ARGS`
//!   (`K8S_POD_NAMESPACE`, `K8S_POD_NAME`, `K8S_POD_UID`). Its stdout is `prevResult` with the
//!   config's `cniVersion`. **Fail closed**: a daemon that cannot be reached, or that refuses
//!   or fails the registration, makes ADD fail with a CNI error, so the pod does not start
//!   unprotected.
//! - **DEL** unregisters (`Request::Remove`). Idempotent: a pod that is not registered, a
//!   missing/empty `CNI_NETNS`, or a daemon that is down all succeed (without `CNI_NETNS`, pods
//!   of the same identity whose netns is gone are unregistered; a daemon forgets pods whose
//!   netns is gone when it starts).
//! - **CHECK** (0.4.0+) verifies the pod is registered (`Request::Show`) for this very netns
//!   (same netns cookie), with the config its annotations give today, and that what serves it
//!   is in place: the pinned, attached eBPF programs and the pod's policy entry, or our
//!   iptables chains / nftables tables in its netns.
//! - **VERSION** prints the supported versions.
//!
//! Errors are the spec's error object on stdout (`{"cniVersion","code","msg","details"}`)
//! with a non-zero exit: 1 unsupported `cniVersion`, 3 `CNI_NETNS` does not exist, 4 missing
//! `CNI_*` variable or bad `CNI_ARGS`, 6 malformed JSON, 7 invalid config (a bad annotation
//! value is named with its key and value; nothing is registered), 11 daemon unreachable (or
//! its pod watcher knows this pod's name only under an earlier pod's uid),
//! 100/101 CHECK failures, 102 the daemon failed. Diagnostics go to stderr.
//!
//! # Network configuration
//!
//! ```json
//! {"cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "interceptor",
//!  "socket": "/run/interceptor/interceptor.sock", "backend": "auto",
//!  "bpffs": "/sys/fs/bpf/interceptor",
//!  "podAnnotations": {"traffic.sidecar.istio.io/excludeOutboundPorts": "5432"},
//!  "proxyEnv": {"ISTIO_META_DNS_CAPTURE": "true"},
//!  "runAsUser": 1337, "runAsGroup": 1337,
//!  "runtimeConfig": {"io.kubernetes.cri.pod-annotations": {…}},
//!  "prevResult": {…}}
//! ```
//!
//! # Where the pod's annotations come from
//!
//! Istio's plugin asks the API server for the pod (annotations, the `istio-proxy` container's
//! env and `securityContext`). This plugin has no API client; it reads them from its config:
//!
//! - `podAnnotations`, `proxyEnv`, `runAsUser`, `runAsGroup` at the top level (static, or
//!   written by whatever generates the config; the tests use this), and
//! - the same keys under `runtimeConfig` (per pod, from a runtime that passes them), plus
//!   containerd's `io.kubernetes.cri.pod-annotations` capability, which `cni-install` declares
//!   so containerd fills `runtimeConfig` with the pod's annotations. `runtimeConfig` wins.
//!
//! When no annotations are given at all, Istio's defaults apply (capture everything, exclude
//! the proxy's own ports) and every pod through the plugin is captured. When annotations are
//! given, pods Istio's plugin would leave alone are passed through uncaptured: no
//! `sidecar.istio.io/status` annotation (no sidecar injected), `sidecar.istio.io/inject`
//! false, or `DISABLE_ENVOY` true in the proxy env. A daemon watching pods through the API
//! server (`--node-name`) supplies them for runtimes that pass none, asked by namespace, name
//! and `K8S_POD_UID`: for a pod recreated under the same name (a StatefulSet's `web-0`) it
//! answers for that uid only, and when its watch still knows only the predecessor, ADD fails
//! (code 11, retried by the kubelet) instead of using the predecessor's annotations.

pub mod annotations;
pub mod install;
pub mod plugin;
pub mod spec;

use std::io::{Read, Write};
use std::process::ExitCode;

/// Whether the process was started as a CNI plugin (the runtime sets `CNI_COMMAND`).
pub fn invoked_as_plugin() -> bool {
    std::env::var_os("CNI_COMMAND").is_some()
}

/// The plugin's entry: reads the environment and stdin, prints the result or the error object.
pub fn main() -> ExitCode {
    let env = spec::CniEnv::from_process();
    let mut stdin = Vec::new();
    let outcome = match std::io::stdin().read_to_end(&mut stdin) {
        Ok(_) => plugin::execute(&env, &stdin),
        Err(e) => plugin::Outcome {
            stdout: spec::CniError::new(spec::code::IO, "cannot read stdin", e.to_string())
                .to_json(spec::IMPLEMENTED_VERSION),
            ok: false,
        },
    };
    let mut out = std::io::stdout().lock();
    if !outcome.stdout.is_empty() {
        let _ = writeln!(out, "{}", outcome.stdout);
    }
    let _ = out.flush();
    if outcome.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
