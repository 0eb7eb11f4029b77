#!/usr/bin/env bash
# Crash safety of train_lm: SIGKILL a small run at random (seeded) moments, some of them inside checkpoint writes,
# resume it after each kill, and check that it ends exactly where an uninterrupted run ends.
#
#   tests/crash_test.sh [--kills N] [--seed S] [--steps N] [--keep] [--work DIR]
#
# Needs ./train_lm and ./sample (`make train_lm sample`). Runs from the repository root; offline (the corpus is
# data/tinyshakespeare.txt when present, else the fortunes, as train_lm chooses).
#
# What is checked:
#   - after every kill, every ckpt_*.safetensors left in out_dir loads (./sample restores the model from it);
#   - at the end: log.csv (all columns but the timings), routing.csv and the final checkpoint (every byte: weights,
#     AdamW moments, buffers, RNG streams, settings) equal those of the uninterrupted run, and no *.tmp is left.
# How kills hit the checkpoint writes: every step saves (--save_every 1) and the test hook CM_TEST_SAVE_PAUSE_MS
# (model/checkpoint.cpp) holds each save half-written for that many milliseconds. Odd-numbered kills wait until a
# ckpt_*.tmp exists and then strike within the pause; even-numbered kills strike after a random delay.
# Exit 0 when every check passes; 1 with a message naming the first failure.
set -euo pipefail
cd "$(dirname "$0")/.."

KILLS=20 SEED=1 STEPS=400 KEEP=0 WORK=""
while [ $# -gt 0 ]; do
  case "$1" in
    --kills) KILLS=$2; shift 2 ;;
    --seed) SEED=$2; shift 2 ;;
    --steps) STEPS=$2; shift 2 ;;
    --keep) KEEP=1; shift ;;
    --work) WORK=$2; shift 2 ;;
    *) echo "usage: $0 [--kills N] [--seed S] [--steps N] [--keep] [--work DIR]" >&2; exit 2 ;;
  esac
done
ROOT=$(pwd)
for b in train_lm sample; do [ -x "$ROOT/$b" ] || { echo "crash_test: ./$b not built (make $b)" >&2; exit 2; }; done
[ -n "$WORK" ] || WORK=$(mktemp -d "${TMPDIR:-/tmp}/cm_crash_XXXXXX")
mkdir -p "$WORK/ref" "$WORK/crash"
[ "$KEEP" = 1 ] || trap 'rm -rf "$WORK"' EXIT
RANDOM=$SEED  # bash's generator, seeded: the same kill schedule every time

DATA=()
[ -f data/tinyshakespeare.txt ] && DATA=(--data "$ROOT/data/tinyshakespeare.txt")
# A small model that still takes a few milliseconds per step; eval every 10 steps, so routing.csv has rows whose
# tallies span checkpoints. Both runs use the relative --out_dir out (from different working directories), so
# even the stored settings in the checkpoints are equal.
ARGS=("${DATA[@]}" --device cpu --out_dir out --max_steps "$STEPS" --d_model 32 --n_layers 2 --n_heads 2 --d_ff 64
      --num_clusters 2 --experts_per_cluster 2 --top_k_clusters 1 --top_k_experts 1 --seq_len 32 --batch_size 4
      --dropout 0.1 --eval_every 10 --eval_iters 2 --sample_every 0 --log_every 0 --save_every 1 --keep_last 3
      --warmup_steps 10)
export CM_TEST_SAVE_PAUSE_MS=${CM_TEST_SAVE_PAUSE_MS:-40}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

fail() { echo "crash_test: FAIL: $*" >&2; [ "$KEEP" = 1 ] && echo "crash_test: files kept in $WORK" >&2; exit 1; }

# ---- the uninterrupted run
t0=$(date +%s.%N)
(cd "$WORK/ref" && "$ROOT/train_lm" "${ARGS[@]}" > train.out 2>&1) || fail "uninterrupted run failed: $WORK/ref/train.out"
ref_s=$(echo "$(date +%s.%N) - $t0" | bc)
echo "crash_test: uninterrupted run: $STEPS steps in ${ref_s} s"

# ---- the killed run
cd "$WORK/crash"
checkpoints() { ls out/ckpt_*.safetensors 2>/dev/null || true; }
start() {  # a fresh run while no checkpoint exists, else --resume (settings come from the checkpoint)
  if [ -n "$(checkpoints)" ]; then "$ROOT/train_lm" --out_dir out --resume >> train.out 2>&1 &
  else "$ROOT/train_lm" "${ARGS[@]}" >> train.out 2>&1 & fi
  PID=$!
}
in_write=0 finished_early=0
for ((k = 1; k <= KILLS; ++k)); do
  touch marker  # temp files newer than this one were written by this process
  start
  if ((k % 2 == 1)); then
    # Aim at a checkpoint write: wait for this process's first temp file, then strike within the pause.
    for ((i = 0; i < 4000; ++i)); do
      [ -n "$(find out -name 'ckpt_*.tmp' -newer marker 2>/dev/null)" ] && break
      kill -0 "$PID" 2>/dev/null || break
      sleep 0.005
    done
    sleep "0.0$((RANDOM % 3))$((RANDOM % 10))"
  else
    sleep "0.$((RANDOM % 10))$((RANDOM % 10))$((RANDOM % 10))"
  fi
  if kill -KILL "$PID" 2>/dev/null; then
    wait "$PID" 2>/dev/null || true
  else
    wait "$PID" || fail "run $k exited with an error before its kill (see $WORK/crash/train.out)"
    finished_early=1
  fi
  torn=$(find out -name 'ckpt_*.tmp' -newer marker 2>/dev/null | wc -l)
  ((torn > 0)) && in_write=$((in_write + 1))
  step=$(basename "$(checkpoints | tail -n 1)" 2>/dev/null || echo none)
  echo "crash_test: kill $k/$KILLS: newest checkpoint $step$( ((torn > 0)) && echo ', inside a checkpoint write')"
  for c in $(checkpoints); do
    "$ROOT/sample" --ckpt "$c" --device cpu --max_new_tokens 1 > /dev/null 2> sample.err ||
      fail "after kill $k: $c does not load: $(cat sample.err)"
  done
  ((finished_early)) && fail "the run finished before kill $k: use more --steps"
done
# ---- to the end, uninterrupted
"$ROOT/train_lm" --out_dir out --resume >> train.out 2>&1 || fail "the final resume failed (see $WORK/crash/train.out)"

# ---- compare
((in_write > 0)) || fail "no kill landed inside a checkpoint write"
last=$(printf 'out/ckpt_%08d.safetensors' "$STEPS")
[ -f "$last" ] || fail "no final checkpoint $last"
cmp -s "$last" "$WORK/ref/$last" || fail "the final checkpoint differs from the uninterrupted run's"
cols() { cut -d, -f1-7 "$1"; }  # step,kind,loss,val_loss,aux,lr,grad_norm (ms and tok/s are timings)
diff <(cols out/log.csv) <(cols "$WORK/ref/out/log.csv") > log.diff || fail "log.csv differs: $(head -n 6 log.diff)"
cmp -s out/routing.csv "$WORK/ref/out/routing.csv" || fail "routing.csv differs"
[ -z "$(ls out/*.tmp 2>/dev/null)" ] || fail "temp files left: $(ls out/*.tmp)"
diff <(ls "$WORK/ref/out") <(ls out) > /dev/null || fail "out_dir holds other files: $(ls out)"
echo "crash_test: OK: $KILLS kills ($in_write inside a checkpoint write), final checkpoint, log.csv and routing.csv" \
  "equal the uninterrupted run's"
