//! `ic_sock_create`: raw IP sockets in meshed pods, for the proxy only
//! (`decision::raw_socket_allowed`: Istio's NAT redirects raw packets, a socket hook cannot).

use aya_ebpf::{helpers::bpf_get_current_uid_gid, programs::SockContext};
use interceptor_common::{decision::raw_socket_allowed, maps::stat};

use crate::counters::count;
use crate::ctx::{created_family_type, AF_INET, AF_INET6, SOCK_RAW};
use crate::tables::pod_of;

/// sock_create runs for every IPv4/IPv6 socket of the node: the type is read first, so all but
/// raw sockets leave after one context read, before any map lookup. Returns 0 (EPERM) to refuse.
#[inline(always)]
pub fn create(ctx: &SockContext) -> i32 {
    let (family, ty) = created_family_type(ctx);
    if ty != SOCK_RAW || (family != AF_INET && family != AF_INET6) {
        return 1;
    }
    let Some((_, policy)) = pod_of(ctx) else {
        return 1;
    };
    let ug = bpf_get_current_uid_gid();
    let allowed = raw_socket_allowed(policy, family == AF_INET6, ug as u32, (ug >> 32) as u32);
    if !allowed {
        count(policy.pod_id, stat::RAW_DENIED);
    }
    i32::from(allowed)
}
