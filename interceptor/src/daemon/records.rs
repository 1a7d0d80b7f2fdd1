//! The daemon's records of registered pods: one JSON file per netns in the state dir, written
//! whole (temporary file, then rename). A record that cannot be read or parsed is reported
//! ([`UnreadableRecord`]), never taken for "no pod": its pod may still be intercepted.

use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use anyhow::Result;

use super::protocol::{PodStatus, UnreadableRecord};

/// Longest escaped name kept whole; longer ones are cut and end in a hash of the full path.
const MAX_NAME: usize = 150;

pub(super) fn state_file(dir: &Path, netns: &Path) -> PathBuf {
    // One file per netns path; the path itself is the key users give. Why the escaping and the
    // hash: mapping every other character to '_' made `/run/netns/pod-a` and `/run/netns/pod_a`
    // share one record, so adding one pod overwrote the other's and removing it unregistered
    // the other pod; and a path longer than NAME_MAX failed the record after the pod was
    // registered (half-registered). Now distinct paths give distinct, bounded names.
    let bytes = netns.as_os_str().as_bytes();
    let mut name = String::new();
    for &b in bytes {
        if b.is_ascii_alphanumeric() {
            name.push(b as char);
        } else {
            name.push_str(&format!("_{b:02x}"));
        }
    }
    if name.len() > MAX_NAME {
        let mut h: u64 = 0xcbf29ce484222325; // FNV-1a of the full path
        for &b in bytes {
            h = (h ^ u64::from(b)).wrapping_mul(0x100000001b3);
        }
        name.truncate(128);
        name.push_str(&format!("-{h:016x}"));
    }
    dir.join(format!("{name}.json"))
}

/// The netns path a record's file name stands for: the escaping of [`state_file`] undone.
/// None for a hashed long name (or a name this scheme did not write).
fn netns_of(file: &Path) -> Option<PathBuf> {
    let stem = file.file_stem()?.as_bytes();
    if stem.len() > MAX_NAME {
        return None;
    }
    let mut out = Vec::new();
    let mut i = 0;
    while i < stem.len() {
        match stem[i] {
            b'_' => {
                let hex = std::str::from_utf8(stem.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b if b.is_ascii_alphanumeric() => {
                out.push(b);
                i += 1;
            }
            _ => return None,
        }
    }
    Some(PathBuf::from(std::ffi::OsString::from_vec(out)))
}

fn parse(file: &Path) -> Result<PodStatus, UnreadableRecord> {
    let unreadable = |error: String| UnreadableRecord {
        file: file.to_path_buf(),
        netns: netns_of(file),
        error,
    };
    let text = std::fs::read(file).map_err(|e| unreadable(e.to_string()))?;
    serde_json::from_slice(&text).map_err(|e| unreadable(format!("not a pod record: {e}")))
}

/// Every record in `dir`: the readable ones with their files, and the unreadable ones.
pub(super) fn scan(dir: &Path) -> (Vec<(PathBuf, PodStatus)>, Vec<UnreadableRecord>) {
    let (mut pods, mut unreadable) = (Vec::new(), Vec::new());
    let Ok(entries) = std::fs::read_dir(dir) else {
        return (pods, unreadable);
    };
    for e in entries.flatten() {
        let file = e.path();
        if file.extension().is_none_or(|x| x != "json") {
            continue;
        }
        match parse(&file) {
            Ok(pod) => pods.push((file, pod)),
            Err(u) => unreadable.push(u),
        }
    }
    unreadable.sort_by(|a, b| a.file.cmp(&b.file));
    (pods, unreadable)
}

/// The record of `netns`: none when there is no file, an error when there is one that cannot
/// be read.
pub(super) fn read(dir: &Path, netns: &Path) -> Result<Option<PodStatus>, UnreadableRecord> {
    let file = state_file(dir, netns);
    match std::fs::symlink_metadata(&file) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        _ => parse(&file).map(Some),
    }
}

pub(super) fn write(dir: &Path, pod: &PodStatus) -> Result<()> {
    let file = state_file(dir, &pod.netns);
    let tmp = file.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec(pod)?)?;
    std::fs::rename(&tmp, &file)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_files_are_distinct_and_bounded() {
        let d = Path::new("/state");
        let a = state_file(d, Path::new("/run/netns/pod-a"));
        assert_ne!(a, state_file(d, Path::new("/run/netns/pod_a")));
        assert_ne!(a, state_file(d, Path::new("/run/netns/pod.a")));
        let long = format!("/run/netns/{}", "./".repeat(300));
        let f = state_file(d, Path::new(&long));
        assert!(f.file_name().unwrap().len() <= 200, "{}", f.display());
        assert_ne!(f, state_file(d, Path::new(&format!("{long}x"))));
        assert_eq!(netns_of(&f), None, "a hashed name cannot be undone");
    }

    #[test]
    fn file_names_give_back_their_netns() {
        let d = Path::new("/state");
        for p in [
            "/run/netns/pod-a",
            "/proc/123/ns/net",
            "/var/run/netns/cni-1_2.x",
        ] {
            assert_eq!(
                netns_of(&state_file(d, Path::new(p))),
                Some(PathBuf::from(p))
            );
        }
        assert_eq!(netns_of(Path::new("/state/a-b.json")), None);
        assert_eq!(netns_of(Path::new("/state/_2.json")), None);
    }

    #[test]
    fn unreadable_records_are_reported_not_skipped() {
        let dir = std::env::temp_dir().join(format!("ic-records-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let netns = Path::new("/run/netns/broken");
        let file = state_file(&dir, netns);
        std::fs::write(&file, b"{\"netns\": \"/run/netns/bro").unwrap();
        let (pods, bad) = scan(&dir);
        assert!(pods.is_empty());
        assert_eq!(bad.len(), 1);
        assert_eq!(bad[0].netns.as_deref(), Some(netns));
        assert!(
            bad[0].error.contains("not a pod record"),
            "{}",
            bad[0].error
        );
        assert!(read(&dir, netns).is_err());
        assert_eq!(read(&dir, Path::new("/run/netns/absent")), Ok(None));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
