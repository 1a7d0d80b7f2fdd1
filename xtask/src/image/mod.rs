//! `cargo xtask image`: the node image (OCI), built offline from Debian packages — no registry
//! is ever pulled from.
//!
//! 1. The packages are pinned in `deploy/image/packages.lock` (exact version and SHA-256 of
//!    each .deb); `--update-lock` regenerates it from this machine's apt (the closure of
//!    [`ROOTS`], plus [`ONLY`]).
//! 2. Each .deb is fetched once into a cache (`apt-get download name=version`, checked against
//!    the lock) and unpacked with `dpkg-deb -x`: no maintainer script runs. With a full cache
//!    nothing touches the network (`--offline` insists on it).
//! 3. The root filesystem: the packages' files without documentation, manuals and
//!    translations ([`excluded`]), the symlinks update-alternatives would make (`iptables` →
//!    `iptables-nft`, Debian's default), the static musl `interceptor` (release build, by
//!    vm::build, stripped), `/etc/passwd` and `/etc/group` with root only, and `/tmp`. Every symlink must
//!    resolve inside it and every ELF file's libraries must be in it.
//! 4. One layer tar (entries sorted, one mtime from the lock, 0:0, no names, no xattrs),
//!    gzip without name or mtime, the OCI config, manifest, index and `oci-layout`: the same
//!    lock and binary give the same digest. Written as an OCI layout folder and an OCI
//!    archive (what `ctr images import` and `kind load image-archive` take).

mod archive;
mod debs;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde_json::json;

use crate::vm::build;
use debs::{sha256_hex, Lock};

/// Packages that go in with their dependency closure: iptables (both variants: the daemon
/// picks legacy or nft per pod, as istio-iptables does), nftables (`nft`), and libselinux1
/// (the one library nsenter needs besides libc).
const ROOTS: &[&str] = &["iptables", "nftables", "libselinux1"];
/// Packages of which only these files go in, without the package's dependencies: all the
/// image needs of util-linux is nsenter (the rule tools run in a pod's netns through it).
const ONLY: &[(&str, &[&str])] = &[("util-linux", &["usr/bin/nsenter"])];
/// update-alternatives' links for iptables and ip6tables, as the package's postinst makes them
/// with Debian's default (nft, priority 20 over legacy's 10). The daemon names the variant
/// itself (`iptables-nft-restore`, `iptables-legacy-save`, …); the plain names are what
/// `auto` checks for and what an operator typing `iptables` gets.
const ALTERNATIVES: &[(&str, &str)] = &[
    ("iptables", "iptables-nft"),
    ("iptables-restore", "iptables-nft-restore"),
    ("iptables-save", "iptables-nft-save"),
    ("ip6tables", "ip6tables-nft"),
    ("ip6tables-restore", "ip6tables-nft-restore"),
    ("ip6tables-save", "ip6tables-nft-save"),
];
/// Where the binary goes (the DaemonSet runs `interceptor` from PATH).
const BINARY: &str = "usr/local/bin/interceptor";
const PATH_ENV: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Folders the shared libraries are found in (ld.so's built-in multiarch paths; the image
/// has no ld.so.cache).
const LIB_DIRS: &[&str] = &[
    "lib/x86_64-linux-gnu",
    "usr/lib/x86_64-linux-gnu",
    "lib",
    "usr/lib",
];
const INTERP: &str = "lib64/ld-linux-x86-64.so.2";

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Regenerate deploy/image/packages.lock from this machine's apt (then build).
    #[arg(long)]
    update_lock: bool,
    /// Fail instead of downloading a .deb missing from the cache.
    #[arg(long)]
    offline: bool,
    /// Output folder: the OCI layout in `oci/`, the archive `interceptor-image.tar`.
    #[arg(long, default_value = "target/image")]
    out: PathBuf,
    /// Download and unpack cache (default ~/.cache/interceptor-image).
    #[arg(long, env = "INTERCEPTOR_IMAGE_CACHE")]
    cache: Option<PathBuf>,
}

/// One node of the root filesystem.
enum Node {
    Dir(u32),
    /// Mode and where the bytes are.
    File(u32, Source),
    Symlink(String),
}

enum Source {
    Path(PathBuf),
    Bytes(Vec<u8>),
}

impl Source {
    fn read(&self) -> Result<Vec<u8>> {
        match self {
            Source::Path(p) => std::fs::read(p).with_context(|| format!("reading {}", p.display())),
            Source::Bytes(b) => Ok(b.clone()),
        }
    }
}

/// Paths of a package left out: documentation (but the copyright files), manuals,
/// translations, bug-report and lintian data, systemd units, glibc's iconv modules, and the
/// iptables-apply script (needs bash).
fn excluded(path: &str) -> bool {
    const PREFIXES: &[&str] = &[
        "usr/share/man",
        "usr/share/info",
        "usr/share/locale",
        "usr/share/lintian",
        "usr/share/bug",
        "usr/share/doc-base",
        "lib/systemd",
        "usr/lib/systemd",
        "usr/lib/x86_64-linux-gnu/gconv",
        "usr/sbin/iptables-apply",
        "usr/sbin/ip6tables-apply",
    ];
    let under = |p: &str| path == p || path.starts_with(&format!("{p}/"));
    if PREFIXES.iter().any(|p| under(p)) {
        return true;
    }
    // usr/share/doc/<pkg>/copyright stays (the licences of what is shipped).
    match path.strip_prefix("usr/share/doc/") {
        Some(rest) => rest.contains('/') && !rest.ends_with("/copyright"),
        None => false,
    }
}

struct Tree(BTreeMap<String, Node>);

impl Tree {
    fn dirs_to(&mut self, path: &str) {
        let mut at = String::new();
        for part in path.split('/').filter(|s| !s.is_empty()) {
            if !at.is_empty() {
                at.push('/');
            }
            at.push_str(part);
            if at.len() < path.len() {
                self.0.entry(at.clone()).or_insert(Node::Dir(0o755));
            }
        }
    }

    fn insert(&mut self, path: &str, node: Node, from: &str) -> Result<()> {
        self.dirs_to(path);
        match (self.0.get(path), &node) {
            (None, _) => {}
            (Some(Node::Dir(_)), Node::Dir(_)) => return Ok(()),
            (Some(Node::Symlink(a)), Node::Symlink(b)) if a == b => return Ok(()),
            (Some(Node::File(_, a)), Node::File(_, b)) if a.read()? == b.read()? => return Ok(()),
            (Some(_), _) => bail!("{path}: in two packages, differently (second: {from})"),
        }
        self.0.insert(path.to_string(), node);
        Ok(())
    }

    /// Adds the unpacked package at `root` (only the paths in `only`, when given).
    fn add_package(&mut self, root: &Path, name: &str, only: Option<&[&str]>) -> Result<()> {
        let mut stack = vec![root.to_path_buf()];
        while let Some(dir) = stack.pop() {
            let mut entries: Vec<_> = std::fs::read_dir(&dir)?.flatten().collect();
            entries.sort_by_key(|e| e.file_name());
            for e in entries {
                let p = e.path();
                let rel = p
                    .strip_prefix(root)?
                    .to_str()
                    .with_context(|| format!("{}: not UTF-8", p.display()))?
                    .to_string();
                if excluded(&rel) {
                    continue;
                }
                let wanted = only.is_none_or(|o| {
                    o.iter()
                        .any(|f| *f == rel || f.starts_with(&format!("{rel}/")))
                });
                if !wanted {
                    continue;
                }
                let meta = std::fs::symlink_metadata(&p)?;
                use std::os::unix::fs::PermissionsExt;
                let mode = meta.permissions().mode() & 0o7777;
                let ft = meta.file_type();
                if ft.is_dir() {
                    if only.is_none() {
                        self.insert(&rel, Node::Dir(mode), name)?;
                    }
                    stack.push(p);
                } else if ft.is_symlink() {
                    let t = std::fs::read_link(&p)?;
                    let t = t.to_str().context("symlink target not UTF-8")?.to_string();
                    self.insert(&rel, Node::Symlink(t), name)?;
                } else if ft.is_file() {
                    self.insert(&rel, Node::File(mode, Source::Path(p)), name)?;
                } else {
                    bail!("{name}: {rel}: neither file, folder nor symlink");
                }
            }
        }
        Ok(())
    }

    /// Where `path` leads, following the tree's symlinks (in every component); None if it
    /// leaves the tree or dangles.
    fn resolve(&self, path: &str) -> Option<String> {
        let mut parts: Vec<String> = path
            .split('/')
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect();
        parts.reverse();
        let mut at: Vec<String> = Vec::new();
        let mut hops = 0;
        while let Some(part) = parts.pop() {
            match part.as_str() {
                "." => continue,
                ".." => {
                    at.pop();
                    continue;
                }
                _ => {}
            }
            at.push(part);
            let cur = at.join("/");
            match self.0.get(&cur)? {
                Node::Symlink(t) => {
                    hops += 1;
                    if hops > 40 {
                        return None;
                    }
                    at.pop();
                    if t.starts_with('/') {
                        at.clear();
                    }
                    for p in t.split('/').filter(|s| !s.is_empty()).rev() {
                        parts.push(p.to_string());
                    }
                }
                Node::Dir(_) | Node::File(..) => {}
            }
        }
        Some(at.join("/"))
    }

    /// Every symlink resolves in the tree, and every dynamically linked ELF file finds its
    /// interpreter and libraries in it.
    fn check(&self) -> Result<()> {
        let mut problems = Vec::new();
        for (path, node) in &self.0 {
            match node {
                Node::Symlink(t) => {
                    if self.resolve(path).is_none() {
                        problems.push(format!("{path} -> {t}: dangles"));
                    }
                }
                Node::File(_, Source::Path(src)) => {
                    for lib in needed(src)? {
                        let found = LIB_DIRS
                            .iter()
                            .any(|d| self.resolve(&format!("{d}/{lib}")).is_some());
                        if !found {
                            problems.push(format!("{path} needs {lib}: not in the image"));
                        }
                        if self.resolve(INTERP).is_none() {
                            problems.push(format!("{path}: no {INTERP}"));
                        }
                    }
                }
                _ => {}
            }
        }
        if !problems.is_empty() {
            bail!(
                "the root filesystem is incomplete:\n  {}",
                problems.join("\n  ")
            );
        }
        Ok(())
    }

    /// The layer: every node in path order.
    fn layer(&self, mtime: u64) -> Result<Vec<u8>> {
        let mut w = archive::Writer::new(mtime);
        for (path, node) in &self.0 {
            match node {
                Node::Dir(mode) => w.entry(path, *mode, archive::Kind::Dir)?,
                Node::File(mode, src) => w.entry(path, *mode, archive::Kind::File(&src.read()?))?,
                Node::Symlink(t) => w.entry(path, 0o777, archive::Kind::Symlink(t))?,
            }
        }
        w.finish()
    }
}

/// The DT_NEEDED libraries of `file` if it is a dynamically linked ELF file (objdump -p, from
/// binutils).
fn needed(file: &Path) -> Result<Vec<String>> {
    let mut magic = [0u8; 4];
    use std::io::Read;
    let n = std::fs::File::open(file)?.read(&mut magic)?;
    if n < 4 || &magic != b"\x7fELF" {
        return Ok(Vec::new());
    }
    let out = Command::new("objdump")
        .arg("-p")
        .arg(file)
        .output()
        .context("running objdump (binutils)")?;
    if !out.status.success() {
        bail!(
            "objdump -p {}: {}",
            file.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().strip_prefix("NEEDED"))
        .map(|l| l.trim().to_string())
        .collect())
}

/// `binary` without its symbol table and debug sections (binutils' `strip`, deterministic):
/// a quarter smaller. The eBPF object inside it is data, untouched.
fn stripped(binary: &Path, out: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(out)?;
    let to = out.join("interceptor");
    let st = Command::new("strip")
        .arg("--strip-all")
        .arg("-o")
        .arg(&to)
        .arg(binary)
        .status()
        .context("running strip (binutils)")?;
    if !st.success() {
        bail!("strip {}: {st}", binary.display());
    }
    Ok(to)
}

fn digest(data: &[u8]) -> String {
    format!("sha256:{}", sha256_hex(data))
}

fn mib(n: usize) -> String {
    format!("{:.1} MiB", n as f64 / 1048576.0)
}

pub fn run(args: Args) -> Result<()> {
    let root = crate::vm::workspace_root();
    let lock_path = root.join("deploy/image/packages.lock");
    let cache = args
        .cache
        .clone()
        .unwrap_or_else(|| crate::vm::user_cache("interceptor-image"));
    let out = if args.out.is_absolute() {
        args.out.clone()
    } else {
        root.join(&args.out)
    };
    if args.update_lock {
        let alone: Vec<&str> = ONLY.iter().map(|(n, _)| *n).collect();
        let lock = debs::resolve(ROOTS, &alone)?;
        lock.write(&lock_path)?;
        eprintln!(
            "[image] wrote {} ({} packages)",
            lock_path.display(),
            lock.packages.len()
        );
    }
    let lock = Lock::read(&lock_path)?;
    for r in ROOTS.iter().chain(ONLY.iter().map(|(n, _)| n)) {
        lock.get(r)?;
    }

    let binary = stripped(&build::interceptor(&root, &["--release"])?, &out)?;
    let mut tree = Tree(BTreeMap::new());
    for p in &lock.packages {
        let deb = debs::fetch(p, &cache, args.offline)?;
        let dir = debs::unpack(p, &deb, &cache)?;
        let only = ONLY.iter().find(|(n, _)| *n == p.name).map(|(_, o)| *o);
        tree.add_package(&dir, &p.name, only)?;
    }
    for (name, target) in ALTERNATIVES {
        tree.insert(
            &format!("usr/sbin/{name}"),
            Node::Symlink(format!("/etc/alternatives/{name}")),
            "alternatives",
        )?;
        tree.insert(
            &format!("etc/alternatives/{name}"),
            Node::Symlink(format!("/usr/sbin/{target}")),
            "alternatives",
        )?;
    }
    tree.insert(
        BINARY,
        Node::File(0o755, Source::Path(binary.clone())),
        "interceptor",
    )?;
    let etc = [
        ("etc/passwd", "root:x:0:0:root:/root:/usr/sbin/nologin\n"),
        ("etc/group", "root:x:0:\n"),
    ];
    for (path, text) in etc {
        tree.insert(path, Node::File(0o644, Source::Bytes(text.into())), "image")?;
    }
    tree.insert("tmp", Node::Dir(0o1777), "image")?;
    tree.check()?;

    let layer = tree.layer(lock.source_date_epoch)?;
    let layer_gz = archive::gzip(&layer)?;
    let version = interceptor_tests::image::VERSION;
    let config = json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Entrypoint": [format!("/{BINARY}")],
            "Env": [PATH_ENV],
            "Labels": {
                "org.opencontainers.image.title": "interceptor",
                "org.opencontainers.image.version": version,
            },
        },
        "rootfs": {"type": "layers", "diff_ids": [digest(&layer)]},
    });
    let config = serde_json::to_vec(&config)?;
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": digest(&config),
            "size": config.len(),
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": digest(&layer_gz),
            "size": layer_gz.len(),
        }],
    }))?;
    let manifest_digest = digest(&manifest);
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest,
            "size": manifest.len(),
            "platform": {"architecture": "amd64", "os": "linux"},
            "annotations": {
                // containerd's import (ctr, kind) names the image by this; the kubelet looks
                // `interceptor:<version>` up as docker.io/library/interceptor:<version>.
                "io.containerd.image.name": interceptor_tests::image::containerd_name(),
                "org.opencontainers.image.ref.name": version,
            },
        }],
    }))?;
    let layout = br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec();
    let blobs: Vec<(String, &[u8])> = [&config[..], &layer_gz, &manifest]
        .into_iter()
        .map(|b| (sha256_hex(b), b))
        .collect();
    write_outputs(&out, &blobs, &index, &layout, lock.source_date_epoch)?;

    println!("image       {}", interceptor_tests::image::REFERENCE);
    println!("digest      {manifest_digest}");
    println!(
        "layer       {} compressed, {} uncompressed ({} paths; interceptor {})",
        mib(layer_gz.len()),
        mib(layer.len()),
        tree.0.len(),
        mib(std::fs::metadata(&binary)?.len() as usize),
    );
    println!("oci layout  {}", out.join("oci").display());
    println!("archive     {}", out.join(ARCHIVE).display());
    Ok(())
}

pub const ARCHIVE: &str = "interceptor-image.tar";

/// The OCI layout folder `out/oci` and the same as one archive `out/<ARCHIVE>`.
fn write_outputs(
    out: &Path,
    blobs: &[(String, &[u8])],
    index: &[u8],
    layout: &[u8],
    mtime: u64,
) -> Result<()> {
    let dir = out.join("oci");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("blobs/sha256"))?;
    let mut files: BTreeMap<String, &[u8]> = BTreeMap::new();
    for (hex, data) in blobs {
        files.insert(format!("blobs/sha256/{hex}"), data);
    }
    files.insert("index.json".into(), index);
    files.insert("oci-layout".into(), layout);
    let mut w = archive::Writer::new(mtime);
    w.entry("blobs", 0o755, archive::Kind::Dir)?;
    w.entry("blobs/sha256", 0o755, archive::Kind::Dir)?;
    for (name, data) in &files {
        std::fs::write(dir.join(name), data)?;
        w.entry(name, 0o644, archive::Kind::File(data))?;
    }
    let archive = out.join(ARCHIVE);
    let tmp = out.join(format!(".{ARCHIVE}.tmp"));
    std::fs::write(&tmp, w.finish()?)?;
    std::fs::rename(&tmp, &archive)?;
    Ok(())
}
