"""Side-by-side training throughput: our train_bench against PyTorch (eager, and torch.compile of the attention
block and the expert FFN) on exactly the same model, initial state and batches, in one run.

Per round and configuration, interleaved so that a shared machine's slow phases hit every contender alike:
  ours      build/bench/train_bench --configs <c> --rounds 1 --json (round 0 also writes the initial state and the
            batches with --save_init)
  eager     torch_train.py --mode eager  from that initial state on those batches
  compile   torch_train.py --mode compile
ms/step is the median over the timed steps of all rounds; the ratio is PyTorch's ms/step over ours (> 1: we are
faster). The same ratio in process CPU time (all threads) is printed too: on a machine shared with other jobs it is
the steadier one (it counts work, not the time the scheduler gave to others; it does not see parallel efficiency). Because both sides start from the same weights and see the same batches, their losses must agree step by
step: the largest difference is printed (an end-to-end check of forward, backward, clipping, AdamW and after_step).

    OMP_WAIT_POLICY=passive ~/venv-torch/bin/python bench/reference/compare_train.py [--rounds 2] [--steps 8]
        [--configs dense,flat,...] [--modes eager,compile] [--device cpu|cuda] [--bin build/bench/train_bench]
"""
import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIGS = ["dense", "flat", "cluster", "tree", "ac", "ac_cluster"]


def run_json(cmd, env):
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    lines = [l for l in p.stdout.splitlines() if l.startswith("{")]
    if p.returncode != 0 or not lines:
        return {"error": (p.stderr.strip().splitlines() or ["exit %d" % p.returncode])[-1]}
    return json.loads(lines[-1])


def git_commit():
    try:
        c = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True).stdout.strip()
        return c + ("+dirty" if dirty else "")
    except OSError:
        return "?"


def cpu_name():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default="build/bench/train_bench")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--modes", default="eager,compile")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", default=None, help="cpu|gpu (default: cpu on cpu, gpu on cuda)")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 2)))
    ap.add_argument("--out", default=None, help="where initial states and batches go (default: a temp dir)")
    a = ap.parse_args()
    configs, modes = a.configs.split(","), [m for m in a.modes.split(",") if m]
    out = a.out or tempfile.mkdtemp(prefix="cm_compare_")
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
    # Both sides sleep at OpenMP barriers (our programs set this for themselves; PyTorch's libgomp needs it in its
    # environment): spinning waiters on a shared machine made steps 10x slower and erratic.
    env.setdefault("OMP_WAIT_POLICY", "passive")
    size = a.size or ("gpu" if a.device == "cuda" else "cpu")
    load0 = os.getloadavg()
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")

    res = {c: {k: [] for k in ["ours"] + modes} for c in configs}
    for r in range(a.rounds):
        for c in configs:
            cmd = [a.bin, "--configs", c, "--rounds", "1", "--steps", str(a.steps), "--warmup", str(a.warmup),
                   "--device", a.device, "--size", size, "--json"]
            if r == 0:
                cmd += ["--save_init", out]
            res[c]["ours"].append(run_json(cmd, env))
            for m in modes:
                res[c][m].append(run_json([sys.executable, os.path.join(HERE, "torch_train.py"), "--init",
                                           os.path.join(out, c + ".safetensors"), "--mode", m, "--device", a.device,
                                           "--threads", str(a.threads), "--warmup", str(a.warmup)], env))
            print(f"round {r + 1}/{a.rounds} {c}: " + ", ".join(
                f"{k} {v[-1].get('ms_step', float('nan')):.1f} ms" if "error" not in v[-1] else f"{k} error"
                for k, v in res[c].items()), file=sys.stderr, flush=True)
    load1 = os.getloadavg()

    def agg(runs):
        ok = [x for x in runs if "error" not in x]
        if not ok:
            return {"error": runs[0]["error"] if runs else "no runs"}
        steps = [t for x in ok for t in x["step_ms"]]
        g = dict(ok[0])
        g["ms_step"] = statistics.median(steps)
        g["cpu_ms_step"] = statistics.median(t for x in ok for t in x["cpu_step_ms"])
        g["samples"] = len(steps)
        g["tokens_per_s"] = ok[0]["B"] * ok[0]["T"] / (g["ms_step"] / 1e3)
        g["peak_mib"] = max(x["peak_mib"] for x in ok)
        for k in ("ms_fwd", "ms_bwd", "ms_opt"):
            g[k] = statistics.median(x[k] for x in ok)
        return g

    torch_version = ""
    print(f"\nTraining throughput, ours vs PyTorch on the same model, initial state and batches")
    print(f"device: {a.device} ({cpu_name() if a.device == 'cpu' else 'cuda'}), {a.threads} threads, "
          f"OMP_WAIT_POLICY={env['OMP_WAIT_POLICY']}; date {started}; commit {git_commit()}")
    print(f"load average (1 min) {load0[0]:.1f} at start, {load1[0]:.1f} at end, on {os.cpu_count()} cores")
    print(f"{a.rounds} rounds x ({a.warmup} warm-up + {a.steps} timed steps) per contender, interleaved; "
          f"size {size}")
    print(f"command: {' '.join(sys.argv)}\n")
    hdr = "| config | ours ms/step | " + " | ".join(f"torch {m} ms/step" for m in modes) + " | " + \
          " | ".join(f"{m} / ours" for m in modes) + " | ours CPU ms/step | " + \
          " | ".join(f"{m} / ours (CPU)" for m in modes) + " | ours tokens/s | peak MiB ours | " + \
          " | ".join(f"peak MiB {m} (runtime)" for m in modes) + " | max loss diff vs ours |"
    print(hdr)
    print("|" + "---|" * (hdr.count("|") - 1))
    for c in configs:
        o = agg(res[c]["ours"])
        t = {m: agg(res[c][m]) for m in modes}
        if "error" in o:
            print(f"| {c} | {o['error']} |")
            continue
        cells = [f"{o['ms_step']:.1f}"]
        cells += [f"{t[m]['ms_step']:.1f}" if "error" not in t[m] else "error" for m in modes]
        cells += [f"{t[m]['ms_step'] / o['ms_step']:.2f}" if "error" not in t[m] else "-" for m in modes]
        cells += [f"{o['cpu_ms_step']:.1f}"]
        cells += [f"{t[m]['cpu_ms_step'] / o['cpu_ms_step']:.2f}" if "error" not in t[m] else "-" for m in modes]
        cells += [f"{o['tokens_per_s']:.0f}", f"{o['peak_mib']:.0f}"]
        cells += [f"{t[m]['peak_mib']:.0f} ({t[m]['base_rss_mib']:.0f})" if "error" not in t[m] and a.device == "cpu"
                  else (f"{t[m]['peak_mib']:.0f}" if "error" not in t[m] else "-") for m in modes]
        diffs = []
        for m in modes:
            if "error" in t[m]:
                continue
            torch_version = t[m]["torch"]
            lo, lt = o["losses"], t[m]["losses"]
            diffs.append(max(abs(x - y) for x, y in zip(lo, lt)))
        cells.append(f"{max(diffs):.1e} ({len(o['losses'])} steps)" if diffs else "-")
        print(f"| {c} | " + " | ".join(cells) + " |")
    compile_s = {c: agg(res[c]["compile"]).get("compile_s") for c in configs} if "compile" in modes else {}
    print(f"\ntorch {torch_version}; ratios are PyTorch ms/step over ours (> 1: ours is faster). Peak memory: "
          f"process peak RSS on CPU (PyTorch's includes its imported runtime, in parentheses), allocator peak on CUDA.")
    if compile_s:
        print("torch.compile time before the timed run (s): " +
              ", ".join(f"{c} {v:.0f}" for c, v in compile_s.items() if v is not None))
    for c in configs:
        for k, runs in res[c].items():
            for x in runs:
                if "error" in x:
                    print(f"{c} {k}: {x['error']}")


if __name__ == "__main__":
    main()
