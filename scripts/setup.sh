#!/usr/bin/env bash
# Installs what a fresh machine lacks to build and test interceptor; a no-op when all is present.
# Steps: Debian packages, the pinned stable toolchain, nightly + rust-src, bpf-linker bound to the nightly's LLVM, mounted bpffs.
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
PKGS=(iptables nftables iproute2 bpftool kmod procps util-linux dnsutils ca-certificates
      qemu-system-x86 busybox-static xz-utils zstd binutils debian-archive-keyring musl-tools
      containernetworking-plugins)
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

# --- Rust: nightly with rust-src (the eBPF crate builds core with -Z build-std) ------------------
command -v rustup >/dev/null || fail "rustup not found: install Rust via rustup first"
if ! rustup toolchain list | grep -q '^nightly'; then
  log "installing the nightly toolchain"
  rustup toolchain install nightly --profile minimal || fail "rustup toolchain install nightly"
fi
if ! rustup component list --toolchain nightly --installed | grep -q '^rust-src'; then
  log "adding rust-src to nightly"
  rustup component add rust-src --toolchain nightly || fail "rustup component add rust-src"
else
  log "nightly rust-src present"
fi

# --- musl target: cargo xtask vm-test builds static test binaries for its guests -------------
if ! rustup target list --installed | grep -q '^x86_64-unknown-linux-musl$'; then
  log "adding the x86_64-unknown-linux-musl target"
  rustup target add x86_64-unknown-linux-musl || fail "rustup target add x86_64-unknown-linux-musl"
else
  log "musl target present"
fi

# --- bpf-linker built against the nightly's own LLVM ------------------------------------------
# cargo install bpf-linker defaults to an LLVM that differs from rustc's; link it against the
# libLLVM shipped in the nightly sysroot instead. The folder must outlive this script (rpath).
SYSROOT=$(rustc +nightly --print sysroot)
LLVM_MAJOR=$(rustc +nightly -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')
[ -n "$LLVM_MAJOR" ] || fail "cannot read the nightly's LLVM version"
LIBLLVM=$(cd "$SYSROOT/lib" && ls libLLVM.so.* 2>/dev/null | head -n1)
[ -n "$LIBLLVM" ] || fail "no libLLVM.so.* in $SYSROOT/lib"
CARGO_HOME_DIR=${CARGO_HOME:-$HOME/.cargo}
PREFIX="$CARGO_HOME_DIR/bpf-linker-llvm/$LIBLLVM"
STAMP="$PREFIX/.installed"
if [ -f "$STAMP" ] && command -v bpf-linker >/dev/null && bpf-linker --version >/dev/null 2>&1; then
  log "bpf-linker present (LLVM $LLVM_MAJOR, $LIBLLVM)"
else
  log "building bpf-linker against $LIBLLVM (LLVM $LLVM_MAJOR); takes about a minute"
  mkdir -p "$PREFIX/lib"
  ln -sf "$SYSROOT/lib/$LIBLLVM" "$PREFIX/lib/libLLVM.so"
  ln -sf "$SYSROOT/lib/$LIBLLVM" "$PREFIX/lib/$LIBLLVM"
  LLVM_PREFIX="$PREFIX" cargo install --locked bpf-linker --no-default-features \
    --features "llvm-$LLVM_MAJOR" --force \
    || fail "cargo install bpf-linker (LLVM_PREFIX=$PREFIX, feature llvm-$LLVM_MAJOR)"
  bpf-linker --version >/dev/null || fail "bpf-linker does not run after install"
  touch "$STAMP"
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
