#!/usr/bin/env bash
# Sets up a fresh machine (see setup.sh) and runs every test: unit, conformance, CLI validation,
# the e2e suites that create network namespaces and load eBPF programs (root required), and the
# CI-sized kernel-matrix run in a VM.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
# A fresh clone has no incremental state worth keeping: under CI it would only take disk.
if [ "${CI:-}" = true ]; then export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"; fi
echo "[test] disk free for target/: $(df -h --output=avail . | tail -1 | tr -d ' ')"
echo "[test] cargo fmt --check"
cargo fmt --all --check
echo "[test] cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets -q -- -D warnings
# shellcheck source=../ebpf-toolchain.env
. ./ebpf-toolchain.env
echo "[test] cargo clippy for interceptor-ebpf (bpfel-unknown-none on $EBPF_NIGHTLY; not a default member)"
# The workspace clippy above never checks the eBPF crate: this is where its lints (every unsafe
# block documented, clippy::undocumented_unsafe_blocks) are enforced, with the nightly that builds it.
rustup run "$EBPF_NIGHTLY" cargo clippy -q -p interceptor-ebpf --target bpfel-unknown-none -Z build-std=core \
  --release --target-dir target/bpf-clippy -- -D warnings
echo "[test] cargo test (default members: everything but the bpf-target crate)"
# Each e2e test builds its own uniquely named netns/cgroups/pins, so parallel threads are safe.
cargo test
echo "[test] cargo xtask bench --quick (the benchmark still runs: every path and metric once)"
cargo xtask bench --quick --out target/bench-quick
echo "[test] cargo xtask vm-test --ci (one Debian kernel in QEMU: core e2e cases, eBPF and fallback)"
# The full kernel matrix (5.10, 6.1, 6.12, 7.2) is `cargo xtask vm-test`: about an hour here.
cargo xtask vm-test --ci
echo "[test] target/ now takes $(du -sh target | cut -f1); disk free: $(df -h --output=avail . | tail -1 | tr -d ' ')"
echo "[test] all tests passed"
