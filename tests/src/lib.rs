//! Shared fixtures of the e2e and conformance tests: Istio's golden cases and the network
//! topology (pod / sidecar / upstream in their own network namespaces).

pub mod bin;
pub mod cases;
pub mod conformance;
pub mod daemon;
pub mod dns;
pub mod ebpf;
pub mod sidecar;
pub mod topology;

use std::path::PathBuf;

/// `../shared` beside the project root, where Istio's goldens live (never copied in).
/// In CI (`CI=true`) a missing folder fails the test; elsewhere it is a skip with a reason.
pub fn shared_dir() -> Option<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared");
    if dir.join("conformance/istio").is_dir() {
        return Some(dir.canonicalize().unwrap_or(dir));
    }
    let msg = format!("shared/conformance/istio not found at {}", dir.display());
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{msg} (CI=true: the goldens are required)");
    }
    eprintln!("SKIP: {msg}");
    None
}
