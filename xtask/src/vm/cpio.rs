//! A newc ("070701") cpio writer, the format the kernel unpacks as an initramfs, and an
//! in-memory tree of what goes in (directories, files copied from the host, generated files,
//! symlinks, device nodes) that keeps parents before children and resolves the archive's own
//! symlinks (e.g. `/lib -> usr/lib`) when something is put below one of them.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Component, Path, PathBuf};

use anyhow::{bail, Context, Result};

/// Writes newc records. Every record is padded to 4 bytes; `finish` writes the trailer.
pub struct Writer<W: Write> {
    out: W,
    ino: u32,
    pos: u64,
}

#[derive(Clone, Copy)]
struct Header {
    mode: u32,
    nlink: u32,
    size: u64,
    rdev: (u32, u32),
}

impl<W: Write> Writer<W> {
    pub fn new(out: W) -> Self {
        Self {
            out,
            ino: 1,
            pos: 0,
        }
    }

    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.pos += bytes.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> io::Result<()> {
        let n = (4 - (self.pos % 4) as usize) % 4;
        self.put(&[0u8; 3][..n])
    }

    fn header(&mut self, name: &str, h: Header) -> io::Result<()> {
        let size = u32::try_from(h.size)
            .map_err(|_| io::Error::other(format!("{name}: larger than 4 GiB")))?;
        let ino = self.ino;
        self.ino += 1;
        let fields = [
            ino,
            h.mode,
            0, // uid
            0, // gid
            h.nlink,
            0, // mtime: fixed, so the archive is reproducible
            size,
            0, // devmajor
            0, // devminor
            h.rdev.0,
            h.rdev.1,
            name.len() as u32 + 1,
            0, // check
        ];
        let mut head = String::with_capacity(110);
        head.push_str("070701");
        for f in fields {
            head.push_str(&format!("{f:08x}"));
        }
        self.put(head.as_bytes())?;
        self.put(name.as_bytes())?;
        self.put(&[0])?;
        self.pad()
    }

    pub fn dir(&mut self, name: &str, perm: u32) -> io::Result<()> {
        let h = Header {
            mode: 0o040000 | perm,
            nlink: 2,
            size: 0,
            rdev: (0, 0),
        };
        self.header(name, h)
    }

    pub fn file(&mut self, name: &str, perm: u32, data: &[u8]) -> io::Result<()> {
        let h = Header {
            mode: 0o100000 | perm,
            nlink: 1,
            size: data.len() as u64,
            rdev: (0, 0),
        };
        self.header(name, h)?;
        self.put(data)?;
        self.pad()
    }

    /// A regular file streamed from `src` (which must not change size meanwhile).
    pub fn file_from(&mut self, name: &str, perm: u32, src: &Path) -> Result<()> {
        let mut f = File::open(src).with_context(|| format!("open {}", src.display()))?;
        let size = f.metadata()?.len();
        let h = Header {
            mode: 0o100000 | perm,
            nlink: 1,
            size,
            rdev: (0, 0),
        };
        self.header(name, h)?;
        let copied = io::copy(&mut f, &mut self.out)?;
        if copied != size {
            bail!("{} changed size while being archived", src.display());
        }
        self.pos += copied;
        self.pad()?;
        Ok(())
    }

    pub fn symlink(&mut self, name: &str, target: &str) -> io::Result<()> {
        let h = Header {
            mode: 0o120777,
            nlink: 1,
            size: target.len() as u64,
            rdev: (0, 0),
        };
        self.header(name, h)?;
        self.put(target.as_bytes())?;
        self.pad()
    }

    pub fn chardev(&mut self, name: &str, perm: u32, major: u32, minor: u32) -> io::Result<()> {
        let h = Header {
            mode: 0o020000 | perm,
            nlink: 1,
            size: 0,
            rdev: (major, minor),
        };
        self.header(name, h)
    }

    pub fn finish(mut self) -> io::Result<W> {
        let h = Header {
            mode: 0,
            nlink: 1,
            size: 0,
            rdev: (0, 0),
        };
        self.header("TRAILER!!!", h)?;
        self.out.flush()?;
        Ok(self.out)
    }
}

/// One entry of the archive tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    Dir,
    /// Copied from this host file when the archive is written.
    HostFile {
        src: PathBuf,
        perm: u32,
    },
    Bytes {
        data: Vec<u8>,
        perm: u32,
    },
    Symlink(PathBuf),
    CharDev {
        major: u32,
        minor: u32,
    },
}

/// The archive's contents, keyed by absolute guest path. A path's parents always sort before
/// it, so writing in key order creates every directory before its children.
#[derive(Default, Clone)]
pub struct Tree {
    entries: BTreeMap<PathBuf, Entry>,
}

/// `p` made lexically absolute and normal (`.` and `..` folded; `..` at the root stays there).
pub fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::ParentDir => {
                out.pop();
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    out
}

impl Tree {
    /// Where `path` lands once the tree's own symlinks along it are followed (not the last
    /// component: that one is what gets created).
    pub fn resolve_parent(&self, path: &Path) -> Result<PathBuf> {
        let path = normalize(path);
        let Some(name) = path.file_name() else {
            return Ok(path);
        };
        let parent = self.resolve(path.parent().unwrap_or(Path::new("/")), 0)?;
        Ok(parent.join(name))
    }

    fn resolve(&self, path: &Path, depth: u32) -> Result<PathBuf> {
        if depth > 40 {
            bail!("too many symlink levels resolving {}", path.display());
        }
        let mut cur = PathBuf::from("/");
        let norm = normalize(path);
        let comps: Vec<_> = norm.components().skip(1).collect();
        for (i, c) in comps.iter().enumerate() {
            let next = cur.join(c);
            if let Some(Entry::Symlink(target)) = self.entries.get(&next) {
                let mut redirected = normalize(&cur.join(target));
                for rest in &comps[i + 1..] {
                    redirected.push(rest);
                }
                return self.resolve(&redirected, depth + 1);
            }
            cur = next;
        }
        Ok(cur)
    }

    /// Creates `path` and its parents as directories (following the tree's symlinks).
    pub fn mkdir_p(&mut self, path: &Path) -> Result<PathBuf> {
        let path = self.resolve(path, 0)?;
        let mut cur = PathBuf::from("/");
        for c in path.components().skip(1) {
            cur.push(c);
            match self.entries.get(&cur) {
                None => {
                    self.entries.insert(cur.clone(), Entry::Dir);
                }
                Some(Entry::Dir) => {}
                Some(other) => bail!("{} is already {other:?}, not a directory", cur.display()),
            }
        }
        Ok(path)
    }

    /// Puts `entry` at `path` (parents created). Re-putting an identical entry is a no-op;
    /// a different one is an error, so two sources never silently fight over a path.
    pub fn put(&mut self, path: &Path, entry: Entry) -> Result<PathBuf> {
        let path = self.resolve_parent(path)?;
        if let Some(parent) = path.parent() {
            self.mkdir_p(parent)?;
        }
        match self.entries.get(&path) {
            Some(old) if *old == entry => {}
            Some(Entry::Dir) if entry == Entry::Dir => {}
            Some(old) => bail!(
                "{} is already {old:?}; cannot also make it {entry:?}",
                path.display()
            ),
            None => {
                self.entries.insert(path.clone(), entry);
            }
        }
        Ok(path)
    }

    pub fn contains(&self, path: &Path) -> bool {
        self.resolve(path, 0)
            .is_ok_and(|p| self.entries.contains_key(&p))
    }

    /// Mirrors host `path` at the same guest path: every symlink met on the way (`/lib ->
    /// usr/lib`, `/etc/alternatives/…`) becomes the same symlink in the archive and the file
    /// itself is copied where it really lives. Directories are created, not copied.
    pub fn add_host(&mut self, path: &Path) -> Result<()> {
        self.add_host_depth(&normalize(path), 0)
    }

    fn add_host_depth(&mut self, path: &Path, depth: u32) -> Result<()> {
        if depth > 40 {
            bail!("too many symlink levels at {}", path.display());
        }
        let comps: Vec<_> = path.components().skip(1).collect();
        let mut cur = PathBuf::from("/");
        for (i, c) in comps.iter().enumerate() {
            let next = cur.join(c);
            let meta = std::fs::symlink_metadata(&next)
                .with_context(|| format!("host path {}", next.display()))?;
            if meta.file_type().is_symlink() {
                let target = std::fs::read_link(&next)?;
                self.put(&next, Entry::Symlink(target.clone()))?;
                let mut resolved = normalize(&cur.join(&target));
                for rest in &comps[i + 1..] {
                    resolved.push(rest);
                }
                return self.add_host_depth(&resolved, depth + 1);
            }
            cur = next;
        }
        let meta = std::fs::metadata(&cur)?;
        if meta.is_dir() {
            self.mkdir_p(&cur)?;
        } else {
            use std::os::unix::fs::PermissionsExt;
            let perm = meta.permissions().mode() & 0o7777;
            self.put(
                &cur,
                Entry::HostFile {
                    src: cur.clone(),
                    perm,
                },
            )?;
        }
        Ok(())
    }

    /// Mirrors a whole host directory tree (symlinks inside it stay symlinks; their targets
    /// are mirrored too).
    pub fn add_host_tree(&mut self, dir: &Path) -> Result<()> {
        self.add_host(dir)?;
        let real = std::fs::canonicalize(dir)?;
        for e in std::fs::read_dir(&real)? {
            let e = e?;
            let p = e.path();
            if e.file_type()?.is_dir() {
                self.add_host_tree(&p)?;
            } else {
                self.add_host(&p)?;
            }
        }
        Ok(())
    }

    /// Writes the archive (uncompressed newc) to `out`.
    pub fn write(&self, out: &Path) -> Result<u64> {
        let f = File::create(out).with_context(|| format!("create {}", out.display()))?;
        let mut w = Writer::new(BufWriter::with_capacity(1 << 20, f));
        for (path, entry) in &self.entries {
            // newc names are relative to the archive root.
            let name = path.strip_prefix("/").unwrap_or(path).to_string_lossy();
            match entry {
                Entry::Dir => w.dir(&name, 0o755)?,
                Entry::HostFile { src, perm } => w.file_from(&name, *perm, src)?,
                Entry::Bytes { data, perm } => w.file(&name, *perm, data)?,
                Entry::Symlink(t) => w.symlink(&name, &t.to_string_lossy())?,
                Entry::CharDev { major, minor } => w.chardev(&name, 0o600, *major, *minor)?,
            }
        }
        let pos = w.pos;
        w.finish()?;
        Ok(pos)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newc_layout() {
        let mut w = Writer::new(Vec::new());
        w.file("a", 0o644, b"xyz").unwrap();
        let out = w.finish().unwrap();
        let s = String::from_utf8_lossy(&out);
        assert!(s.starts_with("070701"));
        // 110-byte header + "a\0" = 112 (aligned), then 3 bytes of data padded to 4.
        assert_eq!(&out[110..112], b"a\0");
        assert_eq!(&out[112..115], b"xyz");
        assert_eq!(out.len() % 4, 0);
        assert!(s.contains("TRAILER!!!"));
    }

    #[test]
    fn tree_follows_own_symlinks() {
        let mut t = Tree::default();
        t.put(Path::new("/lib"), Entry::Symlink("usr/lib".into()))
            .unwrap();
        let p = t
            .put(
                Path::new("/lib/modules/x.ko"),
                Entry::Bytes {
                    data: vec![],
                    perm: 0o644,
                },
            )
            .unwrap();
        assert_eq!(p, Path::new("/usr/lib/modules/x.ko"));
        assert!(t.contains(Path::new("/lib/modules/x.ko")));
        assert_eq!(normalize(Path::new("/a/b/../c/./d")), Path::new("/a/c/d"));
    }
}
