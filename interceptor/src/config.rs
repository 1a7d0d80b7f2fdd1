//! From a pod's config as given (neutral `Input`: the CLI, the daemon and the CNI plugin fill it)
//! to the raw config, including what Istio detects from the pod (IPv6, DNS servers, the proxy
//! uid) unless given.

use std::path::{Path, PathBuf};

use anyhow::Result;
use interceptor_common::config::{ConfigError, RawConfig};
use interceptor_common::defaults;

use crate::netns;

/// Istio's default proxy uid: the uid of $ENVOY_USER (istio-proxy), else 1337.
fn default_proxy_uid() -> String {
    let user = std::env::var("ENVOY_USER").unwrap_or_else(|_| "istio-proxy".into());
    nix::unistd::User::from_name(&user)
        .ok()
        .flatten()
        .map(|u| u.uid.to_string())
        .unwrap_or_else(|| defaults::PROXY_UID.to_string())
}

/// Istio's IPv6 detection: the first non-loopback, non-link-local address decides.
pub fn detect_ipv6(netns: Option<&Path>, dual_stack: bool) -> Result<bool> {
    let addrs = netns::local_addrs(netns)?;
    Ok(interceptor_common::plan::ipv6_enabled(&addrs, dual_stack))
}

/// The nameservers of the resolv.conf in effect for the netns: `/etc/netns/NAME/resolv.conf`
/// (what `ip netns exec` would bind-mount) if present, else `/etc/resolv.conf`.
pub fn resolv_conf_servers(netns: Option<&Path>) -> String {
    let per_netns = netns
        .and_then(|p| p.file_name())
        .map(|n| Path::new("/etc/netns").join(n).join("resolv.conf"))
        .filter(|p| p.exists());
    let path = per_netns.unwrap_or_else(|| "/etc/resolv.conf".into());
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .map(|s| s.trim().split('%').next().unwrap_or("").to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// `--network-namespace` must name an existing network namespace.
pub fn check_netns(ns: &Path) -> Result<(), ConfigError> {
    let bad = |why| {
        Err(ConfigError::new(
            "--network-namespace",
            ns.display().to_string(),
            why,
        ))
    };
    if !ns.exists() {
        return bad("does not exist");
    }
    if !netns::is_netns(ns) {
        return bad("is not a network namespace");
    }
    Ok(())
}

/// A pod's config as given (flags and env, annotations, a control request), before what Istio
/// detects from the pod. `raw` holds every given value; the fields below are the ones detected
/// when not given.
#[derive(Debug, Clone, Default)]
pub struct Input {
    pub raw: RawConfig,
    /// The pod's netns (None: this process's own).
    pub netns: Option<PathBuf>,
    /// Comma list of proxy uids; default: the uid of $ENVOY_USER, else 1337.
    pub proxy_uid: Option<String>,
    /// Default: the netns's first non-loopback, non-link-local address is IPv6 (with
    /// `dual_stack`: any such address is).
    pub ipv6: Option<bool>,
    /// Istio's `--dual-stack`: IPv6 rules when any of the pod's addresses is IPv6.
    pub dual_stack: bool,
    /// Default (with DNS capture, not of all DNS): the resolv.conf in effect.
    pub dns_servers: Option<String>,
}

/// Builds the raw (string) config exactly as istio-iptables would see it.
pub fn raw_config(input: Input) -> Result<RawConfig, ConfigError> {
    let Input {
        mut raw,
        netns,
        proxy_uid,
        ipv6,
        dual_stack,
        dns_servers,
    } = input;
    if let Some(ns) = &netns {
        check_netns(ns)?;
    }
    let netns = netns.as_deref();
    raw.enable_ipv6 = match ipv6 {
        Some(v) => v,
        None => detect_ipv6(netns, dual_stack).map_err(|e| {
            ConfigError::new(
                "--ipv6",
                "",
                format!("cannot detect IPv6 from the netns ({e:#}); pass --ipv6 true|false"),
            )
        })?,
    };
    // Istio reads resolv.conf only when it will use it.
    raw.dns_servers = match dns_servers {
        Some(s) => s,
        None if raw.redirect_dns && !raw.capture_all_dns => resolv_conf_servers(netns),
        None => String::new(),
    };
    raw.proxy_uid = proxy_uid.unwrap_or_else(default_proxy_uid);
    Ok(raw)
}

/// Go's time.ParseDuration for the simple forms Istio users pass (`5s`, `500ms`, `1m`).
pub fn parse_go_duration(s: &str) -> Option<std::time::Duration> {
    let s = s.trim();
    let split = s.find(|c: char| c.is_ascii_alphabetic())?;
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().ok().filter(|n: &f64| *n >= 0.0)?;
    let secs = match unit {
        "ns" => n / 1e9,
        "us" | "µs" => n / 1e6,
        "ms" => n / 1e3,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return None,
    };
    Some(std::time::Duration::from_secs_f64(secs))
}
