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

void cross_entropy_inv_valid(float* inv_valid, const int32_t* targets, int64_t N, int64_t V, int32_t ignore_index) {
  int64_t valid = 0;
  for (int64_t n = 0; n < N; ++n) valid += targets[n] != ignore_index && targets[n] >= 0 && targets[n] < V;
  inv_valid[0] = valid > 0 ? 1.0f / (float)valid : 0.0f;
}

void z_loss_forward(float* loss, float* lse, const float* logits, int64_t R, int64_t E, float weight) {
#pragma omp parallel for schedule(static) if (R * E >= kParallelMin)
  for (int64_t r = 0; r < R; ++r) {  // the cross-entropy's logsumexp
    const float* __restrict x = logits + r * E;
    float m = -INFINITY;
#pragma omp simd reduction(max : m)
    for (int64_t e = 0; e < E; ++e) m = x[e] > m ? x[e] : m;
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t e = 0; e < E; ++e) s += fast_exp(x[e] - m);
    lse[r] = m + std::log(s);
  }
  double acc = 0.0;  // row order: the same bits for any thread count
  for (int64_t r = 0; r < R; ++r) acc += (double)lse[r] * (double)lse[r];
  loss[0] = R > 0 ? (float)((double)weight * acc / (double)R) : 0.0f;
}

void z_loss_backward(float* dlogits, const float* dloss, const float* logits, const float* lse, int64_t R,
                     int64_t E, float weight) {
  const float k = dloss[0] * weight * 2.0f / (float)R;
#pragma omp parallel for schedule(static) if (R * E >= kParallelMin)
  for (int64_t r = 0; r < R; ++r) {
    const float l = lse[r];
    for (int64_t e = 0; e < E; ++e) dlogits[r * E + e] = k * l * fast_exp(logits[r * E + e] - l);
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
