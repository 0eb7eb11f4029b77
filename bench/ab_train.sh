#!/usr/bin/env bash
# Before/after comparison of the CPU training step in one command: train_bench of an older commit against this
# tree's, run in turn (old, new, old, new, ...) so that a shared machine's slow phases hit both alike.
#
#   bench/ab_train.sh OLD [RUNS] [CONFIGS] [STEPS]
#     OLD      a commit (built here into /tmp/cm_ab_<commit>/ with `git archive`, once), a train_bench binary, or
#              env:NAME=VALUE: this tree's binary with that variable set (the switches that select an old path)
#     RUNS     runs per side (default 5); CONFIGS (default dense,flat,cluster); STEPS timed steps per run (default 8)
#   e.g. OMP_NUM_THREADS=2 bench/ab_train.sh 7deef59
#
# Each run is `train_bench --device cpu --configs CONFIGS --rounds 1 --steps STEPS --warmup 2 --json`. Printed per
# configuration: the medians over the runs of each run's median CPU ms/step (process CPU time, all threads: the
# steadier figure under load) and wall ms/step, the median of the new/old ratio taken within each pair of runs, and
# the median MoE / dense ratio (CPU time) of each side. The losses of both sides are compared step by step: same
# seed, same batches, so a change that keeps the arithmetic prints "losses identical".
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
old=${1:?usage: bench/ab_train.sh OLD [RUNS] [CONFIGS] [STEPS]}
runs=${2:-5}
configs=${3:-dense,flat,cluster}
steps=${4:-8}
new="$here/build/bench/train_bench"

old_env=()
if [[ $old == env:* ]]; then
  old_env=("${old#env:}")
  old=$new
elif [[ ! -x "$old" ]]; then
  rev=$(git -C "$here" rev-parse --short "$old^{commit}") || { echo "ab_train: '$old' is neither a binary nor a commit" >&2; exit 2; }
  dir=/tmp/cm_ab_$rev
  if [[ ! -x "$dir/build/bench/train_bench" ]]; then
    echo "ab_train: building train_bench of $rev in $dir" >&2
    mkdir -p "$dir"
    git -C "$here" archive "$rev" | tar -x -C "$dir"
    make -C "$dir" -j2 USE_CUDA=0 build/bench/train_bench >&2
  fi
  old="$dir/build/bench/train_bench"
fi
make -C "$here" -j2 USE_CUDA=0 build/bench/train_bench >&2

out=$(mktemp)
trap 'rm -f "$out"' EXIT
for ((r = 0; r < runs; ++r)); do
  for side in old new; do
    cmd=(env "${old_env[@]}" "$old")
    [[ $side == new ]] && cmd=("$new")
    "${cmd[@]}" --device cpu --configs "$configs" --rounds 1 --steps "$steps" --warmup 2 --json |
      sed -n "s/^{\"config\":\"\([a-z_]*\)\".*\"ms_step\":\([0-9.]*\),.*\"ms_opt\":\([0-9.]*\),.*\"cpu_ms_step\":\([0-9.]*\),.*\"losses\":\[\([^]]*\)\].*/$r $side \1 \4 \2 \5 \3/p" >>"$out"
  done
done

echo "train_bench before/after: $runs runs per side, in turn; configs $configs; $steps timed steps per run;" \
  "OMP_NUM_THREADS=${OMP_NUM_THREADS:-unset}"
echo "old: ${old_env[*]} $old"
echo "new: $new"
awk -v configs="$configs" '
  function median(a, n,    i, j, t) {
    for (i = 2; i <= n; ++i) for (j = i; j > 1 && a[j - 1] > a[j]; --j) { t = a[j]; a[j] = a[j - 1]; a[j - 1] = t }
    return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
  }
  { cpu[$1, $2, $3] = $4; wall[$1, $2, $3] = $5; loss[$1, $2, $3] = $6; opt[$1, $2, $3] = $7; if ($1 + 1 > runs) runs = $1 + 1 }
  END {
    nc = split(configs, cfg, ",")
    printf "| config | CPU ms old | CPU ms new | new/old (CPU) | wall ms old | wall ms new | new/old (wall) | opt+after wall ms old | new | MoE/dense CPU old | new | losses |\n"
    printf "|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    for (c = 1; c <= nc; ++c) {
      k = cfg[c]; same = 1
      for (s = 0; s < 2; ++s) { side = s ? "new" : "old"
        for (r = 0; r < runs; ++r) { a[r + 1] = cpu[r, side, k]; w[r + 1] = wall[r, side, k]; o[r + 1] = opt[r, side, k]
          d[r + 1] = cpu[r, side, k] / cpu[r, side, "dense"] }
        mc[side] = median(a, runs); mw[side] = median(w, runs); md[side] = median(d, runs); mo[side] = median(o, runs) }
      for (r = 0; r < runs; ++r) { a[r + 1] = cpu[r, "new", k] / cpu[r, "old", k]; w[r + 1] = wall[r, "new", k] / wall[r, "old", k]
        if (loss[r, "new", k] != loss[r, "old", k]) same = 0 }
      printf "| %s | %.1f | %.1f | %.3f | %.1f | %.1f | %.3f | %.1f | %.1f | %.3f | %.3f | %s |\n", k, mc["old"], mc["new"],
             median(a, runs), mw["old"], mw["new"], median(w, runs), mo["old"], mo["new"], md["old"], md["new"],
             same ? "identical" : "DIFFER"
    }
  }' "$out"
