#!/bin/sh
# Delay on one TCP port only, measured as a user would: two brokers in
# namespace b (MQTT on 1883 and on 7000), the load client in namespace a.
# 100 ms +- 10 ms of egress delay on port 1883 in a (the issue's case)
# raises the median end-to-end latency through the 1883 broker by what the
# kernel's own netem gives for the same settings (+-2%, measured at the same
# time on a second pair of namespaces c -> d with `tc qdisc add ... netem`),
# and by 100 ms within what the emulator's late timers add; the 7000 broker,
# measured at the same time, is not delayed; the namespace equals its
# snapshot after recover.
# vm-test-timeout: 300
. "$VM_TEST_LIB"
need chaosd chaosctl broker ip tc awk


two_namespaces
# c -> d gets tc's own netem with the same settings while chaosd's is on.
reference_path

for port in 1883 7000; do
  ip netns exec b broker --mqtt-listen 10.9.0.2:$port --node-name b$port > /tmp/broker$port.log 2>&1 &
done
ip netns exec d broker --mqtt-listen 10.9.1.2:1883 --node-name ref > /tmp/brokerref.log 2>&1 &
wait_for 30 "broker on 1883" ip netns exec a sh -c 'echo | nc -w 1 10.9.0.2 1883'
wait_for 30 "broker on 7000" ip netns exec a sh -c 'echo | nc -w 1 10.9.0.2 7000'
wait_for 30 "reference broker" ip netns exec c sh -c 'echo | nc -w 1 10.9.1.2 1883'

# Median end-to-end latency in ms through the brokers on 1883 and 7000 and
# the reference broker (QoS 0, 1 -> 1), all measured at the same time: the
# emulated machine's speed drifts by milliseconds from one run to the next
# (TCG on a shared host) and its timers fire late by more when the host is
# busy; port 7000, measured in the same seconds, is the control for the
# drift, and the reference path for the timers. medians SECONDS sets m1883,
# m7000 and mref.
medians() {
  secs=$1
  for path in "a 10.9.0.2:1883 1883" "a 10.9.0.2:7000 7000" "c 10.9.1.2:1883 ref"; do
    set -- $path
    ip netns exec "$1" broker bench --addr "$2" --publishers 1 --subscribers 1 --rate 50 \
      --qos-mix 100/0/0 --duration "$secs" --drain 2 --prefix "p$3" --id-prefix "p$3" --json \
      > "/tmp/bench$3.json" 2> "/tmp/bench$3.err" &
    echo $! > "/tmp/bench$3.pid"
  done
  for name in 1883 7000 ref; do
    wait "$(cat /tmp/bench$name.pid)" || fail "broker bench $name: $(tail -3 /tmp/bench$name.err)"
  done
  m1883=$(json_get qos.0.latency_ms.p50 < /tmp/bench1883.json)
  m7000=$(json_get qos.0.latency_ms.p50 < /tmp/bench7000.json)
  mref=$(json_get qos.0.latency_ms.p50 < /tmp/benchref.json)
}

start_chaosd

before=$(snapshot_a)
medians 8; base1883=$m1883; base7000=$m7000; baseref=$mref
echo "baseline median latency: port 1883 $base1883 ms, port 7000 $base7000 ms, reference $baseref ms"

chaosctl --output json inject network delay --netns a --protocol tcp --port 1883 --latency 100ms --jitter 10ms --duration 2m \
  > /tmp/inject.json 2> /tmp/inject.err || fail "inject: $(cat /tmp/inject.err)"
id=$(json_get id < /tmp/inject.json | tr -d '"')
ip netns exec c tc qdisc add dev vc root netem delay 100ms 10ms || fail "tc's own netem on the reference path"
# 600 messages a path: the median of a uniform +-10 ms spread is then
# within about 0.4 ms of its centre (one standard error). When the emulator
# stalls (a busy host), tc's own netem comes out 10 ms or more late for
# seconds at a time and nothing measured in that window means anything:
# such a window is measured again, up to 5 times.
tries=0
while :; do
  medians 12; d1883=$m1883; d7000=$m7000; dref=$mref
  echo "with 100ms +- 10ms delay: port 1883 (chaosd) $d1883 ms, port 7000 $d7000 ms, reference (tc's netem) $dref ms"
  ref_rise=$(awk -v a="$dref" -v b="$baseref" -v c="$d7000" -v d="$base7000" 'BEGIN { print a - b - (c - d) }')
  near "$ref_rise" 100 3 5 && break
  again "tc's own netem came out +$ref_rise ms against 100"
done
chaosctl recover "$id" > /dev/null || fail "recover $id"
ip netns exec c tc qdisc del dev vc root
[ "$(snapshot_a)" = "$before" ] || fail "namespace differs from its snapshot after recover"
ok "namespace identical after recover"

# A second baseline after the fault; the reference is the mean of before and after.
medians 8; after1883=$m1883; after7000=$m7000; afterref=$mref
echo "baseline after recover: port 1883 $after1883 ms, port 7000 $after7000 ms, reference $afterref ms"
mean() { awk -v a="$1" -v b="$2" 'BEGIN { print (a + b) / 2 }'; }
base1883=$(mean "$base1883" "$after1883"); base7000=$(mean "$base7000" "$after7000"); baseref=$(mean "$baseref" "$afterref")
# What port 7000 moved by in the same seconds is the machine's drift, not chaosd's delay.
drift=$(awk -v a="$d7000" -v b="$base7000" 'BEGIN { print a - b }')
delayed_by=$(awk -v a="$d1883" -v b="$base1883" -v d="$drift" 'BEGIN { print a - b - d }')
ref_by=$(awk -v a="$dref" -v b="$baseref" -v d="$drift" 'BEGIN { print a - b - d }')
# The issue asks for +-2%: chaosd's netem, configured through netlink, must
# delay like `tc qdisc add ... netem delay 100ms 10ms` does in the same
# seconds (five runs: chaosd minus tc's netem -1.26 to +0.88 ms). Against
# the 100 ms asked for, the emulator only ever adds: tc's netem itself came
# out +0.3 to +10.3 ms over those runs, depending on how busy the host was,
# so that check is 100 ms -3 / +15 ms, which still fails a delay applied
# twice or several times over.
within "$delayed_by" "$ref_by" 2 \
  || fail "port 1883's median rose by $delayed_by ms, tc's netem on the reference path by $ref_by ms: not within 2 ms"
near "$delayed_by" 100 3 15 || fail "port 1883's median rose by $delayed_by ms (control drift $drift ms), not 100 ms -3/+15 ms"
# Port 7000 must not be delayed: a fault that leaked onto it would add about
# 100 ms; the emulated machine alone has moved medians by up to 2 ms.
awk -v d="$drift" 'BEGIN { exit !(d < 10) }' || fail "port 7000's median rose by $drift ms ($base7000 -> $d7000): the delay leaked onto it"
ok "delay on 1883 only: +$delayed_by ms there, tc's netem +$ref_by ms (control drift $drift ms), port 7000 not delayed"

# The broker asks for a 100 us scheduler slice with sched_setattr (honoured
# from Linux 6.12); this 6.1 kernel must accept the call and ignore the slice,
# or the broker logs a warning.
if grep -h sched_setattr /tmp/broker1883.log /tmp/broker7000.log; then
  fail "the broker could not set its time slice on $(uname -r)"
fi
ok "sched_setattr accepted on $(uname -r)"
