//! The node image's name, shared by `cargo xtask image` (which writes it into the archive),
//! deploy/daemonset.yaml (checked by deploy_yaml.rs) and the containerd e2e test.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The image's version: the release of the `interceptor` it holds.
pub const VERSION: &str = "0.1.0";
/// How deploy/daemonset.yaml names the image.
pub const REFERENCE: &str = "interceptor:0.1.0";

/// The name containerd stores the image under: the kubelet normalizes `interceptor:0.1.0` to
/// `docker.io/library/interceptor:0.1.0` before looking it up.
pub fn containerd_name() -> String {
    format!("docker.io/library/{REFERENCE}")
}

/// Runs `cargo xtask image --out <out>` (with `--offline`: nothing may be downloaded) in this
/// checkout and returns the manifest digest it wrote; None (said, or a failure under `CI=true`)
/// where the checkout or cargo is missing (a `cargo xtask vm-test` guest).
pub fn build(out: &Path, offline: bool) -> Option<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    if !root.join("deploy/image/packages.lock").exists() {
        crate::unavailable(&format!(
            "no checkout at {} to build the image in",
            root.display()
        ));
        return None;
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&root)
        .args(["run", "-q", "-p", "xtask", "--", "image", "--out"])
        .arg(out);
    if offline {
        cmd.arg("--offline");
    }
    let t0 = std::time::Instant::now();
    let status = match cmd.status() {
        Ok(s) => s,
        Err(e) => {
            crate::unavailable(&format!("cannot run cargo to build the image: {e}"));
            return None;
        }
    };
    assert!(
        status.success(),
        "cargo xtask image --out {} failed",
        out.display()
    );
    eprintln!("cargo xtask image: {:.1?}", t0.elapsed());
    Some(digest(out))
}

/// The manifest digest in the OCI layout under `out` (its index.json).
pub fn digest(out: &Path) -> String {
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("oci/index.json")).unwrap()).unwrap();
    index["manifests"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string()
}

/// The OCI archive `cargo xtask image` wrote into `out`.
pub fn archive(out: &Path) -> PathBuf {
    out.join("interceptor-image.tar")
}
