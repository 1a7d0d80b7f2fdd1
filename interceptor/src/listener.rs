//! Finding a proxy listener that already existed before the programs were attached, and taking
//! a duplicate of its fd (pidfd_open + pidfd_getfd) so it can be put in the listener map.

use std::os::fd::{FromRawFd, OwnedFd};
use std::path::Path;

use anyhow::{Context, Result};

/// Socket inodes (and whether IPv6) of TCP listeners on `port` owned by one of `uids`, read
/// from the netns's own /proc/net/tcp{,6}.
fn listener_inodes(netns: &Path, port: u16, uids: &[u32]) -> Result<Vec<(u64, bool)>> {
    let uids = uids.to_vec();
    crate::netns::run_in(Some(netns), move || {
        let mut out = Vec::new();
        for file in ["/proc/thread-self/net/tcp", "/proc/thread-self/net/tcp6"] {
            let Ok(text) = std::fs::read_to_string(file) else {
                continue;
            };
            for line in text.lines().skip(1) {
                let f: Vec<&str> = line.split_whitespace().collect();
                // sl local rem st tx:rx tr:tm retrnsmt uid timeout inode
                if f.len() < 10 || f[3] != "0A" {
                    continue;
                }
                let lport = f[1]
                    .rsplit(':')
                    .next()
                    .and_then(|p| u16::from_str_radix(p, 16).ok());
                let uid: Option<u32> = f[7].parse().ok();
                if lport == Some(port) && uid.is_some_and(|u| uids.contains(&u)) {
                    if let Ok(inode) = f[9].parse() {
                        out.push((inode, file.ends_with('6')));
                    }
                }
            }
        }
        Ok(out)
    })
}

/// Duplicate fds of the proxy's existing inbound listeners in `netns` (at most one per
/// family, flagged true for IPv6).
pub fn find_proxy_listeners(netns: &Path, port: u16, uids: &[u32]) -> Result<Vec<(OwnedFd, bool)>> {
    let mut inodes = listener_inodes(netns, port, uids)?;
    let mut out = Vec::new();
    if inodes.is_empty() {
        return Ok(out);
    }
    for proc in std::fs::read_dir("/proc")?.flatten() {
        let Ok(pid) = proc.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        // Socket inodes are unique system-wide, so the owner's own netns (which may differ
        // per thread) need not be checked.
        let Ok(fds) = std::fs::read_dir(proc.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(target) = std::fs::read_link(fd.path()) else {
                continue;
            };
            let target = target.to_string_lossy();
            let Some(inode) = target
                .strip_prefix("socket:[")
                .and_then(|t| t.strip_suffix(']'))
            else {
                continue;
            };
            let Some(i) = inodes.iter().position(|(i, _)| i.to_string() == inode) else {
                continue;
            };
            let Ok(num) = fd.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let (_, v6) = inodes.remove(i);
            if !out.iter().any(|(_, f)| *f == v6) {
                out.push((dup_from(pid, num)?, v6));
            }
            if inodes.is_empty() {
                return Ok(out);
            }
        }
    }
    Ok(out)
}

fn dup_from(pid: i32, fd: i32) -> Result<OwnedFd> {
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if pidfd < 0 {
        return Err(std::io::Error::last_os_error()).context("pidfd_open");
    }
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as i32) };
    let dup = unsafe {
        libc::syscall(
            libc::SYS_pidfd_getfd,
            std::os::fd::AsRawFd::as_raw_fd(&pidfd),
            fd,
            0,
        )
    };
    if dup < 0 {
        return Err(std::io::Error::last_os_error()).context("pidfd_getfd");
    }
    Ok(unsafe { OwnedFd::from_raw_fd(dup as i32) })
}
