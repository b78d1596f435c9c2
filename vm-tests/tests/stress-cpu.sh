#!/bin/sh
# Pure cgroup v2, stock kernel: `chaosctl inject stress cpu --pid P --workers 2
# --load 50` puts two stressors into P's cgroup, which then gains 1.0 CPU
# (±0.15) in its cpu.stat usage_usec; after recover no stressor is left and
# the usage stops rising. A stress whose daemon is SIGKILLed is gone within
# 1 s, and the restarted daemon does not resume it.
# vm-test-timeout: 240
. "$VM_TEST_LIB"
need chaosd chaosctl awk

cg=/sys/fs/cgroup/chaosd-stress-cpu

mkdir "$cg" || fail "mkdir $cg"
grep -qw cpu "$cg/cgroup.controllers" || fail "no cpu controller in $cg ($(cat "$cg/cgroup.controllers"))"
sleep 1000 &
target=$!
echo "$target" > "$cg/cgroup.procs" || fail "moving pid $target into $cg"


usage_us() { awk '$1 == "usage_usec" { print $2 }' "$cg/cpu.stat"; }
now() { cut -d' ' -f1 /proc/uptime; }
# Pids whose comm is chaosd-stressor.
stressors() {
  for d in /proc/[0-9]*; do
    [ "$(cat "$d/comm" 2>/dev/null)" = chaosd-stressor ] && echo "${d#/proc/}"
  done
}
inject() {
  chaosctl --output json inject stress cpu --pid "$target" --workers 2 --load 50 "$@" > /tmp/inject.json 2> /tmp/inject.err \
    || fail "chaosctl inject stress cpu: $(cat /tmp/inject.err)"
  id=$(json_get id < /tmp/inject.json | tr -d '"')
  [ -n "$id" ] || fail "no experiment id in $(cat /tmp/inject.json)"
}

start_chaosd
ok "chaosd (pid $daemon) serving"

u_before=$(usage_us)
inject --duration 2m
pids=$(stressors)
[ "$(echo "$pids" | wc -w)" -eq 2 ] || fail "want 2 stressors, found: $pids"
for p in $pids; do
  grep -qx "0::/chaosd-stress-cpu" "/proc/$p/cgroup" || fail "stressor $p is in $(cat "/proc/$p/cgroup"), not $cg"
done
ok "experiment $id: stressors $(echo $pids) in $cg"

sleep 1
u0=$(usage_us); t0=$(now)
sleep 5
u1=$(usage_us); t1=$(now)
cpus=$(awk -v a="$u0" -v b="$u1" -v s="$t0" -v e="$t1" 'BEGIN { printf "%.3f", (b - a) / 1e6 / (e - s) }')
echo "cgroup usage with 2 workers at 50%: $cpus CPUs over $(awk -v s="$t0" -v e="$t1" 'BEGIN { printf "%.2f", e - s }') s"
awk -v c="$cpus" 'BEGIN { exit !(c >= 0.85 && c <= 1.15) }' || fail "usage $cpus CPUs, want 1.0 +- 0.15"
ok "usage $cpus CPUs"

# The counter is the stressors' own CPU time (/proc/PID/stat, clock ticks);
# the cgroup's usage since before the inject is the same work (the target
# only sleeps), measured by the scheduler.
chaosctl --output json get "$id" > /tmp/get.json || fail "chaosctl get $id"
u_get=$(usage_us)
cpu_ns=$(json_get counters.stress_cpu_time_ns < /tmp/get.json)
echo "stress_cpu_time_ns $cpu_ns; cgroup usage since inject $(( (u_get - u_before) * 1000 )) ns"
awk -v n="$cpu_ns" -v u="$(( u_get - u_before ))" 'BEGIN { exit !(n > 4e9 && n >= 0.85 * u * 1000 && n <= 1.05 * u * 1000) }' \
  || fail "stress_cpu_time_ns $cpu_ns does not match the cgroup's $(( u_get - u_before )) us"
ok "get reports stressor CPU time $cpu_ns ns"

chaosctl recover "$id" || fail "chaosctl recover $id"
left=$(stressors)
[ -z "$left" ] || fail "stressors left after recover: $left"
u2=$(usage_us)
sleep 1
u3=$(usage_us)
awk -v a="$u2" -v b="$u3" 'BEGIN { exit !((b - a) < 50000) }' || fail "usage still rising after recover: $((u3 - u2)) us in 1 s"
ok "after recover: no stressor, usage +$((u3 - u2)) us in 1 s"

# SIGKILL of the daemon during a stress. Timed with shell builtins only:
# under TCG every fork costs tens of milliseconds.
alive_pid() { # PID exists and is not a zombie
  read -r line < "/proc/$1/stat" 2>/dev/null || return 1
  st=${line##*) }
  st=${st%% *}
  [ "$st" != Z ] && [ "$st" != X ]
}
inject
pids=$(stressors)
[ "$(echo "$pids" | wc -w)" -eq 2 ] || fail "want 2 stressors, found: $pids"
kill -KILL "$daemon"
read -r t0 _ < /proc/uptime
while :; do
  any=0
  for p in $pids; do alive_pid "$p" && any=1; done
  read -r t1 _ < /proc/uptime
  [ "$any" = 0 ] && break
  awk -v s="$t0" -v e="$t1" 'BEGIN { exit !(e - s > 1.0) }' && fail "stressors $pids alive 1 s after SIGKILL of chaosd"
done
gone=$(awk -v s="$t0" -v e="$t1" 'BEGIN { printf "%.2f", e - s }')
awk -v g="$gone" 'BEGIN { exit !(g <= 1.0) }' || fail "stressors gone only ${gone} s after SIGKILL of chaosd"
ok "stressors $(echo $pids) gone ${gone} s after SIGKILL of chaosd"

wait "$daemon" 2>/dev/null
start_chaosd
chaosctl --output json get "$id" > /tmp/get.json || fail "chaosctl get $id after restart"
state=$(json_get state < /tmp/get.json)
echo "after restart: state $state, reason $(json_get reason < /tmp/get.json)"
[ "$state" != '"active"' ] || fail "the restarted daemon reports the stress as active, with no stressor running"
[ -z "$(stressors)" ] || fail "the restarted daemon started stressors: $(stressors)"
ok "restarted daemon: experiment $id is $state, no stressor"
