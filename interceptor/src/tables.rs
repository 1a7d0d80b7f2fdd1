//! A pod's decision tables in memory: its config plus the facts of its netns (own addresses)
//! and of the node (owner groups resolved to gids), as the eBPF datapath's maps hold them.
//! Read by the install service (registration, dry run) and by `explain`.

use std::path::Path;

use anyhow::{anyhow, Result};
use interceptor_common::config::{Config, OwnerGroups};
use interceptor_common::policy::{self, MemTables};

/// Owner-group entries resolved to gids (names through the group database).
pub fn owner_gids(cfg: &Config) -> Result<Vec<u32>> {
    let groups = match &cfg.owner_groups {
        OwnerGroups::All => return Ok(vec![]),
        OwnerGroups::Include(g) | OwnerGroups::Exclude(g) => g,
    };
    policy::resolve_groups(groups, group_gid)
        .map_err(|g| anyhow!("owner group {g:?} does not exist"))
}

/// The in-memory tables of a pod: its config plus its netns's own addresses (link-local ones
/// included: the route to them is `lo`, as for the eBPF datapath's `ADDRS`).
pub fn pod_tables(cfg: &Config, netns: Option<&Path>) -> Result<MemTables> {
    pod_tables_and_src(cfg, netns).map(|(t, _)| t)
}

/// `pod_tables`, and the pod's own address per family a redirected connection is bound to (what
/// the loader writes to `POD_SRC`), from one visit of the netns.
pub fn pod_tables_and_src(
    cfg: &Config,
    netns: Option<&Path>,
) -> Result<(MemTables, interceptor_common::decision::PodSrc)> {
    let (mut local, link) = crate::netns::run_in(netns, crate::netns::own_addrs_here)?;
    let src = interceptor_common::policy::pod_src(0, &local);
    local.extend(link);
    Ok((MemTables::new(cfg, &local, &owner_gids(cfg)?), src))
}

/// A group name's gid from the group database.
pub fn group_gid(name: &str) -> Option<u32> {
    nix::unistd::Group::from_name(name)
        .ok()
        .flatten()
        .map(|g| g.gid.as_raw())
}
