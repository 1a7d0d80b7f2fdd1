//! `explain` in words: the verdict's reason with the config entry that decided it.

use std::net::IpAddr;

use interceptor_common::config::Config;
use interceptor_common::decision::{kernel_dst, Conn, Reason, Verdict};
use interceptor_common::entry::Entry;
use interceptor_common::plan::DNS_PROXY_PORT;

/// Why the verdict, naming the entry (`10.1.2.3 is in 10.0.0.0/8 of -x/--istio-…`).
pub fn why(cfg: &Config, conn: &Conn, v: Verdict, e: Option<&Entry>) -> String {
    let dst = IpAddr::from(kernel_dst(conn.dst, conn.src));
    let (uid, gid, port) = (conn.uid, conn.gid, conn.dport);
    let redirect = match v {
        Verdict::Redirect { port: p, .. } => {
            format!("redirected to port {p}, {}", port_words(cfg, p))
        }
        Verdict::Pass(_) => String::new(),
    };
    let Some(e) = e else {
        return match v.reason() {
            Reason::NoMatch => format!(
                "no rule captures it: {dst} is in no CIDR of -i/--istio-service-cidr and port \
                 {port} is not in -q/--istio-outbound-ports; the connection leaves untouched"
            ),
            Reason::PassthroughSource => format!(
                "it comes from {} over lo: the proxy's inbound passthrough to the app, never \
                 captured",
                conn.src
                    .map(IpAddr::from)
                    .map_or("127.0.0.6".into(), |s| s.to_string())
            ),
            Reason::NotTcp => "only TCP is redirected (and DNS when captured): the connection \
                               leaves untouched"
                .into(),
            Reason::LoopbackCidr => format!("{dst} is loopback (::1/128): not captured"),
            r => reason_words(r).into(),
        };
    };
    let (flag, value) = (e.flag, &e.value);
    match v.reason() {
        Reason::ExcludedPort => format!("port {port} is in {flag}: never captured"),
        Reason::IncludedPort => format!("port {port} is in {flag}: always captured, {redirect}"),
        Reason::ProxyUid => {
            format!("uid {uid} is the proxy's ({flag}): its own traffic is never captured")
        }
        Reason::ProxyGid => {
            format!("gid {gid} is the proxy's ({flag}): its own traffic is never captured")
        }
        Reason::ProxyUidToLocal => format!(
            "uid {uid} is the proxy's ({flag}) and {dst} is the pod's own address: the proxy \
             calling its own pod goes through inbound handling, {redirect}"
        ),
        Reason::ProxyGidToLocal => format!(
            "gid {gid} is the proxy's ({flag}) and {dst} is the pod's own address: the proxy \
             calling its own pod goes through inbound handling, {redirect}"
        ),
        Reason::AppOverLoopbackUid => format!(
            "uid {uid} is not the proxy's ({value} of {flag}) and {dst} is reached over lo: an \
             app talking over lo is not captured"
        ),
        Reason::AppOverLoopbackGid => format!(
            "gid {gid} is not the proxy's ({value} of {flag}) and {dst} is reached over lo: an \
             app talking over lo is not captured"
        ),
        Reason::OwnerGroup if flag.ends_with("_EXCLUDE") => {
            format!("gid {gid} is in {flag} ({value}): its traffic is not captured")
        }
        Reason::OwnerGroup => {
            format!("gid {gid} is not in {flag} ({value}): its traffic is not captured")
        }
        Reason::Dns if value == "true" => format!("DNS, and {flag} is on: {redirect}"),
        Reason::Dns => format!(
            "DNS to {value}, a DNS server of the pod ({flag}, default its resolv.conf): {redirect}"
        ),
        Reason::LoopbackCidr => format!("{dst} is in {value} of {flag}: not captured"),
        Reason::ExcludedCidr => format!("{dst} is in {value} of {flag}: never captured"),
        Reason::IncludeAll => {
            format!("{flag} is '*': every outbound destination is captured, {redirect}")
        }
        Reason::IncludedCidr => format!("{dst} is in {value} of {flag}: {redirect}"),
        Reason::Ipv6Disabled => format!(
            "IPv6 rules are off for this pod ({flag} false, or detected from its addresses): \
             IPv6 connections are not captured"
        ),
        r => format!("{} ({value} of {flag})", reason_words(r)),
    }
}

/// Which of the proxy's ports a redirect goes to.
pub fn port_words(cfg: &Config, port: u16) -> &'static str {
    if port == cfg.proxy_port {
        "the proxy's outbound port"
    } else if port == cfg.inbound_capture_port {
        "the proxy's inbound port"
    } else if port == DNS_PROXY_PORT {
        "the agent's DNS proxy"
    } else {
        "a port of the proxy"
    }
}

/// The decision model's rules in words, for rules no config entry names.
fn reason_words(r: Reason) -> &'static str {
    match r {
        Reason::NoMatch => "no rule captures it: the connection leaves untouched",
        Reason::Ipv6Disabled => {
            "IPv6 rules are off for this pod: IPv6 connections are not captured"
        }
        Reason::ExcludedPort => "its port is excluded from outbound capture (-o)",
        Reason::PassthroughSource => {
            "it comes from 127.0.0.6 over lo: the proxy's inbound passthrough to the app"
        }
        Reason::ProxyUidToLocal | Reason::ProxyGidToLocal => {
            "the proxy calling its own pod: through inbound handling"
        }
        Reason::AppOverLoopbackUid | Reason::AppOverLoopbackGid => {
            "an app talking over lo is not captured"
        }
        Reason::ProxyUid | Reason::ProxyGid => "the proxy's own traffic is never captured",
        Reason::OwnerGroup => "its group is not captured (owner groups)",
        Reason::Dns => "DNS capture: to the agent's DNS proxy",
        Reason::LoopbackCidr => "the destination is in the loopback CIDR: not captured",
        Reason::ExcludedCidr => "the destination is in an excluded CIDR (-x)",
        Reason::IncludedPort => "its port is always captured (-q)",
        Reason::IncludeAll => "every outbound destination is captured (-i '*')",
        Reason::IncludedCidr => "the destination is in an included CIDR (-i)",
        Reason::NotTcp => "only TCP is redirected (and DNS when captured)",
        Reason::NoInboundCapture => "the pod captures no inbound ports",
        Reason::TunnelPort => "the HBONE tunnel port is never captured",
        Reason::ExcludedInboundPort => "an excluded inbound port (-d)",
        Reason::NotIncludedInboundPort => "not an included inbound port (-b)",
        Reason::LocalPeer => "a connection within the pod is not inbound traffic",
        Reason::InboundCaptured => "an inbound port that is captured",
        Reason::ProxyPortGuarded => "only the proxy may bind the proxy's ports",
        Reason::BindAllowed => "the bind is allowed",
    }
}
