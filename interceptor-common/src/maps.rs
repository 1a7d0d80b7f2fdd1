//! `#[repr(C)]` keys and values of the eBPF maps, shared byte for byte with the programs.

/// Map names, shared so the loader and the programs cannot drift apart.
pub mod names {
    pub const POD_POLICY: &str = "POD_POLICY";
    pub const PORTS: &str = "PORTS";
    pub const ADDRS: &str = "ADDRS";
    pub const GROUPS: &str = "GROUPS";
    pub const CIDR4_EXCL: &str = "CIDR4_EXCL";
    pub const CIDR4_INCL: &str = "CIDR4_INCL";
    pub const CIDR6_EXCL: &str = "CIDR6_EXCL";
    pub const CIDR6_INCL: &str = "CIDR6_INCL";
    pub const ORIG_BY_TUPLE: &str = "ORIG_BY_TUPLE";
    pub const INBOUND_NETNS: &str = "INBOUND_NETNS";
    pub const INBOUND_PROG: &str = "INBOUND_PROG";
    pub const POD_NETNS: &str = "POD_NETNS";
    pub const POD_SRC: &str = "POD_SRC";
    pub const TUPLE_COUNT: &str = "TUPLE_COUNT";
    pub const SK_ORIG: &str = "SK_ORIG";
    pub const SK_PROXY: &str = "SK_PROXY";
    pub const SK_ACCEL: &str = "SK_ACCEL";
    pub const LISTENERS: &str = "LISTENERS";
    pub const STATS: &str = "STATS";
    pub const ACCEL: &str = "ACCEL";
    pub const ACCEL_ON: &str = "ACCEL_ON";
    /// Maps of earlier versions: removed at cleanup, never created.
    pub const LEGACY: &[&str] = &["ORIG_BY_COOKIE", "DNS_ORIG", "PROXY_BINDS", "ACCEL_PASSED"];
}

/// Capacities of the node-wide maps. Set maps hold every pod's lists; sized for `MAX_PODS`
/// pods each at its config's limits (`config::limits`), so one pod's lists cannot crowd another
/// out. They are created with `BPF_F_NO_PREALLOC`: memory follows use, only the hash buckets
/// are allocated up front.
pub mod capacity {
    /// Registered pods (netns) on a node.
    pub const MAX_PODS: u32 = 4096;
    /// `PORTS` entries of one pod (all kinds together; `config::limits::MAX_PORT_ENTRIES`).
    pub const PORTS_PER_POD: u32 = 128;
    /// `ADDRS` entries of one pod: its own addresses and its DNS servers.
    pub const ADDRS_PER_POD: u32 = 64;
    /// The pod's own addresses that fit beside `config::limits::MAX_DNS_SERVERS`.
    pub const LOCAL_ADDRS_PER_POD: u32 = 48;
    /// `GROUPS` entries of one pod (`config::limits::MAX_OWNER_GROUPS`).
    pub const GROUPS_PER_POD: u32 = 64;
    /// Entries of one pod in each CIDR trie (`config::limits::MAX_CIDRS`). LPM tries allocate
    /// a node per entry, so the node-wide capacity costs nothing until it is used.
    pub const CIDRS_PER_POD: u32 = 1024;
    pub const PORTS: u32 = MAX_PODS * PORTS_PER_POD;
    pub const ADDRS: u32 = MAX_PODS * ADDRS_PER_POD;
    pub const GROUPS: u32 = MAX_PODS * GROUPS_PER_POD;
    pub const CIDRS: u32 = MAX_PODS * CIDRS_PER_POD;
    /// App→proxy connections of one pod whose original destination waits in `ORIG_BY_TUPLE`
    /// for the proxy to accept them (`TUPLE_QUOTA`): past it, connect() fails with EPERM.
    pub const TUPLE_QUOTA: u32 = 128;
    /// `ORIG_BY_TUPLE`: every pod at its quota.
    pub const TUPLES: u32 = MAX_PODS * TUPLE_QUOTA;
}

/// A `TUPLE_COUNT` value as a count. A give-back can race a pod's removal (which zeroes the
/// count between a program's delete of its entry and its decrement) and wrap the count below
/// zero; read as zero, else the next pod with that id would be refused every connection (it may
/// then hold a few entries past its quota until the count catches up).
pub const fn tuple_count_of(raw: u64) -> u64 {
    if (raw as i64) < 0 {
        0
    } else {
        raw
    }
}

/// Per-pod counters in the per-CPU `STATS` array: index `pod_id * stat::PER_POD + counter`.
/// Pods with an id of `stat::MAX_PODS` or more are not counted (ids are the smallest free ones,
/// so this only happens past that many pods on a node).
pub mod stat {
    pub const PER_POD: u32 = 64;
    pub const MAX_PODS: u32 = 1024;
    pub const OUT_REDIRECTED: u32 = 0;
    pub const OUT_DNS: u32 = 1;
    pub const IN_CAPTURED: u32 = 2;
    /// Inbound to a captured port while the proxy had no listener: reset.
    pub const IN_REFUSED: u32 = 3;
    pub const ORIG_DST_ANSWERED: u32 = 4;
    /// SO_ORIGINAL_DST asked in a meshed pod and not answered by us.
    pub const ORIG_DST_MISSED: u32 = 5;
    pub const BIND_DENIED: u32 = 6;
    /// Redirects refused (connect/sendmsg fail with EPERM) because the original destination
    /// could not be stored: fail closed, never sent to the proxy without an answer for it.
    pub const OUT_STORE_FAILED: u32 = 7;
    /// Outbound passes: `OUT_PASS + Reason as u32`.
    pub const OUT_PASS: u32 = 8;
    /// Inbound passes: `IN_PASS + Reason as u32`.
    pub const IN_PASS: u32 = 32;
    /// Raw IP sockets refused to a non-proxy process (see `decision::raw_socket_allowed`).
    /// After the inbound passes (`IN_PASS` + the last `Reason`).
    pub const RAW_DENIED: u32 = 58;
    /// Redirects refused (connect fails with EPERM) because the pod had `TUPLE_QUOTA`
    /// connections waiting for the proxy already.
    pub const OUT_QUOTA_REFUSED: u32 = 62;
    /// A redirected connection whose tuple entry could not be stored (a concurrent connect
    /// took the last of the quota): the proxy gets no SO_ORIGINAL_DST and closes it.
    pub const TUPLE_STORE_FAILED: u32 = 63;
    /// Redirected connections left with the kernel's loopback source: binding them to the
    /// pod's address failed (the socket had a port bound already, or the address is gone).
    pub const SRC_NOT_BOUND: u32 = 59;

    /// The array index of a pod's counter, if the pod is counted.
    #[inline(always)]
    pub fn index(pod_id: u32, counter: u32) -> Option<u32> {
        (pod_id < MAX_PODS && counter < PER_POD).then_some(pod_id * PER_POD + counter)
    }
}

/// `PortKey::kind` values.
pub const PORT_EXCLUDED: u16 = 1;
pub const PORT_INCLUDED: u16 = 2;
/// Inbound: `-d` ports with `-b '*'`, or the `-b` list.
pub const PORT_INBOUND: u16 = 3;
/// Ports only the proxy may bind.
pub const PORT_GUARDED: u16 = 4;
/// Guarded ports this pod's registration added to its netns's `ip_local_reserved_ports`
/// (userspace bookkeeping: released at removal; the programs never look them up).
pub const PORT_RESERVED: u16 = 5;

/// An outbound port of one pod: `-o` (excluded) or `-q` (included).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortKey {
    pub pod_id: u32,
    pub port: u16,
    pub kind: u16,
}

/// `AddrKey::kind` values.
pub const ADDR_LOCAL: u32 = 1;
pub const ADDR_DNS: u32 = 2;

/// An address of one pod: its own (local) addresses or its DNS servers. IPv4 is stored as
/// `::ffff:a.b.c.d` so one key type serves both families.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AddrKey {
    pub pod_id: u32,
    pub kind: u32,
    pub addr: [u8; 16],
}

/// An owner group of one pod.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GroupKey {
    pub pod_id: u32,
    pub gid: u32,
}

/// LPM-trie data for IPv4 CIDRs: pod id then address, both big-endian, so that a prefix of
/// `32 + len` bits matches exactly one pod's CIDR.
pub type Cidr4Data = [u8; 8];
/// The same for IPv6.
pub type Cidr6Data = [u8; 20];

/// The original destination of a redirected connection (and where it was sent).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OrigDst {
    /// Original destination; IPv4 as `::ffff:a.b.c.d`.
    pub addr: [u8; 16],
    /// Original destination port, host byte order.
    pub port: u16,
    /// The proxy port the connection was redirected to, host byte order.
    pub redirect_port: u16,
    /// AF_INET or AF_INET6: the family of the original destination as the app gave it.
    pub family: u32,
}

/// Per-socket state in `SK_ORIG` (socket-local storage, freed with the socket), and the
/// value of `ORIG_BY_TUPLE`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockOrig {
    pub orig: OrigDst,
    /// `SOCK_*` bits.
    pub flags: u32,
    /// The pod the connection belongs to (its `TUPLE_COUNT` slot).
    pub pod_id: u32,
}

/// An app's redirected socket: getpeername and DNS replies show `orig`.
pub const SOCK_APP: u32 = 1;
/// A proxy's accepted socket: SO_ORIGINAL_DST answers `orig`.
pub const SOCK_ANSWER: u32 = 2;
/// An app socket whose `ORIG_BY_TUPLE` entry (counted in `TUPLE_COUNT`) may still exist.
pub const SOCK_TUPLE: u32 = 4;

/// `SK_PROXY` value of a proxy socket of an earlier version: marked, pod unknown. Its pod is
/// found from the netns cookie, where sock_ops and getsockopt can read it (5.15+).
pub const PROXY_MARK_LEGACY: u32 = 1;

/// `SK_PROXY` value of a proxy socket of pod `pod_id`: sock_ops and getsockopt find the pod
/// from it (through `POD_NETNS`) without reading the netns cookie, which they cannot before
/// 5.15. Never `PROXY_MARK_LEGACY` or 0.
pub const fn proxy_mark(pod_id: u32) -> u32 {
    pod_id.wrapping_add(2)
}

/// The pod of an `SK_PROXY` value, unless it is a legacy mark.
pub const fn proxy_mark_pod(mark: u32) -> Option<u32> {
    mark.checked_sub(2)
}

/// Where SO_NETNS_COOKIE is missing (before 5.14) a process learns its netns cookie from our
/// bind6 program: an AF_INET6 socket bound (with IPV6_FREEBIND) to this address, port 0, is
/// bound to `cookie_probe_answer(cookie)` instead, which getsockname shows. `100::/64` is the
/// discard-only prefix (RFC 6666): nothing routes there and no app binds there.
pub const COOKIE_PROBE: [u8; 16] = [1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];

/// The address a cookie probe is bound to: `100:0:0:1:` and the cookie, big-endian.
pub const fn cookie_probe_answer(cookie: u64) -> [u8; 16] {
    let c = cookie.to_be_bytes();
    [
        1, 0, 0, 0, 0, 0, 0, 1, c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7],
    ]
}

/// The cookie in a probe's bound address, if bind6 answered.
pub fn cookie_from_probe(addr: [u8; 16]) -> Option<u64> {
    let (head, tail) = addr.split_at(8);
    (head == [1, 0, 0, 0, 0, 0, 0, 1]).then(|| {
        let mut c = [0u8; 8];
        c.copy_from_slice(tail);
        u64::from_be_bytes(c)
    })
}

/// A redirected connection as seen from both ends: the app's socket (local → proxy) and the
/// proxy's accepted socket (proxy ← peer), qualified by netns. The app's address enters as its
/// last 32 bits (the IPv4 address, or the tail of the IPv6 one): the verifier only lets a
/// getsockopt program load single fields of a socket, and the port pair already all but
/// determines the connection.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TupleKey {
    pub netns: u64,
    /// Last 32 bits of the app side's address, network byte order.
    pub client_addr_tail: u32,
    /// The app side's port, host byte order.
    pub client_port: u32,
    /// The proxy's listening port, host byte order.
    pub proxy_port: u32,
    pub _pad: u32,
}

/// IPv4 in network byte order (as the kernel stores it) → `::ffff:a.b.c.d`.
#[inline(always)]
pub fn mapped_v4(be: u32) -> [u8; 16] {
    let b = be.to_ne_bytes();
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, b[0], b[1], b[2], b[3],
    ]
}

/// IPv6 as the kernel's four network-order words → 16 bytes.
#[inline(always)]
pub fn v6_bytes(words: [u32; 4]) -> [u8; 16] {
    let mut out = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let b = words[i].to_ne_bytes();
        out[i * 4] = b[0];
        out[i * 4 + 1] = b[1];
        out[i * 4 + 2] = b[2];
        out[i * 4 + 3] = b[3];
        i += 1;
    }
    out
}

/// One end of an accelerated connection in the `ACCEL` SockHash: its netns, then its own and
/// its peer's address (IPv4 as `::ffff:a.b.c.d`, network byte order) and ports (host byte
/// order). Swapping local and remote gives the peer's key.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockKey {
    pub netns: u64,
    pub local: [u32; 4],
    pub remote: [u32; 4],
    pub local_port: u32,
    pub remote_port: u32,
}

impl SockKey {
    /// The key of the other end of the same connection.
    #[inline(always)]
    pub fn peer(&self) -> SockKey {
        SockKey {
            netns: self.netns,
            local: self.remote,
            remote: self.local,
            local_port: self.remote_port,
            remote_port: self.local_port,
        }
    }
}

#[cfg(feature = "user")]
mod pod_impls {
    unsafe impl aya::Pod for super::SockKey {}
    // SAFETY: plain old data with explicit layouts.
    unsafe impl aya::Pod for super::PortKey {}
    unsafe impl aya::Pod for super::AddrKey {}
    unsafe impl aya::Pod for super::GroupKey {}
    unsafe impl aya::Pod for super::OrigDst {}
    unsafe impl aya::Pod for super::SockOrig {}
    unsafe impl aya::Pod for super::TupleKey {}
    unsafe impl aya::Pod for crate::decision::PodSrc {}
    unsafe impl aya::Pod for crate::decision::PodPolicy {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cookie_probe_answer_carries_the_cookie_and_is_not_the_probe() {
        for c in [1u64, 4097, u64::MAX, 0x0102_0304_0506_0708] {
            let a = cookie_probe_answer(c);
            assert_ne!(a, COOKIE_PROBE);
            assert_eq!(cookie_from_probe(a), Some(c));
        }
        assert_eq!(cookie_from_probe(COOKIE_PROBE), None);
    }

    #[test]
    fn proxy_marks_name_their_pod_and_never_look_legacy() {
        for id in [0u32, 1, capacity::MAX_PODS - 1] {
            let m = proxy_mark(id);
            assert!(m != 0 && m != PROXY_MARK_LEGACY);
            assert_eq!(proxy_mark_pod(m), Some(id));
        }
        assert_eq!(proxy_mark_pod(PROXY_MARK_LEGACY), None);
    }
}
