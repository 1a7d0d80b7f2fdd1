//! User namespaces (`hostUsers: false` pods): the ids a pod's config names are ids *inside* the
//! pod's user namespace, as istio-init (running in the pod) writes them into its owner rules.
//! The eBPF programs see ids of the initial user namespace (`bpf_get_current_uid_gid` returns
//! the calling task's real uid/gid there), so the loader translates the configured ids through
//! the namespace's `uid_map`/`gid_map` first. Pure functions; the maps are read by the loader.

use serde::{Deserialize, Serialize};

use crate::config::Config;

/// One line of `/proc/<pid>/uid_map` (or `gid_map`): ids `inside..inside+count` of the
/// namespace are ids `outside..outside+count` of the reader's (here: the initial) namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdExtent {
    pub inside: u32,
    pub outside: u32,
    pub count: u32,
}

/// A whole `uid_map` or `gid_map`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdMap(pub Vec<IdExtent>);

impl IdMap {
    /// Parses the kernel's text form (`inside outside count` per line, whitespace separated).
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut out = Vec::new();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let f: Vec<u32> = line
                .split_whitespace()
                .map(str::parse)
                .collect::<Result<_, _>>()
                .map_err(|_| format!("bad id map line {line:?}"))?;
            match f[..] {
                [inside, outside, count] if count > 0 => out.push(IdExtent {
                    inside,
                    outside,
                    count,
                }),
                _ => return Err(format!("bad id map line {line:?}")),
            }
        }
        Ok(IdMap(out))
    }

    /// The outside id of `id`, if the map covers it.
    pub fn map(&self, id: u32) -> Option<u32> {
        self.0.iter().find_map(|e| {
            let off = id.checked_sub(e.inside)?;
            (off < e.count)
                .then(|| e.outside.checked_add(off))
                .flatten()
        })
    }

    /// The kernel's text form, one extent per line.
    pub fn render(&self) -> String {
        self.0
            .iter()
            .map(|e| format!("{} {} {}", e.inside, e.outside, e.count))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The id maps of a pod's user namespace.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsernsMaps {
    pub uid_map: IdMap,
    pub gid_map: IdMap,
}

/// Translates in-namespace ids to host ids; `what` names them in the error ("proxy uid"). An
/// id the namespace does not map is an error naming it: no process of the pod can carry it,
/// and guessing would protect (or exempt) the wrong host id.
pub fn translate_ids(ids: &[u32], map: &IdMap, what: &str) -> Result<Vec<u32>, String> {
    ids.iter()
        .map(|&id| {
            map.map(id).ok_or_else(|| {
                format!(
                    "{what} {id} is not mapped by the pod's user namespace (map: {})",
                    if map.0.is_empty() {
                        "empty".to_string()
                    } else {
                        map.render()
                    }
                )
            })
        })
        .collect()
}

/// `cfg` with its proxy uids/gids as host ids, for the eBPF programs.
pub fn host_config(cfg: &Config, maps: &UsernsMaps) -> Result<Config, String> {
    let mut out = cfg.clone();
    out.proxy_uid = translate_ids(&cfg.proxy_uid, &maps.uid_map, "proxy uid")?;
    out.proxy_gid = translate_ids(&cfg.proxy_gid, &maps.gid_map, "proxy gid")?;
    Ok(out)
}

/// Human form of a translation: `1337 (host 101337)`, comma separated; ids the map does not
/// cover say so.
pub fn describe(ids: &[u32], map: &IdMap) -> String {
    ids.iter()
        .map(|&id| match map.map(id) {
            Some(h) => format!("{id} (host {h})"),
            None => format!("{id} (not mapped)"),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod_map() -> IdMap {
        IdMap::parse("         0     100000      65536\n").unwrap()
    }

    #[test]
    fn parses_kernel_text() {
        assert_eq!(
            pod_map(),
            IdMap(vec![IdExtent {
                inside: 0,
                outside: 100000,
                count: 65536
            }])
        );
        let two = IdMap::parse("0 1000 1\n1 200000 10\n").unwrap();
        assert_eq!(two.0.len(), 2);
        assert_eq!(IdMap::parse("").unwrap(), IdMap::default());
        for bad in ["0 1", "0 1 2 3", "a 1 2", "0 1 0", "-1 0 1"] {
            assert!(IdMap::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn translates_through_the_map() {
        let m = pod_map();
        assert_eq!(
            translate_ids(&[1337, 0, 65535], &m, "proxy uid"),
            Ok(vec![101337, 100000, 165535])
        );
        let two = IdMap::parse("0 1000 1\n1 200000 10\n").unwrap();
        assert_eq!(
            translate_ids(&[0, 1, 10], &two, "x"),
            Ok(vec![1000, 200000, 200009])
        );
    }

    #[test]
    fn unmapped_id_is_named() {
        let e = translate_ids(&[1337, 65536], &pod_map(), "proxy uid").unwrap_err();
        assert!(e.contains("proxy uid 65536"), "{e}");
        assert!(e.contains("0 100000 65536"), "{e}");
        let e = translate_ids(&[1], &IdMap::default(), "proxy gid").unwrap_err();
        assert!(e.contains("proxy gid 1") && e.contains("empty"), "{e}");
    }

    #[test]
    fn no_overflow_at_the_top() {
        let m = IdMap::parse("0 4294967290 10").unwrap();
        assert_eq!(m.map(5), Some(4294967295));
        assert_eq!(m.map(6), None);
    }

    #[test]
    fn host_config_translates_both_lists() {
        let cfg = crate::config::RawConfig {
            proxy_uid: "1337".into(),
            proxy_gid: "1337,5".into(),
            ..Default::default()
        }
        .parse()
        .unwrap();
        let maps = UsernsMaps {
            uid_map: pod_map(),
            gid_map: IdMap::parse("0 200000 65536").unwrap(),
        };
        let h = host_config(&cfg, &maps).unwrap();
        assert_eq!(h.proxy_uid, vec![101337]);
        assert_eq!(h.proxy_gid, vec![201337, 200005]);
        assert_eq!(
            describe(&cfg.proxy_uid, &maps.uid_map),
            "1337 (host 101337)"
        );
        assert_eq!(describe(&[70000], &maps.uid_map), "70000 (not mapped)");
    }
}
