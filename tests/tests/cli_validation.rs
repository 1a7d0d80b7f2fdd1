//! Bad input: every case is a clear error naming the flag and the bad value, exit status 2,
//! and nothing applied in the target netns. A valid control run proves the check can fail.

use interceptor_tests::bin;
use interceptor_tests::topology::Topology;

struct Bad {
    args: &'static [&'static str],
    env: &'static [(&'static str, &'static str)],
    /// Substrings the error must contain: the flag (or env var) and the value.
    flag: &'static str,
    value: &'static str,
}

const fn bad(args: &'static [&'static str], flag: &'static str, value: &'static str) -> Bad {
    Bad {
        args,
        env: &[],
        flag,
        value,
    }
}

const CASES: &[Bad] = &[
    bad(&["-p", "0"], "--envoy-port", "0"),
    bad(&["-p", "70000"], "--envoy-port", "70000"),
    bad(&["--envoy-port", "abc"], "--envoy-port", "abc"),
    bad(&["-z", "99999"], "--inbound-capture-port", "99999"),
    bad(&["-e", "x"], "--inbound-tunnel-port", "x"),
    bad(&["-u", "root"], "--proxy-uid", "root"),
    bad(&["-u", "1337,abc"], "--proxy-uid", "abc"),
    bad(&["-g", "1.5"], "--proxy-gid", "1.5"),
    bad(
        &["-m", "TPROXYY"],
        "--istio-inbound-interception-mode",
        "TPROXYY",
    ),
    bad(&["-b", "80,http"], "--istio-inbound-ports", "http"),
    bad(&["-b", "0"], "--istio-inbound-ports", "0"),
    bad(&["-d", "65536"], "--istio-local-exclude-ports", "65536"),
    bad(
        &["-i", "10.0.0.0/33"],
        "--istio-service-cidr",
        "10.0.0.0/33",
    ),
    bad(&["-i", "10.0.0.0/8,*"], "--istio-service-cidr", "*"),
    bad(&["-x", "*"], "--istio-service-exclude-cidr", "*"),
    bad(
        &["-x", "300.1.1.1/8"],
        "--istio-service-exclude-cidr",
        "300.1.1.1/8",
    ),
    bad(
        &["-x", "fd00::/129"],
        "--istio-service-exclude-cidr",
        "fd00::/129",
    ),
    bad(&["-q", "1-2"], "--istio-outbound-ports", "1-2"),
    bad(
        &["-o", "8080,,x"],
        "--istio-local-outbound-ports-exclude",
        "x",
    ),
    bad(&["-t", "mark"], "--istio-inbound-tproxy-mark", "mark"),
    bad(
        &["-r", "table"],
        "--istio-inbound-tproxy-route-table",
        "table",
    ),
    bad(&["-c", "bad/if"], "--istio-exclude-interfaces", "bad/if"),
    bad(
        &["-k", "averyveryverylongifname0"],
        "--kube-virt-interfaces",
        "averyveryverylongifname0",
    ),
    bad(&["--backend", "magic"], "--backend", "magic"),
    bad(
        &["--force-iptables-binary", "old"],
        "--force-iptables-binary",
        "old",
    ),
    bad(&["--dns-servers", "1.2.3.4,nope"], "--dns-servers", "nope"),
    bad(&["--ipv6", "maybe"], "--ipv6", "maybe"),
    bad(
        &["--probe-timeout", "forever"],
        "--probe-timeout",
        "forever",
    ),
    bad(
        &["--iptables-probe-port", "0"],
        "--iptables-probe-port",
        "0",
    ),
    bad(
        &["--native-nftables", "--backend", "iptables"],
        "--native-nftables",
        "iptables",
    ),
    Bad {
        args: &[],
        env: &[("PROXY_UID", "abc")],
        flag: "--proxy-uid",
        value: "abc",
    },
    Bad {
        args: &[],
        env: &[("ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR", "10.0.0.1/32")],
        flag: "ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR",
        value: "10.0.0.1/32",
    },
    Bad {
        args: &[],
        env: &[
            ("ISTIO_OUTBOUND_OWNER_GROUPS", "java"),
            ("ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE", "ftp"),
        ],
        flag: "ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE",
        value: "ftp",
    },
];

/// Everything of ours the pod netns could hold, as text (empty when untouched).
fn installed(topo: &Topology) -> String {
    let mut out = String::new();
    for (prog, args) in [
        ("iptables-legacy-save", &[][..]),
        ("iptables-nft-save", &[][..]),
        ("ip6tables-legacy-save", &[][..]),
        ("ip6tables-nft-save", &[][..]),
        ("nft", &["list", "ruleset"][..]),
    ] {
        let text = topo.pod_exec(prog, args, None).unwrap_or_default();
        out.extend(
            text.lines()
                .filter(|l| l.contains("ISTIO") || l.contains("istio"))
                .map(|l| format!("{prog}: {l}\n")),
        );
    }
    out
}

#[test]
fn bad_input_is_rejected_with_exit_2_and_nothing_applied() {
    let topo = Topology::new("badin").expect("topology");
    let ns = topo.pod_netns().to_str().unwrap().to_string();
    assert!(CASES.len() >= 20, "the table needs at least 20 cases");
    let mut failures = Vec::new();
    for case in CASES {
        // Not a dry run: had validation passed, rules would land in the netns.
        let mut args = vec!["apply", "--network-namespace", &ns, "-i", "*", "-b", "*"];
        // Later flags win in clap for single-valued args, so the case's own values take effect.
        args.extend_from_slice(case.args);
        let out = bin::run(&args, case.env);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let ok = out.status.code() == Some(2)
            && stderr.contains(case.flag)
            && stderr.contains(case.value);
        println!(
            "{:?} env {:?} -> exit {:?}: {}",
            case.args,
            case.env,
            out.status.code(),
            stderr.trim()
        );
        if !ok {
            failures.push(format!(
                "{:?} {:?}: exit {:?}, stderr {stderr:?}",
                case.args,
                case.env,
                out.status.code()
            ));
        }
        let left = installed(&topo);
        if !left.is_empty() {
            failures.push(format!("{:?}: rules were applied:\n{left}", case.args));
        }
    }
    // Bad network namespaces name the flag too.
    for path in ["/nonexistent/netns", "/etc/hostname"] {
        let out = bin::run(
            &["apply", "--network-namespace", path, "--ipv6", "false"],
            &[],
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        if out.status.code() != Some(2)
            || !stderr.contains("--network-namespace")
            || !stderr.contains(path)
        {
            failures.push(format!(
                "netns {path}: exit {:?}, stderr {stderr:?}",
                out.status.code()
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} bad-input cases misbehaved:\n{}",
        failures.len(),
        failures.join("\n")
    );
    println!(
        "bad-input cases: {} rejected with exit 2, nothing applied",
        CASES.len() + 2
    );

    // Control: the same invocation with valid input does apply, so `installed` can see rules.
    let out = bin::run(
        &[
            "apply",
            "--network-namespace",
            &ns,
            "-i",
            "*",
            "-b",
            "*",
            "--backend",
            "iptables",
        ],
        &[],
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "control apply failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !installed(&topo).is_empty(),
        "control apply left no visible rules"
    );
}
