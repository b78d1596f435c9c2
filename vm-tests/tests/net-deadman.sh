#!/bin/sh
# The dead man's switch with netem on the stock kernel (clsact attach path):
# 100 ms of delay without a duration; SIGKILL chaosd; within grace + 1 s the
# RTT is back to normal (nothing is steered to netem any more). A chaosd
# started after the grace period does not resume the fault: it reverts it,
# and the namespace equals its snapshot.
# vm-test-timeout: 240
. "$VM_TEST_LIB"
need chaosd chaosctl ip tc ping awk

sock=/run/chaosd/chaosd.sock
log=/tmp/chaosd.log
trap 'echo "----- chaosd log"; cat "$log"; echo "-----"' EXIT

ip netns add a && ip netns add b || fail "ip netns add"
ip -n a link add va type veth peer name vb netns b || fail "veth"
ip -n a link set lo up; ip -n b link set lo up
ip -n a addr add 10.9.0.1/24 dev va; ip -n b addr add 10.9.0.2/24 dev vb
ip -n a link set va up; ip -n b link set vb up
wait_for 10 "IPv4 between the namespaces" ip netns exec a ping -c1 -W1 10.9.0.2
snapshot() {
  ip netns exec a sh -c 'tc qdisc show; tc class show dev va; tc filter show dev va ingress; tc filter show dev va egress; ip link'
}
rtt() { ip netns exec a ping -c 1 -W 2 10.9.0.2 2>/dev/null | sed -n 's/.*time=\([0-9.]*\) ms.*/\1/p'; }
start_daemon() {
  rm -f "$sock"
  RUST_BACKTRACE=1 chaosd serve --grace 2s >> "$log" 2>&1 &
  daemon=$!
  wait_for 60 "chaosd's socket" test -S "$sock"
}

before=$(snapshot)
start_daemon
chaosctl --output json inject network delay --netns a --protocol icmp --latency 100ms > /tmp/inject.json 2> /tmp/inject.err \
  || fail "inject: $(cat /tmp/inject.err)"
id=$(json_get id < /tmp/inject.json | tr -d '"')
r=$(rtt)
awk -v r="$r" 'BEGIN { exit !(r >= 95) }' || fail "delay not active (RTT '$r' ms)"
ok "delay active ($id), RTT $r ms"

kill -KILL "$daemon"; wait "$daemon" 2>/dev/null
t0=$(cut -d' ' -f1 /proc/uptime)
back=""
while :; do
  r=$(rtt)
  now=$(cut -d' ' -f1 /proc/uptime)
  el=$(awk -v a="$t0" -v b="$now" 'BEGIN { printf "%.2f", b - a }')
  if [ -n "$r" ] && awk -v r="$r" 'BEGIN { exit !(r < 20) }'; then back=$el; break; fi
  awk -v e="$el" 'BEGIN { exit !(e > 6) }' && break
  sleep 0.1
done
[ -n "$back" ] || fail "RTT still ${r} ms 6 s after SIGKILL"
echo "RTT back to $r ms ${back}s after SIGKILL (grace 2s)"
awk -v e="$back" 'BEGIN { exit !(e <= 3.0) }' || fail "took ${back}s, more than grace + 1 s"
ok "dead man's switch: delay gone ${back}s after SIGKILL"

start_daemon
wait_for 20 "the stale fault to be reverted" sh -c "[ \"\$(ip netns exec a tc qdisc show dev va | grep -c htb)\" = 0 ]"
after=$(snapshot)
[ "$after" = "$before" ] || fail "namespace differs after the restarted daemon reverted the fault:
--- before
$before
--- after
$after"
chaosctl get "$id" > /tmp/get.txt 2>&1 || true
echo "chaosctl get $id: $(cat /tmp/get.txt | head -5)"
ok "restarted chaosd reverted the fault; namespace equals its snapshot"
kill -TERM "$daemon"; wait "$daemon"
trap - EXIT
