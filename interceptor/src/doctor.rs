//! `interceptor doctor`: which backend `apply --backend auto` would pick here, and why.
//!
//! Every row is a real probe, never assumed from the kernel version: the bpf() syscall is tried
//! with trivial programs, the embedded eBPF object is loaded (maps shrunk, nothing attached,
//! nothing pinned; everything is released when the probe returns) and each of its programs is
//! handed to the verifier, helpers and map types are probed the way libbpf does, and
//! SO_NETNS_COOKIE is read from a real socket. Only when loading cannot be attempted at all does
//! a row fall back to `unknown`, with what the kernel version suggests.
//!
//! [`ebpf_missing`] is what `apply --backend auto` consults. Verifying the object's programs
//! is most of the cost (~0.3 s of kernel CPU for the 14 programs of today's object, the
//! connect/sendmsg ones ~50-100 ms each; they are verified in parallel threads), so once our
//! programs are loaded and attached under `--bpffs` (every apply after the first on a node)
//! it trusts that installation instead ([`Depth::ReuseInstalled`]: ~1-3 ms).

use std::collections::BTreeMap;
use std::ffi::CStr;
use std::fmt;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Result;
use aya::maps::MapType;
use aya::programs::{Program, ProgramError, ProgramType};
use aya::sys::{is_helper_supported, is_map_supported, is_program_supported, BpfHelper};
use aya::util::KernelVersion;
use aya::EbpfLoader;

use crate::backend::ebpf::sys;
use crate::backend::ebpf::{
    bpffs_mounted, detect_cgroup2_root, Pins, GETSOCKOPT_PROGRAM, LINKED_PROGRAMS, MAPS,
    SK_LOOKUP_PROGRAM, SK_MSG_PROGRAM,
};
use crate::backend::exec;
use crate::model::EbpfSettings;

/// The object built by build.rs from interceptor-ebpf: the same bytes the loader embeds.
use crate::backend::ebpf::OBJECT;

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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
#[derive(Debug, Clone)]
pub struct Check {
    pub name: String,
    pub status: Status,
    pub why: String,
    /// Whether the eBPF backend needs it today (`auto` falls back without it).
    pub needed: bool,
}

/// Every check, in display order, and what probing cost.
#[derive(Debug, Clone)]
pub struct Report {
    pub checks: Vec<Check>,
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

    /// The table: check | status | why.
    pub fn table(&self) -> String {
        let w = self
            .checks
            .iter()
            .map(|c| c.name.len())
            .chain([5])
            .max()
            .unwrap_or(5);
        let mut out = format!("{:<w$}  {:<7}  why\n", "check", "status");
        for c in &self.checks {
            let mark = if c.needed || c.status == Status::Present {
                ""
            } else {
                " (not needed)"
            };
            out.push_str(&format!(
                "{:<w$}  {:<7}  {}{mark}\n",
                c.name, c.status, c.why
            ));
        }
        out
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

/// Probes everything, loading every program; never fails (a probe that errors is a row that
/// says so).
pub fn probe(args: &EbpfSettings) -> Report {
    probe_with(args, Depth::Full)
}

/// [`probe`], possibly trusting an existing installation (see [`Depth`]).
pub fn probe_with(args: &EbpfSettings, depth: Depth) -> Report {
    let start = Instant::now();
    let env = ProcEnv::read();
    let version = KernelVersion::current().ok();
    let mut checks = vec![kernel_row(version)];
    let bpf = bpf_row(&env);
    let bpf_usable = bpf.status == Status::Present;
    checks.push(bpf);
    checks.push(capabilities_row(&env));
    checks.push(bpffs_row(&args.bpffs));
    checks.push(cgroup_row(args.cgroup.as_deref()));
    let installed = Pins::new(&args.bpffs).loaded();
    checks.push(if installed {
        present(
            rows::INSTALLATION,
            false,
            format!(
                "our programs are loaded and attached (pinned under {})",
                args.bpffs.display()
            ),
        )
    } else {
        missing(
            rows::INSTALLATION,
            false,
            format!(
                "nothing loaded under {} yet; the first eBPF apply loads it",
                args.bpffs.display()
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
                args.bpffs.display()
            );
            checks.push(present(row, true, why));
        }
        let why = format!("our cgroup links are pinned under {}", args.bpffs.display());
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
pub fn ebpf_missing(args: &EbpfSettings) -> Option<String> {
    let report = probe_with(args, Depth::ReuseInstalled);
    tracing::debug!(
        elapsed_ms = report.elapsed.as_secs_f64() * 1e3,
        "eBPF feature probe"
    );
    report.ebpf_missing()
}

/// What `auto` picks given the probe: the same order as `apply::choose_backend` for a config
/// eBPF can honour.
pub fn auto_backend(report: &Report) -> String {
    match report.ebpf_missing() {
        None => "ebpf (the kernel supports every eBPF hook needed)".into(),
        Some(why) => {
            let why = format!("eBPF unavailable ({why})");
            if exec::available("iptables-restore") {
                format!("iptables ({why}; iptables-restore found)")
            } else if exec::available("nft") {
                format!("nftables ({why}; nft found)")
            } else {
                format!("none ({why}, and neither iptables-restore nor nft is installed)")
            }
        }
    }
}

/// `interceptor doctor`: the table and the backend `auto` would use.
pub fn run(args: &EbpfSettings) -> Result<()> {
    let report = probe(args);
    print!("{}", report.table());
    println!("probe took {:.1} ms", report.elapsed.as_secs_f64() * 1e3);
    println!("auto backend: {}", auto_backend(&report));
    Ok(())
}

fn present(name: &str, needed: bool, why: String) -> Check {
    Check {
        name: name.into(),
        status: Status::Present,
        why,
        needed,
    }
}

fn missing(name: &str, needed: bool, why: String) -> Check {
    Check {
        name: name.into(),
        status: Status::Missing,
        why,
        needed,
    }
}

fn unknown(name: &str, needed: bool, why: String) -> Check {
    Check {
        name: name.into(),
        status: Status::Unknown,
        why,
        needed,
    }
}

// ---------------------------------------------------------------------------------------------
// The process's privileges.

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;

/// What /proc says about this process's privileges.
struct ProcEnv {
    cap_eff: Option<u64>,
    /// `Seccomp:` of /proc/self/status: 0 none, 1 strict, 2 filter.
    seccomp: Option<u32>,
    /// Whether this process runs in a user namespace other than the initial one.
    in_userns: bool,
    /// kernel.unprivileged_bpf_disabled.
    unprivileged_bpf_disabled: Option<u32>,
}

impl ProcEnv {
    fn read() -> Self {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':').map(str::trim))
        };
        let cap_eff = field("CapEff").and_then(|v| u64::from_str_radix(v, 16).ok());
        let seccomp = field("Seccomp").and_then(|v| v.parse().ok());
        // The initial user namespace maps all of 0..2^32-1 onto itself.
        let in_userns = std::fs::read_to_string("/proc/self/uid_map")
            .map(|m| m.split_whitespace().collect::<Vec<_>>() != ["0", "0", "4294967295"])
            .unwrap_or(false);
        let unprivileged_bpf_disabled =
            std::fs::read_to_string("/proc/sys/kernel/unprivileged_bpf_disabled")
                .ok()
                .and_then(|v| v.trim().parse().ok());
        Self {
            cap_eff,
            seccomp,
            in_userns,
            unprivileged_bpf_disabled,
        }
    }

    fn has(&self, cap: u32) -> bool {
        self.cap_eff.is_some_and(|c| c & (1u64 << cap) != 0)
    }

    /// CAP_BPF or CAP_SYS_ADMIN: what BPF_PROG_LOAD of our program types asks for.
    fn can_load(&self) -> bool {
        self.has(CAP_BPF) || self.has(CAP_SYS_ADMIN)
    }

    /// CAP_NET_ADMIN or CAP_SYS_ADMIN: cgroup network program types and attaching them.
    fn can_attach(&self) -> bool {
        self.has(CAP_NET_ADMIN) || self.has(CAP_SYS_ADMIN)
    }

    fn seccomp_filtered(&self) -> bool {
        self.seccomp == Some(2)
    }

    fn cap_names(&self) -> String {
        let Some(eff) = self.cap_eff else {
            return "CapEff unreadable".into();
        };
        let names: Vec<&str> = [
            (CAP_BPF, "CAP_BPF"),
            (CAP_NET_ADMIN, "CAP_NET_ADMIN"),
            (CAP_SYS_ADMIN, "CAP_SYS_ADMIN"),
        ]
        .iter()
        .filter(|(c, _)| self.has(*c))
        .map(|(_, n)| *n)
        .collect();
        if names.is_empty() {
            format!("CapEff {eff:016x} has none of CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN")
        } else {
            format!("CapEff {eff:016x} has {}", names.join(", "))
        }
    }

    /// Why bpf() failed with `errno`, from what this process holds.
    fn explain(&self, errno: Option<i32>, err: &io::Error) -> String {
        let seccomp_note = if self.seccomp_filtered() {
            "; a seccomp filter is also active"
        } else {
            ""
        };
        let sysctl = self
            .unprivileged_bpf_disabled
            .map(|v| format!(", kernel.unprivileged_bpf_disabled={v}"))
            .unwrap_or_default();
        match errno {
            Some(libc::EPERM) if !self.can_load() => format!(
                "denied (EPERM): CapEff has neither CAP_BPF nor CAP_SYS_ADMIN ({}{sysctl}){seccomp_note}; \
                 run as root or grant CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN",
                self.cap_names()
            ),
            Some(libc::EPERM) if self.seccomp_filtered() => format!(
                "denied (EPERM) although {}: this process runs under a seccomp filter (Seccomp: 2) \
                 that denies bpf(); run the container with a profile allowing bpf()",
                self.cap_names()
            ),
            Some(libc::EPERM) if self.in_userns => format!(
                "denied (EPERM): the capabilities ({}) are held only in a user namespace; bpf() needs \
                 them in the initial one",
                self.cap_names()
            ),
            Some(libc::EPERM) => format!(
                "denied (EPERM) although {} and no seccomp filter: an LSM (SELinux, AppArmor) or \
                 kernel lockdown denies bpf()",
                self.cap_names()
            ),
            Some(libc::ENOSYS) if self.seccomp_filtered() => {
                "denied (ENOSYS) by this process's seccomp filter (Seccomp: 2); run the container \
                 with a profile allowing bpf()"
                    .into()
            }
            Some(libc::ENOSYS) => "missing (ENOSYS): this kernel has no bpf() syscall (CONFIG_BPF_SYSCALL=n)".into(),
            _ => format!("BPF_PROG_LOAD failed: {err}{seccomp_note}"),
        }
    }
}

fn syscall_errno(e: &ProgramError) -> Option<&io::Error> {
    match e {
        ProgramError::SyscallError(s) => Some(&s.io_error),
        ProgramError::LoadError { io_error, .. } => Some(io_error),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// Rows.

fn uname_release() -> Option<String> {
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    if unsafe { libc::uname(&mut u) } != 0 {
        return None;
    }
    let release = unsafe { CStr::from_ptr(u.release.as_ptr()) };
    Some(release.to_string_lossy().into_owned())
}

fn kernel_row(version: Option<KernelVersion>) -> Check {
    let release = uname_release().unwrap_or_else(|| "uname failed".into());
    match version {
        Some(v) => present(rows::KERNEL, false, format!("{v} (uname -r: {release})")),
        None => unknown(
            rows::KERNEL,
            false,
            format!("version not parsed (uname -r: {release})"),
        ),
    }
}

/// A trivial socket filter (does bpf() work at all?), then a trivial cgroup sock_addr program
/// (does it work for the privileged program types we load?).
fn bpf_row(env: &ProcEnv) -> Check {
    let name = rows::BPF_SYSCALL;
    match is_program_supported(ProgramType::SocketFilter) {
        Ok(true) => {}
        Ok(false) => {
            return missing(
                name,
                true,
                "BPF_PROG_LOAD rejects even a trivial socket filter (EINVAL)".into(),
            )
        }
        Err(e) => {
            let Some(err) = syscall_errno(&e) else {
                return unknown(name, true, e.to_string());
            };
            return missing(name, true, env.explain(err.raw_os_error(), err));
        }
    }
    match is_program_supported(ProgramType::CgroupSockAddr) {
        Ok(_) => present(
            name,
            true,
            "BPF_PROG_LOAD of trivial socket-filter and cgroup programs works".into(),
        ),
        Err(e) => match syscall_errno(&e) {
            Some(err) if err.raw_os_error() == Some(libc::EPERM) => missing(
                name,
                true,
                format!(
                    "usable only for unprivileged programs; a cgroup program is {}",
                    env.explain(Some(libc::EPERM), err)
                ),
            ),
            _ => unknown(
                name,
                true,
                format!("a socket filter loads, a trivial cgroup program fails: {e}"),
            ),
        },
    }
}

fn capabilities_row(env: &ProcEnv) -> Check {
    let name = rows::CAPABILITIES;
    if env.cap_eff.is_none() {
        return unknown(
            name,
            true,
            "CapEff not readable from /proc/self/status".into(),
        );
    }
    let held = env.cap_names();
    match (env.can_load(), env.can_attach()) {
        (true, true) if env.has(CAP_SYS_ADMIN) => present(name, true, held),
        (true, true) => present(
            name,
            true,
            format!("{held} (without CAP_SYS_ADMIN a pod's netns cannot be entered for --network-namespace)"),
        ),
        (load, _) => {
            let mut lacks = Vec::new();
            if !load {
                lacks.push("CAP_BPF or CAP_SYS_ADMIN (to load programs)");
            }
            if !env.can_attach() {
                lacks.push("CAP_NET_ADMIN or CAP_SYS_ADMIN (to load and attach cgroup network programs)");
            }
            missing(name, true, format!("{held}; needs {}", lacks.join(" and ")))
        }
    }
}

/// The bpf mount point at or above `dir` (the longest), from /proc/mounts.
fn bpffs_mount_of(dir: &Path) -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_, m, t) = (f.next()?, f.next()?, f.next()?);
            (t == "bpf" && dir.starts_with(m)).then(|| PathBuf::from(m))
        })
        .max_by_key(|m| m.as_os_str().len())
}

fn statfs_magic(path: &Path) -> io::Result<u32> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.f_type as u32)
}

fn bpffs_row(dir: &Path) -> Check {
    let name = rows::BPFFS;
    // The loader's own test, so the doctor never disagrees with `apply`.
    if !bpffs_mounted(dir) {
        let parent = dir.parent().unwrap_or(Path::new("/sys/fs/bpf"));
        return missing(
            name,
            true,
            format!(
                "no bpffs mounted at or above {} (fix: mount -t bpf bpf {})",
                dir.display(),
                parent.display()
            ),
        );
    }
    let mount = bpffs_mount_of(dir).unwrap_or_else(|| dir.to_path_buf());
    match statfs_magic(&mount) {
        Ok(m) if m == libc::BPF_FS_MAGIC as u32 => present(
            name,
            true,
            format!("mounted at {} (holds {})", mount.display(), dir.display()),
        ),
        Ok(m) => missing(
            name,
            true,
            format!(
                "{} is listed as bpf but statfs says magic {m:#x}",
                mount.display()
            ),
        ),
        Err(e) => unknown(name, true, format!("statfs {}: {e}", mount.display())),
    }
}

fn cgroup_row(cgroup: Option<&Path>) -> Check {
    let name = rows::CGROUP2;
    let dir = match cgroup {
        Some(c) => c.to_path_buf(),
        None => match detect_cgroup2_root() {
            Ok(d) => d,
            Err(e) => return missing(name, true, format!("{e:#}")),
        },
    };
    match statfs_magic(&dir) {
        Ok(m) if m == libc::CGROUP2_SUPER_MAGIC as u32 => present(
            name,
            true,
            if cgroup.is_some() {
                format!("{} is a cgroup v2 directory (--cgroup)", dir.display())
            } else {
                format!("mounted at {}", dir.display())
            },
        ),
        Ok(m) => missing(
            name,
            true,
            format!("{} is not cgroup v2 (statfs magic {m:#x})", dir.display()),
        ),
        Err(e) => missing(name, true, format!("{}: {e}", dir.display())),
    }
}

/// What loading our object taught us.
struct ObjectProbe {
    /// Per program of the object: loaded, or the kernel's reason.
    programs: BTreeMap<String, Result<(), String>>,
    cgroup_link: Option<Check>,
    /// The per-pod sk_lookup program, loaded against the object's maps.
    sk_lookup_pod: Result<(), String>,
}

/// Loads the embedded object as the loader does, minus pins and attachment, with the maps
/// shrunk to one entry (the verifier does not look at sizes, and it keeps the probe cheap); if
/// a shrunk map is refused (a ring buffer, say), loads it at full size instead.
fn load_object() -> Result<ObjectProbe, String> {
    let load = |shrink: bool| {
        let mut loader = EbpfLoader::new();
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
    let sk_lookup_pod = crate::backend::ebpf::sk_lookup::probe(&mut ebpf, SK_LOOKUP_PROGRAM);
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
                "program type {:?} is not probed by doctor",
                other.prog_type()
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

fn program_type_row(name: &str, ty: ProgramType, needed: bool) -> Check {
    match is_program_supported(ty) {
        Ok(true) => present(name, needed, format!("a trivial {ty:?} program loads")),
        Ok(false) => missing(
            name,
            needed,
            format!("BPF_PROG_LOAD rejects the {ty:?} program type"),
        ),
        Err(e) => unknown(name, needed, e.to_string()),
    }
}

fn helper_row(name: &str, ty: ProgramType) -> Check {
    match is_helper_supported(ty, BpfHelper::BPF_FUNC_get_netns_cookie) {
        Ok(true) => present(
            name,
            true,
            format!("the verifier allows bpf_get_netns_cookie in {ty:?} programs"),
        ),
        Ok(false) => missing(
            name,
            true,
            format!("the verifier refuses bpf_get_netns_cookie in {ty:?} programs"),
        ),
        Err(e) => unknown(name, true, e.to_string()),
    }
}

fn map_row(name: &str, ty: MapType) -> Check {
    match is_map_supported(ty) {
        Ok(true) => present(name, true, format!("BPF_MAP_CREATE of a {ty:?} map works")),
        Ok(false) => missing(
            name,
            true,
            format!("BPF_MAP_CREATE rejects the {ty:?} map type"),
        ),
        Err(e) => unknown(name, true, format!("{e}")),
    }
}

/// getsockopt(SOL_SOCKET, SO_NETNS_COOKIE) on a real socket (AF_UNIX: exists in any netns, even
/// one whose loopback is down), as the loader does to key pods.
fn so_netns_cookie_row() -> Check {
    let name = rows::SO_NETNS_COOKIE;
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return unknown(
            name,
            true,
            format!("socket(AF_UNIX): {}", io::Error::last_os_error()),
        );
    }
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let err = match crate::netns::socket_cookie(sock.as_fd()) {
        Ok(cookie) => {
            return present(
                name,
                true,
                format!("getsockopt returns this netns's cookie ({cookie})"),
            )
        }
        Err(e) => e,
    };
    match err.raw_os_error() {
        Some(libc::ENOPROTOOPT) => {
            missing(name, true, "getsockopt: ENOPROTOOPT (needs ≥ 5.14)".into())
        }
        _ => unknown(name, true, format!("getsockopt: {err}")),
    }
}
