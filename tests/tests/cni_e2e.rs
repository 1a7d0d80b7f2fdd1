//! The `interceptor` binary as a chained CNI plugin, driven as a container runtime drives it:
//! `CNI_COMMAND`/`CNI_CONTAINERID`/`CNI_NETNS`/`CNI_IFNAME`/`CNI_PATH`/`CNI_ARGS` plus the
//! network config on stdin, the chain's `prevResult` fed forward, DEL in reverse order.
//!
//! The real chain is Debian's containernetworking-plugins (loopback, then bridge + host-local)
//! followed by ours, against a private daemon (`DaemonProc`).
//!
//! Network safety: the bridge lives in a dedicated "node" netns (`ic-cninode-…-up`; the
//! bridge plugin runs under `ip netns exec <node>`), the pod netns (`ic-cnipod-…-pod`) is
//! created by the test, addressing is a private 10.250.X.0/24 with host-local keeping its
//! state in a temp dir, and traffic only flows between the pod and servers in the node netns.
//! Nothing is created in the host's network namespace, and `cni-install` only ever writes to
//! temp dirs. Names follow the topology fixture's pattern so a killed run's leftovers are
//! reaped by `topology::reap_stale`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use interceptor_tests::bin::interceptor_bin;
use interceptor_tests::cni::{invoke, Invocation, Node, Run, Runtime};
use interceptor_tests::daemon::DaemonProc;
use interceptor_tests::sidecar::{Sidecar, SidecarConfig, TagServer};
use interceptor_tests::topology::Topology;
use serde_json::{json, Value};

const UPSTREAM_PORT: u16 = 8080;
/// Excluded from capture by the pod's annotation.
const EXCLUDED_PORT: u16 = 8081;
const APP_PORT: u16 = 9080;
const TIMEOUT: Duration = Duration::from_secs(3);

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn unique() -> (u32, u32) {
    (std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed))
}

/// Runs our plugin directly (no chain) for `netns`.
fn ours(command: &str, netns: Option<&Path>, args: &str, conf: &Value) -> Run {
    let bin = interceptor_bin();
    let dir = bin.parent().unwrap().to_path_buf();
    let inv = Invocation {
        command,
        container_id: "ctr-test",
        netns,
        ifname: "eth0",
        args,
        cni_path: &dir,
        in_netns: None,
    };
    invoke(&bin, &inv, conf.to_string().as_bytes())
}

fn our_conf(d: &DaemonProc, extra: Value) -> Value {
    let mut c = json!({
        "cniVersion": "1.0.0",
        "name": "test-net",
        "type": "interceptor",
        "socket": d.socket(),
        "bpffs": d.bpffs(),
    });
    if let Value::Object(m) = extra {
        c.as_object_mut().unwrap().extend(m);
    }
    c
}

fn registered(d: &DaemonProc) -> String {
    d.pod_ok(&["list"])
}

fn connect(netns: &Path, uid: u32, dst: SocketAddr) -> String {
    interceptor_tests::topology::reply_of(netns, uid, dst, TIMEOUT)
}

#[test]
fn real_chain_add_check_traffic_del() {
    let d = DaemonProc::start("cnichain").unwrap();
    let node = Node::with_interceptor();
    let gw = node.gateway();
    let list = json!({
        "cniVersion": "1.0.0",
        "name": "ic-cni-test",
        "plugins": [
            {
                "type": "bridge",
                "bridge": "cni-ic0",
                "isGateway": true,
                "ipMasq": false,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": node.subnet(), "gateway": gw.to_string()}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": node.dir.join("ipam"),
                },
            },
            {
                "type": "interceptor",
                "socket": d.socket(),
                "bpffs": d.bpffs(),
                "capabilities": {"io.kubernetes.cri.pod-annotations": true},
            },
        ],
    });
    // containerd runs the loopback network on its own before the pod's network.
    let lo =
        json!({"cniVersion": "1.0.0", "name": "cni-loopback", "plugins": [{"type": "loopback"}]});
    let annotations = json!({
        "sidecar.istio.io/status": "{\"containers\":[\"istio-proxy\"]}",
        "traffic.sidecar.istio.io/excludeOutboundPorts": EXCLUDED_PORT.to_string(),
    });
    let uid = format!("uid-{}", node.pod);
    let args = format!(
        "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID=ctr-{};K8S_POD_UID={uid}",
        node.pod
    );
    let caps = json!({"io.kubernetes.cri.pod-annotations": annotations});
    let mut lo_rt = Runtime::new(&node, args.clone(), caps.clone());
    let mut rt = Runtime::new(&node, args, caps);

    println!(
        "chain ADD (pod netns {}, node netns {})",
        node.pod, node.node
    );
    lo_rt
        .add(&lo)
        .unwrap_or_else(|(i, r)| panic!("loopback ADD #{i}: {r:?}"));
    let result = rt
        .add(&list)
        .unwrap_or_else(|(i, r)| panic!("ADD of plugin #{i}: {r:?}"));
    // Our ADD passed the bridge's result through.
    assert_eq!(result["cniVersion"], "1.0.0");
    let pod_ip: Ipv4Addr = result["ips"][0]["address"]
        .as_str()
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(result["interfaces"]
        .as_array()
        .is_some_and(|i| !i.is_empty()));

    // The daemon holds the pod: this netns, the IP from prevResult, the identity, the config
    // from the annotations.
    let ns = node.pod_path();
    let show: Value = serde_json::from_str(&d.pod_ok(&[
        "show",
        "-o",
        "json",
        "--network-namespace",
        ns.to_str().unwrap(),
    ]))
    .unwrap();
    println!(
        "registered: backend={} why={:?} ips={} identity={}",
        show["backend"], show["why"], show["ips"], show["identity"]
    );
    assert_eq!(show["ips"], json!([pod_ip.to_string()]));
    assert_eq!(
        show["identity"],
        json!({"namespace": "default", "name": "web-0", "uid": uid})
    );
    assert_eq!(
        show["config"]["outbound_ports_exclude"],
        EXCLUDED_PORT.to_string()
    );
    assert_eq!(show["config"]["inbound_ports_exclude"], "15020,15021,15090");
    assert_eq!(show["config"]["outbound_ip_ranges_include"], "*");

    // CHECK of the whole chain.
    for (i, r) in rt.check(&list).iter().enumerate() {
        assert!(r.ok, "CHECK of plugin #{i}: {r:?}");
    }
    println!("  CHECK bridge, interceptor -> ok");

    // The pod's containers start: the sidecar (uid 1337) and an app server; servers in the
    // node stand for the rest of the cluster.
    let sidecar = Sidecar::with_config(&ns, SidecarConfig::default()).unwrap();
    let _app = TagServer::spawn(&ns, "app", &[APP_PORT], None).unwrap();
    let upstream = TagServer::spawn(
        &node.node_path(),
        "upstream",
        &[UPSTREAM_PORT, EXCLUDED_PORT],
        None,
    )
    .unwrap();
    let dst = SocketAddr::new(IpAddr::V4(gw), UPSTREAM_PORT);
    let excluded = SocketAddr::new(IpAddr::V4(gw), EXCLUDED_PORT);
    let inbound = SocketAddr::new(IpAddr::V4(pod_ip), APP_PORT);

    let app_out = connect(&ns, 1000, dst);
    let proxy_out = connect(&ns, 1337, dst);
    let excl_out = connect(&ns, 1000, excluded);
    let in_out = connect(&node.node_path(), 0, inbound);
    println!("traffic after ADD: app->{dst}: {app_out}; proxy->{dst}: {proxy_out}; app->{excluded}: {excl_out}; node->{inbound}: {in_out}");
    assert_eq!(
        app_out, "sidecar:15001",
        "outbound app traffic not captured"
    );
    assert_eq!(sidecar.outbound()[0].original_dst, Some(dst));
    assert_eq!(proxy_out, format!("upstream:{UPSTREAM_PORT}"));
    assert_eq!(
        excl_out,
        format!("upstream:{EXCLUDED_PORT}"),
        "annotation's exclude ignored"
    );
    assert_eq!(in_out, "sidecar:15006", "inbound traffic not captured");
    assert_eq!(sidecar.inbound()[0].original_dst, Some(inbound));
    sidecar.take_records();
    upstream.take_records();

    // DEL in reverse order: ours first; the pod is unregistered and traffic flows direct.
    println!("chain DEL (reverse order)");
    let r = rt.del(&list, 1);
    assert!(r.ok && r.stdout.is_empty(), "DEL interceptor: {r:?}");
    println!("  DEL interceptor  -> ok");
    assert!(
        !registered(&d).contains(&node.pod),
        "still registered after DEL"
    );
    let app_after = connect(&ns, 1000, dst);
    let in_after = connect(&node.node_path(), 0, inbound);
    println!("traffic after DEL: app->{dst}: {app_after}; node->{inbound}: {in_after}");
    assert_eq!(
        app_after,
        format!("upstream:{UPSTREAM_PORT}"),
        "still captured after DEL"
    );
    assert_eq!(
        in_after,
        format!("app:{APP_PORT}"),
        "inbound still captured after DEL"
    );
    assert!(sidecar.records().is_empty());
    // CHECK of ours now fails: not registered.
    let c = rt.run_plugin("CHECK", &list, 1, rt.cached.as_ref());
    assert_eq!(c.error()["code"], 100, "{c:?}");
    println!(
        "  CHECK interceptor after DEL -> code 100 ({})",
        c.error()["msg"]
    );
    // DEL is idempotent.
    assert!(rt.del(&list, 1).ok);
    let r = rt.del(&list, 0);
    assert!(r.ok, "DEL bridge: {r:?}");
    println!("  DEL bridge       -> ok");
    let r = lo_rt.del(&lo, 0);
    assert!(r.ok, "DEL loopback: {r:?}");
    println!("  DEL loopback     -> ok");
    // host-local released the address.
    let ipam = node.dir.join("ipam").join("ic-cni-test");
    assert!(!ipam.join(pod_ip.to_string()).exists(), "IP not released");
    println!("real chain: ADD registered, CHECK ok, capture proven, DEL unregistered");
}

#[test]
fn daemon_down_add_fails_closed() {
    let mut d = DaemonProc::start("cnidown").unwrap();
    let topo = Topology::new("cnidown").unwrap();
    let ns = topo.pod_netns();
    let conf = our_conf(&d, json!({}));
    d.kill9();
    let args = "K8S_POD_NAMESPACE=default;K8S_POD_NAME=a";
    let r = ours("ADD", Some(ns), args, &conf);
    let e = r.error();
    println!("daemon down: ADD -> {}", r.stdout);
    assert_eq!(e["code"], 11);
    assert_eq!(e["cniVersion"], "1.0.0");
    assert!(e["msg"].as_str().unwrap().contains("unreachable"), "{e}");
    // No socket at all: the same.
    let mut gone = conf.clone();
    gone["socket"] = json!(d.dir.join("no-such.sock"));
    assert_eq!(ours("ADD", Some(ns), args, &gone).error()["code"], 11);
    // Outside Kubernetes with a default config: the same.
    let mut default = conf.clone();
    default["defaultInterception"] = json!({});
    assert_eq!(ours("ADD", Some(ns), "", &default).error()["code"], 11);
    // DEL still succeeds (nothing to undo), CHECK fails.
    assert!(ours("DEL", Some(ns), args, &conf).ok);
    assert_eq!(ours("CHECK", Some(ns), args, &conf).error()["code"], 11);
    d.spawn().unwrap();
    assert!(!registered(&d).contains(topo.pod_ns_name()));
}

#[test]
fn add_del_check_directly() {
    let d = DaemonProc::start("cnidirect").unwrap();
    let topo = Topology::new("cnidirect").unwrap();
    let ns = topo.pod_netns();
    let name = topo.pod_ns_name();
    let args = "K8S_POD_NAMESPACE=prod;K8S_POD_NAME=api-1;K8S_POD_UID=u-1";
    let prev = json!({
        "cniVersion": "0.4.0",
        "interfaces": [{"name": "eth0", "sandbox": ns}],
        "ips": [{"version": "4", "address": format!("{}/24", topo.pod_v4()), "interface": 0}],
        "dns": {},
    });
    // No annotations from the runtime and no pod watcher in the daemon: whether this is a
    // mesh pod cannot be known, so the ADD fails for a retry and nothing is registered.
    let blind = our_conf(&d, json!({"cniVersion": "0.4.0", "prevResult": prev}));
    let e = ours("ADD", Some(ns), args, &blind).error();
    assert_eq!(e["code"], 11, "{e}");
    assert!(e["msg"].as_str().unwrap().contains("prod/api-1"), "{e}");
    assert!(!registered(&d).contains(name));
    // 0.4.0 config, an injected pod with no other annotations: Istio's defaults apply;
    // prevResult passed through.
    let conf = our_conf(
        &d,
        json!({"cniVersion": "0.4.0", "prevResult": prev,
               "podAnnotations": {"sidecar.istio.io/status": "{}"}}),
    );
    let r = ours("ADD", Some(ns), args, &conf);
    assert!(r.ok, "{r:?}");
    assert_eq!(r.json(), prev, "prevResult not passed through unchanged");
    let list = registered(&d);
    assert!(list.contains(name) && list.contains("prod/api-1"), "{list}");
    assert!(ours("CHECK", Some(ns), args, &conf).ok);
    // CHECK notices a registration that no longer matches the annotations.
    let changed = our_conf(
        &d,
        json!({"cniVersion": "0.4.0", "prevResult": prev,
               "podAnnotations": {"sidecar.istio.io/status": "{}",
                                  "traffic.sidecar.istio.io/excludeOutboundPorts": "9999"}}),
    );
    assert_eq!(ours("CHECK", Some(ns), args, &changed).error()["code"], 100);
    // CHECK is not part of 0.3.x.
    let old = our_conf(&d, json!({"cniVersion": "0.3.1"}));
    assert_eq!(ours("CHECK", Some(ns), args, &old).error()["code"], 1);

    // DEL: idempotent, also without CNI_NETNS.
    assert!(ours("DEL", Some(ns), args, &conf).ok);
    assert!(!registered(&d).contains(name));
    assert!(ours("DEL", Some(ns), args, &conf).ok);
    assert!(ours("DEL", None, args, &conf).ok);
    assert_eq!(ours("CHECK", Some(ns), args, &conf).error()["code"], 100);

    // Without CNI_NETNS, DEL drops the same pod's registration once its netns is gone.
    let other = Topology::new("cnidirect2").unwrap();
    let other_ns = other.pod_netns().to_path_buf();
    let other_name = other.pod_ns_name().to_string();
    assert!(ours("ADD", Some(&other_ns), args, &conf).ok);
    assert!(registered(&d).contains(&other_name));
    drop(other);
    assert!(
        ours(
            "DEL",
            None,
            "K8S_POD_NAMESPACE=prod;K8S_POD_NAME=other",
            &conf
        )
        .ok
    );
    assert!(
        registered(&d).contains(&other_name),
        "removed another pod's entry"
    );
    assert!(ours("DEL", None, args, &conf).ok);
    assert!(!registered(&d).contains(&other_name), "stale entry left");

    // A pod Istio's plugin would leave alone (annotations known, no sidecar) is passed
    // through without being registered.
    let plain = our_conf(
        &d,
        json!({"podAnnotations": {"app": "x"}, "prevResult": prev}),
    );
    let r = ours("ADD", Some(ns), args, &plain);
    assert!(r.ok, "{r:?}");
    assert_eq!(r.json()["cniVersion"], "1.0.0");
    assert!(r.stderr.contains("sidecar.istio.io/status"), "{}", r.stderr);
    assert!(!registered(&d).contains(name));
    assert!(ours("CHECK", Some(ns), args, &plain).ok);

    // The iptables backend: CHECK looks for our chains in the pod's netns.
    let ipt = our_conf(
        &d,
        json!({"backend": "iptables", "prevResult": prev,
               "podAnnotations": {"sidecar.istio.io/status": "{}"}}),
    );
    assert!(ours("ADD", Some(ns), args, &ipt).ok);
    assert!(registered(&d).contains("iptables"));
    let r = ours("CHECK", Some(ns), args, &ipt);
    assert!(r.ok, "{r:?}");
    for bin in ["iptables-legacy", "iptables-nft", "iptables"] {
        for table in ["nat", "mangle", "raw"] {
            let _ = topo.pod_exec(bin, &["-t", table, "-F"], None);
            let _ = topo.pod_exec(bin, &["-t", table, "-X"], None);
        }
    }
    let r = ours("CHECK", Some(ns), args, &ipt);
    assert_eq!(r.error()["code"], 101, "{r:?}");
    assert!(ours("DEL", Some(ns), args, &ipt).ok);
    assert!(!registered(&d).contains(name));

    // VERSION.
    let v = ours("VERSION", None, "", &json!({"cniVersion": "1.0.0"})).json();
    assert_eq!(
        v["supportedVersions"],
        json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0"])
    );
}

/// A runtime outside Kubernetes (`ctr run --cni` and the like: no `K8S_*` in CNI_ARGS, no
/// annotations): left alone unless the conflist's `defaultInterception` says how to mesh it,
/// then registered with it; the runtime's Istio annotations still override it, and a bad value
/// in it is refused with the value named and nothing registered.
#[test]
fn outside_kubernetes_default_interception() {
    let d = DaemonProc::start("cnidefault").unwrap();
    let topo = Topology::new("cnidefault").unwrap();
    let ns = topo.pod_netns();
    let name = topo.pod_ns_name();
    let path = ns.to_str().unwrap();
    let args = "IgnoreUnknown=1";

    let r = ours("ADD", Some(ns), args, &our_conf(&d, json!({})));
    assert!(r.ok, "{r:?}");
    assert!(r.stderr.contains("defaultInterception"), "{}", r.stderr);
    assert!(!registered(&d).contains(name), "captured without a default");

    let bad = our_conf(
        &d,
        json!({"defaultInterception": {"annotations":
            {"traffic.sidecar.istio.io/excludeOutboundPorts": "99999"}}}),
    );
    let r = ours("ADD", Some(ns), args, &bad);
    assert_eq!(r.error()["code"], 7, "{r:?}");
    assert!(r.stdout.contains("99999"), "{}", r.stdout);
    assert!(!registered(&d).contains(name));

    let mesh = our_conf(
        &d,
        json!({"defaultInterception": {"annotations":
            {"traffic.sidecar.istio.io/excludeOutboundPorts": "9999"}, "runAsUser": 1500}}),
    );
    let r = ours("ADD", Some(ns), args, &mesh);
    assert!(r.ok, "{r:?}");
    let show: Value =
        serde_json::from_str(&d.pod_ok(&["show", "-o", "json", "--network-namespace", path]))
            .unwrap();
    assert_eq!(show["config"]["outbound_ports_exclude"], "9999", "{show}");
    assert_eq!(show["config"]["proxy_uid"], "1500", "{show}");
    assert!(show["identity"].is_null(), "{show}");
    assert!(ours("CHECK", Some(ns), args, &mesh).ok);
    // Traffic: the app's connection reaches the proxy, the proxy's own (uid 1500) goes direct.
    let proxy_cfg = SidecarConfig {
        creds: Some((1500, 1500)),
        ..SidecarConfig::default()
    };
    let _sidecar = Sidecar::with_config(ns, proxy_cfg).unwrap();
    let _up = TagServer::spawn(topo.upstream_netns(), "upstream", &[UPSTREAM_PORT], None).unwrap();
    let dst = SocketAddr::new(topo.upstream_v4().into(), UPSTREAM_PORT);
    let (app, proxy) = (connect(ns, 1000, dst), connect(ns, 1500, dst));
    println!("defaultInterception: app->{dst}: {app}; proxy->{dst}: {proxy}");
    assert_eq!(app, "sidecar:15001", "app not captured");
    assert_eq!(proxy, format!("upstream:{UPSTREAM_PORT}"), "proxy captured");
    assert!(ours("DEL", Some(ns), args, &mesh).ok);
    assert!(!registered(&d).contains(name));

    // The runtime's own annotation opts the container out.
    let mut off = mesh.clone();
    off["podAnnotations"] = json!({"sidecar.istio.io/inject": "false"});
    let r = ours("ADD", Some(ns), args, &off);
    assert!(r.ok, "{r:?}");
    assert!(r.stderr.contains("inject"), "{}", r.stderr);
    assert!(!registered(&d).contains(name));
}

fn cli(args: &[&str]) -> Output {
    Command::new(interceptor_bin())
        .args(args)
        .env_remove("CNI_COMMAND")
        .output()
        .unwrap()
}

fn read(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

#[test]
fn cni_install_and_uninstall() {
    let (pid, n) = unique();
    let root = std::env::temp_dir().join(format!("ic-cni-install-{pid}-{n}"));
    let (bin, conf) = (root.join("bin"), root.join("net.d"));
    std::fs::create_dir_all(&conf).unwrap();
    let dirs = |cmd: &str, sock: &str| {
        let out = cli(&[
            cmd,
            "--cni-bin-dir",
            bin.to_str().unwrap(),
            "--cni-conf-dir",
            conf.to_str().unwrap(),
            "--socket",
            sock,
        ]);
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };

    // No network config yet: refused, nothing written.
    let (ok, out) = dirs("cni-install", "/run/ic.sock");
    assert!(!ok && out.contains("no CNI network config"), "{out}");
    assert!(!bin.join("interceptor").exists());

    // A conflist (first in lexical order) and another config.
    let primary = conf.join("10-bridge.conflist");
    let original = json!({"cniVersion": "1.0.0", "name": "k8s", "plugins": [
        {"type": "bridge", "bridge": "cni0", "ipam": {"type": "host-local"}},
        {"type": "portmap", "capabilities": {"portMappings": true}}]});
    std::fs::write(&primary, serde_json::to_string_pretty(&original).unwrap()).unwrap();
    let other = conf.join("20-other.conf");
    std::fs::write(&other, r#"{"cniVersion":"1.0.0","name":"o","type":"ptp"}"#).unwrap();

    let (ok, out) = dirs("cni-install", "/run/ic.sock");
    assert!(ok, "{out}");
    println!("cni-install:\n{out}");
    let installed = bin.join("interceptor");
    assert_eq!(
        std::fs::read(&installed).unwrap(),
        std::fs::read(interceptor_bin()).unwrap()
    );
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&installed).unwrap().permissions().mode() & 0o777,
        0o755
    );
    let v = read(&primary);
    let plugins = v["plugins"].as_array().unwrap();
    assert_eq!(plugins.len(), 3);
    assert_eq!(&plugins[..2], &original["plugins"].as_array().unwrap()[..]);
    assert_eq!(plugins[2]["type"], "interceptor");
    assert_eq!(plugins[2]["socket"], "/run/ic.sock");
    assert_eq!(
        plugins[2]["capabilities"]["io.kubernetes.cri.pod-annotations"],
        true
    );
    assert_eq!(v["name"], "k8s");
    assert!(!std::fs::read_to_string(&other)
        .unwrap()
        .contains("interceptor"));

    // Idempotent: nothing changes on a second run.
    let before = std::fs::read(&primary).unwrap();
    let (ok, out) = dirs("cni-install", "/run/ic.sock");
    assert!(ok && out.matches("unchanged").count() == 2, "{out}");
    assert_eq!(std::fs::read(&primary).unwrap(), before);
    // A new socket updates our entry (no duplicate), keeping keys an operator added.
    let mut v = read(&primary);
    v["plugins"][2]["backend"] = json!("iptables");
    std::fs::write(&primary, v.to_string()).unwrap();
    assert!(dirs("cni-install", "/run/other.sock").0);
    let v = read(&primary);
    assert_eq!(v["plugins"].as_array().unwrap().len(), 3);
    assert_eq!(v["plugins"][2]["socket"], "/run/other.sock");
    assert_eq!(v["plugins"][2]["backend"], "iptables");

    // The installed binary answers as a plugin.
    let inv = Invocation {
        command: "VERSION",
        container_id: "",
        netns: None,
        ifname: "",
        args: "",
        cni_path: &bin,
        in_netns: None,
    };
    let r = invoke(&installed, &inv, br#"{"cniVersion":"1.0.0"}"#);
    assert!(r.ok && r.json()["supportedVersions"].is_array(), "{r:?}");

    // Uninstall removes our entry and the binary; twice is fine.
    let (ok, out) = dirs("cni-uninstall", "/run/ic.sock");
    assert!(ok, "{out}");
    println!("cni-uninstall:\n{out}");
    assert_eq!(read(&primary)["plugins"], original["plugins"]);
    assert!(!installed.exists());
    assert!(dirs("cni-uninstall", "/run/ic.sock").0);

    // A lone .conf is converted into a conflist (as Istio does), then uninstalled.
    std::fs::remove_file(&primary).unwrap();
    std::fs::remove_file(&other).unwrap();
    let single = conf.join("05-ptp.conf");
    let conf_v = json!({"cniVersion": "0.4.0", "name": "podnet", "type": "ptp",
                        "ipam": {"type": "host-local"}});
    std::fs::write(&single, conf_v.to_string()).unwrap();
    let (ok, out) = dirs("cni-install", "/run/ic.sock");
    assert!(ok, "{out}");
    assert!(!single.exists());
    let list = read(&conf.join("05-ptp.conflist"));
    assert_eq!(list["cniVersion"], "0.4.0");
    assert_eq!(list["name"], "podnet");
    assert_eq!(list["plugins"][0]["type"], "ptp");
    assert_eq!(list["plugins"][0]["ipam"], conf_v["ipam"]);
    assert_eq!(list["plugins"][1]["type"], "interceptor");
    assert!(dirs("cni-uninstall", "/run/ic.sock").0);
    assert_eq!(
        read(&conf.join("05-ptp.conflist"))["plugins"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    let _ = std::fs::remove_dir_all(&root);
}
