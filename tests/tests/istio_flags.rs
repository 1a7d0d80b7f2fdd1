//! Every istio-iptables flag is accepted by `interceptor apply` (and `pod add`, which takes
//! apply's flags) with Istio's long name, short name, environment variable and kind, so no flag
//! goes missing again. The table is istio-iptables' own flag set, read from
//! `tools/istio-iptables/pkg/cmd/root.go` (`bindCmdlineFlags`) and
//! `tools/istio-iptables/pkg/constants/constants.go` of Istio commit 86c9f01f (the commit the
//! goldens in ../shared/conformance/istio come from). `flag.BindEnv` binds the env variable
//! `upper(name with - → _)`, `flag.Bind` none; `flag.AdditionalEnv` adds a second one.

use clap::CommandFactory;
use interceptor::cli::Cli;

#[derive(Clone, Copy, PartialEq, Debug)]
enum Kind {
    /// A pflag bool: `--name`, `--name=false`.
    Bool,
    /// A string, duration or number: `--name VALUE`.
    Value,
}

struct IstioFlag {
    long: &'static str,
    short: Option<char>,
    /// `flag.BindEnv` (true) or `flag.Bind` (false).
    env: bool,
    /// `flag.AdditionalEnv`.
    additional_env: Option<&'static str>,
    kind: Kind,
}

const fn f(long: &'static str, short: Option<char>, env: bool, kind: Kind) -> IstioFlag {
    IstioFlag {
        long,
        short,
        env,
        additional_env: None,
        kind,
    }
}

const fn also(mut flag: IstioFlag, env: &'static str) -> IstioFlag {
    flag.additional_env = Some(env);
    flag
}

use Kind::{Bool, Value};

/// istio-iptables' flags, in `bindCmdlineFlags` order.
const ISTIO_FLAGS: &[IstioFlag] = &[
    f("envoy-port", Some('p'), false, Value),
    f("inbound-capture-port", Some('z'), true, Value),
    f("inbound-tunnel-port", Some('e'), true, Value),
    f("proxy-uid", Some('u'), true, Value),
    f("proxy-gid", Some('g'), true, Value),
    f("istio-inbound-interception-mode", Some('m'), true, Value),
    f("istio-inbound-ports", Some('b'), true, Value),
    f("istio-local-exclude-ports", Some('d'), true, Value),
    f("istio-exclude-interfaces", Some('c'), true, Value),
    f("istio-service-cidr", Some('i'), true, Value),
    f("istio-service-exclude-cidr", Some('x'), true, Value),
    f("istio-outbound-ports", Some('q'), true, Value),
    f("istio-local-outbound-ports-exclude", Some('o'), true, Value),
    f("kube-virt-interfaces", Some('k'), true, Value),
    f("istio-inbound-tproxy-mark", Some('t'), true, Value),
    f("istio-inbound-tproxy-route-table", Some('r'), true, Value),
    f("dry-run", Some('n'), true, Bool),
    f("iptables-probe-port", None, true, Value),
    f("probe-timeout", None, true, Value),
    f("skip-rule-apply", None, true, Bool),
    f("run-validation", None, true, Bool),
    also(
        f("redirect-dns", None, true, Bool),
        "ISTIO_META_DNS_CAPTURE",
    ),
    also(f("drop-invalid", None, true, Bool), "INVALID_DROP"),
    also(f("dual-stack", None, true, Bool), "ISTIO_DUAL_STACK"),
    f("capture-all-dns", None, true, Bool),
    f("network-namespace", None, true, Value),
    f("cni-mode", None, true, Bool),
    f("reconcile", None, true, Bool),
    f("cleanup-only", None, true, Bool),
    f("force-apply", None, true, Bool),
    f("native-nftables", None, true, Bool),
    f("force-iptables-binary", None, true, Value),
];

fn env_name(long: &str) -> String {
    long.to_uppercase().replace('-', "_")
}

#[test]
fn every_istio_iptables_flag_is_accepted_as_istio_names_it() {
    let mut cli = Cli::command();
    // Filled in (num_args, …) as at parse time.
    cli.build();
    for sub in ["apply", "pod"] {
        let mut cmd = cli
            .find_subcommand(sub)
            .unwrap_or_else(|| panic!("no `{sub}` command"))
            .clone();
        if sub == "pod" {
            cmd = cmd.find_subcommand("add").expect("pod add").clone();
        }
        let mut missing = vec![];
        for flag in ISTIO_FLAGS {
            let Some(arg) = cmd
                .get_arguments()
                .find(|a| a.get_long() == Some(flag.long))
            else {
                missing.push(flag.long);
                continue;
            };
            let what = format!("{sub}: --{}", flag.long);
            assert_eq!(arg.get_short(), flag.short, "{what}: short name");
            let env = arg.get_env().map(|e| e.to_string_lossy().into_owned());
            let want_env = flag.env.then(|| env_name(flag.long));
            assert_eq!(env, want_env, "{what}: environment variable");
            let takes_value = arg.get_num_args().is_some_and(|n| n.takes_values());
            assert!(takes_value, "{what}: takes no value");
            let optional = arg.get_num_args().is_some_and(|n| n.min_values() == 0);
            assert_eq!(
                optional,
                flag.kind == Bool,
                "{what}: a bool takes an optional value, anything else a required one"
            );
        }
        assert!(
            missing.is_empty(),
            "{sub}: istio-iptables flags missing: {missing:?}"
        );
    }
}

fn apply_matches(args: &[&str]) -> Result<clap::ArgMatches, clap::Error> {
    let mut argv = vec!["interceptor", "apply"];
    argv.extend_from_slice(args);
    Cli::command()
        .try_get_matches_from(argv)
        .map(|m| m.subcommand_matches("apply").expect("apply").clone())
}

#[test]
fn bool_flags_take_go_spellings_as_pflag_does() {
    for flag in ISTIO_FLAGS.iter().filter(|f| f.kind == Bool) {
        let id = flag.long.replace('-', "_");
        let value = |args: &[String]| -> bool {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let m = apply_matches(&args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
            *m.get_one::<bool>(&id).expect("a default")
        };
        let long = format!("--{}", flag.long);
        assert!(!value(&[]), "{long} defaults to false");
        assert!(value(std::slice::from_ref(&long)), "{long}");
        for (v, want) in [
            ("true", true),
            ("1", true),
            ("T", true),
            ("false", false),
            ("0", false),
            ("F", false),
        ] {
            assert_eq!(value(&[format!("{long}={v}")]), want, "{long}={v}");
        }
        let err = apply_matches(&[&format!("{long}=maybe")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("maybe") && err.contains(flag.long), "{err}");
        // pflag: a bool never takes the next word as its value.
        assert!(
            apply_matches(&[&long, "false"]).is_err(),
            "{long} false: a stray argument"
        );
    }
}

// ------------------------------------------------------------------ the two flags, for real

use std::net::SocketAddr;

use interceptor_tests::bin;
use interceptor_tests::cases::{Flavor, Pod, APP_UID, UPSTREAM_PORT};

/// `interceptor apply` for `pod` with `flavor`, extra flags and env; Ok(stderr) or Err(stderr).
fn apply_env(
    pod: &Pod,
    flavor: Flavor,
    extra: &[&str],
    env: &[(&str, &str)],
) -> Result<String, String> {
    let ns = pod.topo.pod_netns().to_str().unwrap();
    let bpffs = pod.ebpf.dir().to_str().unwrap();
    let mut args = vec!["apply", "--network-namespace", ns, "--bpffs", bpffs];
    args.extend_from_slice(flavor.args());
    args.extend_from_slice(extra);
    let out = bin::run(&args, env);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if out.status.success() {
        Ok(stderr)
    } else {
        Err(format!("interceptor {args:?}: {stderr}"))
    }
}

/// A dual-stack pod whose first address is IPv4 (as a Kubernetes dual-stack pod's usually is):
/// IPv6 capture only with `--dual-stack` or `ISTIO_DUAL_STACK=true`, on every backend; its IPv4
/// capture either way (nftables: see below).
fn dual_stack(flavor: Flavor) {
    type Way<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], bool);
    let ways: [Way; 4] = [
        (&[], &[], false),
        (&["--dual-stack"], &[], true),
        (&[], &[("ISTIO_DUAL_STACK", "true")], true),
        (&["--dual-stack=false"], &[], false),
    ];
    for (flags, env, want_v6) in ways {
        let pod = Pod::new("dual").unwrap();
        let t = &pod.topo;
        let addrs = interceptor::netns::local_addrs(Some(t.pod_netns())).unwrap();
        assert!(
            addrs.first().is_some_and(|a| a.is_ipv4()) && addrs.iter().any(|a| a.is_ipv6()),
            "the test pod must be dual-stack with IPv4 first: {addrs:?}"
        );
        let mut all = vec!["-i", "*", "-u", "1337"];
        all.extend_from_slice(flags);
        apply_env(&pod, flavor, &all, env).unwrap_or_else(|e| panic!("{flavor:?}: {e}"));
        let v4 = SocketAddr::new(t.upstream_v4().into(), UPSTREAM_PORT);
        let v6 = SocketAddr::new(t.upstream_v6().into(), UPSTREAM_PORT);
        let (who4, orig4, _) = pod.outbound(APP_UID, v4).unwrap();
        assert_eq!(
            (who4.as_str(), orig4),
            ("sidecar:15001", Some(v4)),
            "{flavor:?} {flags:?} {env:?}: IPv4"
        );
        let (who6, orig6, peer6) = pod.outbound(APP_UID, v6).unwrap();
        // Istio's nftables rules live in an `inet` table: they capture IPv6 whatever the
        // switch says, which adds only the IPv6-specific rules (its `*V6RuleIfSupported`).
        let want_v6 = want_v6 || flavor == Flavor::Nftables;
        let want = if want_v6 {
            "sidecar:15001".to_string()
        } else {
            format!("upstream:{UPSTREAM_PORT}")
        };
        assert_eq!(who6, want, "{flavor:?} {flags:?} {env:?}: IPv6 connection");
        assert_eq!(peer6, v6, "{flavor:?}: the app's getpeername");
        if want_v6 {
            assert_eq!(
                orig6,
                Some(v6),
                "{flavor:?}: SO_ORIGINAL_DST of the IPv6 connection"
            );
        }
    }
}

#[test]
fn dual_stack_iptables() {
    dual_stack(Flavor::IptablesNft);
}

#[test]
fn dual_stack_nftables() {
    dual_stack(Flavor::Nftables);
}

#[test]
fn dual_stack_ebpf() {
    if !interceptor_tests::ebpf_expected() {
        eprintln!("skipped: eBPF not expected on this machine (INTERCEPTOR_TESTS_NO_EBPF)");
        return;
    }
    dual_stack(Flavor::Ebpf);
}

/// `--cni-mode`: legacy iptables takes the xtables lock on the pod's netns file, as Istio's CNI
/// plugin does, so a node-wide /run/xtables.lock held by someone else (kube-proxy, another
/// pod's setup) does not hold this pod up; without it the same apply waits and fails.
#[test]
fn cni_mode_scopes_the_xtables_lock_to_the_pod() {
    use std::os::fd::AsRawFd;
    let pod = Pod::new("cnimode").unwrap();
    let flags = ["-i", "*", "-u", "1337", "--ipv6", "false"];
    // A short tool limit: the lock wait (-w) is half of it.
    let env = [("INTERCEPTOR_TOOL_TIMEOUT", "2")];
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open("/run/xtables.lock")
        .unwrap();
    // SAFETY: flock on a file descriptor this test owns; released when `lock` is closed.
    assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) }, 0);
    let held = apply_env(&pod, Flavor::IptablesLegacy, &flags, &env);
    let mut cni = flags.to_vec();
    cni.push("--cni-mode");
    let scoped = apply_env(&pod, Flavor::IptablesLegacy, &cni, &env);
    drop(lock);
    let err = held.expect_err("applied although the node-wide xtables lock was held");
    assert!(
        err.contains("xtables lock") || err.contains("lock"),
        "{err}"
    );
    scoped.unwrap_or_else(|e| panic!("--cni-mode: {e}"));
    let v4 = SocketAddr::new(pod.topo.upstream_v4().into(), UPSTREAM_PORT);
    let (who, _, _) = pod.outbound(APP_UID, v4).unwrap();
    assert_eq!(who, "sidecar:15001");
    // Istio's flag needs the pod's netns: without one there is no pod to scope to.
    let out = bin::run(
        &["apply", "--dry-run", "--cni-mode", "--backend", "iptables"],
        &[],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("--cni-mode") && stderr.contains("--network-namespace"),
        "{stderr}"
    );
}
