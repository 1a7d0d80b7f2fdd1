#!/usr/bin/env bash
# Installs what a fresh machine lacks to build and test interceptor; a no-op when all is present.
# Steps: Debian packages, the pinned stable toolchain (rust-toolchain.toml), the pinned nightly with
# rust-src and the pinned bpf-linker bound to that nightly's LLVM (ebpf-toolchain.env), mounted bpffs.
set -euo pipefail
cd "$(dirname "$0")/.."

log()  { printf '[setup] %s\n' "$*"; }
fail() { printf '[setup] FAILED: %s\n' "$*" >&2; exit 1; }

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

# --- Debian packages -------------------------------------------------------------------------
# iptables (legacy + nft variants), nftables, iproute2 (ip netns/veth), bpftool (inspection in
# tests), kmod (modprobe of nat/owner modules), procps/util-linux (nsenter), dnsutils (dig for DNS tests).
# cargo xtask vm-test: qemu-system-x86 (guests), busybox-static (guest shell), kmod (depmod),
# xz-utils/zstd (compressed kernel modules), binutils (objcopy), debian-archive-keyring,
# musl-tools (musl-gcc: C code in dependencies of the static guest binaries).
# containernetworking-plugins: bridge/host-local/loopback in /usr/lib/cni for the CNI chain test.
# cargo xtask image: apt-get download and dpkg-deb (always there), objdump (binutils).
# containerd, runc: the containerd e2e test starts its own containerd (the package's service is
# not needed by it) and runs the image's containers with runc.
PKGS=(iptables nftables iproute2 bpftool kmod procps util-linux dnsutils ca-certificates
      qemu-system-x86 busybox-static xz-utils zstd binutils debian-archive-keyring musl-tools
      containernetworking-plugins containerd runc)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq || fail "apt-get update"
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
    || fail "apt-get install ${missing[*]}"
else
  log "Debian packages present: ${PKGS[*]}"
fi

# --- Rust: the pinned stable toolchain (rust-toolchain.toml) --------------------------------------
command -v rustup >/dev/null || fail "rustup not found: install Rust via rustup first"
PINNED=$(sed -n 's/^channel = "\(.*\)"/\1/p' rust-toolchain.toml)
[ -n "$PINNED" ] || fail "no channel in rust-toolchain.toml"
if ! rustup toolchain list | grep -q "^$PINNED"; then
  log "installing the pinned toolchain $PINNED"
  rustup toolchain install "$PINNED" --profile minimal -c rustfmt -c clippy \
    -t x86_64-unknown-linux-musl || fail "rustup toolchain install $PINNED"
else
  log "pinned toolchain $PINNED present"
fi

# --- Rust: the pinned nightly with rust-src (the eBPF crate builds core with -Z build-std) ----
# ebpf-toolchain.env holds the pins (interceptor/build.rs builds with the same nightly).
# shellcheck source=../ebpf-toolchain.env
. ./ebpf-toolchain.env
[ -n "${EBPF_NIGHTLY:-}" ] && [ -n "${BPF_LINKER_VERSION:-}" ] \
  || fail "ebpf-toolchain.env must set EBPF_NIGHTLY and BPF_LINKER_VERSION"
if ! rustup toolchain list | grep -q "^$EBPF_NIGHTLY"; then
  log "installing the pinned nightly $EBPF_NIGHTLY"
  rustup toolchain install "$EBPF_NIGHTLY" --profile minimal -c rust-src -c clippy \
    || fail "rustup toolchain install $EBPF_NIGHTLY"
fi
installed=$(rustup component list --toolchain "$EBPF_NIGHTLY" --installed)
for c in rust-src clippy; do
  if ! grep -q "^$c" <<<"$installed"; then
    log "adding $c to $EBPF_NIGHTLY"
    rustup component add "$c" --toolchain "$EBPF_NIGHTLY" || fail "rustup component add $c"
  fi
done
log "pinned nightly $EBPF_NIGHTLY with rust-src and clippy present"

# --- musl target: cargo xtask vm-test builds static test binaries for its guests -------------
if ! rustup target list --installed | grep -q '^x86_64-unknown-linux-musl$'; then
  log "adding the x86_64-unknown-linux-musl target"
  rustup target add x86_64-unknown-linux-musl || fail "rustup target add x86_64-unknown-linux-musl"
else
  log "musl target present"
fi

# --- bpf-linker (pinned version) built against the pinned nightly's own LLVM -----------------
# cargo install bpf-linker defaults to an LLVM that differs from rustc's; link it against the
# libLLVM shipped in the nightly's sysroot instead. The folder must outlive this script (rpath).
# Rebuilt when the installed one is another version, or linked against another libLLVM.
SYSROOT=$(rustc +"$EBPF_NIGHTLY" --print sysroot)
LLVM_MAJOR=$(rustc +"$EBPF_NIGHTLY" -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')
[ -n "$LLVM_MAJOR" ] || fail "cannot read the LLVM version of $EBPF_NIGHTLY"
LIBLLVM=$(cd "$SYSROOT/lib" && ls libLLVM.so.* 2>/dev/null | head -n1)
[ -n "$LIBLLVM" ] || fail "no libLLVM.so.* in $SYSROOT/lib"
CARGO_HOME_DIR=${CARGO_HOME:-$HOME/.cargo}
PREFIX="$CARGO_HOME_DIR/bpf-linker-llvm/$EBPF_NIGHTLY"
STAMP="$PREFIX/.installed"
WANT="bpf-linker $BPF_LINKER_VERSION $EBPF_NIGHTLY $LIBLLVM"
linker_ok() {
  [ "$(cat "$STAMP" 2>/dev/null)" = "$WANT" ] || return 1
  command -v bpf-linker >/dev/null || return 1
  [ "$(bpf-linker --version 2>/dev/null)" = "bpf-linker $BPF_LINKER_VERSION" ] || return 1
  ldd "$(command -v bpf-linker)" 2>/dev/null | grep -qF "=> $PREFIX/lib/$LIBLLVM "
}
if linker_ok; then
  log "bpf-linker $BPF_LINKER_VERSION present (LLVM $LLVM_MAJOR, $LIBLLVM of $EBPF_NIGHTLY)"
else
  log "building bpf-linker $BPF_LINKER_VERSION against $LIBLLVM of $EBPF_NIGHTLY; takes a few minutes"
  rm -f "$STAMP"
  mkdir -p "$PREFIX/lib"
  ln -sf "$SYSROOT/lib/$LIBLLVM" "$PREFIX/lib/libLLVM.so"
  ln -sf "$SYSROOT/lib/$LIBLLVM" "$PREFIX/lib/$LIBLLVM"
  LLVM_PREFIX="$PREFIX" cargo install --locked bpf-linker --version "$BPF_LINKER_VERSION" \
    --no-default-features --features "llvm-$LLVM_MAJOR" --force \
    || fail "cargo install bpf-linker $BPF_LINKER_VERSION (LLVM_PREFIX=$PREFIX, feature llvm-$LLVM_MAJOR)"
  linker_runs=$(bpf-linker --version 2>/dev/null) || fail "bpf-linker does not run after install"
  [ "$linker_runs" = "bpf-linker $BPF_LINKER_VERSION" ] \
    || fail "bpf-linker on PATH is '$linker_runs', not $BPF_LINKER_VERSION (another one earlier on PATH?)"
  echo "$WANT" >"$STAMP"
  linker_ok || fail "bpf-linker does not load $PREFIX/lib/$LIBLLVM"
fi

# --- Kernel side: bpffs, netfilter modules ------------------------------------------------
if ! mount | grep -q ' /sys/fs/bpf type bpf'; then
  log "mounting bpffs at /sys/fs/bpf"
  $SUDO mkdir -p /sys/fs/bpf
  $SUDO mount -t bpf bpf /sys/fs/bpf || fail "mount -t bpf bpf /sys/fs/bpf"
else
  log "bpffs mounted"
fi
# Modules may be built in; a failed modprobe is only worth a note.
for m in veth iptable_nat ip6table_nat iptable_mangle xt_owner xt_REDIRECT nf_tables nft_redir; do
  $SUDO modprobe -q "$m" 2>/dev/null || true
done
log "done"
