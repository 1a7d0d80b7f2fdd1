//! What `interceptor explain` says (`cli::explain` parses and prints): one connection's
//! verdict from the shared decision model, or, for a config the eBPF path cannot serve, from
//! the netfilter rules the pod falls back to (`netfilter`).

mod netfilter;

use std::net::IpAddr;
use std::path::Path;

use anyhow::{anyhow, Context, Result};
use interceptor_common::config::Config;
use interceptor_common::decision::{self, Conn, Reason, Verdict};
use interceptor_common::plan::DNS_PROXY_PORT;
use interceptor_common::policy::{self, MemTables};

use crate::tables::{group_gid, pod_tables};

/// What `explain` found, as `--output json` prints it.
#[derive(Debug, serde::Serialize)]
pub struct Report {
    /// `ebpf` (the decision model the programs run) or `netfilter` (the fallback's rules).
    pub decided_by: &'static str,
    /// Why eBPF cannot serve this config, when it cannot.
    pub ebpf_unsupported: Option<String>,
    /// `redirect` or `pass`.
    pub verdict: &'static str,
    pub port: Option<u16>,
    /// The deciding rule: the decision model's rule name, or the netfilter rule itself.
    pub rule: String,
    /// The verdict in words.
    pub why: String,
    /// Netfilter only: the interface the route leaves by.
    pub route: Option<String>,
    /// Netfilter only: every rule that matched on the way, jumps included.
    pub rules_matched: Vec<String>,
    /// The pod's user-namespace mapping of the proxy ids, if it has its own.
    pub userns: Option<String>,
}

/// Explains one connection of the pod at `netns` (None: this process's own) with config `cfg`.
pub fn report(cfg: &Config, netns: Option<&Path>, conn: &Conn) -> Result<Report> {
    let mut report = match policy::ebpf_unsupported(cfg) {
        None => ebpf_report(cfg, &pod_tables(cfg, netns)?, conn),
        Some(why) => netfilter_report(cfg, netns, conn, why)?,
    };
    // `--uid`/`--gid` are in-namespace ids, as Istio's rules name them; the eBPF programs
    // compare host ids, so show the translation when the pod has its own user namespace.
    if let Some(ns) = netns {
        if let Some(m) = crate::userns::maps_of(ns)? {
            report.userns = Some(crate::userns::UsernsView::new(&m, cfg).line());
        }
    }
    Ok(report)
}

/// The verdict of the decision model the eBPF programs run.
fn ebpf_report(cfg: &Config, tables: &MemTables, conn: &Conn) -> Report {
    let v = policy::explain(cfg, tables, conn);
    let (verdict, port) = match v {
        Verdict::Redirect { port, .. } => ("redirect", Some(port)),
        Verdict::Pass(_) => ("pass", None),
    };
    Report {
        decided_by: "ebpf",
        ebpf_unsupported: None,
        verdict,
        port,
        rule: format!("{:?}", v.reason()),
        why: reason_words(v.reason()).into(),
        route: None,
        rules_matched: vec![],
        userns: None,
    }
}

/// The verdict of the netfilter rules the pod falls back to, walked rule by rule.
fn netfilter_report(
    cfg: &Config,
    netns: Option<&Path>,
    conn: &Conn,
    unsupported: String,
) -> Result<Report> {
    let dst = IpAddr::from(decision::kernel_dst(conn.dst, conn.src));
    let out_if = route_interface(netns, dst)?;
    let pkt = netfilter::Packet {
        proto: conn.proto,
        dst,
        dport: conn.dport,
        src: conn.src.map(IpAddr::from),
        uid: conn.uid,
        gid: conn.gid,
        out_if: out_if.clone(),
    };
    let walk = netfilter::walk(cfg, &pkt, &group_gid)?;
    // The deciding rule is the one that chose the verdict: for a redirect the jump to the
    // redirect chain, not the REDIRECT inside it.
    let deciding = match walk.outcome {
        netfilter::Outcome::Redirect(_) if walk.matched.len() >= 2 => {
            walk.matched.get(walk.matched.len() - 2).cloned()
        }
        _ => walk.matched.last().cloned(),
    };
    let (verdict, port, mut why) = match walk.outcome {
        netfilter::Outcome::Redirect(p) => (
            "redirect",
            Some(p),
            format!("redirected to port {p}, {}", port_words(cfg, p)),
        ),
        netfilter::Outcome::Pass if walk.no_rules => (
            "pass",
            None,
            "IPv6 rules are off for this pod: no rule sees IPv6 connections".into(),
        ),
        netfilter::Outcome::Pass => match &deciding {
            Some(r) if r.starts_with("-A OUTPUT -o ") => (
                "pass",
                None,
                format!("it leaves by {out_if}, an excluded interface (-c): never captured"),
            ),
            Some(r) if r.ends_with("-j RETURN") => (
                "pass",
                None,
                "returned by this rule: the connection leaves untouched".into(),
            ),
            _ => (
                "pass",
                None,
                "no rule captures it: the connection leaves untouched".into(),
            ),
        },
    };
    if !cfg.reroute_virtual_interfaces.is_empty() || cfg.drop_invalid {
        why.push_str(
            "; -k and --drop-invalid act on traffic arriving at the pod, not on this connection",
        );
    }
    Ok(Report {
        decided_by: "netfilter",
        ebpf_unsupported: Some(unsupported),
        verdict,
        port,
        rule: deciding.unwrap_or_else(|| "(none)".into()),
        why,
        route: Some(out_if),
        rules_matched: walk.matched,
        userns: None,
    })
}

/// The text form: `verdict:` and `rule:` lines first (tools read them), then the rest.
pub fn text(r: &Report) -> String {
    let mut out = String::new();
    if let Some(why) = &r.ebpf_unsupported {
        out.push_str(&format!(
            "eBPF cannot serve this config ({why}); explained from the iptables/nftables rules it falls back to
"
        ));
    }
    out.push_str(&match r.port {
        Some(p) => format!(
            "verdict: redirect {p}
"
        ),
        None => "verdict: pass
"
        .into(),
    });
    out.push_str(&format!(
        "rule: {}
",
        r.rule
    ));
    if r.decided_by == "netfilter" {
        if let Some(route) = &r.route {
            out.push_str(&format!(
                "route: leaves by {route}
"
            ));
        }
        for m in &r.rules_matched {
            out.push_str(&format!(
                "matched: {m}
"
            ));
        }
        out.push_str(&format!(
            "why: {}
",
            r.why
        ));
    }
    if let Some(u) = &r.userns {
        out.push_str(&format!(
            "userns: {u}
"
        ));
    }
    out
}

/// Which of the proxy's ports a redirect goes to.
fn port_words(cfg: &Config, port: u16) -> &'static str {
    if port == cfg.proxy_port {
        "the proxy's outbound port"
    } else if port == cfg.inbound_capture_port {
        "the proxy's inbound port (the proxy calling its own pod goes through inbound handling)"
    } else if port == DNS_PROXY_PORT {
        "the agent's DNS proxy"
    } else {
        "a port of the proxy"
    }
}

/// The interface the kernel routes `dst` by in the netns (`ip route get`).
fn route_interface(netns: Option<&Path>, dst: IpAddr) -> Result<String> {
    let out =
        crate::backend::exec::run(netns, "ip", &["-o", "route", "get", &dst.to_string()], None)
            .with_context(|| format!("finding the route to {dst}"))?;
    let words: Vec<&str> = out.split_whitespace().collect();
    words
        .windows(2)
        .find(|w| w[0] == "dev")
        .map(|w| w[1].to_string())
        .ok_or_else(|| anyhow!("no interface in the route to {dst}: {}", out.trim()))
}

/// The decision model's rules in words.
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
