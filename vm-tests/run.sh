#!/usr/bin/env bash
# Boots Debian's stock kernel under QEMU (TCG) with a busybox initramfs that
# carries the project's release binaries and iproute2, runs one guest test
# script per boot, and maps each script's result to this script's exit code.
#
# Usage: sudo vm-tests/run.sh [TEST...]     TEST = name in vm-tests/tests/
#                                           (with or without .sh); none: all
# Needs: target/release/{chaosd,chaosctl,broker} (cargo build --release) and
# the packages scripts/setup.sh installs. See vm-tests/README.md.
#
# Environment:
#   CHAOSD_VM_CACHE    kernel cache           (default /var/cache/chaosd-vm)
#   CHAOSD_VM_LOGS     console logs           (default <target>/vm-logs)
#   CHAOSD_VM_BIN_DIR  release binaries       (default <target>/release)
#   CHAOSD_VM_KERNEL   kernel package to use  (default: what linux-image-amd64 depends on)
#   CHAOSD_VM_TIMEOUT  seconds per test boot  (default 300; a test may say
#                      "# vm-test-timeout: N" in its header)
#   CHAOSD_VM_BOOT_LIMIT  seconds for the guest to reach /init (default 120;
#                      here it does at 2-5 s of guest uptime): past it the boot counts as hung,
#                      and a hung boot is tried once more
#   CHAOSD_VM_MEM, CHAOSD_VM_SMP  guest RAM in MiB (1024) and CPUs (2)
#   CHAOSD_VM_VERBOSE=1  stream the guest console while tests run
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
target_dir=${CARGO_TARGET_DIR:-$repo/target}
CACHE=${CHAOSD_VM_CACHE:-/var/cache/chaosd-vm}
LOGS=${CHAOSD_VM_LOGS:-$target_dir/vm-logs}
BIN_DIR=${CHAOSD_VM_BIN_DIR:-$target_dir/release}
TIMEOUT=${CHAOSD_VM_TIMEOUT:-300}
BOOT_LIMIT=${CHAOSD_VM_BOOT_LIMIT:-120}
MEM=${CHAOSD_VM_MEM:-1024}
SMP=${CHAOSD_VM_SMP:-2}
BINARIES=(chaosd chaosctl broker)

say() { printf 'vm-tests: %s\n' "$*"; }
die() { printf 'vm-tests: error: %s\n' "$*" >&2; exit 1; }

# ------------------------------------------------------------------ cleanup
# Everything this script starts or creates is undone here, on every exit path.
work=""
# One entry per running guest: the pid of `timeout` (a process-group leader
# with qemu inside) and qemu's pid file.
qemu_groups=()
qemu_pidfiles=()
# stop_qemu: kills every running VM and returns once each qemu is gone.
stop_qemu() {
  local i qpid n
  for i in "${!qemu_groups[@]}"; do
    # The pid file covers the moment before `timeout` made its group.
    qpid=""
    [ -s "${qemu_pidfiles[$i]}" ] && qpid=$(cat "${qemu_pidfiles[$i]}")
    kill -KILL -- "-${qemu_groups[$i]}" 2>/dev/null || kill -KILL "${qemu_groups[$i]}" 2>/dev/null || true
    [ -n "$qpid" ] && { kill -KILL "$qpid" 2>/dev/null || true; }
    wait "${qemu_groups[$i]}" 2>/dev/null || true
    # qemu is timeout's child, not ours: wait until it is really gone (tearing
    # down 1 GiB of guest RAM takes a moment), so nothing outlives this script.
    n=100
    while [ -n "$qpid" ] && [ $n -gt 0 ] && kill -0 "$qpid" 2>/dev/null; do
      sleep 0.1
      n=$((n - 1))
    done
    rm -f "${qemu_pidfiles[$i]}"
  done
  qemu_groups=()
  qemu_pidfiles=()
}
cleanup() {
  local rc=$?
  stop_qemu
  [ -n "$work" ] && rm -rf -- "$work"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ------------------------------------------------------------------ checks
[ "$(id -u)" -eq 0 ] || die "must run as root: the kernel cache is under $CACHE and apt-get download needs it (sudo vm-tests/run.sh)"
missing=()
for c in qemu-system-x86_64 cpio depmod modprobe objcopy readelf od ldd apt-get apt-cache dpkg ip tc timeout gzip; do
  command -v "$c" >/dev/null 2>&1 || missing+=("$c")
done
[ ${#missing[@]} -eq 0 ] || die "missing commands: ${missing[*]} (run scripts/setup.sh)"
for b in "${BINARIES[@]}"; do
  [ -x "$BIN_DIR/$b" ] || die "$BIN_DIR/$b not found: build it first (cargo build --release -p chaosd -p chaosctl -p broker)"
done

# Which tests, in a stable order.
tests=()
if [ $# -eq 0 ]; then
  for f in "$here"/tests/*.sh; do
    [ -e "$f" ] && tests+=("$(basename "$f" .sh)")
  done
  [ ${#tests[@]} -gt 0 ] || die "no tests in $here/tests"
else
  for t in "$@"; do
    t=$(basename "$t" .sh)
    [ -f "$here/tests/$t.sh" ] || die "no test '$t' (have: $(cd "$here/tests" && ls -- *.sh | sed 's/\.sh$//' | tr '\n' ' '))"
    tests+=("$t")
  done
fi

t_total=$(date +%s.%N)
elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }

mkdir -p "$CACHE" "$LOGS"
work=$(mktemp -d "${TMPDIR:-/tmp}/chaosd-vm.XXXXXX")

# ------------------------------------------------------------------ packages
# Debian packages the guest needs are downloaded once and unpacked (never
# installed) into $CACHE/<kind>/<version>/; .complete marks a finished unpack,
# so a second run downloads nothing.

# cached_pkg KIND PKG VERSION PINNED: unpack PKG into $CACHE/KIND/VERSION
# unless it is there; sets pkg_dir. Offline (or with stale package lists) it
# falls back to the newest VERSION cached earlier, with a warning, unless
# PINNED is 1 (the user asked for this package); otherwise it stops with the
# reason.
cached_pkg() {
  local kind=$1 pkg=$2 ver=$3 pinned=$4 why=""
  if [ -n "$pkg" ] && [ -n "$ver" ]; then
    pkg_dir=$CACHE/$kind/${ver//:/_}
    if [ -f "$pkg_dir/.complete" ]; then
      say "$kind $ver: cached in $pkg_dir"
      return 0
    fi
    say "$kind $ver: downloading $pkg (unpacked into $pkg_dir, not installed)"
    local dl=$work/deb-$kind tmp=$CACHE/$kind/.unpack.$$
    mkdir -p "$dl" "$CACHE/$kind"
    # (_apt cannot write into a root-only temp dir, so apt downloads as root
    # and warns "unsandboxed"; harmless.)
    if (cd "$dl" && apt-get download -q "$pkg") > "$work/apt.log" 2>&1 \
        && ls "$dl"/*.deb >/dev/null 2>&1; then
      rm -rf "$tmp"
      dpkg -x "$dl"/*.deb "$tmp" || { rm -rf "$tmp"; die "dpkg -x of $pkg failed"; }
      if [ "$kind" = kernel ]; then
        [ -f "$tmp/boot/vmlinuz-$ver" ] && [ -d "$tmp/lib/modules/$ver" ] \
          || { rm -rf "$tmp"; die "$pkg holds no boot/vmlinuz-$ver or lib/modules/$ver"; }
        # The package ships no modules.dep (depmod runs at install time).
        depmod -b "$tmp" "$ver" || { rm -rf "$tmp"; die "depmod for $ver failed"; }
      fi
      touch "$tmp/.complete"
      rm -rf "$pkg_dir" "$dl"
      mv "$tmp" "$pkg_dir"
      return 0
    fi
    grep -v unsandboxed "$work/apt.log" >&2 || true
    why="apt-get download $pkg failed (no Debian mirror reachable, or stale package lists: apt-get update)"
  else
    why="apt-cache does not know ${pkg:-the package} (run apt-get update?)"
  fi
  local cached
  [ "$pinned" = 1 ] && die "no $kind for the VM: $why"
  cached=$( (ls -d "$CACHE/$kind"/*/.complete 2>/dev/null || true) | sed 's|/.complete$||' | sort -V | tail -1)
  [ -n "$cached" ] || die "no $kind for the VM: $why; nothing cached in $CACHE/$kind"
  pkg_dir=$cached
  say "warning: $why; using the cached $kind $(basename "$pkg_dir")"
}

t0=$(date +%s.%N)
# Debian's stock kernel: the one linux-image-amd64 currently depends on.
kpkg=${CHAOSD_VM_KERNEL:-$(apt-cache depends linux-image-amd64 2>/dev/null \
        | awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ { print $2; exit }' || true)}
cached_pkg kernel "$kpkg" "${kpkg#linux-image-}" "$([ -n "${CHAOSD_VM_KERNEL:-}" ] && echo 1 || echo 0)"
kdir=$pkg_dir
kver=$(basename "$kdir")
vmlinuz=$kdir/boot/vmlinuz-$kver

# extract_pvh VMLINUZ OUT: the uncompressed kernel ELF inside a bzImage, if it
# carries the PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY, 18; CONFIG_PVH=y as in
# Debian's kernels). QEMU then enters it directly, skipping SeaBIOS's Linux
# loader and the kernel's self-decompression, which under TCG cost 4-8 s per
# boot. The payload is located from the bzImage header (Documentation/
# arch/x86/boot.rst: setup_sects at 0x1f1, payload_offset/length at
# 0x248/0x24c); its last 4 bytes are the appended uncompressed size.
extract_pvh() {
  local z=$1 out=$2 ss poff plen start magic
  ss=$(od -An -tu1 -j $((0x1f1)) -N1 "$z" | tr -d ' ')
  [ "$ss" = 0 ] && ss=4
  poff=$(od -An -tu4 -j $((0x248)) -N4 "$z" | tr -d ' ')
  plen=$(od -An -tu4 -j $((0x24c)) -N4 "$z" | tr -d ' ')
  [ -n "$poff" ] && [ -n "$plen" ] && [ "$plen" -gt 4 ] || return 1
  start=$(( (ss + 1) * 512 + poff ))
  payload() { dd if="$z" bs=1M iflag=skip_bytes,count_bytes skip="$start" count="$1" status=none; }
  magic=$(payload 6 | od -An -tx1 | tr -d ' \n')
  local dec
  case "$magic" in
    fd377a585a00) dec="xz -dc" ;;
    28b52ffd*) dec="zstd -dcq" ;;
    1f8b*) dec="gzip -dc" ;;
    *) return 1 ;;
  esac
  command -v "${dec%% *}" >/dev/null || return 1
  payload $((plen - 4)) | $dec > "$out.tmp.$$" 2>/dev/null || { rm -f "$out.tmp.$$"; return 1; }
  if [ "$(head -c 4 "$out.tmp.$$" | od -An -tx1 | tr -d ' \n')" = 7f454c46 ] \
      && readelf -n "$out.tmp.$$" 2>/dev/null | grep -qE '\(0x00000012\)|PHYS32_ENTRY'; then
    mv "$out.tmp.$$" "$out"
  else
    rm -f "$out.tmp.$$"
    return 1
  fi
}
boot_kernel=$vmlinuz
pvh=$kdir/boot/vmlinux-$kver.pvh
if [ -f "$pvh" ] || extract_pvh "$vmlinuz" "$pvh"; then
  boot_kernel=$pvh
else
  say "note: no PVH entry in $vmlinuz; booting the bzImage (slower)"
fi

# Debian's regular (dynamic) busybox, not busybox-static: the static build is
# configured to prefer its own applets over PATH (FEATURE_SH_STANDALONE,
# FEATURE_PREFER_APPLETS), so in its shell `tc` and `ip` would always be the
# busybox applets, never iproute2's. The two packages conflict, hence a
# download instead of an install.
bbver=$(apt-cache show --no-all-versions busybox 2>/dev/null | awk '$1 == "Version:" { print $2; exit }' || true)
cached_pkg busybox busybox "$bbver" 0
busybox_bin=$pkg_dir/bin/busybox
[ -x "$busybox_bin" ] || die "$busybox_bin missing from the busybox package"
say "packages ready in $(elapsed "$t0")s"

# ------------------------------------------------------------------ initramfs
# Rebuilt on every run (a few seconds), so it always holds the current
# binaries, tests and module list. Layout follows Debian's merged /usr.
t0=$(date +%s.%N)
root=$work/root
mkdir -p "$root"/{bin,dev,etc,proc,root,run,sys,tmp,usr/bin,usr/sbin,usr/lib,usr/lib64,var/lib,vm-tests/tests,etc/vm-tests}
ln -s usr/lib "$root/lib"
ln -s usr/lib64 "$root/lib64"
ln -s usr/sbin "$root/sbin"
ln -s ../run "$root/var/run"

# copy_libs FILE: the shared libraries FILE needs, at the paths ldd names.
copy_libs() {
  local lib
  for lib in $(ldd "$1" 2>/dev/null | grep -oE '/[^ ]+' | sort -u); do
    [ -e "$root$lib" ] && continue
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
  done
}

cp "$busybox_bin" "$root/bin/busybox"
copy_libs "$busybox_bin"

for tool in ip tc; do
  src=$(command -v "$tool")
  cp -L "$src" "$root/usr/sbin/$tool"
  copy_libs "$src"
done
# tc's netem distribution tables (delay ... distribution normal) and its
# name tables.
tc_lib=$(dpkg -L iproute2 2>/dev/null | grep -m1 '/tc/normal.dist$' || true)
if [ -n "$tc_lib" ]; then
  mkdir -p "$root$(dirname "$tc_lib")"
  cp "$(dirname "$tc_lib")"/*.dist "$root$(dirname "$tc_lib")/"
fi
[ -d /etc/iproute2 ] && cp -r /etc/iproute2 "$root/etc/"

for b in "${BINARIES[@]}"; do
  # Debug info is most of a release binary's size; the guest does not need it.
  objcopy --strip-debug "$BIN_DIR/$b" "$root/usr/bin/$b"
  copy_libs "$BIN_DIR/$b"
done

# Busybox applets for everything else; no /bin/ip or /bin/tc, so iproute2's
# are found whatever PATH a program uses.
for applet in $("$busybox_bin" --list); do
  [ "$applet" = busybox ] && continue
  [ -e "$root/usr/sbin/$applet" ] || [ -e "$root/usr/bin/$applet" ] && continue
  ln -s busybox "$root/bin/$applet"
done

# Kernel modules of modules.list plus their dependencies, then depmod so that
# busybox modprobe resolves them in the guest; parameters go to
# /etc/modprobe.d as on any host.
mods=()
mkdir -p "$root/etc/modprobe.d"
while read -r mod params; do
  case "$mod" in ''|'#'*) continue ;; esac
  deps=$(modprobe -d "$kdir" -S "$kver" --show-depends "$mod" 2>&1) \
    || die "kernel module $mod: not in $kver ($deps); fix vm-tests/modules.list"
  while read -r kind path _; do
    case "$kind" in
      insmod)
        rel=${path#"$kdir"/}
        mkdir -p "$root/$(dirname "$rel")"
        cp "$path" "$root/$rel" ;;
      builtin) say "note: $mod is built into $kver" ;;
    esac
  done <<< "$deps"
  mods+=("$mod")
  if [ -n "$params" ]; then echo "options $mod $params" >> "$root/etc/modprobe.d/vm-tests.conf"; fi
done < "$here/modules.list"
for f in modules.order modules.builtin modules.builtin.modinfo; do
  cp "$kdir/lib/modules/$kver/$f" "$root/lib/modules/$kver/"
done
depmod -b "$root" "$kver" || die "depmod for the initramfs failed"
printf '%s\n' "${mods[@]}" > "$root/etc/vm-tests/modules"

cat > "$root/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
EOF
cat > "$root/etc/group" <<'EOF'
root:x:0:
nogroup:x:65534:
EOF
printf '127.0.0.1 localhost chaosd-vm\n::1 localhost ip6-localhost\n' > "$root/etc/hosts"
printf 'hosts: files\n' > "$root/etc/nsswitch.conf"

install -m 0755 "$here/guest/init" "$root/init"
install -m 0644 "$here/guest/lib.sh" "$root/vm-tests/lib.sh"
for t in "${tests[@]}"; do
  install -m 0755 "$here/tests/$t.sh" "$root/vm-tests/tests/$t.sh"
done

# Tests with several guests provision them from a stage (certificates, units,
# the provisioning script Vagrant users run, a plan), made here as for
# Vagrant: vm-tests/provision/stage.sh.
max_guests=1
for t in "${tests[@]}"; do
  g=$(sed -n 's/^# *vm-test-guests: *\([0-9][0-9]*\).*/\1/p' "$here/tests/$t.sh" | head -1)
  [ "${g:-1}" -gt "$max_guests" ] && max_guests=$g
done
if [ "$max_guests" -gt 1 ]; then
  stage_nodes=()
  for g in $(seq 1 "$max_guests"); do stage_nodes+=("n$g=10.9.7.$g"); done
  "$here/provision/stage.sh" "$root/stage" "${stage_nodes[@]}" --chaosctl "$BIN_DIR/chaosctl" >/dev/null \
    || die "vm-tests/provision/stage.sh failed"
fi

initrd=$work/initramfs.cpio.gz
# gzip -1: the kernel's inflate under TCG is the cost that matters, and a
# lighter level barely changes it; -1 keeps the build quick.
(cd "$root" && find . -print0 | LC_ALL=C sort -z | cpio -o -0 -H newc -R 0:0 --quiet) | gzip -1 > "$initrd"
say "initramfs: $(du -h "$initrd" | cut -f1) ($(du -sh "$root" | cut -f1) unpacked), modules: ${mods[*]}; built in $(elapsed "$t0")s"

# ------------------------------------------------------------------ run
# clean_log FILE: the console log without CRs and terminal escapes (SeaBIOS
# clears the screen, colour in program logs).
clean_log() {
  tr -d '\r' < "$1" | sed 's/\x1b\[[0-9;?]*[a-zA-Z]//g; s/\x1bc//g'
}

# run_test NAME: one boot of the test's guests; sets result_line and returns
# 0 on PASS. Sets boot_hung=1 when a guest did not reach /init within
# BOOT_LIMIT seconds.
#
# A test whose header says "# vm-test-guests: N" (N > 1) gets N guests on one
# virtual Ethernet of their own: QEMU socket networking over a multicast group
# on the host's loopback (port chosen per run, so two runs never share a
# wire; nothing reaches a real network). Guest I has MAC 52:54:00:c4:a0:0I and
# /init gives it 10.9.7.I/24 and fd09:7::I/64 on eth0. Every guest runs the
# same script with VM_GUEST=I; guest 1's result is the test's, the others
# serve until guest 1 is done and are then stopped (a FAIL line from one of
# them fails the test too).
run_test() {
  local name=$1 t_limit nonce log rc line t0 started guests g smp nic port logs=() reached helper_failed
  t_limit=$(sed -n 's/^# *vm-test-timeout: *\([0-9][0-9]*\).*/\1/p' "$here/tests/$name.sh" | head -1)
  t_limit=${t_limit:-$TIMEOUT}
  guests=$(sed -n 's/^# *vm-test-guests: *\([0-9][0-9]*\).*/\1/p' "$here/tests/$name.sh" | head -1)
  guests=${guests:-1}
  [ "$guests" -ge 1 ] && [ "$guests" -le 9 ] || die "$name: vm-test-guests must be 1..9, not $guests"
  # Several TCG guests share the host's cores: one vCPU each unless asked.
  smp=$SMP
  [ "$guests" -gt 1 ] && smp=${CHAOSD_VM_SMP:-1}
  port=$(( 40000 + $(od -An -N2 -tu2 /dev/urandom | tr -d ' ') % 20000 ))
  nonce=$(od -An -N6 -tx1 /dev/urandom | tr -d ' \n')
  log=$LOGS/$name.log
  t0=$(date +%s.%N)
  say "run $name (timeout ${t_limit}s, $guests guest(s), console log $log)"
  for g in $(seq 1 "$guests"); do
    logs[g]=$log
    [ "$g" -gt 1 ] && logs[g]=$LOGS/$name.guest$g.log
    # -nic none for one guest: tests build their own networks (netns, veth)
    # inside it.
    nic="-nic none"
    [ "$guests" -gt 1 ] && nic="-netdev socket,id=lan,mcast=239.255.73.1:$port,localaddr=127.0.0.1 -device virtio-net-pci,netdev=lan,mac=52:54:00:c4:a0:0$g"
    # KVM aborts on these machines (ENVIRONMENT.md), hence TCG.
    # shellcheck disable=SC2086 # $nic is a word list on purpose
    timeout -k 5 "$t_limit" qemu-system-x86_64 \
        -accel tcg -cpu max -m "$MEM" -smp "$smp" \
        -nographic -no-reboot $nic -pidfile "$work/qemu$g.pid" \
        -kernel "$boot_kernel" -initrd "$initrd" \
        -append "console=ttyS0 quiet panic=-1 chaosd.test=$name chaosd.nonce=$nonce chaosd.guest=$g chaosd.guests=$guests" \
        < /dev/null > "${logs[g]}" 2>&1 &
    qemu_groups+=("$!")
    qemu_pidfiles+=("$work/qemu$g.pid")
    if [ "${CHAOSD_VM_VERBOSE:-0}" = 1 ]; then
      tail -n +1 -f --pid="$!" "${logs[g]}" | sed -u "s/^/[guest $g] /" &
    fi
  done
  # Under TCG a boot now and then stops after SeaBIOS and never reaches the
  # kernel's /init (once in the CI rehearsal of 2026-11-22, console ending at
  # "Booting from ROM.."): that is no result of the test, so it is told
  # apart from one, instead of eating the whole test timeout.
  boot_hung=0
  started=$SECONDS
  while kill -0 "${qemu_groups[0]}" 2>/dev/null; do
    reached=0
    for g in $(seq 1 "$guests"); do
      grep -aq 'vm-init: kernel' "${logs[g]}" && reached=$((reached + 1))
    done
    if [ "$reached" -eq "$guests" ]; then
      break
    elif [ $((SECONDS - started)) -ge "$BOOT_LIMIT" ]; then
      boot_hung=1
      stop_qemu
      break
    fi
    sleep 1
  done
  rc=0
  # Guest 1 ends the test; a failing helper guest ends it early.
  while [ ${#qemu_groups[@]} -gt 0 ] && kill -0 "${qemu_groups[0]}" 2>/dev/null; do
    for g in $(seq 2 "$guests"); do
      if clean_log "${logs[g]}" | grep -aq "^VM-TEST-RESULT: FAIL $name .* id=$nonce\$"; then
        say "guest $g failed; stopping the others (console: ${logs[g]})"
        clean_log "${logs[g]}" | tail -n 20
        stop_qemu
        break
      fi
    done
    sleep 1
  done
  if [ ${#qemu_groups[@]} -gt 0 ]; then
    wait "${qemu_groups[0]}" || rc=$?
  fi
  stop_qemu
  helper_failed=""
  for g in $(seq 2 "$guests"); do
    if clean_log "${logs[g]}" | grep -aq "^VM-TEST-RESULT: FAIL $name .* id=$nonce\$"; then
      helper_failed="FAIL $name: guest $g failed: $(clean_log "${logs[g]}" | grep -a '^FAIL:' | tail -1) (console: ${logs[g]})"
    fi
  done
  line=$(clean_log "$log" | grep -a -E "^VM-TEST-RESULT: (PASS|FAIL) $name .* id=$nonce\$" | tail -1 || true)
  if [ -n "$helper_failed" ]; then
    result_line=$helper_failed
  elif [ "$boot_hung" -eq 1 ]; then
    result_line="FAIL $name: a guest did not reach /init within ${BOOT_LIMIT}s (VM killed; console: $(clean_log "$log" | tail -c 120 | tr '\n' ' '))"
  elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    result_line="FAIL $name: no result within ${t_limit}s (VM killed)"
  elif [ -z "$line" ]; then
    result_line="FAIL $name: the guest printed no result line (qemu exit $rc; kernel panic or /init crash?)"
  else
    result_line=${line#VM-TEST-RESULT: }
  fi
  # Guest uptime when /init started and when the test started: kernel boot,
  # and boot plus mounts and module loading.
  local boot
  boot=$(clean_log "$log" | sed -n \
    -e 's/^vm-init: kernel .*init started at \([0-9.]*\)s uptime.*/init at \1s/p' \
    -e 's/^vm-init: running .* at \([0-9.]*\)s uptime.*/test at \1s/p' | tr '\n' ' ')
  result_line="$result_line, guest ${boot:-never booted }(uptime), wall $(elapsed "$t0")s"
  case "$result_line" in
    PASS*) say "$result_line"; return 0 ;;
    *)
      say "$result_line"
      echo "----- last 40 lines of $log"
      clean_log "$log" | tail -n 40
      echo "-----"
      return 1 ;;
  esac
}

passed=()
failed=()
rebooted=()
for t in "${tests[@]}"; do
  if run_test "$t"; then
    passed+=("$t")
  elif [ "$boot_hung" -eq 1 ]; then
    say "$t: the boot hung before the test ran; booting it once more"
    rebooted+=("$t")
    if run_test "$t"; then passed+=("$t"); else failed+=("$t"); fi
  else
    failed+=("$t")
  fi
done

echo "vm-tests: ${#passed[@]} passed, ${#failed[@]} failed in $(elapsed "$t_total")s (kernel $kver)${failed[*]:+; failed: ${failed[*]}}${rebooted[*]:+; booted twice after a hung boot: ${rebooted[*]}}"
[ ${#failed[@]} -eq 0 ]
