//! cgroup sock_addr hooks: connect and unconnected sendmsg (outbound capture, Istio's
//! ISTIO_OUTPUT decision), recvmsg and getpeername (the app sees its original peer, as with
//! NAT), bind (the bind guard). Each handler takes `v6`: the AF_INET6 hook of the pair.

use aya_ebpf::{helpers::bpf_get_current_uid_gid, programs::SockAddrContext};
use aya_log_ebpf::info;
use interceptor_common::{
    decision::{
        bind_allowed, decide_routed, is_proxy, kernel_dst, redirect_source, Addr, Conn, Proto,
        Reason, Route, Verdict,
    },
    maps::{cookie_probe_answer, mapped_v4, proxy_mark, stat, OrigDst, COOKIE_PROBE, SOCK_APP},
};

use crate::{
    counters::{count, tuple_count},
    ctx::{
        bind_source, msg_src, netns_cookie, set_msg_src, set_user_addr, sock_addr_bound_src,
        sock_addr_protocol, sock_addr_sk, user_addr, Sk, AF_INET, AF_INET6, IPPROTO_TCP,
        IPPROTO_UDP,
    },
    maps::{log_enabled, store_fault, tuple_quota, POD_SRC, SK_ORIG, SK_PROXY},
    tables::{pod_of, MapTables},
};

const DNS_PORT: u16 = 53;

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
    /// Redirected.
    Redirect(Redirect),
}

/// A redirect `outbound` decided.
struct Redirect {
    /// The original destination, as the kernel routes it (`kernel_dst`), and whether it is
    /// one of the pod's own addresses.
    route: Route,
    orig: OrigDst,
    pod_id: u32,
    netns: u64,
    /// The source the app bound, if any.
    bound: Option<Addr>,
}

/// Decides an outbound connect/sendmsg.
#[inline(always)]
fn outbound(ctx: &SockAddrContext, v6: bool) -> Out {
    let Some((netns, policy)) = pod_of(ctx) else {
        return Out::Untouched;
    };
    let proto = match sock_addr_protocol(ctx) {
        IPPROTO_TCP => Proto::Tcp,
        IPPROTO_UDP => Proto::Udp,
        _ => return Out::Untouched,
    };
    let (dst, dport) = user_addr(ctx, v6);
    // The bound source, if any (Envoy binds 127.0.0.6 for its inbound passthrough).
    let src = sock_addr_bound_src(ctx, v6);
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
    let tables = MapTables {
        pod_id: policy.pod_id,
    };
    let route = Route::of(&tables, &conn);
    let verdict = decide_routed(policy, &tables, &conn, route);
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
    Out::Redirect(Redirect {
        route,
        orig: OrigDst {
            addr: dst.0,
            port: dport,
            redirect_port: port,
            family,
        },
        pod_id: policy.pod_id,
        netns,
        bound: src,
    })
}

/// Sends a redirected connect/sendmsg to the proxy on loopback, after storing its original
/// destination on the socket (`SK_ORIG`). False (the call fails with EPERM) when it cannot be
/// stored: the proxy could not learn the destination, and leaving the call alone would let
/// it escape. Fail closed, counted.
#[inline(always)]
fn redirect(ctx: &SockAddrContext, v6: bool, sk: Option<Sk>, r: &Redirect) -> bool {
    let (orig, pod_id) = (r.orig, r.pod_id);
    let st = match sk {
        Some(sk) if !store_fault(orig.port) => SK_ORIG.get_or_create(sk),
        _ => None,
    };
    let Some(st) = st else {
        count(pod_id, stat::OUT_STORE_FAILED);
        return false;
    };
    // A tuple entry of an earlier connection of this socket was settled when it closed.
    st.orig = orig;
    st.flags = SOCK_APP;
    st.pod_id = pod_id;
    set_user_addr(ctx, v6, loopback_for(r.route.dst), orig.redirect_port);
    true
}

/// The source a REDIRECT would have left a redirected connection or message
/// (`decision::redirect_source`), so the proxy sees the pod IP, not loopback, as its peer.
/// `bound`: the source already chosen, if any.
#[inline(always)]
fn source_like_redirect(r: &Redirect, bound: Option<Addr>) -> Option<Addr> {
    let pod = POD_SRC.get(r.pod_id)?;
    // An entry an earlier pod with this id left behind is not this pod's address.
    if pod.netns != r.netns {
        return None;
    }
    redirect_source(pod, r.route, bound)
}

/// connect4/6: redirects as decided; false (EPERM) as in `redirect`, or, for TCP, when the pod
/// already has `TUPLE_QUOTA` connections waiting for the proxy (see `sockops`).
#[inline(always)]
pub fn connect(ctx: &SockAddrContext, v6: bool) -> bool {
    let sk = sock_addr_sk(ctx);
    let r = match outbound(ctx, v6) {
        Out::Untouched => return true,
        Out::Pass => {
            // A socket connected again (after connect(AF_UNSPEC)) somewhere not redirected:
            // what it stored for an earlier redirect no longer applies.
            if let Some(sk) = sk {
                SK_ORIG.delete(sk);
            }
            return true;
        }
        Out::Redirect(r) => r,
    };
    let pod_id = r.pod_id;
    let udp = sock_addr_protocol(ctx) == IPPROTO_UDP;
    // TCP: checked here so the app gets EPERM; taken (atomically) when sockops stores the
    // tuple, where a connect racing for the last slot fails closed instead.
    if !udp && tuple_count(pod_id) >= tuple_quota() {
        count(pod_id, stat::OUT_QUOTA_REFUSED);
        return false;
    }
    if !redirect(ctx, v6, sk, &r) {
        return false;
    }
    // A refusal (counted) leaves the kernel's loopback source; the connection still goes to
    // the proxy.
    if let Some(src) = source_like_redirect(&r, r.bound) {
        if !bind_source(ctx, v6, src) {
            count(pod_id, stat::SRC_NOT_BOUND);
        }
    }
    true
}

/// sendmsg4/6 on unconnected UDP: only DNS is ever redirected (Istio captures nothing else of
/// UDP); refused (EPERM) as in `redirect`, never sent around the DNS proxy.
#[inline(always)]
pub fn sendmsg(ctx: &SockAddrContext, v6: bool) -> bool {
    let Out::Redirect(r) = outbound(ctx, v6) else {
        return true;
    };
    if r.orig.port != DNS_PORT {
        return true;
    }
    if !redirect(ctx, v6, sock_addr_sk(ctx), &r) {
        return false;
    }
    // The message's own source, as with connect (nothing to bind: the socket stays as it is).
    let chosen = msg_src(ctx, v6);
    // Assigning None writes only the discriminant: the payload stays defined for the verifier.
    let mut bound = Some(chosen);
    if chosen.is_unspecified() {
        bound = None;
    }
    if let Some(src) = source_like_redirect(&r, bound) {
        set_msg_src(ctx, v6, src);
    }
    true
}

/// The app's original destination stored on its socket, if the socket was redirected.
#[inline(always)]
fn app_orig(ctx: &SockAddrContext) -> Option<OrigDst> {
    let st = SK_ORIG.get(sock_addr_sk(ctx)?)?;
    (st.flags & SOCK_APP != 0).then_some(st.orig)
}

/// recvmsg4/6 and getpeername4/6: an address the kernel reports as the proxy's (loopback, the
/// port the socket was redirected to) is replaced by the original one. For recvmsg: a DNS
/// reply from the proxy appears to come from the server the app asked. For getpeername: the
/// app sees its original peer, but only while the socket is still connected to the proxy;
/// after an AF_UNSPEC disconnect and a connect that was not redirected, the real peer is the
/// answer (the pass verdict also dropped the stored destination; this holds even if dropping
/// it failed).
#[inline(always)]
pub fn restore_peer(ctx: &SockAddrContext, v6: bool) {
    let Some(orig) = app_orig(ctx) else {
        return;
    };
    let (from, port) = user_addr(ctx, v6);
    if port == orig.redirect_port && from.is_loopback() {
        set_user_addr(ctx, v6, orig.addr, orig.port);
    }
}

/// bind4/6: only the proxy may bind the proxy's ports (an app could otherwise impersonate it).
/// bind6 also answers the netns cookie probe (`maps::COOKIE_PROBE`).
#[inline(always)]
pub fn bind(ctx: &SockAddrContext, v6: bool) -> i32 {
    let (addr, port) = user_addr(ctx, v6);
    if v6 && port == 0 && addr.0 == COOKIE_PROBE {
        // Before 5.14 a process cannot read its netns cookie (SO_NETNS_COOKIE); the loader
        // asks this way. The socket is bound where getsockname shows the cookie.
        set_user_addr(ctx, true, cookie_probe_answer(netns_cookie(ctx)), 0);
        return 1;
    }
    let Some((_, policy)) = pod_of(ctx) else {
        return 1;
    };
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
        if let Some(m) = sock_addr_sk(ctx).and_then(|sk| SK_PROXY.get_or_create(sk)) {
            *m = proxy_mark(policy.pod_id);
        }
    }
    i32::from(allowed)
}
