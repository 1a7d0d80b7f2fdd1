//! Upgrading in place: the previous release's daemon (built from git here) serving pods under
//! connection loops is replaced by this build's, and not one connection fails or escapes; the
//! programs behind the pinned links really are new and the layout marker is written. Also: a
//! restart with the same programs changes nothing, another `--ebpf-log` swaps them, a downgrade
//! and a map whose layout changed are refused with everything left running.

use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use interceptor::backend::ebpf::{
    detect_cgroup2_root, sys, Layout, Pins, LAYOUT_VERSION, LINKED_SINCE_MARKERS,
};
use interceptor_tests::cases::{Pod, APP_PORT, UPSTREAM_PORT};
use interceptor_tests::daemon::DaemonProc;
use interceptor_tests::topology::connect_as;

/// The release this build upgrades from: the last one without layout markers.
const BASELINE: &str = "0fd318a";
/// Overrides [`BASELINE`].
const BASELINE_ENV: &str = "INTERCEPTOR_UPGRADE_FROM";

/// A git worktree removed on drop (also when the build in it fails).
struct Worktree {
    repo: PathBuf,
    path: PathBuf,
}

impl Drop for Worktree {
    fn drop(&mut self) {
        let _ = Command::new("git")
            .arg("-C")
            .arg(&self.repo)
            .args(["worktree", "remove", "--force"])
            .arg(&self.path)
            .status();
        let _ = std::fs::remove_dir_all(&self.path);
        let _ = Command::new("git")
            .arg("-C")
            .arg(&self.repo)
            .args(["worktree", "prune"])
            .status();
    }
}

/// The baseline's `interceptor`, built once under `target/upgrade-from/<rev>/` (its own target
/// dir: cargo would otherwise reuse this checkout's eBPF build output) and reused by later runs.
/// None (said loudly) where git or the commit is missing, or eBPF is not expected; under
/// `CI=true` that fails instead.
fn old_binary() -> Option<PathBuf> {
    static BIN: OnceLock<Option<PathBuf>> = OnceLock::new();
    BIN.get_or_init(build_old_binary).clone()
}

fn build_old_binary() -> Option<PathBuf> {
    if !interceptor_tests::ebpf_expected() {
        eprintln!("SKIP: eBPF is not expected here (INTERCEPTOR_TESTS_NO_EBPF=1)");
        return None;
    }
    let rev = std::env::var(BASELINE_ENV).unwrap_or_else(|_| BASELINE.to_string());
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let dir = target.join("upgrade-from").join(&rev);
    let bin = dir.join("debug/interceptor");
    if bin.exists() {
        return Some(bin);
    }
    let unavailable = |why: String| {
        let msg =
            format!("cannot build the baseline {rev} ({BASELINE_ENV}) to upgrade from: {why}");
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("{msg} (CI=true: the upgrade test is required)");
        }
        eprintln!("SKIP: {msg}");
        None
    };
    let verify = Command::new("git")
        .arg("-C")
        .arg(&root)
        .args(["rev-parse", "--verify", "--quiet"])
        .arg(format!("{rev}^{{commit}}"))
        .output();
    match verify {
        Ok(o) if o.status.success() => {}
        Ok(_) => return unavailable(format!("no commit {rev} in {}", root.display())),
        Err(e) => return unavailable(format!("git: {e}")),
    }
    let checkout = dir.join("checkout");
    let worktree = Worktree {
        repo: root.clone(),
        path: checkout.clone(),
    };
    drop(Worktree {
        repo: root.clone(),
        path: checkout.clone(),
    }); // one left by an interrupted run
    std::fs::create_dir_all(&dir).unwrap();
    let added = Command::new("git")
        .arg("-C")
        .arg(&root)
        .args(["worktree", "add", "--detach"])
        .arg(&checkout)
        .arg(&rev)
        .status()
        .expect("git worktree add");
    assert!(added.success(), "git worktree add {rev} failed");
    let t0 = Instant::now();
    // The baseline named its toolchains `1.95.0` (rust-toolchain.toml) and `nightly` (build.rs,
    // for the eBPF crate), which a fresh machine set up by today's scripts/setup.sh does not
    // have (rustup installs nothing by itself here): it is built with today's pins instead, the
    // same nightly build that built it then. Only the toolchain choice changes, no code.
    let (stable, nightly) = pinned_toolchains(&root);
    let build_rs = checkout.join("interceptor/build.rs");
    let recipe = std::fs::read_to_string(&build_rs).expect("the baseline's build.rs");
    std::fs::write(
        &build_rs,
        recipe.replace(
            "aya_build::Toolchain::Nightly",
            &format!("aya_build::Toolchain::Custom({nightly:?})"),
        ),
    )
    .unwrap();
    let built = Command::new("cargo")
        .current_dir(&checkout)
        .env("RUSTUP_TOOLCHAIN", &stable)
        .env("CARGO_TARGET_DIR", &dir)
        .args(["build", "-p", "interceptor", "--bin", "interceptor"])
        .status()
        .expect("cargo build of the baseline");
    drop(worktree);
    assert!(built.success(), "building {rev}'s interceptor failed");
    eprintln!("built {rev}'s interceptor in {:.0?}", t0.elapsed());
    assert!(bin.exists(), "{} missing after the build", bin.display());
    Some(bin)
}

/// (stable, eBPF nightly) as this checkout pins them: `rust-toolchain.toml`'s channel and
/// `ebpf-toolchain.env`'s `EBPF_NIGHTLY`.
fn pinned_toolchains(root: &std::path::Path) -> (String, String) {
    let read = |f: &str| std::fs::read_to_string(root.join(f)).expect(f);
    let value = |text: &str, key: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(key))
            .map(|v| v.trim().trim_matches('"').to_string())
            .unwrap_or_else(|| panic!("no {key} pin"))
    };
    let stable = value(&read("rust-toolchain.toml"), "channel =");
    let nightly = value(&read("ebpf-toolchain.env"), "EBPF_NIGHTLY=");
    (stable, nightly)
}

fn cgroup() -> PathBuf {
    detect_cgroup2_root().unwrap()
}

fn add(d: &DaemonProc, pod: &Pod) {
    d.add_capturing(pod.topo.pod_netns(), &[]);
}

fn outbound_dst(pod: &Pod) -> SocketAddr {
    SocketAddr::new(pod.topo.upstream_v4().into(), UPSTREAM_PORT)
}

fn inbound_dst(pod: &Pod) -> SocketAddr {
    SocketAddr::new(pod.topo.pod_v4().into(), APP_PORT)
}

/// Both directions of `pod` go to its sidecar, with the original destination.
fn assert_intercepted(pod: &Pod) {
    let (reply, orig, _) = pod.outbound(1000, outbound_dst(pod)).unwrap();
    assert_eq!(reply, "sidecar:15001");
    assert_eq!(orig, Some(outbound_dst(pod)));
    let o = connect_as(
        pod.topo.upstream_netns(),
        0,
        0,
        inbound_dst(pod),
        None,
        Duration::from_secs(2),
    )
    .unwrap();
    assert_eq!(o.reply, "sidecar:15006");
}

/// Connection loops through pods, each connection checked: the right sidecar listener answered.
struct Loops {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<(String, u64, Vec<String>)>>,
}

impl Loops {
    /// One outbound (app uid 1000 → upstream, to 15001) and one inbound (upstream → app port,
    /// to 15006) loop per pod.
    fn start(pods: &[&Pod]) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for pod in pods {
            let name = pod.topo.pod_ns_name().to_string();
            for (from, uid, dst, want) in [
                (
                    pod.topo.pod_netns(),
                    1000,
                    outbound_dst(pod),
                    "sidecar:15001",
                ),
                (
                    pod.topo.upstream_netns(),
                    0,
                    inbound_dst(pod),
                    "sidecar:15006",
                ),
            ] {
                let (stop, from, name) = (stop.clone(), from.to_path_buf(), name.clone());
                threads.push(std::thread::spawn(move || {
                    let (mut n, mut failed) = (0u64, Vec::new());
                    while !stop.load(Ordering::Relaxed) {
                        let limit = interceptor_tests::scaled(Duration::from_secs(5));
                        match connect_as(&from, uid, uid, dst, None, limit) {
                            Ok(o) if o.reply == want => {}
                            Ok(o) => failed.push(format!("answered by {:?}", o.reply)),
                            Err(e) => failed.push(format!("{e:#}")),
                        }
                        n += 1;
                    }
                    (format!("{name} → {want}"), n, failed)
                }));
            }
        }
        Loops { stop, threads }
    }

    /// Stops the loops; (loop, connections, failures) each.
    fn finish(self) -> Vec<(String, u64, Vec<String>)> {
        self.stop.store(true, Ordering::Relaxed);
        self.threads
            .into_iter()
            .map(|t| t.join().unwrap())
            .collect()
    }
}

/// Every connection the sidecar of `pod` accepted carried the original destination the client
/// asked for; returns how many it accepted.
fn assert_original_destinations(pod: &Pod) -> usize {
    let records = pod.sidecar.records();
    for r in &records {
        let want = match r.listener_port {
            15001 => outbound_dst(pod),
            15006 => inbound_dst(pod),
            p => panic!("a connection reached the sidecar's port {p}"),
        };
        assert_eq!(r.original_dst, Some(want), "{r:?}");
    }
    records.len()
}

/// Replaces the marker, as a newer binary would have written it.
fn write_marker(bpffs: &Path, text: &str) {
    let new = bpffs.join("layout-test");
    let _ = std::fs::remove_file(&new);
    std::os::unix::fs::symlink(text, &new).unwrap();
    std::fs::rename(&new, bpffs.join("layout")).unwrap();
}

#[test]
fn previous_release_is_replaced_under_traffic() {
    let Some(old) = old_binary() else { return };
    let mut d = DaemonProc::start_bin(&old, "upg", &[]).unwrap();
    let (a, b) = (Pod::new("upga").unwrap(), Pod::new("upgb").unwrap());
    add(&d, &a);
    add(&d, &b);
    let pins = Pins::new(d.bpffs());
    assert_eq!(
        pins.layout().unwrap(),
        Some(Layout {
            version: 1,
            identity: None
        }),
        "the baseline's pins read as layout 1 without identity"
    );
    let before = pins.running_programs(&cgroup());
    // Every program of the baseline runs; those added since are not there yet.
    for (name, id) in &before {
        let newer = LINKED_SINCE_MARKERS.contains(name);
        assert_eq!(id.is_none(), newer, "{name}: {before:?}");
    }
    for p in [&a, &b] {
        p.sidecar.take_records();
    }

    let loops = Loops::start(&[&a, &b]);
    std::thread::sleep(Duration::from_millis(700));
    let t0 = Instant::now();
    d.stop();
    d.set_bin(None);
    d.spawn().unwrap();
    let swap = t0.elapsed();
    std::thread::sleep(Duration::from_millis(1500));
    let results = loops.finish();

    let mut total = 0;
    for (name, n, failed) in &results {
        println!("{name}: {n} connections, {} failed", failed.len());
        assert!(*n > 10, "{name}: the loop made too few connections: {n}");
        assert!(
            failed.is_empty(),
            "{name}: {} of {n} connections failed or escaped across the upgrade: {:?}",
            failed.len(),
            &failed[..failed.len().min(5)]
        );
        total += n;
    }
    let accepted: u64 = [&a, &b]
        .iter()
        .map(|p| assert_original_destinations(p) as u64)
        .sum();
    assert_eq!(accepted, total, "every connection reached a sidecar once");
    println!("upgrade: {total} connections across stop + start ({swap:.0?}), none failed");

    let after = pins.running_programs(&cgroup());
    for ((name, old), (_, new)) in before.iter().zip(&after) {
        assert!(new.is_some(), "{name}: nothing attached after the upgrade");
        assert_ne!(
            old, new,
            "{name}: the program was not replaced (or attached)"
        );
    }
    // getsockopt was replaced in its place, not attached beside the old one.
    let old_getsockopt = before
        .iter()
        .find(|(n, _)| *n == "ic_getsockopt")
        .unwrap()
        .1;
    let cg = std::fs::File::open(cgroup()).unwrap();
    let attached = sys::prog_query(cg.as_fd(), sys::BPF_CGROUP_GETSOCKOPT, 0).unwrap();
    assert!(!attached.contains(&old_getsockopt.unwrap()), "{attached:?}");
    let layout = pins.layout().unwrap().expect("a marker");
    assert_eq!(layout.version, LAYOUT_VERSION);
    assert_eq!(layout.identity.as_ref().map(String::len), Some(16));
    let log = d.log();
    assert!(log.contains("upgraded programs in place"), "{log}");
    let metrics = d.scrape().unwrap();
    assert!(
        metrics.contains("interceptor_programs_info{start=\"upgraded\""),
        "{metrics}"
    );
    let list = d.pod_ok(&["list"]);
    for p in [&a, &b] {
        assert!(list.contains(p.topo.pod_ns_name()), "pod lost: {list}");
        assert_intercepted(p);
    }
}

#[test]
fn same_programs_stay_and_other_settings_swap() {
    let mut d = DaemonProc::start("upgsame").unwrap();
    let pod = Pod::new("upgsame").unwrap();
    add(&d, &pod);
    let pins = Pins::new(d.bpffs());
    let first = pins.layout().unwrap().expect("a marker on a fresh load");
    let ids = pins.running_programs(&cgroup());
    d.stop();
    d.spawn().unwrap();
    assert_eq!(
        pins.running_programs(&cgroup()),
        ids,
        "a same-identity restart replaced programs"
    );
    assert_eq!(pins.layout().unwrap().as_ref(), Some(&first));
    assert!(
        !d.log().contains("upgraded programs in place"),
        "{}",
        d.log()
    );
    let doctor =
        interceptor_tests::bin::run(&["doctor", "--bpffs", d.bpffs().to_str().unwrap()], &[]);
    let doctor = String::from_utf8_lossy(&doctor.stdout);
    let shown = format!(
        "layout {LAYOUT_VERSION}, programs {}",
        first.identity.as_deref().unwrap()
    );
    assert!(
        doctor.contains(&shown),
        "doctor does not show {shown:?}: {doctor}"
    );
    let metrics = d.scrape().unwrap();
    assert!(
        metrics.contains("interceptor_programs_info{start=\"kept\""),
        "{metrics}"
    );

    // Decision logging on: another identity, so the programs are swapped in place.
    let loops = Loops::start(&[&pod]);
    std::thread::sleep(Duration::from_millis(300));
    d.stop();
    d.set_extra(&["--ebpf-log"]);
    d.spawn().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    for (name, n, failed) in loops.finish() {
        assert!(failed.is_empty(), "{name}: {failed:?} of {n}");
    }
    let swapped = pins.running_programs(&cgroup());
    for ((name, old), (_, new)) in ids.iter().zip(&swapped) {
        assert!(new.is_some() && old != new, "{name}: {old:?} → {new:?}");
    }
    let second = pins.layout().unwrap().unwrap();
    assert_ne!(second.identity, first.identity);
    assert!(
        d.log().contains("upgraded programs in place"),
        "{}",
        d.log()
    );
    assert!(d.pod_ok(&["list"]).contains(pod.topo.pod_ns_name()));
    assert_intercepted(&pod);
}

/// Pins of a newer layout: this binary refuses to start on them and changes nothing; the
/// programs keep intercepting.
#[test]
fn downgrade_is_refused() {
    let mut d = DaemonProc::start("upgdown").unwrap();
    let pod = Pod::new("upgdown").unwrap();
    add(&d, &pod);
    let pins = Pins::new(d.bpffs());
    let ids = pins.running_programs(&cgroup());
    d.stop();
    let newer = format!("layout={} programs=0123456789abcdef", LAYOUT_VERSION + 1);
    write_marker(d.bpffs(), &newer);
    let err = d.spawn().unwrap_err().to_string();
    assert!(err.contains("refusing to downgrade"), "{err}");
    assert!(err.contains("interceptor cleanup"), "{err}");
    assert_eq!(pins.running_programs(&cgroup()), ids);
    let marker = std::fs::read_link(d.bpffs().join("layout")).unwrap();
    assert_eq!(
        marker.to_str(),
        Some(newer.as_str()),
        "the marker was touched"
    );
    assert_intercepted(&pod);
}

/// A map whose layout this binary would see differently (the test-only `map-layout` fault):
/// refused, naming the map and both layouts; nothing changes and the programs keep
/// intercepting.
#[test]
fn incompatible_map_is_refused() {
    let mut d = DaemonProc::start("upgmap").unwrap();
    let pod = Pod::new("upgmap").unwrap();
    add(&d, &pod);
    let pins = Pins::new(d.bpffs());
    let ids = pins.running_programs(&cgroup());
    let layout = pins.layout().unwrap();
    d.stop();
    // Another identity (so an upgrade is attempted) and POD_POLICY seen as changed.
    d.set_extra(&["--ebpf-log"]);
    d.set_env(interceptor::fault::FAULT_ENV, "map-layout:POD_POLICY");
    let err = d.spawn().unwrap_err().to_string();
    assert!(err.contains("POD_POLICY"), "{err}");
    assert!(err.contains("pinned hash with"), "{err}");
    assert!(err.contains("Nothing was changed"), "{err}");
    assert_eq!(pins.running_programs(&cgroup()), ids);
    assert_eq!(pins.layout().unwrap(), layout);
    assert_intercepted(&pod);
}
