#!/bin/sh
# Pure cgroup v2, stock kernel, through chaosd serve + chaosctl: a process that
# appends a counter every 100 ms writes nothing while paused and goes on once
# the pause is recovered. When chaosd is SIGKILLed during a pause, the
# guardian keeps the process paused (grace 60 s), and the restarted chaosd
# resumes it at once from its journal.
# vm-test-timeout: 240
. "$VM_TEST_LIB"
need chaosd chaosctl awk

sock=/run/chaosd/chaosd.sock
log=/tmp/chaosd.log
trap 'echo "----- chaosd log"; cat "$log"; echo "-----"' EXIT

start_daemon() {
  rm -f "$sock"
  RUST_BACKTRACE=1 chaosd serve --grace 60s >> "$log" 2>&1 &
  daemon=$!
  tries=600
  until [ -S "$sock" ]; do
    kill -0 "$daemon" 2>/dev/null || fail "chaosd serve exited before creating $sock"
    tries=$((tries - 1))
    [ "$tries" -gt 0 ] || fail "no socket $sock after 60s"
    sleep 0.1
  done
}
state() { # the process state letter, with builtins only
  read -r line < "/proc/$1/stat" || return 1
  st=${line##*) }
  echo "${st%% *}"
}
lines() { wc -l < /tmp/counter; }
pause() {
  chaosctl --output json inject process pause --pid "$cpid" --duration 2m > /tmp/inject.json 2> /tmp/inject.err \
    || fail "chaosctl inject process pause: $(cat /tmp/inject.err)"
  id=$(json_get id < /tmp/inject.json | tr -d '"')
}

: > /tmp/counter
sh -c 'i=0; while :; do echo $i >> /tmp/counter; i=$((i + 1)); sleep 0.1; done' &
cpid=$!
wait_for 10 "the counter to print" sh -c '[ "$(wc -l < /tmp/counter)" -ge 3 ]'
start_daemon
ok "chaosd (pid $daemon) serving, counter pid $cpid"

pause
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

pause
[ "$(state "$cpid")" = T ] || fail "counter not stopped by the second pause"
kill -KILL "$daemon"
wait "$daemon" 2>/dev/null
sleep 1
[ "$(state "$cpid")" = T ] || fail "the counter was resumed within 1 s of chaosd's death (grace is 60 s)"
ok "chaosd killed; the guardian keeps the counter paused"
read -r t0 _ < /proc/uptime
start_daemon
wait_for 10 "the restarted chaosd to resume the counter" sh -c "[ \"\$(cut -d' ' -f3 /proc/$cpid/stat)\" != T ]"
read -r t1 _ < /proc/uptime
chaosctl --output json get "$id" > /tmp/get.json || fail "chaosctl get $id"
echo "after restart: state $(json_get state < /tmp/get.json), reason $(json_get reason < /tmp/get.json)"
ok "the restarted chaosd resumed the counter $(awk -v s="$t0" -v e="$t1" 'BEGIN { printf "%.1f", e - s }') s after it was started (guardian grace 60 s)"
n2=$(lines)
wait_for 5 "the counter to print after the restart" sh -c "[ \$(wc -l < /tmp/counter) -gt $n2 ]"
