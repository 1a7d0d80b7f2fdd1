//! The probe in its order: environment rows first, then every hook of our object through the
//! verifier (or the installation standing in for it), then helpers and map types.

use std::path::Path;
use std::time::Instant;

use aya::maps::MapType;
use aya::programs::ProgramType;
use aya::util::KernelVersion;

use super::host::{bpffs_row, cgroup_row, kernel_row, so_netns_cookie_row};
use super::object::{helper_row, load_object, map_row, program_type_row, WITHOUT_OPS_COOKIE};
use super::privileges::{bpf_row, capabilities_row, ProcEnv};
use super::{missing, present, rows, Check, Depth, Report, Status};
use crate::backend::ebpf::{
    Pins, GETSOCKOPT_PROGRAM, LINKED_PROGRAMS, SK_LOOKUP_PROGRAM, SK_MSG_PROGRAM,
};

/// The hooks our object's programs attach to: program name, row, first kernel with the hook.
/// Whether a row is needed comes from the loader's own lists (`LINKED_PROGRAMS`,
/// `GETSOCKOPT_PROGRAM`, `SK_LOOKUP_PROGRAM`), so the doctor follows the loader; a program of
/// the object missing from this table still gets a row (`program NAME`).
const HOOKS: &[(&str, &str, (u8, u8))] = &[
    ("ic_connect4", rows::CONNECT4, (4, 17)),
    ("ic_connect6", rows::CONNECT6, (4, 17)),
    ("ic_sendmsg4", "cgroup/sendmsg4", (4, 18)),
    ("ic_sendmsg6", "cgroup/sendmsg6", (4, 18)),
    ("ic_recvmsg4", "cgroup/recvmsg4", (5, 2)),
    ("ic_recvmsg6", "cgroup/recvmsg6", (5, 2)),
    ("ic_bind4", "cgroup/bind4", (4, 17)),
    ("ic_bind6", "cgroup/bind6", (4, 17)),
    ("ic_sockops", rows::SOCK_OPS, (4, 13)),
    ("ic_getsockopt", rows::GETSOCKOPT, (5, 3)),
    ("ic_getpeername4", rows::GETPEERNAME4, (5, 8)),
    ("ic_getpeername6", rows::GETPEERNAME6, (5, 8)),
    ("ic_sk_lookup", rows::SK_LOOKUP, (5, 9)),
    // sock_create itself is 4.10; the netns cookie in it 5.7.
    ("ic_sock_create", "cgroup/sock_create", (5, 7)),
    // sk_msg itself is 4.17; its netns cookie (which keys the acceleration map) 5.15.
    ("ic_sk_msg", rows::SK_MSG, (5, 15)),
];

/// Whether the loader loads `prog` (a failure to load it fails `apply --backend ebpf`).
fn loader_needs(prog: &str) -> bool {
    LINKED_PROGRAMS.contains(&prog)
        || prog == GETSOCKOPT_PROGRAM
        || prog == SK_LOOKUP_PROGRAM
        || prog == SK_MSG_PROGRAM
}

/// The netns-cookie helper per program type: needed in sock_addr programs (they key pods by
/// it); sock_ops and getsockopt do without (see `WITHOUT_OPS_COOKIE`).
fn helper_rows() -> [Check; 3] {
    [
        helper_row(
            rows::NETNS_COOKIE_SOCK_ADDR,
            ProgramType::CgroupSockAddr,
            true,
            "",
        ),
        helper_row(
            rows::NETNS_COOKIE_SOCK_OPS,
            ProgramType::SockOps,
            false,
            WITHOUT_OPS_COOKIE,
        ),
        helper_row(
            rows::NETNS_COOKIE_SOCKOPT,
            ProgramType::CgroupSockopt,
            false,
            WITHOUT_OPS_COOKIE,
        ),
    ]
}

/// Probes what the kernel offers for an installation pinned under `bpffs` and attached at
/// `cgroup` (the cgroup v2 root when `None`), loading every program unless `depth` lets an
/// existing installation stand in; never fails (a probe that errors is a row that says so).
pub fn probe(bpffs: &Path, cgroup: Option<&Path>, depth: Depth) -> Report {
    let start = Instant::now();
    let env = ProcEnv::read();
    let version = KernelVersion::current().ok();
    let mut checks = vec![kernel_row(version)];
    let bpf = bpf_row(&env);
    let bpf_usable = bpf.status == Status::Present;
    checks.push(bpf);
    checks.push(capabilities_row(&env));
    checks.push(bpffs_row(bpffs));
    checks.push(cgroup_row(cgroup));
    let pins = Pins::new(bpffs);
    let installed = pins.loaded();
    checks.push(if installed {
        // The layout and program identity an upgrade compares (`interceptor` says on load).
        let layout = match pins.layout() {
            Ok(Some(l)) => l.to_string(),
            Ok(None) => "layout unknown".into(),
            Err(e) => format!("{e:#}"),
        };
        present(
            rows::INSTALLATION,
            false,
            format!(
                "our programs are loaded and attached (pinned under {}; {layout})",
                bpffs.display()
            ),
        )
    } else {
        missing(
            rows::INSTALLATION,
            false,
            format!(
                "nothing loaded under {} yet; the first eBPF apply loads it",
                bpffs.display()
            ),
        )
    });

    let not_probed = |name: &str, needed: bool, since: (u8, u8), why: &str| {
        let hint = match version {
            Some(v) if v >= KernelVersion::new(since.0, since.1, 0) => {
                format!("kernel {v} ≥ {}.{} suggests present", since.0, since.1)
            }
            Some(v) => format!("kernel {v} < {}.{} suggests missing", since.0, since.1),
            None => format!("needs kernel ≥ {}.{}", since.0, since.1),
        };
        Check {
            name: name.into(),
            status: Status::Unknown,
            why: format!("not probed ({why}); {hint}"),
            needed,
        }
    };

    if bpf_usable && installed && depth == Depth::ReuseInstalled {
        for (prog, row, _) in HOOKS.iter().filter(|(p, _, _)| loader_needs(p)) {
            let why = format!(
                "{prog} already loaded and attached under {}",
                bpffs.display()
            );
            checks.push(present(row, true, why));
        }
        let why = format!("our cgroup links are pinned under {}", bpffs.display());
        checks.push(present(rows::CGROUP_LINK, true, why));
        let why = format!("pods' programs tail-call the {SK_LOOKUP_PROGRAM} pinned there");
        checks.push(present(rows::SK_LOOKUP_POD, true, why));
        checks.extend(helper_rows());
    } else if bpf_usable {
        match load_object() {
            Ok(obj) => {
                for (prog, row, _) in HOOKS {
                    let needed = loader_needs(prog);
                    checks.push(match obj.programs.get(*prog) {
                        Some(Ok(())) => present(
                            row,
                            needed,
                            format!("{prog} from our object accepted by the verifier"),
                        ),
                        Some(Err(why)) => missing(row, needed, format!("{prog}: {why}")),
                        None if needed => missing(
                            row,
                            true,
                            format!(
                                "{prog} is not in the embedded object, yet the loader expects it"
                            ),
                        ),
                        // A hook we have no program for (yet): is the program type there at all?
                        None if *row == rows::SK_LOOKUP => {
                            program_type_row(row, ProgramType::SkLookup, false)
                        }
                        None => continue,
                    });
                }
                // Programs of the object no row above covers: load-tested all the same.
                for (prog, result) in &obj.programs {
                    if HOOKS.iter().any(|(p, _, _)| p == prog) {
                        continue;
                    }
                    let name = format!("program {prog}");
                    checks.push(match result {
                        Ok(()) => {
                            present(&name, loader_needs(prog), "accepted by the verifier".into())
                        }
                        Err(why) => missing(&name, loader_needs(prog), why.clone()),
                    });
                }
                checks.push(match obj.sk_lookup_pod {
                    Ok(()) => present(
                        rows::SK_LOOKUP_POD,
                        true,
                        format!(
                            "{} (netns cookie, then a tail call into {SK_LOOKUP_PROGRAM}) accepted by the verifier",
                            crate::backend::ebpf::sk_lookup::PROGRAM_NAME
                        ),
                    ),
                    Err(why) => missing(rows::SK_LOOKUP_POD, true, why),
                });
                checks.push(match obj.cgroup_link {
                    Some(c) => c,
                    None => not_probed(rows::CGROUP_LINK, true, (5, 7), "ic_connect4 did not load"),
                });
            }
            Err(why) => {
                let why = format!("the eBPF object does not load: {why}");
                for (prog, row, since) in HOOKS {
                    checks.push(not_probed(row, loader_needs(prog), *since, &why));
                }
                checks.push(not_probed(rows::CGROUP_LINK, true, (5, 7), &why));
                checks.push(not_probed(rows::SK_LOOKUP_POD, true, (5, 9), &why));
            }
        }
        checks.extend(helper_rows());
    } else {
        let why = "bpf() is not usable";
        for (prog, row, since) in HOOKS {
            checks.push(not_probed(row, loader_needs(prog), *since, why));
        }
        checks.push(not_probed(rows::CGROUP_LINK, true, (5, 7), why));
        checks.push(not_probed(rows::SK_LOOKUP_POD, true, (5, 9), why));
        checks.push(not_probed(rows::NETNS_COOKIE_SOCK_ADDR, true, (5, 7), why));
        checks.push(not_probed(rows::NETNS_COOKIE_SOCK_OPS, false, (5, 15), why));
        checks.push(not_probed(rows::NETNS_COOKIE_SOCKOPT, false, (5, 15), why));
    }
    checks.push(so_netns_cookie_row());
    if bpf_usable {
        checks.push(map_row(rows::LPM_TRIE, MapType::LpmTrie));
        checks.push(map_row(rows::LRU_HASH, MapType::LruHash));
        checks.push(map_row(rows::RING_BUF, MapType::RingBuf));
    } else {
        let why = "bpf() is not usable";
        checks.push(not_probed(rows::LPM_TRIE, true, (4, 11), why));
        checks.push(not_probed(rows::LRU_HASH, true, (4, 10), why));
        checks.push(not_probed(rows::RING_BUF, true, (5, 8), why));
    }
    Report {
        checks,
        elapsed: start.elapsed(),
    }
}

/// Why the eBPF backend cannot run here, if it cannot: `apply --backend auto` falls back to
/// iptables/nftables with this reason.
pub fn ebpf_missing(bpffs: &Path, cgroup: Option<&Path>) -> Option<String> {
    let report = probe(bpffs, cgroup, Depth::ReuseInstalled);
    tracing::debug!(
        elapsed_ms = report.elapsed.as_secs_f64() * 1e3,
        "eBPF feature probe"
    );
    report.ebpf_missing()
}
