//! Inbound capture on the eBPF path (sk_lookup) next to iptables REDIRECT: proxy-down
//! behaviour, loop avoidance, SO_REUSEPORT listeners, listeners created before and after the
//! programs, TPROXY mode, and same-node traffic between two meshed pods.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use interceptor_tests::cases::{apply, apply_in, Flavor, Pod, APP_PORT};
use interceptor_tests::ebpf::EbpfInstall;
use interceptor_tests::sidecar::{SidecarConfig, TagServer};
use interceptor_tests::topology::{
    connect_as, enter_netns, set_thread_creds, ConnectError, Topology,
};

const BACKENDS: [Flavor; 2] = [Flavor::IptablesNft, Flavor::Ebpf];

/// A pod netns with only the app (no proxy listening): the capture must reset the connection
/// (as REDIRECT to a closed port does), never hand it to the app unprotected.
#[test]
fn proxy_down_refuses_inbound() {
    for flavor in BACKENDS {
        let topo = Topology::new("down").unwrap();
        let ebpf = EbpfInstall::new("down");
        let _app = TagServer::spawn(topo.pod_netns(), "app", &[APP_PORT], None).unwrap();
        apply_in(topo.pod_netns(), ebpf.dir(), flavor, &["-b", "*"]).unwrap();
        let dst = SocketAddr::new(topo.pod_v4().into(), APP_PORT);
        let err = topo
            .inbound_connect(dst, None)
            .expect_err("connection must not reach the app");
        let ce = err.downcast_ref::<ConnectError>().copied();
        assert!(
            ce.is_some_and(|c| c.is_refused()),
            "{flavor:?}: want connection refused, got {err:#}"
        );
    }
}

/// The proxy's own connections to the app reach the app: from 127.0.0.6 (Envoy's inbound
/// passthrough) to the pod IP, and to localhost.
#[test]
fn no_loops() {
    for flavor in BACKENDS {
        let pod = Pod::new("loop").unwrap();
        apply(&pod, flavor, &["-i", "*", "-b", "*", "--ipv6", "true"]).unwrap();
        let t = &pod.topo;
        let via = |dst: SocketAddr, src: Option<IpAddr>| {
            connect_as(t.pod_netns(), 1337, 1337, dst, src, Duration::from_secs(2)).map(|o| o.reply)
        };
        let pod_ip = SocketAddr::new(t.pod_v4().into(), APP_PORT);
        assert_eq!(
            via(pod_ip, Some("127.0.0.6".parse().unwrap())).unwrap(),
            "app:9080",
            "{flavor:?}: from 127.0.0.6"
        );
        assert_eq!(
            via(SocketAddr::from(([127, 0, 0, 1], APP_PORT)), None).unwrap(),
            "app:9080",
            "{flavor:?}: localhost"
        );
        // An app in the pod talking to its own pod IP is not captured either.
        let out = connect_as(
            t.pod_netns(),
            1000,
            1000,
            pod_ip,
            None,
            Duration::from_secs(2),
        )
        .unwrap();
        assert_eq!(out.reply, "app:9080", "{flavor:?}: app to own pod IP");
    }
}

/// Listeners created after the programs were attached register themselves (sockops listen
/// callback); several SO_REUSEPORT listeners keep sharing the connections.
#[test]
fn reuseport_listeners_created_after_attach() {
    let topo = Topology::new("reuse").unwrap();
    let ebpf = EbpfInstall::new("reuse");
    let _app = TagServer::spawn(topo.pod_netns(), "app", &[APP_PORT], None).unwrap();
    apply_in(topo.pod_netns(), ebpf.dir(), Flavor::Ebpf, &["-b", "*"]).unwrap();
    // Two REUSEPORT listeners on 15006 as the proxy uid, each answering with its own tag.
    let accepted = std::sync::Arc::new(std::sync::Mutex::new([0u32; 2]));
    for i in 0..2 {
        let (path, accepted) = (topo.pod_netns().to_path_buf(), accepted.clone());
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || listener_thread(&path, i, accepted, tx));
        rx.recv().unwrap();
    }
    let dst = SocketAddr::new(topo.pod_v4().into(), APP_PORT);
    for _ in 0..40 {
        let out = topo.inbound_connect(dst, None).unwrap();
        assert!(
            out.reply.starts_with("reuse"),
            "connection not captured: {}",
            out.reply
        );
    }
    let counts = *accepted.lock().unwrap();
    println!("REUSEPORT listeners accepted {counts:?}");
    assert!(
        counts[0] > 0 && counts[1] > 0,
        "both REUSEPORT listeners must get connections: {counts:?}"
    );
}

fn listener_thread(
    netns: &Path,
    i: usize,
    accepted: std::sync::Arc<std::sync::Mutex<[u32; 2]>>,
    ready: std::sync::mpsc::Sender<()>,
) {
    use nix::sys::socket::{
        bind, listen, setsockopt, socket, sockopt, AddressFamily, Backlog, SockFlag, SockType,
        SockaddrIn,
    };
    enter_netns(netns).unwrap();
    set_thread_creds(1337, 1337).unwrap();
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::empty(),
        None,
    )
    .unwrap();
    setsockopt(&fd, sockopt::ReusePort, &true).unwrap();
    bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &SockaddrIn::new(0, 0, 0, 0, 15006),
    )
    .unwrap();
    listen(&fd, Backlog::new(64).unwrap()).unwrap();
    let l = std::net::TcpListener::from(fd);
    ready.send(()).unwrap();
    for s in l.incoming() {
        let Ok(mut s) = s else { continue };
        accepted.lock().unwrap()[i] += 1;
        let _ = std::io::Write::write_all(&mut s, format!("reuse{i}\n").as_bytes());
    }
}

/// `-m TPROXY` on the eBPF path: sk_lookup already keeps the client's address (what TPROXY is
/// for), so the proxy sees the real client and the original destination as its local address.
#[test]
fn tproxy_mode_keeps_the_client_address() {
    let pod = Pod::new("tpx").unwrap();
    apply(
        &pod,
        Flavor::Ebpf,
        &["-m", "TPROXY", "-b", "*", "--ipv6", "true"],
    )
    .unwrap();
    let t = &pod.topo;
    for (pod_ip, client) in [
        (IpAddr::from(t.pod_v4()), IpAddr::from(t.upstream_v4())),
        (IpAddr::from(t.pod_v6()), IpAddr::from(t.upstream_v6())),
    ] {
        let dst = SocketAddr::new(pod_ip, APP_PORT);
        pod.sidecar.take_records();
        let out = t.inbound_connect(dst, None).unwrap();
        assert_eq!(out.reply, "sidecar:15006");
        let rec = pod.sidecar.take_records();
        assert_eq!(
            rec[0].peer.ip(),
            client,
            "the proxy must see the real client address"
        );
        assert_eq!(
            rec[0].local, dst,
            "the accepted socket's local address is the original destination"
        );
        assert_eq!(rec[0].original_dst, Some(dst));
    }
}

/// Two meshed pods on one node: pod A's app → pod B goes to A's sidecar (outbound), and A's
/// proxy → pod B goes to B's sidecar (inbound), as with iptables.
#[test]
fn same_node_pods_go_through_both_sidecars() {
    for flavor in BACKENDS {
        let a = Pod::new("nodea").unwrap();
        // Pod B is A's "upstream" netns, meshed too, with its own sidecar.
        let b_ns = a.topo.upstream_netns().to_path_buf();
        let _b_sidecar =
            interceptor_tests::sidecar::Sidecar::with_config(&b_ns, SidecarConfig::default())
                .unwrap();
        let flags = ["-i", "*", "-b", "*", "--ipv6", "false"];
        apply(&a, flavor, &flags).unwrap();
        apply_in(&b_ns, a.ebpf.dir(), flavor, &flags).unwrap();
        let b = SocketAddr::new(a.topo.upstream_v4().into(), 8080);
        assert_eq!(
            a.outbound(1000, b).unwrap().0,
            "sidecar:15001",
            "{flavor:?}: A's app → B via A's sidecar"
        );
        let out = connect_as(
            a.topo.pod_netns(),
            1337,
            1337,
            b,
            None,
            Duration::from_secs(2),
        )
        .unwrap();
        assert_eq!(
            out.reply, "sidecar:15006",
            "{flavor:?}: A's proxy → B via B's sidecar"
        );
    }
}

/// A proxy listener that existed before the pod was registered (so the sockops listen callback
/// never saw it) is adopted through pidfd_getfd: inbound is captured at once, v4 and v6.
#[test]
fn pre_existing_listener_is_adopted() {
    let pod = Pod::new("adopt").unwrap(); // its sidecar already listens on 15006
    apply(&pod, Flavor::Ebpf, &["-b", "*", "--ipv6", "true"]).unwrap();
    for ip in [
        IpAddr::from(pod.topo.pod_v4()),
        IpAddr::from(pod.topo.pod_v6()),
    ] {
        let out = pod
            .topo
            .inbound_connect(SocketAddr::new(ip, APP_PORT), None)
            .unwrap();
        assert_eq!(
            out.reply, "sidecar:15006",
            "pre-existing listener not adopted for {ip}"
        );
    }
}

/// Only the proxy's own listener on the capture port receives inbound traffic: an app listening
/// there (bind guard off, so its bind succeeds) is not registered, and inbound is reset.
#[test]
fn app_listening_on_the_capture_port_is_not_the_proxy() {
    let topo = Topology::new("imp").unwrap();
    let ebpf = EbpfInstall::new("imp");
    let flags = ["-b", "*", "--bind-guard-ports", ""];
    apply_in(topo.pod_netns(), ebpf.dir(), Flavor::Ebpf, &flags).unwrap();
    let _impostor =
        TagServer::spawn(topo.pod_netns(), "impostor", &[15006], Some((1000, 1000))).unwrap();
    let _app = TagServer::spawn(topo.pod_netns(), "app", &[APP_PORT], None).unwrap();
    let dst = SocketAddr::new(topo.pod_v4().into(), APP_PORT);
    let err = topo
        .inbound_connect(dst, None)
        .expect_err("inbound must not reach the impostor or the app");
    let ce = err.downcast_ref::<ConnectError>().copied();
    assert!(
        ce.is_some_and(|c| c.is_refused()),
        "want connection refused, got {err:#}"
    );
}

/// A map pin like the ones an earlier version left behind (an empty hash map).
fn pin_stale_map(path: &Path) {
    use std::os::fd::{AsFd, FromRawFd, OwnedFd};
    // BPF_MAP_CREATE: map_type (BPF_MAP_TYPE_HASH), key_size, value_size, max_entries.
    let mut attr = [0u32; 8];
    attr[..4].copy_from_slice(&[1, 16, 16, 16]);
    // SAFETY: a zeroed bpf_attr prefix for BPF_MAP_CREATE (cmd 0), of the size passed.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            0,
            attr.as_mut_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    assert!(
        fd >= 0,
        "BPF_MAP_CREATE: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: a new fd the kernel just returned to us.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    interceptor::backend::ebpf::sk_lookup::pin(fd.as_fd(), path).unwrap();
}

/// Upgrade from the version that found pods by address (`POD_BY_ADDR`, no `INBOUND_PROG`):
/// the next registration reloads the programs, drops the old pin and captures inbound through
/// the per-pod sk_lookup program; cleanup removes an old pin too and leaves nothing behind.
#[test]
fn upgrade_from_pod_by_addr_installation() {
    let pod = Pod::new("upg").unwrap();
    apply(&pod, Flavor::Ebpf, &["-b", "*"]).unwrap();
    let maps = pod.ebpf.dir().join("maps");
    let old = maps.join("POD_BY_ADDR");
    pin_stale_map(&old);
    std::fs::remove_file(maps.join("INBOUND_PROG")).unwrap();
    // That version predates the layout marker.
    std::fs::remove_file(pod.ebpf.dir().join("layout")).unwrap();
    apply(&pod, Flavor::Ebpf, &["-b", "*"]).unwrap();
    assert!(!old.exists(), "the old POD_BY_ADDR pin survived the reload");
    assert!(maps.join("INBOUND_PROG").exists());
    let dst = SocketAddr::new(pod.topo.pod_v4().into(), APP_PORT);
    let out = pod.topo.inbound_connect(dst, None).unwrap();
    assert_eq!(out.reply, "sidecar:15006", "inbound after the upgrade");
    pin_stale_map(&old);
    pod.ebpf.pins.cleanup(&pod.ebpf.cgroup).unwrap();
    assert!(!pod.ebpf.dir().exists(), "cleanup left pins behind");
}
