//! Applying the iptables and nftables fallbacks inside a netns with istio-iptables' state
//! handling: nothing to do when identical, re-apply on drift only with --reconcile, --force-apply,
//! --cleanup-only.
//!
//! "Identical" is decided by applying the wanted rules in a private scratch netns and comparing
//! the tool's own listing of both, so no hand-written normaliser has to guess how
//! iptables-save or nft prints a rule.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use interceptor_common::config::Config;
use interceptor_common::plan::Family;

use super::exec::{self, in_scratch, run};
use super::{iptables, nftables};
use crate::model::IptablesFlavor;
use owned::{cleanup_doc, is_builtin, owned_lines, parse_save, rollback_doc};

mod owned;

/// What to do about existing rules.
#[derive(Clone, Copy, Debug, Default)]
pub struct Mode {
    pub reconcile: bool,
    pub force_apply: bool,
    pub cleanup_only: bool,
}

/// What happened, for the user.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Applied,
    AlreadyInPlace,
    Reconciled,
    Removed,
    NothingToRemove,
}

#[derive(Debug, PartialEq, Eq)]
enum State {
    Clean,
    Identical,
    Drifted,
}

// ---------------------------------------------------------------- iptables

/// The iptables binaries of one variant (`iptables-legacy`, `iptables-nft` or plain).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Binaries {
    pub suffix: &'static str,
}

impl Binaries {
    /// `iptables-save` → `iptables-nft-save` (the variant goes before the verb).
    fn name(&self, base: &str) -> String {
        match base.split_once('-') {
            Some((tool, verb)) => format!("{tool}{}-{verb}", self.suffix),
            None => format!("{base}{}", self.suffix),
        }
    }
}

/// Connections the pod's nat rules sent to the proxy, `(outbound, inbound)`, from the kernel's
/// own rule counters: nat sees only a connection's first packet, so packets = connections.
/// IPv4 and, where ip6tables holds our chains, IPv6 summed.
pub fn redirect_counters(netns: &Path) -> Result<(u64, u64)> {
    let bin = choose_binaries(Some(netns), None);
    let v4 = run(
        Some(netns),
        &bin.name("iptables-save"),
        &["-c", "-t", "nat"],
        None,
    )?;
    let (mut out, mut inb) = parse_redirect_counters(&v4);
    if let Ok(v6) = run(
        Some(netns),
        &bin.name("ip6tables-save"),
        &["-c", "-t", "nat"],
        None,
    ) {
        let (o, i) = parse_redirect_counters(&v6);
        out += o;
        inb += i;
    }
    Ok((out, inb))
}

/// The REDIRECT rules' packet counts in `iptables-save -c` output.
fn parse_redirect_counters(dump: &str) -> (u64, u64) {
    let (mut out, mut inb) = (0, 0);
    for line in dump.lines() {
        let Some((counts, rule)) = line.strip_prefix('[').and_then(|l| l.split_once("] ")) else {
            continue;
        };
        let Some(pkts) = counts.split(':').next().and_then(|p| p.parse::<u64>().ok()) else {
            continue;
        };
        if !rule.contains(" -j REDIRECT") {
            continue;
        }
        let chain = rule.strip_prefix("-A ").and_then(|r| r.split(' ').next());
        if chain == Some(iptables::ISTIO_REDIRECT) {
            out += pkts;
        } else if chain == Some(iptables::ISTIO_IN_REDIRECT) {
            inb += pkts;
        }
    }
    (out, inb)
}

/// Istio's binary choice: forced, else legacy if it already holds rules in the netns, else nft
/// if usable, else plain `iptables`.
pub fn choose_binaries(netns: Option<&Path>, forced: Option<IptablesFlavor>) -> Binaries {
    match forced {
        Some(IptablesFlavor::Legacy) => return Binaries { suffix: "-legacy" },
        Some(IptablesFlavor::Nft) => return Binaries { suffix: "-nft" },
        None => {}
    }
    if exec::available("iptables-legacy-save") {
        if let Ok(out) = run(netns, "iptables-legacy-save", &[], None) {
            if out.lines().any(|l| l.starts_with("-A ")) {
                return Binaries { suffix: "-legacy" };
            }
        }
    }
    if exec::available("iptables-nft-save") && run(netns, "iptables-nft-save", &[], None).is_ok() {
        return Binaries { suffix: "-nft" };
    }
    Binaries { suffix: "" }
}

/// One family's planned change: everything decided (and the wanted rules proven in a scratch
/// netns) before the pod's netns is touched.
struct Plan<'a> {
    netns: Option<&'a Path>,
    save: String,
    restore: String,
    doc: Option<&'a str>,
    state: State,
    /// Our lines per table now.
    owned: BTreeMap<String, Vec<String>>,
    /// The family's tables before any change: our part of them is put back if a step fails.
    before: BTreeMap<String, Vec<String>>,
    /// The builtin-chain rules the wanted config adds (ours though they name no chain of ours).
    ours: Vec<String>,
}

/// `iptables-restore --noflush` waiting for the xtables lock (iptables >= 1.6.2; iptables-nft
/// accepts and ignores it): without `-w` a legacy restore takes no lock at all and can commit
/// a table over another program's concurrent change.
fn restore_args() -> [String; 3] {
    ["--noflush".into(), "-w".into(), exec::xtables_wait()]
}

fn run_restore(netns: Option<&Path>, tool: &str, doc: &str) -> Result<String> {
    let args = restore_args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run(netns, tool, &args, Some(doc))
}

fn iptables_plan<'a>(
    netns: Option<&'a Path>,
    bin: &Binaries,
    v6: bool,
    config_doc: &'a str,
    mode: Mode,
) -> Result<Plan<'a>> {
    // The config's rules tell which builtin-chain rules are ours (`-c`/`-k` RETURNs name no
    // ISTIO_ chain), so they are rendered for a cleanup too; only applying them is skipped.
    let doc = (!mode.cleanup_only).then_some(config_doc);
    let (save, restore) = if v6 {
        (bin.name("ip6tables-save"), bin.name("ip6tables-restore"))
    } else {
        (bin.name("iptables-save"), bin.name("iptables-restore"))
    };
    let current = parse_save(&run(netns, &save, &[], None)?);
    // What the wanted rules look like once applied, as this very tool prints them.
    let wanted = {
        let (doc, save2, restore2) = (config_doc.to_string(), save.clone(), restore.clone());
        let dump = in_scratch(move || {
            run_restore(None, &restore2, &doc)?;
            run(None, &save2, &[], None)
        })
        .with_context(|| {
            format!("{restore} could not apply the generated rules in a scratch netns")
        })?;
        parse_save(&dump)
    };
    let ours_builtin: Vec<String> = wanted
        .values()
        .flatten()
        .filter(|l| l.split_whitespace().nth(1).is_some_and(is_builtin))
        .cloned()
        .collect();
    let (mut have_any, mut same) = (false, true);
    let mut owned: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut differ = Vec::new();
    for table in current.keys().chain(wanted.keys()) {
        let have = owned_lines(current.get(table).map_or(&[][..], |v| v), &ours_builtin);
        let want = owned_lines(wanted.get(table).map_or(&[][..], |v| v), &ours_builtin);
        have_any |= !have.is_empty();
        if have != want {
            same = false;
            // Name the drift: what is there that should not be, and what is missing.
            for l in have.iter().filter(|l| !want.contains(l)) {
                differ.push(format!("unexpected in {table}: {l}"));
            }
            for l in want.iter().filter(|l| !have.contains(l)) {
                differ.push(format!("missing in {table}: {l}"));
            }
        }
        owned.insert(table.clone(), have);
    }
    differ.sort();
    differ.dedup();
    let state = match (have_any, same && doc.is_some()) {
        (false, _) => State::Clean,
        (true, true) => State::Identical,
        (true, false) => State::Drifted,
    };
    if state == State::Drifted && doc.is_some() && !mode.reconcile && !mode.force_apply {
        let shown: Vec<&str> = differ.iter().take(6).map(String::as_str).collect();
        bail!(
            "{} rules in this netns differ from the wanted ones ({}{}); rerun with --reconcile to replace them",
            if v6 { "ip6tables" } else { "iptables" },
            shown.join("; "),
            if differ.len() > shown.len() {
                format!("; and {} more", differ.len() - shown.len())
            } else {
                String::new()
            }
        );
    }
    Ok(Plan {
        netns,
        save,
        restore,
        doc,
        state,
        owned,
        before: current,
        ours: ours_builtin,
    })
}

impl Plan<'_> {
    fn execute(&self, mode: Mode) -> Result<Outcome> {
        let result = self.steps(mode);
        if let Err(e) = &result {
            if let Err(r) = self.rollback() {
                return Err(anyhow::anyhow!(
                    "{e:#}; putting the earlier rules back failed too: {r:#}"
                ));
            }
            tracing::warn!("{e:#}: the netns's earlier rules were put back");
        }
        result
    }

    fn steps(&self, mode: Mode) -> Result<Outcome> {
        let (netns, tool) = (self.netns, &self.restore);
        let cleanup = || -> Result<()> {
            let doc = cleanup_doc(&self.owned);
            if !doc.is_empty() {
                run_restore(netns, tool, &doc)
                    .with_context(|| format!("removing existing rules with {tool}"))?;
            }
            Ok(())
        };
        let Some(doc) = self.doc else {
            return Ok(if self.state == State::Clean {
                Outcome::NothingToRemove
            } else {
                cleanup()?;
                Outcome::Removed
            });
        };
        let apply = || {
            run_restore(netns, tool, doc)
                .with_context(|| format!("applying the rules with {tool}"))
                .map(|_| ())
        };
        match self.state {
            State::Clean => apply().map(|_| Outcome::Applied),
            State::Identical if !mode.force_apply => Ok(Outcome::AlreadyInPlace),
            State::Identical | State::Drifted => {
                cleanup()?;
                apply().map(|_| Outcome::Reconciled)
            }
        }
    }

    /// Puts our part of the family back as it was before this plan ran — our chains, their
    /// rules and our builtin-chain rules at their earlier positions — and nothing else: what
    /// other programs changed meanwhile (kube-proxy, a CNI) stays as they left it.
    fn rollback(&self) -> Result<()> {
        let now = parse_save(&run(self.netns, &self.save, &[], None)?);
        let doc = rollback_doc(&self.before, &now, &self.ours);
        if !doc.is_empty() {
            run_restore(self.netns, &self.restore, &doc)
                .with_context(|| format!("putting our earlier rules back with {}", self.restore))?;
        }
        Ok(())
    }
}

/// Applies (or with `cleanup_only` removes) the iptables rules for `cfg` in the netns. Both
/// families are planned (the wanted rules proven in a scratch netns, drift checked) before
/// either is touched; if applying IPv6 fails, IPv4 is put back as it was.
pub fn apply_iptables(
    netns: Option<&Path>,
    cfg: &Config,
    bin: &Binaries,
    mode: Mode,
) -> Result<Outcome> {
    let docs = iptables::render(cfg);
    let v4 = iptables_plan(netns, bin, false, &docs.v4, mode)?;
    // A cleanup also looks at IPv6 when the config does not enable it (the rules may be from
    // an earlier config that did), with the IPv6 rules this config would have.
    let v6_doc = docs
        .v6
        .clone()
        .unwrap_or_else(|| iptables::restore_doc(&iptables::rules(cfg, Family::V6)));
    let v6 = match (&docs.v6, mode.cleanup_only) {
        (Some(doc), false) => Some(iptables_plan(netns, bin, true, doc, mode)?),
        // Clean up v6 too, but a node without IPv6 netfilter must not fail.
        (_, true) => iptables_plan(netns, bin, true, &v6_doc, mode).ok(),
        (None, false) => None,
    };
    let out4 = v4.execute(mode)?;
    let out6 = match v6 {
        Some(p) => match p.execute(mode) {
            Ok(o) => Some(o),
            Err(_) if mode.cleanup_only => None,
            Err(e) => {
                if let Err(r) = v4.rollback() {
                    return Err(e.context(format!("putting IPv4 back failed too: {r:#}")));
                }
                return Err(e.context("IPv4 rules put back as they were"));
            }
        },
        None => None,
    };
    Ok(merge(out4, out6))
}

fn merge(a: Outcome, b: Option<Outcome>) -> Outcome {
    use Outcome::*;
    match (a, b) {
        (a, None) => a,
        (Reconciled, _) | (_, Some(Reconciled)) => Reconciled,
        (Applied, _) | (_, Some(Applied)) => Applied,
        (Removed, _) | (_, Some(Removed)) => Removed,
        (a, _) => a,
    }
}

// ---------------------------------------------------------------- nftables

fn nft_list(netns: Option<&Path>) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for table in nftables::TABLES {
        if let Ok(text) = run(netns, "nft", &["list", "table", "inet", table], None) {
            // Counters change with traffic; they are not part of the rules' identity.
            let norm: Vec<String> = text
                .lines()
                .map(|l| {
                    let mut l = l.trim().to_string();
                    while let Some(i) = l.find("counter packets ") {
                        let end = l[i..].find(" bytes ").map(|j| i + j + 7).unwrap_or(l.len());
                        let rest = &l[end..];
                        let rest = rest.split_once(' ').map(|x| x.1).unwrap_or("");
                        l = format!("{}counter {}", &l[..i], rest)
                            .trim_end()
                            .to_string();
                    }
                    l
                })
                .collect();
            out.insert(table.to_string(), norm.join("\n"));
        }
    }
    Ok(out)
}

/// Applies (or removes) the nftables rules for `cfg` in the netns, as one `nft -f -` transaction.
pub fn apply_nftables(netns: Option<&Path>, cfg: &Config, mode: Mode) -> Result<Outcome> {
    let current = nft_list(netns)?;
    let delete: String = current
        .keys()
        .map(|t| format!("delete table inet {t}\n"))
        .collect();
    // One transaction each: nft applies all of it or nothing. Only a run that did not finish
    // in time leaves it open whether it was applied; then our tables are put back as listed.
    let transact = |tx: &str| {
        run(netns, "nft", &["-f", "-"], Some(tx)).map_err(|e| match nft_rollback(netns, &current) {
            Ok(()) => e,
            Err(r) => e.context(format!(
                "putting our earlier nftables rules back failed too: {r:#}"
            )),
        })
    };
    if mode.cleanup_only {
        if current.is_empty() {
            return Ok(Outcome::NothingToRemove);
        }
        transact(&delete)?;
        return Ok(Outcome::Removed);
    }
    let tx = nftables::render(cfg);
    let wanted = nft_scratch_list(&tx).context("nft rejected the generated rules")?;
    if current.is_empty() {
        transact(&tx)?;
        return Ok(Outcome::Applied);
    }
    let identical = current == wanted;
    if identical && !mode.force_apply {
        return Ok(Outcome::AlreadyInPlace);
    }
    if !identical && !mode.reconcile && !mode.force_apply {
        let mut differ = Vec::new();
        for t in current.keys().chain(wanted.keys()) {
            let have: Vec<&str> = current.get(t).map_or(vec![], |x| x.lines().collect());
            let want: Vec<&str> = wanted.get(t).map_or(vec![], |x| x.lines().collect());
            differ.extend(
                have.iter()
                    .filter(|l| !want.contains(l))
                    .map(|l| format!("unexpected in {t}: {l}")),
            );
            differ.extend(
                want.iter()
                    .filter(|l| !have.contains(l))
                    .map(|l| format!("missing in {t}: {l}")),
            );
        }
        differ.sort();
        differ.dedup();
        let shown: Vec<&str> = differ.iter().take(6).map(String::as_str).collect();
        bail!(
            "nftables rules in this netns differ from the wanted ones ({}); rerun with --reconcile to replace them",
            shown.join("; ")
        );
    }
    // Deleting and re-adding in one transaction: no window without interception.
    transact(&format!("{delete}{tx}"))?;
    Ok(Outcome::Reconciled)
}

/// Puts our tables back as `before` listed them (nft's listing loads as a ruleset), deleting
/// any of ours that were not there; other tables are never named.
fn nft_rollback(netns: Option<&Path>, before: &BTreeMap<String, String>) -> Result<()> {
    let now = nft_list(netns)?;
    if &now == before {
        return Ok(());
    }
    let mut tx: String = now
        .keys()
        .map(|t| format!("delete table inet {t}\n"))
        .collect();
    for text in before.values() {
        tx.push_str(text);
        tx.push('\n');
    }
    run(netns, "nft", &["-f", "-"], Some(&tx)).map(|_| ())
}

/// Applies `tx` in a scratch netns and lists our tables there.
fn nft_scratch_list(tx: &str) -> Result<BTreeMap<String, String>> {
    let tx = tx.to_string();
    in_scratch(move || {
        run(None, "nft", &["-f", "-"], Some(&tx))?;
        nft_list(None)
    })
}

/// Configs the emitters' unit tests share.
#[cfg(test)]
pub(crate) mod test_configs {
    use interceptor_common::config::{Config, RawConfig};

    /// Istio's defaults, changed by `f`.
    pub fn config(f: impl FnOnce(&mut RawConfig)) -> Config {
        let mut raw = RawConfig::default();
        f(&mut raw);
        raw.parse().expect("valid test config")
    }

    /// A config that exercises every rule group of both emitters: TPROXY, DNS servers of both
    /// families, kube-virt and excluded interfaces, CIDRs and ports both ways, owner groups,
    /// drop-invalid, IPv6.
    pub fn everything() -> Config {
        config(|c| {
            c.inbound_interception_mode = "TPROXY".into();
            c.inbound_ports_include = "*".into();
            c.inbound_ports_exclude = "9000".into();
            c.exclude_interfaces = "eth9".into();
            c.reroute_virtual_interfaces = "eth1,eth2".into();
            c.outbound_ip_ranges_include = "10.0.0.0/8,fd00::/8".into();
            c.outbound_ip_ranges_exclude = "10.1.0.0/16,fd00:1::/32".into();
            c.outbound_ports_include = "8080".into();
            c.outbound_ports_exclude = "8443".into();
            c.redirect_dns = true;
            c.dns_servers = "10.96.0.10,fd00::10".into();
            c.drop_invalid = true;
            c.owner_groups_exclude = "888".into();
            c.enable_ipv6 = true;
        })
    }
}

#[cfg(test)]
mod counter_tests {
    #[test]
    fn redirect_counters_come_from_the_redirect_rules_only() {
        let dump = "*nat\n:OUTPUT ACCEPT [0:0]\n\
                    [7:420] -A OUTPUT -p tcp -j ISTIO_OUTPUT\n\
                    [5:300] -A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001\n\
                    [4:240] -A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006\n\
                    [2:120] -A ISTIO_OUTPUT -p udp --dport 53 -j REDIRECT --to-ports 15053\n\
                    COMMIT\n";
        assert_eq!(super::parse_redirect_counters(dump), (5, 4));
    }
}
