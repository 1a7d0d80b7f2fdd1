//! `cargo xtask bench`: the interception paths side by side in one run, each in its own fresh
//! pod netns with the same client, the same forwarding sidecar (SO_ORIGINAL_DST, like Envoy's
//! original-dst cluster) and the same upstream; rounds interleave the paths, and every figure
//! is also given as a ratio to explicit addressing measured in the same run. Writes
//! `results.json`, `results.md` and SVG charts into `--out`.
//!
//! Paths: explicit addressing (the app dials the proxy: the zero-cost limit), no proxy, eBPF,
//! eBPF + sk_msg acceleration, iptables-nft, iptables-legacy, nftables.

mod cost;
mod measure;
mod plot;
mod report;

use report::{report, Results};

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use interceptor_tests::cases::{apply_in, Flavor};
use interceptor_tests::ebpf::EbpfInstall;
use interceptor_tests::forward::{ForwardConfig, Forwarder, LoopSpec, Upstream, UpstreamConfig};
use interceptor_tests::topology::Topology;
use serde_json::json;

const ECHO: u16 = 8080;
const SINK: u16 = 8081;
/// The app inside the pod (inbound target).
const APP: u16 = 9080;
const OUT: u16 = 15001;
const IN: u16 = 15006;
/// Explicit addressing's second proxy port, forwarding to the sink (bulk).
const EXPLICIT_SINK: u16 = 15011;
/// An echo in the pod, run as the proxy: the app↔proxy hop alone.
const HOP: u16 = 15002;
const HOP_SINK: u16 = 15003;
const APP_UID: u32 = 1000;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// CI size: every path and metric once, briefly (checks the benchmark runs, not numbers).
    #[arg(long)]
    quick: bool,
    /// Where results.json, results.md and the charts go.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
    /// Seconds per measurement (default 1, quick 0.1).
    #[arg(long)]
    secs: Option<f64>,
    /// Interleaved rounds (default 5, quick 1).
    #[arg(long)]
    rounds: Option<usize>,
    /// Run one part only (e.g. `setup`, to re-measure pod setup on its own); default all.
    #[arg(long, value_enum)]
    only: Option<Part>,
}

/// The bench's parts, in the order a full run takes them.
#[derive(clap::ValueEnum, Clone, Copy, PartialEq, Eq, Debug)]
enum Part {
    /// The interception paths, pinned and unpinned.
    Paths,
    /// conn/s against the number of rules and of pods.
    Scaling,
    /// Pod setup: through the daemon vs iptables-restore in a netns.
    Setup,
    /// Interception's own cost: pure interception and the programs' run time per connection.
    Cost,
}

struct Settings {
    secs: f64,
    rounds: usize,
    rule_points: Vec<usize>,
    pod_points: Vec<usize>,
    setup_n: usize,
    /// Sequential connections per cost measurement.
    cost_connections: u64,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Explicit,
    NoProxy,
    Ebpf,
    EbpfAccel,
    IptablesNft,
    IptablesLegacy,
    Nftables,
}

const KINDS: [Kind; 7] = [
    Kind::Explicit,
    Kind::NoProxy,
    Kind::Ebpf,
    Kind::EbpfAccel,
    Kind::IptablesNft,
    Kind::IptablesLegacy,
    Kind::Nftables,
];

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Explicit => "explicit",
            Kind::NoProxy => "no proxy",
            Kind::Ebpf => "eBPF",
            Kind::EbpfAccel => "eBPF+sk_msg",
            Kind::IptablesNft => "iptables-nft",
            Kind::IptablesLegacy => "iptables-legacy",
            Kind::Nftables => "nftables",
        }
    }
    fn tag(self) -> &'static str {
        match self {
            Kind::Explicit => "bx",
            Kind::NoProxy => "bn",
            Kind::Ebpf => "be",
            Kind::EbpfAccel => "ba",
            Kind::IptablesNft => "bi",
            Kind::IptablesLegacy => "bl",
            Kind::Nftables => "bf",
        }
    }
    fn flavor(self) -> Option<Flavor> {
        match self {
            Kind::Ebpf | Kind::EbpfAccel => Some(Flavor::Ebpf),
            Kind::IptablesNft => Some(Flavor::IptablesNft),
            Kind::IptablesLegacy => Some(Flavor::IptablesLegacy),
            Kind::Nftables => Some(Flavor::Nftables),
            Kind::Explicit | Kind::NoProxy => None,
        }
    }
}

/// One pod: topology, servers, interception. Field order is drop order (servers, then the
/// eBPF installation, then the namespaces).
struct Rig {
    kind: Kind,
    _servers: (Vec<Forwarder>, Vec<Upstream>),
    ebpf: EbpfInstall,
    topo: Topology,
    cpu: Option<usize>,
}

impl Rig {
    fn new(kind: Kind, cpu: Option<usize>, extra: &[String]) -> Result<Self> {
        let topo = Topology::new(kind.tag())?;
        allow_many_connections(&topo)?;
        let ebpf = EbpfInstall::new(kind.tag());
        let pod = topo.pod_netns();
        let up = SocketAddr::new(topo.upstream_v4().into(), ECHO);
        let sink = SocketAddr::new(topo.upstream_v4().into(), SINK);
        let proxy = LoopSpec::new(pod).creds(1337, 1337).cpu(cpu);
        let upstreams = vec![
            Upstream::start(
                &LoopSpec::new(topo.upstream_netns()).cpu(cpu),
                UpstreamConfig {
                    echo_port: ECHO,
                    sink_port: SINK,
                },
            )?,
            Upstream::start(
                &LoopSpec::new(pod).cpu(cpu),
                UpstreamConfig {
                    echo_port: APP,
                    sink_port: APP + 1,
                },
            )?,
            Upstream::start(
                &proxy,
                UpstreamConfig {
                    echo_port: HOP,
                    sink_port: HOP_SINK,
                },
            )?,
        ];
        let explicit = kind == Kind::Explicit;
        let mut fwds = vec![
            Forwarder::start(
                &proxy,
                ForwardConfig {
                    port: OUT,
                    fallback: explicit.then_some(up),
                    bind_src: None,
                },
            )?,
            Forwarder::start(
                &proxy,
                ForwardConfig {
                    port: IN,
                    fallback: Some(SocketAddr::new(topo.pod_v4().into(), APP)),
                    bind_src: Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 6))),
                },
            )?,
        ];
        if explicit {
            fwds.push(Forwarder::start(
                &proxy,
                ForwardConfig {
                    port: EXPLICIT_SINK,
                    fallback: Some(sink),
                    bind_src: None,
                },
            )?);
        }
        if let Some(flavor) = kind.flavor() {
            let mut args: Vec<&str> = vec![
                "-p",
                "15001",
                "-z",
                "15006",
                "-u",
                "1337",
                "-i",
                "*",
                "-b",
                "*",
                "-d",
                "15002,15003,15011,15090,15021,15020",
                "--ipv6",
                "false",
            ];
            if kind == Kind::EbpfAccel {
                args.push("--accelerate");
            }
            args.extend(extra.iter().map(String::as_str));
            apply_in(pod, ebpf.dir(), flavor, &args)
                .with_context(|| format!("intercepting the {} pod", kind.name()))?;
        }
        Ok(Self {
            kind,
            _servers: (fwds, upstreams),
            ebpf,
            topo,
            cpu,
        })
    }

    /// The app, in the pod (outbound).
    fn app(&self) -> LoopSpec {
        LoopSpec::new(self.topo.pod_netns())
            .creds(APP_UID, APP_UID)
            .cpu(self.cpu)
    }

    /// A client of the pod, in the upstream netns (inbound).
    fn remote(&self) -> LoopSpec {
        LoopSpec::new(self.topo.upstream_netns()).cpu(self.cpu)
    }

    fn out_echo(&self) -> SocketAddr {
        match self.kind {
            Kind::Explicit => SocketAddr::from(([127, 0, 0, 1], OUT)),
            _ => SocketAddr::new(self.topo.upstream_v4().into(), ECHO),
        }
    }

    fn out_sink(&self) -> SocketAddr {
        match self.kind {
            Kind::Explicit => SocketAddr::from(([127, 0, 0, 1], EXPLICIT_SINK)),
            _ => SocketAddr::new(self.topo.upstream_v4().into(), SINK),
        }
    }

    fn in_dst(&self) -> SocketAddr {
        let port = if self.kind == Kind::Explicit { IN } else { APP };
        SocketAddr::new(self.topo.pod_v4().into(), port)
    }

    fn conntrack(&self) -> u64 {
        self.topo
            .pod_exec("cat", &["/proc/sys/net/netfilter/nf_conntrack_count"], None)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Per-connection eBPF map entries (original destinations, acceleration sockets).
    fn map_entries(&self) -> Option<u64> {
        let m = self.ebpf.pins.maps().ok()?;
        let (a, b) = m.connection_entries();
        Some((a + b + m.accel_entries()) as u64)
    }
}

/// Thousands of connections a second leave sockets (the proxy's upstream ones, pod IP →
/// upstream, closed first by the proxy; the client's own in a sequential loop) in TIME_WAIT:
/// without reuse the ephemeral ports run out within a minute and connect() crawls (seen as 200
/// conn/s rounds) or fails.
fn allow_many_connections(topo: &Topology) -> Result<()> {
    for ns in [topo.pod_ns_name(), topo.upstream_ns_name()] {
        let st = std::process::Command::new("ip")
            .args(["netns", "exec", ns, "sysctl", "-qw"])
            .args([
                "net.ipv4.tcp_tw_reuse=1",
                "net.ipv4.ip_local_port_range=1024 65000",
            ])
            .status()?;
        if !st.success() {
            bail!("sysctl in {ns} failed");
        }
    }
    Ok(())
}

/// Connect rate of every path, back to back: once in order and once in reverse, with the
/// order rotated each round, so each path and explicit addressing are seconds apart and no
/// path always runs first. The ratios are paired by position (see `paired_ratio`).
fn measure_connects(
    r: &mut Results,
    section: &str,
    rigs: &[Rig],
    round: usize,
    secs: f64,
) -> Result<()> {
    let n = rigs.len();
    let forward = (0..n).map(|i| (i + round) % n);
    for i in forward.clone().chain(forward.rev()) {
        let rig = &rigs[i];
        let (c, cpu) = measure::conn_rate(&rig.app(), rig.out_echo(), secs)
            .with_context(|| format!("{} connect rate, round {round}", rig.kind.name()))?;
        r.push(section, "connections/s", "conn/s", rig.kind.name(), c);
        r.push(section, "CPU per connection", "µs", rig.kind.name(), cpu);
    }
    Ok(())
}

/// The per-path metrics of the main table besides the connect rate.
fn measure_path(r: &mut Results, section: &str, rig: &Rig, secs: f64, full: bool) -> Result<()> {
    let name = rig.kind.name();
    let app = rig.app();
    let one = measure::rr(&app, rig.out_echo(), 1, secs)?;
    r.push(section, "RR p50 c=1", "µs", name, one.p50_us);
    r.push(section, "RR p99 c=1", "µs", name, one.p99_us);
    r.push(section, "CPU per RR", "µs", name, one.cpu_us);
    if !full {
        return Ok(());
    }
    let many = measure::rr(&app, rig.out_echo(), 32, secs)?;
    r.push(section, "RR p50 c=32", "µs", name, many.p50_us);
    r.push(section, "RR p99 c=32", "µs", name, many.p99_us);
    r.push(section, "RR/s c=32", "txn/s", name, many.per_s);
    r.push(
        section,
        "bulk",
        "MiB/s",
        name,
        measure::bulk(&app, rig.out_sink(), secs)?,
    );
    // The app↔proxy hop alone: an echo in the pod run as the proxy, over loopback.
    if matches!(rig.kind, Kind::Ebpf | Kind::EbpfAccel) {
        let hop = SocketAddr::from(([127, 0, 0, 1], HOP));
        let h = measure::rr(&app, hop, 1, secs)?;
        r.push("hop", "hop RR p50 c=1", "µs", name, h.p50_us);
        let hs = SocketAddr::from(([127, 0, 0, 1], HOP_SINK));
        r.push(
            "hop",
            "hop bulk",
            "MiB/s",
            name,
            measure::bulk(&app, hs, secs)?,
        );
    }
    // Inbound: a remote client → the pod's app port, captured to the proxy.
    if rig.kind != Kind::NoProxy {
        let remote = rig.remote();
        let (c, _) = measure::conn_rate(&remote, rig.in_dst(), secs)?;
        r.push("inbound", "connections/s", "conn/s", name, c);
        let one = measure::rr(&remote, rig.in_dst(), 1, secs)?;
        r.push("inbound", "RR p50 c=1", "µs", name, one.p50_us);
        r.push("inbound", "RR p99 c=1", "µs", name, one.p99_us);
    }
    Ok(())
}

pub fn run(args: Args) -> Result<()> {
    let s = if args.quick {
        Settings {
            secs: args.secs.unwrap_or(0.1),
            rounds: args.rounds.unwrap_or(1),
            rule_points: vec![1, 10],
            pod_points: vec![1, 5],
            setup_n: 3,
            cost_connections: 300,
        }
    } else {
        Settings {
            secs: args.secs.unwrap_or(1.0),
            rounds: args.rounds.unwrap_or(5),
            rule_points: vec![1, 10, 100, 1000],
            pod_points: vec![1, 50, 250],
            setup_n: 50,
            cost_connections: 20_000,
        }
    };
    if !args.quick && std::env::var_os("INTERCEPTOR_BIN").is_none() {
        // Measure the product as shipped: the daemon and CLI in release, not the debug build.
        let st = std::process::Command::new(std::env::var("CARGO").unwrap_or("cargo".into()))
            .args([
                "build",
                "-q",
                "--release",
                "-p",
                "interceptor",
                "--bin",
                "interceptor",
            ])
            .status()?;
        if !st.success() {
            bail!("cargo build --release -p interceptor failed");
        }
        std::env::set_var("INTERCEPTOR_BIN", "target/release/interceptor");
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let started = Instant::now();
    let mut r = Results::default();

    let part = |p: Part| args.only.is_none_or(|o| o == p);
    if part(Part::Paths) {
        paths(&mut r, &s)?;
    }
    if part(Part::Scaling) {
        eprintln!("bench: scaling in rules");
        scaling_rules(&mut r, &s)?;
        eprintln!("bench: scaling in pods");
        scaling_pods(&mut r, &s)?;
    }
    if part(Part::Setup) {
        eprintln!("bench: pod setup cost");
        setup_cost(&mut r, &s)?;
    }
    if part(Part::Cost) {
        eprintln!("bench: interception's own cost");
        cost::pure(&mut r, &s)?;
    }

    r.extra
        .insert("wall seconds".into(), json!(started.elapsed().as_secs()));
    report(&r, &s, &args.out)?;
    Ok(())
}

/// The interception paths side by side: pinned (the main table), then unpinned.
fn paths(r: &mut Results, s: &Settings) -> Result<()> {
    // Main table, pinned: client, sidecar and servers share CPU 0.
    eprintln!("bench: paths, pinned ({} rounds × {} s)", s.rounds, s.secs);
    {
        let rigs = KINDS
            .iter()
            .map(|k| Rig::new(*k, Some(0), &[]))
            .collect::<Result<Vec<_>>>()?;
        let ct0: Vec<u64> = rigs.iter().map(Rig::conntrack).collect();
        for round in 0..s.rounds {
            measure_connects(r, "outbound", &rigs, round, s.secs)?;
            for rig in &rigs {
                measure_path(r, "outbound", rig, s.secs, true)
                    .with_context(|| format!("{} round {round}", rig.kind.name()))?;
            }
        }
        cost::sidecar_costs(r, &rigs, s.cost_connections)?;
        for (rig, c0) in rigs.iter().zip(ct0) {
            r.extra.insert(
                format!("conntrack entries created: {}", rig.kind.name()),
                json!(rig.conntrack().saturating_sub(c0)),
            );
            if let Some(m) = rig.map_entries() {
                r.extra.insert(
                    format!("BPF per-connection map entries after: {}", rig.kind.name()),
                    json!(m),
                );
            }
        }
    }

    // The same paths unpinned (the scheduler's choice), connect rate and RR only.
    eprintln!("bench: paths, unpinned");
    {
        let rigs = KINDS
            .iter()
            .map(|k| Rig::new(*k, None, &[]))
            .collect::<Result<Vec<_>>>()?;
        for round in 0..s.rounds.div_ceil(2) {
            measure_connects(r, "outbound unpinned", &rigs, round, s.secs)?;
            for rig in &rigs {
                measure_path(r, "outbound unpinned", rig, s.secs, false)?;
            }
        }
    }
    Ok(())
}

/// conn/s with 1…1,000 excluded CIDRs or 1…64 excluded ports (the limit of a port list), eBPF
/// vs iptables-nft; the points interleave.
fn scaling_rules(r: &mut Results, s: &Settings) -> Result<()> {
    for dim in ["excluded CIDRs", "excluded ports"] {
        let mut rigs = Vec::new();
        for kind in [Kind::Ebpf, Kind::IptablesNft] {
            // A pod's port lists stop at the config's limit (the CIDR lists go to 1,000).
            let max = if dim == "excluded ports" {
                interceptor_common::config::limits::MAX_PORTS
            } else {
                usize::MAX
            };
            let mut points: Vec<usize> = s.rule_points.iter().map(|&n| n.min(max)).collect();
            points.dedup();
            for &n in &points {
                let list: Vec<String> = (0..n)
                    .map(|i| {
                        if dim == "excluded CIDRs" {
                            // 10.128.0.0/9 never holds a test address.
                            format!("10.{}.{}.{}/32", 128 + i / 65536, (i / 256) % 256, i % 256)
                        } else {
                            (20000 + i).to_string()
                        }
                    })
                    .collect();
                let flag = if dim == "excluded CIDRs" { "-x" } else { "-o" };
                let extra = vec![flag.to_string(), list.join(",")];
                rigs.push((kind, n, Rig::new(kind, Some(0), &extra)?));
            }
        }
        for _ in 0..s.rounds.div_ceil(2) {
            for (kind, n, rig) in &rigs {
                let (c, _) = measure::conn_rate(&rig.app(), rig.out_echo(), s.secs)?;
                r.push(
                    &format!("scaling {dim}"),
                    &n.to_string(),
                    "conn/s",
                    kind.name(),
                    c,
                );
            }
        }
    }
    Ok(())
}

/// A bare netns for pod-count scaling and setup timing; deleted on drop.
struct BareNetns(String);

impl BareNetns {
    fn new(i: usize) -> Result<Self> {
        let name = format!("ic-bp-{}-{i}", std::process::id());
        let st = std::process::Command::new("ip")
            .args(["netns", "add", &name])
            .status()?;
        if !st.success() {
            bail!("ip netns add {name} failed");
        }
        Ok(Self(name))
    }
    fn path(&self) -> PathBuf {
        PathBuf::from("/var/run/netns").join(&self.0)
    }
}

impl Drop for BareNetns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.0])
            .status();
    }
}

fn pod_config() -> Result<interceptor_common::config::Config> {
    let raw = interceptor_common::config::RawConfig {
        outbound_ip_ranges_include: "*".into(),
        inbound_ports_include: "*".into(),
        ..Default::default()
    };
    raw.parse().map_err(|e| anyhow::anyhow!("{e:?}"))
}

/// eBPF conn/s with 1…250 pods registered on the node (same maps, same programs).
fn scaling_pods(r: &mut Results, s: &Settings) -> Result<()> {
    let rig = Rig::new(Kind::Ebpf, Some(0), &[])?;
    let max = *s.pod_points.iter().max().unwrap_or(&1);
    let others = (1..max).map(BareNetns::new).collect::<Result<Vec<_>>>()?;
    let cfg = pod_config()?;
    let mut maps = rig.ebpf.pins.maps()?;
    let mut registered = 0usize;
    for _ in 0..s.rounds.div_ceil(2) {
        for &n in &s.pod_points {
            // `n` pods in all: the measured one plus n - 1 others.
            while registered < n - 1 {
                interceptor::service::install::register_in(
                    &mut maps,
                    &interceptor::netns::Netns::open_or_fail(&others[registered].path())?,
                    &cfg,
                    None,
                    None,
                )?;
                registered += 1;
            }
            while registered > n - 1 {
                registered -= 1;
                maps.remove(&others[registered].path())?;
            }
            let (c, _) = measure::conn_rate(&rig.app(), rig.out_echo(), s.secs)?;
            r.push("scaling pods", &n.to_string(), "conn/s", "eBPF", c);
        }
    }
    while registered > 0 {
        registered -= 1;
        maps.remove(&others[registered].path())?;
    }
    Ok(())
}

/// One control-socket request, timed from connect to the last byte of the answer, through the
/// client the CNI plugin uses. The request's JSON is encoded before and the answer decoded
/// after: this client is a debug build, where serde takes a few hundred microseconds that the
/// release-built CNI plugin spends in a few.
fn timed_call(
    socket: &std::path::Path,
    req: &interceptor::daemon::protocol::Request,
) -> Result<(interceptor::daemon::protocol::Response, f64)> {
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    let t = Instant::now();
    let answer = interceptor::daemon::client::exchange(socket, &line)?;
    let us = t.elapsed().as_secs_f64() * 1e6;
    Ok((serde_json::from_slice(&answer)?, us))
}

/// Pod setup: registration through the daemon (eBPF, and iptables through the daemon) vs
/// `iptables-restore` of the same rules into a fresh netns, as istio-init does.
fn setup_cost(r: &mut Results, s: &Settings) -> Result<()> {
    use interceptor::daemon::{client, protocol};
    // State records on a tmpfs, as deployed (the DaemonSet's /run/interceptor); /tmp may be a
    // disk, where creating and renaming a record is a journaled metadata write.
    let shm = std::path::Path::new("/dev/shm");
    let base = if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    let d = interceptor_tests::daemon::DaemonProc::start_under(&base, "bsetup", &[], &[])?;
    let cfg = pod_config()?;
    let raw = interceptor_common::config::RawConfig {
        outbound_ip_ranges_include: "*".into(),
        inbound_ports_include: "*".into(),
        ..Default::default()
    };
    let doc = interceptor::backend::iptables::render(&cfg).v4;
    for i in 0..s.setup_n {
        for (label, backend) in [
            ("daemon, eBPF", interceptor::model::BackendKind::Ebpf),
            (
                "daemon, iptables",
                interceptor::model::BackendKind::Iptables,
            ),
        ] {
            let ns = BareNetns::new(1000 + i)?;
            let req = protocol::Request::Add(Box::new(interceptor::model::PodSpec {
                netns: ns.path(),
                ips: vec![],
                config: raw.clone(),
                backend,
                identity: None,
            }));
            let (resp, us) = timed_call(&d.socket(), &req)?;
            let protocol::Response::Pod(status) = resp else {
                bail!("pod add ({label}) failed: {resp:?}");
            };
            r.push("setup", "pod setup", "µs", label, us);
            // The daemon's own time for it, without the control-socket round trip.
            r.push(
                "setup",
                "pod setup",
                "µs",
                &format!("{label} (inside the daemon)"),
                status.add_micros as f64,
            );
            client::call(&d.socket(), &protocol::Request::Remove { netns: ns.path() })?;
        }
        let ns = BareNetns::new(2000 + i)?;
        // iptables-restore itself, started from a thread inside the netns (a child starts in
        // its parent thread's netns), as istio-init runs it from inside the pod: through
        // nsenter, its own exec added a millisecond and more to the baseline.
        let t = Instant::now();
        let out = interceptor::netns::run_in(Some(&ns.path()), || {
            let mut c = std::process::Command::new("iptables-nft-restore")
                .arg("--noflush")
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::null())
                .spawn()?;
            use std::io::Write;
            c.stdin
                .take()
                .expect("piped stdin")
                .write_all(doc.as_bytes())?;
            Ok(c.wait()?)
        })?;
        let us = t.elapsed().as_secs_f64() * 1e6;
        if !out.success() {
            bail!("iptables-nft-restore in a netns failed");
        }
        if i == 0 {
            // The rules must have gone into the pod's netns, not this one.
            let saved = interceptor::netns::command(Some(&ns.path()), "iptables-nft-save")?
                .args(["-t", "nat"])
                .output()?;
            if !String::from_utf8_lossy(&saved.stdout).contains("ISTIO_OUTPUT") {
                bail!("the baseline's iptables-nft-restore did not write into the pod netns");
            }
        }
        r.push("setup", "pod setup", "µs", "iptables-restore in netns", us);
    }
    Ok(())
}
