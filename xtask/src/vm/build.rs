//! Static (musl) builds of what runs in the guest: the `interceptor` binary, the guest init
//! (`vm-init`) and every test binary of interceptor-tests, located through cargo's JSON
//! messages. `cargo xtask image` takes its `interceptor` from here too ([`interceptor`]).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

pub const TARGET: &str = "x86_64-unknown-linux-musl";

pub struct Built {
    pub interceptor: PathBuf,
    pub init: PathBuf,
    /// (test target name, executable), e.g. `("fallback_e2e", …/deps/fallback_e2e-<hash>)`.
    pub tests: Vec<(String, PathBuf)>,
}

/// Runs cargo with `--message-format=json-render-diagnostics` and returns the executables it
/// reports as (target name, target kinds, path).
fn cargo_executables(root: &Path, args: &[&str]) -> Result<Vec<(String, Vec<String>, PathBuf)>> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    eprintln!("[vm] cargo {}", args.join(" "));
    let mut child = Command::new(cargo)
        .args(args)
        .args([
            "--target",
            TARGET,
            "--message-format=json-render-diagnostics",
        ])
        .current_dir(root)
        // C code in dependencies (ring, for the kube client's TLS) needs a musl C compiler:
        // Debian's musl-tools (scripts/setup.sh installs it) names it musl-gcc.
        .env("CC_x86_64_unknown_linux_musl", "musl-gcc")
        .stdout(Stdio::piped())
        .spawn()
        .context("running cargo")?;
    let mut out = Vec::new();
    for l in BufReader::new(child.stdout.take().expect("piped")).lines() {
        let l = l?;
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&l) else {
            continue;
        };
        if v["reason"] != "compiler-artifact" {
            continue;
        }
        let Some(exe) = v["executable"].as_str() else {
            continue;
        };
        let name = v["target"]["name"].as_str().unwrap_or_default().to_string();
        let kinds = v["target"]["kind"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|k| k.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        out.push((name, kinds, PathBuf::from(exe)));
    }
    let st = child.wait()?;
    if !st.success() {
        bail!("cargo {} failed ({st})", args.join(" "));
    }
    Ok(out)
}

/// The test targets of interceptor-tests, as cargo discovers them: `tests/tests/*.rs` and the
/// library's unit tests (`interceptor_tests`).
pub fn test_targets(root: &Path) -> Result<Vec<String>> {
    let mut names = vec!["interceptor_tests".to_string()];
    for e in std::fs::read_dir(root.join("tests/tests"))? {
        let p = e?.path();
        if p.extension().is_some_and(|x| x == "rs") {
            if let Some(stem) = p.file_stem() {
                names.push(stem.to_string_lossy().into_owned());
            }
        }
    }
    names.sort();
    Ok(names)
}

fn find(exes: &[(String, Vec<String>, PathBuf)], name: &str) -> Result<PathBuf> {
    exes.iter()
        .find(|(n, _, _)| n == name)
        .map(|(_, _, p)| p.clone())
        .with_context(|| format!("cargo reported no {name} executable"))
}

/// The static `interceptor` binary: `extra` cargo flags (a profile, features) added to the
/// build of the `interceptor` bin.
pub fn interceptor(root: &Path, extra: &[&str]) -> Result<PathBuf> {
    let mut args = vec!["build", "-p", "interceptor", "--bin", "interceptor"];
    args.extend_from_slice(extra);
    find(&cargo_executables(root, &args)?, "interceptor")
}

/// Builds everything; `only` limits the test binaries built (None: all of them).
pub fn build(root: &Path, only: Option<&[String]>) -> Result<Built> {
    // The guests run the fault suite too: the knobs exist only with this feature.
    let interceptor = interceptor(root, &["--features", "fault-injection"])?;
    let exes = cargo_executables(root, &["build", "-p", "xtask", "--bin", "vm-init"])?;
    let init = find(&exes, "vm-init")?;
    let mut args = vec!["test", "-p", "interceptor-tests", "--no-run"];
    for name in only.unwrap_or_default() {
        if name == "interceptor_tests" {
            args.push("--lib");
        } else {
            args.extend(["--test", name.as_str()]);
        }
    }
    let exes = cargo_executables(root, &args)?;
    let mut tests: Vec<(String, PathBuf)> =
        exes.into_iter().map(|(n, _, p)| (n, p)).collect::<Vec<_>>();
    tests.sort();
    tests.dedup_by(|a, b| a.0 == b.0);
    if tests.is_empty() {
        bail!("cargo test --no-run reported no test binary of interceptor-tests");
    }
    Ok(Built {
        interceptor,
        init,
        tests,
    })
}

/// A copy of `bin` without debug info (symbols stay, so backtraces keep function names),
/// cached by size and mtime; `bin` itself when objcopy is missing or fails.
pub fn stripped(bin: &Path, cache: &Path) -> PathBuf {
    let Ok(meta) = std::fs::metadata(bin) else {
        return bin.to_path_buf();
    };
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs());
    let name = bin.file_name().unwrap_or_default().to_string_lossy();
    let dst = cache.join(format!("{name}-{}-{mtime}", meta.len()));
    if dst.exists() {
        return dst;
    }
    let _ = std::fs::create_dir_all(cache);
    // Older copies of the same binary.
    if let Ok(rd) = std::fs::read_dir(cache) {
        let prefix = format!("{name}-");
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().starts_with(&prefix) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    let ok = Command::new("objcopy")
        .arg("--strip-debug")
        .arg(bin)
        .arg(&dst)
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        dst
    } else {
        let _ = std::fs::remove_file(&dst);
        bin.to_path_buf()
    }
}
