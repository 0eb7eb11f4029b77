// CUDA twin of the dense FFN's fault guard and health update (contract in kernels/health.h). Row norms: one thread
// per row walks the row in column order, so the double sum has the CPU's order and bits. The classification and the
// counters are one thread's loop in row order (deterministic sums, as on the CPU): O(n) on one thread, small next to
// the FFN's GEMMs that made y.
#include "kernels/health.h"
#include "kernels/cuda/common.cuh"

namespace cm::cuda {

namespace {

constexpr int kThreads = 256;

__global__ void row_norms_kernel(double* __restrict__ norms, const float* __restrict__ y, int64_t n, int64_t C) {
  for (int64_t i = gtid(); i < n; i += gstride()) {
    const float* r = y + i * C;
    double ss = 0.0;
    for (int64_t c = 0; c < C; ++c) ss += (double)r[c] * r[c];
    norms[i] = sqrt(ss);
  }
}

// One thread: classify in row order (bad rows get norm -1), count, set the flag.
__global__ void classify_kernel(int32_t* __restrict__ all_ok, double* __restrict__ pend, double* __restrict__ norms,
                                int64_t n, const float* __restrict__ state, float factor, bool count) {
  if (blockIdx.x != 0 || threadIdx.x != 0) return;
  const float ema = state[1];
  int64_t bad = 0, good = 0;
  double norm_sum = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const double nm = norms[i];
    if (!isfinite(nm) || (ema > 0.f && nm > (double)factor * ema)) {
      ++bad;
      norms[i] = -1.0;
    } else {
      ++good;
      norm_sum += nm;
    }
  }
  *all_ok = bad == 0 ? 1 : 0;
  if (count) {
    pend[0] += (double)n;
    pend[1] += (double)bad;
    pend[2] += (double)good;
    pend[3] += norm_sum;
  }
}

__global__ void guard_copy_kernel(float* __restrict__ out, const float* __restrict__ y,
                                  const double* __restrict__ norms, int64_t n, int64_t C, bool zero_bad) {
  const int64_t total = n * C;
  for (int64_t k = gtid(); k < total; k += gstride()) out[k] = zero_bad && norms[k / C] < 0.0 ? 0.f : y[k];
}

__global__ void guard_backward_kernel(float* __restrict__ dx, const float* __restrict__ g,
                                      const int32_t* __restrict__ all_ok, int64_t n) {
  const bool pass = *all_ok != 0;
  for (int64_t i = gtid(); i < n; i += gstride()) dx[i] = pass ? g[i] : 0.f;
}

__global__ void health_update_kernel(float* __restrict__ state, double* __restrict__ pend,
                                     const float* __restrict__ sums, int64_t nw, int64_t ng, float decay,
                                     float factor, float rel_min, bool use_reliability) {
  if (blockIdx.x != 0 || threadIdx.x != 0) return;
  double wss = 0.0, gss = 0.0;
  for (int64_t i = 0; i < nw; ++i) wss += (double)sums[i];
  for (int64_t i = nw; i < nw + ng; ++i) gss += (double)sums[i];
  const double wn = sqrt(wss);
  float rel = state[0], ema = state[1], wema = state[2], use = state[3];
  const bool weights_ok = isfinite(wn) && (wema <= 0.f || (wn <= (double)factor * wema && wn >= (double)wema / factor));
  if (weights_ok) wema = wema > 0.f ? decay * wema + (1.f - decay) * (float)wn : (float)wn;
  const double rows = pend[0], bad = pend[1], good = pend[2];
  if (good > 0.0 && bad == 0.0) {
    const float mean = (float)(pend[3] / good);
    ema = ema > 0.f ? decay * ema + (1.f - decay) * mean : mean;
  }
  if (use_reliability) {
    const bool grads_ok = isfinite(gss);
    bool update = true;
    float health = 0.f;
    if (weights_ok && grads_ok) {
      if (rows > 0.0) health = 1.f - (float)bad / (float)rows;
      else update = false;
    }
    if (update) rel = fminf(fmaxf(decay * rel + (1.f - decay) * health, rel_min), 1.f);
  }
  if (rows > 0.0) use = decay * use + (1.f - decay) * (float)rows / (float)rows;
  state[0] = rel;
  state[1] = ema;
  state[2] = wema;
  state[3] = use;
  pend[0] = pend[1] = pend[2] = pend[3] = 0.0;
}

}  // namespace

void ffn_guard_forward(float* out, int32_t* all_ok, double* pend, double* norms, const float* y, int64_t n, int64_t C,
                       const float* state, float factor, bool zero_bad, bool count) {
  CM_CHECK(n >= 0 && C > 0, "cuda::ffn_guard_forward: bad sizes n = ", n, ", C = ", C);
  if (n > 0) {
    row_norms_kernel<<<grid_for(n, kThreads), kThreads, 0, stream()>>>(norms, y, n, C);
    cudaCheckLaunch("row_norms_kernel");
  }
  classify_kernel<<<1, 1, 0, stream()>>>(all_ok, pend, norms, n, state, factor, count);
  cudaCheckLaunch("classify_kernel");
  if (out && n > 0) {
    guard_copy_kernel<<<grid_for(n * C, kThreads), kThreads, 0, stream()>>>(out, y, norms, n, C, zero_bad);
    cudaCheckLaunch("guard_copy_kernel");
  }
}

void ffn_guard_backward(float* dx, const float* g, const int32_t* all_ok, int64_t n) {
  if (n <= 0) return;
  guard_backward_kernel<<<grid_for(n, kThreads), kThreads, 0, stream()>>>(dx, g, all_ok, n);
  cudaCheckLaunch("guard_backward_kernel");
}

void ffn_health_update(float* state, double* pend, const float* sums, int64_t nw, int64_t ng, float decay,
                       float factor, float rel_min, bool use_reliability) {
  health_update_kernel<<<1, 1, 0, stream()>>>(state, pend, sums, nw, ng, decay, factor, rel_min, use_reliability);
  cudaCheckLaunch("health_update_kernel");
}

}  // namespace cm::cuda
