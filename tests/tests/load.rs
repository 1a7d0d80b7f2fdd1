//! Load on the eBPF path through the daemon: many connections held open at once through one pod
//! and a sustained connect loop. Every connection must reach the proxy with its own original
//! destination (SO_ORIGINAL_DST answered each time, never another connection's), the
//! per-connection map entries must return to their baseline, and the daemon's memory must not
//! grow.
//!
//! Sizes: quick by default (1,000 held, 10,000 in the loop: part of the suite); the full run of
//! #8 with `INTERCEPTOR_LOAD_FULL=1` (10,000 held, 100,000 in the loop). `INTERCEPTOR_LOAD_HELD`
//! and `INTERCEPTOR_LOAD_LOOP` set them directly.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use interceptor::backend::ebpf::Pins;
use interceptor_tests::daemon::DaemonProc;
use interceptor_tests::topology::{run_in_netns, set_thread_creds, Topology};
use nix::sys::socket::{getsockopt, sockopt};

fn size(var: &str, quick: usize, full: usize, min: usize) -> usize {
    if let Some(n) = std::env::var(var).ok().and_then(|v| v.parse().ok()) {
        return n;
    }
    let full_run = std::env::var("INTERCEPTOR_LOAD_FULL").is_ok_and(|v| v == "1");
    let n = if full_run { full } else { quick };
    // Emulated guests (vm-test) run a proportionally smaller load.
    ((n as f64 / interceptor_tests::time_scale()) as usize).max(min)
}

/// Room for both ends of every held connection.
fn raise_fd_limit(want: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    let new = want.max(lim.rlim_cur).min(lim.rlim_max.max(want));
    lim.rlim_cur = new;
    lim.rlim_max = lim.rlim_max.max(new);
    assert_eq!(
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) },
        0,
        "cannot raise RLIMIT_NOFILE to {want}"
    );
}

/// A lean proxy on 15001 in the pod netns: accepts, answers each connection with the
/// SO_ORIGINAL_DST it got (or `missed`), and keeps the socket open until told to stop.
struct Proxy {
    stop: Arc<AtomicBool>,
    answered: Arc<AtomicU64>,
    missed: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Proxy {
    fn start(netns: &Path) -> Self {
        // As the proxy's uid: the bind guard keeps 15001 for it.
        let listener = run_in_netns(netns, || {
            set_thread_creds(1337, 1337)?;
            anyhow::Ok(TcpListener::bind("0.0.0.0:15001")?)
        })
        .unwrap()
        .expect("bind 15001 in the pod as uid 1337");
        listener.set_nonblocking(true).unwrap();
        let (stop, answered, missed) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
        );
        let thread = {
            let (stop, answered, missed) = (stop.clone(), answered.clone(), missed.clone());
            std::thread::spawn(move || {
                let mut held: Vec<TcpStream> = Vec::new();
                // Closed connections are dropped whenever the held ones double (amortised one
                // peek per accept), so the fds in use follow the connections really open: the
                // loop closes each of its own, and a guest's RLIMIT_NOFILE (1,024) is less than
                // held + looped.
                let mut prune_at = 256;
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((mut s, _)) => {
                            let reply = match getsockopt(&s, sockopt::OriginalDst) {
                                Ok(a) => {
                                    answered.fetch_add(1, Ordering::Relaxed);
                                    let ip =
                                        std::net::Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
                                    format!("{ip}:{}\n", u16::from_be(a.sin_port))
                                }
                                Err(e) => {
                                    missed.fetch_add(1, Ordering::Relaxed);
                                    format!("missed {e}\n")
                                }
                            };
                            let _ = s.set_nonblocking(false);
                            let _ = s.write_all(reply.as_bytes());
                            held.push(s);
                            // Drop the ones the client has closed (read returns 0).
                            if held.len() >= prune_at {
                                held.retain(|s| {
                                    let _ = s.set_nonblocking(true);
                                    let mut b = [0u8; 1];
                                    !matches!(s.peek(&mut b), Ok(0))
                                });
                                prune_at = (2 * held.len()).max(256);
                            }
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_micros(200));
                        }
                        Err(e) => panic!("accept: {e}"),
                    }
                }
            })
        };
        Self {
            stop,
            answered,
            missed,
            thread: Some(thread),
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// One connection from the pod to `dst`: the proxy's reply (the original destination it saw).
fn connect_once(dst: SocketAddr) -> std::io::Result<(TcpStream, String)> {
    let s = TcpStream::connect_timeout(&dst, interceptor_tests::scaled(Duration::from_secs(2)))?;
    s.set_read_timeout(Some(interceptor_tests::scaled(Duration::from_secs(2))))?;
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line)?;
    Ok((s, line.trim_end().to_string()))
}

/// `n` connections from the current netns, each to its own port on `up`: how many got their
/// own original destination back, and what went wrong otherwise. With `hold`, every connection
/// stays open until the last one is made.
fn connect_many(up: std::net::IpAddr, n: usize, hold: bool) -> (usize, Vec<String>) {
    let mut streams = Vec::with_capacity(if hold { n } else { 0 });
    let (mut ok, mut wrong) = (0usize, Vec::new());
    for i in 0..n {
        let dst = SocketAddr::new(up, 20_000 + (i % 40_000) as u16);
        match connect_once(dst) {
            Ok((s, reply)) if reply == dst.to_string() => {
                ok += 1;
                if hold {
                    streams.push(s);
                }
            }
            Ok((_, reply)) => wrong.push(format!("{dst} -> {reply}")),
            Err(e) => wrong.push(format!("{dst} -> {e}")),
        }
    }
    (ok, wrong)
}

/// The client half of the held-connections part, run by that test as a child process: opens
/// every connection, checks each reply, and holds them all until the last one is open.
#[test]
#[ignore = "run as a child process by held_connections_and_a_connect_loop_leak_nothing"]
fn held_client() {
    let spec = std::env::var("INTERCEPTOR_LOAD_CHILD").expect("run by the load test");
    let mut f = spec.split('|');
    let (ns, up, n) = (f.next().unwrap(), f.next().unwrap(), f.next().unwrap());
    let up: std::net::IpAddr = up.parse().unwrap();
    let n: usize = n.parse().unwrap();
    raise_fd_limit((n + 256) as u64);
    let (ok, wrong) = run_in_netns(Path::new(ns), move || connect_many(up, n, true)).unwrap();
    println!("HELD_OK {ok}");
    for w in wrong.iter().take(5) {
        println!("WRONG {w}");
    }
    if wrong.len() > 5 {
        println!("WRONG … and {} more", wrong.len() - 5);
    }
}

#[test]
fn held_connections_and_a_connect_loop_leak_nothing() {
    let held_n = size("INTERCEPTOR_LOAD_HELD", 1_000, 10_000, 100);
    let loop_n = size("INTERCEPTOR_LOAD_LOOP", 10_000, 100_000, 100);
    raise_fd_limit((held_n + 1024) as u64);
    let d = DaemonProc::start("load").unwrap();
    let topo = Topology::new("load").unwrap();
    let ns = topo.pod_netns().to_str().unwrap().to_string();
    let show = d.pod_ok(&[
        "add",
        "--network-namespace",
        &ns,
        "-i",
        "*",
        "--ipv6",
        "false",
        "--backend",
        "ebpf",
    ]);
    assert!(show.contains("ebpf"), "{show}");
    let maps = Pins::new(d.bpffs()).maps().unwrap();
    let baseline = maps.connection_entries();
    let proxy = Proxy::start(topo.pod_netns());
    let daemon_pid = d.pid().expect("daemon running");
    let rss_before = rss_kib(daemon_pid);
    let up = topo.upstream_v4();

    // 1. Held: every connection open at once, each to its own destination port. The client
    // ends live in a child process: one fd table holding both ends of 10,000 connections would
    // pass RLIMIT_NOFILE's hard limit, which only CAP_SYS_RESOURCE may raise.
    let t = Instant::now();
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "held_client",
            "--ignored",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(
            "INTERCEPTOR_LOAD_CHILD",
            format!("{}|{up}|{held_n}", topo.pod_netns().display()),
        )
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let held_ok: usize = text
        .lines()
        .find_map(|l| l.split("HELD_OK ").nth(1))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "client child: {text}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    let wrong: Vec<&str> = text
        .lines()
        .filter_map(|l| l.split("WRONG ").nth(1))
        .collect();
    let held_secs = t.elapsed().as_secs_f64();
    println!(
        "held: {held_ok}/{held_n} connections open at once, correct original destination ({held_secs:.1} s)"
    );
    assert!(
        wrong.is_empty(),
        "{} of {held_n} wrong or failed, e.g. {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(5)]
    );

    // 2. Loop: connect, check, close.
    let t = Instant::now();
    let (loop_ok, loop_wrong) = run_in_netns(topo.pod_netns(), move || {
        connect_many(up.into(), loop_n, false)
    })
    .unwrap();
    let loop_secs = t.elapsed().as_secs_f64();
    println!(
        "loop: {loop_ok}/{loop_n} connections correct ({:.0} conn/s)",
        loop_n as f64 / loop_secs
    );
    assert!(
        loop_wrong.is_empty(),
        "{} of {loop_n} wrong or failed, e.g. {:?}",
        loop_wrong.len(),
        &loop_wrong[..loop_wrong.len().min(5)]
    );

    // 3. Everything closed: the proxy answered every SO_ORIGINAL_DST, per-connection state is
    // back to its baseline, and the daemon did not grow.
    let (answered, missed) = (
        proxy.answered.load(Ordering::Relaxed),
        proxy.missed.load(Ordering::Relaxed),
    );
    drop(proxy);
    let deadline = Instant::now() + interceptor_tests::scaled(Duration::from_secs(5));
    let mut after = maps.connection_entries();
    while after != baseline && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        after = maps.connection_entries();
    }
    let rss_after = rss_kib(daemon_pid);
    println!(
        "SO_ORIGINAL_DST answered {answered}, missed {missed}; per-connection entries before \
         {baseline:?}, after {after:?}; daemon RSS {rss_before} KiB -> {rss_after} KiB"
    );
    assert_eq!(answered, (held_n + loop_n) as u64);
    assert_eq!(missed, 0);
    assert_eq!(after, baseline, "per-connection map entries leaked");
    // The daemon is not on the datapath: its memory must not follow the connection count.
    assert!(
        rss_after <= rss_before + 4096,
        "daemon RSS grew from {rss_before} KiB to {rss_after} KiB"
    );
}

/// Bare pod network namespaces (`ip netns add`), deleted on drop.
struct BareNetns(Vec<std::path::PathBuf>);

impl BareNetns {
    fn new(n: usize) -> Self {
        let pid = std::process::id();
        let mut made = BareNetns(Vec::new());
        for i in 0..n {
            let name = format!("ic-churn-{pid}-{i}-pod");
            let ok = std::process::Command::new("ip")
                .args(["netns", "add", &name])
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "ip netns add {name}");
            made.0.push(Path::new("/var/run/netns").join(name));
        }
        made
    }
}

impl Drop for BareNetns {
    fn drop(&mut self) {
        for p in &self.0 {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", &name])
                .status();
        }
    }
}

/// What the process's open fds are, sorted, numbers dropped ("socket", "net",
/// "anon_inode:bpf-map", …).
fn fd_kinds(pid: u32) -> Vec<String> {
    let mut kinds: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .map(|t| {
                    let t = t.to_string_lossy();
                    t.split_once(":[")
                        .map_or(t.to_string(), |(k, _)| k.to_string())
                })
                .collect()
        })
        .unwrap_or_default();
    kinds.sort();
    kinds
}

/// How many control connections (accepted on `socket`) the daemon holds: its fds that are unix
/// sockets bound to that path and not the listener itself.
fn control_connections(pid: u32, socket: &Path) -> usize {
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .filter_map(|t| {
                    let t = t.to_string_lossy();
                    Some(t.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
                })
                .collect()
        })
        .unwrap_or_default();
    let table = std::fs::read_to_string(format!("/proc/{pid}/net/unix")).unwrap_or_default();
    // Num RefCount Protocol Flags Type St Inode Path; Flags 00010000 = listening.
    table
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|f| {
            f.len() >= 8
                && Path::new(f[7]) == socket
                && f[3] != "00010000"
                && inodes.iter().any(|i| i == f[6])
        })
        .count()
}

/// The daemon's fds once it is quiescent. It serves each control connection on a thread that
/// holds it (two fds: the stream and its writer clone) until it reads the client's EOF, which
/// can come after `interceptor pod` has exited and `pod_ok` returned: counted at once, a round
/// under load once saw 26 fds against a baseline of 24 — one connection still closing, not a
/// leak. So wait (bounded) until no control connection is open; one still open then is a leak.
/// Returns the fds and how many control connections were still open at the first look.
fn quiescent_fds(pid: u32, socket: &Path) -> (Vec<String>, usize) {
    let t = Instant::now();
    let deadline = t + interceptor_tests::scaled(Duration::from_secs(10));
    let closing = control_connections(pid, socket);
    loop {
        if control_connections(pid, socket) == 0 {
            let fds = fd_kinds(pid);
            // Nothing connects meanwhile (the test is the only client): still none open means
            // the list was read at rest.
            if control_connections(pid, socket) == 0 {
                return (fds, closing);
            }
        }
        assert!(
            Instant::now() < deadline,
            "the daemon still holds {} control connection(s) {:?} after its clients exited",
            control_connections(pid, socket),
            t.elapsed()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn pin_count(dir: &Path) -> usize {
    fn walk(d: &Path) -> usize {
        std::fs::read_dir(d).map_or(0, |rd| {
            rd.flatten()
                .map(|e| {
                    if e.file_type().is_ok_and(|t| t.is_dir()) {
                        walk(&e.path())
                    } else {
                        1
                    }
                })
                .sum()
        })
    }
    walk(dir)
}

/// Pods registered and removed again and again through the daemon: afterwards nothing is left
/// behind — no map entries, no pins (sk_lookup links), no daemon fds (netns references).
/// Quick: 50 pods × 3 rounds; `INTERCEPTOR_LOAD_FULL=1`: 250 pods × 5 rounds.
#[test]
fn pod_churn_leaves_nothing_behind() {
    let pods = size("INTERCEPTOR_LOAD_PODS", 50, 250, 10);
    let rounds = size("INTERCEPTOR_LOAD_ROUNDS", 3, 5, 2);
    let d = DaemonProc::start("churn").unwrap();
    let nss = BareNetns::new(pods);
    // One pod first, so the programs are loaded and pinned before the baseline is taken.
    let warm = Topology::new("churnw").unwrap();
    let warm_ns = warm.pod_netns().to_str().unwrap().to_string();
    d.pod_ok(&[
        "add",
        "--network-namespace",
        &warm_ns,
        "-i",
        "*",
        "--backend",
        "ebpf",
    ]);
    d.pod_ok(&["remove", "--network-namespace", &warm_ns]);
    let maps = Pins::new(d.bpffs()).maps().unwrap();
    let (pid, sock) = (d.pid().unwrap(), d.socket());
    let base = (
        maps.occupancy(),
        pin_count(d.bpffs()),
        quiescent_fds(pid, &sock).0,
    );
    let mut add_us = Vec::new();
    let mut closing = 0;
    let t = Instant::now();
    for round in 0..rounds {
        for ns in &nss.0 {
            let ns = ns.to_str().unwrap();
            let t = Instant::now();
            d.pod_ok(&[
                "add",
                "--network-namespace",
                ns,
                "-i",
                "*",
                "-b",
                "*",
                "--backend",
                "ebpf",
            ]);
            add_us.push(t.elapsed().as_micros() as u64);
        }
        let during = maps.occupancy();
        let policy = during
            .iter()
            .find(|(n, _, _)| *n == "POD_POLICY")
            .unwrap()
            .1;
        assert_eq!(policy, pods, "round {round}: every pod registered");
        for ns in &nss.0 {
            d.pod_ok(&["remove", "--network-namespace", ns.to_str().unwrap()]);
        }
        let (fds, open) = quiescent_fds(pid, &sock);
        closing += open;
        let now = (maps.occupancy(), pin_count(d.bpffs()), fds);
        assert_eq!(
            now, base,
            "round {round}: (map occupancy, pins, daemon fds) not back to the baseline"
        );
    }
    add_us.sort_unstable();
    println!(
        "churn: {pods} pods x {rounds} rounds added and removed in {:.1} s; `pod add` (CLI process round trip) median \
         {} us, p99 {} us; maps, {} pins and {} daemon fds back to baseline after every round \
         ({closing} control connection(s) were still closing when a round ended)",
        t.elapsed().as_secs_f64(),
        add_us[add_us.len() / 2],
        add_us[add_us.len() * 99 / 100],
        base.1,
        base.2.len(),
    );
    assert!(d.pod_ok(&["list"]).trim().lines().count() <= 1, "pods left");
}
