#!/usr/bin/env bash
# Cross-node against same-node delivery in the local three-node cluster
# (scripts/cluster-up), side by side in one run: publishers on node 1 and
# subscribers on node 1 (same node) or on node 2 (every message crosses the
# cluster's gRPC link), QoS 0 and QoS 1, at full speed. Rounds alternate the
# two placements so that the machine's drift hits both alike; it prints each
# round and the median ratios cross/same of throughput and p99 latency.
#
# Usage: sudo ./scripts/bench-cluster.sh [ROUNDS (3)] [SECONDS PER RUN (10)]
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
[ "$(id -u)" -eq 0 ] || { echo "bench-cluster.sh: run as root (it creates network namespaces)" >&2; exit 2; }
rounds=${1:-3} secs=${2:-10}
[[ "$rounds" =~ ^[1-9][0-9]*$ && "$secs" =~ ^[1-9][0-9]*$ ]] || { echo "usage: $0 [ROUNDS] [SECONDS]" >&2; exit 2; }

./scripts/setup.sh >/dev/null
cargo build --release --quiet -p broker
run=$(mktemp -d /tmp/chaosd-bench-cluster.XXXXXX)
trap 'scripts/cluster-down --run-dir "$run/topo" --purge >/dev/null 2>&1 || true; rm -rf "$run"' EXIT
scripts/cluster-up --run-dir "$run/topo" --name "bench-cl-$$" --nodes 3
hub="bench-cl-$$-hub" n1=10.231.0.1:1883 n2=10.231.0.2:1883

# bench QOS SUB_ADDR TAG: one run; its JSON in $run/TAG.json.
bench() {
  local mix
  case "$1" in 0) mix=100/0/0 ;; 1) mix=0/100/0 ;; esac
  ip netns exec "$hub" ./target/release/broker bench --addr "$n1" --sub-addr "$2" --protocol 5 \
    --publishers 4 --subscribers 4 --rate 0 --qos-mix "$mix" --duration "$secs" --drain 3 \
    --prefix "b$3" --id-prefix "b$3" --json >"$run/$3.json" 2>"$run/$3.err" \
    || { echo "bench-cluster.sh: broker bench failed: $(tail -3 "$run/$3.err")" >&2; exit 1; }
}
field() { jq -r ".qos[$1].$2" "$run/$3.json"; }

printf '%-5s %-5s %-6s %14s %10s %8s\n' qos round place "msgs/s" "p99 ms" lost
for qos in 0 1; do
  for r in $(seq "$rounds"); do
    # Alternate which placement goes first, so neither always runs warm.
    order=(same cross); [ $((r % 2)) -eq 0 ] && order=(cross same)
    for place in "${order[@]}"; do
      sub=$n1; [ "$place" = cross ] && sub=$n2
      bench "$qos" "$sub" "q$qos-$r-$place"
      printf '%-5s %-5s %-6s %14.0f %10.2f %8s\n' "$qos" "$r" "$place" \
        "$(field "$qos" throughput_msgs_per_s "q$qos-$r-$place")" \
        "$(field "$qos" latency_ms.p99 "q$qos-$r-$place")" "$(field "$qos" lost "q$qos-$r-$place")"
    done
  done
done

echo
echo "median over $rounds rounds of cross-node / same-node (each round's pair measured back to back):"
for qos in 0 1; do
  tput=() p99=()
  for r in $(seq "$rounds"); do
    tput+=("$(jq -n --slurpfile c "$run/q$qos-$r-cross.json" --slurpfile s "$run/q$qos-$r-same.json" \
      "\$c[0].qos[$qos].throughput_msgs_per_s / \$s[0].qos[$qos].throughput_msgs_per_s")")
    p99+=("$(jq -n --slurpfile c "$run/q$qos-$r-cross.json" --slurpfile s "$run/q$qos-$r-same.json" \
      "\$c[0].qos[$qos].latency_ms.p99 / \$s[0].qos[$qos].latency_ms.p99")")
  done
  med() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
  printf '  QoS %s: throughput %.2f (rounds: %s)   p99 %.2f (rounds: %s)\n' "$qos" \
    "$(med "${tput[@]}")" "$(printf '%.2f ' "${tput[@]}")" "$(med "${p99[@]}")" "$(printf '%.2f ' "${p99[@]}")"
done
