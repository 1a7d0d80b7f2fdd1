//! Escape scenarios: raw IP sockets. With CAP_NET_RAW (in containerd's and Docker's default set)
//! an app writes its own TCP segments: no connect hook sees them, while Istio's nat OUTPUT chain
//! rewrites them like any packet. So a hand-made SYN carrying data must not reach the upstream
//! on either backend: iptables redirects it, eBPF refuses the raw socket itself.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use interceptor_tests::cases::{apply, Flavor, Pod, UPSTREAM_PORT};
use interceptor_tests::topology::run_in_netns;

use super::common::BACKENDS;

/// The payload that marks our segment at the upstream.
const MARK: &[u8] = b"ic-raw-escape";
/// The hand-made segment's source port.
const SRC_PORT: u16 = 40999;

/// A raw IPv4 socket of `protocol`, or the errno of socket(2).
fn raw_socket(protocol: i32) -> Result<OwnedFd, std::io::Error> {
    // SAFETY: plain socket(2); the fd is owned from here on.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, protocol) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh fd nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A TCP SYN from `src` to `dst` carrying [`MARK`], checksummed (the kernel adds the IP header).
fn syn(src: Ipv4Addr, dst: SocketAddrV4) -> Vec<u8> {
    let mut tcp = Vec::new();
    tcp.extend(SRC_PORT.to_be_bytes());
    tcp.extend(dst.port().to_be_bytes());
    tcp.extend(1u32.to_be_bytes()); // sequence
    tcp.extend(0u32.to_be_bytes()); // ack
    tcp.extend([5 << 4, 0x02]); // data offset 5 words; SYN
    tcp.extend(65535u16.to_be_bytes()); // window
    tcp.extend([0, 0, 0, 0]); // checksum, urgent pointer
    tcp.extend(MARK);
    let mut pseudo = Vec::new();
    pseudo.extend(src.octets());
    pseudo.extend(dst.ip().octets());
    pseudo.extend([0, libc::IPPROTO_TCP as u8]);
    pseudo.extend((tcp.len() as u16).to_be_bytes());
    pseudo.extend(&tcp);
    let sum = checksum(&pseudo);
    tcp[16..18].copy_from_slice(&sum.to_be_bytes());
    tcp
}

/// Whether a TCP segment carrying [`MARK`] arrives at a raw listener in the upstream netns
/// within `wait` (the listener is a raw socket of a netns nobody meshes: it must keep working).
fn upstream_sees_mark(pod: &Pod, wait: Duration) -> std::thread::JoinHandle<bool> {
    let up = pod.topo.upstream_netns().to_path_buf();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let h = std::thread::spawn(move || {
        run_in_netns(&up, || {
            let fd = raw_socket(libc::IPPROTO_TCP).expect("a raw socket outside the mesh");
            let tv = libc::timeval {
                tv_sec: 0,
                tv_usec: 200_000,
            };
            // SAFETY: a valid timeval of its size.
            unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    (&tv as *const libc::timeval).cast(),
                    std::mem::size_of::<libc::timeval>() as libc::socklen_t,
                )
            };
            ready_tx.send(()).unwrap();
            let end = Instant::now() + wait;
            let mut buf = [0u8; 2048];
            while Instant::now() < end {
                // SAFETY: a valid buffer of its length.
                let n =
                    unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
                if n > 0 && buf[..n as usize].windows(MARK.len()).any(|w| w == MARK) {
                    return true;
                }
            }
            false
        })
        .expect("upstream netns")
    });
    ready_rx
        .recv_timeout(Duration::from_secs(5))
        .expect("the upstream's raw listener");
    h
}

#[test]
fn raw_tcp_segments_never_reach_the_upstream() {
    let mut outcomes = vec![];
    for flavor in BACKENDS {
        let pod = Pod::new("rawsock").unwrap();
        apply(&pod, flavor, &["-i", "*"]).unwrap();
        let dst = SocketAddrV4::new(pod.topo.upstream_v4(), UPSTREAM_PORT);
        let seen = upstream_sees_mark(&pod, Duration::from_secs(2));
        // As root in the pod (not the proxy uid): an app with CAP_NET_RAW.
        let src = pod.topo.pod_v4();
        let (icmp, tcp) = run_in_netns(pod.topo.pod_netns(), || {
            let errno = |e: std::io::Error| e.raw_os_error();
            let icmp = raw_socket(libc::IPPROTO_ICMP).map(drop).map_err(errno);
            let tcp = raw_socket(libc::IPPROTO_TCP).and_then(|fd| {
                let to = nix::sys::socket::SockaddrIn::from(dst);
                nix::sys::socket::sendto(
                    fd.as_raw_fd(),
                    &syn(src, dst),
                    &to,
                    nix::sys::socket::MsgFlags::empty(),
                )
                .map(drop)
                .map_err(std::io::Error::from)
            });
            (icmp, tcp.map_err(errno))
        })
        .unwrap();
        let reached = seen.join().unwrap();
        println!(
            "{flavor:?}: raw ICMP socket {icmp:?}, raw TCP segment sent {tcp:?}; the upstream saw it: {reached}"
        );
        outcomes.push((flavor, icmp, tcp, reached));
    }
    for (flavor, icmp, tcp, reached) in &outcomes {
        assert!(
            !reached,
            "{flavor:?}: a hand-made TCP segment reached the upstream past the proxy"
        );
        if *flavor == Flavor::Ebpf {
            // Refused whatever the protocol: any raw socket can carry TCP (IP_HDRINCL).
            assert_eq!(*tcp, Err(Some(libc::EPERM)), "eBPF: raw TCP socket");
            assert_eq!(*icmp, Err(Some(libc::EPERM)), "eBPF: raw ICMP socket");
        } else {
            // Istio's rules let the sockets be and redirect the packet.
            assert_eq!((icmp, tcp), (&Ok(()), &Ok(())), "{flavor:?}: raw sockets");
        }
    }
    // Unprivileged ICMP (ping's SOCK_DGRAM) is not raw and is not refused by us.
    let pod = Pod::new("rawping").unwrap();
    apply(&pod, Flavor::Ebpf, &["-i", "*"]).unwrap();
    let ping = run_in_netns(pod.topo.pod_netns(), || {
        // SAFETY: plain socket(2); closed at once.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, libc::IPPROTO_ICMP) };
        let err = std::io::Error::last_os_error().raw_os_error();
        if fd >= 0 {
            // SAFETY: the fd just made, owned by nobody else.
            unsafe { libc::close(fd) };
            return None;
        }
        err
    })
    .unwrap();
    // net.ipv4.ping_group_range may leave root's group out (EACCES): only EPERM would be ours.
    assert_ne!(ping, Some(libc::EPERM), "eBPF refused a ping socket");
}
