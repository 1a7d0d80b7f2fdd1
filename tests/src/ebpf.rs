//! A private eBPF installation per test: its own bpffs folder (so parallel tests never share
//! maps), removed with everything it attached when dropped, even on failure.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use interceptor::backend::ebpf::{detect_cgroup2_root, Pins};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A unique `/sys/fs/bpf/ic-<tag>-<pid>-<n>` installation.
pub struct EbpfInstall {
    pub pins: Pins,
    pub cgroup: PathBuf,
}

impl EbpfInstall {
    pub fn new(tag: &str) -> Self {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = PathBuf::from(format!("/sys/fs/bpf/ic-{tag}-{}-{n}", std::process::id()));
        Self {
            pins: Pins::new(dir),
            cgroup: detect_cgroup2_root().expect("cgroup v2"),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.pins.dir
    }

    /// Loads and attaches now (tests that use the library rather than the CLI).
    pub fn load(&self) -> anyhow::Result<()> {
        self.pins.ensure_loaded(&self.cgroup, false).map(drop)
    }
}

impl Drop for EbpfInstall {
    fn drop(&mut self) {
        if let Err(e) = self.pins.cleanup(&self.cgroup) {
            eprintln!("cleanup of {}: {e:#}", self.pins.dir.display());
        }
    }
}
