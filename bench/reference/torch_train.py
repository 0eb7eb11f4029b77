"""Times PyTorch training of exactly our model (clustermoe.py) from one of train_bench's initial states, on the same
batches, with the same step as train_lm:

    out = model.forward(x, y); out.total_loss.backward(); clip_grad_norm_(1.0); AdamW step; zero_grad; after_step()

AdamW as our trainer sets it: lr 1e-3, betas (0.9, 0.99), eps 1e-8, weight decay 0.1 on matrices except embeddings
(model/optim.h default_no_decay). Modes: eager, or compile: torch.compile of the attention block and of the expert FFN
(dynamic shapes: the expert segments change size every step; their backward is AOT-compiled too). The router and
the MoE dispatch are data-dependent (top-k, bincount, per-expert segments, host reads) and stay eager. Compile time
(on a throw-away copy of the model, before the timed run) is reported separately (compile_s).

Prints one JSON line: ms per step (median of the timed steps) and its split, tokens/s, the loss of every step (to
compare with ours step by step), peak memory (RSS on CPU, torch.cuda.max_memory_allocated on CUDA).

    ~/venv-torch/bin/python bench/reference/torch_train.py --init DIR/cluster.safetensors [--mode eager|compile]
        [--device cpu|cuda] [--threads 2] [--warmup 2]
"""
import argparse
import json
import os
import resource
import statistics
import sys
import time

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from clustermoe import ClusterMoE  # noqa: E402
from safetensors_io import load  # noqa: E402


def rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--init", required=True, help="train_bench --save_init DIR/<config>.safetensors")
    ap.add_argument("--batches", help="default: <init without .safetensors>.batches.safetensors")
    ap.add_argument("--mode", choices=["eager", "compile"], default="eager")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    ap.add_argument("--warmup", type=int, default=None, help="default: the warm-up train_bench used")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    base_rss = rss_mib()

    bpath = a.batches or a.init[: -len(".safetensors")] + ".batches.safetensors"
    bt, bmeta = load(bpath)
    ids = bt["ids"].long()  # [n, B, T + 1]
    warmup = a.warmup if a.warmup is not None else int(bmeta.get("warmup", "2"))
    model = ClusterMoE.from_checkpoint(a.init, device=a.device)
    model.train(True)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.dim() < 2 or "emb" in name else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-3, betas=(0.9, 0.99), eps=1e-8, foreach=True)
    params = model.parameters()

    fwd = model.forward
    compile_s = 0.0
    if a.mode == "compile":
        # The whole forward under torch.compile breaks its graph at every host read of the router and the guard,
        # recompiles per layer and hits dynamo's recompile limit (measured: 200 s of warm-up for the dense model,
        # no gain); the attention block and the expert FFN have no data-dependent control flow and compile whole.
        model.compile()
        # Compile (and recompile for the shapes that show up) on a throw-away copy, so that the model itself sees
        # exactly the steps ours does (a forward updates the pending health counters and AC running scales).
        t0 = time.perf_counter()
        scratch = ClusterMoE.from_checkpoint(a.init, device=a.device)
        scratch.attention_fn, scratch.expert_fn = model.attention_fn, model.expert_fn
        for i in range(min(3, ids.shape[0])):
            scratch.forward(ids[i, :, :-1].to(dev), ids[i, :, 1:].to(dev))["total_loss"].backward()
        compile_s = time.perf_counter() - t0

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    warm_s = 0.0
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    steps, f_ms, b_ms, o_ms, cpu_ms, losses = [], [], [], [], [], []
    for i in range(ids.shape[0]):
        x = ids[i, :, :-1].to(dev)
        y = ids[i, :, 1:].to(dev)
        c0 = time.process_time()  # process CPU time, all threads (as train_bench's CPU ms/step)
        t0 = time.perf_counter()
        out = fwd(x, y)
        loss = float(out["loss"].detach())  # host read: the forward is done
        t1 = time.perf_counter()
        out["total_loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        sync()
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.after_step()
        sync()
        t3 = time.perf_counter()
        c3 = time.process_time()
        losses.append(loss)
        if i < warmup:
            warm_s += t3 - t0
            continue
        steps.append((t3 - t0) * 1e3)
        cpu_ms.append((c3 - c0) * 1e3)
        f_ms.append((t1 - t0) * 1e3)
        b_ms.append((t2 - t1) * 1e3)
        o_ms.append((t3 - t2) * 1e3)
    B, T = ids.shape[1], ids.shape[2] - 1
    ms = statistics.median(steps)
    peak = torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else rss_mib()
    print(json.dumps(dict(
        mode=a.mode, device=a.device, threads=a.threads, torch=torch.__version__, B=B, T=T, ms_step=ms,
        ms_fwd=statistics.median(f_ms), ms_bwd=statistics.median(b_ms), ms_opt=statistics.median(o_ms),
        cpu_ms_step=statistics.median(cpu_ms), cpu_step_ms=cpu_ms,
        tokens_per_s=B * T / (ms / 1e3), peak_mib=peak, base_rss_mib=base_rss, compile_s=compile_s, warmup_s=warm_s,
        samples=len(steps), step_ms=steps, losses=losses)))


if __name__ == "__main__":
    main()
