//! istio-iptables' rule groups for one address family, in its emission order, each reading
//! its switches and values from the config's `plan::Plan`.

use interceptor_common::config::{Config, OwnerGroups, PortSelection};
use interceptor_common::plan::{Family, Owner, Plan, DNS_PROXY_PORT, OUTBOUND_MARK};

use super::{
    restore_doc, Position, RestoreDocs, Rule, Table, ISTIO_DIVERT, ISTIO_DROP, ISTIO_INBOUND,
    ISTIO_IN_REDIRECT, ISTIO_OUTPUT, ISTIO_OUTPUT_DNS, ISTIO_REDIRECT, ISTIO_TPROXY,
};

/// Renders the restore documents istio-iptables would feed to `iptables-restore --noflush`.
pub fn render(cfg: &Config) -> RestoreDocs {
    RestoreDocs {
        v4: restore_doc(&rules(cfg, Family::V4)),
        v6: Plan::new(cfg)
            .ipv6
            .then(|| restore_doc(&rules(cfg, Family::V6))),
    }
}

/// The ordered rules istio-iptables generates for one family. This does not look at
/// `cfg.enable_ipv6`: [`render`] only asks for IPv6 rules when IPv6 is enabled.
pub fn rules(cfg: &Config, family: Family) -> Vec<Rule> {
    let mut b = Builder {
        cfg,
        plan: Plan::new(cfg),
        family,
        rules: Vec::new(),
    };
    excluded_interfaces(&mut b);
    kube_virt_short_circuit(&mut b);
    drop_invalid(&mut b);
    base_chains(&mut b);
    inbound_capture(&mut b);
    outbound_entry(&mut b);
    proxy_owner_rules(&mut b);
    owner_groups(&mut b);
    if b.plan.dns {
        dns_redirect(&mut b);
        dns_conntrack_zones(&mut b);
    }
    outbound_destinations(&mut b);
    if b.plan.tproxy {
        tproxy_marks(&mut b);
    }
    b.rules
}

/// Accumulates one family's rules, with the family-specific values the rule groups need.
///
/// Parameters are given as the rule reads in a restore document and split on whitespace:
/// validated config values (ports, ids, CIDRs, addresses, interface and group names) never
/// contain any.
struct Builder<'a> {
    cfg: &'a Config,
    plan: Plan<'a>,
    family: Family,
    rules: Vec<Rule>,
}

impl Builder<'_> {
    fn push(&mut self, table: Table, chain: &'static str, position: Position, params: &str) {
        self.rules.push(Rule {
            table,
            chain,
            position,
            params: params.split_whitespace().map(str::to_string).collect(),
        });
    }

    fn append(&mut self, table: Table, chain: &'static str, params: &str) {
        self.push(table, chain, Position::Append, params);
    }

    fn insert(&mut self, table: Table, chain: &'static str, position: u32, params: &str) {
        self.push(table, chain, Position::Insert(position), params);
    }

    /// This family's host loopback range that app-to-app traffic uses.
    fn loopback(&self) -> String {
        self.plan.loopback(self.family).to_string()
    }

    /// This family's source address of Envoy's inbound passthrough.
    fn passthrough_source(&self) -> String {
        self.plan.passthrough(self.family).to_string()
    }

    /// This family's DNS servers as host routes, spelled as the user gave them.
    fn dns_servers(&self) -> Vec<String> {
        self.plan.dns_servers(self.family)
    }

    /// The proxy's identities as `-m owner` match options, uids before gids.
    fn proxy_owners(&self) -> Vec<(&'static str, u32)> {
        self.plan
            .proxy_owners()
            .map(|(owner, id)| (owner_flag(owner), id))
            .collect()
    }
}

/// The `-m owner` option naming a proxy identity.
fn owner_flag(owner: Owner) -> &'static str {
    match owner {
        Owner::Uid => "--uid-owner",
        Owner::Gid => "--gid-owner",
    }
}

/// An interface name as one restore-document token. Always quoted: names come from pod
/// annotations, and the config only admits names without `"`, `\\`, whitespace or control
/// characters (`interface_name_problem`), so nothing inside the quotes can end the token.
/// iptables-restore strips the quotes; a trailing `+` stays iptables' prefix wildcard.
fn quoted(nic: &str) -> String {
    format!("\"{nic}\"")
}

/// Traffic on excluded NICs bypasses everything; in TPROXY mode mangle needs the same bypass.
fn excluded_interfaces(b: &mut Builder) {
    let cfg = b.cfg;
    for nic in &cfg.exclude_interfaces {
        b.append(
            Table::Nat,
            "PREROUTING",
            &format!("-i {q} -j RETURN", q = quoted(nic)),
        );
        b.append(
            Table::Nat,
            "OUTPUT",
            &format!("-o {q} -j RETURN", q = quoted(nic)),
        );
    }
    if b.plan.tproxy {
        for nic in &cfg.exclude_interfaces {
            b.append(
                Table::Mangle,
                "PREROUTING",
                &format!("-i {q} -j RETURN", q = quoted(nic)),
            );
            b.append(
                Table::Mangle,
                "OUTPUT",
                &format!("-o {q} -j RETURN", q = quoted(nic)),
            );
        }
    }
}

/// Inbound traffic from kube-virt interfaces is not inbound capture (it may be re-routed as
/// outbound later, by `outbound_destinations`).
fn kube_virt_short_circuit(b: &mut Builder) {
    let cfg = b.cfg;
    for nic in &cfg.reroute_virtual_interfaces {
        b.insert(
            Table::Nat,
            "PREROUTING",
            1,
            &format!("-i {q} -j RETURN", q = quoted(nic)),
        );
    }
}

/// Out-of-window packets are dropped rather than answered with a reset that kills the connection.
fn drop_invalid(b: &mut Builder) {
    if b.cfg.drop_invalid {
        b.append(
            Table::Mangle,
            "PREROUTING",
            &format!("-m conntrack --ctstate INVALID -j {ISTIO_DROP}"),
        );
        b.append(Table::Mangle, ISTIO_DROP, "-j DROP");
    }
}

/// Chains every configuration has: the HBONE tunnel port is never captured, and the two
/// redirect targets.
fn base_chains(b: &mut Builder) {
    let cfg = b.cfg;
    let (tunnel, proxy, capture) = (
        cfg.inbound_tunnel_port,
        cfg.proxy_port,
        cfg.inbound_capture_port,
    );
    b.append(
        Table::Nat,
        ISTIO_INBOUND,
        &format!("-p tcp --dport {tunnel} -j RETURN"),
    );
    b.append(
        Table::Nat,
        ISTIO_REDIRECT,
        &format!("-p tcp -j REDIRECT --to-ports {proxy}"),
    );
    b.append(
        Table::Nat,
        ISTIO_IN_REDIRECT,
        &format!("-p tcp -j REDIRECT --to-ports {capture}"),
    );
}

/// Inbound capture of the selected ports (none when the selection is empty). TPROXY works in
/// mangle and keeps established connections on the already-accepted socket (ISTIO_DIVERT).
fn inbound_capture(b: &mut Builder) {
    let cfg = b.cfg;
    if cfg.inbound_ports_include.is_empty() {
        return;
    }
    let tproxy = b.plan.tproxy;
    let table = if tproxy {
        let mark = cfg.inbound_tproxy_mark;
        let capture = cfg.inbound_capture_port;
        let lo = b.loopback();
        b.append(
            Table::Mangle,
            ISTIO_DIVERT,
            &format!("-j MARK --set-mark {mark}"),
        );
        b.append(Table::Mangle, ISTIO_DIVERT, "-j ACCEPT");
        b.append(
            Table::Mangle,
            ISTIO_TPROXY,
            &format!(
                "! -d {lo} -p tcp -j TPROXY --tproxy-mark {mark}/0xffffffff --on-port {capture}"
            ),
        );
        Table::Mangle
    } else {
        Table::Nat
    };
    b.append(table, "PREROUTING", &format!("-p tcp -j {ISTIO_INBOUND}"));

    // Each listed port (or, for `*`, all remaining traffic) gets the same capture rules.
    let capture_rules = |b: &mut Builder, dport: &str| {
        if tproxy {
            b.append(
                Table::Mangle,
                ISTIO_INBOUND,
                &format!(
                    "-p tcp {dport} -m conntrack --ctstate RELATED,ESTABLISHED -j {ISTIO_DIVERT}"
                ),
            );
            b.append(
                Table::Mangle,
                ISTIO_INBOUND,
                &format!("-p tcp {dport} -j {ISTIO_TPROXY}"),
            );
        } else {
            b.append(
                Table::Nat,
                ISTIO_INBOUND,
                &format!("-p tcp {dport} -j {ISTIO_IN_REDIRECT}"),
            );
        }
    };
    match &cfg.inbound_ports_include {
        PortSelection::All => {
            // Exclusions only mean something against the wildcard.
            for port in &cfg.inbound_ports_exclude {
                b.append(
                    table,
                    ISTIO_INBOUND,
                    &format!("-p tcp --dport {port} -j RETURN"),
                );
            }
            capture_rules(b, "");
        }
        PortSelection::List(ports) => {
            for port in ports {
                capture_rules(b, &format!("--dport {port}"));
            }
        }
    }
}

/// All locally generated traffic enters ISTIO_OUTPUT; excluded destination ports leave first,
/// before the proxy-to-self redirects below could catch them.
fn outbound_entry(b: &mut Builder) {
    let cfg = b.cfg;
    b.append(Table::Nat, "OUTPUT", &format!("-j {ISTIO_OUTPUT}"));
    for port in &cfg.outbound_ports_exclude {
        for proto in ["tcp", "udp"] {
            b.append(
                Table::Nat,
                ISTIO_OUTPUT,
                &format!("-p {proto} --dport {port} -j RETURN"),
            );
        }
    }
}

/// Keeps the proxy's own traffic out of the outbound capture, except its calls to this pod's
/// own address over lo, which must go through inbound handling.
fn proxy_owner_rules(b: &mut Builder) {
    let lo = b.loopback();
    // Envoy's inbound passthrough connects to the app from this address.
    let passthrough = b.passthrough_source();
    b.append(
        Table::Nat,
        ISTIO_OUTPUT,
        &format!("-o lo -s {passthrough} -j RETURN"),
    );

    for (owner, id) in b.plan.proxy_owners() {
        // With DNS capture, the agent's DNS to a local resolver must not loop through inbound
        // (uids only, as in Istio).
        let ports = match b.plan.self_call_excluded_ports(owner).as_slice() {
            [port] => format!("! --dport {port}"),
            ports => {
                let list: Vec<String> = ports.iter().map(u16::to_string).collect();
                format!("-m multiport ! --dports {}", list.join(","))
            }
        };
        let owner = owner_flag(owner);
        let to_own_pod = format!("-o lo ! -d {lo} -p tcp {ports}");
        b.append(
            Table::Nat,
            ISTIO_OUTPUT,
            &format!("{to_own_pod} -m owner {owner} {id} -j {ISTIO_IN_REDIRECT}"),
        );

        // Apps talking to each other over lo are not captured, unless the user explicitly
        // included a loopback range. TCP to port 53 stays capturable for a local resolver.
        if !b.plan.include_has_loopback {
            let not_dns = if b.plan.dns {
                "-p tcp ! --dport 53"
            } else {
                ""
            };
            b.append(
                Table::Nat,
                ISTIO_OUTPUT,
                &format!("-o lo {not_dns} -m owner ! {owner} {id} -j RETURN"),
            );
        }

        // Anything else the proxy sends is never redirected back into itself.
        b.append(
            Table::Nat,
            ISTIO_OUTPUT,
            &format!("-m owner {owner} {id} -j RETURN"),
        );
    }
}

/// Traffic of groups that are not captured leaves ISTIO_OUTPUT early.
fn owner_groups(b: &mut Builder) {
    let cfg = b.cfg;
    match &cfg.owner_groups {
        OwnerGroups::All => {}
        OwnerGroups::Exclude(groups) => {
            for group in groups {
                b.append(
                    Table::Nat,
                    ISTIO_OUTPUT,
                    &format!("-m owner --gid-owner {group} -j RETURN"),
                );
            }
        }
        // One rule matching "none of these groups" (an empty list would return everything).
        OwnerGroups::Include(groups) => {
            let none_of: String = groups
                .iter()
                .map(|group| format!("-m owner ! --gid-owner {group} "))
                .collect();
            b.append(Table::Nat, ISTIO_OUTPUT, &format!("{none_of}-j RETURN"));
        }
    }
}

/// DNS to the resolv.conf servers (or to anything, with capture-all) goes to the agent's DNS
/// proxy. The nat jump is per family so a family without servers gets no empty jump.
fn dns_redirect(b: &mut Builder) {
    let cfg = b.cfg;
    let servers = b.dns_servers();
    // raw OUTPUT always jumps: the conntrack zone rules for the proxy's ids are unconditional.
    b.append(Table::Raw, "OUTPUT", &format!("-j {ISTIO_OUTPUT_DNS}"));
    if cfg.capture_all_dns || !servers.is_empty() {
        b.append(Table::Nat, ISTIO_OUTPUT, &format!("-j {ISTIO_OUTPUT_DNS}"));
    }
    // Only the configured servers unless capturing all: a local DNS forwarder talking upstream
    // must not loop back into the agent. (Istio spells the tcp target `--to-ports` and the udp
    // one `--to-port`.)
    let destinations: Vec<String> = if cfg.capture_all_dns {
        vec![String::new()]
    } else {
        servers.iter().map(|s| format!("-d {s}")).collect()
    };
    for (proto, to_ports) in [("tcp", "--to-ports"), ("udp", "--to-port")] {
        for dest in &destinations {
            b.append(
                Table::Nat,
                ISTIO_OUTPUT_DNS,
                &format!("-p {proto} --dport 53 {dest} -j REDIRECT {to_ports} {DNS_PROXY_PORT}"),
            );
        }
    }
}

/// Splits UDP DNS into two conntrack zones (proxy <-> upstream resolvers in zone 1, apps <->
/// proxy in zone 2) so the two legs of one query cannot collide in the conntrack table.
fn dns_conntrack_zones(b: &mut Builder) {
    for (owner, id) in b.proxy_owners() {
        b.append(
            Table::Raw,
            ISTIO_OUTPUT_DNS,
            &format!("-p udp --dport 53 -m owner {owner} {id} -j CT --zone 1"),
        );
        b.append(
            Table::Raw,
            ISTIO_OUTPUT_DNS,
            &format!("-p udp --sport {DNS_PROXY_PORT} -m owner {owner} {id} -j CT --zone 2"),
        );
    }

    // The raw PREROUTING jump is only added when ISTIO_INBOUND gets rules, so that no jump to
    // an empty chain is left behind.
    let servers: Vec<(String, String)> = if b.cfg.capture_all_dns {
        vec![(String::new(), String::new())]
    } else {
        b.dns_servers()
            .iter()
            .map(|s| (format!("-d {s}"), format!("-s {s}")))
            .collect()
    };
    if !servers.is_empty() {
        b.append(Table::Raw, "PREROUTING", &format!("-j {ISTIO_INBOUND}"));
    }
    for (to_server, from_server) in &servers {
        b.append(
            Table::Raw,
            ISTIO_OUTPUT_DNS,
            &format!("-p udp --dport 53 {to_server} -j CT --zone 2"),
        );
        b.append(
            Table::Raw,
            ISTIO_INBOUND,
            &format!("-p udp --sport 53 {from_server} -j CT --zone 1"),
        );
    }
}

/// Outbound destination rules, in the order that makes exclusions win: localhost, excluded
/// CIDRs, then included ports and CIDRs (with their kube-virt counterparts in PREROUTING).
fn outbound_destinations(b: &mut Builder) {
    let cfg = b.cfg;
    // Envoy-aware apps and container-to-container traffic use localhost explicitly.
    let lo = b.loopback();
    b.append(Table::Nat, ISTIO_OUTPUT, &format!("-d {lo} -j RETURN"));

    for net in b.plan.excluded_nets(b.family) {
        b.append(Table::Nat, ISTIO_OUTPUT, &format!("-d {net} -j RETURN"));
    }

    for port in &cfg.outbound_ports_include {
        b.append(
            Table::Nat,
            ISTIO_OUTPUT,
            &format!("-p tcp --dport {port} -j {ISTIO_REDIRECT}"),
        );
    }

    match b.plan.included_nets(b.family) {
        None => {
            b.append(Table::Nat, ISTIO_OUTPUT, &format!("-j {ISTIO_REDIRECT}"));
            for nic in &cfg.reroute_virtual_interfaces {
                b.insert(
                    Table::Nat,
                    "PREROUTING",
                    1,
                    &format!("-i {q} -j {ISTIO_REDIRECT}", q = quoted(nic)),
                );
            }
        }
        Some(nets) => {
            for net in nets {
                for nic in &cfg.reroute_virtual_interfaces {
                    b.insert(
                        Table::Nat,
                        "PREROUTING",
                        1,
                        &format!("-i {q} -d {net} -j {ISTIO_REDIRECT}", q = quoted(nic)),
                    );
                }
                b.append(
                    Table::Nat,
                    ISTIO_OUTPUT,
                    &format!("-d {net} -j {ISTIO_REDIRECT}"),
                );
            }
        }
    }
}

/// TPROXY bookkeeping in mangle: keep the original-source mark on the connection, mark the
/// proxy's own calls to this pod so they are not captured again, and (inserted at the head of
/// ISTIO_INBOUND) let marked, passthrough and app-over-lo traffic bypass the TPROXY capture.
fn tproxy_marks(b: &mut Builder) {
    let mark = b.cfg.inbound_tproxy_mark;
    let lo = b.loopback();
    b.append(
        Table::Mangle,
        "PREROUTING",
        &format!("-p tcp -m mark --mark {mark} -j CONNMARK --save-mark"),
    );
    b.append(
        Table::Mangle,
        "OUTPUT",
        &format!("-p tcp -o lo -m mark --mark {mark} -j RETURN"),
    );
    for (owner, id) in b.proxy_owners() {
        b.append(
            Table::Mangle,
            "OUTPUT",
            &format!(
                "! -d {lo} -p tcp -o lo -m owner {owner} {id} -j MARK --set-mark {OUTBOUND_MARK}"
            ),
        );
    }
    b.append(
        Table::Mangle,
        "OUTPUT",
        &format!("-p tcp -m connmark --mark {mark} -j CONNMARK --restore-mark"),
    );
    let passthrough = b.passthrough_source();
    b.insert(
        Table::Mangle,
        ISTIO_INBOUND,
        1,
        &format!("-p tcp -m mark --mark {mark} -j RETURN"),
    );
    b.insert(
        Table::Mangle,
        ISTIO_INBOUND,
        2,
        &format!("-p tcp -s {passthrough} -i lo -j RETURN"),
    );
    b.insert(
        Table::Mangle,
        ISTIO_INBOUND,
        3,
        &format!("-p tcp -i lo -m mark ! --mark {OUTBOUND_MARK} -j RETURN"),
    );
}
