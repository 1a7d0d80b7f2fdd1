//! `cargo xtask bench-quick`: connect rate and 1-byte request/response through the eBPF
//! redirect vs explicit addressing vs iptables REDIRECT, measured in one run, as ratios to the
//! explicit baseline. Client and server are pinned to one CPU (cross-CPU wakeups dominate
//! otherwise, see shared/design/ebpf-datapath.md). A quick look; the full benchmark comes later.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use interceptor_tests::cases::{apply, Flavor, Pod};
use interceptor_tests::topology::run_in_netns;

const PROXY: u16 = 15101;

fn pin_cpu0() {
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set);
    }
}

/// An echo server on 0.0.0.0:PROXY in the netns, standing in for the proxy.
fn echo_server(pod: &Pod) -> Result<()> {
    let ns = pod.topo.pod_netns().to_path_buf();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let l = run_in_netns(&ns, || TcpListener::bind(("0.0.0.0", PROXY))).and_then(|r| Ok(r?));
        let l = match l {
            Ok(l) => {
                let _ = tx.send(Ok(()));
                l
            }
            Err(e) => {
                let _ = tx.send(Err(e));
                return;
            }
        };
        pin_cpu0();
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            std::thread::spawn(move || {
                pin_cpu0();
                let _ = s.set_nodelay(true);
                let mut b = [0u8; 1];
                while let Ok(1) = s.read(&mut b) {
                    if s.write_all(&b).is_err() {
                        break;
                    }
                }
            });
        }
    });
    rx.recv()?
}

struct Sample {
    conn_per_s: f64,
    rr_per_s: f64,
}

fn measure(pod: &Pod, dst: SocketAddr, secs: f64) -> Result<Sample> {
    let ns = pod.topo.pod_netns().to_path_buf();
    run_in_netns(&ns, move || -> Result<Sample> {
        pin_cpu0();
        let d = Duration::from_secs_f64(secs);
        let (start, mut n) = (Instant::now(), 0u64);
        while start.elapsed() < d {
            let mut s = TcpStream::connect(dst)?;
            s.write_all(b"x")?;
            let mut b = [0u8; 1];
            s.read_exact(&mut b)?;
            n += 1;
        }
        let conn_per_s = n as f64 / start.elapsed().as_secs_f64();
        let mut s = TcpStream::connect(dst)?;
        s.set_nodelay(true)?;
        let (start, mut m) = (Instant::now(), 0u64);
        let mut b = [0u8; 1];
        while start.elapsed() < d {
            s.write_all(b"x")?;
            s.read_exact(&mut b)?;
            m += 1;
        }
        Ok(Sample {
            conn_per_s,
            rr_per_s: m as f64 / start.elapsed().as_secs_f64(),
        })
    })?
}

pub fn run(secs: f64, rounds: usize) -> Result<()> {
    let explicit = Pod::new("bx").context("pod")?;
    let ebpf = Pod::new("be").context("pod")?;
    let ipt = Pod::new("bi").context("pod")?;
    let flags = ["-p", "15101", "-u", "1337", "-i", "*", "--ipv6", "false"];
    apply(&ebpf, Flavor::Ebpf, &flags)?;
    apply(&ipt, Flavor::IptablesNft, &flags)?;
    for p in [&explicit, &ebpf, &ipt] {
        echo_server(p)?;
    }
    let lo = SocketAddr::from(([127, 0, 0, 1], PROXY));
    let up = |p: &Pod| SocketAddr::new(p.topo.upstream_v4().into(), 8080);
    println!("{secs}s per measurement, {rounds} rounds interleaved, client+server pinned to CPU 0");
    let mut rows: Vec<(&str, Vec<Sample>)> = vec![
        ("explicit 127.0.0.1", vec![]),
        ("eBPF connect4", vec![]),
        ("iptables REDIRECT", vec![]),
    ];
    for _ in 0..rounds {
        rows[0].1.push(measure(&explicit, lo, secs)?);
        rows[1].1.push(measure(&ebpf, up(&ebpf), secs)?);
        rows[2].1.push(measure(&ipt, up(&ipt), secs)?);
    }
    let mean = |v: &[Sample], f: fn(&Sample) -> f64| v.iter().map(f).sum::<f64>() / v.len() as f64;
    let spread = |v: &[Sample], f: fn(&Sample) -> f64| {
        let (lo, hi) = v
            .iter()
            .map(f)
            .fold((f64::MAX, f64::MIN), |(a, b), x| (a.min(x), b.max(x)));
        (hi - lo) / mean(v, f) * 100.0
    };
    let (bc, br) = (
        mean(&rows[0].1, |s| s.conn_per_s),
        mean(&rows[0].1, |s| s.rr_per_s),
    );
    println!(
        "{:<20} {:>10} {:>8} {:>8} {:>10} {:>8} {:>8}",
        "path", "conn/s", "×expl", "spread", "RR/s", "×expl", "spread"
    );
    for (name, v) in &rows {
        let (c, r) = (mean(v, |s| s.conn_per_s), mean(v, |s| s.rr_per_s));
        println!(
            "{name:<20} {c:>10.0} {:>8.2} {:>7.1}% {r:>10.0} {:>8.2} {:>7.1}%",
            c / bc,
            spread(v, |s| s.conn_per_s),
            r / br,
            spread(v, |s| s.rr_per_s)
        );
    }
    for (name, v) in &rows {
        let c: Vec<String> = v.iter().map(|s| format!("{:.0}", s.conn_per_s)).collect();
        println!("  {name}: conn/s per round {}", c.join(" "));
    }
    let ct = ipt
        .topo
        .pod_exec("cat", &["/proc/sys/net/netfilter/nf_conntrack_count"], None)
        .unwrap_or_default();
    println!(
        "conntrack entries in the iptables pod afterwards: {}",
        ct.trim()
    );
    Ok(())
}
