//! The typed interception config: istio-iptables' flags and env parsed and validated once.
//!
//! `RawConfig` holds the values as the user gave them (flag, else env, else Istio's default);
//! `RawConfig::parse` turns them into `Config` or an error naming the flag and the bad value.

use std::net::{IpAddr, Ipv4Addr};

use ipnet::{IpNet, Ipv4Net};

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

/// The proxy's ports guarded by default: outbound, inbound, tunnel, DNS, Prometheus, health,
/// agent (plus whatever `-p`/`-z`/`-e` say).
pub const DEFAULT_BIND_GUARD_PORTS: &str = "15001,15006,15008,15053,15090,15021,15020";

impl Default for Config {
    /// Istio's defaults (`config.DefaultConfig()` plus uid/gid 1337); no capture at all.
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
            proxy_port: "15001".into(),
            inbound_capture_port: "15006".into(),
            inbound_tunnel_port: "15008".into(),
            proxy_uid: "1337".into(),
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
            inbound_tproxy_mark: "1337".into(),
            inbound_tproxy_route_table: "133".into(),
            redirect_dns: false,
            capture_all_dns: false,
            drop_invalid: false,
            owner_groups_include: "*".into(),
            owner_groups_exclude: String::new(),
            host_ipv4_loopback_cidr: "127.0.0.1/32".into(),
            enable_ipv6: false,
            dns_servers: String::new(),
            bind_guard_ports: DEFAULT_BIND_GUARD_PORTS.into(),
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

fn parse_ports(flag: &'static str, s: &str) -> Result<Vec<u16>, ConfigError> {
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
    Ok(ids)
}

fn parse_cidr(flag: &'static str, item: &str) -> Result<IpNet, ConfigError> {
    // As istio-iptables (netip.ParsePrefix): a prefix length is required.
    item.parse::<IpNet>()
        .map_err(|_| ConfigError::new(flag, item, "not a CIDR (a.b.c.d/n or v6/n)"))
}

fn parse_cidrs(flag: &'static str, s: &str) -> Result<Vec<IpNet>, ConfigError> {
    split_list(s)
        .into_iter()
        .map(|item| parse_cidr(flag, item))
        .collect()
}

fn parse_interfaces(flag: &'static str, s: &str) -> Result<Vec<String>, ConfigError> {
    split_list(s)
        .into_iter()
        .map(|item| {
            // IFNAMSIZ is 16 including the NUL; no '/' or whitespace in a Linux interface name.
            if item.len() > 15 || item.contains('/') || item.chars().any(char::is_whitespace) {
                Err(ConfigError::new(flag, item, "not a valid interface name"))
            } else {
                Ok(item.to_string())
            }
        })
        .collect()
}

fn parse_groups(flag: &'static str, s: &str) -> Result<Vec<String>, ConfigError> {
    split_list(s)
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
        .collect()
}

/// Istio caps included owner groups because they become one rule's match list.
const MAX_OWNER_GROUPS_INCLUDE: usize = 64;

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
        let exclude_interfaces =
            parse_interfaces("--istio-exclude-interfaces", &self.exclude_interfaces)?;
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
        let reroute_virtual_interfaces =
            parse_interfaces("--kube-virt-interfaces", &self.reroute_virtual_interfaces)?;
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
            if groups.len() > MAX_OWNER_GROUPS_INCLUDE {
                return Err(ConfigError::new(
                    "ISTIO_OUTBOUND_OWNER_GROUPS",
                    include,
                    format!(
                        "at most {MAX_OWNER_GROUPS_INCLUDE} groups, got {}",
                        groups.len()
                    ),
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
        let mut bind_guard_ports = parse_ports("--bind-guard-ports", &self.bind_guard_ports)?;
        if !bind_guard_ports.is_empty() {
            bind_guard_ports.extend([proxy_port, inbound_capture_port, inbound_tunnel_port]);
            bind_guard_ports.sort_unstable();
            bind_guard_ports.dedup();
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
