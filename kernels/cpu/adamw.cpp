// CPU AdamW: an elementwise pass over the parameters, split across threads in fixed blocks (kSumBlock elements of
// one tensor each). adamw_step runs one tensor; adamw_step_multi runs every tensor of a model in one parallel
// region, and can sum the squares of each run of blocks on its way, while it is in cache (the health checks'
// norms, with kernels/reduce.h's bits).
// The pass is bound by its 28 bytes of memory traffic per element (read p, m, v, g; write p, m, v); the loop
// vectorises, sqrt and divisions included (-fno-math-errno).
#include "kernels/adamw.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "engine/check.h"
#include "kernels/cpu/parallel.h"
#include "kernels/reduce.h"

namespace cm::cpu {
namespace {

// What every element of one step shares.
struct Hyper {
  float lr, beta1, beta2, eps, bc1, bc2;
};

Hyper hyper_for(float lr, float beta1, float beta2, float eps, int64_t t) {
  // Bias corrections in double: 1 - beta^t cancels, and float pow would add its own error on top.
  return {lr, beta1, beta2, eps, (float)(1.0 - std::pow((double)beta1, (double)t)),
          (float)(1.0 - std::pow((double)beta2, (double)t))};
}

// The update of n consecutive elements of one tensor: the only place the arithmetic is written, so the single and
// the fused step cannot drift apart.
inline void update(float* __restrict p, float* __restrict mm, float* __restrict vv, const float* __restrict g,
                   int64_t n, const Hyper& h, float weight_decay) {
  const float lr = h.lr, beta1 = h.beta1, beta2 = h.beta2, eps = h.eps, bc1 = h.bc1, bc2 = h.bc2;
  const float decay = lr * weight_decay;
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

}  // namespace

void adamw_hyper(float* hyper, float lr, float beta1, float beta2, int64_t t) {
  const Hyper h = hyper_for(lr, beta1, beta2, 0.f, t);
  hyper[0] = lr;
  hyper[1] = h.bc1;
  hyper[2] = h.bc2;
}

void adamw_step(float* param, float* m, float* v, const float* grad, int64_t n, float lr, float beta1, float beta2,
                float eps, float weight_decay, int64_t t, const float* skip_if_nonfinite) {
  if (skip_if_nonfinite && !std::isfinite(*skip_if_nonfinite)) return;
  const Hyper h = hyper_for(lr, beta1, beta2, eps, t);
  const int64_t nb = (n + kSumBlock - 1) / kSumBlock;
#pragma omp parallel for schedule(static) if (n >= parallel_min())
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t lo = b * kSumBlock, len = std::min(kSumBlock, n - lo);
    update(param + lo, m + lo, v + lo, grad + lo, len, h, weight_decay);
  }
}

void adamw_step_multi(const AdamWSlice* slices, int64_t count, float lr, float beta1, float beta2, float eps,
                      int64_t t, const float* skip_if_nonfinite, double* sums_param, double* sums_grad) {
  CM_CHECK(count >= 0 && (count == 0 || slices), "cpu::adamw_step_multi: count=", count);
  const bool step = !(skip_if_nonfinite && !std::isfinite(*skip_if_nonfinite));
  if (!step && !sums_param && !sums_grad) return;
  const Hyper h = hyper_for(lr, beta1, beta2, eps, t);
  // Work items: runs of up to kRun blocks of one slice (128 KiB of each array), slice by slice. first[s] = the
  // first item of slice s; block b of slice s has its partial sums at part[blocks[s] + b].
  constexpr int64_t kRun = 4 * kSumBlock;
  std::vector<int64_t> first((size_t)count + 1, 0), blocks((size_t)count + 1, 0);
  int64_t total = 0;
  for (int64_t s = 0; s < count; ++s) {
    CM_CHECK(slices[s].n >= 0, "cpu::adamw_step_multi: slice ", s, " has n=", slices[s].n);
    first[(size_t)s + 1] = first[(size_t)s] + (slices[s].n + kRun - 1) / kRun;
    blocks[(size_t)s + 1] = blocks[(size_t)s] + (slices[s].n + kSumBlock - 1) / kSumBlock;
    total += slices[s].n;
  }
  const int64_t items = first[(size_t)count];
  std::vector<double> part_p(sums_param ? (size_t)blocks[(size_t)count] : 0);
  std::vector<double> part_g(sums_grad ? (size_t)blocks[(size_t)count] : 0);
  // Dynamic: on a shared machine a thread that was descheduled takes fewer runs (results do not depend on who
  // takes which).
#pragma omp parallel for schedule(dynamic, 1) if (total >= parallel_min() && items > 1)
  for (int64_t it = 0; it < items; ++it) {
    const int64_t s = (int64_t)(std::upper_bound(first.begin(), first.end(), it) - first.begin()) - 1;
    const AdamWSlice& sl = slices[s];
    const int64_t r = it - first[(size_t)s], lo = r * kRun, len = std::min(kRun, sl.n - lo);
    const int64_t part = blocks[(size_t)s] + r * (kRun / kSumBlock);  // kRun is whole blocks: lo starts one
    if (sums_grad) sum_squares_blocks(part_g.data() + part, sl.grad + lo, len);
    if (step) update(sl.param + lo, sl.m + lo, sl.v + lo, sl.grad + lo, len, h, sl.weight_decay);
    if (sums_param) sum_squares_blocks(part_p.data() + part, sl.param + lo, len);  // still in cache
  }
  // Each slice's blocks added in order from 0: sum_squares's combination (kernels/reduce.h).
  for (int64_t s = 0; s < count; ++s) {
    double sp = 0.0, sg = 0.0;
    for (int64_t b = blocks[(size_t)s]; b < blocks[(size_t)s + 1]; ++b) {
      if (sums_param) sp += part_p[(size_t)b];
      if (sums_grad) sg += part_g[(size_t)b];
    }
    if (sums_param) sums_param[s] = sp;
    if (sums_grad) sums_grad[s] = sg;
  }
}

void clip_scale(float* g, int64_t n, const float* norm, float max_norm) {
  const float nv = *norm;
  if (!(max_norm > 0.f && std::isfinite(nv) && nv > max_norm)) return;
  const float scale = max_norm / (nv + 1e-6f);
#pragma omp parallel for schedule(static) if (n >= parallel_min())
  for (int64_t i = 0; i < n; ++i) g[i] *= scale;
}

}  // namespace cm::cpu
