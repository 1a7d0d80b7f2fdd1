//! Escape scenarios: state — what the programs remember per socket and per connection, and
//! who gets to read it.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use interceptor_tests::cases::{apply_in, Flavor};
use interceptor_tests::ebpf::EbpfInstall;
use interceptor_tests::sidecar::TagServer;
use interceptor_tests::topology::{run_in_netns, set_thread_creds, Topology};

use super::common::BACKENDS;

const APP_UID: u32 = 1000;

/// SO_ORIGINAL_DST is the proxy's: an app socket that took the proxy's port (the bind guard
/// off, as `--bind-guard-ports ""` allows) gets the pod's redirected connections, as with
/// Istio's rules, but must not learn their original destinations from the eBPF programs.
/// iptables answers from conntrack to whoever holds the socket (printed, not asserted).
#[test]
fn so_original_dst_is_answered_only_to_the_proxy() {
    let mut report = Vec::new();
    for flavor in BACKENDS {
        let topo = Topology::new("esod").unwrap();
        let ebpf = EbpfInstall::new("esod");
        let _up = TagServer::spawn(topo.upstream_netns(), "upstream", &[8080], None).unwrap();
        // An app process (uid 1000, not the proxy) listening on the proxy's port.
        let squat = TagServer::spawn(
            topo.pod_netns(),
            "squat",
            &[15001],
            Some((APP_UID, APP_UID)),
        )
        .unwrap();
        apply_in(
            topo.pod_netns(),
            ebpf.dir(),
            flavor,
            &["-i", "*", "--bind-guard-ports", ""],
        )
        .unwrap();
        let dst = SocketAddr::new(topo.upstream_v4().into(), 8080);
        let out = topo.connect_from_pod(APP_UID, APP_UID, dst).unwrap();
        assert_eq!(out.reply, "squat:15001", "{flavor:?}: not captured");
        let rec = squat.take_records();
        let answer = rec.first().and_then(|r| r.original_dst);
        report.push(format!("{flavor:?}: the squatter read {answer:?}"));
        if flavor == Flavor::Ebpf {
            assert_eq!(
                answer, None,
                "eBPF answered SO_ORIGINAL_DST on a socket that is not the proxy's"
            );
        }
    }
    println!(
        "SO_ORIGINAL_DST to a non-proxy socket: {}",
        report.join("; ")
    );
}

/// A UDP socket connected to a DNS server (captured), disconnected with connect(AF_UNSPEC),
/// then connected to another destination that is not captured: the app sees (getpeername) and
/// talks to the new destination, as with Istio's rules — nothing of the earlier DNS redirect
/// sticks to the socket.
#[test]
fn udp_reconnect_after_af_unspec_forgets_the_dns_destination() {
    const OTHER_PORT: u16 = 5353;
    for flavor in BACKENDS {
        let topo = Topology::new("esaf").unwrap();
        let ebpf = EbpfInstall::new("esaf");
        let server: IpAddr = topo.upstream_v4().into();
        let servers = server.to_string();
        apply_in(
            topo.pod_netns(),
            ebpf.dir(),
            flavor,
            &["-i", "*", "--redirect-dns", "--dns-servers", &servers],
        )
        .unwrap();
        // Receives on the new destination, in the upstream netns.
        let rx = run_in_netns(topo.upstream_netns(), move || {
            let s = std::net::UdpSocket::bind(("0.0.0.0", OTHER_PORT))?;
            s.set_read_timeout(Some(Duration::from_secs(3)))?;
            anyhow::Ok(s)
        })
        .unwrap()
        .unwrap();
        let dns = SocketAddr::new(server, 53);
        let other = SocketAddr::new(server, OTHER_PORT);
        let (peer_dns, peer_other) = run_in_netns(topo.pod_netns(), move || {
            set_thread_creds(APP_UID, APP_UID)?;
            let s = std::net::UdpSocket::bind("0.0.0.0:0")?;
            s.connect(dns)?;
            let peer_dns = s.peer_addr()?;
            disconnect(&s)?;
            s.connect(other)?;
            let peer_other = s.peer_addr()?;
            s.send(b"after-af-unspec")?;
            anyhow::Ok((peer_dns, peer_other))
        })
        .unwrap()
        .unwrap();
        let mut buf = [0u8; 64];
        let got = rx.recv_from(&mut buf).map(|(n, _)| buf[..n].to_vec());
        println!(
            "{flavor:?}: peer while connected to DNS {peer_dns}, after AF_UNSPEC and reconnect \
             {peer_other}; datagram at {other}: {:?}",
            got.as_ref()
                .map(|b| String::from_utf8_lossy(b).into_owned())
        );
        assert_eq!(
            peer_dns, dns,
            "{flavor:?}: getpeername of the DNS connection"
        );
        assert_eq!(
            peer_other, other,
            "{flavor:?}: getpeername after reconnect shows a stale destination"
        );
        assert_eq!(
            got.ok().as_deref(),
            Some(&b"after-af-unspec"[..]),
            "{flavor:?}: the datagram did not reach the new destination"
        );
    }
}

/// connect(AF_UNSPEC): dissolves a UDP socket's association.
fn disconnect(s: &std::net::UdpSocket) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let sa = libc::sockaddr {
        sa_family: libc::AF_UNSPEC as libc::sa_family_t,
        sa_data: [0; 14],
    };
    // SAFETY: a valid sockaddr of the size passed, on a socket we own.
    let r = unsafe {
        libc::connect(
            s.as_raw_fd(),
            &sa,
            std::mem::size_of::<libc::sockaddr>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
