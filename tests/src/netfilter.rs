//! The real-tool check of rendered rule documents: what `iptables-restore` (iptables-nft) and
//! `nft` themselves parse out of our iptables documents and nft transaction, compared with what
//! the config asked for.
//!
//! A line-prefix check cannot see a value that ends its token early (`x;include"f"#` in an nft
//! rule is a second statement); the tools can. Each document is first checked by the tool
//! (`iptables-nft-restore --test`, `nft -c -f -`), then applied inside a private scratch netns
//! (nothing outside it is touched, it disappears with the check) and listed back as JSON with
//! `nft -j list ruleset`, which shows iptables-nft's rules and native nft rules alike. The
//! listing must hold exactly the rules the document has, exactly the interface names the config
//! gave, and only ports and addresses the config gave (plus Istio's fixed ones).

use std::collections::BTreeSet;
use std::net::IpAddr;

use interceptor::backend::exec::{in_scratch, run};
use interceptor::backend::{iptables, nftables};
use interceptor_common::config::{CidrSelection, Config};
use ipnet::IpNet;
use serde_json::Value;

/// What a tool parsed: the rules' count and the values of their matches and targets.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Parsed {
    pub rules: usize,
    /// Interface names as nft lists them (`eth*` is a prefix match, `x\*` a literal `*`).
    pub interfaces: BTreeSet<String>,
    pub ports: BTreeSet<u16>,
    pub nets: BTreeSet<IpNet>,
}

/// The tools this check runs; a machine without them cannot run it.
pub const TOOLS: &[&str] = &["iptables-nft-restore", "ip6tables-nft-restore", "nft"];

/// Renders `cfg` with both emitters, has the tools parse and apply each document in a scratch
/// netns, and compares what they parsed with what `cfg` asked for. `Err` says what differed.
pub fn check_rendered(cfg: &Config) -> Result<(), String> {
    let docs = iptables::render(cfg);
    let tx = nftables::render(cfg);
    let rules_ipt = rule_lines(&docs.v4, &["-A ", "-I "])
        + docs
            .v6
            .as_deref()
            .map_or(0, |d| rule_lines(d, &["-A ", "-I "]));
    let rules_nft = rule_lines(&tx, &["add rule ", "insert rule "]);
    let (ipt, nft) = in_scratch(move || {
        let ipt = parse_iptables(&docs)?;
        run(None, "nft", &["flush", "ruleset"], None)?;
        let nft = parse_nft(&tx)?;
        Ok((ipt, nft))
    })
    .map_err(|e| format!("{e:#}"))?;
    compare(cfg, "iptables-nft", &ipt, rules_ipt)?;
    compare(cfg, "nft", &nft, rules_nft)
}

fn rule_lines(doc: &str, prefixes: &[&str]) -> usize {
    doc.lines()
        .filter(|l| prefixes.iter().any(|p| l.starts_with(p)))
        .count()
}

fn parse_iptables(docs: &iptables::RestoreDocs) -> anyhow::Result<Parsed> {
    for (tool, doc) in [
        ("iptables-nft-restore", Some(docs.v4.as_str())),
        ("ip6tables-nft-restore", docs.v6.as_deref()),
    ] {
        let Some(doc) = doc else { continue };
        run(None, tool, &["--test"], Some(doc))?;
        run(None, tool, &[], Some(doc))?;
    }
    listing()
}

fn parse_nft(tx: &str) -> anyhow::Result<Parsed> {
    run(None, "nft", &["-c", "-f", "-"], Some(tx))?;
    run(None, "nft", &["-f", "-"], Some(tx))?;
    listing()
}

/// `nft -j list ruleset` of the scratch netns, reduced to [`Parsed`].
fn listing() -> anyhow::Result<Parsed> {
    let out = run(None, "nft", &["-j", "list", "ruleset"], None)?;
    let v: Value = serde_json::from_str(&out)?;
    let mut p = Parsed::default();
    for item in v["nftables"].as_array().into_iter().flatten() {
        let Some(rule) = item.get("rule") else {
            continue;
        };
        p.rules += 1;
        for expr in rule["expr"].as_array().into_iter().flatten() {
            if let Some(m) = expr.get("match") {
                collect_match(&m["left"], &m["right"], &mut p);
            }
            for target in ["redirect", "tproxy", "dnat"] {
                if let Some(port) = expr.get(target).and_then(|t| t.get("port")) {
                    p.ports
                        .extend(port.as_u64().and_then(|n| u16::try_from(n).ok()));
                }
            }
        }
    }
    Ok(p)
}

fn collect_match(left: &Value, right: &Value, p: &mut Parsed) {
    let leaves = leaves(right);
    if let Some(key) = left.pointer("/meta/key").and_then(Value::as_str) {
        if key == "iifname" || key == "oifname" {
            p.interfaces
                .extend(leaves.iter().filter_map(|l| l.as_str()).map(String::from));
        }
        return;
    }
    let (Some(proto), Some(field)) = (
        left.pointer("/payload/protocol").and_then(Value::as_str),
        left.pointer("/payload/field").and_then(Value::as_str),
    ) else {
        return;
    };
    match (proto, field) {
        (_, "dport" | "sport") => p.ports.extend(
            leaves
                .iter()
                .filter_map(|l| l.as_u64().and_then(|n| u16::try_from(n).ok())),
        ),
        ("ip" | "ip6", "saddr" | "daddr") => {
            for l in leaves {
                let net = match l {
                    Value::String(s) => s.parse::<IpAddr>().ok().map(IpNet::from),
                    Value::Object(_) => {
                        let addr = l.pointer("/prefix/addr").and_then(Value::as_str);
                        let len = l.pointer("/prefix/len").and_then(Value::as_u64);
                        match (addr.and_then(|a| a.parse::<IpAddr>().ok()), len) {
                            (Some(a), Some(n)) => IpNet::new(a, n as u8).ok(),
                            _ => None,
                        }
                    }
                    _ => None,
                };
                p.nets.extend(net);
            }
        }
        _ => {}
    }
}

/// The scalar values of a match's right side: itself, a set's elements, a range's ends.
fn leaves(v: &Value) -> Vec<&Value> {
    if let Some(set) = v.get("set").and_then(Value::as_array) {
        return set.iter().flat_map(leaves).collect();
    }
    if let Some(range) = v.get("range").and_then(Value::as_array) {
        return range.iter().collect();
    }
    vec![v]
}

/// How nft lists the interface name `name` of our config: iptables' trailing `+` wildcard is
/// nft's trailing `*`, and a literal trailing `*` is escaped.
pub fn nft_listed_name(name: &str) -> String {
    match name.strip_suffix('+') {
        Some(stem) => format!("{stem}*"),
        None => match name.strip_suffix('*') {
            Some(stem) => format!("{stem}\\*"),
            None => name.to_string(),
        },
    }
}

/// What `cfg` asks for: its interface names (as nft lists them), every port and address it
/// names plus Istio's fixed ones (DNS 53 and 15053, the passthrough and loopback addresses).
fn asked(cfg: &Config) -> Parsed {
    let interfaces = cfg
        .exclude_interfaces
        .iter()
        .chain(&cfg.reroute_virtual_interfaces)
        .map(|n| nft_listed_name(n))
        .collect();
    let mut ports: BTreeSet<u16> = [
        cfg.proxy_port,
        cfg.inbound_capture_port,
        cfg.inbound_tunnel_port,
        53,
        15053,
    ]
    .into();
    if let interceptor_common::config::PortSelection::List(l) = &cfg.inbound_ports_include {
        ports.extend(l);
    }
    for list in [
        &cfg.inbound_ports_exclude,
        &cfg.outbound_ports_include,
        &cfg.outbound_ports_exclude,
    ] {
        ports.extend(list);
    }
    let mut nets: BTreeSet<IpNet> = ["127.0.0.6/32", "::6/128", "::1/128"]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
    nets.insert(IpNet::V4(cfg.host_ipv4_loopback_cidr.trunc()));
    nets.extend(configured_nets(cfg));
    for s in cfg.dns_servers_v4.iter().chain(&cfg.dns_servers_v6) {
        nets.insert(IpNet::from(s.addr));
    }
    Parsed {
        rules: 0,
        interfaces,
        ports,
        nets,
    }
}

/// The outbound CIDRs the config lists, host bits cleared (the kernel stores them so).
fn configured_nets(cfg: &Config) -> Vec<IpNet> {
    let include = match &cfg.outbound_ip_ranges_include {
        CidrSelection::All => &[][..],
        CidrSelection::List(l) => l.as_slice(),
    };
    include
        .iter()
        .chain(&cfg.outbound_ip_ranges_exclude)
        .map(IpNet::trunc)
        .collect()
}

fn compare(cfg: &Config, tool: &str, got: &Parsed, rules: usize) -> Result<(), String> {
    let want = asked(cfg);
    let mut problems = Vec::new();
    if got.rules != rules {
        problems.push(format!(
            "{} rules parsed, the document has {rules}",
            got.rules
        ));
    }
    let interfaces: BTreeSet<String> = got
        .interfaces
        .iter()
        .filter(|n| *n != "lo")
        .cloned()
        .collect();
    if interfaces != want.interfaces {
        problems.push(format!(
            "interfaces {interfaces:?}, the config asked for {:?}",
            want.interfaces
        ));
    }
    let extra_ports: Vec<_> = got.ports.difference(&want.ports).collect();
    if !extra_ports.is_empty() {
        problems.push(format!("ports {extra_ports:?} not in the config"));
    }
    let extra_nets: Vec<_> = got.nets.difference(&want.nets).collect();
    if !extra_nets.is_empty() {
        problems.push(format!("addresses {extra_nets:?} not in the config"));
    }
    // Every outbound CIDR of a rendered family must be there (v6 only with IPv6 on).
    let missing: Vec<_> = configured_nets(cfg)
        .into_iter()
        .filter(|n| matches!(n, IpNet::V4(_)) || cfg.enable_ipv6)
        .filter(|n| !got.nets.contains(n))
        .collect();
    if !missing.is_empty() {
        problems.push(format!("configured CIDRs {missing:?} missing"));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(format!("{tool} parsed: {}", problems.join("; ")))
    }
}

/// Renames the pod's interface (`eth0`) to `name` and restores its IPv4 default route (Linux
/// renames only a down link, and taking it down drops the route). IPv6 is left off.
pub fn rename_pod_if(topo: &crate::topology::Topology, name: &str) -> anyhow::Result<()> {
    let ns = topo.pod_ns_name();
    let gw = topo.upstream_v4().to_string();
    #[rustfmt::skip]
    let steps: [&[&str]; 4] = [
        &["-n", ns, "link", "set", crate::topology::POD_IF, "down"],
        &["-n", ns, "link", "set", crate::topology::POD_IF, "name", name],
        &["-n", ns, "link", "set", name, "up"],
        &["-n", ns, "-4", "route", "replace", "default", "via", &gw, "dev", name],
    ];
    for args in steps {
        let out = std::process::Command::new("ip").args(args).output()?;
        anyhow::ensure!(
            out.status.success(),
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// What iptables-nft makes of restore document `doc` (IPv6 with `v6`): applied in a scratch
/// netns and listed back with `*-save` (comments and counters dropped).
pub fn iptables_listing(doc: &str, v6: bool) -> anyhow::Result<String> {
    let (restore, save) = if v6 {
        ("ip6tables-nft-restore", "ip6tables-nft-save")
    } else {
        ("iptables-nft-restore", "iptables-nft-save")
    };
    let doc = doc.to_string();
    in_scratch(move || {
        run(None, restore, &[], Some(&doc))?;
        let out = run(None, save, &[], None)?;
        Ok(out
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| match l.split_once(" [") {
                // `:CHAIN POLICY [packets:bytes]`
                Some((decl, _)) if l.starts_with(':') => decl.to_string(),
                _ => l.to_string(),
            })
            .collect::<Vec<_>>()
            .join("\n"))
    })
}

/// What nft makes of transaction `tx`: applied in a scratch netns and listed back.
pub fn nft_listing(tx: &str) -> anyhow::Result<String> {
    let tx = tx.to_string();
    in_scratch(move || {
        run(None, "nft", &["-f", "-"], Some(&tx))?;
        run(None, "nft", &["list", "ruleset"], None)
    })
}
