//! The DaemonSet under a real container runtime: Debian's containerd and runc, started by the
//! test on a private root, state dir, socket and namespace (tests/src/containerd.rs), import
//! the image `cargo xtask image` builds and run deploy/daemonset.yaml's containers as the
//! kubelet would, from the YAML itself (command, args, env, privileges, host network and PID
//! namespace, hostPath mounts with their propagation): first its init container
//! (`cni-install` into the CNI bin and conf dirs of a test "node"), then its daemon container.
//! A pod netns set up by the real Debian CNI chain (bridge + host-local, from the node's
//! conflist that `cni-install` chained our plugin into) is captured; stopping the daemon
//! container leaves interception in place; a new daemon container re-adopts the pod.
//!
//! What the test changes in the DaemonSet, so that it never touches a real node's state and
//! tests can run in parallel:
//! - hostPath volumes of the daemon's own state (`/run/interceptor`) and of the node's CNI
//!   folders (`/opt/cni/bin`, `/etc/cni/net.d`) are private temp folders; bpffs, the cgroup
//!   root and `/var/run/netns` are the host's (as every e2e test's daemon uses them), and
//!   `/lib/modules` when the host has it;
//! - the daemon's `--bpffs` pin folder is a private one below /sys/fs/bpf, its metrics port a
//!   free one (host network), and `--node-name` is left out: there is no API server here, and
//!   the pod's annotations reach the plugin from the runtime (as containerd's CRI passes
//!   them);
//! - `--cgroup` names the host's cgroup v2 root as mounted in the container: below
//!   `/host/sys/fs/cgroup` on a hybrid host (`unified/`), as written on a unified one;
//! - the init container's `--socket` (a host path: the plugin runs on the host) names the
//!   same file in the private `/run/interceptor`.
//!
//! Network safety: as in cni_e2e, the bridge lives in the node netns, traffic flows between
//! the pod netns and servers in the node netns only. Removed afterwards, also on failure: the
//! containers, tasks, snapshots, image and containerd itself (its Drop), the netns, the pins
//! (`interceptor cleanup --bpffs`), the temp folders.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use interceptor_tests::bin;
use interceptor_tests::cni::{Node, Runtime};
use interceptor_tests::containerd::{missing_tools, Containerd};
use interceptor_tests::image;
use interceptor_tests::sidecar::{Sidecar, SidecarConfig, TagServer};
use interceptor_tests::topology::cgroup2_mount;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Container, PodSpec};
use serde_json::{json, Value};

const UPSTREAM_PORT: u16 = 8080;
const TIMEOUT: Duration = Duration::from_secs(3);

fn daemonset() -> PodSpec {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/daemonset.yaml");
    let ds: DaemonSet = serde_saphyr::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    ds.spec.unwrap().template.spec.unwrap()
}

/// Removes the daemon's pins when dropped (after the containers: declared before them).
struct Pins(PathBuf);

impl Drop for Pins {
    fn drop(&mut self) {
        let dir = self.0.to_str().unwrap().to_string();
        let out = bin::run(&["cleanup", "--bpffs", &dir], &[]);
        if !out.status.success() {
            eprintln!(
                "cleanup --bpffs {dir}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// How the test's "kubelet" maps the pod's hostPath volumes and rewrites its flags.
struct Kubelet<'a> {
    ctrd: &'a Containerd,
    spec: PodSpec,
    /// Volume name → host folder.
    volumes: BTreeMap<String, PathBuf>,
    /// Host path in the YAML → the private one used instead.
    private: Vec<(PathBuf, PathBuf)>,
    bpffs: PathBuf,
    metrics: SocketAddr,
}

impl Kubelet<'_> {
    /// A host path of the YAML as this test's node has it.
    fn host(&self, p: &Path) -> PathBuf {
        for (yaml, private) in &self.private {
            if let Ok(rest) = p.strip_prefix(yaml) {
                return private.join(rest);
            }
        }
        p.to_path_buf()
    }

    /// The container's command line with the test's changes (see the file's comment).
    fn command_line(&self, c: &Container, init: bool) -> Vec<String> {
        let mut line = c.command.clone().unwrap_or_default();
        line.extend(c.args.clone().unwrap_or_default());
        let mut out = Vec::new();
        let mut it = line.into_iter();
        while let Some(a) = it.next() {
            match a.as_str() {
                "--node-name" => {
                    it.next();
                }
                "--bpffs" => {
                    it.next();
                    out.extend([a, self.bpffs.display().to_string()]);
                }
                "--metrics-addr" => {
                    it.next();
                    out.extend([a, self.metrics.to_string()]);
                }
                // A hybrid host (cgroup v1 controllers, v2 at /sys/fs/cgroup/unified): the
                // v2 root is below the mounted /sys/fs/cgroup. Unified hosts keep the YAML's.
                "--cgroup" => {
                    let v = PathBuf::from(it.next().unwrap());
                    let root = cgroup2_mount().expect("a cgroup v2 mount");
                    let rel = root.strip_prefix("/sys/fs/cgroup").unwrap_or(Path::new(""));
                    out.extend([a, v.join(rel).display().to_string()]);
                }
                "--socket" if init => {
                    let v = it.next().unwrap();
                    out.extend([a, self.host(Path::new(&v)).display().to_string()]);
                }
                _ => out.push(a),
            }
        }
        out
    }

    /// `ctr run` flags for container `c` of the pod: privileges, namespaces, env, mounts.
    fn run_flags(&self, c: &Container) -> Vec<String> {
        let mut f = Vec::new();
        if self.spec.host_network == Some(true) {
            f.push("--net-host".to_string());
        }
        if self.spec.host_pid == Some(true) {
            // ctr has no "host PID" switch: join the host's PID namespace through a process
            // in it, this test's own (/proc/1/ns may be unreadable, e.g. in a micro-VM).
            f.extend([
                "--with-ns".into(),
                format!("pid:/proc/{}/ns/pid", std::process::id()),
            ]);
        }
        let sc = c.security_context.clone().unwrap_or_default();
        if sc.privileged == Some(true) {
            f.push("--privileged".into());
        }
        if let Some(caps) = sc.capabilities {
            for d in caps.drop.unwrap_or_default() {
                // "ALL": every capability ctr grants by default.
                let names: Vec<String> = if d == "ALL" {
                    DEFAULT_CAPS.iter().map(|s| s.to_string()).collect()
                } else {
                    vec![format!("CAP_{d}")]
                };
                for n in names {
                    f.extend(["--cap-drop".into(), n]);
                }
            }
            for a in caps.add.unwrap_or_default() {
                f.extend(["--cap-add".into(), format!("CAP_{a}")]);
            }
        }
        assert!(
            sc.run_as_user.unwrap_or(0) == 0,
            "{}: runs as root in the image",
            c.name
        );
        for e in c.env.iter().flatten() {
            if let Some(v) = &e.value {
                f.extend(["--env".into(), format!("{}={v}", e.name)]);
            }
        }
        for m in c.volume_mounts.iter().flatten() {
            let src = &self.volumes[&m.name];
            if !src.exists() {
                println!(
                    "  (no {} on this host: {} not mounted)",
                    src.display(),
                    m.mount_path
                );
                continue;
            }
            let rw = if m.read_only == Some(true) {
                "ro"
            } else {
                "rw"
            };
            let prop = match m.mount_propagation.as_deref() {
                Some("Bidirectional") => "rshared",
                Some("HostToContainer") => "rslave",
                _ => "rprivate",
            };
            f.extend([
                "--mount".into(),
                format!(
                    "type=bind,src={},dst={},options=rbind:{rw}:{prop}",
                    src.display(),
                    m.mount_path
                ),
            ]);
        }
        f
    }

    fn container(&self, name: &str) -> Container {
        self.spec
            .containers
            .iter()
            .chain(self.spec.init_containers.iter().flatten())
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("no container {name} in the DaemonSet"))
            .clone()
    }

    /// Runs container `name` as `id`: to completion (`wait`, asserting exit 0) or detached.
    fn run(&self, name: &str, id: &str, wait: bool) -> String {
        let c = self.container(name);
        let mut args: Vec<String> = vec!["run".into()];
        if wait {
            args.push("--rm".into());
        } else {
            args.push("--detach".into());
            args.extend([
                "--log-uri".into(),
                format!("file://{}", self.log(id).display()),
            ]);
        }
        args.extend(self.run_flags(&c));
        args.push(image::containerd_name());
        args.push(id.into());
        let init = self
            .spec
            .init_containers
            .iter()
            .flatten()
            .any(|i| i.name == name);
        args.extend(self.command_line(&c, init));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        self.ctrd.ctr_ok(&refs)
    }

    fn log(&self, id: &str) -> PathBuf {
        self.ctrd.dir.join(format!("{id}.log"))
    }

    /// Runs the daemon container's readiness probe in it (`ctr task exec`).
    fn probe(&self, id: &str) -> std::process::Output {
        let c = self.container("interceptor");
        let cmd = c.readiness_probe.unwrap().exec.unwrap().command.unwrap();
        static N: AtomicU32 = AtomicU32::new(0);
        let exec_id = format!("probe-{}", N.fetch_add(1, Ordering::Relaxed));
        let mut args = vec!["task", "exec", "--exec-id", &exec_id, id];
        args.extend(cmd.iter().map(String::as_str));
        self.ctrd.ctr(&args)
    }

    /// Starts the daemon container and waits until its readiness probe passes.
    fn start_daemon(&self, id: &str) {
        self.run("interceptor", id, false);
        let t0 = Instant::now();
        loop {
            let out = self.probe(id);
            if out.status.success() {
                println!("  {id}: ready after {:.1?}", t0.elapsed());
                return;
            }
            assert!(
                self.ctrd.running(id)
                    && t0.elapsed() < interceptor_tests::scaled(Duration::from_secs(30)),
                "{id} not ready: {}{}\nlog: {}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                std::fs::read_to_string(self.log(id)).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// The capabilities ctr's default spec grants (containerd's oci.defaultUnixCaps).
const DEFAULT_CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

fn connect(netns: &Path, uid: u32, dst: SocketAddr) -> String {
    interceptor_tests::topology::reply_of(netns, uid, dst, TIMEOUT)
}

#[test]
fn daemonset_under_containerd_captures_survives_a_stop_and_readopts() {
    let missing = missing_tools();
    if !missing.is_empty() {
        interceptor_tests::unavailable(&format!(
            "containerd e2e: {} not installed (scripts/setup.sh installs containerd and runc)",
            missing.join(", ")
        ));
        return;
    }
    let t_all = Instant::now();
    let out_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/image");
    let Some(digest) = image::build(&out_dir, false) else {
        return;
    };

    // The node first: `ip netns add` makes /var/run/netns a shared mount before the daemon's
    // container binds it (HostToContainer then sees the pod netns created later).
    let node = Node::without_interceptor();
    let conf_dir = node.dir.join("net.d");
    std::fs::create_dir_all(&conf_dir).unwrap();
    let run_dir = TempDir(std::env::temp_dir().join(format!("ic-ctrd-run-{}", std::process::id())));
    std::fs::create_dir_all(&run_dir.0).unwrap();
    let pins = Pins(PathBuf::from(format!(
        "/sys/fs/bpf/ic-ctrd-{}",
        std::process::id()
    )));
    let ctrd = Containerd::start("ctrd").expect("containerd");
    let t0 = Instant::now();
    let imported = ctrd.ctr_ok(&[
        "images",
        "import",
        image::archive(&out_dir).to_str().unwrap(),
    ]);
    let listed = ctrd.ctr_ok(&["images", "ls"]);
    println!("imported in {:.1?}: {}", t0.elapsed(), imported.trim());
    assert!(
        listed.contains(&image::containerd_name()) && listed.contains(&digest),
        "{listed}"
    );

    let spec = daemonset();
    let mut volumes = BTreeMap::new();
    for v in spec.volumes.iter().flatten() {
        let hp = v.host_path.clone().expect("hostPath volumes only");
        volumes.insert(v.name.clone(), PathBuf::from(hp.path));
    }
    let private = vec![
        (PathBuf::from("/run/interceptor"), run_dir.0.clone()),
        (PathBuf::from("/opt/cni/bin"), node.bin()),
        (PathBuf::from("/etc/cni/net.d"), conf_dir.clone()),
    ];
    for p in volumes.values_mut() {
        for (yaml, private) in &private {
            if p == yaml {
                *p = private.clone();
            }
        }
    }
    for (yaml, _) in &private {
        assert!(
            !volumes.values().any(|p| p == yaml),
            "{} is a volume the test did not make private",
            yaml.display()
        );
    }
    let kubelet = Kubelet {
        ctrd: &ctrd,
        spec,
        volumes,
        private,
        bpffs: pins.0.clone(),
        metrics: std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap(),
    };

    // The node's primary network: bridge + host-local, as a cluster's CNI would write it.
    let gw = node.gateway();
    let primary = json!({
        "cniVersion": "1.0.0",
        "name": "ic-ctrd-net",
        "plugins": [{
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
        }],
    });
    let conflist = conf_dir.join("10-bridge.conflist");
    std::fs::write(&conflist, primary.to_string()).unwrap();

    // 1. The init container installs the plugin into the node's folders.
    let init = kubelet.spec.init_containers.clone().unwrap()[0]
        .name
        .clone();
    let t0 = Instant::now();
    let out = kubelet.run(&init, "install-cni", true);
    println!("{init}: {:.1?}\n{}", t0.elapsed(), out.trim());
    let installed: Value = serde_json::from_slice(&std::fs::read(&conflist).unwrap()).unwrap();
    let ours = &installed["plugins"][1];
    assert_eq!(ours["type"], "interceptor", "{installed}");
    let socket = run_dir.0.join("interceptor.sock");
    assert_eq!(ours["socket"], socket.to_str().unwrap());
    let plugin = node.bin().join("interceptor");
    let in_image = std::fs::read(&plugin).expect("cni-install copied the binary");
    let v = Command::new(&plugin).arg("--version").output().unwrap();
    assert!(
        v.status.success(),
        "the installed plugin does not run on the host"
    );
    println!(
        "installed {} ({} bytes): {}",
        plugin.display(),
        in_image.len(),
        String::from_utf8_lossy(&v.stdout).trim()
    );

    // 2. The daemon container.
    kubelet.start_daemon("daemon-1");
    let health = http_get(kubelet.metrics, "/healthz");
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");

    // 3. A pod through the node's chain: loopback first (as containerd does), then the
    //    conflist with our plugin; the pod's annotations as the runtime passes them.
    let annotations = json!({"sidecar.istio.io/status": "{\"containers\":[\"istio-proxy\"]}"});
    let caps = json!({"io.kubernetes.cri.pod-annotations": annotations});
    let args = format!(
        "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;K8S_POD_UID=uid-{}",
        node.pod
    );
    let lo =
        json!({"cniVersion": "1.0.0", "name": "cni-loopback", "plugins": [{"type": "loopback"}]});
    let mut lo_rt = Runtime::new(&node, args.clone(), caps.clone());
    let mut rt = Runtime::new(&node, args, caps);
    lo_rt
        .add(&lo)
        .unwrap_or_else(|(i, r)| panic!("loopback ADD #{i}: {r:?}"));
    let result = rt
        .add(&installed)
        .unwrap_or_else(|(i, r)| panic!("ADD of plugin #{i}: {r:?}"));
    let pod_ip: Ipv4Addr = result["ips"][0]["address"]
        .as_str()
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let ns = node.pod_path();
    let listed = pod_list(&socket);
    assert!(listed.contains(&node.pod), "not registered: {listed}");
    println!(
        "registered through the container's socket:\n{}",
        listed.trim()
    );

    let sidecar = Sidecar::with_config(&ns, SidecarConfig::default()).unwrap();
    let _upstream =
        TagServer::spawn(&node.node_path(), "upstream", &[UPSTREAM_PORT], None).unwrap();
    let dst = SocketAddr::new(IpAddr::V4(gw), UPSTREAM_PORT);
    assert_eq!(connect(&ns, 1000, dst), "sidecar:15001", "not captured");
    assert_eq!(sidecar.outbound()[0].original_dst, Some(dst));
    assert_eq!(connect(&ns, 1337, dst), format!("upstream:{UPSTREAM_PORT}"));
    println!("pod {pod_ip}: app -> {dst} captured by the sidecar; the proxy's own goes out");

    // 4. The daemon container stops (as for an upgrade or eviction): interception stays.
    let t0 = Instant::now();
    ctrd.remove("daemon-1", Duration::from_secs(30));
    println!("daemon-1 stopped and removed in {:.1?}", t0.elapsed());
    assert!(!socket.exists() || pod_list_output(&socket).status.code() != Some(0));
    assert_eq!(
        connect(&ns, 1000, dst),
        "sidecar:15001",
        "interception lost with the daemon container"
    );
    println!("daemon down: still captured");

    // 5. A new daemon container re-adopts the pod.
    kubelet.start_daemon("daemon-2");
    let listed = String::from_utf8_lossy(&kubelet.probe("daemon-2").stdout).into_owned();
    assert!(listed.contains(&node.pod), "not re-adopted: {listed}");
    println!("daemon-2 lists the pod again:\n{}", listed.trim());
    assert_eq!(connect(&ns, 1000, dst), "sidecar:15001");

    // 6. The pod goes: DEL through the chain in reverse order, ours first (the pod is
    //    released while its interface still exists), then bridge and loopback.
    let plugins = installed["plugins"].as_array().unwrap().len();
    let r = rt.del(&installed, plugins - 1);
    assert!(r.ok, "DEL of our plugin: {r:?}");
    assert!(!pod_list(&socket).contains(&node.pod));
    assert_eq!(connect(&ns, 1000, dst), format!("upstream:{UPSTREAM_PORT}"));
    println!("DEL: released, the app's traffic goes out directly");
    for i in (0..plugins - 1).rev() {
        let r = rt.del(&installed, i);
        assert!(r.ok, "DEL of plugin #{i}: {r:?}");
    }
    assert!(lo_rt.del(&lo, 0).ok);
    ctrd.remove("daemon-2", Duration::from_secs(30));
    println!("containerd e2e passed in {:.1?}", t_all.elapsed());
}

fn pod_list_output(socket: &Path) -> std::process::Output {
    bin::run(&["pod", "list", "--socket", socket.to_str().unwrap()], &[])
}

fn pod_list(socket: &Path) -> String {
    let out = pod_list_output(socket);
    assert!(
        out.status.success(),
        "pod list: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn http_get(addr: SocketAddr, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}
