// Building blocks of the model: everything differentiable is composed from autograd ops.
#include "model/layers.h"

#include <cmath>

namespace cm {

Tensor normal_param(const Shape& shape, float std, Generator& gen) {
  Tensor t = Tensor::randn(shape, gen);
  float* p = t.f32();
  for (int64_t i = 0, n = t.numel(); i < n; ++i) p[i] *= std;
  t.requires_grad_(true);
  return t;
}

Tensor const_param(const Shape& shape, float value) {
  Tensor t = Tensor::full(shape, value);
  t.requires_grad_(true);
  return t;
}

static void add_param(NamedParams& out, const std::string& name, const Tensor& t) {
  if (t.defined()) out.emplace_back(name, t);
}

// ---------------------------------------------------------------- Linear

Linear::Linear(int64_t in, int64_t out, bool bias, float std, Generator& gen) {
  w = normal_param({out, in}, std, gen);
  if (bias) b = const_param({out}, 0.f);
}

void Linear::collect(const std::string& prefix, NamedParams& out) const {
  add_param(out, prefix + ".weight", w);
  add_param(out, prefix + ".bias", b);
}

// ---------------------------------------------------------------- Norm

Norm::Norm(NormKind k, int64_t C) : kind(k) {
  w = const_param({C}, 1.f);
  if (k == NormKind::LayerNorm) b = const_param({C}, 0.f);
}

Tensor Norm::forward(const Tensor& x) const {
  return kind == NormKind::LayerNorm ? layernorm(x, w, b) : rmsnorm(x, w);
}

void Norm::collect(const std::string& prefix, NamedParams& out) const {
  add_param(out, prefix + ".weight", w);
  add_param(out, prefix + ".bias", b);
}

// ---------------------------------------------------------------- Attention

Attention::Attention(const CoEConfig& cfg, Generator& gen) : H(cfg.n_heads) {
  const int64_t C = cfg.d_model;
  qkv = Linear(C, 3 * C, cfg.bias, cfg.init_std, gen);
  // Residual projections scaled by 1/sqrt(2L) (GPT-2): the residual stream's variance stays O(1) with depth.
  proj = Linear(C, C, cfg.bias, cfg.init_std / std::sqrt(2.0f * (float)cfg.n_layers), gen);
}

Tensor Attention::forward(const Tensor& x, KVCache* cache) const {
  const int64_t B = x.size(0), T = x.size(1), C = x.size(2), D = C / H;
  std::vector<Tensor> parts = split(qkv.forward(x), {C, C, C}, 2);  // 3 x [B, T, C]
  // [B, T, C] -> [B, H, T, D]
  auto heads = [&](const Tensor& t) { return t.view({B, T, H, D}).transpose(1, 2).contiguous(); };
  Tensor q = heads(parts[0]), k = heads(parts[1]), v = heads(parts[2]);
  Tensor y;  // [B, H, T, D]
  if (!cache) {
    y = causal_attention(q, k, v);
  } else {
    CM_CHECK(!grad_mode_enabled(), "the KV cache is for NoGrad decoding");
    CM_CHECK(cache->k.defined() && cache->k.size(0) == B, "KV cache not allocated for batch ", B);
    const int64_t Tmax = cache->k.size(2), t0 = cache->len;
    CM_REQUIRE(t0 + T <= Tmax, "KV cache overflow: ", t0, " + ", T, " positions > ", Tmax);
    CM_CHECK(T == 1 || t0 == 0, "cached attention takes one new token or a prefill of an empty cache");
    cache->k.slice(2, t0, t0 + T).copy_(k);
    cache->v.slice(2, t0, t0 + T).copy_(v);
    cache->len = t0 + T;
    if (t0 == 0) {
      y = causal_attention(q, k, v);
    } else {
      // One query at the end attends to every cached position: no mask needed.
      const int64_t S = t0 + 1;
      Tensor kk = cache->k.slice(2, 0, S).contiguous().view({B * H, S, D});
      Tensor vv = cache->v.slice(2, 0, S).contiguous().view({B * H, S, D});
      Tensor s = mul(matmul(q.view({B * H, 1, D}), kk, false, true), 1.0f / std::sqrt((float)D));  // [BH, 1, S]
      y = matmul(softmax(s), vv).view({B, H, 1, D});
    }
  }
  return proj.forward(y.transpose(1, 2).contiguous().view({B, T, C}));
}

void Attention::collect(const std::string& prefix, NamedParams& out) const {
  qkv.collect(prefix + ".qkv", out);
  proj.collect(prefix + ".proj", out);
}

// ---------------------------------------------------------------- Expert FFN

ExpertFFN::ExpertFFN(const CoEConfig& cfg, Generator& gen) : kind(cfg.expert) {
  const int64_t C = cfg.d_model, F = cfg.d_ff;
  w1 = Linear(C, F, cfg.bias, cfg.init_std, gen);
  if (kind == ExpertKind::SwiGLU) w3 = Linear(C, F, cfg.bias, cfg.init_std, gen);
  w2 = Linear(F, C, cfg.bias, cfg.init_std / std::sqrt(2.0f * (float)cfg.n_layers), gen);
}

Tensor ExpertFFN::forward(const Tensor& x) const {
  if (kind == ExpertKind::SwiGLU) return w2.forward(mul(silu(w1.forward(x)), w3.forward(x)));
  return w2.forward(gelu(w1.forward(x)));
}

// Names follow the brief: "experts.3.w1" is the matrix itself (bias, when on, is "experts.3.b1").
void ExpertFFN::collect(const std::string& prefix, NamedParams& out) const {
  add_param(out, prefix + ".w1", w1.w);
  add_param(out, prefix + ".b1", w1.b);
  add_param(out, prefix + ".w2", w2.w);
  add_param(out, prefix + ".b2", w2.b);
  add_param(out, prefix + ".w3", w3.w);
  add_param(out, prefix + ".b3", w3.b);
}

std::vector<Tensor> ExpertFFN::tensors() const {
  std::vector<Tensor> r;
  for (const Tensor& t : {w1.w, w1.b, w2.w, w2.b, w3.w, w3.b})
    if (t.defined()) r.push_back(t);
  return r;
}

}  // namespace cm
