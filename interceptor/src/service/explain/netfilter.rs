//! `explain` for a config the eBPF path cannot serve: the connection walked through the nat
//! rules the netfilter fallback installs for it (`iptables::rules`, built from the same
//! `plan::Plan` the nftables emitter reads), rule by rule, as netfilter evaluates them.

use std::collections::HashMap;
use std::net::IpAddr;

use anyhow::{anyhow, bail, Context, Result};
use interceptor_common::config::Config;
use interceptor_common::decision::Proto;
use interceptor_common::plan::{Family, Plan};
use ipnet::IpNet;

use crate::backend::iptables::{self, Position, Rule, Table};

/// The connection as nat OUTPUT sees its first packet.
pub struct Packet {
    pub proto: Proto,
    /// The destination as the kernel routes it (`0.0.0.0` resolved, v4-mapped as IPv4).
    pub dst: IpAddr,
    pub dport: u16,
    /// The socket's bound source, if any (an unbound socket's source is never 127.0.0.6).
    pub src: Option<IpAddr>,
    pub uid: u32,
    pub gid: u32,
    /// The interface the route leaves by (`lo` for loopback and the pod's own addresses).
    pub out_if: String,
}

/// What the rules do with the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Pass,
    Redirect(u16),
}

/// The walk's result: the outcome and the rules that matched on the way, jumps included.
pub struct Walk {
    pub outcome: Outcome,
    pub matched: Vec<String>,
    /// This family gets no rules (IPv6 off), so nothing decides the connection.
    pub no_rules: bool,
}

/// Walks `pkt` through the nat OUTPUT chain of `cfg`'s rules. `gid_of` resolves owner-group
/// names (`--gid-owner java`) to gids.
pub fn walk(cfg: &Config, pkt: &Packet, gid_of: &dyn Fn(&str) -> Option<u32>) -> Result<Walk> {
    let family = match pkt.dst {
        IpAddr::V4(_) => Family::V4,
        IpAddr::V6(_) => Family::V6,
    };
    if !Plan::new(cfg).families().contains(&family) {
        return Ok(Walk {
            outcome: Outcome::Pass,
            matched: vec![],
            no_rules: true,
        });
    }
    let mut w = Walker {
        chains: chains(iptables::rules(cfg, family)),
        pkt,
        gid_of,
        matched: vec![],
    };
    let outcome = w.chain("OUTPUT", 0)?.unwrap_or(Outcome::Pass);
    Ok(Walk {
        outcome,
        matched: w.matched,
        no_rules: false,
    })
}

/// The nat chains in the order the kernel holds their rules once the document is applied
/// (`-I CHAIN N` placed at N).
fn chains(rules: Vec<Rule>) -> HashMap<&'static str, Vec<Rule>> {
    let mut out: HashMap<&'static str, Vec<Rule>> = HashMap::new();
    for r in rules.into_iter().filter(|r| r.table == Table::Nat) {
        let chain = out.entry(r.chain).or_default();
        match r.position {
            Position::Append => chain.push(r),
            Position::Insert(n) => {
                let at = (n as usize).saturating_sub(1).min(chain.len());
                chain.insert(at, r);
            }
        }
    }
    out
}

struct Walker<'a> {
    chains: HashMap<&'static str, Vec<Rule>>,
    pkt: &'a Packet,
    gid_of: &'a dyn Fn(&str) -> Option<u32>,
    matched: Vec<String>,
}

impl Walker<'_> {
    /// `Some` when a rule of this chain (or of one it jumps to) decides; `None` when the chain
    /// returns to its caller (RETURN, or its end).
    fn chain(&mut self, name: &str, depth: usize) -> Result<Option<Outcome>> {
        if depth > 8 {
            bail!("chain {name}: jumps nest too deep");
        }
        let rules = self.chains.get(name).cloned().unwrap_or_default();
        for rule in &rules {
            let Some(j) = rule.params.iter().position(|p| p == "-j") else {
                continue;
            };
            if !self.matches(rule, &rule.params[..j])? {
                continue;
            }
            self.matched.push(rule.to_string());
            let target = rule.params.get(j + 1).map(String::as_str).unwrap_or("");
            match target {
                "RETURN" => return Ok(None),
                "ACCEPT" => return Ok(Some(Outcome::Pass)),
                "REDIRECT" => {
                    let port = rule.params[j + 2..]
                        .windows(2)
                        .find(|w| w[0] == "--to-ports" || w[0] == "--to-port")
                        .and_then(|w| w[1].parse().ok())
                        .ok_or_else(|| anyhow!("no port in `{rule}`"))?;
                    return Ok(Some(Outcome::Redirect(port)));
                }
                chain => {
                    if let Some(o) = self.chain(chain, depth + 1)? {
                        return Ok(Some(o));
                    }
                }
            }
        }
        Ok(None)
    }

    /// Whether every match of the rule holds (`!` negates the one after it).
    fn matches(&self, rule: &Rule, params: &[String]) -> Result<bool> {
        let pkt = self.pkt;
        let mut negate = false;
        let mut i = 0;
        while i < params.len() {
            let opt = params[i].as_str();
            match opt {
                "!" => {
                    negate = true;
                    i += 1;
                    continue;
                }
                // A match module's name: its options follow.
                "-m" => {
                    i += 2;
                    continue;
                }
                _ => {}
            }
            let value = params
                .get(i + 1)
                .with_context(|| format!("{opt} without a value in `{rule}`"))?;
            let holds = match opt {
                "-o" => interface_matches(value.trim_matches('"'), &pkt.out_if),
                // Locally generated traffic has no input interface.
                "-i" => false,
                "-s" => pkt
                    .src
                    .is_some_and(|s| net(value).is_ok_and(|n| n.contains(&s))),
                "-d" => net(value)?.contains(&pkt.dst),
                "-p" => {
                    value
                        == match pkt.proto {
                            Proto::Tcp => "tcp",
                            Proto::Udp => "udp",
                        }
                }
                "--dport" => value.parse::<u16>().ok() == Some(pkt.dport),
                "--dports" => value
                    .split(',')
                    .any(|p| p.parse::<u16>().ok() == Some(pkt.dport)),
                "--uid-owner" => value.parse::<u32>().ok() == Some(pkt.uid),
                "--gid-owner" => {
                    let number = interceptor_common::parse::group_number(value)
                        .ok()
                        .flatten();
                    number.or_else(|| (self.gid_of)(value)) == Some(pkt.gid)
                }
                other => bail!("explain cannot evaluate {other} in `{rule}`"),
            };
            if holds == negate {
                return Ok(false);
            }
            negate = false;
            i += 2;
        }
        Ok(true)
    }
}

fn net(s: &str) -> Result<IpNet> {
    s.parse()
        .map_err(|_| anyhow!("{s:?} is not a CIDR in our own rules"))
}

/// iptables' interface match: exact, or a prefix when the name ends in `+`.
fn interface_matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_suffix('+') {
        Some(prefix) => name.starts_with(prefix),
        None => pattern == name,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use interceptor_common::config::RawConfig;

    fn cfg(f: impl FnOnce(&mut RawConfig)) -> Config {
        let mut raw = RawConfig {
            outbound_ip_ranges_include: "*".into(),
            ..Default::default()
        };
        f(&mut raw);
        raw.parse().unwrap()
    }

    fn pkt(dst: &str, dport: u16, uid: u32, out_if: &str) -> Packet {
        Packet {
            proto: Proto::Tcp,
            dst: dst.parse().unwrap(),
            dport,
            src: None,
            uid,
            gid: uid,
            out_if: out_if.into(),
        }
    }

    fn outcome(c: &Config, p: &Packet) -> (Outcome, Vec<String>) {
        let w = walk(c, p, &|_| None).unwrap();
        (w.outcome, w.matched)
    }

    #[test]
    fn excluded_interface_returns_before_istio_output() {
        let c = cfg(|r| r.exclude_interfaces = "eth9,veth+".into());
        let (o, m) = outcome(&c, &pkt("10.0.0.1", 80, 1000, "eth9"));
        assert_eq!(o, Outcome::Pass);
        assert_eq!(m, [r#"-A OUTPUT -o "eth9" -j RETURN"#]);
        assert_eq!(
            outcome(&c, &pkt("10.0.0.1", 80, 1000, "veth7")).0,
            Outcome::Pass
        );
        let (o, m) = outcome(&c, &pkt("10.0.0.1", 80, 1000, "eth0"));
        assert_eq!(o, Outcome::Redirect(15001));
        assert_eq!(
            m.last().unwrap(),
            "-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001"
        );
    }

    #[test]
    fn proxy_and_app_over_lo_follow_the_owner_rules() {
        let c = cfg(|r| r.drop_invalid = true);
        assert_eq!(
            outcome(&c, &pkt("10.0.0.1", 80, 1337, "eth0")).0,
            Outcome::Pass
        );
        assert_eq!(
            outcome(&c, &pkt("10.1.0.5", 80, 1337, "lo")).0,
            Outcome::Redirect(15006)
        );
        assert_eq!(
            outcome(&c, &pkt("10.1.0.5", 80, 1000, "lo")).0,
            Outcome::Pass
        );
        // UDP falls through ISTIO_REDIRECT (tcp only) and off the end of ISTIO_OUTPUT.
        let mut udp = pkt("10.0.0.1", 53, 1000, "eth0");
        udp.proto = Proto::Udp;
        assert_eq!(outcome(&c, &udp).0, Outcome::Pass);
    }

    #[test]
    fn ipv6_off_leaves_ipv6_undecided() {
        let c = cfg(|r| r.reroute_virtual_interfaces = "eth1".into());
        let w = walk(&c, &pkt("fd00::1", 80, 1000, "eth0"), &|_| None).unwrap();
        assert!(w.no_rules && w.matched.is_empty());
    }
}
