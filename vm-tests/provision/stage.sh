#!/usr/bin/env bash
# Prepares what every node of a multi-host chaosd + broker cluster needs, in
# one directory that is then copied to each node (the Vagrantfile syncs it,
# vm-tests/run.sh puts it in the guests' initramfs):
#   pki/      a CA, a server certificate per node (its name and address),
#             and the client certificate "runner" for chaosctl run
#   nodes     one line per node: NAME ADDRESS
#   units/    chaosd.service and broker@.service
#   node.sh   the provisioning script each node runs (node.sh NAME)
#   bin/      chaosd, chaosctl, broker (only with --bin: hosts that do not
#             have them yet)
#   plan.toml a chaos plan attached to these nodes through their chaosd's
#             TLS port: partition of the last node's cluster port, 100 ms
#             +- 20 ms delay on the first node's, 20% loss on the second
#             node's MQTT port, SIGKILL of the second node's broker
#             (`chaosctl run OUT/plan.toml` on any node)
#
# Usage: vm-tests/provision/stage.sh OUT NAME=ADDRESS... [--bin DIR] [--chaosctl PATH]
# A second run keeps OUT/pki (the CA stays the same) and refreshes the rest.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
die() { echo "stage.sh: $*" >&2; exit 1; }

[ $# -ge 2 ] || die "usage: stage.sh OUT NAME=ADDRESS... [--bin DIR] [--chaosctl PATH]"
out=$1; shift
bin="" chaosctl=""
nodes=()
while [ $# -gt 0 ]; do
  case "$1" in
    --bin) bin=${2:?--bin needs a directory}; shift 2 ;;
    --chaosctl) chaosctl=${2:?--chaosctl needs a path}; shift 2 ;;
    *=*) nodes+=("$1"); shift ;;
    *) die "'$1' is not NAME=ADDRESS (e.g. n1=10.9.7.1)" ;;
  esac
done
[ ${#nodes[@]} -ge 1 ] || die "no node given (NAME=ADDRESS...)"
chaosctl=${chaosctl:-${bin:+$bin/chaosctl}}
chaosctl=${chaosctl:-$repo/target/release/chaosctl}
[ -x "$chaosctl" ] || die "$chaosctl not found: build it (cargo build --release -p chaosctl) or pass --chaosctl"

mkdir -p "$out/pki" "$out/units"
: > "$out/nodes.tmp"
[ -f "$out/pki/ca.pem" ] || "$chaosctl" certs ca --out "$out/pki" >/dev/null
for n in "${nodes[@]}"; do
  name=${n%%=*} addr=${n#*=}
  case "$name" in ''|*[!a-zA-Z0-9_-]*) die "node name '$name': letters, digits, - and _ only" ;; esac
  [ -n "$addr" ] || die "node $name has no address"
  [ -f "$out/pki/$name.pem" ] || "$chaosctl" certs server --ca "$out/pki" --name "$name" --addr "$addr" --out "$out/pki" >/dev/null
  echo "$name $addr" >> "$out/nodes.tmp"
done
[ -f "$out/pki/runner.pem" ] || "$chaosctl" certs client --ca "$out/pki" --name runner --out "$out/pki" >/dev/null
mv "$out/nodes.tmp" "$out/nodes"
install -m 0644 "$repo/scripts/systemd/chaosd.service" "$repo/scripts/systemd/broker@.service" "$out/units/"
install -m 0755 "$here/node.sh" "$out/node.sh"
if [ -n "$bin" ]; then
  mkdir -p "$out/bin"
  for b in chaosd chaosctl broker; do
    [ -x "$bin/$b" ] || die "$bin/$b not found: cargo build --release"
    install -m 0755 "$bin/$b" "$out/bin/$b"
  done
fi
# The plan names its files relative to itself.
{
  echo "# Made by vm-tests/provision/stage.sh for the nodes in ./nodes; see cli/plans/example.toml."
  echo 'name = "three-hosts"'
  echo
  echo '[sut]'
  echo 'kind = "attach"'
  while read -r name addr; do
    echo
    echo '[[sut.node]]'
    echo "name = \"$name\""
    echo "mqtt = \"$addr:1883\""
    echo "http = \"$addr:9100\""
    echo 'process = "broker"'
    echo "chaosd = { endpoint = \"https://$addr:7443\", ca = \"pki/ca.pem\", cert = \"pki/runner.pem\", key = \"pki/runner.key\" }"
  done < "$out/nodes"
  first=$(awk 'NR == 1 { print $1 }' "$out/nodes")
  second=$(awk 'NR == 2 { print $1 }' "$out/nodes")
  last=$(awk 'END { print $1 }' "$out/nodes")
  cat <<PLAN

[workload]
publishers = [{ node = "$first", count = 1 }]
subscribers = [{ node = "$second", count = 1 }, { node = "$last", count = 1 }]
rate = 20
qos_mix = { qos0 = 20, qos1 = 60, qos2 = 20 }
session = "persistent"

[thresholds]
max_recovery = "30s"

[[case]]
name = "partition-$last-cluster"
baseline = "5s"
fault_time = "10s"
recovery = "15s"
[[case.fault]]
kind = "partition"
target = "$last"
ports = [7000]
direction = "both"

[[case]]
name = "delay-$first-cluster"
baseline = "5s"
fault_time = "10s"
recovery = "10s"
[[case.fault]]
kind = "delay"
target = "$first"
ports = [7000]
direction = "both"
latency = "100ms"
jitter = "20ms"

[[case]]
name = "loss-$second-mqtt"
baseline = "5s"
fault_time = "10s"
recovery = "10s"
[[case.fault]]
kind = "loss"
target = "$second"
ports = [1883]
direction = "both"
percent = 20

[[case]]
name = "kill-$second"
baseline = "5s"
fault_time = "5s"
recovery = "25s"
[[case.fault]]
kind = "kill"
target = "$second"
signal = "KILL"
PLAN
} > "$out/plan.toml"
echo "stage.sh: $out ready for ${#nodes[@]} node(s): $(cut -d' ' -f1 "$out/nodes" | tr '\n' ' ')"
