//! Debian kernels: resolving the newest ABI of a series in Debian's archive, downloading and
//! unpacking its packages, and staging the kernel modules the guest loads.
//!
//! apt runs with a private sources list, lists, cache and status (under the cache folder), so
//! the machine's apt configuration and state are never touched; the archive host and the
//! keyring are the machine's own.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, ensure, Context, Result};

/// Which Debian suite carries a kernel series (security suites get the newest ABI first).
/// Series not listed here are looked up in sid and experimental.
const SUITES: &[(&str, &[(&str, &str)])] = &[
    ("5.10", &[("security", "bullseye-security")]),
    ("6.1", &[("security", "bookworm-security")]),
    ("6.12", &[("security", "trixie-security")]),
];
const FALLBACK_SUITES: &[(&str, &str)] = &[("main", "sid"), ("main", "experimental")];
const KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";
/// The flavour booted: small, virtio/serial built in.
const FLAVOUR: &str = "cloud-amd64";

/// Module folders (below `kernel/`) the guest loads completely, with their dependencies:
/// netfilter for iptables (legacy and nft) and nftables, qdiscs, veth, bridge.
const MODULE_DIRS: &[&str] = &[
    "net/netfilter",
    "net/ipv4/netfilter",
    "net/ipv6/netfilter",
    "net/sched",
    "drivers/net/veth",
    // Linux bridge, for the CNI chain tests' reference bridge plugin.
    "net/bridge",
    // Text search, which the amanda conntrack helper asks for at load time.
    "lib/ts_kmp",
    "lib/ts_bm",
    "lib/ts_fsm",
];

/// A kernel ready to boot.
#[derive(Debug, Clone)]
pub struct Kernel {
    /// Series asked for, e.g. `6.1`.
    pub series: String,
    pub suite: String,
    /// e.g. `linux-image-6.1.0-56-cloud-amd64`.
    pub package: String,
    /// Debian version, e.g. `6.1.192-2`.
    pub version: String,
    /// `uname -r`, e.g. `6.1.0-56-cloud-amd64`.
    pub release: String,
    /// Every package unpacked, `name=version`.
    pub debs: Vec<String>,
    pub vmlinuz: PathBuf,
    /// Staged modules: `<stage>/lib/modules/<release>/…` as plain `.ko`, depmod'ed.
    pub stage: PathBuf,
    /// Module files relative to `<stage>`, dependencies first.
    pub load_order: Vec<PathBuf>,
}

/// The private apt setup.
pub struct Apt {
    dir: PathBuf,
    uris: (String, String),
}

impl Apt {
    pub fn new(cache: &Path) -> Result<Self> {
        let dir = cache.join("apt");
        for d in ["lists/partial", "cache/archives/partial", "debs"] {
            std::fs::create_dir_all(dir.join(d))?;
        }
        let status = dir.join("status");
        if !status.exists() {
            std::fs::write(&status, "")?;
        }
        ensure!(
            Path::new(KEYRING).exists(),
            "{KEYRING} missing: install debian-archive-keyring"
        );
        Ok(Self {
            dir,
            uris: archive_uris(),
        })
    }

    fn opts(&self) -> Vec<String> {
        let d = |s: &str| self.dir.join(s).display().to_string();
        [
            format!("Dir::Etc::sourcelist={}", d("sources.list")),
            "Dir::Etc::sourceparts=-".into(),
            format!("Dir::State::Lists={}", d("lists")),
            format!("Dir::Cache={}", d("cache")),
            format!("Dir::State::status={}", d("status")),
            "APT::Sandbox::User=root".into(),
            "Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false".into(),
            "Acquire::Languages=none".into(),
            "APT::Architecture=amd64".into(),
            "APT::Architectures=amd64".into(),
        ]
        .into_iter()
        .flat_map(|o| ["-o".to_string(), o])
        .collect()
    }

    fn apt(&self, tool: &str, args: &[&str]) -> Result<String> {
        let out = Command::new(tool)
            .args(self.opts())
            .args(args)
            .current_dir(self.dir.join("debs"))
            .output()
            .with_context(|| format!("running {tool}"))?;
        if !out.status.success() {
            bail!(
                "{tool} {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Writes the sources list for `series` and refreshes its package lists (unless
    /// `offline`, or when refreshing fails but lists from an earlier run exist).
    pub fn update(&self, series: &[String], offline: bool) -> Result<()> {
        let mut suites = BTreeSet::new();
        for s in series {
            suites.extend(suites_for(s));
        }
        let mut list = String::new();
        for (kind, suite) in &suites {
            let uri = if *kind == "security" {
                &self.uris.1
            } else {
                &self.uris.0
            };
            list.push_str(&format!("deb [signed-by={KEYRING}] {uri} {suite} main\n"));
        }
        std::fs::write(self.dir.join("sources.list"), &list)?;
        if offline {
            return Ok(());
        }
        let names: Vec<_> = suites.iter().map(|(_, s)| *s).collect();
        eprintln!("[vm] apt-get update ({})", names.join(", "));
        if let Err(e) = self.apt("apt-get", &["-q", "update"]) {
            let have = std::fs::read_dir(self.dir.join("lists"))?.count() > 2;
            if !have {
                return Err(e);
            }
            eprintln!("[vm] warning: {e:#}; using the package lists of an earlier run");
        }
        Ok(())
    }

    /// Resolves the newest `linux-image-<abi>-cloud-amd64` of `series` and the packages it
    /// is split into (7.x: linux-binary/modules/base).
    fn resolve(&self, series: &str) -> Result<(String, String, String, Vec<String>)> {
        let meta = format!("linux-image-{FLAVOUR}");
        let text = self.apt("apt-cache", &["show", &meta])?;
        let mut best: Option<(String, String)> = None;
        for stanza in text.split("\n\n") {
            let field = |name: &str| {
                stanza
                    .lines()
                    .find_map(|l| l.strip_prefix(&format!("{name}: ")))
                    .map(str::to_string)
            };
            let (Some(ver), Some(deps)) = (field("Version"), field("Depends")) else {
                continue;
            };
            if !ver.starts_with(&format!("{series}.")) {
                continue;
            }
            let newer = match &best {
                None => true,
                Some((b, _)) => dpkg_newer(&ver, b)?,
            };
            if newer {
                best = Some((ver, deps));
            }
        }
        let Some((_, deps)) = best else {
            bail!("no {meta} of series {series} in {:?}", suites_for(series));
        };
        let image = deps
            .split(',')
            .map(|d| d.split_whitespace().next().unwrap_or(""))
            .find(|d| d.starts_with("linux-image-") && d.ends_with(FLAVOUR))
            .with_context(|| format!("no linux-image-*-{FLAVOUR} in {meta}'s Depends: {deps}"))?
            .to_string();
        let policy = self.apt("apt-cache", &["policy", &image])?;
        let version = policy
            .lines()
            .find_map(|l| l.trim().strip_prefix("Candidate: "))
            .filter(|v| *v != "(none)")
            .with_context(|| format!("no candidate for {image}"))?
            .to_string();
        let show = self.apt("apt-cache", &["show", &format!("{image}={version}")])?;
        let abi = image.trim_start_matches("linux-image-").to_string();
        let mut debs = vec![format!("{image}={version}")];
        let depends = show
            .lines()
            .find_map(|l| l.strip_prefix("Depends: "))
            .unwrap_or("");
        for d in depends.split(',') {
            let name = d.split_whitespace().next().unwrap_or("");
            if name != image && name.starts_with("linux-") && name.contains(&abi) {
                debs.push(format!("{name}={version}"));
            }
        }
        let suite = policy
            .lines()
            .find(|l| l.contains(" Packages") && l.contains("http"))
            .and_then(|l| l.split_whitespace().nth(2))
            .map(|s| s.split('/').next().unwrap_or(s).to_string())
            .unwrap_or_default();
        Ok((image, version, suite, debs))
    }

    /// Resolves, downloads (once) and unpacks (once) the kernel of `series`, and stages its
    /// modules.
    pub fn kernel(&self, series: &str, cache: &Path) -> Result<Kernel> {
        let (package, version, suite, debs) = self.resolve(series)?;
        let root = cache.join("kernels").join(format!("{package}_{version}"));
        let unpacked = root.join("root");
        let stamp = root.join(".unpacked");
        if !stamp.exists() {
            let _ = std::fs::remove_dir_all(&root);
            std::fs::create_dir_all(&unpacked)?;
            for deb in &debs {
                let path = self.download(deb)?;
                let st = Command::new("dpkg-deb")
                    .arg("-x")
                    .arg(&path)
                    .arg(&unpacked)
                    .status()
                    .context("running dpkg-deb")?;
                ensure!(st.success(), "dpkg-deb -x {} failed", path.display());
            }
            std::fs::write(&stamp, debs.join("\n"))?;
        }
        let release = package.trim_start_matches("linux-image-").to_string();
        let moddir = ["lib/modules", "usr/lib/modules"]
            .iter()
            .map(|d| unpacked.join(d).join(&release))
            .find(|d| d.join("kernel").is_dir())
            .with_context(|| format!("no modules of {release} in {}", unpacked.display()))?;
        let vmlinuz = [
            unpacked.join("boot").join(format!("vmlinuz-{release}")),
            moddir.join("vmlinuz"),
        ]
        .into_iter()
        .find(|p| p.exists())
        .with_context(|| format!("no vmlinuz of {release}"))?;
        let stage = root.join("stage");
        let load_order = stage_modules(&moddir, &stage, &release)?;
        Ok(Kernel {
            series: series.to_string(),
            suite,
            package,
            version,
            release,
            debs,
            vmlinuz,
            stage,
            load_order,
        })
    }

    fn download(&self, deb: &str) -> Result<PathBuf> {
        let (name, version) = deb.split_once('=').expect("name=version");
        let file = format!("{name}_{}_amd64.deb", version.replace(':', "%3a"));
        let path = self.dir.join("debs").join(&file);
        if !path.exists() {
            eprintln!("[vm] downloading {deb}");
            self.apt("apt-get", &["-q", "download", deb])?;
        }
        ensure!(path.exists(), "{} not found after download", path.display());
        Ok(path)
    }
}

fn suites_for(series: &str) -> Vec<(&'static str, &'static str)> {
    SUITES
        .iter()
        .find(|(s, _)| *s == series)
        .map(|(_, l)| l.to_vec())
        .unwrap_or_else(|| FALLBACK_SUITES.to_vec())
}

/// `a` is a newer Debian version than `b`.
fn dpkg_newer(a: &str, b: &str) -> Result<bool> {
    Ok(Command::new("dpkg")
        .args(["--compare-versions", a, "gt", b])
        .status()
        .context("running dpkg --compare-versions")?
        .success())
}

/// The machine's Debian archive and security archive URIs (from its apt sources), so the
/// private list reaches the same mirror.
fn archive_uris() -> (String, String) {
    let mut main = None;
    let mut security = None;
    let mut texts = Vec::new();
    if let Ok(t) = std::fs::read_to_string("/etc/apt/sources.list") {
        texts.push(t);
    }
    if let Ok(rd) = std::fs::read_dir("/etc/apt/sources.list.d") {
        for e in rd.flatten() {
            let p = e.path();
            let ext = p.extension().and_then(|e| e.to_str()).unwrap_or("");
            if ext == "sources" || ext == "list" {
                if let Ok(t) = std::fs::read_to_string(&p) {
                    texts.push(t);
                }
            }
        }
    }
    for t in texts {
        for l in t.lines() {
            let l = l.trim();
            let uris: Vec<&str> = if let Some(rest) = l.strip_prefix("URIs:") {
                rest.split_whitespace().collect()
            } else if l.starts_with("deb ") {
                l.split_whitespace()
                    .filter(|w| w.starts_with("http"))
                    .take(1)
                    .collect()
            } else {
                continue;
            };
            for u in uris {
                let u = u.trim_end_matches('/').to_string();
                if u.ends_with("/debian-security") {
                    security.get_or_insert(u);
                } else if u.ends_with("/debian") {
                    main.get_or_insert(u);
                }
            }
        }
    }
    (
        main.unwrap_or_else(|| "http://deb.debian.org/debian".into()),
        security.unwrap_or_else(|| "http://deb.debian.org/debian-security".into()),
    )
}

/// Copies the wanted modules and their dependency closure from `moddir` into
/// `<stage>/lib/modules/<release>/` decompressed, runs depmod there, and returns the load
/// order (relative to `stage`).
fn stage_modules(moddir: &Path, stage: &Path, release: &str) -> Result<Vec<PathBuf>> {
    let order_file = stage.join("load-order");
    let rel_root = PathBuf::from("lib/modules").join(release);
    // The cached order is valid for the module folders it was made from (its first line).
    let header = format!("# {}", MODULE_DIRS.join(","));
    if let Ok(text) = std::fs::read_to_string(&order_file) {
        let mut lines = text.lines();
        if lines.next() == Some(header.as_str()) {
            return Ok(lines.map(PathBuf::from).collect());
        }
    }
    // depmod wants <base>/lib/modules/<release>; point one at the unpacked folder.
    let base = stage.with_file_name("depmod-base");
    let link = base.join("lib/modules").join(release);
    if !moddir.join("modules.dep").exists() {
        std::fs::create_dir_all(link.parent().expect("parent"))?;
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(moddir, &link)?;
        depmod(&base, release)?;
    }
    let deps = parse_modules_dep(&std::fs::read_to_string(moddir.join("modules.dep"))?);
    let wanted: Vec<&String> = deps
        .keys()
        .filter(|m| {
            let m = m.trim_start_matches("kernel/");
            MODULE_DIRS
                .iter()
                .any(|d| m.starts_with(&format!("{d}/")) || m.starts_with(&format!("{d}.ko")))
        })
        .collect();
    let mut order = Vec::new();
    let mut seen = BTreeSet::new();
    for m in wanted {
        visit(m, &deps, &mut seen, &mut order);
    }
    let _ = std::fs::remove_dir_all(stage);
    let dst_root = stage.join(&rel_root);
    std::fs::create_dir_all(&dst_root)?;
    let mut load = Vec::new();
    for m in &order {
        let src = moddir.join(m);
        let plain = strip_compression(m);
        let dst = dst_root.join(&plain);
        std::fs::create_dir_all(dst.parent().expect("parent"))?;
        decompress(&src, &dst)?;
        load.push(rel_root.join(&plain));
    }
    for f in [
        "modules.order",
        "modules.builtin",
        "modules.builtin.modinfo",
    ] {
        if moddir.join(f).exists() {
            std::fs::copy(moddir.join(f), dst_root.join(f))?;
        }
    }
    depmod(stage, release)?;
    let mut text = vec![header];
    text.extend(load.iter().map(|p| p.display().to_string()));
    std::fs::write(&order_file, text.join("\n"))?;
    Ok(load)
}

fn depmod(base: &Path, release: &str) -> Result<()> {
    let depmod = ["/usr/sbin/depmod", "/sbin/depmod"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .context("depmod not found: install kmod")?;
    let out = Command::new(depmod)
        .arg("-b")
        .arg(base)
        .arg(release)
        .output()?;
    ensure!(
        out.status.success(),
        "depmod -b {} {release}: {}",
        base.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

fn parse_modules_dep(text: &str) -> BTreeMap<String, Vec<String>> {
    text.lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(m, d)| {
            (
                m.trim().to_string(),
                d.split_whitespace().map(str::to_string).collect(),
            )
        })
        .collect()
}

/// Depth-first: dependencies before the module.
fn visit(
    m: &str,
    deps: &BTreeMap<String, Vec<String>>,
    seen: &mut BTreeSet<String>,
    order: &mut Vec<String>,
) {
    if !seen.insert(m.to_string()) {
        return;
    }
    for d in deps.get(m).into_iter().flatten() {
        visit(d, deps, seen, order);
    }
    order.push(m.to_string());
}

fn strip_compression(m: &str) -> String {
    for ext in [".xz", ".zst", ".gz"] {
        if let Some(s) = m.strip_suffix(ext) {
            return s.to_string();
        }
    }
    m.to_string()
}

fn decompress(src: &Path, dst: &Path) -> Result<()> {
    let name = src.to_string_lossy();
    let tool = if name.ends_with(".xz") {
        Some("xz")
    } else if name.ends_with(".zst") {
        Some("zstd")
    } else if name.ends_with(".gz") {
        Some("gzip")
    } else {
        None
    };
    match tool {
        None => {
            std::fs::copy(src, dst)?;
        }
        Some(t) => {
            let out = Command::new(t)
                .arg("-dc")
                .arg(src)
                .output()
                .with_context(|| format!("running {t}"))?;
            ensure!(out.status.success(), "{t} -dc {}", src.display());
            std::fs::write(dst, out.stdout)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closure_puts_dependencies_first() {
        let deps = parse_modules_dep(
            "kernel/a.ko: kernel/b.ko kernel/c.ko\nkernel/b.ko: kernel/c.ko\nkernel/c.ko:\n",
        );
        let (mut seen, mut order) = (BTreeSet::new(), Vec::new());
        visit("kernel/a.ko", &deps, &mut seen, &mut order);
        assert_eq!(order, ["kernel/c.ko", "kernel/b.ko", "kernel/a.ko"]);
        assert_eq!(strip_compression("x/y.ko.xz"), "x/y.ko");
    }
}
