//! Which entry of a pod's config made the decision model's rule fire: `decision::decide` says
//! which rule of Istio's chain decided (a `Reason`); this names the flag (or env variable) and
//! the value it matched, for `explain` to present ("10.1.2.3 is in 10.0.0.0/8 of
//! -x/--istio-service-exclude-cidr").

use std::net::IpAddr;

use crate::config::{CidrSelection, Config, OwnerGroups};
use crate::decision::{kernel_dst, Conn, Reason, MAX_IDS};
use crate::plan::Plan;

/// The flags (and env-only variables) an entry can come from, as istio-iptables names them.
pub mod flag {
    pub const PROXY_UID: &str = "-u/--proxy-uid";
    pub const PROXY_GID: &str = "-g/--proxy-gid";
    pub const EXCLUDE_CIDR: &str = "-x/--istio-service-exclude-cidr";
    pub const INCLUDE_CIDR: &str = "-i/--istio-service-cidr";
    pub const INCLUDE_PORTS: &str = "-q/--istio-outbound-ports";
    pub const EXCLUDE_PORTS: &str = "-o/--istio-local-outbound-ports-exclude";
    pub const EXCLUDE_INTERFACES: &str = "-c/--istio-exclude-interfaces";
    pub const OWNER_GROUPS: &str = "ISTIO_OUTBOUND_OWNER_GROUPS";
    pub const OWNER_GROUPS_EXCLUDE: &str = "ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE";
    pub const LOOPBACK_CIDR: &str = "ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR";
    pub const CAPTURE_ALL_DNS: &str = "--capture-all-dns";
    pub const DNS_SERVERS: &str = "--dns-servers";
    pub const IPV6: &str = "--ipv6";
}

/// One config entry: the flag it was given by and the value that matched.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Entry {
    /// Short and long flag (`-x/--istio-service-exclude-cidr`), or the env variable for
    /// env-only settings.
    pub flag: &'static str,
    /// The value as configured: a CIDR, a port, an id, a group, an address.
    pub value: String,
}

fn entry(flag: &'static str, value: impl ToString) -> Option<Entry> {
    Some(Entry {
        flag,
        value: value.to_string(),
    })
}

/// The entry of `cfg` that made rule `reason` fire for `conn`; `None` for rules no entry
/// decides (the passthrough source, TCP-only redirects, no rule matching).
pub fn deciding_entry(cfg: &Config, conn: &Conn, reason: Reason) -> Option<Entry> {
    let dst = IpAddr::from(kernel_dst(conn.dst, conn.src));
    let plan = Plan::new(cfg);
    let nets_containing = |nets: Vec<ipnet::IpNet>| nets.into_iter().find(|n| n.contains(&dst));
    // The first listed id the rule compared against (the decision model walks at most MAX_IDS).
    let first = |ids: &[u32], pick: &dyn Fn(u32) -> bool| {
        ids.iter().take(MAX_IDS).copied().find(|i| pick(*i))
    };
    match reason {
        Reason::ExcludedPort => entry(flag::EXCLUDE_PORTS, conn.dport),
        Reason::IncludedPort => entry(flag::INCLUDE_PORTS, conn.dport),
        Reason::ProxyUidToLocal | Reason::ProxyUid => entry(flag::PROXY_UID, conn.uid),
        Reason::ProxyGidToLocal | Reason::ProxyGid => entry(flag::PROXY_GID, conn.gid),
        // "-o lo -m owner ! --uid-owner U -j RETURN" fires at the first U that is not ours.
        Reason::AppOverLoopbackUid => {
            entry(flag::PROXY_UID, first(&cfg.proxy_uid, &|u| u != conn.uid)?)
        }
        Reason::AppOverLoopbackGid => {
            entry(flag::PROXY_GID, first(&cfg.proxy_gid, &|g| g != conn.gid)?)
        }
        Reason::OwnerGroup => match &cfg.owner_groups {
            OwnerGroups::All => None,
            OwnerGroups::Include(groups) => entry(flag::OWNER_GROUPS, groups.join(",")),
            OwnerGroups::Exclude(groups) => {
                let number = |g: &String| crate::parse::group_number(g).ok().flatten();
                let value = groups
                    .iter()
                    .find(|g| number(g) == Some(conn.gid))
                    .cloned()
                    .unwrap_or_else(|| groups.join(","));
                entry(flag::OWNER_GROUPS_EXCLUDE, value)
            }
        },
        Reason::Dns if cfg.capture_all_dns => entry(flag::CAPTURE_ALL_DNS, "true"),
        Reason::Dns => cfg
            .dns_servers_v4
            .iter()
            .chain(&cfg.dns_servers_v6)
            .find(|s| s.addr == dst)
            .and_then(|s| entry(flag::DNS_SERVERS, &s.text)),
        Reason::LoopbackCidr if dst.is_ipv4() => {
            entry(flag::LOOPBACK_CIDR, cfg.host_ipv4_loopback_cidr)
        }
        Reason::ExcludedCidr => {
            let nets = plan
                .families()
                .iter()
                .flat_map(|f| plan.excluded_nets(*f))
                .collect();
            entry(flag::EXCLUDE_CIDR, nets_containing(nets)?)
        }
        Reason::IncludeAll => entry(flag::INCLUDE_CIDR, "*"),
        Reason::IncludedCidr => match &cfg.outbound_ip_ranges_include {
            CidrSelection::All => entry(flag::INCLUDE_CIDR, "*"),
            CidrSelection::List(_) => {
                let nets = plan
                    .families()
                    .iter()
                    .flat_map(|f| plan.included_nets(*f).unwrap_or_default())
                    .collect();
                entry(flag::INCLUDE_CIDR, nets_containing(nets)?)
            }
        },
        Reason::Ipv6Disabled => entry(flag::IPV6, "false"),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RawConfig;
    use crate::decision::Proto;
    use crate::policy::{explain, MemTables};

    fn conn(dst: &str, dport: u16, uid: u32, gid: u32) -> Conn {
        Conn {
            proto: Proto::Tcp,
            dst: dst.parse::<IpAddr>().unwrap().into(),
            dport,
            src: None,
            uid,
            gid,
        }
    }

    /// The decision model decides; the entry names the flag and value behind its rule.
    fn decided(raw: RawConfig, c: Conn) -> (Reason, Option<(&'static str, String)>) {
        let cfg = raw.parse().unwrap();
        let local: Vec<IpAddr> = vec!["10.1.0.5".parse().unwrap()];
        let r = explain(&cfg, &MemTables::new(&cfg, &local, &[]), &c).reason();
        (r, deciding_entry(&cfg, &c, r).map(|e| (e.flag, e.value)))
    }

    fn sidecar() -> RawConfig {
        RawConfig {
            outbound_ip_ranges_include: "*".into(),
            outbound_ip_ranges_exclude: "192.168.0.0/16,10.0.0.0/8".into(),
            outbound_ports_exclude: "5555".into(),
            outbound_ports_include: "9000".into(),
            proxy_uid: "1337".into(),
            proxy_gid: "1337".into(),
            ..Default::default()
        }
    }

    #[test]
    fn names_the_matching_value_of_the_flag() {
        let cases = [
            (
                conn("10.1.2.3", 80, 1000, 1000),
                Reason::ExcludedCidr,
                Some((flag::EXCLUDE_CIDR, "10.0.0.0/8")),
            ),
            (
                conn("10.1.2.3", 5555, 1000, 1000),
                Reason::ExcludedPort,
                Some((flag::EXCLUDE_PORTS, "5555")),
            ),
            (
                conn("172.16.0.1", 9000, 1000, 1000),
                Reason::IncludedPort,
                Some((flag::INCLUDE_PORTS, "9000")),
            ),
            (
                conn("172.16.0.1", 80, 1337, 1337),
                Reason::ProxyUid,
                Some((flag::PROXY_UID, "1337")),
            ),
            (
                conn("172.16.0.1", 80, 1000, 1337),
                Reason::ProxyGid,
                Some((flag::PROXY_GID, "1337")),
            ),
            (
                conn("127.0.0.1", 80, 1000, 1000),
                Reason::AppOverLoopbackUid,
                Some((flag::PROXY_UID, "1337")),
            ),
            (
                conn("172.16.0.1", 80, 1000, 1000),
                Reason::IncludeAll,
                Some((flag::INCLUDE_CIDR, "*")),
            ),
        ];
        for (c, reason, want) in cases {
            let (r, e) = decided(sidecar(), c);
            assert_eq!(r, reason, "{c:?}");
            assert_eq!(e, want.map(|(f, v)| (f, v.to_string())), "{c:?}");
        }
        let list = RawConfig {
            outbound_ip_ranges_include: "10.0.0.0/8,172.16.0.0/12".into(),
            ..Default::default()
        };
        assert_eq!(
            decided(list, conn("172.16.0.1", 80, 1000, 1000)),
            (
                Reason::IncludedCidr,
                Some((flag::INCLUDE_CIDR, "172.16.0.0/12".to_string()))
            )
        );
        let none = RawConfig::default();
        assert_eq!(
            decided(none, conn("172.16.0.1", 80, 1000, 1000)),
            (Reason::NoMatch, None)
        );
    }
}
