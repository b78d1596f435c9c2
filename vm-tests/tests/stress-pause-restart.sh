#!/bin/sh
# Pure cgroup v2, stock kernel, through chaosd serve + chaosctl: a process that
# appends a counter every 100 ms writes nothing while paused and goes on once
# the pause is recovered. When chaosd is SIGKILLed during a pause, the
# guardian keeps the process paused (grace 60 s); the restarted chaosd adopts
# the pause from its journal and resumes the process at its deadline.
# vm-test-timeout: 240
. "$VM_TEST_LIB"
need chaosd chaosctl awk


state() { # the process state letter, with builtins only
  read -r line < "/proc/$1/stat" || return 1
  st=${line##*) }
  echo "${st%% *}"
}
lines() { wc -l < /tmp/counter; }
pause() { # pause DURATION
  chaosctl --output json inject process pause --pid "$cpid" --duration "$1" > /tmp/inject.json 2> /tmp/inject.err \
    || fail "chaosctl inject process pause: $(cat /tmp/inject.err)"
  id=$(json_get id < /tmp/inject.json | tr -d '"')
}

: > /tmp/counter
sh -c 'i=0; while :; do echo $i >> /tmp/counter; i=$((i + 1)); sleep 0.1; done' &
cpid=$!
wait_for 10 "the counter to print" sh -c '[ "$(wc -l < /tmp/counter)" -ge 3 ]'
start_chaosd --grace 60s
ok "chaosd (pid $daemon) serving, counter pid $cpid"

pause 2m
[ "$(state "$cpid")" = T ] || fail "counter is in state $(state "$cpid") after the pause, want T"
sleep 0.3
n0=$(lines)
sleep 2
n1=$(lines)
[ "$n1" -eq "$n0" ] || fail "the paused counter printed $((n1 - n0)) lines in 2 s"
ok "experiment $id: counter stopped, no line in 2 s"
chaosctl recover "$id" > /dev/null || fail "chaosctl recover $id"
wait_for 5 "the counter to print again after recover" sh -c "[ \$(wc -l < /tmp/counter) -gt $n1 ]"
ok "recovered: the counter prints again"

# Under TCG a restart takes several seconds (probes): a 30 s pause leaves
# time to see it adopted and still paused.
pause 30s
read -r t_pause _ < /proc/uptime
[ "$(state "$cpid")" = T ] || fail "counter not stopped by the second pause"
kill -KILL "$daemon"
wait "$daemon" 2>/dev/null
sleep 1
[ "$(state "$cpid")" = T ] || fail "the counter was resumed within 1 s of chaosd's death (grace is 60 s)"
ok "chaosd killed; the guardian keeps the counter paused"
start_chaosd --grace 60s
chaosctl --output json get "$id" > /tmp/get.json || fail "chaosctl get $id after restart"
st=$(json_get state < /tmp/get.json)
[ "$st" = '"active"' ] || fail "after restart the pause is $st ($(json_get reason < /tmp/get.json)), want \"active\" (adopted)"
[ "$(state "$cpid")" = T ] || fail "the counter runs again right after the restart; the pause is due for 30 s"
ok "restarted chaosd adopted pause $id; counter still stopped"
wait_for 40 "the counter to be resumed at the pause's deadline" sh -c "[ \"\$(cut -d' ' -f3 /proc/$cpid/stat)\" != T ]"
read -r t_resumed _ < /proc/uptime
after=$(awk -v s="$t_pause" -v e="$t_resumed" 'BEGIN { printf "%.1f", e - s }')
awk -v a="$after" 'BEGIN { exit !(a >= 29 && a <= 33) }' || fail "resumed ${after} s after the 30 s pause began"
ok "resumed ${after} s after the 30 s pause began"
wait_for 5 "the experiment to expire" sh -c "chaosctl --output json get $id | grep -q '\"state\": *\"expired\"'"
n2=$(lines)
wait_for 5 "the counter to print after the pause" sh -c "[ \$(wc -l < /tmp/counter) -gt $n2 ]"
ok "experiment $id expired, counter prints again"
