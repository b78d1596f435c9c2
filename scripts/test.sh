#!/usr/bin/env bash
# Runs every test of the project: unit, privileged (root: namespaces, BPF, tc),
# broker interop and fuzzing, and VM tests (QEMU, stock kernel).
# Usage: sudo ./scripts/test.sh            everything
#        sudo ./scripts/test.sh PHASE...   some phases (names below)
set -uo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

if [ "$(id -u)" -ne 0 ]; then
  echo "test.sh: must run as root (sudo ./scripts/test.sh): the tests create network namespaces, load BPF programs and boot VMs" >&2
  exit 2
fi

./scripts/setup.sh || { echo "test.sh: set-up failed" >&2; exit 1; }

ALL_PHASES=(build lint unit fuzz vm)
phases=("$@")
[ ${#phases[@]} -eq 0 ] && phases=("${ALL_PHASES[@]}")

passed=(); failed=()
start_all=$(date +%s)
run_phase() {
  local name=$1; shift
  local t0; t0=$(date +%s)
  echo "=== test.sh: phase $name: $*"
  if "$@"; then
    passed+=("$name($(( $(date +%s) - t0 ))s)")
  else
    failed+=("$name($(( $(date +%s) - t0 ))s)")
    echo "=== test.sh: phase $name FAILED"
  fi
}

for p in "${phases[@]}"; do
  case "$p" in
    # One profile for everything: the VM image and benchmarks need release
    # binaries, and building twice would double the build time.
    build) run_phase build cargo build --release --workspace --all-targets ;;
    # Every clippy warning fails, in all crates and their tests.
    lint)  run_phase lint cargo clippy --release --workspace --all-targets -- -D warnings ;;
    # Unit and privileged integration tests (root, real namespaces/BPF/tc).
    unit)  run_phase unit cargo test --release --workspace -- --test-threads=2 ;;
    fuzz)  if [ -x scripts/fuzz-broker.sh ]; then run_phase fuzz scripts/fuzz-broker.sh; fi ;;
    vm)    if [ -x vm-tests/run.sh ]; then run_phase vm vm-tests/run.sh; fi ;;
    *) echo "test.sh: unknown phase '$p' (phases: ${ALL_PHASES[*]})" >&2; exit 2 ;;
  esac
done

total=$(( $(date +%s) - start_all ))
echo "test.sh: ${#passed[@]} phases passed, ${#failed[@]} failed in ${total}s; passed: ${passed[*]:-none}; failed: ${failed[*]:-none}"
[ ${#failed[@]} -eq 0 ]
