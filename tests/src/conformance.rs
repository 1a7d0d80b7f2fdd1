//! Istio's golden cases: each golden file's name and the configuration Istio's own test used
//! (from `shared/conformance/istio/README.md`), expressed as our `RawConfig`.

use interceptor_common::config::RawConfig;

/// One conformance case: the golden's file stem and its configuration.
pub struct Case {
    pub name: &'static str,
    pub raw: RawConfig,
}

fn case(name: &'static str, f: impl FnOnce(&mut RawConfig)) -> Case {
    // Istio's test base: uid/gid 1337 and everything else empty/false.
    let mut raw = RawConfig {
        proxy_gid: "1337".into(),
        ..RawConfig::default()
    };
    f(&mut raw);
    Case { name, raw }
}

/// The 27 cases shared by the iptables and nftables goldens.
pub fn common_cases() -> Vec<Case> {
    vec![
        case("ipv6-empty-inbound-ports", |c| c.enable_ipv6 = true),
        case("ip-range", |c| {
            c.outbound_ip_ranges_exclude = "1.1.0.0/16".into();
            c.outbound_ip_ranges_include = "9.9.0.0/16".into();
            c.redirect_dns = true;
            c.proxy_gid = "1,2".into();
            c.proxy_uid = "3,4".into();
            c.dns_servers = "127.0.0.53".into();
        }),
        case("tproxy", |c| {
            c.inbound_interception_mode = "TPROXY".into();
            c.inbound_ports_include = "*".into();
            c.outbound_ip_ranges_exclude = "1.1.0.0/16".into();
            c.outbound_ip_ranges_include = "9.9.0.0/16".into();
            c.redirect_dns = true;
            c.dns_servers = "127.0.0.53".into();
            c.exclude_interfaces = "not-istio-nic".into();
            c.enable_ipv6 = true;
        }),
        case("ipv6-inbound-ports", |c| {
            c.inbound_ports_include = "4000,5000".into();
            c.enable_ipv6 = true;
        }),
        case("ipv6-virt-interfaces", |c| {
            c.inbound_ports_include = "4000,5000".into();
            c.reroute_virtual_interfaces = "eth0,eth1".into();
            c.enable_ipv6 = true;
        }),
        case("ipv6-ipnets", |c| {
            c.inbound_ports_include = "4000,5000".into();
            c.inbound_ports_exclude = "6000,7000,".into();
            c.reroute_virtual_interfaces = "eth0,eth1".into();
            c.outbound_ip_ranges_exclude = "2001:db8::/32".into();
            c.outbound_ip_ranges_include = "2001:db8::/32".into();
            c.enable_ipv6 = true;
        }),
        case("ipv6-uid-gid", |c| {
            c.inbound_ports_include = "4000,5000".into();
            c.inbound_ports_exclude = "6000,7000".into();
            c.reroute_virtual_interfaces = "eth0,eth1".into();
            c.proxy_gid = "1,2".into();
            c.proxy_uid = "3,4".into();
            c.enable_ipv6 = true;
            c.outbound_ip_ranges_exclude = "2001:db8::/32".into();
            c.outbound_ip_ranges_include = "2001:db8::/32".into();
        }),
        case("ipv6-outbound-ports", |c| {
            c.outbound_ports_include = "32000,31000".into();
            c.enable_ipv6 = true;
        }),
        case("empty", |_| {}),
        case("kube-virt-interfaces", |c| {
            c.reroute_virtual_interfaces = "eth1,eth2".into();
            c.outbound_ip_ranges_include = "*".into();
        }),
        case("ipnets", |c| {
            c.outbound_ip_ranges_include = "10.0.0.0/8".into()
        }),
        case("ipnets-with-kube-virt-interfaces", |c| {
            c.reroute_virtual_interfaces = "eth1,eth2".into();
            c.outbound_ip_ranges_include = "10.0.0.0/8".into();
        }),
        case("inbound-ports-include", |c| {
            c.inbound_ports_include = "32000,31000".into()
        }),
        case("inbound-ports-wildcard", |c| {
            c.inbound_ports_include = "*".into()
        }),
        case("inbound-ports-tproxy", |c| {
            c.inbound_ports_include = "32000,31000".into();
            c.inbound_interception_mode = "TPROXY".into();
        }),
        case("inbound-ports-wildcard-tproxy", |c| {
            c.inbound_ports_include = "*".into();
            c.inbound_interception_mode = "TPROXY".into();
        }),
        case("dns-uid-gid", |c| {
            c.redirect_dns = true;
            c.dns_servers = "127.0.0.53,::127.0.0.53".into();
            c.proxy_gid = "1,2".into();
            c.proxy_uid = "3,4".into();
            c.enable_ipv6 = true;
        }),
        case("ipv6-dns-uid-gid", |c| {
            c.enable_ipv6 = true;
            c.redirect_dns = true;
            c.proxy_gid = "1,2".into();
            c.proxy_uid = "3,4".into();
        }),
        case("outbound-owner-groups", |c| {
            c.owner_groups_include = "java,202".into()
        }),
        case("outbound-owner-groups-exclude", |c| {
            c.owner_groups_exclude = "888,ftp".into()
        }),
        case("ipv6-dns-outbound-owner-groups", |c| {
            c.enable_ipv6 = true;
            c.redirect_dns = true;
            c.owner_groups_include = "java,202".into();
        }),
        case("ipv6-dns-outbound-owner-groups-exclude", |c| {
            c.enable_ipv6 = true;
            c.redirect_dns = true;
            c.owner_groups_exclude = "888,ftp".into();
        }),
        case("outbound-ports-include", |c| {
            c.outbound_ports_include = "32000,31000".into()
        }),
        case("loopback-outbound-iprange", |c| {
            c.outbound_ip_ranges_include = "127.1.2.3/32".into();
            c.redirect_dns = true;
            c.dns_servers = "127.0.0.53".into();
            c.proxy_gid = "1,2".into();
            c.proxy_uid = "3,4".into();
        }),
        case("basic-exclude-nic", |c| {
            c.exclude_interfaces = "not-istio-nic".into()
        }),
        case("drop-invalid", |c| c.drop_invalid = true),
        case("host-ipv4-loopback-cidr", |c| {
            c.host_ipv4_loopback_cidr = "127.0.0.1/8".into()
        }),
    ]
}

/// The iptables cases (27).
pub fn iptables_cases() -> Vec<Case> {
    common_cases()
}

/// The nftables cases: the common 27 plus `inbound-ports-empty-tproxy`.
pub fn nftables_cases() -> Vec<Case> {
    let mut v = common_cases();
    v.push(case("inbound-ports-empty-tproxy", |c| {
        c.inbound_ports_include = String::new();
        c.inbound_interception_mode = "TPROXY".into();
    }));
    v
}
