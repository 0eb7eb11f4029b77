// CUDA AdamW (contract in kernels/adamw.h), single tensor and fused over many tensors (one launch per 48
// parameter tensors instead of one per tensor: a model has hundreds of small ones). Elementwise, so any launch
// shape gives the same bits; bias corrections are computed on the host in double, as on the CPU.
#include <cmath>
#include <vector>

#include "kernels/adamw.h"
#include "kernels/cuda/common.cuh"

namespace cm::cuda {

namespace {

constexpr int kThreads = 256;
constexpr int kPerThread = 4;
constexpr int64_t kPerBlock = kThreads * kPerThread;  // elements per block; a block never spans two tensors
constexpr int kMaxSlices = 48;                        // kernel parameters stay under 4 KB

struct Hyper {
  float lr, beta1, beta2, eps, bc1, bc2;
};

struct Batch {
  AdamWSlice s[kMaxSlices];
  int64_t first_block[kMaxSlices + 1];  // slice i owns blocks [first_block[i], first_block[i + 1])
  int count;
};

__device__ __forceinline__ void adamw_one(float* p, float* m, float* v, const float* g, int64_t i, const Hyper& h,
                                          float decay) {
  const float gi = g[i];
  const float mi = h.beta1 * m[i] + (1.0f - h.beta1) * gi;
  const float vi = h.beta2 * v[i] + (1.0f - h.beta2) * gi * gi;
  m[i] = mi;
  v[i] = vi;
  const float pi = p[i] - decay * p[i];  // decoupled decay on the pre-step value
  p[i] = pi - h.lr * (mi / h.bc1) / (sqrtf(vi / h.bc2) + h.eps);
}

// skip [1] or null: a non-finite value there (the step's gradient norm) leaves everything as it is.
__device__ __forceinline__ bool skipped(const float* skip) { return skip && !isfinite(*skip); }

__global__ void adamw_kernel(float* __restrict__ p, float* __restrict__ m, float* __restrict__ v,
                             const float* __restrict__ g, int64_t n, Hyper h, float decay, const float* skip) {
  if (skipped(skip)) return;
  for (int64_t i = gtid(); i < n; i += gstride()) adamw_one(p, m, v, g, i, h, decay);
}

__global__ void adamw_multi_kernel(Batch b, Hyper h, const float* skip, const float* hyper) {
  if (skipped(skip)) return;
  if (hyper) {  // device-resident lr and bias corrections (a captured step: written before each replay)
    h.lr = hyper[0];
    h.bc1 = hyper[1];
    h.bc2 = hyper[2];
  }
  // Which slice owns this block: a short linear search (at most 48 entries, the same for the whole block).
  int s = 0;
  while (s + 1 < b.count && (int64_t)blockIdx.x >= b.first_block[s + 1]) ++s;
  const AdamWSlice& sl = b.s[s];
  const int64_t base = ((int64_t)blockIdx.x - b.first_block[s]) * kPerBlock;
  const float decay = h.lr * sl.weight_decay;
#pragma unroll
  for (int k = 0; k < kPerThread; ++k) {
    const int64_t i = base + k * kThreads + threadIdx.x;  // consecutive threads, consecutive elements
    if (i < sl.n) adamw_one(sl.param, sl.m, sl.v, sl.grad, i, h, decay);
  }
}

__global__ void clip_scale_kernel(float* __restrict__ g, int64_t n, const float* __restrict__ norm, float max_norm) {
  const float nv = *norm;
  if (!(max_norm > 0.f && isfinite(nv) && nv > max_norm)) return;
  const float scale = max_norm / (nv + 1e-6f);  // IEEE division (no fast math): the CPU's bits
  for (int64_t i = gtid(); i < n; i += gstride()) g[i] *= scale;
}

// One thread: the sums in index order, in double, as the host did before (a few hundred values per step).
__global__ void norm_from_sums_kernel(float* __restrict__ norm, const float* __restrict__ sums, int64_t n) {
  if (blockIdx.x != 0 || threadIdx.x != 0) return;
  double ss = 0.0;
  for (int64_t i = 0; i < n; ++i) ss += (double)sums[i];
  *norm = (float)sqrt(ss);
}

Hyper make_hyper(float lr, float beta1, float beta2, float eps, int64_t t) {
  CM_CHECK(t >= 1, "cuda::adamw: step count t must be >= 1, got ", t);
  Hyper h;
  h.lr = lr;
  h.beta1 = beta1;
  h.beta2 = beta2;
  h.eps = eps;
  h.bc1 = (float)(1.0 - std::pow((double)beta1, (double)t));
  h.bc2 = (float)(1.0 - std::pow((double)beta2, (double)t));
  return h;
}

}  // namespace

void adamw_step(float* param, float* m, float* v, const float* grad, int64_t n, float lr, float beta1, float beta2,
                float eps, float weight_decay, int64_t t, const float* skip_if_nonfinite) {
  CM_CHECK(n >= 0, "cuda::adamw_step: n=", n);
  const Hyper h = make_hyper(lr, beta1, beta2, eps, t);
  if (n == 0) return;
  adamw_kernel<<<grid_for(n, kThreads), kThreads, 0, stream()>>>(param, m, v, grad, n, h, lr * weight_decay,
                                                                  skip_if_nonfinite);
  cudaCheckLaunch("adamw_kernel");
}

void clip_scale(float* g, int64_t n, const float* norm, float max_norm) {
  CM_CHECK(n >= 0 && norm, "cuda::clip_scale: n=", n);
  if (n == 0) return;
  clip_scale_kernel<<<grid_for(n, kThreads), kThreads, 0, stream()>>>(g, n, norm, max_norm);
  cudaCheckLaunch("clip_scale_kernel");
}

void norm_from_sums(float* norm, const float* sums, int64_t n) {
  CM_CHECK(n >= 0 && norm, "cuda::norm_from_sums: n=", n);
  norm_from_sums_kernel<<<1, 1, 0, stream()>>>(norm, sums, n);
  cudaCheckLaunch("norm_from_sums_kernel");
}

void adamw_step_multi(const AdamWSlice* slices, int64_t count, float lr, float beta1, float beta2, float eps,
                      int64_t t, const float* skip_if_nonfinite, const float* hyper) {
  CM_CHECK(count >= 0, "cuda::adamw_step_multi: count=", count);
  const Hyper h = make_hyper(lr, beta1, beta2, eps, hyper ? 1 : t);
  Batch b{};
  auto flush = [&] {
    if (b.count == 0) return;
    const int64_t blocks = b.first_block[b.count];
    CM_CHECK(blocks < (int64_t(1) << 31), "cuda::adamw_step_multi: ", blocks, " blocks");
    if (blocks > 0) {
      adamw_multi_kernel<<<(unsigned)blocks, kThreads, 0, stream()>>>(b, h, skip_if_nonfinite, hyper);
      cudaCheckLaunch("adamw_multi_kernel");
    }
    b.count = 0;
  };
  for (int64_t i = 0; i < count; ++i) {
    CM_CHECK(slices[i].n >= 0, "cuda::adamw_step_multi: slice ", i, " has n=", slices[i].n);
    if (slices[i].n == 0) continue;
    const int64_t nb = ceil_div(slices[i].n, kPerBlock);
    // A batch closes when full or when its grid would pass 2^30 blocks (a single huge tensor gets its own).
    if (b.count == kMaxSlices || (b.count > 0 && b.first_block[b.count] + nb >= (int64_t(1) << 30))) flush();
    if (b.count == 0) b.first_block[0] = 0;
    b.s[b.count] = slices[i];
    b.first_block[b.count + 1] = b.first_block[b.count] + nb;
    ++b.count;
  }
  flush();
}

}  // namespace cm::cuda
