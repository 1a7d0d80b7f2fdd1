//! Escape scenarios: netfilter. Interface names reach the iptables-restore document and the nft
//! transaction from pod annotations (`istio.io/reroute-virtual-interfaces`, kube-virt
//! interfaces) and flags (`-c`, `-k`): a name that ends its token early is an injection into
//! what the node's rule tools execute (`x;include"sh*"#` made nft read the daemon's files and
//! echo them into the CNI error). Such a name is refused on every entry point with an error
//! naming it, and nothing is applied; an odd name Linux accepts works as configured.

use std::net::{IpAddr, SocketAddr};

use interceptor_tests::bin;
use interceptor_tests::cases::{self, apply, Flavor, Pod, APP_PORT, APP_UID, UPSTREAM_PORT};
use interceptor_tests::cni::{invoke, Invocation};
use interceptor_tests::daemon::DaemonProc;
use interceptor_tests::netfilter::rename_pod_if;
use interceptor_tests::topology::Topology;
use serde_json::json;

use super::common::BACKENDS;

/// The injection of the issue: an nft statement separator, an include of files matching
/// `sh*`, and a comment eating the rest of the rule; 15 bytes, which the old check allowed.
const INJECTION: &str = "x;include\"sh*\"#";

/// An odd name Linux accepts (`ip link set … name` takes it), full of nft and shell syntax.
const ODD: &str = "a;b#c{d}$e@f";

/// Every backend a CLI user can ask for: the compared pair plus native nftables.
const CLI_BACKENDS: [Flavor; 3] = [BACKENDS[0], BACKENDS[1], Flavor::Nftables];

/// Whether an error names [`INJECTION`], as given or quoted as Rust's Debug quotes it.
fn names_injection(msg: &str) -> bool {
    let debug = format!("{INJECTION:?}");
    msg.contains(INJECTION) || msg.contains(&debug[1..debug.len() - 1])
}

#[test]
fn injected_interface_name_is_refused_on_every_entry_point() {
    let topo = Topology::new("nfinj").expect("topology");
    let before = cases::ruleset(&topo);
    let ns = topo.pod_netns().to_str().unwrap().to_string();
    let mut failures = Vec::new();

    // CLI flags, on every backend.
    for flavor in CLI_BACKENDS {
        for flag in ["-k", "-c"] {
            let mut args = vec!["apply", "--network-namespace", &ns, "--ipv6", "false"];
            args.extend_from_slice(flavor.args());
            args.extend_from_slice(&[flag, INJECTION, "-i", "*", "-b", "*"]);
            let out = bin::run(&args, &[]);
            let stderr = String::from_utf8_lossy(&out.stderr);
            if out.status.code() != Some(2) || !names_injection(&stderr) {
                failures.push(format!(
                    "{flavor:?} {flag}: not refused naming the value (exit {:?}): {stderr}",
                    out.status.code()
                ));
            }
            let now = cases::ruleset(&topo);
            if now != before {
                failures.push(format!("{flavor:?} {flag}: rules applied:\n{now}"));
                // Leave a clean netns for the next entry point.
                let mut clean = vec!["apply", "--network-namespace", &ns, "--cleanup-only"];
                clean.extend_from_slice(flavor.args());
                clean.extend_from_slice(&[flag, INJECTION]);
                let _ = bin::run(&clean, &[]);
            }
        }
    }

    // Pod annotations through the CNI plugin, and the daemon's control API.
    let d = DaemonProc::start("nfinj").expect("daemon");
    let bin = bin::interceptor_bin();
    for key in [
        "istio.io/reroute-virtual-interfaces",
        "traffic.sidecar.istio.io/kubevirtInterfaces",
        "traffic.sidecar.istio.io/excludeInterfaces",
    ] {
        let conf = json!({
            "cniVersion": "1.0.0", "name": "test-net", "type": "interceptor",
            "socket": d.socket(), "bpffs": d.bpffs(),
            "podAnnotations": {"sidecar.istio.io/status": "{}", key: INJECTION},
        });
        let inv = Invocation {
            command: "ADD",
            container_id: "ctr-inj",
            netns: Some(topo.pod_netns()),
            ifname: "eth0",
            args: "K8S_POD_NAMESPACE=default;K8S_POD_NAME=inj",
            cni_path: bin.parent().unwrap(),
            in_netns: None,
        };
        let r = invoke(&bin, &inv, conf.to_string().as_bytes());
        let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap_or_default();
        let text = |k: &str| v[k].as_str().unwrap_or_default().to_string();
        let msg = format!("{} {} {}", text("msg"), text("details"), r.stderr);
        let named = msg.contains(key) && names_injection(&msg);
        if r.ok || !named {
            failures.push(format!(
                "CNI annotation {key}: not refused naming it: {r:?}"
            ));
        }
        if msg.contains("include") && msg.contains("Error: ") {
            failures.push(format!("CNI annotation {key}: nft ran the input: {msg}"));
        }
    }
    {
        use std::io::{BufRead, BufReader, Write};
        let mut sock = std::os::unix::net::UnixStream::connect(d.socket()).unwrap();
        let req = json!({"op": "add", "netns": ns,
            "config": {"reroute_virtual_interfaces": INJECTION}, "backend": "nftables"});
        writeln!(sock, "{req}").unwrap();
        let mut line = String::new();
        BufReader::new(&sock).read_line(&mut line).unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        let message = v["message"].as_str().unwrap_or_default();
        if v["result"] != "error" || !names_injection(message) {
            failures.push(format!("control API: not refused naming it: {line}"));
        }
    }
    let listed = d.pod_ok(&["list"]);
    if listed.lines().skip(1).any(|l| !l.trim().is_empty()) {
        failures.push(format!("daemon registered a pod:\n{listed}"));
    }
    let now = cases::ruleset(&topo);
    if now != before {
        failures.push(format!("rules applied through the daemon:\n{now}"));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// What answered an app connection to the upstream and an inbound connection to the app.
fn traffic(pod: &Pod) -> (String, String) {
    let t = &pod.topo;
    let up = SocketAddr::new(t.upstream_v4().into(), UPSTREAM_PORT);
    let out = pod
        .outbound(APP_UID, up)
        .map_or_else(|e| format!("error: {e:#}"), |(who, _, _)| who);
    let dst = SocketAddr::new(IpAddr::from(t.pod_v4()), APP_PORT);
    let inb = t
        .inbound_connect(dst, None)
        .map_or_else(|e| format!("error: {e:#}"), |o| o.reply);
    (out, inb)
}

#[test]
fn odd_but_valid_interface_name_is_excluded_as_configured() {
    let base = ["-u", "1337", "-m", "REDIRECT", "-i", "*", "-b", "*"];
    let (captured, passed) = (
        ("sidecar:15001".to_string(), "sidecar:15006".to_string()),
        (
            format!("upstream:{UPSTREAM_PORT}"),
            format!("app:{APP_PORT}"),
        ),
    );
    let mut failures = Vec::new();
    for flavor in CLI_BACKENDS {
        let pod = Pod::new("nfodd").expect("pod");
        rename_pod_if(&pod.topo, ODD).expect("renaming the pod's interface");
        // Exact name, iptables' prefix wildcard over it, and (control) another interface.
        for (exclude, want) in [(ODD, &passed), ("a;b#c{+", &passed), ("other0", &captured)] {
            let mut args = base.to_vec();
            args.extend_from_slice(&["-c", exclude, "--ipv6", "false"]);
            match apply(&pod, flavor, &args) {
                Ok(_) => {
                    let got = traffic(&pod);
                    if &got != want {
                        failures.push(format!(
                            "{flavor:?} -c {exclude:?}: (outbound, inbound) answered by {got:?}, want {want:?}"
                        ));
                    }
                    args.push("--cleanup-only");
                    let _ = apply(&pod, flavor, &args);
                }
                // eBPF cannot match interfaces: it must refuse (fail closed), naming the flag.
                Err(e) if flavor == Flavor::Ebpf => {
                    let e = format!("{e:#}");
                    if !e.contains("--istio-exclude-interfaces") || !e.contains(exclude) {
                        failures.push(format!("{flavor:?} -c {exclude:?}: unclear refusal: {e}"));
                    }
                    let rules = cases::ruleset(&pod.topo);
                    if !rules.is_empty() {
                        failures.push(format!("{flavor:?}: refused but left rules:\n{rules}"));
                    }
                    // `auto` (the default) serves such a pod with the netfilter fallback, on
                    // which the name works as configured.
                    args.extend_from_slice(&["--backend", "auto"]);
                    match apply(&pod, flavor, &args) {
                        Ok(said) if said.contains("eBPF cannot honour") => {
                            let got = traffic(&pod);
                            if &got != want {
                                failures.push(format!(
                                    "auto -c {exclude:?}: (outbound, inbound) answered by {got:?}, want {want:?}"
                                ));
                            }
                        }
                        Ok(said) => {
                            failures.push(format!("auto -c {exclude:?}: no fallback: {said}"))
                        }
                        Err(e) => failures.push(format!("auto -c {exclude:?}: {e:#}")),
                    }
                    args.extend_from_slice(&["--backend", "iptables", "--cleanup-only"]);
                    let _ = apply(&pod, flavor, &args);
                    let left = cases::ruleset(&pod.topo);
                    if !left.is_empty() {
                        failures.push(format!("auto -c {exclude:?}: cleanup left rules:\n{left}"));
                    }
                }
                Err(e) => failures.push(format!("{flavor:?} -c {exclude:?}: {e:#}")),
            }
        }
        // The kube-virt flag takes the name too (checked by the tools, not by traffic here).
        let mut args = base.to_vec();
        args.extend_from_slice(&["-k", ODD, "--ipv6", "false"]);
        if flavor != Flavor::Ebpf {
            if let Err(e) = apply(&pod, flavor, &args) {
                failures.push(format!("{flavor:?} -k {ODD:?}: {e:#}"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
