//! The eBPF backend: loads interceptor-ebpf's programs once, attaches them at a cgroup v2 root
//! and pins programs, links and maps under a bpffs folder of ours so they outlive the process;
//! pods are registered (by netns cookie) with a few map writes.
//!
//! Layout under the bpffs folder: `maps/<MAP>`, `links/<program>` (bpf_link pins: unpinning
//! detaches), `links/sk_lookup-<netns cookie>` (each pod's own sk_lookup program, see
//! `sk_lookup.rs`), `progs/<program>`, and the `layout` marker (layout version and program
//! identity, written last; see `upgrade.rs`). aya 0.14 cannot turn a cgroup-sockopt link into a
//! pinnable `FdLink`, so getsockopt is attached with `BPF_PROG_ATTACH` (multi mode), which
//! lives until `cleanup` detaches it. `ic_sk_msg` (acceleration) is attached to the pinned
//! `ACCEL` SockHash with `BPF_PROG_ATTACH` too: the attachment lives as long as the map.
//!
//! One file per concern, as aya splits its crate: `sys` (every raw `bpf()` call, nothing else
//! unsafe), `pins` (load, attach, pin, detach), `pod_maps` (the open maps pods are written to), `pod_ids` (which pod ids are taken),
//! `registry` (a pod's map writes and removal, all or nothing; `cleanup`), `keys` (which keys
//! a registration writes: pure), `journal` (what a failed registration undoes),
//! `inspect` (read-only views for metrics and `pod show`), `upgrade` (the layout marker and
//! replacing pinned programs in place), `sk_lookup` (the per-pod inbound
//! program), `reserved_ports` (the bind guard's sysctl), `attached` (what else runs at the
//! cgroup's hooks, read only, for `doctor`). Edges point one way: everything uses
//! `pod_maps`, which uses only `pins`; `upgrade` (the entry point of loading) uses `pins`.

pub mod attached;
mod inspect;
mod journal;
mod keys;
mod pins;
mod pod_ids;
mod pod_maps;
mod registry;
pub mod reserved_ports;
pub mod sk_lookup;
pub mod stats;
pub mod sys;
mod upgrade;

use interceptor_common::maps::names;

pub use pins::{bpffs_mounted, detect_cgroup2_root, netns_helper, Globals, Pins};
pub use pod_maps::{PodHandle, PodMaps};
pub use upgrade::{Layout, Loaded, Swap, LAYOUT_VERSION};

/// The object built by build.rs from interceptor-ebpf.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/interceptor"));

/// Programs attached with a pinnable bpf_link.
pub const LINKED_PROGRAMS: &[&str] = &[
    "ic_connect4",
    "ic_connect6",
    "ic_sendmsg4",
    "ic_sendmsg6",
    "ic_recvmsg4",
    "ic_recvmsg6",
    "ic_bind4",
    "ic_bind6",
    "ic_sockops",
    "ic_getpeername4",
    "ic_getpeername6",
    "ic_sock_create",
];
/// Linked programs added after the release before layout markers (0fd318a): an installation of
/// that release lacks them and is still complete (an upgrade attaches them).
pub const LINKED_SINCE_MARKERS: &[&str] = &["ic_sock_create"];
/// Programs of earlier versions: their link pins are removed with the others.
const LEGACY_PROGRAMS: &[&str] = &["ic_sock_release"];
/// The inbound program, pinned at load and put into `INBOUND_PROG[0]`: each pod netns gets a
/// program of its own at registration that tail-calls it (`sk_lookup.rs`).
pub const SK_LOOKUP_PROGRAM: &str = "ic_sk_lookup";
/// The program attached with BPF_PROG_ATTACH (see the module docs).
pub const GETSOCKOPT_PROGRAM: &str = "ic_getsockopt";
/// Attached to the `ACCEL` SockHash with BPF_PROG_ATTACH.
pub const SK_MSG_PROGRAM: &str = "ic_sk_msg";
/// Every map the programs use.
pub const MAPS: &[&str] = &[
    names::POD_POLICY,
    names::PORTS,
    names::ADDRS,
    names::GROUPS,
    names::CIDR4_EXCL,
    names::CIDR4_INCL,
    names::CIDR6_EXCL,
    names::CIDR6_INCL,
    names::ORIG_BY_TUPLE,
    names::TUPLE_COUNT,
    names::SK_ORIG,
    names::SK_PROXY,
    names::SK_ACCEL,
    names::INBOUND_NETNS,
    names::INBOUND_PROG,
    names::POD_NETNS,
    names::POD_SRC,
    names::LISTENERS,
    names::STATS,
    names::ACCEL,
    names::ACCEL_ON,
];

/// Maps of earlier versions, unpinned on load and cleanup (`POD_BY_ADDR`: inbound by address,
/// replaced by the per-pod sk_lookup program).
const LEGACY_MAPS: &[&str] = &["POD_BY_ADDR"];
