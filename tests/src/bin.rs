//! Locating (building once, if needed) the `interceptor` binary under test.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::OnceLock;

/// Path to the `interceptor` binary of this workspace's current profile, built on first use so
/// that `cargo test -p interceptor-tests` alone works.
pub fn interceptor_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Ok(p) = std::env::var("INTERCEPTOR_BIN") {
            return PathBuf::from(p);
        }
        // Test binaries live in target/<profile>/deps, xtask in target/<profile>; the
        // interceptor binary in target/<profile>.
        let exe = std::env::current_exe().expect("current_exe");
        let mut dir = exe.parent().expect("exe dir").to_path_buf();
        if dir.file_name().is_some_and(|n| n == "deps") {
            dir.pop();
        }
        let bin = dir.join("interceptor");
        let release = dir.file_name().is_some_and(|n| n == "release");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        // The same features as the library the tests link (fault knobs on, as `cargo test`
        // builds it), so this build reuses that one instead of flipping the binary.
        cmd.args(["build", "-q", "-p", "interceptor", "--bin", "interceptor"]);
        cmd.args(["--features", "fault-injection"]);
        if release {
            cmd.arg("--release");
        }
        let status = cmd
            .status()
            .expect("running cargo build for the interceptor binary");
        assert!(status.success(), "cargo build -p interceptor failed");
        assert!(bin.exists(), "{} not found after build", bin.display());
        bin
    })
    .clone()
}

/// Runs `interceptor ARGS` with extra environment, capturing its output.
pub fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(interceptor_bin());
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("running interceptor")
}
