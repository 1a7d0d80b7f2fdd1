//! The typed interception config: istio-iptables' flags and env parsed and validated once.
//!
//! `RawConfig` holds the values as the user gave them (flag, else env, else Istio's default);
//! `RawConfig::parse` turns them into `Config` or an error naming the flag and the bad value.

use std::net::{IpAddr, Ipv4Addr};

use ipnet::{IpNet, Ipv4Net};

use crate::plan::defaults;

/// A validation error: which flag, which value, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid value {value:?} for {flag}: {reason}")]
pub struct ConfigError {
    pub flag: &'static str,
    pub value: String,
    pub reason: String,
}

impl ConfigError {
    pub fn new(flag: &'static str, value: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            flag,
            value: value.into(),
            reason: reason.into(),
        }
    }
}

/// Inbound interception mode (`-m`). Istio only checks `== "TPROXY"`; we also reject typos.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum InterceptionMode {
    #[default]
    Redirect,
    Tproxy,
}

/// Inbound ports to capture (`-b`): `*`, a list, or (empty list) nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortSelection {
    All,
    List(Vec<u16>),
}

impl PortSelection {
    pub fn is_empty(&self) -> bool {
        matches!(self, PortSelection::List(l) if l.is_empty())
    }
}

/// Outbound CIDRs to capture (`-i`): `*`, a list, or (empty list) nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CidrSelection {
    All,
    List(Vec<IpNet>),
}

/// Owner groups whose traffic is captured (env `ISTIO_OUTBOUND_OWNER_GROUPS[_EXCLUDE]`).
/// Groups are names or numbers, as `iptables -m owner --gid-owner` accepts both.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OwnerGroups {
    /// Capture every group (include `*`, no exclude).
    All,
    /// Capture only these groups.
    Include(Vec<String>),
    /// Capture every group except these.
    Exclude(Vec<String>),
}

/// An IP address together with the text it was given as: Istio emits DNS servers verbatim
/// (`::127.0.0.53`), which Rust's formatter would print differently (`::7f00:35`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpText {
    pub addr: IpAddr,
    pub text: String,
}

/// The validated configuration of one pod's interception, shared by every backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub proxy_port: u16,
    pub inbound_capture_port: u16,
    pub inbound_tunnel_port: u16,
    pub proxy_uid: Vec<u32>,
    pub proxy_gid: Vec<u32>,
    pub inbound_interception_mode: InterceptionMode,
    pub inbound_ports_include: PortSelection,
    pub inbound_ports_exclude: Vec<u16>,
    pub exclude_interfaces: Vec<String>,
    pub outbound_ip_ranges_include: CidrSelection,
    pub outbound_ip_ranges_exclude: Vec<IpNet>,
    pub outbound_ports_include: Vec<u16>,
    pub outbound_ports_exclude: Vec<u16>,
    pub reroute_virtual_interfaces: Vec<String>,
    pub inbound_tproxy_mark: u32,
    pub inbound_tproxy_route_table: u32,
    pub redirect_dns: bool,
    pub capture_all_dns: bool,
    pub drop_invalid: bool,
    pub owner_groups: OwnerGroups,
    pub host_ipv4_loopback_cidr: Ipv4Net,
    pub enable_ipv6: bool,
    pub dns_servers_v4: Vec<IpText>,
    pub dns_servers_v6: Vec<IpText>,
    /// Ports only the proxy may bind (eBPF bind guard); empty disables the guard. Not an
    /// istio-iptables flag: Istio has no such guard.
    pub bind_guard_ports: Vec<u16>,
    /// eBPF path: app↔proxy loopback connections skip the TCP stack (sockops + sk_msg). Not
    /// an istio-iptables flag.
    pub accelerate: bool,
}

impl Default for Config {
    /// Istio's defaults (`config.DefaultConfig()` plus the default proxy uid/gid); no capture
    /// at all.
    fn default() -> Self {
        RawConfig::default().parse().expect("defaults are valid")
    }
}

/// The configuration as given (strings, Istio's spelling), before validation. This is also
/// what crosses the daemon's control socket: the daemon validates it exactly as `apply` does.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct RawConfig {
    pub proxy_port: String,
    pub inbound_capture_port: String,
    pub inbound_tunnel_port: String,
    pub proxy_uid: String,
    pub proxy_gid: String,
    pub inbound_interception_mode: String,
    pub inbound_ports_include: String,
    pub inbound_ports_exclude: String,
    pub exclude_interfaces: String,
    pub outbound_ip_ranges_include: String,
    pub outbound_ip_ranges_exclude: String,
    pub outbound_ports_include: String,
    pub outbound_ports_exclude: String,
    pub reroute_virtual_interfaces: String,
    pub inbound_tproxy_mark: String,
    pub inbound_tproxy_route_table: String,
    pub redirect_dns: bool,
    pub capture_all_dns: bool,
    pub drop_invalid: bool,
    pub owner_groups_include: String,
    pub owner_groups_exclude: String,
    pub host_ipv4_loopback_cidr: String,
    pub enable_ipv6: bool,
    /// Comma list of v4 and v6 servers (already resolved from resolv.conf when not given).
    pub dns_servers: String,
    pub bind_guard_ports: String,
    pub accelerate: bool,
}

impl Default for RawConfig {
    fn default() -> Self {
        Self {
            proxy_port: defaults::PROXY_PORT.to_string(),
            inbound_capture_port: defaults::INBOUND_CAPTURE_PORT.to_string(),
            inbound_tunnel_port: defaults::INBOUND_TUNNEL_PORT.to_string(),
            proxy_uid: defaults::PROXY_UID.to_string(),
            proxy_gid: String::new(),
            inbound_interception_mode: String::new(),
            inbound_ports_include: String::new(),
            inbound_ports_exclude: String::new(),
            exclude_interfaces: String::new(),
            outbound_ip_ranges_include: String::new(),
            outbound_ip_ranges_exclude: String::new(),
            outbound_ports_include: String::new(),
            outbound_ports_exclude: String::new(),
            reroute_virtual_interfaces: String::new(),
            inbound_tproxy_mark: defaults::TPROXY_MARK.to_string(),
            inbound_tproxy_route_table: defaults::TPROXY_ROUTE_TABLE.to_string(),
            redirect_dns: false,
            capture_all_dns: false,
            drop_invalid: false,
            owner_groups_include: "*".into(),
            owner_groups_exclude: String::new(),
            host_ipv4_loopback_cidr: defaults::IPV4_LOOPBACK_CIDR.into(),
            enable_ipv6: false,
            dns_servers: String::new(),
            bind_guard_ports: crate::plan::default_bind_guard_ports(),
            accelerate: false,
        }
    }
}

/// Istio's list split: on commas, items trimmed, empty items dropped.
pub fn split_list(s: &str) -> Vec<&str> {
    s.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect()
}

fn parse_port(flag: &'static str, s: &str, allow_zero: bool) -> Result<u16, ConfigError> {
    match s.trim().parse::<u16>() {
        Ok(0) if !allow_zero => Err(ConfigError::new(flag, s, "port must be 1-65535")),
        Ok(p) => Ok(p),
        Err(_) => Err(ConfigError::new(flag, s, "not a port number (1-65535)")),
    }
}

/// Limits on every list of a pod's config. The eBPF maps holding these lists are shared by
/// every pod on the node and sized for `limits::MAX_PODS` pods at these limits, so no pod's
/// lists can crowd another out (see `maps::capacity`). Istio has no limits; real configs use a
/// handful of entries per list.
pub mod limits {
    /// Ports per list (`-b`, `-d`, `-q`, `-o`, `--bind-guard-ports`).
    pub const MAX_PORTS: usize = 64;
    /// CIDRs per list (`-i`, `-x`).
    pub const MAX_CIDRS: usize = 1024;
    /// Interface names per list (`-c`, `-k`).
    pub const MAX_INTERFACES: usize = 16;
    /// Proxy uids or gids (`-u`, `-g`).
    pub const MAX_IDS: usize = 16;
    /// DNS servers (v4 and v6 together).
    pub const MAX_DNS_SERVERS: usize = 16;
    /// Owner groups, included or excluded (Istio caps the include list at 64: one rule's
    /// match list).
    pub const MAX_OWNER_GROUPS: usize = 64;
    /// Port entries of one pod in all lists together (`-b`/`-d` inbound, `-q`, `-o` and the
    /// guarded ports with the proxy's own three): what `maps::capacity::PORTS_PER_POD` holds.
    pub const MAX_PORT_ENTRIES: usize = crate::maps::capacity::PORTS_PER_POD as usize;
}

/// A list too long to quote in an error: its start only.
fn shorten(value: &str) -> String {
    let shown: String = value.chars().take(64).collect();
    if shown.len() < value.len() {
        format!("{shown}...")
    } else {
        shown
    }
}

/// Checks a list's length against its limit; the error names the flag, the limit and the count.
fn check_len<T>(
    flag: &'static str,
    value: &str,
    items: Vec<T>,
    limit: usize,
    what: &str,
) -> Result<Vec<T>, ConfigError> {
    if items.len() > limit {
        return Err(ConfigError::new(
            flag,
            shorten(value),
            format!(
                "too many {what}: {} given, the limit is {limit}",
                items.len()
            ),
        ));
    }
    Ok(items)
}

fn parse_ports(flag: &'static str, s: &str) -> Result<Vec<u16>, ConfigError> {
    let ports = parse_port_items(flag, s)?;
    check_len(flag, s, ports, limits::MAX_PORTS, "ports")
}

fn parse_port_items(flag: &'static str, s: &str) -> Result<Vec<u16>, ConfigError> {
    split_list(s)
        .into_iter()
        .map(|item| {
            parse_port(flag, item, false).map_err(|e| ConfigError {
                value: item.into(),
                ..e
            })
        })
        .collect()
}

fn parse_ids(flag: &'static str, s: &str) -> Result<Vec<u32>, ConfigError> {
    let ids = split_list(s)
        .into_iter()
        .map(|item| {
            item.parse::<u32>()
                .map_err(|_| ConfigError::new(flag, item, "not a numeric id (0-4294967295)"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if ids.is_empty() {
        return Err(ConfigError::new(flag, s, "at least one id is required"));
    }
    check_len(flag, s, ids, limits::MAX_IDS, "ids")
}

fn parse_cidr(flag: &'static str, item: &str) -> Result<IpNet, ConfigError> {
    // As istio-iptables (netip.ParsePrefix): a prefix length is required.
    item.parse::<IpNet>()
        .map_err(|_| ConfigError::new(flag, item, "not a CIDR (a.b.c.d/n or v6/n)"))
}

fn parse_cidrs(flag: &'static str, s: &str) -> Result<Vec<IpNet>, ConfigError> {
    let cidrs = split_list(s)
        .into_iter()
        .map(|item| parse_cidr(flag, item))
        .collect::<Result<Vec<_>, _>>()?;
    check_len(flag, s, cidrs, limits::MAX_CIDRS, "CIDRs")
}

fn parse_interfaces(flag: &'static str, s: &str) -> Result<Vec<String>, ConfigError> {
    split_list(s)
        .into_iter()
        .map(|item| match crate::ifname::interface_name_problem(item) {
            Some(why) => Err(ConfigError::new(
                flag,
                item,
                format!("not a valid interface name: {why}"),
            )),
            None => Ok(item.to_string()),
        })
        .collect()
}

fn parse_groups(flag: &'static str, s: &str) -> Result<Vec<String>, ConfigError> {
    let groups = split_list(s)
        .into_iter()
        .map(|item| {
            if item
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
            {
                Ok(item.to_string())
            } else {
                Err(ConfigError::new(flag, item, "not a group name or id"))
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    check_len(flag, s, groups, limits::MAX_OWNER_GROUPS, "groups")
}

impl RawConfig {
    /// Validates every field; the first error names its flag and value.
    pub fn parse(&self) -> Result<Config, ConfigError> {
        let proxy_port = parse_port("--envoy-port", &self.proxy_port, false)?;
        let inbound_capture_port =
            parse_port("--inbound-capture-port", &self.inbound_capture_port, false)?;
        let inbound_tunnel_port =
            parse_port("--inbound-tunnel-port", &self.inbound_tunnel_port, false)?;
        let proxy_uid = parse_ids("--proxy-uid", &self.proxy_uid)?;
        // As in Istio: the gid list defaults to the uid list.
        let proxy_gid =
            if split_list(&self.proxy_gid).is_empty() && self.proxy_gid.trim().is_empty() {
                proxy_uid.clone()
            } else {
                parse_ids("--proxy-gid", &self.proxy_gid)?
            };
        let inbound_interception_mode = match self.inbound_interception_mode.trim() {
            "" | "REDIRECT" => InterceptionMode::Redirect,
            "TPROXY" => InterceptionMode::Tproxy,
            other => {
                return Err(ConfigError::new(
                    "--istio-inbound-interception-mode",
                    other,
                    "must be REDIRECT or TPROXY",
                ))
            }
        };
        let inbound_ports_include = if self.inbound_ports_include.trim() == "*" {
            PortSelection::All
        } else {
            PortSelection::List(parse_ports(
                "--istio-inbound-ports",
                &self.inbound_ports_include,
            )?)
        };
        let inbound_ports_exclude =
            parse_ports("--istio-local-exclude-ports", &self.inbound_ports_exclude)?;
        let exclude_interfaces = check_len(
            "--istio-exclude-interfaces",
            &self.exclude_interfaces,
            parse_interfaces("--istio-exclude-interfaces", &self.exclude_interfaces)?,
            limits::MAX_INTERFACES,
            "interfaces",
        )?;
        let outbound_ip_ranges_include = if self.outbound_ip_ranges_include.trim() == "*" {
            CidrSelection::All
        } else {
            let items = split_list(&self.outbound_ip_ranges_include);
            if items.contains(&"*") {
                return Err(ConfigError::new(
                    "--istio-service-cidr",
                    &self.outbound_ip_ranges_include,
                    "'*' must stand alone",
                ));
            }
            CidrSelection::List(parse_cidrs(
                "--istio-service-cidr",
                &self.outbound_ip_ranges_include,
            )?)
        };
        if split_list(&self.outbound_ip_ranges_exclude).contains(&"*") {
            return Err(ConfigError::new(
                "--istio-service-exclude-cidr",
                &self.outbound_ip_ranges_exclude,
                "'*' is not allowed for excluded CIDRs",
            ));
        }
        let outbound_ip_ranges_exclude = parse_cidrs(
            "--istio-service-exclude-cidr",
            &self.outbound_ip_ranges_exclude,
        )?;
        let outbound_ports_include =
            parse_ports("--istio-outbound-ports", &self.outbound_ports_include)?;
        let outbound_ports_exclude = parse_ports(
            "--istio-local-outbound-ports-exclude",
            &self.outbound_ports_exclude,
        )?;
        let reroute_virtual_interfaces = check_len(
            "--kube-virt-interfaces",
            &self.reroute_virtual_interfaces,
            parse_interfaces("--kube-virt-interfaces", &self.reroute_virtual_interfaces)?,
            limits::MAX_INTERFACES,
            "interfaces",
        )?;
        let inbound_tproxy_mark = self
            .inbound_tproxy_mark
            .trim()
            .parse::<u32>()
            .map_err(|_| {
                ConfigError::new(
                    "--istio-inbound-tproxy-mark",
                    &self.inbound_tproxy_mark,
                    "not a numeric mark",
                )
            })?;
        let inbound_tproxy_route_table = self
            .inbound_tproxy_route_table
            .trim()
            .parse::<u32>()
            .map_err(|_| {
                ConfigError::new(
                    "--istio-inbound-tproxy-route-table",
                    &self.inbound_tproxy_route_table,
                    "not a numeric routing table id",
                )
            })?;
        let include = self.owner_groups_include.trim();
        let exclude = split_list(&self.owner_groups_exclude);
        let owner_groups = if !exclude.is_empty() {
            // Istio: an exclude list wins only when include is the wildcard.
            if include != "*" && !include.is_empty() {
                return Err(ConfigError::new(
                    "ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE",
                    &self.owner_groups_exclude,
                    "cannot be combined with ISTIO_OUTBOUND_OWNER_GROUPS other than '*'",
                ));
            }
            OwnerGroups::Exclude(parse_groups(
                "ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE",
                &self.owner_groups_exclude,
            )?)
        } else if include == "*" {
            OwnerGroups::All
        } else {
            let groups = parse_groups("ISTIO_OUTBOUND_OWNER_GROUPS", include)?;
            if groups.contains(&"*".to_string()) {
                return Err(ConfigError::new(
                    "ISTIO_OUTBOUND_OWNER_GROUPS",
                    include,
                    "'*' must stand alone",
                ));
            }
            OwnerGroups::Include(groups)
        };
        let host_ipv4_loopback_cidr = self
            .host_ipv4_loopback_cidr
            .trim()
            .parse::<Ipv4Net>()
            .ok()
            .filter(|n| {
                Ipv4Net::new(Ipv4Addr::new(127, 0, 0, 0), 8)
                    .unwrap()
                    .contains(n)
            })
            .ok_or_else(|| {
                ConfigError::new(
                    "ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR",
                    &self.host_ipv4_loopback_cidr,
                    "must be an IPv4 CIDR inside 127.0.0.0/8",
                )
            })?;
        let mut dns_servers_v4 = Vec::new();
        let mut dns_servers_v6 = Vec::new();
        for item in split_list(&self.dns_servers) {
            let addr = item
                .parse::<IpAddr>()
                .map_err(|_| ConfigError::new("--dns-servers", item, "not an IP address"))?;
            let entry = IpText {
                addr,
                text: item.to_string(),
            };
            match addr {
                IpAddr::V4(_) => dns_servers_v4.push(entry),
                IpAddr::V6(_) => dns_servers_v6.push(entry),
            }
        }
        let dns_count = dns_servers_v4.len() + dns_servers_v6.len();
        if dns_count > limits::MAX_DNS_SERVERS {
            return Err(ConfigError::new(
                "--dns-servers",
                shorten(&self.dns_servers),
                format!(
                    "too many DNS servers: {dns_count} given, the limit is {}",
                    limits::MAX_DNS_SERVERS
                ),
            ));
        }
        let mut bind_guard_ports = parse_ports("--bind-guard-ports", &self.bind_guard_ports)?;
        if !bind_guard_ports.is_empty() {
            bind_guard_ports.extend([proxy_port, inbound_capture_port, inbound_tunnel_port]);
            bind_guard_ports.sort_unstable();
            bind_guard_ports.dedup();
        }
        let inbound_port_entries = match &inbound_ports_include {
            PortSelection::All => inbound_ports_exclude.len(),
            PortSelection::List(l) => l.len(),
        };
        let port_entries = inbound_port_entries
            + outbound_ports_include.len()
            + outbound_ports_exclude.len()
            + bind_guard_ports.len();
        if port_entries > limits::MAX_PORT_ENTRIES {
            return Err(ConfigError::new(
                "ports",
                format!(
                    "-b/-d {inbound_port_entries}, -q {}, -o {}, --bind-guard-ports {}",
                    outbound_ports_include.len(),
                    outbound_ports_exclude.len(),
                    bind_guard_ports.len()
                ),
                format!(
                    "too many ports in total: {port_entries}, the limit for one pod is {}",
                    limits::MAX_PORT_ENTRIES
                ),
            ));
        }
        Ok(Config {
            bind_guard_ports,
            accelerate: self.accelerate,
            proxy_port,
            inbound_capture_port,
            inbound_tunnel_port,
            proxy_uid,
            proxy_gid,
            inbound_interception_mode,
            inbound_ports_include,
            inbound_ports_exclude,
            exclude_interfaces,
            outbound_ip_ranges_include,
            outbound_ip_ranges_exclude,
            outbound_ports_include,
            outbound_ports_exclude,
            reroute_virtual_interfaces,
            inbound_tproxy_mark,
            inbound_tproxy_route_table,
            redirect_dns: self.redirect_dns,
            capture_all_dns: self.capture_all_dns,
            drop_invalid: self.drop_invalid,
            owner_groups,
            host_ipv4_loopback_cidr,
            enable_ipv6: self.enable_ipv6,
            dns_servers_v4,
            dns_servers_v6,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_istio() {
        let c = Config::default();
        assert_eq!(c.proxy_port, 15001);
        assert_eq!(c.inbound_capture_port, 15006);
        assert_eq!(c.inbound_tunnel_port, 15008);
        assert_eq!(c.proxy_uid, vec![1337]);
        assert_eq!(c.proxy_gid, vec![1337]);
        assert_eq!(c.inbound_ports_include, PortSelection::List(vec![]));
        assert_eq!(c.outbound_ip_ranges_include, CidrSelection::List(vec![]));
        assert_eq!(c.owner_groups, OwnerGroups::All);
        assert_eq!(c.host_ipv4_loopback_cidr.to_string(), "127.0.0.1/32");
    }

    #[test]
    fn empty_list_items_are_dropped() {
        let raw = RawConfig {
            inbound_ports_exclude: "6000,,7000,".into(),
            ..Default::default()
        };
        assert_eq!(raw.parse().unwrap().inbound_ports_exclude, vec![6000, 7000]);
    }

    fn list(n: usize, item: impl Fn(usize) -> String) -> String {
        (0..n).map(item).collect::<Vec<_>>().join(",")
    }

    #[test]
    fn every_list_has_a_limit_named_in_its_error() {
        let port = |i: usize| (1000 + i).to_string();
        let cidr = |i: usize| format!("10.{}.{}.0/24", i / 256, i % 256);
        let ifname = |i: usize| format!("eth{i}");
        let id = |i: usize| (2000 + i).to_string();
        let ip = |i: usize| format!("10.0.0.{}", i + 1);
        let cases: Vec<(&str, usize, RawConfig)> = vec![
            (
                "--istio-inbound-ports",
                limits::MAX_PORTS,
                RawConfig {
                    inbound_ports_include: list(limits::MAX_PORTS + 1, port),
                    ..Default::default()
                },
            ),
            (
                "--istio-local-exclude-ports",
                limits::MAX_PORTS,
                RawConfig {
                    inbound_ports_exclude: list(limits::MAX_PORTS + 1, port),
                    ..Default::default()
                },
            ),
            (
                "--istio-outbound-ports",
                limits::MAX_PORTS,
                RawConfig {
                    outbound_ports_include: list(limits::MAX_PORTS + 1, port),
                    ..Default::default()
                },
            ),
            (
                "--istio-local-outbound-ports-exclude",
                limits::MAX_PORTS,
                RawConfig {
                    outbound_ports_exclude: list(limits::MAX_PORTS + 1, port),
                    ..Default::default()
                },
            ),
            (
                "--bind-guard-ports",
                limits::MAX_PORTS,
                RawConfig {
                    bind_guard_ports: list(limits::MAX_PORTS + 1, port),
                    ..Default::default()
                },
            ),
            (
                "--istio-service-cidr",
                limits::MAX_CIDRS,
                RawConfig {
                    outbound_ip_ranges_include: list(limits::MAX_CIDRS + 1, cidr),
                    ..Default::default()
                },
            ),
            (
                "--istio-service-exclude-cidr",
                limits::MAX_CIDRS,
                RawConfig {
                    outbound_ip_ranges_exclude: list(limits::MAX_CIDRS + 1, cidr),
                    ..Default::default()
                },
            ),
            (
                "--istio-exclude-interfaces",
                limits::MAX_INTERFACES,
                RawConfig {
                    exclude_interfaces: list(limits::MAX_INTERFACES + 1, ifname),
                    ..Default::default()
                },
            ),
            (
                "--kube-virt-interfaces",
                limits::MAX_INTERFACES,
                RawConfig {
                    reroute_virtual_interfaces: list(limits::MAX_INTERFACES + 1, ifname),
                    ..Default::default()
                },
            ),
            (
                "--proxy-uid",
                limits::MAX_IDS,
                RawConfig {
                    proxy_uid: list(limits::MAX_IDS + 1, id),
                    ..Default::default()
                },
            ),
            (
                "--proxy-gid",
                limits::MAX_IDS,
                RawConfig {
                    proxy_gid: list(limits::MAX_IDS + 1, id),
                    ..Default::default()
                },
            ),
            (
                "ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE",
                limits::MAX_OWNER_GROUPS,
                RawConfig {
                    owner_groups_exclude: list(limits::MAX_OWNER_GROUPS + 1, id),
                    ..Default::default()
                },
            ),
            (
                "--dns-servers",
                limits::MAX_DNS_SERVERS,
                RawConfig {
                    dns_servers: list(limits::MAX_DNS_SERVERS + 1, ip),
                    ..Default::default()
                },
            ),
        ];
        for (flag, limit, raw) in cases {
            let e = raw.parse().expect_err(flag);
            assert_eq!(e.flag, flag);
            assert!(
                e.reason.contains(&format!("the limit is {limit}")),
                "{flag}: {e}"
            );
            assert!(
                e.value.len() <= 67,
                "{flag}: the error quotes the whole list"
            );
        }
    }

    #[test]
    fn lists_at_their_limits_are_accepted() {
        let port = |i: usize| (1000 + i).to_string();
        let raw = RawConfig {
            outbound_ports_exclude: list(limits::MAX_PORTS, port),
            outbound_ip_ranges_include: list(limits::MAX_CIDRS, |i| {
                format!("10.{}.{}.0/24", i / 256, i % 256)
            }),
            outbound_ip_ranges_exclude: list(limits::MAX_CIDRS, |i| {
                format!("11.{}.{}.0/24", i / 256, i % 256)
            }),
            proxy_uid: list(limits::MAX_IDS, |i| i.to_string()),
            owner_groups_exclude: list(limits::MAX_OWNER_GROUPS, |i| i.to_string()),
            dns_servers: list(limits::MAX_DNS_SERVERS, |i| format!("10.0.0.{}", i + 1)),
            ..Default::default()
        };
        let c = raw.parse().unwrap();
        assert_eq!(c.outbound_ports_exclude.len(), limits::MAX_PORTS);
    }

    #[test]
    fn ports_of_all_lists_together_are_limited() {
        // Each list within its own limit, together over the pod's port entries.
        let ports = |base: usize| list(limits::MAX_PORTS, |i| (base + i).to_string());
        let raw = RawConfig {
            inbound_ports_include: ports(1000),
            outbound_ports_include: ports(2000),
            outbound_ports_exclude: ports(3000),
            ..Default::default()
        };
        let e = raw.parse().unwrap_err();
        assert_eq!(e.flag, "ports");
        assert!(
            e.reason.contains(&format!(
                "the limit for one pod is {}",
                limits::MAX_PORT_ENTRIES
            )),
            "{e}"
        );
    }

    #[test]
    fn dns_servers_keep_their_text() {
        let raw = RawConfig {
            dns_servers: "127.0.0.53,::127.0.0.53".into(),
            ..Default::default()
        };
        let c = raw.parse().unwrap();
        assert_eq!(c.dns_servers_v4[0].text, "127.0.0.53");
        assert_eq!(c.dns_servers_v6[0].text, "::127.0.0.53");
    }
}
