#!/usr/bin/env bash
# The main job: build chaosd, chaosctl and the broker, start chaosd, and run
# the quick chaos plan (cli/plans/quick.toml: 20% loss on a node's MQTT port,
# a partition of a node's cluster port, a node killed and restarted, CPU
# stress) against a local three-node broker cluster with a real MQTT
# workload. Prints the verdict table and where the HTML report is; exits
# with the runner's code (0 every case passed, 1 a case failed, 2 a case is
# unknown or the run could not start). Everything it starts is removed at
# the end, also on failure or Ctrl-C; the report stays.
# Usage: sudo ./scripts/demo.sh [PLAN.toml]   (default: cli/plans/quick.toml)
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

[ "$(id -u)" -eq 0 ] || { echo "demo.sh: run as root (sudo ./scripts/demo.sh): chaosd needs CAP_NET_ADMIN, CAP_SYS_ADMIN and CAP_BPF, and the cluster its own network namespaces" >&2; exit 2; }
plan=${1:-cli/plans/quick.toml}
[ -f "$plan" ] || { echo "demo.sh: no plan at $plan" >&2; exit 2; }
./scripts/setup.sh
echo "demo: building (release)"
cargo build --release --quiet -p chaosd -p chaosctl -p broker

work=$(mktemp -d /tmp/chaosd-demo.XXXXXX)
report=$(mktemp -d /tmp/chaosd-report.XXXXXX)
sock="$work/chaosd.sock"
bpf="/sys/fs/bpf/chaosd-demo-$$"
daemon=""
cleanup() {
  # SIGTERM: chaosd recovers whatever is still active before it exits.
  if [ -n "$daemon" ]; then kill -TERM "$daemon" 2>/dev/null || true; wait "$daemon" 2>/dev/null || true; fi
  cp "$work/chaosd.log" "$report/chaosd.log" 2>/dev/null || true
  rm -rf "$work" "$bpf"
}
trap cleanup EXIT

./target/release/chaosd serve --socket "$sock" --state-dir "$work/state" --bpf-dir "$bpf" 2>"$work/chaosd.log" &
daemon=$!
for _ in $(seq 300); do grep -q "chaosd serving" "$work/chaosd.log" && break; sleep 0.1; done
grep -q "chaosd serving" "$work/chaosd.log" || { cat "$work/chaosd.log" >&2; echo "demo: chaosd did not start" >&2; exit 1; }
echo "demo: chaosd is up; what this host can do:"
./target/release/chaosctl --socket "$sock" status

echo "demo: \$ chaosctl run $plan --run-dir $report"
rc=0
./target/release/chaosctl --socket "$sock" run "$plan" --run-dir "$report" || rc=$?
echo "demo: the HTML report (a chart per case) is $report/report.html; chaosd's log goes to $report/chaosd.log"
exit "$rc"
