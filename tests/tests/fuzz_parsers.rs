//! Property-based fuzzing of the config parser and the CLI: for arbitrary input they never
//! panic, and whatever they accept renders to rule documents that contain nothing but rules (no
//! value can smuggle a line, a chain or a table into what iptables-restore or nft executes).
//!
//! Executions: `FUZZ_CASES` per property (default 20,000 so the suite stays quick; the full run
//! uses 1,000,000).

use interceptor::backend::{iptables, nftables};
use interceptor_common::config::RawConfig;
use interceptor_common::policy;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

fn cases() -> u32 {
    std::env::var("FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        // Emulated guests (vm-test) run a proportionally smaller default.
        .unwrap_or((20_000.0 / interceptor_tests::time_scale()) as u32)
}

/// Strings biased toward what the parser sees: list syntax, ports, CIDRs, names, junk,
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

/// A valid config (Istio's injected flags) with 1–4 fields replaced by fuzzed strings, so that
/// both the accepting and the rejecting paths are explored.
fn raw() -> impl Strategy<Value = RawConfig> {
    let edits = prop::collection::vec((0usize..20, field()), 1..5);
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
                _ => &mut r.dns_servers,
            };
            *f = v;
        }
        r
    })
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

#[test]
fn config_parser_never_panics_and_cannot_inject_rules() {
    let n = cases();
    let mut runner = TestRunner::new(Config {
        cases: n,
        failure_persistence: None,
        ..Config::default()
    });
    let accepted = std::cell::Cell::new(0u64);
    runner
        .run(&raw(), |raw| {
            if let Ok(cfg) = raw.parse() {
                accepted.set(accepted.get() + 1);
                let docs = iptables::render(&cfg);
                prop_assert!(
                    only_rules_iptables(&docs.v4),
                    "injected line in v4 doc from {raw:?}:\n{}",
                    docs.v4
                );
                if let Some(v6) = &docs.v6 {
                    prop_assert!(
                        only_rules_iptables(v6),
                        "injected line in v6 doc from {raw:?}"
                    );
                }
                let tx = nftables::render(&cfg);
                prop_assert!(
                    only_rules_nft(&tx),
                    "injected line in nft transaction from {raw:?}:\n{tx}"
                );
                let _ = policy::pod_policy(&cfg, 1);
                let _ = policy::ebpf_unsupported(&cfg);
            }
            Ok(())
        })
        .unwrap();
    println!(
        "fuzz: config parser: {n} executions, {} accepted, 0 panics, 0 injections",
        accepted.get()
    );
}

#[test]
fn cli_never_panics() {
    use clap::Parser;
    let n = cases();
    let flags = prop::sample::select(vec![
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
        "--redirect-dns",
        "-n",
        "--bogus",
    ]);
    let args = prop::collection::vec((flags, field()), 0..8);
    let mut runner = TestRunner::new(Config {
        cases: n,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&args, |args| {
            let mut argv = vec![
                "interceptor".to_string(),
                "explain".into(),
                "--uid".into(),
                "1".into(),
                "--dst".into(),
                "10.0.0.1:80".into(),
                "--ipv6".into(),
                "false".into(),
            ];
            for (f, v) in args {
                argv.push(f.to_string());
                argv.push(v);
            }
            if let Ok(interceptor::cli::Cli {
                command: interceptor::cli::Command::Explain(a),
            }) = interceptor::cli::Cli::try_parse_from(&argv)
            {
                // The full validation path, without touching any netns.
                let _ = interceptor::config::raw_config(&a.apply).map(|r| r.parse());
            }
            Ok(())
        })
        .unwrap();
    println!("fuzz: CLI: {n} executions, 0 panics");
}
