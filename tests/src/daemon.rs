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
    /// Loopback address of its metrics endpoint.
    pub metrics: std::net::SocketAddr,
    pub bpffs: PathBuf,
    /// Extra daemon flags (e.g. `--node-name`, `--kubeconfig`).
    extra: Vec<String>,
    /// Extra environment of the daemon process (e.g. the test-only `INTERCEPTOR_FAULT`).
    env: Vec<(String, String)>,
    /// The `interceptor` binary it runs: this build's unless set (the upgrade test runs an
    /// earlier release's first).
    bin: Option<PathBuf>,
    child: Option<Child>,
}

impl DaemonProc {
    pub fn start(tag: &str) -> Result<Self> {
        Self::start_with(tag, &[])
    }

    /// A daemon with extra flags.
    pub fn start_with(tag: &str, extra: &[&str]) -> Result<Self> {
        Self::start_env(tag, extra, &[])
    }

    /// A daemon with extra flags and environment.
    pub fn start_env(tag: &str, extra: &[&str], env: &[(&str, &str)]) -> Result<Self> {
        Self::start_under(&std::env::temp_dir(), tag, extra, env)
    }

    /// A daemon whose socket, state records and log live in a folder under `base` (the
    /// benchmark puts them on a tmpfs, as the DaemonSet does).
    pub fn start_under(
        base: &std::path::Path,
        tag: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Self> {
        let mut d = Self::new_under(base, tag, extra, env)?;
        d.spawn()?;
        Ok(d)
    }

    fn new_under(
        base: &std::path::Path,
        tag: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Self> {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("ic-{tag}-{}-{n}", std::process::id());
        let dir = base.join(&name);
        std::fs::create_dir_all(&dir)?;
        // A free loopback port for the metrics endpoint (tests run in parallel).
        let metrics = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        Ok(Self {
            dir,
            metrics,
            bpffs: PathBuf::from("/sys/fs/bpf").join(name),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            child: None,
            bin: None,
        })
    }

    /// A daemon running `bin` (another build of `interceptor`) instead of this build's, until
    /// [`DaemonProc::set_bin`] changes it for the next start. Cleaned up by this build.
    pub fn start_bin(bin: &Path, tag: &str, extra: &[&str]) -> Result<Self> {
        let mut d = Self::new_under(&std::env::temp_dir(), tag, extra, &[])?;
        d.bin = Some(bin.to_path_buf());
        d.spawn()?;
        Ok(d)
    }

    /// The binary of the next start: `bin`, or this build's with None.
    pub fn set_bin(&mut self, bin: Option<&Path>) {
        self.bin = bin.map(Path::to_path_buf);
    }

    /// Sets (or replaces) a variable of the daemon's environment for its next start.
    pub fn set_env(&mut self, key: &str, value: &str) {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.to_string(), value.to_string()));
    }

    /// The record file of the pod registered for `netns` (found by its content).
    pub fn record_of(&self, netns: &Path) -> Option<PathBuf> {
        std::fs::read_dir(self.state_dir())
            .ok()?
            .flatten()
            .map(|e| e.path())
            .find(|f| {
                std::fs::read(f)
                    .ok()
                    .and_then(|t| serde_json::from_slice::<serde_json::Value>(&t).ok())
                    .is_some_and(|v| v["netns"].as_str() == netns.to_str())
            })
    }

    /// The daemon's pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join("sock")
    }

    /// Starts (or restarts) the daemon process and waits until it answers.
    pub fn spawn(&mut self) -> Result<()> {
        self.spawn_until(crate::scaled(Duration::from_secs(20)))
    }

    /// Starts the daemon process and waits up to `limit` for it to answer; fails (the process
    /// reaped) if it exits first.
    pub fn spawn_until(&mut self, limit: Duration) -> Result<()> {
        let bin = self.bin.clone().unwrap_or_else(bin::interceptor_bin);
        let child = Command::new(bin)
            .args(["daemon", "--socket"])
            .arg(self.socket())
            .arg("--state-dir")
            .arg(self.dir.join("state"))
            .arg("--bpffs")
            .arg(&self.bpffs)
            .arg("--metrics-addr")
            .arg(self.metrics.to_string())
            .args(&self.extra)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.dir.join("daemon.log"))?)
            .spawn()?;
        self.child = Some(child);
        let start = Instant::now();
        while start.elapsed() < limit {
            if interceptor::daemon::client::running(&self.socket()) {
                return Ok(());
            }
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if let Some(status) = exited {
                self.child = None;
                bail!(
                    "daemon exited ({status}): {}",
                    std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!(
            "daemon did not come up: {}",
            std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
        )
    }

    /// The extra flags of the next start.
    pub fn set_extra(&mut self, extra: &[&str]) {
        self.extra = extra.iter().map(|s| s.to_string()).collect();
    }

    /// SIGTERM and wait, as the kubelet stops a pod being replaced.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on the pid of our own child, not yet reaped (so not reused).
            unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) };
            let _ = c.wait();
        }
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

    /// `pod add` of the netns at `netns` capturing everything both ways (`-i * -b *`, IPv4 only),
    /// then `extra` flags; asserts it succeeded.
    pub fn add_capturing(&self, netns: &std::path::Path, extra: &[&str]) -> String {
        let ns = netns.to_str().expect("netns path");
        let mut args = vec![
            "add",
            "--network-namespace",
            ns,
            "-i",
            "*",
            "-b",
            "*",
            "--ipv6",
            "false",
        ];
        args.extend_from_slice(extra);
        self.pod_ok(&args)
    }

    /// One scrape of the metrics endpoint: the whole response, status line and headers too.
    pub fn scrape(&self) -> Result<String> {
        self.http(
            "GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
            crate::scaled(Duration::from_secs(30)),
        )
    }

    /// Sends `request` to the metrics endpoint and reads the response until the server closes
    /// the connection; fails when that takes longer than `timeout` (each read).
    pub fn http(&self, request: &str, timeout: Duration) -> Result<String> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(self.metrics)?;
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        s.write_all(request.as_bytes())?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    }

    /// The value of the sample whose line starts with `prefix` (name plus labels), if any.
    pub fn sample(text: &str, metric: &str, labels: &[&str]) -> Option<f64> {
        text.lines()
            .filter(|l| l.starts_with(metric) && labels.iter().all(|x| l.contains(x)))
            .find_map(|l| l.rsplit(' ').next()?.parse().ok())
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
