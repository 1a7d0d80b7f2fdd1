//! The eBPF datapath end to end: the real programs from interceptor-ebpf, built by the normal
//! cargo build, attached at the cgroup v2 root, serving a pod registered by netns cookie; real
//! connections inside a test netns are rewritten to the sidecar, which reads the original
//! destination with SO_ORIGINAL_DST, while the app's getpeername() still shows the original peer.

use std::net::{IpAddr, SocketAddr};

use interceptor::backend::ebpf::{detect_cgroup2_root, Datapath};
use interceptor_common::config::RawConfig;
use interceptor_tests::sidecar::{Sidecar, TagServer};
use interceptor_tests::topology::Topology;

#[test]
fn connect_is_rewritten_to_the_sidecar_with_original_destination() {
    let topo = Topology::new("ebpf").expect("topology");
    let sidecar = Sidecar::start(&topo).expect("sidecar");
    let _upstream = TagServer::upstream(&topo, 8080).expect("upstream");
    let mut dp = Datapath::load_and_attach(&detect_cgroup2_root().unwrap()).expect("load+attach");
    let cfg = RawConfig {
        outbound_ip_ranges_include: "*".into(),
        outbound_ports_exclude: "9999".into(),
        enable_ipv6: true,
        ..Default::default()
    }
    .parse()
    .unwrap();
    let local = [IpAddr::V4(topo.pod_v4()), IpAddr::V6(topo.pod_v6())];
    let baseline = dp.connection_entries().unwrap();
    dp.register_pod(topo.pod_netns(), &cfg, &local, &[])
        .expect("register pod");

    for up in [
        SocketAddr::new(topo.upstream_v4().into(), 8080),
        SocketAddr::new(topo.upstream_v6().into(), 8080),
    ] {
        // An app uid is redirected; the sidecar sees the original destination.
        let out = topo.connect_from_pod(1000, 1000, up).expect("app connect");
        assert_eq!(
            out.reply, "sidecar:15001",
            "app connection to {up} was not redirected"
        );
        assert_eq!(
            out.peer, up,
            "the app's getpeername() must show the original peer"
        );
        let rec = sidecar.take_records();
        assert_eq!(rec.len(), 1, "{rec:?}");
        assert_eq!(
            rec[0].original_dst,
            Some(up),
            "SO_ORIGINAL_DST on the sidecar's socket"
        );

        // The proxy's own uid goes straight out.
        let out = topo
            .connect_from_pod(1337, 1337, up)
            .expect("proxy connect");
        assert_eq!(
            out.reply, "upstream:8080",
            "proxy uid must not be redirected"
        );
    }
    // An unregistered netns is untouched.
    let other = Topology::new("ebpfu").expect("second topology");
    let _up2 = TagServer::upstream(&other, 8080).unwrap();
    let out = other
        .connect_from_pod(
            1000,
            1000,
            SocketAddr::new(other.upstream_v4().into(), 8080),
        )
        .unwrap();
    assert_eq!(
        out.reply, "upstream:8080",
        "a netns that is not registered must be untouched"
    );

    // Per-connection state is gone once connections close.
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert_eq!(
        dp.connection_entries().unwrap(),
        baseline,
        "per-connection map entries leaked"
    );
}
