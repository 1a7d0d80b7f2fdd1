//! Every raw read and write of a program context, and of the sockets contexts hand out.
//!
//! One safety argument covers them all: a context pointer is the one the kernel passed to this
//! program run, valid for the whole run, and the verifier checks every access (offset, size,
//! read or write) against the program type before the program ever runs. Socket pointers
//! (`ctx->sk`) only come from those contexts, NULL-checked into `Sk`.
//!
//! Verifier rules that shape this code (each cost a rejected load once):
//! - Every field is read with a volatile load of constant offset, all fields first, then
//!   choose: choosing between field addresses makes LLVM emit a modified ctx pointer (and
//!   hoist computed addresses out of branches), which the verifier rejects.
//! - Writes are volatile one field at a time: LLVM merged two adjacent 4-byte stores into one
//!   8-byte store, an "invalid bpf_context access".
//! - Map keys are built from copies on the stack, never from context memory.

use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile, NonNull};

use aya_ebpf::{
    bindings::{bpf_sock, bpf_sock_ops, sockaddr},
    helpers::{bpf_bind, bpf_get_netns_cookie},
    programs::{
        SkLookupContext, SkMsgContext, SockAddrContext, SockContext, SockOpsContext, SockoptContext,
    },
    EbpfContext,
};
use interceptor_common::{decision::Addr, maps::v6_bytes};

pub const AF_INET: u32 = 2;
pub const AF_INET6: u32 = 10;
pub const IPPROTO_TCP: u32 = 6;
pub const IPPROTO_UDP: u32 = 17;
pub const SOCK_RAW: u32 = 3;
pub const SOL_IP: i32 = 0;
pub const SOL_IPV6: i32 = 41;

/// The netns cookie of the socket (or netns) the hook runs for. Not callable from sk_lookup.
#[inline(always)]
pub fn netns_cookie<C: EbpfContext>(ctx: &C) -> u64 {
    // SAFETY: the helper only reads the context the kernel passed; the verifier refuses the
    // program types that may not call it.
    unsafe { bpf_get_netns_cookie(ctx.as_ptr()) }
}

/// A socket the kernel handed this program run (`ctx->sk`), never NULL. Made only here, from
/// context reads, so `sk.rs` can pass it to the socket-storage helpers without further checks.
#[derive(Clone, Copy)]
pub struct Sk(NonNull<bpf_sock>);

impl Sk {
    #[inline(always)]
    fn new(p: *mut bpf_sock) -> Option<Sk> {
        NonNull::new(p).map(Sk)
    }

    #[inline(always)]
    pub fn as_ptr(self) -> *mut bpf_sock {
        self.0.as_ptr()
    }

    /// The fields of an accepted socket that name its connection in `ORIG_BY_TUPLE`.
    #[inline(always)]
    pub fn accepted(self) -> Accepted {
        let sk = self.as_ptr();
        // SAFETY: as in `bound_src`. Both families' fields are loaded, then chosen from: a
        // branch would let LLVM select the offset, and sock pointers allow no arithmetic.
        unsafe {
            Accepted {
                family: read_volatile(addr_of!((*sk).family)),
                tail6: read_volatile(addr_of!((*sk).dst_ip6[3])),
                tail4: read_volatile(addr_of!((*sk).dst_ip4)),
                dport: u16::from_be(read_volatile(addr_of!((*sk).dst_port))),
                lport: read_volatile(addr_of!((*sk).src_port)),
            }
        }
    }

    /// The accepted socket's `(local, remote)` addresses; `a` from `accepted` (its address tails
    /// are not read again).
    #[inline(always)]
    pub fn addrs(self, a: &Accepted) -> (Addr, Addr) {
        let sk = self.as_ptr();
        // SAFETY: as in `accepted`.
        let f = unsafe {
            [
                read_volatile(addr_of!((*sk).src_ip4)),
                read_volatile(addr_of!((*sk).src_ip6[0])),
                read_volatile(addr_of!((*sk).src_ip6[1])),
                read_volatile(addr_of!((*sk).src_ip6[2])),
                read_volatile(addr_of!((*sk).src_ip6[3])),
                read_volatile(addr_of!((*sk).dst_ip6[0])),
                read_volatile(addr_of!((*sk).dst_ip6[1])),
                read_volatile(addr_of!((*sk).dst_ip6[2])),
            ]
        };
        if a.family == AF_INET6 {
            (
                Addr::v6(v6_bytes([f[1], f[2], f[3], f[4]])),
                Addr::v6(v6_bytes([f[5], f[6], f[7], a.tail6])),
            )
        } else {
            (
                Addr::v4(u32::from_be(f[0])),
                Addr::v4(u32::from_be(a.tail4)),
            )
        }
    }
}

/// Fields of a proxy's accepted socket (`bpf_sock`): family, the peer's address tails of both
/// families (network order), the peer's port (host order) and the local port (host order).
pub struct Accepted {
    pub family: u32,
    pub tail6: u32,
    pub tail4: u32,
    pub dport: u16,
    pub lport: u32,
}

impl Accepted {
    /// The last 32 bits of the peer's address, in the socket's family.
    #[inline(always)]
    pub fn peer_tail(&self) -> u32 {
        if self.family == AF_INET6 {
            self.tail6
        } else {
            self.tail4
        }
    }
}

// --- cgroup sock_addr (connect, sendmsg, recvmsg, getpeername, bind) ---------------------------

/// The socket a sock_addr hook runs for.
#[inline(always)]
pub fn sock_addr_sk(ctx: &SockAddrContext) -> Option<Sk> {
    // SAFETY: see the module documentation.
    Sk::new(unsafe { (*ctx.sock_addr).__bindgen_anon_1.sk })
}

/// The source address the hook's socket is bound to, if any (Envoy binds 127.0.0.6 for its
/// inbound passthrough): `src_ip6` for AF_INET6 hooks, else `src_ip4`.
///
/// The address is computed on every path (a socket-less hook reads as unbound, zeros) and the
/// Option keeps it even when None: an Option whose payload is left undefined on one path
/// became a read of an uninitialised register ("R5 !read_ok"), which the verifier rejects.
#[inline(always)]
pub fn sock_addr_bound_src(ctx: &SockAddrContext, v6: bool) -> Option<Addr> {
    let sk = sock_addr_sk(ctx);
    let (bound, addr) = if v6 {
        let w = match sk {
            // SAFETY: see the module documentation (a socket from the context).
            Some(sk) => unsafe {
                let sk = sk.as_ptr();
                [
                    read_volatile(addr_of!((*sk).src_ip6[0])),
                    read_volatile(addr_of!((*sk).src_ip6[1])),
                    read_volatile(addr_of!((*sk).src_ip6[2])),
                    read_volatile(addr_of!((*sk).src_ip6[3])),
                ]
            },
            None => [0; 4],
        };
        let a = Addr::v6(v6_bytes(w));
        (!a.is_unspecified(), a)
    } else {
        let s = match sk {
            // SAFETY: as above.
            Some(sk) => unsafe { read_volatile(addr_of!((*sk.as_ptr()).src_ip4)) },
            None => 0,
        };
        (s != 0, Addr::v4(u32::from_be(s)))
    };
    // Assigning None writes only the discriminant: the payload stays `addr`, defined.
    let mut src = Some(addr);
    if !bound {
        src = None;
    }
    src
}

/// `(family, type)` of the socket being created (`cgroup/sock_create`).
#[inline(always)]
pub fn created_family_type(ctx: &SockContext) -> (u32, u32) {
    // SAFETY: see the module documentation; `family` and `type` are readable at sock_create.
    unsafe {
        (
            read_volatile(addr_of!((*ctx.sock).family)),
            read_volatile(addr_of!((*ctx.sock).type_)),
        )
    }
}

/// `protocol` of a sock_addr hook's socket (IPPROTO_*).
#[inline(always)]
pub fn sock_addr_protocol(ctx: &SockAddrContext) -> u32 {
    // SAFETY: see the module documentation.
    unsafe { read_volatile(addr_of!((*ctx.sock_addr).protocol)) }
}

/// The address a sock_addr hook was given (`user_ip4/6`, `user_port`): the destination of a
/// connect/sendmsg, the source of a received message, the peer for getpeername, the address
/// to bind.
#[inline(always)]
pub fn user_addr(ctx: &SockAddrContext, v6: bool) -> (Addr, u16) {
    let sa = ctx.sock_addr;
    // SAFETY: see the module documentation.
    unsafe {
        let addr = if v6 {
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
            addr,
            u16::from_be(read_volatile(addr_of!((*sa).user_port)) as u16),
        )
    }
}

/// Writes an address back into `user_ip4/6`, `user_port`. On AF_INET6 sockets an IPv4 address
/// becomes `::ffff:a.b.c.d` (it stays IPv4 on the wire).
#[inline(always)]
pub fn set_user_addr(ctx: &SockAddrContext, v6: bool, addr: [u8; 16], port: u16) {
    let sa = ctx.sock_addr;
    // SAFETY: see the module documentation; these hooks may write user_ip4/6 and user_port.
    unsafe {
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
}

/// sendmsg4/6 only: the source the message will leave from (`msg_src_ip4/6`), unspecified
/// unless the socket is bound or the app chose one (`IP_PKTINFO`).
#[inline(always)]
pub fn msg_src(ctx: &SockAddrContext, v6: bool) -> Addr {
    let sa = ctx.sock_addr;
    // SAFETY: see the module documentation; sendmsg hooks may read msg_src_ip4/6.
    unsafe {
        if v6 {
            Addr::v6(v6_bytes([
                read_volatile(addr_of!((*sa).msg_src_ip6[0])),
                read_volatile(addr_of!((*sa).msg_src_ip6[1])),
                read_volatile(addr_of!((*sa).msg_src_ip6[2])),
                read_volatile(addr_of!((*sa).msg_src_ip6[3])),
            ]))
        } else {
            Addr::v4(u32::from_be(read_volatile(addr_of!((*sa).msg_src_ip4))))
        }
    }
}

/// sendmsg4/6 only: sets the message's source (`msg_src_ip4/6`). `v6` with an IPv4 `addr`
/// writes nothing: such a message goes through sendmsg4.
#[inline(always)]
pub fn set_msg_src(ctx: &SockAddrContext, v6: bool, addr: Addr) {
    let sa = ctx.sock_addr;
    // SAFETY: see the module documentation; sendmsg hooks may write msg_src_ip4/6, one field
    // at a time.
    unsafe {
        if v6 {
            if addr.is_v4() {
                return;
            }
            let ip6 = addr_of_mut!((*sa).msg_src_ip6).cast::<u32>();
            let b = addr.0;
            let mut i = 0;
            while i < 4 {
                let w = u32::from_ne_bytes([b[i * 4], b[i * 4 + 1], b[i * 4 + 2], b[i * 4 + 3]]);
                write_volatile(ip6.add(i), w);
                i += 1;
            }
        } else {
            let w = u32::from_ne_bytes([addr.0[12], addr.0[13], addr.0[14], addr.0[15]]);
            write_volatile(addr_of_mut!((*sa).msg_src_ip4), w);
        }
    }
}

/// `struct sockaddr_in`.
#[repr(C)]
struct SockaddrIn {
    family: u16,
    port: u16,
    addr: [u8; 4],
    zero: [u8; 8],
}

/// `struct sockaddr_in6`.
#[repr(C)]
struct SockaddrIn6 {
    family: u16,
    port: u16,
    flowinfo: u32,
    addr: [u8; 16],
    scope_id: u32,
}

/// Binds the connecting socket to `addr` with port 0 (`bpf_bind`: the kernel then picks the
/// port at connect, by the whole 4-tuple, as `IP_BIND_ADDRESS_NO_PORT` does). On AF_INET6
/// sockets an IPv4 address is bound as `::ffff:a.b.c.d`. False when the kernel refused (the
/// socket has a port already, or the address is not the pod's).
#[inline(always)]
pub fn bind_source(ctx: &SockAddrContext, v6: bool, addr: Addr) -> bool {
    let r = if v6 {
        let mut sa = SockaddrIn6 {
            family: AF_INET6 as u16,
            port: 0,
            flowinfo: 0,
            addr: addr.0,
            scope_id: 0,
        };
        // SAFETY: connect hooks may call bpf_bind with their own context; `sa` is a complete
        // sockaddr_in6 on this program's stack, its length passed with it.
        unsafe {
            bpf_bind(
                ctx.sock_addr,
                addr_of_mut!(sa).cast::<sockaddr>(),
                core::mem::size_of::<SockaddrIn6>() as i32,
            )
        }
    } else {
        let mut sa = SockaddrIn {
            family: AF_INET as u16,
            port: 0,
            addr: [addr.0[12], addr.0[13], addr.0[14], addr.0[15]],
            zero: [0; 8],
        };
        // SAFETY: as above, a complete sockaddr_in.
        unsafe {
            bpf_bind(
                ctx.sock_addr,
                addr_of_mut!(sa).cast::<sockaddr>(),
                core::mem::size_of::<SockaddrIn>() as i32,
            )
        }
    };
    r == 0
}

// --- sock_ops and sk_msg -----------------------------------------------------------------------

/// The two ends of a TCP socket: `(local, remote, local_port, remote_port)`, addresses as
/// network-order words with IPv4 as `::ffff:a.b.c.d`, ports in host order.
pub type Ends = ([u32; 4], [u32; 4], u32, u32);

/// `::ffff:a.b.c.d` as four network-order words, from the network-order IPv4 word.
#[inline(always)]
fn mapped_words(ip4: u32) -> [u32; 4] {
    [0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff]), ip4]
}

/// `Ends` from a `bpf_sock_ops` or an `sk_msg_md` pointer (both name the fields alike); None
/// for a family other than AF_INET/AF_INET6.
macro_rules! sock_ends {
    ($p:expr) => {{
        let p = $p;
        // SAFETY: see the module documentation: every field read once, all fields first.
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

/// The ends of the connection a sock_ops callback runs for.
#[inline(always)]
pub fn ops_ends(ctx: &SockOpsContext) -> Option<Ends> {
    sock_ends!(ctx.ops)
}

/// The ends of the socket an sk_msg program runs for.
#[inline(always)]
pub fn msg_ends(ctx: &SkMsgContext) -> Option<Ends> {
    sock_ends!(ctx.msg)
}

/// The socket a sock_ops callback runs for (None for request sockets).
#[inline(always)]
pub fn ops_sk(ctx: &SockOpsContext) -> Option<Sk> {
    // SAFETY: see the module documentation.
    Sk::new(unsafe { read_volatile(addr_of!((*ctx.ops).__bindgen_anon_2.sk)) })
}

/// `local_port` of a sock_ops callback's socket (host order).
#[inline(always)]
pub fn ops_local_port(ctx: &SockOpsContext) -> u32 {
    // SAFETY: see the module documentation.
    unsafe { read_volatile(addr_of!((*ctx.ops).local_port)) }
}

/// `family` of a sock_ops callback's socket.
#[inline(always)]
pub fn ops_family(ctx: &SockOpsContext) -> u32 {
    // SAFETY: see the module documentation.
    unsafe { read_volatile(addr_of!((*ctx.ops).family)) }
}

/// The local end of a sock_ops callback's socket: the last 32 bits of its address (network
/// order) and its port (host order).
#[inline(always)]
pub fn ops_local_end(ctx: &SockOpsContext) -> (u32, u32) {
    let ops = ctx.ops;
    // SAFETY: see the module documentation: every field once, then choose.
    let (family, ip4, ip6_tail, lport) = unsafe {
        (
            read_volatile(addr_of!((*ops).family)),
            read_volatile(addr_of!((*ops).local_ip4)),
            read_volatile(addr_of!((*ops).local_ip6[3])),
            read_volatile(addr_of!((*ops).local_port)),
        )
    };
    (if family == AF_INET6 { ip6_tail } else { ip4 }, lport)
}

/// The sock_ops context as the socket map helpers take it (`bpf_sock_map/hash_update`). The
/// context is the kernel's, not borrowed from the wrapper (hence `&mut` from `&`).
#[inline(always)]
#[allow(clippy::mut_from_ref)]
pub fn ops_mut(ctx: &SockOpsContext) -> &mut bpf_sock_ops {
    // SAFETY: see the module documentation; the helpers only read the socket it names.
    unsafe { &mut *ctx.ops }
}

/// The socket an sk_msg program runs for.
#[inline(always)]
pub fn msg_sk(ctx: &SkMsgContext) -> Option<Sk> {
    // SAFETY: see the module documentation.
    Sk::new(unsafe { read_volatile(addr_of!((*ctx.msg).__bindgen_anon_3.sk)) })
}

// --- cgroup getsockopt -------------------------------------------------------------------------

/// `(level, optname)` of a getsockopt call.
#[inline(always)]
pub fn sockopt_name(ctx: &SockoptContext) -> (i32, i32) {
    let so = ctx.sockopt;
    // SAFETY: see the module documentation.
    unsafe {
        let level = read_volatile(addr_of!((*so).level));
        (level, read_volatile(addr_of!((*so).optname)))
    }
}

/// The socket a getsockopt call is made on.
#[inline(always)]
pub fn sockopt_sk(ctx: &SockoptContext) -> Option<Sk> {
    // SAFETY: see the module documentation.
    Sk::new(unsafe { (*ctx.sockopt).__bindgen_anon_1.sk })
}

/// The kernel's own result so far (0: it answered).
#[inline(always)]
pub fn sockopt_retval(ctx: &SockoptContext) -> i32 {
    // SAFETY: see the module documentation.
    unsafe { read_volatile(addr_of!((*ctx.sockopt).retval)) }
}

/// Answers the getsockopt with a sockaddr_in / sockaddr_in6 of `addr:port` (`optval`, `optlen`,
/// `retval` 0); false, and nothing written, if the level does not match the address's family
/// or the buffer is too small.
#[inline(always)]
pub fn sockopt_answer(ctx: &SockoptContext, level: i32, addr: [u8; 16], port: u16) -> bool {
    let so = ctx.sockopt;
    // SAFETY: see the module documentation. `optval..optval_end` is the caller's buffer as the
    // kernel copied it; every write is after a bounds check against `optval_end`, the check the
    // verifier demands too.
    unsafe {
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
    }
    true
}

// --- sk_lookup ---------------------------------------------------------------------------------

/// `(protocol, family)` of an sk_lookup.
#[inline(always)]
pub fn lookup_proto_family(ctx: &SkLookupContext) -> (u32, u32) {
    let l = ctx.lookup;
    // SAFETY: see the module documentation.
    unsafe {
        (
            read_volatile(addr_of!((*l).protocol)),
            read_volatile(addr_of!((*l).family)),
        )
    }
}

/// `(local, remote)` addresses of an sk_lookup of `family`.
#[inline(always)]
pub fn lookup_addrs(ctx: &SkLookupContext, family: u32) -> (Addr, Addr) {
    let l = ctx.lookup;
    // SAFETY: see the module documentation. Every field once, unconditionally and in
    // straight-line code: under a branch LLVM hoists a computed context address, which the
    // verifier rejects.
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
    if family == AF_INET6 {
        (
            Addr::v6(v6_bytes([f[1], f[2], f[3], f[4]])),
            Addr::v6(v6_bytes([f[6], f[7], f[8], f[9]])),
        )
    } else {
        (Addr::v4(u32::from_be(f[0])), Addr::v4(u32::from_be(f[5])))
    }
}

/// The local (destination) port of an sk_lookup, host order.
#[inline(always)]
pub fn lookup_port(ctx: &SkLookupContext) -> u16 {
    // SAFETY: see the module documentation.
    unsafe { read_volatile(addr_of!((*ctx.lookup).local_port)) as u16 }
}
