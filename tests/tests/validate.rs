//! `interceptor validate` end to end: a bare pod netns (no test sidecar: validate brings its own
//! listeners on 15001/15006), interception installed with the real `interceptor apply`, then
//! `interceptor validate --network-namespace NS` run as root, which must do its probing as the
//! proxy uid (and uid 65534 for the outbound probe) with no capabilities.
//!
//! Network safety: every probe runs inside the test pod netns; the outbound probe's TEST-NET
//! address (192.0.2.1), when not captured, follows the pod's default route into the test
//! upstream netns, which does not forward.

use std::process::Output;
use std::time::{Duration, Instant};

use interceptor_tests::bin;
use interceptor_tests::cases::Flavor;
use interceptor_tests::ebpf::EbpfInstall;
use interceptor_tests::sidecar::TagServer;
use interceptor_tests::topology::Topology;

/// A bare pod plus its private eBPF installation (dropped first: detaches what apply loaded).
struct BarePod {
    ebpf: EbpfInstall,
    topo: Topology,
}

impl BarePod {
    fn new(tag: &str) -> Self {
        let topo = Topology::new(tag).unwrap_or_else(|e| panic!("{e:#}"));
        BarePod {
            ebpf: EbpfInstall::new(tag),
            topo,
        }
    }

    fn ns(&self) -> String {
        self.topo.pod_netns().to_str().expect("netns path").into()
    }

    /// `interceptor apply --network-namespace NS --bpffs DIR <flavor> EXTRA…`, which must succeed.
    fn apply(&self, flavor: Flavor, extra: &[&str]) {
        let ns = self.ns();
        let bpffs = self.ebpf.dir().to_str().expect("bpffs path").to_string();
        let mut args = vec!["apply", "--network-namespace", &ns, "--bpffs", &bpffs];
        args.extend_from_slice(flavor.args());
        args.extend_from_slice(extra);
        let out = bin::run(&args, &[]);
        assert!(
            out.status.success(),
            "interceptor {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `interceptor validate --network-namespace NS EXTRA…`.
    fn validate(&self, extra: &[&str]) -> Validated {
        let ns = self.ns();
        let mut args = vec!["validate", "--network-namespace", ns.as_str()];
        args.extend_from_slice(extra);
        run_validate(&args)
    }
}

struct Validated {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    took: Duration,
}

impl Validated {
    fn show(&self, what: &str) {
        println!(
            "--- {what}: exit {:?} after {:.2?}\nstdout:\n{}stderr:\n{}",
            self.code, self.took, self.stdout, self.stderr
        );
    }
}

fn run_validate(args: &[&str]) -> Validated {
    let start = Instant::now();
    let out: Output = bin::run(args, &[]);
    Validated {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        took: start.elapsed(),
    }
}

/// Both checks passed, with what was verified.
fn assert_passed(v: &Validated, what: &str) {
    v.show(what);
    assert_eq!(v.code, Some(0), "{what}: {}{}", v.stdout, v.stderr);
    for want in [
        "as uid 1337 gid 1337 with no capabilities",
        "outbound probe client runs as uid 65534 gid 65534 with no capabilities",
        "ok: inbound redirect check: uid 1337 connection from 127.0.0.1:",
        "to 127.0.0.6:15002 was redirected to 127.0.0.1:15006, SO_ORIGINAL_DST 127.0.0.6:15002",
        "ok: outbound redirect check: uid 65534 connection from ",
        "to 192.0.2.1:15002 was redirected to 127.0.0.1:15001, SO_ORIGINAL_DST 192.0.2.1:15002",
        "validation passed",
    ] {
        assert!(
            v.stdout.contains(want),
            "{what}: no {want:?} in\n{}",
            v.stdout
        );
    }
    assert!(v.took < Duration::from_secs(3), "{what}: took {:?}", v.took);
}

fn captured(flavor: Flavor, tag: &str) {
    let pod = BarePod::new(tag);
    pod.apply(flavor, &["-i", "*"]);
    assert_passed(&pod.validate(&[]), &format!("{flavor:?}"));
}

#[test]
fn iptables_legacy_captured_pod_validates() {
    captured(Flavor::IptablesLegacy, "vipl");
}

#[test]
fn iptables_nft_captured_pod_validates() {
    captured(Flavor::IptablesNft, "vipn");
}

#[test]
fn nftables_captured_pod_validates() {
    captured(Flavor::Nftables, "vnft");
}

#[test]
fn ebpf_captured_pod_validates() {
    captured(Flavor::Ebpf, "vebpf");
}

/// No interception at all: both checks fail after the timeout, exit 126, saying what was seen.
#[test]
fn uncaptured_pod_fails_with_126() {
    let pod = BarePod::new("vnone");
    let v = pod.validate(&["--probe-timeout", "2s"]);
    v.show("uncaptured");
    assert_eq!(v.code, Some(126), "{}{}", v.stdout, v.stderr);
    assert!(
        v.took >= Duration::from_millis(1900) && v.took < Duration::from_secs(5),
        "took {:?}",
        v.took
    );
    for want in [
        "FAILED: inbound redirect check: no listener received the probe to 127.0.0.6:15002 \
         within 2s (not captured;",
        "the last probe: it was refused",
        "FAILED: outbound redirect check: no listener received the probe to 192.0.2.1:15002 \
         within 2s (not captured;",
        "the last probe: its SYN got no answer",
        "validation failed (inbound redirect check, outbound redirect check); exit 126",
    ] {
        assert!(v.stderr.contains(want), "no {want:?} in\n{}", v.stderr);
    }
}

/// Captured, but to the other port: validate is told 15006 is the outbound port and 15001 the
/// inbound one, so each probe lands on the wrong listener and the message says so.
#[test]
fn wrong_port_is_named() {
    let pod = BarePod::new("vswap");
    pod.apply(Flavor::IptablesLegacy, &["-i", "*"]);
    let v = pod.validate(&["-p", "15006", "-z", "15001", "--probe-timeout", "2s"]);
    v.show("swapped ports");
    assert_eq!(v.code, Some(126), "{}{}", v.stdout, v.stderr);
    for want in [
        "FAILED: inbound redirect check: connection to 127.0.0.6:15002 was accepted on \
         127.0.0.1:15006 instead of 15001",
        "FAILED: outbound redirect check: connection to 192.0.2.1:15002 was accepted on \
         127.0.0.1:15001 instead of 15006",
    ] {
        assert!(v.stderr.contains(want), "no {want:?} in\n{}", v.stderr);
    }
}

/// The probes really carry `--proxy-uid`, not root's uid: a pod whose proxy uid is 1000
/// validates with `--proxy-uid 1000` and fails the inbound check with the default 1337 (whose
/// connection to 127.0.0.6 is then an app talking over lo, not redirected).
#[test]
fn probes_run_as_the_proxy_uid() {
    let pod = BarePod::new("vuid");
    pod.apply(Flavor::IptablesLegacy, &["-i", "*", "-u", "1000"]);
    let ok = pod.validate(&["--proxy-uid", "1000", "--probe-timeout", "2s"]);
    ok.show("--proxy-uid 1000");
    assert_eq!(ok.code, Some(0), "{}{}", ok.stdout, ok.stderr);
    assert!(
        ok.stdout
            .contains("as uid 1000 gid 1000 with no capabilities")
            && ok
                .stdout
                .contains("ok: inbound redirect check: uid 1000 connection"),
        "{}",
        ok.stdout
    );
    let bad = pod.validate(&["--probe-timeout", "2s"]);
    bad.show("default --proxy-uid 1337");
    assert_eq!(bad.code, Some(126), "{}{}", bad.stdout, bad.stderr);
    assert!(
        bad.stderr
            .contains("FAILED: inbound redirect check: no listener received"),
        "{}",
        bad.stderr
    );
    assert!(
        bad.stdout.contains("ok: outbound redirect check"),
        "{}",
        bad.stdout
    );
}

/// Bad flags: exit 2 naming the flag, nothing probed.
#[test]
fn bad_flags_exit_2() {
    for (args, flag) in [
        (
            &["validate", "--probe-timeout", "soon"][..],
            "--probe-timeout",
        ),
        (
            &["validate", "--iptables-probe-port", "0"][..],
            "--iptables-probe-port",
        ),
        (
            &["validate", "--network-namespace", "/nonexistent/netns"][..],
            "--network-namespace",
        ),
        (&["validate", "--proxy-uid", "istio"][..], "--proxy-uid"),
    ] {
        let v = run_validate(args);
        v.show(&format!("{args:?}"));
        assert_eq!(v.code, Some(2), "{args:?}: {}", v.stderr);
        assert!(v.stderr.contains(flag), "{args:?}: {}", v.stderr);
    }
}

/// A running pod, as deploy/README.md uses `validate` on a node: the proxy (the test sidecar,
/// uid 1337) already holds 15001 and 15006, so validate cannot listen there. Each probe must then
/// reach the proxy's port, found in the kernel's socket table; and the proxy itself saw both
/// probes with their original destinations.
fn running(flavor: Flavor, tag: &str) {
    let pod = BarePod::new(tag);
    pod.apply(flavor, &["-i", "*"]);
    let proxy = TagServer::spawn(
        pod.topo.pod_netns(),
        "sidecar",
        &[15001, 15006],
        Some((1337, 1337)),
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
    let v = pod.validate(&["--probe-timeout", "3s"]);
    v.show(&format!("running {flavor:?}"));
    assert_eq!(v.code, Some(0), "{}{}", v.stdout, v.stderr);
    for want in [
        "a running pod: its proxy already listens on ports 15001 and 15006",
        "ok: inbound redirect check: uid 1337 connection from 127.0.0.1:",
        "to 127.0.0.6:15002 reached the proxy's port 15006",
        "ok: outbound redirect check: uid 65534 connection from ",
        "to 192.0.2.1:15002 reached the proxy's port 15001",
        "validation passed",
    ] {
        assert!(v.stdout.contains(want), "no {want:?} in\n{}", v.stdout);
    }
    let seen = proxy.records();
    for (port, orig) in [(15006, "127.0.0.6:15002"), (15001, "192.0.2.1:15002")] {
        let orig: std::net::SocketAddr = orig.parse().unwrap();
        assert!(
            seen.iter()
                .any(|r| r.listener_port == port && r.original_dst == Some(orig)),
            "the proxy saw no probe to {orig} on {port}: {seen:?}"
        );
    }
}

#[test]
fn running_pod_validates_on_iptables() {
    running(Flavor::IptablesNft, "vrunipt");
}

#[test]
fn running_pod_validates_on_ebpf() {
    running(Flavor::Ebpf, "vrunebpf");
}

/// A proxy running in a pod nothing intercepts: validate must not mistake the proxy's listeners
/// for capture.
#[test]
fn running_pod_without_interception_fails_with_126() {
    let pod = BarePod::new("vrunnone");
    let _proxy = TagServer::spawn(
        pod.topo.pod_netns(),
        "sidecar",
        &[15001, 15006],
        Some((1337, 1337)),
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
    let v = pod.validate(&["--probe-timeout", "2s"]);
    v.show("running, uncaptured");
    assert_eq!(v.code, Some(126), "{}{}", v.stdout, v.stderr);
    assert!(
        v.stdout.contains("a running pod"),
        "not judged as a running pod:\n{}",
        v.stdout
    );
    for want in [
        "FAILED: inbound redirect check:",
        "FAILED: outbound redirect check:",
    ] {
        assert!(v.stderr.contains(want), "no {want:?} in\n{}", v.stderr);
    }
}
