# Helpers for guest test scripts (busybox sh). A test starts with
#   . "$VM_TEST_LIB"
# and exits 0 (pass) or non-zero (fail), printing why. Nothing here needs
# cleaning up: the VM is thrown away after each test.

# fail MESSAGE...: print why the test failed and end it.
fail() {
  echo "FAIL: $*" >&2
  exit 1
}

# ok MESSAGE...: record a check that passed (shows in the console log).
ok() {
  echo "ok: $*"
}

# need COMMAND...: fail unless every command exists in the guest.
need() {
  for c in "$@"; do
    command -v "$c" >/dev/null 2>&1 || fail "'$c' is not in the VM image (see vm-tests/run.sh)"
  done
}

# wait_for SECONDS DESCRIPTION COMMAND...: poll COMMAND every 0.1 s until it
# succeeds; fail with DESCRIPTION after SECONDS.
wait_for() {
  _secs=$1 _desc=$2
  shift 2
  _tries=$((_secs * 10))
  while [ "$_tries" -gt 0 ]; do
    "$@" >/dev/null 2>&1 && return 0
    _tries=$((_tries - 1))
    sleep 0.1
  done
  fail "timed out after ${_secs}s waiting for $_desc"
}

# near A B LO HI: A lies in [B - LO, B + HI] (decimals allowed).
near() { awk -v a="$1" -v b="$2" -v lo="$3" -v hi="$4" 'BEGIN { exit !(a >= b - lo && a <= b + hi) }'; }
# within A B T: A is within T of B.
within() { near "$1" "$2" "$3" "$3"; }

# again WHY: for tests that measure again a window an emulator stall spoilt
# (set tries=0 before the first): counts it, says so, fails after 5.
again() {
  tries=$((tries + 1))
  [ $tries -lt 5 ] || fail "$1, in 5 windows in a row: the machine is too busy to measure delay"
  echo "$1 (the emulator stalled): measuring again"
  return 1
}

# json_flatten < JSON: one line per scalar, PATH=VALUE, where PATH joins
# object keys and array indexes with dots (capabilities.netem.available) and
# VALUE is the JSON text of the scalar (strings keep their quotes, so "true"
# and true differ). Empty objects/arrays print {} and []. No jq in the VM.
json_flatten() {
  awk '
    function ws() { while (i <= n && index(" \t\r\n", substr(s, i, 1))) i++ }
    function str(   c, out) {
      out = substr(s, i, 1); i++
      while (i <= n) {
        c = substr(s, i, 1)
        if (c == "\\") { out = out c substr(s, i + 1, 1); i += 2; continue }
        out = out c; i++
        if (c == "\"") break
      }
      return out
    }
    function key_of(q) { return substr(q, 2, length(q) - 2) }
    function emit(path, v) { print (path == "" ? "." : path) "=" v }
    function val(path,   c, k, idx, start) {
      ws(); c = substr(s, i, 1)
      if (c == "{") {
        i++; ws()
        if (substr(s, i, 1) == "}") { i++; emit(path, "{}"); return }
        while (i <= n) {
          ws(); k = key_of(str()); ws(); i++
          val(path == "" ? k : path "." k)
          ws(); c = substr(s, i, 1); i++
          if (c == "}") return
        }
      } else if (c == "[") {
        i++; ws()
        if (substr(s, i, 1) == "]") { i++; emit(path, "[]"); return }
        idx = 0
        while (i <= n) {
          val(path == "" ? idx : path "." idx); idx++
          ws(); c = substr(s, i, 1); i++
          if (c == "]") return
        }
      } else if (c == "\"") {
        emit(path, str())
      } else {
        start = i
        while (i <= n && index(",}] \t\r\n", substr(s, i, 1)) == 0) i++
        emit(path, substr(s, start, i - start))
      }
    }
    { s = s $0 "\n" }
    END {
      n = length(s); i = 1; ws()
      c = substr(s, i, 1)
      if (c != "{" && c != "[") { print "json_flatten: input is not a JSON object or array" > "/dev/stderr"; exit 1 }
      val("")
    }'
}

# json_get PATH < JSON: the JSON text of one scalar (see json_flatten);
# prints nothing and returns 1 when PATH is absent.
json_get() {
  json_flatten | awk -v p="$1" '
    index($0, p "=") == 1 { print substr($0, length(p) + 2); found = 1; exit }
    END { exit !found }'
}

# The daemon's socket and log in the guest.
sock=/run/chaosd/chaosd.sock
log=/tmp/chaosd.log

# start_chaosd [SERVE-ARGS...]: `chaosd serve` in the background, its log
# appended to $log and printed when the test ends; sets $daemon. Fails if
# chaosd exits or has no socket after 60 s. Call again after a kill to
# restart it on the same journal.
start_chaosd() {
  rm -f "$sock"
  RUST_BACKTRACE=1 chaosd serve "$@" >> "$log" 2>&1 &
  daemon=$!
  trap 'echo "----- chaosd log"; cat "$log"; echo "-----"' EXIT
  _tries=600
  until [ -S "$sock" ]; do
    kill -0 "$daemon" 2>/dev/null || fail "chaosd serve exited before creating $sock"
    _tries=$((_tries - 1))
    [ "$_tries" -gt 0 ] || fail "no socket $sock after 60s"
    sleep 0.1
  done
}

# netns_pair A B VA VB NET4 NET6: namespaces A and B joined by veth VA <-> VB,
# with A = NET4.1/24 and NET6::1/64, B = NET4.2/24 and NET6::2/64.
netns_pair() {
  ip netns add "$1" && ip netns add "$2" || fail "ip netns add $1 $2"
  ip -n "$1" link add "$3" type veth peer name "$4" netns "$2" || fail "veth $3 <-> $4"
  ip -n "$1" link set lo up; ip -n "$2" link set lo up
  ip -n "$1" addr add "$5.1/24" dev "$3"; ip -n "$2" addr add "$5.2/24" dev "$4"
  ip -n "$1" addr add "$6::1/64" dev "$3" nodad; ip -n "$2" addr add "$6::2/64" dev "$4" nodad
  ip -n "$1" link set "$3" up; ip -n "$2" link set "$4" up
}

# two_namespaces: namespaces a and b joined by veth va <-> vb, with
# a = 10.9.0.1/24 and fd09::1/64, b = 10.9.0.2/24 and fd09::2/64.
two_namespaces() { netns_pair a b va vb 10.9.0 fd09; }

# reference_path: namespaces c and d joined by veth vc <-> vd, like a and b
# (c = 10.9.1.1/24 and fd0a::1/64, d = 10.9.1.2/24 and fd0a::2/64). Tests put
# tc's own netem on it and measure it in the same seconds as chaosd's fault
# on a -> b: under this emulator netem's timers fire late, by up to ~10 ms on
# a median when the host is busy, for the kernel's netem as for chaosd's, so
# accuracy is checked against that reference and only loosely against the
# number asked for.
reference_path() { netns_pair c d vc vd 10.9.1 fd0a; }

# snapshot_a: what must be equal in namespace a before a fault and after it
# is recovered (qdiscs, classes, filters both ways, links).
snapshot_a() {
  ip netns exec a sh -c 'tc qdisc show; tc class show dev va; tc filter show dev va ingress; tc filter show dev va egress; ip link; ip -6 link'
}

# three_node_cluster: broker nodes n1..n3, one namespace each, joined by a
# bridge br0 in the VM's own namespace (10.9.5.254): node I at 10.9.5.I with
# MQTT :1883, cluster :7000 (joining the other two) and HTTP :9100; logs in
# /tmp/nI.log, printed when the test ends. Returns once every node sees both
# others up.
three_node_cluster() {
  ip link add br0 type bridge || fail "bridge"
  ip addr add 10.9.5.254/24 dev br0
  ip link set br0 up
  for i in 1 2 3; do
    ip netns add n$i || fail "ip netns add n$i"
    ip link add v$i type veth peer name eth0 netns n$i || fail "veth v$i"
    ip link set v$i master br0 up
    ip -n n$i link set lo up
    ip -n n$i addr add 10.9.5.$i/24 dev eth0
    ip -n n$i link set eth0 up
  done
  for i in 1 2 3; do
    seeds=""
    for j in 1 2 3; do [ $j -ne $i ] && seeds="$seeds${seeds:+,}10.9.5.$j:7000"; done
    ip netns exec n$i broker --node-name n$i --mqtt-listen 10.9.5.$i:1883 --http-listen 10.9.5.$i:9100 \
      --cluster-listen 10.9.5.$i:7000 --join "$seeds" --data-dir /tmp/n$i > /tmp/n$i.log 2>&1 &
  done
  # After start_chaosd's trap, which this one replaces: both logs.
  trap 'for i in 1 2 3; do echo "----- n$i log"; tail -20 /tmp/n$i.log; done; [ -s "$log" ] && { echo "----- chaosd log"; cat "$log"; }' EXIT
  for i in 1 2 3; do wait_for 90 "node n$i to see both peers up" peers_up $i; done
}

# peers_up I: node I's /cluster shows both other nodes up.
peers_up() {
  wget -q -O - "http://10.9.5.$1:9100/cluster" > /tmp/view$1.json 2>/dev/null || return 1
  [ "$(json_get members.0.state < /tmp/view$1.json)" = '"up"' ] && [ "$(json_get members.1.state < /tmp/view$1.json)" = '"up"' ]
}

# Tests with several guests ("# vm-test-guests: N" in the header) run once in
# each guest, with VM_GUEST=I (1..N): guest I is 10.9.7.I / fd09:7::I on
# eth0, named nodeI. Guest 1's result is the test's; the others call
# serve_until_stopped once their part is set up.

# guest_ip I: guest I's IPv4 address.
guest_ip() { echo "10.9.7.$1"; }

# serve_until_stopped: for guests other than 1: keep what runs running until
# run.sh stops the VM after guest 1's result; fail if DAEMON (a pid) exits.
serve_until_stopped() {
  echo "guest $VM_GUEST: serving until guest 1 is done"
  while :; do
    for _p in "$@"; do
      kill -0 "$_p" 2>/dev/null || fail "guest $VM_GUEST: process $_p exited while serving"
    done
    sleep 2
  done
}

