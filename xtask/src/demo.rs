//! The live demo: the same pod config under the eBPF backend and the iptables backend, with the
//! connections an app and its proxy make, and what the sidecar saw.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use anyhow::{Context, Result};
use interceptor_tests::cases::{apply, Flavor, Pod, APP_PORT, EXCLUDED_OUT_PORT, UPSTREAM_PORT};
use interceptor_tests::topology::connect_as;

/// One connection of the demo, in terms independent of a pod's addresses.
struct Probe {
    what: &'static str,
    uid: u32,
    dst: fn(&Pod) -> SocketAddr,
}

const PROBES: &[Probe] = &[
    Probe {
        what: "app → upstream (v4)",
        uid: 1000,
        dst: |p| SocketAddr::new(p.topo.upstream_v4().into(), UPSTREAM_PORT),
    },
    Probe {
        what: "app → upstream (v6)",
        uid: 1000,
        dst: |p| SocketAddr::new(p.topo.upstream_v6().into(), UPSTREAM_PORT),
    },
    Probe {
        what: "proxy → upstream",
        uid: 1337,
        dst: |p| SocketAddr::new(p.topo.upstream_v4().into(), UPSTREAM_PORT),
    },
    Probe {
        what: "app → excluded CIDR",
        uid: 1000,
        dst: |p| SocketAddr::new(p.topo.excluded_v4().into(), UPSTREAM_PORT),
    },
    Probe {
        what: "app → excluded port",
        uid: 1000,
        dst: |p| SocketAddr::new(p.topo.upstream_v4().into(), EXCLUDED_OUT_PORT),
    },
    Probe {
        what: "app → localhost",
        uid: 1000,
        dst: |_| SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), APP_PORT),
    },
    Probe {
        what: "proxy → own pod IP",
        uid: 1337,
        dst: |p| SocketAddr::new(p.topo.pod_v4().into(), APP_PORT),
    },
];

fn flags(pod: &Pod) -> Vec<String> {
    // Istio's injected sidecar flags for outbound capture, plus an excluded CIDR and port.
    let x = format!(
        "{},{}",
        pod.topo.excluded_v4_cidr(),
        pod.topo.excluded_v6_cidr()
    );
    [
        "-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-x", &x, "-o",
        "9999", "--ipv6", "true",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// `interceptor explain` for the probe: the rule of the shared decision model that decides it.
fn explain(pod: &Pod, probe: &Probe) -> String {
    let dst = (probe.dst)(pod).to_string();
    let uid = probe.uid.to_string();
    let ns = pod.topo.pod_netns().display().to_string();
    let mut args = vec![
        "explain",
        "--network-namespace",
        &ns,
        "--uid",
        &uid,
        "--dst",
        &dst,
    ];
    let f = flags(pod);
    args.extend(f.iter().map(String::as_str));
    let out = interceptor_tests::bin::run(&args, &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    let verdict = text
        .lines()
        .find_map(|l| l.strip_prefix("verdict: "))
        .unwrap_or("?");
    let rule = text
        .lines()
        .find_map(|l| l.strip_prefix("rule: "))
        .unwrap_or("?");
    format!("{verdict} ({rule})")
}

fn observe(pod: &Pod, probe: &Probe) -> (String, String) {
    let dst = (probe.dst)(pod);
    pod.sidecar.take_records();
    let reply = match connect_as(
        pod.topo.pod_netns(),
        probe.uid,
        probe.uid,
        dst,
        None,
        std::time::Duration::from_secs(2),
    ) {
        Ok(o) => o.reply,
        Err(e) => format!("error: {e}"),
    };
    let orig = pod
        .sidecar
        .take_records()
        .first()
        .and_then(|r| r.original_dst)
        .map_or("-".to_string(), |a| a.to_string());
    (reply, orig)
}

pub fn run() -> Result<()> {
    let ebpf = Pod::new("demoe").context("creating the eBPF demo pod")?;
    let ipt = Pod::new("demoi").context("creating the iptables demo pod")?;
    for (pod, flavor) in [(&ebpf, Flavor::Ebpf), (&ipt, Flavor::IptablesNft)] {
        let f = flags(pod);
        let f: Vec<&str> = f.iter().map(String::as_str).collect();
        let msg = apply(pod, flavor, &f)?;
        println!("{}: {}", flavor.words(), msg.trim());
    }
    println!();
    println!(
        "{:<22} {:>5}  {:<16} {:<26} {:<16} {:<26} explain (rule)",
        "connection",
        "uid",
        "eBPF: answered",
        "eBPF: SO_ORIGINAL_DST",
        "iptables: ans.",
        "iptables: SO_ORIGINAL_DST"
    );
    let mut agree = 0;
    for probe in PROBES {
        let (e_reply, e_orig) = observe(&ebpf, probe);
        let (i_reply, i_orig) = observe(&ipt, probe);
        // Addresses differ per pod; compare the sidecar's view relative to the dialed address.
        let same = e_reply == i_reply
            && (e_orig == "-") == (i_orig == "-")
            && (e_orig == "-"
                || e_orig == (probe.dst)(&ebpf).to_string()
                    && i_orig == (probe.dst)(&ipt).to_string());
        agree += usize::from(same);
        let why = explain(&ebpf, probe);
        println!(
            "{:<22} {:>5}  {:<16} {:<26} {:<16} {:<26} {why}",
            probe.what, probe.uid, e_reply, e_orig, i_reply, i_orig
        );
    }
    println!(
        "\n{agree}/{} connections behaved the same under both backends",
        PROBES.len()
    );
    println!("(pods, sidecars, rules and eBPF programs are removed now)");
    anyhow::ensure!(agree == PROBES.len(), "the backends disagreed");
    Ok(())
}
