#!/usr/bin/env bash
# The main job on a built-in default: a demo pod (app, sidecar, upstream in their own network
# namespaces) intercepted by the eBPF backend and by the iptables backend, side by side.
# Needs root (network namespaces, eBPF). Cleans up after itself.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh >/dev/null
cargo build -q -p interceptor
exec cargo xtask demo "$@"
