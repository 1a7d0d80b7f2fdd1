//! Per-thread netns and credentials: each probe thread enters the pod's netns and then drops
//! to its own uid/gid with no capabilities (raw syscalls: glibc's wrappers would change every
//! thread of the process).

use std::fs::File;
use std::io;

use anyhow::{bail, Context, Result};

pub(super) fn enter_netns(file: Option<&File>) -> Result<()> {
    if let Some(f) = file {
        nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET)
            .context("setns(CLONE_NEWNET)")?;
    }
    Ok(())
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// Makes the *calling thread only* `uid`/`gid` (supplementary groups cleared) with no
/// capabilities, then reads the result back from /proc. Irreversible for the thread.
pub(super) fn become_unprivileged(uid: u32, gid: u32) -> Result<()> {
    let (mut r, mut e, mut s) = (0, 0, 0);
    let (mut rg, mut eg, mut sg) = (0, 0, 0);
    // SAFETY: plain syscalls on integers and pointers to locals / a null list.
    unsafe {
        libc::getresuid(&mut r, &mut e, &mut s);
        libc::getresgid(&mut rg, &mut eg, &mut sg);
        if (r, e, s) != (uid, uid, uid) || (rg, eg, sg) != (gid, gid, gid) {
            if libc::syscall(libc::SYS_setgroups, 0usize, std::ptr::null::<libc::gid_t>()) != 0 {
                return Err(io::Error::last_os_error()).context("setgroups([])");
            }
            if libc::syscall(libc::SYS_setresgid, gid, gid, gid) != 0 {
                return Err(io::Error::last_os_error()).context(format!("setresgid({gid})"));
            }
            if libc::syscall(libc::SYS_setresuid, uid, uid, uid) != 0 {
                return Err(io::Error::last_os_error()).context(format!("setresuid({uid})"));
            }
        }
        // Leaving uid 0 already cleared the effective and permitted sets; this also covers a
        // proxy uid of 0 and a start with ambient or file capabilities.
        let mut hdr = CapHeader {
            version: LINUX_CAPABILITY_VERSION_3,
            pid: 0,
        };
        let data = [CapData::default(); 2];
        if libc::syscall(libc::SYS_capset, &mut hdr as *mut CapHeader, data.as_ptr()) != 0 {
            return Err(io::Error::last_os_error()).context("capset(0)");
        }
        libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
    }
    let status = std::fs::read_to_string("/proc/thread-self/status")
        .context("reading /proc/thread-self/status")?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.split_whitespace().collect::<Vec<_>>())
            .unwrap_or_default()
    };
    let uids = field("Uid:");
    let gids = field("Gid:");
    let all = |v: &[&str], want: u32| v.len() == 4 && v.iter().all(|x| x.parse() == Ok(want));
    if !all(&uids, uid) || !all(&gids, gid) {
        bail!("thread credentials are uid {uids:?} gid {gids:?}, want {uid}/{gid}");
    }
    for cap in ["CapEff:", "CapPrm:"] {
        let v = field(cap);
        if v.len() != 1 || u64::from_str_radix(v[0], 16) != Ok(0) {
            bail!("thread still has capabilities: {cap} {v:?}");
        }
    }
    Ok(())
}
