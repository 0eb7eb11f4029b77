// CPU cross-entropy. One row per iteration of a static OpenMP loop; each row is two vectorised passes over V
// (max, then sum of exp) forward and one pass backward. Deterministic: a row belongs to one thread.
#include "kernels/losses.h"

#include <cmath>

#include "kernels/cpu/fastmath.h"

namespace cm::cpu {

static constexpr int64_t kParallelMin = 1 << 15;

void cross_entropy_forward(float* losses, float* lse, const float* logits, const int32_t* targets, int64_t N,
                           int64_t V, int32_t ignore_index) {
#pragma omp parallel for schedule(static) if (N * V >= kParallelMin)
  for (int64_t n = 0; n < N; ++n) {
    const float* __restrict x = logits + n * V;
    float m = -INFINITY;
#pragma omp simd reduction(max : m)
    for (int64_t v = 0; v < V; ++v) m = x[v] > m ? x[v] : m;
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t v = 0; v < V; ++v) s += fast_exp(x[v] - m);
    float ls = std::log(s);
    lse[n] = m + ls;
    int32_t t = targets[n];
    // loss = lse - x[t], written as (m - x[t]) + log s to keep the low bits when logits are large.
    losses[n] = t == ignore_index ? 0.0f : (m - x[t]) + ls;
  }
}

void cross_entropy_backward(float* dlogits, const float* logits, const float* lse, const int32_t* targets,
                            float scale, int64_t N, int64_t V, int32_t ignore_index) {
#pragma omp parallel for schedule(static) if (N * V >= kParallelMin)
  for (int64_t n = 0; n < N; ++n) {
    const float* __restrict x = logits + n * V;
    float* __restrict dx = dlogits + n * V;
    int32_t t = targets[n];
    if (t == ignore_index) {
      for (int64_t v = 0; v < V; ++v) dx[v] = 0.0f;
      continue;
    }
    float l = lse[n];
    for (int64_t v = 0; v < V; ++v) dx[v] = fast_exp(x[v] - l) * scale;
    dx[t] -= scale;
  }
}

}  // namespace cm::cpu
