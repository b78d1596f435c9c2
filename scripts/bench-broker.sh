#!/usr/bin/env bash
# Side-by-side benchmark: this broker vs Debian's mosquitto, same load client
# (`broker bench`), same settings, in one run on this machine. Prints ratios.
# Both brokers listen on 127.0.0.1 only and are stopped on exit.
# mosquitto gets TCP_NODELAY (as this broker uses) and the same queue bound, so
# the comparison is with its best settings, not its defaults.
# Usage: scripts/bench-broker.sh  (BENCH_DURATION=3 s per run, BENCH_REPS=3 rounds,
#        BENCH_LAT_RUNS=4 latency runs per broker, case and round)
# Reported: throughput is the median of BENCH_REPS runs per broker. p99
# latency is given over every sample of the BENCH_REPS x BENCH_LAT_RUNS
# latency runs of a broker pooled, and as the median of those runs' own
# p99s; "p99 wins" counts the paired runs (ours and mosquitto back to back)
# where ours had the lower or equal p99. The brokers take turns going first.
# "steal" is the share of CPU time the host gave to other guests during the
# latency runs: stalls of this VM that both brokers' tails go through.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
DUR=${BENCH_DURATION:-3}
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
# Sets $port. Not called in $(...): the pid must reach this shell's cleanup list.
start_ours() { # name, extra args...
  port=$(free_port)
  RUST_LOG=warn "$BIN" --mqtt-listen 127.0.0.1:"$port" "${@:2}" >"$tmp/$1.log" 2>&1 &
  pids+=($!)
  wait_port "$port"
}

MQ_PORT=$(free_port)
printf 'listener %s 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\nmax_queued_messages 100000\nmax_inflight_messages 100\n' "$MQ_PORT" >"$tmp/mosquitto.conf"
mosquitto -c "$tmp/mosquitto.conf" >"$tmp/mosquitto.log" 2>&1 &
pids+=($!)
wait_port "$MQ_PORT"
# Our broker asks the kernel for a 100 µs scheduler slice (sched_slice_us);
# mosquitto gets the same, so that neither is favoured when both wait for a
# CPU at the same time. Linux < 6.12 ignores the slice for both.
python3 - "${pids[-1]}" <<'PY'
import ctypes, os, platform, struct, sys
nr = {"x86_64": 314, "aarch64": 274}.get(platform.machine())
if nr is None:
    sys.exit(f"bench-broker.sh: sched_setattr's number on {platform.machine()} unknown: add it")
libc = ctypes.CDLL(None, use_errno=True)
for tid in os.listdir(f"/proc/{sys.argv[1]}/task"):
    # struct sched_attr (48 bytes): size, policy SCHED_OTHER, flags, nice, priority, runtime (ns), deadline, period
    attr = struct.pack("=IIQiIQQQ", 48, 0, 0, os.getpriority(os.PRIO_PROCESS, int(tid)), 0, 100_000, 0, 0)
    if libc.syscall(nr, int(tid), ctypes.c_char_p(attr), 0) != 0:
        sys.exit(f"bench-broker.sh: sched_setattr on mosquitto thread {tid}: {os.strerror(ctypes.get_errno())}")
PY
start_ours ours; OUR_PORT=$port
start_ours every --data-dir "$tmp/data-every" --fsync every-ack; P_EVERY=$port
start_ours group --data-dir "$tmp/data-group" --fsync group --group-commit-ms 5; P_GROUP=$port

cpu_stat() { # steal and total jiffies of all CPUs
  awk '/^cpu / { t = 0; for (i = 2; i <= NF; i++) t += $i; print $9, t }' /proc/stat
}
run() { # output name, port, bench args...
  "$BIN" bench --addr 127.0.0.1:"$2" --json --duration "$DUR" --drain "$DRAIN" --payload 256 \
    --prefix "b$RANDOM" --id-prefix "$1" --latency-samples "$tmp/$1.lat" "${@:3}" >"$tmp/$1.json"
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
# Each measurement is repeated, interleaving the two brokers: the machine is
# shared, single runs are noisy.
REPS=${BENCH_REPS:-3}
LAT_RUNS=${BENCH_LAT_RUNS:-4}
for rep in $(seq "$REPS"); do
  i=0
  for c in "${cases[@]}"; do
    name=${c%%|*}; args=${c#*|}
    i=$((i+1))
    echo "bench-broker.sh: round $rep/$REPS case $i/${#cases[@]}: $name" >&2
    echo "$name" >"$tmp/name-$i"
    order="ours mosq"; [ $((rep % 2)) = 0 ] && order="mosq ours"
    for b in $order; do
      port=$OUR_PORT; [ "$b" = mosq ] && port=$MQ_PORT
      # shellcheck disable=SC2086
      run "max-$b-$i-$rep" "$port" $args --rate 0
    done
    for l in $(seq "$LAT_RUNS"); do
      # ABBA: whoever went first goes second in the next pair.
      [ $((l % 2)) = 0 ] && order=$(echo "$order" | awk '{print $2, $1}')
      cpu_stat >>"$tmp/cpu-before"
      for b in $order; do
        port=$OUR_PORT; [ "$b" = mosq ] && port=$MQ_PORT
        # shellcheck disable=SC2086
        run "lat-$b-$i-$rep-$l" "$port" $args --rate 500
      done
      cpu_stat >>"$tmp/cpu-after"
    done
  done
  echo "bench-broker.sh: round $rep/$REPS: QoS 1 into persistent sessions" >&2
  pers="--qos-mix 0/100/0 --publishers 10 --subscribers 10 --topics 10 --persistent"
  # shellcheck disable=SC2086
  run "pers-every-$rep" "$P_EVERY" $pers --rate 0
  # shellcheck disable=SC2086
  run "pers-group-$rep" "$P_GROUP" $pers --rate 0
  # shellcheck disable=SC2086
  run "pers-mosq-$rep" "$MQ_PORT" $pers --rate 0
done

python3 - "$tmp" "${#cases[@]}" "$DUR" "$REPS" "$LAT_RUNS" <<'PY'
import json, statistics, sys
tmp, n, dur, reps, lat_runs = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
def load(name):
    with open(f"{tmp}/{name}.json") as f:
        return json.load(f)["total"]
def runs(name):
    return [load(f"{name}-{r}") for r in range(1, reps + 1)]
def lat_names(b, i):
    return [f"lat-{b}-{i}-{r}-{l}" for r in range(1, reps + 1) for l in range(1, lat_runs + 1)]
def samples(names):
    # Every latency sample (µs) of these runs, sorted.
    return sorted(int(v) for nm in names for v in open(f"{tmp}/{nm}.lat").read().split())
def pct(xs, q):
    # Same rank rule as the load client's own percentiles (bench/stats.rs).
    return xs[min(round((len(xs) - 1) * q), len(xs) - 1)] / 1000 if xs else 0.0
def med(rs, f):
    return statistics.median(f(x) for x in rs)
tput = lambda x: x["throughput_msgs_per_s"]
p99 = lambda x: x["latency_ms"]["p99"]
p50 = lambda x: x["latency_ms"]["p50"]
lost = lambda x: x["lost"]
k = reps * lat_runs
print(f"\nbroker vs mosquitto, 256-byte payloads, {dur} s per run, brokers interleaved, same load client, this machine")
print(f"throughput: --rate 0 (publishers send as fast as each broker takes it), msg/s received by subscribers, median of {reps} runs;")
print(f"p99: end-to-end latency at a fixed 500 msg/s per publisher, {k} runs per broker, back to back in pairs (ABBA);")
print(f"  pooled: over all samples of the {k} runs; run median: the median of the {k} runs' own p99s")
print(f"p99 wins: pairs in which ours had the lower or equal p99; lost: median messages not received")
before = [tuple(map(int, l.split())) for l in open(f"{tmp}/cpu-before")]
after = [tuple(map(int, l.split())) for l in open(f"{tmp}/cpu-after")]
steal = sum(a[0] - b[0] for a, b in zip(after, before)) / max(sum(a[1] - b[1] for a, b in zip(after, before)), 1)
print(f"steal: {100 * steal:.1f}% of CPU time during the latency runs went to other guests of the host\n")
print("| case | ours msg/s | mosquitto msg/s | ratio (target ≥ 1.0) | p99 pooled ours / mosq ms | ratio (target ≤ 1.0) | p99 run median ours / mosq ms | ratio | p99 wins | p50 ours / mosq ms | lost at max rate ours / mosq | lost at 500/s ours / mosq |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for i in range(1, n + 1):
    name = open(f"{tmp}/name-{i}").read().strip()
    mo, mm = runs(f"max-ours-{i}"), runs(f"max-mosq-{i}")
    lo, lm = [load(x) for x in lat_names("ours", i)], [load(x) for x in lat_names("mosq", i)]
    to, tm = med(mo, tput), med(mm, tput)
    so, sm = samples(lat_names("ours", i)), samples(lat_names("mosq", i))
    po, pm, qo, qm = pct(so, 0.99), pct(sm, 0.99), pct(so, 0.5), pct(sm, 0.5)
    ro, rm = med(lo, p99), med(lm, p99)
    wins = sum(p99(a) <= p99(b) for a, b in zip(lo, lm))
    print(f"| {name} | {to:.0f} | {tm:.0f} | {to / max(tm, 1e-9):.2f} | {po:.3f} / {pm:.3f} | {po / max(pm, 1e-9):.2f} | "
          f"{ro:.3f} / {rm:.3f} | {ro / max(rm, 1e-9):.2f} | {wins}/{k} | {qo:.3f} / {qm:.3f} | "
          f"{med(mo, lost):.0f} / {med(mm, lost):.0f} | {med(lo, lost):.0f} / {med(lm, lost):.0f} |")
print(f"\nQoS 1 into persistent sessions, 10->10, --rate 0, median of {reps} runs (no target yet)\n")
print("| broker | msg/s | p50 ms | p99 ms | lost |")
print("|---|---:|---:|---:|---:|")
for label, name in [("ours, fsync every-ack", "pers-every"), ("ours, fsync group 5 ms", "pers-group"),
                    ("mosquitto (no persistence configured: in memory)", "pers-mosq")]:
    rs = runs(name)
    print(f"| {label} | {med(rs, tput):.0f} | {med(rs, p50):.3f} | {med(rs, p99):.3f} | {med(rs, lost):.0f} |")
PY
