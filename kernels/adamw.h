// AdamW (Loshchilov & Hutter), one step over a flat parameter array, in place. Per element, with t >= 1 the
// 1-based step count:
//   param -= lr * weight_decay * param                      (decoupled weight decay, on the pre-step value)
//   m = beta1 * m + (1 - beta1) * grad
//   v = beta2 * v + (1 - beta2) * grad^2
//   param -= lr * (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps)
// This is PyTorch's torch.optim.AdamW update. Elementwise: any thread count gives the same bits.
// Letters: n parameters (one tensor, or several concatenated).
#pragma once
#include <cstdint>

namespace cm::cpu {

// param [n], m [n], v [n] updated in place; grad [n].
void adamw_step(float* param, float* m, float* v, const float* grad, int64_t n, float lr, float beta1, float beta2,
                float eps, float weight_decay, int64_t t);

}  // namespace cm::cpu

#if CM_CUDA
// CUDA twins (kernels/cuda/adamw.cu), launched on the engine's stream.
namespace cm::cuda {

void adamw_step(float* param, float* m, float* v, const float* grad, int64_t n, float lr, float beta1, float beta2,
                float eps, float weight_decay, int64_t t);

// One parameter tensor of a fused step: param/m/v [n] updated in place from grad [n], with its own weight decay
// (0 for norms and biases, typically).
struct AdamWSlice {
  float* param;
  float* m;
  float* v;
  const float* grad;
  int64_t n;
  float weight_decay;
};
// The same update over every slice (slices is a host array), in one launch per 48 slices: the fused optimizer
// step over all parameters. Each element gets exactly adamw_step's arithmetic.
void adamw_step_multi(const AdamWSlice* slices, int64_t count, float lr, float beta1, float beta2, float eps,
                      int64_t t);

}  // namespace cm::cuda
#endif
