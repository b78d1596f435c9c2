#!/usr/bin/env bash
# The main job: build chaosd, start the daemon, show what this host can do,
# run an experiment against a namespace of its own, and stop cleanly.
# Usage: sudo ./scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

[ "$(id -u)" -eq 0 ] || { echo "demo.sh: run as root (sudo ./scripts/demo.sh): chaosd needs CAP_NET_ADMIN, CAP_SYS_ADMIN and CAP_BPF" >&2; exit 2; }
./scripts/setup.sh
echo "demo: building (release)"
cargo build --release --quiet -p chaosd -p chaosctl

work=$(mktemp -d /tmp/chaosd-demo.XXXXXX)
sock="$work/chaosd.sock"
ns="chaosd-demo-$$"
daemon=""
cleanup() {
  [ -n "$daemon" ] && kill -TERM "$daemon" 2>/dev/null && wait "$daemon" 2>/dev/null || true
  ip netns del "$ns" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

ctl() { ./target/release/chaosctl --socket "$sock" "$@"; }

./target/release/chaosd serve --socket "$sock" --state-dir "$work/state" 2>"$work/chaosd.log" &
daemon=$!
for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.1; done
[ -S "$sock" ] || { cat "$work/chaosd.log"; echo "demo: chaosd did not start" >&2; exit 1; }

echo; echo "\$ chaosctl status"; ctl status

echo; echo "demo: stopping chaosd (SIGTERM)"
kill -TERM "$daemon"; wait "$daemon"; daemon=""
[ ! -e "$sock" ] && echo "demo: chaosd stopped cleanly, socket removed"
