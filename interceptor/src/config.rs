//! From the command line and environment to the validated `Config`, including what Istio detects
//! from the pod (IPv6, DNS servers, the proxy uid) unless overridden.

use std::net::IpAddr;
use std::path::Path;

use anyhow::Result;
use interceptor_common::config::{Config, ConfigError, RawConfig};
use interceptor_common::plan::defaults;

use crate::cli::ApplyArgs;
use crate::netns;

fn env_true(name: &str) -> bool {
    std::env::var(name)
        .is_ok_and(|v| matches!(v.to_ascii_lowercase().as_str(), "true" | "1" | "yes" | "on"))
}

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

/// Istio's default proxy uid: the uid of $ENVOY_USER (istio-proxy), else 1337.
fn default_proxy_uid() -> String {
    let user = env_or("ENVOY_USER", "istio-proxy");
    nix::unistd::User::from_name(&user)
        .ok()
        .flatten()
        .map(|u| u.uid.to_string())
        .unwrap_or_else(|| defaults::PROXY_UID.to_string())
}

/// Istio's IPv6 detection: the first non-loopback, non-link-local address decides.
pub fn detect_ipv6(netns: Option<&Path>) -> Result<bool> {
    Ok(netns::local_addrs(netns)?
        .first()
        .is_some_and(IpAddr::is_ipv6))
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

/// Builds the raw (string) config exactly as istio-iptables would see it.
pub fn raw_config(a: &ApplyArgs) -> Result<RawConfig, ConfigError> {
    if let Some(ns) = &a.network_namespace {
        check_netns(ns)?;
    }
    let netns = a.network_namespace.as_deref();
    let redirect_dns = a.redirect_dns || env_true("ISTIO_META_DNS_CAPTURE");
    let capture_all_dns = a.capture_all_dns;
    let enable_ipv6 = match a.ipv6 {
        Some(v) => v,
        None => detect_ipv6(netns).map_err(|e| {
            ConfigError::new(
                "--ipv6",
                "",
                format!("cannot detect IPv6 from the netns ({e:#}); pass --ipv6 true|false"),
            )
        })?,
    };
    // Istio reads resolv.conf only when it will use it.
    let dns_servers = match &a.dns_servers {
        Some(s) => s.clone(),
        None if redirect_dns && !capture_all_dns => resolv_conf_servers(netns),
        None => String::new(),
    };
    Ok(RawConfig {
        proxy_port: a.envoy_port.clone(),
        inbound_capture_port: a.inbound_capture_port.clone(),
        inbound_tunnel_port: a.inbound_tunnel_port.clone(),
        proxy_uid: a.proxy_uid.clone().unwrap_or_else(default_proxy_uid),
        proxy_gid: a.proxy_gid.clone().unwrap_or_default(),
        inbound_interception_mode: a.istio_inbound_interception_mode.clone(),
        inbound_ports_include: a.istio_inbound_ports.clone(),
        inbound_ports_exclude: a.istio_local_exclude_ports.clone(),
        exclude_interfaces: a.istio_exclude_interfaces.clone(),
        outbound_ip_ranges_include: a.istio_service_cidr.clone(),
        outbound_ip_ranges_exclude: a.istio_service_exclude_cidr.clone(),
        outbound_ports_include: a.istio_outbound_ports.clone(),
        outbound_ports_exclude: a.istio_local_outbound_ports_exclude.clone(),
        reroute_virtual_interfaces: a.kube_virt_interfaces.clone(),
        inbound_tproxy_mark: a.istio_inbound_tproxy_mark.clone(),
        inbound_tproxy_route_table: a.istio_inbound_tproxy_route_table.clone(),
        redirect_dns,
        capture_all_dns,
        drop_invalid: a.drop_invalid || env_true("INVALID_DROP"),
        owner_groups_include: env_or("ISTIO_OUTBOUND_OWNER_GROUPS", "*"),
        owner_groups_exclude: env_or("ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE", ""),
        host_ipv4_loopback_cidr: env_or("ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR", "127.0.0.1/32"),
        enable_ipv6,
        dns_servers,
        bind_guard_ports: a.bind_guard_ports.clone(),
        accelerate: a.accelerate,
    })
}

/// Validates the whole command line: the config plus the operational flags.
pub fn load(a: &ApplyArgs) -> Result<Config, ConfigError> {
    let cfg = raw_config(a)?.parse()?;
    a.iptables_probe_port
        .parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| {
            ConfigError::new(
                "--iptables-probe-port",
                &a.iptables_probe_port,
                "not a port number (1-65535)",
            )
        })?;
    parse_go_duration(&a.probe_timeout).ok_or_else(|| {
        ConfigError::new(
            "--probe-timeout",
            &a.probe_timeout,
            "not a duration such as 5s or 500ms",
        )
    })?;
    Ok(cfg)
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
