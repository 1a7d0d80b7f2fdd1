//! The CLI's contract with people and scripts: one error style whichever layer finds the bad
//! input (clap or the config check), the environment variable named when the value came from
//! one, no flag that silently does nothing, and `apply` never acting on the caller's own netns
//! (on a node, the host's) unless told to with `--host`.

use std::process::{Command, Output};

use interceptor_tests::bin::{interceptor_bin, run};
use interceptor_tests::topology::Topology;

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Exit 2 and exactly one line in our style, which contains every one of `want`.
fn usage_error(o: &Output, want: &[&str]) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(2), "exit code; stderr: {err}");
    assert!(
        err.starts_with("interceptor: ") && !err.contains("error: ") && !err.contains("Usage:"),
        "not our style: {err}"
    );
    for w in want {
        assert!(err.contains(w), "{w:?} not in: {err}");
    }
}

/// An `explain` that needs nothing from the host, to which a case appends its flag.
const EXPLAIN: [&str; 7] = [
    "explain",
    "--uid",
    "1000",
    "--dst",
    "10.1.2.3:80",
    "--ipv6",
    "false",
];

/// Whether `--help` output defines `flag` (`  --flag …` or `  -x, --flag …`), not merely
/// mentions it in another flag's text.
fn lists_flag(help: &str, flag: &str) -> bool {
    help.lines().any(|l| {
        let t = l.trim_start();
        let t = match t.split_once(", ") {
            Some((short, rest)) if short.len() == 2 && short.starts_with('-') => rest,
            _ => t,
        };
        t.strip_prefix(flag)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '[', '=', '<']))
    })
}

#[test]
fn apply_without_a_netns_is_refused_before_anything_happens() {
    // No --network-namespace and no --host: refused, naming the flag and the way out; it must
    // not get as far as choosing a backend (no probe, no "backend:" line).
    let o = run(&["apply", "--backend", "iptables", "-i", "10.0.0.0/8"], &[]);
    usage_error(&o, &["missing --network-namespace", "--host"]);
    assert!(!stderr(&o).contains("backend"), "{}", stderr(&o));
    // The same for --cleanup-only, which changes a netns too.
    let o = run(&["apply", "--cleanup-only", "--backend", "iptables"], &[]);
    usage_error(&o, &["missing --network-namespace"]);
    // Both given: clap refuses the pair, in our style.
    let o = run(
        &[
            "apply",
            "--host",
            "--network-namespace",
            "/proc/self/ns/net",
        ],
        &[],
    );
    usage_error(&o, &["--host", "--network-namespace"]);
}

#[test]
fn apply_host_acts_on_the_callers_own_netns_and_says_so() {
    let topo = Topology::new("clistyle").expect("topology");
    let in_pod = |args: &[&str]| -> Output {
        Command::new("ip")
            .args(["netns", "exec", topo.pod_ns_name()])
            .arg(interceptor_bin())
            .args(args)
            .output()
            .expect("ip netns exec")
    };
    let flags = [
        "apply",
        "--host",
        "--backend",
        "iptables",
        "-i",
        "10.0.0.0/8",
        "--ipv6",
        "false",
    ];
    let o = in_pod(&flags);
    assert!(o.status.success(), "apply --host: {}", stderr(&o));
    assert!(
        stderr(&o).contains("OWN network namespace (net:["),
        "no notice: {}",
        stderr(&o)
    );
    let rules = topo
        .pod_exec("iptables-save", &["-t", "nat"], None)
        .expect("iptables-save");
    assert!(
        rules.contains("-A ISTIO_OUTPUT") && rules.contains("10.0.0.0/8"),
        "rules not in the netns it ran in:\n{rules}"
    );
    let mut clean = flags.to_vec();
    clean.push("--cleanup-only");
    let o = in_pod(&clean);
    assert!(o.status.success(), "cleanup: {}", stderr(&o));
    let rules = topo
        .pod_exec("iptables-save", &["-t", "nat"], None)
        .expect("iptables-save");
    assert!(!rules.contains("ISTIO_"), "left behind:\n{rules}");
}

#[test]
fn clap_and_config_errors_read_alike_and_name_the_environment_variable() {
    let ns = ["apply", "--dry-run", "--ipv6", "false", "--dns-servers", ""];
    // An enum flag (clap's check).
    let mut a = ns.to_vec();
    a.extend(["--backend", "bogus"]);
    usage_error(
        &run(&a, &[]),
        &[
            r#"invalid value "bogus" for --backend: expected one of: auto, ebpf, iptables, nftables"#,
        ],
    );
    // A Go boolean from the environment (clap's check).
    usage_error(
        &run(
            &["apply", "--ipv6", "false", "--dns-servers", ""],
            &[("DRY_RUN", "garbage")],
        ),
        &[r#"invalid value "garbage" for DRY_RUN (environment; flag --dry-run): not a boolean"#],
    );
    // A port (the config check), on the command line and from the environment.
    let mut a = ns.to_vec();
    a.extend(["-z", "99999"]);
    usage_error(
        &run(&a, &[]),
        &[r#"invalid value "99999" for --inbound-capture-port"#],
    );
    usage_error(
        &run(&ns, &[("INBOUND_CAPTURE_PORT", "99999")]),
        &[
            r#"invalid value "99999" for INBOUND_CAPTURE_PORT (environment; flag --inbound-capture-port)"#,
        ],
    );
    usage_error(
        &run(&ns, &[("PROXY_UID", "abc")]),
        &[r#"invalid value "abc" for PROXY_UID (environment; flag --proxy-uid)"#],
    );
    // The command line wins over the environment, so its value is the one named.
    let mut a = ns.to_vec();
    a.extend(["-u", "xyz"]);
    usage_error(
        &run(&a, &[("PROXY_UID", "1337")]),
        &[r#"invalid value "xyz" for --proxy-uid"#],
    );
    // Our own booleans read the environment as Istio's do: Go's spellings, nothing else.
    let o = run(
        &ns,
        &[
            ("INTERCEPTOR_EBPF_LOG", "1"),
            ("INTERCEPTOR_ACCELERATE", "t"),
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    usage_error(
        &run(&ns, &[("INTERCEPTOR_ACCELERATE", "yes")]),
        &[r#"invalid value "yes" for INTERCEPTOR_ACCELERATE (environment; flag --accelerate)"#],
    );
    // An unknown flag: clap's sentence, our form, with where to look.
    usage_error(
        &run(&["doctor", "--bogus"], &[]),
        &["--bogus", "see `interceptor doctor --help`"],
    );
}

#[test]
fn no_flag_is_a_no_op() {
    // `cleanup` never loads programs: --no-counters is not one of its flags.
    usage_error(
        &run(&["cleanup", "--no-counters"], &[]),
        &["--no-counters", "interceptor cleanup --help"],
    );
    // `explain` takes apply's config flags but none of those that act.
    let help = run(&["explain", "--help"], &[]);
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(lists_flag(&help, "--istio-service-cidr"), "{help}");
    for given in [
        "--dry-run",
        "--cleanup-only",
        "--backend=iptables",
        "--run-validation",
        "--reconcile",
        "--host",
        "--no-counters",
    ] {
        let acting = given.split('=').next().unwrap();
        assert!(!lists_flag(&help, acting), "explain --help lists {acting}");
        let mut argv = EXPLAIN.to_vec();
        argv.push(given);
        let o = run(&argv, &[]);
        usage_error(&o, &[acting, "does nothing for `interceptor explain`"]);
    }
    // `pod add`: the daemon decides where and how programs load; --host means nothing there.
    for given in [
        "--host",
        "--bpffs=/sys/fs/bpf/x",
        "--no-counters",
        "--probe",
    ] {
        let mut argv = vec!["pod", "add", "--dry-run", given];
        if given != "--host" {
            // (--host and --network-namespace also conflict.)
            argv.extend(["--network-namespace", "/proc/self/ns/net"]);
        }
        let o = run(&argv, &[]);
        let flag = given.split('=').next().unwrap();
        usage_error(&o, &[flag, "does nothing for `interceptor pod add`"]);
    }
    // `remove` and `logs` read the pins; where programs attach is not theirs to say.
    for cmd in [
        &["remove", "--network-namespace", "/proc/self/ns/net"][..],
        &["logs"][..],
    ] {
        let mut argv = cmd.to_vec();
        argv.extend(["--cgroup", "/sys/fs/cgroup"]);
        usage_error(
            &run(&argv, &[]),
            &["--cgroup", "does nothing for `interceptor"],
        );
    }
    // --probe only means something for a dry run.
    usage_error(
        &run(&["apply", "--host", "--probe"], &[]),
        &["--probe", "--dry-run"],
    );
    // From the environment (set for istio-iptables, say) they are ignored, not refused.
    let o = run(&EXPLAIN, &[("DRY_RUN", "true"), ("CLEANUP_ONLY", "true")]);
    assert!(o.status.success(), "{}", stderr(&o));
    // Where they do something, they are there.
    for cmd in [&["apply", "--help"][..], &["daemon", "--help"][..]] {
        let help = String::from_utf8_lossy(&run(cmd, &[]).stdout).into_owned();
        assert!(lists_flag(&help, "--no-counters"), "{cmd:?}: {help}");
    }
}
