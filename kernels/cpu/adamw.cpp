// CPU AdamW: one elementwise pass over the parameters, split across threads in static blocks.
// The sqrt stays scalar: GCC will not vectorise sqrtf without -fno-math-errno (not in our flags, and the
// optimize attribute does not reach it); the pass is bound by its 28 bytes of memory traffic per element anyway.
#include "kernels/adamw.h"

#include <cmath>

namespace cm::cpu {

static constexpr int64_t kParallelMin = 1 << 14;

void adamw_hyper(float* hyper, float lr, float beta1, float beta2, int64_t t) {
  hyper[0] = lr;
  hyper[1] = (float)(1.0 - std::pow((double)beta1, (double)t));
  hyper[2] = (float)(1.0 - std::pow((double)beta2, (double)t));
}

void adamw_step(float* param, float* m, float* v, const float* grad, int64_t n, float lr, float beta1, float beta2,
                float eps, float weight_decay, int64_t t, const float* skip_if_nonfinite) {
  if (skip_if_nonfinite && !std::isfinite(*skip_if_nonfinite)) return;
  // Bias corrections in double: 1 - beta^t cancels, and float pow would add its own error on top.
  const float bc1 = (float)(1.0 - std::pow((double)beta1, (double)t));
  const float bc2 = (float)(1.0 - std::pow((double)beta2, (double)t));
  const float decay = lr * weight_decay;
  float* __restrict p = param;
  float* __restrict mm = m;
  float* __restrict vv = v;
  const float* __restrict g = grad;
#pragma omp parallel for schedule(static) if (n >= kParallelMin)
  for (int64_t i = 0; i < n; ++i) {
    float gi = g[i];
    float mi = beta1 * mm[i] + (1.0f - beta1) * gi;
    float vi = beta2 * vv[i] + (1.0f - beta2) * gi * gi;
    mm[i] = mi;
    vv[i] = vi;
    float pi = p[i] - decay * p[i];  // decoupled decay on the pre-step value
    p[i] = pi - lr * (mi / bc1) / (std::sqrt(vi / bc2) + eps);
  }
}

void clip_scale(float* g, int64_t n, const float* norm, float max_norm) {
  const float nv = *norm;
  if (!(max_norm > 0.f && std::isfinite(nv) && nv > max_norm)) return;
  const float scale = max_norm / (nv + 1e-6f);
#pragma omp parallel for schedule(static) if (n >= kParallelMin)
  for (int64_t i = 0; i < n; ++i) g[i] *= scale;
}

}  // namespace cm::cpu
