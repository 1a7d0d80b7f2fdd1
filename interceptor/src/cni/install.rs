//! `interceptor cni-install` / `cni-uninstall`: put the binary into the CNI bin dir and chain
//! our entry after the node's primary network config, as Istio's and Linkerd's installers do.
//!
//! The primary config is the first file of the conf dir in lexical order (the runtime's own
//! choice) that is a usable network config: a `.conflist` (or `.json`) with a non-empty
//! `plugins` list, or a single-plugin `.conf` (or `.json`) with a `type`. A single-plugin
//! config is turned into a list, written as `<name>.conflist`, and the `.conf` is removed (as
//! Istio does). Our entry is appended to `plugins` (an existing one is updated in place of
//! being duplicated, keeping keys an operator added); nothing is written when nothing changes.
//! Uninstall removes our entry from every list in the conf dir, then the binary; a list
//! converted from a `.conf` stays a list.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::{json, Map, Value};

use super::spec::{CRI_POD_ANNOTATIONS, PLUGIN_TYPE};

/// Where the node's CNI setup lives, and the daemon socket our conflist entry names.
#[derive(Debug, Clone)]
pub struct Dirs {
    /// The folder the container runtime runs CNI plugins from.
    pub bin: PathBuf,
    /// The folder the container runtime reads network configs from.
    pub conf: PathBuf,
    /// The daemon's control socket, written into our conflist entry.
    pub socket: PathBuf,
}

/// What `install` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Installed {
    pub binary: PathBuf,
    pub binary_written: bool,
    pub conflist: PathBuf,
    pub conflist_written: bool,
    /// The single-plugin config that was converted into `conflist` (and removed).
    pub converted_from: Option<PathBuf>,
}

/// What `uninstall` did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Uninstalled {
    /// Config files our entry was removed from.
    pub conflists: Vec<PathBuf>,
    pub binary_removed: Option<PathBuf>,
}

/// Our entry in a conflist. The capability makes containerd pass the pod's annotations in
/// `runtimeConfig`.
pub fn our_entry(socket: &Path) -> Value {
    json!({
        "type": PLUGIN_TYPE,
        "socket": socket,
        "capabilities": { CRI_POD_ANNOTATIONS: true },
    })
}

fn is_ours(plugin: &Value) -> bool {
    plugin.get("type").and_then(Value::as_str) == Some(PLUGIN_TYPE)
}

/// Network config files, in the runtime's (lexical) order.
fn config_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading the CNI conf dir {}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .filter(|p| {
            p.extension()
                .is_some_and(|x| x == "conf" || x == "conflist" || x == "json")
        })
        .collect();
    files.sort();
    Ok(files)
}

enum Kind {
    List,
    Single,
}

fn classify(path: &Path, v: &Value) -> Option<Kind> {
    let ext = path.extension()?.to_str()?;
    let has_plugins = v
        .get("plugins")
        .and_then(Value::as_array)
        .is_some_and(|p| !p.is_empty());
    let has_type = v.get("type").and_then(Value::as_str).is_some();
    match ext {
        "conflist" => has_plugins.then_some(Kind::List),
        "conf" => has_type.then_some(Kind::Single),
        _ if has_plugins => Some(Kind::List),
        _ => has_type.then_some(Kind::Single),
    }
}

fn read_json(path: &Path) -> Result<Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// Writes `bytes` to `path` through a temporary file in the same folder and a rename, so the
/// runtime never reads half a file.
fn atomic_write(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = dir.join(format!(".{name}.interceptor-{}.tmp", std::process::id()));
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming onto {}", path.display()))?;
    Ok(())
}

fn to_pretty(v: &Value) -> Result<Vec<u8>> {
    let mut bytes = serde_json::to_vec_pretty(v)?;
    bytes.push(b'\n');
    Ok(bytes)
}

/// `plugins` with our entry (merged into an existing one) last.
fn with_our_entry(plugins: &[Value], socket: &Path) -> Vec<Value> {
    let mut entry = plugins
        .iter()
        .find(|p| is_ours(p))
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    if let Value::Object(want) = our_entry(socket) {
        for (k, v) in want {
            if k == "capabilities" {
                let caps = entry.entry(k).or_insert_with(|| Value::Object(Map::new()));
                if let (Value::Object(caps), Value::Object(v)) = (caps, v) {
                    caps.extend(v);
                }
            } else {
                entry.insert(k, v);
            }
        }
    }
    let mut out: Vec<Value> = plugins.iter().filter(|p| !is_ours(p)).cloned().collect();
    out.push(Value::Object(entry));
    out
}

/// Copies `src` to `<bin_dir>/interceptor` (0755) unless it is already there; returns whether
/// it wrote.
fn install_binary(src: &Path, bin_dir: &Path) -> Result<(PathBuf, bool)> {
    std::fs::create_dir_all(bin_dir).with_context(|| format!("creating {}", bin_dir.display()))?;
    let dest = bin_dir.join(PLUGIN_TYPE);
    let bytes = std::fs::read(src).with_context(|| format!("reading {}", src.display()))?;
    if std::fs::read(&dest).is_ok_and(|old| old == bytes) {
        return Ok((dest, false));
    }
    atomic_write(&dest, &bytes, 0o755)?;
    Ok((dest, true))
}

/// Installs from `binary` into `bin_dir` and chains our entry into the primary config of
/// `conf_dir`. Idempotent.
pub fn install_from(
    binary: &Path,
    bin_dir: &Path,
    conf_dir: &Path,
    socket: &Path,
) -> Result<Installed> {
    // Pick the primary config before touching anything, so a node without one is left alone.
    let mut primary = None;
    for path in config_files(conf_dir)? {
        let Ok(v) = read_json(&path) else {
            eprintln!("interceptor: skipping {}: not valid JSON", path.display());
            continue;
        };
        if let Some(kind) = classify(&path, &v) {
            primary = Some((path, v, kind));
            break;
        }
        eprintln!(
            "interceptor: skipping {}: not a usable network config",
            path.display()
        );
    }
    let Some((path, v, kind)) = primary else {
        bail!(
            "no CNI network config (*.conflist or *.conf) in {}: install the primary CNI first",
            conf_dir.display()
        );
    };
    let (conflist, list, converted_from) = match kind {
        Kind::List => (path, v, None),
        Kind::Single => {
            let mut single = v.as_object().cloned().unwrap_or_default();
            let version = single
                .remove("cniVersion")
                .and_then(|v| v.as_str().map(str::to_string))
                .filter(|v| super::spec::version_at_least(v, "0.3.0"))
                .unwrap_or_else(|| "0.3.1".into());
            let name = single
                .get("name")
                .and_then(Value::as_str)
                .unwrap_or("k8s-pod-network")
                .to_string();
            let list = json!({
                "cniVersion": version,
                "name": name,
                "plugins": [Value::Object(single)],
            });
            let target = path.with_extension("conflist");
            if target.exists() {
                bail!(
                    "{} would be converted into {}, which already exists; resolve this by hand",
                    path.display(),
                    target.display()
                );
            }
            (target, list, Some(path))
        }
    };
    // The binary first: the config must never name a plugin the runtime cannot find.
    crate::progress::step(format!(
        "installing the plugin binary into {}",
        bin_dir.display()
    ));
    let (binary, binary_written) = install_binary(binary, bin_dir)?;
    let plugins = list
        .get("plugins")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let mut new = list.clone();
    new["plugins"] = Value::Array(with_our_entry(&plugins, socket));
    let conflist_written = new != list || converted_from.is_some();
    if conflist_written {
        crate::progress::step(format!("chaining our entry into {}", conflist.display()));
        atomic_write(&conflist, &to_pretty(&new)?, 0o644)?;
    }
    if let Some(old) = &converted_from {
        std::fs::remove_file(old).with_context(|| format!("removing {}", old.display()))?;
    }
    Ok(Installed {
        binary,
        binary_written,
        conflist,
        conflist_written,
        converted_from,
    })
}

/// Removes our entry from every list in `conf_dir`, then `<bin_dir>/interceptor`. Idempotent.
pub fn uninstall_from(bin_dir: &Path, conf_dir: &Path) -> Result<Uninstalled> {
    let mut out = Uninstalled::default();
    if conf_dir.is_dir() {
        for path in config_files(conf_dir)? {
            let Ok(mut v) = read_json(&path) else {
                continue;
            };
            let Some(plugins) = v.get("plugins").and_then(Value::as_array) else {
                continue;
            };
            if !plugins.iter().any(is_ours) {
                continue;
            }
            let kept: Vec<Value> = plugins.iter().filter(|p| !is_ours(p)).cloned().collect();
            v["plugins"] = Value::Array(kept);
            atomic_write(&path, &to_pretty(&v)?, 0o644)?;
            out.conflists.push(path);
        }
    }
    let bin = bin_dir.join(PLUGIN_TYPE);
    if bin.exists() {
        std::fs::remove_file(&bin).with_context(|| format!("removing {}", bin.display()))?;
        out.binary_removed = Some(bin);
    }
    Ok(out)
}

/// `interceptor cni-install`.
pub fn run_install(dirs: &Dirs) -> Result<()> {
    let exe = std::env::current_exe().context("locating the interceptor binary")?;
    let r = install_from(&exe, &dirs.bin, &dirs.conf, &dirs.socket)?;
    let did = |w: bool| if w { "installed" } else { "unchanged" };
    println!(
        "binary   {} ({})",
        r.binary.display(),
        did(r.binary_written)
    );
    if let Some(old) = &r.converted_from {
        println!("converted {} into a conflist", old.display());
    }
    println!(
        "conflist {} ({})",
        r.conflist.display(),
        did(r.conflist_written)
    );
    Ok(())
}

/// `interceptor cni-uninstall`.
pub fn run_uninstall(dirs: &Dirs) -> Result<()> {
    let r = uninstall_from(&dirs.bin, &dirs.conf)?;
    for c in &r.conflists {
        println!("removed our entry from {}", c.display());
    }
    match &r.binary_removed {
        Some(b) => println!("removed {}", b.display()),
        None => println!("no binary to remove"),
    }
    if r.conflists.is_empty() {
        println!("no conflist held our entry");
    }
    Ok(())
}
