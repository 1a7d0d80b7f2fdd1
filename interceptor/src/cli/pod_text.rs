//! `pod list` and `pod show` in words: a table of the pods, and one pod's `key: value` lines
//! with its config under the flags that set it.

use interceptor_common::config::RawConfig;

use crate::daemon::protocol::{PodStatus, UnreadableRecord};

/// A registered config, one line per setting, named by its istio-iptables flag (or env
/// variable) and valued as given.
pub fn config_words(c: &RawConfig) -> Vec<(&'static str, String)> {
    let s = |v: &String| {
        if v.is_empty() {
            "(empty)".to_string()
        } else {
            v.clone()
        }
    };
    let b = |v: bool| v.to_string();
    vec![
        ("-p/--envoy-port", s(&c.proxy_port)),
        ("-z/--inbound-capture-port", s(&c.inbound_capture_port)),
        ("-e/--inbound-tunnel-port", s(&c.inbound_tunnel_port)),
        ("-u/--proxy-uid", s(&c.proxy_uid)),
        ("-g/--proxy-gid", s(&c.proxy_gid)),
        (
            "-m/--istio-inbound-interception-mode",
            s(&c.inbound_interception_mode),
        ),
        ("-b/--istio-inbound-ports", s(&c.inbound_ports_include)),
        (
            "-d/--istio-local-exclude-ports",
            s(&c.inbound_ports_exclude),
        ),
        ("-c/--istio-exclude-interfaces", s(&c.exclude_interfaces)),
        ("-i/--istio-service-cidr", s(&c.outbound_ip_ranges_include)),
        (
            "-x/--istio-service-exclude-cidr",
            s(&c.outbound_ip_ranges_exclude),
        ),
        ("-q/--istio-outbound-ports", s(&c.outbound_ports_include)),
        (
            "-o/--istio-local-outbound-ports-exclude",
            s(&c.outbound_ports_exclude),
        ),
        (
            "-k/--kube-virt-interfaces",
            s(&c.reroute_virtual_interfaces),
        ),
        ("-t/--istio-inbound-tproxy-mark", s(&c.inbound_tproxy_mark)),
        (
            "-r/--istio-inbound-tproxy-route-table",
            s(&c.inbound_tproxy_route_table),
        ),
        ("--redirect-dns", b(c.redirect_dns)),
        ("--capture-all-dns", b(c.capture_all_dns)),
        ("--drop-invalid", b(c.drop_invalid)),
        ("ISTIO_OUTBOUND_OWNER_GROUPS", s(&c.owner_groups_include)),
        (
            "ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE",
            s(&c.owner_groups_exclude),
        ),
        (
            "ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR",
            s(&c.host_ipv4_loopback_cidr),
        ),
        ("--ipv6", b(c.enable_ipv6)),
        ("--dns-servers", s(&c.dns_servers)),
        ("--bind-guard-ports", s(&c.bind_guard_ports)),
        ("--accelerate", b(c.accelerate)),
    ]
}

/// `pod list`: a table of the pods, then the records that cannot be read.
pub fn list_text(pods: &[PodStatus], unreadable: &[UnreadableRecord]) -> String {
    let mut out = format!(
        "{:<40} {:<9} {:>8} {:<30} why\n",
        "netns", "backend", "pod_id", "identity"
    );
    for p in pods {
        let id = p
            .identity
            .as_ref()
            .map(|i| format!("{}/{}", i.namespace, i.name))
            .unwrap_or_else(|| "-".into());
        let why = match (&p.removal_error, p.removing) {
            (Some(e), _) => format!("removal failed, retried on the next remove or restart: {e}"),
            (None, true) => "being removed".to_string(),
            (None, false) => p.why.clone(),
        };
        out.push_str(&format!(
            "{:<40} {:<9} {:>8} {:<30} {}\n",
            p.netns.display(),
            p.backend.words(),
            p.pod_id,
            id,
            why
        ));
    }
    for u in unreadable {
        let netns = u.netns.as_ref().map_or_else(
            || "an unknown netns".to_string(),
            |n| n.display().to_string(),
        );
        out.push_str(&format!(
            "unreadable record {} (pod {netns}): {}; its interception is kept until the pod is \
             removed or the file deleted\n",
            u.file.display(),
            u.error
        ));
    }
    out
}

/// `pod show -o text`: one `key: value` line each, in words.
pub fn pod_text(p: &PodStatus) -> String {
    let mut out = format!(
        "netns: {}\nbackend: {} ({})\npod id: {}\n",
        p.netns.display(),
        p.backend.words(),
        p.why,
        p.pod_id
    );
    if let Some(i) = &p.identity {
        out.push_str(&format!("pod: {}/{}\n", i.namespace, i.name));
    }
    if !p.ips.is_empty() {
        let ips: Vec<String> = p.ips.iter().map(ToString::to_string).collect();
        out.push_str(&format!("ips: {}\n", ips.join(", ")));
    }
    match &p.userns {
        Some(u) => out.push_str(&format!(
            "user namespace: own (uid_map {}; gid_map {})\nproxy uid: {}\nproxy gid: {}\n",
            u.uid_map.render(),
            u.gid_map.render(),
            u.proxy_uid,
            u.proxy_gid
        )),
        None => out.push_str("user namespace: the node's\n"),
    }
    out.push_str(&format!("registered in: {} µs\n", p.add_micros));
    out.push_str("config:\n");
    for (flag, value) in config_words(&p.config) {
        out.push_str(&format!("  {flag}: {value}\n"));
    }
    match (&p.removal_error, p.removing) {
        (Some(e), _) => out.push_str(&format!(
            "removal: failed, retried on the next remove or restart: {e}\n"
        )),
        (None, true) => out.push_str("removal: in progress\n"),
        (None, false) => {}
    }
    out
}
