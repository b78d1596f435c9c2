#!/bin/sh
# Provisions one node of a multi-host chaosd + broker cluster from a stage
# directory made by stage.sh (this script's own directory): installs the
# binaries if the stage carries them, the TLS files, the units and their
# environment files, checks that the kernel has netem, and starts chaosd
# (API over mutual TLS on :7443, the runner's certificate allowed) and the
# broker node NAME (MQTT :1883, HTTP :9100, cluster :7000, joined to every
# other node of the stage). Under systemd the units run them; without it
# (the QEMU guests of vm-tests/) the same command lines run here, the broker
# restarted 2 s after it exits as Restart=on-failure does.
#
# Usage: node.sh NAME      (as root; POSIX sh: Debian's dash or busybox ash)
# Idempotent: a second run leaves a provisioned node as it is.
set -eu
stage=$(cd "$(dirname "$0")" && pwd)
die() { echo "node.sh: $*" >&2; exit 1; }
# put MODE FILE... DIR: copy with a mode (busybox has no `install`).
put() {
  _mode=$1; shift
  eval "_dir=\${$#}"
  while [ $# -gt 1 ]; do
    cp "$1" "$_dir/" && chmod "$_mode" "$_dir/$(basename "$1")" || die "cannot copy $1 to $_dir"
    shift
  done
}

name=${1:-}
[ -n "$name" ] || die "usage: node.sh NAME (one of: $(cut -d' ' -f1 "$stage/nodes" | tr '\n' ' '))"
[ "$(id -u)" -eq 0 ] || die "must run as root"
addr=$(awk -v n="$name" '$1 == n { print $2 }' "$stage/nodes")
[ -n "$addr" ] || die "node $name is not in $stage/nodes (have: $(cut -d' ' -f1 "$stage/nodes" | tr '\n' ' '))"
seeds=$(awk -v n="$name" '$1 != n { printf "%s%s:7000", sep, $2; sep = "," }' "$stage/nodes")

# Delay, jitter and reorder need netem: a kernel without it gets one line now
# rather than a failed experiment later.
if ! grep -q '^sch_netem ' /proc/modules 2>/dev/null && ! modprobe sch_netem 2>/dev/null; then
  die "this kernel ($(uname -r)) has no netem (modprobe sch_netem failed): delay faults cannot run; install the kernel's extra modules (Debian: linux-image-amd64) or a kernel with CONFIG_NET_SCH_NETEM"
fi

bindir=/usr/local/bin
if [ -d "$stage/bin" ]; then
  for b in chaosd chaosctl broker; do put 0755 "$stage/bin/$b" "$bindir"; done
elif ! [ -x "$bindir/chaosd" ]; then
  bindir=$(dirname "$(command -v chaosd)") || die "chaosd is not installed and the stage has no bin/"
fi

mkdir -p /etc/chaosd/tls /etc/chaosd/broker
chmod 0700 /etc/chaosd /etc/chaosd/tls
chmod 0755 /etc/chaosd/broker
put 0644 "$stage/pki/ca.pem" "$stage/pki/$name.pem" /etc/chaosd/tls
put 0600 "$stage/pki/$name.key" /etc/chaosd/tls
chaosd_args="--listen-tls $addr:7443 --tls-cert /etc/chaosd/tls/$name.pem --tls-key /etc/chaosd/tls/$name.key --tls-client-ca /etc/chaosd/tls/ca.pem --tls-allow-subject runner"
broker_args="--mqtt-listen [::]:1883 --http-listen $addr:9100 --cluster-listen $addr:7000 --join $seeds"
echo "CHAOSD_ARGS=$chaosd_args" > /etc/chaosd/chaosd.env
echo "BROKER_ARGS=$broker_args" > "/etc/chaosd/broker/$name.env"

if [ -d /run/systemd/system ]; then
  put 0644 "$stage/units/chaosd.service" "$stage/units/broker@.service" /etc/systemd/system
  systemctl daemon-reload
  systemctl enable --now chaosd.service "broker@$name.service"
else
  mkdir -p /run/chaosd-node /var/lib/broker/"$name" /var/log
  running() { [ -s "/run/chaosd-node/$1.pid" ] && kill -0 "$(cat "/run/chaosd-node/$1.pid")" 2>/dev/null; }
  if ! running chaosd; then
    # shellcheck disable=SC2086 # argument lists on purpose, as in the units
    "$bindir/chaosd" serve $chaosd_args >> /var/log/chaosd.log 2>&1 &
    echo $! > /run/chaosd-node/chaosd.pid
  fi
  if ! running broker; then
    (
      while :; do
        # shellcheck disable=SC2086
        "$bindir/broker" --node-name "$name" --data-dir "/var/lib/broker/$name" $broker_args >> "/var/log/broker-$name.log" 2>&1 \
          && break
        sleep 2
      done
    ) &
    echo $! > /run/chaosd-node/broker.pid
  fi
fi

# Ready when chaosd's socket exists and the broker answers on HTTP.
fetch() { wget -q -O /dev/null "$1" 2>/dev/null || curl -fsS -o /dev/null "$1" 2>/dev/null; }
tries=1200
until [ -S /run/chaosd/chaosd.sock ] && fetch "http://$addr:9100/health"; do
  tries=$((tries - 1))
  [ "$tries" -gt 0 ] || die "chaosd or broker $name not up after 120 s (logs: journalctl -u chaosd -u broker@$name, or /var/log/chaosd.log, /var/log/broker-$name.log)"
  sleep 0.1
done
echo "node.sh: $name provisioned: chaosd https://$addr:7443 (mTLS), broker mqtt://$addr:1883, http://$addr:9100, cluster $addr:7000"
