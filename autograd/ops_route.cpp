// The router level ops (autograd/ops_route.h): argument checks, the kernels of kernels/route.h, and the backward
// rules beside the forward.
#include "autograd/ops_route.h"

#include "engine/dispatch.h"
#include "kernels/route.h"

namespace cm {

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
    if (dev == Device::CPU)
      for (int64_t p = 0; p < P; ++p)
        CM_REQUIRE(nd.i32()[p] >= 0 && nd.i32()[p] < n, "routed_logits: node ", nd.i32()[p], " of pair ", p,
                   " outside [0, ", n, ")");
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

}  // namespace cm
