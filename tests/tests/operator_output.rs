//! The operator's commands as people and tools read them: `--pod namespace/name` wherever a
//! netns path is asked (resolved through the daemon's registered identities, with an error
//! naming an unknown pod), `-o json` that parses (pod list, pod show, explain's `--output`),
//! words by default, no Rust Debug names in any human output, and step lines for the long
//! operations.

use interceptor_tests::bin;
use interceptor_tests::daemon::DaemonProc;
use interceptor_tests::ebpf::EbpfInstall;
use interceptor_tests::topology::Topology;

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// CamelCase words that are names in their own right: the kernel's (`/proc/self/status`) and
/// other software's (doctor names the LSMs that can deny bpf()).
const PROPER_NAMES: [&str; 2] = ["CapEff", "AppArmor"];

/// Words that look like Rust Debug output of our domain types: a CamelCase identifier (two
/// capitalised parts, `ExcludedCidr`, `PodPolicy`), a struct literal (`Name {`), or
/// `Some(`/`None`.
fn debug_names(out: &str) -> Vec<String> {
    let mut found = Vec::new();
    for word in out
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| !PROPER_NAMES.contains(w))
    {
        let b = word.as_bytes();
        let camel = b.first().is_some_and(u8::is_ascii_uppercase)
            && b.windows(2)
                .any(|w| w[0].is_ascii_lowercase() && w[1].is_ascii_uppercase());
        if camel || word == "Ebpf" || word == "Iptables" || word == "Nftables" || word == "None" {
            found.push(word.to_string());
        }
    }
    if out.contains("Some(") {
        found.push("Some(".into());
    }
    // `Name { field: …` (nft's own `chain { type …` is lower case).
    for (i, _) in out.match_indices(" { ") {
        let before = out[..i].rsplit(|c: char| !c.is_ascii_alphanumeric()).next();
        if let Some(name) = before.filter(|w| w.starts_with(|c: char| c.is_ascii_uppercase())) {
            found.push(format!("{name} {{"));
        }
    }
    found
}

fn assert_words(what: &str, out: &str) {
    let found = debug_names(out);
    assert!(found.is_empty(), "{what}: Debug names {found:?} in\n{out}");
}

#[test]
fn debug_name_check_catches_debug_output() {
    assert_eq!(
        debug_names("rule: ExcludedCidr\npolicy: PodPolicy { pod_id: 0 }"),
        ["ExcludedCidr", "PodPolicy", "PodPolicy {"]
    );
    assert_eq!(debug_names("# backend: Ebpf (x)"), ["Ebpf"]);
    assert!(debug_names("an LSM (SELinux, AppArmor) denies bpf(); CapEff 0").is_empty());
    assert!(debug_names("verdict: pass\nrule: excluded_cidr\nbackend: eBPF, IPv6 on").is_empty());
}

/// `--pod ns/name` for pod show, explain and pod remove; JSON of pod list, pod show and explain
/// parsed; the text forms in words.
#[test]
fn pod_by_name_and_outputs() {
    let d = DaemonProc::start("opout").unwrap();
    let sock = d.socket().to_str().unwrap().to_string();
    let topo = Topology::new("opout").unwrap();
    let ns = topo.pod_netns().to_str().unwrap().to_string();
    d.pod_ok(&[
        "add",
        "--network-namespace",
        &ns,
        "--pod",
        "prod/web-1",
        "-i",
        "*",
        "-x",
        "10.96.0.0/12",
        "--ipv6",
        "false",
    ]);

    // pod show: words by default, JSON on request; by name or by netns alike.
    let shown = d.pod_ok(&["show", "--pod", "prod/web-1"]);
    assert!(shown.contains("pod: prod/web-1\n"), "{shown}");
    assert!(shown.contains(&format!("netns: {ns}\n")), "{shown}");
    assert!(
        shown.contains("\n  -x/--istio-service-exclude-cidr: 10.96.0.0/12\n"),
        "{shown}"
    );
    assert_words("pod show", &shown);
    assert_eq!(shown, d.pod_ok(&["show", "--network-namespace", &ns]));
    let j: serde_json::Value =
        serde_json::from_str(&d.pod_ok(&["show", "--pod", "prod/web-1", "-o", "json"])).unwrap();
    assert_eq!(j["netns"], ns.as_str(), "{j}");
    assert_eq!(j["identity"]["namespace"], "prod", "{j}");
    assert_eq!(j["identity"]["name"], "web-1", "{j}");
    assert_eq!(
        j["config"]["outbound_ip_ranges_exclude"], "10.96.0.0/12",
        "{j}"
    );
    assert!(
        ["ebpf", "iptables", "nftables"].contains(&j["backend"].as_str().unwrap()),
        "{j}"
    );

    // pod list: a table, and JSON.
    let listed = d.pod_ok(&["list"]);
    assert!(
        listed.contains("prod/web-1") && listed.contains(&ns),
        "{listed}"
    );
    assert_words("pod list", &listed);
    let j: serde_json::Value = serde_json::from_str(&d.pod_ok(&["list", "-o", "json"])).unwrap();
    let pods = j["pods"].as_array().unwrap();
    assert_eq!(pods.len(), 1, "{j}");
    assert_eq!(pods[0]["identity"]["name"], "web-1", "{j}");
    assert_eq!(pods[0]["netns"], ns.as_str(), "{j}");

    // explain --pod: the registered config (its -x) and netns, in words and as JSON.
    let explain = |extra: &[&str]| {
        let mut args = vec![
            "explain",
            "--socket",
            &sock,
            "--uid",
            "1000",
            "--dst",
            "10.96.0.10:443",
        ];
        args.extend_from_slice(extra);
        bin::run(&args, &[])
    };
    let out = explain(&["--pod", "prod/web-1"]);
    let said = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(said.contains("pod: prod/web-1\n"), "{said}");
    assert!(said.contains("rule: excluded_cidr\n"), "{said}");
    assert!(
        said.contains("why: 10.96.0.10 is in 10.96.0.0/12 of -x/--istio-service-exclude-cidr"),
        "{said}"
    );
    assert!(
        said.contains("istio-iptables rule: -A ISTIO_OUTPUT -d 10.96.0.0/12 -j RETURN\n"),
        "{said}"
    );
    assert_words("explain", &said);
    let out = explain(&["--pod", "prod/web-1", "--output", "json"]);
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["pod"], "prod/web-1", "{j}");
    assert_eq!(j["verdict"], "pass", "{j}");
    assert_eq!(j["rule"], "excluded_cidr", "{j}");
    assert_eq!(j["entry"]["value"], "10.96.0.0/12", "{j}");
    // The pod's own address is local: its registered netns is the one explained.
    let own = format!("{}:8080", topo.pod_v4());
    let out = bin::run(
        &[
            "explain",
            "--socket",
            &sock,
            "--pod",
            "prod/web-1",
            "--uid",
            "1337",
            "--dst",
            &own,
            "--output",
            "json",
        ],
        &[],
    );
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["rule"], "proxy_uid_to_local", "{j}");

    // Config flags with --pod are refused, naming them; so is --pod with a netns.
    let out = explain(&["--pod", "prod/web-1", "-x", "1.2.3.0/24"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("--istio-service-exclude-cidr"),
        "{}",
        text(&out.stderr)
    );
    let out = explain(&["--pod", "prod/web-1", "--network-namespace", &ns]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("--network-namespace"));
    let out = d.pod(&["show", "--pod", "prod/web-1", "--network-namespace", &ns]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("not both"),
        "{}",
        text(&out.stderr)
    );
    // NETWORK_NAMESPACE in the environment gives way to --pod; alone, it names the pod.
    let env = [("NETWORK_NAMESPACE", "/nonexistent/netns")];
    let mut show = vec!["pod", "show", "--socket", &sock, "--pod", "prod/web-1"];
    let out = bin::run(&show, &env);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), shown);
    show.truncate(4);
    let env = [("NETWORK_NAMESPACE", ns.as_str())];
    assert_eq!(text(&bin::run(&show, &env).stdout), shown);
    let out = bin::run(&show, &[]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("--pod"), "{}", text(&out.stderr));

    // Unknown pods: an error naming the pod, from every command that takes --pod.
    let out = explain(&["--pod", "prod/nope"]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("pod prod/nope is not registered"), "{err}");
    for cmd in ["show", "remove"] {
        let out = d.pod(&[cmd, "--pod", "prod/nope"]);
        let err = text(&out.stderr);
        assert!(
            !out.status.success() && err.contains("pod prod/nope is not registered"),
            "pod {cmd}: {err}"
        );
    }
    let out = bin::run(&["validate", "--socket", &sock, "--pod", "prod/nope"], &[]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("pod prod/nope is not registered"), "{err}");
    // validate --pod runs in the pod's netns: captured outbound, so it passes or says why not
    // (exit 0 or 126), never a usage error.
    let out = bin::run(
        &[
            "validate",
            "--socket",
            &sock,
            "--pod",
            "prod/web-1",
            "--probe-timeout",
            "2s",
        ],
        &[],
    );
    assert!(
        matches!(out.status.code(), Some(0 | 126)),
        "{:?}: {}",
        out.status.code(),
        text(&out.stderr)
    );
    let out = d.pod(&["show", "--pod", "web-1"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("want namespace/name"));

    // pod remove --pod.
    d.pod_ok(&["remove", "--pod", "prod/web-1"]);
    let j: serde_json::Value = serde_json::from_str(&d.pod_ok(&["list", "-o", "json"])).unwrap();
    assert!(j["pods"].as_array().unwrap().is_empty(), "{j}");
}

/// The human outputs of doctor, the dry runs and explain carry words, not Debug names.
#[test]
fn human_outputs_have_no_debug_names() {
    let topo = Topology::new("opdbg").unwrap();
    let ns = topo.pod_netns().to_str().unwrap().to_string();
    let run = |args: &[&str]| {
        let out = bin::run(args, &[]);
        assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
        format!("{}{}", text(&out.stdout), text(&out.stderr))
    };
    let doctor = run(&["doctor"]);
    assert!(doctor.contains("auto backend: "), "{doctor}");
    assert_words("doctor", &doctor);
    let common = [
        "--network-namespace",
        ns.as_str(),
        "-i",
        "*",
        "-x",
        "10.0.0.0/8",
        "-o",
        "5555",
        "--ipv6",
        "false",
    ];
    let mut dry = vec!["apply", "--dry-run", "--backend", "ebpf"];
    dry.extend(common);
    let ebpf = run(&dry);
    for want in [
        "# backend: eBPF (",
        "proxy uids (never captured): 1337\n",
        "redirect outbound to port: 15001\n",
        "outbound CIDRs never captured (-x): 10.0.0.0/8\n",
        "outbound ports never captured (-o): 5555\n",
        "switches: every outbound destination captured (-i '*')",
    ] {
        assert!(ebpf.contains(want), "{want:?} not in\n{ebpf}");
    }
    assert_words("apply --dry-run --backend ebpf", &ebpf);
    for backend in ["iptables", "nftables"] {
        let mut dry = vec!["apply", "--dry-run", "--backend", backend];
        dry.extend(common);
        let out = run(&dry);
        assert!(out.contains(&format!("# backend: {backend} (")), "{out}");
        assert_words(backend, &out);
    }
    for (dst, extra) in [
        ("10.1.2.3:80", None),
        ("10.200.0.1:80", None),
        ("10.200.0.1:5555", None),
        ("127.0.0.1:80", None),
        ("10.200.0.1:80", Some("eth0")),
    ] {
        let mut args = vec!["explain", "--uid", "1000", "--dst", dst];
        args.extend(common);
        if let Some(nic) = extra {
            args.extend(["-c", nic]);
        }
        let out = run(&args);
        assert!(out.contains("\nrule: "), "{out}");
        assert_words("explain", &out);
    }
}

/// `apply` and `cleanup` say each step of loading, registering and removing on stderr.
#[test]
fn long_operations_show_progress() {
    if !interceptor_tests::ebpf_expected() {
        return;
    }
    let topo = Topology::new("opprg").unwrap();
    let ns = topo.pod_netns().to_str().unwrap().to_string();
    let install = EbpfInstall::new("opprg");
    let bpffs = install.dir().to_str().unwrap().to_string();
    let out = bin::run(
        &[
            "apply",
            "--backend",
            "ebpf",
            "--bpffs",
            &bpffs,
            "--network-namespace",
            &ns,
            "-i",
            "*",
            "--ipv6",
            "false",
            "--socket",
            "/nonexistent/interceptor.sock",
        ],
        &[],
    );
    let err = text(&out.stderr);
    assert!(out.status.success(), "{err}");
    let steps: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("interceptor: "))
        .collect();
    for want in [
        "interceptor: checking the eBPF programs under ",
        "interceptor: loading the eBPF programs (the kernel's verifier checks each",
        "interceptor: attaching them to the cgroup ",
        "interceptor: registering the pod (netns ",
        "interceptor: programs loaded and attached; pod registered (eBPF backend: ",
    ] {
        assert!(
            steps.iter().any(|l| l.starts_with(want)),
            "{want:?} not in\n{err}"
        );
    }
    assert_words("apply", &err);
    let out = bin::run(&["cleanup", "--bpffs", &bpffs], &[]);
    let err = text(&out.stderr);
    assert!(out.status.success(), "{err}");
    for want in [
        "interceptor: releasing the pods' reserved proxy ports",
        "interceptor: detaching the programs from the cgroup ",
        "interceptor: unpinning the maps under ",
        "interceptor: eBPF programs detached and unpinned",
    ] {
        assert!(
            err.lines().any(|l| l.starts_with(want)),
            "{want:?} not in\n{err}"
        );
    }
}
