#!/bin/sh
# The seed plan's delay case on a real three-node broker cluster: 250 ms +-
# 100 ms (correlation 50) on node 3's cluster port, both directions, for
# 15 s, injected by chaosd, while QoS 1 and QoS 2 messages published on
# node 2 go to a subscriber on node 3 (every one crosses the delayed gRPC
# link). Nothing the broker acknowledged is lost, no QoS 2 message arrives
# twice, the fault delayed packets, and node 3 is a member again after it.
# vm-test-timeout: 300
. "$VM_TEST_LIB"
need chaosd chaosctl broker ip wget

start_chaosd
three_node_cluster
ok "three nodes up"

broker bench --addr 10.9.5.2:1883 --sub-addr 10.9.5.3:1883 --protocol 5 --publishers 1 --subscribers 1 \
  --rate 20 --qos-mix 0/50/50 --duration 30 --drain 30 --json > /tmp/bench.json 2> /tmp/bench.err &
bench=$!
sleep 8
chaosctl --output json inject network delay --netns n3 --port 7000 --direction both \
  --latency 250ms --jitter 100ms --correlation 50 --duration 15s > /tmp/inject.json 2> /tmp/inject.err \
  || fail "inject: $(cat /tmp/inject.err)"
id=$(json_get id < /tmp/inject.json | tr -d '"')
ok "delay injected as $id"
sleep 12
chaosctl --output json get "$id" > /tmp/get.json || fail "chaosctl get $id"
delayed=$(json_get counters.packets_delayed < /tmp/get.json)
matched=$(json_get counters.packets_matched < /tmp/get.json)
echo "fault counters: matched $matched, delayed $delayed"
[ "${delayed:-0}" -gt 0 ] || [ "${matched:-0}" -gt 0 ] || fail "the delay matched no packet: this run proves nothing"

wait "$bench" || fail "broker bench: $(tail -3 /tmp/bench.err)"
for q in 1 2; do
  sent=$(json_get qos.$q.sent < /tmp/bench.json)
  acked=$(json_get qos.$q.acked < /tmp/bench.json)
  received=$(json_get qos.$q.received < /tmp/bench.json)
  lost=$(json_get qos.$q.lost < /tmp/bench.json)
  dups=$(json_get qos.$q.duplicated < /tmp/bench.json)
  p99=$(json_get qos.$q.latency_ms.p99 < /tmp/bench.json)
  echo "QoS $q: sent $sent, acknowledged $acked, received $received, lost $lost, duplicated $dups, p99 $p99 ms"
  [ "$sent" -gt 0 ] || fail "QoS $q: nothing was sent"
  [ "$lost" -eq 0 ] || fail "QoS $q: $lost acknowledged messages lost"
done
[ "$(json_get qos.2.duplicated < /tmp/bench.json)" -eq 0 ] || fail "QoS 2 duplicates"
ok "no acknowledged QoS 1/2 message lost, no QoS 2 duplicate"
for i in 1 2 3; do wait_for 30 "node n$i to see both peers up after the fault" peers_up $i; done
ok "the cluster is whole again"
