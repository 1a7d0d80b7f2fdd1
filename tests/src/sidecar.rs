//! Test servers running as threads inside a [`Topology`] namespace: the **sidecar** (stand-in
//! for Envoy's outbound 15001 / inbound 15006 listeners, as uid 1337), the **upstream** server
//! and the pod's **app** server. Each answers every connection with one line
//! `"<tag>:<listener port>\n"`, closes it, and records what it saw, including the
//! `SO_ORIGINAL_DST` the interception left on the socket.

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc, Arc, Mutex,
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{anyhow, Context, Result};
use nix::sys::socket::{self as sock, sockopt, AddressFamily, SockFlag, SockType};

use crate::topology::{enter_netns, set_thread_creds, sockaddr_in6_to, sockaddr_in_to, Topology};

/// One connection accepted by a [`TagServer`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The port of the listener that accepted it (e.g. 15001 or 15006 for the sidecar).
    pub listener_port: u16,
    /// The client's address (`getpeername` of the accepted socket).
    pub peer: SocketAddr,
    /// The accepted socket's local address (e.g. 127.0.0.1:15001 after an iptables REDIRECT).
    pub local: SocketAddr,
    /// `SO_ORIGINAL_DST` (v4) / `IP6T_SO_ORIGINAL_DST` (v6): the destination before NAT, from
    /// conntrack. None when the lookup fails (no conntrack entry, e.g. no NAT rules loaded in
    /// the namespace); equal to `local` for a tracked but un-NATed connection.
    pub original_dst: Option<SocketAddr>,
}

/// A threaded server in one namespace, listening on `0.0.0.0:<port>` and `[::]:<port>`
/// (v6-only) for each port, replying `"<tag>:<port>\n"` and recording each connection.
/// Stopped (listeners shut down and closed, thread joined) on drop.
#[derive(Debug)]
pub struct TagServer {
    tag: String,
    ports: Vec<u16>,
    records: Arc<Mutex<Vec<Record>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl TagServer {
    /// Starts the server in the namespace at `netns`; returns once every listener is bound.
    /// With `creds = Some((uid, gid))` the server thread (and so its listening sockets) takes
    /// those credentials, changed for that thread only.
    pub fn spawn(
        netns: &Path,
        tag: &str,
        ports: &[u16],
        creds: Option<(u32, u32)>,
    ) -> Result<Self> {
        let records = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = mpsc::channel();
        let (netns_owned, tag_owned, ports_owned): (PathBuf, String, Vec<u16>) =
            (netns.to_path_buf(), tag.to_string(), ports.to_vec());
        let (rec, stp) = (records.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name(format!("srv-{tag}"))
            .spawn(move || {
                let setup = || -> Result<Vec<(u16, TcpListener)>> {
                    enter_netns(&netns_owned)?;
                    if let Some((uid, gid)) = creds {
                        set_thread_creds(uid, gid)?;
                    }
                    let mut listeners = Vec::new();
                    for &port in &ports_owned {
                        listeners.push((
                            port,
                            listen(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)))?,
                        ));
                        listeners.push((
                            port,
                            listen(SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)))?,
                        ));
                    }
                    Ok(listeners)
                };
                match setup() {
                    Ok(listeners) => {
                        let _ = ready_tx.send(Ok(()));
                        serve(&listeners, &tag_owned, &rec, &stp);
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            })
            .context("spawning server thread")?;
        let ready = ready_rx
            .recv()
            .map_err(|_| anyhow!("server thread {tag} died during setup"))
            .and_then(|r| r);
        let server = TagServer {
            tag: tag.to_string(),
            ports: ports.to_vec(),
            records,
            stop,
            thread: Some(thread),
        };
        ready.with_context(|| format!("starting {tag} server in {}", netns.display()))?;
        Ok(server)
    }

    /// The upstream server: tag `"upstream"`, in `topo`'s upstream namespace, on `port`
    /// (answers on every upstream address, including the "excluded" ones).
    pub fn upstream(topo: &Topology, port: u16) -> Result<Self> {
        Self::spawn(topo.upstream_netns(), "upstream", &[port], None)
    }

    /// The pod's application server: tag `"app"`, in `topo`'s pod namespace, on `port`
    /// (the target of inbound tests).
    pub fn app(topo: &Topology, port: u16) -> Result<Self> {
        Self::spawn(topo.pod_netns(), "app", &[port], None)
    }

    /// The reply tag.
    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// The listening ports.
    pub fn ports(&self) -> &[u16] {
        &self.ports
    }

    /// All records so far (in accept order). A record is stored before the reply is sent, so
    /// once a client has read its reply the record is visible.
    pub fn records(&self) -> Vec<Record> {
        self.records
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The records of connections accepted on `port`.
    pub fn records_on(&self, port: u16) -> Vec<Record> {
        self.records()
            .into_iter()
            .filter(|r| r.listener_port == port)
            .collect()
    }

    /// Returns and forgets all records so far.
    pub fn take_records(&self) -> Vec<Record> {
        std::mem::take(&mut *self.records.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl Drop for TagServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            // The thread's namespace reference goes with it, so the namespace can be freed.
            let _ = t.join();
        }
    }
}

/// A bound, listening, non-blocking socket; `[::]` is v6-only so v4 and v6 can share a port.
fn listen(addr: SocketAddr) -> Result<TcpListener> {
    let family = if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd = sock::socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)
        .with_context(|| format!("socket for {addr}"))?;
    sock::setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    if addr.is_ipv6() {
        sock::setsockopt(&fd, sockopt::Ipv6V6Only, &true)?;
    }
    let sa = sock::SockaddrStorage::from(addr);
    sock::bind(fd.as_raw_fd(), &sa).with_context(|| format!("bind {addr}"))?;
    sock::listen(&fd, sock::Backlog::new(127)?).with_context(|| format!("listen {addr}"))?;
    let listener = TcpListener::from(fd);
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// The accept loop: poll all listeners (100 ms ticks, to notice `stop`), answer each
/// connection synchronously.
fn serve(
    listeners: &[(u16, TcpListener)],
    tag: &str,
    records: &Mutex<Vec<Record>>,
    stop: &AtomicBool,
) {
    let mut pfds: Vec<libc::pollfd> = listeners
        .iter()
        .map(|(_, l)| libc::pollfd {
            fd: l.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: `pfds` is a valid array of pollfd of the given length.
        let r = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, 100) };
        if r <= 0 {
            continue;
        }
        for (pfd, (port, listener)) in pfds.iter().zip(listeners) {
            if pfd.revents == 0 {
                continue;
            }
            while let Ok((stream, peer)) = listener.accept() {
                if let Err(e) = answer(stream, peer, *port, tag, records) {
                    eprintln!("{tag} server: {e:#}");
                }
            }
        }
    }
    // Stopped means gone, as when a proxy process dies. Closing our fd is not enough: a child
    // another test thread forks at that moment (every `connect_with` forks) holds a copy of the
    // listener until it closes its fds, and a connection arriving meanwhile is completed into
    // the backlog and reset when the copy goes (ECONNRESET where the caller wants
    // ECONNREFUSED). shutdown() takes the socket out of LISTEN whoever else holds it.
    for (_, listener) in listeners {
        let _ = sock::shutdown(listener.as_raw_fd(), sock::Shutdown::Both);
    }
}

fn answer(
    mut stream: TcpStream,
    peer: SocketAddr,
    port: u16,
    tag: &str,
    records: &Mutex<Vec<Record>>,
) -> Result<()> {
    use std::io::Write;
    stream.set_nonblocking(false)?;
    stream.set_write_timeout(Some(Duration::from_secs(1)))?;
    let local = stream.local_addr()?;
    records
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(Record {
            listener_port: port,
            peer,
            local,
            original_dst: original_dst(&stream, local.is_ipv4()),
        });
    stream.write_all(format!("{tag}:{port}\n").as_bytes())?;
    // Dropping closes: the client sees the line, then EOF.
    Ok(())
}

/// `getsockopt(SOL_IP, SO_ORIGINAL_DST)` or `getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST)`.
pub fn original_dst<F: std::os::fd::AsFd>(stream: &F, v4: bool) -> Option<SocketAddr> {
    if v4 {
        sock::getsockopt(stream, sockopt::OriginalDst)
            .ok()
            .map(|sin| sockaddr_in_to(&sin).into())
    } else {
        sock::getsockopt(stream, sockopt::Ip6tOriginalDst)
            .ok()
            .map(|sin6| sockaddr_in6_to(&sin6).into())
    }
}

/// Ports and credentials of a [`Sidecar`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SidecarConfig {
    /// Outbound listener (Istio's `--envoy-port`, 15001).
    pub outbound_port: u16,
    /// Inbound listener (Istio's `--inbound-capture-port`, 15006).
    pub inbound_port: u16,
    /// uid/gid of the listener thread (Istio's proxy uid/gid 1337); None keeps root.
    pub creds: Option<(u32, u32)>,
}

impl Default for SidecarConfig {
    fn default() -> Self {
        SidecarConfig {
            outbound_port: 15001,
            inbound_port: 15006,
            creds: Some((1337, 1337)),
        }
    }
}

/// The test proxy in the pod namespace: tag `"sidecar"`, listening on the outbound and inbound
/// ports (v4 and v6) as uid/gid 1337 by default. It does not forward anything; it records.
#[derive(Debug)]
pub struct Sidecar {
    config: SidecarConfig,
    server: TagServer,
}

impl Sidecar {
    /// Starts the default sidecar (15001/15006, uid/gid 1337) in `topo`'s pod namespace.
    pub fn start(topo: &Topology) -> Result<Self> {
        Self::with_config(topo.pod_netns(), SidecarConfig::default())
    }

    /// Starts a sidecar with `config` in the namespace at `netns`.
    pub fn with_config(netns: &Path, config: SidecarConfig) -> Result<Self> {
        let ports = [config.outbound_port, config.inbound_port];
        let server = TagServer::spawn(netns, "sidecar", &ports, config.creds)?;
        Ok(Sidecar { config, server })
    }

    /// Its configuration.
    pub fn config(&self) -> SidecarConfig {
        self.config
    }

    /// All records (both listeners).
    pub fn records(&self) -> Vec<Record> {
        self.server.records()
    }

    /// Records of the outbound listener.
    pub fn outbound(&self) -> Vec<Record> {
        self.server.records_on(self.config.outbound_port)
    }

    /// Records of the inbound listener.
    pub fn inbound(&self) -> Vec<Record> {
        self.server.records_on(self.config.inbound_port)
    }

    /// Returns and forgets all records so far.
    pub fn take_records(&self) -> Vec<Record> {
        self.server.take_records()
    }

    /// The underlying server.
    pub fn server(&self) -> &TagServer {
        &self.server
    }
}
