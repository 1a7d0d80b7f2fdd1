//! Pods with their own user namespace (`hostUsers: false`): finding the user namespace that
//! owns a pod's netns, reading its id maps, and running the rule tools from inside it.
//!
//! Why both: the eBPF programs see ids of the initial user namespace, so the configured
//! (in-namespace) proxy ids are translated through the maps; the kernel's iptables owner match
//! (`xt_owner`) only accepts rules written from the netns's own user namespace, so the
//! fallback's tools run there, with the in-namespace ids, as istio-init inside the pod does.

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};
use interceptor_common::config::Config;
use interceptor_common::idmap::{self, IdMap, UsernsMaps};

/// `NS_GET_USERNS` = `_IO(0xb7, 0x1)`: an fd of the user namespace owning a namespace.
const NS_GET_USERNS: libc::c_ulong = 0xb701;

/// The user namespace owning the netns at `netns`, when it is not our own (None for ordinary
/// pods, whose netns belongs to the node's user namespace).
pub fn foreign_owner(netns: &Path) -> Result<Option<OwnedFd>> {
    let net = File::open(netns).with_context(|| format!("opening netns {}", netns.display()))?;
    foreign_owner_of(&net).with_context(|| format!("NS_GET_USERNS on {}", netns.display()))
}

/// `foreign_owner` of an open netns.
fn foreign_owner_of(net: &File) -> Result<Option<OwnedFd>> {
    // SAFETY: an ioctl on an fd we own; on success it returns a new fd that we then own.
    let fd = unsafe { libc::ioctl(net.as_raw_fd(), NS_GET_USERNS as _) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    // SAFETY: `fd` is a fresh descriptor returned by the kernel, owned by nobody else.
    let owner = unsafe { OwnedFd::from_raw_fd(fd) };
    let theirs = nix::sys::stat::fstat(owner.as_raw_fd())?;
    Ok((Some((theirs.st_dev, theirs.st_ino)) != own_userns()).then_some(owner))
}

/// Our own user namespace's (device, inode), read once: this process never changes it (only
/// the forked children of `read_maps` join another).
fn own_userns() -> Option<(u64, u64)> {
    static OURS: std::sync::OnceLock<Option<(u64, u64)>> = std::sync::OnceLock::new();
    *OURS.get_or_init(|| {
        std::fs::metadata("/proc/self/ns/user")
            .ok()
            .map(|m| (m.dev(), m.ino()))
    })
}

/// The uid/gid maps of the user namespace owning the netns at `netns`, as ids of our own user
/// namespace; None when the netns is owned by ours.
pub fn maps_of(netns: &Path) -> Result<Option<UsernsMaps>> {
    let net = File::open(netns).with_context(|| format!("opening netns {}", netns.display()))?;
    maps_of_open(&net, netns)
}

/// `maps_of` for the netns `net`, already open (from `path`).
pub fn maps_of_open(net: &File, path: &Path) -> Result<Option<UsernsMaps>> {
    let Some(owner) =
        foreign_owner_of(net).with_context(|| format!("NS_GET_USERNS on {}", path.display()))?
    else {
        return Ok(None);
    };
    read_maps(&owner)
        .map(Some)
        .with_context(|| format!("reading the id maps of {}'s user namespace", path.display()))
}

/// Maps are only readable through a process inside the namespace: a forked child joins it and
/// waits while we read `/proc/<child>/{uid,gid}_map` (shown in our namespace's ids), then exits
/// when we close its pipe (also if we die first).
fn read_maps(owner: &OwnedFd) -> Result<UsernsMaps> {
    let (ready_rd, ready_wr) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let (done_rd, done_wr) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let (userns, ready_w, done_r) = (owner.as_raw_fd(), ready_wr.as_raw_fd(), done_rd.as_raw_fd());
    let (ready_r, done_w) = (ready_rd.as_raw_fd(), done_wr.as_raw_fd());
    // SAFETY: the child (forked from a possibly multi-threaded process) only makes raw
    // syscalls on fds prepared before the fork, then `_exit`s: no allocation, no locks.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(std::io::Error::last_os_error()).context("fork");
    }
    if pid == 0 {
        // SAFETY: raw syscalls on valid fds and a stack buffer, as above.
        unsafe {
            // Our copy of the parent's ends: the parent closing its own must reach us as EOF.
            libc::close(ready_r);
            libc::close(done_w);
            let err: i32 = if libc::setns(userns, libc::CLONE_NEWUSER) == 0 {
                0
            } else {
                *libc::__errno_location()
            };
            libc::write(ready_w, (&err as *const i32).cast(), 4);
            let mut b = 0u8;
            // Returns 0 once the parent closes its end.
            libc::read(done_r, (&mut b as *mut u8).cast(), 1);
            libc::_exit(0);
        }
    }
    drop(ready_wr);
    drop(done_rd);
    let result = (|| {
        let mut err = [0u8; 4];
        File::from(ready_rd)
            .read_exact(&mut err)
            .context("the map reader child died")?;
        let err = i32::from_ne_bytes(err);
        if err != 0 {
            bail!(
                "joining the user namespace: {}",
                std::io::Error::from_raw_os_error(err)
            );
        }
        let read = |what: &str| -> Result<IdMap> {
            let path = format!("/proc/{pid}/{what}");
            let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
            IdMap::parse(&text).map_err(|e| anyhow::anyhow!("{path}: {e}"))
        };
        Ok(UsernsMaps {
            uid_map: read("uid_map")?,
            gid_map: read("gid_map")?,
        })
    })();
    drop(done_wr);
    let mut status = 0;
    // SAFETY: reaping our own child, which exits as soon as its pipe closed.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    result
}

/// `program` to run inside the user namespace `userns` and the netns `netns` (entered in that
/// order, then uid/gid 0 of the namespace when it maps 0): what istio-init's own rule writes
/// look like to the kernel, so owner-match rules are accepted.
pub fn command(userns: OwnedFd, netns: &Path, program: &str) -> Result<Command> {
    let net = File::open(netns).with_context(|| format!("opening netns {}", netns.display()))?;
    let mut cmd = Command::new(program);
    // SAFETY: runs in the forked child before exec: raw syscalls on the two fds the closure
    // owns (closed at exec, being CLOEXEC), no allocation.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(userns.as_raw_fd(), libc::CLONE_NEWUSER) != 0
                || libc::setns(net.as_raw_fd(), libc::CLONE_NEWNET) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            // Best effort, as nsenter does: groups may be denied, and a map without 0 keeps
            // the (unmapped) ids; the capabilities from setns are what the tools need.
            libc::syscall(libc::SYS_setgroups, 0usize, std::ptr::null::<libc::gid_t>());
            libc::syscall(libc::SYS_setresgid, 0, 0, 0);
            libc::syscall(libc::SYS_setresuid, 0, 0, 0);
            Ok(())
        });
    }
    Ok(cmd)
}

/// A pod's user namespace as `pod show` reports it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct UsernsView {
    pub uid_map: IdMap,
    pub gid_map: IdMap,
    /// Each configured proxy uid with its host uid: `1337 (host 101337)`.
    pub proxy_uid: String,
    /// Each configured proxy gid with its host gid.
    pub proxy_gid: String,
}

impl UsernsView {
    pub fn new(maps: &UsernsMaps, cfg: &Config) -> Self {
        Self {
            proxy_uid: idmap::describe(&cfg.proxy_uid, &maps.uid_map),
            proxy_gid: idmap::describe(&cfg.proxy_gid, &maps.gid_map),
            uid_map: maps.uid_map.clone(),
            gid_map: maps.gid_map.clone(),
        }
    }

    /// One line: `uid_map 0 100000 65536; proxy uid 1337 (host 101337); proxy gid …`.
    pub fn line(&self) -> String {
        format!(
            "uid_map {}; gid_map {}; proxy uid {}; proxy gid {}",
            self.uid_map.render(),
            self.gid_map.render(),
            self.proxy_uid,
            self.proxy_gid
        )
    }
}
