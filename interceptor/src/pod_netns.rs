//! A Kubernetes pod's network namespace, found from its processes by pod uid: what the daemon's
//! repair needs for a pod that no CNI ADD ever told it about.
//!
//! The kubelet names every container's cgroup after its pod's uid, whichever cgroup driver it
//! runs: cgroupfs `…/kubepods/burstable/pod<uid>/<container>`, systemd
//! `…/kubepods-burstable-pod<uid with '-' as '_'>.slice/cri-containerd-<id>.scope`. One pass
//! over `/proc/*/cgroup` finds the processes of every pod asked for; their `ns/net` is the pod's
//! netns. The pause (sandbox) process and the app's processes all share it, so any of them will
//! do, but not blindly: every process found must agree on the netns (else the pod is refused:
//! something else lives in its cgroup), and the host's netns (PID 1's, or this process's) is
//! refused — a host-network pod has no netns of its own to intercept, and registering the
//! node's netns would capture the node's traffic.
//!
//! Reads only files, under a root that is `/proc` in the daemon and a temporary tree in the
//! tests.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A namespace's identity: the nsfs device and inode of its `ns/net` file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NsId {
    pub dev: u64,
    pub ino: u64,
}

impl NsId {
    /// The identity of the namespace `path` names (`/proc/PID/ns/net`, a bind mount under
    /// `/run/netns`); None when it cannot be read (a process that exited).
    pub fn of(path: &Path) -> Option<Self> {
        let m = std::fs::metadata(path).ok()?;
        Some(Self {
            dev: m.dev(),
            ino: m.ino(),
        })
    }
}

/// A pod's netns as its processes show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodNetns {
    /// `<proc>/<pid>/ns/net` of the pod's oldest process.
    pub path: PathBuf,
    pub pid: u32,
    pub ns: NsId,
    /// How many of the pod's processes were found (all in this netns).
    pub processes: usize,
    /// How long the pod's oldest process has been running (None if its start is unreadable).
    pub age: Option<Duration>,
}

/// Why no netns is given for a pod whose processes were found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// A process of the pod is in the host's network namespace.
    HostNetns { pid: u32 },
    /// Processes of the pod are in different network namespaces.
    Disagree { pids: (u32, u32) },
    /// The host's own netns cannot be read, so a host-network process could not be told apart.
    HostUnknown,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::HostNetns { pid } => write!(
                f,
                "its process {pid} is in the host's network namespace (a host-network pod)"
            ),
            Refusal::Disagree { pids: (a, b) } => write!(
                f,
                "its processes {a} and {b} are in different network namespaces"
            ),
            Refusal::HostUnknown => write!(
                f,
                "the host's network namespace cannot be read (is /proc the host's?)"
            ),
        }
    }
}

/// A `/proc` tree: the real one, or a test's.
#[derive(Debug, Clone)]
pub struct ProcFs {
    root: PathBuf,
}

impl Default for ProcFs {
    fn default() -> Self {
        Self::at("/proc")
    }
}

impl ProcFs {
    pub fn at(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The host's network namespaces as this tree shows them: PID 1's and this process's
    /// (`self`). The daemon runs with the host's PID and network namespaces, so both are the
    /// node's; either one matching means "host".
    fn host_netns(&self) -> Vec<NsId> {
        ["1", "self"]
            .iter()
            .filter_map(|p| NsId::of(&self.root.join(p).join("ns/net")))
            .collect()
    }

    /// Seconds since boot (`<proc>/uptime`).
    fn uptime(&self) -> Option<f64> {
        let text = std::fs::read_to_string(self.root.join("uptime")).ok()?;
        text.split_whitespace().next()?.parse().ok()
    }

    /// A process's start, in clock ticks since boot (`<proc>/<pid>/stat` field 22).
    fn start_ticks(&self, pid: u32) -> Option<u64> {
        let stat = std::fs::read_to_string(self.root.join(pid.to_string()).join("stat")).ok()?;
        // The command name (field 2) may hold spaces and parentheses: count after the last ')'.
        let rest = &stat[stat.rfind(')')? + 1..];
        rest.split_whitespace().nth(19)?.parse().ok()
    }

    /// The netns of each pod in `uids`, from one pass over `<proc>/*/cgroup`. A uid with no
    /// process (not started, or not on this node) is absent from the answer.
    pub fn find(&self, uids: &[&str]) -> BTreeMap<String, Result<PodNetns, Refusal>> {
        let matcher = Matcher::new(uids);
        let mut procs: BTreeMap<String, Vec<(u32, NsId)>> = BTreeMap::new();
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return BTreeMap::new();
        };
        for e in entries.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            // Processes come and go during the scan: one that is gone is simply not counted.
            let Ok(cgroup) = std::fs::read_to_string(e.path().join("cgroup")) else {
                continue;
            };
            let Some(uid) = matcher.pod_of(&cgroup) else {
                continue;
            };
            if let Some(ns) = NsId::of(&e.path().join("ns/net")) {
                procs.entry(uid.to_string()).or_default().push((pid, ns));
            }
        }
        let host = self.host_netns();
        let (uptime, hz) = (self.uptime(), clock_ticks());
        procs
            .into_iter()
            .map(|(uid, mut found)| {
                found.sort();
                let verdict = self.verdict(&found, &host, uptime, hz);
                (uid, verdict)
            })
            .collect()
    }

    fn verdict(
        &self,
        found: &[(u32, NsId)],
        host: &[NsId],
        uptime: Option<f64>,
        hz: f64,
    ) -> Result<PodNetns, Refusal> {
        if host.is_empty() {
            return Err(Refusal::HostUnknown);
        }
        if let Some((pid, _)) = found.iter().find(|(_, ns)| host.contains(ns)) {
            return Err(Refusal::HostNetns { pid: *pid });
        }
        let (first, ns) = found[0];
        if let Some((other, _)) = found.iter().find(|(_, n)| *n != ns) {
            return Err(Refusal::Disagree {
                pids: (first, *other),
            });
        }
        // The oldest process: the one whose start is earliest (ticks since boot).
        let oldest = found
            .iter()
            .filter_map(|(pid, _)| Some((self.start_ticks(*pid)?, *pid)))
            .min();
        let pid = oldest.map_or(first, |(_, pid)| pid);
        let age = match (oldest, uptime) {
            (Some((ticks, _)), Some(up)) => {
                Some(Duration::from_secs_f64((up - ticks as f64 / hz).max(0.0)))
            }
            _ => None,
        };
        Ok(PodNetns {
            path: self.root.join(pid.to_string()).join("ns/net"),
            pid,
            ns,
            processes: found.len(),
            age,
        })
    }
}

/// The kernel's clock ticks per second (`/proc/PID/stat` start times are in these).
pub fn clock_ticks() -> f64 {
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 {
        hz as f64
    } else {
        100.0
    }
}

/// Which pod uid a `/proc/PID/cgroup` file names, by the kubelet's cgroup names.
struct Matcher<'a> {
    /// `pod<uid>` (cgroupfs driver) → uid.
    cgroupfs: BTreeMap<String, &'a str>,
    /// `<uid with '_' for '-'>` (systemd driver: `…-pod<that>.slice`) → uid.
    systemd: BTreeMap<String, &'a str>,
}

impl<'a> Matcher<'a> {
    fn new(uids: &[&'a str]) -> Self {
        let uids = uids.iter().filter(|u| !u.is_empty());
        Self {
            cgroupfs: uids.clone().map(|u| (format!("pod{u}"), *u)).collect(),
            systemd: uids.map(|u| (u.replace('-', "_"), *u)).collect(),
        }
    }

    /// Every line is `hierarchy:controllers:path` (v1 hierarchies and the v2 `0::` line); a
    /// path component must be exactly the kubelet's name for the pod, so a uid that is a
    /// prefix of another never matches it.
    fn pod_of(&self, cgroup: &str) -> Option<&'a str> {
        cgroup
            .lines()
            .filter_map(|l| l.splitn(3, ':').nth(2))
            .flat_map(|path| path.split('/'))
            .find_map(|c| self.component(c))
    }

    fn component(&self, c: &str) -> Option<&'a str> {
        if let Some(found) = self.cgroupfs.get(c) {
            return Some(found);
        }
        let slice = c.strip_suffix(".slice")?;
        let at = slice.rfind("-pod")?;
        self.systemd.get(&slice[at + 4..]).copied()
    }
}

/// A name for the netns `ns` that outlives the process it was found by: the runtime's pin
/// (containerd's `/var/run/netns/cni-…`, CRI-O's `/var/run/netns/<uuid>`) in one of `dirs`, the
/// same path a CNI DEL names. None if no pin there is that netns.
pub fn pinned(dirs: &[PathBuf], ns: NsId) -> Option<PathBuf> {
    dirs.iter()
        .filter_map(|d| std::fs::read_dir(d).ok())
        .flat_map(|entries| entries.flatten())
        .map(|e| e.path())
        .find(|p| NsId::of(p) == Some(ns))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    const A: &str = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0";
    const B: &str = "11111111-2222-3333-4444-555555555555";

    /// A fake `/proc`: processes with a cgroup file, `ns/net` links to one of the tree's fake
    /// namespace files (one file = one namespace) and a stat line; the host's namespace is
    /// PID 1's.
    struct Tree {
        dir: PathBuf,
    }

    impl Tree {
        fn new(tag: &str) -> Self {
            let dir = std::env::temp_dir().join(format!("ic-procfs-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(dir.join("namespaces")).unwrap();
            std::fs::write(dir.join("uptime"), "1000.00 3000.00\n").unwrap();
            let t = Self { dir };
            t.process(1, "0::/init.scope\n", "host", 1);
            t
        }

        fn netns(&self, name: &str) -> PathBuf {
            let p = self.dir.join("namespaces").join(name);
            if !p.exists() {
                std::fs::write(&p, name).unwrap();
            }
            p
        }

        /// Process `pid` in cgroup file `cgroup`, netns `ns`, started `start_s` s after boot.
        fn process(&self, pid: u32, cgroup: &str, ns: &str, start_s: u64) {
            let d = self.dir.join(pid.to_string());
            std::fs::create_dir_all(d.join("ns")).unwrap();
            std::fs::write(d.join("cgroup"), cgroup).unwrap();
            symlink(self.netns(ns), d.join("ns/net")).unwrap();
            let ticks = start_s * clock_ticks() as u64;
            // Fields 3 to 21, then the start time (22); the name holds spaces and parentheses.
            let stat = format!(
                "{pid} (my (odd) name) S {} {ticks} 0 0\n",
                vec!["0"; 18].join(" ")
            );
            std::fs::write(d.join("stat"), stat).unwrap();
        }

        fn find(&self, uids: &[&str]) -> BTreeMap<String, Result<PodNetns, Refusal>> {
            ProcFs::at(&self.dir).find(uids)
        }

        fn ns_id(&self, ns: &str) -> NsId {
            NsId::of(&self.netns(ns)).unwrap()
        }
    }

    impl Drop for Tree {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn cgroupfs(uid: &str, ctr: &str) -> String {
        format!(
            "12:memory:/kubepods/burstable/pod{uid}/{ctr}\n0::/kubepods/burstable/pod{uid}/{ctr}\n"
        )
    }

    fn systemd(uid: &str, ctr: &str) -> String {
        let u = uid.replace('-', "_");
        format!(
            "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{u}.slice/cri-containerd-{ctr}.scope\n"
        )
    }

    #[test]
    fn finds_pods_by_either_driver_and_takes_the_oldest_process() {
        let t = Tree::new("drivers");
        // Pod A (cgroupfs): pause started at 100 s, the app at 200 s; pod B (systemd).
        t.process(40, &cgroupfs(A, "app"), "pod-a", 200);
        t.process(30, &cgroupfs(A, "pause"), "pod-a", 100);
        t.process(50, &systemd(B, "abc"), "pod-b", 900);
        t.process(60, "0::/system.slice/sshd.service\n", "host", 5);
        let found = t.find(&[A, B, "not-here"]);
        assert_eq!(found.len(), 2, "{found:?}");
        let a = found[A].as_ref().unwrap();
        assert_eq!((a.pid, a.processes), (30, 2));
        assert_eq!(a.ns, t.ns_id("pod-a"));
        assert_eq!(a.path, t.dir.join("30/ns/net"));
        assert_eq!(a.age.map(|d| d.as_secs()), Some(900));
        let b = found[B].as_ref().unwrap();
        assert_eq!((b.pid, b.ns), (50, t.ns_id("pod-b")));
        assert_eq!(b.age.map(|d| d.as_secs()), Some(100));
    }

    #[test]
    fn names_must_match_whole() {
        let t = Tree::new("whole");
        // A uid that only starts like A, and A's uid outside a pod component.
        let longer = format!("{A}0");
        t.process(41, &cgroupfs(&longer, "app"), "pod-x", 10);
        t.process(42, &format!("0::/other/{A}/pod\n"), "pod-y", 10);
        t.process(43, &systemd(&longer, "def"), "pod-z", 10);
        assert!(t.find(&[A]).is_empty());
        assert_eq!(t.find(&[&longer]).len(), 1);
    }

    #[test]
    fn refuses_the_hosts_netns_and_disagreeing_processes() {
        let t = Tree::new("refuse");
        // A: one process in the host's netns beside one in a pod netns.
        t.process(70, &cgroupfs(A, "pause"), "pod-a", 10);
        t.process(71, &cgroupfs(A, "app"), "host", 20);
        // B: two processes in two different netns.
        t.process(80, &systemd(B, "one"), "pod-b", 10);
        t.process(81, &systemd(B, "two"), "pod-c", 20);
        let found = t.find(&[A, B]);
        assert_eq!(found[A], Err(Refusal::HostNetns { pid: 71 }));
        assert_eq!(found[B], Err(Refusal::Disagree { pids: (80, 81) }));
        assert!(found[A].as_ref().unwrap_err().to_string().contains("host"));
    }

    #[test]
    fn without_the_hosts_netns_nothing_is_given() {
        let t = Tree::new("nohost");
        std::fs::remove_dir_all(t.dir.join("1")).unwrap();
        t.process(90, &cgroupfs(A, "app"), "pod-a", 10);
        assert_eq!(t.find(&[A])[A], Err(Refusal::HostUnknown));
    }

    #[test]
    fn exited_processes_and_unreadable_starts_are_skipped() {
        let t = Tree::new("gone");
        t.process(95, &cgroupfs(A, "app"), "pod-a", 10);
        // 96 exited between readdir and reading its files: a cgroup file, no ns.
        std::fs::create_dir_all(t.dir.join("96")).unwrap();
        std::fs::write(t.dir.join("96/cgroup"), cgroupfs(A, "x")).unwrap();
        std::fs::remove_file(t.dir.join("95/stat")).unwrap();
        let a = t.find(&[A])[A].clone().unwrap();
        assert_eq!((a.pid, a.processes, a.age), (95, 1, None));
    }

    #[test]
    fn a_pin_is_found_by_identity() {
        let t = Tree::new("pins");
        let pins = t.dir.join("run-netns");
        std::fs::create_dir_all(&pins).unwrap();
        symlink(t.netns("pod-a"), pins.join("cni-1234")).unwrap();
        symlink(t.netns("pod-b"), pins.join("cni-5678")).unwrap();
        let dirs = [t.dir.join("nonexistent"), pins.clone()];
        assert_eq!(pinned(&dirs, t.ns_id("pod-b")), Some(pins.join("cni-5678")));
        assert_eq!(pinned(&dirs, t.ns_id("host")), None);
    }

    #[test]
    fn the_real_proc_reads() {
        // The real tree has what the finder reads: the host's netns, uptime, a start time.
        let p = ProcFs::default();
        assert!(!p.host_netns().is_empty());
        assert!(p.uptime().is_some_and(|u| u > 0.0));
        assert!(p.start_ticks(std::process::id()).is_some());
    }
}
