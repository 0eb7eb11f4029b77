"""ClusterMoE in PyTorch: a line-by-line reference of our C++ model (model/coe.cpp, model/moe.cpp, model/router.cpp,
model/layers.cpp), for checking our logits, losses and gradients and for timing PyTorch on the same model.

It loads our safetensors checkpoint (the parameter and buffer names of ClusterMoELM::named_parameters() and
named_buffers()) and reads the config from __metadata__["config"]. It does not reproduce our initialisation (a
checkpoint carries the weights) nor dropout's random stream (the benches run with dropout 0).

Semantics mirrored exactly (the trap for each is noted where it is implemented):
  - the routing tree: level by level, each (token, node) pair scores only its node's children; selection is the
    top k of the probabilities (+ aux-free bias), ties to the lower index, pruned children never selected; a leaf's
    gate is the product of conditionals along its path (gate_mode product), renormalised over the token's leaves
    when K > 1 (renorm_path) or over the last level's kept siblings (renorm_last); group_limited is not reproduced;
  - reliability: log of each child's reliability added to the logits (inner nodes: usage-weighted mean of their
    children), pruned experts -inf, load-balance targets proportional to reliability;
  - losses: load balance per level and parent (token-weighted), z-loss on the raw logits, sibling diversity; each
    the mean over levels times its weight, then the mean over MoE layers;
  - capacity (training, cf > 0): per expert the ceil(cf T K / N) highest-gate slots, ties to the earlier slot;
  - the fault guard: a segment with a non-finite or outlier row is replaced by a constant copy with those rows zeroed;
  - Adaptive Clustering: m from the previous MoE layer's top-1 labels on this batch (training) or the running m;
  - the adaptive sigmoid gate on the MoE output.
after_step() mirrors MoELayer::after_step() (reliability, statistics, usage, aux-free bias, pruning), so that a
timed PyTorch training step does the same work as ours.
"""
import math

import torch
import torch.nn.functional as F

# ---------------------------------------------------------------- config


def _bool(s):
    if s in ("1", "true"):
        return True
    if s in ("0", "false"):
        return False
    raise ValueError(f"expected true/false, got {s!r}")


def _ints(s):
    return [int(x) for x in s.split(",")] if s else []


_TYPES = {
    "d_model": int, "n_layers": int, "n_heads": int, "d_ff": int, "vocab_size": int, "seq_len": int, "norm": str,
    "bias": _bool, "tie_embeddings": _bool, "dropout": float, "init_std": float, "router": str, "num_clusters": int,
    "experts_per_cluster": int, "top_k_clusters": int, "top_k_experts": int, "tree_branching": _ints,
    "tree_top_k": _ints, "ac_levels": _ints, "ac_scaling": _bool, "routing_temperature": float,
    "gate_mode": str, "renormalize_gates": _bool, "moe_every": int, "expert": str, "capacity_factor": float,
    "load_balancing_weight": float, "router_z_loss_weight": float, "diversity_weight": float, "aux_free_bias": _bool,
    "aux_free_bias_rate": float, "use_reliability": _bool, "reliability_decay": float, "reliability_min": float,
    "reliability_outlier_factor": float, "use_adaptive_routing": _bool, "use_expert_selection_cache": _bool,
    "enable_expert_pruning": _bool, "pruning_threshold": float, "pruning_window": int, "seed": int,
}


class Config:
    """CoEConfig from the checkpoint's string map (model/config.h). Floats stay what the C++ float holds."""

    def __init__(self, m):
        self.gate_mode = "renorm_path"  # checkpoints from before gate_mode carry renormalize_gates instead
        for k, v in m.items():
            if k not in _TYPES:
                raise ValueError(f"unknown config key {k!r}")
            setattr(self, k, _TYPES[k](v))
        if "renormalize_gates" in m:
            self.gate_mode = "renorm_path" if self.renormalize_gates else "product"
        if self.gate_mode not in ("product", "renorm_path", "renorm_last"):
            # group_limited (one softmax over all leaves, model/router.cpp route_grouped) is not reproduced here
            raise NotImplementedError(f"gate_mode {self.gate_mode!r} is not implemented in the reference")

    def f32(self, name):  # the float32 value the C++ field holds, as a Python float
        return float(torch.tensor(getattr(self, name), dtype=torch.float32))

    def branching(self):
        r = self.router
        if r == "dense":
            return [1]
        if r in ("flat", "ac"):
            return [self.num_clusters * self.experts_per_cluster]
        if r == "cluster":
            return [self.num_clusters, self.experts_per_cluster]
        return list(self.tree_branching)

    def top_k(self):
        r = self.router
        if r == "dense":
            return [1]
        if r in ("flat", "ac"):
            return [self.top_k_clusters * self.top_k_experts]
        if r == "cluster":
            return [self.top_k_clusters, self.top_k_experts]
        return list(self.tree_top_k)

    def num_experts(self):
        return math.prod(self.branching())

    def experts_per_token(self):
        return math.prod(self.top_k())

    def is_moe_layer(self, l):
        return self.router != "dense" and self.moe_every > 0 and l % self.moe_every == 0

    def level_uses_ac(self, l):
        return self.router == "ac" or l in self.ac_levels


# ---------------------------------------------------------------- the pieces without data-dependent control flow
# Pure functions of tensors (no dict lookups, no host reads), so that torch.compile can take them whole (compile mode
# of torch_train.py); the router and the MoE dispatch stay eager.


def norm_fn(x, w, b, kind):
    if kind == "layernorm":
        return F.layer_norm(x, (x.shape[-1],), w, b, 1e-5)
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w  # rmsnorm (kernels/cpu/norm.cpp)


def attention_fn(x, n1w, n1b, qkv_w, qkv_b, proj_w, proj_b, n_heads: int, kind: str):
    """x + Attn(Norm(x)): qkv linear, causal softmax(q k^T / sqrt(D)) v, output projection (model/layers.cpp)."""
    B, T, C = x.shape
    H = n_heads
    D = C // H
    qkv = F.linear(norm_fn(x, n1w, n1b, kind), qkv_w, qkv_b)
    q, k, v = qkv.split(C, dim=2)
    q, k, v = (t.view(B, T, H, D).transpose(1, 2) for t in (q, k, v))
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(D))
    mask = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
    att = att.masked_fill(mask, float("-inf")).softmax(-1)
    y = (att @ v).transpose(1, 2).reshape(B, T, C)
    return x + F.linear(y, proj_w, proj_b)


def expert_fn(x, w1, b1, w3, b3, w2, b2, kind: str):
    """One expert d -> d_ff -> d: SwiGLU w2(silu(w1 x) * w3 x), or w2 gelu_tanh(w1 x)."""
    h1 = F.linear(x, w1, b1)
    if kind == "swiglu":
        h = F.silu(h1) * F.linear(x, w3, b3)
    else:
        h = F.gelu(h1, approximate="tanh")  # our gelu() defaults to the tanh form
    return F.linear(h, w2, b2)


def _f32_div(w, n):
    """w / (float)n as the C++ computes it in float (a scalar multiplier)."""
    return float(torch.tensor(w, dtype=torch.float32) / torch.tensor(float(n), dtype=torch.float32))


# ---------------------------------------------------------------- the model


class ClusterMoE:
    """Parameters and buffers in dicts keyed by our names; forward() is model/coe.cpp's run() (training or eval)."""

    def __init__(self, cfg, params, buffers, device="cpu", dtype=torch.float32):
        self.cfg = cfg
        self.device = torch.device(device)
        self.dtype = dtype
        self.p = {k: v.to(self.device, dtype).detach().requires_grad_(True) for k, v in params.items()}
        # Buffers stay float32 (the C++ keeps them in float); step is i32.
        self.buf = {k: v.to(self.device) for k, v in buffers.items()}
        self.training = True
        C = cfg.d_model
        self.layers = []
        for l in range(cfg.n_layers):
            moe = cfg.is_moe_layer(l)
            pre = f"blocks.{l}." + ("moe" if moe else "ffn")
            N = cfg.num_experts() if moe else 1
            self.layers.append(dict(moe=moe, pre=pre, N=N, K=cfg.experts_per_token() if moe else 1))
        br = cfg.branching()
        self.nodes = [math.prod(br[:l]) for l in range(len(br))]
        self.pending = [None] * cfg.n_layers
        self.C = C
        self.attention_fn, self.expert_fn = attention_fn, expert_fn

    def compile(self, **kw):
        """torch.compile the attention block and the expert FFN (the router and dispatch stay eager)."""
        self.attention_fn = torch.compile(attention_fn, **kw)
        self.expert_fn = torch.compile(expert_fn, dynamic=True, **kw)  # segment sizes change every step

    @classmethod
    def from_checkpoint(cls, path, device="cpu", dtype=torch.float32):
        from safetensors_io import load, load_config
        tensors, meta = load(path)
        cfg = Config(load_config(meta))
        names = set(parameter_names(cfg))
        params = {k: v for k, v in tensors.items() if k in names}
        missing = names - params.keys()
        if missing:
            raise ValueError(f"{path}: parameters missing: {sorted(missing)[:5]}")
        buffers = {k: v for k, v in tensors.items() if k not in names and not k.startswith("adamw.")}
        return cls(cfg, params, buffers, device, dtype)

    def parameters(self):
        return list(self.p.values())

    def named_parameters(self):
        return list(self.p.items())

    def train(self, on=True):
        self.training = on

    # ---- pieces
    def _linear(self, x, w, b=None):
        return F.linear(x, self.p[w], self.p.get(b) if b else None)

    def _norm(self, x, pre):
        return norm_fn(x, self.p[pre + ".weight"], self.p.get(pre + ".bias"), self.cfg.norm)

    def _block_attn(self, x, l):
        p, q = self.p, f"blocks.{l}."
        return self.attention_fn(x, p[q + "norm1.weight"], p.get(q + "norm1.bias"), p[q + "attn.qkv.weight"],
                                 p.get(q + "attn.qkv.bias"), p[q + "attn.proj.weight"], p.get(q + "attn.proj.bias"),
                                 self.cfg.n_heads, self.cfg.norm)

    def _expert(self, x, pre):
        p = self.p
        return self.expert_fn(x, p[pre + ".w1"], p.get(pre + ".b1"), p.get(pre + ".w3"), p.get(pre + ".b3"),
                              p[pre + ".w2"], p.get(pre + ".b2"), self.cfg.expert)

    def _expert_tensors(self, pre):
        return [self.p[pre + s] for s in (".w1", ".b1", ".w2", ".b2", ".w3", ".b3") if pre + s in self.p]

    # ---- reliability hierarchy (MoELayer::node_reliability / routing_bias)
    def _node_reliability(self, L):
        cfg = self.cfg
        r = self.buf[L["pre"] + ".reliability"].double()
        u = self.buf[L["pre"] + ".usage_ema"].double()
        br = cfg.branching()
        D = len(br)
        rel, use = [None] * D, [None] * D
        rel[D - 1], use[D - 1] = r, u
        for l in range(D - 2, -1, -1):
            b = br[l + 1]
            cu = use[l + 1].view(-1, b)
            cr = rel[l + 1].view(-1, b)
            su = cu.sum(1)
            sur = (cu * cr).sum(1)
            sr = cr.sum(1)
            # the C++ stores each level in float before the next level reads it
            rel[l] = torch.where(su > 0, sur / torch.where(su > 0, su, 1), sr / b).float().double()
            use[l] = su.float().double()
        return [x.float() for x in rel]

    def _routing_bias(self, L):
        cfg = self.cfg
        pruned = self.buf[L["pre"] + ".pruned"] != 0
        any_pruned = bool(pruned.any())
        if not cfg.use_reliability and not any_pruned:
            return None
        D = len(cfg.branching())
        bias = [None] * D
        if cfg.use_reliability:
            bias = [torch.log(r) for r in self._node_reliability(L)]  # log(1) == 0 exactly
        if any_pruned:
            last = bias[D - 1] if bias[D - 1] is not None else torch.zeros(L["N"], device=self.device)
            bias[D - 1] = last.masked_fill(pruned, float("-inf"))
        return bias

    # ---- AC feature weights (router.cpp ac_scales), no gradient, in double
    @staticmethod
    def ac_scales(h, labels, N):
        with torch.no_grad():
            hd = h.detach().double()
            T, C = hd.shape
            cnt = torch.bincount(labels, minlength=N).double()
            mean = torch.zeros(N, C, dtype=torch.float64, device=h.device).index_add_(0, labels, hd)
            has = cnt > 0
            mean = mean / torch.where(has, cnt, 1.0)[:, None]
            mad = torch.zeros_like(mean).index_add_(0, labels, (hd - mean[labels]).abs())
            w = torch.where(has[:, None], 1.0 / (mad / torch.where(has, cnt, 1.0)[:, None] + 1e-4), 0.0)
            labelled = int(has.sum())
            m = torch.ones(N, C, dtype=torch.float32, device=h.device)
            if labelled == 0:
                return m, has
            clip = 10.0 * w.sum() / (labelled * C)
            w = torch.minimum(w, clip)
            mq = w.sum(0) / labelled  # unlabelled rows are 0
            m = torch.where(has[:, None], (w / mq).float(), m)
            return m, has

    # ---- the router (TreeRouter::route)
    def _route(self, L, h, labels):
        cfg, dev = self.cfg, self.device
        pre = L["pre"] + ".router"
        br, tk = cfg.branching(), cfg.top_k()
        D, T, C, N = len(br), h.shape[0], self.C, L["N"]
        bias = self._routing_bias(L)
        ac_key = pre + ".ac_scale"
        h_ac = h
        if ac_key in self.buf and labels is not None and cfg.ac_scaling:
            if self.training:
                m, has = self.ac_scales(h, labels, N)
                run = self.buf[ac_key]  # running m for evaluation: EMA over training batches
                self.buf[ac_key] = torch.where(has[:, None], 0.9 * run + 0.1 * m, run)
            else:
                m = self.buf[ac_key]
            h_ac = h * m.to(h.dtype)[labels]
        node = torch.zeros(T, dtype=torch.long, device=dev)
        tok = torch.arange(T, device=dev)
        path, P = None, T
        lb_terms, z_terms, counts_all = [], [], []
        lb_w, z_w = cfg.f32("load_balancing_weight"), cfg.f32("router_z_loss_weight")
        for l in range(D):
            b, k, n = br[l], tk[l], self.nodes[l]
            W = self.p[f"{pre}.levels.{l}.weight"]
            if cfg.level_uses_ac(l):
                W = W / torch.sqrt((W * W).sum(-1, keepdim=True) + 1e-12)
            hin = h_ac if cfg.level_uses_ac(l) else h
            if n == 1:
                logits = hin @ W.t()  # [P, b]
            else:  # each pair against its own node's b router rows only: O(P b C)
                logits = torch.bmm(W.view(n, b, C)[node], hin[tok].unsqueeze(2)).squeeze(2)
            if z_w > 0:
                z_terms.append(torch.logsumexp(logits, -1).square().mean())
            s = logits * (1.0 / cfg.f32("routing_temperature")) if cfg.routing_temperature != 1.0 else logits
            lb = bias[l] if bias is not None else None
            if lb is not None and bool((lb != 0).any()):
                s = s + lb.view(n, b).to(s.dtype)[node]
            probs = s.softmax(-1)
            # selection, no gradient: top k of probs (+ aux-free bias); ties -> lower index (stable sort);
            # pruned children (bias -inf) are never candidates
            with torch.no_grad():
                score = probs.detach().float()
                if cfg.aux_free_bias:
                    score = score + self.buf[f"{pre}.levels.{l}.aux_bias"].view(n, b)[node]
                if lb is not None:
                    score = score.masked_fill(torch.isneginf(lb.view(n, b)[node]), float("-inf"))
                idx = torch.sort(score, dim=1, descending=True, stable=True).indices[:, :k]
                counts = torch.bincount((node[:, None] * b + idx).reshape(-1), minlength=n * b)
                counts_all.append(counts)
            sel = probs.gather(1, idx)  # [P, k]
            if cfg.gate_mode == "renorm_last" and l == D - 1 and k > 1:
                sel = sel / sel.sum(1, keepdim=True)
            if lb_w > 0:
                with torch.no_grad():  # coef = f / q: f = count / (pairs at node * k), q from reliability
                    pairs_at = torch.bincount(node, minlength=n).double()
                    rho = torch.exp(lb.double()).view(n, b) if lb is not None else torch.ones(n, b, dtype=torch.float64, device=dev)
                    rsum = rho.sum(1, keepdim=True)
                    coef = counts.view(n, b).double() / (pairs_at[:, None] * k) * (rsum / rho)
                    coef = torch.where((rho > 0) & (pairs_at[:, None] > 0), coef, 0.0).float()
                if n == 1:
                    psum = probs.sum(0).view(1, b)
                else:
                    psum = torch.zeros(n, b, dtype=probs.dtype, device=dev).index_add(0, node, probs)
                lb_terms.append((psum * coef.to(probs.dtype)).sum() * _f32_div(1.0, P))
            path = sel.reshape(P * k) if l == 0 else (path.view(P, 1) * sel).reshape(P * k)
            node = (node[:, None] * b + idx).reshape(-1)
            tok = tok.repeat_interleave(k)
            P *= k
        K = P // T
        gate = path
        if cfg.gate_mode == "renorm_path" and K > 1:
            g = path.view(T, K)
            gate = (g / g.sum(1, keepdim=True)).reshape(P)

        def mean_of(xs, w):
            acc = xs[0]
            for x in xs[1:]:
                acc = acc + x
            return acc * _f32_div(w, len(xs))

        out = dict(expert=node, gate=gate, counts=counts_all)
        out["lb"] = mean_of(lb_terms, lb_w) if lb_terms else None
        out["z"] = mean_of(z_terms, z_w) if z_terms else None
        div_w = cfg.f32("diversity_weight")
        out["div"] = None
        if div_w > 0:
            terms = []
            for l in range(D):
                b, n = br[l], self.nodes[l]
                if b < 2:
                    continue
                W = self.p[f"{pre}.levels.{l}.weight"]
                Wn = (W / torch.sqrt((W * W).sum(-1, keepdim=True) + 1e-12)).view(n, b, C)
                G = Wn @ Wn.transpose(1, 2)  # [n, b, b] cosine similarities of siblings
                off = 1.0 - torch.eye(b, dtype=G.dtype, device=dev)
                terms.append((G.square() * off).sum() * _f32_div(1.0, n * b * (b - 1)))
            if terms:
                out["div"] = mean_of(terms, div_w)
        return out

    # ---- fault guard (MoELayer::guard): returns y, or a constant copy with the bad rows zeroed
    def _guard(self, L, e, y):
        cfg = self.cfg
        with torch.no_grad():
            norm = y.detach().double().square().sum(1).sqrt()
            ema = float(self.buf[L["pre"] + ".norm_ema"][e])
            finite = torch.isfinite(norm)
            outlier = finite & (norm > cfg.f32("reliability_outlier_factor") * ema) if ema > 0 else torch.zeros_like(finite)
            bad = ~finite | outlier
            if self.training:
                pd = self.pending_layer(L)
                nb = int(bad.sum())
                pd["rows"][e] += y.shape[0]
                pd["bad"][e] += nb
                pd["good"][e] += y.shape[0] - nb
                pd["norm"][e] += float(norm[~bad].sum())
        if not cfg.use_reliability or not bool(bad.any()):
            return y
        return y.detach().masked_fill(bad[:, None], 0.0)

    def pending_layer(self, L):
        i = self.layers.index(L)
        if self.pending[i] is None:
            N = L["N"]
            self.pending[i] = dict(routed=[0] * N, rows=[0] * N, bad=[0] * N, good=[0] * N, norm=[0.0] * N,
                                   level_counts=None)
        return self.pending[i]

    # ---- the FFN / MoE layer (MoELayer::forward)
    def _ffn(self, L, x, labels):
        cfg, dev = self.cfg, self.device
        T = x.shape[0]
        if not L["moe"]:
            y = self._guard(L, 0, self._expert(x, L["pre"]))
            if self.training:
                self.pending_layer(L)["routed"][0] += T
            return y, None, {}
        N, K = L["N"], L["K"]
        rt = self._route(L, x, labels)
        expert, gate = rt["expert"], rt["gate"]
        S0 = T * K
        top1 = expert.view(T, K).gather(1, gate.detach().view(T, K).argmax(1, keepdim=True)).view(T)  # first max
        routed = torch.bincount(expert, minlength=N)
        if self.training:
            pd = self.pending_layer(L)
            for e, c in enumerate(routed.tolist()):
                pd["routed"][e] += c
            if pd["level_counts"] is None:
                pd["level_counts"] = [c.clone() for c in rt["counts"]]
            else:
                for a, c in zip(pd["level_counts"], rt["counts"]):
                    a += c
        keep = torch.ones(S0, dtype=torch.bool, device=dev)
        dropped = 0
        cf = cfg.f32("capacity_factor")
        if self.training and cf > 0:
            cap = math.ceil(cf * S0 / N)  # in double, as the C++
            gv = gate.detach().float()
            for e in range(N):
                slots = (expert == e).nonzero().view(-1)  # slot order
                if slots.numel() <= cap:
                    continue
                order = torch.sort(gv[slots], descending=True, stable=True).indices  # ties keep the earlier slot
                keep[slots[order[cap:]]] = False
                dropped += slots.numel() - cap
        kept = keep.nonzero().view(-1)
        order = torch.sort(expert[kept], stable=True).indices  # counting sort by expert (stable)
        slot = kept[order]
        token = torch.div(slot, K, rounding_mode="floor")
        rows = torch.bincount(expert[slot], minlength=N)
        stats = dict(expert_rows=rows, dropped=dropped / S0 if S0 else 0.0)
        losses = dict(lb=rt["lb"], z=rt["z"], div=rt["div"])
        if slot.numel() == 0:
            return torch.zeros(T, self.C, dtype=x.dtype, device=dev), top1, dict(losses, **stats)
        xs = x[token]  # [S, C] expert-contiguous
        parts, a = [], 0
        for e, n in enumerate(rows.tolist()):
            if n == 0:
                continue
            parts.append(self._guard(L, e, self._expert(xs[a:a + n], f"{L['pre']}.experts.{e}")))
            a += n
        ys = parts[0] if len(parts) == 1 else torch.cat(parts, 0)
        y = torch.zeros(T, self.C, dtype=x.dtype, device=dev).index_add(0, token, ys * gate[slot][:, None])
        if L["pre"] + ".gate.weight" in self.p:
            y = y * torch.sigmoid(self._linear(x, L["pre"] + ".gate.weight", L["pre"] + ".gate.bias"))
        return y, top1, dict(losses, **stats)

    # ---- the model (ClusterMoELM::run)
    def forward(self, ids, targets=None):
        cfg = self.cfg
        B, T = ids.shape
        C, V = cfg.d_model, cfg.vocab_size
        ids = ids.long().to(self.device)
        x = self.p["tok_emb.weight"][ids] + self.p["pos_emb.weight"][:T]
        labels = None
        lb, z, dv, stats = [], [], [], []
        for l, L in enumerate(self.layers):
            x = self._block_attn(x, l)
            h = self._norm(x, f"blocks.{l}.norm2").reshape(B * T, C)
            y, top1, st = self._ffn(L, h, labels)
            x = x + y.view(B, T, C)
            if L["moe"]:
                labels = top1
                for name, acc in (("lb", lb), ("z", z), ("div", dv)):
                    if st[name] is not None:
                        acc.append(st[name])
            stats.append(st)
        x = self._norm(x, "norm_f")
        head = self.p["lm_head.weight"] if "lm_head.weight" in self.p else self.p["tok_emb.weight"]
        logits = x @ head.t()

        def mean_terms(xs):
            if not xs:
                return torch.zeros((), dtype=self.dtype, device=self.device)
            acc = xs[0]
            for t in xs[1:]:
                acc = acc + t
            return acc if len(xs) == 1 else acc * _f32_div(1.0, len(xs))

        out = dict(logits=logits, load_balance_loss=mean_terms(lb), z_loss=mean_terms(z),
                   diversity_loss=mean_terms(dv), layers=stats)
        out["aux_loss"] = out["load_balance_loss"] + out["z_loss"] + out["diversity_loss"]
        if targets is not None:
            out["loss"] = F.cross_entropy(logits.view(B * T, V), targets.long().to(self.device).reshape(B * T))
            out["total_loss"] = out["loss"] + out["aux_loss"]
        return out

    # ---- after an optimizer step (MoELayer::after_step for every layer, then step += 1)
    @torch.no_grad()
    def after_step(self):
        cfg = self.cfg
        decay, factor = cfg.f32("reliability_decay"), cfg.f32("reliability_outlier_factor")
        for i, L in enumerate(self.layers):
            pd = self.pending_layer(L)
            pre, N = L["pre"], L["N"]
            rel, ema = self.buf[pre + ".reliability"], self.buf[pre + ".norm_ema"]
            wema, use = self.buf[pre + ".wnorm_ema"], self.buf[pre + ".usage_ema"]
            pruned = self.buf[pre + ".pruned"]
            total = sum(pd["routed"])
            ep = [f"{pre}.experts.{e}" if L["moe"] else pre for e in range(N)]
            # one pass over every expert's weights and gradients: norms and finiteness
            wn = torch.stack([torch.linalg.vector_norm(torch.cat([t.detach().double().reshape(-1)
                                                                    for t in self._expert_tensors(q)]))
                              for q in ep]).tolist()
            gok = [all(t.grad is None or bool(torch.isfinite(t.grad).all()) for t in self._expert_tensors(q))
                   for q in ep] if cfg.use_reliability else [True] * N
            prl = pruned.tolist()
            for e in range(N):
                if prl[e]:
                    continue
                w = float(wema[e])
                ok = math.isfinite(wn[e]) and (w <= 0 or (wn[e] <= factor * w and wn[e] >= w / factor))
                if ok:
                    wema[e] = decay * w + (1 - decay) * wn[e] if w > 0 else wn[e]
                if pd["good"][e] > 0 and pd["bad"][e] == 0:
                    mean = pd["norm"][e] / pd["good"][e]
                    ema[e] = decay * float(ema[e]) + (1 - decay) * mean if float(ema[e]) > 0 else mean
                if not cfg.use_reliability:
                    continue
                if not ok or not gok[e]:
                    health = 0.0
                elif pd["rows"][e] > 0:
                    health = 1.0 - pd["bad"][e] / pd["rows"][e]
                else:
                    continue
                rel[e] = min(max(decay * float(rel[e]) + (1 - decay) * health, cfg.f32("reliability_min")), 1.0)
            if total > 0:
                use.copy_(decay * use + (1 - decay) * torch.tensor(pd["routed"], dtype=torch.float32,
                                                                   device=use.device) / total)
            if L["moe"] and cfg.aux_free_bias and pd["level_counts"] is not None:
                for l, (b, c) in enumerate(zip(cfg.branching(), pd["level_counts"])):
                    load = c.view(-1, b).double()
                    d = load.mean(1, keepdim=True) - load
                    self.buf[f"{pre}.router.levels.{l}.aux_bias"] += cfg.f32("aux_free_bias_rate") * torch.sign(d).float().view(-1)
            if L["moe"] and cfg.enable_expert_pruning and total > 0:
                low = self.buf[pre + ".low_steps"]
                b, k = cfg.branching()[-1], cfg.top_k()[-1]
                for e in range(N):
                    if pruned[e] != 0:
                        continue
                    is_low = pd["routed"][e] / total < cfg.f32("pruning_threshold") or (
                        cfg.use_reliability and float(rel[e]) < 0.1)
                    low[e] = low[e] + 1 if is_low else 0
                    parent = e // b
                    active = int((pruned[parent * b:(parent + 1) * b] == 0).sum())
                    if low[e] >= cfg.pruning_window and active - 1 >= k:
                        pruned[e] = 1
            self.pending[i] = None
        if "step" in self.buf:
            self.buf["step"] += 1


def parameter_names(cfg):
    """ClusterMoELM::named_parameters() names, in order."""
    names = ["tok_emb.weight", "pos_emb.weight"]
    bias = cfg.bias
    for l in range(cfg.n_layers):
        p = f"blocks.{l}"
        ln = cfg.norm == "layernorm"
        names += [f"{p}.norm1.weight"] + ([f"{p}.norm1.bias"] if ln else [])
        names += [f"{p}.attn.qkv.weight"] + ([f"{p}.attn.qkv.bias"] if bias else [])
        names += [f"{p}.attn.proj.weight"] + ([f"{p}.attn.proj.bias"] if bias else [])
        names += [f"{p}.norm2.weight"] + ([f"{p}.norm2.bias"] if ln else [])
        moe = cfg.is_moe_layer(l)
        pre = p + (".moe" if moe else ".ffn")
        experts = [pre]
        if moe:
            names += [f"{pre}.router.levels.{i}.weight" for i in range(len(cfg.branching()))]
            experts = [f"{pre}.experts.{e}" for e in range(cfg.num_experts())]
        for q in experts:
            for w, b in (("w1", "b1"), ("w2", "b2"), ("w3", "b3")):
                if w == "w3" and cfg.expert != "swiglu":
                    continue
                names.append(f"{q}.{w}")
                if bias:
                    names.append(f"{q}.{b}")
        if moe and cfg.use_adaptive_routing:
            names += [f"{pre}.gate.weight", f"{pre}.gate.bias"]
    names.append("norm_f.weight")
    if cfg.norm == "layernorm":
        names.append("norm_f.bias")
    if not cfg.tie_embeddings:
        names.append("lm_head.weight")
    return names
