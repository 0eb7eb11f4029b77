#!/usr/bin/env bash
# The experiments sweep (docs/EXPERIMENTS.md): every run is one process of build/bench/experiments/experiments that
# appends one CSV row; a run whose row is already there is skipped, so an interrupted sweep resumes where it stopped.
#
#   bench/experiments/run.sh [--quick] [--out DIR] [--limit N] [--only core|gates|scale|faults]
#   environment: STEPS (1000), SEEDS ("1 2 3"), JOBS (1: runs in parallel), EVAL_EVERY (100), EVAL_ITERS (20),
#                TARGET (val loss for "steps to target", 2.1), THREADS (OpenMP threads per run: 2 / JOBS)
#
# Plan, in this order (seeds interleaved, so that a partial sweep has every configuration at its first seeds):
#   core   dense flat cluster tree ac ac_cluster ac_m1                        (equal active compute, cpu preset size)
#   faults flat and cluster, reliability on and off, NaN and x100 weights     (the fault-injection experiment)
#   gates  cluster@renorm_path cluster@product cluster@group_limited tree@renorm_path   ("cluster" is the default)
#   scale  flat64 cluster64 tree64                                            (64 experts, same active compute)
# then bench/routing_cost, `experiments speed` (training and generation speed of the configurations side by side,
# OUT/speed.md: the sweep's own timings run two at a time and compare poorly) and the report: OUT/report.md, *.svg.
# The report computes "steps to target" from the val curves for TARGET (so a CSV of runs made with another target
# can be reported for this one).
# --quick: 4 steps per run, one seed, fewer configurations, then checks that every CSV column is filled in every row
# (CI: `make experiments QUICK=1`). Quick mode starts from an empty OUT, runs the first 3 runs, then the sweep again:
# it checks that those 3 are skipped (resume) and that no run is in the CSV twice. --limit N stops after N runs.
set -euo pipefail
cd "$(dirname "$0")/../.."

QUICK=0 OUT="" LIMIT=0 ONLY=""
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK=1 ;;
    --out) OUT="$2"; shift ;;
    --limit) LIMIT="$2"; shift ;;
    --only) ONLY="$2"; shift ;;
    *) echo "run.sh: unknown argument '$1' (see the comment at its top)" >&2; exit 2 ;;
  esac
  shift
done

BIN=${BIN:-build/bench/experiments/experiments}  # BIN=copy: a sweep unaffected by rebuilds while it runs
[ -x "$BIN" ] || { echo "run.sh: $BIN missing: run 'make experiments' (or make $BIN)" >&2; exit 2; }
[ -f data/tinyshakespeare.txt ] || { echo "run.sh: data/tinyshakespeare.txt missing: run 'make data'" >&2; exit 2; }
COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo +)

if [ "$QUICK" = 1 ]; then
  OUT=${OUT:-build/experiments-quick}
  STEPS=4 EVAL_EVERY=2 EVAL_ITERS=1 SEEDS="1" FAULT_STEPS=4 INFER=4
  CORE="dense flat cluster tree ac ac_cluster ac_m1"
  GATES="cluster@group_limited"
  SCALE="cluster64"
  FAULT_ROUTERS="cluster" FAULT_REL="1 0" FAULTS="nan" RC_ARGS="--quick --T 256"
  SPEED_ARGS="--configs dense,flat,cluster --rounds 1 --steps 1 --warmup 0 --infer_tokens 4"
else
  OUT=${OUT:-bench/experiments/results}
  STEPS=${STEPS:-1000} EVAL_EVERY=${EVAL_EVERY:-100} EVAL_ITERS=${EVAL_ITERS:-20} SEEDS=${SEEDS:-"1 2 3"}
  FAULT_STEPS=120 INFER=64
  CORE="dense flat cluster tree ac ac_cluster ac_m1"
  GATES="cluster@renorm_path cluster@product cluster@group_limited tree@renorm_path"
  SCALE="flat64 cluster64 tree64"
  FAULT_ROUTERS="flat cluster" FAULT_REL="1 0" FAULTS="nan x100" RC_ARGS="" SPEED_ARGS=""
fi
JOBS=${JOBS:-1}
THREADS=${THREADS:-$(( JOBS >= 2 ? 1 : 2 ))}
TARGET=${TARGET:-2.1}
mkdir -p "$OUT"
CSV="$OUT/results.csv" FCSV="$OUT/faults.csv"

# ---- quick mode: a fresh directory and an interrupted sweep first (the resume check below)
QUICK_RESUME=0
if [ "$QUICK" = 1 ] && [ "$LIMIT" = 0 ]; then
  rm -rf "$OUT"
  "$0" --quick --out "$OUT" --limit 3 ${ONLY:+--only "$ONLY"} > /dev/null
  QUICK_RESUME=1
fi
mkdir -p "$OUT"

# ---- the plan: one line per run, "<csv> <id> <command...>"
plan=()
add_runs() {  # configs...
  local s c
  for s in $SEEDS; do
    for c in "$@"; do
      plan+=("$CSV $c/s$s/n$STEPS run --config $c --seed $s --steps $STEPS --eval_every $EVAL_EVERY --eval_iters $EVAL_ITERS --target $TARGET --infer_tokens $INFER --commit $COMMIT --csv $CSV")
    done
  done
}
want() { [ -z "$ONLY" ] || [ "$ONLY" = "$1" ]; }
want core && add_runs $CORE
if want faults; then
  for s in $SEEDS; do for r in $FAULT_ROUTERS; do for rel in $FAULT_REL; do for f in $FAULTS; do
    id="$r/$([ "$rel" = 1 ] && echo rel || echo norel)/$f/s$s"
    plan+=("$FCSV $id fault --router $r --reliability $rel --fault $f --seed $s --before $FAULT_STEPS --after $FAULT_STEPS --commit $COMMIT --csv $FCSV")
  done; done; done; done
fi
want gates && add_runs $GATES
want scale && add_runs $SCALE

# ---- run what is not in the CSVs yet, JOBS at a time, with progress and ETA
have() { [ -f "$1" ] && cut -d, -f1 "$1" | grep -qxF "$2"; }
total=${#plan[@]} skipped=0 started=0 finished=0
t0=$(date +%s)
todo=()
for line in "${plan[@]}"; do
  read -r csv id _ <<<"$line"
  if have "$csv" "$id"; then skipped=$((skipped + 1)); else todo+=("$line"); fi
done
echo "experiments: $total runs planned, $skipped already in $OUT (skipped), ${#todo[@]} to run, $JOBS at a time, $THREADS threads each"
[ "$LIMIT" -gt 0 ] && [ "${#todo[@]}" -gt "$LIMIT" ] && todo=("${todo[@]:0:$LIMIT}")
mkdir -p "$OUT/logs"
fail=0
progress() {
  local now el eta
  now=$(date +%s); el=$((now - t0))
  if [ "$finished" -gt 0 ]; then eta=$(( el * (${#todo[@]} - finished) / finished )); else eta=0; fi
  printf '[%d/%d done, %d skipped] %s  elapsed %dm%02ds  ETA %dm%02ds\n' $((skipped + finished)) "$total" "$skipped" \
    "$1" $((el / 60)) $((el % 60)) $((eta / 60)) $((eta % 60))
}
run_one() {
  local csv id args log
  read -r csv id args <<<"$1"
  log="$OUT/logs/$(echo "$id" | tr '/@' '__').log"
  OMP_NUM_THREADS=$THREADS OMP_WAIT_POLICY=passive "$BIN" $args >"$log" 2>&1 || { echo "FAILED: $id (see $log)"; tail -3 "$log"; return 1; }
  tail -1 "$log"
}
running=0
for line in "${todo[@]}"; do
  run_one "$line" &
  running=$((running + 1))
  if [ "$running" -ge "$JOBS" ]; then
    wait -n || fail=1
    running=$((running - 1)) finished=$((finished + 1))
    progress "finished"
  fi
done
while [ "$running" -gt 0 ]; do
  wait -n || fail=1
  running=$((running - 1)) finished=$((finished + 1))
  progress "finished"
done
[ "$fail" = 0 ] || { echo "experiments: some runs failed (their rows are missing; rerun to retry them)"; exit 1; }
[ "$LIMIT" -gt 0 ] && { echo "experiments: stopped after --limit $LIMIT runs"; exit 0; }

# ---- routing cost against N, and the report
if want core || [ -z "$ONLY" ]; then
  if [ ! -s "$OUT/routing_cost.md" ] && [ -x build/bench/routing_cost ]; then
    OMP_NUM_THREADS=$THREADS OMP_WAIT_POLICY=passive build/bench/routing_cost $RC_ARGS > "$OUT/routing_cost.md" 2>&1 || true
  fi
  if [ ! -s "$OUT/speed.md" ]; then
    echo "experiments: training and generation speed, side by side ($OUT/speed.md)"
    OMP_NUM_THREADS=2 OMP_WAIT_POLICY=passive "$BIN" speed $SPEED_ARGS --md "$OUT/speed.md" > /dev/null
  fi
fi
rc_flag=()
[ -s "$OUT/routing_cost.md" ] && rc_flag=(--routing_cost "$OUT/routing_cost.md")
f_flag=()
[ -s "$FCSV" ] && f_flag=(--fault_csv "$FCSV")
t_flag=(--target "$TARGET")
[ -s "$CSV" ] && "$BIN" report --csv "$CSV" "${f_flag[@]}" "${rc_flag[@]}" "${t_flag[@]}" --md "$OUT/report.md" --svg_dir "$OUT"

# ---- quick mode: every column of every row is filled
if [ "$QUICK" = 1 ]; then
  for f in "$CSV" "$FCSV"; do
    awk -F, -v f="$f" 'NR == 1 { n = NF; next }
      NF != n { printf "%s line %d: %d fields, header has %d\n", f, NR, NF, n; bad = 1 }
      { for (i = 1; i <= NF; i++) if ($i == "") { printf "%s line %d: column %d empty\n", f, NR, i; bad = 1 } }
      END { if (NR < 2) { print f ": no rows"; bad = 1 } exit bad }' "$f"
  done
  cols=$("$BIN" columns | paste -sd, -)
  [ "$(head -1 "$CSV")" = "$cols" ] || { echo "quick: $CSV header differs from 'experiments columns'"; exit 1; }
  [ "$(grep -c '^| \(dense\|flat\|cluster\) |' "$OUT/speed.md")" = 3 ] || { echo "quick: $OUT/speed.md lacks its 3 rows"; exit 1; }
  for svg in val_loss_core.svg util_cv.svg routing_flops.svg; do
    [ -s "$OUT/$svg" ] || { echo "quick: $OUT/$svg not written"; exit 1; }
  done
  if [ "$QUICK_RESUME" = 1 ]; then
    [ "$skipped" = 3 ] || { echo "quick: the resumed sweep skipped $skipped runs, expected the 3 finished ones"; exit 1; }
    dups=$(tail -q -n +2 "$CSV" "$FCSV" | cut -d, -f1 | sort | uniq -d)
    [ -z "$dups" ] || { echo "quick: runs in the CSV twice: $dups"; exit 1; }
    [ "$(tail -q -n +2 "$CSV" "$FCSV" | wc -l)" = "$total" ] || { echo "quick: expected $total rows"; exit 1; }
    echo "quick: the resumed sweep skipped the 3 finished runs and ran the other $((total - 3))"
  fi
  echo "quick: every column filled in $(($(wc -l < "$CSV") - 1)) runs and $(($(wc -l < "$FCSV") - 1)) fault runs; figures written"
fi
