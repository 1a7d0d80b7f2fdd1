//! A lean forwarding sidecar and an upstream for traffic that must carry data end to end (the
//! acceleration tests, the benchmark): Envoy's original-dst cluster in miniature. Each runs one
//! tokio event loop on its own thread inside a test netns (optionally pinned to a CPU), so a
//! connection costs an accept and a task, not a thread.
//!
//! - [`Forwarder`]: accepts on `0.0.0.0:<port>`, reads `SO_ORIGINAL_DST` (outbound) or, for
//!   inbound captured by sk_lookup, the accepted socket's own local address, connects there and
//!   copies both ways; a half-close is passed on as a half-close, a reset as a reset. Without
//!   an original destination it uses its fallback (explicit addressing) or closes the
//!   connection and counts it as `missed`.
//! - [`Upstream`]: an echo port (request/response, data integrity) and a sink port (bulk: reads
//!   to EOF, answers the byte count as 8 bytes big-endian).

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;

use anyhow::{anyhow, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::oneshot;

use crate::sidecar::original_dst;
use crate::topology::{enter_netns, set_thread_creds};

/// Pins the calling thread to one CPU (the benchmark keeps client, proxy and server on one CPU:
/// cross-CPU wakeups would otherwise dominate what it measures).
pub fn pin_to_cpu(cpu: usize) {
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set);
    }
}

/// Where and as whom an event loop runs.
#[derive(Debug, Clone)]
pub struct LoopSpec {
    pub netns: PathBuf,
    /// Thread credentials (the proxy's 1337 keeps its own connections from being redirected).
    pub creds: Option<(u32, u32)>,
    pub cpu: Option<usize>,
}

impl LoopSpec {
    pub fn new(netns: &Path) -> Self {
        Self {
            netns: netns.to_path_buf(),
            creds: None,
            cpu: None,
        }
    }
    pub fn creds(mut self, uid: u32, gid: u32) -> Self {
        self.creds = Some((uid, gid));
        self
    }
    pub fn cpu(mut self, cpu: Option<usize>) -> Self {
        self.cpu = cpu;
        self
    }

    /// Sets up the calling thread per this spec and builds its current-thread runtime.
    fn enter(&self) -> Result<tokio::runtime::Runtime> {
        enter_netns(&self.netns)?;
        if let Some((uid, gid)) = self.creds {
            set_thread_creds(uid, gid)?;
        }
        if let Some(cpu) = self.cpu {
            pin_to_cpu(cpu);
        }
        Ok(tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()?)
    }
}

/// One single-threaded tokio runtime on a thread set up per [`LoopSpec`], running the future
/// `setup` returns until dropped. Dropping it cancels every task (closing their sockets).
struct EventLoop {
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl EventLoop {
    /// `setup` runs on the loop (inside the netns, with the credentials) and returns the
    /// bound address and the serving future.
    fn start<S, F>(spec: &LoopSpec, name: &str, setup: S) -> Result<(Self, SocketAddr)>
    where
        S: FnOnce() -> Result<(SocketAddr, F)> + Send + 'static,
        F: Future<Output = ()> + 'static,
    {
        let spec = spec.clone();
        let (ready_tx, ready_rx) = mpsc::channel();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let prepared = (|| -> Result<_> {
                    let rt = spec.enter()?;
                    let (addr, serve) = {
                        let _guard = rt.enter();
                        setup()?
                    };
                    Ok((rt, addr, serve))
                })();
                let (rt, addr, serve) = match prepared {
                    Ok(p) => p,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(addr));
                tokio::task::LocalSet::new().block_on(&rt, async move {
                    tokio::select! {
                        _ = serve => {}
                        _ = stop_rx => {}
                    }
                });
            })
            .context("spawning an event loop thread")?;
        let addr = ready_rx
            .recv()
            .map_err(|_| anyhow!("event loop {name} died during setup"))??;
        Ok((
            Self {
                stop: Some(stop_tx),
                thread: Some(thread),
            },
            addr,
        ))
    }
}

impl Drop for EventLoop {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn listen(port: u16) -> Result<TcpListener> {
    let s = TcpSocket::new_v4()?;
    s.set_reuseaddr(true)?;
    s.bind(SocketAddr::from(([0, 0, 0, 0], port)))
        .with_context(|| format!("binding 0.0.0.0:{port}"))?;
    Ok(s.listen(1024)?)
}

/// What a [`Forwarder`] did.
#[derive(Debug, Default)]
pub struct ForwardStats {
    /// Connections open now (accepted and not yet finished).
    pub active: AtomicUsize,
    /// Connections forwarded to their destination.
    pub forwarded: AtomicU64,
    /// Connections closed because no original destination was known and there is no fallback.
    pub missed: AtomicU64,
    /// Connections whose upstream connect failed.
    pub failed: AtomicU64,
    /// Connections that ended with a reset or error on either side.
    pub reset: AtomicU64,
    /// Of those, the ones whose error was ENOMEM (a send into a socket the kernel could not
    /// charge more memory to: an accelerated hop under TCP memory pressure).
    pub out_of_memory: AtomicU64,
}

/// How a [`Forwarder`] finds and reaches the destination.
#[derive(Debug, Clone, Copy, Default)]
pub struct ForwardConfig {
    pub port: u16,
    /// Used when the connection has no original destination (the app addressed the proxy).
    pub fallback: Option<SocketAddr>,
    /// Source address for upstream connections (Envoy binds 127.0.0.6 for inbound).
    pub bind_src: Option<IpAddr>,
}

/// The forwarding sidecar; stops when dropped.
pub struct Forwarder {
    pub stats: Arc<ForwardStats>,
    pub addr: SocketAddr,
    _loop: EventLoop,
}

impl Forwarder {
    pub fn start(spec: &LoopSpec, cfg: ForwardConfig) -> Result<Self> {
        let stats = Arc::new(ForwardStats::default());
        let st = stats.clone();
        let (ev, addr) = EventLoop::start(spec, &format!("fwd-{}", cfg.port), move || {
            let l = listen(cfg.port)?;
            let addr = l.local_addr()?;
            Ok((addr, serve_forward(l, cfg, st)))
        })?;
        Ok(Self {
            stats,
            addr,
            _loop: ev,
        })
    }
}

async fn serve_forward(l: TcpListener, cfg: ForwardConfig, stats: Arc<ForwardStats>) {
    loop {
        let Ok((client, _)) = l.accept().await else {
            continue;
        };
        let stats = stats.clone();
        tokio::task::spawn_local(async move {
            stats.active.fetch_add(1, Ordering::Relaxed);
            forward_one(client, cfg, &stats).await;
            stats.active.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

/// The destination of an accepted connection: SO_ORIGINAL_DST, else the socket's own local
/// address when it is not the proxy's port (sk_lookup inbound keeps it), else the fallback.
fn destination(client: &TcpStream, cfg: &ForwardConfig) -> Option<SocketAddr> {
    let local = client.local_addr().ok()?;
    if let Some(d) = original_dst(client, local.is_ipv4()) {
        if d != local {
            return Some(d);
        }
    }
    if local.port() != cfg.port {
        return Some(local);
    }
    cfg.fallback
}

async fn forward_one(mut client: TcpStream, cfg: ForwardConfig, stats: &ForwardStats) {
    let Some(dst) = destination(&client, &cfg) else {
        stats.missed.fetch_add(1, Ordering::Relaxed);
        let _ = client.set_zero_linger();
        return;
    };
    let up = async {
        let s = if dst.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        if let Some(src) = cfg.bind_src {
            s.bind(SocketAddr::new(src, 0))?;
        }
        s.connect(dst).await
    };
    let mut up = match up.await {
        Ok(u) => u,
        Err(_) => {
            stats.failed.fetch_add(1, Ordering::Relaxed);
            let _ = client.set_zero_linger();
            return;
        }
    };
    let _ = client.set_nodelay(true);
    let _ = up.set_nodelay(true);
    stats.forwarded.fetch_add(1, Ordering::Relaxed);
    // copy_bidirectional passes each EOF on as a write shutdown (half-close); an error (a
    // reset on one side) ends both, and a zero linger makes the close a reset too.
    if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut up).await {
        stats.reset.fetch_add(1, Ordering::Relaxed);
        if e.raw_os_error() == Some(libc::ENOMEM) {
            stats.out_of_memory.fetch_add(1, Ordering::Relaxed);
        }
        let _ = client.set_zero_linger();
        let _ = up.set_zero_linger();
    }
}

/// Upstream ports.
#[derive(Debug, Clone, Copy)]
pub struct UpstreamConfig {
    pub echo_port: u16,
    pub sink_port: u16,
}

/// Echo and sink servers; stop when dropped.
pub struct Upstream {
    _echo: EventLoop,
    _sink: EventLoop,
}

impl Upstream {
    pub fn start(spec: &LoopSpec, cfg: UpstreamConfig) -> Result<Self> {
        let (echo, _) = EventLoop::start(spec, "echo", move || {
            let l = listen(cfg.echo_port)?;
            Ok((l.local_addr()?, serve(l, echo_one)))
        })?;
        let (sink, _) = EventLoop::start(spec, "sink", move || {
            let l = listen(cfg.sink_port)?;
            Ok((l.local_addr()?, serve(l, sink_one)))
        })?;
        Ok(Self {
            _echo: echo,
            _sink: sink,
        })
    }
}

async fn serve<F, Fut>(l: TcpListener, handler: F)
where
    F: Fn(TcpStream) -> Fut + Copy + 'static,
    Fut: Future<Output = ()> + 'static,
{
    loop {
        if let Ok((s, _)) = l.accept().await {
            let _ = s.set_nodelay(true);
            tokio::task::spawn_local(handler(s));
        }
    }
}

async fn echo_one(mut s: TcpStream) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if s.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}

async fn sink_one(mut s: TcpStream) {
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        match s.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => total += n as u64,
            Err(_) => return,
        }
    }
    let _ = s.write_all(&total.to_be_bytes()).await;
}

/// Runs `f` on a current-thread tokio runtime on a thread set up per `spec` (the client side
/// of tests and benchmarks), returning its result.
pub fn run_client<T, F, Fut>(spec: &LoopSpec, f: F) -> Result<T>
where
    F: FnOnce() -> Fut + Send,
    Fut: Future<Output = Result<T>>,
    T: Send,
{
    std::thread::scope(|sc| {
        let h = std::thread::Builder::new()
            .name("client".into())
            .spawn_scoped(sc, || -> Result<T> {
                let rt = spec.enter()?;
                let local = tokio::task::LocalSet::new();
                local.block_on(&rt, f())
            })
            .context("spawning the client thread")?;
        match h.join() {
            Ok(r) => r,
            Err(p) => std::panic::resume_unwind(p),
        }
    })
}
