// The model's building blocks: Linear, Norm (LayerNorm / RMSNorm), causal multi-head attention with an optional
// KV cache, and the expert FFN (SwiGLU or GELU). Each is a small struct of parameter tensors with a forward built
// from autograd ops (so backward comes for free) and a collect() that names its parameters PyTorch-style.
// Letters: B batch, T tokens, C d_model, F d_ff, H heads, D head size, n rows of one expert's segment.
#pragma once
#include <string>
#include <utility>
#include <vector>

#include "autograd/ops.h"
#include "model/config.h"

namespace cm {

using NamedParams = std::vector<std::pair<std::string, Tensor>>;

// N(0, std) parameter with requires_grad, drawn from gen.
Tensor normal_param(const Shape& shape, float std, Generator& gen);
Tensor const_param(const Shape& shape, float value);

struct Linear {
  Tensor w;  // [out, in]
  Tensor b;  // [out] or undefined
  Linear() = default;
  Linear(int64_t in, int64_t out, bool bias, float std, Generator& gen);
  Tensor forward(const Tensor& x) const { return linear(x, w, b); }  // [..., in] -> [..., out]
  void collect(const std::string& prefix, NamedParams& out) const;
  int64_t numel() const { return w.numel() + (b.defined() ? b.numel() : 0); }
};

struct Norm {
  NormKind kind = NormKind::LayerNorm;
  Tensor w;  // [C]
  Tensor b;  // [C]; LayerNorm only
  Norm() = default;
  Norm(NormKind kind, int64_t C);
  Tensor forward(const Tensor& x) const;  // normalise the last axis
  void collect(const std::string& prefix, NamedParams& out) const;
};

// Keys and values of one attention layer for incremental decoding (NoGrad only).
struct KVCache {
  Tensor k, v;      // [B, H, Tmax, D], filled up to len
  int64_t len = 0;  // positions held
};

struct Attention {
  int64_t H = 1;
  Linear qkv;   // C -> 3C (q, k, v stacked)
  Linear proj;  // C -> C
  Attention() = default;
  Attention(const CoEConfig& cfg, Generator& gen);
  // x [B, T, C] -> [B, T, C]. With a cache: appends this call's keys/values at cache->len; the queries attend to
  // everything in the cache (T == 1 step, or a prefill of an empty cache).
  Tensor forward(const Tensor& x, KVCache* cache = nullptr) const;
  void collect(const std::string& prefix, NamedParams& out) const;
};

// One expert: d -> d_ff -> d. SwiGLU: w2 (silu(w1 x) * (w3 x)); GELU: w2 gelu(w1 x) (w3 unused).
struct ExpertFFN {
  ExpertKind kind = ExpertKind::SwiGLU;
  Linear w1;  // C -> F
  Linear w3;  // C -> F (SwiGLU only)
  Linear w2;  // F -> C
  ExpertFFN() = default;
  ExpertFFN(const CoEConfig& cfg, Generator& gen);
  Tensor forward(const Tensor& x) const;  // [n, C] -> [n, C]
  void collect(const std::string& prefix, NamedParams& out) const;
  int64_t numel() const { return w1.numel() + w2.numel() + (w3.w.defined() ? w3.numel() : 0); }
  std::vector<Tensor> tensors() const;
};

}  // namespace cm
