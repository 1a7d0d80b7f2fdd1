//! interceptor's kernel programs. Attached once at the cgroup v2 root, they serve every pod
//! registered in `POD_POLICY` (keyed by netns cookie); a netns without an entry is untouched.
//!
//! - `ic_connect4` / `ic_connect6`: Istio's ISTIO_OUTPUT decision (interceptor_common::decision)
//!   and, on redirect, the rewrite to the proxy on loopback plus the original destination.
//! - `ic_sockops`: moves the original destination to a tuple key the proxy's socket can find,
//!   and forgets both when the connection closes.
//! - `ic_getsockopt`: answers SO_ORIGINAL_DST / IP6T_SO_ORIGINAL_DST on the proxy's socket.
//! - `ic_getpeername4` / `6`: the app sees the original peer, as with NAT.
#![no_std]
#![no_main]

use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};

use aya_ebpf::{
    bindings::{bpf_sock, BPF_SOCK_OPS_STATE_CB_FLAG},
    helpers::{bpf_get_current_uid_gid, bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::{cgroup_sock_addr, cgroup_sockopt, map, sock_ops},
    maps::{lpm_trie::Key, HashMap, LpmTrie, LruHashMap},
    programs::{SockAddrContext, SockOpsContext, SockoptContext},
    EbpfContext,
};
use aya_log_ebpf::info;
use interceptor_common::{
    decision::{decide, Addr, Conn, PodPolicy, PodTables, Proto, Verdict},
    maps::{
        mapped_v4, v6_bytes, AddrKey, Cidr4Data, Cidr6Data, GroupKey, OrigDst, PortKey, TupleKey,
        ADDR_DNS, ADDR_LOCAL, PORT_EXCLUDED, PORT_INCLUDED,
    },
};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const IPPROTO_TCP: u32 = 6;
const IPPROTO_UDP: u32 = 17;
const SOL_IP: i32 = 0;
const SOL_IPV6: i32 = 41;
const SO_ORIGINAL_DST: i32 = 80;
const SOCK_OPS_TCP_CONNECT_CB: u32 = 3;
const SOCK_OPS_ACTIVE_ESTABLISHED_CB: u32 = 4;
const SOCK_OPS_STATE_CB: u32 = 10;
const TCP_CLOSE: u32 = 7;

const MAX_PODS: u32 = 4096;

/// Set by the loader (`--ebpf-log`). It lives in .rodata, which the loader freezes, so the
/// verifier knows its value and prunes every log call when it is 0: the hot path pays nothing.
#[unsafe(no_mangle)]
static LOG_ENABLED: u8 = 0;

#[inline(always)]
fn log_enabled() -> bool {
    unsafe { core::ptr::read_volatile(&LOG_ENABLED) != 0 }
}

#[map]
static POD_POLICY: HashMap<u64, PodPolicy> = HashMap::with_max_entries(MAX_PODS, 0);
#[map]
static PORTS: HashMap<PortKey, u8> = HashMap::with_max_entries(65536, 0);
#[map]
static ADDRS: HashMap<AddrKey, u8> = HashMap::with_max_entries(16384, 0);
#[map]
static GROUPS: HashMap<GroupKey, u8> = HashMap::with_max_entries(16384, 0);
#[map]
static CIDR4_EXCL: LpmTrie<Cidr4Data, u8> = LpmTrie::with_max_entries(65536, 0);
#[map]
static CIDR4_INCL: LpmTrie<Cidr4Data, u8> = LpmTrie::with_max_entries(65536, 0);
#[map]
static CIDR6_EXCL: LpmTrie<Cidr6Data, u8> = LpmTrie::with_max_entries(65536, 0);
#[map]
static CIDR6_INCL: LpmTrie<Cidr6Data, u8> = LpmTrie::with_max_entries(65536, 0);
/// Socket cookie → original destination, for the life of the app's connection. LRU only as a
/// safety net: entries are removed when the connection closes.
#[map]
static ORIG_BY_COOKIE: LruHashMap<u64, OrigDst> = LruHashMap::with_max_entries(65536, 0);
/// Tuple → original destination, what the proxy's accepted socket can look up.
#[map]
static ORIG_BY_TUPLE: LruHashMap<TupleKey, OrigDst> = LruHashMap::with_max_entries(65536, 0);

/// The decision model's set lookups, backed by this pod's map entries.
struct MapTables {
    pod_id: u32,
}

impl MapTables {
    #[inline(always)]
    fn addr_key(&self, kind: u32, a: Addr) -> AddrKey {
        let addr = match a {
            Addr::V4(h) => mapped_v4(h.to_be()),
            Addr::V6(b) => b,
        };
        AddrKey {
            pod_id: self.pod_id,
            kind,
            addr,
        }
    }

    #[inline(always)]
    fn cidr(&self, a: Addr, v4: &LpmTrie<Cidr4Data, u8>, v6: &LpmTrie<Cidr6Data, u8>) -> bool {
        let id = self.pod_id.to_be_bytes();
        match a {
            Addr::V4(h) => {
                let b = h.to_be_bytes();
                let data = [id[0], id[1], id[2], id[3], b[0], b[1], b[2], b[3]];
                v4.get(Key::new(64, data)).is_some()
            }
            Addr::V6(b) => {
                let mut data = [0u8; 20];
                data[..4].copy_from_slice(&id);
                data[4..].copy_from_slice(&b);
                v6.get(Key::new(160, data)).is_some()
            }
        }
    }
}

impl PodTables for MapTables {
    #[inline(always)]
    fn port_excluded(&self, port: u16) -> bool {
        unsafe {
            PORTS.get(&PortKey {
                pod_id: self.pod_id,
                port,
                kind: PORT_EXCLUDED,
            })
        }
        .is_some()
    }
    #[inline(always)]
    fn port_included(&self, port: u16) -> bool {
        unsafe {
            PORTS.get(&PortKey {
                pod_id: self.pod_id,
                port,
                kind: PORT_INCLUDED,
            })
        }
        .is_some()
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
        unsafe { ADDRS.get(&self.addr_key(ADDR_LOCAL, dst)) }.is_some()
    }
    #[inline(always)]
    fn is_dns_server(&self, dst: Addr) -> bool {
        unsafe { ADDRS.get(&self.addr_key(ADDR_DNS, dst)) }.is_some()
    }
    #[inline(always)]
    fn group_listed(&self, gid: u32) -> bool {
        unsafe {
            GROUPS.get(&GroupKey {
                pod_id: self.pod_id,
                gid,
            })
        }
        .is_some()
    }
}

#[cgroup_sock_addr(connect4)]
pub fn ic_connect4(ctx: SockAddrContext) -> i32 {
    on_connect(&ctx, false);
    1
}

#[cgroup_sock_addr(connect6)]
pub fn ic_connect6(ctx: SockAddrContext) -> i32 {
    on_connect(&ctx, true);
    1
}

#[inline(always)]
fn on_connect(ctx: &SockAddrContext, v6: bool) {
    let sa = ctx.sock_addr;
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let Some(policy) = (unsafe { POD_POLICY.get(&netns) }) else {
        return;
    };
    let proto = match unsafe { (*sa).protocol } {
        IPPROTO_TCP => Proto::Tcp,
        IPPROTO_UDP => Proto::Udp,
        _ => return,
    };
    let (dst, family) = if v6 {
        (
            Addr::V6(v6_bytes(unsafe { (*sa).user_ip6 })).unmapped(),
            AF_INET6,
        )
    } else {
        (Addr::V4(u32::from_be(unsafe { (*sa).user_ip4 })), AF_INET)
    };
    let dport = u16::from_be(unsafe { (*sa).user_port } as u16);
    // The bound source, if any (Envoy binds 127.0.0.6 for its inbound passthrough).
    let sk: *mut bpf_sock = unsafe { (*sa).__bindgen_anon_1.sk };
    let src = if sk.is_null() {
        None
    } else if v6 {
        let w = unsafe {
            [
                read_volatile(addr_of!((*sk).src_ip6[0])),
                read_volatile(addr_of!((*sk).src_ip6[1])),
                read_volatile(addr_of!((*sk).src_ip6[2])),
                read_volatile(addr_of!((*sk).src_ip6[3])),
            ]
        };
        let s = Addr::V6(v6_bytes(w)).unmapped();
        (s != Addr::V6([0; 16]) && s != Addr::V4(0)).then_some(s)
    } else {
        let s = unsafe { read_volatile(addr_of!((*sk).src_ip4)) };
        (s != 0).then_some(Addr::V4(u32::from_be(s)))
    };
    let ug = bpf_get_current_uid_gid();
    let conn = Conn {
        proto,
        dst,
        dport,
        src,
        uid: ug as u32,
        gid: (ug >> 32) as u32,
    };
    let verdict = decide(
        policy,
        &MapTables {
            pod_id: policy.pod_id,
        },
        &conn,
    );
    if log_enabled() {
        let (port, reason) = match verdict {
            Verdict::Redirect { port, reason } => (port, reason as u32),
            Verdict::Pass(reason) => (0, reason as u32),
        };
        info!(
            ctx,
            "connect netns={} uid={} dport={} -> port={} rule={}",
            netns,
            conn.uid,
            dport,
            port,
            reason
        );
    }
    let Verdict::Redirect { port, .. } = verdict else {
        return;
    };
    let addr = match dst {
        Addr::V4(h) => mapped_v4(h.to_be()),
        Addr::V6(b) => b,
    };
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let orig = OrigDst {
        addr,
        port: dport,
        redirect_port: port,
        family,
    };
    if ORIG_BY_COOKIE.insert(&cookie, &orig, 0).is_err() {
        // Without the original destination the proxy could not route it: leave it alone.
        return;
    }
    unsafe {
        if v6 {
            // v4-mapped destinations stay v4 on the wire: go to ::ffff:127.0.0.1, else ::1.
            let lo: [u32; 4] = if matches!(dst, Addr::V4(_)) {
                [0, 0, 0xffffu32.to_be(), 0x7f00_0001u32.to_be()]
            } else {
                [0, 0, 0, 1u32.to_be()]
            };
            let ip6 = addr_of_mut!((*sa).user_ip6);
            write_volatile(ip6.cast::<u32>(), lo[0]);
            write_volatile(ip6.cast::<u32>().add(1), lo[1]);
            write_volatile(ip6.cast::<u32>().add(2), lo[2]);
            write_volatile(ip6.cast::<u32>().add(3), lo[3]);
        } else {
            write_volatile(addr_of_mut!((*sa).user_ip4), 0x7f00_0001u32.to_be());
        }
        write_volatile(addr_of_mut!((*sa).user_port), u32::from(port.to_be()));
    }
}

#[sock_ops]
pub fn ic_sockops(ctx: SockOpsContext) -> u32 {
    let op = ctx.op();
    if op != SOCK_OPS_TCP_CONNECT_CB
        && op != SOCK_OPS_ACTIVE_ESTABLISHED_CB
        && op != SOCK_OPS_STATE_CB
    {
        return 1;
    }
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(orig) = (unsafe { ORIG_BY_COOKIE.get(&cookie) }) else {
        return 1;
    };
    let orig = *orig;
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // Read every context field once with a volatile load: LLVM otherwise selects between field
    // addresses and the verifier rejects dereferencing a modified ctx pointer.
    let ops = ctx.ops;
    let (family, ip4, ip6_tail, lport) = unsafe {
        (
            read_volatile(addr_of!((*ops).family)),
            read_volatile(addr_of!((*ops).local_ip4)),
            read_volatile(addr_of!((*ops).local_ip6[3])),
            read_volatile(addr_of!((*ops).local_port)),
        )
    };
    let key = TupleKey {
        netns,
        client_addr_tail: if family == AF_INET6 { ip6_tail } else { ip4 },
        client_port: lport,
        proxy_port: u32::from(orig.redirect_port),
        _pad: 0,
    };
    match op {
        // Ask for state callbacks so the entries go away when the connection does, even if
        // it never establishes.
        SOCK_OPS_TCP_CONNECT_CB => {
            let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
        }
        SOCK_OPS_ACTIVE_ESTABLISHED_CB => {
            let _ = ORIG_BY_TUPLE.insert(&key, &orig, 0);
        }
        _ => {
            if ctx.arg(1) == TCP_CLOSE {
                let _ = ORIG_BY_TUPLE.remove(&key);
                let _ = ORIG_BY_COOKIE.remove(&cookie);
            }
        }
    }
    1
}

#[cgroup_sockopt(getsockopt)]
pub fn ic_getsockopt(ctx: SockoptContext) -> i32 {
    let so = ctx.sockopt;
    unsafe {
        let level = (*so).level;
        if (*so).optname != SO_ORIGINAL_DST || (level != SOL_IP && level != SOL_IPV6) {
            return 1;
        }
        let sk = (*so).__bindgen_anon_1.sk;
        if sk.is_null() {
            return 1;
        }
        // One constant-offset load per field: the verifier forbids arithmetic on sock pointers.
        let family = read_volatile(addr_of!((*sk).family));
        // Load both, then choose: a branch would let LLVM select the offset instead.
        let tail6 = read_volatile(addr_of!((*sk).dst_ip6[3]));
        let tail4 = read_volatile(addr_of!((*sk).dst_ip4));
        let client_addr_tail = if family == AF_INET6 { tail6 } else { tail4 };
        // On the proxy's accepted socket the peer is the app's socket.
        let key = TupleKey {
            netns: bpf_get_netns_cookie(ctx.as_ptr()),
            client_addr_tail,
            client_port: u32::from(u16::from_be(read_volatile(addr_of!((*sk).dst_port)))),
            proxy_port: read_volatile(addr_of!((*sk).src_port)),
            _pad: 0,
        };
        let Some(orig) = ORIG_BY_TUPLE.get(&key) else {
            return 1;
        };
        let optval = (*so).__bindgen_anon_2.optval as *mut u8;
        let end = (*so).__bindgen_anon_3.optval_end as *mut u8;
        let v4 = orig.addr[..12] == [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff];
        if level == SOL_IP && v4 {
            // struct sockaddr_in
            if optval.add(16) > end {
                return 1;
            }
            write_volatile(optval.cast::<u16>(), AF_INET as u16);
            write_volatile(optval.add(2).cast::<u16>(), orig.port.to_be());
            let mut i = 0;
            while i < 4 {
                write_volatile(optval.add(4 + i), orig.addr[12 + i]);
                i += 1;
            }
            write_volatile(optval.add(8).cast::<u64>(), 0);
            write_volatile(addr_of_mut!((*so).optlen), 16);
        } else if level == SOL_IPV6 && !v4 {
            // struct sockaddr_in6
            if optval.add(28) > end {
                return 1;
            }
            write_volatile(optval.cast::<u16>(), AF_INET6 as u16);
            write_volatile(optval.add(2).cast::<u16>(), orig.port.to_be());
            write_volatile(optval.add(4).cast::<u32>(), 0);
            let mut i = 0;
            while i < 16 {
                write_volatile(optval.add(8 + i), orig.addr[i]);
                i += 1;
            }
            write_volatile(optval.add(24).cast::<u32>(), 0);
            write_volatile(addr_of_mut!((*so).optlen), 28);
        } else {
            return 1;
        }
        write_volatile(addr_of_mut!((*so).retval), 0);
    }
    1
}

#[cgroup_sock_addr(getpeername4)]
pub fn ic_getpeername4(ctx: SockAddrContext) -> i32 {
    on_getpeername(&ctx, false);
    1
}

#[cgroup_sock_addr(getpeername6)]
pub fn ic_getpeername6(ctx: SockAddrContext) -> i32 {
    on_getpeername(&ctx, true);
    1
}

#[inline(always)]
fn on_getpeername(ctx: &SockAddrContext, v6: bool) {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(orig) = (unsafe { ORIG_BY_COOKIE.get(&cookie) }) else {
        return;
    };
    let sa = ctx.sock_addr;
    unsafe {
        if v6 {
            let ip6 = addr_of_mut!((*sa).user_ip6).cast::<u32>();
            let mut i = 0;
            while i < 4 {
                let w = u32::from_ne_bytes([
                    orig.addr[i * 4],
                    orig.addr[i * 4 + 1],
                    orig.addr[i * 4 + 2],
                    orig.addr[i * 4 + 3],
                ]);
                write_volatile(ip6.add(i), w);
                i += 1;
            }
        } else {
            let w =
                u32::from_ne_bytes([orig.addr[12], orig.addr[13], orig.addr[14], orig.addr[15]]);
            write_volatile(addr_of_mut!((*sa).user_ip4), w);
        }
        write_volatile(addr_of_mut!((*sa).user_port), u32::from(orig.port.to_be()));
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
