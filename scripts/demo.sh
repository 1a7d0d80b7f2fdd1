#!/usr/bin/env bash
# The main job on a built-in default: the rules interceptor would install for a pod injected
# with Istio's default sidecar flags (a dry run: prints, applies nothing).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh >/dev/null
cargo build -q -p interceptor
exec ./target/debug/interceptor apply --dry-run \
  -p 15001 -z 15006 -u 1337 -m REDIRECT -i '*' -x '' -b '*' -d 15090,15021,15020 \
  --ipv6 false "$@"
