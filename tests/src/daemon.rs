//! A private `interceptor daemon` per test: its own socket, state dir and bpffs folder; killed
//! and cleaned up (programs detached, pins removed) on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use crate::bin;

static COUNTER: AtomicU32 = AtomicU32::new(0);

pub struct DaemonProc {
    pub dir: PathBuf,
    pub bpffs: PathBuf,
    child: Option<Child>,
}

impl DaemonProc {
    pub fn start(tag: &str) -> Result<Self> {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("ic-{tag}-{}-{n}", std::process::id());
        let dir = std::env::temp_dir().join(&name);
        std::fs::create_dir_all(&dir)?;
        let mut d = Self {
            dir,
            bpffs: PathBuf::from("/sys/fs/bpf").join(name),
            child: None,
        };
        d.spawn()?;
        Ok(d)
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join("sock")
    }

    /// Starts (or restarts) the daemon process and waits until it answers.
    pub fn spawn(&mut self) -> Result<()> {
        let child = Command::new(bin::interceptor_bin())
            .args(["daemon", "--socket"])
            .arg(self.socket())
            .arg("--state-dir")
            .arg(self.dir.join("state"))
            .arg("--bpffs")
            .arg(&self.bpffs)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.dir.join("daemon.log"))?)
            .spawn()?;
        self.child = Some(child);
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(20) {
            if interceptor::daemon::client::running(&self.socket()) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!(
            "daemon did not come up: {}",
            std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
        )
    }

    /// SIGKILL, as a node agent crash or an upgrade would.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Runs `interceptor pod …` against this daemon.
    pub fn pod(&self, args: &[&str]) -> std::process::Output {
        let sock = self.socket();
        let mut all = vec!["pod", args[0], "--socket", sock.to_str().unwrap()];
        all.extend_from_slice(&args[1..]);
        bin::run(&all, &[])
    }

    pub fn pod_ok(&self, args: &[&str]) -> String {
        let out = self.pod(args);
        assert!(
            out.status.success(),
            "pod {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }

    pub fn bpffs(&self) -> &Path {
        &self.bpffs
    }
}

impl Drop for DaemonProc {
    fn drop(&mut self) {
        self.kill9();
        let bpffs = self.bpffs.to_str().unwrap_or_default().to_string();
        let _ = bin::run(&["cleanup", "--bpffs", &bpffs], &[]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
