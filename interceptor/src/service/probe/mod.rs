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
//! By concern: this file the vocabulary (rows, checks, the report and its one-line reason),
//! `run` the probe in its order, `privileges` (capabilities, seccomp, user namespace: why bpf()
//! is denied), `host` (kernel, bpffs, cgroup v2, SO_NETNS_COOKIE), `object` (our object through
//! the verifier, cgroup links, helpers and map types), `coexist` (the other programs at the
//! cgroup's hooks, in run order, and the known conflicts: `doctor` only).

pub mod coexist;
mod host;
mod object;
mod privileges;
mod run;

use std::fmt;
use std::time::Duration;

pub use run::{ebpf_missing, probe};

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
