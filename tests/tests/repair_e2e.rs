//! Repair in place (`interceptor daemon --repair`): a mesh pod that was running before the daemon
//! (no CNI ADD ever told it about the pod) is found — the fake API server lists it on the
//! daemon's node, its process sits in a cgroup named as the kubelet names a pod's
//! (`…/kubepods/pod<uid>/<container>`) inside a network namespace the test made — and is
//! registered live: connections from its netns reach the proxy from then on. The other
//! policies send the API server the right request (`label`: Istio's
//! `cni.istio.io/uninitialized=true`; `delete`: with the pod's uid as precondition), `off` does
//! nothing, a non-mesh pod is left alone and a pod in the host's netns is refused.
//!
//! Needs root, cgroup v2 and the eBPF datapath (runs under /tmp/ic-ebpf.lock with the other
//! e2e suites).

#[path = "common/fake_api.rs"]
mod fake_api;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use fake_api::FakeApiServer;
use interceptor_tests::cases::UPSTREAM_PORT;
use interceptor_tests::daemon::DaemonProc;
use interceptor_tests::sidecar::{Sidecar, TagServer};
use interceptor_tests::topology::{cgroup2_mount, Topology};
use serde_json::{json, Value};

/// How long repair may take, from the daemon's start.
const REPAIR_LIMIT: Duration = Duration::from_secs(20);

static N: AtomicU32 = AtomicU32::new(0);

/// A unique pod uid for this test process.
fn uid(tag: &str) -> String {
    let n = N.fetch_add(1, Ordering::Relaxed);
    format!(
        "{:08x}-{tag:0>4.4}-4000-8000-{:012x}",
        std::process::id(),
        n
    )
}

/// A "pod" process: `sleep` in network namespace `netns` (None: the host's), placed in the
/// cgroup `<cgroup2>/ic-repair-…/kubepods/burstable/pod<uid>/ctr` as the kubelet's cgroupfs
/// driver names it. Killed and its cgroups removed on drop.
struct PodProcess {
    child: Child,
    top: PathBuf,
    leaf: PathBuf,
}

impl PodProcess {
    fn start(uid: &str, netns: Option<&Path>) -> Self {
        let mount = cgroup2_mount().expect("a cgroup v2 mount");
        let n = N.fetch_add(1, Ordering::Relaxed);
        let top = mount.join(format!("ic-repair-{}-{n}", std::process::id()));
        let leaf = top.join(format!("kubepods/burstable/pod{uid}/ctr"));
        std::fs::create_dir_all(&leaf).unwrap();
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net={}", ns.display())).arg("sleep");
                c
            }
            None => Command::new("sleep"),
        };
        let child = cmd
            .arg("600")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("starting the pod's process");
        // nsenter execs sleep in its own process: the pid stays the pod's.
        std::fs::write(leaf.join("cgroup.procs"), child.id().to_string()).unwrap();
        // The process runs in its netns before the daemon starts (nsenter has switched).
        let want = netns.map(|p| std::fs::metadata(p).unwrap());
        let netns_of = || std::fs::metadata(format!("/proc/{}/ns/net", child.id())).ok();
        let t = Instant::now();
        while let Some(want) = &want {
            use std::os::unix::fs::MetadataExt;
            if netns_of().is_some_and(|m| m.ino() == want.ino() && m.dev() == want.dev()) {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "nsenter never switched"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        Self { child, top, leaf }
    }
}

impl Drop for PodProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Deepest first; a just-reaped process can take a moment to leave (EBUSY).
        let mut dirs: Vec<PathBuf> = self.leaf.ancestors().map(Path::to_path_buf).collect();
        dirs.truncate(dirs.iter().position(|d| *d == self.top).unwrap() + 1);
        for d in dirs {
            for _ in 0..100 {
                if std::fs::remove_dir(&d).is_ok() || !d.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// An injected pod of node-a (Istio's `sidecar.istio.io/status` annotation unless `mesh` is
/// false), Running, with an `istio-proxy` sidecar running as 1337.
fn pod(name: &str, uid: &str, ip: &str, mesh: bool) -> Value {
    let annotations = if mesh {
        json!({"sidecar.istio.io/status": "{}"})
    } else {
        json!({})
    };
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"namespace": "shop", "name": name, "uid": uid, "annotations": annotations,
                     "labels": {"app": name}},
        "spec": {
            "nodeName": "node-a",
            "containers": [
                {"name": "app", "image": "app:1"},
                {"name": "istio-proxy", "image": "proxyv2:1", "args": ["proxy", "sidecar"],
                 "securityContext": {"runAsUser": 1337, "runAsGroup": 1337}}
            ]
        },
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}
    })
}

/// A scratch folder, removed on drop (also when the test fails).
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A daemon on node-a watching `fake`, with `--repair policy` and fast passes; its kubeconfig
/// lives in the scratch folder returned with it.
fn daemon(tag: &str, fake: &FakeApiServer, policy: &str) -> (DaemonProc, Scratch) {
    let dir = std::env::temp_dir().join(format!(
        "ic-repair-kcfg-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let dir = Scratch(dir);
    let kubeconfig = fake.write_kubeconfig(&dir.0);
    let d = DaemonProc::start_with(
        tag,
        &[
            "--node-name",
            "node-a",
            "--kubeconfig",
            kubeconfig.to_str().unwrap(),
            "--repair",
            policy,
            "--repair-interval",
            "1",
            "--repair-grace",
            "0",
        ],
    )
    .unwrap();
    (d, dir)
}

/// The daemon's pods as `pod list -o json` gives them.
fn pods(d: &DaemonProc) -> Vec<Value> {
    let out = d.pod_ok(&["list", "-o", "json"]);
    let v: Value = serde_json::from_str(&out).unwrap();
    match v {
        Value::Array(a) => a,
        other => other["pods"].as_array().cloned().unwrap_or_default(),
    }
}

fn repair_count(d: &DaemonProc, action: &str, result: &str) -> f64 {
    let text = d.scrape().unwrap();
    let (a, r) = (
        format!("action=\"{action}\""),
        format!("result=\"{result}\""),
    );
    DaemonProc::sample(&text, "interceptor_repair_total", &[&a, &r]).unwrap_or(0.0)
}

fn wait_until(limit: Duration, mut ok: impl FnMut() -> bool) -> Option<Duration> {
    let t = Instant::now();
    while t.elapsed() < limit {
        if ok() {
            return Some(t.elapsed());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

/// The pod was running, uncaptured, before the daemon; the daemon finds it by its uid and
/// registers it live, under the netns's pin (`/run/netns/…`, what a CNI DEL names), and new
/// connections reach the proxy. Beside it: pods that are not mesh pods (no sidecar status, an
/// istio-init container, a gateway's router proxy) are left alone, and a mesh pod in the host's
/// netns is refused (logged and counted once).
#[test]
fn a_pod_running_before_the_daemon_is_captured() {
    let topo = Topology::new("repair").unwrap();
    let other = Topology::new("repairx").unwrap();
    let sidecar = Sidecar::start(&topo).unwrap();
    let _up = TagServer::spawn(topo.upstream_netns(), "upstream", &[UPSTREAM_PORT], None).unwrap();
    let dst = SocketAddr::new(topo.upstream_v4().into(), UPSTREAM_PORT);
    // Before: the pod is not intercepted.
    assert_eq!(
        topo.connect_from_pod(1000, 1000, dst).unwrap().reply,
        "upstream:8080"
    );

    let (mesh, plain, host) = (uid("mesh"), uid("plain"), uid("host"));
    let (init, router) = (uid("init"), uid("router"));
    let _p1 = PodProcess::start(&mesh, Some(topo.pod_netns()));
    let _p3 = PodProcess::start(&host, None);
    // Not mesh pods as Istio's plugin decides, each with a process in a netns of its own
    // sort (the same one: none may be registered).
    let _p2 = PodProcess::start(&plain, Some(other.pod_netns()));
    let _p4 = PodProcess::start(&init, Some(other.pod_netns()));
    let _p5 = PodProcess::start(&router, Some(other.pod_netns()));
    let fake = FakeApiServer::start();
    let other_ip = other.pod_v4().to_string();
    fake.add(pod("web", &mesh, &topo.pod_v4().to_string(), true));
    fake.add(pod("plain", &plain, &other_ip, false));
    fake.add(pod("hostnet", &host, "10.9.9.9", true));
    // Injected by istio-init (no CNI): it sets up its own interception.
    let mut p = pod("withinit", &init, &other_ip, true);
    p["spec"]["initContainers"] = json!([{"name": "istio-init", "image": "proxyv2:1"}]);
    fake.add(p);
    // A gateway: its proxy is a router, which Istio's plugin never captures.
    let mut p = pod("gateway", &router, &other_ip, true);
    p["spec"]["containers"][1]["args"] = json!(["proxy", "router"]);
    fake.add(p);

    let started = Instant::now();
    let (d, _kc) = daemon("repair", &fake, "repair");
    let took = wait_until(REPAIR_LIMIT, || {
        pods(&d)
            .iter()
            .any(|p| p["identity"]["uid"].as_str() == Some(mesh.as_str()))
    })
    .unwrap_or_else(|| panic!("not repaired within {REPAIR_LIMIT:?}:\n{}", d.log()));
    let since_start = started.elapsed();
    let out = topo.connect_from_pod(1000, 1000, dst).unwrap();
    assert_eq!(
        out.reply,
        "sidecar:15001",
        "not captured after repair:\n{}",
        d.log()
    );
    assert_eq!(
        sidecar.take_records().last().unwrap().original_dst,
        Some(dst)
    );
    eprintln!(
        "repaired {took:?} after the daemon answered ({since_start:?} after its start began)"
    );

    let list = pods(&d);
    assert_eq!(list.len(), 1, "only the mesh pod: {list:#?}");
    let rec = &list[0];
    // Recorded under the netns's pin (found under /var/run/netns, which is /run/netns here).
    let recorded = PathBuf::from(rec["netns"].as_str().unwrap());
    assert_eq!(
        std::fs::canonicalize(&recorded).unwrap(),
        std::fs::canonicalize(topo.pod_netns()).unwrap(),
        "{rec:#}"
    );
    assert_eq!(rec["identity"]["name"], "web");
    assert_eq!(rec["config"]["proxy_uid"], "1337", "{rec:#}");
    // Logged, one line each, and counted; the host-netns pod refused once.
    let log = d.log();
    let line = |u: &str| log.lines().find(|l| l.contains(u)).map(str::to_string);
    let ok = line(&mesh).unwrap_or_else(|| panic!("no log line:\n{log}"));
    assert!(ok.contains("shop/web") && ok.contains("repair ok"), "{ok}");
    let refused = line(&host).unwrap_or_else(|| panic!("host pod not logged:\n{log}"));
    assert!(
        refused.contains("refused") && refused.contains("host"),
        "{refused}"
    );
    for u in [&plain, &init, &router] {
        assert!(line(u).is_none(), "non-mesh pod {u} was acted on:\n{log}");
    }
    assert_eq!(repair_count(&d, "repair", "ok"), 1.0);
    assert_eq!(repair_count(&d, "repair", "refused"), 1.0);
    // More passes change nothing (the interval is 1 s).
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(pods(&d).len(), 1);
    assert_eq!(repair_count(&d, "repair", "ok"), 1.0);
    assert_eq!(repair_count(&d, "repair", "refused"), 1.0);
    assert!(fake.writes().is_empty(), "{:?}", fake.writes());
    // A DEL of the repaired pod is final: repair does not register it again.
    d.pod_ok(&["remove", "--network-namespace", recorded.to_str().unwrap()]);
    std::thread::sleep(Duration::from_millis(2500));
    assert!(pods(&d).is_empty(), "registered again after its remove");
    drop(d);
}

/// `off` does nothing; `label` patches the pod with Istio's label and registers nothing;
/// `delete` deletes it with its uid as precondition.
#[test]
fn off_label_and_delete() {
    let topo = Topology::new("repairp").unwrap();
    let id = uid("pol");
    let _p = PodProcess::start(&id, Some(topo.pod_netns()));
    let fake = FakeApiServer::start();
    fake.add(pod("web", &id, &topo.pod_v4().to_string(), true));

    let (d, _kc) = daemon("repoff", &fake, "off");
    assert!(
        wait_until(REPAIR_LIMIT, || d.log().contains("pod list synced")).is_some(),
        "{}",
        d.log()
    );
    std::thread::sleep(Duration::from_secs(3));
    assert!(pods(&d).is_empty());
    assert!(fake.writes().is_empty(), "{:?}", fake.writes());
    assert!(!d.log().contains(&id), "{}", d.log());
    assert!(!d.scrape().unwrap().contains("interceptor_repair"));
    drop(d);

    let (d, _kc) = daemon("replabel", &fake, "label");
    let patched = wait_until(REPAIR_LIMIT, || !fake.writes().is_empty());
    assert!(patched.is_some(), "no PATCH:\n{}", d.log());
    let (method, target, body) = fake.writes()[0].clone();
    assert_eq!(method, "PATCH");
    assert!(
        target.starts_with("/api/v1/namespaces/shop/pods/web"),
        "{target}"
    );
    assert_eq!(
        body,
        json!({"metadata": {"labels": {"cni.istio.io/uninitialized": "true"}}})
    );
    assert_eq!(
        fake.get("shop", "web").unwrap()["metadata"]["labels"]["cni.istio.io/uninitialized"],
        "true"
    );
    assert!(pods(&d).is_empty(), "label registered the pod");
    // Labelled once: the pod now carries the label.
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(fake.writes().len(), 1, "{:?}", fake.writes());
    assert_eq!(repair_count(&d, "label", "ok"), 1.0);
    assert!(d.log().contains("label ok"), "{}", d.log());
    drop(d);

    let (d, _kc) = daemon("repdel", &fake, "delete");
    let deleted = wait_until(REPAIR_LIMIT, || fake.writes().len() == 2);
    assert!(deleted.is_some(), "no DELETE:\n{}", d.log());
    let (method, target, body) = fake.writes()[1].clone();
    assert_eq!(method, "DELETE");
    assert!(
        target.starts_with("/api/v1/namespaces/shop/pods/web"),
        "{target}"
    );
    assert_eq!(body["preconditions"]["uid"], id.as_str(), "{body}");
    assert!(fake.get("shop", "web").is_none());
    assert!(pods(&d).is_empty());
    assert_eq!(repair_count(&d, "delete", "ok"), 1.0);
    drop(d);
}

/// Bad values name the value.
#[test]
fn bad_flag_values_are_named() {
    for (flag, value) in [
        ("--repair", "fix"),
        ("--repair-interval", "0"),
        ("--repair-grace", "soon"),
    ] {
        // Everything else points into a scratch folder, should a value ever be taken.
        let dir = std::env::temp_dir().join(format!("ic-repair-flags-{}", std::process::id()));
        let (sock, state, bpffs) = (dir.join("s"), dir.join("state"), dir.join("bpffs"));
        let out = interceptor_tests::bin::run(
            &[
                "daemon",
                flag,
                value,
                "--socket",
                sock.to_str().unwrap(),
                "--state-dir",
                state.to_str().unwrap(),
                "--bpffs",
                bpffs.to_str().unwrap(),
                "--metrics-addr",
                "",
            ],
            &[],
        );
        let _ = std::fs::remove_dir_all(&dir);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(&format!("\"{value}\"")) && err.contains(flag),
            "{flag} {value}: {err}"
        );
    }
}
