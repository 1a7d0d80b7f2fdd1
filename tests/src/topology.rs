//! Network topology fixtures of the e2e tests: a **pod** and an **upstream** network namespace
//! joined by a veth pair, helpers to run code inside a namespace, and a client that connects
//! *as a given uid/gid* (and optionally from a given cgroup v2) so that owner matches
//! (`-m owner --uid-owner`, `bpf_get_current_uid_gid`) see the credentials the test chose.
//!
//! Network safety: neither namespace has a link to the host namespace (the veth pair is created
//! directly inside the pod namespace with its peer inside the upstream one), the pod's only
//! default route points at the upstream peer, and every helper refuses to act on the test
//! process's own (host) namespace. Commands (iptables, nft, …) only ever run through
//! `ip netns exec <one of our namespaces>`.
//!
//! ```no_run
//! use std::{net::SocketAddr, time::Duration};
//! use interceptor_tests::{sidecar::TagServer, topology::{connect_as, Topology}};
//!
//! let topo = Topology::new("doc").unwrap();
//! let upstream = TagServer::upstream(&topo, 8080).unwrap();
//! let dst = SocketAddr::new(topo.upstream_v4().into(), 8080);
//! let out = connect_as(topo.pod_netns(), 1000, 1000, dst, None, Duration::from_secs(2)).unwrap();
//! assert_eq!(out.reply, "upstream:8080");
//! assert_eq!(upstream.records().len(), 1);
//! ```

use std::{
    fmt,
    fs::File,
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    os::{
        fd::{AsRawFd, OwnedFd, RawFd},
        unix::fs::MetadataExt,
    },
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicU32, Ordering},
        Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, ensure, Context, Result};

/// Where `ip netns add` mounts named namespaces.
pub const NETNS_DIR: &str = "/var/run/netns";
/// Name prefix of every namespace this harness creates (see [`reap_stale`]).
pub const NAME_PREFIX: &str = "ic-";
/// Interface name of the pod side of the veth pair (namespace-local, like a real pod's).
pub const POD_IF: &str = "eth0";
/// Interface name of the upstream side of the veth pair (namespace-local).
pub const UPSTREAM_IF: &str = "vpod";
/// Default timeout of the convenience connect helpers.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);

static COUNTER: AtomicU32 = AtomicU32::new(0);
// `ip netns add` bind-mounts /var/run/netns onto itself the first time; serialising our own
// calls avoids stacking two such mounts when parallel tests start together.
static NETNS_ADD_LOCK: Mutex<()> = Mutex::new(());

/// Which namespace of a [`Topology`] a command or connection runs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ns {
    /// The pod namespace (where interception is installed, the sidecar and the app run).
    Pod,
    /// The upstream namespace (remote servers; inbound clients).
    Upstream,
}

/// A pod and an upstream network namespace joined by a veth pair; removed on drop.
///
/// Addressing (`X` = [`Topology::index`]; addresses are namespace-local, so `X` only helps
/// reading logs, it need not be globally unique):
///
/// | what                           | IPv4           | IPv6              |
/// |--------------------------------|----------------|-------------------|
/// | pod (`eth0`)                   | 10.200.X.1/24  | fd00:200:X::1/64  |
/// | upstream (`vpod`)              | 10.200.X.2/24  | fd00:200:X::2/64  |
/// | "excluded" upstream (`vpod`)   | 10.201.X.2/24  | fd00:201:X::2/64  |
///
/// The pod's default routes (v4 and v6) point at the upstream peer, so both upstream
/// addresses are reachable from the pod while their CIDRs differ (exclude vs include tests).
#[derive(Debug)]
pub struct Topology {
    prefix: String,
    pod_ns: String,
    up_ns: String,
    pod_path: PathBuf,
    up_path: PathBuf,
    index: u8,
    /// The pod netns is owned by a new user namespace ([`crate::userns`]).
    pod_userns: bool,
}

impl Topology {
    /// Creates the two namespaces, the veth pair, addresses and routes. `tag` is a short test
    /// tag (ASCII letters, digits, `_`); names become `ic-<tag>-<pid>-<n>-pod` / `…-up`.
    /// A failure half-way removes whatever was already created.
    pub fn new(tag: &str) -> Result<Self> {
        Self::build(tag, false)
    }

    /// [`Topology::new`] with a pod netns owned by a new user namespace mapping ids
    /// 0..65536 to host 100000.. (a Kubernetes `hostUsers: false` pod; see [`crate::userns`]).
    pub fn with_userns_pod(tag: &str) -> Result<Self> {
        Self::build(tag, true)
    }

    fn build(tag: &str, pod_userns: bool) -> Result<Self> {
        ensure!(
            !tag.is_empty()
                && tag.len() <= 24
                && tag.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'),
            "topology tag {tag:?} must be 1..=24 chars of [A-Za-z0-9_]"
        );
        reap_stale();
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let prefix = format!("{NAME_PREFIX}{tag}-{pid}-{n}");
        let pod_ns = format!("{prefix}-pod");
        let up_ns = format!("{prefix}-up");
        let topo = Topology {
            pod_path: Path::new(NETNS_DIR).join(&pod_ns),
            up_path: Path::new(NETNS_DIR).join(&up_ns),
            pod_ns,
            up_ns,
            // 1..=250: mixes the pid in so parallel processes' logs differ.
            index: ((pid.wrapping_mul(31).wrapping_add(n)) % 250 + 1) as u8,
            prefix,
            pod_userns,
        };
        // `topo` owns cleanup from here on: an early return drops it, deleting both namespaces.
        topo.setup()
            .with_context(|| format!("creating topology {}", topo.prefix))?;
        Ok(topo)
    }

    fn setup(&self) -> Result<()> {
        {
            let _guard = NETNS_ADD_LOCK.lock().unwrap_or_else(|e| e.into_inner());
            if self.pod_userns {
                crate::userns::add_netns(&self.pod_ns)?;
            } else {
                ip(&["netns", "add", &self.pod_ns])?;
            }
            ip(&["netns", "add", &self.up_ns])?;
        }
        let (pod, up) = (self.pod_ns.as_str(), self.up_ns.as_str());
        // Created inside the pod namespace with the peer directly in the upstream one: the
        // pair never exists in the host namespace, not even for a moment.
        #[rustfmt::skip]
        ip(&["-n", pod, "link", "add", POD_IF, "type", "veth", "peer", "name", UPSTREAM_IF, "netns", up])?;
        for (ns, dev) in [(pod, "lo"), (up, "lo"), (pod, POD_IF), (up, UPSTREAM_IF)] {
            ip(&["-n", ns, "link", "set", dev, "up"])?;
        }
        let x = self.index;
        // `nodad`: usable at once instead of after duplicate address detection (~1-2 s).
        let addrs = [
            (pod, POD_IF, format!("10.200.{x}.1/24")),
            (pod, POD_IF, format!("fd00:200:{x:x}::1/64")),
            (up, UPSTREAM_IF, format!("10.200.{x}.2/24")),
            (up, UPSTREAM_IF, format!("fd00:200:{x:x}::2/64")),
            (up, UPSTREAM_IF, format!("10.201.{x}.2/24")),
            (up, UPSTREAM_IF, format!("fd00:201:{x:x}::2/64")),
        ];
        for (ns, dev, cidr) in &addrs {
            let mut args = vec!["-n", ns, "addr", "add", cidr, "dev", dev];
            if cidr.contains(':') {
                args.push("nodad");
            }
            ip(&args)?;
        }
        let (gw4, gw6) = (
            self.upstream_v4().to_string(),
            self.upstream_v6().to_string(),
        );
        #[rustfmt::skip]
        ip(&["-n", pod, "-4", "route", "add", "default", "via", &gw4, "dev", POD_IF])?;
        #[rustfmt::skip]
        ip(&["-n", pod, "-6", "route", "add", "default", "via", &gw6, "dev", POD_IF])?;
        Ok(())
    }

    /// The unique name prefix of this topology (`ic-<tag>-<pid>-<n>`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }
    /// The per-topology address byte `X` (see the table on [`Topology`]).
    pub fn index(&self) -> u8 {
        self.index
    }
    /// Name of the pod namespace (for `ip netns exec`).
    pub fn pod_ns_name(&self) -> &str {
        &self.pod_ns
    }
    /// Name of the upstream namespace.
    pub fn upstream_ns_name(&self) -> &str {
        &self.up_ns
    }
    /// `/var/run/netns/<pod namespace>`.
    pub fn pod_netns(&self) -> &Path {
        &self.pod_path
    }
    /// `/var/run/netns/<upstream namespace>`.
    pub fn upstream_netns(&self) -> &Path {
        &self.up_path
    }
    /// The namespace path of `ns`.
    pub fn netns(&self, ns: Ns) -> &Path {
        match ns {
            Ns::Pod => &self.pod_path,
            Ns::Upstream => &self.up_path,
        }
    }
    /// The pod's IPv4 address, 10.200.X.1.
    pub fn pod_v4(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 200, self.index, 1)
    }
    /// The pod's IPv6 address, fd00:200:X::1.
    pub fn pod_v6(&self) -> Ipv6Addr {
        Ipv6Addr::new(0xfd00, 0x200, self.index.into(), 0, 0, 0, 0, 1)
    }
    /// The upstream's IPv4 address (and the pod's v4 gateway), 10.200.X.2.
    pub fn upstream_v4(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 200, self.index, 2)
    }
    /// The upstream's IPv6 address (and the pod's v6 gateway), fd00:200:X::2.
    pub fn upstream_v6(&self) -> Ipv6Addr {
        Ipv6Addr::new(0xfd00, 0x200, self.index.into(), 0, 0, 0, 0, 2)
    }
    /// A second upstream IPv4 address in another CIDR (10.201.X.0/24), for exclude tests.
    pub fn excluded_v4(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 201, self.index, 2)
    }
    /// A second upstream IPv6 address in another CIDR (fd00:201:X::/64), for exclude tests.
    pub fn excluded_v6(&self) -> Ipv6Addr {
        Ipv6Addr::new(0xfd00, 0x201, self.index.into(), 0, 0, 0, 0, 2)
    }
    /// CIDR of [`Topology::excluded_v4`], e.g. for `--outbound-ip-ranges-exclude`.
    pub fn excluded_v4_cidr(&self) -> String {
        format!("10.201.{}.0/24", self.index)
    }
    /// CIDR of [`Topology::excluded_v6`].
    pub fn excluded_v6_cidr(&self) -> String {
        format!("fd00:201:{:x}::/64", self.index)
    }
    /// CIDR of the pod/upstream link (v4), which holds [`Topology::upstream_v4`].
    pub fn link_v4_cidr(&self) -> String {
        format!("10.200.{}.0/24", self.index)
    }
    /// CIDR of the pod/upstream link (v6), which holds [`Topology::upstream_v6`].
    pub fn link_v6_cidr(&self) -> String {
        format!("fd00:200:{:x}::/64", self.index)
    }

    /// Runs `program args…` via `ip netns exec <ns>`, feeding `stdin` if given; returns its
    /// stdout, or an error carrying its stderr when it fails. Use this (never a bare command)
    /// for iptables/nft so nothing touches the host namespace.
    pub fn exec_in(
        &self,
        ns: Ns,
        program: &str,
        args: &[&str],
        stdin: Option<&str>,
    ) -> Result<String> {
        let path = self.netns(ns);
        // `ip netns exec` would fail anyway on a missing name; checking first gives a clearer
        // error and guarantees we never fall back to anything but our namespace.
        ensure!(path.exists(), "{} does not exist", path.display());
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        let mut full = vec!["netns", "exec", name, program];
        full.extend_from_slice(args);
        run_cmd("ip", &full, stdin)
    }

    /// [`Topology::exec_in`] in the pod namespace.
    pub fn pod_exec(&self, program: &str, args: &[&str], stdin: Option<&str>) -> Result<String> {
        self.exec_in(Ns::Pod, program, args, stdin)
    }

    /// Connects from the pod as `uid`/`gid` to `dst` (timeout [`DEFAULT_TIMEOUT`]).
    pub fn connect_from_pod(&self, uid: u32, gid: u32, dst: SocketAddr) -> Result<Outcome> {
        connect_as(self.pod_netns(), uid, gid, dst, None, DEFAULT_TIMEOUT)
    }

    /// Inbound: connects from the upstream namespace (as root) to `dst`, normally the pod's
    /// address and an app port, optionally from `bind_src` (e.g. [`Topology::excluded_v4`]).
    pub fn inbound_connect(&self, dst: SocketAddr, bind_src: Option<IpAddr>) -> Result<Outcome> {
        inbound_connect(self, dst, bind_src)
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        // Also runs while unwinding from a failed assertion. Deleting a namespace also
        // destroys the veth end in it (and so the pair).
        for (name, path) in [(&self.pod_ns, &self.pod_path), (&self.up_ns, &self.up_path)] {
            if path.exists() {
                if let Err(e) = ip(&["netns", "del", name]) {
                    eprintln!("topology cleanup: {e:#}");
                }
            }
        }
    }
}

/// Inbound helper: connects from `topo`'s upstream namespace (as root) to `dst` (normally
/// `pod ip:app port`), optionally bound to `bind_src`, with [`DEFAULT_TIMEOUT`].
pub fn inbound_connect(
    topo: &Topology,
    dst: SocketAddr,
    bind_src: Option<IpAddr>,
) -> Result<Outcome> {
    connect_as(topo.upstream_netns(), 0, 0, dst, bind_src, DEFAULT_TIMEOUT)
}

/// Removes what test processes that died without running their destructors (SIGKILL, Ctrl-C)
/// left behind: namespaces named exactly `ic-<tag>-<pid>-<n>-(pod|up)` and (empty) cgroups
/// named `ic-<tag>-<pid>-<n>` under the cgroup2 mount, whose `<pid>` no longer exists.
/// Best effort; called by [`Topology::new`].
pub fn reap_stale() {
    let dead = |pid: u32| pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists();
    for name in dir_names(Path::new(NETNS_DIR)) {
        let owner = name
            .strip_suffix("-pod")
            .or_else(|| name.strip_suffix("-up"))
            .and_then(stale_owner);
        if owner.is_some_and(dead) {
            let _ = ip(&["netns", "del", &name]);
        }
    }
    if let Some(mount) = cgroup2_mount() {
        for name in dir_names(&mount) {
            if stale_owner(&name).is_some_and(dead) {
                // rmdir only succeeds on an empty cgroup, which is what a dead test leaves.
                let _ = std::fs::remove_dir(mount.join(&name));
            }
        }
    }
}

fn dir_names(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .collect()
}

/// The owning pid of a harness name prefix `ic-<tag>-<pid>-<n>`, or None if `name` is not of
/// that form.
fn stale_owner(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(NAME_PREFIX)?;
    let mut parts = rest.rsplitn(3, '-');
    let n = parts.next()?;
    let pid = parts.next()?;
    let tag = parts.next()?;
    let ok = !n.is_empty()
        && n.bytes().all(|b| b.is_ascii_digit())
        && !tag.is_empty()
        && tag.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    ok.then(|| pid.parse().ok()).flatten()
}

fn ip(args: &[&str]) -> Result<String> {
    run_cmd("ip", args, None)
}

fn run_cmd(program: &str, args: &[&str], stdin: Option<&str>) -> Result<String> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {program}"))?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes())
            .with_context(|| format!("writing stdin of {program} {}", args.join(" ")))?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

// ---------------------------------------------------------------------------------------------
// Running code inside a namespace.

/// Fails if `netns` is the namespace of the test process itself (the host one): fixtures must
/// never act there.
fn ensure_not_host(netns: &Path) -> Result<()> {
    let target = std::fs::metadata(netns).with_context(|| format!("stat {}", netns.display()))?;
    let own = std::fs::metadata("/proc/self/ns/net").context("stat /proc/self/ns/net")?;
    ensure!(
        (target.dev(), target.ino()) != (own.dev(), own.ino()),
        "{} is the test process's own network namespace; refusing",
        netns.display()
    );
    Ok(())
}

/// Moves the *calling thread* into the network namespace at `netns`. Network namespaces are
/// per thread, so this only ever runs in a dedicated thread; never on the main thread.
pub fn enter_netns(netns: &Path) -> Result<()> {
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() };
    ensure!(
        tid as u32 != std::process::id(),
        "refusing to setns the main thread"
    );
    ensure_not_host(netns)?;
    let f = File::open(netns).with_context(|| format!("opening {}", netns.display()))?;
    nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET)
        .with_context(|| format!("setns {}", netns.display()))?;
    Ok(())
}

/// Changes the credentials of the *calling thread only* (supplementary groups cleared, then
/// gid, then uid) with raw syscalls: glibc's `setuid`/`setgid` would broadcast the change to
/// every thread of the test process. Irreversible for the thread (it loses its capabilities),
/// so only call it in a dedicated thread.
pub fn set_thread_creds(uid: u32, gid: u32) -> Result<()> {
    // SAFETY: plain syscalls on integers / a null list.
    unsafe {
        if libc::syscall(libc::SYS_setgroups, 0usize, std::ptr::null::<libc::gid_t>()) != 0 {
            return Err(std::io::Error::last_os_error()).context("setgroups([])");
        }
        if libc::syscall(libc::SYS_setresgid, gid, gid, gid) != 0 {
            return Err(std::io::Error::last_os_error()).context("setresgid");
        }
        if libc::syscall(libc::SYS_setresuid, uid, uid, uid) != 0 {
            return Err(std::io::Error::last_os_error()).context("setresuid");
        }
    }
    Ok(())
}

/// Runs `f` in a fresh thread that first `setns`es into the network namespace at `netns`
/// (e.g. [`Topology::pod_netns`]) and returns its result; a panic in `f` is re-raised here.
/// Sockets created inside `f` belong to that namespace and stay usable from any thread.
pub fn run_in_netns<T, F>(netns: &Path, f: F) -> Result<T>
where
    F: FnOnce() -> T + Send,
    T: Send,
{
    ensure_not_host(netns)?;
    std::thread::scope(|s| {
        let handle = std::thread::Builder::new()
            .name("netns".into())
            .spawn_scoped(s, || -> Result<T> {
                enter_netns(netns)?;
                Ok(f())
            })
            .context("spawning netns thread")?;
        match handle.join() {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

// ---------------------------------------------------------------------------------------------
// cgroup v2.

/// The cgroup v2 mount point read from `/proc/mounts` (first `cgroup2` entry; on hybrid hosts
/// e.g. `/sys/fs/cgroup/unified`), or None.
pub fn cgroup2_mount() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
    mounts.lines().find_map(|line| {
        let mut f = line.split_whitespace();
        let (_src, dir, fstype) = (f.next()?, f.next()?, f.next()?);
        // /proc/mounts escapes spaces etc. as octal; our mount points have none.
        (fstype == "cgroup2").then(|| PathBuf::from(dir))
    })
}

/// A cgroup v2 directory `<mount>/<topology prefix or name>` created for a test (e.g. to attach
/// a `cgroup/connect4` program to); removed on drop (it must be empty by then, which it is once
/// the [`connect_with`] children that joined it have been reaped).
#[derive(Debug)]
pub struct TestCgroup {
    path: PathBuf,
}

impl TestCgroup {
    /// Creates `<cgroup2 mount>/<name>`; `name` should be unique, e.g. [`Topology::prefix`].
    pub fn new(name: &str) -> Result<Self> {
        ensure!(
            !name.is_empty() && !name.contains('/') && !name.starts_with('.'),
            "bad cgroup name {name:?}"
        );
        let mount = cgroup2_mount().ok_or_else(|| anyhow!("no cgroup2 mount in /proc/mounts"))?;
        let path = mount.join(name);
        std::fs::create_dir(&path).with_context(|| format!("mkdir {}", path.display()))?;
        Ok(TestCgroup { path })
    }

    /// The cgroup's directory (open it for `BPF_PROG_ATTACH`).
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // A just-reaped child can take a moment to leave the cgroup (EBUSY): retry briefly.
        for _ in 0..50 {
            match std::fs::remove_dir(&self.path) {
                Ok(()) => return,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(e) => {
                    eprintln!("cgroup cleanup {}: {e}", self.path.display());
                    return;
                }
            }
        }
        eprintln!("cgroup cleanup {}: still busy", self.path.display());
    }
}

// ---------------------------------------------------------------------------------------------
// The client.

/// What a successful client connection saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The first reply line without its newline, naming the server that answered
    /// (`"upstream:8080"`, `"sidecar:15001"`, `"app:9080"`); empty if the peer closed silently.
    pub reply: String,
    /// `getpeername()` of the client socket: what the application believes it is connected
    /// to (stays the original destination under transparent redirection).
    pub peer: SocketAddr,
    /// `getsockname()` of the client socket.
    pub local: SocketAddr,
}

/// The step of a client connection that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Joining the requested cgroup.
    Cgroup,
    /// Entering the network namespace.
    Setns,
    /// Dropping to the requested uid/gid.
    Credentials,
    /// Creating the socket.
    Socket,
    /// Binding the requested source address.
    Bind,
    /// Connecting (including the connect timeout).
    Connect,
    /// Reading the reply (including the read timeout).
    Read,
}

/// A client connection failure with its errno (`ETIMEDOUT` for our own timeouts). Returned
/// inside the `anyhow::Error` of [`connect_as`]; get it with `err.downcast_ref::<ConnectError>()`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectError {
    /// Where it failed.
    pub stage: Stage,
    /// The errno.
    pub errno: i32,
}

impl ConnectError {
    /// Connect got `ECONNREFUSED` (nothing listening / RST).
    pub fn is_refused(&self) -> bool {
        self.stage == Stage::Connect && self.errno == libc::ECONNREFUSED
    }
    /// Connect or read timed out.
    pub fn is_timeout(&self) -> bool {
        self.errno == libc::ETIMEDOUT
    }
}

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let err = std::io::Error::from_raw_os_error(self.errno);
        write!(f, "client failed at {:?}: {err}", self.stage)
    }
}

impl std::error::Error for ConnectError {}

/// Options of [`connect_with`].
#[derive(Debug, Clone)]
pub struct ConnectOpts {
    /// uid of the connecting process (and so of its socket).
    pub uid: u32,
    /// gid of the connecting process; supplementary groups are cleared.
    pub gid: u32,
    /// Source address to bind (port 0) before connecting.
    pub bind_src: Option<IpAddr>,
    /// Timeout of the connect and, separately, of reading the reply line.
    pub timeout: Duration,
    /// A cgroup v2 directory the connecting process joins first (cgroup-attached BPF programs
    /// only see sockets created by processes inside their cgroup).
    pub cgroup: Option<PathBuf>,
}

impl Default for ConnectOpts {
    fn default() -> Self {
        ConnectOpts {
            uid: 0,
            gid: 0,
            bind_src: None,
            timeout: DEFAULT_TIMEOUT,
            cgroup: None,
        }
    }
}

/// Who answered a connection from `netns` as `uid` (its reply), or the error as text: for
/// assertions that compare answers.
pub fn reply_of(netns: &Path, uid: u32, dst: SocketAddr, timeout: Duration) -> String {
    match connect_as(netns, uid, uid, dst, None, timeout) {
        Ok(o) => o.reply,
        Err(e) => format!("error: {e:#}"),
    }
}

/// Connects from the namespace at `netns` to `dst` as `uid`/`gid`, optionally from
/// `bind_src`, and reads one reply line. See [`connect_with`].
pub fn connect_as(
    netns: &Path,
    uid: u32,
    gid: u32,
    dst: SocketAddr,
    bind_src: Option<IpAddr>,
    timeout: Duration,
) -> Result<Outcome> {
    let opts = ConnectOpts {
        uid,
        gid,
        bind_src,
        timeout,
        cgroup: None,
    };
    connect_with(netns, dst, &opts)
}

const REPLY_MAX: usize = 256;

/// What the child writes back over the pipe: plain old data, so it crosses as raw bytes.
#[repr(C)]
#[derive(Clone, Copy)]
struct Report {
    /// 0 = success, else `Stage as u32 + 1`.
    stage: u32,
    errno: i32,
    local: libc::sockaddr_storage,
    local_len: libc::socklen_t,
    peer: libc::sockaddr_storage,
    peer_len: libc::socklen_t,
    reply_len: u32,
    reply: [u8; REPLY_MAX],
}

/// Everything the child needs, prepared before `fork` so the child never allocates.
struct Plan {
    netns_fd: RawFd,
    cgroup_fd: RawFd, // -1 = none
    pipe_wr: RawFd,
    uid: u32,
    gid: u32,
    dst: (libc::sockaddr_storage, libc::socklen_t),
    src: Option<(libc::sockaddr_storage, libc::socklen_t)>,
    family: libc::c_int,
    timeout: Duration,
}

const STAGES: [Stage; 7] = [
    Stage::Cgroup,
    Stage::Setns,
    Stage::Credentials,
    Stage::Socket,
    Stage::Bind,
    Stage::Connect,
    Stage::Read,
];

/// Connects from the namespace at `netns` to `dst` with `opts` and reads one reply line.
///
/// Why a forked child rather than a thread: the connecting task must carry the test's uid/gid
/// (what `-m owner` and `bpf_get_current_uid_gid` check) *and*, for cgroup-attached BPF
/// programs, sit in a chosen cgroup, and cgroup v2 membership is per process: a thread cannot
/// join a cgroup without taking the whole test process (and its parallel tests) along. A
/// child also makes uid/gid changes trivially isolated. The child is forked from a
/// multi-threaded process, so it only makes raw libc calls on data prepared before `fork`
/// (no allocation, no locks): it joins the cgroup, `setns`es, drops credentials, connects
/// with a timeout, reads the reply and writes a fixed-size report back over a pipe.
pub fn connect_with(netns: &Path, dst: SocketAddr, opts: &ConnectOpts) -> Result<Outcome> {
    ensure_not_host(netns)?;
    if let Some(src) = opts.bind_src {
        ensure!(
            src.is_ipv4() == dst.is_ipv4(),
            "bind_src {src} and dst {dst} differ in family"
        );
    }
    let netns_file = File::open(netns).with_context(|| format!("opening {}", netns.display()))?;
    let cgroup_file = match &opts.cgroup {
        Some(dir) => {
            let procs = dir.join("cgroup.procs");
            Some(
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(&procs)
                    .with_context(|| format!("opening {}", procs.display()))?,
            )
        }
        None => None,
    };
    let (pipe_rd, pipe_wr) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).context("pipe2")?;
    let plan = Plan {
        netns_fd: netns_file.as_raw_fd(),
        cgroup_fd: cgroup_file.as_ref().map_or(-1, |f| f.as_raw_fd()),
        pipe_wr: pipe_wr.as_raw_fd(),
        uid: opts.uid,
        gid: opts.gid,
        dst: to_sockaddr(dst),
        src: opts.bind_src.map(|ip| to_sockaddr(SocketAddr::new(ip, 0))),
        family: if dst.is_ipv4() {
            libc::AF_INET
        } else {
            libc::AF_INET6
        },
        timeout: opts.timeout,
    };

    // SAFETY: the child only runs `child_main` (raw syscalls on pre-built data) and `_exit`s.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(std::io::Error::last_os_error()).context("fork");
    }
    if pid == 0 {
        // Should anything in the child panic, unwinding must never return into the test code
        // (that would run the rest of the test twice): this guard `_exit`s while unwinding.
        let _guard = ExitOnUnwind;
        let report = child_main(&plan);
        // SAFETY: `report` is a plain repr(C) value; writing its bytes to our pipe end.
        unsafe {
            let bytes = std::slice::from_raw_parts(
                (&report as *const Report).cast::<u8>(),
                std::mem::size_of::<Report>(),
            );
            write_all_raw(plan.pipe_wr, bytes);
            libc::_exit(0);
        }
    }
    drop(pipe_wr);
    // Generous: the child's own timeouts (connect + read) normally fire first.
    let deadline = Instant::now() + opts.timeout * 2 + Duration::from_secs(3);
    let read = read_report(pipe_rd, deadline);
    if read.is_err() {
        // SAFETY: `pid` is our own child, not yet reaped.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    let status = reap(pid);
    let report = read?;
    let report = report.ok_or_else(|| anyhow!("client child died without a report ({status})"))?;
    if report.stage != 0 {
        let stage = STAGES
            .get(report.stage as usize - 1)
            .copied()
            .unwrap_or(Stage::Read);
        return Err(ConnectError {
            stage,
            errno: report.errno,
        }
        .into());
    }
    let reply = &report.reply[..(report.reply_len as usize).min(REPLY_MAX)];
    let reply = String::from_utf8_lossy(reply);
    Ok(Outcome {
        reply: reply.trim_end_matches(['\n', '\r']).to_string(),
        peer: from_sockaddr(&report.peer, report.peer_len)
            .ok_or_else(|| anyhow!("bad getpeername address"))?,
        local: from_sockaddr(&report.local, report.local_len)
            .ok_or_else(|| anyhow!("bad getsockname address"))?,
    })
}

/// Ends the forked child if it unwinds (see [`connect_with`]).
struct ExitOnUnwind;

impl Drop for ExitOnUnwind {
    fn drop(&mut self) {
        // SAFETY: terminating the forked child without running any further user code.
        unsafe { libc::_exit(127) }
    }
}

/// Reads the child's report; Ok(None) if the pipe closed early, Err on timeout.
fn read_report(pipe_rd: OwnedFd, deadline: Instant) -> Result<Option<Report>> {
    let mut buf = vec![0u8; std::mem::size_of::<Report>()];
    let mut got = 0;
    let mut file = File::from(pipe_rd);
    while got < buf.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        ensure!(
            !left.is_zero() && poll_one(file.as_raw_fd(), libc::POLLIN, left) > 0,
            "client child timed out"
        );
        match file.read(&mut buf[got..]) {
            Ok(0) => return Ok(None),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e).context("reading client report"),
        }
    }
    // SAFETY: `buf` holds exactly one `Report` written by the child (all bit patterns valid).
    Ok(Some(unsafe {
        std::ptr::read_unaligned(buf.as_ptr().cast::<Report>())
    }))
}

fn reap(pid: libc::pid_t) -> String {
    let mut status = 0;
    loop {
        // SAFETY: waiting for our own child.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r >= 0 {
            return format!("wait status {status:#x}");
        }
        if std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return "waitpid failed".into();
        }
    }
}

/// Polls one fd; returns poll's result (>0 ready, 0 timeout, <0 error). Retries on EINTR.
fn poll_one(fd: RawFd, events: libc::c_short, timeout: Duration) -> libc::c_int {
    let ms = timeout.as_millis().clamp(1, i32::MAX as u128) as libc::c_int;
    let mut pfd = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    loop {
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut pfd, 1, ms) };
        if r < 0 && errno() == libc::EINTR {
            continue;
        }
        return r;
    }
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// Writes all of `bytes` to `fd` with raw `write` (async-signal-safe, for the child).
unsafe fn write_all_raw(fd: RawFd, mut bytes: &[u8]) {
    while !bytes.is_empty() {
        let n = libc::write(fd, bytes.as_ptr().cast(), bytes.len());
        if n < 0 && errno() == libc::EINTR {
            continue;
        }
        if n <= 0 {
            return;
        }
        bytes = &bytes[n as usize..];
    }
}

/// Closes every fd ≥ 3 except `keep` (the child must not hold other tests' sockets open).
/// Only raw syscalls, no allocation; ignores failures (pre-5.9 kernels lack close_range).
fn close_other_fds(keep: &[RawFd; 3]) {
    let mut keep = *keep;
    keep.sort_unstable();
    let mut lo: libc::c_uint = 3;
    for &k in &keep {
        if k < lo as RawFd {
            continue;
        }
        if k as libc::c_uint > lo {
            // SAFETY: closing fds we do not need in the child.
            unsafe { libc::syscall(libc::SYS_close_range, lo, k as libc::c_uint - 1, 0) };
        }
        lo = k as libc::c_uint + 1;
    }
    // SAFETY: as above.
    unsafe { libc::syscall(libc::SYS_close_range, lo, libc::c_uint::MAX, 0) };
}

/// The forked child's work. Only raw syscalls on `plan` and the stack: no allocation, no
/// locks, no panics (other threads of the parent may have held locks at fork time).
fn child_main(plan: &Plan) -> Report {
    // SAFETY: zero is a valid bit pattern for this repr(C) POD struct.
    let mut rep: Report = unsafe { std::mem::zeroed() };
    let fail = |rep: &mut Report, stage: Stage, err: i32| {
        rep.stage = stage as u32 + 1;
        rep.errno = err;
    };
    close_other_fds(&[plan.netns_fd, plan.cgroup_fd, plan.pipe_wr]);
    // SAFETY (whole block): raw syscalls on valid fds and pointers to locals / `plan`.
    unsafe {
        if plan.cgroup_fd >= 0 && libc::write(plan.cgroup_fd, b"0".as_ptr().cast(), 1) != 1 {
            // Writing "0" to cgroup.procs moves the writing process itself.
            fail(&mut rep, Stage::Cgroup, errno());
            return rep;
        }
        if libc::setns(plan.netns_fd, libc::CLONE_NEWNET) != 0 {
            fail(&mut rep, Stage::Setns, errno());
            return rep;
        }
        // Raw syscalls: the child is single-threaded, but this avoids glibc's setxid
        // machinery that walks the (inherited) thread list.
        if libc::syscall(libc::SYS_setgroups, 0usize, std::ptr::null::<libc::gid_t>()) != 0
            || libc::syscall(libc::SYS_setresgid, plan.gid, plan.gid, plan.gid) != 0
            || libc::syscall(libc::SYS_setresuid, plan.uid, plan.uid, plan.uid) != 0
        {
            fail(&mut rep, Stage::Credentials, errno());
            return rep;
        }
        let fd = libc::socket(
            plan.family,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        );
        if fd < 0 {
            fail(&mut rep, Stage::Socket, errno());
            return rep;
        }
        if let Some((src, len)) = &plan.src {
            if libc::bind(fd, (src as *const libc::sockaddr_storage).cast(), *len) != 0 {
                fail(&mut rep, Stage::Bind, errno());
                return rep;
            }
        }
        let (dst, dst_len) = &plan.dst;
        if libc::connect(fd, (dst as *const libc::sockaddr_storage).cast(), *dst_len) != 0 {
            let e = errno();
            if e != libc::EINPROGRESS {
                fail(&mut rep, Stage::Connect, e);
                return rep;
            }
            let r = poll_one(fd, libc::POLLOUT, plan.timeout);
            if r <= 0 {
                let e = if r == 0 { libc::ETIMEDOUT } else { errno() };
                fail(&mut rep, Stage::Connect, e);
                return rep;
            }
            let mut soerr: libc::c_int = 0;
            let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
            let r = libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_ERROR,
                (&mut soerr as *mut libc::c_int).cast(),
                &mut len,
            );
            if r != 0 || soerr != 0 {
                fail(
                    &mut rep,
                    Stage::Connect,
                    if r != 0 { errno() } else { soerr },
                );
                return rep;
            }
        }
        rep.local_len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        libc::getsockname(
            fd,
            (&mut rep.local as *mut libc::sockaddr_storage).cast(),
            &mut rep.local_len,
        );
        rep.peer_len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        if libc::getpeername(
            fd,
            (&mut rep.peer as *mut libc::sockaddr_storage).cast(),
            &mut rep.peer_len,
        ) != 0
        {
            fail(&mut rep, Stage::Connect, errno());
            return rep;
        }
        // Read one line (the servers send a tag line and close).
        let read_start = Instant::now();
        let mut len = 0usize;
        loop {
            let left = plan.timeout.saturating_sub(read_start.elapsed());
            if left.is_zero() || poll_one(fd, libc::POLLIN, left) == 0 {
                fail(&mut rep, Stage::Read, libc::ETIMEDOUT);
                return rep;
            }
            let buf = &mut rep.reply[len..];
            let n = libc::read(fd, buf.as_mut_ptr().cast(), buf.len());
            if n < 0 {
                let e = errno();
                if e == libc::EINTR || e == libc::EAGAIN {
                    continue;
                }
                fail(&mut rep, Stage::Read, e);
                return rep;
            }
            let n = n as usize;
            let newline = rep.reply[len..len + n].contains(&b'\n');
            len += n;
            if n == 0 || newline || len == REPLY_MAX {
                break;
            }
        }
        rep.reply_len = len as u32;
        libc::close(fd);
    }
    rep
}

// ---------------------------------------------------------------------------------------------
// Socket address conversions.

/// A `SocketAddr` as a kernel socket address.
pub(crate) fn to_sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from(*a.ip()).to_be(),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe { std::ptr::write((&mut ss as *mut libc::sockaddr_storage).cast(), sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            unsafe { std::ptr::write((&mut ss as *mut libc::sockaddr_storage).cast(), sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, len as libc::socklen_t)
}

/// A kernel socket address as a `SocketAddr` (None for other families / short lengths).
pub(crate) fn from_sockaddr(
    ss: &libc::sockaddr_storage,
    len: libc::socklen_t,
) -> Option<SocketAddr> {
    let len = len as usize;
    match ss.ss_family as libc::c_int {
        libc::AF_INET if len >= std::mem::size_of::<libc::sockaddr_in>() => {
            // SAFETY: family and length say this is a sockaddr_in.
            let sin =
                unsafe { &*(ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            Some(sockaddr_in_to(sin).into())
        }
        libc::AF_INET6 if len >= std::mem::size_of::<libc::sockaddr_in6>() => {
            // SAFETY: family and length say this is a sockaddr_in6.
            let sin6 =
                unsafe { &*(ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            Some(sockaddr_in6_to(sin6).into())
        }
        _ => None,
    }
}

/// `sockaddr_in` → `SocketAddrV4`.
pub(crate) fn sockaddr_in_to(sin: &libc::sockaddr_in) -> SocketAddrV4 {
    SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
        u16::from_be(sin.sin_port),
    )
}

/// `sockaddr_in6` → `SocketAddrV6`.
pub(crate) fn sockaddr_in6_to(sin6: &libc::sockaddr_in6) -> SocketAddrV6 {
    SocketAddrV6::new(
        Ipv6Addr::from(sin6.sin6_addr.s6_addr),
        u16::from_be(sin6.sin6_port),
        sin6.sin6_flowinfo,
        sin6.sin6_scope_id,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_names() {
        assert_eq!(stale_owner("ic-redir_v4-123-4"), Some(123));
        assert_eq!(stale_owner("ic-a-1-0"), Some(1));
        assert_eq!(stale_owner("ic-a-1-x"), None);
        assert_eq!(stale_owner("ic-1-0"), None);
        assert_eq!(stale_owner("other-a-1-0"), None);
        assert_eq!(stale_owner("ic-a-b-0"), None);
        assert_eq!(stale_owner("ic-a-b-1-0"), None);
    }

    #[test]
    fn sockaddr_roundtrip() {
        for a in ["10.1.2.3:80", "[fd00::1]:15001", "0.0.0.0:0"] {
            let a: SocketAddr = a.parse().unwrap();
            let (ss, len) = to_sockaddr(a);
            assert_eq!(from_sockaddr(&ss, len), Some(a));
        }
    }
}
