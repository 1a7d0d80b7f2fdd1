//! Finding a proxy listener that already existed before the programs were attached, and taking
//! a duplicate of its fd (pidfd_open + pidfd_getfd) so it can be put in the listener map.

use std::os::fd::{FromRawFd, OwnedFd};

use anyhow::{Context, Result};

/// A listening TCP socket of a netns, from sock_diag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listening {
    pub port: u16,
    pub uid: u32,
    pub inode: u32,
    pub v6: bool,
}

/// Every listening TCP socket (both families) in the caller's netns: from sock_diag, or where
/// the kernel has no inet_diag/tcp_diag (a module not loaded: ENOENT) from /proc/net/tcp{,6},
/// which is slower (it walks the node-wide established hash) but always there.
pub fn listening_here() -> Result<Vec<Listening>> {
    // A new pod's netns has no TCP socket at all: asking sock_diag anyway walks the node-wide
    // listening hash once per family (a tenth of a millisecond per pod add).
    if tcp_sockets_here() == Some(0) {
        return Ok(vec![]);
    }
    match listening_diag() {
        Ok(l) => Ok(l),
        Err(e) => {
            tracing::debug!(error = %e, "sock_diag unavailable; reading /proc/net/tcp");
            Ok(listening_proc())
        }
    }
}

/// TCP sockets in use in the caller's netns (both families; a listening socket counts), from
/// `/proc/net/sockstat{,6}`, whose `inuse` counts are per netns; None when unreadable.
fn tcp_sockets_here() -> Option<u64> {
    let mut n = 0;
    for (file, tag) in [
        ("/proc/thread-self/net/sockstat", "TCP:"),
        ("/proc/thread-self/net/sockstat6", "TCP6:"),
    ] {
        // One read(2) of a page: the file is a few short lines.
        let mut buf = [0u8; 4096];
        let read = std::fs::File::open(file).and_then(|mut f| {
            use std::io::Read;
            f.read(&mut buf)
        });
        match read {
            Ok(len) => n += inuse(std::str::from_utf8(&buf[..len]).ok()?, tag)?,
            // No IPv6 in this kernel: no IPv6 sockets either.
            Err(e) if tag == "TCP6:" && e.kind() == std::io::ErrorKind::NotFound => {}
            Err(_) => return None,
        }
    }
    Some(n)
}

/// The `inuse` count of the `tag` line (`TCP: inuse 3 orphan 0 ...`).
fn inuse(sockstat: &str, tag: &str) -> Option<u64> {
    let mut words = sockstat
        .lines()
        .find(|l| l.starts_with(tag))?
        .split_whitespace();
    while let Some(w) = words.next() {
        if w == "inuse" {
            return words.next()?.parse().ok();
        }
    }
    None
}

/// One row of `/proc/<pid>/net/tcp{,6}` (the kernel's `tcp4_seq_show`/`tcp6_seq_show`).
struct ProcTcp {
    local: std::net::SocketAddr,
    remote: std::net::SocketAddr,
    /// TCP state, as the kernel numbers it (`0A` = listening).
    state: u8,
    uid: u32,
    inode: u32,
}

/// The TCP sockets of the caller's netns, both families, from `/proc/thread-self/net/tcp{,6}`:
/// always there, but slower than sock_diag (the kernel walks the node-wide hashes).
fn proc_tcp() -> Vec<(ProcTcp, bool)> {
    let mut out = Vec::new();
    for (file, v6) in [
        ("/proc/thread-self/net/tcp", false),
        ("/proc/thread-self/net/tcp6", true),
    ] {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        out.extend(
            text.lines()
                .skip(1)
                .filter_map(proc_tcp_row)
                .map(|r| (r, v6)),
        );
    }
    out
}

/// `sl local_address rem_address st tx_queue:rx_queue tr:tm->when retrnsmt uid timeout inode`.
fn proc_tcp_row(line: &str) -> Option<ProcTcp> {
    let f: Vec<&str> = line.split_whitespace().collect();
    if f.len() < 10 {
        return None;
    }
    Some(ProcTcp {
        local: proc_addr(f[1])?,
        remote: proc_addr(f[2])?,
        state: u8::from_str_radix(f[3], 16).ok()?,
        uid: f[7].parse().ok()?,
        inode: f[9].parse().ok()?,
    })
}

/// `0100007F:1F90` (IPv4) or 32 hex digits (IPv6), then the port. The kernel prints each
/// 32-bit word of the address as the CPU holds it (`%08X` of the network-order word), so the
/// word's native-endian bytes are the address bytes.
fn proc_addr(s: &str) -> Option<std::net::SocketAddr> {
    let (addr, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let mut bytes = Vec::with_capacity(16);
    for i in (0..addr.len()).step_by(8) {
        let word = u32::from_str_radix(addr.get(i..i + 8)?, 16).ok()?;
        bytes.extend_from_slice(&word.to_ne_bytes());
    }
    let ip = match bytes.len() {
        4 => std::net::IpAddr::from(<[u8; 4]>::try_from(bytes).ok()?),
        16 => std::net::IpAddr::from(<[u8; 16]>::try_from(bytes).ok()?),
        _ => return None,
    };
    Some(std::net::SocketAddr::new(ip, port))
}

/// TCP state "listening" in /proc/net/tcp.
const PROC_LISTEN: u8 = 0x0a;

fn listening_proc() -> Vec<Listening> {
    proc_tcp()
        .into_iter()
        .filter(|(r, _)| r.state == PROC_LISTEN)
        .map(|(r, v6)| Listening {
            port: r.local.port(),
            uid: r.uid,
            inode: r.inode,
            v6,
        })
        .collect()
}

fn listening_diag() -> Result<Vec<Listening>> {
    let socket = crate::netlink::socket(netlink_sys::protocols::NETLINK_SOCK_DIAG)?;
    let mut out = Vec::new();
    for v6 in [false, true] {
        for (port, uid, inode) in listening_sockets(&socket, v6)? {
            out.push(Listening {
                port,
                uid,
                inode,
                v6,
            });
        }
    }
    Ok(out)
}

/// `(port, uid, inode)` of every listening TCP socket of one family in the caller's netns.
fn listening_sockets(socket: &netlink_sys::Socket, v6: bool) -> Result<Vec<(u16, u32, u32)>> {
    use netlink_packet_sock_diag::inet::StateFlags;
    Ok(tcp_dump(socket, v6, StateFlags::LISTEN)?
        .into_iter()
        .map(|r| (r.header.socket_id.source_port, r.header.uid, r.header.inode))
        .collect())
}

/// The TCP sockets of one family in the caller's netns that are in one of `states`.
fn tcp_dump(
    socket: &netlink_sys::Socket,
    v6: bool,
    states: netlink_packet_sock_diag::inet::StateFlags,
) -> Result<Vec<netlink_packet_sock_diag::inet::InetResponse>> {
    use netlink_packet_sock_diag::{
        constants::{AF_INET, AF_INET6, IPPROTO_TCP},
        inet::{ExtensionFlags, InetRequest, SocketId},
        SockDiagMessage,
    };
    let req = SockDiagMessage::InetRequest(InetRequest {
        family: if v6 { AF_INET6 } else { AF_INET },
        protocol: IPPROTO_TCP,
        extensions: ExtensionFlags::empty(),
        states,
        socket_id: if v6 {
            SocketId::new_v6()
        } else {
            SocketId::new_v4()
        },
    });
    Ok(crate::netlink::dump(socket, req, "sock_diag")?
        .into_iter()
        .filter_map(|m| match m {
            SockDiagMessage::InetResponse(r) => Some(*r),
            _ => None,
        })
        .collect())
}

/// Whether a TCP connection in the caller's netns has local port `port` and remote `peer`, in
/// any state but listening (in the accept queue, accepted, or already closing): the far end of
/// a connection made from `peer`, as the kernel sees it whatever rewrote the destination on the
/// way (NAT or a connect hook). Both families: a dual-stack listener's end is IPv4-mapped.
pub fn connected_to(port: u16, peer: std::net::SocketAddr) -> Result<bool> {
    let mapped = match peer.ip() {
        std::net::IpAddr::V4(a) => std::net::IpAddr::V6(a.to_ipv6_mapped()),
        ip => ip,
    };
    let is_it = |local_port: u16, remote: std::net::SocketAddr| {
        local_port == port
            && remote.port() == peer.port()
            && (remote.ip() == peer.ip() || remote.ip() == mapped)
    };
    match connected_diag(&is_it) {
        Ok(found) => Ok(found),
        // No inet_diag/tcp_diag in this kernel (a module not loaded: ENOENT), as in
        // `listening_here`.
        Err(e) => {
            tracing::debug!(error = %e, "sock_diag unavailable; reading /proc/net/tcp");
            Ok(proc_tcp()
                .iter()
                .any(|(r, _)| r.state != PROC_LISTEN && is_it(r.local.port(), r.remote)))
        }
    }
}

/// [`connected_to`] from sock_diag: any non-listening TCP socket of either family that `is_it`.
fn connected_diag(is_it: &dyn Fn(u16, std::net::SocketAddr) -> bool) -> Result<bool> {
    use netlink_packet_sock_diag::inet::StateFlags;
    let socket = crate::netlink::socket(netlink_sys::protocols::NETLINK_SOCK_DIAG)?;
    for v6 in [false, true] {
        let states = StateFlags::all().difference(StateFlags::LISTEN);
        let found = tcp_dump(&socket, v6, states)?.iter().any(|r| {
            let id = &r.header.socket_id;
            is_it(
                id.source_port,
                std::net::SocketAddr::new(id.destination_address, id.destination_port),
            )
        });
        if found {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Duplicate fds of the proxy's existing inbound listeners among a netns's `listening` sockets
/// (at most one per family, flagged true for IPv6).
pub fn find_proxy_listeners(
    listening: &[Listening],
    port: u16,
    uids: &[u32],
) -> Result<Vec<(OwnedFd, bool)>> {
    let mut inodes: Vec<(u64, bool)> = listening
        .iter()
        .filter(|l| l.port == port && uids.contains(&l.uid))
        .map(|l| (u64::from(l.inode), l.v6))
        .collect();
    let mut out = Vec::new();
    if inodes.is_empty() {
        return Ok(out);
    }
    for proc in std::fs::read_dir("/proc")?.flatten() {
        let Ok(pid) = proc.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        // Socket inodes are unique system-wide, so the owner's own netns (which may differ
        // per thread) need not be checked.
        let Ok(fds) = std::fs::read_dir(proc.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(target) = std::fs::read_link(fd.path()) else {
                continue;
            };
            let target = target.to_string_lossy();
            let Some(inode) = target
                .strip_prefix("socket:[")
                .and_then(|t| t.strip_suffix(']'))
            else {
                continue;
            };
            let Some(i) = inodes.iter().position(|(i, _)| i.to_string() == inode) else {
                continue;
            };
            let Ok(num) = fd.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let (_, v6) = inodes.remove(i);
            if !out.iter().any(|(_, f)| *f == v6) {
                out.push((dup_from(pid, num)?, v6));
            }
            if inodes.is_empty() {
                return Ok(out);
            }
        }
    }
    Ok(out)
}

fn dup_from(pid: i32, fd: i32) -> Result<OwnedFd> {
    // SAFETY: pidfd_open takes two integers and returns a new fd or -1; no memory is passed.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if pidfd < 0 {
        return Err(std::io::Error::last_os_error()).context("pidfd_open");
    }
    // SAFETY: `pidfd` is a new descriptor the kernel just returned to us; nothing else owns it.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as i32) };
    // SAFETY: pidfd_getfd takes our live pidfd and two integers and returns a new fd or -1;
    // no memory is passed.
    let dup = unsafe {
        libc::syscall(
            libc::SYS_pidfd_getfd,
            std::os::fd::AsRawFd::as_raw_fd(&pidfd),
            fd,
            0,
        )
    };
    if dup < 0 {
        return Err(std::io::Error::last_os_error()).context("pidfd_getfd");
    }
    // SAFETY: `dup` is a new descriptor the kernel just returned to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(dup as i32) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockstat_inuse() {
        let v4 = "sockets: used 5\nTCP: inuse 3 orphan 0 tw 0 alloc 4 mem 1\nUDP: inuse 1 mem 0\n";
        assert_eq!(inuse(v4, "TCP:"), Some(3));
        assert_eq!(inuse(v4, "UDP:"), Some(1));
        let v6 = "TCP6: inuse 0\nUDP6: inuse 0\n";
        assert_eq!(inuse(v6, "TCP6:"), Some(0));
        assert_eq!(inuse(v6, "TCP:"), None);
    }

    #[test]
    fn proc_addresses_parse_as_the_kernel_prints_them() {
        let at = |s: &str| proc_addr(s).map(|a| a.to_string());
        assert_eq!(at("0100007F:1F90").as_deref(), Some("127.0.0.1:8080"));
        assert_eq!(
            at("00000000000000000000000001000000:3A99").as_deref(),
            Some("[::1]:15001")
        );
        assert_eq!(
            at("0000000000000000FFFF00000100007F:0050").as_deref(),
            Some("[::ffff:127.0.0.1]:80")
        );
        assert_eq!(at("0100007F"), None);
        assert_eq!(at("0100007:1F90"), None);
        let row = "   0: 0100007F:3A99 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1337        0 4242 1 0000000000000000 100 0 0 10 0";
        let r = proc_tcp_row(row).unwrap();
        assert_eq!(
            (r.local.port(), r.state, r.uid, r.inode),
            (15001, PROC_LISTEN, 1337, 4242)
        );
    }

    /// Both ways of finding a connection's far end agree on a live loopback connection, and
    /// neither finds it under another port or peer.
    #[test]
    fn a_live_connection_is_found_from_sock_diag_and_from_proc() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let peer = c.local_addr().unwrap();
        let _accepted = l.accept().unwrap();
        let from_proc = |port: u16, peer: std::net::SocketAddr| {
            proc_tcp()
                .iter()
                .any(|(r, _)| r.state != PROC_LISTEN && r.local.port() == port && r.remote == peer)
        };
        assert!(from_proc(port, peer));
        assert!(!from_proc(port.wrapping_add(1), peer));
        assert!(connected_to(port, peer).unwrap());
        let other = std::net::SocketAddr::new(peer.ip(), peer.port().wrapping_add(1));
        assert!(!connected_to(port, other).unwrap());
        if let Ok(diag) = connected_diag(&|p, r| p == port && r == peer) {
            assert!(diag, "sock_diag did not find it");
        }
        assert!(listening_proc().iter().any(|x| x.port == port));
    }
}
