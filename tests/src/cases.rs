//! The e2e traffic cases every backend must pass, with the same assertions: a pod netns with an
//! app, a test sidecar (15001/15006) and an upstream, interception installed through the real
//! `interceptor apply` CLI, and real connections.

use std::net::{IpAddr, SocketAddr};

use anyhow::{ensure, Context, Result};

use crate::bin;
use crate::ebpf::EbpfInstall;
use crate::sidecar::{Sidecar, TagServer};
use crate::topology::Topology;

/// How `interceptor apply` is asked for one backend flavour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    IptablesLegacy,
    IptablesNft,
    Nftables,
    Ebpf,
}

impl Flavor {
    pub fn args(self) -> &'static [&'static str] {
        match self {
            Flavor::IptablesLegacy => {
                &["--backend", "iptables", "--force-iptables-binary", "legacy"]
            }
            Flavor::IptablesNft => &["--backend", "iptables", "--force-iptables-binary", "nft"],
            Flavor::Nftables => &["--backend", "nftables"],
            Flavor::Ebpf => &["--backend", "ebpf"],
        }
    }

    /// The flavour in words, for output people read.
    pub fn words(self) -> &'static str {
        match self {
            Flavor::IptablesLegacy => "iptables-legacy",
            Flavor::IptablesNft => "iptables-nft",
            Flavor::Nftables => "nftables",
            Flavor::Ebpf => "eBPF",
        }
    }

    /// Every backend captures inbound (eBPF through sk_lookup).
    pub fn has_inbound(self) -> bool {
        true
    }
}

pub const APP_PORT: u16 = 9080;
pub const APP_EXCLUDED_PORT: u16 = 9081;
pub const UPSTREAM_PORT: u16 = 8080;
pub const EXCLUDED_OUT_PORT: u16 = 9999;
pub const INCLUDED_OUT_PORT: u16 = 7777;
pub const APP_UID: u32 = 1000;

thread_local! {
    /// Extra environment of every `apply` this thread runs (see `with_apply_env`).
    static APPLY_ENV: std::cell::RefCell<Vec<(String, String)>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` with `env` added to every `interceptor apply` it runs on this thread (the test's
/// own), e.g. a test-only `INTERCEPTOR_FAULT`.
pub fn with_apply_env<T>(env: &[(&str, &str)], f: impl FnOnce() -> T) -> T {
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            APPLY_ENV.with(|e| e.borrow_mut().clear());
        }
    }
    APPLY_ENV.with(|e| {
        *e.borrow_mut() = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    });
    let _reset = Reset;
    f()
}

/// Runs `interceptor apply` for the pod with `flavor`; an error carries its stderr.
pub fn apply(pod: &Pod, flavor: Flavor, extra: &[&str]) -> Result<String> {
    apply_in(pod.topo.pod_netns(), pod.ebpf.dir(), flavor, extra)
}

/// Runs `interceptor apply` for the netns at `netns` (eBPF pins under `bpffs`) with `flavor`;
/// an error carries its stderr.
pub fn apply_in(
    netns: &std::path::Path,
    bpffs: &std::path::Path,
    flavor: Flavor,
    extra: &[&str],
) -> Result<String> {
    let ns = netns.to_str().context("netns path")?;
    let bpffs = bpffs.to_str().context("bpffs path")?;
    let mut args = vec!["apply", "--network-namespace", ns, "--bpffs", bpffs];
    args.extend_from_slice(flavor.args());
    args.extend_from_slice(extra);
    let env = APPLY_ENV.with(|e| e.borrow().clone());
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let out = bin::run(&args, &env);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    ensure!(
        out.status.success(),
        "interceptor {args:?} failed: {stderr}"
    );
    Ok(stderr)
}

/// Everything rule-like in the pod netns, for "cleanup leaves the ruleset as it was":
/// rules and non-builtin chains of both iptables variants (empty builtin tables that
/// iptables-nft leaves behind are not rules) and the full nft ruleset minus iptables-nft's
/// own tables.
pub fn ruleset(topo: &Topology) -> String {
    let mut out = String::new();
    for prog in [
        "iptables-legacy-save",
        "ip6tables-legacy-save",
        "iptables-nft-save",
        "ip6tables-nft-save",
    ] {
        let text = topo.pod_exec(prog, &[], None).unwrap_or_default();
        for l in text.lines() {
            let builtin_decl = l.starts_with(':')
                && ["PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"]
                    .iter()
                    .any(|c| l[1..].starts_with(c));
            if l.starts_with("-A") || (l.starts_with(':') && !builtin_decl) {
                out.push_str(&format!("{prog}: {l}\n"));
            }
        }
    }
    let nft = topo
        .pod_exec("nft", &["list", "ruleset"], None)
        .unwrap_or_default();
    let mut skip = false;
    for l in nft.lines() {
        if l.starts_with("table ") {
            // iptables-nft's tables are covered by its save output above.
            skip = !l.contains("istio");
        }
        if !skip {
            out.push_str(&format!("nft: {l}\n"));
        }
    }
    out
}

/// The pod: sidecar, app servers and upstream servers running.
pub struct Pod {
    /// Declared first so it is dropped last among the servers but before the topology.
    pub ebpf: EbpfInstall,
    pub topo: Topology,
    pub sidecar: Sidecar,
    _app: TagServer,
    _upstream: TagServer,
}

impl Pod {
    pub fn new(tag: &str) -> Result<Self> {
        let topo = Topology::new(tag)?;
        let sidecar = Sidecar::start(&topo)?;
        let app = TagServer::spawn(
            topo.pod_netns(),
            "app",
            &[APP_PORT, APP_EXCLUDED_PORT],
            None,
        )?;
        let upstream = TagServer::spawn(
            topo.upstream_netns(),
            "upstream",
            &[UPSTREAM_PORT, EXCLUDED_OUT_PORT, INCLUDED_OUT_PORT],
            None,
        )?;
        Ok(Self {
            ebpf: EbpfInstall::new(tag),
            topo,
            sidecar,
            _app: app,
            _upstream: upstream,
        })
    }

    /// An app connection (uid 1000) to `dst`: returns (who answered, original dst the sidecar
    /// read if it answered, the app's getpeername()).
    pub fn outbound(
        &self,
        uid: u32,
        dst: SocketAddr,
    ) -> Result<(String, Option<SocketAddr>, SocketAddr)> {
        self.sidecar.take_records();
        let out = self
            .topo
            .connect_from_pod(uid, uid, dst)
            .with_context(|| format!("connect to {dst} as {uid}"))?;
        let rec = self.sidecar.take_records();
        Ok((
            out.reply,
            rec.first().and_then(|r| r.original_dst),
            out.peer,
        ))
    }
}

fn sa(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

/// Istio's injected sidecar flags plus an excluded port and CIDR: every outbound case.
pub fn outbound_defaults(flavor: Flavor) -> Result<usize> {
    let pod = Pod::new("out")?;
    let t = &pod.topo;
    let (x4, x6) = (t.excluded_v4_cidr(), t.excluded_v6_cidr());
    let exclude = format!("{x4},{x6}");
    let excl_port = EXCLUDED_OUT_PORT.to_string();
    let mut flags = vec![
        "-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-x",
    ];
    flags.extend_from_slice(&[&exclude, "-o", &excl_port, "--ipv6", "true"]);
    if flavor.has_inbound() {
        flags.extend_from_slice(&["-b", "*", "-d", "9081,15090,15021,15020"]);
    }
    apply(&pod, flavor, &flags)?;
    let mut checked = 0;
    for up in [
        sa(t.upstream_v4(), UPSTREAM_PORT),
        sa(t.upstream_v6(), UPSTREAM_PORT),
    ] {
        let (who, orig, peer) = pod.outbound(APP_UID, up)?;
        ensure!(
            who == "sidecar:15001",
            "{flavor:?}: app → {up} answered by {who}, want the sidecar"
        );
        ensure!(
            orig == Some(up),
            "{flavor:?}: SO_ORIGINAL_DST {orig:?}, want {up}"
        );
        ensure!(
            peer == up,
            "{flavor:?}: app's getpeername {peer}, want {up}"
        );
        // The sidecar sees the connection come from the app's own source, the pod IP, as a
        // REDIRECT shows it (not from loopback).
        pod.sidecar.take_records();
        let out = t.connect_from_pod(APP_UID, APP_UID, up)?;
        let from = pod.sidecar.take_records().first().map(|r| r.peer);
        let pod_ip: IpAddr = match up {
            SocketAddr::V4(_) => t.pod_v4().into(),
            SocketAddr::V6(_) => t.pod_v6().into(),
        };
        ensure!(
            from == Some(out.local) && out.local.ip() == pod_ip,
            "{flavor:?}: the sidecar saw app → {up} come from {from:?} (the app's socket is {}), \
             want the pod IP {pod_ip}",
            out.local
        );
        let (who, _, _) = pod.outbound(1337, up)?;
        ensure!(
            who == format!("upstream:{UPSTREAM_PORT}"),
            "{flavor:?}: proxy uid → {up} answered by {who}"
        );
        let ex = sa(up.ip(), EXCLUDED_OUT_PORT);
        let (who, _, _) = pod.outbound(APP_UID, ex)?;
        ensure!(
            who == format!("upstream:{EXCLUDED_OUT_PORT}"),
            "{flavor:?}: excluded port {ex} answered by {who}"
        );
        checked += 4;
    }
    for ex in [
        sa(t.excluded_v4(), UPSTREAM_PORT),
        sa(t.excluded_v6(), UPSTREAM_PORT),
    ] {
        let (who, _, _) = pod.outbound(APP_UID, ex)?;
        ensure!(
            who == format!("upstream:{UPSTREAM_PORT}"),
            "{flavor:?}: excluded CIDR {ex} answered by {who}"
        );
        checked += 1;
    }
    // Loopback: the app talking to itself is not captured.
    for lo in [
        sa(std::net::Ipv4Addr::LOCALHOST, APP_PORT),
        sa(std::net::Ipv6Addr::LOCALHOST, APP_PORT),
    ] {
        let (who, _, _) = pod.outbound(APP_UID, lo)?;
        ensure!(
            who == format!("app:{APP_PORT}"),
            "{flavor:?}: loopback {lo} answered by {who}"
        );
        checked += 1;
    }
    if flavor.has_inbound() {
        for pod_ip in [IpAddr::from(t.pod_v4()), IpAddr::from(t.pod_v6())] {
            let dst = sa(pod_ip, APP_PORT);
            pod.sidecar.take_records();
            let out = t.inbound_connect(dst, None)?;
            ensure!(
                out.reply == "sidecar:15006",
                "{flavor:?}: inbound {dst} answered by {}",
                out.reply
            );
            let rec = pod.sidecar.take_records();
            ensure!(
                rec.first().and_then(|r| r.original_dst) == Some(dst),
                "{flavor:?}: inbound original dst {rec:?}"
            );
            let dst = sa(pod_ip, APP_EXCLUDED_PORT);
            let out = t.inbound_connect(dst, None)?;
            ensure!(
                out.reply == format!("app:{APP_EXCLUDED_PORT}"),
                "{flavor:?}: excluded inbound {dst} answered by {}",
                out.reply
            );
            checked += 2;
        }
    }
    Ok(checked)
}

/// Include lists instead of `*`: only the listed CIDRs and ports are captured.
pub fn outbound_includes(flavor: Flavor) -> Result<usize> {
    let pod = Pod::new("inc")?;
    let t = &pod.topo;
    let include = format!("{}/32,{}/128", t.upstream_v4(), t.upstream_v6());
    let port = INCLUDED_OUT_PORT.to_string();
    apply(
        &pod,
        flavor,
        &["-i", &include, "-q", &port, "--ipv6", "true"],
    )?;
    let mut checked = 0;
    for (up, ex) in [
        (IpAddr::from(t.upstream_v4()), IpAddr::from(t.excluded_v4())),
        (IpAddr::from(t.upstream_v6()), IpAddr::from(t.excluded_v6())),
    ] {
        let (who, orig, _) = pod.outbound(APP_UID, sa(up, UPSTREAM_PORT))?;
        ensure!(
            who == "sidecar:15001" && orig == Some(sa(up, UPSTREAM_PORT)),
            "{flavor:?}: included CIDR {up}: {who} {orig:?}"
        );
        let (who, _, _) = pod.outbound(APP_UID, sa(ex, UPSTREAM_PORT))?;
        ensure!(
            who == format!("upstream:{UPSTREAM_PORT}"),
            "{flavor:?}: not-included {ex} answered by {who}"
        );
        let (who, orig, _) = pod.outbound(APP_UID, sa(ex, INCLUDED_OUT_PORT))?;
        ensure!(
            who == "sidecar:15001" && orig == Some(sa(ex, INCLUDED_OUT_PORT)),
            "{flavor:?}: included port {ex}:{INCLUDED_OUT_PORT}: {who} {orig:?}"
        );
        checked += 3;
    }
    Ok(checked)
}
