#!/bin/sh
# A wall-clock jump under a running three-node cluster: the clock goes an
# hour forward, then an hour and a half back, while QoS 1 and QoS 2 messages
# published on node 1 go to a subscriber on node 2. The failure detector runs
# on monotonic time, so no node is suspected or declared down, and nothing
# acknowledged is lost or duplicated. (The whole VM's clock moves: the nodes
# share it, which is the harder case for anything that compares timestamps
# across nodes.)
# vm-test-timeout: 240
. "$VM_TEST_LIB"
need broker ip wget date

start_chaosd
three_node_cluster
ok "three nodes up"

broker bench --addr 10.9.5.1:1883 --sub-addr 10.9.5.2:1883 --protocol 5 --publishers 1 --subscribers 1 \
  --rate 20 --qos-mix 0/50/50 --duration 24 --drain 20 --json > /tmp/bench.json 2> /tmp/bench.err &
bench=$!

# state_changes: how many peer state changes the nodes have logged so far.
state_changes() { cat /tmp/n1.log /tmp/n2.log /tmp/n3.log | grep -c "peer state changed" || true; }

sleep 6
before=$(state_changes)
date -s "@$(( $(date +%s) + 3600 ))" > /dev/null || fail "cannot set the clock"
ok "clock jumped an hour forward: $(date)"
sleep 6
date -s "@$(( $(date +%s) - 5400 ))" > /dev/null || fail "cannot set the clock"
ok "clock jumped an hour and a half back: $(date)"
sleep 6
for i in 1 2 3; do peers_up $i || fail "node n$i does not see both peers up after the clock jumps: $(cat /tmp/view$i.json)"; done
after=$(state_changes)
[ "$after" -eq "$before" ] || fail "peer states changed across the clock jumps ($before -> $after): $(grep 'peer state changed' /tmp/n*.log | tail -5)"
ok "no peer was suspected or declared down"

wait "$bench" || fail "broker bench: $(tail -3 /tmp/bench.err)"
for q in 1 2; do
  sent=$(json_get qos.$q.sent < /tmp/bench.json)
  lost=$(json_get qos.$q.lost < /tmp/bench.json)
  dups=$(json_get qos.$q.duplicated < /tmp/bench.json)
  echo "QoS $q: sent $sent, lost $lost, duplicated $dups"
  [ "$sent" -gt 0 ] || fail "QoS $q: nothing was sent"
  [ "$lost" -eq 0 ] || fail "QoS $q: $lost acknowledged messages lost"
done
[ "$(json_get qos.2.duplicated < /tmp/bench.json)" -eq 0 ] || fail "QoS 2 duplicates"
ok "no acknowledged QoS 1/2 message lost across the clock jumps, no QoS 2 duplicate"
