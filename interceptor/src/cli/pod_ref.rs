//! `--pod namespace/name`: a registered pod found through the daemon (which records each pod's
//! Kubernetes identity from the CNI args), for the commands that otherwise take a netns path.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use interceptor_common::config::ConfigError;

use crate::daemon::client::call;
use crate::daemon::protocol::{PodStatus, Request, Response};

/// Which pod: its netns path, or its namespace/name as the daemon registered it.
#[derive(Args, Debug, Clone)]
pub struct PodTarget {
    /// The pod's network namespace (a path such as /var/run/netns/NAME).
    #[arg(long, env = "NETWORK_NAMESPACE")]
    pub network_namespace: Option<PathBuf>,
    /// The pod as namespace/name, looked up among the pods registered with the daemon
    /// (instead of --network-namespace; NETWORK_NAMESPACE from the environment gives way).
    #[arg(long, value_name = "NAMESPACE/NAME")]
    pub pod: Option<String>,
}

/// Whether `--network-namespace` is on this process's command line, not only in the
/// environment (clap counts NETWORK_NAMESPACE as given, which must not stop `--pod`).
pub fn netns_flag_given() -> bool {
    std::env::args_os().any(|a| {
        let a = a.to_string_lossy();
        a == "--network-namespace" || a.starts_with("--network-namespace=")
    })
}

/// `--pod` together with `--network-namespace` on the command line: one pod named twice.
pub fn both_given(pod: &str) -> Option<ConfigError> {
    netns_flag_given()
        .then(|| ConfigError::new("--pod", pod, "give --pod or --network-namespace, not both"))
}

impl PodTarget {
    /// The pod's netns path (`--pod` asks the daemon at `socket`).
    pub fn netns(&self, socket: &Path) -> Result<Result<PathBuf, ConfigError>> {
        match (&self.network_namespace, &self.pod) {
            (_, Some(pod)) => match both_given(pod) {
                Some(e) => Ok(Err(e)),
                None => Ok(registered(socket, pod)?.map(|p| p.netns)),
            },
            (Some(ns), None) => Ok(Ok(ns.clone())),
            (None, None) => Ok(Err(ConfigError::new(
                "--network-namespace",
                "",
                "is required (or --pod namespace/name)",
            ))),
        }
    }
}

/// The daemon's record of the pod `namespace/name` (`--pod`). A malformed name is bad input;
/// a pod the daemon does not know is an error naming it.
pub fn registered(socket: &Path, pod: &str) -> Result<Result<PodStatus, ConfigError>> {
    let Some((namespace, name)) = pod
        .split_once('/')
        .filter(|(ns, n)| !ns.is_empty() && !n.is_empty() && !n.contains('/'))
    else {
        return Ok(Err(ConfigError::new("--pod", pod, "want namespace/name")));
    };
    let resp = call(socket, &Request::List).with_context(|| {
        format!(
            "looking up pod {pod}: the daemon at {} does not answer",
            socket.display()
        )
    })?;
    let pods = match resp {
        Response::Pods { pods, .. } => pods,
        Response::Error { message, .. } => bail!("looking up pod {pod}: {message}"),
        _ => bail!("looking up pod {pod}: the daemon did not answer with its pod list"),
    };
    let mut found: Vec<PodStatus> = pods
        .into_iter()
        .filter(|p| {
            p.identity
                .as_ref()
                .is_some_and(|i| i.namespace == namespace && i.name == name)
        })
        .collect();
    // A pod being removed is the previous incarnation of a recreated one.
    if found.len() > 1 {
        found.retain(|p| !p.removing);
    }
    match found.len() {
        0 => bail!(
            "pod {pod} is not registered with the daemon at {} (`interceptor pod list` shows \
             the registered pods and their namespace/name)",
            socket.display()
        ),
        1 => Ok(Ok(found.remove(0))),
        _ => {
            let netns: Vec<String> = found
                .iter()
                .map(|p| p.netns.display().to_string())
                .collect();
            bail!(
                "pod {pod} is registered more than once (netns {}): name one with \
                 --network-namespace",
                netns.join(", ")
            )
        }
    }
}
