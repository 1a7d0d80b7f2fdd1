//! One table of bad inputs across every way a config reaches interceptor: `apply`'s flags and
//! environment, pod annotations and the istio-proxy securityContext (through the CNI plugin),
//! the CNI network config on stdin and the `CNI_*` environment, and the daemon's control API.
//!
//! Each must be refused with a clear error naming the bad value (CLI: exit status 2; CNI: the
//! spec's error object; control API: an error response), and after each the whole node state
//! this test can see must be exactly as before: no iptables/nftables rule in the pod netns, no
//! pod in the daemon's list or state dir, no entry in any of the eBPF maps, no new pin. Control
//! runs at the end prove each of those checks sees a registration when one happens.

use std::path::{Path, PathBuf};

use interceptor::backend::ebpf::Pins;
use interceptor_tests::bin;
use interceptor_tests::cni::{invoke, Invocation};
use interceptor_tests::daemon::DaemonProc;
use interceptor_tests::topology::Topology;
use serde_json::{json, Value};

/// How a bad input is delivered.
enum Via {
    /// `interceptor apply --network-namespace <pod> --bpffs <daemon's> --ipv6 false ARGS`, ENV.
    Cli {
        args: Vec<String>,
        env: Vec<(String, String)>,
    },
    /// The CNI plugin: `CNI_COMMAND`, `CNI_NETNS` (None: unset), `CNI_ARGS`, `CNI_CONTAINERID`,
    /// `CNI_IFNAME`, and stdin.
    Cni {
        command: &'static str,
        netns: Option<PathBuf>,
        args: &'static str,
        container_id: &'static str,
        ifname: &'static str,
        stdin: Vec<u8>,
        /// The CNI error code expected.
        code: u64,
    },
    /// One raw request line on the daemon's control socket.
    Control(String),
}

/// The injection of issue 13: an nft statement separator, an include of the daemon's files
/// matching `sh*`, and a comment eating the rest of the rule, in 15 bytes.
const INJECTION: &str = "x;include\"sh*\"#";

struct Case {
    kind: &'static str,
    what: String,
    via: Via,
    /// Substrings the error must contain: where the value came from and the value.
    named: Vec<String>,
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

struct Fixture {
    d: DaemonProc,
    topo: Topology,
}

impl Fixture {
    fn ns(&self) -> &str {
        self.topo.pod_netns().to_str().unwrap()
    }

    /// Our CNI network config for this daemon, with `extra` merged in.
    fn conf(&self, extra: Value) -> Value {
        let mut c = json!({
            "cniVersion": "1.0.0",
            "name": "test-net",
            "type": "interceptor",
            "socket": self.d.socket(),
            "bpffs": self.d.bpffs(),
        });
        if let Value::Object(m) = extra {
            c.as_object_mut().unwrap().extend(m);
        }
        c
    }

    /// Everything of ours the node could hold after a request, as text.
    fn state(&self) -> String {
        let mut out = String::new();
        // Rules in the pod netns (all four iptables flavours and nft).
        for (prog, args) in [
            ("iptables-legacy-save", &[][..]),
            ("iptables-nft-save", &[][..]),
            ("ip6tables-legacy-save", &[][..]),
            ("ip6tables-nft-save", &[][..]),
            ("nft", &["list", "ruleset"][..]),
        ] {
            let text = self.topo.pod_exec(prog, args, None).unwrap_or_default();
            out.extend(
                text.lines()
                    .filter(|l| l.contains("ISTIO") || l.contains("istio"))
                    .map(|l| format!("rule {prog}: {l}\n")),
            );
        }
        // The daemon's pods and state files.
        let list = self.d.pod_ok(&["list"]);
        out.extend(
            list.lines()
                .skip(1) // the header
                .filter(|l| !l.trim().is_empty())
                .map(|l| format!("daemon list: {l}\n")),
        );
        for e in std::fs::read_dir(self.d.state_dir()).unwrap().flatten() {
            out.push_str(&format!("state file: {}\n", e.path().display()));
        }
        // Every entry of every eBPF map that grows with pods, and every pin (none in the
        // bpf()-denied runs of vm-test, where every pod gets the fallback).
        if !interceptor_tests::ebpf_expected() {
            return out;
        }
        let pins = Pins::new(self.d.bpffs());
        let maps = pins.maps().expect("opening the daemon's maps");
        for (name, n, _) in maps.occupancy() {
            if n > 0 {
                out.push_str(&format!("map {name}: {n} entries\n"));
            }
        }
        for (cookie, _) in maps.pods() {
            out.push_str(&format!("pod policy for netns cookie {cookie}\n"));
        }
        fn walk(dir: &Path, out: &mut String) {
            for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                let p = e.path();
                out.push_str(&format!("pin {}\n", p.display()));
                if p.is_dir() {
                    walk(&p, out);
                }
            }
        }
        walk(self.d.bpffs(), &mut out);
        out
    }
}

fn cli_cases() -> Vec<Case> {
    let flag = |args: &[&str], flag: &str, value: &str| Case {
        kind: "CLI flag",
        what: args.join(" "),
        via: Via::Cli {
            args: s(args),
            env: vec![],
        },
        named: s(&[flag, value]),
    };
    // A value from the environment is named by its variable too (and the flag it stands for).
    let env = |vars: &[(&str, &str)], flag: &str, value: &str| Case {
        kind: "env var",
        what: format!("{vars:?}"),
        via: Via::Cli {
            args: vec![],
            env: vars
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        },
        named: s(&[flag, value])
            .into_iter()
            .chain(vars.iter().map(|(k, _)| k.to_string()))
            .collect(),
    };
    let many_groups = (0..65).map(|i| i.to_string()).collect::<Vec<_>>().join(",");
    let mut v = vec![
        flag(&["-p", "0"], "--envoy-port", "0"),
        flag(&["-p", "70000"], "--envoy-port", "70000"),
        flag(&["--envoy-port", "abc"], "--envoy-port", "abc"),
        flag(&["-z", "99999"], "--inbound-capture-port", "99999"),
        flag(&["-e", "x"], "--inbound-tunnel-port", "x"),
        flag(&["-u", "root"], "--proxy-uid", "root"),
        flag(&["-u", "1337,abc"], "--proxy-uid", "abc"),
        flag(&["-g", "1.5"], "--proxy-gid", "1.5"),
        flag(
            &["-m", "TPROXYY"],
            "--istio-inbound-interception-mode",
            "TPROXYY",
        ),
        flag(&["-b", "80,http"], "--istio-inbound-ports", "http"),
        flag(&["-b", "0"], "--istio-inbound-ports", "0"),
        flag(&["-d", "65536"], "--istio-local-exclude-ports", "65536"),
        flag(
            &["-i", "10.0.0.0/33"],
            "--istio-service-cidr",
            "10.0.0.0/33",
        ),
        flag(&["-i", "10.0.0.0/8,*"], "--istio-service-cidr", "*"),
        flag(&["-x", "*"], "--istio-service-exclude-cidr", "*"),
        flag(
            &["-x", "300.1.1.1/8"],
            "--istio-service-exclude-cidr",
            "300.1.1.1/8",
        ),
        flag(
            &["-x", "fd00::/129"],
            "--istio-service-exclude-cidr",
            "fd00::/129",
        ),
        flag(&["-q", "1-2"], "--istio-outbound-ports", "1-2"),
        flag(
            &["-o", "8080,,x"],
            "--istio-local-outbound-ports-exclude",
            "x",
        ),
        flag(
            &["-o", "80\n-A OUTPUT -j ACCEPT"],
            "--istio-local-outbound-ports-exclude",
            "-A OUTPUT -j ACCEPT",
        ),
        flag(&["-t", "mark"], "--istio-inbound-tproxy-mark", "mark"),
        flag(
            &["-r", "table"],
            "--istio-inbound-tproxy-route-table",
            "table",
        ),
        flag(&["-c", "bad/if"], "--istio-exclude-interfaces", "bad/if"),
        flag(
            &["-c", "eth0;flush ruleset"],
            "--istio-exclude-interfaces",
            "eth0;flush ruleset",
        ),
        flag(
            &["-k", "averyveryverylongifname0"],
            "--kube-virt-interfaces",
            "averyveryverylongifname0",
        ),
        // Interface names that could end their token in a rule document (issue 13).
        flag(
            &["--backend", "nftables", "-k", INJECTION],
            "--kube-virt-interfaces",
            "x;include",
        ),
        flag(
            &["--backend", "iptables", "-c", INJECTION],
            "--istio-exclude-interfaces",
            "x;include",
        ),
        flag(&["-k", "net1,a:b"], "--kube-virt-interfaces", "a:b"),
        flag(&["-k", ".."], "--kube-virt-interfaces", "\"..\""),
        flag(&["-c", "+"], "--istio-exclude-interfaces", "wildcard"),
        flag(&["-c", "!"], "--istio-exclude-interfaces", "negation"),
        flag(&["-k", "a\\b"], "--kube-virt-interfaces", "a\\\\b"),
        flag(&["-k", "eth\u{1}"], "--kube-virt-interfaces", "eth\\u{1}"),
        flag(&["--backend", "magic"], "--backend", "magic"),
        flag(
            &["--force-iptables-binary", "old"],
            "--force-iptables-binary",
            "old",
        ),
        flag(&["--dns-servers", "1.2.3.4,nope"], "--dns-servers", "nope"),
        flag(&["--ipv6", "maybe"], "--ipv6", "maybe"),
        flag(
            &["--probe-timeout", "forever"],
            "--probe-timeout",
            "forever",
        ),
        flag(
            &["--iptables-probe-port", "0"],
            "--iptables-probe-port",
            "0",
        ),
        flag(
            &["--native-nftables", "--backend", "iptables"],
            "--native-nftables",
            "iptables",
        ),
        flag(
            &["--bind-guard-ports", "15001,x"],
            "--bind-guard-ports",
            "x",
        ),
        flag(
            &["--network-namespace", "/nonexistent/netns"],
            "--network-namespace",
            "/nonexistent/netns",
        ),
        flag(
            &["--network-namespace", "/etc/hostname"],
            "--network-namespace",
            "/etc/hostname",
        ),
        env(&[("PROXY_UID", "abc")], "--proxy-uid", "abc"),
        env(
            &[("INBOUND_CAPTURE_PORT", "99999")],
            "--inbound-capture-port",
            "99999",
        ),
        env(
            &[("ISTIO_SERVICE_CIDR", "10.0.0.0/33")],
            "--istio-service-cidr",
            "10.0.0.0/33",
        ),
        env(
            &[("ISTIO_INBOUND_INTERCEPTION_MODE", "BOGUS")],
            "--istio-inbound-interception-mode",
            "BOGUS",
        ),
        env(&[("INTERCEPTOR_BACKEND", "magic")], "--backend", "magic"),
        env(
            &[("ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR", "10.0.0.1/32")],
            "ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR",
            "10.0.0.1/32",
        ),
        env(
            &[
                ("ISTIO_OUTBOUND_OWNER_GROUPS", "java"),
                ("ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE", "ftp"),
            ],
            "ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE",
            "ftp",
        ),
        env(
            &[("ISTIO_OUTBOUND_OWNER_GROUPS", "10,08")],
            "ISTIO_OUTBOUND_OWNER_GROUPS",
            "08",
        ),
        env(
            &[("ISTIO_META_DNS_CAPTURE", "garbage")],
            "ISTIO_META_DNS_CAPTURE",
            "garbage",
        ),
        env(&[("ISTIO_DUAL_STACK", "yes")], "ISTIO_DUAL_STACK", "yes"),
        env(&[("DRY_RUN", "maybe")], "--dry-run", "maybe"),
        flag(&["--dual-stack=2"], "--dual-stack", "2"),
    ];
    v.push(Case {
        kind: "env var",
        what: "ISTIO_OUTBOUND_OWNER_GROUPS with 65 groups".into(),
        via: Via::Cli {
            args: vec![],
            env: vec![("ISTIO_OUTBOUND_OWNER_GROUPS".into(), many_groups)],
        },
        named: s(&["ISTIO_OUTBOUND_OWNER_GROUPS", "the limit is 64"]),
    });
    v
}

fn cni_cases(fx: &Fixture) -> Vec<Case> {
    let ns = fx.topo.pod_netns().to_path_buf();
    let stdin = |v: Value| v.to_string().into_bytes();
    let add = |kind: &'static str, what: &str, body: Vec<u8>, code: u64, named: &[&str]| Case {
        kind,
        what: what.into(),
        via: Via::Cni {
            command: "ADD",
            netns: Some(ns.clone()),
            args: "K8S_POD_NAMESPACE=default;K8S_POD_NAME=bad",
            container_id: "ctr-bad",
            ifname: "eth0",
            stdin: body,
            code,
        },
        named: s(named),
    };
    let status = "sidecar.istio.io/status";
    let annotated = |key: &str, value: &str| {
        stdin(fx.conf(json!({"podAnnotations": {status: "{}", key: value}})))
    };
    let ann = |key: &str, value: &str, named: &str| {
        add(
            "annotation",
            &format!("{key}={value:?}"),
            annotated(key, value),
            7,
            &[key, named],
        )
    };
    let mut v = vec![
        ann(
            "traffic.sidecar.istio.io/includeOutboundIPRanges",
            "10.0.0.0/33",
            "10.0.0.0/33",
        ),
        ann(
            "traffic.sidecar.istio.io/includeOutboundIPRanges",
            "10.0.0.0/8, 10.1.0.0/16",
            " 10.1.0.0/16",
        ),
        ann("traffic.sidecar.istio.io/excludeOutboundIPRanges", "*", "*"),
        ann("sidecar.istio.io/interceptionMode", "TPROXYY", "TPROXYY"),
        ann(
            "traffic.sidecar.istio.io/excludeInboundPorts",
            "80,http",
            "80,http",
        ),
        ann(
            "traffic.sidecar.istio.io/includeInboundPorts",
            "80-90",
            "80-90",
        ),
        ann("traffic.sidecar.istio.io/excludeOutboundPorts", "0", "0"),
        ann(
            "traffic.sidecar.istio.io/includeOutboundPorts",
            "65536",
            "65536",
        ),
        ann(
            "traffic.sidecar.istio.io/excludeInterfaces",
            "eth0,a b",
            "a b",
        ),
        ann(
            "traffic.sidecar.istio.io/kubevirtInterfaces",
            "net1,bad/if",
            "bad/if",
        ),
        ann(
            "istio.io/reroute-virtual-interfaces",
            "averyveryverylongifname0",
            "averyveryverylongifname0",
        ),
        ann(
            "istio.io/reroute-virtual-interfaces",
            INJECTION,
            "x;include",
        ),
        ann(
            "traffic.sidecar.istio.io/kubevirtInterfaces",
            "net1,a:b",
            "a:b",
        ),
        add(
            "annotation",
            "annotation value not a string",
            stdin(fx.conf(json!({"podAnnotations": {status: 1}}))),
            7,
            &["invalid type", "1"],
        ),
        add(
            "annotation",
            "runAsUser -5 (istio-proxy securityContext)",
            stdin(fx.conf(json!({"runAsUser": -5,
                "podAnnotations": {"sidecar.istio.io/status": "{}"}}))),
            7,
            &["runAsUser", "-5"],
        ),
        add(
            "annotation",
            "runtimeConfig runAsGroup 2^32",
            stdin(
                fx.conf(json!({"runtimeConfig": {"runAsGroup": 4294967296u64},
                "podAnnotations": {"sidecar.istio.io/status": "{}"}})),
            ),
            7,
            &["runAsGroup", "4294967296"],
        ),
        add(
            "CNI config",
            "malformed JSON",
            b"{\"cniVersion\": \"1.0.0\",".to_vec(),
            6,
            &["network configuration", "EOF"],
        ),
        add(
            "CNI config",
            "unsupported cniVersion",
            stdin(fx.conf(json!({"cniVersion": "2.0.0"}))),
            1,
            &["2.0.0"],
        ),
        add(
            "CNI config",
            "bad backend",
            stdin(fx.conf(json!({"backend": "ebpff"}))),
            7,
            &["ebpff"],
        ),
        add(
            "CNI config",
            "socket not a string",
            stdin(fx.conf(json!({"socket": 5}))),
            7,
            &["invalid type", "5"],
        ),
        add(
            "CNI config",
            "prevResult address without prefix",
            stdin(fx.conf(json!({"prevResult": {"ips": [{"address": "10.1.0.5"}]}}))),
            7,
            &["prevResult.ips[0].address", "10.1.0.5"],
        ),
        add(
            "CNI config",
            "prevResult.ips not an array",
            stdin(fx.conf(json!({"prevResult": {"ips": "10.1.0.5/24"}}))),
            7,
            &["prevResult.ips"],
        ),
    ];
    let good = stdin(fx.conf(json!({})));
    let env =
        |what: &str, command, netns: Option<PathBuf>, args, cid, ifname, code, named: &[&str]| {
            Case {
                kind: "CNI env",
                what: what.into(),
                via: Via::Cni {
                    command,
                    netns,
                    args,
                    container_id: cid,
                    ifname,
                    stdin: good.clone(),
                    code,
                },
                named: s(named),
            }
        };
    let a = "K8S_POD_NAMESPACE=default;K8S_POD_NAME=bad";
    v.extend([
        env(
            "CNI_NETNS unset",
            "ADD",
            None,
            a,
            "c",
            "eth0",
            4,
            &["CNI_NETNS"],
        ),
        env(
            "CNI_NETNS does not exist",
            "ADD",
            Some("/var/run/netns/ic-bad-no-such-netns".into()),
            a,
            "c",
            "eth0",
            3,
            &["CNI_NETNS", "/var/run/netns/ic-bad-no-such-netns"],
        ),
        env(
            "CNI_NETNS not a netns",
            "ADD",
            Some("/etc/hostname".into()),
            a,
            "c",
            "eth0",
            3,
            &["CNI_NETNS", "/etc/hostname"],
        ),
        env(
            "CNI_ARGS pair without =",
            "ADD",
            Some(ns.clone()),
            "K8S_POD_NAME",
            "c",
            "eth0",
            4,
            &["CNI_ARGS", "K8S_POD_NAME"],
        ),
        env(
            "unknown CNI_COMMAND",
            "ADDD",
            Some(ns.clone()),
            a,
            "c",
            "eth0",
            4,
            &["CNI_COMMAND", "ADDD"],
        ),
        env(
            "CNI_CONTAINERID empty",
            "ADD",
            Some(ns.clone()),
            a,
            "",
            "eth0",
            4,
            &["CNI_CONTAINERID"],
        ),
        env(
            "CNI_IFNAME empty",
            "ADD",
            Some(ns.clone()),
            a,
            "c",
            "",
            4,
            &["CNI_IFNAME"],
        ),
    ]);
    v
}

fn control_cases(fx: &Fixture) -> Vec<Case> {
    let ns = fx.ns();
    let add = |cfg: &str| format!(r#"{{"op":"add","netns":"{ns}","config":{cfg}}}"#);
    let c = |what: &str, req: String, named: &[&str]| Case {
        kind: "control API",
        what: what.into(),
        via: Via::Control(req),
        named: s(named),
    };
    vec![
        c("truncated JSON", "{".into(), &["malformed request", "EOF"]),
        c(
            "unknown op",
            r#"{"op":"nope"}"#.into(),
            &["malformed request", "nope"],
        ),
        c(
            "add without netns",
            r#"{"op":"add"}"#.into(),
            &["malformed request", "netns"],
        ),
        c(
            "netns does not exist",
            r#"{"op":"add","netns":"/nonexistent/ns","config":{}}"#.into(),
            &["/nonexistent/ns"],
        ),
        c(
            "netns not a network namespace",
            r#"{"op":"add","netns":"/etc/hostname","config":{}}"#.into(),
            &["/etc/hostname", "not a network namespace"],
        ),
        c(
            "netns a directory",
            r#"{"op":"add","netns":"/tmp","config":{}}"#.into(),
            &["/tmp", "not a network namespace"],
        ),
        c(
            "proxy_port not a port",
            add(r#"{"proxy_port":"abc"}"#),
            &["--envoy-port", "abc"],
        ),
        c(
            "proxy_port a number, not a string",
            add(r#"{"proxy_port":15001}"#),
            &["malformed request", "15001"],
        ),
        c(
            "exclude CIDR *",
            add(r#"{"outbound_ip_ranges_exclude":"*"}"#),
            &["--istio-service-exclude-cidr", "*"],
        ),
        c(
            "proxy_uid root",
            add(r#"{"proxy_uid":"root"}"#),
            &["--proxy-uid", "root"],
        ),
        c(
            "interception mode",
            add(r#"{"inbound_interception_mode":"BOGUS"}"#),
            &["--istio-inbound-interception-mode", "BOGUS"],
        ),
        c(
            "newline in a port list",
            add(r#"{"outbound_ports_exclude":"80\n-A OUTPUT -j ACCEPT"}"#),
            &[
                "--istio-local-outbound-ports-exclude",
                "-A OUTPUT -j ACCEPT",
            ],
        ),
        c(
            "unknown backend",
            format!(r#"{{"op":"add","netns":"{ns}","config":{{}},"backend":"magic"}}"#),
            &["malformed request", "magic"],
        ),
        c(
            "ebpf backend with an interface exclusion eBPF cannot honour",
            format!(
                r#"{{"op":"add","netns":"{ns}","config":{{"exclude_interfaces":"eth0"}},"backend":"ebpf"}}"#
            ),
            // Where eBPF is unavailable (the VM matrix's bpf()-denied runs) that is the refusal.
            if interceptor_tests::ebpf_expected() {
                &["ebpf", "exclude"]
            } else {
                &["ebpf", "unavailable"]
            },
        ),
        c(
            "interface name injection, nftables backend",
            json!({"op": "add", "netns": ns, "backend": "nftables",
                "config": {"reroute_virtual_interfaces": INJECTION}})
            .to_string(),
            &["--kube-virt-interfaces", "x;include"],
        ),
        c(
            "pod IP not an address",
            format!(r#"{{"op":"add","netns":"{ns}","config":{{}},"ips":["10.0.0.300"]}}"#),
            &["malformed request", "10.0.0.300"],
        ),
        c(
            "show an unregistered netns",
            r#"{"op":"show","netns":"/nonexistent/ns"}"#.into(),
            &["not registered", "/nonexistent/ns"],
        ),
    ]
}

/// Runs one case; `Err` says how it misbehaved.
fn run(fx: &Fixture, case: &Case) -> Result<String, String> {
    let (ok_shape, text) = match &case.via {
        Via::Cli { args, env } => {
            let bpffs = fx.d.bpffs().to_str().unwrap();
            let mut argv = vec![
                "apply",
                "--network-namespace",
                fx.ns(),
                "--bpffs",
                bpffs,
                "--ipv6",
                "false",
            ];
            // Later flags win in clap for single-valued args, so the case's own values apply.
            argv.extend(args.iter().map(String::as_str));
            let env: Vec<(&str, &str)> =
                env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            let out = bin::run(&argv, &env);
            let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
            (
                out.status.code() == Some(2),
                format!("exit {:?}: {stderr}", out.status.code()),
            )
        }
        Via::Cni {
            command,
            netns,
            args,
            container_id,
            ifname,
            stdin,
            code,
        } => {
            let bin = bin::interceptor_bin();
            let inv = Invocation {
                command,
                container_id,
                netns: netns.as_deref(),
                ifname,
                args,
                cni_path: bin.parent().unwrap(),
                in_netns: None,
            };
            let r = invoke(&bin, &inv, stdin);
            let v: Value = serde_json::from_str(&r.stdout).unwrap_or(Value::Null);
            (
                !r.ok && v["code"].as_u64() == Some(*code),
                format!(
                    "ok={} code {} (want {code}): {} {}",
                    r.ok, v["code"], v["msg"], v["details"]
                ),
            )
        }
        Via::Control(req) => {
            use std::io::{BufRead, BufReader, Write};
            let mut sock = std::os::unix::net::UnixStream::connect(fx.d.socket()).unwrap();
            writeln!(sock, "{req}").unwrap();
            let mut line = String::new();
            BufReader::new(&sock).read_line(&mut line).unwrap();
            let v: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
            (
                v["result"] == "error",
                v["message"].as_str().unwrap_or(line.trim()).to_string(),
            )
        }
    };
    let missing: Vec<&String> = case.named.iter().filter(|n| !text.contains(*n)).collect();
    if !ok_shape || !missing.is_empty() {
        return Err(format!(
            "[{}] {}: not a clear refusal (missing {missing:?}): {text}",
            case.kind, case.what
        ));
    }
    Ok(text)
}

#[test]
fn every_bad_input_is_named_and_applies_nothing() {
    let fx = Fixture {
        d: DaemonProc::start("bad").expect("daemon"),
        topo: Topology::new("bad").expect("topology"),
    };
    let mut cases = cli_cases();
    cases.extend(cni_cases(&fx));
    cases.extend(control_cases(&fx));
    let baseline = fx.state();
    assert!(
        !baseline.contains("rule ") && !baseline.contains("daemon list"),
        "not a clean start:\n{baseline}"
    );
    let mut failures = Vec::new();
    let mut applied = 0;
    let mut by_kind = std::collections::BTreeMap::<&str, usize>::new();
    for case in &cases {
        *by_kind.entry(case.kind).or_default() += 1;
        match run(&fx, case) {
            Ok(text) => println!(
                "[{}] {} -> {}",
                case.kind,
                case.what,
                text.replace('\n', " | ")
            ),
            Err(e) => failures.push(e),
        }
        let now = fx.state();
        if now != baseline {
            applied += 1;
            failures.push(format!(
                "[{}] {}: the node changed:\nbefore:\n{baseline}\nafter:\n{now}",
                case.kind, case.what
            ));
        }
    }
    println!(
        "bad inputs: {} tried ({by_kind:?}), {} not clearly refused, {applied} applied anything",
        cases.len(),
        failures.len() - applied
    );
    assert!(cases.len() >= 40, "the table needs at least 40 inputs");
    assert!(
        failures.is_empty(),
        "{} bad inputs misbehaved:\n{}",
        failures.len(),
        failures.join("\n")
    );

    // Controls: the same channels with valid input do change what `state` sees, so a bad input
    // that slipped through would have been caught.
    let ns = fx.ns().to_string();
    let bpffs = fx.d.bpffs().to_str().unwrap().to_string();
    let ok = |out: std::process::Output| {
        assert!(
            out.status.success(),
            "control run failed: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    };
    // CLI, eBPF: a map entry (the pod's policy) appears.
    ok(bin::run(
        &[
            "apply",
            "--network-namespace",
            &ns,
            "--bpffs",
            &bpffs,
            "--ipv6",
            "false",
        ],
        &[],
    ));
    let st = fx.state();
    if interceptor_tests::ebpf_expected() {
        assert!(
            st.contains("pod policy for netns cookie"),
            "eBPF control: {st}"
        );
    }
    // `remove` takes a pod off the eBPF datapath; where `auto` fell back (no usable eBPF),
    // the fallback's own undo.
    let undo: &[&str] = if interceptor_tests::ebpf_expected() {
        &["remove", "--network-namespace", &ns, "--bpffs", &bpffs]
    } else {
        &[
            "apply",
            "--network-namespace",
            &ns,
            "--bpffs",
            &bpffs,
            "--ipv6",
            "false",
            "--cleanup-only",
        ]
    };
    ok(bin::run(undo, &[]));
    assert_eq!(fx.state(), baseline, "eBPF control: not removed");
    // CLI, iptables: rules appear in the pod netns.
    ok(bin::run(
        &[
            "apply",
            "--network-namespace",
            &ns,
            "--backend",
            "iptables",
            "--ipv6",
            "false",
        ],
        &[],
    ));
    assert!(fx.state().contains("rule iptables"), "iptables control");
    ok(bin::run(
        &[
            "apply",
            "--network-namespace",
            &ns,
            "--backend",
            "iptables",
            "--ipv6",
            "false",
            "--cleanup-only",
        ],
        &[],
    ));
    assert_eq!(fx.state(), baseline, "iptables control: not cleaned up");
    // CNI ADD with good annotations: the daemon lists the pod and records it.
    let bin = bin::interceptor_bin();
    let inv = Invocation {
        command: "ADD",
        container_id: "ctr-good",
        netns: Some(fx.topo.pod_netns()),
        ifname: "eth0",
        args: "K8S_POD_NAMESPACE=default;K8S_POD_NAME=good",
        cni_path: bin.parent().unwrap(),
        in_netns: None,
    };
    let good = fx.conf(json!({"podAnnotations": {"sidecar.istio.io/status": "{}"}}));
    let r = invoke(&bin, &inv, good.to_string().as_bytes());
    assert!(r.ok, "CNI control: {r:?}");
    let st = fx.state();
    assert!(
        st.contains("daemon list") && st.contains("state file"),
        "CNI control: {st}"
    );
    fx.d.pod_ok(&["remove", "--network-namespace", &ns]);
    assert_eq!(fx.state(), baseline, "CNI control: not removed");
}

/// Odd interface names Linux accepts are not bad inputs: the rule tools themselves
/// (`iptables-nft-restore`, `nft`, in a scratch netns) parse our documents into rules on exactly
/// those names, in every rule group that takes one. A name slipped past validation is caught.
#[test]
fn odd_interface_names_parse_as_configured_by_the_rule_tools() {
    use interceptor_common::config::RawConfig;
    use interceptor_tests::netfilter::check_rendered;
    let names = [
        "a;b#c{d}$e@f",
        "eth+",
        "x*",
        "a*+",
        "-j",
        "--",
        "!x",
        "...",
        "é",
        "$x",
        "@set",
        "}{",
        "'q'",
        "123456789012345",
    ];
    let mut checked = 0;
    for (i, name) in names.iter().enumerate() {
        let other = names[(i + 1) % names.len()];
        let raw = RawConfig {
            inbound_interception_mode: if i % 2 == 0 { "TPROXY" } else { "REDIRECT" }.into(),
            inbound_ports_include: "*".into(),
            exclude_interfaces: format!("{name},eth9"),
            reroute_virtual_interfaces: other.to_string(),
            outbound_ip_ranges_include: if i % 3 == 0 {
                "*"
            } else {
                "10.0.0.0/8,fd00::/8"
            }
            .into(),
            enable_ipv6: true,
            ..RawConfig::default()
        };
        let cfg = raw
            .parse()
            .unwrap_or_else(|e| panic!("{name:?} refused: {e}"));
        check_rendered(&cfg).unwrap_or_else(|e| panic!("{name:?}: {e}"));
        checked += 1;
    }
    // Control: a name that bypassed validation (the fields are public) is caught by the tools.
    for bad in ["a\"b", "x;include\"sh*\"#"] {
        let mut cfg = RawConfig::default().parse().unwrap();
        cfg.reroute_virtual_interfaces = vec![bad.to_string()];
        let r = check_rendered(&cfg);
        assert!(r.is_err(), "{bad:?} passed the real-tool check");
        println!(
            "control {bad:?}: {}",
            r.unwrap_err().lines().next().unwrap_or("")
        );
    }
    println!("odd interface names: {checked} configs parsed by iptables-nft and nft as asked");
}
