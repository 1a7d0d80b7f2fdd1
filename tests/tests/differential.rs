//! Differential test: the iptables and nftables fallbacks, the eBPF datapath and `interceptor
//! explain` must agree on every connection of many generated configurations.
//!
//! A seeded generator (splitmix64; default seed [`DEFAULT_SEED`], override with `DIFF_SEED`,
//! the number of configurations with `DIFF_CONFIGS`) draws istio-iptables configurations over
//! every outbound flag the eBPF backend accepts: proxy uid/gid lists and their rule-order
//! quirks, include/exclude CIDRs (overlapping, inside 127/8, IPv4-mapped IPv6 such as
//! `::ffff:127.0.0.1/128` — loopback to Istio's Go `IsLoopback` — and `::ffff:10.0.0.0/104`),
//! included/excluded ports, IPv6
//! on/off, owner groups, the loopback CIDR, non-default proxy/inbound/tunnel ports, and
//! sometimes inbound capture (-b/-d, which must not change any of the pod's own connections).
//! For each, three fresh pods get the same config: one through iptables (nft or legacy,
//! alternating), one through nftables and one through eBPF; a sample of the connection matrix
//! (credentials × destinations × ports × passthrough source) runs in all three, and each
//! connection's observed outcome (who answered, the `SO_ORIGINAL_DST` the sidecar read, the
//! address the sidecar saw it come from, the app's `getpeername`) must be identical in the three pods and equal to what the `interceptor
//! explain` binary predicts (run for every connection, against the iptables pod's netns).
//! Addresses are compared symbolically (`UpV4`, `PodV6`, `Mapped(UpV4)`, …) because the pods
//! have different address bytes.
//!
//! One place where Istio's own backends differ, kept as Istio has it (the nftables goldens are
//! byte-exact): with IPv6 off, istio-iptables installs no ip6tables rules at all, but
//! istio-nftables' rules live in `inet` tables and those that name no address family (`tcp
//! dport X jump istio-redirect`, `-i '*'`'s `counter jump istio-redirect`, the owner rules)
//! act on IPv6 too. So where `explain` says "IPv6 rules are off" (`ipv6_disabled`), the
//! nftables pod is held only to "passed, or redirected to the proxy with the right original
//! destination", and such connections are counted apart.
//!
//! Not covered: UDP (the client is TCP only), DNS capture, and Envoy's IPv6 passthrough source
//! `::6` (not an address of the pod, so it cannot be bound; 127.0.0.6 and ::ffff:127.0.0.6 are).
//!
//! `DIFF_KEEP_GOING=1` reports every disagreement instead of stopping at the first.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use interceptor_tests::bin::interceptor_bin;
use interceptor_tests::cases::{Flavor, Pod};
use interceptor_tests::sidecar::{Record, TagServer};
use interceptor_tests::topology::{connect_as, ConnectError, Topology};

const DEFAULT_SEED: u64 = 0x1D1F_F5EE_D000_0001;
const DEFAULT_CONFIGS: usize = 56;
const CONNECT_TIMEOUT: Duration = Duration::from_millis(1500);

// ---------------------------------------------------------------------------------------------
// The generator.

/// splitmix64: tiny, seedable, good enough to draw test cases.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    /// True with probability `num/den`.
    fn chance(&mut self, num: u64, den: u64) -> bool {
        self.next() % den < num
    }
    fn pick<T: Clone>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len())].clone()
    }
    /// Each element kept with probability `num/den`.
    fn subset<T: Clone>(&mut self, xs: &[T], num: u64, den: u64) -> Vec<T> {
        xs.iter()
            .filter(|_| self.chance(num, den))
            .cloned()
            .collect()
    }
}

fn seed() -> u64 {
    match std::env::var("DIFF_SEED") {
        Ok(s) => {
            let s = s.trim();
            let parsed = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => s.parse(),
            };
            parsed.unwrap_or_else(|_| panic!("DIFF_SEED={s:?} is not a number"))
        }
        Err(_) => DEFAULT_SEED,
    }
}

// ---------------------------------------------------------------------------------------------
// Ports and servers.

/// Ports the app (pod netns) and upstream servers listen on, and the -q/-o pool.
const PORT_POOL: [u16; 4] = [8080, 7777, 9999, 9080];
/// Tunnel ports (-e) a config may use; both are served everywhere.
const TUNNEL_PORTS: [u16; 2] = [15008, 15018];
/// Alternative sidecar ports (-p, -z; the defaults are 15001/15006).
const SIDECAR_ALT: (u16, u16) = (15011, 15016);

/// A `Pod` plus the extra servers the matrix needs: the app on every dialed port, the upstream
/// on every dialed port, and a second sidecar (uid 1337) on the alternative -p/-z ports.
struct DiffPod {
    // Declared first: stopped before the pod (and its namespaces) go.
    alt_sidecar: TagServer,
    _app: TagServer,
    _upstream: TagServer,
    pod: Pod,
}

impl DiffPod {
    fn new(tag: &str) -> Result<Self> {
        let pod = Pod::new(tag)?;
        let t = &pod.topo;
        // Pod::new serves app 9080/9081 and upstream 8080/9999/7777; add the rest.
        let app_ports: Vec<u16> = [8080, 7777, 9999].into_iter().chain(TUNNEL_PORTS).collect();
        let app = TagServer::spawn(t.pod_netns(), "app", &app_ports, None)?;
        let up_ports: Vec<u16> = [9080].into_iter().chain(TUNNEL_PORTS).collect();
        let upstream = TagServer::spawn(t.upstream_netns(), "upstream", &up_ports, None)?;
        let alt = TagServer::spawn(
            t.pod_netns(),
            "sidecar",
            &[SIDECAR_ALT.0, SIDECAR_ALT.1],
            Some((1337, 1337)),
        )?;
        Ok(Self {
            alt_sidecar: alt,
            _app: app,
            _upstream: upstream,
            pod,
        })
    }

    fn topo(&self) -> &Topology {
        &self.pod.topo
    }

    fn take_sidecar_records(&self) -> Vec<Record> {
        let mut r = self.pod.sidecar.take_records();
        r.extend(self.alt_sidecar.take_records());
        r
    }
}

// ---------------------------------------------------------------------------------------------
// Symbolic addresses.

/// A destination, relative to a pod's topology.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Dst {
    UpV4,
    UpV6,
    ExV4,
    ExV6,
    PodV4,
    PodV6,
    /// 127.0.0.1
    Lo4,
    /// ::1
    Lo6,
    /// 127.0.0.53 (over lo, outside the default loopback CIDR)
    Lo53,
    /// ::ffff:<upstream v4> from an AF_INET6 socket
    MappedUp,
    /// ::ffff:<pod v4>
    MappedPod,
    /// ::ffff:127.0.0.1
    MappedLo,
}

const ALL_DSTS: [Dst; 12] = [
    Dst::UpV4,
    Dst::UpV6,
    Dst::ExV4,
    Dst::ExV6,
    Dst::PodV4,
    Dst::PodV6,
    Dst::Lo4,
    Dst::Lo6,
    Dst::Lo53,
    Dst::MappedUp,
    Dst::MappedPod,
    Dst::MappedLo,
];

impl Dst {
    fn ip(self, t: &Topology) -> IpAddr {
        let mapped = |a: Ipv4Addr| IpAddr::V6(a.to_ipv6_mapped());
        match self {
            Dst::UpV4 => t.upstream_v4().into(),
            Dst::UpV6 => t.upstream_v6().into(),
            Dst::ExV4 => t.excluded_v4().into(),
            Dst::ExV6 => t.excluded_v6().into(),
            Dst::PodV4 => t.pod_v4().into(),
            Dst::PodV6 => t.pod_v6().into(),
            Dst::Lo4 => Ipv4Addr::LOCALHOST.into(),
            Dst::Lo6 => Ipv6Addr::LOCALHOST.into(),
            Dst::Lo53 => Ipv4Addr::new(127, 0, 0, 53).into(),
            Dst::MappedUp => mapped(t.upstream_v4()),
            Dst::MappedPod => mapped(t.pod_v4()),
            Dst::MappedLo => mapped(Ipv4Addr::LOCALHOST),
        }
    }

    /// The route goes over lo: the pod's app server answers a passed connection.
    fn is_local(self) -> bool {
        matches!(
            self,
            Dst::PodV4
                | Dst::PodV6
                | Dst::Lo4
                | Dst::Lo6
                | Dst::Lo53
                | Dst::MappedPod
                | Dst::MappedLo
        )
    }

    /// Envoy's inbound passthrough source for this destination's socket family, if the client
    /// can bind it: 127.0.0.6, or ::ffff:127.0.0.6 on an AF_INET6 socket to a v4-mapped
    /// destination. `::6` is not an address of the pod (binding it fails), so IPv6 local
    /// destinations get no passthrough variant.
    fn passthrough_src(self) -> Option<IpAddr> {
        let v4 = Ipv4Addr::new(127, 0, 0, 6);
        match self {
            Dst::PodV4 | Dst::Lo4 | Dst::Lo53 => Some(v4.into()),
            Dst::MappedPod | Dst::MappedLo => Some(IpAddr::V6(v4.to_ipv6_mapped())),
            _ => None,
        }
    }
}

/// A socket address named relative to the pod (`UpV4:8080`, `Mapped(PodV4):9999`, …).
fn sym(t: &Topology, a: SocketAddr) -> String {
    format!("{}:{}", sym_ip(t, a.ip()), a.port())
}

/// An address named relative to the pod (`PodV4`, `Mapped(UpV4)`, `127.0.0.1`, `[::1]`).
fn sym_ip(t: &Topology, ip: IpAddr) -> String {
    let table: [(IpAddr, &str); 6] = [
        (t.upstream_v4().into(), "UpV4"),
        (t.upstream_v6().into(), "UpV6"),
        (t.excluded_v4().into(), "ExV4"),
        (t.excluded_v6().into(), "ExV6"),
        (t.pod_v4().into(), "PodV4"),
        (t.pod_v6().into(), "PodV6"),
    ];
    if let Some((_, n)) = table.iter().find(|(a, _)| *a == ip) {
        return n.to_string();
    }
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => format!("Mapped({})", sym_ip(t, v4.into())),
            None => format!("[{v6}]"),
        },
        IpAddr::V4(v4) => v4.to_string(),
    }
}

/// An address inside an include/exclude CIDR list, relative to a pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Net {
    UpV4Host,
    /// 10.200.X.0/24: the upstream *and* the pod's own address.
    Link4,
    UpV6Host,
    Link6,
    ExV4Subnet,
    ExV4Host,
    ExV6Subnet,
    ExV6Host,
    PodV4Host,
    /// 127.0.0.53/32: an include inside 127/8 (Istio then drops the app-over-lo rule).
    Lo53Host,
    Lo8,
    Lo6Host,
    /// ::ffff:127.0.0.1/128: IPv6 to netfilter (so it matches nothing on the wire), but
    /// loopback to Go's `IsLoopback`, so Istio drops the app-over-lo rule for it too.
    MappedLoHost,
    /// ::ffff:10.0.0.0/104: every pod's and upstream's IPv4 address, v4-mapped. An IPv6 rule,
    /// which v4-mapped destinations (IPv4 on the wire) never reach.
    Mapped10,
    /// ::ffff:<upstream v4>/128.
    MappedUpHost,
}

impl Net {
    fn render(self, t: &Topology) -> String {
        match self {
            Net::UpV4Host => format!("{}/32", t.upstream_v4()),
            Net::Link4 => t.link_v4_cidr(),
            Net::UpV6Host => format!("{}/128", t.upstream_v6()),
            Net::Link6 => t.link_v6_cidr(),
            Net::ExV4Subnet => t.excluded_v4_cidr(),
            Net::ExV4Host => format!("{}/32", t.excluded_v4()),
            Net::ExV6Subnet => t.excluded_v6_cidr(),
            Net::ExV6Host => format!("{}/128", t.excluded_v6()),
            Net::PodV4Host => format!("{}/32", t.pod_v4()),
            Net::Lo53Host => "127.0.0.53/32".into(),
            Net::Lo8 => "127.0.0.0/8".into(),
            Net::Lo6Host => "::1/128".into(),
            Net::MappedLoHost => "::ffff:127.0.0.1/128".into(),
            Net::Mapped10 => "::ffff:10.0.0.0/104".into(),
            Net::MappedUpHost => format!("::ffff:{}/128", t.upstream_v4()),
        }
    }

    /// Loopback as Istio decides it (Go's `IsLoopback`, v4-mapped 127.x included).
    fn is_loopback(self) -> bool {
        matches!(
            self,
            Net::Lo53Host | Net::Lo8 | Net::Lo6Host | Net::MappedLoHost
        )
    }

    fn is_v4_mapped(self) -> bool {
        matches!(self, Net::MappedLoHost | Net::Mapped10 | Net::MappedUpHost)
    }

    /// Whether the two nets share addresses (in any pod).
    fn overlaps(self, other: Net) -> bool {
        let within = |a: Net, b: Net| {
            a == b
                || matches!(
                    (a, b),
                    (Net::UpV4Host | Net::PodV4Host, Net::Link4)
                        | (Net::UpV6Host, Net::Link6)
                        | (Net::ExV4Host, Net::ExV4Subnet)
                        | (Net::ExV6Host, Net::ExV6Subnet)
                        | (Net::Lo53Host, Net::Lo8)
                        | (Net::MappedUpHost, Net::Mapped10)
                )
        };
        within(self, other) || within(other, self)
    }
}

fn render_nets(t: &Topology, nets: &[Net]) -> String {
    nets.iter()
        .map(|n| n.render(t))
        .collect::<Vec<_>>()
        .join(",")
}

fn render_ports(ports: &[u16]) -> String {
    ports
        .iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

// ---------------------------------------------------------------------------------------------
// Configurations.

#[derive(Debug, Clone, PartialEq, Eq)]
enum Include {
    All,
    /// An empty list is `-i ''`.
    List(Vec<Net>),
}

/// Inbound capture (-b/-d). It never applies to the pod's own connections (those never cross
/// PREROUTING; the eBPF sk_lookup program must skip local peers), so a config with inbound
/// capture must produce the same outbound outcomes: this checks that it does.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Inbound {
    Off,
    /// `-b '*' -d PORTS`
    All(Vec<u16>),
    /// `-b PORTS`
    List(Vec<u16>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Groups {
    All,
    Include(&'static str),
    Exclude(&'static str),
}

/// One symbolic istio-iptables configuration (rendered per pod).
#[derive(Debug, Clone)]
struct Config {
    uids: &'static str,
    gids: Option<&'static str>,
    include: Include,
    exclude: Vec<Net>,
    q: Vec<u16>,
    o: Vec<u16>,
    ipv6: Option<bool>,
    groups: Groups,
    lo_cidr: Option<&'static str>,
    /// -p/-z (None: defaults, not passed).
    sidecar: Option<(u16, u16)>,
    /// -e (None: the default 15008, not passed).
    tunnel: Option<u16>,
    /// -b/-d, with `-m REDIRECT` when on.
    inbound: Inbound,
}

impl Config {
    fn base() -> Self {
        Config {
            uids: "1337",
            gids: None,
            include: Include::All,
            exclude: vec![],
            q: vec![],
            o: vec![],
            ipv6: Some(true),
            groups: Groups::All,
            lo_cidr: None,
            sidecar: None,
            tunnel: None,
            inbound: Inbound::Off,
        }
    }

    fn tunnel_port(&self) -> u16 {
        self.tunnel.unwrap_or(TUNNEL_PORTS[0])
    }

    /// istio-iptables flags for the pod `t`.
    fn args(&self, t: &Topology) -> Vec<String> {
        let mut a: Vec<String> = Vec::new();
        let mut push = |k: &str, v: String| {
            a.push(k.to_string());
            a.push(v);
        };
        if let Some((p, z)) = self.sidecar {
            push("-p", p.to_string());
            push("-z", z.to_string());
        }
        if let Some(e) = self.tunnel {
            push("-e", e.to_string());
        }
        push("-u", self.uids.to_string());
        if let Some(g) = self.gids {
            push("-g", g.to_string());
        }
        push(
            "-i",
            match &self.include {
                Include::All => "*".to_string(),
                Include::List(l) => render_nets(t, l),
            },
        );
        if !self.exclude.is_empty() {
            push("-x", render_nets(t, &self.exclude));
        }
        if !self.q.is_empty() {
            push("-q", render_ports(&self.q));
        }
        if !self.o.is_empty() {
            push("-o", render_ports(&self.o));
        }
        match &self.inbound {
            Inbound::Off => {}
            Inbound::All(d) => {
                push("-m", "REDIRECT".into());
                push("-b", "*".into());
                if !d.is_empty() {
                    push("-d", render_ports(d));
                }
            }
            Inbound::List(b) => {
                push("-m", "REDIRECT".into());
                push("-b", render_ports(b));
            }
        }
        if let Some(v6) = self.ipv6 {
            push("--ipv6", v6.to_string());
        }
        a
    }

    /// The env-only settings (always set, so the ambient environment cannot leak in).
    fn env(&self) -> Vec<(&'static str, String)> {
        let (inc, exc) = match self.groups {
            Groups::All => ("*", ""),
            Groups::Include(g) => (g, ""),
            Groups::Exclude(g) => ("*", g),
        };
        vec![
            ("ISTIO_OUTBOUND_OWNER_GROUPS", inc.to_string()),
            ("ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE", exc.to_string()),
            (
                "ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR",
                self.lo_cidr.unwrap_or("127.0.0.1/32").to_string(),
            ),
        ]
    }

    /// A shell-like rendering for the pod `t`: env assignments then the flags.
    fn describe(&self, t: &Topology) -> String {
        let mut s = String::new();
        for (k, v) in self.env() {
            s.push_str(&format!("{k}='{v}' "));
        }
        for a in self.args(t) {
            if a.starts_with('-') {
                s.push_str(&a);
                s.push(' ');
            } else {
                s.push_str(&format!("'{a}' "));
            }
        }
        s.trim_end().to_string()
    }

    fn random(rng: &mut Rng) -> Self {
        let uids = rng.pick(&["1337", "1337", "1337,3", "3,1337"]);
        let gids = if rng.chance(1, 2) {
            None
        } else {
            Some(rng.pick(&["1337", "1337,3", "3,1337", "1337,2000", "2000,1337", "3"]))
        };
        let include = match rng.below(10) {
            0..=3 => Include::All,
            4 => Include::List(vec![]),
            _ => {
                let mut l = rng.subset(
                    &[
                        Net::UpV4Host,
                        Net::Link4,
                        Net::UpV6Host,
                        Net::Link6,
                        Net::ExV4Host,
                        Net::ExV6Subnet,
                    ],
                    2,
                    5,
                );
                if rng.chance(1, 4) {
                    l.push(rng.pick(&[Net::Lo53Host, Net::Lo8, Net::Lo6Host]));
                }
                if rng.chance(1, 4) {
                    l.push(rng.pick(&[Net::MappedLoHost, Net::Mapped10, Net::MappedUpHost]));
                }
                if l.is_empty() {
                    l.push(rng.pick(&[Net::UpV4Host, Net::Link4, Net::UpV6Host, Net::Link6]));
                }
                Include::List(l)
            }
        };
        let exclude = if rng.chance(1, 3) {
            vec![]
        } else {
            // Includes overlapping the include candidates (host routes inside included /24s).
            rng.subset(
                &[
                    Net::ExV4Subnet,
                    Net::ExV6Subnet,
                    Net::ExV4Host,
                    Net::ExV6Host,
                    Net::UpV4Host,
                    Net::UpV6Host,
                    Net::Link4,
                    Net::PodV4Host,
                    Net::Lo53Host,
                    Net::Mapped10,
                ],
                1,
                4,
            )
        };
        let q = if rng.chance(1, 2) {
            vec![]
        } else {
            rng.subset(&PORT_POOL[1..], 1, 2)
        };
        let o = if rng.chance(1, 2) {
            vec![]
        } else {
            rng.subset(&PORT_POOL, 1, 3)
        };
        let ipv6 = match rng.below(8) {
            0..=4 => Some(true),
            5 | 6 => Some(false),
            _ => None,
        };
        let groups = match rng.below(8) {
            0..=4 => Groups::All,
            5 => Groups::Include(rng.pick(&["2000", "2000,3000", "1000"])),
            _ => Groups::Exclude(rng.pick(&["2000", "2000,3000", "3000"])),
        };
        let lo_cidr = match rng.below(6) {
            0 => Some("127.0.0.0/8"),
            1 => Some("127.0.0.1/32"),
            2 => Some("127.0.0.0/16"),
            _ => None,
        };
        let sidecar = rng.chance(1, 6).then_some(SIDECAR_ALT);
        let inbound = match rng.below(8) {
            0 => Inbound::All(rng.subset(&[9080, 9081, 15090], 1, 2)),
            1 => {
                let mut b = rng.subset(&[8080, 9080, 9081], 1, 2);
                if b.is_empty() {
                    b.push(8080);
                }
                Inbound::List(b)
            }
            _ => Inbound::Off,
        };
        let tunnel = match rng.below(6) {
            0 => Some(TUNNEL_PORTS[1]),
            1 => Some(TUNNEL_PORTS[0]),
            _ => None,
        };
        Config {
            uids,
            gids,
            include,
            exclude,
            q,
            o,
            ipv6,
            groups,
            lo_cidr,
            sidecar,
            tunnel,
            inbound,
        }
    }

    /// Which interesting features this configuration exercises (for the coverage summary).
    fn features(&self) -> Vec<String> {
        let mut f = vec![format!("-u {}", self.uids)];
        f.push(match self.gids {
            None => "-g (default = uids)".into(),
            Some(g) => format!("-g {g}"),
        });
        match &self.include {
            Include::All => f.push("-i '*'".into()),
            Include::List(l) if l.is_empty() => f.push("-i ''".into()),
            Include::List(l) => {
                f.push("-i list".into());
                if l.iter().any(|n| n.is_loopback()) {
                    f.push("-i loopback (127/8, ::1, ::ffff:127.x)".into());
                }
                if l.iter().any(|n| n.is_v4_mapped()) {
                    f.push("-i v4-mapped".into());
                }
            }
        }
        if !self.exclude.is_empty() {
            f.push("-x".into());
            if self.exclude.iter().any(|n| n.is_v4_mapped()) {
                f.push("-x v4-mapped".into());
            }
            let overlap = match &self.include {
                Include::All => true,
                Include::List(l) => self
                    .exclude
                    .iter()
                    .any(|x| l.iter().any(|i| x.overlaps(*i))),
            };
            if overlap {
                f.push("-x overlapping -i".into());
            }
        }
        if !self.q.is_empty() {
            f.push("-q".into());
        }
        if !self.o.is_empty() {
            f.push("-o".into());
        }
        if self.q.iter().any(|p| self.o.contains(p)) {
            f.push("-q and -o share a port".into());
        }
        f.push(match self.ipv6 {
            Some(v) => format!("--ipv6 {v}"),
            None => "--ipv6 detected".into(),
        });
        match self.groups {
            Groups::All => {}
            Groups::Include(_) => f.push("owner groups include".into()),
            Groups::Exclude(_) => f.push("owner groups exclude".into()),
        }
        if let Some(c) = self.lo_cidr {
            f.push(format!("loopback CIDR {c}"));
        }
        if self.sidecar.is_some() {
            f.push("-p/-z non-default".into());
        }
        if let Some(e) = self.tunnel {
            f.push(format!("-e {e}"));
        }
        match self.inbound {
            Inbound::Off => {}
            Inbound::All(_) => f.push("-b '*' (inbound)".into()),
            Inbound::List(_) => f.push("-b list (inbound)".into()),
        }
        f
    }

    /// Hand-picked configurations that make sure the known quirks are always exercised.
    fn anchors() -> Vec<Config> {
        let b = Config::base;
        vec![
            // Istio's injected sidecar, plus an excluded range and port.
            Config {
                exclude: vec![Net::ExV4Subnet, Net::ExV6Subnet],
                o: vec![9999],
                inbound: Inbound::All(vec![15090, 15021, 15020]),
                ..b()
            },
            // Uid order quirk: "3,1337" lets the app-over-lo RETURN for uid 3 fire for 1337.
            Config {
                uids: "3,1337",
                ..b()
            },
            Config {
                uids: "1337,3",
                gids: Some("3,1337"),
                q: vec![7777],
                ..b()
            },
            // Include lists, an include inside 127/8, IPv6 off.
            Config {
                include: Include::List(vec![Net::UpV4Host, Net::UpV6Host, Net::Lo53Host]),
                q: vec![7777],
                ipv6: Some(false),
                ..b()
            },
            Config {
                include: Include::List(vec![Net::Link4, Net::Link6]),
                exclude: vec![Net::UpV4Host, Net::UpV6Host],
                ..b()
            },
            // Empty include: only -q ports are captured.
            Config {
                include: Include::List(vec![]),
                q: vec![7777, 9080],
                o: vec![9080],
                ..b()
            },
            // Owner groups, the loopback CIDR, other ports.
            Config {
                groups: Groups::Include("2000"),
                lo_cidr: Some("127.0.0.0/8"),
                ..b()
            },
            Config {
                groups: Groups::Exclude("2000,3000"),
                gids: Some("1337,2000"),
                sidecar: Some(SIDECAR_ALT),
                tunnel: Some(TUNNEL_PORTS[1]),
                inbound: Inbound::List(vec![8080, 9080]),
                ..b()
            },
            Config {
                include: Include::List(vec![Net::Lo8, Net::Link4]),
                lo_cidr: Some("127.0.0.0/16"),
                ipv6: None,
                ..b()
            },
            // v4-mapped include CIDRs: ::ffff:127.0.0.1 is loopback to Istio (the app-over-lo
            // rule goes, so the app's call to its own pod IP is captured by Link4), and a
            // mapped range matches no IPv4 destination, with IPv6 on and off.
            Config {
                include: Include::List(vec![Net::MappedLoHost, Net::Link4]),
                ..b()
            },
            Config {
                include: Include::List(vec![Net::MappedLoHost, Net::Mapped10]),
                ipv6: Some(false),
                ..b()
            },
            Config {
                include: Include::List(vec![Net::Mapped10, Net::MappedUpHost, Net::UpV6Host]),
                exclude: vec![Net::Mapped10],
                ..b()
            },
        ]
    }
}

// ---------------------------------------------------------------------------------------------
// Connections.

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Conn {
    uid: u32,
    gid: u32,
    dst: Dst,
    port: u16,
    /// Bound to Envoy's passthrough source (see [`Dst::passthrough_src`]).
    passthrough: bool,
}

impl Conn {
    fn addr(&self, t: &Topology) -> SocketAddr {
        SocketAddr::new(self.dst.ip(t), self.port)
    }

    fn src(&self) -> Option<IpAddr> {
        if self.passthrough {
            self.dst.passthrough_src()
        } else {
            None
        }
    }
}

impl fmt::Display for Conn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "uid {}/gid {} → {:?}:{}",
            self.uid, self.gid, self.dst, self.port
        )?;
        if let Some(s) = self.src() {
            write!(f, " from {s}")?;
        }
        Ok(())
    }
}

/// app; app in owner group 2000; app in group 3000; proxy uid; proxy gid only; second proxy
/// uid; proxy uid in an owner group; second proxy uid with the first's gid.
const CREDS: [(u32, u32); 8] = [
    (1000, 1000),
    (1000, 2000),
    (1000, 3000),
    (1337, 1337),
    (1000, 1337),
    (3, 3),
    (1337, 2000),
    (3, 1337),
];

/// The key cases (always run) plus a random sample of the full matrix, 24–36 in all.
fn connections(cfg: &Config, rng: &mut Rng) -> Vec<Conn> {
    let normal = 8080;
    let o_port = cfg.o.first().copied();
    let q_port = cfg.q.iter().copied().find(|p| !cfg.o.contains(p));
    let c = |uid, gid, dst, port, passthrough| Conn {
        uid,
        gid,
        dst,
        port,
        passthrough,
    };
    let mut out = vec![
        c(1000, 1000, Dst::UpV4, normal, false),
        c(1000, 1000, Dst::UpV6, normal, false),
        c(1000, 1000, Dst::ExV4, normal, false),
        c(1000, 1000, Dst::MappedUp, normal, false),
        c(1000, 1000, Dst::Lo4, normal, false),
        c(1000, 1000, Dst::Lo53, normal, false),
        c(1000, 1000, Dst::PodV4, normal, false),
        c(1337, 1337, Dst::UpV4, normal, false),
        c(1337, 1337, Dst::PodV4, normal, false),
        c(1337, 1337, Dst::PodV6, normal, false),
        c(1337, 1337, Dst::Lo53, normal, false),
        c(1337, 1337, Dst::PodV4, normal, true),
        c(1337, 1337, Dst::PodV4, cfg.tunnel_port(), false),
        c(3, 3, Dst::PodV4, normal, false),
        c(1000, 1337, Dst::PodV4, normal, false),
        c(1000, 2000, Dst::UpV4, normal, false),
    ];
    if let Some(p) = o_port {
        out.push(c(1000, 1000, Dst::UpV4, p, false));
    }
    if let Some(p) = q_port {
        out.push(c(1000, 1000, Dst::ExV4, p, false));
    }
    let mut ports: Vec<u16> = PORT_POOL.to_vec();
    ports.push(cfg.tunnel_port());
    let target = 24 + rng.below(13);
    let mut seen: HashSet<Conn> = out.iter().copied().collect();
    let mut guard = 0;
    while out.len() < target && guard < 1000 {
        guard += 1;
        let (uid, gid) = rng.pick(&CREDS);
        let dst = rng.pick(&ALL_DSTS);
        // Favour the ports the config names.
        let port = match rng.below(4) {
            0 if o_port.is_some() => rng.pick(&cfg.o),
            1 if !cfg.q.is_empty() => rng.pick(&cfg.q),
            _ => rng.pick(&ports),
        };
        let passthrough = dst.passthrough_src().is_some() && rng.chance(1, 3);
        let conn = c(uid, gid, dst, port, passthrough);
        if seen.insert(conn) {
            out.push(conn);
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Running the interceptor.

/// Variables the CLI reads (its flags' env fallbacks, Istio's env-only settings): removed so
/// the test's ambient environment cannot change the configuration; ours are then set.
fn is_cli_env(k: &str) -> bool {
    const NAMES: [&str; 19] = [
        "PROXY_UID",
        "PROXY_GID",
        "INBOUND_CAPTURE_PORT",
        "INBOUND_TUNNEL_PORT",
        "KUBE_VIRT_INTERFACES",
        "DRY_RUN",
        "REDIRECT_DNS",
        "CAPTURE_ALL_DNS",
        "DROP_INVALID",
        "INVALID_DROP",
        "RUN_VALIDATION",
        "SKIP_RULE_APPLY",
        "NETWORK_NAMESPACE",
        "ENVOY_USER",
        "RECONCILE",
        "CLEANUP_ONLY",
        "FORCE_APPLY",
        "NATIVE_NFTABLES",
        "FORCE_IPTABLES_BINARY",
    ];
    k.starts_with("ISTIO_")
        || (k.starts_with("INTERCEPTOR_") && k != "INTERCEPTOR_BIN")
        || NAMES.contains(&k)
}

fn run_cli(args: &[String], env: &[(&'static str, String)]) -> Output {
    let mut cmd = Command::new(interceptor_bin());
    cmd.args(args);
    for (k, _) in std::env::vars_os() {
        if k.to_str().is_some_and(is_cli_env) {
            cmd.env_remove(k);
        }
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("running interceptor")
}

fn apply(p: &DiffPod, flavor: Flavor, cfg: &Config) -> Result<()> {
    let t = p.topo();
    let mut args: Vec<String> = vec![
        "apply".into(),
        "--network-namespace".into(),
        t.pod_netns().to_str().context("netns path")?.into(),
        "--bpffs".into(),
        p.pod.ebpf.dir().to_str().context("bpffs path")?.into(),
    ];
    args.extend(flavor.args().iter().map(|s| s.to_string()));
    args.extend(cfg.args(t));
    let out = run_cli(&args, &cfg.env());
    ensure!(
        out.status.success(),
        "interceptor {args:?} ({flavor:?}) failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// `interceptor explain` for `conn` in the pod `t`: (redirect port or None, rule name).
fn explain(t: &Topology, cfg: &Config, conn: &Conn) -> Result<(Option<u16>, String)> {
    let mut args: Vec<String> = vec![
        "explain".into(),
        "--network-namespace".into(),
        t.pod_netns().to_str().context("netns path")?.into(),
        "--uid".into(),
        conn.uid.to_string(),
        "--gid".into(),
        conn.gid.to_string(),
        "--dst".into(),
        conn.addr(t).to_string(),
    ];
    if let Some(src) = conn.src() {
        args.push("--src".into());
        args.push(src.to_string());
    }
    args.extend(cfg.args(t));
    let out = run_cli(&args, &cfg.env());
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "interceptor {args:?} failed: {}{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut verdict = None;
    let mut rule = None;
    for l in stdout.lines() {
        if let Some(v) = l.strip_prefix("verdict: ") {
            verdict = Some(v.trim().to_string());
        } else if let Some(r) = l.strip_prefix("rule: ") {
            rule = Some(r.trim().to_string());
        }
    }
    let (Some(verdict), Some(rule)) = (verdict, rule) else {
        bail!("unexpected explain output: {stdout:?}");
    };
    let port = if verdict == "pass" {
        None
    } else if let Some(p) = verdict.strip_prefix("redirect ") {
        Some(
            p.parse::<u16>()
                .with_context(|| format!("verdict {verdict:?}"))?,
        )
    } else {
        bail!("unexpected verdict {verdict:?}");
    };
    Ok((port, rule))
}

// ---------------------------------------------------------------------------------------------
// Outcomes.

/// What one connection looked like, with addresses named relative to the pod.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    /// `sidecar:15001`, `app:8080`, `upstream:8080`, `refused`, `timeout`, …
    reply: String,
    /// `SO_ORIGINAL_DST` the sidecar read (only when the sidecar answered).
    orig: Option<String>,
    /// The address the sidecar saw the connection come from (only when it answered): with
    /// REDIRECT the client's own source, the pod IP for a destination off the pod.
    proxy_peer: Option<String>,
    /// The client's `getpeername()`.
    peer: Option<String>,
}

impl fmt::Display for Seen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.reply)?;
        if self.reply.starts_with("sidecar:") {
            write!(
                f,
                ", original dst {}, from {}",
                self.orig.as_deref().unwrap_or("(none)"),
                self.proxy_peer.as_deref().unwrap_or("(none)")
            )?;
        }
        if let Some(p) = &self.peer {
            write!(f, ", peer {p}")?;
        }
        Ok(())
    }
}

/// Makes the connection in pod `p` and records what happened.
fn observe(p: &DiffPod, conn: &Conn) -> Result<Seen> {
    let t = p.topo();
    p.take_sidecar_records();
    let dst = conn.addr(t);
    let res = connect_as(
        t.pod_netns(),
        conn.uid,
        conn.gid,
        dst,
        conn.src(),
        CONNECT_TIMEOUT,
    );
    let recs = p.take_sidecar_records();
    let out = match res {
        Ok(o) => o,
        Err(e) => {
            let Some(ce) = e.downcast_ref::<ConnectError>() else {
                return Err(e.context(format!("connecting {conn}")));
            };
            let reply = if ce.is_refused() {
                "refused".to_string()
            } else if ce.is_timeout() {
                "timeout".to_string()
            } else {
                format!("error ({ce})")
            };
            return Ok(Seen {
                reply,
                orig: None,
                proxy_peer: None,
                peer: None,
            });
        }
    };
    let rec = match out.reply.strip_prefix("sidecar:") {
        Some(port) => {
            let port: u16 = port.parse().unwrap_or(0);
            recs.iter().find(|r| r.listener_port == port)
        }
        None => None,
    };
    Ok(Seen {
        reply: out.reply,
        orig: rec.and_then(|r| r.original_dst).map(|a| sym(t, a)),
        proxy_peer: rec.map(|r| sym_ip(t, r.peer.ip().to_canonical())),
        peer: Some(sym(t, out.peer)),
    })
}

/// What `explain`'s verdict means for the observable outcome in pod `t`.
fn expected(t: &Topology, conn: &Conn, redirect: Option<u16>) -> Seen {
    let dst = conn.addr(t);
    match redirect {
        Some(port) => {
            // The proxy's socket family follows the wire: a v4-mapped destination is IPv4, so
            // its SO_ORIGINAL_DST is the plain IPv4 address.
            let orig = SocketAddr::new(dst.ip().to_canonical(), dst.port());
            Seen {
                reply: format!("sidecar:{port}"),
                orig: Some(sym(t, orig)),
                proxy_peer: Some(sym_ip(t, kernel_source(t, conn))),
                peer: Some(sym(t, dst)),
            }
        }
        None => Seen {
            reply: if conn.dst.is_local() {
                format!("app:{}", conn.port)
            } else {
                format!("upstream:{}", conn.port)
            },
            orig: None,
            proxy_peer: None,
            peer: Some(sym(t, dst)),
        },
    }
}

/// The source the kernel gives the client's connection (what a REDIRECT leaves for the proxy
/// to see): the one it bound, else loopback for loopback, the destination itself for one of the
/// pod's own addresses (the local route's preferred source), else the pod's address of the
/// family on the wire (IPv4 for a v4-mapped destination).
fn kernel_source(t: &Topology, conn: &Conn) -> IpAddr {
    if let Some(s) = conn.src() {
        return s.to_canonical();
    }
    match conn.dst {
        Dst::Lo4 | Dst::Lo53 | Dst::MappedLo => Ipv4Addr::LOCALHOST.into(),
        Dst::Lo6 => Ipv6Addr::LOCALHOST.into(),
        Dst::PodV4 | Dst::MappedPod | Dst::UpV4 | Dst::ExV4 | Dst::MappedUp => t.pod_v4().into(),
        Dst::PodV6 | Dst::UpV6 | Dst::ExV6 => t.pod_v6().into(),
    }
}

// ---------------------------------------------------------------------------------------------
// The test.

struct Disagreement {
    config: usize,
    text: String,
}

#[test]
fn iptables_nftables_ebpf_and_explain_agree() {
    // Build the CLI first (bin.rs does so on first use) so the timing is the test's own.
    interceptor_bin();
    let started = Instant::now();
    let seed = seed();
    let n_configs: usize = std::env::var("DIFF_CONFIGS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            // Under emulation (vm-test's TCG guests) the anchors alone: the full draw would
            // not fit the guest's time. The count is printed below.
            if interceptor_tests::time_scale() > 2.0 {
                Config::anchors().len()
            } else {
                DEFAULT_CONFIGS
            }
        });
    let keep_going = std::env::var("DIFF_KEEP_GOING").is_ok_and(|v| v == "1");
    println!("differential: seed {seed:#x} (override with DIFF_SEED), {n_configs} configurations");
    let mut rng = Rng(seed);
    let mut configs = Config::anchors();
    configs.truncate(n_configs);
    while configs.len() < n_configs {
        configs.push(Config::random(&mut rng));
    }

    let mut total = 0usize;
    let mut agreed = 0usize;
    // Per backend: (connections, agreeing with explain).
    let mut per_backend: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    // Connections on IPv6 with IPv6 off, where nftables is held to the weaker check.
    let mut nft_ipv6_off = 0usize;
    let mut rules: BTreeMap<String, usize> = BTreeMap::new();
    let mut replies: BTreeMap<String, usize> = BTreeMap::new();
    let mut disagreements: Vec<Disagreement> = Vec::new();
    let mut coverage: BTreeMap<String, usize> = BTreeMap::new();
    for cfg in &configs {
        for f in cfg.features() {
            *coverage.entry(f).or_default() += 1;
        }
    }
    println!("configuration features (configs using each): {coverage:?}");
    for (i, cfg) in configs.iter().enumerate() {
        let t0 = Instant::now();
        let flavor = if i % 2 == 0 {
            Flavor::IptablesNft
        } else {
            Flavor::IptablesLegacy
        };
        let conns = connections(cfg, &mut rng);
        let ipt = DiffPod::new("dfi").unwrap_or_else(|e| panic!("pod: {e:#}"));
        let nft = DiffPod::new("dfn").unwrap_or_else(|e| panic!("pod: {e:#}"));
        let ebpf = DiffPod::new("dfe").unwrap_or_else(|e| panic!("pod: {e:#}"));
        let desc = cfg.describe(ipt.topo());
        apply(&ipt, flavor, cfg).unwrap_or_else(|e| panic!("config #{i}: {e:#}"));
        apply(&nft, Flavor::Nftables, cfg).unwrap_or_else(|e| panic!("config #{i}: {e:#}"));
        apply(&ebpf, Flavor::Ebpf, cfg).unwrap_or_else(|e| panic!("config #{i}: {e:#}"));
        let mut bad = 0;
        for conn in &conns {
            total += 1;
            let (redirect, rule) = explain(ipt.topo(), cfg, conn)
                .unwrap_or_else(|e| panic!("config #{i} [{desc}] {conn}: explain: {e:#}"));
            let want = expected(ipt.topo(), conn, redirect);
            let a = observe(&ipt, conn)
                .unwrap_or_else(|e| panic!("config #{i} {conn} ({flavor:?}): {e:#}"));
            let n = observe(&nft, conn)
                .unwrap_or_else(|e| panic!("config #{i} {conn} (Nftables): {e:#}"));
            let b =
                observe(&ebpf, conn).unwrap_or_else(|e| panic!("config #{i} {conn} (Ebpf): {e:#}"));
            *rules.entry(rule.clone()).or_default() += 1;
            *replies
                .entry(want.reply.split(':').next().unwrap_or("").to_string())
                .or_default() += 1;
            for (backend, seen) in [(flavor, &a), (Flavor::Nftables, &n), (Flavor::Ebpf, &b)] {
                if backend == Flavor::Nftables && rule == "ipv6_disabled" {
                    continue;
                }
                let tally = per_backend.entry(format!("{backend:?}")).or_default();
                tally.0 += 1;
                if *seen == want {
                    tally.1 += 1;
                }
            }
            // Istio's nftables rules act on IPv6 even with IPv6 off (see the top of the file).
            let nft_inet_only = rule == "ipv6_disabled";
            let nft_ok = if nft_inet_only {
                nft_ipv6_off_acceptable(ipt.topo(), conn, cfg, &n, &want)
            } else {
                n == want
            };
            if nft_inet_only {
                nft_ipv6_off += 1;
            }
            if a == want && nft_ok && b == want {
                agreed += 1;
                continue;
            }
            bad += 1;
            let text = format!(
                "config #{i}: {desc}\n  \
                 (nftables pod's addresses: {}; eBPF pod's: {})\n  \
                 connection: {conn} (dialed {} in the iptables pod)\n  \
                 {:<16} {a}\n  {:<16} {n}\n  {:<16} {b}\n  {:<16} {want}   [explain: {}, rule {rule}]",
                nft.topo().describe_addrs(),
                ebpf.topo().describe_addrs(),
                conn.addr(ipt.topo()),
                format!("{flavor:?}:"),
                "Nftables:",
                "Ebpf:",
                "explain:",
                match redirect {
                    Some(p) => format!("redirect {p}"),
                    None => "pass".into(),
                },
            );
            eprintln!("DISAGREEMENT {text}\n");
            disagreements.push(Disagreement { config: i, text });
            if !keep_going {
                break;
            }
        }
        println!(
            "config #{i:>2} ({flavor:?}): {} connections, {} disagreed, {} ms — {desc}",
            conns.len(),
            bad,
            t0.elapsed().as_millis()
        );
        if !disagreements.is_empty() && !keep_going {
            break;
        }
    }
    let elapsed = started.elapsed();
    println!("rules exercised (per explain): {rules:?}");
    println!("expected answers: {replies:?}");
    println!(
        "differential: {} configurations, {total} connections, {agreed} agreed in all backends, {} disagreements (seed {seed:#x})",
        configs.len(),
        disagreements.len()
    );
    for (backend, (n, ok)) in &per_backend {
        println!("differential: {backend}: {ok}/{n} agree with explain");
    }
    println!(
        "differential: Nftables: {nft_ipv6_off} IPv6 connections with IPv6 off held to \"passed or \
         redirected to the proxy\" (Istio's inet rules act on IPv6 too)"
    );
    println!("differential: took {:.1} s", elapsed.as_secs_f64());
    if !disagreements.is_empty() {
        let configs_hit: HashSet<usize> = disagreements.iter().map(|d| d.config).collect();
        panic!(
            "{} disagreement(s) in {} configuration(s); first:\n{}",
            disagreements.len(),
            configs_hit.len(),
            disagreements[0].text
        );
    }
}

/// With IPv6 off, what Istio's nftables rules may do to an IPv6 connection that iptables and
/// eBPF leave alone (`want`): the same, or a redirect to the proxy's outbound port that keeps
/// the original destination (never another port, never a broken connection).
fn nft_ipv6_off_acceptable(
    ipt: &Topology,
    conn: &Conn,
    cfg: &Config,
    seen: &Seen,
    want: &Seen,
) -> bool {
    if seen == want {
        return true;
    }
    let proxy = cfg.sidecar.map_or(15001, |(p, _)| p);
    *seen == expected(ipt, conn, Some(proxy))
}

/// The address bytes of a pod, for failure messages (`X` differs between the two pods).
trait DescribeAddrs {
    fn describe_addrs(&self) -> String;
}

impl DescribeAddrs for Topology {
    fn describe_addrs(&self) -> String {
        format!(
            "pod {} / {}, upstream {} / {}",
            self.pod_v4(),
            self.pod_v6(),
            self.upstream_v4(),
            self.upstream_v6()
        )
    }
}
