//! The node-level daemon: many pods registered over the control socket with correct traffic in
//! each, per-pod fallback, kill -9 under traffic with re-adoption, a root-only socket, and a
//! metrics endpoint that idle and slow clients cannot stall.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use interceptor_tests::cases::{Pod, UPSTREAM_PORT};
use interceptor_tests::daemon::DaemonProc;
use interceptor_tests::sidecar::{Sidecar, TagServer};
use interceptor_tests::topology::{connect_as, Topology};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn add_micros(json: &str) -> f64 {
    let v: serde_json::Value = serde_json::from_str(json).unwrap();
    v["add_micros"].as_f64().unwrap()
}

/// 50 pods, each its own netns with a sidecar and an upstream; each registered through the
/// daemon and each captured correctly. As with a CNI ADD, the pod is registered before its
/// containers (the sidecar) start; the sidecar's listener then registers itself. Also times
/// registration against applying the same config as iptables rules.
#[test]
fn fifty_pods_through_the_daemon() {
    let d = DaemonProc::start("d50").unwrap();
    let mut pods = Vec::new();
    let mut ebpf_us = Vec::new();
    for _ in 0..50 {
        let topo = Topology::new("d50p").unwrap();
        let sidecar = Sidecar::start(&topo).unwrap();
        let up =
            TagServer::spawn(topo.upstream_netns(), "upstream", &[UPSTREAM_PORT], None).unwrap();
        let ns = topo.pod_netns().to_str().unwrap().to_string();
        let out = d.pod_ok(&[
            "add",
            "--network-namespace",
            &ns,
            "-i",
            "*",
            "-b",
            "*",
            "--ipv6",
            "false",
            "--pod",
            "default/app",
        ]);
        ebpf_us.push(add_micros(&out));
        pods.push((topo, sidecar, up));
    }
    let mut ok = 0;
    for (topo, sidecar, _) in &pods {
        let dst = SocketAddr::new(topo.upstream_v4().into(), UPSTREAM_PORT);
        let out = topo.connect_from_pod(1000, 1000, dst).unwrap();
        assert_eq!(
            out.reply,
            "sidecar:15001",
            "{}: not captured",
            topo.pod_ns_name()
        );
        assert_eq!(sidecar.take_records()[0].original_dst, Some(dst));
        assert_eq!(
            topo.connect_from_pod(1337, 1337, dst).unwrap().reply,
            "upstream:8080"
        );
        ok += 1;
    }
    let list: serde_json::Value = serde_json::from_str(&d.pod_ok(&["list", "-o", "json"])).unwrap();
    assert_eq!(
        list["pods"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["backend"] == "ebpf")
            .count(),
        50,
        "{list}"
    );
    // The same config applied as iptables rules in fresh netns, for comparison.
    let mut ipt_us = Vec::new();
    for _ in 0..10 {
        let topo = Topology::new("d50i").unwrap();
        let ns = topo.pod_netns().to_str().unwrap().to_string();
        let out = d.pod_ok(&[
            "add",
            "--network-namespace",
            &ns,
            "--backend",
            "iptables",
            "-i",
            "*",
            "-b",
            "*",
            "--ipv6",
            "false",
        ]);
        ipt_us.push(add_micros(&out));
    }
    let (e, i) = (median(ebpf_us), median(ipt_us));
    println!("50 pods captured correctly ({ok}); pod add median: eBPF {e:.0} µs, iptables {i:.0} µs ({:.1}x)", i / e);
    for (topo, _, _) in &pods {
        let ns = topo.pod_netns().to_str().unwrap().to_string();
        d.pod_ok(&["remove", "--network-namespace", &ns]);
    }
    let list = d.pod_ok(&["list", "-o", "json"]);
    assert!(!list.contains("\"ebpf\""), "pods left after remove: {list}");
}

/// A pod whose config eBPF cannot honour gets the fallback inside its netns, and `pod show` says
/// which backend and why; remove takes the rules out again.
#[test]
fn per_pod_fallback() {
    let d = DaemonProc::start("dfb").unwrap();
    let pod = Pod::new("dfb").unwrap();
    let ns = pod.topo.pod_netns().to_str().unwrap().to_string();
    d.pod_ok(&[
        "add",
        "--network-namespace",
        &ns,
        "-i",
        "*",
        "-c",
        "eth9",
        "--ipv6",
        "false",
    ]);
    let show = d.pod_ok(&["show", "-o", "json", "--network-namespace", &ns]);
    assert!(
        show.contains("\"backend\": \"iptables\"") && show.contains("exclude-interfaces"),
        "{show}"
    );
    let dst = SocketAddr::new(pod.topo.upstream_v4().into(), UPSTREAM_PORT);
    assert_eq!(pod.outbound(1000, dst).unwrap().0, "sidecar:15001");
    d.pod_ok(&["remove", "--network-namespace", &ns]);
    assert_eq!(
        pod.outbound(1000, dst).unwrap().0,
        "upstream:8080",
        "rules left after remove"
    );
    // Bad input is refused with the flag named and nothing registered.
    let out = d.pod(&["add", "--network-namespace", &ns, "-i", "10.0.0.0/33"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("--istio-service-cidr"));
    assert!(!d.pod_ok(&["list"]).contains(&ns));
    // `pod add --dry-run` prints the registration it would send and registers nothing.
    let plan = d.pod_ok(&["add", "--network-namespace", &ns, "-i", "*", "--dry-run"]);
    let plan: serde_json::Value = serde_json::from_str(&plan).expect("dry run prints JSON");
    assert_eq!(plan["netns"], ns.as_str(), "{plan}");
    assert_eq!(plan["config"]["outbound_ip_ranges_include"], "*", "{plan}");
    assert!(
        !d.pod_ok(&["list"]).contains(&ns),
        "a dry run registered the pod"
    );
    assert_eq!(pod.outbound(1000, dst).unwrap().0, "upstream:8080");
    let out = d.pod(&["add", "--network-namespace", &ns, "-i", "10.0.0.0/33", "-n"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "a dry run validates as the daemon does"
    );
}

/// kill -9 the daemon while a connection loop runs through a pod: not one connection escapes
/// interception (links stay pinned), and the restarted daemon re-adopts the pod and forgets one
/// whose netns disappeared meanwhile.
#[test]
fn restart_under_traffic() {
    let mut d = DaemonProc::start("drs").unwrap();
    let pod = Pod::new("drs").unwrap();
    let gone = Topology::new("drsg").unwrap();
    for ns in [pod.topo.pod_netns(), gone.pod_netns()] {
        d.pod_ok(&[
            "add",
            "--network-namespace",
            ns.to_str().unwrap(),
            "-i",
            "*",
            "--ipv6",
            "false",
        ]);
    }
    let dst = SocketAddr::new(pod.topo.upstream_v4().into(), UPSTREAM_PORT);
    let stop = Arc::new(AtomicBool::new(false));
    let (total, escaped) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let loop_thread = {
        let (stop, total, escaped) = (stop.clone(), total.clone(), escaped.clone());
        let ns = pod.topo.pod_netns().to_path_buf();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match connect_as(&ns, 1000, 1000, dst, None, Duration::from_secs(2)) {
                    Ok(o) if o.reply == "sidecar:15001" => {}
                    _ => {
                        escaped.fetch_add(1, Ordering::Relaxed);
                    }
                }
                total.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    let t0 = Instant::now();
    d.kill9();
    drop(gone); // its netns disappears while no daemon runs
    std::thread::sleep(Duration::from_millis(500));
    d.spawn().unwrap();
    let restart = t0.elapsed();
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    loop_thread.join().unwrap();
    let (n, lost) = (
        total.load(Ordering::Relaxed),
        escaped.load(Ordering::Relaxed),
    );
    println!(
        "restart test: {n} connections across a kill -9 + restart ({restart:?}), {lost} escaped"
    );
    assert!(n > 20, "the loop made too few connections: {n}");
    assert_eq!(lost, 0, "connections escaped interception");
    let list = d.pod_ok(&["list"]);
    assert!(
        list.contains(pod.topo.pod_ns_name()),
        "pod not re-adopted: {list}"
    );
    assert!(
        !list.contains("drsg"),
        "a pod whose netns is gone was kept: {list}\n{}",
        d.log()
    );
    assert_eq!(pod.outbound(1000, dst).unwrap().0, "sidecar:15001");
}

/// A record the restarted daemon cannot read fails closed: its pod stays intercepted (no map
/// entry is purged as "unrecorded"), the record is logged, counted and shown by `pod list`
/// (text and `-o json`), the other pods are re-adopted and new ones served, and removing the
/// pod clears it.
#[test]
fn an_unreadable_record_keeps_its_pod_intercepted() {
    let mut d = DaemonProc::start("dunr").unwrap();
    let (broken, fine) = (Pod::new("dunr").unwrap(), Pod::new("dunf").unwrap());
    let add = |d: &DaemonProc, ns: &str| {
        d.pod_ok(&[
            "add",
            "--network-namespace",
            ns,
            "-i",
            "*",
            "--ipv6",
            "false",
        ]);
    };
    let ns_of = |p: &Pod| p.topo.pod_netns().to_str().unwrap().to_string();
    for p in [&broken, &fine] {
        add(&d, &ns_of(p));
    }
    let dst = |p: &Pod| SocketAddr::new(p.topo.upstream_v4().into(), UPSTREAM_PORT);
    d.kill9();
    let file = d
        .record_of(broken.topo.pod_netns())
        .expect("the pod's record");
    let text = std::fs::read(&file).unwrap();
    std::fs::write(&file, &text[..text.len() / 2]).unwrap(); // torn: half a record
    d.spawn().unwrap();

    for p in [&broken, &fine] {
        assert_eq!(
            p.outbound(1000, dst(p)).unwrap().0,
            "sidecar:15001",
            "{}: interception lost across the restart\n{}",
            p.topo.pod_ns_name(),
            d.log()
        );
    }
    let list = d.pod_ok(&["list"]);
    assert!(
        list.contains("unreadable record") && list.contains(&ns_of(&broken)),
        "{list}"
    );
    assert!(list.contains(&format!("{} ", ns_of(&fine))), "{list}");
    let json: serde_json::Value = serde_json::from_str(&d.pod_ok(&["list", "-o", "json"])).unwrap();
    let bad = json["unreadable_records"].as_array().unwrap();
    assert_eq!(bad.len(), 1, "{json}");
    assert_eq!(bad[0]["netns"].as_str(), Some(ns_of(&broken).as_str()));
    assert!(
        bad[0]["error"]
            .as_str()
            .unwrap()
            .contains("not a pod record"),
        "{json}"
    );
    assert_eq!(json["pods"].as_array().unwrap().len(), 1, "{json}");
    assert!(d.log().contains("unreadable pod record"), "{}", d.log());
    let metrics = d.scrape().unwrap();
    assert_eq!(
        DaemonProc::sample(&metrics, "interceptor_unreadable_records", &[]),
        Some(1.0)
    );
    let show = d.pod(&["show", "--network-namespace", &ns_of(&broken)]);
    assert!(String::from_utf8_lossy(&show.stderr).contains("unreadable"));

    // New pods are served meanwhile.
    let other = Pod::new("duno").unwrap();
    add(&d, &ns_of(&other));
    assert_eq!(
        other.outbound(1000, dst(&other)).unwrap().0,
        "sidecar:15001"
    );

    // Its pod's removal (a CNI DEL) takes its interception and the record away.
    d.pod_ok(&["remove", "--network-namespace", &ns_of(&broken)]);
    assert_eq!(
        broken.outbound(1000, dst(&broken)).unwrap().0,
        "upstream:8080"
    );
    assert!(!d.pod_ok(&["list"]).contains("unreadable"));
    let metrics = d.scrape().unwrap();
    assert_eq!(
        DaemonProc::sample(&metrics, "interceptor_unreadable_records", &[]),
        Some(0.0)
    );
    assert_eq!(fine.outbound(1000, dst(&fine)).unwrap().0, "sidecar:15001");
}

/// A pod whose removal fails in its netns (iptables fails there) is kept as `removing` with the
/// reason, and a daemon restarted with it still starts and serves other pods; the removal is
/// reported (list, metric) and finished by the restart once iptables works again.
#[test]
fn a_failing_removal_does_not_stop_the_daemon() {
    let mut d = DaemonProc::start("dfrm").unwrap();
    let stuck = Pod::new("dfrm").unwrap();
    let ns = stuck.topo.pod_netns().to_str().unwrap().to_string();
    d.pod_ok(&[
        "add",
        "--network-namespace",
        &ns,
        "--backend",
        "iptables",
        "-i",
        "*",
        "--ipv6",
        "false",
    ]);
    let dst = |p: &Pod| SocketAddr::new(p.topo.upstream_v4().into(), UPSTREAM_PORT);
    assert_eq!(
        stuck.outbound(1000, dst(&stuck)).unwrap().0,
        "sidecar:15001"
    );

    // iptables fails for the daemon: every flavour's tools exit 1.
    let bin = d.dir.join("failing-bin");
    std::fs::create_dir_all(&bin).unwrap();
    for base in ["iptables", "ip6tables"] {
        for flavour in ["", "-legacy", "-nft"] {
            for tool in ["", "-save", "-restore"] {
                let f = bin.join(format!("{base}{flavour}{tool}"));
                std::fs::write(&f, "#!/bin/sh\necho 'iptables fails (test)' >&2\nexit 1\n")
                    .unwrap();
                std::fs::set_permissions(&f, std::os::unix::fs::PermissionsExt::from_mode(0o755))
                    .unwrap();
            }
        }
    }
    let path = std::env::var("PATH").unwrap_or_default();
    d.kill9();
    d.set_env("PATH", &format!("{}:{path}", bin.display()));
    d.spawn().unwrap();
    let out = d.pod(&["remove", "--network-namespace", &ns]);
    assert!(!out.status.success(), "the removal did not fail");
    d.kill9();
    d.spawn()
        .expect("a failing removal stopped the daemon from starting");

    let list = d.pod_ok(&["list"]);
    assert!(
        list.contains("removal failed") && list.contains(&ns),
        "{list}"
    );
    let json: serde_json::Value = serde_json::from_str(&d.pod_ok(&["list", "-o", "json"])).unwrap();
    let pod = &json["pods"][0];
    assert_eq!(pod["removing"], true, "{json}");
    assert!(
        pod["removal_error"].as_str().is_some_and(|e| !e.is_empty()),
        "{json}"
    );
    let metrics = d.scrape().unwrap();
    assert_eq!(
        DaemonProc::sample(&metrics, "interceptor_failed_removals", &[]),
        Some(1.0)
    );
    assert!(d.log().contains("cannot finish the removal"), "{}", d.log());
    // Other pods are served.
    let other = Pod::new("dfro").unwrap();
    let other_ns = other.topo.pod_netns().to_str().unwrap().to_string();
    d.pod_ok(&[
        "add",
        "--network-namespace",
        &other_ns,
        "-i",
        "*",
        "--ipv6",
        "false",
    ]);
    assert_eq!(
        other.outbound(1000, dst(&other)).unwrap().0,
        "sidecar:15001"
    );

    // iptables works again: the next start finishes the removal.
    d.kill9();
    d.set_env("PATH", &path);
    d.spawn().unwrap();
    let list = d.pod_ok(&["list"]);
    assert!(
        !list.contains(&ns),
        "removal not finished: {list}\n{}",
        d.log()
    );
    assert_eq!(
        stuck.outbound(1000, dst(&stuck)).unwrap().0,
        "upstream:8080"
    );
    assert_eq!(
        other.outbound(1000, dst(&other)).unwrap().0,
        "sidecar:15001"
    );
}

/// Only root may use the control socket: the file is 0600, and the daemon checks the peer's
/// credentials even if the file mode is loosened.
#[test]
fn control_socket_is_root_only() {
    let d = DaemonProc::start("droot").unwrap();
    let sock = d.socket();
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&sock).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    let as_nobody = |sock: &std::path::Path| {
        std::process::Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(interceptor_tests::bin::interceptor_bin())
            .args(["pod", "list", "--socket"])
            .arg(sock)
            .output()
            .unwrap()
    };
    let out = as_nobody(&sock);
    assert!(!out.status.success(), "a non-root peer used the socket");
    // Loosen the file mode: the daemon's own peer check must still refuse.
    std::fs::set_permissions(&d.dir, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&sock, std::os::unix::fs::PermissionsExt::from_mode(0o666)).unwrap();
    let out = as_nobody(&sock);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("root only"),
        "peer check: {stderr}"
    );
}

/// The metrics endpoint is scraped and its counters match the traffic sent.
#[test]
fn metrics_match_the_traffic() {
    let d = DaemonProc::start("dmet").unwrap();
    let pod = Pod::new("dmet").unwrap();
    let ns = pod.topo.pod_netns().to_str().unwrap().to_string();
    d.pod_ok(&[
        "add",
        "--network-namespace",
        &ns,
        "-i",
        "*",
        "-b",
        "*",
        "-o",
        "9999",
        "--ipv6",
        "false",
        "--pod",
        "shop/cart",
    ]);
    let up = SocketAddr::new(pod.topo.upstream_v4().into(), UPSTREAM_PORT);
    let excl = SocketAddr::new(pod.topo.upstream_v4().into(), 9999);
    let inbound = SocketAddr::new(pod.topo.pod_v4().into(), 9080);
    for _ in 0..5 {
        assert_eq!(pod.outbound(1000, up).unwrap().0, "sidecar:15001");
    }
    for _ in 0..3 {
        assert_eq!(pod.outbound(1337, up).unwrap().0, "upstream:8080");
    }
    for _ in 0..2 {
        assert_eq!(pod.outbound(1000, excl).unwrap().0, "upstream:9999");
    }
    for _ in 0..4 {
        assert_eq!(
            pod.topo.inbound_connect(inbound, None).unwrap().reply,
            "sidecar:15006"
        );
    }
    let text = d.scrape().unwrap();
    let pod_l = "pod=\"shop/cart\"";
    let get = |m: &str, l: &[&str]| {
        DaemonProc::sample(&text, m, l).unwrap_or_else(|| panic!("{m} {l:?} missing:\n{text}"))
    };
    // Where `auto` fell back (no eBPF here), the same redirect counts come from the pod's nat
    // rule counters; the per-reason and SO_ORIGINAL_DST counters are eBPF's only.
    let show = d.pod_ok(&["show", "-o", "json", "--network-namespace", &ns]);
    if !show.contains("\"backend\": \"ebpf\"") {
        assert!(
            !interceptor_tests::ebpf_expected(),
            "auto did not pick eBPF: {show}"
        );
        assert!(show.contains("\"backend\": \"iptables\""), "{show}");
        assert_eq!(get("interceptor_pods", &["backend=\"iptables\""]), 1.0);
        assert_eq!(get("interceptor_pods", &["backend=\"ebpf\""]), 0.0);
        for (dir, n) in [("outbound", 5.0), ("inbound", 4.0)] {
            let dir = format!("direction=\"{dir}\"");
            assert_eq!(
                get("interceptor_connections_redirected_total", &[pod_l, &dir]),
                n
            );
        }
        return;
    }
    assert_eq!(get("interceptor_pods", &["backend=\"ebpf\""]), 1.0);
    assert_eq!(
        get(
            "interceptor_connections_redirected_total",
            &[pod_l, "direction=\"outbound\""]
        ),
        5.0
    );
    assert_eq!(
        get(
            "interceptor_connections_redirected_total",
            &[pod_l, "direction=\"inbound\""]
        ),
        4.0
    );
    assert_eq!(
        get(
            "interceptor_connections_passed_total",
            &[pod_l, "reason=\"proxy_uid\""]
        ),
        3.0
    );
    assert_eq!(
        get(
            "interceptor_connections_passed_total",
            &[pod_l, "reason=\"excluded_port\""]
        ),
        2.0
    );
    // The sidecar asked SO_ORIGINAL_DST for each of the 9 connections it accepted.
    assert_eq!(
        get(
            "interceptor_original_dst_total",
            &[pod_l, "result=\"answered\""]
        ),
        9.0
    );
    assert_eq!(
        get(
            "interceptor_original_dst_total",
            &[pod_l, "result=\"missed\""]
        ),
        0.0
    );
    assert_eq!(get("interceptor_map_entries", &["map=\"POD_POLICY\""]), 1.0);
    assert!(get("interceptor_map_capacity", &["map=\"POD_POLICY\""]) >= 1024.0);
}

/// `--program-stats`: the metrics show each program's runs and run time, counted by the kernel
/// while the daemon holds statistics on; without the flag (and with the node's
/// kernel.bpf_stats_enabled off) the series are absent.
#[test]
fn program_stats_are_in_the_metrics_when_asked_for() {
    let node_wide = std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled")
        .is_ok_and(|v| v.trim() == "1");
    {
        let d = DaemonProc::start("dnost").unwrap();
        let text = d.scrape().unwrap();
        assert_eq!(
            text.contains("interceptor_program_runs"),
            node_wide && interceptor_tests::ebpf_expected(),
            "{text}"
        );
    }
    let d = DaemonProc::start_with("dstat", &["--program-stats"]).unwrap();
    if !interceptor_tests::ebpf_expected() {
        return;
    }
    let pod = Pod::new("dstat").unwrap();
    let ns = pod.topo.pod_netns().to_str().unwrap().to_string();
    d.pod_ok(&[
        "add",
        "--network-namespace",
        &ns,
        "-i",
        "*",
        "--ipv6",
        "false",
    ]);
    let up = SocketAddr::new(pod.topo.upstream_v4().into(), UPSTREAM_PORT);
    for _ in 0..5 {
        assert_eq!(pod.outbound(1000, up).unwrap().0, "sidecar:15001");
    }
    let text = d.scrape().unwrap();
    let get = |m: &str, p: &str| {
        let l = format!("program=\"{p}\"");
        DaemonProc::sample(&text, m, &[&l]).unwrap_or_else(|| panic!("{m} {p} missing:\n{text}"))
    };
    for p in ["ic_connect4", "ic_sockops", "ic_getsockopt"] {
        assert!(
            get("interceptor_program_runs_total", p) >= 5.0,
            "{p}:\n{text}"
        );
        assert!(
            get("interceptor_program_run_nanoseconds_total", p) > 0.0,
            "{p}:\n{text}"
        );
    }
}

/// Until `s` is closed by the server (EOF or reset), reading for at most `limit`: how long it
/// took from `since`, or None if it stayed open. With `drip`, writes one more header byte
/// every 100 ms meanwhile (a slow-loris client that never finishes its request).
fn closed_by_server(
    s: &mut TcpStream,
    since: Instant,
    limit: Duration,
    drip: bool,
) -> Option<Duration> {
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut buf = [0u8; 512];
    while since.elapsed() < limit {
        if drip && s.write_all(b"a").is_err() {
            return Some(since.elapsed());
        }
        match s.read(&mut buf) {
            Ok(0) => return Some(since.elapsed()),
            // A response (the server gave up on the request, e.g. 408/431): keep reading to EOF.
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return Some(since.elapsed()),
        }
    }
    None
}

/// The metrics endpoint serves connections concurrently and with limits: 100 connections that
/// send nothing and one slow-loris client (a header byte every 100 ms, never finished) delay
/// neither a scrape nor the health probe, and the header timeout (5 s) closes them all. The
/// hand-written server this replaced served one connection at a time with no timeout: the
/// first idle connection held every scrape and probe forever.
#[test]
fn idle_and_slow_clients_do_not_stall_metrics() {
    let d = DaemonProc::start("dhttp").unwrap();
    let opened = Instant::now();
    let mut idle: Vec<TcpStream> = (0..100)
        .map(|_| TcpStream::connect(d.metrics).unwrap())
        .collect();
    let mut loris = TcpStream::connect(d.metrics).unwrap();
    loris
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")
        .unwrap();
    // The header timeout is 5 s: give the slow client 15 s before calling it never closed.
    let limit = interceptor_tests::scaled(Duration::from_secs(15));
    let loris = std::thread::spawn(move || closed_by_server(&mut loris, opened, limit, true));
    std::thread::sleep(Duration::from_millis(300));

    let bound = interceptor_tests::scaled(Duration::from_secs(1));
    // A metric of every node (eBPF or not: the VM matrix runs this with bpf() denied).
    for (path, want) in [("/metrics", "interceptor_pods"), ("/healthz", "ok")] {
        let start = Instant::now();
        let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n");
        // Read timeout 10 s: long enough to tell a slow answer from none.
        let resp = d
            .http(&req, Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("{path} beside idle and slow clients: {e}"));
        let took = start.elapsed();
        assert!(resp.starts_with("HTTP/1.1 200 "), "{path}: {resp}");
        assert!(resp.contains(want), "{path}: {resp}");
        assert!(
            took < bound,
            "{path} took {took:?} beside idle and slow clients"
        );
    }
    // Limits: GET/HEAD only, no request body, at most 8 KiB of headers.
    let big = format!(
        "GET /metrics HTTP/1.1\r\nHost: localhost\r\nX-Big: {}\r\n\r\n",
        "a".repeat(9000)
    );
    for (req, status) in [
        ("POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n", "405"),
        (
            "GET /metrics HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello",
            "413",
        ),
        ("GET /nothing HTTP/1.1\r\n\r\n", "404"),
        (big.as_str(), "431"),
    ] {
        let resp = d.http(req, Duration::from_secs(10)).unwrap();
        assert!(
            resp.starts_with(&format!("HTTP/1.1 {status} ")),
            "{req:.40}: {resp}"
        );
    }
    // Byte-compatible exposition: the same content type as before.
    let metrics = d.scrape().unwrap();
    assert!(
        metrics
            .to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4\r\n"),
        "{metrics}"
    );

    // Slow loris: closed by the header timeout, not kept open by its trickle.
    let after = loris
        .join()
        .unwrap()
        .expect("the slow-loris client was never closed");
    assert!(
        after >= Duration::from_secs(4),
        "slow client closed after {after:?}: before the header timeout?"
    );
    // The idle connections are closed too (their slots freed), by the same deadline.
    for s in &mut idle {
        let after =
            closed_by_server(s, opened, limit, false).expect("an idle connection stayed open");
        assert!(
            after >= Duration::from_secs(4),
            "idle connection closed after {after:?}"
        );
    }
    // And the endpoint still answers.
    assert!(d
        .http("GET /healthz HTTP/1.0\r\n\r\n", Duration::from_secs(10))
        .unwrap()
        .contains("ok"));
}

/// A pod moved between backends (iptables → eBPF → nftables → …) while connection loops run
/// through it both ways: make before break — the new backend is in place before the old one's
/// interception comes out, so every connection reaches the sidecar or is refused; not one
/// reaches the upstream or the app directly (with the old one removed first, hundreds did).
#[test]
fn backend_switch_is_make_before_break() {
    use interceptor_tests::cases::APP_PORT;
    use interceptor_tests::topology::{ConnectError, Stage};
    let d = DaemonProc::start("dswitch").unwrap();
    let pod = Pod::new("dswitch").unwrap();
    let ns = pod.topo.pod_netns().to_str().unwrap().to_string();
    let add = |backend: &str| d.add_capturing(pod.topo.pod_netns(), &["--backend", backend]);
    add("iptables");
    let out = SocketAddr::new(pod.topo.upstream_v4().into(), UPSTREAM_PORT);
    let inb = SocketAddr::new(pod.topo.pod_v4().into(), APP_PORT);
    let stop = Arc::new(AtomicBool::new(false));
    // One loop per direction: (client netns, uid, destination, the sidecar's answer).
    let loops: Vec<_> = [
        (
            pod.topo.pod_netns().to_path_buf(),
            1000,
            out,
            "sidecar:15001",
        ),
        (
            pod.topo.upstream_netns().to_path_buf(),
            0,
            inb,
            "sidecar:15006",
        ),
    ]
    .into_iter()
    .map(|(from, uid, dst, want)| {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let (mut n, mut refused, mut stalled, mut wrong) = (0u64, 0u64, 0u64, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                // Generous: a busy machine must not look like a lost connection.
                let limit = interceptor_tests::scaled(Duration::from_secs(5));
                match connect_as(&from, uid, uid, dst, None, limit) {
                    Ok(o) if o.reply == want => {}
                    Ok(o) => wrong.push(o.reply),
                    // Refused, by the kernel (nothing listening) or by the connect hook
                    // failing closed (EPERM): not captured, but not escaped either.
                    Err(e)
                        if e.downcast_ref::<ConnectError>().is_some_and(|c| {
                            c.stage == Stage::Connect && (c.is_refused() || c.errno == libc::EPERM)
                        }) =>
                    {
                        refused += 1
                    }
                    // Connected, then no answer in time: reached no server at all (the app or
                    // upstream would have answered). Rare, and only while nftables' table
                    // goes away under an inbound handshake; counted and bounded below.
                    Err(e)
                        if e.downcast_ref::<ConnectError>()
                            .is_some_and(|c| c.stage == Stage::Read && c.is_timeout()) =>
                    {
                        stalled += 1
                    }
                    Err(e) => wrong.push(format!("{e:#}")),
                }
                n += 1;
            }
            (want, n, refused, stalled, wrong)
        })
    })
    .collect();
    std::thread::sleep(Duration::from_millis(200));
    let order = [
        "ebpf", "nftables", "ebpf", "iptables", "nftables", "iptables",
    ];
    let rounds = ((3.0 / interceptor_tests::time_scale()) as usize).max(1);
    for _ in 0..rounds {
        for backend in order {
            let shown = add(backend);
            assert!(
                shown.contains(&format!("\"backend\": \"{backend}\"")),
                "{shown}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    stop.store(true, Ordering::Relaxed);
    for l in loops {
        let (want, n, refused, stalled, wrong) = l.join().unwrap();
        println!(
            "{want}: {n} connections across {} backend switches, {refused} refused, {stalled} \
             unanswered, {} elsewhere",
            rounds * order.len(),
            wrong.len()
        );
        assert!(
            stalled <= 1 + n / 500,
            "{want}: {stalled} of {n} unanswered"
        );
        assert!(n > 20, "{want}: the loop made too few connections: {n}");
        let mut kinds = std::collections::BTreeMap::<&str, usize>::new();
        for w in &wrong {
            *kinds.entry(w.as_str()).or_default() += 1;
        }
        assert!(
            wrong.is_empty(),
            "{want}: connections not captured during a backend switch: {kinds:?}"
        );
    }
    // Only the last backend's interception is left: removing it frees the pod.
    d.pod_ok(&["remove", "--network-namespace", &ns]);
    assert_eq!(pod.outbound(1000, out).unwrap().0, "upstream:8080");
    let left = interceptor_tests::cases::ruleset(&pod.topo).to_lowercase();
    assert!(!left.contains("istio"), "rules left after remove: {left}");
}
