#!/bin/sh
# Three hosts, one broker node and one chaosd each, on one virtual Ethernet
# (run.sh: QEMU socket networking, guest I = 10.9.7.I). The broker nodes run
# in each host's own network namespace, as on real hosts. QoS 1 and QoS 2
# messages published on node 2 go to a subscriber on node 3 while node 1's
# chaosd cuts node 1's cluster port off the network (--host) for 10 s: every
# forward crosses a real (virtual) wire between two kernels, nothing the
# brokers acknowledged is lost, no QoS 2 message arrives twice, and node 1 is
# a member again after the heal.
# vm-test-guests: 3
# vm-test-timeout: 420
. "$VM_TEST_LIB"
need chaosd chaosctl broker ip wget

start_chaosd
seeds=""
for j in 1 2 3; do [ "$j" -ne "$VM_GUEST" ] && seeds="$seeds${seeds:+,}$(guest_ip $j):7000"; done
me=$(guest_ip "$VM_GUEST")
broker --node-name "n$VM_GUEST" --mqtt-listen "[::]:1883" --http-listen "$me:9100" \
  --cluster-listen "$me:7000" --join "$seeds" --data-dir /tmp/broker > /tmp/broker.log 2>&1 &
node=$!
trap 'echo "----- broker log"; tail -30 /tmp/broker.log; echo "----- chaosd log"; tail -30 "$log"' EXIT

if [ "$VM_GUEST" -ne 1 ]; then
  serve_until_stopped "$node" "$daemon"
fi

# host_peers_up I: node I's /cluster shows both other nodes up.
host_peers_up() {
  wget -q -O - "http://$(guest_ip "$1"):9100/cluster" > /tmp/view$1.json 2>/dev/null || return 1
  [ "$(json_get members.0.state < /tmp/view$1.json)" = '"up"' ] && [ "$(json_get members.1.state < /tmp/view$1.json)" = '"up"' ]
}
for i in 1 2 3; do wait_for 120 "node n$i to see both peers up" host_peers_up "$i"; done
ok "three hosts joined as one cluster"

broker bench --addr "$(guest_ip 2):1883" --sub-addr "$(guest_ip 3):1883" --protocol 5 --publishers 1 --subscribers 1 \
  --rate 20 --qos-mix 0/50/50 --duration 30 --drain 30 --json > /tmp/bench.json 2> /tmp/bench.err &
bench=$!
sleep 8
chaosctl --output json inject network partition --host --port 7000 --direction both --duration 10s \
  > /tmp/inject.json 2> /tmp/inject.err || fail "inject: $(cat /tmp/inject.err)"
id=$(json_get id < /tmp/inject.json | tr -d '"')
ok "node 1's cluster port cut off as $id"
sleep 3
chaosctl --output json get "$id" > /tmp/get.json || fail "chaosctl get $id"
dropped=$(json_get counters.packets_dropped < /tmp/get.json)
echo "fault counters after 3 s: dropped $dropped"
[ "${dropped:-0}" -gt 0 ] || { cat /tmp/get.json; tc -s filter show dev eth0 egress; fail "the partition dropped no packet: this run proves nothing"; }
# n2_sees_n1_gone: node 2 reports node 1 suspect or down.
n2_sees_n1_gone() {
  wget -q -O - "http://$(guest_ip 2):9100/cluster" > /tmp/view2.json 2>/dev/null || return 1
  json_flatten < /tmp/view2.json | grep -q '^members\.[0-9]*\.name="n1"' || return 1
  ! wget -q -O - "http://$(guest_ip 2):9100/health" | grep -q '"ok"'
}
tries=0
until n2_sees_n1_gone; do
  tries=$((tries + 1))
  [ $tries -lt 60 ] || { cat /tmp/view2.json; fail "node 2 still shows node 1 up 6 s into a 10 s partition of node 1's cluster port"; }
  sleep 0.1
done
ok "node 2 noticed: $(wget -q -O - "http://$(guest_ip 2):9100/health")"
wait "$bench" || fail "broker bench: $(tail -3 /tmp/bench.err)"
for q in 1 2; do
  sent=$(json_get qos.$q.sent < /tmp/bench.json)
  acked=$(json_get qos.$q.acked < /tmp/bench.json)
  received=$(json_get qos.$q.received < /tmp/bench.json)
  lost=$(json_get qos.$q.lost < /tmp/bench.json)
  dups=$(json_get qos.$q.duplicated < /tmp/bench.json)
  echo "QoS $q: sent $sent, acknowledged $acked, received $received, lost $lost, duplicated $dups"
  [ "$sent" -gt 0 ] || fail "QoS $q: nothing was sent"
  [ "$lost" -eq 0 ] || fail "QoS $q: $lost acknowledged messages lost"
done
[ "$(json_get qos.2.duplicated < /tmp/bench.json)" -eq 0 ] || fail "QoS 2 duplicates"
ok "no acknowledged QoS 1/2 message lost between hosts, no QoS 2 duplicate"
for i in 1 2 3; do wait_for 60 "node n$i to see both peers up after the heal" host_peers_up "$i"; done
ok "the cluster is whole again"
