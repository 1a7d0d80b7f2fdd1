//! `RawConfig::parse`: Istio's defaults, each flag's validation and the list limits.

use crate::config::*;

#[test]
fn defaults_match_istio() {
    let c = Config::default();
    assert_eq!(c.proxy_port, 15001);
    assert_eq!(c.inbound_capture_port, 15006);
    assert_eq!(c.inbound_tunnel_port, 15008);
    assert_eq!(c.proxy_uid, vec![1337]);
    assert_eq!(c.proxy_gid, vec![1337]);
    assert_eq!(c.inbound_ports_include, PortSelection::List(vec![]));
    assert_eq!(c.outbound_ip_ranges_include, CidrSelection::List(vec![]));
    assert_eq!(c.owner_groups, OwnerGroups::All);
    assert_eq!(c.host_ipv4_loopback_cidr.to_string(), "127.0.0.1/32");
}

#[test]
fn empty_list_items_are_dropped() {
    let raw = RawConfig {
        inbound_ports_exclude: "6000,,7000,".into(),
        ..Default::default()
    };
    assert_eq!(raw.parse().unwrap().inbound_ports_exclude, vec![6000, 7000]);
}

fn list(n: usize, item: impl Fn(usize) -> String) -> String {
    (0..n).map(item).collect::<Vec<_>>().join(",")
}

#[test]
fn every_list_has_a_limit_named_in_its_error() {
    let port = |i: usize| (1000 + i).to_string();
    let cidr = |i: usize| format!("10.{}.{}.0/24", i / 256, i % 256);
    let ifname = |i: usize| format!("eth{i}");
    let id = |i: usize| (2000 + i).to_string();
    let ip = |i: usize| format!("10.0.0.{}", i + 1);
    let cases: Vec<(&str, usize, RawConfig)> = vec![
        (
            "--istio-inbound-ports",
            limits::MAX_PORTS,
            RawConfig {
                inbound_ports_include: list(limits::MAX_PORTS + 1, port),
                ..Default::default()
            },
        ),
        (
            "--istio-local-exclude-ports",
            limits::MAX_PORTS,
            RawConfig {
                inbound_ports_exclude: list(limits::MAX_PORTS + 1, port),
                ..Default::default()
            },
        ),
        (
            "--istio-outbound-ports",
            limits::MAX_PORTS,
            RawConfig {
                outbound_ports_include: list(limits::MAX_PORTS + 1, port),
                ..Default::default()
            },
        ),
        (
            "--istio-local-outbound-ports-exclude",
            limits::MAX_PORTS,
            RawConfig {
                outbound_ports_exclude: list(limits::MAX_PORTS + 1, port),
                ..Default::default()
            },
        ),
        (
            "--bind-guard-ports",
            limits::MAX_PORTS,
            RawConfig {
                bind_guard_ports: list(limits::MAX_PORTS + 1, port),
                ..Default::default()
            },
        ),
        (
            "--istio-service-cidr",
            limits::MAX_CIDRS,
            RawConfig {
                outbound_ip_ranges_include: list(limits::MAX_CIDRS + 1, cidr),
                ..Default::default()
            },
        ),
        (
            "--istio-service-exclude-cidr",
            limits::MAX_CIDRS,
            RawConfig {
                outbound_ip_ranges_exclude: list(limits::MAX_CIDRS + 1, cidr),
                ..Default::default()
            },
        ),
        (
            "--istio-exclude-interfaces",
            limits::MAX_INTERFACES,
            RawConfig {
                exclude_interfaces: list(limits::MAX_INTERFACES + 1, ifname),
                ..Default::default()
            },
        ),
        (
            "--kube-virt-interfaces",
            limits::MAX_INTERFACES,
            RawConfig {
                reroute_virtual_interfaces: list(limits::MAX_INTERFACES + 1, ifname),
                ..Default::default()
            },
        ),
        (
            "--proxy-uid",
            limits::MAX_IDS,
            RawConfig {
                proxy_uid: list(limits::MAX_IDS + 1, id),
                ..Default::default()
            },
        ),
        (
            "--proxy-gid",
            limits::MAX_IDS,
            RawConfig {
                proxy_gid: list(limits::MAX_IDS + 1, id),
                ..Default::default()
            },
        ),
        (
            "ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE",
            limits::MAX_OWNER_GROUPS,
            RawConfig {
                owner_groups_exclude: list(limits::MAX_OWNER_GROUPS + 1, id),
                ..Default::default()
            },
        ),
        (
            "--dns-servers",
            limits::MAX_DNS_SERVERS,
            RawConfig {
                dns_servers: list(limits::MAX_DNS_SERVERS + 1, ip),
                ..Default::default()
            },
        ),
    ];
    for (flag, limit, raw) in cases {
        let e = raw.parse().expect_err(flag);
        assert_eq!(e.flag, flag);
        assert!(
            e.reason.contains(&format!("the limit is {limit}")),
            "{flag}: {e}"
        );
        assert!(
            e.value.len() <= 67,
            "{flag}: the error quotes the whole list"
        );
    }
}

#[test]
fn lists_at_their_limits_are_accepted() {
    let port = |i: usize| (1000 + i).to_string();
    let raw = RawConfig {
        outbound_ports_exclude: list(limits::MAX_PORTS, port),
        outbound_ip_ranges_include: list(limits::MAX_CIDRS, |i| {
            format!("10.{}.{}.0/24", i / 256, i % 256)
        }),
        outbound_ip_ranges_exclude: list(limits::MAX_CIDRS, |i| {
            format!("11.{}.{}.0/24", i / 256, i % 256)
        }),
        proxy_uid: list(limits::MAX_IDS, |i| i.to_string()),
        owner_groups_exclude: list(limits::MAX_OWNER_GROUPS, |i| i.to_string()),
        dns_servers: list(limits::MAX_DNS_SERVERS, |i| format!("10.0.0.{}", i + 1)),
        ..Default::default()
    };
    let c = raw.parse().unwrap();
    assert_eq!(c.outbound_ports_exclude.len(), limits::MAX_PORTS);
}

#[test]
fn ports_of_all_lists_together_are_limited() {
    // Each list within its own limit, together over the pod's port entries.
    let ports = |base: usize| list(limits::MAX_PORTS, |i| (base + i).to_string());
    let raw = RawConfig {
        inbound_ports_include: ports(1000),
        outbound_ports_include: ports(2000),
        outbound_ports_exclude: ports(3000),
        ..Default::default()
    };
    let e = raw.parse().unwrap_err();
    assert_eq!(e.flag, "ports");
    assert!(
        e.reason.contains(&format!(
            "the limit for one pod is {}",
            limits::MAX_PORT_ENTRIES
        )),
        "{e}"
    );
}

#[test]
fn dns_servers_keep_their_text() {
    let raw = RawConfig {
        dns_servers: "127.0.0.53,::127.0.0.53".into(),
        ..Default::default()
    };
    let c = raw.parse().unwrap();
    assert_eq!(c.dns_servers_v4[0].text, "127.0.0.53");
    assert_eq!(c.dns_servers_v6[0].text, "::127.0.0.53");
}

#[test]
fn owner_group_ids_read_as_iptables_reads_them() {
    use crate::parse::group_number;
    // C's strtoul(…, 0), as iptables' --gid-owner and nft's skgid parse a number.
    assert_eq!(group_number("8"), Ok(Some(8)));
    assert_eq!(group_number("010"), Ok(Some(8)));
    assert_eq!(group_number("0x10"), Ok(Some(16)));
    assert_eq!(group_number("0"), Ok(Some(0)));
    assert_eq!(group_number("wheel"), Ok(None));
    assert_eq!(group_number("1abc"), Ok(None));
    assert!(group_number("08").is_err());
    assert!(group_number("99999999999").is_err());
    let gids = crate::policy::resolve_groups(&["010".into(), "0x10".into(), "5".into()], |_| None);
    assert_eq!(gids, Ok(vec![8, 16, 5]));
    // `08` would be looked up as a group name by the tools and fail at apply: refused here,
    // naming the value (a fuzzing find: it once reached iptables-restore).
    let raw = RawConfig {
        owner_groups_include: ",08".into(),
        ..Default::default()
    };
    let err = raw.parse().unwrap_err().to_string();
    assert!(err.contains("\"08\"") || err.contains("'08'"), "{err}");
    assert!(err.contains("octal"), "{err}");
}
