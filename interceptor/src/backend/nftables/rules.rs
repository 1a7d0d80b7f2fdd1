//! istio-nftables' rule groups in its emission order, filling the three tables of the
//! transaction; each reads its switches and values from the config's `plan::Plan`.

use interceptor_common::config::{Config, OwnerGroups, PortSelection};
use interceptor_common::plan::{Family, Owner, Plan, DNS_PROXY_PORT, OUTBOUND_MARK};

use super::model::serialise;
use super::{
    Builder, DIVERT, DROP, INBOUND, IN_REDIRECT, ISTIO_OUTPUT, OUTPUT, OUTPUT_DNS, PREROUTING,
    REDIRECT, TPROXY,
};

/// Renders the nft transaction istio-iptables --native-nftables would apply.
pub fn render(cfg: &Config) -> String {
    serialise(&build(cfg).tables())
}

/// The loopback CIDR the app uses to reach itself, and `::1/128`.
fn lo4(p: &Plan) -> String {
    p.loopback(Family::V4).to_string()
}
fn lo6(p: &Plan) -> String {
    p.loopback(Family::V6).to_string()
}

/// The nft meta key matching a proxy identity.
fn owner_key(owner: Owner) -> &'static str {
    match owner {
        Owner::Uid => "skuid",
        Owner::Gid => "skgid",
    }
}

/// Builds the model: the rule groups in istio-nftables' order.
pub(super) fn build(cfg: &Config) -> Builder {
    let plan = Plan::new(cfg);
    let mut b = Builder::new(plan.ipv6);
    exclude_interfaces(&mut b, &plan);
    kube_virt_short_circuit(&mut b, &plan);
    drop_invalid(&mut b, &plan);
    redirect_chains(&mut b, &plan);
    inbound_capture(&mut b, &plan);
    b.nat.append(OUTPUT, format!("counter jump {ISTIO_OUTPUT}"));
    outbound_ports_exclude(&mut b, &plan);
    passthrough_return(&mut b, &plan);
    for (owner, id) in plan.proxy_owners() {
        proxy_owner(&mut b, &plan, owner, id);
    }
    owner_groups(&mut b, &cfg.owner_groups);
    if plan.dns {
        dns_redirect(&mut b, &plan);
        dns_conntrack_zones(&mut b, &plan);
    }
    loopback_and_excluded_cidrs(&mut b, &plan);
    outbound_ports_include(&mut b, &plan);
    outbound_cidrs_include(&mut b, &plan);
    if plan.tproxy {
        tproxy_marks(&mut b, &plan);
    }
    b
}

/// An interface name as an nft string. Always quoted: names come from pod annotations, and
/// the config only admits names without `"`, `\\`, whitespace or control characters
/// (`interface_name_problem`), so nothing inside the quotes can end the string. The iptables
/// prefix wildcard (a trailing `+`) becomes nft's trailing `*`; a name that really ends in `*`
/// gets it escaped (`\*`), the only place nft gives `*` a meaning.
fn ifname(nic: &str) -> String {
    match nic.strip_suffix('+') {
        Some(stem) => format!("\"{stem}*\""),
        None => match nic.strip_suffix('*') {
            Some(stem) => format!("\"{stem}\\*\""),
            None => format!("\"{nic}\""),
        },
    }
}

/// Excluded NICs skip nat entirely in both directions (and mangle too in TPROXY mode).
fn exclude_interfaces(b: &mut Builder, p: &Plan) {
    for nic in &p.cfg.exclude_interfaces {
        b.nat.append(
            PREROUTING,
            format!("iifname {q} counter return", q = ifname(nic)),
        );
        b.nat.append(
            OUTPUT,
            format!("oifname {q} counter return", q = ifname(nic)),
        );
    }
    if p.tproxy {
        for nic in &p.cfg.exclude_interfaces {
            b.mangle.append(
                PREROUTING,
                format!("iifname {q} counter return", q = ifname(nic)),
            );
            b.mangle.append(
                OUTPUT,
                format!("oifname {q} counter return", q = ifname(nic)),
            );
        }
    }
}

/// Traffic arriving on kube-virt interfaces is not inbound traffic; put the return at the head.
fn kube_virt_short_circuit(b: &mut Builder, p: &Plan) {
    for nic in &p.cfg.reroute_virtual_interfaces {
        b.nat.insert(
            PREROUTING,
            0,
            format!("iifname {q} counter return", q = ifname(nic)),
        );
    }
}

/// Drop conntrack-INVALID TCP (out-of-window packets) instead of letting them reset connections.
fn drop_invalid(b: &mut Builder, p: &Plan) {
    if p.cfg.drop_invalid {
        b.mangle.append(
            PREROUTING,
            format!("meta l4proto tcp ct state invalid counter jump {DROP}"),
        );
        b.mangle.append(DROP, "counter drop".into());
    }
}

/// Always present: the HBONE tunnel port bypasses inbound capture, and the two redirect chains.
fn redirect_chains(b: &mut Builder, p: &Plan) {
    let c = p.cfg;
    b.nat.append(
        INBOUND,
        format!(
            "meta l4proto tcp tcp dport {} counter return",
            c.inbound_tunnel_port
        ),
    );
    b.nat.append(
        REDIRECT,
        format!("meta l4proto tcp counter redirect to :{}", c.proxy_port),
    );
    b.nat.append(
        IN_REDIRECT,
        format!(
            "meta l4proto tcp counter redirect to :{}",
            c.inbound_capture_port
        ),
    );
}

/// Inbound capture (`-b`): nothing when empty; nat redirect, or mangle TPROXY.
fn inbound_capture(b: &mut Builder, p: &Plan) {
    if p.cfg.inbound_ports_include.is_empty() {
        return;
    }
    if p.tproxy {
        inbound_tproxy(b, p);
    } else {
        inbound_redirect(b, p);
    }
}

/// REDIRECT mode: prerouting → istio-inbound → istio-in-redirect for the captured ports.
fn inbound_redirect(b: &mut Builder, p: &Plan) {
    b.nat.append(
        PREROUTING,
        format!("meta l4proto tcp counter jump {INBOUND}"),
    );
    match &p.cfg.inbound_ports_include {
        PortSelection::All => {
            // Excluded ports (-d) only matter against the wildcard.
            for port in &p.cfg.inbound_ports_exclude {
                b.nat.append(
                    INBOUND,
                    format!("meta l4proto tcp tcp dport {port} counter return"),
                );
            }
            b.nat.append(
                INBOUND,
                format!("meta l4proto tcp counter jump {IN_REDIRECT}"),
            );
        }
        PortSelection::List(ports) => {
            for port in ports {
                b.nat.append(
                    INBOUND,
                    format!("meta l4proto tcp tcp dport {port} counter jump {IN_REDIRECT}"),
                );
            }
        }
    }
}

/// TPROXY mode: established flows are marked (divert) so policy routing delivers them locally;
/// new ones are handed to the proxy's capture port by tproxy.
fn inbound_tproxy(b: &mut Builder, p: &Plan) {
    let c = p.cfg;
    let mark = c.inbound_tproxy_mark;
    let port = c.inbound_capture_port;
    b.mangle
        .append(DIVERT, format!("counter meta mark set {mark}"));
    b.mangle.append(DIVERT, "counter accept".into());
    b.mangle.append(
        TPROXY,
        format!(
            "meta l4proto tcp ip daddr != {} tproxy ip to :{port} meta mark set {mark} counter accept",
            lo4(p)
        ),
    );
    v6!(b, mangle.append(
        TPROXY,
        format!(
            "meta l4proto tcp ip6 daddr != {} tproxy ip6 to :{port} meta mark set {mark} counter accept",
            lo6(p)
        ),
    ));
    b.mangle.append(
        PREROUTING,
        format!("meta l4proto tcp counter jump {INBOUND}"),
    );
    match &c.inbound_ports_include {
        PortSelection::All => {
            for port in &c.inbound_ports_exclude {
                b.mangle.append(
                    INBOUND,
                    format!("meta l4proto tcp tcp dport {port} counter return"),
                );
            }
            b.mangle.append(
                INBOUND,
                format!("meta l4proto tcp ct state related,established counter jump {DIVERT}"),
            );
            b.mangle
                .append(INBOUND, format!("meta l4proto tcp counter jump {TPROXY}"));
        }
        PortSelection::List(ports) => {
            for port in ports {
                b.mangle.append(
                    INBOUND,
                    format!(
                        "meta l4proto tcp ct state related,established tcp dport {port} counter jump {DIVERT}"
                    ),
                );
                b.mangle.append(
                    INBOUND,
                    format!("meta l4proto tcp tcp dport {port} counter jump {TPROXY}"),
                );
            }
        }
    }
}

/// Outbound ports never captured (`-o`), for TCP and UDP, before anything else in istio-output.
fn outbound_ports_exclude(b: &mut Builder, p: &Plan) {
    for port in &p.cfg.outbound_ports_exclude {
        b.nat
            .append(ISTIO_OUTPUT, format!("tcp dport {port} counter return"));
        b.nat
            .append(ISTIO_OUTPUT, format!("udp dport {port} counter return"));
    }
}

/// Envoy's inbound passthrough connects to the app from 127.0.0.6 (::6): never recapture it.
fn passthrough_return(b: &mut Builder, p: &Plan) {
    b.nat.append(
        ISTIO_OUTPUT,
        format!(
            "oifname lo ip saddr {} counter return",
            p.passthrough(Family::V4)
        ),
    );
    v6!(
        b,
        nat.append(
            ISTIO_OUTPUT,
            format!(
                "oifname lo ip6 saddr {} counter return",
                p.passthrough(Family::V6)
            ),
        )
    );
}

/// Per proxy uid (skuid) or gid (skgid): the proxy calling its own pod IP goes through
/// inbound handling; other sockets on lo are app-to-app and returned (unless loopback is an
/// include CIDR); the proxy's own remaining traffic is never recaptured.
fn proxy_owner(b: &mut Builder, p: &Plan, owner: Owner, id: u32) {
    let key = owner_key(owner);
    // Istio excludes DNS from the self-call redirect only for uids, not gids.
    let dports = match p.self_call_excluded_ports(owner).as_slice() {
        [port] => port.to_string(),
        ports => {
            let list: Vec<String> = ports.iter().map(u16::to_string).collect();
            format!("{{ {} }}", list.join(", "))
        }
    };
    b.nat.append(
        ISTIO_OUTPUT,
        format!(
            "oifname lo meta l4proto tcp ip daddr != {} tcp dport != {dports} {key} {id} counter jump {IN_REDIRECT}",
            lo4(p)
        ),
    );
    v6!(b, nat.append(
        ISTIO_OUTPUT,
        format!(
            "oifname lo meta l4proto tcp ip6 daddr != {} tcp dport != {dports} {key} {id} counter jump {IN_REDIRECT}",
            lo6(p)
        ),
    ));
    if !p.include_has_loopback {
        // With DNS capture, TCP to a DNS server on localhost must still reach the DNS rules.
        let body = if p.dns {
            format!("oifname lo meta l4proto tcp tcp dport != 53 {key} != {id} counter return")
        } else {
            format!("oifname lo {key} != {id} counter return")
        };
        b.nat.append(ISTIO_OUTPUT, body);
    }
    b.nat
        .append(ISTIO_OUTPUT, format!("{key} {id} counter return"));
}

/// Owner-group filter: return the traffic of groups that are not captured.
fn owner_groups(b: &mut Builder, groups: &OwnerGroups) {
    match groups {
        OwnerGroups::All => {}
        OwnerGroups::Exclude(gs) => {
            for g in gs {
                b.nat
                    .append(ISTIO_OUTPUT, format!("skgid {g} counter return"));
            }
        }
        OwnerGroups::Include(gs) => {
            // One rule: return when the group is none of the included ones.
            let mut body: String = gs.iter().map(|g| format!("skgid != {g} ")).collect();
            body.push_str("counter return");
            b.nat.append(ISTIO_OUTPUT, body);
        }
    }
}

/// DNS to port 53 (all of it, or only to the resolv.conf servers) goes to the agent's DNS proxy.
fn dns_redirect(b: &mut Builder, p: &Plan) {
    let c = p.cfg;
    b.raw.append(OUTPUT, format!("counter jump {OUTPUT_DNS}"));
    b.nat
        .append(ISTIO_OUTPUT, format!("counter jump {OUTPUT_DNS}"));
    if c.capture_all_dns {
        b.nat.append(
            OUTPUT_DNS,
            format!("meta l4proto tcp tcp dport 53 counter redirect to :{DNS_PROXY_PORT}"),
        );
        b.nat.append(
            OUTPUT_DNS,
            format!("udp dport 53 counter redirect to :{DNS_PROXY_PORT}"),
        );
        return;
    }
    for proto in ["tcp", "udp"] {
        for s in p.dns_servers(Family::V4) {
            b.nat.append(
                OUTPUT_DNS,
                format!("ip daddr {s} {proto} dport 53 counter redirect to :{DNS_PROXY_PORT}"),
            );
        }
        for s in p.dns_servers(Family::V6) {
            v6!(
                b,
                nat.append(
                    OUTPUT_DNS,
                    format!("ip6 daddr {s} {proto} dport 53 counter redirect to :{DNS_PROXY_PORT}"),
                )
            );
        }
    }
}

/// Splits UDP DNS into two conntrack zones (proxy↔upstream = 1, app↔proxy = 2) so the two legs
/// of a proxied query do not collide in conntrack.
fn dns_conntrack_zones(b: &mut Builder, p: &Plan) {
    let c = p.cfg;
    for (owner, id) in p.proxy_owners() {
        let key = owner_key(owner);
        b.raw.append(
            OUTPUT_DNS,
            format!("udp dport 53 meta {key} {id} counter ct zone set 1"),
        );
        b.raw.append(
            OUTPUT_DNS,
            format!("udp sport {DNS_PROXY_PORT} meta {key} {id} counter ct zone set 2"),
        );
    }
    if c.capture_all_dns {
        b.raw.append(PREROUTING, format!("counter jump {INBOUND}"));
        b.raw
            .append(OUTPUT_DNS, "udp dport 53 counter ct zone set 2".into());
        b.raw
            .append(INBOUND, "udp sport 53 counter ct zone set 1".into());
        return;
    }
    // Only jump to raw istio-inbound when it will hold rules (a v4 or v6 server exists).
    if p.has_dns_servers() {
        b.raw.append(PREROUTING, format!("counter jump {INBOUND}"));
    }
    for s in p.dns_servers(Family::V4) {
        b.raw.append(
            OUTPUT_DNS,
            format!("udp dport 53 ip daddr {s} counter ct zone set 2"),
        );
        b.raw.append(
            INBOUND,
            format!("udp sport 53 ip saddr {s} counter ct zone set 1"),
        );
    }
    for s in p.dns_servers(Family::V6) {
        v6!(
            b,
            raw.append(
                OUTPUT_DNS,
                format!("udp dport 53 ip6 daddr {s} counter ct zone set 2"),
            )
        );
        v6!(
            b,
            raw.append(
                INBOUND,
                format!("udp sport 53 ip6 saddr {s} counter ct zone set 1"),
            )
        );
    }
}

/// Explicit-localhost traffic is never captured; then the excluded CIDRs (`-x`), before any include.
fn loopback_and_excluded_cidrs(b: &mut Builder, p: &Plan) {
    b.nat
        .append(ISTIO_OUTPUT, format!("ip daddr {} counter return", lo4(p)));
    v6!(
        b,
        nat.append(ISTIO_OUTPUT, format!("ip6 daddr {} counter return", lo6(p)))
    );
    for net in p.excluded_nets(Family::V4) {
        b.nat
            .append(ISTIO_OUTPUT, format!("ip daddr {net} counter return"));
    }
    for net in p.excluded_nets(Family::V6) {
        v6!(
            b,
            nat.append(ISTIO_OUTPUT, format!("ip6 daddr {net} counter return"))
        );
    }
}

/// Outbound ports always captured (`-q`).
fn outbound_ports_include(b: &mut Builder, p: &Plan) {
    for port in &p.cfg.outbound_ports_include {
        b.nat.append(
            ISTIO_OUTPUT,
            format!("tcp dport {port} counter jump {REDIRECT}"),
        );
    }
}

/// Outbound CIDRs captured (`-i`); kube-virt interfaces get the same redirect at the head of
/// prerouting, since their traffic is really outbound.
fn outbound_cidrs_include(b: &mut Builder, p: &Plan) {
    let virt = &p.cfg.reroute_virtual_interfaces;
    match p.included_nets(Family::V4) {
        None => {
            b.nat
                .append(ISTIO_OUTPUT, format!("counter jump {REDIRECT}"));
            for nic in virt {
                b.nat.insert(
                    PREROUTING,
                    0,
                    format!("iifname {q} counter jump {REDIRECT}", q = ifname(nic)),
                );
            }
        }
        Some(v4) => {
            for net in v4 {
                for nic in virt {
                    b.nat.insert(
                        PREROUTING,
                        0,
                        format!(
                            "iifname {q} ip daddr {net} counter jump {REDIRECT}",
                            q = ifname(nic)
                        ),
                    );
                }
                b.nat.append(
                    ISTIO_OUTPUT,
                    format!("ip daddr {net} counter jump {REDIRECT}"),
                );
            }
            for net in p.included_nets(Family::V6).unwrap_or_default() {
                for nic in virt {
                    v6!(
                        b,
                        nat.insert(
                            PREROUTING,
                            0,
                            format!(
                                "iifname {q} ip6 daddr {net} counter jump {REDIRECT}",
                                q = ifname(nic)
                            ),
                        )
                    );
                }
                v6!(
                    b,
                    nat.append(
                        ISTIO_OUTPUT,
                        format!("ip6 daddr {net} counter jump {REDIRECT}"),
                    )
                );
            }
        }
    }
}

/// TPROXY marking in mangle: keep the original-src mark on the connection, mark Envoy's calls to
/// its own pod IP with 1338, restore the connection mark on the app's replies, and keep
/// istio-inbound from re-capturing marked, passthrough, or app-to-self traffic.
fn tproxy_marks(b: &mut Builder, p: &Plan) {
    let c = p.cfg;
    let mark = c.inbound_tproxy_mark;
    b.mangle.append(
        PREROUTING,
        format!("meta l4proto tcp mark {mark} counter ct mark set mark"),
    );
    b.mangle.append(
        OUTPUT,
        format!("oifname lo meta l4proto tcp mark {mark} counter return"),
    );
    for (owner, id) in p.proxy_owners() {
        let key = owner_key(owner);
        b.mangle.append(
            OUTPUT,
            format!(
                "oifname lo meta l4proto tcp ip daddr != {} {key} {id} counter meta mark set {OUTBOUND_MARK}",
                lo4(p)
            ),
        );
        v6!(b, mangle.append(
            OUTPUT,
            format!(
                "oifname lo meta l4proto tcp ip6 daddr != {} {key} {id} counter meta mark set {OUTBOUND_MARK}",
                lo6(p)
            ),
        ));
    }
    b.mangle.append(
        OUTPUT,
        format!("meta l4proto tcp ct mark {mark} counter meta mark set ct mark"),
    );
    b.mangle.insert(
        INBOUND,
        0,
        format!("meta l4proto tcp mark {mark} counter return"),
    );
    b.mangle.insert(
        INBOUND,
        1,
        format!(
            "iifname lo meta l4proto tcp ip saddr {} counter return",
            p.passthrough(Family::V4)
        ),
    );
    v6!(
        b,
        mangle.insert(
            INBOUND,
            1,
            format!(
                "iifname lo meta l4proto tcp ip6 saddr {} counter return",
                p.passthrough(Family::V6)
            ),
        )
    );
    b.mangle.insert(
        INBOUND,
        2,
        format!("iifname lo meta l4proto tcp mark != {OUTBOUND_MARK} counter return"),
    );
}
