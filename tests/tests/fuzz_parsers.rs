//! Property-based fuzzing of every parser that takes outside input: the config parser (flags,
//! env and control-API requests all end in `RawConfig::parse`), the CLI, Istio's pod annotation
//! parser (`cni::annotations`) and the CNI plugin's stdin/`CNI_*` handling (`cni::spec`,
//! `cni::plugin::execute`). For arbitrary input they never panic and never hang, a rejection
//! names the input value that was bad, and whatever they accept renders to rule documents that
//! contain nothing but rules (no value can smuggle a line, a chain or a table into what
//! iptables-restore or nft executes).
//!
//! The corpus lives in `tests/fuzz/corpus/<parser>/`: hand-written seed inputs and every
//! failure found (a minimal input saved as `crash-*`/`hang-*`, plus proptest's own seed file
//! `proptest-regressions.txt`), all replayed first on every run.
//!
//! Executions: `FUZZ_CASES` per parser (default 20,000 so the suite stays quick; the full run is
//! `FUZZ_CASES=1000000 cargo test --release -p interceptor-tests --test fuzz_parsers -- --nocapture`,
//! or `cargo xtask fuzz`). Each run prints its execution count, acceptances, the slowest case
//! and the time. A case running longer than the hang bound (2 s) aborts the run and is saved.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use interceptor::backend::{iptables, nftables};
use interceptor::cni::annotations::{self, NodeEnv, PodInfo, Redirect};
use interceptor::cni::{plugin, spec};
use interceptor_common::config::{Config as IcConfig, RawConfig};
use interceptor_common::policy;
use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence, TestError, TestRunner};
use serde::{Deserialize, Serialize};

fn cases() -> u32 {
    std::env::var("FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        // Emulated guests (vm-test) run a proportionally smaller default.
        .unwrap_or((20_000.0 / interceptor_tests::time_scale()) as u32)
}

/// A case slower than this is a hang.
fn hang_bound() -> Duration {
    interceptor_tests::scaled(Duration::from_secs(2))
}

fn corpus_dir(parser: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(parser)
}

// ---------------------------------------------------------------------------------------------
// The harness: corpus replay, a hang watchdog, proptest with persisted failures, and a report.

/// One fuzzed parser: how its inputs are stored in the corpus and what must hold for each.
struct Target<T> {
    name: &'static str,
    /// Extension of this parser's corpus files.
    ext: &'static str,
    /// proptest's failure seeds (`FileFailurePersistence::Direct` needs a `'static` path).
    regressions: &'static str,
    load: fn(&[u8]) -> Option<T>,
    save: fn(&T) -> Vec<u8>,
    /// `Ok(true)` accepted, `Ok(false)` rejected properly, `Err` a property violated.
    check: fn(&T) -> Result<bool, String>,
    /// Generated cases to run ([`cases`] for the in-process parsers).
    cases: u32,
    /// A case slower than this is a hang ([`hang_bound`] for the in-process parsers).
    hang: Duration,
}

fn save_finding<T>(t: &Target<T>, kind: &str, input: &T) -> PathBuf {
    let bytes = (t.save)(input);
    let mut h: u64 = 0xcbf29ce484222325;
    for b in &bytes {
        h = (h ^ u64::from(*b)).wrapping_mul(0x100000001b3);
    }
    let path = corpus_dir(t.name).join(format!("{kind}-{h:016x}.{}", t.ext));
    let _ = std::fs::create_dir_all(corpus_dir(t.name));
    let _ = std::fs::write(&path, bytes);
    path
}

fn fuzz<T, S>(t: Target<T>, strategy: S)
where
    T: Clone + std::fmt::Debug + Send + 'static,
    S: Strategy<Value = T>,
{
    let t0 = Instant::now();
    // 1. The corpus: seeds and earlier findings.
    let mut replayed = 0;
    let mut entries: Vec<_> = std::fs::read_dir(corpus_dir(t.name))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    entries.sort();
    let mut failures = Vec::new();
    for path in entries
        .iter()
        .filter(|p| p.extension().is_some_and(|x| x == t.ext))
    {
        let bytes = std::fs::read(path).unwrap();
        let Some(input) = (t.load)(&bytes) else {
            failures.push(format!("{}: not a {} corpus input", path.display(), t.name));
            continue;
        };
        replayed += 1;
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (t.check)(&input))) {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => failures.push(format!("{}: {e}", path.display())),
            Err(_) => failures.push(format!("{}: panicked", path.display())),
        }
    }
    assert!(
        replayed > 0,
        "no corpus for {} in {}",
        t.name,
        corpus_dir(t.name).display()
    );
    assert!(
        failures.is_empty(),
        "{}: corpus inputs fail:\n{}",
        t.name,
        failures.join("\n")
    );

    // 2. A watchdog: the case in flight and when it started; over the bound, save it and abort
    // (a real hang never returns, so only another thread can report it).
    type Slot<T> = Arc<Mutex<Option<(Instant, T)>>>;
    let slot: Slot<T> = Arc::new(Mutex::new(None));
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watchdog = {
        let (slot, done) = (slot.clone(), done.clone());
        let (name, ext, save, hang) = (t.name, t.ext, t.save, t.hang);
        std::thread::spawn(move || {
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(100));
                let s = slot.lock().unwrap_or_else(|e| e.into_inner());
                if let Some((start, input)) = s.as_ref() {
                    if start.elapsed() > hang {
                        let path = corpus_dir(name).join(format!("hang-{}.{ext}", t0_id()));
                        let _ = std::fs::write(&path, save(input));
                        eprintln!(
                            "fuzz: {name}: HANG (> {:?}) on {input:?}, saved to {}",
                            hang,
                            path.display()
                        );
                        std::process::abort();
                    }
                }
            }
        })
    };

    // 3. Generated cases; proptest replays its persisted failure seeds first.
    let n = t.cases;
    let mut runner = TestRunner::new(Config {
        cases: n,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(t.regressions))),
        ..Config::default()
    });
    let accepted = std::cell::Cell::new(0u64);
    let executed = std::cell::Cell::new(0u64);
    let slowest = std::cell::Cell::new(Duration::ZERO);
    let result = runner.run(&strategy, |input| {
        let start = Instant::now();
        *slot.lock().unwrap() = Some((start, input.clone()));
        let r = (t.check)(&input);
        *slot.lock().unwrap() = None;
        executed.set(executed.get() + 1);
        slowest.set(slowest.get().max(start.elapsed()));
        match r {
            Ok(a) => {
                accepted.set(accepted.get() + u64::from(a));
                Ok(())
            }
            Err(e) => Err(TestCaseError::fail(e)),
        }
    });
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    watchdog.join().unwrap();
    if let Err(e) = result {
        let saved = match &e {
            TestError::Fail(_, input) => save_finding(&t, "crash", input).display().to_string(),
            TestError::Abort(_) => "nothing saved".into(),
        };
        panic!("fuzz: {}: {e} (minimal input saved: {saved})", t.name);
    }
    println!(
        "fuzz: {}: {} executions ({n} generated incl. shrink/replays, + {replayed} corpus), {} accepted, 0 panics, 0 hangs (slowest case {:.1} ms, bound {:?}), {:.1} s",
        t.name,
        executed.get(),
        accepted.get(),
        slowest.get().as_secs_f64() * 1e3,
        t.hang,
        t0.elapsed().as_secs_f64()
    );
}

fn t0_id() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

// ---------------------------------------------------------------------------------------------
// Shared checks.

/// Strings biased toward what the parsers see: list syntax, ports, CIDRs, names, junk,
/// whitespace and newlines (the injection vector).
fn field() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        Just("*".to_string()),
        "[0-9]{0,6}(,[0-9]{0,6}){0,3}",
        "([0-9]{1,3}\\.){3}[0-9]{1,3}/[0-9]{1,2}",
        "[0-9a-f:]{0,20}/[0-9]{1,3}",
        "[a-z0-9._-]{0,20}",
        "[ -~]{0,24}",
        ".{0,16}",
        "[a-z0-9]{0,6}[\n\r ;#][-a-zA-Z0-9 ]{0,20}",
    ]
}

/// Every line of a restore document is a table header, a chain declaration, a rule or COMMIT.
fn only_rules_iptables(doc: &str) -> bool {
    doc.lines().all(|l| {
        (l.starts_with("* ") && !l[2..].contains(' '))
            || l.starts_with("-N ISTIO_")
            || l.starts_with("-A ")
            || l.starts_with("-I ")
            || l == "COMMIT"
    })
}

fn only_rules_nft(tx: &str) -> bool {
    tx.lines().all(|l| {
        [
            "add table inet istio-proxy-",
            "flush table inet istio-proxy-",
            "add chain inet istio-proxy-",
            "add rule inet istio-proxy-",
            "insert rule inet istio-proxy-",
        ]
        .iter()
        .any(|p| l.starts_with(p))
    })
}

/// An accepted config renders to nothing but rules, and the eBPF policy builds.
fn renders_only_rules(cfg: &IcConfig, from: &dyn std::fmt::Debug) -> Result<(), String> {
    let docs = iptables::render(cfg);
    if !only_rules_iptables(&docs.v4) {
        return Err(format!(
            "injected line in v4 doc from {from:?}:\n{}",
            docs.v4
        ));
    }
    if let Some(v6) = &docs.v6 {
        if !only_rules_iptables(v6) {
            return Err(format!("injected line in v6 doc from {from:?}:\n{v6}"));
        }
    }
    let tx = nftables::render(cfg);
    if !only_rules_nft(&tx) {
        return Err(format!(
            "injected line in nft transaction from {from:?}:\n{tx}"
        ));
    }
    let _ = policy::pod_policy(cfg, 1);
    let _ = policy::ebpf_unsupported(cfg);
    Ok(())
}

/// The field of `RawConfig` a config error's flag names.
fn field_of<'a>(r: &'a RawConfig, flag: &str) -> Option<&'a str> {
    Some(match flag {
        "--envoy-port" => &r.proxy_port,
        "--inbound-capture-port" => &r.inbound_capture_port,
        "--inbound-tunnel-port" => &r.inbound_tunnel_port,
        "--proxy-uid" => &r.proxy_uid,
        "--proxy-gid" => &r.proxy_gid,
        "--istio-inbound-interception-mode" => &r.inbound_interception_mode,
        "--istio-inbound-ports" => &r.inbound_ports_include,
        "--istio-local-exclude-ports" => &r.inbound_ports_exclude,
        "--istio-exclude-interfaces" => &r.exclude_interfaces,
        "--istio-service-cidr" => &r.outbound_ip_ranges_include,
        "--istio-service-exclude-cidr" => &r.outbound_ip_ranges_exclude,
        "--istio-outbound-ports" => &r.outbound_ports_include,
        "--istio-local-outbound-ports-exclude" => &r.outbound_ports_exclude,
        "--kube-virt-interfaces" => &r.reroute_virtual_interfaces,
        "--istio-inbound-tproxy-mark" => &r.inbound_tproxy_mark,
        "--istio-inbound-tproxy-route-table" => &r.inbound_tproxy_route_table,
        "ISTIO_OUTBOUND_OWNER_GROUPS" => &r.owner_groups_include,
        "ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE" => &r.owner_groups_exclude,
        "ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR" => &r.host_ipv4_loopback_cidr,
        "--dns-servers" => &r.dns_servers,
        "--bind-guard-ports" => &r.bind_guard_ports,
        _ => return None,
    })
}

/// `raw.parse()`: an accepted config renders only rules; a rejection names a flag whose value
/// contains the bad value.
fn check_raw(raw: &RawConfig) -> Result<bool, String> {
    match raw.parse() {
        Ok(cfg) => renders_only_rules(&cfg, raw).map(|_| true),
        Err(e) => {
            let given = field_of(raw, e.flag)
                .ok_or_else(|| format!("error names {:?}, not a config field: {e}", e.flag))?;
            if !given.contains(e.value.trim()) {
                return Err(format!(
                    "error value {:?} is not in {} = {given:?}: {e}",
                    e.value, e.flag
                ));
            }
            Ok(false)
        }
    }
}

fn json_load<T: for<'de> Deserialize<'de>>(b: &[u8]) -> Option<T> {
    serde_json::from_slice(b).ok()
}

fn json_save<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec_pretty(v).unwrap()
}

// ---------------------------------------------------------------------------------------------
// 1. The config parser (what flags, env and the daemon's control API all feed).

/// A valid config (Istio's injected flags) with 1–4 fields replaced by fuzzed strings, so that
/// both the accepting and the rejecting paths are explored.
fn raw() -> impl Strategy<Value = RawConfig> {
    let edits = prop::collection::vec((0usize..21, field()), 1..5);
    (edits, any::<[bool; 4]>()).prop_map(|(edits, flags)| {
        let mut r = RawConfig {
            inbound_ports_include: "*".into(),
            inbound_ports_exclude: "15090,15021,15020".into(),
            outbound_ip_ranges_include: "*".into(),
            redirect_dns: flags[0],
            capture_all_dns: flags[1],
            drop_invalid: flags[2],
            enable_ipv6: flags[3],
            dns_servers: "10.96.0.10,fd00::a".into(),
            ..RawConfig::default()
        };
        for (i, v) in edits {
            let f = match i {
                0 => &mut r.proxy_port,
                1 => &mut r.inbound_capture_port,
                2 => &mut r.inbound_tunnel_port,
                3 => &mut r.proxy_uid,
                4 => &mut r.proxy_gid,
                5 => &mut r.inbound_interception_mode,
                6 => &mut r.inbound_ports_include,
                7 => &mut r.inbound_ports_exclude,
                8 => &mut r.exclude_interfaces,
                9 => &mut r.outbound_ip_ranges_include,
                10 => &mut r.outbound_ip_ranges_exclude,
                11 => &mut r.outbound_ports_include,
                12 => &mut r.outbound_ports_exclude,
                13 => &mut r.reroute_virtual_interfaces,
                14 => &mut r.inbound_tproxy_mark,
                15 => &mut r.inbound_tproxy_route_table,
                16 => &mut r.owner_groups_include,
                17 => &mut r.owner_groups_exclude,
                18 => &mut r.host_ipv4_loopback_cidr,
                19 => &mut r.bind_guard_ports,
                _ => &mut r.dns_servers,
            };
            *f = v;
        }
        r
    })
}

#[test]
fn config_parser_never_panics_and_cannot_inject_rules() {
    fuzz(
        Target {
            name: "config",
            ext: "json",
            regressions: concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/fuzz/corpus/config/proptest-regressions.txt"
            ),
            load: json_load::<RawConfig>,
            save: json_save::<RawConfig>,
            check: check_raw,
            cases: cases(),
            hang: hang_bound(),
        },
        raw(),
    );
}

// ---------------------------------------------------------------------------------------------
// 1b. What the rule tools parse out of the rendered documents. A line-prefix check cannot see a
// value ending its token inside a line, so accepted configs (interface names biased toward
// the syntax of iptables-restore, nft and the shell) are applied by iptables-nft-restore and nft
// in a scratch netns and listed back: exactly the rules, names, ports and CIDRs asked for.

/// Configs checked by the tools per run (each is a scratch netns and six tool runs, ~0.1 s).
fn tool_cases() -> u32 {
    std::env::var("FUZZ_TOOL_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or((400.0 / interceptor_tests::time_scale()) as u32)
}

/// Interface-name lists: mostly printable ASCII (every nft/iptables/shell metacharacter), some
/// Unicode, some wildcards.
fn ifname_list() -> impl Strategy<Value = String> {
    let name = prop_oneof![
        "[!-~]{1,15}",
        "[a-z0-9]{1,6}[+*]",
        // The IFNAMSIZ edge, where an escaped or translated wildcard can overflow a tool's limit.
        "[!-~]{13,14}[+*]",
        "[\"\\\\;#{}$@*+!.:/-]{1,4}[a-z]{0,4}",
        ".{1,6}",
    ];
    prop::collection::vec(name, 0..3).prop_map(|v| v.join(","))
}

/// Mostly a valid config (so most cases reach the tools), sometimes [`raw`]'s fuzzed one.
fn tool_raw() -> impl Strategy<Value = RawConfig> {
    let base = prop_oneof![
        3 => any::<[bool; 4]>().prop_map(|flags| RawConfig {
            inbound_ports_include: "*".into(),
            inbound_ports_exclude: "15090,15021,15020".into(),
            outbound_ip_ranges_include: if flags[0] { "*" } else { "10.0.0.0/8,fd00::/8" }.into(),
            outbound_ip_ranges_exclude: "10.1.0.0/16,fd00:1::/32".into(),
            outbound_ports_include: "8080".into(),
            outbound_ports_exclude: "8443".into(),
            redirect_dns: flags[1],
            capture_all_dns: flags[2],
            enable_ipv6: flags[3],
            dns_servers: "10.96.0.10,fd00::a".into(),
            ..RawConfig::default()
        }),
        1 => raw(),
    ];
    (base, ifname_list(), ifname_list(), any::<bool>()).prop_map(|(mut r, ex, virt, tproxy)| {
        r.exclude_interfaces = ex;
        r.reroute_virtual_interfaces = virt;
        if tproxy {
            r.inbound_interception_mode = "TPROXY".into();
        }
        // iptables resolves group names through this machine's /etc/group when it parses a
        // rule: names are valid config but not portable tool input, so only ids here.
        for g in [&mut r.owner_groups_include, &mut r.owner_groups_exclude] {
            if !g
                .chars()
                .all(|c| c.is_ascii_digit() || c == ',' || c == '*')
            {
                g.clear();
            }
        }
        if r.owner_groups_include.is_empty() {
            r.owner_groups_include = "*".into();
        }
        r
    })
}

/// `check_raw`, and an accepted config's documents parse, in the real tools, as configured.
fn check_tools(raw: &RawConfig) -> Result<bool, String> {
    if !check_raw(raw)? {
        return Ok(false);
    }
    let cfg = raw.parse().expect("accepted by check_raw");
    interceptor_tests::netfilter::check_rendered(&cfg).map(|_| true)
}

#[test]
fn rendered_documents_parse_as_configured_in_the_rule_tools() {
    for tool in interceptor_tests::netfilter::TOOLS {
        assert!(
            interceptor::backend::exec::available(tool),
            "{tool} is needed (scripts/setup.sh installs it)"
        );
    }
    fuzz(
        Target {
            name: "tools",
            ext: "json",
            regressions: concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/fuzz/corpus/tools/proptest-regressions.txt"
            ),
            load: json_load::<RawConfig>,
            save: json_save::<RawConfig>,
            check: check_tools,
            cases: tool_cases(),
            // Process start-up under a loaded CI machine, not parsing, dominates a case.
            hang: interceptor_tests::scaled(Duration::from_secs(20)),
        },
        tool_raw(),
    );
}

// ---------------------------------------------------------------------------------------------
// 2. The CLI (clap, then the same validation `apply` runs; no netns is touched).

const CLI_FLAGS: &[&str] = &[
    "-p",
    "-z",
    "-e",
    "-u",
    "-g",
    "-m",
    "-b",
    "-d",
    "-c",
    "-i",
    "-x",
    "-q",
    "-o",
    "-k",
    "-t",
    "-r",
    "--backend",
    "--ipv6",
    "--dns-servers",
    "--force-iptables-binary",
    "--probe-timeout",
    "--iptables-probe-port",
    "--bind-guard-ports",
    "--redirect-dns",
    "--capture-all-dns",
    "--native-nftables",
    "--drop-invalid",
    "-n",
    "--bogus",
    "--",
];

/// The argv after `interceptor explain --uid 1 --dst 10.0.0.1:80 --ipv6 false`.
fn check_cli(args: &Vec<String>) -> Result<bool, String> {
    let mut argv: Vec<String> = [
        "interceptor",
        "explain",
        "--uid",
        "1",
        "--dst",
        "10.0.0.1:80",
        "--ipv6",
        "false",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    argv.extend(args.iter().cloned());
    match interceptor::cli::parse_from(&argv) {
        Ok(interceptor::cli::Parsed {
            cli:
                interceptor::cli::Cli {
                    command: interceptor::cli::Command::Explain(a),
                },
            ..
        }) => {
            // The full validation path, without touching any netns.
            let raw = a.apply.raw_config().map_err(|e| e.to_string());
            Ok(match raw {
                Ok(raw) => check_raw(&raw)?,
                Err(_) => false,
            })
        }
        Ok(other) => Err(format!(
            "explain parsed as another command: {:?}",
            other.cli
        )),
        // Help and version output.
        Err(interceptor::cli::Stop::Display(_)) => Ok(false),
        // Usage errors in our one style: a sentence that names the flag it is about.
        Err(interceptor::cli::Stop::Usage(msg)) => {
            if msg.trim().is_empty() || msg.starts_with("error:") || msg.contains("Usage:") {
                return Err(format!(
                    "usage error not in our style for {args:?}: {msg:?}"
                ));
            }
            Ok(false)
        }
    }
}

#[test]
fn cli_never_panics() {
    let flags = prop::sample::select(CLI_FLAGS);
    let args = prop::collection::vec((flags, field()), 0..8).prop_map(|pairs| {
        pairs
            .into_iter()
            .flat_map(|(f, v)| [f.to_string(), v])
            .collect::<Vec<_>>()
    });
    fuzz(
        Target {
            name: "cli",
            ext: "args",
            regressions: concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/fuzz/corpus/cli/proptest-regressions.txt"
            ),
            // One argument per line.
            load: |b| {
                let s = std::str::from_utf8(b).ok()?;
                Some(s.lines().map(str::to_string).collect())
            },
            save: |v: &Vec<String>| v.join("\n").into_bytes(),
            check: check_cli,
            cases: cases(),
            hang: hang_bound(),
        },
        args,
    );
}

// ---------------------------------------------------------------------------------------------
// 3. Pod annotations, the istio-proxy container's env and securityContext (Istio's CNI rules).

/// A pod as the annotation parser sees it, plus the node env and detected IPv6.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct PodInput {
    annotations: Option<BTreeMap<String, String>>,
    #[serde(default)]
    proxy_env: BTreeMap<String, String>,
    #[serde(default)]
    run_as_user: Option<i64>,
    #[serde(default)]
    run_as_group: Option<i64>,
    #[serde(default)]
    ipv6: bool,
    /// `ISTIO_OUTBOUND_OWNER_GROUPS`, `…_EXCLUDE`, `ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR`; absent:
    /// the defaults.
    #[serde(default)]
    node_env: Option<[String; 3]>,
}

impl PodInput {
    fn pod_info(&self) -> PodInfo {
        PodInfo {
            annotations: self.annotations.clone(),
            proxy_env: self.proxy_env.clone(),
            run_as_user: self.run_as_user,
            run_as_group: self.run_as_group,
        }
    }
    fn node(&self) -> NodeEnv {
        match &self.node_env {
            None => NodeEnv::default(),
            Some([inc, exc, lo]) => NodeEnv {
                owner_groups_include: inc.clone(),
                owner_groups_exclude: exc.clone(),
                host_ipv4_loopback_cidr: lo.clone(),
            },
        }
    }
    /// What the input gave for the source an error names.
    fn given(&self, source: &str) -> Option<String> {
        if let Some(v) = self.annotations.as_ref().and_then(|a| a.get(source)) {
            return Some(v.clone());
        }
        let node = self.node();
        match source {
            "runAsUser" => self.run_as_user.map(|n| n.to_string()),
            "runAsGroup" => self.run_as_group.map(|n| n.to_string()),
            "ISTIO_OUTBOUND_OWNER_GROUPS" => Some(node.owner_groups_include),
            "ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE" => Some(node.owner_groups_exclude),
            "ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR" => Some(node.host_ipv4_loopback_cidr),
            _ => None,
        }
    }
}

const ANNOTATION_KEYS: &[&str] = &[
    annotations::keys::INJECT,
    annotations::keys::STATUS,
    annotations::keys::INTERCEPTION_MODE,
    annotations::keys::INCLUDE_OUTBOUND_IP_RANGES,
    annotations::keys::EXCLUDE_OUTBOUND_IP_RANGES,
    annotations::keys::INCLUDE_INBOUND_PORTS,
    annotations::keys::EXCLUDE_INBOUND_PORTS,
    annotations::keys::INCLUDE_OUTBOUND_PORTS,
    annotations::keys::EXCLUDE_OUTBOUND_PORTS,
    annotations::keys::EXCLUDE_INTERFACES,
    annotations::keys::KUBEVIRT_INTERFACES,
    annotations::keys::REROUTE_VIRTUAL_INTERFACES,
    "sidecar.istio.io/proxyImage",
];

const PROXY_ENV: &[&str] = &[
    annotations::env::DNS_CAPTURE,
    annotations::env::DUAL_STACK,
    annotations::env::INVALID_DROP,
    annotations::env::DISABLE_ENVOY,
];

fn annotation_value() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => field(),
        1 => Just("REDIRECT".to_string()),
        1 => Just("TPROXY".to_string()),
        1 => "(10\\.[0-9]{1,3}\\.0\\.0/[0-9]{1,2},?){1,3}",
        1 => "[0-9]{1,5}(,[0-9]{1,5}){0,3},?",
        1 => "[a-z]{1,4}[0-9](,[a-z]{1,18}){0,2}",
    ]
}

fn id() -> impl Strategy<Value = Option<i64>> {
    prop_oneof![
        Just(None),
        (-3i64..70_000).prop_map(Some),
        any::<i64>().prop_map(Some),
        Just(Some(i64::from(u32::MAX) + 1)),
    ]
}

fn pod_input() -> impl Strategy<Value = PodInput> {
    let key = prop_oneof![
        6 => prop::sample::select(ANNOTATION_KEYS).prop_map(str::to_string),
        1 => "[ -~]{0,30}",
    ];
    let annotations = prop::option::weighted(
        0.9,
        prop::collection::btree_map(key, annotation_value(), 0..8),
    );
    let env_key = prop_oneof![
        4 => prop::sample::select(PROXY_ENV).prop_map(str::to_string),
        1 => "[A-Z_]{1,12}",
    ];
    let env_val = prop_oneof![
        prop::sample::select(vec!["true", "false", "1", "0", "T", "f", "TRUE", "yes", ""])
            .prop_map(str::to_string),
        field(),
    ];
    let env = prop::collection::btree_map(env_key, env_val, 0..4);
    let node = prop::option::weighted(0.2, [field(), field(), field()]);
    (annotations, env, id(), id(), any::<bool>(), node).prop_map(
        |(mut annotations, proxy_env, run_as_user, run_as_group, ipv6, node_env)| {
            // Most pods carry the status annotation (a sidecar was injected).
            if let Some(a) = annotations.as_mut() {
                if a.len() % 4 != 0 {
                    a.entry(annotations::keys::STATUS.into())
                        .or_insert_with(|| "{}".into());
                }
            }
            PodInput {
                annotations,
                proxy_env,
                run_as_user,
                run_as_group,
                ipv6,
                node_env,
            }
        },
    )
}

/// From the pod to a validated config: never a panic; a rejection names the annotation (or
/// field/env) and a value that input really gave; an accepted pod renders only rules.
fn check_pod(p: &PodInput) -> Result<bool, String> {
    let pi = p.pod_info();
    let _ = annotations::skip_reason(&pi);
    let names_input = |e: &annotations::AnnotationError| -> Result<bool, String> {
        let given = p.given(&e.source).ok_or_else(|| {
            format!(
                "error names {:?}, which the pod did not give: {e}",
                e.source
            )
        })?;
        if !given.contains(e.value.trim()) {
            return Err(format!(
                "error value {:?} is not in {} = {given:?}: {e}",
                e.value, e.source
            ));
        }
        Ok(false)
    };
    let redirect = match Redirect::from_pod(&pi) {
        Ok(r) => r,
        Err(e) => return names_input(&e),
    };
    match redirect.validated(p.ipv6, &p.node()) {
        Err(e) => names_input(&e),
        Ok(raw) => {
            let cfg = raw
                .parse()
                .map_err(|e| format!("validated() accepted what parse() rejects: {e}"))?;
            renders_only_rules(&cfg, p).map(|_| true)
        }
    }
}

#[test]
fn annotation_parser_never_panics_and_names_bad_values() {
    fuzz(
        Target {
            name: "annotations",
            ext: "json",
            regressions: concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/fuzz/corpus/annotations/proptest-regressions.txt"
            ),
            load: json_load::<PodInput>,
            save: json_save::<PodInput>,
            check: check_pod,
            cases: cases(),
            hang: hang_bound(),
        },
        pod_input(),
    );
}

// ---------------------------------------------------------------------------------------------
// 4. The CNI plugin's input: stdin (network config JSON, with prevResult, runtimeConfig and the
// annotations) and the CNI_* environment.

/// One plugin invocation: `CNI_COMMAND`, `CNI_ARGS` and stdin. `CNI_NETNS` is always a path
/// that does not exist, so ADD stops before it would reach a daemon: nothing is registered.
#[derive(Debug, Clone)]
struct CniInput {
    command: String,
    args: Option<String>,
    /// Raw stdin: any bytes.
    stdin: Vec<u8>,
}

/// Corpus form: `{"command":…,"args":…,"stdin":"…"}`, stdin as text when it is UTF-8, else as
/// an array of bytes.
fn cni_load(b: &[u8]) -> Option<CniInput> {
    let v: serde_json::Value = serde_json::from_slice(b).ok()?;
    let stdin = match &v["stdin"] {
        serde_json::Value::String(s) => s.clone().into_bytes(),
        other => serde_json::from_value(other.clone()).ok()?,
    };
    Some(CniInput {
        command: v["command"].as_str()?.to_string(),
        args: v["args"].as_str().map(str::to_string),
        stdin,
    })
}

fn cni_save(c: &CniInput) -> Vec<u8> {
    let stdin = match std::str::from_utf8(&c.stdin) {
        Ok(s) => serde_json::Value::from(s),
        Err(_) => serde_json::Value::from(c.stdin.clone()),
    };
    json_save(&serde_json::json!({"command": c.command, "args": c.args, "stdin": stdin}))
}

const MISSING_NETNS: &str = "/nonexistent/interceptor-fuzz/netns";

/// JSON values biased toward what a CNI config holds.
fn json_leaf() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::Value;
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        (-5i64..70_000).prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        field().prop_map(Value::String),
        prop::sample::select(vec![
            "1.0.0", "0.4.0", "0.3.1", "0.3.0", "0.2.0", "1.1.0", ""
        ])
        .prop_map(Value::from),
        prop::sample::select(vec!["auto", "ebpf", "iptables", "nftables", "EBPF"])
            .prop_map(Value::from),
    ]
}

fn json_value() -> impl Strategy<Value = serde_json::Value> {
    json_leaf().prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::Array),
            prop::collection::btree_map("[a-zA-Z./-]{0,12}", inner, 0..4)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

fn cni_input() -> impl Strategy<Value = CniInput> {
    use serde_json::{json, Value};
    let conf_keys = prop::sample::select(vec![
        "cniVersion",
        "name",
        "type",
        "backend",
        "podAnnotations",
        "proxyEnv",
        "runAsUser",
        "runAsGroup",
        "runtimeConfig",
        "prevResult",
        "bpffs",
    ]);
    // A well-formed config with some keys replaced by arbitrary JSON, annotations fuzzed as in
    // the annotation target, and prevResult addresses fuzzed.
    let structured = (
        prop::collection::vec((conf_keys, json_value()), 0..4),
        pod_input(),
        prop::collection::vec(field(), 0..3),
        any::<bool>(),
    )
        .prop_map(|(edits, pod, addrs, in_runtime)| {
            let ips: Vec<Value> = addrs.into_iter().map(|a| json!({ "address": a })).collect();
            let mut c = json!({
                "cniVersion": "1.0.0",
                "name": "k8s-pod-network",
                "type": "interceptor",
                // Never a real daemon: ADD fails on the missing netns before any call anyway.
                "socket": "/nonexistent/interceptor-fuzz.sock",
                "prevResult": {"cniVersion": "1.0.0", "ips": ips},
                "runAsUser": pod.run_as_user,
                "runAsGroup": pod.run_as_group,
                "proxyEnv": pod.proxy_env,
            });
            let annotations = json!(pod.annotations);
            if in_runtime {
                c["runtimeConfig"] = json!({ "io.kubernetes.cri.pod-annotations": annotations });
            } else {
                c["podAnnotations"] = annotations;
            }
            for (k, v) in edits {
                c[k] = v;
            }
            serde_json::to_vec(&c).unwrap()
        })
        .boxed();
    // Byte-level damage: truncation and junk bytes spliced in.
    let damaged = (
        structured.clone(),
        any::<prop::sample::Index>(),
        prop::collection::vec(any::<u8>(), 0..4),
    )
        .prop_map(|(mut b, at, junk)| {
            let i = at.index(b.len() + 1);
            if junk.is_empty() {
                b.truncate(i);
            } else {
                b.splice(i..i, junk);
            }
            b
        });
    let stdin = prop_oneof![
        6 => structured,
        2 => damaged,
        1 => prop::collection::vec(any::<u8>(), 0..64),
        1 => json_value().prop_map(|v| serde_json::to_vec(&v).unwrap()),
    ];
    let command = prop_oneof![
        8 => Just("ADD".to_string()),
        1 => Just("VERSION".to_string()),
        1 => "[A-Za-z]{0,6}",
    ];
    let args = prop::option::of(prop_oneof![
        Just("K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;K8S_POD_UID=u1".to_string()),
        "[ -~]{0,30}",
        "([A-Z_]{1,10}=[a-z0-9-]{0,8};?){0,4}",
    ]);
    (command, args, stdin).prop_map(|(command, args, stdin)| CniInput {
        command,
        args,
        stdin,
    })
}

/// The plugin's entry point plus each stdin parser on its own: never a panic, stdout is always
/// one JSON object (a result or the spec's error object), and a config that gets as far as the
/// pod's annotations gives exactly what the annotation parser says.
fn check_cni(c: &CniInput) -> Result<bool, String> {
    let env = spec::CniEnv {
        command: c.command.clone(),
        container_id: Some("fuzz".into()),
        netns: Some(MISSING_NETNS.into()),
        ifname: Some("eth0".into()),
        args: c.args.clone(),
        path: None,
    };
    let out = plugin::execute(&env, &c.stdin);
    let v: serde_json::Value = serde_json::from_str(&out.stdout)
        .map_err(|e| format!("stdout is not JSON ({e}): {:?}", out.stdout))?;
    if out.ok {
        // Only VERSION can succeed: ADD needs the (missing) netns.
        if c.command != "VERSION" || v.get("supportedVersions").is_none() {
            return Err(format!(
                "{} succeeded without a netns: {}",
                c.command, out.stdout
            ));
        }
    } else {
        let code = v["code"].as_u64().unwrap_or(0);
        let msg = v["msg"].as_str().unwrap_or("");
        if !(1..=11).contains(&code) || msg.is_empty() {
            return Err(format!("bad error object: {}", out.stdout));
        }
    }
    // The parsers one by one, so a config ADD rejects for the netns is still parsed through.
    let _ = spec::sniff_version(&c.stdin);
    let _ = spec::parse_cni_args(c.args.as_deref());
    let Ok(conf) = spec::parse_netconf(&c.stdin) else {
        return Ok(false);
    };
    if spec::check_version(&conf.cni_version).is_err() {
        return Ok(false);
    }
    if spec::prev_result_ips(conf.prev_result.as_ref()).is_err() {
        return Ok(false);
    }
    let _ = spec::pass_through(conf.prev_result.as_ref(), &conf.cni_version);
    let pi = plugin::pod_info(&conf);
    let _ = annotations::skip_reason(&pi);
    let pod = PodInput {
        annotations: pi.annotations,
        proxy_env: pi.proxy_env,
        run_as_user: pi.run_as_user,
        run_as_group: pi.run_as_group,
        ipv6: false,
        node_env: None,
    };
    check_pod(&pod)
}

#[test]
fn cni_stdin_parser_never_panics() {
    fuzz(
        Target {
            name: "cni",
            ext: "json",
            regressions: concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/fuzz/corpus/cni/proptest-regressions.txt"
            ),
            load: cni_load,
            save: cni_save,
            check: check_cni,
            cases: cases(),
            hang: hang_bound(),
        },
        cni_input(),
    );
}
