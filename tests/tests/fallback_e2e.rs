//! The iptables/nftables fallbacks applied for real inside a test pod netns, for each of
//! iptables-legacy, iptables-nft and nftables: the traffic cases, idempotent re-apply,
//! drift handling and cleanup.

use interceptor_tests::cases::{self, apply, ruleset, Flavor, Pod};

fn traffic(flavor: Flavor) {
    let n = cases::outbound_defaults(flavor).unwrap_or_else(|e| panic!("{flavor:?}: {e:#}"));
    let m = cases::outbound_includes(flavor).unwrap_or_else(|e| panic!("{flavor:?}: {e:#}"));
    println!("{flavor:?}: {} traffic cases passed", n + m);
}

#[test]
fn traffic_iptables_legacy() {
    traffic(Flavor::IptablesLegacy);
}

#[test]
fn traffic_iptables_nft() {
    traffic(Flavor::IptablesNft);
}

#[test]
fn traffic_nftables() {
    traffic(Flavor::Nftables);
}

/// Apply twice is a no-op, drift needs --reconcile, --force-apply re-applies, and
/// --cleanup-only restores the netns's ruleset to what it was.
fn lifecycle(flavor: Flavor) {
    let pod = Pod::new("life").unwrap();
    let t = &pod.topo;
    let before = ruleset(t);
    let flags = ["-i", "*", "-b", "*", "-d", "15020", "--ipv6", "true"];
    let first = apply(&pod, flavor, &flags).unwrap();
    assert!(first.contains("rules applied"), "{flavor:?}: {first}");
    let installed = ruleset(t);
    assert_ne!(installed, before, "{flavor:?}: nothing was installed");
    let second = apply(&pod, flavor, &flags).unwrap();
    assert!(
        second.contains("already in place"),
        "{flavor:?}: second apply was not a no-op: {second}"
    );
    assert_eq!(
        ruleset(t),
        installed,
        "{flavor:?}: second apply changed the ruleset"
    );
    // A different config is drift: refused without --reconcile, replaced with it.
    let drift = ["-i", "*", "-b", "*", "-d", "15021", "--ipv6", "true"];
    assert!(
        apply(&pod, flavor, &drift).is_err(),
        "{flavor:?}: drift applied without --reconcile"
    );
    assert_eq!(
        ruleset(t),
        installed,
        "{flavor:?}: a refused apply changed the ruleset"
    );
    let mut with = drift.to_vec();
    with.push("--reconcile");
    let out = apply(&pod, flavor, &with).unwrap();
    assert!(out.contains("replaced"), "{flavor:?}: {out}");
    assert!(
        ruleset(t).contains("15021"),
        "{flavor:?}: reconcile did not install the new rules"
    );
    let mut force = drift.to_vec();
    force.push("--force-apply");
    assert!(
        apply(&pod, flavor, &force).unwrap().contains("replaced"),
        "{flavor:?}: --force-apply"
    );
    let mut clean = drift.to_vec();
    clean.push("--cleanup-only");
    assert!(
        apply(&pod, flavor, &clean).unwrap().contains("removed"),
        "{flavor:?}: cleanup"
    );
    assert_eq!(
        ruleset(t),
        before,
        "{flavor:?}: cleanup did not restore the ruleset"
    );
    assert!(
        apply(&pod, flavor, &clean)
            .unwrap()
            .contains("nothing to remove"),
        "{flavor:?}: second cleanup"
    );
}

#[test]
fn lifecycle_iptables_legacy() {
    lifecycle(Flavor::IptablesLegacy);
}

#[test]
fn lifecycle_iptables_nft() {
    lifecycle(Flavor::IptablesNft);
}

#[test]
fn lifecycle_nftables() {
    lifecycle(Flavor::Nftables);
}

/// A pod whose netns has IPv6 disabled: detection says IPv4, apply and cleanup succeed.
#[test]
fn ipv6_disabled_node_does_not_fail() {
    let pod = Pod::new("nov6").unwrap();
    let t = &pod.topo;
    t.pod_exec("sysctl", &["-qw", "net.ipv6.conf.all.disable_ipv6=1"], None)
        .unwrap();
    for flavor in [Flavor::IptablesNft, Flavor::Nftables] {
        apply(&pod, flavor, &["-i", "*"]).unwrap_or_else(|e| panic!("{flavor:?}: {e:#}"));
        let v6 = t
            .pod_exec("ip6tables-nft-save", &[], None)
            .unwrap_or_default();
        assert!(
            !v6.contains("ISTIO"),
            "{flavor:?}: IPv6 rules installed although IPv6 is off"
        );
        apply(&pod, flavor, &["-i", "*", "--cleanup-only"])
            .unwrap_or_else(|e| panic!("{flavor:?}: {e:#}"));
    }
}

// ------------------------------------------------------------------ faults and drift

/// Test-only wrappers first on PATH: each named tool runs the real one, except that its
/// `k`-th invocation inside the pod netns (whose arguments contain `matching`) fails — after
/// applying only the document's first table (`partial`), or without running at all.
struct FaultyTools {
    dir: std::path::PathBuf,
    counter: std::path::PathBuf,
}

impl FaultyTools {
    fn new(pod: &Pod, tools: &[&str], matching: &str, partial: bool) -> Self {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "ic-faultbin-{}-{}-{}",
            std::process::id(),
            pod.topo.pod_ns_name(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let ino = std::fs::metadata(pod.topo.pod_netns()).unwrap().ino();
        let counter = dir.join("fail-at");
        for tool in tools {
            let real = std::env::split_paths(&std::env::var_os("PATH").unwrap())
                .map(|d| d.join(tool))
                .find(|p| p.is_file())
                .unwrap_or_else(|| panic!("{tool} not installed"));
            let fault = if partial {
                "awk '{print} /^COMMIT/{exit}' | \"$real\" \"$@\" >/dev/null 2>&1"
            } else {
                "cat >/dev/null"
            };
            let script = format!(
                "#!/bin/sh\n# test-only fault wrapper\nreal={real}\nctr={ctr}\n\
                 if [ -e \"$ctr\" ] && [ \"$(readlink /proc/self/ns/net)\" = 'net:[{ino}]' ] \
                 && echo \"$*\" | grep -q -e '{matching}'; then\n\
                 k=$(cat \"$ctr\")\n\
                 if [ \"$k\" -le 1 ]; then rm -f \"$ctr\"; {fault}; \
                 echo 'injected fault: {tool} failed midway' >&2; exit 1; fi\n\
                 echo $((k - 1)) > \"$ctr\"\nfi\nexec \"$real\" \"$@\"\n",
                real = real.display(),
                ctr = counter.display(),
            );
            let p = dir.join(tool);
            std::fs::write(&p, script).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        Self { dir, counter }
    }

    /// Arms the fault for the `k`-th matching invocation in the pod.
    fn arm(&self, k: u32) {
        std::fs::write(&self.counter, k.to_string()).unwrap();
    }

    fn fired(&self) -> bool {
        !self.counter.exists()
    }

    /// `interceptor apply` with the wrappers first on PATH.
    fn apply(&self, pod: &Pod, flavor: Flavor, flags: &[&str]) -> std::process::Output {
        let path = format!(
            "{}:{}",
            self.dir.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let ns = pod.topo.pod_netns().to_str().unwrap();
        let mut args = vec!["apply", "--network-namespace", ns];
        args.extend_from_slice(flavor.args());
        args.extend_from_slice(flags);
        interceptor_tests::bin::run(&args, &[("PATH", &path)])
    }
}

impl Drop for FaultyTools {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `ruleset` without nft's packet/byte counters (traffic moves them; they are not rules).
fn rules(t: &interceptor_tests::topology::Topology) -> String {
    ruleset(t)
        .lines()
        .map(|l| match l.find("counter packets ") {
            Some(i) => {
                let tail = &l[i + "counter packets ".len()..];
                // "<n> bytes <m> rest"
                let rest = tail.splitn(4, ' ').nth(3).unwrap_or("");
                format!("{}counter {rest}\n", &l[..i])
            }
            None => format!("{l}\n"),
        })
        .collect()
}

/// The rule tools failing midway — on a fresh apply, on either step of a reconcile, and for
/// IPv6 after IPv4 went in — leave the pod's ruleset exactly as it was.
fn tool_failure(flavor: Flavor) {
    let pod = Pod::new("tfail").unwrap();
    let t = &pod.topo;
    let (restore, restore6, matching, partial) = match flavor {
        Flavor::IptablesLegacy => (
            "iptables-legacy-restore",
            "ip6tables-legacy-restore",
            "",
            true,
        ),
        Flavor::IptablesNft => ("iptables-nft-restore", "ip6tables-nft-restore", "", true),
        _ => ("nft", "nft", "-f", false),
    };
    // DNS capture adds the raw table: two tables in the document, so `partial` applies one.
    let a = [
        "-i",
        "*",
        "-b",
        "*",
        "--redirect-dns",
        "--dns-servers",
        "10.96.0.10",
        "--ipv6",
        "false",
    ];
    let b = [
        "-i",
        "*",
        "-b",
        "*",
        "-d",
        "15021",
        "--redirect-dns",
        "--dns-servers",
        "10.96.0.10",
        "--ipv6",
        "false",
    ];
    let v6 = ["-i", "*", "-b", "*", "--ipv6", "true"];
    let tools = FaultyTools::new(&pod, &[restore, restore6], matching, partial);
    let faults = std::cell::Cell::new(0);
    let check = |what: &str, flags: &[&str], k: u32, want: &str| {
        tools.arm(k);
        let out = tools.apply(&pod, flavor, flags);
        assert!(tools.fired(), "{flavor:?} {what}: the fault did not fire");
        faults.set(faults.get() + 1);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{flavor:?} {what}: succeeded: {err}");
        assert!(err.contains("injected fault"), "{flavor:?} {what}: {err}");
        assert_eq!(rules(t), want, "{flavor:?} {what}: the netns changed");
    };
    let before = rules(t);
    check("fresh apply", &a, 1, &before);
    if flavor != Flavor::Nftables {
        let v6_tools = FaultyTools::new(&pod, &[restore6], matching, false);
        v6_tools.arm(1);
        let out = v6_tools.apply(&pod, flavor, &v6);
        assert!(
            v6_tools.fired() && !out.status.success(),
            "{flavor:?} v6 fault"
        );
        faults.set(faults.get() + 1);
        assert_eq!(
            rules(t),
            before,
            "{flavor:?}: IPv6 failed, IPv4 stayed applied"
        );
    }
    apply(&pod, flavor, &a).unwrap();
    let installed = rules(t);
    let mut b_re = b.to_vec();
    b_re.push("--reconcile");
    // iptables reconciles in two steps (remove ours, apply): fail each; nft in one transaction.
    let steps = if flavor == Flavor::Nftables { 1 } else { 2 };
    for k in 1..=steps {
        check(&format!("reconcile, step {k}"), &b_re, k, &installed);
    }
    // Without faults the same reconcile goes through.
    let out = tools.apply(&pod, flavor, &b_re);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(rules(t).contains("15021"));
    apply(&pod, flavor, &["-i", "*", "--cleanup-only"]).unwrap();
    assert_eq!(rules(t), before);
    let faults = faults.get();
    println!("{flavor:?}: {faults} rule-tool failures injected, the netns unchanged after each");
}

#[test]
fn tool_failure_iptables_legacy() {
    tool_failure(Flavor::IptablesLegacy);
}

#[test]
fn tool_failure_iptables_nft() {
    tool_failure(Flavor::IptablesNft);
}

#[test]
fn tool_failure_nftables() {
    tool_failure(Flavor::Nftables);
}

/// Drift made by hand — a rule added to, and a rule deleted from, our chains: apply without
/// --reconcile refuses and names the difference; with --reconcile the rules are exactly the
/// wanted ones again.
fn hand_drift(flavor: Flavor) {
    let pod = Pod::new("hdrift").unwrap();
    let t = &pod.topo;
    let flags = ["-i", "*", "-b", "*", "--ipv6", "false"];
    apply(&pod, flavor, &flags).unwrap();
    let wanted = ruleset(t);
    let hand: Vec<(Vec<&str>, &str)> = match flavor {
        Flavor::IptablesLegacy | Flavor::IptablesNft => {
            let bin = if flavor == Flavor::IptablesLegacy {
                "iptables-legacy"
            } else {
                "iptables-nft"
            };
            vec![
                (
                    vec![
                        bin,
                        "-t",
                        "nat",
                        "-I",
                        "ISTIO_OUTPUT",
                        "1",
                        "-d",
                        "10.99.0.0/16",
                        "-j",
                        "RETURN",
                    ],
                    "10.99.0.0/16",
                ),
                (
                    vec![bin, "-t", "nat", "-D", "ISTIO_REDIRECT", "1"],
                    "ISTIO_REDIRECT",
                ),
            ]
        }
        _ => vec![
            (
                vec![
                    "nft",
                    "insert",
                    "rule",
                    "inet",
                    "istio-proxy-nat",
                    "istio-output",
                    "ip",
                    "daddr",
                    "10.99.0.0/16",
                    "return",
                ],
                "10.99.0.0/16",
            ),
            (
                vec![
                    "nft",
                    "flush",
                    "chain",
                    "inet",
                    "istio-proxy-nat",
                    "istio-redirect",
                ],
                "redirect to :15001",
            ),
        ],
    };
    for (cmd, named) in &hand {
        t.pod_exec(cmd[0], &cmd[1..], None).unwrap();
        assert_ne!(ruleset(t), wanted, "{flavor:?}: {cmd:?} changed nothing");
        let err = apply(&pod, flavor, &flags).unwrap_err().to_string();
        assert!(
            err.contains("--reconcile") && err.contains(named),
            "{flavor:?}: drift by {cmd:?} not named: {err}"
        );
        let mut with = flags.to_vec();
        with.push("--reconcile");
        apply(&pod, flavor, &with).unwrap();
        assert_eq!(ruleset(t), wanted, "{flavor:?}: --reconcile after {cmd:?}");
    }
    apply(&pod, flavor, &["-i", "*", "--cleanup-only"]).unwrap();
    println!(
        "{flavor:?}: {} hand-made drifts refused and named, then repaired by --reconcile",
        hand.len()
    );
}

#[test]
fn hand_drift_iptables_legacy() {
    hand_drift(Flavor::IptablesLegacy);
}

#[test]
fn hand_drift_iptables_nft() {
    hand_drift(Flavor::IptablesNft);
}

#[test]
fn hand_drift_nftables() {
    hand_drift(Flavor::Nftables);
}
