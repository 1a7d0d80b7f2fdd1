//! Self-test of the e2e fixtures, without any interceptor code: the topology routes, the
//! servers answer, the client connects as the requested uid, a hand-written iptables REDIRECT
//! inside the pod reaches the sidecar with the right `SO_ORIGINAL_DST`, and everything is
//! removed on drop (also after a panic). Needs root; every test uses its own namespaces, so
//! they run in parallel.

use std::{
    io::Write,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener},
    path::Path,
    time::Duration,
};

use interceptor_tests::{
    sidecar::{Sidecar, TagServer},
    topology::{
        cgroup2_mount, connect_as, connect_with, run_in_netns, ConnectError, ConnectOpts, Ns,
        Stage, TestCgroup, Topology,
    },
};

const UPSTREAM_PORT: u16 = 8080;
const APP_PORT: u16 = 9080;

fn netns_list() -> String {
    let out = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn sa(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

#[test]
fn plain_connection_reaches_upstream() {
    let topo = Topology::new("plain").unwrap();
    let upstream = TagServer::upstream(&topo, UPSTREAM_PORT).unwrap();
    let cases: [(IpAddr, IpAddr); 4] = [
        (topo.upstream_v4().into(), topo.pod_v4().into()),
        (topo.upstream_v6().into(), topo.pod_v6().into()),
        (topo.excluded_v4().into(), topo.pod_v4().into()),
        (topo.excluded_v6().into(), topo.pod_v6().into()),
    ];
    for (dst_ip, pod_ip) in cases {
        let dst = sa(dst_ip, UPSTREAM_PORT);
        let out = connect_as(
            topo.pod_netns(),
            1000,
            1000,
            dst,
            None,
            Duration::from_secs(2),
        )
        .unwrap_or_else(|e| panic!("{dst}: {e:#}"));
        assert_eq!(out.reply, "upstream:8080", "{dst}");
        assert_eq!(out.peer, dst);
        assert_eq!(out.local.ip(), pod_ip);
        let rec = upstream.take_records();
        assert_eq!(rec.len(), 1, "{dst}: {rec:?}");
        assert_eq!(rec[0].peer, out.local, "upstream sees the pod's address");
        assert_eq!(rec[0].local, dst);
        assert_eq!(rec[0].listener_port, UPSTREAM_PORT);
    }
    // Explicit source binding.
    let out = connect_as(
        topo.pod_netns(),
        1000,
        1000,
        sa(topo.upstream_v4(), UPSTREAM_PORT),
        Some(topo.pod_v4().into()),
        Duration::from_secs(2),
    )
    .unwrap();
    assert_eq!(out.reply, "upstream:8080");
}

#[test]
fn inbound_connection_reaches_app() {
    let topo = Topology::new("inbound").unwrap();
    let app = TagServer::app(&topo, APP_PORT).unwrap();
    for (dst, src) in [
        (sa(topo.pod_v4(), APP_PORT), None),
        (sa(topo.pod_v6(), APP_PORT), None),
        (
            sa(topo.pod_v4(), APP_PORT),
            Some(IpAddr::from(topo.excluded_v4())),
        ),
        (
            sa(topo.pod_v6(), APP_PORT),
            Some(IpAddr::from(topo.excluded_v6())),
        ),
    ] {
        let out = topo
            .inbound_connect(dst, src)
            .unwrap_or_else(|e| panic!("{dst}: {e:#}"));
        assert_eq!(out.reply, "app:9080");
        let rec = app.take_records();
        assert_eq!(rec.len(), 1);
        assert_eq!(rec[0].local, dst);
        if let Some(src) = src {
            assert_eq!(rec[0].peer.ip(), src);
        }
    }
}

/// A hand-written Istio-like outbound REDIRECT, applied with the given iptables variant
/// (`nft` or `legacy`) inside the pod namespace.
fn redirect_reaches_sidecar(variant: &str) {
    let topo = Topology::new(&format!("redir_{variant}")).unwrap();
    let sidecar = Sidecar::start(&topo).unwrap();
    let _upstream = TagServer::upstream(&topo, UPSTREAM_PORT).unwrap();

    // Inside the pod namespace only (exec_in always goes through `ip netns exec <pod>`).
    let rules = "*nat\n\
                 -A OUTPUT -p tcp -m owner ! --uid-owner 1337 -j REDIRECT --to-ports 15001\n\
                 COMMIT\n";
    topo.pod_exec(
        &format!("iptables-{variant}-restore"),
        &["--noflush"],
        Some(rules),
    )
    .unwrap();
    topo.pod_exec(
        &format!("ip6tables-{variant}-restore"),
        &["--noflush"],
        Some(rules),
    )
    .unwrap();
    let saved = topo
        .pod_exec(&format!("iptables-{variant}-save"), &["-t", "nat"], None)
        .unwrap();
    assert!(saved.contains("--to-ports 15001"), "{saved}");

    let cases: [(IpAddr, IpAddr, IpAddr); 2] = [
        (
            topo.upstream_v4().into(),
            topo.pod_v4().into(),
            Ipv4Addr::LOCALHOST.into(),
        ),
        (
            topo.upstream_v6().into(),
            topo.pod_v6().into(),
            Ipv6Addr::LOCALHOST.into(),
        ),
    ];
    for (up_ip, pod_ip, lo) in cases {
        let dst = sa(up_ip, UPSTREAM_PORT);
        // An application (uid 1000) is redirected to the sidecar's outbound listener...
        let out = topo.connect_from_pod(1000, 1000, dst).unwrap();
        assert_eq!(out.reply, "sidecar:15001", "{dst}");
        assert_eq!(out.peer, dst, "the app still believes it talks to {dst}");
        let rec = sidecar.take_records();
        assert_eq!(rec.len(), 1, "{rec:?}");
        assert_eq!(rec[0].listener_port, 15001);
        assert_eq!(rec[0].original_dst, Some(dst), "SO_ORIGINAL_DST");
        assert_eq!(rec[0].local, sa(lo, 15001), "REDIRECT goes to loopback");
        assert_eq!(rec[0].peer.ip(), pod_ip);
        assert_eq!(rec[0].peer, out.local);

        // ...while the proxy's own uid (1337) goes straight to the upstream.
        let out = topo.connect_from_pod(1337, 1337, dst).unwrap();
        assert_eq!(out.reply, "upstream:8080", "{dst}");
        assert!(sidecar.records().is_empty());
    }
}

#[test]
fn iptables_nft_redirect_reaches_sidecar_with_original_dst() {
    redirect_reaches_sidecar("nft");
}

#[test]
fn iptables_legacy_redirect_reaches_sidecar_with_original_dst() {
    redirect_reaches_sidecar("legacy");
}

#[test]
fn sidecar_listens_as_1337_on_both_ports() {
    let topo = Topology::new("sidecar").unwrap();
    let _sidecar = Sidecar::start(&topo).unwrap();
    // /proc/thread-self/net shows the calling thread's namespace (/proc/self/net would show
    // the main thread's, i.e. the host's).
    let tables = run_in_netns(topo.pod_netns(), || {
        let v4 = std::fs::read_to_string("/proc/thread-self/net/tcp").unwrap();
        let v6 = std::fs::read_to_string("/proc/thread-self/net/tcp6").unwrap();
        v4 + &v6
    })
    .unwrap();
    for port in [15001u16, 15006] {
        let suffix = format!(":{port:04X}");
        let listeners: Vec<&str> = tables
            .lines()
            .filter(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.len() > 7 && f[1].ends_with(&suffix) && f[3] == "0A"
            })
            .collect();
        assert_eq!(
            listeners.len(),
            2,
            "v4 and v6 listeners on {port}:\n{tables}"
        );
        for l in listeners {
            assert_eq!(l.split_whitespace().nth(7), Some("1337"), "{l}");
        }
    }
    // Inbound listener answers too.
    let out = topo
        .inbound_connect(sa(topo.pod_v4(), 15006), None)
        .unwrap();
    assert_eq!(out.reply, "sidecar:15006");
}

#[test]
fn run_in_netns_uses_the_pod_namespace() {
    let topo = Topology::new("runns").unwrap();
    let pod_addr = sa(topo.pod_v4(), 0);
    // The pod address exists only inside the pod namespace.
    assert!(
        TcpListener::bind(pod_addr).is_err(),
        "10.200.x.1 must not exist on the host"
    );
    let listener = run_in_netns(topo.pod_netns(), || TcpListener::bind(pod_addr))
        .unwrap()
        .unwrap();
    // The socket stays in the pod namespace and is usable from this thread: accept a
    // connection made from the upstream namespace.
    let port = listener.local_addr().unwrap().port();
    let acceptor = std::thread::spawn(move || {
        let (mut stream, peer) = listener.accept().unwrap();
        stream.write_all(b"raw\n").unwrap();
        peer
    });
    let out = topo.inbound_connect(sa(topo.pod_v4(), port), None).unwrap();
    assert_eq!(out.reply, "raw");
    let peer = acceptor.join().unwrap();
    assert_eq!(peer.ip(), IpAddr::from(topo.upstream_v4()));

    // A panic inside the closure propagates to the caller.
    let r = std::panic::catch_unwind(|| run_in_netns(topo.pod_netns(), || panic!("inner")));
    assert!(r.is_err());
    // The host namespace is refused.
    assert!(run_in_netns(Path::new("/proc/self/ns/net"), || ()).is_err());
    assert!(connect_as(
        Path::new("/proc/self/ns/net"),
        0,
        0,
        sa(Ipv4Addr::LOCALHOST, 1),
        None,
        Duration::from_secs(1)
    )
    .is_err());
}

/// A stopped server is gone even while another process still holds a copy of its listener (a
/// child that a parallel test forked, as every `connect_with` does, holds the whole fd table
/// until it closes it): connections are refused, not completed into the backlog and reset
/// when the copy closes. `faults::proxy_crash_and_restart` relies on this when it stops the
/// proxy; closing the fd alone once let it see a reset under the parallel suite.
#[test]
fn stopped_server_refuses_while_a_forked_child_holds_its_listener() {
    /// Kills and reaps the child, also when an assertion fails.
    struct Child(libc::pid_t);
    impl Drop for Child {
        fn drop(&mut self) {
            // SAFETY: our own child, not yet reaped.
            unsafe {
                libc::kill(self.0, libc::SIGKILL);
                libc::waitpid(self.0, std::ptr::null_mut(), 0);
            }
        }
    }
    let topo = Topology::new("stop").unwrap();
    let upstream = TagServer::upstream(&topo, UPSTREAM_PORT).unwrap();
    let dst = sa(topo.upstream_v4(), UPSTREAM_PORT);
    let reply = topo.connect_from_pod(1000, 1000, dst).unwrap().reply;
    assert_eq!(reply, format!("upstream:{UPSTREAM_PORT}"));
    // SAFETY: the child only waits in pause() (async-signal-safe) until it is SIGKILLed.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
    if pid == 0 {
        loop {
            // SAFETY: as above.
            unsafe { libc::pause() };
        }
    }
    let child = Child(pid);
    drop(upstream);
    let err = topo
        .connect_from_pod(1000, 1000, dst)
        .expect_err("a stopped server answered");
    drop(child);
    let ce = err.downcast_ref::<ConnectError>().expect("a ConnectError");
    assert!(ce.is_refused(), "want connection refused, got {ce}");
}

#[test]
fn client_errors_are_classified() {
    let topo = Topology::new("errors").unwrap();
    // Nothing listens: refused.
    let err = topo
        .connect_from_pod(1000, 1000, sa(topo.upstream_v4(), 1))
        .unwrap_err();
    let ce = err.downcast_ref::<ConnectError>().expect("a ConnectError");
    assert!(ce.is_refused(), "{ce}");

    // The upstream namespace does not forward: a third network is a silent black hole.
    let x = topo.index();
    let hole = sa(Ipv4Addr::new(10, 202, x, 2), 80);
    let t = std::time::Instant::now();
    let err = connect_as(
        topo.pod_netns(),
        1000,
        1000,
        hole,
        None,
        Duration::from_millis(300),
    )
    .unwrap_err();
    let ce = err.downcast_ref::<ConnectError>().expect("a ConnectError");
    assert_eq!((ce.stage, ce.is_timeout()), (Stage::Connect, true), "{ce}");
    assert!(t.elapsed() < Duration::from_secs(2));

    // A listener that never answers: connected, then the read times out.
    let silent = run_in_netns(topo.pod_netns(), || TcpListener::bind("127.0.0.1:0"))
        .unwrap()
        .unwrap();
    let dst = silent.local_addr().unwrap();
    let err = connect_as(
        topo.pod_netns(),
        1000,
        1000,
        dst,
        None,
        Duration::from_millis(300),
    )
    .unwrap_err();
    let ce = err.downcast_ref::<ConnectError>().expect("a ConnectError");
    assert_eq!((ce.stage, ce.is_timeout()), (Stage::Read, true), "{ce}");
}

#[test]
fn client_can_join_a_cgroup() {
    let Some(mount) = cgroup2_mount() else {
        eprintln!("SKIP: no cgroup2 mount");
        return;
    };
    let topo = Topology::new("cgroup").unwrap();
    let _upstream = TagServer::upstream(&topo, UPSTREAM_PORT).unwrap();
    let cg = TestCgroup::new(topo.prefix()).unwrap();
    assert!(cg.path().starts_with(&mount));
    let opts = ConnectOpts {
        uid: 1000,
        gid: 1000,
        cgroup: Some(cg.path().to_path_buf()),
        ..ConnectOpts::default()
    };
    let out = connect_with(
        topo.pod_netns(),
        sa(topo.upstream_v4(), UPSTREAM_PORT),
        &opts,
    )
    .unwrap();
    assert_eq!(out.reply, "upstream:8080");
    let path = cg.path().to_path_buf();
    drop(cg);
    assert!(!path.exists(), "cgroup removed on drop");
}

#[test]
fn drop_removes_namespaces() {
    let topo = Topology::new("drop").unwrap();
    let names = [
        topo.pod_ns_name().to_string(),
        topo.upstream_ns_name().to_string(),
    ];
    let sidecar = Sidecar::start(&topo).unwrap();
    let upstream = TagServer::upstream(&topo, UPSTREAM_PORT).unwrap();
    assert!(topo.exec_in(Ns::Upstream, "true", &[], None).is_ok());
    let list = netns_list();
    assert!(names.iter().all(|n| list.contains(n.as_str())), "{list}");
    drop(sidecar);
    drop(upstream);
    drop(topo);
    let list = netns_list();
    assert!(names.iter().all(|n| !list.contains(n.as_str())), "{list}");

    // Also when the test panics while the topology is alive.
    let mut names = Vec::new();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let topo = Topology::new("panic").unwrap();
        names.push(topo.pod_ns_name().to_string());
        names.push(topo.upstream_ns_name().to_string());
        let _sidecar = Sidecar::start(&topo).unwrap();
        panic!("test failure inside the topology");
    }));
    assert!(r.is_err());
    let list = netns_list();
    assert_eq!(names.len(), 2);
    assert!(names.iter().all(|n| !list.contains(n.as_str())), "{list}");

    // A bad tag fails before creating anything.
    assert!(Topology::new("bad tag").is_err());
}
