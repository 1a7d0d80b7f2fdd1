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

/// The `verdict:` and `rule:` lines tools read (the first two).
fn verdict_rule(text: &str) -> String {
    text.lines().take(2).map(|l| format!("{l}\n")).collect()
}

#[test]
fn explain_names_verdict_and_rule() {
    let topo = Topology::new("expl").unwrap();
    let ns = topo.pod_netns().to_str().unwrap().to_string();
    let pod_ip = format!("{}:8080", topo.pod_v4());
    let cases: &[(&[&str], &str)] = &[
        (
            &["--uid", "1000", "--dst", "10.200.0.9:80"],
            "verdict: redirect 15001\nrule: include_all\n",
        ),
        (
            &["--uid", "1337", "--dst", "10.200.0.9:80"],
            "verdict: pass\nrule: proxy_uid\n",
        ),
        (
            &["--uid", "1000", "--gid", "1337", "--dst", "10.200.0.9:80"],
            "verdict: pass\nrule: proxy_gid\n",
        ),
        (
            &["--uid", "1000", "--dst", "10.96.0.10:443"],
            "verdict: pass\nrule: excluded_cidr\n",
        ),
        (
            &["--uid", "1000", "--dst", "10.200.0.9:5555"],
            "verdict: pass\nrule: excluded_port\n",
        ),
        (
            &["--uid", "1000", "--dst", "127.0.0.1:80"],
            "verdict: pass\nrule: app_over_loopback_uid\n",
        ),
        (
            &["--uid", "1337", "--dst", &pod_ip],
            "verdict: redirect 15006\nrule: proxy_uid_to_local\n",
        ),
        (
            &["--uid", "1337", "--dst", &pod_ip, "--src", "127.0.0.6"],
            "verdict: pass\nrule: passthrough_source\n",
        ),
        (
            &["--uid", "1000", "--dst", "[fd00::9]:80"],
            "verdict: redirect 15001\nrule: include_all\n",
        ),
        (
            &["--uid", "1000", "--dst", "[::ffff:10.200.0.9]:80"],
            "verdict: redirect 15001\nrule: include_all\n",
        ),
        (
            &["--uid", "1000", "--dst", "10.200.0.9:53", "--udp"],
            "verdict: pass\nrule: not_tcp\n",
        ),
    ];
    for (args, want) in cases {
        assert_eq!(verdict_rule(&explain(&ns, args)), *want, "explain {args:?}");
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
        verdict_rule(&String::from_utf8_lossy(&out.stdout)),
        "verdict: pass\nrule: ipv6_disabled\n"
    );
}

/// `0.0.0.0` / `::` and the pod's own link-local address, decided as the eBPF datapath decides
/// them (escape suite, semantics): the kernel's substitute destination over `lo`.
/// A redirect names the source the connection is bound to on its way to the proxy: the pod's
/// address of the destination's family, the destination itself when it is the pod's own, and
/// the app's own choice or the kernel's where no bind happens.
#[test]
fn explain_names_the_source_the_proxy_sees() {
    let topo = Topology::new("exsrc").unwrap();
    let ns = topo.pod_netns().to_str().unwrap().to_string();
    let (v4, v6) = (topo.pod_v4().to_string(), topo.pod_v6().to_string());
    let v6_dst = "[2001:db8::9]:80".to_string();
    let own = format!("{v4}:8080");
    let cases: &[(&[&str], String)] = &[
        (
            &["--uid", "1000", "--dst", "10.200.0.9:80"],
            format!("source: bound to {v4}, the peer the proxy sees"),
        ),
        (
            &["--uid", "1000", "--dst", &v6_dst],
            format!("source: bound to {v6}, the peer the proxy sees"),
        ),
        (
            // The proxy calling its own pod IP goes to the inbound port, from that address.
            &["--uid", "1337", "--dst", &own],
            format!("source: bound to {v4}, the peer the proxy sees"),
        ),
        (
            &[
                "--uid",
                "1000",
                "--src",
                "127.0.0.6",
                "--dst",
                "10.200.0.9:80",
            ],
            "source: the one the app bound stays".into(),
        ),
    ];
    for (args, want) in cases {
        let text = explain(&ns, args);
        assert!(
            text.lines().any(|l| l == want),
            "{args:?}: want {want:?} in\n{text}"
        );
    }
    // A pass binds nothing and says nothing about it.
    let text = explain(&ns, &["--uid", "1337", "--dst", "10.200.0.9:80"]);
    assert!(!text.contains("source:"), "{text}");
}

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
            "verdict: pass\nrule: app_over_loopback_uid\n",
        ),
        (
            &["--uid", "1000", "--dst", "[::]:80"],
            "verdict: pass\nrule: app_over_loopback_uid\n",
        ),
        (
            &["--uid", "1337", "--dst", "0.0.0.0:80"],
            "verdict: pass\nrule: proxy_uid\n",
        ),
        (
            &["--uid", "1337", "--dst", "0.0.0.0:80", "--src", &src],
            "verdict: redirect 15006\nrule: proxy_uid_to_local\n",
        ),
        (
            &["--uid", "1000", "--dst", "[fe80::1c:1]:80"],
            "verdict: pass\nrule: app_over_loopback_uid\n",
        ),
        (
            &["--uid", "1337", "--dst", "[fe80::1c:1]:80"],
            "verdict: redirect 15006\nrule: proxy_uid_to_local\n",
        ),
        (
            &["--uid", "1000", "--dst", "[fe80::1c:2]:80"],
            "verdict: redirect 15001\nrule: include_all\n",
        ),
    ];
    for (args, want) in cases {
        assert_eq!(&verdict_rule(&explain(&ns, args)), want, "{args:?}");
    }
}

/// One explain case: extra args, words in `why:`, the istio-iptables rule, the JSON rule id,
/// the entry's flag and value.
type Case<'a> = (
    &'a [&'a str],
    &'a str,
    Option<&'a str>,
    &'a str,
    Option<(&'a str, &'a str)>,
);

/// The config entry that decided (flag and matched value), in words and as JSON fields, and the
/// istio-iptables rule (from our own emitter) that makes the same decision.
#[test]
fn explain_names_the_entry_and_the_istio_rule() {
    let topo = Topology::new("explw").unwrap();
    let ns = topo.pod_netns().to_str().unwrap().to_string();
    let pod_ip = format!("{}:8080", topo.pod_v4());
    // (extra args, words in `why:`, the istio-iptables rule, JSON rule id, flag and value)
    let cases: &[Case] = &[
        (
            &["--uid", "1000", "--dst", "10.96.0.10:443"],
            "10.96.0.10 is in 10.96.0.0/12 of -x/--istio-service-exclude-cidr",
            Some("-A ISTIO_OUTPUT -d 10.96.0.0/12 -j RETURN"),
            "excluded_cidr",
            Some(("-x/--istio-service-exclude-cidr", "10.96.0.0/12")),
        ),
        (
            &["--uid", "1000", "--dst", "10.200.0.9:5555"],
            "port 5555 is in -o/--istio-local-outbound-ports-exclude",
            Some("-A ISTIO_OUTPUT -p tcp --dport 5555 -j RETURN"),
            "excluded_port",
            Some(("-o/--istio-local-outbound-ports-exclude", "5555")),
        ),
        (
            &["--uid", "1337", "--dst", "10.200.0.9:80"],
            "uid 1337 is the proxy's (-u/--proxy-uid)",
            Some("-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN"),
            "proxy_uid",
            Some(("-u/--proxy-uid", "1337")),
        ),
        (
            &["--uid", "1000", "--dst", "10.200.0.9:80"],
            "-i/--istio-service-cidr is '*'",
            Some("-A ISTIO_OUTPUT -j ISTIO_REDIRECT"),
            "include_all",
            Some(("-i/--istio-service-cidr", "*")),
        ),
        (
            &["--uid", "1337", "--dst", &pod_ip],
            "is the pod's own address",
            Some("-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT"),
            "proxy_uid_to_local",
            Some(("-u/--proxy-uid", "1337")),
        ),
        (
            &["--uid", "1000", "--dst", "127.0.0.1:80"],
            "uid 1000 is not the proxy's (1337 of -u/--proxy-uid)",
            Some("-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN"),
            "app_over_loopback_uid",
            Some(("-u/--proxy-uid", "1337")),
        ),
        (
            &["--uid", "1000", "--dst", "10.200.0.9:53", "--udp"],
            "only TCP is redirected",
            Some("-A ISTIO_OUTPUT -j ISTIO_REDIRECT"),
            "not_tcp",
            None,
        ),
    ];
    for (args, why, rule, id, entry) in cases {
        let text = explain(&ns, args);
        let line = |key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(key))
                .unwrap_or_else(|| panic!("no {key:?} line for {args:?}:\n{text}"))
                .to_string()
        };
        assert!(line("why: ").contains(why), "{args:?}:\n{text}");
        assert_eq!(
            line("istio-iptables rule: "),
            rule.unwrap_or("none (no rule of ISTIO_OUTPUT decides it)"),
            "{args:?}"
        );
        let mut json_args = args.to_vec();
        json_args.extend(["--output", "json"]);
        let j: serde_json::Value = serde_json::from_str(&explain(&ns, &json_args))
            .unwrap_or_else(|e| panic!("{args:?}: not JSON: {e}"));
        assert_eq!(j["rule"], *id, "{j}");
        assert_eq!(j["decided_by"], "ebpf", "{j}");
        assert_eq!(j["istio_rule"].as_str(), *rule, "{j}");
        match entry {
            Some((flag, value)) => {
                assert_eq!(j["entry"]["flag"], *flag, "{j}");
                assert_eq!(j["entry"]["value"], *value, "{j}");
            }
            None => assert!(j["entry"].is_null(), "{j}"),
        }
        assert!(j["why"].as_str().unwrap().contains(why), "{j}");
    }
}

/// A config only the netfilter fallback can serve (`-c`): the interface entry decides, named
/// with its flag, and the rule is the fallback's own.
#[test]
fn explain_excluded_interface_on_the_fallback() {
    let topo = Topology::new("explc").unwrap();
    let ns = topo.pod_netns().to_str().unwrap().to_string();
    let out = bin::run(
        &[
            "explain",
            "--network-namespace",
            &ns,
            "-i",
            "*",
            "-c",
            "eth0",
            "--ipv6",
            "false",
            "--uid",
            "1000",
            "--dst",
            "10.200.0.9:80",
            "--output",
            "json",
        ],
        &[],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["decided_by"], "netfilter", "{j}");
    assert_eq!(j["rule"], "excluded_interface", "{j}");
    assert_eq!(j["entry"]["flag"], "-c/--istio-exclude-interfaces", "{j}");
    assert_eq!(j["entry"]["value"], "eth0", "{j}");
    assert_eq!(j["istio_rule"], r#"-A OUTPUT -o "eth0" -j RETURN"#, "{j}");
}
