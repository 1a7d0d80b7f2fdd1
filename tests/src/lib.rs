//! Shared fixtures of the e2e and conformance tests: Istio's golden cases and the network
//! topology (pod / sidecar / upstream in their own network namespaces).

pub mod bin;
pub mod cases;
pub mod cni;
pub mod conformance;
pub mod containerd;
pub mod daemon;
pub mod dns;
pub mod ebpf;
pub mod forward;
pub mod image;
pub mod netfilter;
pub mod sidecar;
pub mod third_party;
pub mod topology;
pub mod userns;

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

/// A test that cannot run here: a skip with the reason, or a failure under `CI=true`.
pub fn unavailable(msg: &str) {
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{msg} (CI=true: this test is required)");
    }
    eprintln!("SKIP: {msg}");
}

/// How many times slower than a normal machine this one runs: `cargo xtask vm-test` sets
/// INTERCEPTOR_TESTS_TIME_SCALE for emulated (TCG) guests. Tests stretch their own waits by it
/// and trim their size where a full run would not fit the guest's time.
pub fn time_scale() -> f64 {
    std::env::var("INTERCEPTOR_TESTS_TIME_SCALE")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 1.0)
        .unwrap_or(1.0)
}

/// `d` stretched by [`time_scale`].
pub fn scaled(d: std::time::Duration) -> std::time::Duration {
    d.mul_f64(time_scale())
}

/// False when the run was told eBPF is unavailable here (INTERCEPTOR_TESTS_NO_EBPF=1: the
/// bpf()-denied runs of `cargo xtask vm-test`): tests then expect `auto` to fall back.
pub fn ebpf_expected() -> bool {
    std::env::var("INTERCEPTOR_TESTS_NO_EBPF").map_or(true, |v| v != "1")
}
