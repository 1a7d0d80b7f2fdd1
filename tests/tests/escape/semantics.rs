//! Escape scenarios: semantics. Destinations the kernel rewrites or routes over `lo` by itself
//! (`0.0.0.0`, `::`, the pod's own `fe80::`), a UDP socket disconnected with `AF_UNSPEC` and
//! connected again, and the other ways to connect: TCP Fast Open (`sendto(MSG_FASTOPEN)`) and
//! io_uring. Each must end where Istio's rules send it.

use std::net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV6, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use interceptor_tests::cases::{apply, Flavor, Pod, APP_PORT, UPSTREAM_PORT};
use interceptor_tests::dns::{DnsProxy, ANSWER};
use interceptor_tests::topology::{enter_netns, run_in_netns, set_thread_creds};

use super::common::BACKENDS;

/// Who answered a TCP connection from the pod as `uid` (the reply tag), or the error.
fn who(pod: &Pod, uid: u32, dst: SocketAddr) -> String {
    match pod.topo.connect_from_pod(uid, uid, dst) {
        Ok(o) => o.reply,
        Err(e) => format!("error: {e:#}"),
    }
}

/// Runs `scenario` on each backend and returns its (case, outcome) lists, printed: every
/// backend's outcomes are known (and shown) before any assertion fails.
fn on_each_backend(
    scenario: impl Fn(Flavor) -> Vec<(String, String)>,
) -> Vec<(Flavor, Vec<(String, String)>)> {
    let all: Vec<_> = BACKENDS.iter().map(|f| (*f, scenario(*f))).collect();
    for (f, cases) in &all {
        for (case, outcome) in cases {
            println!("{f:?}: {case} -> {outcome}");
        }
    }
    all
}

/// `0.0.0.0` and `::` mean this host: the kernel connects to 127.0.0.1 / ::1 over `lo`, where
/// Istio's `-o lo` rules return the app's connection (and the proxy's, to the loopback CIDR).
/// Before: eBPF sent both to the proxy's 15001.
#[test]
fn unspecified_destination_reaches_the_app() {
    let all = on_each_backend(|flavor| {
        let pod = Pod::new("unspec").unwrap();
        apply(&pod, flavor, &["-i", "*", "--ipv6", "true"]).unwrap();
        let mut out = Vec::new();
        for ip in ["0.0.0.0", "::"] {
            let dst = SocketAddr::new(ip.parse().unwrap(), APP_PORT);
            for uid in [1000, 1337] {
                out.push((format!("uid {uid} to {dst}"), who(&pod, uid, dst)));
            }
        }
        // A non-loopback destination is still captured (the pod is meshed).
        let up = SocketAddr::new(pod.topo.upstream_v4().into(), UPSTREAM_PORT);
        out.push((format!("uid 1000 to {up}"), who(&pod, 1000, up)));
        out
    });
    for (flavor, cases) in all {
        for (case, outcome) in cases {
            let want = if case.contains("0.0.0.0") || case.contains("[::]") {
                "app:9080"
            } else {
                "sidecar:15001"
            };
            assert_eq!(outcome, want, "{flavor:?}: {case}");
        }
    }
}

/// The pod's own link-local address is local: routed over `lo`, the app's connection returns
/// (reaches the app); the proxy's is sent to inbound handling (15006) as to its pod IP, where
/// on iptables it then times out (REDIRECT to ::1 keeps the link-local source) and on eBPF
/// reaches the proxy's inbound listener: captured either way, never the app directly.
/// Before: eBPF sent the app's connection to 15001.
#[test]
fn own_link_local_is_local() {
    let all = on_each_backend(|flavor| {
        let pod = Pod::new("lladdr").unwrap();
        let ll: Ipv6Addr = "fe80::1c:1".parse().unwrap();
        #[rustfmt::skip]
        pod.topo.pod_exec("ip", &["addr", "add", "fe80::1c:1/64", "dev", "eth0", "nodad"], None).unwrap();
        let ifindex = run_in_netns(pod.topo.pod_netns(), || {
            nix::net::if_::if_nametoindex("eth0").unwrap()
        })
        .unwrap();
        apply(&pod, flavor, &["-i", "*", "--ipv6", "true"]).unwrap();
        let dst = SocketAddr::V6(SocketAddrV6::new(ll, APP_PORT, 0, ifindex));
        vec![
            ("app".into(), who(&pod, 1000, dst)),
            ("proxy".into(), who(&pod, 1337, dst)),
        ]
    });
    for (flavor, cases) in all {
        for (case, outcome) in cases {
            match case.as_str() {
                "app" => assert_eq!(outcome, "app:9080", "{flavor:?}: {case}"),
                _ if flavor == Flavor::Ebpf => {
                    assert_eq!(outcome, "sidecar:15006", "{flavor:?}: {case}")
                }
                _ => assert_ne!(outcome, "app:9080", "{flavor:?}: {case}"),
            }
        }
    }
}

/// A UDP echo server in the upstream netns: replies with what it got.
struct Echo {
    stop: Arc<AtomicBool>,
}

impl Echo {
    fn start(pod: &Pod, port: u16) -> Echo {
        let stop = Arc::new(AtomicBool::new(false));
        let (netns, s) = (pod.topo.upstream_netns().to_path_buf(), stop.clone());
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            enter_netns(&netns).unwrap();
            let sock = UdpSocket::bind(("0.0.0.0", port)).unwrap();
            sock.set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            tx.send(()).unwrap();
            let mut buf = [0u8; 512];
            while !s.load(Ordering::Relaxed) {
                if let Ok((n, from)) = sock.recv_from(&mut buf) {
                    let _ = sock.send_to(&buf[..n], from);
                }
            }
        });
        rx.recv().unwrap();
        Echo { stop }
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A DNS query for `svc.test` A.
fn query(id: u16) -> Vec<u8> {
    let mut q = id.to_be_bytes().to_vec();
    q.extend_from_slice(&[1, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
    q.extend_from_slice(b"\x03svc\x04test\x00\x00\x01\x00\x01");
    q
}

/// On a connected UDP socket: sends `msg`, returns (reply, getpeername) or an error text.
fn exchange(sock: &UdpSocket, msg: &[u8]) -> Result<(Vec<u8>, SocketAddr), String> {
    sock.send(msg).map_err(|e| format!("send: {e}"))?;
    let mut buf = [0u8; 512];
    let n = sock.recv(&mut buf).map_err(|e| format!("recv: {e}"))?;
    let peer = sock.peer_addr().map_err(|e| format!("getpeername: {e}"))?;
    Ok((buf[..n].to_vec(), peer))
}

/// connect(AF_UNSPEC): dissolves the UDP association.
fn disconnect(sock: &UdpSocket) {
    // SAFETY: a zeroed sockaddr with family AF_UNSPEC, of its own size.
    let r = unsafe {
        let mut sa: libc::sockaddr = std::mem::zeroed();
        sa.sa_family = libc::AF_UNSPEC as libc::sa_family_t;
        libc::connect(
            sock.as_raw_fd(),
            &sa,
            std::mem::size_of::<libc::sockaddr>() as libc::socklen_t,
        )
    };
    assert_eq!(r, 0, "AF_UNSPEC: {}", std::io::Error::last_os_error());
}

/// DNS on a connected UDP socket, then `connect(AF_UNSPEC)` and a connect to a UDP service
/// Istio does not capture: its replies and `getpeername` are the real peer's, never the
/// earlier DNS server's; connected to DNS again, it is captured again.
/// Before: eBPF's getpeername answered the stale DNS server after the reconnect.
#[test]
fn udp_disconnect_and_reconnect() {
    for flavor in BACKENDS {
        let pod = Pod::new("unspecudp").unwrap();
        let _proxy = DnsProxy::start(pod.topo.pod_netns(), 15053, 1337, 1337).unwrap();
        let _echo = Echo::start(&pod, 5300);
        let server: IpAddr = pod.topo.upstream_v4().into();
        let servers = server.to_string();
        #[rustfmt::skip]
        apply(&pod, flavor, &["-i", "*", "--redirect-dns", "--dns-servers", &servers]).unwrap();
        let dns = SocketAddr::new(server, 53);
        let echo = SocketAddr::new(server, 5300);
        let got = run_in_netns(pod.topo.pod_netns(), || {
            set_thread_creds(1000, 1000).unwrap();
            let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
            sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            sock.connect(dns).unwrap();
            let first = exchange(&sock, &query(1));
            disconnect(&sock);
            sock.connect(echo).unwrap();
            let second = exchange(&sock, b"hello");
            disconnect(&sock);
            sock.connect(dns).unwrap();
            let third = exchange(&sock, &query(3));
            (first, second, third)
        })
        .unwrap();
        let answered = |r: &Result<(Vec<u8>, SocketAddr), String>| match r {
            Ok((reply, peer)) => reply.ends_with(&ANSWER.octets()) && *peer == dns,
            Err(_) => false,
        };
        assert!(answered(&got.0), "{flavor:?}: first DNS query: {:?}", got.0);
        assert_eq!(
            got.1,
            Ok((b"hello".to_vec(), echo)),
            "{flavor:?}: after AF_UNSPEC, the echo service"
        );
        assert!(answered(&got.2), "{flavor:?}: DNS again: {:?}", got.2);
    }
}

/// A TCP socket of the app in the pod netns as `uid` (a raw fd: the connect is the test's).
fn tcp_socket(v4: bool) -> OwnedFd {
    let family = if v4 { libc::AF_INET } else { libc::AF_INET6 };
    // SAFETY: plain socket(2); the fd is owned from here on.
    let fd = unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
    // SAFETY: a fresh fd nobody else owns.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

fn sockaddr(dst: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    let s = nix::sys::socket::SockaddrStorage::from(dst);
    let len = nix::sys::socket::SockaddrLike::len(&s);
    // SAFETY: SockaddrStorage wraps a sockaddr_storage of `len` valid bytes.
    let ss = unsafe { std::ptr::read(nix::sys::socket::SockaddrLike::as_ptr(&s).cast()) };
    (ss, len)
}

/// The reply line on a connected stream (or the read error) and its getpeername.
fn reply_and_peer(fd: OwnedFd) -> (String, Option<SocketAddr>) {
    let mut s = std::net::TcpStream::from(fd);
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    // A Fast Open connect may still be in progress when sendto returns: wait until it is
    // established (writable), and ask the peer before reading (the server then closes, with a
    // reset as it never reads what we sent).
    let mut pfd = libc::pollfd {
        fd: s.as_raw_fd(),
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut pfd, 1, 2000) };
    let peer = s.peer_addr().ok();
    let mut line = String::new();
    let read = std::io::BufRead::read_line(&mut std::io::BufReader::new(&mut s), &mut line);
    match read {
        Ok(_) => (line.trim_end().to_string(), peer),
        Err(e) => (format!("error: {e}"), peer),
    }
}

/// TCP Fast Open: `sendto(MSG_FASTOPEN)` connects and sends in one call; it goes through the
/// same connect hook as connect(2), so it is captured like it (the app still sees the upstream
/// as its peer, the proxy gets the original destination).
#[test]
fn tcp_fast_open_is_captured() {
    for flavor in BACKENDS {
        let pod = Pod::new("tfo").unwrap();
        apply(&pod, flavor, &["-i", "*"]).unwrap();
        let up = SocketAddr::new(pod.topo.upstream_v4().into(), UPSTREAM_PORT);
        pod.sidecar.take_records();
        let (reply, peer) = run_in_netns(pod.topo.pod_netns(), || {
            set_thread_creds(1000, 1000).unwrap();
            let fd = tcp_socket(true);
            let (ss, len) = sockaddr(up);
            // No payload: the server closes without reading, and unread data would turn its
            // close into a reset (the app could not ask its peer any more).
            let msg = b"";
            // SAFETY: a valid buffer and sockaddr of `len` bytes.
            let n = unsafe {
                libc::sendto(
                    fd.as_raw_fd(),
                    msg.as_ptr().cast(),
                    msg.len(),
                    libc::MSG_FASTOPEN,
                    (&ss as *const libc::sockaddr_storage).cast(),
                    len,
                )
            };
            assert!(
                n >= 0,
                "sendto(MSG_FASTOPEN): {}",
                std::io::Error::last_os_error()
            );
            reply_and_peer(fd)
        })
        .unwrap();
        assert_eq!(reply, "sidecar:15001", "{flavor:?}: TFO");
        assert_eq!(peer, Some(up), "{flavor:?}: the app's peer");
        let rec = pod.sidecar.take_records();
        assert_eq!(
            rec.first().and_then(|r| r.original_dst),
            Some(up),
            "{flavor:?}: original destination"
        );
    }
}

/// io_uring's IORING_OP_CONNECT runs the socket's connect (and so its hook) from the ring: it
/// is captured like connect(2).
#[test]
fn io_uring_connect_is_captured() {
    for flavor in BACKENDS {
        let pod = Pod::new("uring").unwrap();
        apply(&pod, flavor, &["-i", "*", "--ipv6", "true"]).unwrap();
        let ups = [
            SocketAddr::new(pod.topo.upstream_v4().into(), UPSTREAM_PORT),
            SocketAddr::new(pod.topo.upstream_v6().into(), UPSTREAM_PORT),
        ];
        for up in ups {
            pod.sidecar.take_records();
            let (reply, peer) = run_in_netns(pod.topo.pod_netns(), || {
                set_thread_creds(1000, 1000).unwrap();
                let fd = tcp_socket(up.is_ipv4());
                let (ss, len) = sockaddr(up);
                let mut ring = io_uring::IoUring::new(4).expect("io_uring_setup");
                let op = io_uring::opcode::Connect::new(
                    io_uring::types::Fd(fd.as_raw_fd()),
                    (&ss as *const libc::sockaddr_storage).cast(),
                    len,
                )
                .build();
                // SAFETY: `ss` and `fd` outlive the operation (we wait for its completion).
                unsafe { ring.submission().push(&op).expect("queue the connect") };
                ring.submit_and_wait(1).expect("io_uring_enter");
                let cqe = ring.completion().next().expect("a completion");
                assert_eq!(
                    cqe.result(),
                    0,
                    "io_uring connect: {}",
                    std::io::Error::from_raw_os_error(-cqe.result())
                );
                reply_and_peer(fd)
            })
            .unwrap();
            assert_eq!(
                reply, "sidecar:15001",
                "{flavor:?}: io_uring connect to {up}"
            );
            assert_eq!(peer, Some(up), "{flavor:?}: the app's peer");
            let rec = pod.sidecar.take_records();
            assert_eq!(
                rec.first().and_then(|r| r.original_dst),
                Some(up),
                "{flavor:?}: original destination"
            );
        }
    }
}

/// The netns cookie probe (a socket bound to `100::` port 0, which our bind6 program binds to an
/// address carrying the cookie instead) gives an app an unusual source address: connecting out
/// from it must still end at the proxy, or fail, never at the upstream.
#[test]
fn a_socket_bound_by_the_cookie_probe_is_captured() {
    for flavor in BACKENDS {
        let pod = Pod::new("probe").unwrap();
        apply(&pod, flavor, &["-i", "*", "--ipv6", "true"]).unwrap();
        let up = SocketAddr::new(pod.topo.upstream_v6().into(), UPSTREAM_PORT);
        let (reply, bound) = run_in_netns(pod.topo.pod_netns(), || {
            set_thread_creds(1000, 1000).unwrap();
            let fd = tcp_socket(false);
            let on: libc::c_int = 1;
            let wait = libc::timeval {
                tv_sec: 2,
                tv_usec: 0,
            };
            // SAFETY: setsockopt with an int and a timeval of their own sizes, on our fd.
            unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::IPPROTO_IPV6,
                    78, // IPV6_FREEBIND
                    (&on as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                );
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_SNDTIMEO,
                    (&wait as *const libc::timeval).cast(),
                    std::mem::size_of::<libc::timeval>() as libc::socklen_t,
                );
            }
            let probe = SocketAddr::V6(SocketAddrV6::new(
                interceptor_common::maps::COOKIE_PROBE.into(),
                0,
                0,
                0,
            ));
            let (ss, len) = sockaddr(probe);
            // SAFETY: a sockaddr of `len` bytes.
            let r = unsafe {
                libc::bind(
                    fd.as_raw_fd(),
                    (&ss as *const libc::sockaddr_storage).cast(),
                    len,
                )
            };
            assert_eq!(r, 0, "bind: {}", std::io::Error::last_os_error());
            let bound =
                nix::sys::socket::getsockname::<nix::sys::socket::SockaddrIn6>(fd.as_raw_fd())
                    .map(|a| a.ip());
            let (ss, len) = sockaddr(up);
            // SAFETY: as above. A refusal or a timeout shows in the reply below.
            unsafe {
                libc::connect(
                    fd.as_raw_fd(),
                    (&ss as *const libc::sockaddr_storage).cast(),
                    len,
                )
            };
            (reply_and_peer(fd).0, bound)
        })
        .unwrap();
        println!("{flavor:?}: bound to {bound:?}, app → {up}: {reply}");
        assert_ne!(
            reply,
            format!("upstream:{UPSTREAM_PORT}"),
            "{flavor:?}: a socket bound by the cookie probe reached the upstream past the proxy"
        );
        assert!(
            reply == "sidecar:15001" || reply.starts_with("error"),
            "{flavor:?}: {reply}"
        );
    }
}
