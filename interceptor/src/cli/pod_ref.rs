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
#[group(required = true, multiple = false)]
pub struct PodTarget {
    /// The pod's network namespace (a path such as /var/run/netns/NAME).
    #[arg(long, env = "NETWORK_NAMESPACE")]
    pub network_namespace: Option<PathBuf>,
    /// The pod as namespace/name, looked up among the pods registered with the daemon.
    #[arg(long, value_name = "NAMESPACE/NAME")]
    pub pod: Option<String>,
}

impl PodTarget {
    /// The pod's netns path (`--pod` asks the daemon at `socket`).
    pub fn netns(&self, socket: &Path) -> Result<Result<PathBuf, ConfigError>> {
        match (&self.network_namespace, &self.pod) {
            (Some(ns), _) => Ok(Ok(ns.clone())),
            (None, Some(pod)) => Ok(registered(socket, pod)?.map(|p| p.netns)),
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
