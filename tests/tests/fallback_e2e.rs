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

/// What a wrapper does at its armed invocation instead of just running the tool.
#[derive(Clone)]
enum Fault {
    /// Fail without running the tool.
    Fail,
    /// Apply only the document's first table, then fail.
    Partial,
    /// Someone else's concurrent change (a shell command run just then), then fail as `Partial`
    /// (or as `Fail` when false).
    EditThen(String, bool),
    /// Apply the whole document, then hang (for 60 s, then fail).
    Hang,
}

/// Test-only wrappers first on PATH: each named tool runs the real one, except that its
/// `k`-th invocation inside the pod netns (whose arguments contain `matching`) meets `fault`.
/// Every invocation's arguments are recorded.
struct FaultyTools {
    dir: std::path::PathBuf,
    counter: std::path::PathBuf,
    /// The command line of a hanging wrapper's sleep, unique to these wrappers.
    hang: String,
}

impl FaultyTools {
    fn new(pod: &Pod, tools: &[&str], matching: &str, fault: Fault) -> Self {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!(
            "ic-faultbin-{}-{}-{n}",
            std::process::id(),
            pod.topo.pod_ns_name(),
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let ino = std::fs::metadata(pod.topo.pod_netns()).unwrap().ino();
        let counter = dir.join("fail-at");
        let hang = format!("sleep 60.{:07}{n:03}", std::process::id());
        let partial = "awk '{print} /^COMMIT/{exit}' | \"$real\" \"$@\" >/dev/null 2>&1";
        for tool in tools {
            let real = std::env::split_paths(&std::env::var_os("PATH").unwrap())
                .map(|d| d.join(tool))
                .find(|p| p.is_file())
                .unwrap_or_else(|| panic!("{tool} not installed"));
            let failed = format!("echo 'injected fault: {tool} failed midway' >&2; exit 1");
            let action = match &fault {
                Fault::Fail => format!("cat >/dev/null; {failed}"),
                Fault::Partial => format!("{partial}; {failed}"),
                Fault::EditThen(edit, true) => format!("( {edit} ) >&2; {partial}; {failed}"),
                Fault::EditThen(edit, false) => format!("( {edit} ) >&2; cat >/dev/null; {failed}"),
                Fault::Hang => format!(
                    "\"$real\" \"$@\" >/dev/null 2>&1; {hang}; \
                     echo 'injected fault: {tool} hung' >&2; exit 1"
                ),
            };
            let script = format!(
                "#!/bin/sh\n# test-only fault wrapper\nreal={real}\nctr={ctr}\n\
                 echo \"$*\" >> {log}\n\
                 if [ -e \"$ctr\" ] && [ \"$(readlink /proc/self/ns/net)\" = 'net:[{ino}]' ] \
                 && echo \"$*\" | grep -q -e '{matching}'; then\n\
                 k=$(cat \"$ctr\")\n\
                 if [ \"$k\" -le 1 ]; then rm -f \"$ctr\"; {action}; fi\n\
                 echo $((k - 1)) > \"$ctr\"\nfi\nexec \"$real\" \"$@\"\n",
                real = real.display(),
                ctr = counter.display(),
                log = dir.join("args.log").display(),
            );
            let p = dir.join(tool);
            std::fs::write(&p, script).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        Self { dir, counter, hang }
    }

    /// Arms the fault for the `k`-th matching invocation in the pod.
    fn arm(&self, k: u32) {
        std::fs::write(&self.counter, k.to_string()).unwrap();
    }

    fn fired(&self) -> bool {
        !self.counter.exists()
    }

    /// The arguments of every invocation so far, one line each.
    fn invocations(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.join("args.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// Whether a hanging wrapper's sleep is still running.
    fn hang_left(&self) -> bool {
        std::process::Command::new("pgrep")
            .args(["-f", &self.hang])
            .output()
            .is_ok_and(|o| !o.stdout.is_empty())
    }

    /// `interceptor apply` with the wrappers first on PATH.
    fn apply(&self, pod: &Pod, flavor: Flavor, flags: &[&str]) -> std::process::Output {
        self.apply_env(pod, flavor, flags, &[])
    }

    /// `apply` with more environment.
    fn apply_env(
        &self,
        pod: &Pod,
        flavor: Flavor,
        flags: &[&str],
        env: &[(&str, &str)],
    ) -> std::process::Output {
        let path = format!(
            "{}:{}",
            self.dir.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let ns = pod.topo.pod_netns().to_str().unwrap();
        let mut args = vec!["apply", "--network-namespace", ns];
        args.extend_from_slice(flavor.args());
        args.extend_from_slice(flags);
        let mut env = env.to_vec();
        env.push(("PATH", &path));
        interceptor_tests::bin::run(&args, &env)
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
    let fault = if partial { Fault::Partial } else { Fault::Fail };
    let tools = FaultyTools::new(&pod, &[restore, restore6], matching, fault);
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
        let v6_tools = FaultyTools::new(&pod, &[restore6], matching, Fault::Fail);
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

// ------------------------------------------------------------------ rule tools: limits and ownership

/// The restore tool (and for the scratch proof, nft's `-f`) of a flavor, and what its pod-netns
/// invocations that change rules contain.
fn restore_tool(flavor: Flavor) -> (&'static str, &'static str) {
    match flavor {
        Flavor::IptablesLegacy => ("iptables-legacy-restore", ""),
        Flavor::IptablesNft => ("iptables-nft-restore", ""),
        _ => ("nft", "-f"),
    }
}

/// A rule tool that hangs after applying its whole document is killed at the time limit
/// (`INTERCEPTOR_TOOL_TIMEOUT`): the error names the tool and the limit, what it applied is
/// rolled back — on a fresh apply and on a reconcile — and nothing it started is left running.
fn tool_timeout(flavor: Flavor) {
    let pod = Pod::new("ttime").unwrap();
    let t = &pod.topo;
    let (tool, matching) = restore_tool(flavor);
    let tools = FaultyTools::new(&pod, &[tool], matching, Fault::Hang);
    let flags = ["-i", "*", "-b", "*", "--ipv6", "false"];
    let limit = [("INTERCEPTOR_TOOL_TIMEOUT", "2")];
    let hung = |what: &str, flags: &[&str], want: &str| {
        tools.arm(1);
        let t0 = std::time::Instant::now();
        let out = tools.apply_env(&pod, flavor, flags, &limit);
        let took = t0.elapsed();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(tools.fired(), "{flavor:?} {what}: the fault did not fire");
        assert!(!out.status.success(), "{flavor:?} {what}: succeeded: {err}");
        assert!(
            took < std::time::Duration::from_secs(30),
            "{flavor:?} {what}: the hung tool was waited for ({took:?})"
        );
        assert!(
            err.contains(tool) && err.contains("did not finish within 2s"),
            "{flavor:?} {what}: {err}"
        );
        assert_eq!(rules(t), want, "{flavor:?} {what}: not rolled back");
        assert!(
            !tools.hang_left(),
            "{flavor:?} {what}: the hung tool is still running"
        );
        took
    };
    let before = rules(t);
    let took = hung("fresh apply", &flags, &before);
    apply(&pod, flavor, &flags).unwrap();
    let installed = rules(t);
    let mut other = vec!["-i", "*", "-b", "*", "-d", "15021", "--ipv6", "false"];
    other.push("--reconcile");
    hung("reconcile", &other, &installed);
    apply(&pod, flavor, &["-i", "*", "--cleanup-only"]).unwrap();
    assert_eq!(rules(t), before);
    println!("{flavor:?}: a hung {tool} killed after {took:?}, its rules rolled back");
}

#[test]
fn tool_timeout_iptables_legacy() {
    tool_timeout(Flavor::IptablesLegacy);
}

#[test]
fn tool_timeout_iptables_nft() {
    tool_timeout(Flavor::IptablesNft);
}

#[test]
fn tool_timeout_nftables() {
    tool_timeout(Flavor::Nftables);
}

/// Every iptables-restore run carries `-w`, and a legacy restore (the one that takes the lock)
/// waits while another program holds the xtables lock — as kube-proxy does while it edits —
/// instead of committing its table over that program's change; held past the wait, the apply
/// fails saying so, with nothing applied.
#[test]
fn xtables_lock_is_waited_for() {
    let pod = Pod::new("xlock").unwrap();
    let t = &pod.topo;
    let flags = ["-i", "*", "-b", "*", "--ipv6", "true"];
    let before = rules(t);
    for (flavor, tools) in [
        (
            Flavor::IptablesLegacy,
            ["iptables-legacy-restore", "ip6tables-legacy-restore"],
        ),
        (
            Flavor::IptablesNft,
            ["iptables-nft-restore", "ip6tables-nft-restore"],
        ),
    ] {
        let rec = FaultyTools::new(&pod, &tools, "", Fault::Fail);
        for f in [&flags[..], &["-i", "*", "--cleanup-only"]] {
            let out = rec.apply(&pod, flavor, f);
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let runs = rec.invocations();
        assert!(runs.len() >= 4, "{flavor:?}: {runs:?}");
        for r in &runs {
            let words: Vec<&str> = r.split_whitespace().collect();
            assert!(
                words
                    .windows(2)
                    .any(|w| w[0] == "-w" && w[1].parse::<u32>().is_ok_and(|s| s > 0)),
                "{flavor:?}: run without -w <seconds>: {r}"
            );
        }
    }
    assert_eq!(rules(t), before);

    // The lock file of these runs only (iptables honours XTABLES_LOCKFILE), held by flock(1).
    let lock = std::env::temp_dir().join(format!("ic-xtlock-{}", std::process::id()));
    std::fs::write(&lock, "").unwrap();
    let lock_s = lock.to_str().unwrap();
    // Held in this process (not by flock(1), which a VM guest lacks): released after `secs`
    // or when told. iptables, another process, waits for it all the same.
    let hold = |secs: u64| {
        use std::os::fd::AsRawFd;
        let file = std::fs::File::open(&lock).unwrap();
        // SAFETY: flock on a descriptor this test owns; the lock goes with the file.
        assert_eq!(unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) }, 0);
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let t = std::thread::spawn(move || {
            let _ = rx.recv_timeout(std::time::Duration::from_secs(secs));
            drop(file);
        });
        (tx, t)
    };
    let legacy = |env: &[(&str, &str)]| {
        let ns = t.pod_netns().to_str().unwrap();
        let mut args = vec!["apply", "--network-namespace", ns];
        args.extend_from_slice(Flavor::IptablesLegacy.args());
        args.extend_from_slice(&flags);
        interceptor_tests::bin::run(&args, env)
    };
    let holder = hold(2);
    let t0 = std::time::Instant::now();
    let out = legacy(&[("XTABLES_LOCKFILE", lock_s)]);
    let waited = t0.elapsed();
    holder.1.join().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        waited >= std::time::Duration::from_millis(1500),
        "the apply did not wait for the held xtables lock ({waited:?})"
    );
    apply(&pod, Flavor::IptablesLegacy, &["-i", "*", "--cleanup-only"]).unwrap();
    assert_eq!(rules(t), before);
    // Held longer than the wait (half of a 2 s limit: -w 1).
    let holder = hold(8);
    let out = legacy(&[
        ("XTABLES_LOCKFILE", lock_s),
        ("INTERCEPTOR_TOOL_TIMEOUT", "2"),
    ]);
    let _ = holder.0.send(());
    let _ = holder.1.join();
    let _ = std::fs::remove_file(&lock);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "applied while the lock was held: {err}"
    );
    assert!(err.contains("xtables lock"), "{err}");
    assert_eq!(
        rules(t),
        before,
        "a failed wait for the lock changed the netns"
    );
    println!("iptables-restore runs carry -w; a held xtables lock was waited for ({waited:?})");
}

/// Chains of other programs whose names merely look like Istio's (`ISTIO_FOO`, `MY_ISTIO_X`),
/// with jumps into them from the builtin chains, are not ours: apply sees a clean netns (no
/// drift), reconcile and cleanup leave them exactly as they were.
fn foreign_chains_kept(flavor: Flavor) {
    let pod = Pod::new("fown").unwrap();
    let t = &pod.topo;
    let bin = if flavor == Flavor::IptablesLegacy {
        "iptables-legacy"
    } else {
        "iptables-nft"
    };
    for cmd in [
        "-t nat -N ISTIO_FOO",
        "-t nat -A ISTIO_FOO -p tcp --dport 1 -j RETURN",
        "-t nat -N MY_ISTIO_X",
        "-t nat -A MY_ISTIO_X -p tcp --dport 2 -j RETURN",
        "-t nat -A OUTPUT -p tcp --dport 2 -j MY_ISTIO_X",
        "-t nat -A PREROUTING -p tcp --dport 1 -j ISTIO_FOO",
        "-t mangle -N ISTIO_OUTPUT_X",
    ] {
        let args: Vec<&str> = cmd.split(' ').collect();
        t.pod_exec(bin, &args, None).unwrap();
    }
    let foreign = rules(t);
    let flags = ["-i", "*", "-b", "*", "--ipv6", "false"];
    let out = apply(&pod, flavor, &flags).unwrap();
    assert!(out.contains("rules applied"), "{flavor:?}: {out}");
    let installed = rules(t);
    for l in foreign.lines() {
        assert!(installed.contains(l), "{flavor:?}: apply removed {l}");
    }
    assert!(apply(&pod, flavor, &flags)
        .unwrap()
        .contains("already in place"));
    let mut other = vec!["-i", "*", "-b", "*", "-d", "15021", "--ipv6", "false"];
    other.push("--reconcile");
    assert!(apply(&pod, flavor, &other).unwrap().contains("replaced"));
    let reconciled = rules(t);
    for l in foreign.lines() {
        assert!(reconciled.contains(l), "{flavor:?}: reconcile removed {l}");
    }
    let out = apply(&pod, flavor, &["-i", "*", "--cleanup-only"]).unwrap();
    assert!(out.contains("removed"), "{flavor:?}: {out}");
    assert_eq!(
        rules(t),
        foreign,
        "{flavor:?}: cleanup touched others' chains"
    );
    println!("{flavor:?}: ISTIO-like chains of others kept through apply, reconcile and cleanup");
}

#[test]
fn foreign_chains_kept_iptables_legacy() {
    foreign_chains_kept(Flavor::IptablesLegacy);
}

#[test]
fn foreign_chains_kept_iptables_nft() {
    foreign_chains_kept(Flavor::IptablesNft);
}

/// nftables: only our tables are ever named; another table (even one named like ours) stays.
#[test]
fn foreign_tables_kept_nftables() {
    let pod = Pod::new("fownt").unwrap();
    let t = &pod.topo;
    t.pod_exec("nft", &["add table inet istio-proxy-nat-x"], None)
        .unwrap();
    t.pod_exec("nft", &["add chain inet istio-proxy-nat-x c"], None)
        .unwrap();
    let tables = || t.pod_exec("nft", &["list", "tables"], None).unwrap();
    let flags = ["-i", "*", "-b", "*", "--ipv6", "false"];
    let out = apply(&pod, Flavor::Nftables, &flags).unwrap();
    assert!(out.contains("rules applied"), "{out}");
    apply(&pod, Flavor::Nftables, &["-i", "*", "--cleanup-only"]).unwrap();
    assert_eq!(tables().trim(), "table inet istio-proxy-nat-x");
}

/// A rule tool failing midway right after another program changed the ruleset (a chain of its
/// own and a jump into it, first in a builtin chain we use too): the rollback puts back only
/// our rules, so that change survives — on a fresh apply and on a reconcile.
fn rollback_keeps_concurrent_edits(flavor: Flavor) {
    let pod = Pod::new("rbscope").unwrap();
    let t = &pod.topo;
    let (tool, matching) = restore_tool(flavor);
    let (edit, undo, seen) = match flavor {
        Flavor::Nftables => (
            "nft add table inet kube-test && nft add chain inet kube-test c".to_string(),
            vec![vec!["delete", "table", "inet", "kube-test"]],
            "kube-test",
        ),
        _ => {
            let bin = if flavor == Flavor::IptablesLegacy {
                "iptables-legacy"
            } else {
                "iptables-nft"
            };
            (
                format!(
                    "{bin} -w -t nat -N KUBE-TEST && {bin} -w -t nat -A KUBE-TEST -j RETURN && \
                     {bin} -w -t nat -I OUTPUT 1 -j KUBE-TEST"
                ),
                vec![
                    vec![bin, "-t", "nat", "-D", "OUTPUT", "-j", "KUBE-TEST"],
                    vec![bin, "-t", "nat", "-F", "KUBE-TEST"],
                    vec![bin, "-t", "nat", "-X", "KUBE-TEST"],
                ],
                "KUBE-TEST",
            )
        }
    };
    let partial = flavor != Flavor::Nftables;
    let tools = FaultyTools::new(&pod, &[tool], matching, Fault::EditThen(edit, partial));
    let present = || match flavor {
        Flavor::Nftables => t.pod_exec("nft", &["list", "tables"], None).unwrap(),
        _ => rules(t),
    };
    let undo_edit = || {
        for cmd in &undo {
            let (prog, args) = if flavor == Flavor::Nftables {
                ("nft", &cmd[..])
            } else {
                (cmd[0], &cmd[1..])
            };
            t.pod_exec(prog, args, None).unwrap();
        }
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
    let check = |what: &str, flags: &[&str], k: u32, want: &str| {
        tools.arm(k);
        let out = tools.apply(&pod, flavor, flags);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(tools.fired(), "{flavor:?} {what}: the fault did not fire");
        assert!(!out.status.success(), "{flavor:?} {what}: succeeded: {err}");
        assert!(
            present().contains(seen),
            "{flavor:?} {what}: the rollback removed another program's change: {err}"
        );
        undo_edit();
        assert_eq!(rules(t), want, "{flavor:?} {what}: our rules not put back");
    };
    let before = rules(t);
    check("fresh apply", &a, 1, &before);
    apply(&pod, flavor, &a).unwrap();
    let installed = rules(t);
    let mut b = a.to_vec();
    b.extend_from_slice(&["-d", "15021", "--reconcile"]);
    // iptables reconciles in two steps (remove ours, apply): the change comes before the last.
    let k = if flavor == Flavor::Nftables { 1 } else { 2 };
    check("reconcile", &b, k, &installed);
    apply(&pod, flavor, &["-i", "*", "--cleanup-only"]).unwrap();
    assert_eq!(rules(t), before);
    println!("{flavor:?}: another program's concurrent change survived both rollbacks");
}

#[test]
fn rollback_keeps_concurrent_edits_iptables_legacy() {
    rollback_keeps_concurrent_edits(Flavor::IptablesLegacy);
}

#[test]
fn rollback_keeps_concurrent_edits_iptables_nft() {
    rollback_keeps_concurrent_edits(Flavor::IptablesNft);
}

#[test]
fn rollback_keeps_concurrent_edits_nftables() {
    rollback_keeps_concurrent_edits(Flavor::Nftables);
}
