//! Coexistence with another vendor's cgroup BPF programs (`third_party.rs`: a connect-time load
//! balancer for a VIP and a sock_ops tuner, hand-assembled, loaded and attached by the test)
//! at the same cgroup as ours, in either attach order:
//!
//! - both keep working: the balancer still rewrites its VIP (and counts), the app's connections
//!   still reach the sidecar, the proxy's connection to the VIP reaches the backend;
//! - the sock_ops callback flags the tuner sets survive ours (we add ours to them), and ours
//!   survive the tuner's: RTT callbacks reach it, state callbacks (our cleanup) fire;
//! - what the order changes is said: with ours first the sidecar learns the VIP the app asked
//!   for; with the balancer first it learns the backend, and `doctor -o json` names the
//!   balancer as running before ours, with the order we need;
//! - our load never detaches a program attached beside ours, even one attached in the exclusive
//!   mode that makes our own attach fail.
//!
//! Network safety: the VIP (198.18.0.0/15, benchmarking) is only rewritten to the topology's
//! upstream address; the pod's route towards it leads only into the test's upstream netns.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use interceptor::backend::ebpf::sys;
use interceptor_tests::bin;
use interceptor_tests::cases::{apply, Flavor, Pod, APP_UID, UPSTREAM_PORT};
use interceptor_tests::ebpf::EbpfInstall;
use interceptor_tests::third_party::{
    ExclusiveGetsockopt, Scope, ThirdParty, OP_RTT, OP_STATE, SLOT_REWRITES,
};
use interceptor_tests::topology::TestCgroup;

const PROXY_UID: u32 = 1337;
const VIP_PORT: u16 = 80;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum First {
    Ours,
    Theirs,
}

/// `interceptor doctor -o json` for the installation under `bpffs`.
fn doctor_json(bpffs: &std::path::Path) -> serde_json::Value {
    let out = bin::run(
        &["doctor", "-o", "json", "--bpffs", bpffs.to_str().unwrap()],
        &[],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "doctor: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

/// The listed program `id` at `hook`.
fn listed<'a>(doc: &'a serde_json::Value, hook: &str, id: u32) -> &'a serde_json::Value {
    doc["cgroup_programs"]["programs"]
        .as_array()
        .expect("cgroup_programs.programs")
        .iter()
        .find(|p| p["hook"] == hook && p["id"] == id)
        .unwrap_or_else(|| panic!("program {id} not listed at {hook}: {doc:#}"))
}

/// The sockets the third party's tuner acts on: the pod's netns, by cookie; where sock_ops
/// cannot read the cookie (before 5.15), the pod's address, which its app's connections leave from.
fn tuner_scope(pod: &Pod) -> Scope {
    if interceptor::backend::ebpf::netns_helper() {
        Scope::Netns(interceptor::netns::cookie(Some(pod.topo.pod_netns())).unwrap())
    } else {
        Scope::LocalV4(pod.topo.pod_v4())
    }
}

fn coexist(first: First, tag: &str, vip_host: u8) {
    let pod = Pod::new(tag).unwrap();
    let vip = SocketAddrV4::new(Ipv4Addr::new(198, 18, pod.topo.index(), vip_host), VIP_PORT);
    let backend = SocketAddrV4::new(pod.topo.upstream_v4(), UPSTREAM_PORT);
    // Declared after the pod: dropped (detached) first, also when an assertion fails.
    let mut theirs = ThirdParty::load(vip, backend, tuner_scope(&pod), tag).unwrap();
    let (lb_id, tuner_id) = theirs.ids().unwrap();
    let install = || apply(&pod, Flavor::Ebpf, &["-u", "1337", "-i", "*"]).unwrap();
    match first {
        First::Ours => {
            install();
            theirs.attach(&pod.ebpf.cgroup).unwrap();
        }
        First::Theirs => {
            theirs.attach(&pod.ebpf.cgroup).unwrap();
            // Loading ours beside it warns (the balancer now runs first).
            let stderr = install();
            assert!(
                stderr.contains(&format!("tp_lb_{tag}"))
                    && stderr.contains("runs before our cgroup/connect4"),
                "no warning about the balancer on load: {stderr}"
            );
        }
    }
    let c = &theirs.counters;

    // The app asks for the VIP: the sidecar answers, in either order.
    let (rewrites, rtt, state) = (c.get(SLOT_REWRITES), c.op(OP_RTT), c.op(OP_STATE));
    let n = 5;
    let mut originals = Vec::new();
    for _ in 0..n {
        let (who, orig, peer) = pod.outbound(APP_UID, SocketAddr::V4(vip)).unwrap();
        assert_eq!(who, "sidecar:15001", "{first:?} first: app → VIP");
        originals.push((orig, peer));
    }
    let (app_rewrites, app_rtt, app_state) = (
        c.get(SLOT_REWRITES) - rewrites,
        c.op(OP_RTT) - rtt,
        c.op(OP_STATE) - state,
    );
    println!(
        "{first:?} first: {n} app connections; balancer rewrites {app_rewrites}, tuner saw \
         {app_rtt} RTT and {app_state} state callbacks; sidecar saw {:?}",
        originals[0]
    );
    // The flags of both survive: the tuner's RTT callbacks and ours (state, for cleanup).
    assert!(
        app_rtt > 0,
        "{first:?} first: the tuner's RTT flag was lost"
    );
    assert!(
        app_state > 0,
        "{first:?} first: our state-callback flag was lost"
    );
    match first {
        First::Ours => {
            // We run first: the sidecar learns what the app asked for; the balancer then sees
            // the proxy's loopback address and leaves it alone.
            assert_eq!(app_rewrites, 0);
            for (orig, peer) in &originals {
                assert_eq!(*orig, Some(SocketAddr::V4(vip)));
                assert_eq!(*peer, SocketAddr::V4(vip), "getpeername shows the VIP");
            }
        }
        First::Theirs => {
            // The balancer runs first: it rewrote, and we redirected its backend.
            assert_eq!(app_rewrites, n);
            for (orig, _) in &originals {
                assert_eq!(*orig, Some(SocketAddr::V4(backend)));
            }
        }
    }

    // The proxy's own connection to the VIP: we let it pass, the balancer sends it on.
    let before = c.get(SLOT_REWRITES);
    let out = pod
        .topo
        .connect_from_pod(PROXY_UID, PROXY_UID, SocketAddr::V4(vip))
        .unwrap();
    assert_eq!(out.reply, "upstream:8080", "{first:?} first: proxy → VIP");
    assert_eq!(
        c.get(SLOT_REWRITES),
        before + 1,
        "the balancer rewrote the proxy's connect"
    );

    // doctor lists the third-party programs beside ours, in their order, and for the balancer
    // running first says what that does and the order we need.
    let doc = doctor_json(pod.ebpf.dir());
    println!("{:#}", doc["cgroup_programs"]["findings"]);
    let want = match first {
        First::Ours => "after_ours",
        First::Theirs => "before_ours",
    };
    let lb = listed(&doc, "cgroup/connect4", lb_id);
    assert_eq!(lb["order"], want, "{lb}");
    assert_eq!(lb["ours"], false, "{lb}");
    assert_eq!(listed(&doc, "sock_ops", tuner_id)["order"], want);
    let ours = doc["cgroup_programs"]["programs"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["hook"] == "cgroup/connect4" && p["ours"] == true)
        .count();
    assert_eq!(ours, 1, "exactly one connect4 of ours: {doc:#}");
    let findings: Vec<&serde_json::Value> = doc["cgroup_programs"]["findings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["id"] == lb_id)
        .collect();
    match first {
        First::Ours => assert!(findings.is_empty(), "{findings:?}"),
        First::Theirs => {
            assert_eq!(findings.len(), 1, "{findings:?}");
            let f = findings[0];
            assert_eq!(f["kind"], "order", "{f}");
            assert_eq!(f["hook"], "cgroup/connect4", "{f}");
            assert!(
                f["what"].as_str().unwrap().contains("runs before our"),
                "{f}"
            );
        }
    }
    assert!(
        doc["order_needed"]
            .as_str()
            .is_some_and(|s| s.contains("must run before any program that rewrites")),
        "{doc:#}"
    );
}

#[test]
fn ours_first_then_a_load_balancer() {
    coexist(First::Ours, "coexa", 10);
}

#[test]
fn a_load_balancer_first_then_ours() {
    coexist(First::Theirs, "coexb", 20);
}

/// A getsockopt program attached in exclusive mode where we attach: ours cannot attach beside
/// it (the kernel refuses mixing modes), the load fails and undoes itself, and the other
/// program is still attached afterwards. The kernel's detach, asked for ours there, would
/// detach whichever program is attached: we only detach what we find attached.
#[test]
fn a_failed_load_leaves_an_exclusive_program_attached() {
    let cg = TestCgroup::new(&format!("ic-coexx-{}-0", std::process::id())).unwrap();
    let other = ExclusiveGetsockopt::attach(cg.path()).unwrap();
    let other_id = other.id().unwrap();
    let mut install = EbpfInstall::new("coexx");
    install.cgroup = cg.path().to_path_buf();
    let err = install
        .load()
        .expect_err("our getsockopt cannot attach beside it");
    println!("load refused as expected: {err:#}");
    let cgf = std::fs::File::open(cg.path()).unwrap();
    use std::os::fd::AsFd;
    let attached = sys::prog_query(cgf.as_fd(), sys::BPF_CGROUP_GETSOCKOPT, 0).unwrap();
    assert_eq!(attached, [other_id], "the other program must stay attached");
    // Nothing of ours stayed attached there either. A link goes with the last copy of its fd,
    // and a child another test thread is starting right then holds copies of ours until its
    // exec closes them (O_CLOEXEC): so "gone", not "gone this instant".
    let deadline = std::time::Instant::now() + interceptor_tests::scaled(Duration::from_secs(2));
    let connect = loop {
        let connect = sys::prog_query(cgf.as_fd(), sys::BPF_CGROUP_INET4_CONNECT, 0).unwrap();
        if connect.is_empty() || std::time::Instant::now() > deadline {
            break connect;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(connect.is_empty(), "{connect:?}");
    drop(install);
    drop(other);
}
