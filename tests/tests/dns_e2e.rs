//! DNS capture with a real resolver (`dig` from Debian's dnsutils) on both backends: queries
//! from an app uid to the resolv.conf servers (or to any server with --capture-all-dns) reach
//! the DNS proxy on 15053, and the replies carry the original server's address (dig rejects a
//! reply from an unexpected source, so an answer at all proves it). The DNS proxy sees the
//! queries come from the pod IP, as with REDIRECT: over unconnected UDP (`sendto`, as
//! musl's resolver sends); dig's sockets, bound to a port before they connect, only on
//! iptables/nftables.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::time::Duration;

use interceptor_tests::cases::{apply, Flavor, Pod};
use interceptor_tests::dns::{DnsProxy, ANSWER};
use interceptor_tests::topology::{enter_netns, set_thread_creds};

/// One A query for `svc.test` sent with `sendto` on an unconnected UDP socket in the pod
/// netns as uid 1000; the answer's source address, if an answer with `ANSWER` came.
fn sendto_query(pod: &Pod, server: IpAddr) -> Option<SocketAddr> {
    let netns = pod.topo.pod_netns().to_path_buf();
    std::thread::spawn(move || {
        enter_netns(&netns).ok()?;
        set_thread_creds(1000, 1000).ok()?;
        let any: SocketAddr = if server.is_ipv4() {
            "0.0.0.0:0".parse().unwrap()
        } else {
            "[::]:0".parse().unwrap()
        };
        let sock = UdpSocket::bind(any).ok()?;
        sock.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        for label in ["svc", "test"] {
            q.push(label.len() as u8);
            q.extend_from_slice(label.as_bytes());
        }
        q.extend_from_slice(&[0, 0, 1, 0, 1]);
        sock.send_to(&q, SocketAddr::new(server, 53)).ok()?;
        let mut buf = [0u8; 512];
        let (n, from) = sock.recv_from(&mut buf).ok()?;
        buf[..n].ends_with(&ANSWER.octets()).then_some(from)
    })
    .join()
    .ok()
    .flatten()
}

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
    let proxy = DnsProxy::start(pod.topo.pod_netns(), 15053, 1337, 1337).unwrap();
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
    let (p4, p6): (IpAddr, IpAddr) = (pod.topo.pod_v4().into(), pod.topo.pod_v6().into());
    for (server, pod_ip) in [(s4, p4), (s6, p6)] {
        for tcp in [false, true] {
            proxy.take_clients();
            assert!(
                dig(&pod, server, tcp).is_some(),
                "{flavor:?}: dig @{server} tcp={tcp} got no answer"
            );
            let from = proxy.take_clients();
            // dig binds 0.0.0.0:0 (a port, no address) before it connects, UDP and TCP alike:
            // such a socket cannot be bound to an address any more, so on eBPF its query keeps
            // the loopback source (README: "The proxy sees the connection come from …").
            let want = if flavor == Flavor::Ebpf {
                if server.is_ipv4() {
                    IpAddr::from(Ipv4Addr::LOCALHOST)
                } else {
                    IpAddr::from(Ipv6Addr::LOCALHOST)
                }
            } else {
                pod_ip
            };
            assert!(
                !from.is_empty() && from.iter().all(|a| *a == want),
                "{flavor:?}: dig @{server} tcp={tcp}: the DNS proxy saw queries from {from:?}, \
                 want {want}"
            );
        }
        let answered_from = sendto_query(&pod, server);
        assert_eq!(
            answered_from,
            Some(SocketAddr::new(server, 53)),
            "{flavor:?}: sendto @{server}: no answer, or not from the server asked"
        );
        let from = proxy.take_clients();
        assert_eq!(
            from,
            [pod_ip],
            "{flavor:?}: sendto @{server}: the DNS proxy saw the query from {from:?}"
        );
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
