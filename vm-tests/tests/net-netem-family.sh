#!/bin/sh
# Duplicate, corrupt and reorder through chaosd on a stock kernel with netem,
# on ICMP egress of namespace a: duplicate 100% makes every echo come back
# twice, corrupt 100% loses most echoes (a flipped bit breaks a checksum), reorder
# 50% with 100 ms sends about half the echoes at once and holds the rest;
# the namespace equals its snapshot after each recover.
# vm-test-timeout: 240
. "$VM_TEST_LIB"
need chaosd chaosctl ip tc ping awk


two_namespaces
wait_for 10 "IPv4 between the namespaces" ip netns exec a ping -c1 -W1 10.9.0.2

inject() { # inject ACTION ARGS...: prints the id
  chaosctl --output json inject network "$@" --netns a --protocol icmp --duration 2m > /tmp/inject.json 2> /tmp/inject.err \
    || fail "chaosctl inject network $*: $(cat /tmp/inject.err)"
  json_get id < /tmp/inject.json | tr -d '"'
}
recover() {
  chaosctl recover "$1" > /dev/null || fail "recover $1"
  [ "$(snapshot_a)" = "$before" ] || fail "namespace differs from its snapshot after recovering $2"
}

start_chaosd
before=$(snapshot_a)

id=$(inject duplicate --percent 100)
ip netns exec a ping -c 10 -i 0.2 -W 2 10.9.0.2 > /tmp/dup 2>&1
dups=$(grep -c 'DUP' /tmp/dup)
echo "duplicate 100%: $dups duplicate replies to 10 echoes"
# The last echo's duplicate may come after ping has exited.
[ "$dups" -ge 8 ] || fail "duplicate 100% gave $dups duplicates of 10: $(cat /tmp/dup)"
recover "$id" duplicate
ok "duplicate: every echo came back twice"

id=$(inject corrupt --percent 100)
# netem flips one random bit anywhere in the frame; a flip in the source MAC
# (or a field nobody checks on veth) still gets an answer: 0 to 30% of the
# echoes were answered in our runs, so "mostly lost" is at most half of 40.
got=$(ip netns exec a ping -c 40 -i 0.1 -W 1 10.9.0.2 2>/dev/null | grep -c 'bytes from')
echo "corrupt 100%: $got of 40 echoes answered"
[ "$got" -le 20 ] || fail "corrupt 100% still let $got of 40 echoes through"
recover "$id" corrupt
got=$(ip netns exec a ping -c 3 -i 0.2 -W 1 10.9.0.2 2>/dev/null | grep -c 'bytes from')
[ "$got" -eq 3 ] || fail "after recovering corrupt only $got of 3 echoes answered"
ok "corrupt: echoes lost while active, all back after recover"

id=$(inject reorder --percent 50 --latency 100ms)
ip netns exec a ping -c 40 -i 0.05 -W 2 10.9.0.2 2>/dev/null | sed -n 's/.*time=\([0-9.]*\) ms.*/\1/p' > /tmp/reorder
fast=$(awk '$1 < 50' /tmp/reorder | wc -l)
slow=$(awk '$1 >= 90' /tmp/reorder | wc -l)
echo "reorder 50% (others 100ms): $fast immediate, $slow held of $(wc -l < /tmp/reorder)"
[ "$fast" -ge 8 ] && [ "$slow" -ge 8 ] || fail "reorder did not split the echoes: $fast fast, $slow slow"
recover "$id" reorder
ok "reorder: some echoes at once, the others held 100 ms"
