//! What interception itself costs, in two views:
//!
//! - **pure interception**: the proxy is a plain echo on 15001 (no upstream hop) and the client a
//!   compiled blocking loop (connect, 1 byte each way, close), both on CPU 0, so the sidecar's
//!   forwarding does not dilute the difference: explicit addressing dials 127.0.0.1:15001, the
//!   intercepted paths dial the upstream address and are redirected to the same echo;
//! - **per program**: the kernel's own accounting (`BPF_ENABLE_STATS`, run_cnt/run_time_ns per
//!   program) over a known number of sequential connections: runs per connection, ns per run and
//!   per connection, for every program of the eBPF installation. Statistics are on only while
//!   the bench holds the stats fd (the kernel turns them off when the last holder closes it,
//!   and never touches the `kernel.bpf_stats_enabled` sysctl), and never while rates are
//!   measured: their own clock reads would be counted as interception.
//!
//! The un-meshed view: the same programs run for every socket of the node (they are attached
//! at the cgroup root), so the explicit pod, which is not registered, shows what a connection of
//! an un-meshed pod pays.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use interceptor_tests::cases::{apply_in, Flavor};
use interceptor_tests::ebpf::EbpfInstall;
use interceptor_tests::forward::{run_client, LoopSpec, Upstream, UpstreamConfig};
use interceptor_tests::topology::Topology;

use super::report::{Results, PROGRAMS, PROGRAMS_UNMESHED, PURE, TOTAL};
use super::{Settings, APP_UID, ECHO, OUT, SINK};

/// A pod whose proxy is a plain echo on 15001. Field order is drop order.
struct PureRig {
    name: &'static str,
    _echo: Vec<Upstream>,
    ebpf: EbpfInstall,
    topo: Topology,
}

impl PureRig {
    fn new(name: &'static str, tag: &str, flavor: Option<Flavor>) -> Result<Self> {
        let topo = Topology::new(tag)?;
        super::allow_many_connections(&topo)?;
        let ebpf = EbpfInstall::new(tag);
        let pod = topo.pod_netns();
        let echo = vec![
            Upstream::start(
                &LoopSpec::new(pod).creds(1337, 1337).cpu(Some(0)),
                UpstreamConfig {
                    echo_port: OUT,
                    sink_port: OUT + 100,
                },
            )?,
            // The upstream the intercepted paths dial (never reached: they are redirected).
            Upstream::start(
                &LoopSpec::new(topo.upstream_netns()).cpu(Some(0)),
                UpstreamConfig {
                    echo_port: ECHO,
                    sink_port: SINK,
                },
            )?,
        ];
        if let Some(flavor) = flavor {
            let args = [
                "-p", "15001", "-z", "15006", "-u", "1337", "-i", "*", "-b", "", "--ipv6", "false",
            ];
            apply_in(pod, ebpf.dir(), flavor, &args)
                .with_context(|| format!("intercepting the {name} pod"))?;
        }
        Ok(Self {
            name,
            _echo: echo,
            ebpf,
            topo,
        })
    }

    fn dst(&self) -> SocketAddr {
        if self.name == "explicit" {
            SocketAddr::from(([127, 0, 0, 1], OUT))
        } else {
            SocketAddr::new(self.topo.upstream_v4().into(), ECHO)
        }
    }

    /// `n` sequential connections from the app (uid 1000, CPU 0): their seconds.
    fn connections(&self, n: u64) -> Result<f64> {
        sequential(&app(&self.topo), self.dst(), n)
    }
}

fn app(topo: &Topology) -> LoopSpec {
    LoopSpec::new(topo.pod_netns())
        .creds(APP_UID, APP_UID)
        .cpu(Some(0))
}

/// `n` connections one after the other, each: connect, 1 byte each way, close. A blocking loop
/// (the client of the pure view): no runtime between the app and the syscalls.
pub(super) fn sequential(client: &LoopSpec, dst: SocketAddr, n: u64) -> Result<f64> {
    run_client(client, || async move {
        let t = Instant::now();
        let mut b = [0u8; 1];
        for i in 0..n {
            let mut s = std::net::TcpStream::connect(dst)
                .with_context(|| format!("connection {i} to {dst}"))?;
            s.write_all(b"x")?;
            s.read_exact(&mut b)?;
        }
        Ok(t.elapsed().as_secs_f64())
    })
}

/// The programs' cost over `n` connections that `run` makes: pushed per program (runs per
/// connection, ns per run, ns per connection) and in all under `section`.
pub(super) fn program_costs(
    r: &mut Results,
    section: &str,
    ebpf: &EbpfInstall,
    n: u64,
    run: impl FnOnce() -> Result<f64>,
) -> Result<()> {
    use interceptor::backend::ebpf::stats;
    let on = stats::stats_on()?;
    let before = stats::snapshot(&ebpf.pins);
    if before.is_empty() {
        bail!("no programs under {}", ebpf.dir().display());
    }
    run()?;
    let after = stats::snapshot(&ebpf.pins);
    drop(on);
    let per_conn = |x: u64| x as f64 / n as f64;
    let mut total = 0u64;
    for (name, (cnt, ns)) in &after {
        let (c0, t0) = before.get(name).copied().unwrap_or_default();
        let (runs, time) = (cnt - c0, ns - t0);
        if runs == 0 {
            continue;
        }
        total += time;
        r.push(section, "runs per connection", "runs", name, per_conn(runs));
        r.push(section, "ns per run", "ns", name, time as f64 / runs as f64);
        r.push(section, "ns per connection", "ns", name, per_conn(time));
    }
    r.push(section, "ns per connection", "ns", TOTAL, per_conn(total));
    Ok(())
}

/// Pure interception's connect rate (explicit, eBPF, iptables-nft; paired per round, order
/// rotated) and the programs' cost per connection, meshed and un-meshed.
pub(super) fn pure(r: &mut Results, s: &Settings) -> Result<()> {
    let rigs = [
        PureRig::new("explicit", "px", None)?,
        PureRig::new("eBPF", "pe", Some(Flavor::Ebpf))?,
        PureRig::new("iptables-nft", "pi", Some(Flavor::IptablesNft))?,
    ];
    // Warm up (the first connections of a netns pay for its route and neighbour caches).
    for rig in &rigs {
        rig.connections(200)?;
    }
    let n = s.cost_connections;
    for round in 0..s.rounds {
        let order = (0..rigs.len()).map(|i| (i + round) % rigs.len());
        for i in order.clone().chain(order.rev()) {
            let rig = &rigs[i];
            let secs = rig
                .connections(n)
                .with_context(|| format!("{} pure round {round}", rig.name))?;
            r.push(PURE, "connections/s", "conn/s", rig.name, n as f64 / secs);
        }
    }
    let ebpf = &rigs[1];
    for _ in 0..s.rounds.div_ceil(2) {
        program_costs(r, PROGRAMS, &ebpf.ebpf, n, || ebpf.connections(n))?;
        program_costs(r, PROGRAMS_UNMESHED, &ebpf.ebpf, n, || {
            rigs[0].connections(n)
        })?;
    }
    Ok(())
}

/// The programs' cost per app connection on the eBPF paths with the forwarding sidecar (its
/// own upstream connection included: that is what a meshed connection costs the node).
pub(super) fn sidecar_costs(r: &mut Results, rigs: &[super::Rig], n: u64) -> Result<()> {
    for rig in rigs
        .iter()
        .filter(|g| g.kind.flavor() == Some(Flavor::Ebpf))
    {
        let section = format!("programs, {} with the sidecar", rig.kind.name());
        program_costs(r, &section, &rig.ebpf, n, || {
            sequential(&rig.app(), rig.out_echo(), n)
        })
        .with_context(|| section.clone())?;
    }
    Ok(())
}
