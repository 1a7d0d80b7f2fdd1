//! Istio's CNI plugin (sidecar mode) goldens, `cni/pkg/plugin/testdata/*.txt.golden`: each
//! case's pod annotations / proxy env / runAsUser, given to our plugin as its network config,
//! derived into an interception config by our Istio rules (`interceptor::cni::annotations`)
//! and rendered by our iptables emitter, must give the golden's rules. Compared as Istio's
//! `TestIPTablesRuleGeneration` compares (`getRules`): split on `COMMIT`, `*-save` lines
//! dropped, keyed by table.
//!
//! 9 cases over 8 goldens (`custom-uid-zero` reuses `basic`); `status-ports.txt.golden` is not
//! referenced by Istio's test (an orphan) and is skipped.

use std::collections::BTreeMap;

use interceptor::backend::iptables;
use interceptor::cni::annotations::{NodeEnv, Redirect};
use interceptor::cni::plugin::pod_info;
use interceptor::cni::spec::parse_netconf;
use interceptor_tests::shared_dir;
use serde_json::{json, Value};

const STATUS: &str = "sidecar.istio.io/status";

/// One case of Istio's test: its name, its golden, and the plugin config carrying the pod.
struct Case {
    name: &'static str,
    golden: &'static str,
    conf: Value,
}

fn case(name: &'static str, golden: &'static str, pod: Value) -> Case {
    let mut conf = json!({
        "cniVersion": "1.0.0",
        "name": "k8s-pod-network",
        "type": "interceptor",
    });
    if let Value::Object(m) = pod {
        conf.as_object_mut().unwrap().extend(m);
    }
    Case { name, golden, conf }
}

fn cases() -> Vec<Case> {
    vec![
        case(
            "basic",
            "basic",
            json!({"podAnnotations": {STATUS: "true"}, "proxyEnv": {}}),
        ),
        case(
            "include-exclude-ip",
            "include-exclude-ip",
            json!({"podAnnotations": {
                STATUS: "true",
                "traffic.sidecar.istio.io/includeOutboundIPRanges": "127.0.0.0/8",
                "traffic.sidecar.istio.io/excludeOutboundIPRanges": "10.0.0.0/8",
            }, "proxyEnv": {}}),
        ),
        case(
            "include-exclude-ports",
            "include-exclude-ports",
            json!({"podAnnotations": {
                STATUS: "true",
                "traffic.sidecar.istio.io/includeInboundPorts": "1111,2222",
                "traffic.sidecar.istio.io/excludeInboundPorts": "3333,4444",
                "traffic.sidecar.istio.io/excludeOutboundPorts": "5555,6666",
            }, "proxyEnv": {}}),
        ),
        case(
            "tproxy",
            "tproxy",
            json!({"podAnnotations": {
                STATUS: "true",
                "sidecar.istio.io/interceptionMode": "TPROXY",
            }, "proxyEnv": {}}),
        ),
        case(
            "DNS",
            "dns",
            json!({"podAnnotations": {STATUS: "true"},
                   "proxyEnv": {"ISTIO_META_DNS_CAPTURE": "true"}}),
        ),
        case(
            "invalid-drop",
            "invalid-drop",
            json!({"podAnnotations": {STATUS: "true"}, "proxyEnv": {"INVALID_DROP": "true"}}),
        ),
        case(
            "custom-uid",
            "custom-uid",
            json!({"podAnnotations": {STATUS: "true"},
                   "runAsUser": 1000670000, "runAsGroup": 1000670001}),
        ),
        case(
            "custom-uid-zero",
            "basic",
            json!({"podAnnotations": {STATUS: "true"}, "runAsUser": 0}),
        ),
        case(
            "custom-uid-tproxy",
            "custom-uid-tproxy",
            json!({"podAnnotations": {
                STATUS: "true",
                "sidecar.istio.io/interceptionMode": "TPROXY",
            }, "runAsUser": 1000670000, "runAsGroup": 1000670001}),
        ),
    ]
}

/// Istio's `getRules`: the rules keyed by table, each ending in `COMMIT`.
fn get_rules(text: &str) -> BTreeMap<String, String> {
    let mut tables = BTreeMap::new();
    for part in text.split("COMMIT") {
        let mut lines: Vec<&str> = part
            .trim_matches('\n')
            .split('\n')
            .filter(|l| *l != "iptables-save" && *l != "ip6tables-save")
            .collect();
        if let Some(name) = lines.first().and_then(|l| l.strip_prefix("* ")) {
            let name = name.to_string();
            lines.push("COMMIT");
            tables.insert(name, lines.join("\n"));
        }
    }
    tables
}

/// The plugin's derivation for one case: config JSON → pod → Istio's redirect → our config →
/// our iptables restore document (IPv4 pod, as in Istio's test).
fn render(conf: &Value) -> String {
    let conf = parse_netconf(conf.to_string().as_bytes()).expect("plugin config");
    let pod = pod_info(&conf);
    let redirect = Redirect::from_pod(&pod).expect("annotations accepted");
    let raw = redirect
        .validated(false, &NodeEnv::default())
        .expect("config valid");
    let cfg = raw.parse().expect("config parses");
    let docs = iptables::render(&cfg);
    assert!(docs.v6.is_none());
    docs.v4
}

#[test]
fn cni_sidecar_goldens() {
    let Some(shared) = shared_dir() else {
        return;
    };
    let dir = shared.join("conformance/istio/cni-sidecar");
    let cases = cases();
    // A golden counts as matched when every case that references it matches.
    let mut goldens: BTreeMap<&str, bool> = BTreeMap::new();
    for c in &cases {
        let path = dir.join(format!("{}.txt.golden", c.golden));
        let want = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        let got = render(&c.conf);
        let (w, g) = (get_rules(&want), get_rules(&got));
        let ok = !g.is_empty() && w == g;
        if !ok {
            eprintln!(
                "--- cni-sidecar/{} ({}.txt.golden): MISMATCH",
                c.name, c.golden
            );
            for table in w
                .keys()
                .chain(g.keys())
                .collect::<std::collections::BTreeSet<_>>()
            {
                let (a, b) = (w.get(table), g.get(table));
                if a != b {
                    eprintln!(
                        "  table {table}:\n  want:\n{}\n  got:\n{}",
                        a.map_or("<none>", String::as_str),
                        b.map_or("<none>", String::as_str)
                    );
                }
            }
        }
        *goldens.entry(c.golden).or_insert(true) &= ok;
    }
    let referenced: Vec<&str> = goldens.keys().copied().collect();
    // Every golden in the folder is either referenced or the known orphan.
    for entry in std::fs::read_dir(&dir).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(stem) = name.strip_suffix(".txt.golden") else {
            continue;
        };
        if stem == "status-ports" {
            println!("skipping status-ports.txt.golden: not referenced by Istio's test (orphan)");
            continue;
        }
        assert!(referenced.contains(&stem), "unexpected golden {name}");
    }
    let ok = goldens.values().filter(|m| **m).count();
    println!(
        "cni goldens: {ok}/{} ({} cases)",
        goldens.len(),
        cases.len()
    );
    assert_eq!(goldens.len(), 8, "expected 8 referenced goldens");
    assert_eq!(
        ok,
        goldens.len(),
        "not every golden matched (see diffs above)"
    );
}
