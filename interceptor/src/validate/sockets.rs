//! The probes' sockets: a non-blocking dial from the calling thread, the listeners, and what
//! a client or an accepted connection tells (its state, SO_ORIGINAL_DST).

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Instant;

use anyhow::{Context, Result};
use nix::errno::Errno;
use nix::sys::socket::{
    self as sock, sockopt, AddressFamily, SockFlag, SockType, SockaddrIn, SockaddrStorage,
};

use super::Check;

/// A probe connection on its way.
pub(super) struct Probe {
    pub(super) check: Check,
    pub(super) fd: OwnedFd,
    /// getsockname() right after connect: the accepted connection's peer.
    pub(super) local: Option<SocketAddr>,
    pub(super) sent: Instant,
}

pub(super) enum Dial {
    InFlight(OwnedFd, Option<SocketAddr>),
    /// connect() failed at once.
    Failed(Errno),
}

fn std_addr(s: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(a) = s.as_sockaddr_in() {
        Some(SocketAddrV4::from(*a).into())
    } else {
        s.as_sockaddr_in6()
            .map(|a| std::net::SocketAddrV6::from(*a).into())
    }
}

/// A non-blocking TCP connect from the calling thread (its netns and credentials).
pub(super) fn dial(src: Option<Ipv4Addr>, dst: SocketAddrV4) -> Result<Dial> {
    let fd = sock::socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )
    .context("socket(AF_INET)")?;
    if let Some(src) = src {
        sock::bind(fd.as_raw_fd(), &SockaddrIn::from(SocketAddrV4::new(src, 0)))
            .with_context(|| format!("bind({src}:0)"))?;
    }
    match sock::connect(fd.as_raw_fd(), &SockaddrIn::from(dst)) {
        Ok(()) | Err(Errno::EINPROGRESS) => {}
        Err(e) => return Ok(Dial::Failed(e)),
    }
    let local = sock::getsockname::<SockaddrStorage>(fd.as_raw_fd())
        .ok()
        .and_then(|s| std_addr(&s));
    Ok(Dial::InFlight(fd, local))
}

/// The client side of a probe nobody accepted, for the failure message.
pub(super) fn client_status(fd: &OwnedFd) -> String {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one valid pollfd, no wait.
    let n = unsafe { libc::poll(&mut pfd, 1, 0) };
    if n <= 0 {
        return "its SYN got no answer (the connection left uncaptured)".into();
    }
    match sock::getsockopt(fd, sockopt::SocketError) {
        Ok(0) => "it connected to something other than our listeners (delivered uncaptured)".into(),
        Ok(e) => describe_errno(Errno::from_raw(e)),
        Err(e) => format!("its state is unknown ({e})"),
    }
}

pub(super) fn describe_errno(e: Errno) -> String {
    match e {
        Errno::ECONNREFUSED => {
            "it was refused (it reached its real destination, where nothing listens)".into()
        }
        Errno::ENETUNREACH | Errno::EHOSTUNREACH => {
            format!("it failed with {e}: no route, so nothing redirected it")
        }
        Errno::EPERM | Errno::EACCES => format!("it was blocked ({e})"),
        e => format!("it failed with {e}"),
    }
}

/// `getsockopt(SOL_IP, SO_ORIGINAL_DST)` or its IPv6 twin on an accepted connection.
pub(super) fn original_dst(s: &TcpStream, v4: bool) -> std::result::Result<SocketAddr, Errno> {
    if v4 {
        let a = sock::getsockopt(s, sockopt::OriginalDst)?;
        Ok(SocketAddr::new(
            Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)).into(),
            u16::from_be(a.sin_port),
        ))
    } else {
        let a = sock::getsockopt(s, sockopt::Ip6tOriginalDst)?;
        Ok(SocketAddr::new(
            Ipv6Addr::from(a.sin6_addr.s6_addr).into(),
            u16::from_be(a.sin6_port),
        ))
    }
}

pub(super) fn listen(addr: SocketAddr, uid: u32) -> Result<TcpListener> {
    // The io::Error stays in the chain: EADDRINUSE means a running proxy (probe_loop).
    let l =
        TcpListener::bind(addr).with_context(|| format!("cannot listen on {addr} as uid {uid}"))?;
    l.set_nonblocking(true)?;
    Ok(l)
}
