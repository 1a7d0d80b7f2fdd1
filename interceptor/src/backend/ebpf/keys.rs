//! Which keys one pod's registration writes, from its policy tables: pure, so it is tested
//! without a kernel.

use std::net::IpAddr;

use aya::maps::lpm_trie::Key;
use interceptor_common::maps::{
    mapped_v4, AddrKey, Cidr4Data, Cidr6Data, GroupKey, PortKey, ADDR_DNS, ADDR_LOCAL,
    PORT_EXCLUDED, PORT_GUARDED, PORT_INBOUND, PORT_INCLUDED,
};
use interceptor_common::policy;
use ipnet::IpNet;

pub(super) fn v4_cidr_key(pod_id: u32, net: &ipnet::Ipv4Net) -> Key<Cidr4Data> {
    let id = pod_id.to_be_bytes();
    let a = net.network().octets();
    Key::new(
        32 + u32::from(net.prefix_len()),
        [id[0], id[1], id[2], id[3], a[0], a[1], a[2], a[3]],
    )
}

pub(super) fn v6_cidr_key(pod_id: u32, net: &ipnet::Ipv6Net) -> Key<Cidr6Data> {
    let mut d = [0u8; 20];
    d[..4].copy_from_slice(&pod_id.to_be_bytes());
    d[4..].copy_from_slice(&net.network().octets());
    Key::new(32 + u32::from(net.prefix_len()), d)
}

/// The LPM keys of the pod's excluded and included CIDRs (v4, v6), in table order.
pub(super) fn cidr_keys(
    pod_id: u32,
    t: &policy::MemTables,
) -> (Vec<Key<Cidr4Data>>, Vec<Key<Cidr6Data>>) {
    let (mut k4, mut k6) = (Vec::new(), Vec::new());
    for net in t.cidrs_excluded.iter().chain(&t.cidrs_included) {
        match net {
            IpNet::V4(n) => k4.push(v4_cidr_key(pod_id, n)),
            IpNet::V6(n) => k6.push(v6_cidr_key(pod_id, n)),
        }
    }
    (k4, k6)
}

pub(super) fn addr16(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(a) => mapped_v4(u32::from_ne_bytes(a.octets())),
        IpAddr::V6(a) => a.octets(),
    }
}

/// The hash-map keys one pod's registration writes.
pub(super) struct Keys {
    pub(super) ports: Vec<PortKey>,
    pub(super) addrs: Vec<AddrKey>,
    pub(super) groups: Vec<GroupKey>,
}

impl Keys {
    pub(super) fn of(pod_id: u32, t: &policy::MemTables) -> Self {
        let port = |kind| {
            move |p: &u16| PortKey {
                pod_id,
                port: *p,
                kind,
            }
        };
        let ports = t
            .ports_excluded
            .iter()
            .map(port(PORT_EXCLUDED))
            .chain(t.ports_included.iter().map(port(PORT_INCLUDED)))
            .chain(t.inbound_ports.iter().map(port(PORT_INBOUND)))
            .chain(t.guarded_ports.iter().map(port(PORT_GUARDED)))
            .collect();
        let addr = |kind| {
            move |a: &IpAddr| AddrKey {
                pod_id,
                kind,
                addr: addr16(*a),
            }
        };
        let addrs = t
            .local
            .iter()
            .map(addr(ADDR_LOCAL))
            .chain(t.dns_servers.iter().map(addr(ADDR_DNS)))
            .collect();
        let groups = t
            .groups
            .iter()
            .map(|gid| GroupKey { pod_id, gid: *gid })
            .collect();
        Self {
            ports,
            addrs,
            groups,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use interceptor_common::config::{CidrSelection, Config};

    use super::*;

    fn tables() -> policy::MemTables {
        let cfg = Config {
            outbound_ports_exclude: vec![22, 8080],
            outbound_ip_ranges_exclude: vec!["10.1.0.0/16".parse().unwrap()],
            outbound_ip_ranges_include: CidrSelection::List(vec!["2001:db8::/32".parse().unwrap()]),
            enable_ipv6: true,
            ..Config::default()
        };
        let local: IpAddr = "10.0.0.5".parse().unwrap();
        policy::MemTables::new(&cfg, &[local], &[1337, 1338])
    }

    #[test]
    fn every_key_carries_the_pod_id() {
        let t = tables();
        let k = Keys::of(7, &t);
        assert!(k.ports.iter().all(|p| p.pod_id == 7));
        assert!(k.addrs.iter().all(|a| a.pod_id == 7));
        assert!(k.groups.iter().all(|g| g.pod_id == 7));
        assert_eq!(
            k.ports.len(),
            t.ports_excluded.len()
                + t.ports_included.len()
                + t.inbound_ports.len()
                + t.guarded_ports.len()
        );
        let excluded: Vec<u16> = k
            .ports
            .iter()
            .filter(|p| p.kind == PORT_EXCLUDED)
            .map(|p| p.port)
            .collect();
        assert_eq!(excluded.len(), 2);
        assert!(excluded.contains(&22) && excluded.contains(&8080));
        let mut gids: Vec<u32> = k.groups.iter().map(|g| g.gid).collect();
        gids.sort_unstable();
        assert_eq!(gids, [1337, 1338]);
        let local = k.addrs.iter().find(|a| a.kind == ADDR_LOCAL).unwrap();
        assert_eq!(
            local.addr,
            Ipv4Addr::new(10, 0, 0, 5).to_ipv6_mapped().octets()
        );
    }

    #[test]
    fn cidr_keys_are_pod_id_then_network() {
        let k = v4_cidr_key(0x0102_0304, &"10.1.2.3/16".parse().unwrap());
        assert_eq!(k.prefix_len(), 32 + 16);
        assert_eq!(k.data(), [1, 2, 3, 4, 10, 1, 0, 0]);
        let k = v6_cidr_key(9, &"2001:db8::1/32".parse().unwrap());
        assert_eq!(k.prefix_len(), 32 + 32);
        assert_eq!(k.data()[..4], [0, 0, 0, 9]);
        assert_eq!(
            k.data()[4..],
            "2001:db8::".parse::<Ipv6Addr>().unwrap().octets()
        );
        let (k4, k6) = cidr_keys(5, &tables());
        assert_eq!(k4.len(), 1);
        assert_eq!(k6.len(), 1);
        assert_eq!(k4[0].data()[..4], [0, 0, 0, 5]);
    }

    #[test]
    fn v4_addresses_are_stored_v4_mapped() {
        let a = Ipv4Addr::new(127, 0, 0, 6);
        assert_eq!(addr16(a.into()), a.to_ipv6_mapped().octets());
        let b: Ipv6Addr = "fd00::1".parse().unwrap();
        assert_eq!(addr16(b.into()), b.octets());
    }
}
