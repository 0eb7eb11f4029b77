// The router level ops (autograd/ops_route.h): argument checks, the kernels of kernels/route.h, and the backward
// rules beside the forward.
#include "autograd/ops_route.h"

#include <cmath>

#include "engine/dispatch.h"
#include "kernels/index.h"
#include "kernels/route.h"
#include "kernels/softmax.h"

namespace cm {

namespace {

// A CPU tensor's node ids in [0, n), or an error naming the first that is not. (On CUDA the kernels record a bad
// id in the device's index-error record.)
void check_nodes(const char* op, const Tensor& nd, int64_t n) {
  const int64_t bad = cpu::index_first_bad(nd.i32(), nd.numel(), n);
  CM_REQUIRE(bad < 0, op, ": node ", bad < 0 ? 0 : nd.i32()[bad], " of pair ", bad, " outside [0, ", n, ")");
}

}  // namespace

Tensor routed_logits(const Tensor& h, const Tensor& W, const Tensor& node, int64_t b) {
  CM_REQUIRE(h.defined() && h.dtype() == DType::F32 && h.dim() == 2, "routed_logits: h must be f32 [T, C], got ",
             h.defined() ? shape_str(h.shape()) : std::string("undefined"));
  CM_REQUIRE(W.defined() && W.dtype() == DType::F32 && W.dim() == 2 && W.size(1) == h.size(1),
             "routed_logits: W must be f32 [n * b, ", h.size(1), "], got ",
             W.defined() ? shape_str(W.shape()) : std::string("undefined"));
  CM_REQUIRE(b >= 1 && W.size(0) % b == 0, "routed_logits: W has ", W.size(0), " rows, not a multiple of b = ", b);
  const Device dev = common_device("routed_logits", {&h, &W, &node});
  const int64_t T = h.size(0), C = h.size(1), n = W.size(0) / b;
  int64_t P = T;
  Tensor nd;
  if (node.defined()) {
    CM_REQUIRE(node.dtype() == DType::I32 && node.dim() == 1, "routed_logits: node must be i32 [P], got ",
               dtype_name(node.dtype()), " ", shape_str(node.shape()));
    P = node.size(0);
    CM_REQUIRE((T == 0 && P == 0) || (T > 0 && P % T == 0), "routed_logits: ", P,
               " pairs is not a multiple of T = ", T);
    nd = node.contiguous();
    if (dev == Device::CPU) check_nodes("routed_logits", nd, n);
  } else {
    CM_REQUIRE(n == 1, "routed_logits: no node ids, but W holds ", n, " nodes");
  }
  const int64_t Kp = T > 0 ? P / T : 1;
  const int32_t* np = nd.defined() ? nd.i32() : nullptr;
  Tensor hc = h.contiguous().detach(), Wc = W.contiguous().detach();
  Tensor logits = Tensor::empty({P, b}, DType::F32, dev);
  CM_KERNEL(dev, route_logits_forward, logits.f32(), hc.f32(), Wc.f32(), np, P, Kp, n, b, C);
  const bool need_h = h.requires_grad(), need_w = W.requires_grad();
  return record("routed_logits", logits, {h, W}, [hc, Wc, nd, Kp, n, b, need_h, need_w](const Tensor& gy) {
    const Device d = hc.device();
    const int64_t T = hc.size(0), C = hc.size(1), P = T * Kp;
    const int32_t* np = nd.defined() ? nd.i32() : nullptr;
    Tensor g = gy.contiguous();
    Tensor dh, dW;
    if (need_h) {
      dh = Tensor::empty({T, C}, DType::F32, d);
      CM_KERNEL(d, route_logits_backward_h, dh.f32(), g.f32(), Wc.f32(), np, T, Kp, n, b, C);
    }
    if (need_w) {
      dW = Tensor::empty({n * b, C}, DType::F32, d);
      CM_KERNEL(d, route_logits_backward_w, dW.f32(), g.f32(), hc.f32(), np, P, Kp, n, b, C);
    }
    return grads{dh, dW};
  });
}

LevelSelection route_select(const Tensor& logits, const Tensor& node, const Tensor& path_parent,
                            const Tensor& logit_bias, const Tensor& aux_bias, int64_t n, float temperature, int64_t k,
                            bool renorm, bool entropy, bool probs_grad) {
  CM_REQUIRE(logits.defined() && logits.dtype() == DType::F32 && logits.dim() == 2,
             "route_select: logits must be f32 [P, b], got ", logits.defined() ? shape_str(logits.shape()) : "undefined");
  const int64_t P = logits.size(0), b = logits.size(1);
  CM_REQUIRE(k >= 1 && k <= b, "route_select: k = ", k, " outside [1, b = ", b, "]");
  CM_REQUIRE(n >= 1 && (node.defined() || n == 1), "route_select: n = ", n, " nodes without node ids");
  CM_REQUIRE(temperature > 0.f && std::isfinite(temperature), "route_select: temperature ", temperature,
             " must be positive and finite");
  const Device dev = common_device("route_select", {&logits, &node, &path_parent, &logit_bias, &aux_bias});
  Tensor nd, par, lb, ab;
  if (node.defined()) {
    CM_REQUIRE(node.dtype() == DType::I32 && node.dim() == 1 && node.size(0) == P, "route_select: node must be i32 [",
               P, "], got ", dtype_name(node.dtype()), " ", shape_str(node.shape()));
    nd = node.contiguous();
    if (dev == Device::CPU) check_nodes("route_select", nd, n);
  }
  if (path_parent.defined()) {
    CM_REQUIRE(path_parent.dtype() == DType::F32 && path_parent.numel() == P, "route_select: path_parent must be f32 [",
               P, "], got ", shape_str(path_parent.shape()));
    par = path_parent.contiguous();
  }
  for (const Tensor* t : {&logit_bias, &aux_bias})
    CM_REQUIRE(!t->defined() || (t->dtype() == DType::F32 && t->numel() == n * b), "route_select: a bias must be f32 [",
               n * b, "], got ", shape_str(t->shape()));
  if (logit_bias.defined()) lb = logit_bias.contiguous();
  if (aux_bias.defined()) ab = aux_bias.contiguous();
  const float inv_temp = 1.f / temperature;
  Tensor x = logits.contiguous();
  LevelSelection out;
  out.probs = Tensor::empty({P, b}, DType::F32, dev);
  out.path = Tensor::empty({P * k}, DType::F32, dev);
  out.child = Tensor::empty({P * k}, DType::I32, dev);
  out.idx = Tensor::empty({P, k}, DType::I32, dev);
  if (entropy) out.entropy = Tensor::empty({}, DType::F32, dev);
  const int32_t* np = nd.defined() ? nd.i32() : nullptr;
  const float* pp = par.defined() ? par.f32() : nullptr;
  CM_KERNEL(dev, route_select_forward, out.probs.f32(), out.path.f32(), out.child.i32(), out.idx.i32(),
            entropy ? out.entropy.f32() : nullptr, x.f32(), np, pp, lb.defined() ? lb.f32() : nullptr,
            ab.defined() ? ab.f32() : nullptr, inv_temp, P, n, b, k, renorm);

  // probs -> logits: the softmax's rule, then the temperature's (as mul(logits, 1 / temperature) had it).
  Tensor pd = out.probs.detach();
  out.probs = record("route_softmax", out.probs, {logits}, [pd, inv_temp](const Tensor& gy) {
    Tensor g = gy.contiguous();
    Tensor dx = Tensor::empty(pd.shape(), DType::F32, pd.device());
    CM_KERNEL(pd.device(), softmax_backward, dx.f32(), g.f32(), pd.f32(), pd.size(0), pd.size(1));
    return grads{inv_temp != 1.f ? mul(dx, inv_temp) : dx};
  });
  // path -> probs (the selected columns) and path_parent; without probs_grad, path -> logits through the softmax
  // and the temperature in one kernel (ops_route.h).
  const bool need_parent = path_parent.defined() && path_parent.requires_grad();
  Tensor child = out.child;
  out.path = record(probs_grad ? "route_gates" : "route_gates_logits", out.path,
                    {probs_grad ? out.probs : logits, path_parent},
                    [pd, child, par, inv_temp, k, renorm, need_parent, probs_grad](const Tensor& gy) {
                      const int64_t P = pd.size(0), b = pd.size(1);
                      Tensor g = gy.contiguous();
                      Tensor d = Tensor::empty({P, b}, DType::F32, pd.device()), dparent;
                      if (need_parent) dparent = Tensor::empty(par.shape(), DType::F32, pd.device());
                      float* dp = need_parent ? dparent.f32() : nullptr;
                      const float* pp = par.defined() ? par.f32() : nullptr;
                      if (probs_grad)
                        CM_KERNEL(pd.device(), route_select_backward, d.f32(), dp, g.f32(), pd.f32(), child.i32(), pp,
                                  P, b, k, renorm);
                      else
                        CM_KERNEL(pd.device(), route_select_backward_logits, d.f32(), dp, g.f32(), pd.f32(),
                                  child.i32(), pp, inv_temp, P, b, k, renorm);
                      return grads{d, dparent};
                    });
  return out;
}

}  // namespace cm
