#!/bin/sh
# Pure cgroup v2, stock kernel: 200 MiB of memory stress in a cgroup whose
# memory.max is 128 MiB ends in an OOM kill of a stressor (not of the target):
# `chaosctl get` reports it (state failed, reason OOM kill, oom_kills >= 1) and
# the cgroup's memory.events shows it. Then 64 MiB under the same limit stays
# resident without using CPU.
# vm-test-timeout: 240
. "$VM_TEST_LIB"
need chaosd chaosctl awk

cg=/sys/fs/cgroup/chaosd-stress-mem

mkdir "$cg" || fail "mkdir $cg"
grep -qw memory "$cg/cgroup.controllers" || fail "no memory controller in $cg"
echo $((128 * 1024 * 1024)) > "$cg/memory.max" || fail "setting memory.max"
echo 0 > "$cg/memory.swap.max" 2>/dev/null
sleep 1000 &
target=$!
echo "$target" > "$cg/cgroup.procs" || fail "moving pid $target into $cg"

start_chaosd
ok "chaosd (pid $daemon) serving"

oom_kill() { awk '$1 == "oom_kill" { print $2 }' "$cg/memory.events"; }
before=$(oom_kill)

chaosctl --output json inject stress memory --pid "$target" --size 200MiB --duration 2m > /tmp/inject.json 2> /tmp/inject.err \
  || fail "chaosctl inject stress memory: $(cat /tmp/inject.err)"
id=$(json_get id < /tmp/inject.json | tr -d '"')
ok "experiment $id injected"

tries=300
while :; do
  chaosctl --output json get "$id" > /tmp/get.json || fail "chaosctl get $id"
  state=$(json_get state < /tmp/get.json)
  [ "$state" != '"active"' ] && [ "$state" != '"injecting"' ] && break
  tries=$((tries - 1))
  [ "$tries" -gt 0 ] || fail "experiment still $state after 30 s: no OOM kill reported"
  sleep 0.1
done
cat /tmp/get.json
reason=$(json_get reason < /tmp/get.json)
kills=$(json_get counters.oom_kills < /tmp/get.json)
[ "$state" = '"failed"' ] || fail "state $state, want \"failed\" (reason $reason)"
echo "$reason" | grep -q "OOM kill" || fail "reason does not say OOM kill: $reason"
[ "${kills:-0}" -ge 1 ] || fail "counters.oom_kills is $kills"
ok "get: state $state, oom_kills $kills, reason $reason"
after=$(oom_kill)
echo "memory.events: $(tr '\n' ' ' < "$cg/memory.events")"
[ "$after" -gt "$before" ] || fail "memory.events oom_kill went $before -> $after"
kill -0 "$target" || fail "the OOM killer chose the target, not the stressor"
ok "memory.events oom_kill $before -> $after; target $target alive"

# Under the limit: resident, no CPU.
chaosctl --output json inject stress memory --cgroup "$cg" --size 50% --workers 2 > /tmp/inject.json 2> /tmp/inject.err \
  || fail "chaosctl inject stress memory --size 50%: $(cat /tmp/inject.err)"
id=$(json_get id < /tmp/inject.json | tr -d '"')
tries=300
while :; do
  chaosctl --output json get "$id" > /tmp/get.json || fail "chaosctl get $id"
  rss=$(json_get counters.stress_resident_bytes < /tmp/get.json)
  [ "${rss:-0}" -ge $((64 * 1024 * 1024)) ] && break
  tries=$((tries - 1))
  [ "$tries" -gt 0 ] || fail "resident $rss bytes after 30 s, want 64 MiB"
  sleep 0.1
done
c0=$(json_get counters.stress_cpu_time_ns < /tmp/get.json)
sleep 2
chaosctl --output json get "$id" > /tmp/get.json || fail "chaosctl get $id"
c1=$(json_get counters.stress_cpu_time_ns < /tmp/get.json)
echo "50% of 128 MiB: resident $rss bytes; stressor CPU over 2 s: $((c1 - c0)) ns"
[ $((c1 - c0)) -lt 100000000 ] || fail "memory stressors used $((c1 - c0)) ns of CPU in 2 s while holding"
chaosctl recover "$id" || fail "chaosctl recover $id"
ok "50% of the limit resident ($rss bytes) without burning CPU; recovered"
