#!/usr/bin/env bash
# Side-by-side benchmark: this broker vs Debian's mosquitto, same load client
# (`broker bench`), same settings, in one run on this machine. Prints ratios.
# Both brokers listen on 127.0.0.1 only and are stopped on exit.
# Usage: scripts/bench-broker.sh            (BENCH_DURATION=5 seconds per run)
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
DUR=${BENCH_DURATION:-5}
DRAIN=${BENCH_DRAIN:-5}

command -v mosquitto >/dev/null || { echo "bench-broker.sh: mosquitto is not installed (scripts/setup.sh installs it)" >&2; exit 1; }
cargo build --release -p broker >&2
BIN=$PWD/target/release/broker

tmp=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$tmp"
}
trap cleanup EXIT INT TERM

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() {
  for _ in $(seq 100); do
    (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0
    sleep 0.05
  done
  echo "bench-broker.sh: nothing listens on port $1" >&2; exit 1
}
start_ours() { # name, extra args...
  local port; port=$(free_port)
  RUST_LOG=warn "$BIN" --mqtt-listen 127.0.0.1:"$port" "${@:2}" >"$tmp/$1.log" 2>&1 &
  pids+=($!); wait_port "$port"; echo "$port"
}

MQ_PORT=$(free_port)
printf 'listener %s 127.0.0.1\nallow_anonymous true\nmax_queued_messages 100000\nmax_inflight_messages 100\n' "$MQ_PORT" >"$tmp/mosquitto.conf"
mosquitto -c "$tmp/mosquitto.conf" >"$tmp/mosquitto.log" 2>&1 &
pids+=($!)
wait_port "$MQ_PORT"
OUR_PORT=$(start_ours ours)
DATA1=$tmp/data-every; DATA2=$tmp/data-group
P_EVERY=$(start_ours every --data-dir "$DATA1" --fsync every-ack)
P_GROUP=$(start_ours group --data-dir "$DATA2" --fsync group --group-commit-ms 5)

run() { # output name, port, bench args...
  "$BIN" bench --addr 127.0.0.1:"$2" --json --duration "$DUR" --drain "$DRAIN" --payload 256 \
    --prefix "b$RANDOM" --id-prefix "$1" "${@:3}" >"$tmp/$1.json"
}

# case name | bench arguments (throughput runs use --rate 0, latency runs a fixed rate)
cases=(
  "qos0 10->10|--qos-mix 100/0/0 --publishers 10 --subscribers 10 --topics 10"
  "qos1 10->10|--qos-mix 0/100/0 --publishers 10 --subscribers 10 --topics 10"
  "qos0 fan-in 10->1|--qos-mix 100/0/0 --publishers 10 --subscribers 1 --sub-mode all"
  "qos1 fan-in 10->1|--qos-mix 0/100/0 --publishers 10 --subscribers 1 --sub-mode all"
  "qos0 fan-out 1->10|--qos-mix 100/0/0 --publishers 1 --subscribers 10 --topics 1"
  "qos1 fan-out 1->10|--qos-mix 0/100/0 --publishers 1 --subscribers 10 --topics 1"
)
i=0
for c in "${cases[@]}"; do
  name=${c%%|*}; args=${c#*|}
  i=$((i+1))
  echo "bench-broker.sh: case $i/${#cases[@]}: $name" >&2
  # shellcheck disable=SC2086
  run "max-ours-$i" "$OUR_PORT" $args --rate 0
  # shellcheck disable=SC2086
  run "max-mosq-$i" "$MQ_PORT" $args --rate 0
  # shellcheck disable=SC2086
  run "lat-ours-$i" "$OUR_PORT" $args --rate 500
  # shellcheck disable=SC2086
  run "lat-mosq-$i" "$MQ_PORT" $args --rate 500
  echo "$name" >"$tmp/name-$i"
done
echo "bench-broker.sh: QoS 1 into persistent sessions" >&2
pers="--qos-mix 0/100/0 --publishers 10 --subscribers 10 --topics 10 --persistent"
# shellcheck disable=SC2086
run "pers-every" "$P_EVERY" $pers --rate 0
# shellcheck disable=SC2086
run "pers-group" "$P_GROUP" $pers --rate 0
# shellcheck disable=SC2086
run "pers-mosq" "$MQ_PORT" $pers --rate 0

python3 - "$tmp" "${#cases[@]}" "$DUR" <<'PY'
import json, sys
tmp, n, dur = sys.argv[1], int(sys.argv[2]), sys.argv[3]
def load(name):
    with open(f"{tmp}/{name}.json") as f:
        return json.load(f)["total"]
print(f"\nbroker vs mosquitto, 256-byte payloads, {dur} s per run, same load client, this machine")
print("throughput: --rate 0 (as fast as each broker takes it), msg/s received; "
      "p99: end-to-end latency at 500 msg/s per publisher\n")
print("| case | ours msg/s | mosquitto msg/s | ratio (≥1.0) | ours p99 ms | mosquitto p99 ms | ratio (≤1.0) | lost ours/mosq (max run) |")
print("|---|---:|---:|---:|---:|---:|---:|---:|")
for i in range(1, n + 1):
    name = open(f"{tmp}/name-{i}").read().strip()
    mo, mm = load(f"max-ours-{i}"), load(f"max-mosq-{i}")
    lo, lm = load(f"lat-ours-{i}"), load(f"lat-mosq-{i}")
    t_ratio = mo["throughput_msgs_per_s"] / max(mm["throughput_msgs_per_s"], 1e-9)
    p_ratio = lo["latency_ms"]["p99"] / max(lm["latency_ms"]["p99"], 1e-9)
    print(f"| {name} | {mo['throughput_msgs_per_s']:.0f} | {mm['throughput_msgs_per_s']:.0f} | {t_ratio:.2f} | "
          f"{lo['latency_ms']['p99']:.3f} | {lm['latency_ms']['p99']:.3f} | {p_ratio:.2f} | {mo['lost']}/{mm['lost']} |")
print("\nQoS 1 into persistent sessions, 10->10, --rate 0 (no target yet)\n")
print("| broker | msg/s | p50 ms | p99 ms | lost |")
print("|---|---:|---:|---:|---:|")
for label, name in [("ours, fsync every-ack", "pers-every"), ("ours, fsync group 5 ms", "pers-group"),
                    ("mosquitto (in-memory; saves to disk only on autosave/exit)", "pers-mosq")]:
    t = load(name)
    print(f"| {label} | {t['throughput_msgs_per_s']:.0f} | {t['latency_ms']['p50']:.3f} | {t['latency_ms']['p99']:.3f} | {t['lost']} |")
PY
