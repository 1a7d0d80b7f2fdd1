//! What `interceptor explain` says (`cli::explain` parses and prints): one connection's
//! verdict from the shared decision model, the config entry behind the rule that decided
//! (`interceptor_common::entry`) and the istio-iptables rule that makes the same decision,
//! found by walking the rules our iptables emitter writes for the config (`netfilter`). For a
//! config the eBPF path cannot serve, the verdict is the netfilter rules' own. `words` says
//! the reason in words.

mod netfilter;
mod words;

use std::net::IpAddr;
use std::path::Path;

use anyhow::{anyhow, Context, Result};
use interceptor_common::config::Config;
use interceptor_common::decision::{self, Conn, PodSrc, Reason, Verdict};
use interceptor_common::entry::{self, Entry};
use interceptor_common::policy::{self, MemTables};

use crate::tables::group_gid;

/// The rule id of a connection returned by an excluded interface (`-c`), a rule the eBPF
/// decision model has no counterpart for (the eBPF path refuses such configs).
pub const EXCLUDED_INTERFACE: &str = "excluded_interface";
/// The rule id when the netfilter rules decide differently from the decision model.
pub const NETFILTER_RULE: &str = "netfilter_rule";

/// What `explain` found, as `--output json` prints it.
#[derive(Debug, serde::Serialize)]
pub struct Report {
    /// The pod asked about with `--pod` (namespace/name), when it was.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// `ebpf` (the decision model the programs run) or `netfilter` (the fallback's rules).
    pub decided_by: &'static str,
    /// Why eBPF cannot serve this config, when it cannot.
    pub ebpf_unsupported: Option<String>,
    /// `redirect` or `pass`.
    pub verdict: &'static str,
    pub port: Option<u16>,
    /// The deciding rule's stable id: the decision model's (`excluded_cidr`, `proxy_uid`, …),
    /// `excluded_interface`, or `netfilter_rule`.
    pub rule: &'static str,
    /// The verdict in words, naming the config entry.
    pub why: String,
    /// The config entry (flag and matched value) that made the rule fire, if one did.
    pub entry: Option<Entry>,
    /// The rule istio-iptables writes for this config that makes the same decision
    /// (`-A ISTIO_OUTPUT -d 10.0.0.0/8 -j RETURN`); none when no rule matches.
    pub istio_rule: Option<String>,
    /// Netfilter only: the interface the route leaves by.
    pub route: Option<String>,
    /// Netfilter only: every rule that matched on the way, jumps included.
    pub rules_matched: Vec<String>,
    /// The pod's user-namespace mapping of the proxy ids, if it has its own.
    pub userns: Option<String>,
    /// eBPF redirects: the source address the connection is bound to on its way to the proxy,
    /// the peer the proxy sees (as a REDIRECT leaves it), or why the kernel's choice stands.
    pub source: Option<String>,
}

/// Explains one connection of the pod at `netns` (None: this process's own) with config `cfg`.
pub fn report(cfg: &Config, netns: Option<&Path>, conn: &Conn) -> Result<Report> {
    let (tables, pod_src) = crate::tables::pod_tables_and_src(cfg, netns)?;
    let mut report = match policy::ebpf_unsupported(cfg) {
        None => ebpf_report(cfg, &tables, &pod_src, conn),
        Some(why) => netfilter_report(cfg, &tables, netns, conn, why)?,
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

fn verdict_of(v: Verdict) -> (&'static str, Option<u16>) {
    match v {
        Verdict::Redirect { port, .. } => ("redirect", Some(port)),
        Verdict::Pass(_) => ("pass", None),
    }
}

/// The connection as netfilter's nat OUTPUT sees it, leaving by `out_if`.
fn packet(conn: &Conn, out_if: String) -> netfilter::Packet {
    netfilter::Packet {
        proto: conn.proto,
        dst: IpAddr::from(decision::kernel_dst(conn.dst, conn.src)),
        dport: conn.dport,
        src: conn.src.map(IpAddr::from),
        uid: conn.uid,
        gid: conn.gid,
        out_if,
    }
}

/// The rule of a walk that chose its outcome: for a redirect the jump into the redirect chain
/// (or the DNS REDIRECT itself), for a pass the RETURN (or the jump to a TCP-only redirect
/// chain a UDP connection falls through); none when the connection fell off the chains' end.
fn deciding_rule(walk: &netfilter::Walk) -> Option<String> {
    let chain = |r: &String| r.split_whitespace().nth(1).unwrap_or_default().to_string();
    let redirect_chain = |r: &String| {
        let c = chain(r);
        c == crate::backend::iptables::ISTIO_REDIRECT
            || c == crate::backend::iptables::ISTIO_IN_REDIRECT
    };
    match walk.outcome {
        netfilter::Outcome::Redirect(_) => walk.matched.iter().rev().find(|r| !redirect_chain(r)),
        netfilter::Outcome::Pass => walk.matched.last().filter(|r| {
            r.ends_with("-j RETURN")
                || r.ends_with("-j ACCEPT")
                || r.ends_with(&format!("-j {}", crate::backend::iptables::ISTIO_REDIRECT))
        }),
    }
    .cloned()
}

/// Whether a walk's outcome is the decision model's verdict.
fn agrees(walk: &netfilter::Walk, v: Verdict) -> bool {
    match (walk.outcome, v) {
        (netfilter::Outcome::Redirect(p), Verdict::Redirect { port, .. }) => p == port,
        (netfilter::Outcome::Pass, Verdict::Pass(_)) => true,
        _ => false,
    }
}

/// The verdict of the decision model the eBPF programs run, with the istio-iptables rule that
/// decides the same (eBPF configs have no excluded interfaces, so only `lo` matters).
fn ebpf_report(cfg: &Config, tables: &MemTables, pod_src: &PodSrc, conn: &Conn) -> Report {
    let v = policy::explain(cfg, tables, conn);
    let (verdict, port) = verdict_of(v);
    let route = decision::Route::of(tables, conn);
    let out_if = if route.over_lo() { "lo" } else { "eth0" };
    let source = matches!(v, Verdict::Redirect { .. }).then(|| {
        match decision::redirect_source(pod_src, route, conn.src) {
            Some(a) => format!("bound to {}, the peer the proxy sees", IpAddr::from(a)),
            None if conn.src.is_some() => "the one the app bound stays".into(),
            None if route.dst.is_loopback() => {
                "the kernel's (loopback, as for a REDIRECT of a loopback destination)".into()
            }
            None => "the kernel's: the pod has no address of that family".into(),
        }
    });
    let entry = entry::deciding_entry(cfg, conn, v.reason());
    let mut why = words::why(cfg, conn, v, entry.as_ref());
    // The verdict is the decision model's; the rules only name their counterpart.
    let istio_rule = match netfilter::walk(cfg, &packet(conn, out_if.into()), &group_gid) {
        Ok(walk) if agrees(&walk, v) => deciding_rule(&walk),
        Ok(walk) => {
            why.push_str(&format!(
                "; istio-iptables' rules decide this connection differently ({})",
                match walk.outcome {
                    netfilter::Outcome::Redirect(p) => format!("redirect to port {p}"),
                    netfilter::Outcome::Pass => "pass".into(),
                }
            ));
            None
        }
        Err(e) => {
            why.push_str(&format!("; no istio-iptables rule found: {e:#}"));
            None
        }
    };
    Report {
        pod: None,
        decided_by: "ebpf",
        ebpf_unsupported: None,
        verdict,
        port,
        rule: v.reason().id(),
        why,
        entry,
        istio_rule,
        route: None,
        rules_matched: vec![],
        userns: None,
        source,
    }
}

/// The verdict of the netfilter rules the pod falls back to, walked rule by rule. The rule id
/// and entry are the decision model's when it decides the same.
fn netfilter_report(
    cfg: &Config,
    tables: &MemTables,
    netns: Option<&Path>,
    conn: &Conn,
    unsupported: String,
) -> Result<Report> {
    let dst = IpAddr::from(decision::kernel_dst(conn.dst, conn.src));
    let out_if = route_interface(netns, dst)?;
    let walk = netfilter::walk(cfg, &packet(conn, out_if.clone()), &group_gid)?;
    let deciding = deciding_rule(&walk);
    let (verdict, port) = match walk.outcome {
        netfilter::Outcome::Redirect(p) => ("redirect", Some(p)),
        netfilter::Outcome::Pass => ("pass", None),
    };
    let model = policy::explain(cfg, tables, conn);
    let excluded_if = deciding
        .as_deref()
        .filter(|r| r.starts_with("-A OUTPUT -o "))
        .and_then(|r| r.split_whitespace().nth(3))
        .map(|nic| nic.trim_matches('"').to_string());
    let (rule, entry, mut why) = if let Some(nic) = excluded_if {
        let e = Entry {
            flag: entry::flag::EXCLUDE_INTERFACES,
            value: nic,
        };
        let why = format!(
            "it leaves by {out_if}, which matches {} of {}: never captured",
            e.value, e.flag
        );
        (EXCLUDED_INTERFACE, Some(e), why)
    } else if agrees(&walk, model) && !walk.no_rules {
        let e = entry::deciding_entry(cfg, conn, model.reason());
        let why = words::why(cfg, conn, model, e.as_ref());
        (model.reason().id(), e, why)
    } else if walk.no_rules {
        let v = Verdict::Pass(Reason::Ipv6Disabled);
        let e = entry::deciding_entry(cfg, conn, v.reason());
        (
            v.reason().id(),
            e.clone(),
            words::why(cfg, conn, v, e.as_ref()),
        )
    } else {
        let why = match (walk.outcome, &deciding) {
            (netfilter::Outcome::Redirect(p), _) => {
                format!("redirected to port {p}, {}", words::port_words(cfg, p))
            }
            (netfilter::Outcome::Pass, Some(_)) => {
                "returned by this rule: the connection leaves untouched".into()
            }
            (netfilter::Outcome::Pass, None) => {
                "no rule captures it: the connection leaves untouched".into()
            }
        };
        (NETFILTER_RULE, None, why)
    };
    if !cfg.reroute_virtual_interfaces.is_empty() || cfg.drop_invalid {
        why.push_str(
            "; -k and --drop-invalid act on traffic arriving at the pod, not on this connection",
        );
    }
    Ok(Report {
        pod: None,
        decided_by: "netfilter",
        ebpf_unsupported: Some(unsupported),
        verdict,
        port,
        rule,
        why,
        entry,
        istio_rule: deciding,
        route: Some(out_if),
        rules_matched: walk.matched,
        userns: None,
        source: None,
    })
}

/// The text form: `verdict:` and `rule:` lines first (tools read them), then the reason in
/// words and the istio-iptables rule.
pub fn text(r: &Report) -> String {
    let mut out = String::new();
    if let Some(why) = &r.ebpf_unsupported {
        out.push_str(&format!(
            "eBPF cannot serve this config ({why}); explained from the iptables/nftables rules \
             it falls back to\n"
        ));
    }
    if let Some(pod) = &r.pod {
        out.push_str(&format!("pod: {pod}\n"));
    }
    out.push_str(&match r.port {
        Some(p) => format!("verdict: redirect {p}\n"),
        None => "verdict: pass\n".into(),
    });
    out.push_str(&format!("rule: {}\n", r.rule));
    out.push_str(&format!("why: {}\n", r.why));
    match &r.istio_rule {
        Some(rule) => out.push_str(&format!("istio-iptables rule: {rule}\n")),
        None if r.rule == Reason::Ipv6Disabled.id() => {
            out.push_str("istio-iptables rule: none (no IPv6 rules are written)\n")
        }
        None => out.push_str("istio-iptables rule: none (no rule of ISTIO_OUTPUT decides it)\n"),
    }
    if r.decided_by == "netfilter" {
        if let Some(route) = &r.route {
            out.push_str(&format!("route: leaves by {route}\n"));
        }
        for m in &r.rules_matched {
            out.push_str(&format!("matched: {m}\n"));
        }
    }
    if let Some(src) = &r.source {
        out.push_str(&format!("source: {src}\n"));
    }
    if let Some(u) = &r.userns {
        out.push_str(&format!("userns: {u}\n"));
    }
    out
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
