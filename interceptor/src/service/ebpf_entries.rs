//! The eBPF map entries of one pod in words (`apply --dry-run --backend ebpf`): the scalar
//! policy (`interceptor_common::policy::pod_policy`) with its switches spelled out, and each
//! set the pod's tables hold, sorted.

use std::fmt::Display;

use interceptor_common::config::Config;
use interceptor_common::decision::{flags, PodPolicy};
use interceptor_common::policy::{self, MemTables};

/// The policy's switches (`PodPolicy::flags`) in words, in bit order.
pub fn flag_words(p: &PodPolicy) -> Vec<&'static str> {
    [
        (flags::IPV6, "IPv6 rules on"),
        (flags::DNS, "DNS capture on"),
        (flags::DNS_CAPTURE_ALL, "DNS to every server captured"),
        (
            flags::INCLUDE_ALL,
            "every outbound destination captured (-i '*')",
        ),
        (
            flags::LOOPBACK_INCLUDED,
            "a loopback include CIDR: apps over lo are captured",
        ),
        (
            flags::GROUPS_INCLUDE,
            "only the listed owner groups captured",
        ),
        (
            flags::GROUPS_EXCLUDE,
            "the listed owner groups not captured",
        ),
        (
            flags::INBOUND_ALL,
            "every inbound port captured but the excluded ones (-b '*')",
        ),
        (
            flags::INBOUND_LIST,
            "the listed inbound ports captured (-b)",
        ),
        (
            flags::BIND_GUARD,
            "only the proxy may bind the proxy's ports",
        ),
        (
            flags::ACCELERATE,
            "app-proxy loopback connections accelerated",
        ),
    ]
    .into_iter()
    .filter(|(bit, _)| p.has(*bit))
    .map(|(_, w)| w)
    .collect()
}

/// A sorted, comma-separated list, or `none`.
fn list<T: Ord + Display>(items: impl IntoIterator<Item = T>) -> String {
    let mut v: Vec<T> = items.into_iter().collect();
    v.sort();
    if v.is_empty() {
        return "none".into();
    }
    v.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The map entries for a pod with config `cfg` and tables `t`, one `what: value` line each.
pub fn text(cfg: &Config, t: &MemTables) -> String {
    let p = policy::pod_policy(cfg, 0);
    let ids = |n: u32, v: &[u32]| list(v.iter().take(n as usize).copied());
    let switches = flag_words(&p);
    let lines: Vec<(&str, String)> = vec![
        ("proxy uids (never captured)", ids(p.n_uids, &p.uids)),
        ("proxy gids (never captured)", ids(p.n_gids, &p.gids)),
        ("redirect outbound to port", p.proxy_port.to_string()),
        (
            "redirect inbound to port",
            p.inbound_capture_port.to_string(),
        ),
        (
            "tunnel port (never captured)",
            p.inbound_tunnel_port.to_string(),
        ),
        ("redirect captured DNS to port", p.dns_port.to_string()),
        (
            "loopback CIDR (never captured)",
            cfg.host_ipv4_loopback_cidr.to_string(),
        ),
        (
            "switches",
            if switches.is_empty() {
                "none".into()
            } else {
                switches.join("; ")
            },
        ),
        (
            "outbound ports never captured (-o)",
            list(t.ports_excluded.iter()),
        ),
        (
            "outbound ports always captured (-q)",
            list(t.ports_included.iter()),
        ),
        (
            "outbound CIDRs never captured (-x)",
            list(t.cidrs_excluded.iter()),
        ),
        (
            "outbound CIDRs captured (-i)",
            if p.has(flags::INCLUDE_ALL) {
                "every destination".into()
            } else {
                list(t.cidrs_included.iter())
            },
        ),
        ("pod addresses (reached over lo)", list(t.local.iter())),
        ("DNS servers captured", list(t.dns_servers.iter())),
        ("owner group gids", list(t.groups.iter())),
        (
            if p.has(flags::INBOUND_ALL) {
                "inbound ports not captured (-d)"
            } else {
                "inbound ports captured (-b)"
            },
            list(t.inbound_ports.iter()),
        ),
        (
            "ports only the proxy may bind",
            list(t.guarded_ports.iter()),
        ),
    ];
    let mut out = String::from("# eBPF map entries for this pod (keyed by its netns cookie)\n");
    for (what, value) in lines {
        out.push_str(&format!("{what}: {value}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use interceptor_common::config::RawConfig;

    #[test]
    fn entries_in_words() {
        let cfg: Config = RawConfig {
            outbound_ip_ranges_include: "*".into(),
            outbound_ip_ranges_exclude: "10.0.0.0/8".into(),
            outbound_ports_exclude: "5555".into(),
            ..Default::default()
        }
        .parse()
        .unwrap();
        let t = MemTables::new(&cfg, &["10.1.0.5".parse().unwrap()], &[]);
        let out = text(&cfg, &t);
        for want in [
            "proxy uids (never captured): 1337\n",
            "redirect outbound to port: 15001\n",
            "outbound CIDRs never captured (-x): 10.0.0.0/8\n",
            "outbound CIDRs captured (-i): every destination\n",
            "outbound ports never captured (-o): 5555\n",
            "pod addresses (reached over lo): 10.1.0.5\n",
            "every outbound destination captured (-i '*')",
        ] {
            assert!(out.contains(want), "{want:?} not in\n{out}");
        }
        assert!(!out.contains('{') && !out.contains("PodPolicy"), "{out}");
    }
}
