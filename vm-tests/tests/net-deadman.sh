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
# Each ping's send time is read before it is forked (no fork for the clock:
# under TCG a fork costs tens of ms), so the fault ended after the last
# delayed ping was sent and before the first fast one was: the window is
# (slow, back]. Late is proven when a ping sent after grace + 1 s was still
# delayed; in time when the first fast one went before grace + 1 s.
# /proc/uptime has two decimals: ${u%.*}${u#*.} is centiseconds, no fork.
read -r u _ < /proc/uptime
t0=${u%.*}${u#*.}
slow=0 back="" el=0
while [ "$el" -le 600 ]; do
  read -r u _ < /proc/uptime
  el=$(( ${u%.*}${u#*.} - t0 ))
  r=$(rtt)
  if [ -n "$r" ] && [ "${r%%.*}" -lt 20 ]; then back=$el; break; fi
  slow=$el
done
secs() { awk -v c="$1" 'BEGIN { printf "%.2f", c / 100 }'; }
[ -n "$back" ] || fail "RTT still ${r} ms 6 s after SIGKILL"
echo "RTT back to $r ms: the delay ended between $(secs $slow)s and $(secs $back)s after SIGKILL (grace 2s)"
[ "$slow" -le 300 ] || fail "a ping sent $(secs $slow)s after SIGKILL was still delayed: more than grace + 1 s"
[ "$back" -le 300 ] || echo "note: the first fast ping went $(secs $back)s after SIGKILL; the previous one ($(secs $slow)s) was still delayed, so the end lies in between"
back=$(secs $back)
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
