//! cgroup getsockopt: answers SO_ORIGINAL_DST / IP6T_SO_ORIGINAL_DST, on the proxy's sockets
//! only. The kernel's own handler runs first; its result stands unless we have an answer.

use aya_ebpf::programs::SockoptContext;
use interceptor_common::{
    decision::{decide_inbound, Verdict},
    maps::{stat, TupleKey, SOCK_ANSWER},
};

use crate::{
    counters::count,
    ctx::{sockopt_answer, sockopt_name, sockopt_retval, sockopt_sk, SOL_IP, SOL_IPV6},
    maps::{ORIG_BY_TUPLE, SK_ORIG, SK_PROXY},
    tables::{pod_of_proxy, MapTables},
};

/// SO_ORIGINAL_DST at SOL_IP, IP6T_SO_ORIGINAL_DST at SOL_IPV6.
const SO_ORIGINAL_DST: i32 = 80;

/// Answers from, in this order: the accepted socket's `SK_ORIG` (outbound, the usual case),
/// `ORIG_BY_TUPLE` (outbound, if that socket's storage could not be allocated), the socket's
/// own local address (inbound through sk_lookup: nothing was rewritten).
#[inline(always)]
pub fn getsockopt(ctx: &SockoptContext) {
    let (level, optname) = sockopt_name(ctx);
    if optname != SO_ORIGINAL_DST || (level != SOL_IP && level != SOL_IPV6) {
        return;
    }
    let Some(sk) = sockopt_sk(ctx) else {
        return;
    };
    // Only the proxy's sockets get an answer: any other socket in the pod (one that took a
    // proxy port, say) learns nothing from us.
    let Some(mark) = SK_PROXY.get(sk) else {
        return;
    };
    let mark = *mark;
    // Outbound: moved onto the proxy's accepted socket when it was established.
    if let Some(st) = SK_ORIG.get(sk) {
        if st.flags & SOCK_ANSWER != 0 {
            if sockopt_answer(ctx, level, st.orig.addr, st.orig.port) {
                count(st.pod_id, stat::ORIG_DST_ANSWERED);
            }
            return;
        }
    }
    let a = sk.accepted();
    let Some((netns, policy)) = pod_of_proxy(ctx, mark) else {
        return;
    };
    // Still in the tuple map if the accepted socket's storage could not be allocated.
    let key = TupleKey {
        netns,
        client_addr_tail: a.peer_tail(),
        client_port: u32::from(a.dport),
        proxy_port: a.lport,
        _pad: 0,
    };
    // SAFETY: only read during this run; ORIG_BY_TUPLE is not preallocated, so a removed
    // element stays intact until an RCU grace period has passed.
    if let Some(v) = unsafe { ORIG_BY_TUPLE.get(&key) } {
        if sockopt_answer(ctx, level, v.orig.addr, v.orig.port) {
            count(policy.pod_id, stat::ORIG_DST_ANSWERED);
        }
        return;
    }
    // Inbound (sk_lookup): nothing was rewritten, the original destination is the socket's
    // own local address, if that connection is one the pod captures.
    let (local, remote) = sk.addrs(&a);
    let tables = MapTables {
        pod_id: policy.pod_id,
    };
    let lport = a.lport as u16;
    // Any local address the pod captures (decide_inbound passes loopback), not only the
    // addresses known at registration.
    let answered = matches!(
        decide_inbound(policy, &tables, local, lport, remote),
        Verdict::Redirect { .. }
    ) && sockopt_answer(ctx, level, local.0, lport);
    // The kernel's own answer (NAT) counts as answered too: only a failed lookup is a miss.
    let kernel_ok = sockopt_retval(ctx) == 0;
    count(
        policy.pod_id,
        if answered || kernel_ok {
            stat::ORIG_DST_ANSWERED
        } else {
            stat::ORIG_DST_MISSED
        },
    );
}
