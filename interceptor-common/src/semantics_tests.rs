//! The decision model against Istio's rules for destinations the kernel rewrites or routes over
//! `lo` on its own: the unspecified address and the pod's own link-local addresses.

use std::net::IpAddr;

use crate::config::{Config, RawConfig};
use crate::decision::{kernel_dst, Addr, Conn, Proto, Reason, Verdict};
use crate::policy::{explain, MemTables};

fn cfg(dns: bool) -> Config {
    RawConfig {
        outbound_ip_ranges_include: "*".into(),
        enable_ipv6: true,
        redirect_dns: dns,
        capture_all_dns: dns,
        ..Default::default()
    }
    .parse()
    .unwrap()
}

fn ip(s: &str) -> Addr {
    s.parse::<IpAddr>().unwrap().into()
}

fn decide(
    cfg: &Config,
    proto: Proto,
    dst: &str,
    port: u16,
    src: Option<&str>,
    uid: u32,
) -> Verdict {
    // The pod's own addresses, its fe80:: one included (as registration and explain read them).
    let local: Vec<IpAddr> = ["10.1.0.5", "fd00::5", "fe80::5"]
        .iter()
        .map(|a| a.parse().unwrap())
        .collect();
    let c = Conn {
        proto,
        dst: ip(dst),
        dport: port,
        src: src.map(ip),
        uid,
        gid: uid,
    };
    explain(cfg, &MemTables::new(cfg, &local, &[]), &c)
}

#[test]
fn kernel_dst_follows_the_kernel() {
    assert_eq!(kernel_dst(ip("0.0.0.0"), None), ip("127.0.0.1"));
    assert_eq!(
        kernel_dst(ip("0.0.0.0"), Some(ip("10.1.0.5"))),
        ip("10.1.0.5")
    );
    assert_eq!(kernel_dst(ip("::ffff:0.0.0.0"), None), ip("127.0.0.1"));
    assert_eq!(kernel_dst(ip("::"), None), ip("::1"));
    // tcp_v6_connect: `::` is ::1 whatever the source, v4-mapped loopback on a v4-mapped one.
    assert_eq!(kernel_dst(ip("::"), Some(ip("fd00::5"))), ip("::1"));
    assert_eq!(
        kernel_dst(ip("::"), Some(ip("::ffff:10.1.0.5"))),
        ip("127.0.0.1")
    );
    assert_eq!(kernel_dst(ip("10.2.0.1"), None), ip("10.2.0.1"));
}

#[test]
fn unspecified_destination_is_over_lo() {
    let c = cfg(false);
    // iptables: `-o lo -m owner ! --uid-owner 1337 -j RETURN`.
    for dst in ["0.0.0.0", "::", "::ffff:0.0.0.0"] {
        assert_eq!(
            decide(&c, Proto::Tcp, dst, 9080, None, 1000),
            Verdict::Pass(Reason::AppOverLoopbackUid),
            "{dst}"
        );
        // The proxy to 127.0.0.1 / ::1 (the loopback CIDR): its own RETURN.
        assert_eq!(
            decide(&c, Proto::Tcp, dst, 9080, None, 1337),
            Verdict::Pass(Reason::ProxyUid),
            "{dst}"
        );
    }
    // Bound to the pod IP, 0.0.0.0 is the pod IP: the proxy's own call goes inbound.
    assert_eq!(
        decide(&c, Proto::Tcp, "0.0.0.0", 9080, Some("10.1.0.5"), 1337),
        Verdict::Redirect {
            port: 15006,
            reason: Reason::ProxyUidToLocal
        }
    );
    // Bound to 127.0.0.6: Envoy's passthrough.
    assert_eq!(
        decide(&c, Proto::Tcp, "0.0.0.0", 9080, Some("127.0.0.6"), 1337),
        Verdict::Pass(Reason::PassthroughSource)
    );
}

#[test]
fn unspecified_dns_is_captured_as_loopback_dns() {
    // DNS on: the app-over-lo RETURN is TCP-not-53 only, so UDP to 0.0.0.0:53 reaches the
    // capture-all DNS rule, as 127.0.0.1:53 would.
    let c = cfg(true);
    assert_eq!(
        decide(&c, Proto::Udp, "0.0.0.0", 53, None, 1000),
        decide(&c, Proto::Udp, "127.0.0.1", 53, None, 1000)
    );
    assert_eq!(
        decide(&c, Proto::Udp, "::", 53, None, 1000),
        decide(&c, Proto::Udp, "::1", 53, None, 1000)
    );
}

#[test]
fn own_link_local_is_local() {
    let c = cfg(false);
    assert_eq!(
        decide(&c, Proto::Tcp, "fe80::5", 9080, None, 1000),
        Verdict::Pass(Reason::AppOverLoopbackUid)
    );
    assert_eq!(
        decide(&c, Proto::Tcp, "fe80::5", 9080, None, 1337),
        Verdict::Redirect {
            port: 15006,
            reason: Reason::ProxyUidToLocal
        }
    );
    // Someone else's link-local address leaves over the interface: captured.
    assert_eq!(
        decide(&c, Proto::Tcp, "fe80::9", 9080, None, 1000),
        Verdict::Redirect {
            port: 15001,
            reason: Reason::IncludeAll
        }
    );
}
