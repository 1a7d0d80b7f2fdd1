//! The client side of every measurement: one tokio loop in the client's netns (pinned or not),
//! timing connects, 1-byte request/response and bulk transfers, with the process's CPU time
//! (client, sidecar and servers are all threads of this process) per transaction.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use interceptor_tests::forward::{run_client, LoopSpec};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// CPU time (user + system) of this whole process so far, in microseconds.
pub fn cpu_micros() -> f64 {
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let us = |t: libc::timeval| t.tv_sec as f64 * 1e6 + t.tv_usec as f64;
    us(ru.ru_utime) + us(ru.ru_stime)
}

/// Connections per second (connect, 1 byte each way, close) and CPU µs per connection.
pub fn conn_rate(client: &LoopSpec, dst: SocketAddr, secs: f64) -> Result<(f64, f64)> {
    run_client(client, || async move {
        let d = Duration::from_secs_f64(secs);
        let (cpu0, start) = (cpu_micros(), Instant::now());
        let mut n = 0u64;
        let mut b = [0u8; 1];
        while start.elapsed() < d {
            let mut s = TcpStream::connect(dst).await?;
            s.write_all(b"x").await?;
            s.read_exact(&mut b).await?;
            n += 1;
        }
        let el = start.elapsed().as_secs_f64();
        Ok((n as f64 / el, (cpu_micros() - cpu0) / n as f64))
    })
}

/// Request/response latency over `conc` connections for `secs`.
#[derive(Debug, Clone, Copy)]
pub struct Rr {
    pub p50_us: f64,
    pub p99_us: f64,
    pub per_s: f64,
    pub cpu_us: f64,
}

pub fn rr(client: &LoopSpec, dst: SocketAddr, conc: usize, secs: f64) -> Result<Rr> {
    run_client(client, || async move {
        let d = Duration::from_secs_f64(secs);
        let mut conns = Vec::new();
        for _ in 0..conc {
            let s = TcpStream::connect(dst).await?;
            s.set_nodelay(true)?;
            conns.push(s);
        }
        let (cpu0, start) = (cpu_micros(), Instant::now());
        let tasks: Vec<_> = conns
            .into_iter()
            .map(|mut s| {
                tokio::task::spawn_local(async move {
                    let mut lat = Vec::with_capacity(65536);
                    let mut b = [0u8; 1];
                    while start.elapsed() < d {
                        let t = Instant::now();
                        s.write_all(b"x").await?;
                        s.read_exact(&mut b).await?;
                        lat.push(t.elapsed().as_nanos() as u64);
                    }
                    anyhow::Ok(lat)
                })
            })
            .collect();
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await??);
        }
        let el = start.elapsed().as_secs_f64();
        ensure!(!all.is_empty(), "no request completed");
        let cpu = cpu_micros() - cpu0;
        all.sort_unstable();
        let pct = |p: f64| all[((all.len() - 1) as f64 * p) as usize] as f64 / 1000.0;
        Ok(Rr {
            p50_us: pct(0.50),
            p99_us: pct(0.99),
            per_s: all.len() as f64 / el,
            cpu_us: cpu / all.len() as f64,
        })
    })
}

/// Bulk throughput in MiB/s: write for `secs` to a sink, which answers how much it got.
pub fn bulk(client: &LoopSpec, dst: SocketAddr, secs: f64) -> Result<f64> {
    run_client(client, || async move {
        let d = Duration::from_secs_f64(secs);
        let mut s = TcpStream::connect(dst).await?;
        let buf = vec![0x42u8; 256 * 1024];
        let start = Instant::now();
        while start.elapsed() < d {
            s.write_all(&buf).await?;
        }
        s.shutdown().await?;
        let mut n = [0u8; 8];
        s.read_exact(&mut n).await?;
        Ok(u64::from_be_bytes(n) as f64 / (1 << 20) as f64 / start.elapsed().as_secs_f64())
    })
}
