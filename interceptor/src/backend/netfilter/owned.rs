//! Which part of an iptables ruleset is ours, and the restore documents that remove it or put
//! it back without touching anything else.
//!
//! Ours is exactly: the chains the iptables emitter may create ([`OWNED_CHAINS`], by exact
//! name — a user's `ISTIO_FOO` or `MY_ISTIO_X` is not ours), their rules, the rules of the
//! builtin chains that jump into them, and the builtin-chain rules the wanted config adds
//! (`-c`/`-k` name no chain of ours). Everything else in the netns belongs to someone else
//! (kube-proxy, a CNI, the user) and may change while we work: removal and rollback are
//! `--noflush` documents that name only our rules, never a whole-table restore.

use std::collections::BTreeMap;

use crate::backend::iptables::OWNED_CHAINS;

/// `-A` lines and `:CHAIN` declarations per table from an iptables-save dump (counters dropped).
pub fn parse_save(dump: &str) -> BTreeMap<String, Vec<String>> {
    let mut tables: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut table = String::new();
    for line in dump.lines() {
        if let Some(t) = line.strip_prefix('*') {
            table = t.trim().to_string();
            tables.entry(table.clone()).or_default();
        } else if let Some(decl) = line.strip_prefix(':') {
            let name = decl.split_whitespace().next().unwrap_or("");
            tables
                .entry(table.clone())
                .or_default()
                .push(format!(":{name}"));
        } else if line.starts_with("-A ") {
            tables
                .entry(table.clone())
                .or_default()
                .push(line.trim().to_string());
        }
    }
    tables
}

pub fn is_builtin(chain: &str) -> bool {
    matches!(
        chain,
        "PREROUTING" | "INPUT" | "FORWARD" | "OUTPUT" | "POSTROUTING"
    )
}

fn is_owned_chain(chain: &str) -> bool {
    OWNED_CHAINS.contains(&chain)
}

/// The chain an `-A CHAIN …` line is in.
fn chain_of(line: &str) -> Option<&str> {
    line.strip_prefix("-A ")?.split_whitespace().next()
}

/// The chain a rule jumps or goes to (`-j X`, `--jump X`, `-g X`, `--goto X`), if any.
fn jump_target(line: &str) -> Option<&str> {
    let mut words = line.split_whitespace();
    while let Some(w) = words.next() {
        if matches!(w, "-j" | "--jump" | "-g" | "--goto") {
            return words.next();
        }
    }
    None
}

/// Whether a line of [`parse_save`]'s output is ours; `ours` are the builtin-chain rules the
/// wanted config adds.
pub fn is_ours(line: &str, ours: &[String]) -> bool {
    if let Some(name) = line.strip_prefix(':') {
        return is_owned_chain(name);
    }
    match chain_of(line) {
        Some(c) if is_owned_chain(c) => true,
        Some(c) if is_builtin(c) => {
            jump_target(line).is_some_and(is_owned_chain) || ours.iter().any(|o| o == line)
        }
        _ => false,
    }
}

/// The lines of one table that are ours, in dump order.
pub fn owned_lines(lines: &[String], ours: &[String]) -> Vec<String> {
    lines.iter().filter(|l| is_ours(l, ours)).cloned().collect()
}

/// A restore document deleting our builtin-chain rules, then flushing and deleting our chains.
pub fn cleanup_doc(owned: &BTreeMap<String, Vec<String>>) -> String {
    let mut out = String::new();
    for (table, lines) in owned {
        if lines.is_empty() {
            continue;
        }
        let chains: Vec<&str> = lines
            .iter()
            .filter_map(|l| l.strip_prefix(':'))
            .filter(|c| is_owned_chain(c))
            .collect();
        out.push_str(&format!("*{table}\n"));
        for l in lines {
            if let Some(rest) = l.strip_prefix("-A ") {
                if chain_of(l).is_some_and(is_builtin) {
                    out.push_str(&format!("-D {rest}\n"));
                }
            }
        }
        for c in &chains {
            out.push_str(&format!("-F {c}\n"));
        }
        for c in &chains {
            out.push_str(&format!("-X {c}\n"));
        }
        out.push_str("COMMIT\n");
    }
    out
}

/// A restore document that puts our part of each table back as it was in `before`, given the
/// tables as they are `now`, leaving every other chain and rule as it is now (a rule another
/// program added meanwhile stays). Our builtin-chain rules go back to their earlier positions
/// among the others. Empty when our part is unchanged.
pub fn rollback_doc(
    before: &BTreeMap<String, Vec<String>>,
    now: &BTreeMap<String, Vec<String>>,
    ours: &[String],
) -> String {
    let none: Vec<String> = Vec::new();
    let mut tables: Vec<&String> = before.keys().chain(now.keys()).collect();
    tables.sort();
    tables.dedup();
    let mut out = String::new();
    for table in tables {
        let was = before.get(table).unwrap_or(&none);
        let is = now.get(table).unwrap_or(&none);
        if owned_lines(was, ours) == owned_lines(is, ours) {
            continue;
        }
        let declared = |lines: &[String]| -> Vec<String> {
            lines
                .iter()
                .filter_map(|l| l.strip_prefix(':'))
                .filter(|c| is_owned_chain(c))
                .map(str::to_string)
                .collect()
        };
        let (was_chains, is_chains) = (declared(was), declared(is));
        out.push_str(&format!("*{table}\n"));
        // Declaring a chain creates it, or under --noflush flushes it.
        for c in &was_chains {
            out.push_str(&format!(":{c} - [0:0]\n"));
        }
        for l in is.iter().filter(|l| is_ours(l, ours)) {
            if chain_of(l).is_some_and(is_builtin) {
                out.push_str(&format!("-D {}\n", &l[3..]));
            }
        }
        let gone: Vec<&String> = is_chains
            .iter()
            .filter(|c| !was_chains.contains(c))
            .collect();
        for c in &gone {
            out.push_str(&format!("-F {c}\n"));
        }
        for c in &gone {
            out.push_str(&format!("-X {c}\n"));
        }
        for l in was
            .iter()
            .filter(|l| chain_of(l).is_some_and(is_owned_chain))
        {
            out.push_str(&format!("{l}\n"));
        }
        // Our builtin-chain rules at their earlier positions: with ours deleted, the chain
        // holds the others' rules; inserting ours in ascending position rebuilds the earlier
        // order exactly when the others did not change, and near it when they did.
        let mut position: BTreeMap<&str, usize> = BTreeMap::new();
        let mut inserted: BTreeMap<&str, usize> = BTreeMap::new();
        for l in was {
            let Some(c) = chain_of(l).filter(|c| is_builtin(c)) else {
                continue;
            };
            let n = position.entry(c).or_default();
            *n += 1;
            if !is_ours(l, ours) {
                continue;
            }
            let others_now = is
                .iter()
                .filter(|x| chain_of(x) == Some(c) && !is_ours(x, ours))
                .count();
            let done = inserted.entry(c).or_default();
            let at = (*n).min(others_now + *done + 1);
            *done += 1;
            let rest = l[3..].split_once(' ').map_or("", |(_, r)| r);
            out.push_str(&format!("-I {c} {at} {rest}\n"));
        }
        out.push_str("COMMIT\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(lines: &[&str]) -> BTreeMap<String, Vec<String>> {
        BTreeMap::from([(
            "nat".to_string(),
            lines.iter().map(|l| l.to_string()).collect(),
        )])
    }

    #[test]
    fn only_our_exact_chains_and_jumps_into_them_are_ours() {
        let ours = vec!["-A PREROUTING -i eth9 -j RETURN".to_string()];
        for l in [
            ":ISTIO_OUTPUT",
            "-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN",
            "-A OUTPUT -j ISTIO_OUTPUT",
            "-A PREROUTING -p tcp -j ISTIO_INBOUND",
            "-A PREROUTING -p tcp --goto ISTIO_INBOUND",
            "-A PREROUTING -i eth9 -j RETURN",
        ] {
            assert!(is_ours(l, &ours), "{l}");
        }
        for l in [
            ":ISTIO_FOO",
            ":MY_ISTIO_X",
            ":ISTIO_OUTPUT_X",
            "-A ISTIO_FOO -j RETURN",
            "-A MY_ISTIO_X -j RETURN",
            "-A OUTPUT -j ISTIO_FOO",
            "-A OUTPUT -j MY_ISTIO_X",
            "-A OUTPUT -m comment --comment ISTIO_OUTPUT -j KUBE-SERVICES",
            "-A MY_CHAIN -j ISTIO_OUTPUT",
            "-A PREROUTING -i eth8 -j RETURN",
        ] {
            assert!(!is_ours(l, &ours), "{l}");
        }
    }

    #[test]
    fn cleanup_names_only_ours() {
        let t = table(&[
            ":ISTIO_FOO",
            ":ISTIO_OUTPUT",
            "-A OUTPUT -j ISTIO_FOO",
            "-A OUTPUT -j ISTIO_OUTPUT",
            "-A ISTIO_FOO -j RETURN",
            "-A ISTIO_OUTPUT -j RETURN",
        ]);
        let owned = BTreeMap::from([("nat".to_string(), owned_lines(&t["nat"], &[]))]);
        assert_eq!(
            cleanup_doc(&owned),
            "*nat\n-D OUTPUT -j ISTIO_OUTPUT\n-F ISTIO_OUTPUT\n-X ISTIO_OUTPUT\nCOMMIT\n"
        );
    }

    #[test]
    fn rollback_puts_ours_back_and_names_nothing_else() {
        let before = table(&[
            ":ISTIO_OUTPUT",
            ":ISTIO_REDIRECT",
            ":KUBE-SERVICES",
            "-A OUTPUT -j KUBE-SERVICES",
            "-A OUTPUT -j ISTIO_OUTPUT",
            "-A ISTIO_OUTPUT -j ISTIO_REDIRECT",
            "-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
        ]);
        // Meanwhile: our apply half done (a new chain, a changed rule, an extra jump), and
        // someone else added a chain and a rule of their own.
        let now = table(&[
            ":ISTIO_OUTPUT",
            ":ISTIO_REDIRECT",
            ":ISTIO_DROP",
            ":KUBE-SERVICES",
            ":KUBE-NEW",
            "-A OUTPUT -j KUBE-NEW",
            "-A OUTPUT -j KUBE-SERVICES",
            "-A OUTPUT -j ISTIO_OUTPUT",
            "-A OUTPUT -j ISTIO_DROP",
            "-A ISTIO_OUTPUT -d 10.0.0.0/8 -j RETURN",
            "-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
            "-A KUBE-NEW -j RETURN",
        ]);
        let doc = rollback_doc(&before, &now, &[]);
        assert_eq!(
            doc,
            "*nat\n:ISTIO_OUTPUT - [0:0]\n:ISTIO_REDIRECT - [0:0]\n\
             -D OUTPUT -j ISTIO_OUTPUT\n-D OUTPUT -j ISTIO_DROP\n\
             -F ISTIO_DROP\n-X ISTIO_DROP\n\
             -A ISTIO_OUTPUT -j ISTIO_REDIRECT\n\
             -A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001\n\
             -I OUTPUT 2 -j ISTIO_OUTPUT\nCOMMIT\n"
        );
        assert!(!doc.contains("KUBE"), "{doc}");
        // Unchanged ours: nothing to do, whatever the others did.
        assert!(!rollback_doc(&before, &table(&[":KUBE-X"]), &[]).is_empty());
        let mut same = before.clone();
        same.get_mut("nat")
            .unwrap()
            .push("-A OUTPUT -j KUBE-X".into());
        assert_eq!(rollback_doc(&before, &same, &[]), "");
    }

    #[test]
    fn rollback_positions_are_clamped_to_the_chain_now() {
        let before = table(&[
            "-A PREROUTING -j A",
            "-A PREROUTING -j B",
            "-A PREROUTING -j ISTIO_INBOUND",
            ":ISTIO_INBOUND",
        ]);
        // The others' rules went away meanwhile: position 3 does not exist any more.
        let now = table(&[]);
        let doc = rollback_doc(&before, &now, &[]);
        assert!(doc.contains("-I PREROUTING 1 -j ISTIO_INBOUND\n"), "{doc}");
    }
}
