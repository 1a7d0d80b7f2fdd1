//! The in-memory transaction: tables → declared chains → rules in generation order, and its
//! serialisation into `nft -f -` input.
//!
//! Rules are kept per table in the order the generator produced them (not grouped per chain),
//! because the output interleaves chains exactly in that order. An insert keeps its requested
//! index; whether it stays an insert is decided when serialising, since that depends on how many
//! rules the chain holds at that point of the transaction.

use std::fmt::Write;

/// What makes a chain a base chain: `{ type <kind> hook <hook> priority <priority> ; }`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hook {
    pub kind: &'static str,
    pub hook: &'static str,
    pub priority: i32,
}

/// A chain a table may declare; `hook` is `None` for a regular (jump-target) chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChainDecl {
    pub name: &'static str,
    pub hook: Option<Hook>,
}

/// One rule: its chain, the index it asks to be inserted at (`None` = append), and its body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub chain: &'static str,
    pub index: Option<usize>,
    pub body: String,
}

/// One `inet` table: the chains it may declare (in declaration order) and its rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    pub name: &'static str,
    pub chains: &'static [ChainDecl],
    pub rules: Vec<Rule>,
}

/// The serialised form of one rule after insert resolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Add,
    Insert(usize),
}

impl Table {
    pub fn new(name: &'static str, chains: &'static [ChainDecl]) -> Self {
        Self {
            name,
            chains,
            rules: Vec::new(),
        }
    }

    fn push(&mut self, chain: &'static str, index: Option<usize>, body: String) {
        debug_assert!(
            self.chains.iter().any(|c| c.name == chain),
            "chain {chain} is not declarable in {}",
            self.name
        );
        self.rules.push(Rule { chain, index, body });
    }

    pub fn append(&mut self, chain: &'static str, body: String) {
        self.push(chain, None, body);
    }

    pub fn insert(&mut self, chain: &'static str, index: usize, body: String) {
        self.push(chain, Some(index), body);
    }

    /// Only chains that received rules are declared (an empty declared chain is never created).
    pub fn used_chains(&self) -> impl Iterator<Item = &ChainDecl> {
        self.chains
            .iter()
            .filter(|c| self.rules.iter().any(|r| r.chain == c.name))
    }

    /// Resolves each rule to add or insert. nft refuses `insert ... index N` into an empty chain
    /// or past its end, so such inserts become appends (as istio-nftables does); the count is of
    /// rules placed earlier in this same transaction, the table having just been flushed.
    pub fn ops(&self) -> Vec<(Op, &Rule)> {
        let mut counts: Vec<(&str, usize)> = Vec::new();
        self.rules
            .iter()
            .map(|rule| {
                let count = match counts.iter_mut().find(|(c, _)| *c == rule.chain) {
                    Some((_, n)) => n,
                    None => {
                        counts.push((rule.chain, 0));
                        &mut counts.last_mut().expect("just pushed").1
                    }
                };
                let op = match rule.index {
                    Some(i) if i < *count => Op::Insert(i),
                    _ => Op::Add,
                };
                *count += 1;
                (op, rule)
            })
            .collect()
    }

    /// `add table`, `flush table`, the used chains, then the rules; nothing for a ruleless table.
    pub fn write_to(&self, out: &mut String) {
        if self.rules.is_empty() {
            return;
        }
        let t = self.name;
        // `add` makes the table exist; `flush` empties it so re-running replaces our rules.
        let _ = writeln!(out, "add table inet {t}");
        let _ = writeln!(out, "flush table inet {t}");
        for c in self.used_chains() {
            match c.hook {
                Some(h) => {
                    let _ = writeln!(
                        out,
                        "add chain inet {t} {} {{ type {} hook {} priority {} ; }}",
                        c.name, h.kind, h.hook, h.priority
                    );
                }
                None => {
                    let _ = writeln!(out, "add chain inet {t} {}", c.name);
                }
            }
        }
        for (op, r) in self.ops() {
            let _ = match op {
                Op::Add => writeln!(out, "add rule inet {t} {} {}", r.chain, r.body),
                Op::Insert(i) => {
                    writeln!(out, "insert rule inet {t} {} index {i} {}", r.chain, r.body)
                }
            };
        }
    }
}

/// Serialises the tables in the given order into one transaction.
pub fn serialise(tables: &[Table]) -> String {
    let mut out = String::new();
    for t in tables {
        t.write_to(&mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHAINS: &[ChainDecl] = &[
        ChainDecl {
            name: "prerouting",
            hook: Some(Hook {
                kind: "nat",
                hook: "prerouting",
                priority: -100,
            }),
        },
        ChainDecl {
            name: "unused",
            hook: None,
        },
        ChainDecl {
            name: "x",
            hook: None,
        },
    ];

    #[test]
    fn inserts_into_empty_or_short_chains_become_appends() {
        let mut t = Table::new("t", CHAINS);
        t.insert("x", 0, "a".into()); // empty chain: append
        t.insert("x", 0, "b".into()); // one rule: a real insert at the head
        t.insert("x", 5, "c".into()); // past the end: append
        let ops: Vec<Op> = t.ops().into_iter().map(|(op, _)| op).collect();
        assert_eq!(ops, vec![Op::Add, Op::Insert(0), Op::Add]);
    }

    #[test]
    fn ruleless_tables_and_chains_are_not_declared() {
        let empty = Table::new("empty", CHAINS);
        let mut t = Table::new("t", CHAINS);
        t.append("x", "counter return".into());
        let out = serialise(&[empty, t]);
        assert!(!out.contains("empty"));
        assert!(!out.contains("unused"));
        assert!(!out.contains("prerouting"));
        assert_eq!(
            out,
            "add table inet t\nflush table inet t\nadd chain inet t x\nadd rule inet t x counter return\n"
        );
    }
}
