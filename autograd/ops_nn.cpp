// Neural-net ops: softmax, log-softmax, cross-entropy, embedding, layernorm, rmsnorm, dropout, causal attention.
// Each op checks its arguments, makes inputs contiguous, calls the raw kernel (kernels/<family>.h) and records its
// backward right beside the forward. Backward closures capture detached tensors (never the output itself) and
// return fresh gradient tensors; autograd accumulates them. causal_attention is composed of primitives and has no
// backward of its own.
#include <cmath>

#include "autograd/ops.h"
#include "engine/dispatch.h"
#include "kernels/dropout.h"
#include "kernels/embedding.h"
#include "kernels/index.h"
#include "kernels/losses.h"
#include "kernels/norm.h"
#include "kernels/reduce.h"
#include "kernels/softmax.h"

#if CM_CUDA
#include "engine/cuda.h"
#endif

namespace cm {

namespace {

// Each op runs on its inputs' device: CM_KERNEL (engine/dispatch.h) calls the CPU kernel or its CUDA twin.
void require_f32(const char* op, const char* what, const Tensor& t) {
  CM_REQUIRE(t.defined(), op, ": ", what, " is undefined");
  CM_REQUIRE(t.dtype() == DType::F32, op, ": ", what, " must be f32, got ", dtype_name(t.dtype()), " of shape ",
             shape_str(t.shape()));
}

void require_i32(const char* op, const char* what, const Tensor& t) {
  CM_REQUIRE(t.defined(), op, ": ", what, " is undefined");
  CM_REQUIRE(t.dtype() == DType::I32, op, ": ", what, " must be i32, got ", dtype_name(t.dtype()), " of shape ",
             shape_str(t.shape()));
}

// [..., C] seen as [N, C]: N is the product of the leading dims (1 for a 1-D tensor; 0 if any is 0).
struct Rows {
  int64_t N, C;
};
Rows last_axis_rows(const char* op, const Tensor& x) {
  CM_REQUIRE(x.dim() >= 1, op, ": needs at least one dimension, got a 0-d tensor");
  Rows r{1, x.size(-1)};
  for (int64_t d = 0; d + 1 < x.dim(); ++d) r.N *= x.shape()[d];
  return r;
}

}  // namespace

// ---------------------------------------------------------------- softmax, log-softmax

Tensor softmax(const Tensor& a) {
  require_f32("softmax", "input", a);
  const Rows r = last_axis_rows("softmax", a);
  Tensor x = a.contiguous();
  Tensor y = Tensor::empty(a.shape(), DType::F32, a.device());
  CM_KERNEL(a.device(), softmax_forward, y.f32(), x.f32(), r.N, r.C);
  return record("softmax", y, {a}, [yd = y.detach(), r](const Tensor& gy) {
    Tensor g = gy.contiguous();
    Tensor dx = Tensor::empty(yd.shape(), DType::F32, yd.device());
    CM_KERNEL(yd.device(), softmax_backward, dx.f32(), g.f32(), yd.f32(), r.N, r.C);
    return grads{dx};
  });
}

Tensor log_softmax(const Tensor& a) {
  require_f32("log_softmax", "input", a);
  const Rows r = last_axis_rows("log_softmax", a);
  Tensor x = a.contiguous();
  Tensor y = Tensor::empty(a.shape(), DType::F32, a.device());
  CM_KERNEL(a.device(), log_softmax_forward, y.f32(), x.f32(), r.N, r.C);
  return record("log_softmax", y, {a}, [yd = y.detach(), r](const Tensor& gy) {
    Tensor g = gy.contiguous();
    Tensor dx = Tensor::empty(yd.shape(), DType::F32, yd.device());
    CM_KERNEL(yd.device(), log_softmax_backward, dx.f32(), g.f32(), yd.f32(), r.N, r.C);
    return grads{dx};
  });
}

// ---------------------------------------------------------------- cross-entropy

Tensor cross_entropy(const Tensor& logits, const Tensor& targets, int32_t ignore_index) {
  require_f32("cross_entropy", "logits", logits);
  require_i32("cross_entropy", "targets", targets);
  CM_REQUIRE(logits.dim() == 2, "cross_entropy: logits must be [N, V], got ", shape_str(logits.shape()));
  const int64_t N = logits.size(0), V = logits.size(1);
  CM_REQUIRE(targets.dim() == 1 && targets.size(0) == N, "cross_entropy: targets must be [N] = [", N,
             "] for logits ", shape_str(logits.shape()), ", got ", shape_str(targets.shape()));
  CM_REQUIRE(V > 0 || N == 0, "cross_entropy: logits ", shape_str(logits.shape()), " have no classes");
  const Device dev = common_device("cross_entropy", {&logits, &targets});
  Tensor x = logits.contiguous().detach();
  Tensor t = targets.contiguous();
  Tensor losses = Tensor::empty({N}, DType::F32, dev), lse = Tensor::empty({N}, DType::F32, dev);  // [N], [N]
#if CM_CUDA
  if (dev == Device::CUDA) {
    // On the device the targets never come to the host: the kernels check them (a bad one is reported at the next
    // read-out, engine/cuda.h) and count the valid ones into inv_valid [1] = 1 / valid, read by the sum and by
    // the backward there. The loss is the deterministic device sum times that scale: the same bits as a host scale.
    Tensor inv_valid = Tensor::empty({1}, DType::F32, dev);
    cuda::cross_entropy_inv_valid(inv_valid.f32(), t.i32(), N, V, ignore_index);
    if (N > 0) cuda::cross_entropy_forward(losses.f32(), lse.f32(), x.f32(), t.i32(), N, V, ignore_index);
    Tensor loss = Tensor::empty({}, DType::F32, dev);
    cuda::sum_all(loss.f32(), losses.f32(), N, 1.0f, inv_valid.f32());
    return record("cross_entropy", loss, {logits}, [x, t, lse, inv_valid, ignore_index](const Tensor& gy) {
      const int64_t N = x.size(0), V = x.size(1);
      Tensor dx = Tensor::empty({N, V}, DType::F32, x.device());
      if (N == 0) return grads{dx};
      Tensor g = mul(gy.reshape({1}), inv_valid);  // [1] gout / valid: the float product the host formed before
      cuda::cross_entropy_backward(dx.f32(), x.f32(), lse.f32(), t.i32(), g.f32(), 1.0f, N, V, ignore_index);
      return grads{dx};
    });
  }
#endif
  // On the CPU the targets are checked and counted here, before any work: an error names the first bad one.
  const int32_t* tp = t.i32();
  int64_t valid = 0;
  for (int64_t n = 0; n < N; ++n) {
    if (tp[n] == ignore_index) continue;
    CM_REQUIRE(tp[n] >= 0 && tp[n] < V, "cross_entropy: target ", tp[n], " at row ", n,
               " is out of range for V = ", V, " (and is not ignore_index ", ignore_index, ")");
    ++valid;
  }
  if (N > 0) cpu::cross_entropy_forward(losses.f32(), lse.f32(), x.f32(), t.i32(), N, V, ignore_index);
  // Mean over valid rows, summed in double in a fixed order, so the loss does not depend on thread count. No valid
  // rows: loss 0 and gradient 0 (not 0/0).
  double total = 0.0;
  const float* lp = losses.f32();
  for (int64_t n = 0; n < N; ++n) total += lp[n];
  Tensor loss = Tensor::scalar(valid > 0 ? (float)(total / (double)valid) : 0.0f);
  return record("cross_entropy", loss, {logits}, [x, t, lse, valid, ignore_index](const Tensor& gy) {
    const int64_t N = x.size(0), V = x.size(1);
    Tensor dx = Tensor::empty({N, V}, DType::F32, x.device());
    if (N == 0) return grads{dx};
    const float scale = valid > 0 ? gy.contiguous().f32()[0] / (float)valid : 0.0f;  // read as a kernel would
    cpu::cross_entropy_backward(dx.f32(), x.f32(), lse.f32(), t.i32(), scale, N, V, ignore_index);
    return grads{dx};
  });
}

// ---------------------------------------------------------------- router z-loss

Tensor router_z_loss(const Tensor& logits, float weight) {
  require_f32("router_z_loss", "logits", logits);
  CM_REQUIRE(logits.dim() == 2 && logits.size(1) > 0, "router_z_loss: logits must be [R, E] with E > 0, got ",
             shape_str(logits.shape()));
  const int64_t R = logits.size(0), E = logits.size(1);
  const Device dev = logits.device();
  Tensor x = logits.contiguous().detach();
  Tensor lse = Tensor::empty({R}, DType::F32, dev), loss = Tensor::empty({}, DType::F32, dev);  // [R], 0-d
  CM_KERNEL(dev, z_loss_forward, loss.f32(), lse.f32(), x.f32(), R, E, weight);
  return record("router_z_loss", loss, {logits}, [x, lse, weight](const Tensor& gy) {
    const int64_t R = x.size(0), E = x.size(1);
    Tensor dx = Tensor::empty({R, E}, DType::F32, x.device());
    if (R == 0) return grads{dx};
    Tensor g = gy.contiguous();
    CM_KERNEL(x.device(), z_loss_backward, dx.f32(), g.f32(), x.f32(), lse.f32(), R, E, weight);
    return grads{dx};
  });
}

// Load balance of one routing level (kernels/losses.h load_balance_forward/backward). Only probs is
// differentiable: frac and the token counts come from indices and group, which carry no gradient.
Tensor router_balance_loss(const Tensor& probs, const Tensor& indices, const Tensor& group, int64_t G,
                           const Tensor& log_bias, float weight) {
  require_f32("router_balance_loss", "probs", probs);
  require_i32("router_balance_loss", "indices", indices);
  CM_REQUIRE(probs.dim() == 2 && probs.size(1) > 0, "router_balance_loss: probs must be [R, E] with E > 0, got ",
             shape_str(probs.shape()));
  const int64_t R = probs.size(0), E = probs.size(1);
  CM_REQUIRE(indices.dim() == 2 && indices.size(0) == R && indices.size(1) > 0, "router_balance_loss: indices must be [",
             R, ", K] with K > 0 for probs ", shape_str(probs.shape()), ", got ", shape_str(indices.shape()));
  const int64_t K = indices.size(1);
  CM_REQUIRE(G >= 1, "router_balance_loss: G must be >= 1, got ", G);
  if (group.defined()) {
    require_i32("router_balance_loss", "group", group);
    CM_REQUIRE(group.dim() == 1 && group.size(0) == R, "router_balance_loss: group must be [", R, "], got ",
               shape_str(group.shape()));
  } else {
    CM_REQUIRE(G == 1, "router_balance_loss: G = ", G, " groups need a group tensor");
  }
  if (log_bias.defined()) {  // [G, E] or flat [G * E] (a router level's bias)
    require_f32("router_balance_loss", "log_bias", log_bias);
    CM_REQUIRE((log_bias.dim() == 2 && log_bias.size(0) == G && log_bias.size(1) == E) ||
                   (log_bias.dim() == 1 && log_bias.size(0) == G * E),
               "router_balance_loss: log_bias must be [", G, ", ", E, "] or [", G * E, "], got ",
               shape_str(log_bias.shape()));
  }
  const Device dev = common_device("router_balance_loss", {&probs, &indices, &group, &log_bias});
  Tensor p = probs.contiguous().detach(), idx = indices.contiguous();
  Tensor grp = group.defined() ? group.contiguous() : Tensor();
  Tensor q = log_bias.defined() ? log_bias.contiguous().detach() : Tensor();  // read by the kernels only
  Tensor loss = Tensor::empty({}, DType::F32, dev);                                      // 0-d
  Tensor frac = Tensor::empty({G, E}, DType::F32, dev), mp = Tensor::empty({G, E}, DType::F32, dev);  // [G, E]
  Tensor tokens = Tensor::empty({G}, DType::F32, dev);                                    // [G]
  CM_KERNEL(dev, load_balance_forward, loss.f32(), frac.f32(), mp.f32(), tokens.f32(), p.f32(), idx.i32(),
            grp.defined() ? grp.i32() : nullptr, q.defined() ? q.f32() : nullptr, R, E, K, G, weight);
  return record("router_balance_loss", loss, {probs}, [frac, tokens, grp, q, R, E, G, weight](const Tensor& gy) {
    Tensor dp = Tensor::empty({R, E}, DType::F32, frac.device());
    if (R == 0) return grads{dp};
    Tensor g = gy.contiguous();
    CM_KERNEL(frac.device(), load_balance_backward, dp.f32(), g.f32(), frac.f32(), tokens.f32(),
              grp.defined() ? grp.i32() : nullptr, q.defined() ? q.f32() : nullptr, R, E, G, weight);
    return grads{dp};
  });
}

// ---------------------------------------------------------------- embedding

Tensor embedding(const Tensor& weight, const Tensor& ids) {
  require_f32("embedding", "weight", weight);
  require_i32("embedding", "ids", ids);
  CM_REQUIRE(weight.dim() == 2, "embedding: weight must be [V, C], got ", shape_str(weight.shape()));
  const Device dev = common_device("embedding", {&weight, &ids});
  const int64_t V = weight.size(0), C = weight.size(1), N = ids.numel();
  Tensor id = ids.contiguous();
  // On the CPU the ids are checked here; the CUDA kernels check each id themselves (engine/cuda.h: a bad one is
  // reported at the next read-out, without a wait here).
  const int64_t bad = dev == Device::CPU && N > 0 ? cpu::index_first_bad(id.i32(), N, V) : -1;
  CM_REQUIRE(bad < 0, "embedding: id ", bad < 0 ? 0 : id.i32()[bad], " at position ", bad,
             " is out of range for V = ", V, " (weight ", shape_str(weight.shape()), ")");
  Tensor w = weight.contiguous();
  Shape out_shape = ids.shape();
  out_shape.push_back(C);
  Tensor out = Tensor::empty(out_shape, DType::F32, dev);  // [..., C]
  CM_KERNEL(dev, embedding_forward, out.f32(), w.f32(), id.i32(), N, V, C);
  return record("embedding", out, {weight}, [id, V, C, N](const Tensor& gy) {
    Tensor g = gy.contiguous();
    Tensor dw = Tensor::zeros({V, C}, DType::F32, g.device());  // the kernel accumulates into it
    CM_KERNEL(g.device(), embedding_backward, dw.f32(), g.f32(), id.i32(), N, V, C);
    return grads{dw};
  });
}

// ---------------------------------------------------------------- layernorm, rmsnorm

static void check_norm_param(const char* op, const char* what, const Tensor& p, const Tensor& x, int64_t C) {
  require_f32(op, what, p);
  CM_REQUIRE(p.dim() == 1 && p.size(0) == C, op, ": ", what, " must be [C] = [", C, "] for input ",
             shape_str(x.shape()), ", got ", shape_str(p.shape()));
}

Tensor layernorm(const Tensor& x, const Tensor& weight, const Tensor& bias, float eps) {
  require_f32("layernorm", "input", x);
  const Rows r = last_axis_rows("layernorm", x);
  check_norm_param("layernorm", "weight", weight, x, r.C);
  const bool has_bias = bias.defined();
  if (has_bias) check_norm_param("layernorm", "bias", bias, x, r.C);
  CM_REQUIRE(eps >= 0.0f, "layernorm: eps must be >= 0, got ", eps);
  Tensor xc = x.contiguous().detach(), w = weight.contiguous().detach();
  Tensor b = has_bias ? bias.contiguous() : Tensor();
  const Device dev = common_device("layernorm", {&x, &weight, &bias});
  Tensor y = Tensor::empty(x.shape(), DType::F32, dev);
  Tensor mean = Tensor::empty({r.N}, DType::F32, dev), rstd = Tensor::empty({r.N}, DType::F32, dev);  // [N], [N]
  CM_KERNEL(dev, layernorm_forward, y.f32(), mean.f32(), rstd.f32(), xc.f32(), w.f32(), has_bias ? b.f32() : nullptr,
            r.N, r.C, eps);
  std::vector<Tensor> inputs{x, weight};
  if (has_bias) inputs.push_back(bias);
  return record("layernorm", y, inputs, [xc, w, mean, rstd, r, has_bias](const Tensor& gy) {
    Tensor g = gy.contiguous();
    const Device dev = xc.device();
    Tensor dx = Tensor::empty(xc.shape(), DType::F32, dev), dw = Tensor::empty({r.C}, DType::F32, dev);
    Tensor db = has_bias ? Tensor::empty({r.C}, DType::F32, dev) : Tensor();
    CM_KERNEL(dev, layernorm_backward, dx.f32(), dw.f32(), has_bias ? db.f32() : nullptr, g.f32(), xc.f32(), w.f32(),
              mean.f32(), rstd.f32(), r.N, r.C);
    return has_bias ? grads{dx, dw, db} : grads{dx, dw};
  });
}

Tensor rmsnorm(const Tensor& x, const Tensor& weight, float eps) {
  require_f32("rmsnorm", "input", x);
  const Rows r = last_axis_rows("rmsnorm", x);
  check_norm_param("rmsnorm", "weight", weight, x, r.C);
  CM_REQUIRE(eps >= 0.0f, "rmsnorm: eps must be >= 0, got ", eps);
  Tensor xc = x.contiguous().detach(), w = weight.contiguous().detach();
  const Device dev = common_device("rmsnorm", {&x, &weight});
  Tensor y = Tensor::empty(x.shape(), DType::F32, dev);
  Tensor rstd = Tensor::empty({r.N}, DType::F32, dev);  // [N]
  CM_KERNEL(dev, rmsnorm_forward, y.f32(), rstd.f32(), xc.f32(), w.f32(), r.N, r.C, eps);
  return record("rmsnorm", y, {x, weight}, [xc, w, rstd, r](const Tensor& gy) {
    Tensor g = gy.contiguous();
    const Device dev = xc.device();
    Tensor dx = Tensor::empty(xc.shape(), DType::F32, dev), dw = Tensor::empty({r.C}, DType::F32, dev);
    CM_KERNEL(dev, rmsnorm_backward, dx.f32(), dw.f32(), g.f32(), xc.f32(), w.f32(), rstd.f32(), r.N, r.C);
    return grads{dx, dw};
  });
}

// ---------------------------------------------------------------- dropout

Tensor dropout(const Tensor& x, float p, bool training, Generator& gen) {
  require_f32("dropout", "input", x);
  CM_REQUIRE(p >= 0.0f && p < 1.0f, "dropout: p must be in [0, 1), got ", p);
  // Identity: returns x itself and draws nothing, so evaluation does not move the generator.
  if (!training || p == 0.0f) return x;
  const int64_t n = x.numel();
  const uint64_t seed = gen.seed;
  uint64_t offset = gen.take((uint64_t)n);
  // In a captured CUDA graph the offset is relative to the generator's offset on the device, written before each
  // replay (engine/cuda.h, Graph::bind_generator): otherwise every replay would drop the same elements.
  const uint64_t* base = nullptr;
#if CM_CUDA
  if (x.device() == Device::CUDA) cuda::Graph::draw_base(gen, offset, &base, &offset);
#endif
  Tensor xc = x.contiguous();
  Tensor y = Tensor::empty(x.shape(), DType::F32, x.device());
  CM_KERNEL(x.device(), dropout_forward, y.f32(), xc.f32(), n, p, seed, offset, base);
  // The mask is regenerated from (seed, offset) in backward rather than stored.
  return record("dropout", y, {x}, [n, p, seed, offset, base, shape = x.shape()](const Tensor& gy) {
    Tensor g = gy.contiguous();
    Tensor dx = Tensor::empty(shape, DType::F32, g.device());
    CM_KERNEL(g.device(), dropout_backward, dx.f32(), g.f32(), n, p, seed, offset, base);
    return grads{dx};
  });
}

// ---------------------------------------------------------------- causal attention

Tensor causal_attention(const Tensor& q, const Tensor& k, const Tensor& v) {
  require_f32("causal_attention", "q", q);
  require_f32("causal_attention", "k", k);
  require_f32("causal_attention", "v", v);
  CM_REQUIRE(q.dim() == 4, "causal_attention: q must be [B, H, T, D], got ", shape_str(q.shape()));
  CM_REQUIRE(k.shape() == q.shape() && v.shape() == q.shape(), "causal_attention: q, k, v must have one shape, got ",
             shape_str(q.shape()), ", ", shape_str(k.shape()), ", ", shape_str(v.shape()));
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3);
  const Device dev = common_device("causal_attention", {&q, &k, &v});
  Tensor q3 = q.reshape({B * H, T, D}), k3 = k.reshape({B * H, T, D}), v3 = v.reshape({B * H, T, D});
#if CM_CUDA
  // On the GPU the scale, the mask and the softmax are one kernel each way (no [T, T] mask to build and upload).
  if (dev == Device::CUDA) {
    Tensor s = matmul(q3, k3, false, true);  // [BH, T, T]
    const float scale = 1.0f / std::sqrt((float)D);
    Tensor att = Tensor::empty(s.shape(), DType::F32, dev);
    cuda::causal_softmax_forward(att.f32(), s.contiguous().f32(), scale, B * H, T);
    att = record("causal_softmax", att, {s}, [yd = att.detach(), scale, B, H, T](const Tensor& gy) {
      Tensor g = gy.contiguous(), ds = Tensor::empty(yd.shape(), DType::F32, yd.device());
      cuda::causal_softmax_backward(ds.f32(), g.f32(), yd.f32(), scale, B * H, T);
      return grads{ds};
    });
    return matmul(att, v3).reshape({B, H, T, D});
  }
#endif
  (void)dev;
  Tensor att = mul(matmul(q3, k3, false, true), 1.0f / std::sqrt((float)D));  // [BH, T, T]
  // future[i, j] = 1 where key j comes after query i. -inf there gives exactly 0 after softmax (fast_exp(-inf)
  // = 0), and every row keeps its diagonal, so no row is all -inf.
  std::vector<int32_t> future((size_t)(T * T));
  for (int64_t i = 0; i < T; ++i)
    for (int64_t j = 0; j < T; ++j) future[(size_t)(i * T + j)] = j > i;
  att = masked_fill(att, Tensor::from_vector(future, {T, T}), -INFINITY);
  att = softmax(att);
  return matmul(att, v3).reshape({B, H, T, D});  // [BH, T, T] x [BH, T, D] -> [B, H, T, D]
}

}  // namespace cm
