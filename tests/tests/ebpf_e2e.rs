//! The eBPF backend end to end: the real programs from interceptor-ebpf (built by the normal
//! cargo build) loaded and pinned by `interceptor apply --backend ebpf`, attached at the cgroup
//! v2 root, serving the pod registered by netns cookie; the same traffic cases as the
//! fallbacks, plus isolation between pods and map hygiene.

use std::net::SocketAddr;

use interceptor_tests::cases::{self, apply, Flavor, Pod};

#[test]
fn traffic_ebpf() {
    let n = cases::outbound_defaults(Flavor::Ebpf).unwrap_or_else(|e| panic!("{e:#}"));
    let m = cases::outbound_includes(Flavor::Ebpf).unwrap_or_else(|e| panic!("{e:#}"));
    println!("Ebpf: {} traffic cases passed", n + m);
}

/// The eBPF path as it runs on Debian 5.10, simulated here: programs loaded without the netns
/// cookie helper outside sock_addr (pruned by the verifier, as a 5.10 kernel needs), pods keyed
/// by the cookie our bind6 program answers instead of SO_NETNS_COOKIE. The same traffic cases
/// pass: the proxy's sockets find their pod from their mark, not from the netns cookie.
#[test]
fn traffic_ebpf_as_on_5_10() {
    let env = [(interceptor::fault::FAULT_ENV, "kernel:5.10")];
    let n = cases::with_apply_env(&env, || {
        cases::outbound_defaults(Flavor::Ebpf)
            .and_then(|n| cases::outbound_includes(Flavor::Ebpf).map(|m| n + m))
    })
    .unwrap_or_else(|e| panic!("{e:#}"));
    println!("eBPF as on 5.10: {n} traffic cases passed");
}

/// Where SO_NETNS_COOKIE is missing (< 5.14), the netns cookie comes from our bind6 program:
/// the answer is the cookie SO_NETNS_COOKIE gives, in a fresh netns; without our programs
/// loaded nothing answers.
#[test]
fn cookie_probe_answers_the_netns_cookie() {
    let pod = Pod::new("cookie").unwrap();
    let ns = pod.topo.pod_netns().to_path_buf();
    let before = interceptor::netns::run_in(Some(&ns), interceptor::netns::cookie_by_bind);
    apply(&pod, Flavor::Ebpf, &["-i", "*"]).unwrap();
    let want = interceptor::netns::cookie(Some(&ns)).unwrap();
    let got = interceptor::netns::run_in(Some(&ns), interceptor::netns::cookie_by_bind).unwrap();
    assert_eq!(got, Some(want), "the bind6 cookie probe's answer");
    // Other pods' objects may be attached at the root too (tests run in parallel), so only
    // a clean answer or none is acceptable before: never a wrong cookie.
    let before = before.unwrap();
    assert!(before.is_none() || before == Some(want), "{before:?}");
}

/// Two pods with different configs in one installation do not affect each other, an
/// unregistered netns is untouched, and `remove` stops interception.
#[test]
fn pods_are_isolated_and_removable() {
    let a = Pod::new("isoa").unwrap();
    let b = Pod::new("isob").unwrap();
    let c = Pod::new("isoc").unwrap();
    // Pod b registers in pod a's installation so one program set serves both.
    let bpffs = a.ebpf.dir().to_str().unwrap().to_string();
    apply(&a, Flavor::Ebpf, &["-i", "*", "--ipv6", "true"]).unwrap();
    let b_ns = b.topo.pod_netns().to_str().unwrap().to_string();
    let out = interceptor_tests::bin::run(
        &[
            "apply",
            "--backend",
            "ebpf",
            "--bpffs",
            &bpffs,
            "--network-namespace",
            &b_ns,
            "-i",
            "*",
            "-o",
            "8080",
        ],
        &[],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let up = |p: &Pod| SocketAddr::new(p.topo.upstream_v4().into(), 8080);
    assert_eq!(
        a.outbound(1000, up(&a)).unwrap().0,
        "sidecar:15001",
        "pod a is captured"
    );
    assert_eq!(
        b.outbound(1000, up(&b)).unwrap().0,
        "upstream:8080",
        "pod b excludes port 8080"
    );
    assert_eq!(
        c.outbound(1000, up(&c)).unwrap().0,
        "upstream:8080",
        "pod c is not registered"
    );
    let out = interceptor_tests::bin::run(
        &[
            "remove",
            "--bpffs",
            &bpffs,
            "--network-namespace",
            a.topo.pod_netns().to_str().unwrap(),
        ],
        &[],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        a.outbound(1000, up(&a)).unwrap().0,
        "upstream:8080",
        "pod a after remove"
    );
}

/// Per-connection state is removed when connections close: after thousands of redirected
/// connections the entry counts are back at their baseline.
#[test]
fn connection_state_returns_to_baseline() {
    let pod = Pod::new("leak").unwrap();
    apply(&pod, Flavor::Ebpf, &["-i", "*", "--ipv6", "true"]).unwrap();
    let maps = pod.ebpf.pins.maps().unwrap();
    let baseline = maps.connection_entries();
    let up = SocketAddr::new(pod.topo.upstream_v4().into(), 8080);
    let n = 5000;
    let redirected = interceptor_tests::topology::run_in_netns(pod.topo.pod_netns(), move || {
        // Same-process connects are as real to the hooks as forked clients, and much faster.
        let mut ok = 0;
        for _ in 0..n {
            if let Ok(mut s) =
                std::net::TcpStream::connect_timeout(&up, std::time::Duration::from_secs(2))
            {
                let mut buf = [0u8; 32];
                let _ = std::io::Read::read(&mut s, &mut buf);
                if buf.starts_with(b"sidecar:15001") {
                    ok += 1;
                }
            }
        }
        ok
    })
    .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    let after = maps.connection_entries();
    println!("{redirected}/{n} connections redirected; per-connection entries before {baseline:?}, after {after:?}");
    assert_eq!(redirected, n, "every connection must be redirected");
    assert_eq!(after, baseline, "per-connection map entries leaked");
}

/// `--ebpf-log` turns the programs' decision log on; `interceptor logs` prints it. Without the
/// flag the log calls are pruned by the verifier and nothing is logged.
#[test]
fn ebpf_log_is_off_unless_asked_for() {
    for (log, want) in [(true, true), (false, false)] {
        let pod = Pod::new("elog").unwrap();
        let mut flags = vec!["-i", "*", "--ipv6", "true"];
        if log {
            flags.push("--ebpf-log");
        }
        apply(&pod, Flavor::Ebpf, &flags).unwrap();
        let bpffs = pod.ebpf.dir().to_str().unwrap().to_string();
        let bin = interceptor_tests::bin::interceptor_bin();
        let child = std::process::Command::new(bin)
            .args(["logs", "--seconds", "1.5", "--bpffs", &bpffs])
            .stderr(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(300));
        let up = SocketAddr::new(pod.topo.upstream_v4().into(), 8080);
        assert_eq!(pod.outbound(1000, up).unwrap().0, "sidecar:15001");
        let out = child.wait_with_output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(text.contains("connect netns="), want, "log={log}: {text}");
        if want {
            assert!(text.contains("dport=8080 -> port=15001"), "{text}");
        }
    }
}
