//! `interceptor explain`: the verdict and the deciding rule for one connection of a pod, from
//! the shared decision model, including the pod's own addresses read from its netns.

use interceptor_tests::bin;
use interceptor_tests::topology::Topology;

fn explain(ns: &str, extra: &[&str]) -> String {
    let mut args = vec![
        "explain",
        "--network-namespace",
        ns,
        "-i",
        "*",
        "-x",
        "10.96.0.0/12",
        "-o",
        "5555",
        "--ipv6",
        "true",
    ];
    args.extend_from_slice(extra);
    let out = bin::run(&args, &[]);
    assert!(
        out.status.success(),
        "explain {extra:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn explain_names_verdict_and_rule() {
    let topo = Topology::new("expl").unwrap();
    let ns = topo.pod_netns().to_str().unwrap().to_string();
    let pod_ip = format!("{}:8080", topo.pod_v4());
    let cases: &[(&[&str], &str)] = &[
        (
            &["--uid", "1000", "--dst", "10.200.0.9:80"],
            "verdict: redirect 15001\nrule: IncludeAll\n",
        ),
        (
            &["--uid", "1337", "--dst", "10.200.0.9:80"],
            "verdict: pass\nrule: ProxyUid\n",
        ),
        (
            &["--uid", "1000", "--gid", "1337", "--dst", "10.200.0.9:80"],
            "verdict: pass\nrule: ProxyGid\n",
        ),
        (
            &["--uid", "1000", "--dst", "10.96.0.10:443"],
            "verdict: pass\nrule: ExcludedCidr\n",
        ),
        (
            &["--uid", "1000", "--dst", "10.200.0.9:5555"],
            "verdict: pass\nrule: ExcludedPort\n",
        ),
        (
            &["--uid", "1000", "--dst", "127.0.0.1:80"],
            "verdict: pass\nrule: AppOverLoopbackUid\n",
        ),
        (
            &["--uid", "1337", "--dst", &pod_ip],
            "verdict: redirect 15006\nrule: ProxyUidToLocal\n",
        ),
        (
            &["--uid", "1337", "--dst", &pod_ip, "--src", "127.0.0.6"],
            "verdict: pass\nrule: PassthroughSource\n",
        ),
        (
            &["--uid", "1000", "--dst", "[fd00::9]:80"],
            "verdict: redirect 15001\nrule: IncludeAll\n",
        ),
        (
            &["--uid", "1000", "--dst", "[::ffff:10.200.0.9]:80"],
            "verdict: redirect 15001\nrule: IncludeAll\n",
        ),
        (
            &["--uid", "1000", "--dst", "10.200.0.9:53", "--udp"],
            "verdict: pass\nrule: NotTcp\n",
        ),
    ];
    for (args, want) in cases {
        assert_eq!(explain(&ns, args), *want, "explain {args:?}");
    }
    // IPv6 off: v6 destinations are not decided by any rule.
    let out = bin::run(
        &[
            "explain",
            "--network-namespace",
            &ns,
            "-i",
            "*",
            "--ipv6",
            "false",
            "--uid",
            "1000",
            "--dst",
            "[fd00::9]:80",
        ],
        &[],
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "verdict: pass\nrule: Ipv6Disabled\n"
    );
}

/// `0.0.0.0` / `::` and the pod's own link-local address, decided as the eBPF datapath decides
/// them (escape suite, semantics): the kernel's substitute destination over `lo`.
#[test]
fn explain_unspecified_and_own_link_local() {
    let topo = Topology::new("explu").unwrap();
    #[rustfmt::skip]
    topo.pod_exec("ip", &["addr", "add", "fe80::1c:1/64", "dev", "eth0", "nodad"], None).unwrap();
    let ns = topo.pod_netns().to_str().unwrap().to_string();
    let src = topo.pod_v4().to_string();
    let cases: &[(&[&str], &str)] = &[
        (
            &["--uid", "1000", "--dst", "0.0.0.0:80"],
            "verdict: pass\nrule: AppOverLoopbackUid\n",
        ),
        (
            &["--uid", "1000", "--dst", "[::]:80"],
            "verdict: pass\nrule: AppOverLoopbackUid\n",
        ),
        (
            &["--uid", "1337", "--dst", "0.0.0.0:80"],
            "verdict: pass\nrule: ProxyUid\n",
        ),
        (
            &["--uid", "1337", "--dst", "0.0.0.0:80", "--src", &src],
            "verdict: redirect 15006\nrule: ProxyUidToLocal\n",
        ),
        (
            &["--uid", "1000", "--dst", "[fe80::1c:1]:80"],
            "verdict: pass\nrule: AppOverLoopbackUid\n",
        ),
        (
            &["--uid", "1337", "--dst", "[fe80::1c:1]:80"],
            "verdict: redirect 15006\nrule: ProxyUidToLocal\n",
        ),
        (
            &["--uid", "1000", "--dst", "[fe80::1c:2]:80"],
            "verdict: redirect 15001\nrule: IncludeAll\n",
        ),
    ];
    for (args, want) in cases {
        assert_eq!(&explain(&ns, args), want, "{args:?}");
    }
}
