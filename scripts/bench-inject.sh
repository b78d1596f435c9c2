#!/usr/bin/env bash
# Injection latency through the real daemon (Inject RPC -> fault active in the
# kernel; Recover -> gone), p50/p99 over 200 runs, beside the cost of one `tc`
# process, in one run. Usage: sudo ./scripts/bench-inject.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
[ "$(id -u)" -eq 0 ] || { echo "bench-inject.sh: run as root" >&2; exit 2; }
./scripts/setup.sh >/dev/null
cargo build --release --quiet -p chaosd -p chaosctl
exec cargo test --release --quiet -p chaosd --test rpc_bench -- --ignored --nocapture
