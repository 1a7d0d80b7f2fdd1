//! Escape scenarios: inbound. Istio's ISTIO_INBOUND (nat PREROUTING) captures inbound TCP to
//! every local address of the pod, whatever the address and whenever it appeared: a second IP,
//! a Multus-like second interface, a re-addressed pod, the IPv6 link-local address. Each
//! scenario registers the pod first, then changes its addressing, then connects from outside
//! and records which listener answered (the app, or the sidecar's 15006); the eBPF datapath
//! must answer exactly as iptables-nft does, and the sidecar must read the right original
//! destination.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use interceptor_tests::cases::{apply, Flavor, Pod, APP_EXCLUDED_PORT, APP_PORT, APP_UID};
use interceptor_tests::topology::{Ns, Topology};

use super::common::BACKENDS;

/// Istio's inbound flags: every port but the excluded one, IPv6 on.
const FLAGS: &[&str] = &["-b", "*", "-d", "9081", "--ipv6", "true"];
const PROXY: &str = "sidecar:15006";

/// Where a probe connection comes from.
#[derive(Clone, Copy, Debug)]
enum From {
    /// The upstream netns (inbound from outside the pod).
    Outside,
    /// The app inside the pod (uid 1000).
    App,
}

/// One probe: a connection and the listener Istio's rules send it to.
struct Probe {
    what: String,
    from: From,
    dst: SocketAddr,
    want: String,
}

fn probe(what: &str, from: From, dst: SocketAddr, want: &str) -> Probe {
    Probe {
        what: what.to_string(),
        from,
        dst,
        want: want.to_string(),
    }
}

/// Captured: inbound to `ip` on the app port reaches the proxy; the excluded port the app.
fn captured_at(what: &str, ip: IpAddr) -> Vec<Probe> {
    vec![
        probe(what, From::Outside, SocketAddr::new(ip, APP_PORT), PROXY),
        probe(
            &format!("{what}, excluded port"),
            From::Outside,
            SocketAddr::new(ip, APP_EXCLUDED_PORT),
            &format!("app:{APP_EXCLUDED_PORT}"),
        ),
    ]
}

/// Who answered `p` (or how it failed); a proxy answer also names a wrong original
/// destination, so a capture that loses the address does not count as a capture.
fn reached(pod: &Pod, p: &Probe) -> String {
    pod.sidecar.take_records();
    let out = match p.from {
        From::Outside => pod.topo.inbound_connect(p.dst, None),
        From::App => pod.topo.connect_from_pod(APP_UID, APP_UID, p.dst),
    };
    let out = match out {
        Ok(o) => o,
        Err(e) => return format!("failed: {e:#}"),
    };
    if out.reply == PROXY {
        let orig = pod
            .sidecar
            .take_records()
            .first()
            .and_then(|r| r.original_dst);
        let same = orig.is_some_and(|o| o.ip() == p.dst.ip() && o.port() == p.dst.port());
        if !same {
            return format!("{PROXY} (original dst {orig:?})");
        }
    }
    out.reply
}

/// Registers a pod on each backend, applies `change` to its addressing, runs the probes it
/// returns; every probe must reach what Istio's rules make it reach, on both backends.
fn scenario(tag: &str, change: impl Fn(&Topology) -> Result<Vec<Probe>>) {
    let mut table: Vec<(Flavor, String, String, String)> = Vec::new();
    for flavor in BACKENDS {
        let pod = Pod::new(tag).unwrap();
        apply(&pod, flavor, FLAGS).unwrap();
        let probes = change(&pod.topo)
            .with_context(|| format!("{tag}: changing the pod's addressing"))
            .unwrap();
        for p in &probes {
            let got = reached(&pod, p);
            println!(
                "{tag} {flavor:?}: {} ({}, from {:?}) -> {got} (want {})",
                p.what, p.dst, p.from, p.want
            );
            table.push((flavor, p.what.clone(), got, p.want.clone()));
        }
    }
    let bad: Vec<String> = table
        .iter()
        .filter(|(_, _, got, want)| got != want)
        .map(|(f, what, got, want)| format!("{f:?}: {what}: reached {got}, want {want}"))
        .collect();
    assert!(bad.is_empty(), "{tag}:\n{}", bad.join("\n"));
}

fn ip_in(topo: &Topology, ns: Ns, args: &[&str]) -> Result<String> {
    topo.exec_in(ns, "ip", args, None)
}

/// Adds `cidr` to `dev` (IPv6 without duplicate address detection: usable at once).
fn add_addr(topo: &Topology, ns: Ns, dev: &str, cidr: &str) -> Result<()> {
    let mut args = vec!["addr", "add", cidr, "dev", dev];
    if cidr.contains(':') {
        args.push("nodad");
    }
    ip_in(topo, ns, &args).map(|_| ())
}

fn v6(topo: &Topology, second: u16, last: u16) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, second, topo.index().into(), 0, 0, 0, 0, last)
}

fn v4(topo: &Topology, second: u8, last: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, second, topo.index(), last)
}

/// The link-local address of `dev` in `ns` once duplicate address detection is done, and the
/// interface's index there.
fn link_local(topo: &Topology, ns: Ns, dev: &str) -> Result<(Ipv6Addr, u32)> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = ip_in(
            topo,
            ns,
            &["-o", "-6", "addr", "show", "dev", dev, "scope", "link"],
        )?;
        let ready = out.lines().find(|l| !l.contains("tentative"));
        if let Some(l) = ready {
            let index: u32 = l
                .split(':')
                .next()
                .and_then(|n| n.trim().parse().ok())
                .with_context(|| format!("no interface index in {l:?}"))?;
            let addr = l
                .split_whitespace()
                .skip_while(|w| *w != "inet6")
                .nth(1)
                .and_then(|a| a.split('/').next())
                .and_then(|a| a.parse().ok())
                .with_context(|| format!("no address in {l:?}"))?;
            return Ok((addr, index));
        }
        if Instant::now() > deadline {
            bail!("{dev} has no usable link-local address: {out}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Control: the addresses known at registration are captured (v4 and v6).
#[test]
fn baseline_registered_addresses_captured() {
    scenario("inbase", |t| {
        let mut p = captured_at("registered v4", t.pod_v4().into());
        p.extend(captured_at("registered v6", t.pod_v6().into()));
        Ok(p)
    });
}

/// What must stay uncaptured: the app's own loopback connections (127.0.0.1, another 127/8
/// address, ::1) and, on an address added after registration, the excluded inbound port.
#[test]
fn loopback_and_excluded_port_not_captured() {
    scenario("inlo", |t| {
        let a = v4(t, 200, 31);
        add_addr(t, Ns::Pod, "eth0", &format!("{a}/24"))?;
        let mut p: Vec<Probe> = [
            SocketAddr::from((Ipv4Addr::LOCALHOST, APP_PORT)),
            SocketAddr::from((Ipv4Addr::new(127, 0, 0, 9), APP_PORT)),
            SocketAddr::from((Ipv6Addr::LOCALHOST, APP_PORT)),
        ]
        .into_iter()
        .map(|dst| probe(&format!("app to {dst}"), From::App, dst, "app:9080"))
        .collect();
        p.push(probe(
            "new v4, excluded port",
            From::Outside,
            SocketAddr::new(a.into(), APP_EXCLUDED_PORT),
            &format!("app:{APP_EXCLUDED_PORT}"),
        ));
        Ok(p)
    });
}

/// A second IPv4 address on eth0, added after registration.
#[test]
fn ipv4_address_added_after_registration() {
    scenario("innew4", |t| {
        let a = v4(t, 200, 11);
        add_addr(t, Ns::Pod, "eth0", &format!("{a}/24"))?;
        Ok(captured_at("new v4", a.into()))
    });
}

/// A second IPv6 address on eth0, added after registration.
#[test]
fn ipv6_address_added_after_registration() {
    scenario("innew6", |t| {
        let a = v6(t, 0x200, 0x11);
        add_addr(t, Ns::Pod, "eth0", &format!("{a}/64"))?;
        Ok(captured_at("new v6", a.into()))
    });
}

/// A Multus-like second interface (its own link, its own subnets), added after registration.
#[test]
fn second_interface_added_after_registration() {
    scenario("innic", |t| {
        let up = t.upstream_ns_name();
        #[rustfmt::skip]
        ip_in(t, Ns::Pod, &["link", "add", "eth1", "type", "veth", "peer", "name", "vpod1", "netns", up])?;
        ip_in(t, Ns::Pod, &["link", "set", "eth1", "up"])?;
        ip_in(t, Ns::Upstream, &["link", "set", "vpod1", "up"])?;
        let (a4, a6) = (v4(t, 202, 1), v6(t, 0x202, 1));
        add_addr(t, Ns::Pod, "eth1", &format!("{a4}/24"))?;
        add_addr(t, Ns::Pod, "eth1", &format!("{a6}/64"))?;
        add_addr(t, Ns::Upstream, "vpod1", &format!("{}/24", v4(t, 202, 2)))?;
        add_addr(t, Ns::Upstream, "vpod1", &format!("{}/64", v6(t, 0x202, 2)))?;
        let mut p = captured_at("eth1 v4", a4.into());
        p.extend(captured_at("eth1 v6", a6.into()));
        Ok(p)
    });
}

/// The pod's registered addresses removed and new ones given (re-addressed pod).
#[test]
fn readdressed_pod() {
    scenario("inreaddr", |t| {
        ip_in(
            t,
            Ns::Pod,
            &["addr", "del", &format!("{}/24", t.pod_v4()), "dev", "eth0"],
        )?;
        ip_in(
            t,
            Ns::Pod,
            &["addr", "del", &format!("{}/64", t.pod_v6()), "dev", "eth0"],
        )?;
        let (a4, a6) = (v4(t, 200, 21), v6(t, 0x200, 0x21));
        add_addr(t, Ns::Pod, "eth0", &format!("{a4}/24"))?;
        add_addr(t, Ns::Pod, "eth0", &format!("{a6}/64"))?;
        let mut p = captured_at("re-addressed v4", a4.into());
        p.extend(captured_at("re-addressed v6", a6.into()));
        Ok(p)
    });
}

/// Inbound to the pod's own fe80:: link-local address on eth0 (never registered).
#[test]
fn ipv6_link_local_address() {
    scenario("inll", |t| {
        let (pod_ll, _) = link_local(t, Ns::Pod, "eth0")?;
        // The client's side: its own link-local must be usable too, and the scope is its vpod.
        let (_, up_index) = link_local(t, Ns::Upstream, "vpod")?;
        let at = |port| SocketAddr::V6(SocketAddrV6::new(pod_ll, port, 0, up_index));
        Ok(vec![
            probe("link-local", From::Outside, at(APP_PORT), PROXY),
            probe(
                "link-local, excluded port",
                From::Outside,
                at(APP_EXCLUDED_PORT),
                &format!("app:{APP_EXCLUDED_PORT}"),
            ),
        ])
    });
}
