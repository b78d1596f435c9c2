#!/bin/sh
# The cost of a delay injection on a stock kernel with netem (the host has
# none): 40 delay faults on distinct TCP ports, each injected and recovered
# while another fault keeps the classifier attached, then 40 loss faults the
# same way as a yardstick (the host measures loss natively). Prints p50/p99/
# max of the daemon's own time from request to fault active in the kernel
# and from recover to gone (elapsed_us in its log); under TCG every figure is
# many times the native one, so the delay/loss ratio is the portable figure.
# Checks that every call succeeds and that the namespace equals its snapshot.
# vm-test-timeout: 240
. "$VM_TEST_LIB"
need chaosd chaosctl ip tc awk

two_namespaces
start_chaosd
before=$(snapshot_a)

inject() { # ACTION PORT ARGS...: prints the id
  _action=$1 _port=$2
  shift 2
  chaosctl --output json inject network "$_action" --netns a --protocol tcp --port "$_port" --duration 2m "$@" \
    > /tmp/inject.json 2> /tmp/inject.err || fail "inject $_action on port $_port: $(cat /tmp/inject.err)"
  json_get id < /tmp/inject.json | tr -d '"'
}
stats() { awk '{ v[NR] = $1 } END { printf "p50 %.3f ms p99 %.3f ms max %.3f ms", v[int(0.5 * (NR - 1) + 0.5) + 1] / 1000, v[int(0.99 * (NR - 1) + 0.5) + 1] / 1000, v[NR] / 1000 }' "$1"; }
p50() { awk '{ v[NR] = $1 } END { print v[int(0.5 * (NR - 1) + 0.5) + 1] }' "$1"; }
# measure NAME ACTION ARGS...: 40 faults of ACTION on ports 20000.., each
# recovered at once; leaves the sorted elapsed_us in /tmp/NAME.inj and .rec.
measure() {
  name=$1 action=$2
  shift 2
  keep=$(inject "$action" 9 "$@")
  from=$(wc -l < "$log")
  i=0
  while [ $i -lt 40 ]; do
    id=$(inject "$action" $((20000 + i)) "$@")
    chaosctl recover "$id" > /dev/null || fail "recover $id"
    i=$((i + 1))
  done
  tail -n +$((from + 1)) "$log" > "$log.part"
  chaosctl recover "$keep" > /dev/null || fail "recover $keep"
  [ "$(snapshot_a)" = "$before" ] || fail "namespace differs from its snapshot after 41 $action faults"
  grep ' injected ' "$log.part" | sed -n 's/.*elapsed_us=\([0-9]*\).*/\1/p' | sort -n > "/tmp/$name.inj"
  grep ' ended ' "$log.part" | sed -n 's/.*elapsed_us=\([0-9]*\).*/\1/p' | sort -n > "/tmp/$name.rec"
  for f in inj rec; do
    [ "$(wc -l < "/tmp/$name.$f")" -eq 40 ] || fail "expected 40 $name times ($f) in the log, found $(wc -l < "/tmp/$name.$f")"
  done
  ok "40 $action faults injected and recovered, namespace identical"
  echo "BENCH $name inject (daemon side, TCG guest), n=40: $(stats "/tmp/$name.inj")"
  echo "BENCH $name recover (daemon side, TCG guest), n=40: $(stats "/tmp/$name.rec")"
}
measure delay delay --latency 100ms
measure loss loss --percent 10
awk -v d="$(p50 /tmp/delay.inj)" -v l="$(p50 /tmp/loss.inj)" -v dr="$(p50 /tmp/delay.rec)" -v lr="$(p50 /tmp/loss.rec)" \
  'BEGIN { printf "BENCH ratio p50 delay / loss in the same guest: inject %.1f, recover %.1f\n", d / l, dr / lr }'
ok "net-inject-latency done"
