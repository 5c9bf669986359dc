#!/usr/bin/env bash
# Runs every fuzz target for a short time (FUZZ_SECONDS, default 20) from a seed corpus.
# Installs cargo-fuzz if missing. Builds with the pinned toolchain (rust-toolchain.toml) and
# RUSTC_BOOTSTRAP=1, because cargo-fuzz passes -Z sanitizer flags and no other toolchain can
# be assumed on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")"
SECS=${FUZZ_SECONDS:-20}
command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz
export RUSTC_BOOTSTRAP=1
FUZZ=(cargo fuzz)
mkdir -p corpus/connect_request corpus/local_config corpus/waypoint_request_head
printf '\x00127.0.0.1:80' > corpus/connect_request/v4
printf '\x00[fd00::1]:8080' > corpus/connect_request/v6
printf '\x01spiffe://cluster.local/ns/a/sa/b' > corpus/connect_request/id
cp ../ztunnel/tests/data/*.yaml corpus/local_config/ 2>/dev/null || true
printf 'GET\n/api/x?a=b\nhost: echo\nx-v: v2\ntraceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\n' > corpus/waypoint_request_head/get
printf 'POST\n/exact\nconnection: x-r, close\nx-r: 1\n' > corpus/waypoint_request_head/post
for t in connect_request local_config waypoint_request_head; do
  echo "fuzzing $t for ${SECS}s"
  "${FUZZ[@]}" run "$t" "corpus/$t" -- -max_total_time="$SECS" -rss_limit_mb=4096 2>&1 | tail -n 3
done
echo "fuzz smoke: 3 targets ran without a crash"
