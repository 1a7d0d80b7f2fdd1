//! A private containerd (Debian's package) for the e2e suite: its own root, state dir, socket,
//! config and `ctr` namespace in a temp dir, no CRI plugin, driven with Debian's `ctr`. On drop
//! every task, container, image and snapshot of its namespace goes, the daemon is stopped, its
//! shims too, the containers' cgroups are removed and so is the folder (only when nothing
//! is mounted below it any more).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

static COUNTER: AtomicU32 = AtomicU32::new(0);

pub struct Containerd {
    pub dir: PathBuf,
    /// The `ctr` namespace, also the parent cgroup of its containers (`/sys/fs/cgroup/<ns>`).
    pub ns: String,
    child: Option<Child>,
}

/// Whether the tools are installed (containerd, ctr, runc and runc's shim).
pub fn missing_tools() -> Vec<&'static str> {
    ["containerd", "ctr", "runc", "containerd-shim-runc-v2"]
        .into_iter()
        .filter(|t| {
            !Command::new("sh")
                .args(["-c", &format!("command -v {t}")])
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
        .collect()
}

impl Containerd {
    /// Starts the daemon and waits until `ctr` reaches it.
    pub fn start(tag: &str) -> anyhow::Result<Self> {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let ns = format!("ic-{tag}-{}-{n}", std::process::id());
        let dir = std::env::temp_dir().join(&ns);
        std::fs::create_dir_all(&dir)?;
        let d = |p: &str| dir.join(p).display().to_string();
        // No CRI (nothing watches /etc/cni or starts pods by itself); `opt` would default to
        // /opt/containerd.
        let config = format!(
            r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.grpc.v1.cri"]

[grpc]
  address = "{sock}"

[ttrpc]
  address = "{sock}.ttrpc"

[plugins."io.containerd.internal.v1.opt"]
  path = "{opt}"
"#,
            root = d("root"),
            state = d("state"),
            sock = d("c.sock"),
            opt = d("opt"),
        );
        std::fs::write(dir.join("config.toml"), config)?;
        let child = Command::new("containerd")
            .arg("--config")
            .arg(dir.join("config.toml"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("containerd.log"))?)
            .spawn()?;
        let me = Self {
            dir,
            ns,
            child: Some(child),
        };
        let t0 = Instant::now();
        while !me.ctr(&["version"]).status.success() {
            if t0.elapsed() > crate::scaled(Duration::from_secs(20)) {
                anyhow::bail!("containerd did not answer: {}", me.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(me)
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join("c.sock")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
    }

    /// `ctr` against this daemon and namespace.
    pub fn ctr(&self, args: &[&str]) -> Output {
        Command::new("ctr")
            .arg("--address")
            .arg(self.socket())
            .args(["--namespace", &self.ns])
            .args(args)
            .output()
            .expect("running ctr")
    }

    /// `ctr`, asserting success; its stdout.
    pub fn ctr_ok(&self, args: &[&str]) -> String {
        let out = self.ctr(args);
        assert!(
            out.status.success(),
            "ctr {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The ids `ctr <what> ls -q` lists (containers, tasks' ids are the containers').
    fn list(&self, what: &str) -> Vec<String> {
        String::from_utf8_lossy(&self.ctr(&[what, "ls", "-q"]).stdout)
            .lines()
            .map(str::to_string)
            .filter(|l| !l.is_empty())
            .collect()
    }

    /// Kills (SIGTERM, then SIGKILL after `grace`) and deletes the task of container `id`,
    /// then the container and its snapshot.
    pub fn remove(&self, id: &str, grace: Duration) {
        let _ = self.ctr(&["task", "kill", "--signal", "SIGTERM", id]);
        let t0 = Instant::now();
        while self.running(id) && t0.elapsed() < grace {
            std::thread::sleep(Duration::from_millis(50));
        }
        if self.running(id) {
            let _ = self.ctr(&["task", "kill", "--signal", "SIGKILL", id]);
        }
        let _ = self.ctr(&["task", "delete", "--force", id]);
        let _ = self.ctr(&["container", "delete", id]);
    }

    /// Whether container `id` has a running task.
    pub fn running(&self, id: &str) -> bool {
        String::from_utf8_lossy(&self.ctr(&["task", "ls"]).stdout)
            .lines()
            .any(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.first() == Some(&id) && f.get(2) == Some(&"RUNNING")
            })
    }

    /// Mount points at or below our folder, deepest first.
    fn mounts_below(&self) -> Vec<String> {
        let dir = self.dir.display().to_string();
        let mut m: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
            .filter(|p| p.starts_with(&dir))
            .collect();
        m.sort_by_key(|p| std::cmp::Reverse(p.len()));
        m
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        for id in self.list("container") {
            self.remove(&id, Duration::from_secs(5));
        }
        for image in self.list("image") {
            let _ = self.ctr(&["image", "remove", "--sync", &image]);
        }
        let _ = self.ctr(&["namespace", "remove", &self.ns]);
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on the pid of our own child, not yet reaped (so not reused).
            unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) };
            let t0 = Instant::now();
            while c.try_wait().ok().flatten().is_none() && t0.elapsed() < Duration::from_secs(5) {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        // Shims of our namespace left behind by a task that could not be deleted.
        let shims = Command::new("pgrep")
            .args([
                "-f",
                &format!("containerd-shim-runc-v2 -namespace {} ", self.ns),
            ])
            .output();
        if let Ok(o) = shims {
            for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                if let Ok(pid) = pid.parse::<libc::pid_t>() {
                    // SAFETY: kill(2) of a shim started for our private namespace.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        for m in self.mounts_below() {
            let _ = nix::mount::umount2(m.as_str(), nix::mount::MntFlags::MNT_DETACH);
        }
        remove_cgroups(&self.ns);
        if self.mounts_below().is_empty() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!(
                "containerd: mounts left below {}, not removed",
                self.dir.display()
            );
        }
    }
}

/// The containers' cgroups `<ns>/<id>`: at the cgroup v2 root and, on a hybrid host, in each
/// v1 hierarchy (runc makes them in every controller), deepest first. Only empty cgroups can
/// go; the tasks are gone by now.
fn remove_cgroups(ns: &str) {
    let base = Path::new("/sys/fs/cgroup");
    let mut parents = vec![base.join(ns)];
    for e in std::fs::read_dir(base).into_iter().flatten().flatten() {
        parents.push(e.path().join(ns));
    }
    for p in parents.into_iter().filter(|p| p.is_dir()) {
        for e in std::fs::read_dir(&p).into_iter().flatten().flatten() {
            if e.path().is_dir() {
                let _ = std::fs::remove_dir(e.path());
            }
        }
        let _ = std::fs::remove_dir(&p);
    }
}
