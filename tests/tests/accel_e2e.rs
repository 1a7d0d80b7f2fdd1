//! `--accelerate` (sockops + sk_msg): correctness first. An app in a pod talks through the
//! forwarding sidecar (SO_ORIGINAL_DST, like Envoy) to an echo/sink upstream in another netns;
//! every check runs with acceleration off (the reference: plain loopback TCP) and on:
//! large transfers arrive intact and in order, many concurrent connections do not mix,
//! half-close and reset pass through, a side dying ends the connection instead of hanging it,
//! and the acceleration map empties afterwards. That data really skipped the loopback TCP
//! stack is shown by the pod's `lo` byte counter.

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use interceptor_tests::cases::{apply_in, Flavor};
use interceptor_tests::ebpf::EbpfInstall;
use interceptor_tests::forward::{
    run_client, ForwardConfig, Forwarder, LoopSpec, Upstream, UpstreamConfig,
};
use interceptor_tests::scaled;
use interceptor_tests::topology::Topology;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

/// Kernels before 5.15 (sock_ops and sk_msg without the netns cookie) refuse `--accelerate`
/// (`accelerate_is_refused_where_the_kernel_cannot_serve_it`): the transfer tests have nothing
/// to run there, and say so.
fn kernel_cannot_accelerate() -> bool {
    let cannot = !interceptor::backend::ebpf::netns_helper();
    if cannot {
        eprintln!("skipped: --accelerate needs bpf_get_netns_cookie in sock_ops (Linux 5.15)");
    }
    cannot
}

/// Where sock_ops and sk_msg cannot read the netns cookie (5.10; simulated elsewhere), eBPF
/// serves the pod but `--backend ebpf --accelerate` is refused with the reason, and `auto`
/// takes eBPF and says the flag is ignored. Nothing is applied by the refusal.
#[test]
fn accelerate_is_refused_where_the_kernel_cannot_serve_it() {
    let topo = Topology::new("accold").unwrap();
    let ebpf = EbpfInstall::new("accold");
    let ns = topo.pod_netns().to_str().unwrap().to_string();
    let dir = ebpf.dir().to_str().unwrap().to_string();
    let env = [(interceptor::fault::FAULT_ENV, "kernel:5.10")];
    let run = |backend: &str| {
        let args = [
            "apply",
            "--network-namespace",
            &ns,
            "--bpffs",
            &dir,
            "--backend",
            backend,
            "-i",
            "*",
            "--accelerate",
            "true",
        ];
        interceptor_tests::bin::run(&args, &env)
    };
    let out = run("ebpf");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("--accelerate") && err.contains("not supported on this kernel"),
        "{err}"
    );
    assert!(
        !ebpf.pins.loaded() || ebpf.pins.maps().unwrap().pods().is_empty(),
        "a refused apply registered the pod"
    );
    let out = run("auto");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("--accelerate ignored"), "{err}");
    let pods = ebpf.pins.maps().unwrap().pods();
    assert_eq!(pods.len(), 1, "auto serves the pod with eBPF: {pods:?}");
}

const ECHO: u16 = 8080;
const SINK: u16 = 8081;
const PROXY: u16 = 15001;

/// One pod with the forwarding sidecar, an upstream, and eBPF interception (accelerated or
/// not). Field order is drop order: servers first, then the installation, then the netns.
struct Rig {
    upstream: Option<Upstream>,
    fwd: Option<Forwarder>,
    ebpf: EbpfInstall,
    topo: Topology,
    accelerate: bool,
}

impl Rig {
    fn new(tag: &str, accelerate: bool) -> Result<Self> {
        let topo = Topology::new(tag)?;
        let ebpf = EbpfInstall::new(tag);
        let upstream = Upstream::start(
            &LoopSpec::new(topo.upstream_netns()),
            UpstreamConfig {
                echo_port: ECHO,
                sink_port: SINK,
            },
        )?;
        let fwd = Forwarder::start(
            &LoopSpec::new(topo.pod_netns()).creds(1337, 1337),
            ForwardConfig {
                port: PROXY,
                ..Default::default()
            },
        )?;
        let mut args = vec!["-p", "15001", "-u", "1337", "-i", "*", "--ipv6", "false"];
        if accelerate {
            args.push("--accelerate");
        }
        apply_in(topo.pod_netns(), ebpf.dir(), Flavor::Ebpf, &args)?;
        Ok(Self {
            upstream: Some(upstream),
            fwd: Some(fwd),
            ebpf,
            topo,
            accelerate,
        })
    }

    fn echo(&self) -> SocketAddr {
        SocketAddr::new(self.topo.upstream_v4().into(), ECHO)
    }

    fn sink(&self) -> SocketAddr {
        SocketAddr::new(self.topo.upstream_v4().into(), SINK)
    }

    /// The app: root (any uid but the proxy's is captured), so that the test can read the
    /// maps from inside the client.
    fn client(&self) -> LoopSpec {
        LoopSpec::new(self.topo.pod_netns())
    }

    fn accel_entries(&self) -> usize {
        self.ebpf.pins.maps().unwrap().accel_entries()
    }

    /// Bytes sent over the pod's loopback so far.
    fn lo_tx_bytes(&self) -> u64 {
        let out = self
            .topo
            .pod_exec("ip", &["-s", "-j", "link", "show", "lo"], None)
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v[0]["stats64"]["tx"]["bytes"].as_u64().unwrap()
    }

    /// Waits until no connection is open in the forwarder and, accelerated, the map is empty.
    fn settle(&self) {
        let fwd = self.fwd.as_ref().unwrap();
        let deadline = std::time::Instant::now() + scaled(Duration::from_secs(10));
        loop {
            let active = fwd.stats.active.load(Relaxed);
            let entries = self.accel_entries();
            if active == 0 && entries == 0 {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "not settled: {active} forwarded connections open, {entries} ACCEL entries"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// What the forwarder and the pod's counters saw: said when a check fails, so a reset
    /// names its cause (no original destination, an upstream failure, or a reset in the copy).
    fn diagnosis(&self) -> String {
        let st = &self.fwd.as_ref().unwrap().stats;
        let mut out = format!(
            "forwarder: {} forwarded, {} without an original destination, {} upstream connects failed, {} ended by a reset or error ({} of them ENOMEM)",
            st.forwarded.load(Relaxed),
            st.missed.load(Relaxed),
            st.failed.load(Relaxed),
            st.reset.load(Relaxed),
            st.out_of_memory.load(Relaxed)
        );
        if let Ok(maps) = self.ebpf.pins.maps() {
            for pod in 0..4 {
                let set: Vec<String> = maps
                    .counters(pod)
                    .iter()
                    .enumerate()
                    .filter(|(_, v)| **v != 0)
                    .map(|(i, v)| format!("{i}={v}"))
                    .collect();
                if !set.is_empty() {
                    out.push_str(&format!("; pod {pod} counters {}", set.join(" ")));
                }
            }
        }
        out
    }

    fn mode(&self) -> &'static str {
        if self.accelerate {
            "accelerated"
        } else {
            "plain"
        }
    }
}

/// The cases that queue tens of MiB in socket buffers take turns: run at once in a 2 GiB
/// guest they put the guest's TCP memory under pressure, which an accelerated hop turns into
/// ENOMEM on send (see `a_reader_that_stops_reading`) — a property with its own case, not
/// something the data checks should trip over by accident.
fn heavy() -> std::sync::MutexGuard<'static, ()> {
    static HEAVY: std::sync::Mutex<()> = std::sync::Mutex::new(());
    HEAVY.lock().unwrap_or_else(|e| e.into_inner())
}

/// A reproducible byte stream per seed (xorshift64*), so the reader can check every byte.
struct Pattern(u64);

impl Pattern {
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            let b = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
            chunk.copy_from_slice(&b[..chunk.len()]);
        }
    }
}

/// Sends `len` pattern bytes through the echo and checks every byte that comes back, in order
/// (writer and reader run concurrently, so large transfers exercise back-pressure).
async fn echo_verified(dst: SocketAddr, seed: u64, len: usize) -> Result<()> {
    let s = TcpStream::connect(dst).await.context("connecting")?;
    let (mut r, mut w) = s.into_split();
    let writer = async move {
        let mut p = Pattern(seed);
        let mut buf = vec![0u8; 64 * 1024];
        let mut left = len;
        while left > 0 {
            let n = left.min(buf.len()) & !7;
            let n = if n == 0 { left } else { n };
            p.fill(&mut buf[..n]);
            w.write_all(&buf[..n]).await?;
            left -= n;
        }
        w.shutdown().await?;
        anyhow::Ok(())
    };
    let reader = async move {
        let mut p = Pattern(seed);
        let mut want = vec![0u8; 64 * 1024];
        let mut got = vec![0u8; 64 * 1024];
        let mut pos = 0usize;
        // Bytes of the current want-chunk already matched (reads need not align with writes).
        let (mut chunk_len, mut chunk_off) = (0usize, 0usize);
        loop {
            let n = r.read(&mut got).await?;
            if n == 0 {
                break;
            }
            let mut i = 0;
            while i < n {
                if chunk_off == chunk_len {
                    let left = len.saturating_sub(pos);
                    ensure!(left > 0, "more bytes came back than were sent");
                    let c = left.min(want.len()) & !7;
                    chunk_len = if c == 0 { left } else { c };
                    p.fill(&mut want[..chunk_len]);
                    chunk_off = 0;
                }
                let k = (n - i).min(chunk_len - chunk_off);
                ensure!(
                    got[i..i + k] == want[chunk_off..chunk_off + k],
                    "stream {seed}: corrupted or reordered data near byte {pos}"
                );
                i += k;
                chunk_off += k;
                pos += k;
            }
        }
        ensure!(pos == len, "stream {seed}: {pos} of {len} bytes came back");
        anyhow::Ok(())
    };
    let (a, b) = tokio::join!(writer, reader);
    a.context("writing")?;
    b.context("reading")
}

#[test]
fn large_transfer_is_intact_and_skips_loopback() {
    if kernel_cannot_accelerate() {
        return;
    }
    const LEN: usize = 64 << 20;
    let _heavy = heavy();
    for accelerate in [false, true] {
        let rig = Rig::new("acbulk", accelerate).unwrap();
        let before = rig.lo_tx_bytes();
        let dst = rig.echo();
        let open_entries = run_client(&rig.client(), || async {
            // While a connection is open, both its loopback ends are in the map.
            let probe = TcpStream::connect(dst).await?;
            tokio::time::sleep(Duration::from_millis(50)).await;
            let entries = rig.accel_entries();
            drop(probe);
            timeout(scaled(Duration::from_secs(120)), echo_verified(dst, 7, LEN)).await??;
            anyhow::Ok(entries)
        })
        .unwrap();
        let lo = rig.lo_tx_bytes() - before;
        eprintln!(
            "{}: 64 MiB echoed intact; ACCEL entries with one connection open: {open_entries}; lo carried {lo} bytes",
            rig.mode()
        );
        if accelerate {
            assert_eq!(open_entries, 2, "app and proxy ends in the map");
            // Only handshakes, ACKs and FINs: the 2 × 64 MiB app↔proxy data skipped lo.
            assert!(lo < 4 << 20, "accelerated, yet lo carried {lo} bytes");
        } else {
            assert_eq!(open_entries, 0);
            assert!(
                lo >= 2 * LEN as u64,
                "plain TCP: lo carried only {lo} bytes"
            );
        }
        rig.settle();
    }
}

/// The OS error at the root of a stream's failure, if it was one.
fn os_error(e: &anyhow::Error) -> Option<i32> {
    e.chain()
        .find_map(|c| c.downcast_ref::<std::io::Error>())
        .and_then(std::io::Error::raw_os_error)
}

/// Every stream comes back intact and in order. Accelerated, a stream may instead end on the
/// hop's documented memory limit (README, `a_reader_that_stops_reading`): in a small guest the
/// 100 MiB in flight put TCP memory under pressure, and a send into a full peer then fails with
/// ENOMEM — the app's own write, or the proxy's, which resets the stream (each such reset is
/// matched by an ENOMEM the proxy saw). Anything else (wrong bytes, a timeout, a reset the
/// proxy did not make on ENOMEM, any failure without acceleration) fails the case.
#[test]
fn many_concurrent_connections_do_not_mix() {
    if kernel_cannot_accelerate() {
        return;
    }
    const N: u64 = 100;
    const LEN: usize = 1 << 20;
    let _heavy = heavy();
    for accelerate in [false, true] {
        let rig = Rig::new("acconc", accelerate).unwrap();
        let dst = rig.echo();
        let stats = rig.fwd.as_ref().unwrap().stats.clone();
        let out_of_memory = run_client(&rig.client(), || async move {
            let mut tasks = Vec::new();
            for seed in 1..=N {
                tasks.push(tokio::task::spawn_local(echo_verified(
                    dst,
                    seed * 0x9e37_79b9,
                    LEN + seed as usize,
                )));
            }
            // One deadline for all (well inside a guest's limit for the whole binary): a
            // stream that stalls is reported as such, never excused.
            let deadline = tokio::time::Instant::now() + scaled(Duration::from_secs(60));
            let (mut own, mut reset, mut failed) = (0, Vec::new(), Vec::new());
            for (seed, t) in (1..=N).zip(tasks) {
                let done = async {
                    tokio::time::timeout_at(deadline, t)
                        .await
                        .context("no end by the deadline: stalled")???;
                    anyhow::Ok(())
                };
                let Err(e) = done.await else { continue };
                match os_error(&e) {
                    Some(libc::ENOMEM) if accelerate => own += 1,
                    Some(libc::ECONNRESET | libc::EPIPE) if accelerate => {
                        reset.push(format!("stream {seed}: {e:#}"))
                    }
                    _ => failed.push(format!("stream {seed}: {e:#}")),
                }
            }
            ensure!(
                failed.is_empty(),
                "{} of {N} streams failed: {}",
                failed.len(),
                failed.join("; ")
            );
            let by_proxy = stats.out_of_memory.load(Relaxed) as usize;
            ensure!(
                reset.len() <= by_proxy,
                "{} streams reset, {by_proxy} of them by the proxy on ENOMEM: {}",
                reset.len(),
                reset.join("; ")
            );
            anyhow::Ok(own + reset.len())
        })
        .unwrap_or_else(|e| panic!("{}: {e:#}; {}", rig.mode(), rig.diagnosis()));
        eprintln!(
            "{}: {N} concurrent connections × ~1 MiB: {} echoed intact, none mixed; {out_of_memory} \
             ended by ENOMEM under TCP memory pressure",
            rig.mode(),
            N as usize - out_of_memory
        );
        rig.settle();
    }
}

#[test]
fn half_close_passes_through() {
    if kernel_cannot_accelerate() {
        return;
    }
    for accelerate in [false, true] {
        let rig = Rig::new("achalf", accelerate).unwrap();
        let (sink, echo) = (rig.sink(), rig.echo());
        run_client(&rig.client(), || async {
            // App → upstream: write, shut down writing, then read the sink's answer.
            let mut s = TcpStream::connect(sink).await?;
            let data = vec![0x5au8; 3 << 20];
            s.write_all(&data).await?;
            s.shutdown().await?;
            let mut count = [0u8; 8];
            timeout(scaled(Duration::from_secs(30)), s.read_exact(&mut count)).await??;
            ensure!(
                u64::from_be_bytes(count) == data.len() as u64,
                "sink counted {} bytes, sent {}",
                u64::from_be_bytes(count),
                data.len()
            );
            let mut rest = Vec::new();
            timeout(scaled(Duration::from_secs(30)), s.read_to_end(&mut rest)).await??;
            ensure!(rest.is_empty(), "bytes after the sink's answer");
            // Upstream → app: the echo closes after our FIN; everything arrives, then EOF.
            let mut s = TcpStream::connect(echo).await?;
            s.write_all(b"last words").await?;
            s.shutdown().await?;
            let mut back = Vec::new();
            timeout(scaled(Duration::from_secs(30)), s.read_to_end(&mut back)).await??;
            ensure!(back == b"last words", "echo after half-close: {back:?}");
            anyhow::Ok(())
        })
        .unwrap();
        rig.settle();
    }
}

#[test]
fn reset_reaches_the_proxy() {
    if kernel_cannot_accelerate() {
        return;
    }
    for accelerate in [false, true] {
        let rig = Rig::new("acrst", accelerate).unwrap();
        let echo = rig.echo();
        let fwd = rig.fwd.as_ref().unwrap();
        let resets = || fwd.stats.reset.load(Relaxed);
        let before = resets();
        run_client(&rig.client(), || async {
            let mut s = TcpStream::connect(echo).await?;
            s.write_all(b"ping").await?;
            let mut b = [0u8; 4];
            s.read_exact(&mut b).await?;
            // Unread data pending + zero linger: close sends a reset.
            s.write_all(b"unanswered").await?;
            s.set_zero_linger()?;
            drop(s);
            anyhow::Ok(())
        })
        .unwrap();
        rig.settle();
        assert!(
            resets() > before,
            "{}: the proxy never saw the app's reset",
            rig.mode()
        );
    }
}

#[test]
fn a_side_dying_ends_the_connection() {
    if kernel_cannot_accelerate() {
        return;
    }
    for accelerate in [false, true] {
        // The upstream goes away mid-stream; then the proxy does.
        for victim in ["upstream", "proxy"] {
            let mut rig = Rig::new("acdie", accelerate).unwrap();
            let echo = rig.echo();
            let (tx, rx) = std::sync::mpsc::channel::<()>();
            let (done_tx, done_rx) = std::sync::mpsc::channel::<Result<usize>>();
            let spec = rig.client();
            std::thread::scope(|sc| {
                sc.spawn(|| {
                    let r = run_client(&spec, || async {
                        let mut s = TcpStream::connect(echo).await?;
                        s.write_all(b"hello").await?;
                        let mut b = [0u8; 5];
                        s.read_exact(&mut b).await?;
                        tx.send(()).unwrap();
                        // Now blocked reading while the other side dies: must end, not hang.
                        let mut rest = Vec::new();
                        let r = timeout(scaled(Duration::from_secs(20)), s.read_to_end(&mut rest))
                            .await
                            .context("still open 20 s after the peer died")?;
                        // EOF or reset are both an end.
                        anyhow::Ok(r.unwrap_or(0))
                    });
                    done_tx.send(r).unwrap();
                });
                rx.recv().unwrap();
                match victim {
                    "upstream" => drop(rig.upstream.take()),
                    _ => drop(rig.fwd.take()),
                }
                let r = done_rx.recv().unwrap();
                assert!(r.is_ok(), "{} / {victim} died: {r:?}", rig.mode());
            });
            if rig.fwd.is_some() {
                rig.settle();
            }
            let deadline = std::time::Instant::now() + scaled(Duration::from_secs(10));
            while rig.accel_entries() != 0 {
                assert!(
                    std::time::Instant::now() < deadline,
                    "ACCEL entries left after the {victim} died"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// A reader that stops reading: plain TCP holds the writer back (the receive window, then the
/// proxy's own socket buffers); an accelerated hop does not, because `sk_msg` hands each message
/// to the peer's receive queue without a window. This pins the limit README and SECURITY.md
/// state: the writer either queues everything (kernel memory charged to the reader's socket) or,
/// under TCP memory pressure, a write into the full queue fails with ENOMEM and the connection
/// ends (the app's own write, or the proxy's, which then resets it).
#[test]
fn a_reader_that_stops_reading() {
    if kernel_cannot_accelerate() {
        return;
    }
    const CAP: usize = 128 << 20;
    let _heavy = heavy();
    for accelerate in [false, true] {
        let rig = Rig::new("acslow", accelerate).unwrap();
        let dst = rig.echo();
        // The app writes to the echo and never reads its answers.
        let (written, error) = run_client(&rig.client(), || async {
            let mut s = TcpStream::connect(dst).await?;
            let buf = vec![0x5au8; 1 << 20];
            let mut total = 0;
            while total < CAP {
                match timeout(scaled(Duration::from_secs(2)), s.write_all(&buf)).await {
                    Ok(Ok(())) => total += buf.len(),
                    Ok(Err(e)) => return anyhow::Ok((total, Some(e))),
                    Err(_) => break,
                }
            }
            anyhow::Ok((total, None))
        })
        .unwrap();
        eprintln!(
            "{}: the app wrote {} MiB without reading{}",
            rig.mode(),
            written >> 20,
            error
                .as_ref()
                .map(|e| format!(", then: {e}"))
                .unwrap_or_default()
        );
        if accelerate {
            match error.as_ref().and_then(|e| e.raw_os_error()) {
                None => assert_eq!(written, CAP, "held back at {written} bytes"),
                // The app's own write into a full node.
                Some(libc::ENOMEM) => {}
                // The proxy's write of the answers got ENOMEM and it reset the connection.
                Some(libc::ECONNRESET | libc::EPIPE) => assert!(
                    rig.fwd.as_ref().unwrap().stats.reset.load(Relaxed) > 0,
                    "the connection ended with no reset by the proxy: {}",
                    rig.diagnosis()
                ),
                Some(_) => panic!("{error:?}; {}", rig.diagnosis()),
            }
        } else {
            assert!(error.is_none(), "plain TCP: {error:?}");
            assert!(written < 64 << 20, "plain TCP did not hold the writer back");
        }
        rig.settle();
    }
}
