//! interceptor's kernel programs. Attached once at the cgroup v2 root, they serve every pod
//! registered in `POD_POLICY` (keyed by netns cookie); a netns without an entry is untouched.
//! Every verdict comes from `interceptor_common::decision`, the model userspace uses too.
//!
//! This file only declares the entry points; each hook family lives in its own module:
//!
//! | module | what |
//! |---|---|
//! | `sock_addr` | `ic_connect4/6`: Istio's ISTIO_OUTPUT decision; on redirect, the rewrite to the proxy on loopback plus the original destination (TCP, and UDP DNS on connected sockets), and the bind to the source a REDIRECT would leave (the pod IP), so the proxy sees that peer. `ic_sendmsg4/6`, `ic_recvmsg4/6`: DNS on unconnected UDP sockets, replies restored to come from the original server. `ic_getpeername4/6`: the app sees the original peer, as with NAT. `ic_bind4/6`: only the proxy may bind the proxy's ports. |
//! | `sockops` | `ic_sockops`: hands the original destination to the proxy's accepted socket through a tuple entry (a bounded per-pod quota of them); registers the proxy's inbound listener. |
//! | `sockopt` | `ic_getsockopt`: answers SO_ORIGINAL_DST / IP6T_SO_ORIGINAL_DST, on the proxy's sockets only. |
//! | `sk_lookup` | `ic_sk_lookup`: inbound connections to captured ports of any non-loopback local address go to the proxy's listener; reached by tail call from each pod netns's own tiny program. |
//! | `sock` | `ic_sock_create`: raw IP sockets, which pass no connect hook, refused in meshed pods to all but the proxy. |
//! | `accel` | `ic_sk_msg` (`--accelerate` pods): data on an app↔proxy loopback connection goes straight to the peer socket's receive queue. |
//! | `maps` | every map, its size and why; the globals the loader sets. |
//! | `ctx` | every raw context read and write. |
//! | `tables` | the pod a hook runs for; `PodTables` over its map entries. |
//! | `counters` | per-pod counters and the tuple quota's count. |
//! | `sk` | socket-local storage (`SK_ORIG`, `SK_PROXY`, `SK_ACCEL`). |
//!
//! Per-socket state lives in socket-local storage: freed with its socket, with no node-wide
//! capacity one pod could use up. Only the app→proxy handover needs a shared map,
//! `ORIG_BY_TUPLE`, where each pod has a quota.
//!
//! Helpers are `#[inline(always)]` throughout: each program is verified, and measured, as one
//! function on every kernel of the matrix; splitting one into BPF-to-BPF calls means checking
//! them all again.
#![no_std]
#![no_main]
// BPF's atomic add (core has no atomic read-modify-write for this target): `tuple_count_add`.
#![feature(asm_experimental_arch)]
#![deny(clippy::undocumented_unsafe_blocks)]
// Map keys are passed by reference, as aya's own examples do: by value would add a copy.
#![allow(clippy::needless_borrows_for_generic_args)]

mod accel;
mod counters;
mod ctx;
mod maps;
mod sk;
mod sk_lookup;
mod sock;
mod sock_addr;
mod sockops;
mod sockopt;
mod tables;

use aya_ebpf::{
    macros::{cgroup_sock, cgroup_sock_addr, cgroup_sockopt, sk_lookup, sk_msg, sock_ops},
    programs::{
        SkLookupContext, SkMsgContext, SockAddrContext, SockContext, SockOpsContext, SockoptContext,
    },
};

// cgroup sock_addr: each pair is one handler, called with `v6`. Returning 0 fails the call
// with EPERM; bind's verdict is the bind guard's.

#[cgroup_sock(sock_create)]
pub fn ic_sock_create(ctx: SockContext) -> i32 {
    sock::create(&ctx)
}

#[cgroup_sock_addr(connect4)]
pub fn ic_connect4(ctx: SockAddrContext) -> i32 {
    i32::from(sock_addr::connect(&ctx, false))
}

#[cgroup_sock_addr(connect6)]
pub fn ic_connect6(ctx: SockAddrContext) -> i32 {
    i32::from(sock_addr::connect(&ctx, true))
}

#[cgroup_sock_addr(sendmsg4)]
pub fn ic_sendmsg4(ctx: SockAddrContext) -> i32 {
    i32::from(sock_addr::sendmsg(&ctx, false))
}

#[cgroup_sock_addr(sendmsg6)]
pub fn ic_sendmsg6(ctx: SockAddrContext) -> i32 {
    i32::from(sock_addr::sendmsg(&ctx, true))
}

#[cgroup_sock_addr(recvmsg4)]
pub fn ic_recvmsg4(ctx: SockAddrContext) -> i32 {
    sock_addr::restore_peer(&ctx, false);
    1
}

#[cgroup_sock_addr(recvmsg6)]
pub fn ic_recvmsg6(ctx: SockAddrContext) -> i32 {
    sock_addr::restore_peer(&ctx, true);
    1
}

#[cgroup_sock_addr(getpeername4)]
pub fn ic_getpeername4(ctx: SockAddrContext) -> i32 {
    sock_addr::restore_peer(&ctx, false);
    1
}

#[cgroup_sock_addr(getpeername6)]
pub fn ic_getpeername6(ctx: SockAddrContext) -> i32 {
    sock_addr::restore_peer(&ctx, true);
    1
}

#[cgroup_sock_addr(bind4)]
pub fn ic_bind4(ctx: SockAddrContext) -> i32 {
    sock_addr::bind(&ctx, false)
}

#[cgroup_sock_addr(bind6)]
pub fn ic_bind6(ctx: SockAddrContext) -> i32 {
    sock_addr::bind(&ctx, true)
}

#[sock_ops]
pub fn ic_sockops(ctx: SockOpsContext) -> u32 {
    sockops::dispatch(&ctx);
    1
}

/// Must return 1: 0 would fail the caller's getsockopt with EPERM.
#[cgroup_sockopt(getsockopt)]
pub fn ic_getsockopt(ctx: SockoptContext) -> i32 {
    sockopt::getsockopt(&ctx);
    1
}

#[sk_lookup]
pub fn ic_sk_lookup(ctx: SkLookupContext) -> u32 {
    sk_lookup::lookup(&ctx)
}

#[sk_msg]
pub fn ic_sk_msg(ctx: SkMsgContext) -> u32 {
    accel::msg(&ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
