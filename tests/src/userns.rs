//! Pods with their own user namespace (Kubernetes `hostUsers: false`): a pod netns owned by a
//! new user namespace whose uid_map and gid_map are `0 100000 65536`, as the kubelet sets up.
//!
//! The pod's processes are identified by the kernel through their host ids (kuids): the
//! in-namespace proxy uid 1337 is host uid 101337, and that is what both `xt_owner` (the
//! socket file's fsuid, compared with the rule's id mapped through the netns's user namespace)
//! and `bpf_get_current_uid_gid` (the real uid in the initial namespace) look at. So the test
//! servers and clients run as the host ids [`host`] gives; that is exactly how a process
//! inside the pod's user namespace appears to both.

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use anyhow::{ensure, Context, Result};

/// First host id of the pod's range (uid_map/gid_map `0 HOST_BASE RANGE`).
pub const HOST_BASE: u32 = 100_000;
/// Number of ids the pod's user namespace maps.
pub const RANGE: u32 = 65_536;
/// The kernel's text of the pod's uid_map and gid_map.
pub const MAP: &str = "0 100000 65536";

/// The host id of in-namespace id `inside`.
pub fn host(inside: u32) -> u32 {
    assert!(inside < RANGE, "id {inside} is outside the pod's range");
    HOST_BASE + inside
}

/// Creates a user namespace with [`MAP`] and a network namespace owned by it, and mounts the
/// netns at `/var/run/netns/<name>` (as `ip netns add` would): a helper child unshares both,
/// we write its maps, attach its netns, and end it. The user namespace lives on as the owner
/// of the netns, which `ip netns del` frees.
pub fn add_netns(name: &str) -> Result<()> {
    let mut cmd = Command::new("sleep");
    cmd.arg("30")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: runs in the forked child before exec: one raw syscall, no allocation.
    unsafe {
        cmd.pre_exec(|| {
            if libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("spawning the user namespace holder")?;
    let pid = child.id();
    let result = (|| -> Result<()> {
        for file in ["uid_map", "gid_map"] {
            let path = format!("/proc/{pid}/{file}");
            std::fs::write(&path, MAP).with_context(|| format!("writing {path}"))?;
        }
        let out = Command::new("ip")
            .args(["netns", "attach", name, &pid.to_string()])
            .output()
            .context("running ip netns attach")?;
        ensure!(
            out.status.success(),
            "ip netns attach {name} {pid}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(())
    })();
    let _ = child.kill();
    let _ = child.wait();
    result
}
