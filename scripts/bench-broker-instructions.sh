#!/usr/bin/env bash
# User-space instructions per message, this broker against Debian's mosquitto,
# counted by valgrind's callgrind. Timing moves it only through how messages
# batch: three runs agreed within 1.5% per case except QoS 1 fan-in (10,800
# to 12,667), where the router gathers a burst into one write or not; latency
# and throughput move far more. It
# shows where the broker's own work per message stands; it says nothing of
# the kernel's part (the socket calls, the same for both brokers).
#
# Each broker runs under callgrind twice, with the same `broker bench` load
# (50 msg/s per publisher, slow enough under callgrind that messages are
# handled one at a time, as at bench-broker.sh's fixed rate), once for 2 s and once
# for 6 s; the difference of the two totals divided by the difference in
# messages leaves out start-up and connection set-up.
# Usage: scripts/bench-broker-instructions.sh   (both brokers on 127.0.0.1 only)
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
for tool in valgrind mosquitto; do
  command -v "$tool" >/dev/null || { echo "bench-broker-instructions.sh: $tool is not installed (scripts/setup.sh installs it)" >&2; exit 1; }
done
cargo build --release -p broker >&2
BIN=$PWD/target/release/broker

tmp=$(mktemp -d)
pid=
cleanup() {
  [ -n "$pid" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
  rm -rf "$tmp"
}
trap cleanup EXIT INT TERM

# shellcheck source=scripts/lib/ports.sh
source scripts/lib/ports.sh  # the script has cd-ed to the repository root

# count BROKER SECONDS BENCH-ARGS...: prints "instructions messages"
count() {
  local broker=$1 secs=$2 port out msgs
  shift 2
  port=$(free_port)
  out=$tmp/callgrind.out
  rm -f "$out"
  if [ "$broker" = mosquitto ]; then
    # `user root`: mosquitto would otherwise drop to its own user, which
    # cannot write callgrind's output file.
    printf 'user root\nlistener %s 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\nmax_queued_messages 100000\nmax_inflight_messages 100\n' "$port" >"$tmp/mosquitto.conf"
    valgrind --tool=callgrind --vgdb=no --callgrind-out-file="$out" mosquitto -c "$tmp/mosquitto.conf" >"$tmp/broker.log" 2>&1 &
  else
    RUST_LOG=warn valgrind --tool=callgrind --vgdb=no --callgrind-out-file="$out" "$BIN" --mqtt-listen 127.0.0.1:"$port" >"$tmp/broker.log" 2>&1 &
  fi
  pid=$!
  # valgrind takes a few seconds to start a program.
  wait_port "$port" 200
  msgs=$("$BIN" bench --addr 127.0.0.1:"$port" --json --duration "$secs" --drain 2 --rate 50 --payload 256 \
    --prefix "i$RANDOM" "$@" | python3 -c 'import json,sys; print(json.load(sys.stdin)["total"]["received"])')
  kill -INT "$pid"
  wait "$pid" || true
  pid=
  [ -s "$out" ] || { echo "bench-broker-instructions.sh: callgrind wrote nothing for $broker" >&2; cat "$tmp/broker.log" >&2; exit 1; }
  echo "$(awk '/^summary:/ { print $2 }' "$out") $msgs"
}

per_message() { # BROKER BENCH-ARGS...
  local a b
  a=$(count "$1" 2 "${@:2}")
  b=$(count "$1" 6 "${@:2}")
  echo "$a $b" | awk -v who="$1" '{
    if ($4 <= $2) { print "bench-broker-instructions.sh: " who ": the 6 s run received no more messages than the 2 s run (" $2 ", " $4 ")" > "/dev/stderr"; exit 1 }
    printf "%.0f\n", ($3 - $1) / ($4 - $2) }'
}

cases=(
  "qos0 10->10|--qos-mix 100/0/0 --publishers 10 --subscribers 10 --topics 10"
  "qos1 10->10|--qos-mix 0/100/0 --publishers 10 --subscribers 10 --topics 10"
  "qos1 fan-in 10->1|--qos-mix 0/100/0 --publishers 10 --subscribers 1 --sub-mode all"
  "qos0 fan-out 1->10|--qos-mix 100/0/0 --publishers 1 --subscribers 10 --topics 1"
  "qos1 fan-out 1->10|--qos-mix 0/100/0 --publishers 1 --subscribers 10 --topics 1"
)
echo "user-space instructions per message received by a subscriber (callgrind), 256-byte payloads, 50 msg/s per publisher"
echo
echo "| case | ours | mosquitto | ratio |"
echo "|---|---:|---:|---:|"
for c in "${cases[@]}"; do
  name=${c%%|*}
  read -ra args <<<"${c#*|}"
  ours=$(per_message ours "${args[@]}")
  mosq=$(per_message mosquitto "${args[@]}")
  echo "| $name | $ours | $mosq | $(awk -v a="$ours" -v b="$mosq" 'BEGIN { printf "%.2f", a / b }') |"
done
