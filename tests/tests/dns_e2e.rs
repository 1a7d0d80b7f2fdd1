//! DNS capture with a real resolver (`dig` from Debian's dnsutils) on both backends: queries
//! from an app uid to the resolv.conf servers (or to any server with --capture-all-dns) reach
//! the DNS proxy on 15053, and the replies carry the original server's address (dig rejects a
//! reply from an unexpected source, so an answer at all proves it).

use std::net::IpAddr;

use interceptor_tests::cases::{apply, Flavor, Pod};
use interceptor_tests::dns::{DnsProxy, ANSWER};

/// `dig` in the pod netns as uid 1000; Some(answer) or None on timeout/no answer.
fn dig(pod: &Pod, server: IpAddr, tcp: bool) -> Option<String> {
    let ns = pod.topo.pod_ns_name().to_string();
    let server = format!("@{server}");
    let mut args = vec![
        "netns",
        "exec",
        &ns,
        "setpriv",
        "--reuid=1000",
        "--regid=1000",
        "--clear-groups",
        "dig",
    ];
    args.extend_from_slice(&[&server, "svc.test", "A", "+short", "+time=1", "+tries=1"]);
    if tcp {
        args.push("+tcp");
    }
    let out = std::process::Command::new("ip")
        .args(&args)
        .output()
        .expect("running dig");
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (out.status.success() && text == ANSWER.to_string()).then_some(text)
}

fn dns(flavor: Flavor) {
    let pod = Pod::new("dns").unwrap();
    let _proxy = DnsProxy::start(pod.topo.pod_netns(), 15053, 1337, 1337).unwrap();
    let (s4, s6): (IpAddr, IpAddr) = (pod.topo.upstream_v4().into(), pod.topo.upstream_v6().into());
    let (o4, o6): (IpAddr, IpAddr) = (pod.topo.excluded_v4().into(), pod.topo.excluded_v6().into());
    // Before interception nothing answers on the servers: dig must fail.
    assert_eq!(
        dig(&pod, s4, false),
        None,
        "{flavor:?}: something answers DNS without capture"
    );
    let servers = format!("{s4},{s6}");
    apply(
        &pod,
        flavor,
        &[
            "-i",
            "*",
            "--redirect-dns",
            "--dns-servers",
            &servers,
            "--ipv6",
            "true",
        ],
    )
    .unwrap();
    for server in [s4, s6] {
        for tcp in [false, true] {
            assert!(
                dig(&pod, server, tcp).is_some(),
                "{flavor:?}: dig @{server} tcp={tcp} got no answer"
            );
        }
    }
    // Only the resolv.conf servers are captured without --capture-all-dns.
    for other in [o4, o6] {
        let got = dig(&pod, other, false);
        assert_eq!(
            got, None,
            "{flavor:?}: non-listed server {other} was captured"
        );
    }
    let pod2 = Pod::new("dnsall").unwrap();
    let _proxy2 = DnsProxy::start(pod2.topo.pod_netns(), 15053, 1337, 1337).unwrap();
    apply(
        &pod2,
        flavor,
        &[
            "-i",
            "*",
            "--redirect-dns",
            "--capture-all-dns",
            "--ipv6",
            "true",
        ],
    )
    .unwrap();
    let (o4, o6): (IpAddr, IpAddr) = (
        pod2.topo.excluded_v4().into(),
        pod2.topo.excluded_v6().into(),
    );
    for server in [o4, o6] {
        assert!(
            dig(&pod2, server, false).is_some(),
            "{flavor:?}: capture-all: dig @{server} got no answer"
        );
    }
}

#[test]
fn dns_iptables() {
    dns(Flavor::IptablesNft);
}

#[test]
fn dns_nftables() {
    dns(Flavor::Nftables);
}

#[test]
fn dns_ebpf() {
    dns(Flavor::Ebpf);
}
