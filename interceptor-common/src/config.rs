//! The typed interception config: istio-iptables' flags and env parsed and validated once.
//!
//! `RawConfig` holds the values as the user gave them (flag, else env, else Istio's default);
//! `RawConfig::parse` turns them into `Config` or an error naming the flag and the bad value.

use std::net::{IpAddr, Ipv4Addr};

use ipnet::{IpNet, Ipv4Net};

use crate::defaults;
use crate::parse::{
    check_len, parse_cidrs, parse_groups, parse_ids, parse_interfaces, parse_port, parse_ports,
    shorten,
};
pub use crate::parse::{limits, split_list, ConfigError};

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
            bind_guard_ports: defaults::default_bind_guard_ports(),
            accelerate: false,
        }
    }
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
