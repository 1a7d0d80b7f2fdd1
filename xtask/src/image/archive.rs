//! Reproducible archives: tar (the `tar` crate, POSIX ustar headers) and gzip (`flate2`), so
//! that the same entries give the same bytes. Every entry is owned by 0:0 with one fixed mtime
//! and no user/group names, atime, ctime or extended attributes; the gzip member has no name
//! and no mtime in its header.

use std::io::Write;

use anyhow::{Context, Result};

/// What one archive entry is.
pub enum Kind<'a> {
    Dir,
    File(&'a [u8]),
    Symlink(&'a str),
}

pub struct Writer {
    tar: tar::Builder<Vec<u8>>,
    mtime: u64,
}

impl Writer {
    pub fn new(mtime: u64) -> Self {
        Self {
            tar: tar::Builder::new(Vec::new()),
            mtime,
        }
    }

    /// Appends `path` (relative, no leading `/`).
    pub fn entry(&mut self, path: &str, mode: u32, kind: Kind<'_>) -> Result<()> {
        let mut h = tar::Header::new_ustar();
        h.set_mode(mode & 0o7777);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(self.mtime);
        let data: &[u8] = match kind {
            Kind::Dir => {
                h.set_entry_type(tar::EntryType::Directory);
                &[]
            }
            Kind::File(data) => {
                h.set_entry_type(tar::EntryType::Regular);
                data
            }
            Kind::Symlink(target) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_link_name(target)
                    .with_context(|| format!("{path}: symlink target {target}"))?;
                &[]
            }
        };
        h.set_size(data.len() as u64);
        // ustar splits a long path into its prefix and name fields (set_path fails past both).
        h.set_path(path)
            .with_context(|| format!("{path}: not a path a ustar header holds"))?;
        h.set_cksum();
        self.tar.append(&h, data)?;
        Ok(())
    }

    /// The archive, with its end-of-archive marker.
    pub fn finish(self) -> Result<Vec<u8>> {
        Ok(self.tar.into_inner()?)
    }
}

/// `data` as one gzip member (level 9): no file name, mtime 0, OS "unknown", so the bytes
/// depend on `data` alone.
pub fn gzip(data: &[u8]) -> Result<Vec<u8>> {
    let mut gz = flate2::GzBuilder::new()
        .mtime(0)
        .operating_system(255)
        .write(Vec::new(), flate2::Compression::best());
    gz.write_all(data)?;
    Ok(gz.finish()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let mut w = Writer::new(1_700_000_000);
        w.entry("etc", 0o755, Kind::Dir).unwrap();
        w.entry("etc/passwd", 0o644, Kind::File(b"root:x:0:0::/:/x\n"))
            .unwrap();
        w.entry("bin/sh", 0o777, Kind::Symlink("busybox")).unwrap();
        w.entry(&format!("{}/file", "d".repeat(120)), 0o644, Kind::File(b""))
            .unwrap();
        w.finish().unwrap()
    }

    #[test]
    fn entries_read_back_with_fixed_metadata() {
        let bytes = sample();
        assert_eq!(bytes, sample(), "not reproducible");
        let mut a = tar::Archive::new(&bytes[..]);
        let mut seen = Vec::new();
        for e in a.entries().unwrap() {
            let e = e.unwrap();
            let h = e.header();
            assert_eq!((h.uid().unwrap(), h.gid().unwrap()), (0, 0));
            assert_eq!(h.mtime().unwrap(), 1_700_000_000);
            assert_eq!(h.username().unwrap(), Some(""));
            seen.push((
                e.path().unwrap().display().to_string(),
                h.entry_type(),
                h.mode().unwrap(),
            ));
        }
        assert_eq!(seen[0], ("etc".into(), tar::EntryType::Directory, 0o755));
        assert_eq!(seen[2].1, tar::EntryType::Symlink);
        // The long path went into prefix + name.
        assert_eq!(seen[3].0, format!("{}/file", "d".repeat(120)));
        let mut w = Writer::new(0);
        assert!(w.entry(&"x".repeat(101), 0o644, Kind::File(b"")).is_err());
    }

    #[test]
    fn gzip_round_trips_and_is_stable() {
        use std::io::Read;
        let data = b"interceptor ".repeat(1000);
        let gz = gzip(&data).unwrap();
        assert_eq!(gz, gzip(&data).unwrap());
        assert_eq!(&gz[4..8], &[0, 0, 0, 0], "mtime must be 0");
        assert_eq!(gz[3] & 0x08, 0, "no file name");
        let mut back = Vec::new();
        flate2::read::GzDecoder::new(&gz[..])
            .read_to_end(&mut back)
            .unwrap();
        assert_eq!(back, data.to_vec());
    }
}
