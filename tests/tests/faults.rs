//! Faults inside a pod: the proxy crashing and coming back. As with Istio's REDIRECT, while the
//! proxy is down outbound and inbound connections are refused (never sent around it to the
//! upstream or the app), and once it listens again they are captured again — on both backends.

use std::net::SocketAddr;

use interceptor_tests::cases::{apply_in, Flavor, APP_PORT};
use interceptor_tests::ebpf::EbpfInstall;
use interceptor_tests::sidecar::{Sidecar, TagServer};
use interceptor_tests::topology::{ConnectError, Topology};

const UPSTREAM_PORT: u16 = 8080;

fn refused(r: anyhow::Result<interceptor_tests::topology::Outcome>, what: &str) {
    match r {
        Ok(o) => panic!("{what}: reached {} while the proxy was down", o.reply),
        Err(e) => assert!(
            e.downcast_ref::<ConnectError>()
                .is_some_and(|c| c.is_refused()),
            "{what}: want connection refused, got {e:#}"
        ),
    }
}

#[test]
fn proxy_crash_and_restart() {
    for flavor in [Flavor::IptablesNft, Flavor::Ebpf] {
        let topo = Topology::new("pcr").unwrap();
        let ebpf = EbpfInstall::new("pcr");
        let _app = TagServer::spawn(topo.pod_netns(), "app", &[APP_PORT], None).unwrap();
        let _up =
            TagServer::spawn(topo.upstream_netns(), "upstream", &[UPSTREAM_PORT], None).unwrap();
        let mut sidecar = Some(Sidecar::start(&topo).unwrap());
        let flags = ["-i", "*", "-b", "*", "--ipv6", "false"];
        apply_in(topo.pod_netns(), ebpf.dir(), flavor, &flags).unwrap();
        let outbound = SocketAddr::new(topo.upstream_v4().into(), UPSTREAM_PORT);
        let inbound = SocketAddr::new(topo.pod_v4().into(), APP_PORT);
        let captured = |when: &str| {
            let o = topo.connect_from_pod(1000, 1000, outbound).unwrap();
            assert_eq!(o.reply, "sidecar:15001", "{flavor:?} {when}: outbound");
            let i = topo.inbound_connect(inbound, None).unwrap();
            assert_eq!(i.reply, "sidecar:15006", "{flavor:?} {when}: inbound");
        };
        captured("before the crash");
        for round in 0..3 {
            drop(sidecar.take());
            refused(
                topo.connect_from_pod(1000, 1000, outbound),
                &format!("{flavor:?} round {round}: outbound"),
            );
            refused(
                topo.inbound_connect(inbound, None),
                &format!("{flavor:?} round {round}: inbound"),
            );
            sidecar = Some(Sidecar::start(&topo).unwrap());
            captured(&format!("after restart {round}"));
        }
        println!(
            "{flavor:?}: 3 proxy crashes: refused while down, captured again after each restart"
        );
    }
}

/// The daemon SIGKILLed at random moments while pods are added and removed, with a connection
/// loop running through a pod registered before: after every restart each pod is either fully
/// registered (policy entry present, traffic captured) or not at all, redoing the interrupted
/// operation succeeds, and not one connection of the loop escaped interception.
#[test]
fn daemon_killed_mid_operation_converges() {
    use interceptor::backend::ebpf::{netns_identity, Pins};
    use interceptor_tests::daemon::DaemonProc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    let rounds = ((20.0 / interceptor_tests::time_scale()) as usize).max(5);
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let mut rng = seed | 1;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut d = DaemonProc::start("dkill").unwrap();
    let stable = Topology::new("dkills").unwrap();
    let _sidecar = Sidecar::start(&stable).unwrap();
    let stable_ns = stable.pod_netns().to_str().unwrap().to_string();
    let add = |d: &DaemonProc, ns: &str| {
        d.pod(&[
            "add",
            "--network-namespace",
            ns,
            "-i",
            "*",
            "--backend",
            "ebpf",
        ])
    };
    assert!(add(&d, &stable_ns).status.success());
    let churn: Vec<Topology> = (0..3).map(|_| Topology::new("dkillc").unwrap()).collect();
    let sidecars: Vec<Sidecar> = churn.iter().map(|t| Sidecar::start(t).unwrap()).collect();

    let dst = SocketAddr::new(stable.upstream_v4().into(), UPSTREAM_PORT);
    let _up =
        TagServer::spawn(stable.upstream_netns(), "upstream", &[UPSTREAM_PORT], None).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let (total, escaped) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let loop_thread = {
        let (stop, total, escaped) = (stop.clone(), total.clone(), escaped.clone());
        let ns = stable.pod_netns().to_path_buf();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let r = interceptor_tests::topology::connect_as(
                    &ns,
                    1000,
                    1000,
                    dst,
                    None,
                    Duration::from_secs(2),
                );
                if !matches!(r, Ok(ref o) if o.reply == "sidecar:15001") {
                    escaped.fetch_add(1, Ordering::Relaxed);
                }
                total.fetch_add(1, Ordering::Relaxed);
            }
        })
    };

    let t = Instant::now();
    let mut interrupted = 0;
    for round in 0..rounds {
        let topo = &churn[round % churn.len()];
        let ns = topo.pod_netns().to_str().unwrap().to_string();
        let removing = d
            .pod(&["show", "--network-namespace", &ns])
            .status
            .success();
        let op = if removing { "remove" } else { "add" };
        let mut cmd = std::process::Command::new(interceptor_tests::bin::interceptor_bin());
        cmd.args(["pod", op, "--socket"]).arg(d.socket());
        cmd.args(["--network-namespace", &ns]);
        if !removing {
            cmd.args(["-i", "*", "--backend", "ebpf"]);
        }
        let mut child = cmd
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_micros(next() % 30_000));
        d.kill9();
        if !child.wait().is_ok_and(|s| s.success()) {
            interrupted += 1;
        }
        d.spawn().unwrap();
        // Converged: registered with the daemon ⇔ policy in the maps ⇔ traffic captured.
        let maps = Pins::new(d.bpffs()).maps().unwrap();
        for (i, t) in churn.iter().enumerate() {
            let p = t.pod_netns();
            let shown = d
                .pod(&["show", "--network-namespace", p.to_str().unwrap()])
                .status
                .success();
            let cookie = netns_identity(p).unwrap();
            let in_maps = maps.pods().iter().any(|(c, _)| *c == cookie);
            let reply = t
                .connect_from_pod(1000, 1000, SocketAddr::new(t.upstream_v4().into(), 9))
                .map(|o| o.reply)
                .unwrap_or_else(|e| format!("{e:#}"));
            let captured = reply == "sidecar:15001";
            assert!(
                shown == in_maps && in_maps == captured,
                "round {round} ({op} killed): pod {i} half-configured: daemon {shown}, maps \
                 {in_maps}, traffic {reply}"
            );
        }
        // Redoing the interrupted operation reaches the wanted state.
        let redo = if removing {
            d.pod(&["remove", "--network-namespace", &ns])
        } else {
            add(&d, &ns)
        };
        assert!(
            redo.status.success(),
            "round {round}: redo {op}: {}",
            String::from_utf8_lossy(&redo.stderr)
        );
    }
    stop.store(true, Ordering::Relaxed);
    loop_thread.join().unwrap();
    drop(sidecars);
    let (n, lost) = (
        total.load(Ordering::Relaxed),
        escaped.load(Ordering::Relaxed),
    );
    println!(
        "{rounds} daemon kills during pod add/remove (seed {seed:#x}; {interrupted} cut the \
         operation short) in {:.1} s: every pod converged; loop through a registered pod: {n} connections, {lost} escaped",
        t.elapsed().as_secs_f64()
    );
    assert!(n > 0);
    assert_eq!(lost, 0, "connections escaped interception");
}
