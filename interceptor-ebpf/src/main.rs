//! interceptor's kernel programs. Attached once at the cgroup v2 root, they serve every pod
//! registered in `POD_POLICY` (keyed by netns cookie); a netns without an entry is untouched.
//! Every verdict comes from `interceptor_common::decision`, the model userspace uses too.
//!
//! - `ic_connect4/6`: Istio's ISTIO_OUTPUT decision; on redirect, the rewrite to the proxy on
//!   loopback plus the original destination (TCP, and UDP DNS on connected sockets).
//! - `ic_sendmsg4/6`, `ic_recvmsg4/6`: DNS on unconnected UDP sockets, replies restored to come
//!   from the original server.
//! - `ic_sockops`: hands the original destination to the proxy's accepted socket through a
//!   tuple entry (a bounded per-pod quota of them, see `TUPLE_COUNT`); registers the proxy's
//!   inbound listener.
//! - `ic_getsockopt`: answers SO_ORIGINAL_DST / IP6T_SO_ORIGINAL_DST, on the proxy's sockets only.
//!
//! Per-socket state lives in socket-local storage (`sk.rs`): freed with its socket, with no
//! node-wide capacity one pod could use up. Only the app→proxy handover needs a shared map,
//! `ORIG_BY_TUPLE`, where each pod has a quota.
//! - `ic_getpeername4/6`: the app sees the original peer, as with NAT.
//! - `ic_sk_lookup`: inbound connections to captured ports of any non-loopback local address
//!   are handed to the proxy's listener, keeping the original local address and the client's
//!   address. It is not attached itself: each pod netns gets a tiny program of its own (built
//!   by the loader, interceptor/src/backend/sk_lookup.rs) that stores the pod's netns cookie in
//!   `INBOUND_NETNS` and tail-calls it through `INBOUND_PROG`.
//! - `ic_bind4/6`: only the proxy may bind the proxy's ports.
//! - `ic_sk_msg` (`--accelerate` pods): data on an app↔proxy loopback connection goes straight
//!   to the peer socket's receive queue; sockops puts both ends into `ACCEL`.
#![no_std]
#![no_main]
// BPF's atomic add (core has no atomic read-modify-write for this target): `tuple_count_add`.
#![feature(asm_experimental_arch)]

mod sk;

use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};

use aya_ebpf::{
    bindings::{bpf_sock, bpf_sock_addr, sk_action, BPF_NOEXIST, BPF_SOCK_OPS_STATE_CB_FLAG},
    helpers::{bpf_get_current_uid_gid, bpf_get_netns_cookie},
    macros::{btf_map, cgroup_sock_addr, cgroup_sockopt, map, sk_lookup, sk_msg, sock_ops},
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, PerCpuArray, ProgramArray, SockHash},
    programs::{SkLookupContext, SkMsgContext, SockAddrContext, SockOpsContext, SockoptContext},
    EbpfContext,
};
use aya_log_ebpf::info;
use interceptor_common::decision::Reason;
use interceptor_common::{
    decision::{
        accelerated, bind_allowed, decide, decide_inbound, is_proxy, kernel_dst, Addr, Conn,
        PodPolicy, PodTables, Proto, Verdict,
    },
    maps::{
        capacity, mapped_v4, stat, v6_bytes, AddrKey, Cidr4Data, Cidr6Data, GroupKey, OrigDst,
        PortKey, SockKey, SockOrig, TupleKey, ADDR_DNS, ADDR_LOCAL, PORT_EXCLUDED, PORT_GUARDED,
        PORT_INBOUND, PORT_INCLUDED, SOCK_ANSWER, SOCK_APP, SOCK_TUPLE,
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
const SOCK_OPS_PASSIVE_ESTABLISHED_CB: u32 = 5;
const BPF_F_INGRESS: u64 = 1;
const SK_PASS: u32 = 1;
const SK_DROP: u32 = 0;
const SOCK_OPS_STATE_CB: u32 = 10;
const SOCK_OPS_TCP_LISTEN_CB: u32 = 11;
const TCP_CLOSE: u32 = 7;
const DNS_PORT: u16 = 53;

const MAX_PODS: u32 = capacity::MAX_PODS;
/// Hash maps whose memory follows their use (only buckets are allocated at creation).
const BPF_F_NO_PREALLOC: u32 = 1;

/// Set by the loader (`--ebpf-log`). It lives in .rodata, which the loader freezes, so the
/// verifier knows its value and prunes every log call when it is 0: the hot path pays nothing.
#[unsafe(no_mangle)]
static LOG_ENABLED: u8 = 0;

#[inline(always)]
fn log_enabled() -> bool {
    unsafe { read_volatile(&LOG_ENABLED) != 0 }
}

/// Set by the loader; like LOG_ENABLED, 0 prunes counting entirely (used to measure its cost).
#[unsafe(no_mangle)]
static COUNT_ENABLED: u8 = 1;

/// Test-only fault injection (`INTERCEPTOR_FAULT=store:<port>`): a redirected connection to
/// this destination port behaves as if storing its original destination failed. Frozen like
/// LOG_ENABLED, so at 0 (always, outside tests) the verifier prunes the check.
#[unsafe(no_mangle)]
static FAULT_STORE_PORT: u16 = 0;

/// `ORIG_BY_TUPLE` entries one pod may hold (`capacity::TUPLE_QUOTA`; lowered by tests).
/// Frozen like LOG_ENABLED.
#[unsafe(no_mangle)]
static TUPLE_QUOTA: u64 = capacity::TUPLE_QUOTA as u64;

#[inline(always)]
fn tuple_quota() -> u64 {
    unsafe { read_volatile(&TUPLE_QUOTA) }
}

#[inline(always)]
fn store_fault(port: u16) -> bool {
    let p = unsafe { read_volatile(&FAULT_STORE_PORT) };
    p != 0 && p == port
}

/// Per-pod counters, per CPU (no atomics, no cache-line bouncing): see `maps::stat`.
#[map]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stat::MAX_PODS * stat::PER_POD, 0);

#[inline(always)]
fn count(pod_id: u32, counter: u32) {
    if unsafe { read_volatile(&COUNT_ENABLED) } == 0 {
        return;
    }
    if let Some(i) = stat::index(pod_id, counter) {
        if let Some(v) = STATS.get_ptr_mut(i) {
            unsafe { *v += 1 };
        }
    }
}

#[map]
static POD_POLICY: HashMap<u64, PodPolicy> = HashMap::with_max_entries(MAX_PODS, 0);
#[map]
static PORTS: HashMap<PortKey, u8> = HashMap::with_max_entries(capacity::PORTS, BPF_F_NO_PREALLOC);
#[map]
static ADDRS: HashMap<AddrKey, u8> = HashMap::with_max_entries(capacity::ADDRS, BPF_F_NO_PREALLOC);
#[map]
static GROUPS: HashMap<GroupKey, u8> =
    HashMap::with_max_entries(capacity::GROUPS, BPF_F_NO_PREALLOC);
#[map]
static CIDR4_EXCL: LpmTrie<Cidr4Data, u8> = LpmTrie::with_max_entries(capacity::CIDRS, 0);
#[map]
static CIDR4_INCL: LpmTrie<Cidr4Data, u8> = LpmTrie::with_max_entries(capacity::CIDRS, 0);
#[map]
static CIDR6_EXCL: LpmTrie<Cidr6Data, u8> = LpmTrie::with_max_entries(capacity::CIDRS, 0);
#[map]
static CIDR6_INCL: LpmTrie<Cidr6Data, u8> = LpmTrie::with_max_entries(capacity::CIDRS, 0);
/// Tuple → original destination of an app→proxy connection, from the app's connect until the
/// proxy's socket for it is established (then it moves into that socket's `SK_ORIG`), or the
/// app's socket closes. A plain hash: entries are never evicted; each pod may hold at most
/// `TUPLE_QUOTA` (counted in `TUPLE_COUNT`), and the capacity is every pod at its quota.
#[map]
static ORIG_BY_TUPLE: HashMap<TupleKey, SockOrig> =
    HashMap::with_max_entries(capacity::TUPLES, BPF_F_NO_PREALLOC);
/// Per pod (by id): its entries in `ORIG_BY_TUPLE`.
#[map]
static TUPLE_COUNT: Array<u64> = Array::with_max_entries(MAX_PODS, 0);
/// Per socket: the original destination of the app's redirected socket (TCP, and UDP DNS),
/// or the answer to SO_ORIGINAL_DST on the proxy's accepted socket.
#[btf_map]
static SK_ORIG: sk::SkStorage<SockOrig, { sk::NO_PREALLOC }> = sk::SkStorage::new();
/// Sockets of the proxy: bound by a proxy uid/gid (or adopted by the loader), and, cloned by the
/// kernel, every socket their listeners accept. Only these get SO_ORIGINAL_DST answered.
#[btf_map]
static SK_PROXY: sk::SkStorage<u32, { sk::CLONED }> = sk::SkStorage::new();
/// `[0]`: the netns cookie of the pod whose sk_lookup program runs on this CPU right now
/// (sk_lookup cannot read the netns cookie itself). Written by the pod's own program just before
/// it tail-calls `ic_sk_lookup`; TCP lookups run in softirq, which does not nest on a CPU, so
/// nothing can overwrite the slot in between.
#[map]
static INBOUND_NETNS: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);
/// `[0]`: `ic_sk_lookup`, the tail call target of every pod's sk_lookup program. Not used by
/// the programs of this object: the per-pod programs refer to it by fd.
#[map]
static INBOUND_PROG: ProgramArray = ProgramArray::with_max_entries(1, 0);
/// The proxy's inbound listeners: key `pod_id * 2 + (family is IPv6)`.
#[map]
static LISTENERS: SockHash<u32> = SockHash::with_max_entries(MAX_PODS, 0);

/// Both ends of accelerated connections (`--accelerate`); the kernel drops a socket from it when
/// the socket closes, so it empties by itself.
#[map]
static ACCEL: SockHash<SockKey> = SockHash::with_max_entries(65536, 0);
/// `[0]`: how many registered pods asked for acceleration. 0 (the default) keeps the
/// established callbacks at one array load for everybody else.
#[map]
static ACCEL_ON: Array<u32> = Array::with_max_entries(1, 0);
/// Sockets that sent a message while their peer was not in `ACCEL` yet: that message took the
/// TCP path, so every later one must too, or a redirected message could overtake it.
#[btf_map]
static SK_ACCEL: sk::SkStorage<u32, { sk::NO_PREALLOC }> = sk::SkStorage::new();

/// The decision model's set lookups, backed by this pod's map entries.
struct MapTables {
    pod_id: u32,
}

impl MapTables {
    #[inline(always)]
    fn port(&self, port: u16, kind: u16) -> bool {
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

/// The pod whose netns the current hook runs in, if it is meshed.
#[inline(always)]
fn pod_of<C: EbpfContext>(ctx: &C) -> Option<(u64, &'static PodPolicy)> {
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    unsafe { POD_POLICY.get(&netns) }.map(|p| (netns, p))
}

/// The destination a sock_addr hook was given (`user_ip4/6`, `user_port`).
#[inline(always)]
unsafe fn user_addr(sa: *mut bpf_sock_addr, v6: bool) -> (Addr, u16) {
    let dst = if v6 {
        Addr::v6(v6_bytes([
            read_volatile(addr_of!((*sa).user_ip6[0])),
            read_volatile(addr_of!((*sa).user_ip6[1])),
            read_volatile(addr_of!((*sa).user_ip6[2])),
            read_volatile(addr_of!((*sa).user_ip6[3])),
        ]))
    } else {
        Addr::v4(u32::from_be(read_volatile(addr_of!((*sa).user_ip4))))
    };
    (
        dst,
        u16::from_be(read_volatile(addr_of!((*sa).user_port)) as u16),
    )
}

/// Writes an address back into `user_ip4/6`, `user_port`. On AF_INET6 sockets an IPv4 address
/// becomes `::ffff:a.b.c.d` (it stays IPv4 on the wire).
#[inline(always)]
unsafe fn set_user_addr(sa: *mut bpf_sock_addr, v6: bool, addr: [u8; 16], port: u16) {
    if v6 {
        let ip6 = addr_of_mut!((*sa).user_ip6).cast::<u32>();
        let mut i = 0;
        while i < 4 {
            let w = u32::from_ne_bytes([
                addr[i * 4],
                addr[i * 4 + 1],
                addr[i * 4 + 2],
                addr[i * 4 + 3],
            ]);
            write_volatile(ip6.add(i), w);
            i += 1;
        }
    } else {
        let w = u32::from_ne_bytes([addr[12], addr[13], addr[14], addr[15]]);
        write_volatile(addr_of_mut!((*sa).user_ip4), w);
    }
    write_volatile(addr_of_mut!((*sa).user_port), u32::from(port.to_be()));
}

/// Loopback in the family the destination travels in.
#[inline(always)]
fn loopback_for(dst: Addr) -> [u8; 16] {
    if dst.is_v4() {
        mapped_v4(0x7f00_0001u32.to_be())
    } else {
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]
    }
}

/// What `outbound` decided.
enum Out {
    /// Not a meshed pod's TCP/UDP socket: nothing to do.
    Untouched,
    /// A meshed pod's connection left alone.
    Pass,
    /// Redirected: the original destination and proxy port, and the pod.
    Redirect(Addr, OrigDst, u32),
}

/// Decides an outbound connect/sendmsg.
#[inline(always)]
fn outbound(ctx: &SockAddrContext, v6: bool) -> Out {
    let sa = ctx.sock_addr;
    let Some((netns, policy)) = pod_of(ctx) else {
        return Out::Untouched;
    };
    let proto = match unsafe { read_volatile(addr_of!((*sa).protocol)) } {
        IPPROTO_TCP => Proto::Tcp,
        IPPROTO_UDP => Proto::Udp,
        _ => return Out::Untouched,
    };
    let (dst, dport) = unsafe { user_addr(sa, v6) };
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
        let s = Addr::v6(v6_bytes(w));
        (!s.is_unspecified()).then_some(s)
    } else {
        let s = unsafe { read_volatile(addr_of!((*sk).src_ip4)) };
        (s != 0).then_some(Addr::v4(u32::from_be(s)))
    };
    // 0.0.0.0 / :: are decided (and remembered) as the address the kernel will use instead.
    let dst = kernel_dst(dst, src);
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
    let port = match verdict {
        Verdict::Redirect { port, reason } => {
            count(
                policy.pod_id,
                if matches!(reason, Reason::Dns) {
                    stat::OUT_DNS
                } else {
                    stat::OUT_REDIRECTED
                },
            );
            port
        }
        Verdict::Pass(reason) => {
            count(policy.pod_id, stat::OUT_PASS + reason as u32);
            return Out::Pass;
        }
    };
    let family = if v6 { AF_INET6 } else { AF_INET };
    Out::Redirect(
        dst,
        OrigDst {
            addr: dst.0,
            port: dport,
            redirect_port: port,
            family,
        },
        policy.pod_id,
    )
}

/// The socket a sock_addr hook runs for.
#[inline(always)]
fn sock_of(ctx: &SockAddrContext) -> *mut bpf_sock {
    unsafe { (*ctx.sock_addr).__bindgen_anon_1.sk }
}

/// `ORIG_BY_TUPLE` entries the pod holds now.
#[inline(always)]
fn tuple_count(pod_id: u32) -> u64 {
    match TUPLE_COUNT.get_ptr(pod_id) {
        Some(c) => unsafe { read_volatile(c) },
        None => u64::MAX,
    }
}

/// Adds `delta` (wrapping: `u64::MAX` subtracts one) to the pod's tuple count, atomically.
#[inline(always)]
fn tuple_count_add(pod_id: u32, delta: u64) {
    if let Some(c) = TUPLE_COUNT.get_ptr_mut(pod_id) {
        // SAFETY: `c` is an 8-byte aligned array value, valid for the program run; BPF_ATOMIC
        // add (no fetch: any kernel) is what every writer of it uses.
        unsafe {
            core::arch::asm!(
                "lock *(u64 *)({p} + 0) += {d}",
                p = in(reg) c,
                d = in(reg) delta,
                options(nostack),
            )
        };
    }
}

/// Redirects a connect; false (the connect fails with EPERM) when the original destination
/// cannot be stored, or, for TCP, when the pod already has `TUPLE_QUOTA` connections waiting
/// for the proxy: the proxy could not answer SO_ORIGINAL_DST for it, and leaving the
/// connection alone would let it escape. Fail closed, counted.
#[inline(always)]
fn on_connect(ctx: &SockAddrContext, v6: bool) -> bool {
    let sk = sock_of(ctx);
    let (dst, orig, pod_id) = match outbound(ctx, v6) {
        Out::Untouched => return true,
        Out::Pass => {
            // A socket connected again (after connect(AF_UNSPEC)) somewhere not redirected:
            // what it stored for an earlier redirect no longer applies.
            if !sk.is_null() {
                unsafe { SK_ORIG.delete(sk) };
            }
            return true;
        }
        Out::Redirect(dst, orig, pod_id) => (dst, orig, pod_id),
    };
    let udp = unsafe { read_volatile(addr_of!((*ctx.sock_addr).protocol)) } == IPPROTO_UDP;
    // TCP: checked here so the app gets EPERM; taken (atomically) when sockops stores the
    // tuple, where a connect racing for the last slot fails closed instead.
    if !udp && tuple_count(pod_id) >= tuple_quota() {
        count(pod_id, stat::OUT_QUOTA_REFUSED);
        return false;
    }
    let st = if sk.is_null() || store_fault(orig.port) {
        None
    } else {
        unsafe { SK_ORIG.get_or_create(sk) }
    };
    let Some(st) = st else {
        count(pod_id, stat::OUT_STORE_FAILED);
        return false;
    };
    // A tuple entry of an earlier connection of this socket was settled when it closed.
    st.orig = orig;
    st.flags = SOCK_APP;
    st.pod_id = pod_id;
    unsafe { set_user_addr(ctx.sock_addr, v6, loopback_for(dst), orig.redirect_port) };
    true
}

#[cgroup_sock_addr(connect4)]
pub fn ic_connect4(ctx: SockAddrContext) -> i32 {
    i32::from(on_connect(&ctx, false))
}

#[cgroup_sock_addr(connect6)]
pub fn ic_connect6(ctx: SockAddrContext) -> i32 {
    i32::from(on_connect(&ctx, true))
}

/// Unconnected UDP: only DNS is ever redirected (Istio captures nothing else of UDP).
#[inline(always)]
fn on_sendmsg(ctx: &SockAddrContext, v6: bool) -> bool {
    let Out::Redirect(dst, orig, pod_id) = outbound(ctx, v6) else {
        return true;
    };
    if orig.port != DNS_PORT {
        return true;
    }
    let sk = sock_of(ctx);
    let st = if sk.is_null() || store_fault(orig.port) {
        None
    } else {
        unsafe { SK_ORIG.get_or_create(sk) }
    };
    let Some(st) = st else {
        // As in on_connect: refused (EPERM), never sent around the DNS proxy.
        count(pod_id, stat::OUT_STORE_FAILED);
        return false;
    };
    st.orig = orig;
    st.flags = SOCK_APP;
    st.pod_id = pod_id;
    unsafe { set_user_addr(ctx.sock_addr, v6, loopback_for(dst), orig.redirect_port) };
    true
}

#[cgroup_sock_addr(sendmsg4)]
pub fn ic_sendmsg4(ctx: SockAddrContext) -> i32 {
    i32::from(on_sendmsg(&ctx, false))
}

#[cgroup_sock_addr(sendmsg6)]
pub fn ic_sendmsg6(ctx: SockAddrContext) -> i32 {
    i32::from(on_sendmsg(&ctx, true))
}

/// The app's original destination stored on its socket, if the socket was redirected.
#[inline(always)]
fn app_orig(ctx: &SockAddrContext) -> Option<OrigDst> {
    let sk = sock_of(ctx);
    if sk.is_null() {
        return None;
    }
    let st = unsafe { SK_ORIG.get(sk) }?;
    (st.flags & SOCK_APP != 0).then_some(st.orig)
}

/// A DNS reply from the proxy appears to come from the server the app asked.
#[inline(always)]
fn on_recvmsg(ctx: &SockAddrContext, v6: bool) {
    let Some(orig) = app_orig(ctx) else {
        return;
    };
    let (from, port) = unsafe { user_addr(ctx.sock_addr, v6) };
    if port == orig.redirect_port && from.is_loopback() {
        unsafe { set_user_addr(ctx.sock_addr, v6, orig.addr, orig.port) };
    }
}

#[cgroup_sock_addr(recvmsg4)]
pub fn ic_recvmsg4(ctx: SockAddrContext) -> i32 {
    on_recvmsg(&ctx, false);
    1
}

#[cgroup_sock_addr(recvmsg6)]
pub fn ic_recvmsg6(ctx: SockAddrContext) -> i32 {
    on_recvmsg(&ctx, true);
    1
}

/// Only the proxy may bind the proxy's ports (an app could otherwise impersonate it).
#[inline(always)]
fn on_bind(ctx: &SockAddrContext, v6: bool) -> i32 {
    let Some((_, policy)) = pod_of(ctx) else {
        return 1;
    };
    let (_, port) = unsafe { user_addr(ctx.sock_addr, v6) };
    let ug = bpf_get_current_uid_gid();
    let tables = MapTables {
        pod_id: policy.pod_id,
    };
    let (uid, gid) = (ug as u32, (ug >> 32) as u32);
    let allowed = bind_allowed(policy, &tables, port, uid, gid);
    if !allowed {
        count(policy.pod_id, stat::BIND_DENIED);
    } else if is_proxy(policy, uid, gid) {
        // The proxy's socket: sock_ops cannot ask who the caller is before 6.13, bind can.
        // Marks the listener sock_ops registers, and (cloned) every socket it accepts, the
        // only ones SO_ORIGINAL_DST is answered on.
        let sk = sock_of(ctx);
        if !sk.is_null() {
            if let Some(m) = unsafe { SK_PROXY.get_or_create(sk) } {
                *m = 1;
            }
        }
    }
    i32::from(allowed)
}

#[cgroup_sock_addr(bind4)]
pub fn ic_bind4(ctx: SockAddrContext) -> i32 {
    on_bind(&ctx, false)
}

#[cgroup_sock_addr(bind6)]
pub fn ic_bind6(ctx: SockAddrContext) -> i32 {
    on_bind(&ctx, true)
}

/// The two ends of a TCP socket as `SockKey` fields, from a `bpf_sock_ops` or an `sk_msg_md`
/// pointer (both name the fields alike): `(local, remote, local_port, remote_port)`, IPv4 as
/// `::ffff:a.b.c.d`, ports in host order. Every field is read once, with a volatile load.
macro_rules! sock_ends {
    ($p:expr) => {{
        let p = $p;
        // All fields first, then choose: choosing between field addresses makes LLVM emit a
        // modified ctx pointer, which the verifier rejects.
        let (family, lport, rport, l4, r4, l6, r6) = unsafe {
            (
                read_volatile(addr_of!((*p).family)),
                read_volatile(addr_of!((*p).local_port)),
                read_volatile(addr_of!((*p).remote_port)),
                read_volatile(addr_of!((*p).local_ip4)),
                read_volatile(addr_of!((*p).remote_ip4)),
                [
                    read_volatile(addr_of!((*p).local_ip6[0])),
                    read_volatile(addr_of!((*p).local_ip6[1])),
                    read_volatile(addr_of!((*p).local_ip6[2])),
                    read_volatile(addr_of!((*p).local_ip6[3])),
                ],
                [
                    read_volatile(addr_of!((*p).remote_ip6[0])),
                    read_volatile(addr_of!((*p).remote_ip6[1])),
                    read_volatile(addr_of!((*p).remote_ip6[2])),
                    read_volatile(addr_of!((*p).remote_ip6[3])),
                ],
            )
        };
        let ends = if family == AF_INET6 {
            Some((l6, r6))
        } else if family == AF_INET {
            Some((mapped_words(l4), mapped_words(r4)))
        } else {
            None
        };
        // remote_port holds the network-order port in its upper 16 bits.
        ends.map(|(l, r)| (l, r, lport, u32::from(u16::from_be((rport >> 16) as u16))))
    }};
}

#[sock_ops]
pub fn ic_sockops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        SOCK_OPS_TCP_LISTEN_CB => on_listen(&ctx),
        SOCK_OPS_TCP_CONNECT_CB => on_app_connect(&ctx),
        SOCK_OPS_STATE_CB => {
            if ctx.arg(1) == TCP_CLOSE {
                on_app_close(&ctx);
            }
        }
        SOCK_OPS_ACTIVE_ESTABLISHED_CB => on_established(&ctx),
        SOCK_OPS_PASSIVE_ESTABLISHED_CB => {
            on_proxy_accepted(&ctx);
            on_established(&ctx);
        }
        _ => {}
    }
    1
}

/// The socket a sock_ops callback runs for (NULL for request sockets).
#[inline(always)]
fn ops_sock(ctx: &SockOpsContext) -> *mut bpf_sock {
    unsafe { read_volatile(addr_of!((*ctx.ops).__bindgen_anon_2.sk)) }
}

/// The proxy's inbound listener registers itself: a listen() on the inbound capture port in a
/// meshed netns, on a socket the proxy itself bound (see `on_bind`).
#[inline(always)]
fn on_listen(ctx: &SockOpsContext) {
    let Some((_, policy)) = pod_of(ctx) else {
        return;
    };
    let port = unsafe { read_volatile(addr_of!((*ctx.ops).local_port)) };
    if port != u32::from(policy.inbound_capture_port) {
        return;
    }
    let sk = ops_sock(ctx);
    if sk.is_null() || unsafe { SK_PROXY.get(sk) }.is_none() {
        return;
    }
    let v6 = u32::from(unsafe { read_volatile(addr_of!((*ctx.ops).family)) } == AF_INET6);
    let _ = LISTENERS.update(policy.pod_id * 2 + v6, unsafe { &mut *ctx.ops }, 0);
}

/// The tuple key of an app→proxy connection from the app's side: its own address (last 32
/// bits) and port, and the proxy port it was redirected to.
#[inline(always)]
fn app_tuple(ctx: &SockOpsContext, redirect_port: u16) -> TupleKey {
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
    TupleKey {
        netns: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
        client_addr_tail: if family == AF_INET6 { ip6_tail } else { ip4 },
        client_port: lport,
        proxy_port: u32::from(redirect_port),
        _pad: 0,
    }
}

/// A redirected app socket sends its SYN: its source port is known now, so its original
/// destination goes where the proxy's accepted socket can find it, within the pod's quota.
/// Also asks for state callbacks, so the entry goes when the connection does if the proxy
/// never takes it.
#[inline(always)]
fn on_app_connect(ctx: &SockOpsContext) {
    let sk = ops_sock(ctx);
    if sk.is_null() {
        return;
    }
    let Some(st) = (unsafe { SK_ORIG.get(sk) }) else {
        return;
    };
    if st.flags & SOCK_APP == 0 {
        return;
    }
    let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
    let pod_id = st.pod_id;
    // Taken first, then checked: of connects racing for the last slot, the losers give theirs
    // back (none is ever over the quota).
    tuple_count_add(pod_id, 1);
    if tuple_count(pod_id) > tuple_quota() {
        tuple_count_add(pod_id, u64::MAX);
        count(pod_id, stat::TUPLE_STORE_FAILED);
        return;
    }
    let key = app_tuple(ctx, st.orig.redirect_port);
    let value = SockOrig {
        orig: st.orig,
        flags: SOCK_ANSWER,
        pod_id,
    };
    if ORIG_BY_TUPLE
        .insert(&key, &value, u64::from(BPF_NOEXIST))
        .is_err()
    {
        tuple_count_add(pod_id, u64::MAX);
        count(pod_id, stat::TUPLE_STORE_FAILED);
        return;
    }
    st.flags |= SOCK_TUPLE;
}

/// A redirected app socket closing: its tuple entry goes, unless the proxy took it already
/// (whoever deletes the entry gives the quota slot back, exactly once).
#[inline(always)]
fn on_app_close(ctx: &SockOpsContext) {
    let sk = ops_sock(ctx);
    if sk.is_null() {
        return;
    }
    let Some(st) = (unsafe { SK_ORIG.get(sk) }) else {
        return;
    };
    if st.flags & SOCK_TUPLE == 0 {
        return;
    }
    st.flags &= !SOCK_TUPLE;
    let key = app_tuple(ctx, st.orig.redirect_port);
    if ORIG_BY_TUPLE.remove(&key).is_ok() {
        tuple_count_add(st.pod_id, u64::MAX);
    }
}

/// The proxy's listener accepted a connection: if it is an app's redirected one, its original
/// destination moves into the accepted socket's `SK_ORIG`, where SO_ORIGINAL_DST finds it.
/// Sockets not marked as the proxy's (`SK_PROXY`, cloned from the listener) are skipped after
/// one socket-storage lookup, with no map lookup at all.
#[inline(always)]
fn on_proxy_accepted(ctx: &SockOpsContext) {
    let sk = ops_sock(ctx);
    if sk.is_null() || unsafe { SK_PROXY.get(sk) }.is_none() {
        return;
    }
    let Some((_, remote, local_port, remote_port)) = sock_ends!(ctx.ops) else {
        return;
    };
    let key = TupleKey {
        netns: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
        client_addr_tail: remote[3],
        client_port: remote_port,
        proxy_port: local_port,
        _pad: 0,
    };
    let Some(v) = (unsafe { ORIG_BY_TUPLE.get(&key) }) else {
        return;
    };
    let v = *v;
    let Some(st) = (unsafe { SK_ORIG.get_or_create(sk) }) else {
        // Left in ORIG_BY_TUPLE: getsockopt looks there too; the app's close removes it.
        return;
    };
    *st = v;
    if ORIG_BY_TUPLE.remove(&key).is_ok() {
        tuple_count_add(v.pod_id, u64::MAX);
    }
}

/// Acceleration: an established connection of an `--accelerate` pod whose ends both live in
/// this netns joins `ACCEL` (each end from its own callback: active for the connecting side,
/// passive for the accepted one).
#[inline(always)]
fn on_established(ctx: &SockOpsContext) {
    match ACCEL_ON.get(0) {
        Some(n) if *n != 0 => {}
        _ => return,
    }
    let Some((netns, policy)) = pod_of(ctx) else {
        return;
    };
    let Some((local, remote, local_port, remote_port)) = sock_ends!(ctx.ops) else {
        return;
    };
    if !accelerated(policy, Addr(v6_bytes(local)), Addr(v6_bytes(remote))) {
        return;
    }
    let key = SockKey {
        netns,
        local,
        remote,
        local_port,
        remote_port,
    };
    let _ = ACCEL.update(key, unsafe { &mut *ctx.ops }, 0);
}

/// Hands each message of an accelerated socket to its peer's receive queue, skipping the
/// loopback TCP stack. A socket whose peer is not (yet) in `ACCEL` sends through TCP, for good.
#[sk_msg]
pub fn ic_sk_msg(ctx: SkMsgContext) -> u32 {
    let Some((local, remote, local_port, remote_port)) = sock_ends!(ctx.msg) else {
        return SK_PASS;
    };
    let key = SockKey {
        netns: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
        local,
        remote,
        local_port,
        remote_port,
    };
    let sk = unsafe { read_volatile(addr_of!((*ctx.msg).__bindgen_anon_3.sk)) };
    if sk.is_null() {
        return SK_PASS;
    }
    if unsafe { SK_ACCEL.get(sk) }.is_some() {
        return SK_PASS;
    }
    // SK_PASS with the peer set: redirected; anything else: the peer is not in ACCEL.
    if ACCEL.redirect_msg(&ctx, key.peer(), BPF_F_INGRESS) != i64::from(SK_PASS) {
        // Marks this socket for good; freed with it. Not storable: this message and every
        // later one is dropped rather than risk one overtaking another.
        match unsafe { SK_ACCEL.get_or_create(sk) } {
            Some(m) => *m = 1,
            None => return SK_DROP,
        }
    }
    SK_PASS
}

/// `::ffff:a.b.c.d` as four network-order words, from the network-order IPv4 word.
#[inline(always)]
fn mapped_words(ip4: u32) -> [u32; 4] {
    [0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff]), ip4]
}

/// sockaddr_in / sockaddr_in6 of `addr:port` into getsockopt's buffer; false if it does not fit.
#[inline(always)]
unsafe fn write_sockaddr(
    so: *mut aya_ebpf::bindings::bpf_sockopt,
    level: i32,
    addr: [u8; 16],
    port: u16,
) -> bool {
    let optval = (*so).__bindgen_anon_2.optval as *mut u8;
    let end = (*so).__bindgen_anon_3.optval_end as *mut u8;
    let v4 = addr[..12] == [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff];
    if level == SOL_IP && v4 {
        if optval.add(16) > end {
            return false;
        }
        write_volatile(optval.cast::<u16>(), AF_INET as u16);
        write_volatile(optval.add(2).cast::<u16>(), port.to_be());
        let mut i = 0;
        while i < 4 {
            write_volatile(optval.add(4 + i), addr[12 + i]);
            i += 1;
        }
        write_volatile(optval.add(8).cast::<u64>(), 0);
        write_volatile(addr_of_mut!((*so).optlen), 16);
    } else if level == SOL_IPV6 && !v4 {
        if optval.add(28) > end {
            return false;
        }
        write_volatile(optval.cast::<u16>(), AF_INET6 as u16);
        write_volatile(optval.add(2).cast::<u16>(), port.to_be());
        write_volatile(optval.add(4).cast::<u32>(), 0);
        let mut i = 0;
        while i < 16 {
            write_volatile(optval.add(8 + i), addr[i]);
            i += 1;
        }
        write_volatile(optval.add(24).cast::<u32>(), 0);
        write_volatile(addr_of_mut!((*so).optlen), 28);
    } else {
        return false;
    }
    write_volatile(addr_of_mut!((*so).retval), 0);
    true
}

#[cgroup_sockopt(getsockopt)]
pub fn ic_getsockopt(ctx: SockoptContext) -> i32 {
    let so = ctx.sockopt;
    unsafe {
        let level = read_volatile(addr_of!((*so).level));
        if read_volatile(addr_of!((*so).optname)) != SO_ORIGINAL_DST
            || (level != SOL_IP && level != SOL_IPV6)
        {
            return 1;
        }
        let sk = (*so).__bindgen_anon_1.sk;
        if sk.is_null() {
            return 1;
        }
        // Only the proxy's sockets get an answer: any other socket in the pod (one that took a
        // proxy port, say) learns nothing from us.
        if SK_PROXY.get(sk).is_none() {
            return 1;
        }
        // Outbound: moved onto the proxy's accepted socket when it was established.
        if let Some(st) = SK_ORIG.get(sk) {
            if st.flags & SOCK_ANSWER != 0 {
                if write_sockaddr(so, level, st.orig.addr, st.orig.port) {
                    count(st.pod_id, stat::ORIG_DST_ANSWERED);
                }
                return 1;
            }
        }
        // One constant-offset load per field: the verifier forbids arithmetic on sock pointers.
        // Load both families' fields, then choose: a branch would let LLVM select the offset.
        let family = read_volatile(addr_of!((*sk).family));
        let tail6 = read_volatile(addr_of!((*sk).dst_ip6[3]));
        let tail4 = read_volatile(addr_of!((*sk).dst_ip4));
        let dport = u16::from_be(read_volatile(addr_of!((*sk).dst_port)));
        let lport = read_volatile(addr_of!((*sk).src_port));
        let netns = bpf_get_netns_cookie(ctx.as_ptr());
        // Still in the tuple map if the accepted socket's storage could not be allocated.
        let key = TupleKey {
            netns,
            client_addr_tail: if family == AF_INET6 { tail6 } else { tail4 },
            client_port: u32::from(dport),
            proxy_port: lport,
            _pad: 0,
        };
        let Some(policy) = POD_POLICY.get(&netns) else {
            return 1;
        };
        if let Some(v) = ORIG_BY_TUPLE.get(&key) {
            if write_sockaddr(so, level, v.orig.addr, v.orig.port) {
                count(policy.pod_id, stat::ORIG_DST_ANSWERED);
            }
            return 1;
        }
        // Inbound (sk_lookup): nothing was rewritten, the original destination is the socket's
        // own local address, if that connection is one the pod captures.
        let f = [
            read_volatile(addr_of!((*sk).src_ip4)),
            read_volatile(addr_of!((*sk).src_ip6[0])),
            read_volatile(addr_of!((*sk).src_ip6[1])),
            read_volatile(addr_of!((*sk).src_ip6[2])),
            read_volatile(addr_of!((*sk).src_ip6[3])),
            read_volatile(addr_of!((*sk).dst_ip6[0])),
            read_volatile(addr_of!((*sk).dst_ip6[1])),
            read_volatile(addr_of!((*sk).dst_ip6[2])),
        ];
        let (local, remote) = if family == AF_INET6 {
            (
                Addr::v6(v6_bytes([f[1], f[2], f[3], f[4]])),
                Addr::v6(v6_bytes([f[5], f[6], f[7], tail6])),
            )
        } else {
            (Addr::v4(u32::from_be(f[0])), Addr::v4(u32::from_be(tail4)))
        };
        let tables = MapTables {
            pod_id: policy.pod_id,
        };
        // Any local address the pod captures (decide_inbound passes loopback), not only the
        // addresses known at registration.
        let answered = matches!(
            decide_inbound(policy, &tables, local, lport as u16, remote),
            Verdict::Redirect { .. }
        ) && write_sockaddr(so, level, local.0, lport as u16);
        // The kernel's own answer (NAT) counts as answered too: only a failed lookup is a miss.
        let kernel_ok = read_volatile(addr_of!((*so).retval)) == 0;
        count(
            policy.pod_id,
            if answered || kernel_ok {
                stat::ORIG_DST_ANSWERED
            } else {
                stat::ORIG_DST_MISSED
            },
        );
    }
    1
}

#[inline(always)]
fn on_getpeername(ctx: &SockAddrContext, v6: bool) {
    let Some(orig) = app_orig(ctx) else {
        return;
    };
    // Only while the socket is still connected to the proxy: after an AF_UNSPEC disconnect and
    // a connect that was not redirected, the real peer is the answer (the pass verdict also
    // dropped the stored destination; this holds even if dropping it failed).
    let (peer, port) = unsafe { user_addr(ctx.sock_addr, v6) };
    if port != orig.redirect_port || !peer.is_loopback() {
        return;
    }
    unsafe { set_user_addr(ctx.sock_addr, v6, orig.addr, orig.port) };
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

/// Inbound: a TCP connection to any non-loopback local address of the pod on a captured port
/// goes to the proxy's listener, as ISTIO_INBOUND (PREROUTING) captures it: addresses added
/// after registration, further interfaces and IPv6 link-local included. With no listener
/// registered the lookup fails and the client gets a reset, as with Istio's REDIRECT to a port
/// nobody listens on: never the app, unprotected. Reached by tail call from the pod's own
/// program, which stored the pod's netns cookie in `INBOUND_NETNS`.
#[sk_lookup]
pub fn ic_sk_lookup(ctx: SkLookupContext) -> u32 {
    let l = ctx.lookup;
    let (protocol, family) = unsafe {
        (
            read_volatile(addr_of!((*l).protocol)),
            read_volatile(addr_of!((*l).family)),
        )
    };
    if protocol != IPPROTO_TCP {
        return sk_action::SK_PASS;
    }
    // Every field is loaded once, unconditionally and in straight-line code: under a branch
    // LLVM hoists a computed context address, which the verifier rejects. The copies on the
    // stack are what map keys are built from (the verifier wants that too).
    let f = unsafe {
        [
            read_volatile(addr_of!((*l).local_ip4)),
            read_volatile(addr_of!((*l).local_ip6[0])),
            read_volatile(addr_of!((*l).local_ip6[1])),
            read_volatile(addr_of!((*l).local_ip6[2])),
            read_volatile(addr_of!((*l).local_ip6[3])),
            read_volatile(addr_of!((*l).remote_ip4)),
            read_volatile(addr_of!((*l).remote_ip6[0])),
            read_volatile(addr_of!((*l).remote_ip6[1])),
            read_volatile(addr_of!((*l).remote_ip6[2])),
            read_volatile(addr_of!((*l).remote_ip6[3])),
        ]
    };
    let (local, remote) = if family == AF_INET6 {
        (
            Addr::v6(v6_bytes([f[1], f[2], f[3], f[4]])),
            Addr::v6(v6_bytes([f[6], f[7], f[8], f[9]])),
        )
    } else {
        (Addr::v4(u32::from_be(f[0])), Addr::v4(u32::from_be(f[5])))
    };
    let port = unsafe { read_volatile(addr_of!((*l).local_port)) } as u16;
    let netns = match INBOUND_NETNS.get(0) {
        Some(n) => *n,
        None => return sk_action::SK_PASS,
    };
    // A pod being removed: its program is detached right after its policy goes.
    let Some(policy) = (unsafe { POD_POLICY.get(&netns) }) else {
        return sk_action::SK_PASS;
    };
    let pod_id = policy.pod_id;
    if let Verdict::Pass(reason) =
        decide_inbound(policy, &MapTables { pod_id }, local, port, remote)
    {
        // Connections the pod makes to itself pass here constantly; they are not inbound traffic.
        if !matches!(reason, Reason::LocalPeer | Reason::NoInboundCapture) {
            count(pod_id, stat::IN_PASS + reason as u32);
        }
        return sk_action::SK_PASS;
    }
    let key = pod_id * 2 + u32::from(family == AF_INET6);
    match LISTENERS.redirect_sk_lookup(&ctx, key, 0) {
        Ok(()) => {
            count(pod_id, stat::IN_CAPTURED);
            sk_action::SK_PASS
        }
        Err(_) => {
            count(pod_id, stat::IN_REFUSED);
            sk_action::SK_DROP
        }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
