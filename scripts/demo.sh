#!/usr/bin/env bash
# The main job: build chaosd and the bundled MQTT broker, start the daemon,
# run a real MQTT workload across two network namespaces, inject 20% packet
# loss on the broker's MQTT port for 5 s in the middle of it, and report what
# the workload saw. Everything it creates is removed at the end, also on
# failure. Usage: sudo ./scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

[ "$(id -u)" -eq 0 ] || { echo "demo.sh: run as root (sudo ./scripts/demo.sh): chaosd needs CAP_NET_ADMIN, CAP_SYS_ADMIN and CAP_BPF" >&2; exit 2; }
./scripts/setup.sh
echo "demo: building (release)"
cargo build --release --quiet -p chaosd -p chaosctl -p broker

work=$(mktemp -d /tmp/chaosd-demo.XXXXXX)
sock="$work/chaosd.sock"
bpf="/sys/fs/bpf/chaosd-demo-$$"
nsb="chaosd-demo-broker-$$"
nsc="chaosd-demo-client-$$"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  ip netns del "$nsb" 2>/dev/null || true
  ip netns del "$nsc" 2>/dev/null || true
  rm -rf "$work" "$bpf"
}
trap cleanup EXIT

ctl() { ./target/release/chaosctl --socket "$sock" "$@"; }
say() { printf '\ndemo: %s\n' "$*"; }

# Two hosts: the broker at 10.200.0.1, a client at 10.200.0.2, one veth link.
ip netns add "$nsb"; ip netns add "$nsc"
ip -n "$nsb" link add eth0 type veth peer name eth0 netns "$nsc"
ip -n "$nsb" addr add 10.200.0.1/24 dev eth0; ip -n "$nsc" addr add 10.200.0.2/24 dev eth0
for ns in "$nsb" "$nsc"; do ip -n "$ns" link set lo up; ip -n "$ns" link set eth0 up; done

./target/release/chaosd serve --socket "$sock" --state-dir "$work/state" --bpf-dir "$bpf" 2>"$work/chaosd.log" &
pids+=($!)
for _ in $(seq 200); do ctl status >/dev/null 2>&1 && break; sleep 0.1; done
say "chaosd is up; what this host can do:"
ctl status

ip netns exec "$nsb" ./target/release/broker --mqtt-listen 10.200.0.1:1883 --http-listen 10.200.0.1:9100 \
  --data-dir "$work/broker" --node-name demo 2>"$work/broker.log" &
pids+=($!)
for _ in $(seq 100); do ip netns exec "$nsc" bash -c 'exec 3<>/dev/tcp/10.200.0.1/1883' 2>/dev/null && break; sleep 0.1; done

before=$(ip netns exec "$nsb" sh -c 'tc qdisc show; tc filter show dev eth0 ingress; tc filter show dev eth0 egress; ip link')
say "MQTT workload: 4 publishers -> 4 subscribers, QoS 0/1/2 = 40/50/10, 200 msg/s each, 15 s"
ip netns exec "$nsc" ./target/release/broker bench --addr 10.200.0.1:1883 --protocol 5 --publishers 4 --subscribers 4 \
  --rate 200 --qos-mix 40/50/10 --duration 15 --drain 5 --json >"$work/bench.json" 2>"$work/bench.log" &
bench=$!
pids+=($bench)

sleep 4
say "\$ chaosctl inject network loss --netns $nsb --port 1883 --percent 20 --duration 5s"
id=$(ctl inject network loss --netns "$nsb" --port 1883 --percent 20 --duration 5s)
echo "$id"
sleep 2
say "\$ chaosctl list   (2 s into the fault)"
ctl list
sleep 4
say "\$ chaosctl get $id   (after its 5 s)"
ctl get "$id"

wait "$bench" || { cat "$work/bench.log"; echo "demo: the load client failed" >&2; exit 1; }
say "what the workload saw (QoS 0 may lose messages under loss; QoS 1 and 2 must not):"
python3 - "$work/bench.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"{'QoS':<4}{'sent':>8}{'received':>10}{'lost':>6}{'dup':>5}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}")
for q, row in enumerate(r["qos"]):
    if row["sent"] == 0:
        continue
    l = row["latency_ms"]
    print(f"{q:<4}{row['sent']:>8}{row['received']:>10}{row['lost']:>6}{row['duplicated']:>5}{l['p50']:>9.2f}{l['p99']:>9.2f}{l['max']:>9.2f}")
print(f"reconnects: publishers {r['publisher_reconnects']}, subscribers {r['subscriber_reconnects']}")
lost = r["qos"][1]["lost"] + r["qos"][2]["lost"]
if lost:
    sys.exit(f"demo: {lost} QoS 1/2 message(s) lost: the broker failed the experiment")
print("QoS 1 and 2: nothing lost through the fault")
PY
after=$(ip netns exec "$nsb" sh -c 'tc qdisc show; tc filter show dev eth0 ingress; tc filter show dev eth0 egress; ip link')
if [ "$before" = "$after" ]; then say "the broker's namespace is exactly as before the fault (qdiscs, filters, links)"; else
  say "the broker's namespace differs from before the fault:"; diff <(echo "$before") <(echo "$after") || true; exit 1; fi
say "stopping"
