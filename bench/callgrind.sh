#!/usr/bin/env bash
# Instruction counts (callgrind) of the deterministic micro-benchmarks, compared with the
# stored baseline. Wall-clock time on these shared 2-core machines is noise; instruction
# counts move only when the code does, so they are the regression signal.
#
#   bash bench/callgrind.sh            compare with bench/baseline/callgrind.json
#   bash bench/callgrind.sh --update   rewrite the baseline (commit it with the change)
#
# Fails (exit 1) when a count grows more than TOLERANCE_PCT (default 3) over the baseline.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release/mesh-bench}
BASE=bench/baseline/callgrind.json
TOL=${TOLERANCE_PCT:-3}
update=0
[ "${1:-}" = "--update" ] && update=1
command -v valgrind >/dev/null || { echo "callgrind: valgrind is missing (apt-get install valgrind)"; exit 2; }
[ -x "$BIN" ] || { echo "callgrind: $BIN missing; cargo build --release -p mesh-bench"; exit 2; }
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

# hbone_setup is the same run with no payload: certificates, the DRBG seeding of aws-lc
# (jitterentropy, ~75% of it) and the handshake. The gated data-path figure is the
# difference, per MiB, so a data-path regression is not hidden behind start-up work.
declare -A CASES=(
  [hbone_16mib]="micro hbone --mib 16"
  [hbone_setup]="micro hbone --mib 0"
  [policy_100k]="micro policy --iterations 100000"
)
results="{"
sep=""
for name in $(printf '%s\n' "${!CASES[@]}" | sort); do
  # shellcheck disable=SC2086 # the case's arguments are meant to split
  valgrind --tool=callgrind --callgrind-out-file="$out/$name.cg" "$BIN" ${CASES[$name]} \
    >"$out/$name.json" 2>"$out/$name.log" || { cat "$out/$name.log" | tail -20; exit 1; }
  ir=$(awk '/^summary:/ {print $2}' "$out/$name.cg")
  [ -n "$ir" ] || { echo "callgrind: no summary for $name"; exit 1; }
  results+="$sep\"$name\": $ir"
  sep=", "
done
results+="}"
results=$(python3 -c 'import json,sys; r=json.loads(sys.argv[1]); r["hbone_data_per_mib"]=(r["hbone_16mib"]-r["hbone_setup"])//16; print(json.dumps(r))' "$results")
if [ $update = 1 ] || [ ! -f "$BASE" ]; then
  echo "$results" | python3 -m json.tool > "$BASE"
  echo "callgrind: baseline written to $BASE"
  cat "$BASE"
  exit 0
fi
python3 - "$BASE" "$results" "$TOL" <<'PY'
import json, sys
base = json.load(open(sys.argv[1])); now = json.loads(sys.argv[2]); tol = float(sys.argv[3])
worse = 0
print(f"{'case':<14} {'baseline Ir':>15} {'now Ir':>15} {'change':>8}")
for k in sorted(now):
    b = base.get(k)
    if b is None:
        print(f"{k:<14} {'(new)':>15} {now[k]:>15,}")
        continue
    d = (now[k] - b) / b * 100
    flag = "  REGRESSION" if d > tol else ""
    worse += d > tol
    print(f"{k:<14} {b:>15,} {now[k]:>15,} {d:>+7.2f}%{flag}")
print(f"callgrind: {len(now) - worse} passed, {worse} failed (tolerance {tol}%)")
sys.exit(1 if worse else 0)
PY
