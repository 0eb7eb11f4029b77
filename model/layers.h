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

// ---- rotary positions (RoPE)
// Position p turns the pair (i, i + D/2) of every head's query and key by the angle p * base^(-2i/D), i < D/2
// (the "rotate half" layout). A query-key product then depends on the positions only through their difference,
// so cached keys stay valid as the context slides.
// Rows [p0, p0 + T) of the tables: cos [T, D] (cos of the pair's angle, both halves) and sin [T, D] with the
// rotation's sign folded in (-sin in the first half, +sin in the second). Angles are formed in double.
struct RopeRows {
  Tensor cos, sin;  // [T, D]
};
RopeRows rope_rows(int64_t p0, int64_t T, int64_t D, float base, Device dev);
// x [..., T, D] -> x * cos + swap_halves(x) * sin, where swap_halves(x) = [x2, x1] for x = [x1, x2]: out1 =
// x1 cos - x2 sin, out2 = x2 cos + x1 sin. Composed of split, concat, mul and add: the backward comes from them
// (the inverse rotation), on any device.
Tensor rope(const Tensor& x, const RopeRows& r);

// Causal attention in which a query sees at most `window` keys, itself included (query i: keys i - window + 1 ..
// i). q, k, v [B, H, T, D] -> [B, H, T, D]; composite (scores, band mask, softmax, times v). window >= T is
// plain causal attention.
Tensor windowed_causal_attention(const Tensor& q, const Tensor& k, const Tensor& v, int64_t window);

// Keys and values of one attention layer for incremental decoding (NoGrad only). W slots; position p lives in slot
// p % W. With learned positions the positions never pass W (generation past the window starts a new cache); with
// rope the slots are a ring: position p overwrites p - W, the one key that left the window, and the keys keep the
// rotation of their absolute position.
struct KVCache {
  Tensor k, v;       // [B, H, W, D]
  int64_t len = 0;   // slots filled: min(positions seen, W)
  int64_t next = 0;  // position of the next token
};

struct Attention {
  int64_t H = 1;
  int64_t window = 1;  // W = seq_len: the most keys a query sees
  Linear qkv;   // C -> 3C (q, k, v stacked)
  Linear proj;  // C -> C
  Attention() = default;
  Attention(const CoEConfig& cfg, Generator& gen);
  // x [B, T, C] -> [B, T, C] for positions p0 .. p0 + T - 1. rope: the rows of those positions (undefined tensors:
  // learned positions, already in x). T > W (rope only) attends through a sliding window of W.
  // With a cache: a prefill of an empty cache (any T; its last min(T, W) keys and values are kept), or one new
  // token at cache->next that attends to every held slot.
  Tensor forward(const Tensor& x, int64_t p0, const RopeRows& rope, KVCache* cache = nullptr) const;
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
