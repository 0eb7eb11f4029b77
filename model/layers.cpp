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

// ---------------------------------------------------------------- rotary positions

RopeRows rope_rows(int64_t p0, int64_t T, int64_t D, float base, Device dev) {
  CM_CHECK(D % 2 == 0 && T >= 0 && p0 >= 0, "rope_rows: D ", D, " T ", T, " p0 ", p0);
  const int64_t h = D / 2;
  std::vector<float> c((size_t)(T * D)), s((size_t)(T * D));
  for (int64_t t = 0; t < T; ++t)
    for (int64_t i = 0; i < h; ++i) {
      const double a = (double)(p0 + t) * std::pow((double)base, -2.0 * (double)i / (double)D);
      const float ca = (float)std::cos(a), sa = (float)std::sin(a);
      c[(size_t)(t * D + i)] = c[(size_t)(t * D + h + i)] = ca;
      s[(size_t)(t * D + i)] = -sa;
      s[(size_t)(t * D + h + i)] = sa;
    }
  return RopeRows{Tensor::from_vector(c, {T, D}, dev), Tensor::from_vector(s, {T, D}, dev)};
}

Tensor rope(const Tensor& x, const RopeRows& r) {
  const int64_t D = x.size(-1);
  CM_CHECK(D % 2 == 0, "rope: odd head size ", D);
  std::vector<Tensor> h = split(x, {D / 2, D / 2}, x.dim() - 1);  // x1, x2 [..., T, D/2]
  return add(mul(x, r.cos), mul(concat({h[1], h[0]}, x.dim() - 1), r.sin));
}

Tensor windowed_causal_attention(const Tensor& q, const Tensor& k, const Tensor& v, int64_t window) {
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3);
  if (window >= T) return causal_attention(q, k, v);
  Tensor q3 = q.reshape({B * H, T, D}), k3 = k.reshape({B * H, T, D}), v3 = v.reshape({B * H, T, D});
  Tensor s = mul(matmul(q3, k3, false, true), 1.0f / std::sqrt((float)D));  // [BH, T, T]
  // Outside the band: keys after the query, or window or more positions before it. The diagonal is always in,
  // so no row is all -inf (softmax gives exact zeros there).
  std::vector<int32_t> out((size_t)(T * T));
  for (int64_t i = 0; i < T; ++i)
    for (int64_t j = 0; j < T; ++j) out[(size_t)(i * T + j)] = j > i || j <= i - window;
  Tensor att = softmax(masked_fill(s, Tensor::from_vector(out, {T, T}, q.device()), -INFINITY));
  return matmul(att, v3).reshape({B, H, T, D});
}

// ---------------------------------------------------------------- Attention

Attention::Attention(const CoEConfig& cfg, Generator& gen) : H(cfg.n_heads), window(cfg.seq_len) {
  const int64_t C = cfg.d_model;
  qkv = Linear(C, 3 * C, cfg.bias, cfg.init_std, gen);
  // Residual projections scaled by 1/sqrt(2L) (GPT-2): the residual stream's variance stays O(1) with depth.
  proj = Linear(C, C, cfg.bias, cfg.init_std / std::sqrt(2.0f * (float)cfg.n_layers), gen);
}

Tensor Attention::forward(const Tensor& x, int64_t p0, const RopeRows& rr, KVCache* cache) const {
  const int64_t B = x.size(0), T = x.size(1), C = x.size(2), D = C / H, W = window;
  std::vector<Tensor> parts = split(qkv.forward(x), {C, C, C}, 2);  // 3 x [B, T, C]
  // [B, T, C] -> [B, H, T, D]
  auto heads = [&](const Tensor& t) { return t.view({B, T, H, D}).transpose(1, 2).contiguous(); };
  Tensor q = heads(parts[0]), k = heads(parts[1]), v = heads(parts[2]);
  if (rr.cos.defined()) {
    CM_CHECK(rr.cos.size(0) == T && rr.cos.size(1) == D, "rope rows ", shape_str(rr.cos.shape()), " for T ", T);
    q = rope(q, rr);
    k = rope(k, rr);
  } else {
    CM_CHECK(p0 + T <= W, "learned positions end at ", W, ", got ", p0, " + ", T);
  }
  auto full = [&] { return T <= W ? causal_attention(q, k, v) : windowed_causal_attention(q, k, v, W); };
  Tensor y;  // [B, H, T, D]
  if (!cache) {
    y = full();
  } else {
    CM_CHECK(!grad_mode_enabled(), "the KV cache is for NoGrad decoding");
    CM_CHECK(cache->k.defined() && cache->k.size(0) == B && cache->k.size(2) == W, "KV cache not allocated for [",
             B, ", ", W, "]");
    if (cache->len == 0) {  // prefill: keep the last min(T, W) positions, position p in slot p % W
      y = full();
      for (int64_t t = T - std::min(T, W); t < T;) {
        const int64_t slot = (p0 + t) % W, n = std::min(T - t, W - slot);
        cache->k.slice(2, slot, slot + n).copy_(k.slice(2, t, t + n));
        cache->v.slice(2, slot, slot + n).copy_(v.slice(2, t, t + n));
        t += n;
      }
      cache->len = std::min(T, W);
    } else {
      CM_CHECK(T == 1 && p0 == cache->next, "cached attention takes one new token at position ", cache->next,
               ", got ", T, " at ", p0);
      // Learned positions: the caller starts a new cache at W (a position past the table has no embedding).
      CM_CHECK(rr.cos.defined() || p0 < W, "learned positions: the KV cache is full at ", W);
      const int64_t slot = p0 % W;  // rope past the window: overwrites position p0 - W, the key that left
      cache->k.slice(2, slot, slot + 1).copy_(k);
      cache->v.slice(2, slot, slot + 1).copy_(v);
      cache->len = std::min(cache->len + 1, W);
      // One query attends to every held slot (all of them at most W - 1 positions back): no mask needed. Slot
      // order is not position order past the window; attention does not depend on the order of its keys.
      const int64_t S = cache->len;
      Tensor kk = cache->k.slice(2, 0, S).contiguous().view({B * H, S, D});
      Tensor vv = cache->v.slice(2, 0, S).contiguous().view({B * H, S, D});
      Tensor s = mul(matmul(q.view({B * H, 1, D}), kk, false, true), 1.0f / std::sqrt((float)D));  // [BH, 1, S]
      y = matmul(softmax(s), vv).view({B, H, 1, D});
    }
    cache->next = p0 + T;
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
