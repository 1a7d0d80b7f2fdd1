//! From the typed `Config` (through its derived `plan::Plan`) to the decision model's inputs:
//! the scalar `PodPolicy` and an in-memory `PodTables` (what `explain` and the tests use; the
//! eBPF loader writes the same sets into maps).

use std::collections::HashSet;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::config::{CidrSelection, Config, OwnerGroups, PortSelection};
use crate::decision::{self, flags, Addr, PodPolicy, PodTables, MAX_IDS};
use crate::plan::{self, Plan};

impl From<IpAddr> for Addr {
    fn from(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(a) => Addr::v4(u32::from(a)),
            IpAddr::V6(a) => Addr::v6(a.octets()),
        }
    }
}

impl From<Addr> for IpAddr {
    fn from(a: Addr) -> Self {
        match a.v4_host() {
            Some(h) => IpAddr::V4(h.into()),
            None => IpAddr::V6(a.0.into()),
        }
    }
}

fn ids(list: &[u32]) -> (u32, [u32; MAX_IDS]) {
    let mut out = [0; MAX_IDS];
    for (o, v) in out.iter_mut().zip(list) {
        *o = *v;
    }
    (list.len().min(MAX_IDS) as u32, out)
}

/// Why the eBPF path cannot honour this config, if it cannot (the caller then falls back to
/// iptables/nftables or refuses, but never diverges silently).
pub fn ebpf_unsupported(cfg: &Config) -> Option<String> {
    if !cfg.exclude_interfaces.is_empty() {
        return Some(format!(
            "--istio-exclude-interfaces={} needs per-interface matching, which connect hooks cannot see",
            cfg.exclude_interfaces.join(",")
        ));
    }
    if !cfg.reroute_virtual_interfaces.is_empty() {
        return Some(format!(
            "--kube-virt-interfaces={} reroutes forwarded traffic, which cgroup hooks do not see",
            cfg.reroute_virtual_interfaces.join(",")
        ));
    }
    if cfg.drop_invalid {
        return Some(
            "--drop-invalid matches conntrack state, which the eBPF path does not use".into(),
        );
    }
    if cfg.proxy_uid.len() > MAX_IDS || cfg.proxy_gid.len() > MAX_IDS {
        return Some(format!("more than {MAX_IDS} proxy uids or gids"));
    }
    None
}

/// The scalar policy of one pod.
pub fn pod_policy(cfg: &Config, pod_id: u32) -> PodPolicy {
    let plan = Plan::new(cfg);
    let mut f = 0;
    if plan.ipv6 {
        f |= flags::IPV6;
    }
    if plan.dns {
        f |= flags::DNS;
        if cfg.capture_all_dns {
            f |= flags::DNS_CAPTURE_ALL;
        }
    }
    if cfg.outbound_ip_ranges_include == CidrSelection::All {
        f |= flags::INCLUDE_ALL;
    }
    if plan.include_has_loopback {
        f |= flags::LOOPBACK_INCLUDED;
    }
    match &cfg.inbound_ports_include {
        PortSelection::All => f |= flags::INBOUND_ALL,
        PortSelection::List(l) if !l.is_empty() => f |= flags::INBOUND_LIST,
        PortSelection::List(_) => {}
    }
    if !cfg.bind_guard_ports.is_empty() {
        f |= flags::BIND_GUARD;
    }
    if cfg.accelerate {
        f |= flags::ACCELERATE;
    }
    match cfg.owner_groups {
        OwnerGroups::All => {}
        OwnerGroups::Include(_) => f |= flags::GROUPS_INCLUDE,
        OwnerGroups::Exclude(_) => f |= flags::GROUPS_EXCLUDE,
    }
    let (n_uids, uids) = ids(&cfg.proxy_uid);
    let (n_gids, gids) = ids(&cfg.proxy_gid);
    PodPolicy {
        pod_id,
        flags: f,
        proxy_port: cfg.proxy_port,
        inbound_capture_port: cfg.inbound_capture_port,
        inbound_tunnel_port: cfg.inbound_tunnel_port,
        dns_port: plan::DNS_PROXY_PORT,
        loopback_v4_addr: u32::from(cfg.host_ipv4_loopback_cidr.addr()),
        loopback_v4_prefix: u32::from(cfg.host_ipv4_loopback_cidr.prefix_len()),
        n_uids,
        uids,
        n_gids,
        gids,
    }
}

/// Resolves owner-group entries (names or numbers, read as iptables reads them) to gids;
/// unknown names are an error.
pub fn resolve_groups(
    groups: &[String],
    lookup: impl Fn(&str) -> Option<u32>,
) -> Result<Vec<u32>, String> {
    groups
        .iter()
        .map(|g| {
            crate::parse::group_number(g)
                .ok()
                .flatten()
                .or_else(|| lookup(g))
                .ok_or_else(|| g.clone())
        })
        .collect()
}

/// The pod's own addresses for `POD_SRC` (see `decision::redirect_source`): per family, the
/// first of `local` (the kernel's order: the interface's primary address first) that is
/// neither loopback, link-local, multicast nor unspecified — the pod IP.
pub fn pod_src(netns: u64, local: &[IpAddr]) -> decision::PodSrc {
    let usable = |ip: &IpAddr| {
        !ip.is_loopback()
            && !ip.is_unspecified()
            && !ip.is_multicast()
            && match ip {
                IpAddr::V4(a) => !a.is_link_local(),
                IpAddr::V6(a) => !a.is_unicast_link_local() && a.to_ipv4_mapped().is_none(),
            }
    };
    let first = |v4: bool| {
        local
            .iter()
            .find(|ip| ip.is_ipv4() == v4 && usable(ip))
            .map_or([0; 16], |ip| Addr::from(*ip).0)
    };
    decision::PodSrc {
        netns,
        v4: first(true),
        v6: first(false),
    }
}

/// In-memory `PodTables` for one pod.
#[derive(Debug, Clone, Default)]
pub struct MemTables {
    pub ports_excluded: HashSet<u16>,
    pub ports_included: HashSet<u16>,
    pub cidrs_excluded: Vec<IpNet>,
    pub cidrs_included: Vec<IpNet>,
    pub local: HashSet<IpAddr>,
    pub dns_servers: HashSet<IpAddr>,
    pub groups: HashSet<u32>,
    /// `-d` ports with `-b '*'`, or the `-b` list.
    pub inbound_ports: HashSet<u16>,
    pub guarded_ports: HashSet<u16>,
}

impl MemTables {
    /// `local` are the pod's own addresses; `groups` the resolved owner-group gids.
    pub fn new(cfg: &Config, local: &[IpAddr], groups: &[u32]) -> Self {
        let plan = Plan::new(cfg);
        // Only the families that get rules (IPv6 only when on), each as its rules list it.
        let nets = |of: &dyn Fn(plan::Family) -> Vec<IpNet>| -> Vec<IpNet> {
            plan.families().iter().flat_map(|f| of(*f)).collect()
        };
        Self {
            ports_excluded: cfg.outbound_ports_exclude.iter().copied().collect(),
            ports_included: cfg.outbound_ports_include.iter().copied().collect(),
            cidrs_excluded: nets(&|f| plan.excluded_nets(f)),
            cidrs_included: nets(&|f| plan.included_nets(f).unwrap_or_default()),
            local: local.iter().copied().collect(),
            dns_servers: cfg
                .dns_servers_v4
                .iter()
                .chain(&cfg.dns_servers_v6)
                .map(|s| s.addr)
                .collect(),
            groups: groups.iter().copied().collect(),
            inbound_ports: match &cfg.inbound_ports_include {
                // Istio only honours -d together with -b '*'.
                PortSelection::All => cfg.inbound_ports_exclude.iter().copied().collect(),
                PortSelection::List(l) => l.iter().copied().collect(),
            },
            guarded_ports: cfg.bind_guard_ports.iter().copied().collect(),
        }
    }
}

fn contains(nets: &[IpNet], a: Addr) -> bool {
    let ip = IpAddr::from(a);
    nets.iter().any(|n| n.contains(&ip))
}

impl PodTables for MemTables {
    fn port_excluded(&self, port: u16) -> bool {
        self.ports_excluded.contains(&port)
    }
    fn port_included(&self, port: u16) -> bool {
        self.ports_included.contains(&port)
    }
    fn cidr_excluded(&self, dst: Addr) -> bool {
        contains(&self.cidrs_excluded, dst)
    }
    fn cidr_included(&self, dst: Addr) -> bool {
        contains(&self.cidrs_included, dst)
    }
    fn is_local(&self, dst: Addr) -> bool {
        self.local.contains(&IpAddr::from(dst))
    }
    fn is_dns_server(&self, dst: Addr) -> bool {
        self.dns_servers.contains(&IpAddr::from(dst))
    }
    fn group_listed(&self, gid: u32) -> bool {
        self.groups.contains(&gid)
    }
    fn inbound_port_listed(&self, port: u16) -> bool {
        self.inbound_ports.contains(&port)
    }
    fn proxy_port_guarded(&self, port: u16) -> bool {
        self.guarded_ports.contains(&port)
    }
}

/// The decision for one connection, computed in userspace from the config.
pub fn explain(cfg: &Config, tables: &MemTables, conn: &decision::Conn) -> decision::Verdict {
    decision::decide(&pod_policy(cfg, 0), tables, conn)
}

/// The inbound decision for a connection to `local:port` from `remote`, in userspace.
pub fn explain_inbound(
    cfg: &Config,
    tables: &MemTables,
    local: IpAddr,
    port: u16,
    remote: IpAddr,
) -> decision::Verdict {
    decision::decide_inbound(
        &pod_policy(cfg, 0),
        tables,
        local.into(),
        port,
        remote.into(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RawConfig;
    use crate::decision::{Conn, Proto, Reason, Verdict};

    fn conn(dst: &str, port: u16, uid: u32) -> Conn {
        Conn {
            proto: Proto::Tcp,
            dst: dst.parse::<IpAddr>().unwrap().into(),
            dport: port,
            src: None,
            uid,
            gid: uid,
        }
    }

    fn sidecar() -> Config {
        RawConfig {
            outbound_ip_ranges_include: "*".into(),
            outbound_ip_ranges_exclude: "10.96.0.0/12".into(),
            outbound_ports_exclude: "5555".into(),
            ..Default::default()
        }
        .parse()
        .unwrap()
    }

    fn decide(cfg: &Config, c: Conn) -> Verdict {
        let local: Vec<IpAddr> = vec!["10.1.0.5".parse().unwrap()];
        explain(cfg, &MemTables::new(cfg, &local, &[]), &c)
    }

    #[test]
    fn app_outbound_is_redirected() {
        let v = decide(&sidecar(), conn("10.200.0.2", 80, 1000));
        assert_eq!(
            v,
            Verdict::Redirect {
                port: 15001,
                reason: Reason::IncludeAll
            }
        );
    }

    #[test]
    fn proxy_uid_passes() {
        assert_eq!(
            decide(&sidecar(), conn("10.200.0.2", 80, 1337)),
            Verdict::Pass(Reason::ProxyUid)
        );
    }

    #[test]
    fn proxy_to_own_pod_ip_goes_inbound() {
        let v = decide(&sidecar(), conn("10.1.0.5", 8080, 1337));
        assert_eq!(
            v,
            Verdict::Redirect {
                port: 15006,
                reason: Reason::ProxyUidToLocal
            }
        );
        // ...but not to the tunnel port, and not to the loopback CIDR.
        assert_eq!(
            decide(&sidecar(), conn("10.1.0.5", 15008, 1337)),
            Verdict::Pass(Reason::ProxyUid)
        );
        assert_eq!(
            decide(&sidecar(), conn("127.0.0.1", 80, 1337)),
            Verdict::Pass(Reason::ProxyUid)
        );
        // 127.0.0.6 is over lo and outside 127.0.0.1/32.
        assert_eq!(
            decide(&sidecar(), conn("127.0.0.6", 80, 1337)),
            Verdict::Redirect {
                port: 15006,
                reason: Reason::ProxyUidToLocal
            }
        );
    }

    #[test]
    fn app_over_lo_and_exclusions_pass() {
        let c = sidecar();
        assert_eq!(
            decide(&c, conn("127.0.0.1", 80, 1000)),
            Verdict::Pass(Reason::AppOverLoopbackUid)
        );
        assert_eq!(
            decide(&c, conn("10.1.0.5", 80, 1000)),
            Verdict::Pass(Reason::AppOverLoopbackUid)
        );
        assert_eq!(
            decide(&c, conn("10.200.0.2", 5555, 1000)),
            Verdict::Pass(Reason::ExcludedPort)
        );
        assert_eq!(
            decide(&c, conn("10.96.0.10", 80, 1000)),
            Verdict::Pass(Reason::ExcludedCidr)
        );
    }

    #[test]
    fn ipv6_off_leaves_v6_alone_but_mapped_v4_is_decided() {
        let c = sidecar();
        assert_eq!(
            decide(&c, conn("fd00::2", 80, 1000)),
            Verdict::Pass(Reason::Ipv6Disabled)
        );
        assert_eq!(
            decide(&c, conn("::ffff:10.200.0.2", 80, 1000)),
            Verdict::Redirect {
                port: 15001,
                reason: Reason::IncludeAll
            }
        );
    }

    #[test]
    fn empty_include_captures_nothing_but_ports() {
        let c: Config = RawConfig {
            outbound_ports_include: "9000".into(),
            ..Default::default()
        }
        .parse()
        .unwrap();
        assert_eq!(
            decide(&c, conn("10.200.0.2", 80, 1000)),
            Verdict::Pass(Reason::NoMatch)
        );
        assert_eq!(
            decide(&c, conn("10.200.0.2", 9000, 1000)),
            Verdict::Redirect {
                port: 15001,
                reason: Reason::IncludedPort
            }
        );
    }

    /// An include CIDR that is loopback only in Go's sense (`::ffff:127.0.0.1`) drops the
    /// app-over-lo exemption as iptables and nftables do: the app's call to its own pod IP
    /// reaches the include list.
    #[test]
    fn v4_mapped_loopback_include_captures_app_over_lo() {
        let c: Config = RawConfig {
            outbound_ip_ranges_include: "::ffff:127.0.0.1/128,10.1.0.0/16".into(),
            ..Default::default()
        }
        .parse()
        .unwrap();
        assert!(pod_policy(&c, 0).has(flags::LOOPBACK_INCLUDED));
        assert_eq!(
            decide(&c, conn("10.1.0.5", 80, 1000)),
            Verdict::Redirect {
                port: 15001,
                reason: Reason::IncludedCidr
            }
        );
        // A v4-mapped include CIDR is an IPv6 rule: it never matches an IPv4 destination.
        let mapped: Config = RawConfig {
            outbound_ip_ranges_include: "::ffff:10.0.0.0/104".into(),
            enable_ipv6: true,
            ..Default::default()
        }
        .parse()
        .unwrap();
        assert!(!pod_policy(&mapped, 0).has(flags::LOOPBACK_INCLUDED));
        assert_eq!(
            decide(&mapped, conn("::ffff:10.200.0.2", 80, 1000)),
            Verdict::Pass(Reason::NoMatch)
        );
    }

    #[test]
    fn multiple_uids_follow_rule_order() {
        // With uids 3,4 the "lo && uid != 3 → RETURN" rule fires for uid 4 before its own
        // inbound rule: Istio's order, reproduced.
        let c: Config = RawConfig {
            proxy_uid: "3,4".into(),
            proxy_gid: "3,4".into(),
            ..Default::default()
        }
        .parse()
        .unwrap();
        assert_eq!(
            decide(&c, conn("10.1.0.5", 80, 4)),
            Verdict::Pass(Reason::AppOverLoopbackUid)
        );
        assert_eq!(
            decide(&c, conn("10.1.0.5", 80, 3)),
            Verdict::Redirect {
                port: 15006,
                reason: Reason::ProxyUidToLocal
            }
        );
    }
}

#[cfg(test)]
mod source_tests {
    use super::*;
    use crate::config::RawConfig;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_pod_ip_is_the_first_usable_address_of_each_family() {
        let local = [
            ip("fe80::1"),
            ip("169.254.1.1"),
            ip("10.0.0.5"),
            ip("10.0.0.6"),
            ip("fd00::5"),
        ];
        let s = pod_src(7, &local);
        assert_eq!(s.netns, 7);
        assert_eq!(IpAddr::from(Addr(s.v4)), ip("10.0.0.5"));
        assert_eq!(IpAddr::from(Addr(s.v6)), ip("fd00::5"));
        let none = pod_src(7, &[ip("127.0.0.1"), ip("fe80::1")]);
        assert!(Addr(none.v4).is_unspecified() && Addr(none.v6).is_unspecified());
    }

    #[test]
    fn a_redirect_leaves_from_where_the_kernel_would_send_it() {
        let cfg = RawConfig::default().parse().unwrap();
        let local = [ip("10.0.0.5"), ip("10.0.0.6"), ip("fd00::5")];
        let t = MemTables::new(&cfg, &local, &[]);
        let pod = pod_src(7, &local);
        let route = |dst: &str| {
            let c = decision::Conn {
                proto: decision::Proto::Tcp,
                dst: ip(dst).into(),
                dport: 80,
                src: None,
                uid: 1000,
                gid: 1000,
            };
            decision::Route::of(&t, &c)
        };
        let src = |dst: &str, bound: Option<&str>| {
            decision::redirect_source(&pod, route(dst), bound.map(|b| ip(b).into()))
                .map(IpAddr::from)
        };
        // Off the pod: its address of the destination's family (IPv4-mapped is IPv4).
        assert_eq!(src("10.96.0.10", None), Some(ip("10.0.0.5")));
        assert_eq!(src("2001:db8::1", None), Some(ip("fd00::5")));
        assert_eq!(src("::ffff:10.96.0.10", None), Some(ip("10.0.0.5")));
        // One of its own addresses: that address (the local route's preferred source).
        assert_eq!(src("10.0.0.6", None), Some(ip("10.0.0.6")));
        // Loopback, or a source the app bound: the kernel's choice stands.
        assert_eq!(src("127.0.0.1", None), None);
        assert_eq!(src("::1", None), None);
        assert_eq!(src("10.96.0.10", Some("127.0.0.6")), None);
        // No address of that family: nothing to bind.
        let v4_only = pod_src(7, &[ip("10.0.0.5")]);
        let none = decision::redirect_source(&v4_only, route("2001:db8::1"), None);
        assert_eq!(none, None);
    }
}

#[cfg(test)]
mod inbound_tests {
    use super::*;
    use crate::config::RawConfig;
    use crate::decision::{Reason, Verdict};

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn inbound(raw: RawConfig, port: u16, remote: &str) -> Verdict {
        let cfg = raw.parse().unwrap();
        let local = [ip("10.1.0.5")];
        explain_inbound(
            &cfg,
            &MemTables::new(&cfg, &local, &[]),
            ip("10.1.0.5"),
            port,
            ip(remote),
        )
    }

    #[test]
    fn wildcard_captures_all_but_excluded_and_tunnel() {
        let raw = || RawConfig {
            inbound_ports_include: "*".into(),
            inbound_ports_exclude: "15090,22".into(),
            ..Default::default()
        };
        assert_eq!(
            inbound(raw(), 8080, "10.2.0.1"),
            Verdict::Redirect {
                port: 15006,
                reason: Reason::InboundCaptured
            }
        );
        assert_eq!(
            inbound(raw(), 22, "10.2.0.1"),
            Verdict::Pass(Reason::ExcludedInboundPort)
        );
        assert_eq!(
            inbound(raw(), 15008, "10.2.0.1"),
            Verdict::Pass(Reason::TunnelPort)
        );
        // The proxy's own connections to the app: from 127.0.0.6 or from the pod IP.
        assert_eq!(
            inbound(raw(), 8080, "127.0.0.6"),
            Verdict::Pass(Reason::LocalPeer)
        );
        assert_eq!(
            inbound(raw(), 8080, "10.1.0.5"),
            Verdict::Pass(Reason::LocalPeer)
        );
    }

    /// ISTIO_INBOUND captures every local address: one the pod got after registration (a
    /// second IP, a second interface, IPv6 link-local) is captured like the registered one;
    /// a loopback destination never is.
    #[test]
    fn any_non_loopback_local_address_is_captured() {
        let cfg = RawConfig {
            inbound_ports_include: "*".into(),
            enable_ipv6: true,
            ..Default::default()
        }
        .parse()
        .unwrap();
        let tables = MemTables::new(&cfg, &[ip("10.1.0.5")], &[]);
        let at =
            |local: &str, remote: &str| explain_inbound(&cfg, &tables, ip(local), 8080, ip(remote));
        let captured = Verdict::Redirect {
            port: 15006,
            reason: Reason::InboundCaptured,
        };
        for local in ["10.1.0.9", "192.168.7.1", "fe80::1", "fd00::9"] {
            assert_eq!(at(local, "10.2.0.1"), captured, "{local}");
        }
        for local in ["127.0.0.1", "127.1.2.3", "::1", "::ffff:127.0.0.1"] {
            assert_eq!(
                at(local, "10.2.0.1"),
                Verdict::Pass(Reason::LocalPeer),
                "{local}"
            );
        }
    }

    #[test]
    fn list_and_empty() {
        let list = RawConfig {
            inbound_ports_include: "8080,9090".into(),
            inbound_ports_exclude: "8080".into(),
            ..Default::default()
        };
        // -d is ignored unless -b is '*' (Istio).
        assert_eq!(
            inbound(list.clone(), 8080, "10.2.0.1"),
            Verdict::Redirect {
                port: 15006,
                reason: Reason::InboundCaptured
            }
        );
        assert_eq!(
            inbound(list, 7070, "10.2.0.1"),
            Verdict::Pass(Reason::NotIncludedInboundPort)
        );
        assert_eq!(
            inbound(RawConfig::default(), 8080, "10.2.0.1"),
            Verdict::Pass(Reason::NoInboundCapture)
        );
    }

    #[test]
    fn bind_guard() {
        let cfg: Config = RawConfig {
            proxy_port: "15101".into(),
            ..Default::default()
        }
        .parse()
        .unwrap();
        let t = MemTables::new(&cfg, &[], &[]);
        let p = pod_policy(&cfg, 1);
        assert!(!decision::bind_allowed(&p, &t, 15001, 1000, 1000));
        assert!(
            !decision::bind_allowed(&p, &t, 15101, 1000, 1000),
            "-p joins the guarded ports"
        );
        assert!(decision::bind_allowed(&p, &t, 15001, 1337, 1337));
        assert!(decision::bind_allowed(&p, &t, 8080, 1000, 1000));
        let off: Config = RawConfig {
            bind_guard_ports: String::new(),
            ..Default::default()
        }
        .parse()
        .unwrap();
        assert!(decision::bind_allowed(
            &pod_policy(&off, 1),
            &MemTables::new(&off, &[], &[]),
            15001,
            1000,
            1000
        ));
    }

    #[test]
    fn raw_sockets_only_for_the_proxy_and_v6_only_with_ipv6_rules() {
        let v6_on: Config = RawConfig {
            enable_ipv6: true,
            ..Default::default()
        }
        .parse()
        .unwrap();
        let on = pod_policy(&v6_on, 1);
        let off = pod_policy(&RawConfig::default().parse().unwrap(), 2);
        for p in [&on, &off] {
            assert!(!decision::raw_socket_allowed(p, false, 1000, 1000));
            assert!(
                !decision::raw_socket_allowed(p, false, 0, 0),
                "root is an app too"
            );
            assert!(decision::raw_socket_allowed(p, false, 1337, 1000));
            assert!(
                decision::raw_socket_allowed(p, false, 1000, 1337),
                "proxy gid"
            );
        }
        assert!(!decision::raw_socket_allowed(&on, true, 1000, 1000));
        // istio-iptables writes no ip6tables rules then: IPv6 raw packets pass it untouched.
        assert!(decision::raw_socket_allowed(&off, true, 1000, 1000));
    }

    #[test]
    fn the_raw_socket_counter_follows_every_pass_counter() {
        use crate::maps::stat;
        let last = Reason::ALL.iter().map(|r| *r as u32).max().unwrap();
        assert!(stat::IN_PASS + last < stat::RAW_DENIED);
        const { assert!(stat::RAW_DENIED < stat::OUT_QUOTA_REFUSED) };
    }
}
