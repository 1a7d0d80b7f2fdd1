//! Acceleration (`--accelerate` pods): sockops puts both ends of an app↔proxy loopback
//! connection into `ACCEL`, and `ic_sk_msg` hands each message straight to the peer socket's
//! receive queue, skipping the loopback TCP stack. Which connections qualify is
//! `interceptor_common::decision::accelerated`.

use aya_ebpf::programs::{SkMsgContext, SockOpsContext};
use interceptor_common::{
    decision::{accelerated, Addr},
    maps::{v6_bytes, SockKey},
};

use crate::{
    ctx::{msg_ends, msg_sk, netns_cookie, ops_ends, ops_mut},
    maps::{netns_helper, ACCEL, ACCEL_ON, SK_ACCEL},
    tables::pod_of,
};

const BPF_F_INGRESS: u64 = 1;
const SK_PASS: u32 = 1;
const SK_DROP: u32 = 0;

/// An established connection of an `--accelerate` pod whose ends both live in this netns joins
/// `ACCEL` (each end from its own callback: active for the connecting side, passive for the
/// accepted one).
#[inline(always)]
pub fn established(ctx: &SockOpsContext) {
    match ACCEL_ON.get(0) {
        Some(n) if *n != 0 => {}
        _ => return,
    }
    // Registration refuses acceleration where sock_ops cannot read the netns cookie.
    if !netns_helper() {
        return;
    }
    let Some((netns, policy)) = pod_of(ctx) else {
        return;
    };
    let Some((local, remote, local_port, remote_port)) = ops_ends(ctx) else {
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
    let _ = ACCEL.update(key, ops_mut(ctx), 0);
}

/// Hands each message of an accelerated socket to its peer's receive queue. A socket whose
/// peer is not (yet) in `ACCEL` sends through TCP, for good.
#[inline(always)]
pub fn msg(ctx: &SkMsgContext) -> u32 {
    if !netns_helper() {
        return SK_PASS;
    }
    let Some((local, remote, local_port, remote_port)) = msg_ends(ctx) else {
        return SK_PASS;
    };
    let key = SockKey {
        netns: netns_cookie(ctx),
        local,
        remote,
        local_port,
        remote_port,
    };
    let Some(sk) = msg_sk(ctx) else {
        return SK_PASS;
    };
    if SK_ACCEL.get(sk).is_some() {
        return SK_PASS;
    }
    // SK_PASS with the peer set: redirected; anything else: the peer is not in ACCEL.
    if ACCEL.redirect_msg(ctx, key.peer(), BPF_F_INGRESS) != i64::from(SK_PASS) {
        // Marks this socket for good; freed with it. Not storable: this message and every
        // later one is dropped rather than risk one overtaking another.
        match SK_ACCEL.get_or_create(sk) {
            Some(m) => *m = 1,
            None => return SK_DROP,
        }
    }
    SK_PASS
}
