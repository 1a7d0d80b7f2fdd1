#!/usr/bin/env bash
# Sets up a fresh machine (see setup.sh) and runs every test: unit, conformance, CLI validation,
# and the e2e suites that create network namespaces and load eBPF programs (root required).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
echo "[test] cargo fmt --check"
cargo fmt --all --check
echo "[test] cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets -q -- -D warnings
echo "[test] cargo test (default members: everything but the bpf-target crate)"
# Each e2e test builds its own uniquely named netns/cgroups/pins, so parallel threads are safe.
cargo test
echo "[test] all tests passed"
