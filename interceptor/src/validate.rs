//! `interceptor validate`: checks that a pod's interception really works, as Istio's
//! `istio-validation` init container does (the Istio CNI plugin runs it in place of istio-init).
//!
//! Everything runs as the proxy's uid/gid with no capabilities, even when started as root: the
//! socket work happens on dedicated threads that first enter the pod's netns and then change
//! their *own* credentials with raw `setresgid`/`setresuid` syscalls (glibc's wrappers would
//! change every thread of the process) and drop every capability with `capset`. Two checks:
//!
//! 1. **inbound redirect** (Istio's own check): listeners on 127.0.0.1:`-p` and 127.0.0.1:`-z`
//!    (plus `[::1]` when IPv6 loopback is up in the netns); a connection from 127.0.0.1 to
//!    127.0.0.6:`--iptables-probe-port`, made as the proxy uid, must be accepted on `-z` with
//!    `SO_ORIGINAL_DST` = 127.0.0.6:probe port. That is the `-o lo ! -d 127.0.0.1 --uid-owner
//!    PROXY -j ISTIO_IN_REDIRECT` rule (or the eBPF decision it models).
//! 2. **outbound redirect**: a connection to 192.0.2.1:probe port (TEST-NET-1, as Linkerd's
//!    network validator dials) made as a *non-proxy* uid (65534, nobody, or the next free id
//!    below it: the proxy's own connections are never redirected outbound) must be accepted on
//!    `-p` with `SO_ORIGINAL_DST` = 192.0.2.1:probe port. The address is fixed: if the pod's
//!    config does not capture it (`-i` not `*` and not covering it, or `-x` excluding it) this
//!    check fails by design. When it is not captured the SYN follows the pod's own route, to a
//!    documentation address nobody answers. Without the privilege to switch to that uid (started
//!    as the proxy uid itself, as Istio's validation container is) the check is skipped.
//!
//! Both are probed every second until `--probe-timeout`. Success exits 0 and prints what was
//! verified; a failed check exits 126 (Istio's validation error code) naming the check and what
//! was seen; bad flags exit 2 like the rest of the CLI.

use std::collections::VecDeque;
use std::fmt;
use std::fs::File;
use std::io::{self, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use interceptor_common::config::ConfigError;
use nix::errno::Errno;
use nix::sys::socket::{
    self as sock, sockopt, AddressFamily, SockFlag, SockType, SockaddrIn, SockaddrStorage,
};

use crate::cli::ValidateArgs;

/// Exit code of a failed validation (Istio's `constants.ValidationErrorCode`).
pub const EXIT_VALIDATION_FAILED: i32 = 126;
/// Where the inbound probe connects: Envoy's passthrough address, on `lo` but not 127.0.0.1.
pub const INBOUND_PROBE_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 6);
/// The inbound probe's source address.
pub const INBOUND_PROBE_SRC: Ipv4Addr = Ipv4Addr::LOCALHOST;
/// Where the outbound probe connects: TEST-NET-1 (RFC 5737), never a real host.
pub const OUTBOUND_PROBE_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
/// The outbound probe's uid/gid: the first of these that is neither the proxy uid nor its gid.
const APP_ID_CANDIDATES: [u32; 3] = [65534, 65533, 65532];
/// Istio probes once a second.
const TICK: Duration = Duration::from_secs(1);
/// A probe client socket not accepted by then is closed.
const PROBE_KEEP: Duration = Duration::from_secs(3);

/// The validated command line.
#[derive(Debug, Clone)]
pub struct Params {
    pub netns: Option<PathBuf>,
    pub proxy_port: u16,
    pub inbound_capture_port: u16,
    pub probe_port: u16,
    pub timeout: Duration,
    /// `--probe-timeout` as given, for messages.
    pub timeout_text: String,
    pub proxy_uid: u32,
    pub proxy_gid: u32,
}

fn port(flag: &'static str, s: &str) -> Result<u16, ConfigError> {
    s.trim()
        .parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| ConfigError::new(flag, s, "not a port number (1-65535)"))
}

fn id(flag: &'static str, s: &str) -> Result<u32, ConfigError> {
    s.trim()
        .parse::<u32>()
        .map_err(|_| ConfigError::new(flag, s, "not a numeric id (0-4294967295)"))
}

/// Checks the flags; bad input is a `ConfigError` (exit 2), nothing is probed.
pub fn params(a: &ValidateArgs) -> Result<Params, ConfigError> {
    if let Some(ns) = &a.network_namespace {
        crate::config::check_netns(ns)?;
    }
    let proxy_port = port("--envoy-port", &a.envoy_port)?;
    let inbound_capture_port = port("--inbound-capture-port", &a.inbound_capture_port)?;
    if inbound_capture_port == proxy_port {
        return Err(ConfigError::new(
            "--inbound-capture-port",
            &a.inbound_capture_port,
            "must differ from --envoy-port (the checks tell the two listeners apart)",
        ));
    }
    let probe_port = port("--iptables-probe-port", &a.iptables_probe_port)?;
    let timeout = crate::config::parse_go_duration(&a.probe_timeout)
        .filter(|d| !d.is_zero())
        .ok_or_else(|| {
            ConfigError::new(
                "--probe-timeout",
                &a.probe_timeout,
                "not a positive duration such as 5s or 500ms",
            )
        })?;
    let proxy_uid = id("--proxy-uid", &a.proxy_uid)?;
    let proxy_gid = match &a.proxy_gid {
        Some(g) => id("--proxy-gid", g)?,
        None => proxy_uid,
    };
    Ok(Params {
        netns: a.network_namespace.clone(),
        proxy_port,
        inbound_capture_port,
        probe_port,
        timeout,
        timeout_text: a.probe_timeout.trim().to_string(),
        proxy_uid,
        proxy_gid,
    })
}

/// The two checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    Inbound,
    Outbound,
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Check::Inbound => "inbound redirect check",
            Check::Outbound => "outbound redirect check",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Passed(String),
    Failed(String),
    Skipped(String),
}

/// What a validation run found.
#[derive(Debug, Clone)]
pub struct Report {
    /// Where and as whom the checks ran.
    pub context: Vec<String>,
    pub results: Vec<(Check, Outcome)>,
}

impl Report {
    pub fn passed(&self) -> bool {
        !self
            .results
            .iter()
            .any(|(_, o)| matches!(o, Outcome::Failed(_)))
    }
}

/// `interceptor validate`: exit 0 when every check passed, 126 when one failed, 2 on bad flags.
pub fn run(args: &ValidateArgs) -> Result<Result<(), ConfigError>> {
    let p = match params(args) {
        Ok(p) => p,
        Err(e) => return Ok(Err(e)),
    };
    let report = match validate(&p) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("interceptor validate: FAILED: {e:#}");
            std::process::exit(EXIT_VALIDATION_FAILED);
        }
    };
    for line in &report.context {
        println!("{line}");
    }
    for (check, outcome) in &report.results {
        match outcome {
            Outcome::Passed(m) => println!("ok: {check}: {m}"),
            Outcome::Skipped(m) => println!("skipped: {check}: {m}"),
            Outcome::Failed(m) => eprintln!("FAILED: {check}: {m}"),
        }
    }
    if report.passed() {
        println!("validation passed");
        return Ok(Ok(()));
    }
    let failed: Vec<String> = report
        .results
        .iter()
        .filter(|(_, o)| matches!(o, Outcome::Failed(_)))
        .map(|(c, _)| c.to_string())
        .collect();
    eprintln!(
        "interceptor validate: validation failed ({}); exit {EXIT_VALIDATION_FAILED}",
        failed.join(", ")
    );
    let _ = io::stdout().flush();
    std::process::exit(EXIT_VALIDATION_FAILED);
}

// ---------------------------------------------------------------------------------------------
// Per-thread netns and credentials.

fn enter_netns(file: Option<&File>) -> Result<()> {
    if let Some(f) = file {
        nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET)
            .context("setns(CLONE_NEWNET)")?;
    }
    Ok(())
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// Makes the *calling thread only* `uid`/`gid` (supplementary groups cleared) with no
/// capabilities, then reads the result back from /proc. Irreversible for the thread.
fn become_unprivileged(uid: u32, gid: u32) -> Result<()> {
    let (mut r, mut e, mut s) = (0, 0, 0);
    let (mut rg, mut eg, mut sg) = (0, 0, 0);
    // SAFETY: plain syscalls on integers and pointers to locals / a null list.
    unsafe {
        libc::getresuid(&mut r, &mut e, &mut s);
        libc::getresgid(&mut rg, &mut eg, &mut sg);
        if (r, e, s) != (uid, uid, uid) || (rg, eg, sg) != (gid, gid, gid) {
            if libc::syscall(libc::SYS_setgroups, 0usize, std::ptr::null::<libc::gid_t>()) != 0 {
                return Err(io::Error::last_os_error()).context("setgroups([])");
            }
            if libc::syscall(libc::SYS_setresgid, gid, gid, gid) != 0 {
                return Err(io::Error::last_os_error()).context(format!("setresgid({gid})"));
            }
            if libc::syscall(libc::SYS_setresuid, uid, uid, uid) != 0 {
                return Err(io::Error::last_os_error()).context(format!("setresuid({uid})"));
            }
        }
        // Leaving uid 0 already cleared the effective and permitted sets; this also covers a
        // proxy uid of 0 and a start with ambient or file capabilities.
        let mut hdr = CapHeader {
            version: LINUX_CAPABILITY_VERSION_3,
            pid: 0,
        };
        let data = [CapData::default(); 2];
        if libc::syscall(libc::SYS_capset, &mut hdr as *mut CapHeader, data.as_ptr()) != 0 {
            return Err(io::Error::last_os_error()).context("capset(0)");
        }
        libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
    }
    let status = std::fs::read_to_string("/proc/thread-self/status")
        .context("reading /proc/thread-self/status")?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.split_whitespace().collect::<Vec<_>>())
            .unwrap_or_default()
    };
    let uids = field("Uid:");
    let gids = field("Gid:");
    let all = |v: &[&str], want: u32| v.len() == 4 && v.iter().all(|x| x.parse() == Ok(want));
    if !all(&uids, uid) || !all(&gids, gid) {
        bail!("thread credentials are uid {uids:?} gid {gids:?}, want {uid}/{gid}");
    }
    for cap in ["CapEff:", "CapPrm:"] {
        let v = field(cap);
        if v.len() != 1 || u64::from_str_radix(v[0], 16) != Ok(0) {
            bail!("thread still has capabilities: {cap} {v:?}");
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Sockets.

/// A probe connection on its way.
struct Probe {
    check: Check,
    fd: OwnedFd,
    /// getsockname() right after connect: the accepted connection's peer.
    local: Option<SocketAddr>,
    sent: Instant,
}

enum Dial {
    InFlight(OwnedFd, Option<SocketAddr>),
    /// connect() failed at once.
    Failed(Errno),
}

fn std_addr(s: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(a) = s.as_sockaddr_in() {
        Some(SocketAddrV4::from(*a).into())
    } else {
        s.as_sockaddr_in6()
            .map(|a| std::net::SocketAddrV6::from(*a).into())
    }
}

/// A non-blocking TCP connect from the calling thread (its netns and credentials).
fn dial(src: Option<Ipv4Addr>, dst: SocketAddrV4) -> Result<Dial> {
    let fd = sock::socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )
    .context("socket(AF_INET)")?;
    if let Some(src) = src {
        sock::bind(fd.as_raw_fd(), &SockaddrIn::from(SocketAddrV4::new(src, 0)))
            .with_context(|| format!("bind({src}:0)"))?;
    }
    match sock::connect(fd.as_raw_fd(), &SockaddrIn::from(dst)) {
        Ok(()) | Err(Errno::EINPROGRESS) => {}
        Err(e) => return Ok(Dial::Failed(e)),
    }
    let local = sock::getsockname::<SockaddrStorage>(fd.as_raw_fd())
        .ok()
        .and_then(|s| std_addr(&s));
    Ok(Dial::InFlight(fd, local))
}

/// The client side of a probe nobody accepted, for the failure message.
fn client_status(fd: &OwnedFd) -> String {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one valid pollfd, no wait.
    let n = unsafe { libc::poll(&mut pfd, 1, 0) };
    if n <= 0 {
        return "its SYN got no answer (the connection left uncaptured)".into();
    }
    match sock::getsockopt(fd, sockopt::SocketError) {
        Ok(0) => "it connected to something other than our listeners (delivered uncaptured)".into(),
        Ok(e) => describe_errno(Errno::from_raw(e)),
        Err(e) => format!("its state is unknown ({e})"),
    }
}

fn describe_errno(e: Errno) -> String {
    match e {
        Errno::ECONNREFUSED => {
            "it was refused (it reached its real destination, where nothing listens)".into()
        }
        Errno::ENETUNREACH | Errno::EHOSTUNREACH => {
            format!("it failed with {e}: no route, so nothing redirected it")
        }
        Errno::EPERM | Errno::EACCES => format!("it was blocked ({e})"),
        e => format!("it failed with {e}"),
    }
}

/// `getsockopt(SOL_IP, SO_ORIGINAL_DST)` or its IPv6 twin on an accepted connection.
fn original_dst(s: &TcpStream, v4: bool) -> std::result::Result<SocketAddr, Errno> {
    if v4 {
        let a = sock::getsockopt(s, sockopt::OriginalDst)?;
        Ok(SocketAddr::new(
            Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)).into(),
            u16::from_be(a.sin_port),
        ))
    } else {
        let a = sock::getsockopt(s, sockopt::Ip6tOriginalDst)?;
        Ok(SocketAddr::new(
            Ipv6Addr::from(a.sin6_addr.s6_addr).into(),
            u16::from_be(a.sin6_port),
        ))
    }
}

fn listen(addr: SocketAddr, uid: u32) -> Result<TcpListener> {
    let l = TcpListener::bind(addr).map_err(|e| {
        let hint = if e.raw_os_error() == Some(libc::EADDRINUSE) {
            " (is a proxy already running in this netns?)"
        } else {
            ""
        };
        anyhow!("cannot listen on {addr} as uid {uid}: {e}{hint}")
    })?;
    l.set_nonblocking(true)?;
    Ok(l)
}

// ---------------------------------------------------------------------------------------------
// The checks.

/// Progress of one check across probes.
struct State {
    check: Check,
    want_port: u16,
    want_orig: SocketAddr,
    passed: Option<String>,
    /// The latest connection that reached a listener the wrong way.
    wrong: Option<String>,
    /// The latest probe's client side, when no listener got it.
    client: Option<String>,
    probes: u32,
    skipped: Option<String>,
}

impl State {
    fn new(check: Check, want_port: u16, want_orig: SocketAddr) -> Self {
        State {
            check,
            want_port,
            want_orig,
            passed: None,
            wrong: None,
            client: None,
            probes: 0,
            skipped: None,
        }
    }

    fn open(&self) -> bool {
        self.passed.is_none() && self.skipped.is_none()
    }

    fn outcome(&self, timeout: &str) -> Outcome {
        if let Some(m) = &self.passed {
            return Outcome::Passed(m.clone());
        }
        if let Some(m) = &self.skipped {
            return Outcome::Skipped(m.clone());
        }
        let n = match self.probes {
            1 => "1 probe".to_string(),
            n => format!("{n} probes"),
        };
        if let Some(w) = &self.wrong {
            return Outcome::Failed(format!("{w} (last of {n} in {timeout})"));
        }
        let mut m = format!(
            "no listener received the probe to {} within {timeout} (not captured; {n})",
            self.want_orig
        );
        if let Some(c) = &self.client {
            m.push_str(&format!("; the last probe: {c}"));
        }
        Outcome::Failed(m)
    }

    /// One accepted connection of this check's probe.
    fn observe(
        &mut self,
        listener: SocketAddr,
        peer: SocketAddr,
        orig: std::result::Result<SocketAddr, Errno>,
        who: &str,
    ) {
        let want = self.want_orig;
        if listener.port() != self.want_port {
            self.wrong = Some(format!(
                "connection to {want} was accepted on {listener} instead of {}",
                self.want_port
            ));
            return;
        }
        match orig {
            Ok(o) if o == want => {
                self.passed = Some(format!(
                    "{who} connection from {peer} to {want} was redirected to {listener}, \
                     SO_ORIGINAL_DST {o}"
                ));
            }
            Ok(o) => {
                self.wrong = Some(format!(
                    "connection to {want} was accepted on {listener} but SO_ORIGINAL_DST says {o}"
                ));
            }
            Err(e) => {
                self.wrong = Some(format!(
                    "connection to {want} was accepted on {listener} but SO_ORIGINAL_DST failed \
                     ({e}): the original destination is lost"
                ));
            }
        }
    }
}

/// The first candidate id that is neither the proxy uid nor its gid.
fn app_id(p: &Params) -> u32 {
    APP_ID_CANDIDATES
        .into_iter()
        .find(|i| *i != p.proxy_uid && *i != p.proxy_gid)
        .unwrap_or(APP_ID_CANDIDATES[0])
}

/// Runs both checks; `Err` only when they could not run at all (netns, credentials, listeners).
pub fn validate(p: &Params) -> Result<Report> {
    let ns_file = p
        .netns
        .as_deref()
        .map(|path| File::open(path).with_context(|| format!("opening {}", path.display())))
        .transpose()?;
    let started_as_root = nix::unistd::geteuid().is_root();
    let app = app_id(p);
    let outbound_dst = SocketAddrV4::new(OUTBOUND_PROBE_IP, p.probe_port);
    let ns_ref = ns_file.as_ref();
    std::thread::scope(|s| {
        let (req_tx, req_rx) = mpsc::channel::<()>();
        let (resp_tx, resp_rx) = mpsc::channel::<Result<Dial>>();
        let (ready_tx, ready_rx) = mpsc::channel::<std::result::Result<(), String>>();
        // The outbound client: a non-proxy uid, dialing on request.
        std::thread::Builder::new()
            .name("validate-app".into())
            .spawn_scoped(s, move || {
                let setup = enter_netns(ns_ref).and_then(|()| become_unprivileged(app, app));
                let ok = setup.is_ok();
                let _ = ready_tx.send(setup.map_err(|e| format!("{e:#}")));
                if !ok {
                    return;
                }
                for () in req_rx {
                    if resp_tx.send(dial(None, outbound_dst)).is_err() {
                        break;
                    }
                }
            })
            .context("spawning the outbound client thread")?;
        // The proxy side: listeners, inbound client, and the probe loop.
        let proxy = std::thread::Builder::new()
            .name("validate-proxy".into())
            .spawn_scoped(s, move || -> Result<Report> {
                enter_netns(ns_ref)?;
                become_unprivileged(p.proxy_uid, p.proxy_gid).with_context(|| {
                    format!(
                        "running as the proxy uid {} gid {}",
                        p.proxy_uid, p.proxy_gid
                    )
                })?;
                let app_ready = ready_rx
                    .recv_timeout(Duration::from_secs(10))
                    .unwrap_or_else(|_| Err("the client thread did not start".into()));
                probe_loop(p, started_as_root, app, app_ready, req_tx, resp_rx)
            })
            .context("spawning the proxy thread")?;
        proxy
            .join()
            .map_err(|_| anyhow!("the validation thread panicked"))?
    })
}

/// On the proxy thread: listen, probe every second until both checks passed or time is up.
fn probe_loop(
    p: &Params,
    started_as_root: bool,
    app: u32,
    app_ready: std::result::Result<(), String>,
    req_tx: mpsc::Sender<()>,
    resp_rx: mpsc::Receiver<Result<Dial>>,
) -> Result<Report> {
    let mut listeners: Vec<(TcpListener, SocketAddr)> = Vec::new();
    for port in [p.proxy_port, p.inbound_capture_port] {
        let addr = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port);
        listeners.push((listen(addr, p.proxy_uid)?, addr));
    }
    // [::1] too when IPv6 loopback is up here (binding it tells).
    let v6_addr = SocketAddr::new(Ipv6Addr::LOCALHOST.into(), p.proxy_port);
    match TcpListener::bind(v6_addr) {
        Ok(l) => {
            l.set_nonblocking(true)?;
            listeners.push((l, v6_addr));
            let addr = SocketAddr::new(Ipv6Addr::LOCALHOST.into(), p.inbound_capture_port);
            listeners.push((listen(addr, p.proxy_uid)?, addr));
        }
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::EADDRNOTAVAIL) | Some(libc::EAFNOSUPPORT)
            ) => {}
        Err(e) => bail!("cannot listen on {v6_addr} as uid {}: {e}", p.proxy_uid),
    }

    let inbound_dst = SocketAddrV4::new(INBOUND_PROBE_IP, p.probe_port);
    let mut inbound = State::new(Check::Inbound, p.inbound_capture_port, inbound_dst.into());
    let mut outbound = State::new(
        Check::Outbound,
        p.proxy_port,
        SocketAddr::new(OUTBOUND_PROBE_IP.into(), p.probe_port),
    );
    if let Err(e) = &app_ready {
        let m = format!("cannot run the client as uid {app} gid {app}: {e}");
        if started_as_root {
            bail!("{m}");
        }
        outbound.skipped = Some(format!(
            "{m} (needs root: the proxy uid's own connections are never redirected outbound)"
        ));
    }

    let listen_list: Vec<String> = listeners.iter().map(|(_, a)| a.to_string()).collect();
    let where_ = match &p.netns {
        Some(ns) => format!("netns {}", ns.display()),
        None => "the current netns".into(),
    };
    let mut context = vec![format!(
        "validating interception in {where_}: listeners {} as uid {} gid {} with no \
         capabilities",
        listen_list.join(", "),
        p.proxy_uid,
        p.proxy_gid
    )];
    if outbound.skipped.is_none() {
        context.push(format!(
            "outbound probe client runs as uid {app} gid {app} with no capabilities"
        ));
    }

    let mut probes: VecDeque<Probe> = VecDeque::new();
    let deadline = Instant::now() + p.timeout;
    while Instant::now() < deadline && (inbound.open() || outbound.open()) {
        let tick_end = (Instant::now() + TICK).min(deadline);
        if inbound.open() {
            inbound.probes += 1;
            match dial(Some(INBOUND_PROBE_SRC), inbound_dst)? {
                Dial::InFlight(fd, local) => probes.push_back(Probe {
                    check: Check::Inbound,
                    fd,
                    local,
                    sent: Instant::now(),
                }),
                Dial::Failed(e) => inbound.client = Some(describe_errno(e)),
            }
        }
        if outbound.open() {
            outbound.probes += 1;
            req_tx
                .send(())
                .map_err(|_| anyhow!("the outbound client thread is gone"))?;
            match resp_rx.recv_timeout(TICK) {
                Ok(Ok(Dial::InFlight(fd, local))) => probes.push_back(Probe {
                    check: Check::Outbound,
                    fd,
                    local,
                    sent: Instant::now(),
                }),
                Ok(Ok(Dial::Failed(e))) => outbound.client = Some(describe_errno(e)),
                Ok(Err(e)) => return Err(e.context("outbound probe")),
                Err(_) => bail!("the outbound client thread did not answer"),
            }
        }
        // Accept until the tick ends (or both checks are settled).
        loop {
            let now = Instant::now();
            if now >= tick_end || !(inbound.open() || outbound.open()) {
                break;
            }
            let mut pfds: Vec<libc::pollfd> = listeners
                .iter()
                .map(|(l, _)| libc::pollfd {
                    fd: l.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                })
                .collect();
            let wait = (tick_end - now).as_millis().clamp(1, 1000) as libc::c_int;
            // SAFETY: a valid array of pollfds.
            let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, wait) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e).context("poll");
            }
            for (i, (l, laddr)) in listeners.iter().enumerate() {
                if pfds[i].revents == 0 {
                    continue;
                }
                loop {
                    let (stream, peer) = match l.accept() {
                        Ok(x) => x,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => return Err(e).with_context(|| format!("accept on {laddr}")),
                    };
                    let orig = original_dst(&stream, laddr.is_ipv4());
                    // Which probe: by the client's address, else by where it was going.
                    let by_peer = probes.iter().position(|pr| pr.local == Some(peer));
                    let check = match by_peer {
                        Some(i) => probes.remove(i).map(|pr| pr.check),
                        None => match orig {
                            Ok(o) if o == inbound.want_orig => Some(Check::Inbound),
                            Ok(o) if o == outbound.want_orig => Some(Check::Outbound),
                            _ => None,
                        },
                    };
                    match check {
                        Some(Check::Inbound) => {
                            inbound.observe(*laddr, peer, orig, &format!("uid {}", p.proxy_uid))
                        }
                        Some(Check::Outbound) => {
                            outbound.observe(*laddr, peer, orig, &format!("uid {app}"))
                        }
                        None => tracing::debug!(%peer, %laddr, "unrelated connection ignored"),
                    }
                }
            }
        }
        // The latest probe of each open check: what its client saw.
        for st in [&mut inbound, &mut outbound] {
            if let Some(pr) = probes.iter().rev().find(|pr| pr.check == st.check) {
                st.client = Some(client_status(&pr.fd));
            }
        }
        probes.retain(|pr| pr.sent.elapsed() < PROBE_KEEP);
    }
    Ok(Report {
        context,
        results: vec![
            (Check::Inbound, inbound.outcome(&p.timeout_text)),
            (Check::Outbound, outbound.outcome(&p.timeout_text)),
        ],
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn parse(args: &[&str]) -> Result<Params, ConfigError> {
        let mut argv = vec!["interceptor", "validate"];
        argv.extend_from_slice(args);
        let cli = crate::cli::Cli::try_parse_from(argv).expect("clap");
        match cli.command {
            crate::cli::Command::Validate(a) => params(&a),
            _ => unreachable!(),
        }
    }

    #[test]
    fn defaults_are_istios() {
        let p = parse(&[]).unwrap();
        assert_eq!(
            (p.proxy_port, p.inbound_capture_port, p.probe_port),
            (15001, 15006, 15002)
        );
        assert_eq!(p.timeout, Duration::from_secs(5));
        assert_eq!((p.proxy_uid, p.proxy_gid), (1337, 1337));
        assert_eq!(app_id(&p), 65534);
    }

    #[test]
    fn flags() {
        let p = parse(&[
            "-p",
            "16001",
            "-z",
            "16006",
            "--iptables-probe-port",
            "16002",
            "--probe-timeout",
            "500ms",
            "--proxy-uid",
            "65534",
        ])
        .unwrap();
        assert_eq!(
            (p.proxy_port, p.inbound_capture_port, p.probe_port),
            (16001, 16006, 16002)
        );
        assert_eq!(p.timeout, Duration::from_millis(500));
        assert_eq!((p.proxy_uid, p.proxy_gid), (65534, 65534));
        assert_eq!(app_id(&p), 65533);
    }

    #[test]
    fn bad_flags_name_the_flag() {
        for (args, flag) in [
            (&["-p", "0"][..], "--envoy-port"),
            (&["-z", "x"][..], "--inbound-capture-port"),
            (&["-z", "15001"][..], "--inbound-capture-port"),
            (
                &["--iptables-probe-port", "70000"][..],
                "--iptables-probe-port",
            ),
            (&["--probe-timeout", "5"][..], "--probe-timeout"),
            (&["--probe-timeout", "0s"][..], "--probe-timeout"),
            (&["--proxy-uid=-1"][..], "--proxy-uid"),
            (&["--proxy-gid", "abc"][..], "--proxy-gid"),
            (
                &["--network-namespace", "/nonexistent/netns"][..],
                "--network-namespace",
            ),
            (
                &["--network-namespace", "/etc/hostname"][..],
                "--network-namespace",
            ),
        ] {
            let e = parse(args).expect_err(&format!("{args:?} accepted"));
            assert_eq!(e.flag, flag, "{args:?}");
        }
    }

    #[test]
    fn messages() {
        let want: SocketAddr = "127.0.0.6:15002".parse().unwrap();
        let lo = |port| SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port);
        let mut st = State::new(Check::Inbound, 15006, want);
        st.observe(lo(15001), lo(40000), Ok(want), "uid 1337");
        assert!(st.open());
        st.probes = 1;
        let Outcome::Failed(m) = st.outcome("5s") else {
            panic!()
        };
        assert!(
            m.contains(
                "connection to 127.0.0.6:15002 was accepted on 127.0.0.1:15001 instead of 15006"
            ),
            "{m}"
        );
        let mut st = State::new(Check::Inbound, 15006, want);
        st.probes = 5;
        st.client = Some(describe_errno(Errno::ECONNREFUSED));
        let Outcome::Failed(m) = st.outcome("5s") else {
            panic!()
        };
        assert!(
            m.starts_with(
                "no listener received the probe to 127.0.0.6:15002 within 5s (not captured"
            ),
            "{m}"
        );
        st.observe(lo(15006), lo(40000), Ok(want), "uid 1337");
        assert!(matches!(st.outcome("5s"), Outcome::Passed(_)));
    }
}
