//! Every map of the programs, with its size and the reason for it, and the globals the loader
//! sets before loading (.rodata, frozen: the verifier knows their values and prunes on them).
//!
//! Names are the loader's contract (`interceptor_common::maps::names`); keys and values are the
//! `#[repr(C)]` types of `interceptor_common::maps`. Node-wide capacities come from
//! `interceptor_common::maps::capacity`, which sizes each set map for every pod at its
//! config's limits, so one pod's lists cannot crowd another's out.

use core::ptr::read_volatile;

use aya_ebpf::{
    macros::{btf_map, map},
    maps::{Array, HashMap, LpmTrie, PerCpuArray, ProgramArray, SockHash},
};
use interceptor_common::{
    decision::{PodPolicy, PodSrc},
    maps::{
        capacity, stat, AddrKey, Cidr4Data, Cidr6Data, GroupKey, PortKey, SockKey, SockOrig,
        TupleKey,
    },
};

use crate::sk;

/// Registered pods (netns) on a node.
const MAX_PODS: u32 = capacity::MAX_PODS;
/// Hash maps whose memory follows their use (only buckets are allocated at creation).
const BPF_F_NO_PREALLOC: u32 = 1;

// --- Loader-set globals ------------------------------------------------------------------------

/// Set by the loader (`--ebpf-log`). It lives in .rodata, which the loader freezes, so the
/// verifier knows its value and prunes every log call when it is 0: the hot path pays nothing.
#[unsafe(no_mangle)]
static LOG_ENABLED: u8 = 0;

/// Set by the loader; like LOG_ENABLED, 0 prunes counting entirely (used to measure its cost).
#[unsafe(no_mangle)]
static COUNT_ENABLED: u8 = 1;

/// Test-only fault injection (`INTERCEPTOR_FAULT=store:<port>`): a redirected connection to
/// this destination port behaves as if storing its original destination failed. Frozen like
/// LOG_ENABLED, so at 0 (always, outside tests) the verifier prunes the check.
#[unsafe(no_mangle)]
static FAULT_STORE_PORT: u16 = 0;

/// Set by the loader: 1 where sock_ops, getsockopt and sk_msg programs may call
/// bpf_get_netns_cookie (5.15+). At 0 the verifier prunes those calls, so the programs load on
/// older kernels: there a proxy socket finds its pod from its `SK_PROXY` mark, and
/// acceleration is off. Frozen like LOG_ENABLED.
#[unsafe(no_mangle)]
static NETNS_HELPER: u8 = 1;

/// `ORIG_BY_TUPLE` entries one pod may hold (`capacity::TUPLE_QUOTA`; lowered by tests).
/// Frozen like LOG_ENABLED.
#[unsafe(no_mangle)]
static TUPLE_QUOTA: u64 = capacity::TUPLE_QUOTA as u64;

// The globals are read with volatile loads: a plain read of a `static` would be folded to its
// initial value at compile time, and the loader's value would never be seen.

#[inline(always)]
pub fn log_enabled() -> bool {
    // SAFETY: a read of an initialised static that nothing in the program writes.
    unsafe { read_volatile(&LOG_ENABLED) != 0 }
}

#[inline(always)]
pub fn count_enabled() -> bool {
    // SAFETY: as in `log_enabled`.
    unsafe { read_volatile(&COUNT_ENABLED) != 0 }
}

/// Whether this kernel lets every hook read the netns cookie (see NETNS_HELPER).
#[inline(always)]
pub fn netns_helper() -> bool {
    // SAFETY: as in `log_enabled`.
    unsafe { read_volatile(&NETNS_HELPER) != 0 }
}

#[inline(always)]
pub fn tuple_quota() -> u64 {
    // SAFETY: as in `log_enabled`.
    unsafe { read_volatile(&TUPLE_QUOTA) }
}

/// Whether the test-only fault says storing the original destination for `port` fails.
#[inline(always)]
pub fn store_fault(port: u16) -> bool {
    // SAFETY: as in `log_enabled`.
    let p = unsafe { read_volatile(&FAULT_STORE_PORT) };
    p != 0 && p == port
}

// --- Pods and their lists (written by the loader, read by every decision) ----------------------

/// Netns cookie → the pod's policy; no entry = not meshed. One per pod on the node.
#[map]
pub static POD_POLICY: HashMap<u64, PodPolicy> = HashMap::with_max_entries(MAX_PODS, 0);
/// Excluded, included, inbound and guarded ports of every pod (`capacity::PORTS_PER_POD` each).
#[map]
pub static PORTS: HashMap<PortKey, u8> =
    HashMap::with_max_entries(capacity::PORTS, BPF_F_NO_PREALLOC);
/// Own addresses and DNS servers of every pod (`capacity::ADDRS_PER_POD` each).
#[map]
pub static ADDRS: HashMap<AddrKey, u8> =
    HashMap::with_max_entries(capacity::ADDRS, BPF_F_NO_PREALLOC);
/// Owner groups of every pod (`capacity::GROUPS_PER_POD` each).
#[map]
pub static GROUPS: HashMap<GroupKey, u8> =
    HashMap::with_max_entries(capacity::GROUPS, BPF_F_NO_PREALLOC);
/// Excluded and included CIDRs (`-x`, `-i`), keyed by pod id then address:
/// `capacity::CIDRS_PER_POD` each; a trie allocates per entry, so unused capacity costs nothing.
#[map]
pub static CIDR4_EXCL: LpmTrie<Cidr4Data, u8> = LpmTrie::with_max_entries(capacity::CIDRS, 0);
#[map]
pub static CIDR4_INCL: LpmTrie<Cidr4Data, u8> = LpmTrie::with_max_entries(capacity::CIDRS, 0);
#[map]
pub static CIDR6_EXCL: LpmTrie<Cidr6Data, u8> = LpmTrie::with_max_entries(capacity::CIDRS, 0);
#[map]
pub static CIDR6_INCL: LpmTrie<Cidr6Data, u8> = LpmTrie::with_max_entries(capacity::CIDRS, 0);

// --- Original destinations ---------------------------------------------------------------------

/// Tuple → original destination of an app→proxy connection, from the app's connect until the
/// proxy's socket for it is established (then it moves into that socket's `SK_ORIG`), or the
/// app's socket closes. A plain hash: entries are never evicted; each pod may hold at most
/// `TUPLE_QUOTA` (counted in `TUPLE_COUNT`), and the capacity is every pod at its quota.
#[map]
pub static ORIG_BY_TUPLE: HashMap<TupleKey, SockOrig> =
    HashMap::with_max_entries(capacity::TUPLES, BPF_F_NO_PREALLOC);
/// Per pod (by id): its entries in `ORIG_BY_TUPLE`.
#[map]
pub static TUPLE_COUNT: Array<u64> = Array::with_max_entries(MAX_PODS, 0);
/// `[pod_id]`: the pod's own address per family, the source a redirected connection is bound
/// to (`decision::redirect_source`), so the proxy sees the pod IP as its peer, as with REDIRECT.
#[map]
pub static POD_SRC: Array<PodSrc> = Array::with_max_entries(MAX_PODS, 0);
/// Per socket: the original destination of the app's redirected socket (TCP, and UDP DNS),
/// or the answer to SO_ORIGINAL_DST on the proxy's accepted socket. Socket-local storage has
/// no capacity: freed with its socket.
#[btf_map]
pub static SK_ORIG: sk::SkStorage<SockOrig, { sk::NO_PREALLOC }> = sk::SkStorage::new();
/// Sockets of the proxy: bound by a proxy uid/gid (or adopted by the loader), and, cloned by the
/// kernel, every socket their listeners accept. Only these get SO_ORIGINAL_DST answered.
#[btf_map]
pub static SK_PROXY: sk::SkStorage<u32, { sk::CLONED }> = sk::SkStorage::new();

// --- Inbound -------------------------------------------------------------------------------------

/// `[0]`: the netns cookie of the pod whose sk_lookup program runs on this CPU right now
/// (sk_lookup cannot read the netns cookie itself). Written by the pod's own program just before
/// it tail-calls `ic_sk_lookup`; TCP lookups run in softirq, which does not nest on a CPU, so
/// nothing can overwrite the slot in between. One slot: one lookup at a time per CPU.
#[map]
pub static INBOUND_NETNS: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);
/// `[pod_id]`: the netns cookie of the pod with that id (0: none), read by the pod's own
/// sk_lookup program, which carries only the id. Why not the cookie in the program: the id is
/// known before the pod is, so its program can be loaded ahead of time, off the pod-add path.
#[map]
pub static POD_NETNS: Array<u64> = Array::with_max_entries(MAX_PODS, 0);
/// `[0]`: `ic_sk_lookup`, the tail call target of every pod's sk_lookup program. Not used by
/// the programs of this object: the per-pod programs refer to it by fd.
#[map]
pub static INBOUND_PROG: ProgramArray = ProgramArray::with_max_entries(1, 0);
/// The proxy's inbound listeners: key `pod_id * 2 + (family is IPv6)`. Sized for one listener
/// per pod; a pod with both families uses two keys, and SockHash capacity is by entries.
#[map]
pub static LISTENERS: SockHash<u32> = SockHash::with_max_entries(MAX_PODS, 0);

// --- Acceleration ------------------------------------------------------------------------------

/// Both ends of accelerated connections (`--accelerate`); the kernel drops a socket from it when
/// the socket closes, so it empties by itself. 65,536: 32,768 concurrent accelerated
/// app↔proxy connections on a node; a connection that does not fit stays on TCP.
#[map]
pub static ACCEL: SockHash<SockKey> = SockHash::with_max_entries(65536, 0);
/// `[0]`: how many registered pods asked for acceleration. 0 (the default) keeps the
/// established callbacks at one array load for everybody else.
#[map]
pub static ACCEL_ON: Array<u32> = Array::with_max_entries(1, 0);
/// Sockets that sent a message while their peer was not in `ACCEL` yet: that message took the
/// TCP path, so every later one must too, or a redirected message could overtake it.
#[btf_map]
pub static SK_ACCEL: sk::SkStorage<u32, { sk::NO_PREALLOC }> = sk::SkStorage::new();

// --- Counters ----------------------------------------------------------------------------------

/// Per-pod counters, per CPU (no atomics, no cache-line bouncing): `stat::PER_POD` counters for
/// each of the first `stat::MAX_PODS` pods (see `interceptor_common::maps::stat`).
#[map]
pub static STATS: PerCpuArray<u64> =
    PerCpuArray::with_max_entries(stat::MAX_PODS * stat::PER_POD, 0);
