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

namespace cm {

// One parameter tensor of a fused step (cpu:: and cuda::adamw_step_multi): param/m/v [n] updated in place from
// grad [n], with its own weight decay (0 for norms and biases, typically). Slices must not share memory.
struct AdamWSlice {
  float* param;
  float* m;
  float* v;
  const float* grad;
  int64_t n;
  float weight_decay;
};

}  // namespace cm

namespace cm::cpu {

// param [n], m [n], v [n] updated in place; grad [n]. skip_if_nonfinite [1] or null: when it points at a NaN or an
// Inf (the gradient norm of a step whose gradients overflowed), nothing is updated. The flag is read where the
// kernel runs, so a device step never waits for the host to decide.
void adamw_step(float* param, float* m, float* v, const float* grad, int64_t n, float lr, float beta1, float beta2,
                float eps, float weight_decay, int64_t t, const float* skip_if_nonfinite = nullptr);

// The values a step reads besides its tensors: hyper [3] = lr, 1 - beta1^t, 1 - beta2^t (bias corrections in double,
// then float: the twins' arithmetic). Written into device memory, they let a captured step run at any t.
void adamw_hyper(float* hyper, float lr, float beta1, float beta2, int64_t t);

// Gradient clipping with the norm read where the kernel runs: g [n] *= max_norm / (norm + 1e-6) when *norm is
// finite and above max_norm > 0 (the scale in float, as the host formula); otherwise g is left as it is.
void clip_scale(float* g, int64_t n, const float* norm, float max_norm);

// The fused step over every parameter tensor (slices: a host array of `count`): one parallel region over all of
// them, cut into blocks of kSumBlock elements of one slice each (kernels/reduce.h), instead of a region (a fork
// and join of the thread team) per tensor. Each element gets exactly adamw_step's arithmetic, so the
// result is adamw_step's, slice by slice, bit for bit, for any thread count.
// The per-tensor sums of squares that the experts' health checks read after the step (model/moe.cpp after_step)
// come out of the same pass, while the block is in cache: sums_param [count] (or null) = sum of squares of each
// slice's updated parameter, sums_grad [count] (or null) = of its gradient as read. Both are cpu::sum_squares's
// bits (kernels/reduce.h: the same blocks, lanes and order). A skipped step (skip_if_nonfinite non-finite) updates
// nothing and still gives the sums (of the parameters as they are).
void adamw_step_multi(const AdamWSlice* slices, int64_t count, float lr, float beta1, float beta2, float eps,
                      int64_t t, const float* skip_if_nonfinite = nullptr, double* sums_param = nullptr,
                      double* sums_grad = nullptr);

}  // namespace cm::cpu

#if CM_CUDA
// CUDA twins (kernels/cuda/adamw.cu), launched on the engine's stream.
namespace cm::cuda {

void adamw_step(float* param, float* m, float* v, const float* grad, int64_t n, float lr, float beta1, float beta2,
                float eps, float weight_decay, int64_t t, const float* skip_if_nonfinite = nullptr);
void clip_scale(float* g, int64_t n, const float* norm, float max_norm);
// norm [1] = sqrt(sum_i sums[i]), summed in double in index order by one thread (sums [n]: per-tensor sums of
// squares made on the device): the global gradient norm without a copy to the host.
void norm_from_sums(float* norm, const float* sums, int64_t n);

using AdamWSlice = cm::AdamWSlice;  // one parameter tensor of a fused step (above)
// The same update over every slice (slices is a host array), in one launch per 48 slices: the fused optimizer
// step over all parameters. Each element gets exactly adamw_step's arithmetic. hyper [3] on the device (adamw_hyper's
// values) or null: when given, the kernels read lr and the bias corrections there, and lr and t are ignored; what a
// CUDA graph captures is then a step for any lr and t (engine/cuda.h, Graph).
void adamw_step_multi(const AdamWSlice* slices, int64_t count, float lr, float beta1, float beta2, float eps,
                      int64_t t, const float* skip_if_nonfinite = nullptr, const float* hyper = nullptr);

}  // namespace cm::cuda
#endif
