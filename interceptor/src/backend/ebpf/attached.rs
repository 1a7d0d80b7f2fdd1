//! What runs at a cgroup's socket hooks besides us, for `doctor`: per hook, the programs that run
//! for sockets of that cgroup in the order they run (`BPF_PROG_QUERY`, effective: the cgroup's
//! own programs in attach order, then its ancestors'), their names, and which are ours (reached
//! from our pins). Read only: nothing here attaches, detaches or changes anything.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::os::fd::AsFd;
use std::path::Path;

use anyhow::{Context, Result};
use aya::programs::links::{FdLink, PinnedLink};

use super::{sys, Pins, GETSOCKOPT_PROGRAM, LINKED_PROGRAMS, SK_LOOKUP_PROGRAM, SK_MSG_PROGRAM};

/// The cgroup hooks a socket goes through, as `bpftool cgroup` names them: the ones we attach
/// to and the others a load balancer, policy or observability agent uses.
pub const CGROUP_HOOKS: &[(&str, u32)] = &[
    ("cgroup/connect4", 10),
    ("cgroup/connect6", 11),
    ("cgroup/sendmsg4", 14),
    ("cgroup/sendmsg6", 15),
    ("cgroup/recvmsg4", 19),
    ("cgroup/recvmsg6", 20),
    ("cgroup/getpeername4", 29),
    ("cgroup/getpeername6", 30),
    ("cgroup/getsockname4", 31),
    ("cgroup/getsockname6", 32),
    ("cgroup/bind4", 8),
    ("cgroup/bind6", 9),
    ("cgroup/post_bind4", 12),
    ("cgroup/post_bind6", 13),
    ("cgroup/sock_create", 2),
    ("cgroup/sock_release", 34),
    ("sock_ops", 3),
    ("cgroup/getsockopt", 21),
    ("cgroup/setsockopt", 22),
    ("cgroup_skb/ingress", 0),
    ("cgroup_skb/egress", 1),
];

/// One program that runs at one hook of the cgroup.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AttachedProgram {
    /// The hook, as in [`CGROUP_HOOKS`].
    pub hook: &'static str,
    /// Its place in the order the kernel runs the hook's programs (0 runs first).
    pub position: usize,
    /// The kernel's program id (`bpftool prog show id N`).
    pub id: u32,
    /// The kernel's name of it: at most 15 bytes, longer names cut (`cil_sock4_conne`).
    pub name: String,
    /// Loaded and attached by the installation pinned under `--bpffs`.
    pub ours: bool,
}

/// Every program that runs at the socket hooks of `cgroup` (per hook in run order), ours
/// marked from the pins under `pins`. Hooks the kernel does not know are skipped.
pub fn attached_programs(cgroup: &Path, pins: &Pins) -> Result<Vec<AttachedProgram>> {
    let cg = File::open(cgroup).with_context(|| format!("opening {}", cgroup.display()))?;
    let mut found: Vec<(&'static str, usize, u32)> = Vec::new();
    for &(hook, attach_type) in CGROUP_HOOKS {
        let ids = match sys::prog_query(cg.as_fd(), attach_type, sys::BPF_F_QUERY_EFFECTIVE) {
            Ok(ids) => ids,
            // A hook this kernel does not have.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => continue,
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("BPF_PROG_QUERY {hook} on {}", cgroup.display()))
            }
        };
        found.extend(ids.into_iter().enumerate().map(|(i, id)| (hook, i, id)));
    }
    let wanted: HashSet<u32> = found.iter().map(|(_, _, id)| *id).collect();
    let names = program_names(&wanted);
    let ours = our_program_ids(pins);
    Ok(found
        .into_iter()
        .map(|(hook, position, id)| AttachedProgram {
            hook,
            position,
            id,
            name: names.get(&id).cloned().unwrap_or_default(),
            ours: ours.contains(&id),
        })
        .collect())
}

/// The names of the programs `ids` (one pass over the loaded programs; one that went away
/// meanwhile has none).
fn program_names(ids: &HashSet<u32>) -> HashMap<u32, String> {
    aya::programs::loaded_programs()
        .flatten()
        .filter(|p| ids.contains(&p.id()))
        .map(|p| (p.id(), String::from_utf8_lossy(p.name()).into_owned()))
        .collect()
}

/// The kernel ids of our cgroup programs: those behind our link pins, and the getsockopt
/// program pinned as a program (`progs/`, see the module docs of `ebpf`).
fn our_program_ids(pins: &Pins) -> HashSet<u32> {
    let mut ids: HashSet<u32> = LINKED_PROGRAMS
        .iter()
        .filter_map(|p| PinnedLink::from_pin(pins.link(p)).ok())
        .filter_map(|l| FdLink::from(l).info().ok())
        .map(|info| info.program_id())
        .collect();
    let getsockopt = pins.dir.join("progs").join(GETSOCKOPT_PROGRAM);
    if let Ok(info) = aya::programs::ProgramInfo::from_pin(getsockopt) {
        ids.insert(info.id());
    }
    ids
}

/// Kernel ids of every program loaded under `pins`: the cgroup programs (`our_program_ids`),
/// the ones pinned as programs (sk_lookup, sk_msg), and each pod's sk_lookup program behind
/// its link. For accounting (`bpftool prog show id N`, the bench's per-program cost).
pub fn all_program_ids(pins: &Pins) -> HashSet<u32> {
    let mut ids = our_program_ids(pins);
    for prog in [SK_LOOKUP_PROGRAM, SK_MSG_PROGRAM] {
        if let Ok(info) = aya::programs::ProgramInfo::from_pin(pins.dir.join("progs").join(prog)) {
            ids.insert(info.id());
        }
    }
    let pods = std::fs::read_dir(pins.dir.join("links"))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("sk_lookup-"));
    ids.extend(
        pods.filter_map(|e| PinnedLink::from_pin(e.path()).ok())
            .filter_map(|l| FdLink::from(l).info().ok())
            .map(|info| info.program_id()),
    );
    ids
}
