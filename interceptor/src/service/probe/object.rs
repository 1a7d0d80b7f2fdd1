//! Our own object through the verifier (every program, the per-pod sk_lookup program), cgroup
//! links, the netns-cookie helper and the map types, probed the way libbpf does.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, BorrowedFd};

use aya::maps::MapType;
use aya::programs::{Program, ProgramError, ProgramType};
use aya::sys::{is_helper_supported, is_map_supported, is_program_supported, BpfHelper};
use aya::EbpfLoader;

use super::{missing, present, rows, unknown, Check};
use crate::backend::ebpf::{sk_lookup, sys, Globals, MAPS, OBJECT, SK_LOOKUP_PROGRAM};

/// What loading our object taught us.
pub(super) struct ObjectProbe {
    /// Per program of the object: loaded, or the kernel's reason.
    pub(super) programs: BTreeMap<String, Result<(), String>>,
    pub(super) cgroup_link: Option<Check>,
    /// The per-pod sk_lookup program, loaded against the object's maps.
    pub(super) sk_lookup_pod: Result<(), String>,
}

/// Loads the embedded object as the loader does, minus pins and attachment, with the maps
/// shrunk to one entry (the verifier does not look at sizes, and it keeps the probe cheap); if
/// a shrunk map is refused (a ring buffer, say), loads it at full size instead.
pub(super) fn load_object() -> Result<ObjectProbe, String> {
    // As the loader would (no logging, counting on), with this kernel's NETNS_HELPER.
    let globals = Globals::new(false, true);
    let load = |shrink: bool| {
        let mut loader = EbpfLoader::new();
        // This kernel's globals, as the loader sets them: NETNS_HELPER at 0 prunes the helper
        // calls a kernel before 5.15 refuses in sock_ops and getsockopt.
        globals.set(&mut loader);
        if shrink {
            for m in MAPS {
                loader.map_max_entries(m, 1);
            }
        }
        loader
            .load(OBJECT)
            .map_err(|e| format!("{:#}", anyhow::Error::from(e)))
    };
    let mut ebpf = load(true).or_else(|_| load(false))?;
    // The verifier is the cost (tens of ms for the big programs): one thread per program lets
    // the kernel verify them on every CPU at once.
    let programs: BTreeMap<String, Result<(), String>> = std::thread::scope(|scope| {
        let handles: Vec<_> = ebpf
            .programs_mut()
            .map(|(name, prog)| (name.to_string(), scope.spawn(move || load_program(prog))))
            .collect();
        handles
            .into_iter()
            .map(|(name, h)| {
                let result = h
                    .join()
                    .unwrap_or_else(|_| Err("the probe thread panicked".into()));
                (name, result)
            })
            .collect()
    });
    let cgroup_link = match ebpf.program("ic_connect4").map(Program::fd) {
        Some(Ok(fd)) => Some(cgroup_link_row(fd.as_fd())),
        _ => None,
    };
    let sk_lookup_pod = sk_lookup::probe(&mut ebpf, SK_LOOKUP_PROGRAM);
    Ok(ObjectProbe {
        programs,
        cgroup_link,
        sk_lookup_pod,
    })
}

fn load_program(prog: &mut Program) -> Result<(), String> {
    let result = match prog {
        Program::CgroupSockAddr(p) => p.load(),
        Program::SockOps(p) => p.load(),
        Program::CgroupSockopt(p) => p.load(),
        Program::SkLookup(p) => p.load(),
        Program::SkMsg(p) => p.load(),
        Program::SkSkb(p) => p.load(),
        Program::CgroupSock(p) => p.load(),
        Program::CgroupSkb(p) => p.load(),
        Program::SchedClassifier(p) => p.load(),
        other => {
            return Err(format!(
                "program type {} is not probed by doctor",
                prog_type_words(other.prog_type())
            ))
        }
    };
    result.map_err(|e| describe_load_error(&e))
}

/// The errno and the verifier's last meaningful line, on one line.
fn describe_load_error(e: &ProgramError) -> String {
    match e {
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } => {
            let log = verifier_log.to_string();
            let last = log.lines().map(str::trim).rfind(|l| {
                !l.is_empty()
                    && !l.starts_with("processed ")
                    && !l.starts_with("verification time")
                    && !l.starts_with("stack depth")
            });
            match last {
                Some(line) => format!("rejected by the kernel ({io_error}): {line}"),
                None => format!("rejected by the kernel ({io_error})"),
            }
        }
        e => e.to_string(),
    }
}

/// BPF_LINK_CREATE (5.7) for our connect4 program with an invalid cgroup fd: EBADF means the
/// kernel got as far as looking the cgroup up (cgroup links exist), EINVAL that the command or
/// the cgroup link type is unknown. Nothing is attached either way.
fn cgroup_link_row(prog: BorrowedFd<'_>) -> Check {
    let name = rows::CGROUP_LINK;
    let Err(err) = sys::link_create_without_target(prog, sys::BPF_CGROUP_INET4_CONNECT) else {
        // Cannot happen with fd -1 (and the link fd is closed at once if it does).
        return present(name, true, "BPF_LINK_CREATE succeeded".into());
    };
    match err.raw_os_error() {
        Some(libc::EBADF) => present(
            name,
            true,
            "BPF_LINK_CREATE for a cgroup/connect4 program reaches the cgroup lookup (EBADF for a bad fd)".into(),
        ),
        Some(libc::EINVAL) => missing(name, true, "BPF_LINK_CREATE rejects cgroup links (EINVAL; needs ≥ 5.7)".into()),
        _ => unknown(name, true, format!("BPF_LINK_CREATE: {err}")),
    }
}

pub(super) fn program_type_row(name: &str, ty: ProgramType, needed: bool) -> Check {
    match is_program_supported(ty) {
        Ok(true) => present(
            name,
            needed,
            format!("a trivial {} program loads", prog_type_words(ty)),
        ),
        Ok(false) => missing(
            name,
            needed,
            format!(
                "BPF_PROG_LOAD rejects the {} program type",
                prog_type_words(ty)
            ),
        ),
        Err(e) => unknown(name, needed, e.to_string()),
    }
}

/// Whether `ty` programs may call bpf_get_netns_cookie. `needed`: eBPF cannot work without it;
/// otherwise `without` says what differs when it is missing.
pub(super) fn helper_row(name: &str, ty: ProgramType, needed: bool, without: &str) -> Check {
    match is_helper_supported(ty, BpfHelper::BPF_FUNC_get_netns_cookie) {
        Ok(true) => present(
            name,
            needed,
            format!(
                "the verifier allows bpf_get_netns_cookie in {} programs",
                prog_type_words(ty)
            ),
        ),
        Ok(false) => missing(
            name,
            needed,
            format!(
                "the verifier refuses bpf_get_netns_cookie in {} programs{without}",
                prog_type_words(ty)
            ),
        ),
        Err(e) => unknown(name, needed, e.to_string()),
    }
}

/// What the eBPF path does where sock_ops and getsockopt cannot read the netns cookie (< 5.15).
pub(super) const WITHOUT_OPS_COOKIE: &str = " (needs ≥ 5.15): not needed, the proxy's sockets \
     carry their pod from bind; only --accelerate is refused";

pub(super) fn map_row(name: &str, ty: MapType) -> Check {
    match is_map_supported(ty) {
        Ok(true) => present(
            name,
            true,
            format!("BPF_MAP_CREATE of a {} map works", map_type_words(ty)),
        ),
        Ok(false) => missing(
            name,
            true,
            format!("BPF_MAP_CREATE rejects the {} map type", map_type_words(ty)),
        ),
        Err(e) => unknown(name, true, format!("{e}")),
    }
}

/// A program type as the kernel names it (`BPF_PROG_TYPE_…`, lower case, without the prefix).
pub(super) fn prog_type_words(ty: ProgramType) -> &'static str {
    match ty {
        ProgramType::CgroupSockAddr => "cgroup_sock_addr",
        ProgramType::CgroupSock => "cgroup_sock",
        ProgramType::CgroupSockopt => "cgroup_sockopt",
        ProgramType::CgroupSkb => "cgroup_skb",
        ProgramType::SockOps => "sock_ops",
        ProgramType::SkMsg => "sk_msg",
        ProgramType::SkSkb => "sk_skb",
        ProgramType::SkLookup => "sk_lookup",
        ProgramType::SocketFilter => "socket_filter",
        ProgramType::SchedClassifier => "sched_cls",
        _ => "other",
    }
}

/// A map type as the kernel names it (`BPF_MAP_TYPE_…`, lower case, without the prefix).
pub(super) fn map_type_words(ty: MapType) -> &'static str {
    match ty {
        MapType::LpmTrie => "lpm_trie",
        MapType::LruHash => "lru_hash",
        MapType::RingBuf => "ringbuf",
        MapType::Hash => "hash",
        MapType::Array => "array",
        MapType::SockHash => "sockhash",
        _ => "other",
    }
}
