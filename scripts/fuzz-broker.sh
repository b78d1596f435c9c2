#!/usr/bin/env bash
# Fuzzes the broker's MQTT codec (broker/fuzz, target "codec") for a bounded
# time; exits non-zero when the fuzzer finds a crash (panic, assertion).
# Usage: scripts/fuzz-broker.sh [SECONDS]   (default 60, or $FUZZ_SECONDS)
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
secs=${1:-${FUZZ_SECONDS:-60}}

die() { echo "fuzz-broker.sh: $*" >&2; exit 1; }
rustup toolchain list | grep -q '^nightly' || die "the nightly toolchain is needed (rustup toolchain install nightly)"
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz-broker.sh: installing cargo-fuzz"
  cargo install --locked cargo-fuzz || die "cargo install cargo-fuzz failed"
fi

cd broker/fuzz
# A corpus kept between runs makes each bounded run start where the last one
# stopped; seeds are a few valid packets.
corpus=corpus/codec
mkdir -p "$corpus"
printf '\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c\x00\x00' > "$corpus/seed-connect-v311"
printf '\x10\x0d\x00\x04MQTT\x05\x02\x00\x3c\x00\x00\x00' > "$corpus/seed-connect-v5"
printf '\x32\x0a\x00\x03a/b\x00\x01\x00hi' > "$corpus/seed-publish-v5"
printf '\x82\x09\x00\x01\x00\x00\x03a/#\x02' > "$corpus/seed-subscribe-v5"

echo "fuzz-broker.sh: fuzzing the codec for ${secs}s"
# Safe Rust only: no sanitizer needed; debug assertions (overflow checks) stay on.
cargo +nightly fuzz run --sanitizer none codec "$corpus" -- \
  -max_total_time="$secs" -max_len=4096 -timeout=10 -print_final_stats=1 \
  || die "the codec fuzzer found a crash; the reproducer is under broker/fuzz/artifacts/codec/"
echo "fuzz-broker.sh: no crash in ${secs}s"
