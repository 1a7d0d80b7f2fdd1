//! Neutral domain types: what the front ends (the CLI, the daemon's wire protocol and metrics,
//! the CNI plugin) and the services below them share. No clap here: the CLI converts its
//! arguments into these at the edge, so nothing below a front end depends on one.

use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;
use std::str::FromStr;

use interceptor_common::config::RawConfig;
use serde::{Deserialize, Serialize};

/// Which mechanism installs the interception.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// eBPF where the kernel and the config allow it, else iptables, else nftables.
    Auto,
    Ebpf,
    Iptables,
    Nftables,
}

impl BackendKind {
    /// Every kind, in the order the CLI lists them.
    pub const ALL: [BackendKind; 4] = [Self::Auto, Self::Ebpf, Self::Iptables, Self::Nftables];

    /// The name users type (`--backend`, the CNI config, the control protocol).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Ebpf => "ebpf",
            Self::Iptables => "iptables",
            Self::Nftables => "nftables",
        }
    }

    /// The name in prose, for people (`eBPF`, not `ebpf`).
    pub fn words(self) -> &'static str {
        match self {
            Self::Ebpf => "eBPF",
            other => other.as_str(),
        }
    }

    /// One line for `--help`, where a name alone does not say enough.
    pub fn help(self) -> Option<&'static str> {
        match self {
            Self::Auto => {
                Some("eBPF where the kernel and the config allow it, else iptables, else nftables")
            }
            _ => None,
        }
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for BackendKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| format!("unknown backend {s:?} (auto, ebpf, iptables or nftables)"))
    }
}

/// Which iptables variant (`--force-iptables-binary`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IptablesFlavor {
    Legacy,
    Nft,
}

impl IptablesFlavor {
    pub const ALL: [IptablesFlavor; 2] = [Self::Legacy, Self::Nft];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Legacy => "legacy",
            Self::Nft => "nft",
        }
    }
}

impl fmt::Display for IptablesFlavor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for IptablesFlavor {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| format!("unknown iptables variant {s:?} (legacy or nft)"))
    }
}

/// Where the eBPF state lives and how the programs are loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EbpfSettings {
    /// bpffs folder holding our pinned programs, links and maps.
    pub bpffs: PathBuf,
    /// cgroup v2 directory the programs attach to (None: the cgroup v2 root, detected).
    pub cgroup: Option<PathBuf>,
    /// Load the programs without per-pod counters.
    pub no_counters: bool,
}

/// Who a pod is, when known (from the CNI runtime or the Kubernetes API).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodIdentity {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

/// A pod to register: its netns, addresses, the full interception config (as `apply` takes it,
/// validated by the daemon exactly as `apply` validates it) and identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodSpec {
    pub netns: PathBuf,
    /// Pod IPs; empty means "read them from the netns".
    #[serde(default, deserialize_with = "named_ips")]
    pub ips: Vec<IpAddr>,
    pub config: RawConfig,
    #[serde(default = "auto")]
    pub backend: BackendKind,
    #[serde(default)]
    pub identity: Option<PodIdentity>,
}

/// Why: serde's own `IpAddr` error ("invalid IP address syntax") does not say which value was
/// bad; a control request's error must name it.
fn named_ips<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<IpAddr>, D::Error> {
    Vec::<String>::deserialize(d)?
        .iter()
        .map(|s| {
            s.parse().map_err(|_| {
                serde::de::Error::custom(format!("invalid pod IP {s:?}: not an IP address"))
            })
        })
        .collect()
}

fn auto() -> BackendKind {
    BackendKind::Auto
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for k in BackendKind::ALL {
            assert_eq!(k.as_str().parse::<BackendKind>(), Ok(k));
            assert_eq!(
                serde_json::to_string(&k).unwrap(),
                format!("\"{}\"", k.as_str())
            );
        }
        for f in IptablesFlavor::ALL {
            assert_eq!(f.to_string().parse::<IptablesFlavor>(), Ok(f));
        }
        assert!("Ebpf".parse::<BackendKind>().is_err());
        assert!("xtables".parse::<IptablesFlavor>().is_err());
    }
}
