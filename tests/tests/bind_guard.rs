//! The eBPF bind guard: in a meshed pod only the proxy's uid/gid may bind the proxy's ports, so
//! an app cannot impersonate the proxy; other ports, other pods and the proxy are unaffected.

use std::net::SocketAddr;
use std::path::Path;

use interceptor_tests::ebpf::EbpfInstall;
use interceptor_tests::topology::{enter_netns, set_thread_creds, Topology};

/// Binds a TCP socket on `port` in the netns as uid/gid; the errno on failure.
fn bind_as(netns: &Path, uid: u32, gid: u32, port: u16) -> Result<(), i32> {
    let netns = netns.to_path_buf();
    std::thread::spawn(move || {
        enter_netns(&netns).unwrap();
        set_thread_creds(uid, gid).unwrap();
        std::net::TcpListener::bind(SocketAddr::from(([0, 0, 0, 0], port)))
            .map(|_| ())
            .map_err(|e| e.raw_os_error().unwrap_or(-1))
    })
    .join()
    .unwrap()
}

#[test]
fn only_the_proxy_binds_proxy_ports() {
    let topo = Topology::new("bind").unwrap();
    let other = Topology::new("bindo").unwrap();
    let ebpf = EbpfInstall::new("bind");
    let ns = topo.pod_netns().to_str().unwrap().to_string();
    let bpffs = ebpf.dir().to_str().unwrap().to_string();
    let out = interceptor_tests::bin::run(
        &[
            "apply",
            "--network-namespace",
            &ns,
            "--bpffs",
            &bpffs,
            "--backend",
            "ebpf",
            "-i",
            "*",
            "-p",
            "15101",
        ],
        &[],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for port in [15001, 15006, 15008, 15053, 15090, 15021, 15020, 15101] {
        let err =
            bind_as(topo.pod_netns(), 1000, 1000, port).expect_err("an app bound a proxy port");
        assert!(
            err == libc::EPERM || err == libc::EACCES,
            "port {port}: errno {err}"
        );
        assert_eq!(
            bind_as(topo.pod_netns(), 1337, 1337, port),
            Ok(()),
            "the proxy uid must bind {port}"
        );
    }
    assert_eq!(
        bind_as(topo.pod_netns(), 1000, 1000, 8080),
        Ok(()),
        "ordinary ports stay free"
    );
    assert_eq!(
        bind_as(topo.pod_netns(), 1000, 1337, 15001),
        Ok(()),
        "the proxy gid may bind too"
    );
    assert_eq!(
        bind_as(other.pod_netns(), 1000, 1000, 15001),
        Ok(()),
        "an unmeshed pod is untouched"
    );
}

/// Reads or writes a sysctl of the netns (a thread that entered it opens /proc/sys there).
fn sysctl(netns: &Path, name: &str, value: Option<&str>) -> String {
    let (netns, path, value) = (
        netns.to_path_buf(),
        format!("/proc/sys/{}", name.replace('.', "/")),
        value.map(str::to_string),
    );
    std::thread::spawn(move || {
        enter_netns(&netns).unwrap();
        if let Some(v) = value {
            std::fs::write(&path, format!("{v}\n")).unwrap();
        }
        interceptor::backend::ebpf::reserved_ports::read_sysctl(&path)
            .unwrap()
            .trim()
            .to_string()
    })
    .join()
    .unwrap()
}

/// As uid/gid 1000 in the netns: listen() on an unbound socket (the kernel picks the port);
/// the port it got, or the errno.
fn autobind_listen(netns: &Path) -> Result<u16, i32> {
    let netns = netns.to_path_buf();
    std::thread::spawn(move || {
        enter_netns(&netns).unwrap();
        set_thread_creds(1000, 1000).unwrap();
        use nix::sys::socket::{getsockname, listen, socket, AddressFamily, Backlog};
        use nix::sys::socket::{SockFlag, SockType, SockaddrIn6};
        let fd = socket(
            AddressFamily::Inet6,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(|e| e as i32)?;
        listen(&fd, Backlog::new(1).unwrap()).map_err(|e| e as i32)?;
        let port = getsockname::<SockaddrIn6>(std::os::fd::AsRawFd::as_raw_fd(&fd))
            .map_err(|e| e as i32)?
            .port();
        Ok(port)
    })
    .join()
    .unwrap()
}

/// As uid/gid 1000 in the netns: connect() an unbound socket to `dst` (the kernel picks the
/// source port); the local port it got, or the errno.
fn autobind_connect(netns: &Path, dst: SocketAddr) -> Result<u16, i32> {
    let netns = netns.to_path_buf();
    std::thread::spawn(move || {
        enter_netns(&netns).unwrap();
        set_thread_creds(1000, 1000).unwrap();
        let s = std::net::TcpStream::connect_timeout(&dst, std::time::Duration::from_secs(2))
            .map_err(|e| e.raw_os_error().unwrap_or(-1))?;
        Ok(s.local_addr().unwrap().port())
    })
    .join()
    .unwrap()
}

/// Autobind: with `ip_local_port_range` (a namespaced sysctl a pod may set) narrowed to
/// 15001, listen() or connect() on an unbound socket would take the proxy's port without ever
/// running the bind hook. Registration reserves the guarded ports in the pod netns
/// (`ip_local_reserved_ports`, which autobind skips, IPv4 and IPv6 alike), keeps reservations
/// that were there before, and releases only its own at `remove` and at `cleanup`.
/// Before: listen() got 15001.
#[test]
fn autobind_cannot_take_proxy_ports() {
    let topo = Topology::new("autob").unwrap();
    let other = Topology::new("autobo").unwrap();
    // The Drop guard removes pins and cgroup attachments even when an assertion fails.
    let ebpf = EbpfInstall::new("autob");
    let _up = interceptor_tests::sidecar::TagServer::upstream(&topo, 8080).unwrap();
    let ns = topo.pod_netns();
    // The pod's own reservation of a guarded port and of another port: not ours to release.
    sysctl(ns, "net.ipv4.ip_local_reserved_ports", Some("8081,15020"));
    let apply_with = |netns: &Path, extra: &[&str]| {
        let mut args = vec!["-i", "*", "-o", "8080"];
        args.extend_from_slice(extra);
        interceptor_tests::cases::apply_in(
            netns,
            ebpf.dir(),
            interceptor_tests::cases::Flavor::Ebpf,
            &args,
        )
        .unwrap()
    };
    let apply = |netns: &Path| apply_with(netns, &[]);
    apply(ns);
    apply(other.pod_netns());
    sysctl(ns, "net.ipv4.ip_local_port_range", Some("15001 15001"));
    assert_eq!(
        autobind_listen(ns),
        Err(libc::EADDRINUSE),
        "listen() autobind to a proxy port"
    );
    let dst = SocketAddr::new(topo.upstream_v4().into(), 8080);
    assert_eq!(
        autobind_connect(ns, dst),
        Err(libc::EADDRNOTAVAIL),
        "connect() autobind to a proxy port"
    );
    let reserved = sysctl(ns, "net.ipv4.ip_local_reserved_ports", None);
    assert_eq!(reserved, "8081,15001,15006,15008,15020-15021,15053,15090");
    // Ports outside the guarded set still autobind; the proxy still binds its own port.
    sysctl(ns, "net.ipv4.ip_local_port_range", Some("15002 15002"));
    assert_eq!(autobind_listen(ns), Ok(15002));
    assert_eq!(autobind_connect(ns, dst), Ok(15002));
    assert_eq!(bind_as(ns, 1337, 1337, 15001), Ok(()));
    // A re-registration with the same config keeps the reservation as it is.
    apply(ns);
    assert_eq!(
        sysctl(ns, "net.ipv4.ip_local_reserved_ports", None),
        reserved
    );
    // Fewer guarded ports: those no longer guarded are released, the rest stay ours.
    apply_with(ns, &["--bind-guard-ports", "15090"]);
    assert_eq!(
        sysctl(ns, "net.ipv4.ip_local_reserved_ports", None),
        "8081,15001,15006,15008,15020,15090"
    );
    // `remove` releases what the registrations added, and only that.
    let out = interceptor_tests::bin::run(
        &[
            "remove",
            "--network-namespace",
            ns.to_str().unwrap(),
            "--bpffs",
            ebpf.dir().to_str().unwrap(),
        ],
        &[],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        sysctl(ns, "net.ipv4.ip_local_reserved_ports", None),
        "8081,15020"
    );
    // `cleanup` releases the other pod's.
    assert_eq!(
        sysctl(other.pod_netns(), "net.ipv4.ip_local_reserved_ports", None),
        "15001,15006,15008,15020-15021,15053,15090"
    );
    let out =
        interceptor_tests::bin::run(&["cleanup", "--bpffs", ebpf.dir().to_str().unwrap()], &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        sysctl(other.pod_netns(), "net.ipv4.ip_local_reserved_ports", None),
        ""
    );
}
