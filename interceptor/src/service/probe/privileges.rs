//! The process's privileges (capabilities, seccomp, user namespace, the unprivileged-bpf
//! sysctl), read from /proc: why bpf() is denied when it is, in words.

use std::io;

use aya::programs::{ProgramError, ProgramType};
use aya::sys::is_program_supported;

use super::{missing, present, rows, unknown, Check};

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;

/// What /proc says about this process's privileges.
pub(super) struct ProcEnv {
    cap_eff: Option<u64>,
    /// `Seccomp:` of /proc/self/status: 0 none, 1 strict, 2 filter.
    seccomp: Option<u32>,
    /// Whether this process runs in a user namespace other than the initial one.
    in_userns: bool,
    /// kernel.unprivileged_bpf_disabled.
    unprivileged_bpf_disabled: Option<u32>,
}

impl ProcEnv {
    pub(super) fn read() -> Self {
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

/// A trivial socket filter (does bpf() work at all?), then a trivial cgroup sock_addr program
/// (does it work for the privileged program types we load?).
pub(super) fn bpf_row(env: &ProcEnv) -> Check {
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

pub(super) fn capabilities_row(env: &ProcEnv) -> Check {
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
