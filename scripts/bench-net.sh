#!/usr/bin/env bash
# Network datapath benchmarks, side by side in one run (root: namespaces,
# BPF, tc). Prints ratios and distributions as "BENCH ..." lines:
#   - TCP throughput over a veth pair with no classifier, 1 and 1,024
#     non-matching rules (ratios b/a and c/a);
#   - BPF_PROG_TEST_RUN ns/packet for a non-matching packet (1 and 1,024
#     rules) and a matching one;
#   - inject/recover latency p50/p99 (warm, cold, bandwidth) beside the
#     time spawning `tc` for an equivalent filter takes.
# Everything runs in namespaces the benchmark creates and removes.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" -eq 0 ] || { echo "bench-net: run as root (sudo scripts/bench-net.sh)" >&2; exit 1; }
cargo test --release -p chaosd --test net_bench -- --ignored --nocapture --test-threads 1 2>&1 \
  | grep -E '^BENCH|panicked|test result'
