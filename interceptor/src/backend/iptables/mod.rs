//! The iptables backend: restore documents identical to istio-iptables' output.
//!
//! Generation is two steps, as in istio-iptables: [`rules`] builds the ordered rule list of one
//! address family from the config, and [`restore_doc`] serialises such a list into an
//! `iptables-restore --noflush` document ([`render`]: both families). This file is the
//! vocabulary (chains, tables, rules) and the serialisation; `rules.rs` builds on it. Byte-for-byte equality with Istio's goldens depends on
//! both the order of the rule groups (`rules.rs`) and the exact parameter spelling inside each rule
//! (`--to-ports` vs `--to-port`, `-p` before or after `-d`, ...), so both are kept exactly as
//! Istio has them, quirks included.

use std::collections::{BTreeMap, HashSet};
use std::fmt;

mod rules;

pub use rules::{render, rules};

/// Inbound entry chain (nat for REDIRECT, mangle for TPROXY; raw for DNS conntrack zones).
pub const ISTIO_INBOUND: &str = "ISTIO_INBOUND";
/// Redirects outbound traffic to the proxy's outbound port.
pub const ISTIO_REDIRECT: &str = "ISTIO_REDIRECT";
/// Redirects inbound traffic to the proxy's inbound capture port.
pub const ISTIO_IN_REDIRECT: &str = "ISTIO_IN_REDIRECT";
/// Outbound decision chain, jumped to from nat OUTPUT.
pub const ISTIO_OUTPUT: &str = "ISTIO_OUTPUT";
/// DNS capture (nat) and DNS conntrack zones (raw).
pub const ISTIO_OUTPUT_DNS: &str = "ISTIO_OUTPUT_DNS";
/// TPROXY: marks packets of established inbound connections.
pub const ISTIO_DIVERT: &str = "ISTIO_DIVERT";
/// TPROXY: hands new inbound connections to the proxy.
pub const ISTIO_TPROXY: &str = "ISTIO_TPROXY";
/// Drops conntrack-INVALID packets.
pub const ISTIO_DROP: &str = "ISTIO_DROP";

/// Every chain this backend may create, in any table or family.
pub const OWNED_CHAINS: &[&str] = &[
    ISTIO_INBOUND,
    ISTIO_REDIRECT,
    ISTIO_IN_REDIRECT,
    ISTIO_OUTPUT,
    ISTIO_OUTPUT_DNS,
    ISTIO_DIVERT,
    ISTIO_TPROXY,
    ISTIO_DROP,
];

/// Names that are never declared with `-N`: the kernel's built-in chains and the built-in
/// verdicts (Istio's `BuiltInChainsAndTargetsMap`; a trailing `-j RETURN` must not look like a
/// jump to an undeclared chain).
pub const BUILTIN_CHAINS_AND_TARGETS: &[&str] = &[
    "INPUT",
    "OUTPUT",
    "FORWARD",
    "PREROUTING",
    "POSTROUTING",
    "ACCEPT",
    "RETURN",
    "DROP",
];

/// Whether `name` is a built-in chain or verdict rather than a chain to declare.
pub fn is_builtin(name: &str) -> bool {
    BUILTIN_CHAINS_AND_TARGETS.contains(&name)
}

/// A netfilter table. The declaration order is the order tables appear in a restore document
/// (Istio sorts table names alphabetically).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Table {
    Filter,
    Mangle,
    Nat,
    Raw,
}

impl Table {
    pub fn name(self) -> &'static str {
        match self {
            Table::Filter => "filter",
            Table::Mangle => "mangle",
            Table::Nat => "nat",
            Table::Raw => "raw",
        }
    }
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How a rule is added to its chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Position {
    /// `-A CHAIN`
    Append,
    /// `-I CHAIN N` (1-based, evaluated when the restore document is applied).
    Insert(u32),
}

/// One rule as istio-iptables generates it: where it goes, and its match/target parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub table: Table,
    pub chain: &'static str,
    pub position: Position,
    pub params: Vec<String>,
}

impl Rule {
    /// The chain this rule jumps to when `-j X` ends it (a target with options, such as
    /// `-j REDIRECT --to-ports 15001`, is not a jump), built-in verdicts included.
    pub fn jump_target(&self) -> Option<&str> {
        match self.params.as_slice() {
            [.., j, target] if j == "-j" => Some(target),
            _ => None,
        }
    }
}

/// The rule's line in a restore document, e.g. `-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN`.
impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.position {
            Position::Append => write!(f, "-A {}", self.chain)?,
            Position::Insert(n) => write!(f, "-I {} {n}", self.chain)?,
        }
        for p in &self.params {
            write!(f, " {p}")?;
        }
        Ok(())
    }
}

/// The `iptables-restore --noflush` inputs for one config: IPv4 always, IPv6 when enabled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreDocs {
    pub v4: String,
    pub v6: Option<String>,
}

/// Serialises rules as Istio's builder does: per table (sorted, empty ones omitted) a
/// `* table` line, `-N` for each non-built-in chain in first-appearance order, then `-N` for
/// jump targets not yet declared, then the rules in generation order, then `COMMIT`.
pub fn restore_doc(rules: &[Rule]) -> String {
    let mut tables: BTreeMap<Table, Vec<String>> = BTreeMap::new();
    let mut declared: HashSet<(Table, &str)> = HashSet::new();
    let mut declare = |tables: &mut BTreeMap<Table, Vec<String>>, table: Table, chain| {
        if !is_builtin(chain) && declared.insert((table, chain)) {
            tables.entry(table).or_default().push(format!("-N {chain}"));
        }
    };
    for r in rules {
        declare(&mut tables, r.table, r.chain);
    }
    // A chain that is only jumped to must still exist, or the restore fails.
    for r in rules {
        if let Some(target) = r.jump_target() {
            declare(&mut tables, r.table, target);
        }
    }
    for r in rules {
        tables.entry(r.table).or_default().push(r.to_string());
    }

    let mut doc = String::new();
    for (table, lines) in &tables {
        doc.push_str(&format!("* {table}\n"));
        for line in lines {
            doc.push_str(line);
            doc.push('\n');
        }
        doc.push_str("COMMIT\n");
    }
    doc
}

#[cfg(test)]
mod tests {
    use interceptor_common::plan::Family;

    use super::*;
    use crate::backend::netfilter::test_configs::{config, everything};

    /// Splits a restore document into (table, lines between `* table` and `COMMIT`).
    fn blocks(doc: &str) -> Vec<(String, Vec<String>)> {
        let mut out = Vec::new();
        let mut lines = doc.lines();
        while let Some(header) = lines.next() {
            let table = header.strip_prefix("* ").expect("table header").to_string();
            let body: Vec<String> = lines
                .by_ref()
                .take_while(|l| *l != "COMMIT")
                .map(str::to_string)
                .collect();
            out.push((table, body));
        }
        out
    }

    #[test]
    fn v6_document_exactly_when_ipv6_enabled() {
        assert_eq!(render(&config(|_| {})).v6, None);
        let docs = render(&config(|c| c.enable_ipv6 = true));
        let v6 = docs.v6.expect("v6 document");
        assert!(v6.contains("::1/128") && !v6.contains("127.0.0.1/32"));
        assert!(!docs.v4.contains("::1/128"));
    }

    #[test]
    fn declarations_precede_rules_and_cover_jump_targets() {
        let docs = render(&everything());
        for doc in [docs.v4.as_str(), docs.v6.as_deref().unwrap()] {
            assert!(doc.ends_with("COMMIT\n"));
            for (table, body) in blocks(doc) {
                let first_rule = body.iter().position(|l| !l.starts_with("-N ")).unwrap();
                assert!(
                    body[first_rule..].iter().all(|l| !l.starts_with("-N ")),
                    "{table}: -N after a rule"
                );
                let declared: Vec<&str> = body[..first_rule].iter().map(|l| &l[3..]).collect();
                for line in &body[first_rule..] {
                    let words: Vec<&str> = line.split(' ').collect();
                    assert!(words[0] == "-A" || words[0] == "-I", "{line}");
                    for chain in [
                        Some(words[1]),
                        words
                            .windows(2)
                            .last()
                            .and_then(|w| (w[0] == "-j").then_some(w[1])),
                    ]
                    .into_iter()
                    .flatten()
                    {
                        assert!(
                            is_builtin(chain) || declared.contains(&chain),
                            "{table}: {chain} used but not declared"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn tables_are_sorted_and_never_empty() {
        let docs = render(&everything());
        let tables: Vec<String> = blocks(&docs.v4).into_iter().map(|(t, _)| t).collect();
        assert_eq!(tables, ["mangle", "nat", "raw"]);
        assert!(blocks(&render(&config(|_| {})).v4)
            .iter()
            .all(|(t, body)| t == "nat" && !body.is_empty()));
    }

    #[test]
    fn owned_chains_cover_every_created_chain() {
        for family in [Family::V4, Family::V6] {
            for rule in rules(&everything(), family) {
                assert!(
                    is_builtin(rule.chain) || OWNED_CHAINS.contains(&rule.chain),
                    "{}",
                    rule.chain
                );
            }
        }
    }

    #[test]
    fn cidrs_go_to_their_own_family() {
        let cfg = everything();
        let v4: Vec<String> = rules(&cfg, Family::V4)
            .iter()
            .map(Rule::to_string)
            .collect();
        let v6: Vec<String> = rules(&cfg, Family::V6)
            .iter()
            .map(Rule::to_string)
            .collect();
        assert!(v4.iter().any(|l| l.contains("10.0.0.0/8")));
        assert!(!v4.iter().any(|l| l.contains("fd00")));
        assert!(v6.iter().any(|l| l.contains("fd00::/8")));
        assert!(!v6.iter().any(|l| l.contains("10.0.0.0/8")));
    }

    #[test]
    fn insert_rules_render_their_position() {
        let rule = Rule {
            table: Table::Nat,
            chain: "PREROUTING",
            position: Position::Insert(1),
            params: ["-i", "eth1", "-j", "RETURN"].map(String::from).to_vec(),
        };
        assert_eq!(rule.to_string(), "-I PREROUTING 1 -i eth1 -j RETURN");
        assert_eq!(rule.jump_target(), Some("RETURN"));
    }
}
