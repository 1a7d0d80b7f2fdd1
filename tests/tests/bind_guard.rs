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
