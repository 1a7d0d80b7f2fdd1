//! The pin folder must be writable by root only.
//!
//! Why: unpinning a `bpf_link` detaches its program, so whoever can write the pin folder (or its
//! `links/`) can switch interception off for every pod on the node, or swap a map pin. On hosts
//! where `/sys/fs/bpf` is world-writable (mode 1777), any user could create our folder before
//! the first `apply`/daemon start and own it. So: a missing folder is created 0700, and an
//! existing one (or its `maps/`, `links/`, `progs/`) that is not a directory owned by us, or that
//! group/others can write, is refused — interception fails closed (nothing is loaded or
//! registered) rather than resting on pins an unprivileged user controls.

use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::Path;

use anyhow::{bail, Context, Result};

/// Creates `dir` (mode 0700) if missing, then checks it and its subfolders.
pub fn ensure_private(dir: &Path) -> Result<()> {
    if std::fs::symlink_metadata(dir).is_err() {
        if let Some(parent) = dir.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        match std::fs::DirBuilder::new().mode(0o700).create(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e).with_context(|| format!("creating {}", dir.display())),
        }
    }
    check(dir)?;
    for sub in ["maps", "links", "progs"] {
        let p = dir.join(sub);
        if std::fs::symlink_metadata(&p).is_ok() {
            check(&p)?;
        }
    }
    Ok(())
}

fn check(p: &Path) -> Result<()> {
    let m = std::fs::symlink_metadata(p).with_context(|| format!("stat {}", p.display()))?;
    let me = nix::unistd::geteuid().as_raw();
    if !m.file_type().is_dir() {
        bail!(
            "refusing the pin folder {}: not a directory (a symlink or file in its place)",
            p.display()
        );
    }
    if m.uid() != me {
        bail!(
            "refusing the pin folder {}: owned by uid {}, not {me}; whoever owns it can unpin the links and switch interception off (remove it and retry)",
            p.display(),
            m.uid()
        );
    }
    if m.mode() & 0o022 != 0 {
        bail!(
            "refusing the pin folder {}: mode {:o} lets group/others write it and unpin the links (chmod go-w)",
            p.display(),
            m.mode() & 0o7777
        );
    }
    Ok(())
}
