//! Network namespaces: run Rust code or a command inside a netns given by path.

use std::fs::File;
use std::path::Path;
use std::process::Command;

use anyhow::{anyhow, Context, Result};
use nix::sched::{setns, CloneFlags};

/// What registering a pod needs from inside its netns, gathered in one visit (each visit is a
/// thread and a setns: on the pod-add path they added up).
#[derive(Debug, Clone)]
pub struct PodNetns {
    pub cookie: u64,
    /// Its own addresses (no loopback, no link-local), in interface order.
    pub local: Vec<std::net::IpAddr>,
    /// Its own link-local addresses (fe80::/10, 169.254/16): local for outbound decisions only.
    pub link_local: Vec<std::net::IpAddr>,
    pub listening: Vec<crate::listener::Listening>,
}

/// Visits the netns at `path` once and reads its cookie, addresses and listening sockets.
pub fn pod_netns(path: &Path) -> Result<PodNetns> {
    run_in(Some(path), || {
        let (local, link_local) = crate::config::own_addrs_here()?;
        Ok(PodNetns {
            cookie: crate::backend::ebpf::netns_cookie_here()?,
            local,
            link_local,
            listening: crate::listener::listening_here()?,
        })
    })
}

/// Runs `f` on a fresh thread that has entered the netns at `path` (or the current one).
/// A dedicated thread keeps the caller's own namespace untouched.
pub fn run_in<T: Send + 'static>(
    path: Option<&Path>,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let file = path
        .map(|p| File::open(p).with_context(|| format!("opening netns {}", p.display())))
        .transpose()?;
    std::thread::spawn(move || {
        if let Some(file) = file {
            setns(&file, CloneFlags::CLONE_NEWNET).context("setns(CLONE_NEWNET)")?;
        }
        f()
    })
    .join()
    .map_err(|_| anyhow!("netns worker thread panicked"))?
}

/// A command that runs inside the netns at `path` (via nsenter), or here when `None`. A netns
/// owned by another user namespace (a `hostUsers: false` pod) is entered together with that
/// user namespace: the kernel only accepts owner-match rules written from there.
pub fn command(path: Option<&Path>, program: &str) -> Result<Command> {
    match path {
        Some(p) => {
            if let Some(userns) = crate::userns::foreign_owner(p)? {
                return crate::userns::command(userns, p, program);
            }
            let mut c = Command::new("nsenter");
            c.arg(format!("--net={}", p.display()))
                .arg("--")
                .arg(program);
            Ok(c)
        }
        None => Ok(Command::new(program)),
    }
}

/// Whether `path` is a network namespace handle (nsfs inode of type net).
pub fn is_netns(path: &Path) -> bool {
    File::open(path)
        .ok()
        .and_then(|f| {
            // NS_GET_NSTYPE ioctl = _IO(0xb7, 0x3); returns CLONE_NEWNET for a netns.
            let r = unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(&f), 0xb703) };
            (r >= 0).then_some(r)
        })
        .is_some_and(|t| t == libc::CLONE_NEWNET)
}
