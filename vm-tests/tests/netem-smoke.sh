#!/bin/sh
# netem works in the guest kernel, independent of chaosd: 100 ms of delay on
# lo makes every ping round trip (two passes through lo) take >= 200 ms.
# vm-test-timeout: 120
. "$VM_TEST_LIB"
need tc ping

tc qdisc add dev lo root netem delay 100ms || fail "tc qdisc add dev lo root netem delay 100ms"
tc qdisc show dev lo | grep -q 'qdisc netem .*delay 100' \
  || fail "netem qdisc not shown on lo: $(tc qdisc show dev lo)"
ok "netem qdisc on lo: $(tc qdisc show dev lo)"

out=$(ping -c 3 -i 0.3 -W 3 127.0.0.1) || fail "ping 127.0.0.1 failed: $out"
echo "$out"
# busybox: "round-trip min/avg/max = 200.612/201.223/202.090 ms"
min=$(echo "$out" | sed -n 's|.*min/avg/max = \([0-9.]*\)/.*|\1|p')
[ -n "$min" ] || fail "no round-trip summary in ping output"
awk -v m="$min" 'BEGIN { exit !(m >= 190) }' || fail "min RTT ${min} ms < 190 ms: netem delay not applied"
ok "min RTT ${min} ms >= 190 ms"

tc qdisc del dev lo root || fail "tc qdisc del dev lo root"
out=$(ping -c 2 -i 0.3 -W 3 127.0.0.1) || fail "ping after removing netem failed: $out"
max=$(echo "$out" | sed -n 's|.*min/avg/max = [0-9.]*/[0-9.]*/\([0-9.]*\) ms.*|\1|p')
awk -v m="$max" 'BEGIN { exit !(m != "" && m < 100) }' || fail "max RTT '${max}' ms >= 100 ms after netem was removed"
ok "netem removed, max RTT ${max} ms"
