//! `interceptor::k8s::PodWatcher` against `FakeApiServer` (`common/fake_api.rs`), an
//! in-process FAKE of the Kubernetes API (no API server can run on these machines). Everything else is real: the
//! kube-rs client and watcher, HTTP over loopback TCP, the JSON the API server sends.

#[path = "common/fake_api.rs"]
mod fake_api;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use fake_api::{parse_target, FakeApiServer};
use interceptor::k8s::{Lookup, PodMeta, PodWatcher};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(20);

/// A pod of `node` with an app container and an `istio-proxy` sidecar.
fn pod(name: &str, uid: &str, node: &str, annotations: &[(&str, &str)], ip: &str) -> Value {
    let annotations: BTreeMap<&str, &str> = annotations.iter().copied().collect();
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"namespace": "shop", "name": name, "uid": uid, "annotations": annotations,
                     "labels": {"app": "shop"}},
        "spec": {
            "nodeName": node,
            "securityContext": {"runAsUser": 1000, "runAsGroup": 3000, "fsGroup": 2000},
            "initContainers": [{"name": "istio-validation", "image": "proxyv2:1"}],
            "containers": [
                {"name": "app", "image": "app:1", "env": [{"name": "APP", "value": "1"}]},
                {"name": "istio-proxy", "image": "proxyv2:1", "args": ["proxy", "sidecar"],
                 "securityContext": {"runAsUser": 1337},
                 "env": [
                    {"name": "ISTIO_META_DNS_CAPTURE", "value": "true"},
                    {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}
                 ]}
            ]
        },
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}, {"ip": "fd00::5"}]}
    })
}

fn requests_of_pods(fake: &FakeApiServer) -> Vec<BTreeMap<String, String>> {
    let reqs = fake.requests();
    for r in &reqs {
        assert!(r.starts_with("/api/v1/pods?"), "unexpected request {r}");
    }
    reqs.iter().map(|r| parse_target(r).1).collect()
}

fn wait_pod(w: &PodWatcher, name: &str, what: &str, mut ok: impl FnMut(Option<PodMeta>) -> bool) {
    assert!(
        w.wait_until(WAIT, |w| ok(w.get("shop", name))),
        "{what}: pod shop/{name} is {:?}",
        w.get("shop", name)
    );
}

#[test]
fn lists_then_follows_the_pods_of_its_node_only() {
    let fake = FakeApiServer::start();
    let inject = ("sidecar.istio.io/status", "{}");
    fake.add(pod(
        "a",
        "uid-a",
        "node-a",
        &[
            inject,
            ("traffic.sidecar.istio.io/excludeOutboundPorts", "9000"),
        ],
        "10.1.0.5",
    ));
    fake.add(pod("b", "uid-b", "node-a", &[inject], "10.1.0.6"));
    fake.add(pod("c", "uid-c", "node-b", &[inject], "10.2.0.7"));

    let w = PodWatcher::start(fake.kube_config(), "node-a").unwrap();
    assert_eq!(w.node(), "node-a");
    assert!(w.wait_synced(WAIT), "the initial list never completed");

    // The initial list: this node's pods, with what interception needs of each.
    let a = w.get("shop", "a").expect("pod a listed");
    assert_eq!(
        (a.namespace.as_str(), a.name.as_str(), a.uid.as_str()),
        ("shop", "a", "uid-a")
    );
    assert_eq!(
        a.annotations
            .get("traffic.sidecar.istio.io/excludeOutboundPorts")
            .map(String::as_str),
        Some("9000")
    );
    // The container's runAsUser wins over the pod's; the pod's runAsGroup fills in.
    assert_eq!((a.run_as_user, a.run_as_group), (Some(1337), Some(3000)));
    // istio-proxy's env (not the app's); valueFrom reads as empty, as in Istio's plugin.
    assert_eq!(
        a.proxy_env,
        BTreeMap::from([
            ("ISTIO_META_DNS_CAPTURE".to_string(), "true".to_string()),
            ("POD_NAME".to_string(), String::new()),
        ])
    );
    assert_eq!(a.proxy_type.as_deref(), Some("sidecar"));
    let containers: Vec<&str> = a.containers.iter().map(String::as_str).collect();
    assert_eq!(containers, ["app", "istio-proxy", "istio-validation"]);
    assert_eq!(a.labels.get("app").map(String::as_str), Some("shop"));
    let ips: Vec<IpAddr> = vec!["10.1.0.5".parse().unwrap(), "fd00::5".parse().unwrap()];
    assert_eq!(a.pod_ips, ips);
    assert!(!a.deleted);
    assert_eq!(w.by_uid("uid-b").map(|p| p.name), Some("b".to_string()));
    assert_eq!(w.get("shop", "c"), None, "a pod of another node");
    assert_eq!(w.by_uid("uid-c"), None);
    assert_eq!(w.len(), 2);
    let (annotations, env, uid, gid) = a.clone().into_inputs();
    assert_eq!(
        (annotations, env, uid, gid),
        (a.annotations, a.proxy_env, Some(1337), Some(3000))
    );

    // MODIFIED: an annotation changed.
    fake.modify(pod(
        "a",
        "uid-a",
        "node-a",
        &[
            inject,
            ("traffic.sidecar.istio.io/excludeOutboundPorts", "9000,9001"),
        ],
        "10.1.0.5",
    ));
    wait_pod(&w, "a", "MODIFIED not applied", |p| {
        p.and_then(|p| {
            p.annotations
                .get("traffic.sidecar.istio.io/excludeOutboundPorts")
                .cloned()
        })
        .as_deref()
            == Some("9000,9001")
    });
    assert_eq!(
        w.by_uid("uid-a").unwrap().annotations["traffic.sidecar.istio.io/excludeOutboundPorts"],
        "9000,9001"
    );

    // ADDED after the list; terminating (deletionTimestamp set); then DELETED.
    fake.add(pod("d", "uid-d", "node-a", &[], "10.1.0.8"));
    assert!(w.wait_for("shop", "d", WAIT).is_some(), "ADDED not applied");
    let mut terminating = pod("b", "uid-b", "node-a", &[inject], "10.1.0.6");
    terminating["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
    fake.modify(terminating);
    wait_pod(&w, "b", "deletionTimestamp not seen", |p| {
        p.is_some_and(|p| p.deleted)
    });
    fake.delete("shop", "b");
    wait_pod(&w, "b", "DELETED not applied", |p| p.is_none());
    assert_eq!(w.by_uid("uid-b"), None);
    // Events of other nodes' pods never reach this watcher.
    fake.modify(pod("c", "uid-c", "node-b", &[], "10.2.0.7"));
    fake.delete("shop", "c");
    fake.delete("shop", "d");
    wait_pod(&w, "d", "DELETED not applied", |p| p.is_none());
    let names: Vec<String> = w.list().into_iter().map(|p| p.name).collect();
    assert_eq!(names, ["a"]);

    // What was asked of the API: a list and a watch, both of this node's pods only.
    let reqs = requests_of_pods(&fake);
    assert!(
        reqs.iter().any(|q| !q.contains_key("watch")),
        "no list: {reqs:?}"
    );
    assert!(
        reqs.iter()
            .any(|q| q.get("watch").is_some_and(|v| v == "true")),
        "no watch: {reqs:?}"
    );
    for q in &reqs {
        assert_eq!(
            q.get("fieldSelector").map(String::as_str),
            Some("spec.nodeName=node-a"),
            "{q:?}"
        );
    }

    // Dropping the last handle ends the watch.
    drop(w);
    for _ in 0..200 {
        if fake.open_watches() == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(fake.open_watches(), 0, "the watch outlived the watcher");
}

#[test]
fn retries_failed_lists_and_relists_after_an_expired_watch() {
    let fake = FakeApiServer::start();
    fake.add(pod("a", "uid-a", "node-a", &[], "10.1.0.5"));
    fake.add(pod("b", "uid-b", "node-a", &[], "10.1.0.6"));
    // The first lists fail (HTTP 500): the watcher backs off and lists again.
    fake.fail_next_lists(2);
    let w = PodWatcher::start(fake.kube_config(), "node-a").unwrap();
    assert!(w.wait_synced(WAIT), "never synced after failed lists");
    assert_eq!(w.len(), 2);
    let lists = |f: &FakeApiServer| {
        requests_of_pods(f)
            .iter()
            .filter(|q| !q.contains_key("watch"))
            .count()
    };
    assert!(
        lists(&fake) >= 3,
        "the failed lists were not retried: {:?}",
        fake.requests()
    );

    // Events the watcher missed: b went away and e came while its watch was down; the next
    // watch is refused as expired (410), so the watcher relists and the list is the truth.
    let before = lists(&fake);
    fake.delete_silently("shop", "b");
    fake.add_silently(pod("e", "uid-e", "node-a", &[], "10.1.0.9"));
    fake.end_watches(true);
    assert!(
        w.wait_until(WAIT, |w| w.get("shop", "b").is_none()
            && w.get("shop", "e").is_some()),
        "no relist after the expired watch: {:?}",
        w.list()
    );
    assert!(lists(&fake) > before);
    assert_eq!(w.by_uid("uid-b"), None);
    assert!(w.is_synced());

    // And it follows events again after the relist.
    fake.modify(pod("a", "uid-a", "node-a", &[("k", "v")], "10.1.0.5"));
    wait_pod(&w, "a", "MODIFIED after relist", |p| {
        p.is_some_and(|p| p.annotations.contains_key("k"))
    });
}

#[test]
fn spawns_on_a_callers_runtime() {
    let fake = FakeApiServer::start();
    fake.add(pod("a", "uid-a", "node-a", &[], "10.1.0.5"));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let w = rt.block_on(async {
        let client = kube::Client::try_from(fake.kube_config()).unwrap();
        PodWatcher::spawn(client, "node-a")
    });
    assert!(w.wait_synced(WAIT));
    assert_eq!(w.get("shop", "a").map(|p| p.uid), Some("uid-a".to_string()));
}

#[test]
fn refuses_an_empty_node_name() {
    let fake = FakeApiServer::start();
    let err = PodWatcher::start(fake.kube_config(), "").unwrap_err();
    assert!(err.to_string().contains("node"), "{err}");
    assert!(fake.requests().is_empty());
}

#[test]
fn kubeconfig_flag_selects_the_cluster() {
    // A real kubeconfig file, read by kube-rs: the server URL in it is what the client uses.
    let dir = std::env::temp_dir().join(format!("interceptor-kubeconfig-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("config");
    std::fs::write(
        &path,
        "apiVersion: v1\nkind: Config\ncurrent-context: fake\n\
         clusters:\n- name: fake\n  cluster:\n    server: http://127.0.0.1:6443\n\
         contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: nobody\n    namespace: shop\n\
         users:\n- name: nobody\n  user: {}\n",
    )
    .unwrap();
    let args = interceptor::k8s::ApiAccess {
        node_name: Some("node-a".into()),
        kubeconfig: Some(path),
    };
    let config = args.config_blocking().unwrap();
    assert_eq!(config.cluster_url.to_string(), "http://127.0.0.1:6443/");
    assert_eq!(config.default_namespace, "shop");
    let missing = interceptor::k8s::ApiAccess {
        node_name: None,
        kubeconfig: Some(dir.join("absent")),
    };
    assert!(missing.config_blocking().is_err());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn flags_parse() {
    use clap::Parser;
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        k8s: interceptor::cli::K8sArgs,
    }
    let cli = Cli::parse_from(["x", "--node-name", "node-a", "--kubeconfig", "/etc/kc"]);
    assert_eq!(cli.k8s.node_name.as_deref(), Some("node-a"));
    assert_eq!(cli.k8s.kubeconfig, Some("/etc/kc".into()));
}

const EXCLUDE_OUT: &str = "traffic.sidecar.istio.io/excludeOutboundPorts";

/// An injected pod of node-a excluding outbound `ports` from capture.
fn web(name: &str, uid: &str, ports: &str, ip: &str) -> Value {
    let inject = ("sidecar.istio.io/status", "{}");
    pod(name, uid, "node-a", &[inject, (EXCLUDE_OUT, ports)], ip)
}

/// A StatefulSet pod recreated under its name (`web-0`, a new uid) while the watch lags (the
/// new pod's ADDED held back, the old one's DELETED delayed past it): asked by uid, the watcher
/// answers for that very pod — it waits for it, or says it only knows another uid — and never
/// hands out the predecessor's annotations.
#[test]
fn a_recreated_pod_is_found_by_uid_never_by_its_predecessor() {
    let fake = FakeApiServer::start();
    fake.add(web("web-0", "uid-a", "9000", "10.1.0.5"));
    let w = PodWatcher::start(fake.kube_config(), "node-a").unwrap();
    assert!(w.wait_synced(WAIT), "the initial list never completed");
    let uid_of = |l: &Lookup| match l {
        Lookup::Found(m) => format!("found {}", m.uid),
        other => format!("{other:?}"),
    };
    let found = w.wait_for_uid("shop", "web-0", "uid-a", Duration::ZERO);
    assert_eq!(uid_of(&found), "found uid-a");

    fake.pause();
    let old = fake.delete_delayed("shop", "web-0");
    fake.add(web("web-0", "uid-b", "8081", "10.1.0.6"));
    // The cache still holds only the predecessor: by name it answers uid-a (what an older
    // client got); by uid it waits the time given, then names the uid it knows.
    assert_eq!(
        w.get("shop", "web-0").map(|p| p.uid).as_deref(),
        Some("uid-a")
    );
    let t = std::time::Instant::now();
    let lagging = w.wait_for_uid("shop", "web-0", "uid-b", Duration::from_millis(500));
    assert_eq!(lagging, Lookup::OtherUid("uid-a".into()));
    assert!(t.elapsed() >= Duration::from_millis(500), "did not wait");

    // A caller already waiting gets the new pod as soon as its ADDED arrives; the old pod's
    // DELETED is still delayed.
    let waiter = {
        let w = w.clone();
        std::thread::spawn(move || w.wait_for_uid("shop", "web-0", "uid-b", WAIT))
    };
    std::thread::sleep(Duration::from_millis(300));
    fake.resume();
    match waiter.join().unwrap() {
        Lookup::Found(m) => {
            assert_eq!(m.uid, "uid-b");
            assert_eq!(
                m.annotations[EXCLUDE_OUT], "8081",
                "the predecessor's annotations"
            );
        }
        other => panic!("uid-b not found after its ADDED: {other:?}"),
    }
    assert_eq!(
        w.by_uid("uid-a"),
        None,
        "the predecessor outlived its successor's ADDED"
    );

    // The delayed DELETED of the predecessor, last: the new pod stays.
    let seen = w.generation();
    fake.deliver_late("DELETED", old);
    assert!(
        w.wait_until(WAIT, |w| w.generation() > seen),
        "late DELETED not applied"
    );
    let found = w.wait_for_uid("shop", "web-0", "uid-b", Duration::ZERO);
    assert_eq!(uid_of(&found), "found uid-b");
    // The uid must name this very pod; and a pod nobody knows is unknown.
    let wrong = w.wait_for_uid("shop", "web-1", "uid-b", Duration::from_millis(100));
    assert_eq!(wrong, Lookup::Unknown);
}

/// A daemon watching node-a's pods through `fake`.
fn daemon_for(
    tag: &str,
    fake: &FakeApiServer,
    dir: &std::path::Path,
) -> interceptor_tests::daemon::DaemonProc {
    let kubeconfig = fake.write_kubeconfig(dir);
    interceptor_tests::daemon::DaemonProc::start_with(
        tag,
        &[
            "--node-name",
            "node-a",
            "--kubeconfig",
            kubeconfig.to_str().unwrap(),
        ],
    )
    .unwrap()
}

/// The CNI plugin's ADD for the pod in `topo`'s netns, with `cni_args` (the pod's identity)
/// and no annotations from the runtime.
fn cni_add(
    d: &interceptor_tests::daemon::DaemonProc,
    topo: &interceptor_tests::topology::Topology,
    cni_args: &str,
) -> std::process::Output {
    let netns = topo.pod_netns();
    let conf = serde_json::json!({
        "cniVersion": "1.0.0", "name": "test-net", "type": "interceptor",
        "socket": d.socket(), "bpffs": d.bpffs(),
        "prevResult": {"cniVersion": "1.0.0", "interfaces": [{"name": "eth0", "sandbox": netns}],
                       "ips": [{"address": format!("{}/24", topo.pod_v4()), "interface": 0}]},
    });
    let mut child = std::process::Command::new(interceptor_tests::bin::interceptor_bin())
        .env("CNI_COMMAND", "ADD")
        .env("CNI_CONTAINERID", "ctr-k8s")
        .env("CNI_NETNS", netns)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/usr/lib/cni")
        .env("CNI_ARGS", cni_args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), conf.to_string().as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

fn text(out: &std::process::Output) -> String {
    format!(
        "{} {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The daemon watches its node's pods (`--node-name`, `--kubeconfig` to the fake API), and a
/// CNI ADD whose runtime passed no annotations gets the pod's annotations from it: the
/// registered config carries the pod's `excludeOutboundPorts`.
#[test]
fn cni_add_takes_annotations_from_the_daemons_watcher() {
    use interceptor_tests::topology::Topology;
    let fake = FakeApiServer::start();
    fake.add(pod(
        "web",
        "uid-web",
        "node-a",
        &[
            ("sidecar.istio.io/status", "{}"),
            ("traffic.sidecar.istio.io/excludeOutboundPorts", "8081"),
        ],
        "10.1.0.7",
    ));
    let dir = std::env::temp_dir().join(format!("ic-kcfg-{}", std::process::id()));
    let d = daemon_for("k8scni", &fake, &dir);
    let topo = Topology::new("k8scni").unwrap();
    let netns = topo.pod_netns();
    let out = cni_add(
        &d,
        &topo,
        "K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web;K8S_POD_UID=uid-web",
    );
    assert!(out.status.success(), "ADD: {}", text(&out));
    let show = d.pod_ok(&[
        "show",
        "-o",
        "json",
        "--network-namespace",
        netns.to_str().unwrap(),
    ]);
    assert!(
        show.contains("\"outbound_ports_exclude\": \"8081\""),
        "annotation not applied:\n{show}\n{}",
        d.log()
    );
    assert!(show.contains("\"name\": \"web\""), "{show}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The CNI ADD decides "mesh this pod?" as Istio's plugin does from the pod object the watcher
/// holds: a gateway (proxy `router`), a pod that still has `istio-init`, one without an
/// `istio-proxy`, one labelled `sidecar.istio.io/inject=false` and one in an excluded namespace
/// are passed through uncaptured (ADD succeeds, nothing registered, the reason said); a pod the
/// watcher does not know (no annotations from the runtime either) fails the ADD with a
/// retryable error (code 11) instead of being captured blindly.
#[test]
fn cni_add_skips_pods_istio_would_leave_alone_and_never_guesses() {
    use interceptor_tests::topology::Topology;
    let fake = FakeApiServer::start();
    let inject = [("sidecar.istio.io/status", "{}")];
    let mut gateway = pod("gw", "uid-gw", "node-a", &inject, "10.1.0.20");
    gateway["spec"]["containers"][1]["args"] = json!(["proxy", "router"]);
    let mut legacy = pod("legacy", "uid-legacy", "node-a", &inject, "10.1.0.21");
    legacy["spec"]["initContainers"] = json!([{"name": "istio-init", "image": "proxyv2:1"}]);
    let mut bare = pod("bare", "uid-bare", "node-a", &inject, "10.1.0.22");
    bare["spec"]["containers"] = json!([{"name": "app", "image": "app:1"}]);
    let mut off = pod("off", "uid-off", "node-a", &inject, "10.1.0.23");
    off["metadata"]["labels"]["sidecar.istio.io/inject"] = json!("false");
    let mut system = pod("dns", "uid-dns", "node-a", &inject, "10.1.0.24");
    system["metadata"]["namespace"] = json!("kube-system");
    let cases = [
        (gateway, "shop/gw/uid-gw", "router"),
        (legacy, "shop/legacy/uid-legacy", "istio-init"),
        (bare, "shop/bare/uid-bare", "istio-proxy"),
        (off, "shop/off/uid-off", "inject"),
        (system, "kube-system/dns/uid-dns", "kube-system"),
    ];
    for (p, _, _) in &cases {
        fake.add(p.clone());
    }
    let dir = std::env::temp_dir().join(format!("ic-kcfg-skip-{}", std::process::id()));
    let d = daemon_for("k8sskip", &fake, &dir);
    for (i, (_, id, why)) in cases.iter().enumerate() {
        let topo = Topology::new(&format!("k8sskip{i}")).unwrap();
        let parts: Vec<&str> = id.split('/').collect();
        let args = format!(
            "K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_UID={}",
            parts[0], parts[1], parts[2]
        );
        let out = cni_add(&d, &topo, &args);
        assert!(out.status.success(), "{id}: ADD {}", text(&out));
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(
            said.contains("not capturing") && said.contains(why),
            "{id}: the reason ({why}) not said: {said}"
        );
        let ns = topo.pod_netns().to_str().unwrap().to_string();
        assert!(
            !d.pod(&["show", "--network-namespace", &ns])
                .status
                .success(),
            "{id}: registered although Istio's plugin would skip it"
        );
    }
    // Unknown to the watcher, no annotations from the runtime: no guess.
    let topo = Topology::new("k8sskipu").unwrap();
    let out = cni_add(
        &d,
        &topo,
        "K8S_POD_NAMESPACE=shop;K8S_POD_NAME=ghost;K8S_POD_UID=uid-g",
    );
    assert!(!out.status.success(), "unknown pod: ADD {}", text(&out));
    let err: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(err["code"], 11, "{err}");
    assert!(err["msg"].as_str().unwrap().contains("shop/ghost"), "{err}");
    let ns = topo.pod_netns().to_str().unwrap().to_string();
    assert!(!d
        .pod(&["show", "--network-namespace", &ns])
        .status
        .success());
    let _ = std::fs::remove_dir_all(&dir);
}

/// Plugin → daemon → watcher by uid: a StatefulSet pod recreated under its name while the
/// daemon's watch lags (its ADDED held back, its predecessor's DELETED delayed) is registered
/// with its own annotations — the daemon waits for its uid — and when the watch has not caught
/// up in time, ADD fails (code 11, retried by the kubelet) and registers nothing; it never
/// registers the pod with the predecessor's annotations (here: a pod left uncaptured).
#[test]
fn cni_add_of_a_recreated_pod_waits_for_its_own_uid() {
    use interceptor_tests::topology::Topology;
    let fake = FakeApiServer::start();
    // The predecessors: web-0 with other annotations, web-1 not injected (its successor would
    // be started uncaptured if its annotations were taken).
    fake.add(web("web-0", "uid-a", "9000", "10.1.0.5"));
    fake.add(pod("web-1", "uid-c", "node-a", &[], "10.1.0.6"));
    let dir = std::env::temp_dir().join(format!("ic-kcfg-uid-{}", std::process::id()));
    let d = daemon_for("k8suid", &fake, &dir);
    let show = |topo: &Topology| {
        d.pod(&[
            "show",
            "-o",
            "json",
            "--network-namespace",
            topo.pod_netns().to_str().unwrap(),
        ])
    };

    // web-0 recreated (uid-b) while the watch lags; the ADD starts before the watch catches up.
    fake.pause();
    let old = fake.delete_delayed("shop", "web-0");
    fake.add(web("web-0", "uid-b", "8081", "10.1.0.5"));
    let t0 = Topology::new("k8suid0").unwrap();
    let add = std::thread::scope(|s| {
        let add = s.spawn(|| {
            cni_add(
                &d,
                &t0,
                "K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;K8S_POD_UID=uid-b",
            )
        });
        std::thread::sleep(Duration::from_secs(1));
        fake.resume();
        add.join().unwrap()
    });
    assert!(add.status.success(), "ADD: {}\n{}", text(&add), d.log());
    let shown = String::from_utf8_lossy(&show(&t0).stdout).into_owned();
    assert!(
        shown.contains("\"outbound_ports_exclude\": \"8081\"")
            && shown.contains("\"uid\": \"uid-b\""),
        "not registered with its own annotations:\n{shown}"
    );
    fake.deliver_late("DELETED", old);

    // web-1 recreated (uid-d, injected) and the watch does not catch up within the daemon's
    // wait: ADD fails with a retryable error naming both uids; nothing is registered.
    fake.pause();
    let old = fake.delete_delayed("shop", "web-1");
    fake.add(web("web-1", "uid-d", "8082", "10.1.0.6"));
    let t1 = Topology::new("k8suid1").unwrap();
    let args = "K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-1;K8S_POD_UID=uid-d";
    let add = cni_add(&d, &t1, args);
    assert!(
        !add.status.success(),
        "ADD with the predecessor's annotations: {}",
        text(&add)
    );
    let err: serde_json::Value = serde_json::from_slice(&add.stdout).unwrap();
    assert_eq!(err["code"], 11, "{err}");
    let msg = err["msg"].as_str().unwrap();
    assert!(msg.contains("uid-c") && msg.contains("uid-d"), "{msg}");
    assert!(!show(&t1).status.success(), "registered after a failed ADD");
    // The kubelet's retry, once the watch has caught up: its own annotations.
    fake.resume();
    fake.deliver_late("DELETED", old);
    let add = cni_add(&d, &t1, args);
    assert!(
        add.status.success(),
        "retried ADD: {}\n{}",
        text(&add),
        d.log()
    );
    let shown = String::from_utf8_lossy(&show(&t1).stdout).into_owned();
    assert!(
        shown.contains("\"outbound_ports_exclude\": \"8082\""),
        "{shown}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
