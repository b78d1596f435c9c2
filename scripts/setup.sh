#!/usr/bin/env bash
# Installs everything chaosd's build and tests need on a Debian/Ubuntu host.
# Idempotent: a second run checks and returns in about a second.
set -euo pipefail

say() { printf 'setup: %s\n' "$*"; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

[ "$(uname -s)" = Linux ] || die "chaosd builds and runs on Linux only"
command -v apt-get >/dev/null || die "apt-get not found: this script supports Debian/Ubuntu; install the packages listed in scripts/setup.sh by hand"

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || die "run as root (or install sudo): packages must be installed"
  SUDO="sudo"
fi

# Debian packages: iproute2 (tests drive namespaces with ip/tc, and the VM
# image carries them), QEMU + busybox + cpio (VM tests), mosquitto and paho
# (broker interop tests and the benchmark baseline), valgrind (the broker's
# instruction count benchmark), iperf3-free: our own load tools are in Rust.
# xz-utils/zstd unpack the kernel package. jq: the local cluster scripts
# read the nodes' /cluster. chromium: a test opens the runner's HTML report
# headless and takes a screenshot; python3-jsonschema: the same test
# validates report.json against its schema (with /usr/bin/python3).
# prometheus: a test runs it (and promtool) on scripts/monitoring/.
# vagrant + vagrant-libvirt: a test checks the Vagrantfile (vagrant validate).
# systemd: `systemd-analyze verify` checks the units in scripts/systemd/
# (it works without systemd running as PID 1).
PKGS=(iproute2 qemu-system-x86 busybox-static cpio kmod xz-utils zstd
      mosquitto mosquitto-clients python3-paho-mqtt procps psmisc valgrind
      build-essential pkg-config curl ca-certificates jq chromium python3-jsonschema
      prometheus vagrant vagrant-libvirt systemd)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing Debian packages: ${missing[*]}"
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq \
    || die "apt-get update failed: is a Debian mirror reachable?"
  # Packaged services (mosquitto, prometheus) must not start: the tests run
  # their own instances, and without systemd a postinst starts them through
  # invoke-rc.d, whose failure (prometheus: no /run/prometheus) fails the
  # whole install. invoke-rc.d asks policy-rc.d first (101: not allowed), so
  # one that denies everything stands in for the host's own (put back after,
  # also when interrupted) while apt-get runs.
  policy=/usr/sbin/policy-rc.d saved=""
  restore_policy() {
    if [ -n "$saved" ]; then $SUDO mv -f "$saved" "$policy"; else $SUDO rm -f "$policy"; fi
  }
  if [ -e "$policy" ]; then
    saved=$($SUDO mktemp /usr/sbin/policy-rc.d.chaosd-setup.XXXXXX)
    $SUDO cp -p "$policy" "$saved"
  fi
  trap 'restore_policy; exit 1' INT TERM
  printf '#!/bin/sh\n# chaosd scripts/setup.sh: no service starts while it installs packages\nexit 101\n' \
    | $SUDO tee "$policy" >/dev/null
  $SUDO chmod 755 "$policy"
  status=0
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
    || status=$?
  restore_policy
  trap - INT TERM
  [ "$status" -eq 0 ] || die "apt-get install ${missing[*]} failed"
  # The broker benchmark starts its own mosquitto; the packaged service is not wanted.
  if printf '%s\n' "${missing[@]}" | grep -qx mosquitto; then
    $SUDO systemctl disable --now mosquitto >/dev/null 2>&1 || true
    $SUDO pkill -x mosquitto 2>/dev/null || true
  fi
  # Nor at the next boot of a systemd host.
  if printf '%s\n' "${missing[@]}" | grep -qx prometheus; then
    $SUDO systemctl disable --now prometheus >/dev/null 2>&1 || true
  fi
fi

# Rust: stable builds userspace; nightly + rust-src builds the eBPF programs
# (-Z build-std=core for bpfel-unknown-none).
command -v rustup >/dev/null || [ -x "$HOME/.cargo/bin/rustup" ] \
  || die "rustup not found: install it from https://rustup.rs, then run this again"
export PATH="$HOME/.cargo/bin:$PATH"
if ! rustup toolchain list | grep -q '^nightly'; then
  say "installing the nightly toolchain (eBPF build)"
  rustup toolchain install nightly --profile minimal || die "rustup could not install nightly"
fi
if ! rustup component list --toolchain nightly --installed 2>/dev/null | grep -q '^rust-src'; then
  say "adding rust-src to nightly"
  rustup component add rust-src --toolchain nightly || die "rustup could not add rust-src to nightly"
fi

# bpf-linker, built against the LLVM inside the nightly toolchain (Debian has
# no LLVM of the version rustc uses). See ../shared/ENVIRONMENT.md.
if ! bpf-linker --version >/dev/null 2>&1; then
  sysroot=$(rustc +nightly --print sysroot)
  llvm_so=$(ls "$sysroot"/lib/libLLVM.so.* 2>/dev/null | head -1)
  [ -n "$llvm_so" ] || die "no libLLVM.so in $sysroot/lib: cannot build bpf-linker"
  major=$(basename "$llvm_so" | sed -E 's/^libLLVM\.so\.([0-9]+).*/\1/')
  prefix="$HOME/.cache/chaosd/llvm-prefix"
  mkdir -p "$prefix/lib64"
  ln -sf "$llvm_so" "$prefix/lib64/libLLVM.so"
  say "building bpf-linker against LLVM $major from the nightly toolchain (about a minute)"
  LLVM_PREFIX="$prefix" RUSTFLAGS="-C link-arg=-Wl,-rpath,$sysroot/lib" \
    cargo +nightly install --locked bpf-linker --no-default-features --features "llvm-$major" \
    || die "cargo install bpf-linker failed (see above)"
  bpf-linker --version >/dev/null 2>&1 || die "bpf-linker was built but does not run"
fi

say "ready"
