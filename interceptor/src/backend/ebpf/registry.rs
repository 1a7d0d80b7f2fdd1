//! The pod registry: one pod's entries in the pinned maps, written all or nothing
//! (`register`, reverting its `journal` on failure) and removed (`remove*`), keyed by netns
//! cookie; a pod keeps its id across re-registrations. `Pins::cleanup` (everything) is here too:
//! it releases the pods' reserved ports before `pins` unpins.

use std::net::IpAddr;
use std::os::fd::AsFd;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use aya::maps::lpm_trie::Key;
use aya::maps::PerCpuValues;
use interceptor_common::config::Config;
use interceptor_common::decision::{PodPolicy, PodSrc};
use interceptor_common::maps::stat;
use interceptor_common::maps::{AddrKey, Cidr4Data, Cidr6Data, GroupKey, PortKey, TupleKey};
use interceptor_common::policy;
use ipnet::IpNet;

use super::journal::{set_insert, Removed, Undo, Writes, BPF_NOEXIST};
use super::keys::{cidr_keys, v4_cidr_key, v6_cidr_key, Keys};
use super::pins::Pins;
use super::pod_maps::{PodHandle, PodMaps};
use super::reserved_ports;
use crate::netns;

impl PodMaps {
    /// Registers (or re-registers) the pod whose netns is at `netns`: set entries, the pod's
    /// sk_lookup program and an existing proxy listener first, the policy last (so a
    /// connect never sees half a pod), then stale entries of an earlier registration are
    /// removed. The pod keeps its id across re-registrations.
    ///
    /// All or nothing: if any step fails, every write of this call is undone (a new pod leaves
    /// no entry, pin or listener behind; a re-registered one keeps its earlier registration)
    /// and the error is returned.
    pub fn register(
        &mut self,
        netns: &Path,
        facts: &netns::PodNetns,
        cfg: &Config,
        local: &[IpAddr],
        groups: &[u32],
    ) -> Result<PodHandle> {
        if let Some(why) = policy::ebpf_unsupported(cfg) {
            bail!("the eBPF backend cannot honour this config: {why}");
        }
        // ADDRS is sized for every pod at this many addresses (maps::capacity).
        let max_local = interceptor_common::maps::capacity::LOCAL_ADDRS_PER_POD as usize;
        if local.len() > max_local {
            bail!(
                "the pod netns has {} addresses; the eBPF backend's limit is {max_local} per pod",
                local.len()
            );
        }
        let cookie = facts.cookie;
        let old = self.policy.get(&cookie, 0).ok();
        let pod_id = match old {
            Some(p) => p.pod_id,
            None => self.new_pod_id()?,
        };
        let mut undo = Vec::new();
        let mut w = Writes {
            netns,
            n: 0,
            undo: &mut undo,
        };
        let result = self.register_steps(&mut w, facts, cfg, local, groups, pod_id, old);
        match result {
            Ok(()) => {
                self.ids.take(pod_id);
                Ok(PodHandle {
                    netns_cookie: cookie,
                    pod_id,
                })
            }
            Err(e) => {
                let n = undo.len();
                if let Err(u) = self.undo(undo) {
                    // Entries may be left under the id: no later pod gets it.
                    self.ids.take(pod_id);
                    return Err(e.context(format!(
                        "registration failed and undoing it failed too: {u:#}"
                    )));
                }
                tracing::warn!(undone = n, "registration failed; its writes were undone");
                // The gate may have counted the undone policy (best effort: it only gates work).
                let _ = self.update_accel_on();
                Err(e.context(format!(
                    "registering {} (nothing was left registered for it)",
                    netns.display()
                )))
            }
        }
    }

    /// The smallest free id for a new pod. An id with a `POD_NETNS` entry belongs to a
    /// registration made since the ids were read (by another process): the ids are read again,
    /// and that one is skipped.
    fn new_pod_id(&self) -> Result<u32> {
        let mut reread = false;
        loop {
            let Some(&id) = self.ids.lowest_free(1).first() else {
                bail!(
                    "every pod id is taken: the eBPF maps hold {} pods per node",
                    interceptor_common::maps::capacity::MAX_PODS - 1
                );
            };
            if self.pod_netns.get(&id, 0).context("reading POD_NETNS")? == 0 {
                return Ok(id);
            }
            if !reread {
                self.reread_ids();
                reread = true;
            }
            self.ids.take(id);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn register_steps(
        &mut self,
        w: &mut Writes,
        facts: &netns::PodNetns,
        cfg: &Config,
        local: &[IpAddr],
        groups: &[u32],
        pod_id: u32,
        old: Option<PodPolicy>,
    ) -> Result<()> {
        let (netns, cookie) = (w.netns, facts.cookie);
        let tables = policy::MemTables::new(cfg, &own_addrs(local, &facts.link_local), groups);
        let mut keys = Keys::of(pod_id, &tables);
        let (reserved, unreserve) = self.reserve_guarded(
            w,
            facts.reserved_ports.as_deref(),
            pod_id,
            &tables.guarded_ports,
            old.is_none(),
        )?;
        keys.ports.extend(reserved);
        for k in &keys.ports {
            w.step()?;
            if set_insert(self.ports.insert(k, 1, BPF_NOEXIST))? {
                w.undo.push(Undo::Port(*k));
            }
        }
        for k in &keys.addrs {
            w.step()?;
            if set_insert(self.addrs.insert(k, 1, BPF_NOEXIST))? {
                w.undo.push(Undo::Addr(*k));
            }
        }
        for k in &keys.groups {
            w.step()?;
            if set_insert(self.groups.insert(k, 1, BPF_NOEXIST))? {
                w.undo.push(Undo::Group(*k));
            }
        }
        for (i, nets) in [&tables.cidrs_excluded, &tables.cidrs_included]
            .into_iter()
            .enumerate()
        {
            for net in nets {
                w.step()?;
                match net {
                    IpNet::V4(n) => {
                        let k = v4_cidr_key(pod_id, n);
                        if set_insert(self.cidr4[i].insert(&k, 1, BPF_NOEXIST))? {
                            w.undo.push(Undo::Cidr4(i, k));
                        }
                    }
                    IpNet::V6(n) => {
                        let k = v6_cidr_key(pod_id, n);
                        if set_insert(self.cidr6[i].insert(&k, 1, BPF_NOEXIST))? {
                            w.undo.push(Undo::Cidr6(i, k));
                        }
                    }
                }
            }
        }
        // The pod's sk_lookup program reads its cookie by id: written before the program runs.
        w.step()?;
        let was = self.pod_netns.get(&pod_id, 0).unwrap_or(0);
        if was != cookie {
            self.pod_netns
                .set(pod_id, cookie, 0)
                .context("writing POD_NETNS")?;
            w.undo.push(Undo::PodNetns(pod_id, was));
        }
        // The source its redirected connections are bound to: before the policy, which makes
        // the programs act for this pod at all.
        w.step()?;
        let src = policy::pod_src(cookie, local);
        let was = self.pod_src.get(&pod_id, 0).unwrap_or_default();
        if was != src {
            self.pod_src
                .set(pod_id, src, 0)
                .context("writing POD_SRC")?;
            w.undo.push(Undo::PodSrc(pod_id, was));
        }
        let programs = &self.programs;
        if let Some(pin) = self
            .pins
            .attach_sk_lookup(netns, facts.ns.as_fd(), cookie, || programs.take(pod_id))?
        {
            w.undo.push(Undo::Pin(pin));
        }
        // No tuple reset for a new pod: its removal deleted that pod's entries and zeroed its
        // count already, and walking `ORIG_BY_TUPLE` (half a million buckets) cost most of a
        // millisecond. An entry of a connection still open since (a handshake that finished
        // after the removal) is that socket's own and counted where its close gives it back;
        // zeroing the count under it made that give-back wrap the count of the id's next pod.
        self.mark_proxy_listeners(facts, cfg, pod_id)?;
        if !tables.inbound_ports.is_empty() || !cfg.inbound_ports_include.is_empty() {
            let t = std::time::Instant::now();
            self.adopt_listener(w, facts, cfg, pod_id, old.is_none())?;
            tracing::debug!(micros = t.elapsed().as_micros() as u64, "listener adoption");
        }
        w.step()?;
        let new = policy::pod_policy(cfg, pod_id);
        self.policy.insert(cookie, new, 0)?;
        w.undo.push(Undo::Policy(cookie, old));
        // The count changes only with this pod's flag (recounting walks every pod's policy).
        if old.is_some_and(accelerates) != accelerates(new) {
            self.update_accel_on()?;
        }
        if old.is_some() {
            // Only a re-registration can leave stale entries behind.
            self.purge(pod_id, Some((&keys, &tables)), Some(&mut *w.undo))?;
        }
        if let Err(e) = reserved_ports::release(netns, unreserve) {
            // The registration stands; a port stays reserved that no longer needs to be.
            tracing::warn!("{e:#}");
        }
        Ok(())
    }

    /// A proxy listener that existed before we attached never went through sockops' listen
    /// callback: find it in the netns and take a duplicate of its fd with pidfd_getfd.
    /// `new_pod`: the entries are this registration's own, to be removed if it fails (a
    /// re-registration only refreshes the proxy's listener, which stays valid).
    fn adopt_listener(
        &mut self,
        w: &mut Writes,
        facts: &netns::PodNetns,
        cfg: &Config,
        pod_id: u32,
        new_pod: bool,
    ) -> Result<()> {
        let port = cfg.inbound_capture_port;
        for (fd, v6) in
            crate::listener::find_proxy_listeners(&facts.listening, port, &cfg.proxy_uid)?
        {
            let key = pod_id * 2 + u32::from(v6);
            w.step()?;
            self.listeners
                .insert(key, std::os::fd::AsRawFd::as_raw_fd(&fd), 0)
                .context("adding the existing proxy listener")?;
            if new_pod {
                w.undo.push(Undo::Listener(key));
            }
        }
        Ok(())
    }

    /// Reverts a failed registration's writes, newest first.
    fn undo(&mut self, undo: Vec<Undo>) -> Result<()> {
        let mut first_err = None;
        for u in undo.into_iter().rev() {
            let r: Result<()> = match u {
                Undo::Port(k) => self.ports.remove(&k).map_err(Into::into),
                Undo::Addr(k) => self.addrs.remove(&k).map_err(Into::into),
                Undo::Group(k) => self.groups.remove(&k).map_err(Into::into),
                Undo::Cidr4(i, k) => self.cidr4[i].remove(&k).map_err(Into::into),
                Undo::Cidr6(i, k) => self.cidr6[i].remove(&k).map_err(Into::into),
                Undo::Restore(r) => match r {
                    Removed::Port(k) => self.ports.insert(k, 1, 0).map_err(Into::into),
                    Removed::Addr(k) => self.addrs.insert(k, 1, 0).map_err(Into::into),
                    Removed::Group(k) => self.groups.insert(k, 1, 0).map_err(Into::into),
                    Removed::Cidr4(i, k) => self.cidr4[i].insert(&k, 1, 0).map_err(Into::into),
                    Removed::Cidr6(i, k) => self.cidr6[i].insert(&k, 1, 0).map_err(Into::into),
                },
                Undo::Policy(c, Some(p)) => self.policy.insert(c, p, 0).map_err(Into::into),
                Undo::Policy(c, None) => self.policy.remove(&c).map_err(Into::into),
                Undo::Listener(k) => self.listeners.remove(&k).map_err(Into::into),
                Undo::Unreserve(ns, ports) => reserved_ports::release(&ns, ports),
                Undo::PodNetns(id, was) => self.pod_netns.set(id, was, 0).map_err(Into::into),
                Undo::PodSrc(id, was) => self.pod_src.set(id, was, 0).map_err(Into::into),
                Undo::Pin(p) => {
                    std::fs::remove_file(&p).with_context(|| format!("unpinning {}", p.display()))
                }
            };
            if let Err(e) = r {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Unregisters the pod of `netns`; returns whether it was registered.
    pub fn remove(&mut self, netns: &Path) -> Result<bool> {
        let cookie = netns::cookie(Some(netns))?;
        self.remove_cookie_in(cookie, Some(netns))
    }

    /// Unregisters a pod by netns cookie (the policy first, so connects stop at once).
    pub fn remove_cookie(&mut self, cookie: u64) -> Result<bool> {
        self.remove_cookie_in(cookie, None)
    }

    /// `remove_cookie`, releasing the ports the pod reserved in its netns at `netns` (if the
    /// netns is gone, so is its reservation).
    pub fn remove_cookie_in(&mut self, cookie: u64, netns: Option<&Path>) -> Result<bool> {
        let Ok(p) = self.policy.get(&cookie, 0) else {
            return Ok(false);
        };
        self.release_reserved(p.pod_id, cookie, netns)?;
        // The policy entry goes last: a removal cut short leaves it, so a retry (or the daemon's
        // restart) finds the pod and completes the removal instead of leaking the rest.
        self.purge(p.pod_id, None, None)?;
        self.reset_counters(p.pod_id)?;
        self.reset_tuples(cookie, p.pod_id)?;
        let _ = self.listeners.remove(&(p.pod_id * 2));
        let _ = self.listeners.remove(&(p.pod_id * 2 + 1));
        let _ = std::fs::remove_file(self.pins.sk_lookup_link(cookie));
        // Its id is free again (its program went with the link).
        if self.pod_netns.get(&p.pod_id, 0).is_ok_and(|c| c == cookie) {
            self.pod_netns.set(p.pod_id, 0, 0)?;
        }
        if self
            .pod_src
            .get(&p.pod_id, 0)
            .is_ok_and(|s| s.netns == cookie)
        {
            self.pod_src.set(p.pod_id, PodSrc::default(), 0)?;
        }
        self.policy.remove(&cookie)?;
        self.ids.release(p.pod_id);
        if accelerates(p) {
            self.update_accel_on()?;
        }
        Ok(true)
    }

    /// `ACCEL_ON[0]` = how many pods asked for acceleration (0 spares everybody else the
    /// per-connection policy lookup in sockops).
    fn update_accel_on(&mut self) -> Result<()> {
        let n = self
            .policy
            .iter()
            .filter_map(|r| r.ok())
            .filter(|(_, p)| accelerates(*p))
            .count() as u32;
        self.accel_on.set(0, n, 0).context("updating ACCEL_ON")?;
        Ok(())
    }

    /// Deletes the set entries of `pod_id`, except those of `keep` (the current registration).
    /// With `journal`, each removal is recorded so a failed re-registration can restore it.
    fn purge(
        &mut self,
        pod_id: u32,
        keep: Option<(&Keys, &policy::MemTables)>,
        mut journal: Option<&mut Vec<Undo>>,
    ) -> Result<()> {
        let mut note = |u: Undo| {
            if let Some(j) = journal.as_deref_mut() {
                j.push(u);
            }
        };
        let stale_ports: Vec<PortKey> = self
            .ports
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| k.pod_id == pod_id && !keep.is_some_and(|(keys, _)| keys.ports.contains(k)))
            .collect();
        for k in stale_ports {
            self.ports.remove(&k)?;
            note(Undo::Restore(Removed::Port(k)));
        }
        let stale_addrs: Vec<AddrKey> = self
            .addrs
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| k.pod_id == pod_id && !keep.is_some_and(|(keys, _)| keys.addrs.contains(k)))
            .collect();
        for k in stale_addrs {
            self.addrs.remove(&k)?;
            note(Undo::Restore(Removed::Addr(k)));
        }
        let stale_groups: Vec<GroupKey> = self
            .groups
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| {
                k.pod_id == pod_id && !keep.is_some_and(|(keys, _)| keys.groups.contains(k))
            })
            .collect();
        for k in stale_groups {
            self.groups.remove(&k)?;
            note(Undo::Restore(Removed::Group(k)));
        }
        let id = pod_id.to_be_bytes();
        let (keep4, keep6) = match keep {
            None => (vec![], vec![]),
            Some((_, t)) => cidr_keys(pod_id, t),
        };
        let same4 = |a: &Key<Cidr4Data>, b: &Key<Cidr4Data>| {
            a.prefix_len() == b.prefix_len() && a.data() == b.data()
        };
        let same6 = |a: &Key<Cidr6Data>, b: &Key<Cidr6Data>| {
            a.prefix_len() == b.prefix_len() && a.data() == b.data()
        };
        for (i, t) in self.cidr4.iter_mut().enumerate() {
            let stale: Vec<_> = t
                .keys()
                .filter_map(|k| k.ok())
                .filter(|k| k.data()[..4] == id && !keep4.iter().any(|x| same4(x, k)))
                .collect();
            for k in stale {
                t.remove(&k)?;
                note(Undo::Restore(Removed::Cidr4(i, k)));
            }
        }
        for (i, t) in self.cidr6.iter_mut().enumerate() {
            let stale: Vec<_> = t
                .keys()
                .filter_map(|k| k.ok())
                .filter(|k| k.data()[..4] == id && !keep6.iter().any(|x| same6(x, k)))
                .collect();
            for k in stale {
                t.remove(&k)?;
                note(Undo::Restore(Removed::Cidr6(i, k)));
            }
        }
        Ok(())
    }

    /// Zeroes a pod's counters so a later pod with the same id starts from 0.
    fn reset_counters(&mut self, pod_id: u32) -> Result<()> {
        let cpus = aya::util::nr_cpus().map_err(|(what, e)| anyhow!("{what}: {e}"))?;
        for c in 0..stat::PER_POD {
            if let Some(i) = stat::index(pod_id, c) {
                self.stats
                    .set(i, PerCpuValues::try_from(vec![0u64; cpus])?, 0)?;
            }
        }
        Ok(())
    }

    /// Removes a pod's tuple entries and zeroes its count, so its id starts clean for a later
    /// pod (an app socket closing after this finds no entry and gives nothing back).
    fn reset_tuples(&mut self, netns: u64, pod_id: u32) -> Result<()> {
        let keys: Vec<TupleKey> = self
            .by_tuple
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| k.netns == netns)
            .collect();
        for k in keys {
            let _ = self.by_tuple.remove(&k);
        }
        if pod_id < interceptor_common::maps::capacity::MAX_PODS {
            self.tuple_count
                .set(pod_id, 0, 0)
                .context("zeroing TUPLE_COUNT")?;
        }
        Ok(())
    }

    /// Marks the proxy's listening sockets that predate our programs (they never went
    /// through `bind4/6`) as the proxy's in `SK_PROXY`, so SO_ORIGINAL_DST is answered on what
    /// they accept (the kernel clones the mark). Found by owner uid on the proxy's ports, duplicated
    /// with pidfd_getfd.
    fn mark_proxy_listeners(
        &mut self,
        facts: &netns::PodNetns,
        cfg: &Config,
        pod_id: u32,
    ) -> Result<()> {
        for port in [cfg.proxy_port, cfg.inbound_capture_port] {
            for (fd, _) in
                crate::listener::find_proxy_listeners(&facts.listening, port, &cfg.proxy_uid)?
            {
                self.sk_proxy
                    .insert(&fd, interceptor_common::maps::proxy_mark(pod_id), 0)
                    .with_context(|| format!("marking the proxy's listener on port {port}"))?;
            }
        }
        Ok(())
    }
}

impl Pins {
    /// Detaches and unpins everything of ours, maps included. The pods' reserved ports go
    /// first: the record of which are ours is in the maps.
    pub fn cleanup(&self, cgroup: &Path) -> Result<bool> {
        if self.dir.exists() && self.loaded() {
            crate::progress::step("releasing the pods' reserved proxy ports");
            if let Err(e) = self.maps().and_then(|m| m.release_all_reserved()) {
                tracing::warn!("releasing reserved ports: {e:#}");
            }
        }
        self.unpin_all(cgroup)
    }
}

/// The smallest id no registered pod uses: keeps ids (and the counter array they index) bounded
/// by the number of pods on the node. Ids start at 1.
fn accelerates(p: PodPolicy) -> bool {
    p.has(interceptor_common::decision::flags::ACCELERATE)
}

/// The addresses that are local for the pod's outbound decisions (ADDRS): its own, then its
/// link-local ones. Several pods may share a link-local address, so those never key a pod.
fn own_addrs(local: &[IpAddr], link_local: &[IpAddr]) -> Vec<IpAddr> {
    let mut own = local.to_vec();
    own.extend(link_local.iter().filter(|a| !local.contains(a)));
    own
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_local_addresses_follow_the_pods_own_once() {
        let a: IpAddr = "10.0.0.5".parse().unwrap();
        let ll4: IpAddr = "169.254.1.1".parse().unwrap();
        let ll6: IpAddr = "fe80::1".parse().unwrap();
        assert_eq!(own_addrs(&[a], &[ll4, ll6]), [a, ll4, ll6]);
        assert_eq!(own_addrs(&[a, ll4], &[ll4]), [a, ll4]);
        assert_eq!(own_addrs(&[], &[]), Vec::<IpAddr>::new());
    }
}
