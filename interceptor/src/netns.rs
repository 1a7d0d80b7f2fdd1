//! Network namespaces: run Rust code or a command inside a netns given by path, and the facts
//! read from inside one (its cookie and identity, its own addresses, its listening sockets).
//! A facts module: it imports no backend and no config, so both can build on it.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::net::IpAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use anyhow::{Context, Result};
use nix::sched::{setns, CloneFlags};

/// What registering a pod needs from inside its netns, gathered in one visit (on the pod-add
/// path every visit's setns pair and socket set-up adds up).
#[derive(Debug, Clone)]
pub struct PodNetns {
    pub cookie: u64,
    /// Its own addresses (no loopback, no link-local), in interface order.
    pub local: Vec<std::net::IpAddr>,
    /// Its own link-local addresses (fe80::/10, 169.254/16): local for outbound decisions only.
    pub link_local: Vec<std::net::IpAddr>,
    pub listening: Vec<crate::listener::Listening>,
    /// Its `net.ipv4.ip_local_reserved_ports`, opened inside it for reading and writing: the
    /// open file stays the netns's own sysctl, so the bind guard's reservation needs no second
    /// visit. None when it could not be opened (the reservation then visits and says why).
    pub reserved_ports: Option<Arc<File>>,
    /// The netns itself, open: later steps (attaching the pod's sk_lookup program) use it
    /// instead of opening the path again.
    pub ns: Arc<File>,
}

/// A network namespace opened once for all the steps of a pod's registration (each open of a
/// path under /var/run/netns is a path walk and an fd to close).
#[derive(Debug, Clone)]
pub struct Netns {
    pub path: PathBuf,
    pub file: Arc<File>,
}

impl Netns {
    /// Opens `path`; None unless it can be opened and is a network namespace.
    pub fn open(path: &Path) -> Option<Self> {
        let file = File::open(path).ok()?;
        // SAFETY: an argument-less ioctl on an fd we own for the call; it reads no memory of ours.
        let t = unsafe { libc::ioctl(file.as_raw_fd(), NS_GET_NSTYPE as _) };
        (t == libc::CLONE_NEWNET).then(|| Self {
            path: path.to_path_buf(),
            file: Arc::new(file),
        })
    }

    /// `open`, failing with the path when it is not a network namespace.
    pub fn open_or_fail(path: &Path) -> Result<Self> {
        Self::open(path)
            .ok_or_else(|| anyhow::anyhow!("{} is not a network namespace", path.display()))
    }
}

/// The sysctl of the ports autobind skips, as seen from inside the netns that opens it.
pub const RESERVED_PORTS_SYSCTL: &str = "/proc/sys/net/ipv4/ip_local_reserved_ports";

/// Visits the netns `ns` once and reads its cookie, addresses and listening sockets.
pub fn pod_netns(ns: &Netns) -> Result<PodNetns> {
    run_in_file(&ns.file, || {
        // One rtnetlink socket: its cookie is the netns's, and it dumps the addresses.
        let route = crate::netlink::socket(netlink_sys::protocols::NETLINK_ROUTE)?;
        let cookie = cookie_of(route.as_fd())?;
        let (local, link_local) = split_addrs(addresses_on(&route)?);
        drop(route);
        Ok(PodNetns {
            cookie,
            local,
            link_local,
            listening: crate::listener::listening_here()?,
            reserved_ports: std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(RESERVED_PORTS_SYSCTL)
                .ok()
                .map(Arc::new),
            ns: ns.file.clone(),
        })
    })
}

/// Runs `f` inside the netns at `path` (or the current one for `None`) on the calling thread:
/// it enters the netns, runs `f` and returns to the netns the thread was in, also when `f`
/// fails or panics. A netns is per thread, so the process's other threads are untouched. Why
/// not a thread per visit (as before): its clone and two cross-CPU wake-ups were a large part
/// of a pod add's latency.
pub fn run_in<T>(path: Option<&Path>, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let Some(path) = path else {
        return f();
    };
    let target = File::open(path).with_context(|| format!("opening netns {}", path.display()))?;
    run_in_file(&target, f)
}

/// `run_in` for a netns already open.
pub fn run_in_file<T>(target: &File, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let home = File::open("/proc/thread-self/ns/net").context("opening this thread's netns")?;
    setns(target, CloneFlags::CLONE_NEWNET).context("setns(CLONE_NEWNET)")?;
    let _back = ReturnTo(home);
    f()
}

/// Takes the thread back to its own netns when a visit ends (or unwinds).
struct ReturnTo(File);

impl Drop for ReturnTo {
    fn drop(&mut self) {
        if let Err(e) = setns(&self.0, CloneFlags::CLONE_NEWNET) {
            // Going on would create this thread's later sockets, and read its sysctls and
            // /proc/net, in a pod's netns. Only ENOMEM can get here (the thread had the
            // capability to leave), and there is no safe way on.
            eprintln!("interceptor: cannot return to this thread's own netns ({e}); aborting");
            std::process::abort();
        }
    }
}

/// A command that runs inside the netns at `path` (via nsenter), or here when `None`. A netns
/// owned by another user namespace (a `hostUsers: false` pod) is entered together with that
/// user namespace: the kernel only accepts owner-match rules written from there.
pub fn command(path: Option<&Path>, program: &str) -> Result<Command> {
    match path {
        Some(p) => {
            if let Some(userns) = crate::userns::foreign_owner(p)? {
                return crate::userns::command(userns, p, program);
            }
            let mut c = Command::new("nsenter");
            c.arg(format!("--net={}", p.display()))
                .arg("--")
                .arg(program);
            Ok(c)
        }
        None => Ok(Command::new(program)),
    }
}

/// Whether `path` is a network namespace handle (nsfs inode of type net).
pub fn is_netns(path: &Path) -> bool {
    Netns::open(path).is_some()
}

/// `NS_GET_NSTYPE` = `_IO(0xb7, 0x3)`.
const NS_GET_NSTYPE: libc::c_ulong = 0xb703;

/// `SO_NETNS_COOKIE` (Linux 5.14+; not in every libc crate yet).
const SO_NETNS_COOKIE: libc::c_int = 71;

/// SO_NETNS_COOKIE of a socket created inside the netns at `path` (the current one for `None`).
pub fn cookie(path: Option<&Path>) -> Result<u64> {
    run_in(path, cookie_here)
}

/// The cookie of the caller's own netns.
pub fn cookie_here() -> Result<u64> {
    // Any socket carries its netns's cookie; an unbound Unix one costs no port and no address.
    let sock = std::os::unix::net::UnixDatagram::unbound()
        .context("creating a socket to read the netns cookie")?;
    cookie_of(sock.as_fd())
}

/// The cookie of the netns `sock` was created in, which is the caller's: SO_NETNS_COOKIE, or
/// before 5.14 our bind6 program's answer to a cookie probe (`maps::COOKIE_PROBE`), where our
/// programs are loaded and run for this process. Fails with ENOPROTOOPT in the chain when
/// neither answers.
fn cookie_of(sock: BorrowedFd<'_>) -> Result<u64> {
    let direct = if crate::fault::like_5_10() {
        Err(std::io::Error::from_raw_os_error(libc::ENOPROTOOPT))
    } else {
        socket_cookie(sock)
    };
    match direct {
        Ok(c) => Ok(c),
        Err(e) if e.raw_os_error() == Some(libc::ENOPROTOOPT) => match cookie_by_bind() {
            Ok(Some(c)) => Ok(c),
            Ok(None) => Err(anyhow::Error::from(e).context(
                "getsockopt(SO_NETNS_COOKIE) needs Linux 5.14, and no bind6 program of ours \
                 answered the cookie probe (none is loaded, or it is attached to a cgroup this \
                 process is not in)",
            )),
            Err(b) => Err(anyhow::Error::from(e).context(format!(
                "getsockopt(SO_NETNS_COOKIE) needs Linux 5.14, and the cookie probe failed: {b:#}"
            ))),
        },
        Err(e) => Err(e).context("getsockopt(SO_NETNS_COOKIE)"),
    }
}

/// Asks our bind6 program for the caller's netns cookie: a UDP socket bound to
/// `maps::COOKIE_PROBE` port 0 ends up bound to an address that carries the cookie. None if no
/// program of ours rewrote the bind.
pub fn cookie_by_bind() -> Result<Option<u64>> {
    use interceptor_common::maps::{cookie_from_probe, COOKIE_PROBE};
    use nix::sys::socket::{
        bind, getsockname, socket, AddressFamily, SockFlag, SockType, SockaddrIn6,
    };
    let sock = socket(
        AddressFamily::Inet6,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .context("socket(AF_INET6) for the cookie probe")?;
    let on: libc::c_int = 1;
    // SAFETY: `sock` is a live fd we own; the kernel reads `size_of::<c_int>()` bytes from `on`,
    // an int on our stack. IPV6_FREEBIND (4.15+): the answer is an address no interface has.
    let r = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IPV6,
            IPV6_FREEBIND,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error()).context("setsockopt(IPV6_FREEBIND)");
    }
    let probe = std::net::SocketAddrV6::new(COOKIE_PROBE.into(), 0, 0, 0);
    bind(sock.as_raw_fd(), &SockaddrIn6::from(probe)).context("bind for the cookie probe")?;
    let bound: SockaddrIn6 = getsockname(sock.as_raw_fd()).context("getsockname")?;
    Ok(cookie_from_probe(bound.ip().octets()))
}

/// `IPV6_FREEBIND` (not in every libc crate yet).
const IPV6_FREEBIND: libc::c_int = 78;

/// A netns's identity for the daemon's records: its cookie, or where no cookie can be read
/// (before 5.14, while no program of ours runs: a node on the fallback) its nsfs inode with the
/// top bit set, so it can never equal a cookie. Inodes can be reused once a netns is gone;
/// cookies not.
pub fn identity(path: &Path) -> Result<u64> {
    match cookie(Some(path)) {
        Ok(c) => Ok(c),
        Err(e) if no_cookie(&e) => inode_identity(path),
        Err(e) => Err(e),
    }
}

/// Whether the netns at `path` is the one `recorded` (an `identity`) names. An identity
/// recorded as an inode is compared as one: on a kernel before 5.14 the cookie only becomes
/// readable once our programs are loaded.
pub fn is_recorded(path: &Path, recorded: u64) -> bool {
    if recorded & INODE_IDENTITY != 0 {
        inode_identity(path).is_ok_and(|i| i == recorded)
    } else {
        cookie(Some(path)).is_ok_and(|c| c == recorded)
    }
}

/// Both identities of the netns at `path` a record may hold: its cookie (if readable) and its
/// inode form.
pub fn identities(path: &Path) -> Result<Vec<u64>> {
    let mut ids = vec![inode_identity(path)?];
    match cookie(Some(path)) {
        Ok(c) => ids.push(c),
        Err(e) if no_cookie(&e) => {}
        Err(e) => return Err(e),
    }
    Ok(ids)
}

/// The top bit of an identity that is an inode, not a cookie.
const INODE_IDENTITY: u64 = 1 << 63;

fn inode_identity(path: &Path) -> Result<u64> {
    let meta = std::fs::metadata(path).with_context(|| format!("stat {}", path.display()))?;
    Ok(INODE_IDENTITY | meta.ino())
}

/// Whether `e` says the netns cookie cannot be read on this kernel (as opposed to a failure).
fn no_cookie(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.raw_os_error() == Some(libc::ENOPROTOOPT))
    })
}

/// This process's own netns in words, for a loud notice: `net:[inode]`, and whether it is the
/// one PID 1 lives in (the host's, when PID 1 is the node's init).
pub fn describe_own() -> String {
    let link = |p: &str| std::fs::read_link(p).map(|l| l.display().to_string());
    match (link("/proc/self/ns/net"), link("/proc/1/ns/net")) {
        (Ok(own), Ok(init)) if own == init => format!("{own}, the same as PID 1's"),
        (Ok(own), Ok(_)) => format!("{own}, not PID 1's"),
        (Ok(own), Err(_)) => own,
        (Err(e), _) => format!("unknown: {e}"),
    }
}

/// SO_NETNS_COOKIE (Linux 5.14+) of a socket: the cookie of the netns it was created in.
pub fn socket_cookie(sock: BorrowedFd<'_>) -> std::io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: `sock` is a live fd for the call; the kernel writes at most `len` (8) bytes into
    // `cookie`, a u64 on our stack, and updates `len`, also ours.
    let r = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cookie)
}

/// The own addresses of the netns at `path` (the current one for `None`), excluding loopback
/// and link-local, in interface order.
pub fn local_addrs(path: Option<&Path>) -> Result<Vec<IpAddr>> {
    run_in(path, || Ok(own_addrs_here()?.0))
}

/// The caller's netns's own addresses: (global ones, link-local ones), neither loopback nor
/// multicast. Link-local addresses are local for outbound decisions (the route to them is
/// `lo`), but unlike global ones they are not unique across pods.
pub fn own_addrs_here() -> Result<(Vec<IpAddr>, Vec<IpAddr>)> {
    let route = crate::netlink::socket(netlink_sys::protocols::NETLINK_ROUTE)?;
    Ok(split_addrs(addresses_on(&route)?))
}

/// (global, link-local) of `addrs`, without loopback, multicast and repeats.
fn split_addrs(addrs: Vec<IpAddr>) -> (Vec<IpAddr>, Vec<IpAddr>) {
    let (mut global, mut link) = (Vec::new(), Vec::new());
    for ip in addrs {
        let link_local = interceptor_common::plan::is_link_local(ip);
        if ip.is_loopback() || ip.is_multicast() {
            continue;
        }
        let out = if link_local { &mut link } else { &mut global };
        if !out.contains(&ip) {
            out.push(ip);
        }
    }
    (global, link)
}

/// Every address of the netns of `route` (an rtnetlink socket), in the kernel's order (by
/// family, then interface), from one `RTM_GETADDR` dump. (getifaddrs(3) dumps every link first as well: a third of the cost
/// of a pod netns visit.) An address is its `IFA_LOCAL`, else `IFA_ADDRESS` (on a point-to-point
/// link `IFA_ADDRESS` is the peer), as getifaddrs reads it.
fn addresses_on(route: &netlink_sys::Socket) -> Result<Vec<IpAddr>> {
    use netlink_packet_route::address::{AddressAttribute, AddressMessage};
    use netlink_packet_route::RouteNetlinkMessage;
    let req = RouteNetlinkMessage::GetAddress(AddressMessage::default());
    let mut out = Vec::new();
    for m in crate::netlink::dump(route, req, "RTM_GETADDR")? {
        let RouteNetlinkMessage::NewAddress(a) = m else {
            continue;
        };
        let (mut local, mut address) = (None, None);
        for attr in a.attributes {
            match attr {
                AddressAttribute::Local(ip) => local = Some(ip),
                AddressAttribute::Address(ip) => address = Some(ip),
                _ => {}
            }
        }
        if let Some(ip) = local.or(address) {
            out.push(match ip {
                IpAddr::V6(v6) => v6.to_canonical(),
                v4 => v4,
            });
        }
    }
    Ok(out)
}

/// Finds network namespaces by cookie (for `cleanup`, which knows only the cookies of the
/// registered pods): named ones (`ip netns`, CNI runtimes) and every process's, each distinct
/// netns visited once.
pub fn find_by_cookie(cookies: &HashSet<u64>) -> HashMap<u64, PathBuf> {
    let mut found = HashMap::new();
    let mut seen = HashSet::new();
    let mut candidates: Vec<PathBuf> = Vec::new();
    for dir in ["/run/netns", "/var/run/netns"] {
        if let Ok(rd) = std::fs::read_dir(dir) {
            candidates.extend(rd.filter_map(|e| e.ok()).map(|e| e.path()));
        }
    }
    if let Ok(rd) = std::fs::read_dir("/proc") {
        candidates.extend(
            rd.filter_map(|e| e.ok())
                .filter(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .bytes()
                        .all(|b| b.is_ascii_digit())
                })
                .map(|e| e.path().join("ns/net")),
        );
    }
    for path in candidates {
        if found.len() == cookies.len() {
            break;
        }
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        if !seen.insert((meta.dev(), meta.ino())) || !is_netns(&path) {
            continue;
        }
        if let Ok(c) = cookie(Some(&path)) {
            if cookies.contains(&c) {
                found.insert(c, path);
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The rtnetlink dump reads the addresses getifaddrs(3) reads, in its order (this netns's:
    /// no privilege needed).
    #[test]
    fn addresses_are_those_of_getifaddrs() {
        let route = crate::netlink::socket(netlink_sys::protocols::NETLINK_ROUTE).unwrap();
        let ours = addresses_on(&route).unwrap();
        let libc: Vec<IpAddr> = nix::ifaddrs::getifaddrs()
            .unwrap()
            .filter_map(|ifa| {
                let a = ifa.address?;
                a.as_sockaddr_in()
                    .map(|a| IpAddr::from(a.ip()))
                    .or_else(|| a.as_sockaddr_in6().map(|a| a.ip().to_canonical()))
            })
            .collect();
        assert!(!ours.is_empty(), "no address at all, not even loopback");
        assert_eq!(ours, libc);
    }
}
