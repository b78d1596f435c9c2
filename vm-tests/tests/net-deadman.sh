#!/bin/sh
# The dead man's switch with netem on the stock kernel (clsact attach path):
# 100 ms of delay without a duration; SIGKILL chaosd; within grace + 1 s the
# RTT is back to normal (nothing is steered to netem any more). A chaosd
# started after the grace period does not resume the fault: it reverts it,
# and the namespace equals its snapshot.
# vm-test-timeout: 240
. "$VM_TEST_LIB"
need chaosd chaosctl ip tc ping awk


two_namespaces
wait_for 10 "IPv4 between the namespaces" ip netns exec a ping -c1 -W1 10.9.0.2
rtt() { ip netns exec a ping -c 1 -W 2 10.9.0.2 2>/dev/null | sed -n 's/.*time=\([0-9.]*\) ms.*/\1/p'; }

before=$(snapshot_a)
start_chaosd --grace 2s
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

start_chaosd --grace 2s
wait_for 20 "the stale fault to be reverted" sh -c "[ \"\$(ip netns exec a tc qdisc show dev va | grep -c htb)\" = 0 ]"
after=$(snapshot_a)
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
