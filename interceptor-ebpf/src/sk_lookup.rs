//! sk_lookup (inbound): a TCP connection to any non-loopback local address of the pod on a
//! captured port goes to the proxy's listener, as ISTIO_INBOUND (PREROUTING) captures it:
//! addresses added after registration, further interfaces and IPv6 link-local included. No
//! NAT: the accepted socket keeps the original local address and the client's address.
//!
//! With no listener registered the lookup fails and the client gets a reset, as with Istio's
//! REDIRECT to a port nobody listens on: never the app, unprotected. Reached by tail call from
//! the pod's own program (built by the loader, interceptor/src/backend/sk_lookup.rs), which
//! stored the pod's netns cookie in `INBOUND_NETNS`: sk_lookup cannot read it.

use aya_ebpf::{bindings::sk_action, programs::SkLookupContext};
use interceptor_common::{
    decision::{decide_inbound, Reason, Verdict},
    maps::stat,
};

use crate::{
    counters::count,
    ctx::{lookup_addrs, lookup_port, lookup_proto_family, AF_INET6, IPPROTO_TCP},
    maps::{INBOUND_NETNS, LISTENERS},
    tables::{policy, MapTables},
};

#[inline(always)]
pub fn lookup(ctx: &SkLookupContext) -> u32 {
    let (protocol, family) = lookup_proto_family(ctx);
    if protocol != IPPROTO_TCP {
        return sk_action::SK_PASS;
    }
    // Copied to the stack: map keys are built from these, not from the context.
    let (local, remote) = lookup_addrs(ctx, family);
    let port = lookup_port(ctx);
    let netns = match INBOUND_NETNS.get(0) {
        Some(n) => *n,
        None => return sk_action::SK_PASS,
    };
    // A pod being removed: its program is detached right after its policy goes.
    let Some(policy) = policy(netns) else {
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
    match LISTENERS.redirect_sk_lookup(ctx, key, 0) {
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
