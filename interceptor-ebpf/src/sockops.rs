//! sock_ops: hands the original destination of an app→proxy connection to the proxy's accepted
//! socket through a tuple entry (`ORIG_BY_TUPLE`, a bounded per-pod quota of them), and lets the
//! proxy's inbound listener register itself. Established connections of `--accelerate` pods
//! join `ACCEL` (`accel.rs`).

use aya_ebpf::{
    bindings::BPF_NOEXIST, bindings::BPF_SOCK_OPS_STATE_CB_FLAG, programs::SockOpsContext,
};
use interceptor_common::maps::{stat, SockOrig, TupleKey, SOCK_ANSWER, SOCK_APP, SOCK_TUPLE};

use crate::{
    accel,
    counters::{count, tuple_count, tuple_count_add},
    ctx::{ops_ends, ops_family, ops_local_end, ops_local_port, ops_mut, ops_sk, AF_INET6},
    maps::{tuple_quota, LISTENERS, ORIG_BY_TUPLE, SK_ORIG, SK_PROXY},
    tables::{pod_netns, pod_of_proxy, proxy_netns},
};

const SOCK_OPS_TCP_CONNECT_CB: u32 = 3;
const SOCK_OPS_ACTIVE_ESTABLISHED_CB: u32 = 4;
const SOCK_OPS_PASSIVE_ESTABLISHED_CB: u32 = 5;
const SOCK_OPS_STATE_CB: u32 = 10;
const SOCK_OPS_TCP_LISTEN_CB: u32 = 11;
const TCP_CLOSE: u32 = 7;

/// Dispatches a sock_ops callback. The listen, connect and established callbacks are delivered
/// without asking; the state callback only to app sockets that asked for it (`app_connect`).
#[inline(always)]
pub fn dispatch(ctx: &SockOpsContext) {
    match ctx.op() {
        SOCK_OPS_TCP_LISTEN_CB => listen(ctx),
        SOCK_OPS_TCP_CONNECT_CB => app_connect(ctx),
        SOCK_OPS_STATE_CB => {
            if ctx.arg(1) == TCP_CLOSE {
                app_close(ctx);
            }
        }
        SOCK_OPS_ACTIVE_ESTABLISHED_CB => accel::established(ctx),
        SOCK_OPS_PASSIVE_ESTABLISHED_CB => {
            proxy_accepted(ctx);
            accel::established(ctx);
        }
        _ => {}
    }
}

/// The proxy's inbound listener registers itself: a listen() on the inbound capture port in a
/// meshed netns, on a socket the proxy itself bound (see `sock_addr::bind`).
#[inline(always)]
fn listen(ctx: &SockOpsContext) {
    let Some(mark) = ops_sk(ctx).and_then(|sk| SK_PROXY.get(sk)) else {
        return;
    };
    let Some((_, policy)) = pod_of_proxy(ctx, *mark) else {
        return;
    };
    if ops_local_port(ctx) != u32::from(policy.inbound_capture_port) {
        return;
    }
    let v6 = u32::from(ops_family(ctx) == AF_INET6);
    let _ = LISTENERS.update(policy.pod_id * 2 + v6, ops_mut(ctx), 0);
}

/// The tuple key of an app→proxy connection from the app's side: its pod's netns, its own
/// address (last 32 bits) and port, and the proxy port it was redirected to.
#[inline(always)]
fn app_tuple(ctx: &SockOpsContext, st: &SockOrig) -> Option<TupleKey> {
    let (client_addr_tail, client_port) = ops_local_end(ctx);
    Some(TupleKey {
        netns: pod_netns(st.pod_id)?,
        client_addr_tail,
        client_port,
        proxy_port: u32::from(st.orig.redirect_port),
        _pad: 0,
    })
}

/// Gives a quota slot back (whoever deletes a tuple entry does, exactly once).
#[inline(always)]
fn release_slot(pod_id: u32) {
    tuple_count_add(pod_id, u64::MAX);
}

/// A redirected app socket sends its SYN: its source port is known now, so its original
/// destination goes where the proxy's accepted socket can find it, within the pod's quota.
/// Also asks for state callbacks (in addition to any other program's), so the entry goes when
/// the connection does if the proxy never takes it.
#[inline(always)]
fn app_connect(ctx: &SockOpsContext) {
    let Some(st) = ops_sk(ctx).and_then(|sk| SK_ORIG.get(sk)) else {
        return;
    };
    if st.flags & SOCK_APP == 0 {
        return;
    }
    // Added to the flags already set, never in their place: another sock_ops program on this
    // socket (attached beside ours) keeps the callbacks it asked for.
    let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
    let pod_id = st.pod_id;
    let Some(key) = app_tuple(ctx, st) else {
        count(pod_id, stat::TUPLE_STORE_FAILED);
        return;
    };
    // Taken first, then checked: of connects racing for the last slot, the losers give theirs
    // back (none is ever over the quota).
    tuple_count_add(pod_id, 1);
    if tuple_count(pod_id) > tuple_quota() {
        release_slot(pod_id);
        count(pod_id, stat::TUPLE_STORE_FAILED);
        return;
    }
    let value = SockOrig {
        orig: st.orig,
        flags: SOCK_ANSWER,
        pod_id,
    };
    if ORIG_BY_TUPLE
        .insert(&key, &value, u64::from(BPF_NOEXIST))
        .is_err()
    {
        release_slot(pod_id);
        count(pod_id, stat::TUPLE_STORE_FAILED);
        return;
    }
    st.flags |= SOCK_TUPLE;
}

/// A redirected app socket closing: its tuple entry goes, unless the proxy took it already.
#[inline(always)]
fn app_close(ctx: &SockOpsContext) {
    let Some(st) = ops_sk(ctx).and_then(|sk| SK_ORIG.get(sk)) else {
        return;
    };
    if st.flags & SOCK_TUPLE == 0 {
        return;
    }
    st.flags &= !SOCK_TUPLE;
    let Some(key) = app_tuple(ctx, st) else {
        // The pod is gone: its removal deleted its entries and zeroed its count.
        return;
    };
    if ORIG_BY_TUPLE.remove(&key).is_ok() {
        release_slot(st.pod_id);
    }
}

/// The proxy's listener accepted a connection: if it is an app's redirected one, its original
/// destination moves into the accepted socket's `SK_ORIG`, where SO_ORIGINAL_DST finds it.
/// Sockets not marked as the proxy's (`SK_PROXY`, cloned from the listener) are skipped after
/// one socket-storage lookup, with no map lookup at all.
#[inline(always)]
fn proxy_accepted(ctx: &SockOpsContext) {
    let Some(sk) = ops_sk(ctx) else {
        return;
    };
    let Some(mark) = SK_PROXY.get(sk) else {
        return;
    };
    // Only the netns is needed for the key (no policy lookup on this path).
    let Some(netns) = proxy_netns(ctx, *mark) else {
        return;
    };
    let Some((_, remote, local_port, remote_port)) = ops_ends(ctx) else {
        return;
    };
    let key = TupleKey {
        netns,
        client_addr_tail: remote[3],
        client_port: remote_port,
        proxy_port: local_port,
        _pad: 0,
    };
    // SAFETY: the value is copied out at once. ORIG_BY_TUPLE is not preallocated: elements are
    // freed after an RCU grace period, so the copy is of this entry even if it is removed now.
    let Some(v) = (unsafe { ORIG_BY_TUPLE.get(&key) }) else {
        return;
    };
    let v = *v;
    let Some(st) = SK_ORIG.get_or_create(sk) else {
        // Left in ORIG_BY_TUPLE: getsockopt looks there too; the app's close removes it.
        return;
    };
    *st = v;
    if ORIG_BY_TUPLE.remove(&key).is_ok() {
        release_slot(v.pod_id);
    }
}
