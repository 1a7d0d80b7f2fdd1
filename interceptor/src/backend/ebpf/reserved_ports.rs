//! The bind guard against autobind. `bind4/6` only see explicit binds: `listen()` or `connect()`
//! on an unbound socket picks a port without them, and with `net.ipv4.ip_local_port_range` (a
//! namespaced sysctl a pod may set) covering 15001 an app could take the proxy's port before
//! the proxy starts. So at registration the guarded ports are merged into the pod netns's
//! `net.ipv4.ip_local_reserved_ports`, which autobind skips (IPv6 too: the sysctl is shared)
//! while an explicit bind (the proxy's) still works.
//!
//! Only the ports this registration added are ours: they are recorded in `PORTS` (kind
//! `PORT_RESERVED`) and released at removal and `cleanup`; ports reserved before (by the
//! pod's own sysctls, say) are left alone.

use std::collections::{BTreeSet, HashSet};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use interceptor_common::maps::{PortKey, PORT_RESERVED};

use super::journal::{Undo, Writes};
use super::pod_maps::PodMaps;
use crate::netns;

use netns::RESERVED_PORTS_SYSCTL as SYSCTL;

/// Parses the sysctl's format: `1,2-5,7` (empty: none).
pub fn parse(text: &str) -> Result<BTreeSet<u16>> {
    let mut out = BTreeSet::new();
    for part in text.trim().split(',').filter(|p| !p.trim().is_empty()) {
        let p = part.trim();
        let (lo, hi) = p.split_once('-').unwrap_or((p, p));
        let num = |s: &str| {
            s.trim()
                .parse::<u16>()
                .with_context(|| format!("bad port {s:?} in ip_local_reserved_ports"))
        };
        let (lo, hi) = (num(lo)?, num(hi)?);
        if lo > hi {
            bail!("bad range {p:?} in ip_local_reserved_ports");
        }
        out.extend(lo..=hi);
    }
    Ok(out)
}

/// Renders a port set in the sysctl's format, ranges collapsed.
pub fn render(ports: &BTreeSet<u16>) -> String {
    let mut parts = Vec::new();
    let mut it = ports.iter().copied().peekable();
    while let Some(lo) = it.next() {
        let mut hi = lo;
        while it.peek() == Some(&(hi.wrapping_add(1))) && hi != u16::MAX {
            hi = it.next().unwrap_or(hi);
        }
        parts.push(if lo == hi {
            lo.to_string()
        } else {
            format!("{lo}-{hi}")
        });
    }
    parts.join(",")
}

/// Reads a bitmap sysctl in one read(2): the kernel's `proc_do_large_bitmap` returns nothing to
/// a read at a non-zero offset, so a short first read (`read_to_string` starts with 32 bytes)
/// would cut the list. A page first: the kernel allocates (and zeroes) a buffer of the size
/// asked for, and the largest list (every port, "65535,") takes 384 KiB, which cost a pod add
/// more than a millisecond. The list ends with a newline only when it fitted.
pub fn read_sysctl(path: &str) -> Result<String> {
    let f = File::open(path).with_context(|| format!("reading {path}"))?;
    read_open(&f).with_context(|| format!("reading {path}"))
}

/// `read_sysctl` of an open sysctl file (each read at offset 0).
fn read_open(f: &File) -> Result<String> {
    for size in [4096, 6 * 65536 + 1] {
        let mut buf = vec![0u8; size];
        let n = f.read_at(&mut buf, 0)?;
        buf.truncate(n);
        if n < size && (n == 0 || buf.ends_with(b"\n")) || size > 4096 {
            return Ok(String::from_utf8(buf)?);
        }
    }
    unreachable!("the last size returns")
}

fn write_open(f: &File, ports: &BTreeSet<u16>) -> Result<()> {
    // An empty write is rejected by older kernels; "\n" clears the list everywhere.
    let text = format!("{}\n", render(ports));
    f.write_all_at(text.as_bytes(), 0)
        .with_context(|| format!("writing {SYSCTL}"))
}

/// Adds `ports` to the reservation of the netns at `netns`, through `sysctl` (the netns's
/// sysctl file, opened inside it) when given; returns those not reserved before (the ones the
/// caller now owns and must release).
pub fn reserve(netns: &Path, sysctl: Option<&File>, ports: Vec<u16>) -> Result<Vec<u16>> {
    let add = |f: &File| {
        let mut set = parse(&read_open(f)?)?;
        let added: Vec<u16> = ports.into_iter().filter(|p| set.insert(*p)).collect();
        if !added.is_empty() {
            write_open(f, &set)?;
        }
        Ok(added)
    };
    match sysctl {
        Some(f) => add(f),
        None => netns::run_in(Some(netns), || {
            add(&OpenOptions::new().read(true).write(true).open(SYSCTL)?)
        }),
    }
    .with_context(|| format!("reserving the guarded ports in {}", netns.display()))
}

/// Removes `ports` (and only them) from the reservation of the netns at `netns`.
pub fn release(netns: &Path, ports: Vec<u16>) -> Result<()> {
    if ports.is_empty() {
        return Ok(());
    }
    netns::run_in(Some(netns), move || {
        let f = OpenOptions::new().read(true).write(true).open(SYSCTL)?;
        let mut set = parse(&read_open(&f)?)?;
        let before = set.len();
        for p in &ports {
            set.remove(p);
        }
        if set.len() != before {
            write_open(&f, &set)?;
        }
        Ok(())
    })
    .with_context(|| format!("releasing reserved ports in {}", netns.display()))
}

impl PodMaps {
    /// The ports this pod's registrations reserved (recorded in `PORTS`).
    pub fn reserved_by_us(&self, pod_id: u32) -> Vec<u16> {
        self.ports
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| k.pod_id == pod_id && k.kind == PORT_RESERVED)
            .map(|k| k.port)
            .collect()
    }

    /// Registration step: reserves the guarded ports in the pod netns. Returns the `PORTS` keys
    /// recording the ports that are ours after this registration (the caller writes them with
    /// the other keys, so a stale one is purged like any entry) and the ports an earlier
    /// registration reserved that are no longer guarded (released once it succeeded).
    pub(super) fn reserve_guarded(
        &mut self,
        w: &mut Writes,
        sysctl: Option<&File>,
        pod_id: u32,
        guarded: &HashSet<u16>,
        new_pod: bool,
    ) -> Result<(Vec<PortKey>, Vec<u16>)> {
        // A new pod's id has no entries: removal and a failed registration delete them all
        // before the policy entry, and the id was free. Why not look anyway: `PORTS` is walked
        // bucket by bucket (a quarter of a million of them), most of a millisecond.
        let before = if new_pod {
            vec![]
        } else {
            self.reserved_by_us(pod_id)
        };
        let mut wanted: Vec<u16> = guarded.iter().copied().collect();
        wanted.sort_unstable();
        let added = reserve(w.netns, sysctl, wanted)?;
        if !added.is_empty() {
            w.undo
                .push(Undo::Unreserve(w.netns.to_path_buf(), added.clone()));
        }
        let ours = before
            .iter()
            .copied()
            .filter(|p| guarded.contains(p))
            .chain(added);
        let keys = ours
            .map(|port| PortKey {
                pod_id,
                port,
                kind: PORT_RESERVED,
            })
            .collect();
        let stale = before
            .into_iter()
            .filter(|p| !guarded.contains(p))
            .collect();
        Ok((keys, stale))
    }

    /// Releases what `pod_id` reserved in its netns (cookie `cookie`), found at `netns` if that
    /// still is it: a deleted netns took its sysctls with it, and a path now naming another
    /// netns must not lose that one's reservations. Its `PORTS` keys go with the pod's purge.
    pub(super) fn release_reserved(
        &self,
        pod_id: u32,
        cookie: u64,
        netns: Option<&Path>,
    ) -> Result<()> {
        let ours = self.reserved_by_us(pod_id);
        match netns {
            Some(ns)
                if !ours.is_empty()
                    && netns::is_netns(ns)
                    && netns::cookie(Some(ns)).is_ok_and(|c| c == cookie) =>
            {
                release(ns, ours)
            }
            _ => Ok(()),
        }
    }

    /// `cleanup`: releases every registered pod's reservation (found by cookie).
    pub fn release_all_reserved(&self) -> Result<()> {
        let pods: Vec<(u64, u32)> = self
            .pods()
            .into_iter()
            .map(|(c, p)| (c, p.pod_id))
            .filter(|(_, id)| !self.reserved_by_us(*id).is_empty())
            .collect();
        if pods.is_empty() {
            return Ok(());
        }
        let paths = netns::find_by_cookie(&pods.iter().map(|(c, _)| *c).collect());
        let mut first_err = None;
        for (cookie, id) in pods {
            if let Err(e) =
                self.release_reserved(id, cookie, paths.get(&cookie).map(PathBuf::as_path))
            {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_render_round_trip() {
        let s = parse("15001,15006-15008, 80\n").unwrap();
        assert_eq!(
            s.iter().copied().collect::<Vec<_>>(),
            [80, 15001, 15006, 15007, 15008]
        );
        assert_eq!(render(&s), "80,15001,15006-15008");
        assert!(parse("").unwrap().is_empty());
        assert!(parse("\n").unwrap().is_empty());
        assert_eq!(render(&parse("65534-65535").unwrap()), "65534-65535");
        assert!(parse("9-3").is_err());
        assert!(parse("70000").unwrap_err().to_string().contains("70000"));
    }
}
