"""Checks our C++ model against the PyTorch reference on one batch: logits, every loss term, and the gradient of
total_loss with respect to every parameter.

Input: directories written by build/bench/dump_batch (model.safetensors = our checkpoint, batch.safetensors = the
batch and our results). The reference runs twice on the same weights: in float64 (the yardstick) and in float32
(what PyTorch itself gets in our precision). Each of our tensors is compared with the float64 result:

    err = |ours - ref64|        pass when err <= atol + rtol * |ref64| element-wise

with, per kind of tensor, the tolerances below. PyTorch's own float32 run, against the same float64 result, stays
under a quarter of them on every case here, a train_lm checkpoint included (printed next to ours as "torch32"), so
a pass means "as close to the exact result as float32 PyTorch is". They still catch real slips: a layernorm eps of
2e-5 instead of 1e-5 fails by 80x, an AC clip at 11x instead of 10x the mean by 80x or more.
Routing decisions (rows per expert in every layer) must match exactly.

    ~/venv-torch/bin/python bench/reference/check_parity.py /tmp/parity/cluster [more dirs ...]
    ~/venv-torch/bin/python bench/reference/check_parity.py --all [--bin build/bench/dump_batch] [--out DIR]

--all writes and checks the standard cases (CASES below: every router, trained buffers, every option that changes
the math) and prints one summary table.
"""
import argparse
import os
import subprocess
import sys

import torch

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from clustermoe import ClusterMoE  # noqa: E402
from safetensors_io import load  # noqa: E402

# (atol, rtol) per kind. Gradients use atol relative to the tensor's largest reference value: a gradient's
# small entries are sums of many cancelling terms, whose float32 rounding is set by the large ones.
TOL = {
    "logits": (1e-5, 1e-4),
    "loss": (1e-6, 1e-5),
    "grad": (1e-4, 1e-3),  # atol x max|ref| of that tensor
}
SCALARS = ["loss", "load_balance_loss", "z_loss", "diversity_loss", "aux_loss", "total_loss"]


def run_reference(ckpt, batch, dtype, training):
    torch.manual_seed(0)
    m = ClusterMoE.from_checkpoint(ckpt, dtype=dtype)
    m.train(training)
    out = m.forward(batch["ids"], batch["targets"])
    out["total_loss"].backward()
    grads = {n: (p.grad if p.grad is not None else None) for n, p in m.named_parameters()}
    return m, out, grads


def check(d):
    ckpt, bpath = os.path.join(d, "model.safetensors"), os.path.join(d, "batch.safetensors")
    batch, meta = load(bpath)
    training = meta.get("training", "true") == "true"
    m64, o64, g64 = run_reference(ckpt, batch, torch.float64, training)
    _, o32, g32 = run_reference(ckpt, batch, torch.float32, training)
    cfg = m64.cfg
    rows = []  # (kind, name, ours_err, ours_ratio, torch32_err, torch32_ratio)

    def cmp(kind, name, ours, t32, ref, atol, rtol):
        ref = ref.detach().double()
        tol = atol + rtol * ref.abs()
        e_o = (ours.double() - ref).abs()
        e_t = (t32.detach().double() - ref).abs()
        rows.append((kind, name, float(e_o.max()), float((e_o / tol).max()), float(e_t.max()), float((e_t / tol).max())))

    cmp("logits", "logits", batch["logits"], o32["logits"], o64["logits"], *TOL["logits"])
    for s in SCALARS:
        cmp("loss", s, batch[s].reshape(()), o32[s], o64[s], *TOL["loss"])
    missing_ours, missing_ref, nonzero_missing = [], [], []
    for name, g in g64.items():
        key = "grad." + name
        if key not in batch:
            # no gradient on our side (an expert no token reached, or a guarded segment): the reference must agree
            if g is not None and float(g.abs().max()) > 0:
                nonzero_missing.append(name)
            missing_ours.append(name)
            continue
        if g is None:
            missing_ref.append(name)
            g = torch.zeros_like(batch[key], dtype=torch.float64)
        gt = g32[name] if g32[name] is not None else torch.zeros_like(g)
        scale = float(g.abs().max()) or 1.0
        cmp("grad", name, batch[key], gt, g, TOL["grad"][0] * scale, TOL["grad"][1])
    route_ok = True
    for l, st in enumerate(o64["layers"]):
        key = f"layer.{l}.expert_rows"
        if "expert_rows" in st and key in batch:
            route_ok &= torch.equal(st["expert_rows"].to(torch.int32), batch[key])
    for l, st in enumerate(o32["layers"]):
        key = f"layer.{l}.expert_rows"
        if "expert_rows" in st and key in batch:
            route_ok &= torch.equal(st["expert_rows"].to(torch.int32), batch[key])

    B, T = batch["ids"].shape
    print(f"\n== {d}: router {cfg.router}, tree {cfg.branching()} top {cfg.top_k()}, C={cfg.d_model} L={cfg.n_layers} "
          f"expert={cfg.expert} norm={cfg.norm}, batch [{B}, {T}], {'training' if training else 'eval'} mode")
    worst = {}
    for kind, name, eo, ro, et, rt in rows:
        w = worst.setdefault(kind, [0, 0, "", 0, 0, 0])
        if ro > w[1]:
            w[1], w[2] = ro, name
        w[0] = max(w[0], eo)
        w[3] = max(w[3], et)
        w[4] = max(w[4], rt)
        w[5] += 1
    ok = route_ok and not nonzero_missing and not missing_ref
    print(f"{'kind':8} {'n':>4} {'max |ours-ref64|':>17} {'max err/tol':>11} {'torch32 |err|':>14} {'torch32 err/tol':>15}  worst")
    for kind, (eo, ro, name, et, rt, n) in worst.items():
        print(f"{kind:8} {n:4d} {eo:17.3e} {ro:11.3f} {et:14.3e} {rt:15.3f}  {name}")
        ok &= ro <= 1.0
    for s in SCALARS:
        print(f"   {s:18} ours {float(batch[s]):.9g}  ref64 {float(o64[s].detach()):.9g}")
    print(f"routing decisions (rows per expert, every layer) identical: {route_ok}")
    b = m64.buf
    n_rel = sum(int((v < 1).sum()) for k, v in b.items() if k.endswith(".reliability"))
    n_pruned = sum(int((v != 0).sum()) for k, v in b.items() if k.endswith(".pruned"))
    n_aux = sum(int((v != 0).sum()) for k, v in b.items() if k.endswith(".aux_bias"))
    n_ac = sum(int((v != 1).sum()) for k, v in b.items() if k.endswith(".ac_scale"))
    dropped = [round(float(st["dropped"]), 3) for st in o64["layers"] if "dropped" in st]
    print(f"state exercised: experts with reliability < 1: {n_rel}, pruned: {n_pruned}, aux-free biases != 0: "
          f"{n_aux}, running AC scales != 1: {n_ac}, dropped fraction per MoE layer: {dropped}")
    print(f"parameters without a gradient on our side: {len(missing_ours)} (reference: all zero: {not nonzero_missing}); "
          f"with ours but not the reference's: {len(missing_ref)}")
    print("PASS" if ok else "FAIL")
    return ok, worst, route_ok


# name -> dump_batch arguments. "trained": 20 AdamW steps first, so the buffers hold trained values (reliability
# below 1 for some experts, output-norm statistics that make the fault guard cut segments, usage, aux-free biases,
# AC running scales, pruned experts).
CASES = [
    ("dense", ["--config", "dense"]),
    ("flat", ["--config", "flat"]),
    ("cluster", ["--config", "cluster"]),
    ("tree", ["--config", "tree"]),
    ("ac", ["--config", "ac"]),
    ("ac_cluster", ["--config", "ac_cluster"]),
    ("cluster trained", ["--config", "cluster", "--train_steps", "20"]),
    ("tree trained", ["--config", "tree", "--train_steps", "20"]),
    ("ac trained, eval (running m)", ["--config", "ac", "--train_steps", "20", "--eval"]),
    ("ac_cluster trained, m = 1", ["--config", "ac_cluster", "--train_steps", "20", "--set", "ac_scaling=false"]),
    ("flat gelu rmsnorm bias untied T=0.7 adaptive",
     ["--config", "flat", "--set", "expert=gelu", "--set", "norm=rmsnorm", "--set", "bias=true", "--set",
      "tie_embeddings=false", "--set", "routing_temperature=0.7", "--set", "use_adaptive_routing=true"]),
    ("cluster capacity 1.0 (drops)", ["--config", "cluster", "--set", "capacity_factor=1.0"]),
    ("cluster top [2,2] no renorm", ["--config", "cluster", "--set", "top_k_clusters=2", "--set", "top_k_experts=2",
                                     "--set", "renormalize_gates=false"]),
    ("cluster aux-free bias trained", ["--config", "cluster", "--set", "aux_free_bias=true", "--set",
                                       "aux_free_bias_rate=0.01", "--train_steps", "20"]),
    ("flat pruning trained", ["--config", "flat", "--set", "enable_expert_pruning=true", "--set",
                              "pruning_window=3", "--set", "pruning_threshold=0.05", "--train_steps", "20"]),
    ("cluster moe_every=2, no reliability", ["--config", "cluster", "--set", "moe_every=2", "--set",
                                             "use_reliability=false", "--train_steps", "5"]),
]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dirs", nargs="*", help="dump_batch output directories")
    ap.add_argument("--all", action="store_true", help="write and check the standard cases")
    ap.add_argument("--bin", default="build/bench/dump_batch")
    ap.add_argument("--out", default="/tmp/cm_parity")
    ap.add_argument("--extra", nargs="*", default=[], help="NAME=CKPT: also check a train_lm checkpoint")
    a = ap.parse_args()
    cases = [(d, d) for d in a.dirs]
    if a.all:
        for name, args in CASES + [(e.split("=", 1)[0], ["--ckpt", e.split("=", 1)[1]]) for e in a.extra]:
            d = os.path.join(a.out, name.replace(" ", "_").replace(",", "").replace("=", "").replace("[", "")
                             .replace("]", "").replace("(", "").replace(")", ""))
            subprocess.run([a.bin, "--out", d] + args, check=True, stdout=subprocess.DEVNULL)
            cases.append((name, d))
    if not cases:
        ap.print_help()
        return 2
    results = [(name, check(d)) for name, d in cases]
    print("\n| case | logits err/tol | losses err/tol | grads err/tol | max abs err logits / grads | "
          "torch fp32 err/tol (logits, grads) | routing identical | result |")
    print("|---|---|---|---|---|---|---|---|")
    for name, (ok, w, route_ok) in results:
        print(f"| {name} | {w['logits'][1]:.3f} | {w['loss'][1]:.3f} | {w['grad'][1]:.3f} | "
              f"{w['logits'][0]:.1e} / {w['grad'][0]:.1e} | {w['logits'][4]:.3f}, {w['grad'][4]:.3f} | "
              f"{'yes' if route_ok else 'NO'} | {'PASS' if ok else 'FAIL'} |")
    allok = all(r[1][0] for r in results)
    print("\nsummary:", "all PASS" if allok else "FAILURES")
    return 0 if allok else 1


if __name__ == "__main__":
    sys.exit(main())
