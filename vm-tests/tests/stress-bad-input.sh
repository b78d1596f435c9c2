#!/bin/sh
# Pure cgroup v2, stock kernel, through chaosd serve + chaosctl: stress and
# process requests that only the live system can judge are refused with one
# line from chaosctl that says what to do, a non-zero exit, and nothing
# started.
# vm-test-timeout: 180
. "$VM_TEST_LIB"
need chaosd chaosctl awk


start_chaosd
ok "chaosd (pid $daemon) serving"

sleep 1000 &
target=$!
cpus=$(grep -c ^processor /proc/cpuinfo)

# refused WANT_SUBSTRING CHAOSCTL_ARGS...: chaosctl fails with one line
# containing WANT_SUBSTRING.
refused() {
  want=$1
  shift
  if chaosctl "$@" > /tmp/out 2> /tmp/err; then
    fail "chaosctl $* was accepted: $(cat /tmp/out)"
  fi
  [ "$(wc -l < /tmp/err)" -eq 1 ] || fail "chaosctl $* printed $(wc -l < /tmp/err) lines: $(cat /tmp/err)"
  grep -q -- "$want" /tmp/err || fail "chaosctl $*: '$(cat /tmp/err)' does not say '$want'"
  ok "chaosctl $*: $(cat /tmp/err)"
}

refused "does not exist" inject stress cpu --cgroup /sys/fs/cgroup/no-such-group
refused "under /sys/fs/cgroup" inject stress cpu --cgroup /tmp
refused "PID 1" inject stress cpu --pid 1
refused "chaosd itself" inject stress memory --pid "$daemon" --size 10MiB
refused "does not exist" inject stress cpu --pid 999999
refused "--force" inject stress cpu --host --workers $((4 * cpus + 1)) --load 10
refused "--force" inject stress memory --host --size 64GiB
refused "no process is named" inject process pause --name no-such-proc
refused "PID 1" inject process kill --pid 1
refused "chaosd itself" inject process pause --pid "$daemon"

# cgroup v2 keeps processes out of cgroups that delegate domain controllers
# to children ("no internal processes"; threaded ones such as cpu alone do
# not count): the message says to pick a leaf.
mkdir -p /sys/fs/cgroup/chaosd-parent/child || fail "mkdir"
echo +memory > /sys/fs/cgroup/chaosd-parent/cgroup.subtree_control || fail "enabling memory for children"
refused "leaf" inject stress cpu --cgroup /sys/fs/cgroup/chaosd-parent --load 10

for d in /proc/[0-9]*; do
  [ "$(cat "$d/comm" 2>/dev/null)" = chaosd-stressor ] && fail "a stressor runs after only refused requests: ${d#/proc/}"
done
[ -z "$(cat /sys/fs/cgroup/chaosd-parent/cgroup.procs)" ] || fail "a process was left in /sys/fs/cgroup/chaosd-parent"
n=$(chaosctl --output json list | grep -c '"id"')
[ "$n" -eq 0 ] || fail "$n experiments active after only refused requests"
ok "nothing started, no experiment active"
