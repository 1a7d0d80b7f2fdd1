//! `cargo xtask bench-quick`: connect rate and 1-byte request/response, outbound (eBPF connect4
//! with and without per-pod counters vs explicit addressing vs iptables REDIRECT) and inbound
//! (sk_lookup vs iptables REDIRECT vs dialing the proxy port directly), measured in one run,
//! interleaved round by round, as ratios to the same run's baseline. Client and server are
//! pinned to one CPU (cross-CPU wakeups dominate otherwise, see shared/design/ebpf-datapath.md).
//! A quick look; the full benchmark is a later milestone.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use interceptor_tests::cases::{apply, Flavor, Pod};
use interceptor_tests::topology::{enter_netns, run_in_netns, set_thread_creds};

/// The stand-in proxy's outbound port (the test sidecar holds 15001/15006 already).
const OUT: u16 = 15101;
/// Its inbound port.
const IN: u16 = 15106;
/// The app port inbound connections are addressed to.
const APP: u16 = 9180;

fn pin_cpu0() {
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set);
    }
}

/// An echo server on 0.0.0.0:port in the netns, as the proxy uid (so an eBPF pod's sockops
/// registers it as the inbound listener).
fn echo_server(netns: PathBuf, port: u16) -> Result<()> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let l = enter_netns(&netns)
            .and_then(|_| set_thread_creds(1337, 1337))
            .and_then(|_| Ok(TcpListener::bind(("0.0.0.0", port))?));
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

#[derive(Clone, Copy)]
struct Sample {
    conn_per_s: f64,
    rr_per_s: f64,
}

/// Connect+1 byte+close rate, then 1-byte RR on one connection, from `netns` to `dst`.
fn measure(netns: PathBuf, dst: SocketAddr, secs: f64) -> Result<Sample> {
    run_in_netns(&netns, move || -> Result<Sample> {
        pin_cpu0();
        let d = Duration::from_secs_f64(secs);
        let (start, mut n) = (Instant::now(), 0u64);
        let mut b = [0u8; 1];
        while start.elapsed() < d {
            let mut s = TcpStream::connect(dst)?;
            s.write_all(b"x")?;
            s.read_exact(&mut b)?;
            n += 1;
        }
        let conn_per_s = n as f64 / start.elapsed().as_secs_f64();
        let mut s = TcpStream::connect(dst)?;
        s.set_nodelay(true)?;
        let (start, mut m) = (Instant::now(), 0u64);
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

struct Path {
    name: &'static str,
    netns: PathBuf,
    dst: SocketAddr,
    samples: Vec<Sample>,
}

fn table(title: &str, rows: &[Path]) {
    let mean = |v: &[Sample], f: fn(&Sample) -> f64| v.iter().map(f).sum::<f64>() / v.len() as f64;
    let spread = |v: &[Sample], f: fn(&Sample) -> f64| {
        let (lo, hi) = v
            .iter()
            .map(f)
            .fold((f64::MAX, f64::MIN), |(a, b), x| (a.min(x), b.max(x)));
        (hi - lo) / mean(v, f) * 100.0
    };
    let (bc, br) = (
        mean(&rows[0].samples, |s| s.conn_per_s),
        mean(&rows[0].samples, |s| s.rr_per_s),
    );
    println!("\n{title}");
    println!(
        "{:<24} {:>9} {:>7} {:>8} {:>9} {:>7} {:>8}",
        "path", "conn/s", "×base", "min-max", "RR/s", "×base", "min-max"
    );
    for p in rows {
        let (c, r) = (
            mean(&p.samples, |s| s.conn_per_s),
            mean(&p.samples, |s| s.rr_per_s),
        );
        println!(
            "{:<24} {c:>9.0} {:>7.2} {:>7.1}% {r:>9.0} {:>7.2} {:>7.1}%",
            p.name,
            c / bc,
            spread(&p.samples, |s| s.conn_per_s),
            r / br,
            spread(&p.samples, |s| s.rr_per_s)
        );
    }
    for p in rows {
        let c: Vec<String> = p
            .samples
            .iter()
            .map(|s| format!("{:.0}", s.conn_per_s))
            .collect();
        println!("  {}: conn/s per round {}", p.name, c.join(" "));
    }
}

pub fn run(secs: f64, rounds: usize) -> Result<()> {
    let plain = Pod::new("bx").context("pod")?;
    let ebpf = Pod::new("be").context("pod")?;
    let nocount = Pod::new("bn").context("pod")?;
    let ipt = Pod::new("bi").context("pod")?;
    let (o, i) = (OUT.to_string(), IN.to_string());
    let flags = [
        "-p", &o, "-z", &i, "-u", "1337", "-i", "*", "-b", "*", "--ipv6", "false",
    ];
    apply(&ebpf, Flavor::Ebpf, &flags)?;
    let mut nc = flags.to_vec();
    nc.push("--no-counters");
    apply(&nocount, Flavor::Ebpf, &nc)?;
    apply(&ipt, Flavor::IptablesNft, &flags)?;
    for p in [&plain, &ebpf, &nocount, &ipt] {
        echo_server(p.topo.pod_netns().to_path_buf(), OUT)?;
        echo_server(p.topo.pod_netns().to_path_buf(), IN)?;
    }
    let up = |p: &Pod| SocketAddr::new(p.topo.upstream_v4().into(), 8080);
    let pod_at = |p: &Pod, port| SocketAddr::new(p.topo.pod_v4().into(), port);
    let path = |name, netns: &std::path::Path, dst| Path {
        name,
        netns: netns.to_path_buf(),
        dst,
        samples: vec![],
    };
    let mut out = vec![
        path(
            "explicit 127.0.0.1",
            plain.topo.pod_netns(),
            SocketAddr::from(([127, 0, 0, 1], OUT)),
        ),
        path("eBPF connect4", ebpf.topo.pod_netns(), up(&ebpf)),
        path("eBPF, counters off", nocount.topo.pod_netns(), up(&nocount)),
        path("iptables REDIRECT", ipt.topo.pod_netns(), up(&ipt)),
    ];
    let mut inb = vec![
        path(
            "direct to proxy port",
            plain.topo.upstream_netns(),
            pod_at(&plain, IN),
        ),
        path(
            "eBPF sk_lookup",
            ebpf.topo.upstream_netns(),
            pod_at(&ebpf, APP),
        ),
        path(
            "iptables REDIRECT",
            ipt.topo.upstream_netns(),
            pod_at(&ipt, APP),
        ),
    ];
    println!("{secs}s per measurement, {rounds} rounds interleaved, client+server pinned to CPU 0");
    for _ in 0..rounds {
        for p in out.iter_mut().chain(inb.iter_mut()) {
            p.samples.push(measure(p.netns.clone(), p.dst, secs)?);
        }
    }
    table("outbound (app → upstream, captured to the proxy)", &out);
    table("inbound (client → pod, captured to the proxy)", &inb);
    let ct = ipt
        .topo
        .pod_exec("cat", &["/proc/sys/net/netfilter/nf_conntrack_count"], None)
        .unwrap_or_default();
    let maps = ebpf.ebpf.pins.maps()?;
    println!(
        "\nconntrack entries in the iptables pod afterwards: {}; eBPF per-connection map entries afterwards: {:?}",
        ct.trim(),
        maps.connection_entries()
    );
    Ok(())
}
