//! `interceptor explain`: one connection's verdict from the shared decision model.

use anyhow::{anyhow, Result};
use interceptor_common::config::{Config, ConfigError, OwnerGroups};
use interceptor_common::decision::{Conn, Proto, Verdict};
use interceptor_common::policy::{self, MemTables};

use crate::cli::ExplainArgs;

/// Owner-group entries resolved to gids (names through the group database).
pub fn owner_gids(cfg: &Config) -> Result<Vec<u32>> {
    let groups = match &cfg.owner_groups {
        OwnerGroups::All => return Ok(vec![]),
        OwnerGroups::Include(g) | OwnerGroups::Exclude(g) => g,
    };
    policy::resolve_groups(groups, |name| {
        nix::unistd::Group::from_name(name)
            .ok()
            .flatten()
            .map(|g| g.gid.as_raw())
    })
    .map_err(|g| anyhow!("owner group {g:?} does not exist"))
}

/// The in-memory tables of a pod: its config plus its netns's own addresses (link-local ones
/// included: the route to them is `lo`, as for the eBPF datapath's `ADDRS`).
pub fn pod_tables(cfg: &Config, netns: Option<&std::path::Path>) -> Result<MemTables> {
    let (mut local, link) = crate::netns::run_in(netns, crate::netns::own_addrs_here)?;
    local.extend(link);
    Ok(MemTables::new(cfg, &local, &owner_gids(cfg)?))
}

/// Human- and test-readable verdict: `verdict: redirect PORT` or `verdict: pass`, then `rule: …`.
pub fn format(v: Verdict) -> String {
    match v {
        Verdict::Redirect { port, reason } => {
            format!("verdict: redirect {port}\nrule: {reason:?}\n")
        }
        Verdict::Pass(reason) => format!("verdict: pass\nrule: {reason:?}\n"),
    }
}

pub fn run(args: &ExplainArgs) -> Result<Result<(), ConfigError>> {
    let cfg = match crate::config::load(&args.apply) {
        Ok(c) => c,
        Err(e) => return Ok(Err(e)),
    };
    let tables = pod_tables(&cfg, args.apply.network_namespace.as_deref())?;
    let conn = Conn {
        proto: if args.udp { Proto::Udp } else { Proto::Tcp },
        dst: args.dst.ip().into(),
        dport: args.dst.port(),
        src: args.src.map(Into::into),
        uid: args.uid,
        gid: args.gid.unwrap_or(args.uid),
    };
    print!("{}", format(policy::explain(&cfg, &tables, &conn)));
    // `--uid`/`--gid` are in-namespace ids, as Istio's rules name them; the eBPF programs
    // compare host ids, so show the translation when the pod has its own user namespace.
    if let Some(ns) = args.apply.network_namespace.as_deref() {
        if let Some(m) = crate::userns::maps_of(ns)? {
            println!(
                "userns: {}",
                crate::userns::UsernsView::new(&m, &cfg).line()
            );
        }
    }
    Ok(Ok(()))
}
