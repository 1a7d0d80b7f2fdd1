//! What the kernel offers the eBPF backend, as data: `doctor` prints it, `apply --backend auto`
//! and the daemon consult [`ebpf_missing`].
//!
//! Every row is a real probe, never assumed from the kernel version: the bpf() syscall is tried
//! with trivial programs, the embedded eBPF object is loaded (maps shrunk, nothing attached,
//! nothing pinned; everything is released when the probe returns) and each of its programs is
//! handed to the verifier, helpers and map types are probed the way libbpf does, and
//! SO_NETNS_COOKIE is read from a real socket. Only when loading cannot be attempted at all does
//! a row fall back to `unknown`, with what the kernel version suggests.
//!
//! Verifying the object's programs is most of the cost (~0.3 s of kernel CPU for the 14
//! programs of today's object, the connect/sendmsg ones ~50-100 ms each; they are verified in
//! parallel threads), so once our programs are loaded and attached under the bpffs folder
//! (every apply after the first on a node) [`ebpf_missing`] trusts that installation instead
//! ([`Depth::ReuseInstalled`]: ~1-3 ms).
//!
//! By concern: `privileges` (capabilities, seccomp, user namespace: why bpf() is denied),
//! `host` (kernel, bpffs, cgroup v2, SO_NETNS_COOKIE), `object` (our object through the
//! verifier, cgroup links, helpers and map types).

mod host;
mod object;
mod privileges;

use std::fmt;
use std::path::Path;
use std::time::{Duration, Instant};

use aya::maps::MapType;
use aya::programs::ProgramType;
use aya::util::KernelVersion;

use crate::backend::ebpf::{
    Pins, GETSOCKOPT_PROGRAM, LINKED_PROGRAMS, SK_LOOKUP_PROGRAM, SK_MSG_PROGRAM,
};
use host::{bpffs_row, cgroup_row, kernel_row, so_netns_cookie_row};
use object::{helper_row, load_object, map_row, program_type_row};
use privileges::{bpf_row, capabilities_row, ProcEnv};

/// Row names, stable: tests and scripts match on them.
pub mod rows {
    pub const KERNEL: &str = "kernel";
    pub const BPF_SYSCALL: &str = "bpf() syscall";
    pub const CAPABILITIES: &str = "capabilities";
    pub const BPFFS: &str = "bpffs";
    pub const CGROUP2: &str = "cgroup v2";
    pub const INSTALLATION: &str = "installation";
    pub const CONNECT4: &str = "cgroup/connect4";
    pub const CONNECT6: &str = "cgroup/connect6";
    pub const SOCK_OPS: &str = "sock_ops";
    pub const GETSOCKOPT: &str = "cgroup/getsockopt";
    pub const GETPEERNAME4: &str = "cgroup/getpeername4";
    pub const GETPEERNAME6: &str = "cgroup/getpeername6";
    pub const SK_LOOKUP: &str = "sk_lookup";
    /// The program each pod netns gets at registration (tail-calls `ic_sk_lookup`).
    pub const SK_LOOKUP_POD: &str = "sk_lookup per-pod program";
    pub const SK_MSG: &str = "sk_msg";
    pub const CGROUP_LINK: &str = "bpf_link for cgroups";
    pub const NETNS_COOKIE_SOCK_ADDR: &str = "netns cookie in sock_addr";
    pub const NETNS_COOKIE_SOCK_OPS: &str = "netns cookie in sock_ops";
    pub const NETNS_COOKIE_SOCKOPT: &str = "netns cookie in sockopt";
    pub const SO_NETNS_COOKIE: &str = "SO_NETNS_COOKIE";
    pub const LPM_TRIE: &str = "LPM trie map";
    pub const LRU_HASH: &str = "LRU hash map";
    pub const RING_BUF: &str = "ring buffer map";
}

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

/// Rows about the environment rather than one kernel feature: when one of them is what
/// blocks eBPF it is the root cause, and the rows it prevented from being probed are not
/// repeated in the reason.
const ENVIRONMENT: &[&str] = &[
    rows::BPF_SYSCALL,
    rows::CAPABILITIES,
    rows::BPFFS,
    rows::CGROUP2,
];

/// What a probe found; in JSON as the same words.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Present,
    Missing,
    /// Could not be probed (the reason says why); never counts as usable.
    Unknown,
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            Status::Present => "present",
            Status::Missing => "missing",
            Status::Unknown => "unknown",
        })
    }
}

/// One row of the report.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Check {
    pub name: String,
    pub status: Status,
    pub why: String,
    /// Whether the eBPF backend needs it today (`auto` falls back without it).
    pub needed: bool,
}

/// Every check, in display order, and what probing cost.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    pub checks: Vec<Check>,
    #[serde(skip)]
    pub elapsed: Duration,
}

impl Report {
    pub fn get(&self, name: &str) -> Option<&Check> {
        self.checks.iter().find(|c| c.name == name)
    }

    /// Why the eBPF backend cannot run here (one line), or None when every needed row is
    /// present.
    pub fn ebpf_missing(&self) -> Option<String> {
        let bad: Vec<&Check> = self
            .checks
            .iter()
            .filter(|c| c.needed && c.status != Status::Present)
            .collect();
        if bad.is_empty() {
            return None;
        }
        let bpf_denied = bad.iter().any(|c| c.name == rows::BPF_SYSCALL);
        let env: Vec<&&Check> = bad
            .iter()
            .filter(|c| ENVIRONMENT.contains(&c.name.as_str()))
            // The bpf() row already names the capabilities when they are the cause.
            .filter(|c| !(bpf_denied && c.name == rows::CAPABILITIES))
            .collect();
        let mut parts: Vec<String> = Vec::new();
        let describe = |c: &Check| format!("{} {}: {}", c.name, c.status, c.why);
        if bpf_denied {
            // Every kernel row depends on bpf(): it alone is the reason, with the non-bpf rows.
            parts.extend(env.iter().map(|c| describe(c)));
            if let Some(c) = bad.iter().find(|c| c.name == rows::SO_NETNS_COOKIE) {
                parts.push(describe(c));
            }
        } else {
            parts.extend(bad.iter().map(|c| describe(c)));
        }
        Some(parts.join("; "))
    }
}

/// How much work the probe may save.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Depth {
    /// Hand every program of the object to the verifier (what `doctor` does).
    Full,
    /// As `Full`, unless our programs are already loaded and attached under `--bpffs`: then
    /// `apply` reuses them, the kernel accepted them when they were installed, and re-verifying
    /// them (most of the probe's cost) is skipped. What `apply --backend auto` uses.
    ReuseInstalled,
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
    let installed = Pins::new(bpffs).loaded();
    checks.push(if installed {
        present(
            rows::INSTALLATION,
            false,
            format!(
                "our programs are loaded and attached (pinned under {})",
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
        checks.push(helper_row(
            rows::NETNS_COOKIE_SOCK_ADDR,
            ProgramType::CgroupSockAddr,
        ));
        checks.push(helper_row(
            rows::NETNS_COOKIE_SOCK_OPS,
            ProgramType::SockOps,
        ));
        checks.push(helper_row(
            rows::NETNS_COOKIE_SOCKOPT,
            ProgramType::CgroupSockopt,
        ));
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
        checks.push(helper_row(
            rows::NETNS_COOKIE_SOCK_ADDR,
            ProgramType::CgroupSockAddr,
        ));
        checks.push(helper_row(
            rows::NETNS_COOKIE_SOCK_OPS,
            ProgramType::SockOps,
        ));
        checks.push(helper_row(
            rows::NETNS_COOKIE_SOCKOPT,
            ProgramType::CgroupSockopt,
        ));
    } else {
        let why = "bpf() is not usable";
        for (prog, row, since) in HOOKS {
            checks.push(not_probed(row, loader_needs(prog), *since, why));
        }
        checks.push(not_probed(rows::CGROUP_LINK, true, (5, 7), why));
        checks.push(not_probed(rows::SK_LOOKUP_POD, true, (5, 9), why));
        checks.push(not_probed(rows::NETNS_COOKIE_SOCK_ADDR, true, (5, 7), why));
        checks.push(not_probed(rows::NETNS_COOKIE_SOCK_OPS, true, (5, 15), why));
        checks.push(not_probed(rows::NETNS_COOKIE_SOCKOPT, true, (5, 15), why));
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

pub(crate) fn present(name: &str, needed: bool, why: String) -> Check {
    Check {
        name: name.into(),
        status: Status::Present,
        why,
        needed,
    }
}

pub(crate) fn missing(name: &str, needed: bool, why: String) -> Check {
    Check {
        name: name.into(),
        status: Status::Missing,
        why,
        needed,
    }
}

pub(crate) fn unknown(name: &str, needed: bool, why: String) -> Check {
    Check {
        name: name.into(),
        status: Status::Unknown,
        why,
        needed,
    }
}
