//! The guest's root file system: the host's own tools (iproute2, util-linux, iptables legacy
//! and nft with their extensions, nftables, procps, dig, …) with their shared libraries,
//! busybox for the odd shell utility, the kernel's modules, the static interceptor, test and
//! init binaries, and the plan.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use super::cpio::{Entry, Tree};
use super::kernels::Kernel;
use super::proto;

/// Tools the tests and the interceptor run, looked up in the host's PATH: all required.
const REQUIRED_TOOLS: &[&str] = &[
    "ip",
    "nsenter",
    "setpriv",
    "sysctl",
    "nft",
    "iptables",
    "iptables-save",
    "iptables-restore",
    "ip6tables",
    "ip6tables-save",
    "ip6tables-restore",
    "iptables-legacy",
    "iptables-legacy-save",
    "iptables-legacy-restore",
    "ip6tables-legacy",
    "ip6tables-legacy-save",
    "ip6tables-legacy-restore",
    "iptables-nft",
    "iptables-nft-save",
    "iptables-nft-restore",
    "ip6tables-nft",
    "ip6tables-nft-save",
    "ip6tables-nft-restore",
];
/// Copied when the host has them.
const OPTIONAL_TOOLS: &[&str] = &[
    "tc", "ss", "bpftool", "unshare", "mount", "umount", "dig", "ping", "sleep", "cat", "sh",
];
/// busybox applets never linked (busybox's `ip` lacks netns and veth peers).
const NO_APPLETS: &[&str] = &["ip", "init", "linuxrc", "reboot", "poweroff", "halt"];
const HOST_DIRS: &[&str] = &[
    "/usr/local/sbin",
    "/usr/local/bin",
    "/usr/sbin",
    "/usr/bin",
    "/sbin",
    "/bin",
];

fn which(name: &str) -> Option<PathBuf> {
    HOST_DIRS
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.exists())
}

/// The part shared by every kernel: directories, device nodes, host tools and libraries,
/// /etc files.
pub fn userland() -> Result<Tree> {
    let mut t = Tree::default();
    for d in [
        "/proc",
        "/sys",
        "/dev",
        "/run",
        "/tmp",
        "/root",
        "/var",
        "/etc",
        "/vm/bin",
        "/vm/tests",
    ] {
        t.mkdir_p(Path::new(d))?;
    }
    // Needed before devtmpfs is mounted: the kernel opens /dev/console for init's stdio.
    t.put(
        Path::new("/dev/console"),
        Entry::CharDev { major: 5, minor: 1 },
    )?;
    t.put(
        Path::new("/dev/null"),
        Entry::CharDev { major: 1, minor: 3 },
    )?;
    // Merged /usr as on the host: mirror its top-level symlinks first, so files land where
    // the host has them.
    for top in ["/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32"] {
        if std::fs::symlink_metadata(top).is_ok_and(|m| m.file_type().is_symlink()) {
            t.add_host(Path::new(top))?;
        }
    }
    let mut elf = Vec::new();
    for name in REQUIRED_TOOLS {
        let p = which(name)
            .with_context(|| format!("{name} not found on this machine (setup.sh installs it)"))?;
        t.add_host(&p)?;
        elf.push(std::fs::canonicalize(&p)?);
    }
    for name in OPTIONAL_TOOLS {
        if let Some(p) = which(name) {
            t.add_host(&p)?;
            elf.push(std::fs::canonicalize(&p)?);
        }
    }
    // xtables extensions, with their symlinks (libxt_REDIRECT.so -> libxt_NAT.so).
    let xt = [
        "/usr/lib/x86_64-linux-gnu/xtables",
        "/usr/lib64/xtables",
        "/usr/lib/xtables",
    ]
    .into_iter()
    .map(PathBuf::from)
    .find(|p| p.is_dir())
    .context("no xtables extension folder on this machine")?;
    t.add_host_tree(&xt)?;
    for e in std::fs::read_dir(&xt)?.flatten() {
        if e.file_type()?.is_file() {
            elf.push(e.path());
        }
    }
    // The reference CNI plugins the CNI chain tests run (static Go binaries).
    for name in ["bridge", "host-local", "loopback"] {
        let p = Path::new("/usr/lib/cni").join(name);
        if p.is_file() {
            t.add_host(&p)?;
        }
    }
    // CA roots: the Kubernetes client loads the system's even when it talks to a local fake.
    let ca = Path::new("/etc/ssl/certs/ca-certificates.crt");
    if ca.is_file() {
        t.add_host(ca)?;
    }
    for lib in shared_libs(&elf)? {
        t.add_host(&lib)?;
    }
    // busybox (static) for a shell and the odd utility; kernel module autoloading uses its
    // modprobe with the modules.dep staged per kernel.
    let bb = ["/usr/bin/busybox", "/bin/busybox"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .context("busybox not found (setup.sh installs busybox-static)")?;
    t.add_host(&bb)?;
    let out = Command::new(&bb).arg("--list").output()?;
    for applet in String::from_utf8_lossy(&out.stdout).lines() {
        let applet = applet.trim();
        if applet.is_empty() || NO_APPLETS.contains(&applet) {
            continue;
        }
        let taken = ["/usr/bin", "/usr/sbin", "/bin", "/sbin"]
            .iter()
            .any(|d| t.contains(&Path::new(d).join(applet)));
        if !taken {
            let dir = if applet == "modprobe" {
                "/sbin"
            } else {
                "/bin"
            };
            t.put(&Path::new(dir).join(applet), Entry::Symlink(bb.clone()))?;
        }
    }
    // /etc: name databases the tools read; resolv.conf and hosts as plain copies (on the
    // host they may be symlinks into /run, which the guest mounts over).
    for f in [
        "/etc/protocols",
        "/etc/services",
        "/etc/ethertypes",
        "/etc/nsswitch.conf",
    ] {
        if Path::new(f).exists() {
            t.add_host(Path::new(f))?;
        }
    }
    for d in ["/etc/iproute2", "/usr/share/iproute2", "/usr/lib/iproute2"] {
        if Path::new(d).is_dir() {
            t.add_host_tree(Path::new(d))?;
        }
    }
    for f in ["/etc/resolv.conf", "/etc/hosts"] {
        if let Ok(data) = std::fs::read(f) {
            t.put(Path::new(f), Entry::Bytes { data, perm: 0o644 })?;
        }
    }
    let bytes = |s: &str| Entry::Bytes {
        data: s.as_bytes().to_vec(),
        perm: 0o644,
    };
    t.put(
        Path::new("/etc/passwd"),
        bytes(
            "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
        ),
    )?;
    t.put(
        Path::new("/etc/group"),
        bytes("root:x:0:\nnogroup:x:65534:\n"),
    )?;
    t.put(Path::new("/etc/hostname"), bytes("vm-test\n"))?;
    Ok(t)
}

/// Every shared library (and the dynamic loader) the ELF files need, by ldd.
fn shared_libs(files: &[PathBuf]) -> Result<BTreeSet<PathBuf>> {
    let mut libs = BTreeSet::new();
    for chunk in files.chunks(64) {
        let out = Command::new("ldd")
            .args(chunk)
            .output()
            .context("running ldd")?;
        for l in String::from_utf8_lossy(&out.stdout).lines() {
            let l = l.trim();
            // With several files ldd heads each one's list with "<file>:".
            if l.ends_with(':') {
                continue;
            }
            let path = match l.split_once("=>") {
                Some((_, rest)) => rest.split_whitespace().next(),
                None => l.split_whitespace().next().filter(|p| p.starts_with('/')),
            };
            if let Some(p) = path.filter(|p| p.starts_with('/')) {
                libs.insert(PathBuf::from(p));
            } else if l.contains("not found") {
                bail!("ldd: {l}");
            }
        }
    }
    Ok(libs)
}

/// What is specific to one guest.
pub struct GuestFiles<'a> {
    pub kernel: &'a Kernel,
    pub init: &'a Path,
    pub interceptor: &'a Path,
    pub tests: &'a [(String, PathBuf)],
    pub plan: &'a proto::Plan,
    /// Host folders mirrored at the same path (the conformance goldens).
    pub extra_trees: &'a [PathBuf],
    /// Empty folders the tests expect (so that `…/tests/../../shared` resolves).
    pub extra_dirs: &'a [PathBuf],
}

/// Writes the guest's initramfs (uncompressed newc) to `out`; returns its size.
pub fn write(base: &Tree, g: &GuestFiles, out: &Path) -> Result<u64> {
    let mut t = base.clone();
    let exe = |src: &Path| Entry::HostFile {
        src: src.to_path_buf(),
        perm: 0o755,
    };
    t.put(Path::new("/init"), exe(g.init))?;
    t.put(Path::new(proto::INTERCEPTOR), exe(g.interceptor))?;
    for (name, path) in g.tests {
        t.put(&Path::new(proto::TEST_DIR).join(name), exe(path))?;
    }
    t.put(
        Path::new(proto::PLAN_PATH),
        Entry::Bytes {
            data: g.plan.render().into_bytes(),
            perm: 0o644,
        },
    )?;
    // Modules (plain .ko) and the modules.* files from depmod, under /lib/modules/<release>.
    let mod_root = g.kernel.stage.join("lib/modules").join(&g.kernel.release);
    add_stage_tree(&mut t, &g.kernel.stage, &mod_root)?;
    for d in g.extra_dirs {
        t.mkdir_p(d)?;
    }
    for d in g.extra_trees {
        t.add_host_tree(d)?;
    }
    t.write(out)
}

/// Adds `dir` (inside `stage`) at the same path relative to the guest's root.
fn add_stage_tree(t: &mut Tree, stage: &Path, dir: &Path) -> Result<()> {
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let p = e.path();
        let guest = Path::new("/").join(p.strip_prefix(stage)?);
        if e.file_type()?.is_dir() {
            t.mkdir_p(&guest)?;
            add_stage_tree(t, stage, &p)?;
        } else {
            t.put(
                &guest,
                Entry::HostFile {
                    src: p,
                    perm: 0o644,
                },
            )?;
        }
    }
    Ok(())
}
