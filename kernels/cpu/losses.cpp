// CPU losses. Cross-entropy: one row per iteration of a static OpenMP loop; each row is two vectorised passes over
// V (max, then sum of exp) forward and one pass backward. Deterministic: a row belongs to one thread.
// Router z-loss and load balance (DESIGN.md 4.3): the CPU twins of kernels/cuda/losses.cu.
#include "kernels/losses.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels/cpu/fastmath.h"
#include "kernels/cpu/parallel.h"

namespace cm::cpu {

void cross_entropy_forward(float* losses, float* lse, const float* logits, const int32_t* targets, int64_t N,
                           int64_t V, int32_t ignore_index) {
#pragma omp parallel for schedule(static) if (N * V >= parallel_min_compute())
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
#pragma omp parallel for schedule(static) if (R * E >= parallel_min_compute())
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
#pragma omp parallel for schedule(static) if (R * E >= parallel_min_compute())
  for (int64_t r = 0; r < R; ++r) {
    const float l = lse[r];
    for (int64_t e = 0; e < E; ++e) dlogits[r * E + e] = k * l * fast_exp(logits[r * E + e] - l);
  }
}

void cross_entropy_backward(float* dlogits, const float* logits, const float* lse, const int32_t* targets,
                            float scale, int64_t N, int64_t V, int32_t ignore_index) {
#pragma omp parallel for schedule(static) if (N * V >= parallel_min_compute())
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

// The inverse target shares of a level's logit bias log_bias [G, E] (kernels/losses.h): false, and inv untouched,
// when there is none or every entry is 0 (then the balanced target 1/E is used, in its own arithmetic).
static bool inverse_shares(std::vector<float>& inv, const float* log_bias, int64_t G, int64_t E) {
  if (!log_bias || std::all_of(log_bias, log_bias + G * E, [](float v) { return v == 0.f; })) return false;
  inv.assign((size_t)(G * E), 0.f);
  std::vector<double> rho((size_t)E);
  for (int64_t g = 0; g < G; ++g) {
    double rsum = 0.0;
    for (int64_t e = 0; e < E; ++e) {
      rho[(size_t)e] = std::exp((double)log_bias[g * E + e]);  // exp(-inf) = 0 for pruned children
      rsum += rho[(size_t)e];
    }
    for (int64_t e = 0; e < E; ++e)
      if (rho[(size_t)e] > 0.0) inv[(size_t)(g * E + e)] = (float)(rsum / rho[(size_t)e]);
  }
  return true;
}

// Load balance. Per (g, e): S = sum of probs over g's rows in double, in row order (a block of columns belongs to
// one thread, which walks every row); counts are integers. Then frac, mean_prob and the loss, summed in double in
// (g, e) order.
void load_balance_forward(float* loss, float* frac, float* mean_prob, float* tokens, const float* probs,
                          const int32_t* indices, const int32_t* group, const float* log_bias, int64_t R, int64_t E,
                          int64_t K, int64_t G, float weight) {
  const int64_t GE = G * E;
  std::vector<float> inv;
  const float* inv_share = inverse_shares(inv, log_bias, G, E) ? inv.data() : nullptr;  // null: E everywhere
  auto group_of = [&](int64_t r) -> int64_t {  // -1: skipped
    const int64_t g = group ? group[r] : 0;
    return g >= 0 && g < G ? g : -1;
  };
  std::vector<double> S((size_t)GE, 0.0);
  std::vector<int64_t> cnt((size_t)GE, 0), T((size_t)G, 0);
  for (int64_t r = 0; r < R; ++r) {
    const int64_t g = group_of(r);
    if (g < 0) continue;
    ++T[(size_t)g];
    for (int64_t j = 0; j < K; ++j) {
      const int32_t e = indices[r * K + j];
      if (e >= 0 && e < E) ++cnt[(size_t)(g * E + e)];
    }
  }
  constexpr int64_t kCols = 64;  // columns per task: a cache line or more of each row
  const int64_t blocks = (E + kCols - 1) / kCols;
#pragma omp parallel for schedule(static) if (R * E >= parallel_min_compute())
  for (int64_t cb = 0; cb < blocks; ++cb) {
    const int64_t e0 = cb * kCols, e1 = std::min(E, e0 + kCols);
    for (int64_t r = 0; r < R; ++r) {
      const int64_t g = group_of(r);
      if (g < 0) continue;
      double* __restrict s = S.data() + g * E;
      const float* __restrict p = probs + r * E;
      for (int64_t e = e0; e < e1; ++e) s[e] += (double)p[e];
    }
  }
  double acc = 0.0, tall = 0.0;
  for (int64_t g = 0; g < G; ++g) {
    const int64_t t = T[(size_t)g];
    tokens[g] = (float)t;
    tall += (double)t;
    for (int64_t e = 0; e < E; ++e) {
      const int64_t i = g * E + e;
      // frac: the CUDA twin's float expression (the backward reads it: the same bits on both backends).
      const float f = t > 0 ? (float)cnt[(size_t)i] / (float)(t * K) : 0.f;
      const float p = t > 0 ? (float)(S[(size_t)i] / (double)t) : 0.f;
      frac[i] = f;
      mean_prob[i] = p;
      acc += (double)t * (double)f * (double)p * (inv_share ? (double)inv_share[i] : 1.0);
    }
  }
  loss[0] = tall > 0 ? (float)((double)weight * (inv_share ? 1.0 : (double)E) * acc / tall) : 0.f;
}

void load_balance_backward(float* dprobs, const float* dloss, const float* frac, const float* tokens,
                           const int32_t* group, const float* log_bias, int64_t R, int64_t E, int64_t G,
                           float weight) {
  std::vector<float> inv;
  const float* inv_share = inverse_shares(inv, log_bias, G, E) ? inv.data() : nullptr;  // null: E everywhere
  double tall = 0.0;
  for (int64_t g = 0; g < G; ++g) tall += (double)tokens[g];
  const float k =
      tall > 0 ? (float)((double)dloss[0] * (double)weight * (inv_share ? 1.0 : (double)E) / tall) : 0.f;
#pragma omp parallel for schedule(static) if (R * E >= parallel_min_compute())
  for (int64_t r = 0; r < R; ++r) {
    const int64_t g = group ? group[r] : 0;
    float* __restrict d = dprobs + r * E;
    if (g < 0 || g >= G) {
      for (int64_t e = 0; e < E; ++e) d[e] = 0.f;
      continue;
    }
    const float* f = frac + g * E;
    if (inv_share) {
      const float* q = inv_share + g * E;
      for (int64_t e = 0; e < E; ++e) d[e] = (k * q[e]) * f[e];
    } else {
      for (int64_t e = 0; e < E; ++e) d[e] = k * f[e];
    }
  }
}

}  // namespace cm::cpu
