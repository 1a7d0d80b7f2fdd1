//! The host around the kernel features: its version, the bpffs and cgroup v2 mounts the
//! loader needs, and SO_NETNS_COOKIE (how pods are keyed).

use std::ffi::CStr;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};

use aya::util::KernelVersion;

use super::{missing, present, rows, unknown, Check};
use crate::backend::ebpf::{bpffs_mounted, detect_cgroup2_root};

fn uname_release() -> Option<String> {
    // SAFETY: `utsname` is plain C data (char arrays), valid when zeroed.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `u` is ours and of the size the kernel fills.
    if unsafe { libc::uname(&mut u) } != 0 {
        return None;
    }
    // SAFETY: on success `release` holds a NUL-terminated string within the array.
    let release = unsafe { CStr::from_ptr(u.release.as_ptr()) };
    Some(release.to_string_lossy().into_owned())
}

pub(super) fn kernel_row(version: Option<KernelVersion>) -> Check {
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
    let st = nix::sys::statfs::statfs(path)?;
    Ok(st.filesystem_type().0 as u32)
}

pub(super) fn bpffs_row(dir: &Path) -> Check {
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

pub(super) fn cgroup_row(cgroup: Option<&Path>) -> Check {
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

/// getsockopt(SOL_SOCKET, SO_NETNS_COOKIE) on a real socket (AF_UNIX: exists in any netns, even
/// one whose loopback is down), as the loader does to key pods. Not needed: without it the
/// loader asks its bind6 program (`netns::cookie_by_bind`).
pub(super) fn so_netns_cookie_row() -> Check {
    let name = rows::SO_NETNS_COOKIE;
    let sock = match UnixDatagram::unbound() {
        Ok(s) => s,
        Err(e) => return unknown(name, false, format!("socket(AF_UNIX): {e}")),
    };
    let err = match crate::netns::socket_cookie(sock.as_fd()) {
        Ok(cookie) => {
            return present(
                name,
                false,
                format!("getsockopt returns this netns's cookie ({cookie})"),
            )
        }
        Err(e) => e,
    };
    match err.raw_os_error() {
        Some(libc::ENOPROTOOPT) => missing(
            name,
            false,
            "getsockopt: ENOPROTOOPT (needs ≥ 5.14): not needed, the loader asks its own bind6 \
             program for a pod's netns cookie instead"
                .into(),
        ),
        _ => unknown(name, false, format!("getsockopt: {err}")),
    }
}
