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

/// A hostile neighbour: pod A's app floods connections its own proxy never completes (its
/// accept queue is full, so they wait in SYN_SENT, each holding an app→proxy tuple entry),
/// far past its quota (8 here, test-only `TUPLE_QUOTA`). On eBPF A's excess connects fail with
/// EPERM (fail closed, counted) and pod B, on the same node and programs, keeps every
/// connection captured with its original destination; closing A's sockets gives its quota
/// back. With Istio's rules there is no shared state: B is unaffected, A's connects just wait.
#[test]
fn hostile_neighbour_cannot_starve_another_pods_connections() {
    const QUOTA: u32 = 8;
    const FLOOD: usize = 32;
    let env = format!("TUPLE_QUOTA={QUOTA}");
    for flavor in BACKENDS {
        let ebpf = EbpfInstall::new("esq");
        let a = Topology::new("esqa").unwrap();
        let b = Topology::new("esqb").unwrap();
        let b_side = interceptor_tests::sidecar::Sidecar::start(&b).unwrap();
        let _b_up = TagServer::spawn(b.upstream_netns(), "upstream", &[8080], None).unwrap();
        for topo in [&a, &b] {
            let ns = topo.pod_netns().to_str().unwrap();
            let dir = ebpf.dir().to_str().unwrap();
            let mut args = vec![
                "apply",
                "--network-namespace",
                ns,
                "--bpffs",
                dir,
                "-i",
                "*",
            ];
            args.extend_from_slice(flavor.args());
            let out = interceptor_tests::bin::run(
                &args,
                &[("INTERCEPTOR_TEST_MAP_ENTRIES", env.as_str())],
            );
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        // A's proxy: listening with the smallest accept queue, never accepting.
        let _a_proxy = run_in_netns(a.pod_netns(), || {
            set_thread_creds(1337, 1337)?;
            let l = std::net::TcpListener::bind("0.0.0.0:15001")?;
            // SAFETY: listen(2) on a socket we own.
            assert_eq!(
                unsafe { libc::listen(std::os::fd::AsRawFd::as_raw_fd(&l), 0) },
                0
            );
            anyhow::Ok(l)
        })
        .unwrap()
        .unwrap();
        let a_dst = SocketAddr::new(a.upstream_v4().into(), 8080);
        let (held, refused) = run_in_netns(a.pod_netns(), move || {
            set_thread_creds(APP_UID, APP_UID)?;
            let mut held = Vec::new();
            let mut refused = 0usize;
            for _ in 0..FLOOD {
                match nonblocking_connect(a_dst)? {
                    Some(fd) => held.push(fd),
                    None => refused += 1,
                }
            }
            anyhow::Ok((held, refused))
        })
        .unwrap()
        .unwrap();
        std::thread::sleep(Duration::from_millis(200));
        let b_dst = SocketAddr::new(b.upstream_v4().into(), 8080);
        let mut b_ok = 0;
        for _ in 0..10 {
            b_side.take_records();
            let out = b.connect_from_pod(APP_UID, APP_UID, b_dst);
            let rec = b_side.take_records();
            if out.is_ok_and(|o| o.reply == "sidecar:15001")
                && rec.first().and_then(|r| r.original_dst) == Some(b_dst)
            {
                b_ok += 1;
            }
        }
        let mut detail = String::new();
        if flavor == Flavor::Ebpf {
            let maps = ebpf.pins.maps().unwrap();
            let cookie = interceptor::netns::cookie(Some(a.pod_netns())).unwrap();
            let a_id = maps
                .pods()
                .into_iter()
                .find(|(c, _)| *c == cookie)
                .map(|(_, p)| p.pod_id)
                .unwrap();
            let counted =
                maps.counters(a_id)[interceptor_common::maps::stat::OUT_QUOTA_REFUSED as usize];
            let held_entries = maps.tuple_entries(a_id);
            drop(held);
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while maps.tuple_entries(a_id) != 0 && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let after_close = maps.tuple_entries(a_id);
            detail = format!(
                "; A's tuple entries while flooding {held_entries} (quota {QUOTA}), refusals \
                 counted {counted}, entries after A closed its sockets {after_close}"
            );
            assert!(
                refused > 0,
                "eBPF: A's flood past its quota was not refused"
            );
            assert_eq!(counted, refused as u64, "eBPF: refusals counted");
            assert!(held_entries <= u64::from(QUOTA), "eBPF: A over its quota");
            assert_eq!(after_close, 0, "eBPF: A's quota not given back at close");
        }
        println!(
            "{flavor:?}: hostile pod A tried {FLOOD} connects, {refused} refused (EPERM); pod B \
             {b_ok}/10 captured with the right original destination{detail}"
        );
        assert_eq!(b_ok, 10, "{flavor:?}: pod B lost connections to A's flood");
    }
}

/// A non-blocking TCP connect: Some(socket) if it is under way (or done), None if refused
/// with EPERM (a redirect the programs refused).
fn nonblocking_connect(dst: SocketAddr) -> anyhow::Result<Option<std::os::fd::OwnedFd>> {
    use std::os::fd::{FromRawFd, OwnedFd};
    let SocketAddr::V4(v4) = dst else {
        anyhow::bail!("IPv4 only");
    };
    // SAFETY: plain socket(2); the fd is owned right away.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_NONBLOCK, 0) };
    anyhow::ensure!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
    // SAFETY: fd was just returned by socket(2) and nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let sa = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: v4.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*v4.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: a valid sockaddr_in of the size passed.
    let r = unsafe {
        libc::connect(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            (&sa as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    let err = std::io::Error::last_os_error();
    match (r, err.raw_os_error()) {
        (0, _) | (_, Some(libc::EINPROGRESS)) => Ok(Some(fd)),
        (_, Some(libc::EPERM)) => Ok(None),
        _ => Err(err.into()),
    }
}
