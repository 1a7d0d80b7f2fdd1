//! The pod a hook runs for, and `PodTables`, the decision model's set lookups, backed by that
//! pod's entries in the maps (`interceptor_common::decision` calls them; it never sees a map).

use aya_ebpf::{maps::lpm_trie::Key, maps::LpmTrie, EbpfContext};
use interceptor_common::{
    decision::{Addr, PodPolicy, PodTables},
    maps::{
        proxy_mark_pod, AddrKey, Cidr4Data, Cidr6Data, GroupKey, PortKey, ADDR_DNS, ADDR_LOCAL,
        PORT_EXCLUDED, PORT_GUARDED, PORT_INBOUND, PORT_INCLUDED,
    },
};

use crate::{
    ctx::netns_cookie,
    maps::{
        netns_helper, ADDRS, CIDR4_EXCL, CIDR4_INCL, CIDR6_EXCL, CIDR6_INCL, GROUPS, POD_NETNS,
        POD_POLICY, PORTS,
    },
};

/// The policy of the pod with this netns cookie, if it is meshed.
#[inline(always)]
pub fn policy(netns: u64) -> Option<&'static PodPolicy> {
    // SAFETY: read during this run only. `POD_POLICY` is preallocated, so a removal racing this
    // lookup could let the element be reused for another registration while it is read (aya's
    // caveat): that would decide one connection of a pod that is being removed anyway.
    unsafe { POD_POLICY.get(&netns) }
}

/// The pod whose netns the current hook runs in, if it is meshed.
#[inline(always)]
pub fn pod_of<C: EbpfContext>(ctx: &C) -> Option<(u64, &'static PodPolicy)> {
    let netns = netns_cookie(ctx);
    policy(netns).map(|p| (netns, p))
}

/// The netns cookie of the pod registered with id `pod_id`, if one is.
#[inline(always)]
pub fn pod_netns(pod_id: u32) -> Option<u64> {
    POD_NETNS.get(pod_id).copied().filter(|c| *c != 0)
}

/// The netns cookie of the pod a socket of the proxy belongs to, from its `SK_PROXY` mark:
/// sock_ops and getsockopt cannot read the netns cookie before 5.15. A mark of an earlier
/// version names no pod; it is resolved from the netns cookie where the hook can read it.
#[inline(always)]
pub fn proxy_netns<C: EbpfContext>(ctx: &C, mark: u32) -> Option<u64> {
    match proxy_mark_pod(mark) {
        Some(id) => pod_netns(id),
        None if netns_helper() => Some(netns_cookie(ctx)),
        None => None,
    }
}

/// `proxy_netns`, and that pod's policy if it is meshed.
#[inline(always)]
pub fn pod_of_proxy<C: EbpfContext>(ctx: &C, mark: u32) -> Option<(u64, &'static PodPolicy)> {
    let netns = proxy_netns(ctx, mark)?;
    policy(netns).map(|p| (netns, p))
}

/// The decision model's set lookups, backed by this pod's map entries.
pub struct MapTables {
    pub pod_id: u32,
}

impl MapTables {
    #[inline(always)]
    fn port(&self, port: u16, kind: u16) -> bool {
        // SAFETY: only whether an entry exists is used; the value is never read.
        unsafe {
            PORTS.get(&PortKey {
                pod_id: self.pod_id,
                port,
                kind,
            })
        }
        .is_some()
    }

    #[inline(always)]
    fn addr(&self, kind: u32, a: Addr) -> bool {
        // SAFETY: as in `port`.
        unsafe {
            ADDRS.get(&AddrKey {
                pod_id: self.pod_id,
                kind,
                addr: a.0,
            })
        }
        .is_some()
    }

    #[inline(always)]
    fn cidr(&self, a: Addr, v4: &LpmTrie<Cidr4Data, u8>, v6: &LpmTrie<Cidr6Data, u8>) -> bool {
        let id = self.pod_id.to_be_bytes();
        let b = a.0;
        if a.is_v4() {
            let data = [id[0], id[1], id[2], id[3], b[12], b[13], b[14], b[15]];
            v4.get(Key::new(64, data)).is_some()
        } else {
            let mut data = [0u8; 20];
            data[..4].copy_from_slice(&id);
            data[4..].copy_from_slice(&b);
            v6.get(Key::new(160, data)).is_some()
        }
    }
}

impl PodTables for MapTables {
    #[inline(always)]
    fn port_excluded(&self, port: u16) -> bool {
        self.port(port, PORT_EXCLUDED)
    }
    #[inline(always)]
    fn port_included(&self, port: u16) -> bool {
        self.port(port, PORT_INCLUDED)
    }
    #[inline(always)]
    fn cidr_excluded(&self, dst: Addr) -> bool {
        self.cidr(dst, &CIDR4_EXCL, &CIDR6_EXCL)
    }
    #[inline(always)]
    fn cidr_included(&self, dst: Addr) -> bool {
        self.cidr(dst, &CIDR4_INCL, &CIDR6_INCL)
    }
    #[inline(always)]
    fn is_local(&self, dst: Addr) -> bool {
        self.addr(ADDR_LOCAL, dst)
    }
    #[inline(always)]
    fn is_dns_server(&self, dst: Addr) -> bool {
        self.addr(ADDR_DNS, dst)
    }
    #[inline(always)]
    fn group_listed(&self, gid: u32) -> bool {
        // SAFETY: as in `port`.
        unsafe {
            GROUPS.get(&GroupKey {
                pod_id: self.pod_id,
                gid,
            })
        }
        .is_some()
    }
    #[inline(always)]
    fn inbound_port_listed(&self, port: u16) -> bool {
        self.port(port, PORT_INBOUND)
    }
    #[inline(always)]
    fn proxy_port_guarded(&self, port: u16) -> bool {
        self.port(port, PORT_GUARDED)
    }
}
