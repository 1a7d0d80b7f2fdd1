//! The netfilter plan: every switch and constant istio-iptables derives from a config, derived
//! here once. The iptables and nftables emitters and the eBPF policy (`policy`) all read it, so
//! "is DNS capture on", "is an include CIDR loopback" and the fixed ports and addresses cannot
//! differ between backends.
//!
//! Each constant is spelled once: Istio's defaults for the configurable values and the DNS proxy's
//! port are in [`crate::defaults`] (the flags, the pod annotations and `RawConfig::default` read
//! them too), the values only the rules use (1338) here. The two addresses the
//! eBPF programs compare against as well (127.0.0.6 / ::6) and port 53 are `decision`'s, which
//! is `no_std`; this module gives them their netfilter form.

use std::net::{IpAddr, Ipv6Addr};

use ipnet::{IpNet, Ipv6Net};

use crate::config::{CidrSelection, Config, InterceptionMode, IpText};
use crate::decision;

pub use crate::defaults::DNS_PROXY_PORT;

/// The port DNS capture matches.
pub const DNS_PORT: u16 = decision::DNS_PORT;
/// The mark the proxy's own loopback traffic gets in TPROXY mode (a constant in Istio, not
/// derived from the configurable TPROXY mark).
pub const OUTBOUND_MARK: u32 = 1338;

/// An address family: one restore document and one `iptables`/`ip6tables` binary each in
/// iptables, `ip`/`ip6` matches in nftables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    /// The family a CIDR belongs to. An IPv4-mapped IPv6 CIDR (`::ffff:10.0.0.0/104`) is IPv6,
    /// as in Istio (`netip.Addr.Is4` is false for it): it goes to the IPv6 rules only.
    pub fn of(net: &IpNet) -> Family {
        match net {
            IpNet::V4(_) => Family::V4,
            IpNet::V6(_) => Family::V6,
        }
    }

    /// The prefix length of a host route.
    pub fn host_prefix(self) -> u8 {
        match self {
            Family::V4 => 32,
            Family::V6 => 128,
        }
    }
}

/// Which proxy identity an owner match names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    Uid,
    Gid,
}

/// Go's `net.IP.IsLoopback` / `netip.Addr.IsLoopback`, which Istio asks of an include CIDR's
/// address: 127.0.0.0/8, ::1, and also an IPv4-mapped 127.x (`::ffff:127.0.0.1`), which
/// Rust's `Ipv6Addr::is_loopback` does not count.
pub fn is_loopback(addr: IpAddr) -> bool {
    match addr {
        IpAddr::V4(a) => a.is_loopback(),
        IpAddr::V6(a) => a.is_loopback() || a.to_ipv4_mapped().is_some_and(|m| m.is_loopback()),
    }
}

/// A link-local unicast address: 169.254.0.0/16 or fe80::/10.
pub fn is_link_local(addr: IpAddr) -> bool {
    match addr {
        IpAddr::V4(a) => a.is_link_local(),
        IpAddr::V6(a) => a.segments()[0] & 0xffc0 == 0xfe80,
    }
}

/// Istio's IPv6 switch from a pod's addresses in interface order (`getLocalIP(dualStack)` in
/// tools/common/config): only addresses that are neither loopback nor link-local count
/// (IPv4-mapped ones as IPv4). Without dual-stack the first such address decides; with it,
/// any IPv6 one turns IPv6 rules on.
pub fn ipv6_enabled(addrs: &[IpAddr], dual_stack: bool) -> bool {
    let link_local_multicast = |a: &IpAddr| matches!(a, IpAddr::V6(a) if a.segments()[0] == 0xff02);
    let mut counted = addrs
        .iter()
        .map(IpAddr::to_canonical)
        .filter(|a| !is_loopback(*a) && !is_link_local(*a) && !link_local_multicast(a));
    if dual_stack {
        counted.any(|a| a.is_ipv6())
    } else {
        counted.next().is_some_and(|a| a.is_ipv6())
    }
}

/// This family's part of a CIDR list, in the list's order (Istio's `SeparateV4V6`).
pub fn family_nets(nets: &[IpNet], family: Family) -> Vec<IpNet> {
    nets.iter()
        .filter(|n| Family::of(n) == family)
        .copied()
        .collect()
}

/// The switches and values derived from one config.
#[derive(Debug, Clone, Copy)]
pub struct Plan<'a> {
    pub cfg: &'a Config,
    /// DNS capture is on: asked for, and there is something to capture (capture-all, or a
    /// resolv.conf server); Istio silently disables it otherwise.
    pub dns: bool,
    /// An included outbound CIDR (of either family) is loopback in Go's sense
    /// ([`is_loopback`]): Istio then omits the "app over lo → RETURN" rules, so app-to-app
    /// traffic over lo can be captured.
    pub include_has_loopback: bool,
    /// Inbound capture by TPROXY (mangle) rather than REDIRECT (nat).
    pub tproxy: bool,
    /// Some inbound port is captured (`-b` is not empty).
    pub inbound: bool,
    /// IPv6 rules are emitted (and the eBPF path decides IPv6 destinations).
    pub ipv6: bool,
}

impl<'a> Plan<'a> {
    pub fn new(cfg: &'a Config) -> Self {
        Self {
            cfg,
            dns: cfg.redirect_dns
                && (cfg.capture_all_dns
                    || !cfg.dns_servers_v4.is_empty()
                    || !cfg.dns_servers_v6.is_empty()),
            include_has_loopback: match &cfg.outbound_ip_ranges_include {
                CidrSelection::All => false,
                CidrSelection::List(nets) => nets.iter().any(|n| is_loopback(n.addr())),
            },
            tproxy: cfg.inbound_interception_mode == InterceptionMode::Tproxy,
            inbound: !cfg.inbound_ports_include.is_empty(),
            ipv6: cfg.enable_ipv6,
        }
    }

    /// The families that get rules: IPv4 always, IPv6 when enabled.
    pub fn families(&self) -> &'static [Family] {
        if self.ipv6 {
            &[Family::V4, Family::V6]
        } else {
            &[Family::V4]
        }
    }

    /// The host loopback range app-to-app traffic uses: `ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR`
    /// (as given, host bits kept), or `::1/128`.
    pub fn loopback(&self, family: Family) -> IpNet {
        match family {
            Family::V4 => IpNet::V4(self.cfg.host_ipv4_loopback_cidr),
            Family::V6 => host_net(Ipv6Addr::LOCALHOST.into()),
        }
    }

    /// The source address Envoy's inbound passthrough binds to when calling the app
    /// (127.0.0.6/32, ::6/128).
    pub fn passthrough(&self, family: Family) -> IpNet {
        match family {
            Family::V4 => host_net(decision::PASSTHROUGH_V4.into()),
            Family::V6 => host_net(decision::PASSTHROUGH_V6.into()),
        }
    }

    /// This family's excluded outbound CIDRs (`-x`), in order.
    pub fn excluded_nets(&self, family: Family) -> Vec<IpNet> {
        family_nets(&self.cfg.outbound_ip_ranges_exclude, family)
    }

    /// This family's included outbound CIDRs (`-i`), in order; `None` for `*`.
    pub fn included_nets(&self, family: Family) -> Option<Vec<IpNet>> {
        match &self.cfg.outbound_ip_ranges_include {
            CidrSelection::All => None,
            CidrSelection::List(nets) => Some(family_nets(nets, family)),
        }
    }

    /// This family's resolv.conf DNS servers as host routes, spelled as the user gave them
    /// (Istio emits `::127.0.0.53/128`, which Rust would print differently).
    pub fn dns_servers(&self, family: Family) -> Vec<String> {
        let servers: &[IpText] = match family {
            Family::V4 => &self.cfg.dns_servers_v4,
            Family::V6 => &self.cfg.dns_servers_v6,
        };
        servers
            .iter()
            .map(|s| format!("{}/{}", s.text, family.host_prefix()))
            .collect()
    }

    /// Whether any DNS server is known (of either family).
    pub fn has_dns_servers(&self) -> bool {
        !self.cfg.dns_servers_v4.is_empty() || !self.cfg.dns_servers_v6.is_empty()
    }

    /// The proxy's identities in Istio's rule order: every uid, then every gid.
    pub fn proxy_owners(&self) -> impl Iterator<Item = (Owner, u32)> + 'a {
        let cfg = self.cfg;
        let uids = cfg.proxy_uid.iter().map(|u| (Owner::Uid, *u));
        uids.chain(cfg.proxy_gid.iter().map(|g| (Owner::Gid, *g)))
    }

    /// The ports the proxy's self-call rule (the proxy calling its own pod over lo) leaves
    /// alone: the tunnel port, and port 53 too for uids when DNS capture is on. Istio excludes
    /// DNS for uids only; its gid rules keep the plain tunnel-port exclusion.
    pub fn self_call_excluded_ports(&self, owner: Owner) -> Vec<u16> {
        let tunnel = self.cfg.inbound_tunnel_port;
        if self.dns && owner == Owner::Uid {
            vec![DNS_PORT, tunnel]
        } else {
            vec![tunnel]
        }
    }
}

/// A host route for `addr` (/32 or /128).
fn host_net(addr: IpAddr) -> IpNet {
    match addr {
        IpAddr::V4(a) => IpNet::V4(ipnet::Ipv4Net::new(a, 32).expect("/32 is valid")),
        IpAddr::V6(a) => IpNet::V6(Ipv6Net::new(a, 128).expect("/128 is valid")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RawConfig;

    #[test]
    fn ipv6_switch_as_istio_detects_it() {
        let a = |s: &str| s.parse::<IpAddr>().unwrap();
        let v4_first = [a("127.0.0.1"), a("fe80::1"), a("10.0.0.5"), a("fd00::5")];
        assert!(!ipv6_enabled(&v4_first, false));
        assert!(ipv6_enabled(&v4_first, true));
        let v6_first = [a("::1"), a("fd00::5"), a("10.0.0.5")];
        assert!(ipv6_enabled(&v6_first, false));
        assert!(ipv6_enabled(&v6_first, true));
        // A v4-mapped address counts as IPv4; link-local and loopback ones do not count.
        assert!(!ipv6_enabled(&[a("::ffff:10.0.0.5"), a("fd00::1")], false));
        assert!(!ipv6_enabled(&[a("fe80::1"), a("169.254.0.1")], true));
        assert!(!ipv6_enabled(&[], true));
    }

    fn cfg(f: impl FnOnce(&mut RawConfig)) -> Config {
        let mut raw = RawConfig::default();
        f(&mut raw);
        raw.parse().expect("valid test config")
    }

    #[test]
    fn loopback_follows_go_including_v4_mapped() {
        for a in [
            "127.0.0.1",
            "127.1.2.3",
            "::1",
            "::ffff:127.0.0.1",
            "::ffff:127.9.9.9",
        ] {
            assert!(is_loopback(a.parse().unwrap()), "{a}");
        }
        for a in [
            "126.0.0.0",
            "10.0.0.1",
            "::",
            "::ffff:10.0.0.1",
            "::127.0.0.1",
            "::2",
        ] {
            assert!(!is_loopback(a.parse().unwrap()), "{a}");
        }
    }

    #[test]
    fn include_has_loopback_looks_at_every_family() {
        let with = |i: &str| {
            Plan::new(&cfg(|c| c.outbound_ip_ranges_include = i.into())).include_has_loopback
        };
        assert!(with("127.1.2.3/32"));
        assert!(with("10.0.0.0/8,::1/128"));
        assert!(with("::ffff:127.0.0.1/128"));
        assert!(with("::ffff:127.0.0.0/104"));
        // The CIDR's own address decides, as in Go: 126/7 covers 127/8 but is not loopback.
        assert!(!with("126.0.0.0/7"));
        assert!(!with("::ffff:10.0.0.0/104"));
        assert!(!with("*"));
        // IPv6 off does not change it: Istio decides before it splits by family.
        assert!(
            Plan::new(&cfg(|c| {
                c.outbound_ip_ranges_include = "::ffff:127.0.0.1/128".into();
                c.enable_ipv6 = false;
            }))
            .include_has_loopback
        );
    }

    #[test]
    fn dns_is_on_only_with_something_to_capture() {
        assert!(!Plan::new(&cfg(|c| c.redirect_dns = true)).dns);
        assert!(
            Plan::new(&cfg(|c| {
                c.redirect_dns = true;
                c.capture_all_dns = true;
            }))
            .dns
        );
        assert!(
            Plan::new(&cfg(|c| {
                c.redirect_dns = true;
                c.dns_servers = "::127.0.0.53".into();
            }))
            .dns
        );
        assert!(!Plan::new(&cfg(|c| c.dns_servers = "10.0.0.1".into())).dns);
    }

    #[test]
    fn per_family_values() {
        let c = cfg(|c| {
            c.host_ipv4_loopback_cidr = "127.0.0.1/8".into();
            c.outbound_ip_ranges_include = "10.0.0.0/8,fd00::/8,::ffff:10.0.0.0/104".into();
            c.dns_servers = "127.0.0.53,::127.0.0.53".into();
            c.enable_ipv6 = true;
        });
        let p = Plan::new(&c);
        assert_eq!(p.families(), [Family::V4, Family::V6]);
        assert_eq!(p.loopback(Family::V4).to_string(), "127.0.0.1/8");
        assert_eq!(p.loopback(Family::V6).to_string(), "::1/128");
        assert_eq!(p.passthrough(Family::V4).to_string(), "127.0.0.6/32");
        assert_eq!(p.passthrough(Family::V6).to_string(), "::6/128");
        let inc = |f| -> Vec<String> {
            p.included_nets(f)
                .unwrap()
                .iter()
                .map(ToString::to_string)
                .collect()
        };
        assert_eq!(inc(Family::V4), ["10.0.0.0/8"]);
        assert_eq!(inc(Family::V6), ["fd00::/8", "::ffff:10.0.0.0/104"]);
        assert_eq!(p.dns_servers(Family::V6), ["::127.0.0.53/128"]);
        assert_eq!(Plan::new(&Config::default()).families(), [Family::V4]);
    }

    #[test]
    fn owners_are_uids_then_gids_and_only_uids_skip_dns() {
        let c = cfg(|c| {
            c.proxy_uid = "3,4".into();
            c.proxy_gid = "1".into();
            c.redirect_dns = true;
            c.capture_all_dns = true;
        });
        let p = Plan::new(&c);
        let owners: Vec<_> = p.proxy_owners().collect();
        assert_eq!(owners, [(Owner::Uid, 3), (Owner::Uid, 4), (Owner::Gid, 1)]);
        assert_eq!(p.self_call_excluded_ports(Owner::Uid), [53, 15008]);
        assert_eq!(p.self_call_excluded_ports(Owner::Gid), [15008]);
    }
}
