//! The nftables backend: one `nft -f -` transaction identical to istio-nftables' output.
//!
//! Generation is two steps, as in `istio-iptables --native-nftables`: the rule-group functions
//! (`rules.rs`, with [`render`]) fill an ordered model (three `inet` tables, each with its
//! declarable chains and its rules in generation order), and [`model::serialise`] turns that
//! into the transaction text. This file names the tables and chains the rules fill.
//! Byte-for-byte equality with Istio's goldens depends on the order of the groups, on the exact
//! token order inside each rule (`counter` sits right before the verdict), and on which rules are
//! IPv6-only, so all three are kept as Istio has them — including its quirks (e.g. only the uid
//! rule excludes port 53 from the loopback redirect when DNS capture is on, not the gid rule).

mod model;

use model::{ChainDecl, Hook, Table};

const NAT: &str = "istio-proxy-nat";
const MANGLE: &str = "istio-proxy-mangle";
const RAW: &str = "istio-proxy-raw";

/// The tables this backend owns, in the order they are emitted.
pub const TABLES: &[&str] = &[NAT, MANGLE, RAW];

// Chain names (lower-case, unlike iptables, as istio-nftables names them).
const PREROUTING: &str = "prerouting";
const OUTPUT: &str = "output";
const INBOUND: &str = "istio-inbound";
const REDIRECT: &str = "istio-redirect";
const IN_REDIRECT: &str = "istio-in-redirect";
const ISTIO_OUTPUT: &str = "istio-output";
const OUTPUT_DNS: &str = "istio-output-dns";
const DIVERT: &str = "istio-divert";
const TPROXY: &str = "istio-tproxy";
const DROP: &str = "istio-drop";

const fn base(
    name: &'static str,
    kind: &'static str,
    hook: &'static str,
    priority: i32,
) -> ChainDecl {
    ChainDecl {
        name,
        hook: Some(Hook {
            kind,
            hook,
            priority,
        }),
    }
}

const fn regular(name: &'static str) -> ChainDecl {
    ChainDecl { name, hook: None }
}

// Declarable chains per table, in declaration order. Priorities are the numeric values of
// dstnat (-100), mangle (-150) and raw (-300); mangle output is a `route` chain so that a mark
// set there re-routes the packet (needed for TPROXY policy routing).
const NAT_CHAINS: &[ChainDecl] = &[
    base(PREROUTING, "nat", "prerouting", -100),
    base(OUTPUT, "nat", "output", -100),
    regular(INBOUND),
    regular(REDIRECT),
    regular(IN_REDIRECT),
    regular(ISTIO_OUTPUT),
    regular(OUTPUT_DNS),
];
const MANGLE_CHAINS: &[ChainDecl] = &[
    base(PREROUTING, "filter", "prerouting", -150),
    base(OUTPUT, "route", "output", -150),
    regular(DIVERT),
    regular(TPROXY),
    regular(INBOUND),
    regular(DROP),
];
const RAW_CHAINS: &[ChainDecl] = &[
    base(PREROUTING, "filter", "prerouting", -300),
    base(OUTPUT, "filter", "output", -300),
    regular(INBOUND),
    regular(OUTPUT_DNS),
];

/// The three tables being filled, plus the IPv6 switch that gates the v6-only rules.
struct Builder {
    nat: Table,
    mangle: Table,
    raw: Table,
    ipv6: bool,
}

impl Builder {
    fn new(ipv6: bool) -> Self {
        Self {
            nat: Table::new(NAT, NAT_CHAINS),
            mangle: Table::new(MANGLE, MANGLE_CHAINS),
            raw: Table::new(RAW, RAW_CHAINS),
            ipv6,
        }
    }

    fn tables(self) -> [Table; 3] {
        [self.nat, self.mangle, self.raw]
    }
}

/// Runs `table.append(..)` / `table.insert(..)` only when IPv6 is on (Istio's `*V6RuleIfSupported`).
macro_rules! v6 {
    ($b:expr, $table:ident . $op:ident ( $($arg:expr),* $(,)? )) => {
        if $b.ipv6 {
            $b.$table.$op($($arg),*);
        }
    };
}

// After `v6!`, which it uses.
mod rules;

pub use rules::render;

#[cfg(test)]
mod tests {
    use interceptor_common::config::Config;

    use super::*;
    use crate::backend::netfilter::test_configs::everything;

    /// Every chain a rule uses or jumps to is declared in that table before any rule line.
    #[test]
    fn chains_are_declared_before_use_and_jump_targets_exist() {
        for c in [Config::default(), everything()] {
            let out = render(&c);
            let mut declared: Vec<(String, String)> = Vec::new();
            for line in out.lines() {
                let w: Vec<&str> = line.split_whitespace().collect();
                match (w[0], w[1]) {
                    ("add", "chain") => declared.push((w[3].into(), w[4].into())),
                    ("add" | "insert", "rule") => {
                        let (table, chain) = (w[3].to_string(), w[4].to_string());
                        assert!(declared.contains(&(table.clone(), chain)), "{line}");
                        if let Some(i) = w.iter().position(|t| *t == "jump") {
                            let target = w[i + 1].to_string();
                            assert!(declared.contains(&(table, target)), "{line}");
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    /// Tables come in TABLES order, each opened by `add` then `flush`, with no v6 rule when IPv6 is off.
    #[test]
    fn tables_in_order_and_ipv6_gated() {
        let mut c = everything();
        let out = render(&c);
        let opened: Vec<&str> = out
            .lines()
            .filter_map(|l| l.strip_prefix("add table inet "))
            .collect();
        assert_eq!(opened, TABLES);
        for t in TABLES {
            assert!(out.contains(&format!("add table inet {t}\nflush table inet {t}\n")));
        }
        assert!(out.contains(" ip6 "));

        c.enable_ipv6 = false;
        let out = render(&c);
        assert!(!out.contains("ip6"), "{out}");
    }

    /// With nothing to capture, only the nat table exists (its always-present rules).
    #[test]
    fn defaults_touch_only_nat() {
        let out = render(&Config::default());
        assert!(out.contains(&format!("add table inet {NAT}")));
        assert!(!out.contains(MANGLE));
        assert!(!out.contains(RAW));
        assert!(!out.contains("insert rule"));
    }
}
