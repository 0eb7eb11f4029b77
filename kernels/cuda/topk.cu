// CUDA top-k and the router's fused softmax + top-k. The order is kernels/topk.h's: larger first, ties -> lower
// index, NaN above every number (NaNs among themselves by index), -0.0 ties +0.0. With that order a strict total
// order on (value, index), every reduction below picks one answer whatever the grouping, so the GPU selects the
// same elements as the CPU, bit for bit.
//
// Paths:
//   k <= 8 (routing): one warp per row. Each lane walks its columns (lane, lane+32, ...: coalesced) keeping its
//     best K in registers (a sorted array indexed only by unrolled constants, so it stays in registers); then K
//     rounds of a warp arg-best by butterfly shuffles, the winning lane popping its head. One read of the row.
//   k > 8: one block per row, k rounds; round j finds the best element that ranks below winner j-1 (the strict
//     order makes "below the previous winner" exactly "not yet taken"). O(k n) reads, from L1/L2 after the
//     first round: for sampling-style top-k (k = 50 over a vocabulary), not for the hot path.
// The fused router kernel selects on the logits (softmax is monotonic), then makes one more pass for the sum of
// exponentials and, when asked, a last one writing all probabilities; the gates are computed with the very same
// expression as the probabilities, so gates[r, j] == probs[r, indices[r, j]] bit for bit.
#include <climits>

#include "kernels/cuda/common.cuh"
#include "kernels/topk.h"

namespace cm::cuda {

namespace {

// ---------------------------------------------------------------- kernels

// beats / warp_best / block_best: kernels/cuda/common.cuh.

// One warp per row, K <= 8 kept per lane. SOFTMAX: x are logits; values become softmax gates and, when probs is
// not null, every probability of the row is written too.
template <int K, bool SOFTMAX>
__global__ void topk_warp_kernel(float* __restrict__ values, int32_t* __restrict__ indices, float* __restrict__ probs,
                                 const float* __restrict__ x, int64_t R, int n) {
  const int lane = threadIdx.x % kWarp;
  const int64_t warps_per_grid = (int64_t)gridDim.x * (blockDim.x / kWarp);
  for (int64_t r = (int64_t)blockIdx.x * (blockDim.x / kWarp) + threadIdx.x / kWarp; r < R; r += warps_per_grid) {
    const float* xr = x + r * n;
    float bv[K];
    int bi[K];
#pragma unroll
    for (int j = 0; j < K; ++j) {
      bv[j] = -INFINITY;
      bi[j] = INT_MAX;  // any real element beats this sentinel (a real -inf wins on the index)
    }
    for (int c = lane; c < n; c += kWarp) {
      const float v = xr[c];
      if (beats(v, c, bv[K - 1], bi[K - 1])) {
        bv[K - 1] = v;
        bi[K - 1] = c;
#pragma unroll
        for (int j = K - 1; j > 0; --j) {  // bubble the newcomer up; constant indices keep bv/bi in registers
          if (beats(bv[j], bi[j], bv[j - 1], bi[j - 1])) {
            const float tv = bv[j];
            bv[j] = bv[j - 1];
            bv[j - 1] = tv;
            const int ti = bi[j];
            bi[j] = bi[j - 1];
            bi[j - 1] = ti;
          }
        }
      }
    }
    // K rounds of warp arg-best over the lanes' heads. Lane j keeps winner j for the coalesced store.
    float myv = 0.f;
    int myi = 0;
#pragma unroll
    for (int j = 0; j < K; ++j) {
      float v = bv[0];
      int i = bi[0];
      warp_best(v, i);
      if (lane == j) {
        myv = v;
        myi = i;
      }
      if (bi[0] == i) {  // the owner (column indices are distinct across lanes) pops its head
#pragma unroll
        for (int q = 0; q < K - 1; ++q) {
          bv[q] = bv[q + 1];
          bi[q] = bi[q + 1];
        }
        bv[K - 1] = -INFINITY;
        bi[K - 1] = INT_MAX;
      }
    }
    if (SOFTMAX) {
      // The row max is winner 0 (a NaN there makes the whole row NaN, as the sum would anyway).
      const float m = __shfl_sync(0xffffffffu, myv, 0);
      float s = 0.f;
      for (int c = lane; c < n; c += kWarp) s += expf(xr[c] - m);
      s = warp_sum(s);
      const float inv = 1.0f / s;
      if (probs) {
        float* pr = probs + r * n;
        for (int c = lane; c < n; c += kWarp) pr[c] = expf(xr[c] - m) * inv;
      }
      myv = expf(myv - m) * inv;
    }
    if (lane < K) {
      values[r * K + lane] = myv;
      indices[r * K + lane] = myi;
    }
  }
}

// One block per row, any k (including k > n's practical sizes; the launcher checks k <= n).
template <bool SOFTMAX>
__global__ void topk_block_kernel(float* __restrict__ values, int32_t* __restrict__ indices,
                                  float* __restrict__ probs, const float* __restrict__ x, int64_t R, int n, int k) {
  __shared__ float sv[kWarp];
  __shared__ int si[kWarp];
  __shared__ float sred[kWarp];
  for (int64_t r = blockIdx.x; r < R; r += gridDim.x) {
    const float* xr = x + r * n;
    float m = 0.f, inv = 0.f;
    if (SOFTMAX) {
      float lm = -INFINITY;
      for (int c = threadIdx.x; c < n; c += blockDim.x) lm = fmaxf(lm, xr[c]);
      m = block_max(lm, sred);  // NaN-blind like the CPU's max; a NaN still poisons the sum below
      float s = 0.f;
      for (int c = threadIdx.x; c < n; c += blockDim.x) s += expf(xr[c] - m);
      s = block_sum(s, sred);
      inv = 1.0f / s;
      if (probs) {
        float* pr = probs + r * n;
        for (int c = threadIdx.x; c < n; c += blockDim.x) pr[c] = expf(xr[c] - m) * inv;
      }
    }
    float pv = 0.f;
    int pi = -1;  // previous winner; round 0 has none
    for (int j = 0; j < k; ++j) {
      float v = -INFINITY;
      int i = INT_MAX;
      for (int c = threadIdx.x; c < n; c += blockDim.x) {
        const float xc = xr[c];
        if ((j == 0 || beats(pv, pi, xc, c)) && beats(xc, c, v, i)) {
          v = xc;
          i = c;
        }
      }
      block_best(v, i, sv, si);
      if (threadIdx.x == 0) {
        values[r * k + j] = SOFTMAX ? expf(v - m) * inv : v;
        indices[r * k + j] = i;
      }
      pv = v;
      pi = i;
    }
    // No barrier needed before the next row reuses the shared scratch: block_max, block_sum and block_best each
    // begin with __syncthreads, which orders their writes after every thread's reads of the previous call.
  }
}

// dx [R, n] = 0 except dx[r, indices[r, j]] = dvalues[r, j]. One warp per row: zeros first, then (after
// __syncwarp, which orders the lanes' writes) the scattered values.
__global__ void topk_backward_kernel(float* __restrict__ dx, const float* __restrict__ dvalues,
                                     const int32_t* __restrict__ indices, int64_t R, int n, int k) {
  const int lane = threadIdx.x % kWarp;
  const int64_t warps_per_grid = (int64_t)gridDim.x * (blockDim.x / kWarp);
  for (int64_t r = (int64_t)blockIdx.x * (blockDim.x / kWarp) + threadIdx.x / kWarp; r < R; r += warps_per_grid) {
    float* dr = dx + r * n;
    for (int c = lane; c < n; c += kWarp) dr[c] = 0.f;
    __syncwarp();
    for (int j = lane; j < k; j += kWarp) dr[indices[r * k + j]] = dvalues[r * k + j];
    __syncwarp();
  }
}

// Router backward, one warp per row: g = dprobs + scatter(dgates), dlogits = p * (g - sum(g * p)).
// The selected columns are read from `indices` (k of them, re-read per element from L1: k <= 8 on this path's
// hot use, and any k works).
__global__ void softmax_topk_backward_kernel(float* __restrict__ dlogits, const float* __restrict__ dprobs,
                                             const float* __restrict__ dgates, const int32_t* __restrict__ indices,
                                             const float* __restrict__ probs, int64_t R, int n, int k) {
  const int lane = threadIdx.x % kWarp;
  const int64_t warps_per_grid = (int64_t)gridDim.x * (blockDim.x / kWarp);
  for (int64_t r = (int64_t)blockIdx.x * (blockDim.x / kWarp) + threadIdx.x / kWarp; r < R; r += warps_per_grid) {
    const float* pr = probs + r * n;
    const int32_t* ir = indices + r * k;
    const float* gr = dgates + r * k;
    float dot = 0.f;
    if (dprobs) {
      const float* dp = dprobs + r * n;
      for (int c = lane; c < n; c += kWarp) dot += dp[c] * pr[c];
    }
    for (int j = lane; j < k; j += kWarp) dot += gr[j] * pr[ir[j]];
    dot = warp_sum(dot);
    float* dl = dlogits + r * n;
    for (int c = lane; c < n; c += kWarp) {
      float g = dprobs ? dprobs[r * n + c] : 0.f;
      for (int j = 0; j < k; ++j)
        if (ir[j] == c) g += gr[j];
      dl[c] = pr[c] * (g - dot);
    }
  }
}

// ---------------------------------------------------------------- launchers

constexpr int kRowThreads = 128;  // 4 warps = 4 rows per block on the warp paths

unsigned warp_rows_grid(int64_t R) { return grid_for(R, kRowThreads / kWarp); }

template <bool SOFTMAX>
void launch_topk(float* values, int32_t* indices, float* probs, const float* x, int64_t R, int64_t n, int64_t k) {
  const int nn = (int)n;
  const unsigned g = warp_rows_grid(R);
  switch (k) {
#define CM_TOPK_CASE(K)                                                                                   \
  case K:                                                                                                 \
    topk_warp_kernel<K, SOFTMAX><<<g, kRowThreads, 0, stream()>>>(values, indices, probs, x, R, nn); \
    break;
    CM_TOPK_CASE(1)
    CM_TOPK_CASE(2)
    CM_TOPK_CASE(3)
    CM_TOPK_CASE(4)
    CM_TOPK_CASE(5)
    CM_TOPK_CASE(6)
    CM_TOPK_CASE(7)
    CM_TOPK_CASE(8)
#undef CM_TOPK_CASE
    default:
      topk_block_kernel<SOFTMAX><<<grid_for(R, 1), 256, 0, stream()>>>(values, indices, probs, x, R, nn, (int)k);
  }
  cudaCheckLaunch(SOFTMAX ? "softmax_topk_forward" : "topk_forward");
}

void check_sizes(const char* what, int64_t R, int64_t n, int64_t k) {
  CM_CHECK(R >= 0 && n >= 0 && k >= 0 && k <= n, what, ": R=", R, " n=", n, " k=", k);
  CM_CHECK(n <= INT_MAX, what, ": rows of ", n, " columns do not fit i32 indices");
}

}  // namespace

void topk_forward(float* values, int32_t* indices, const float* x, int64_t R, int64_t n, int64_t k) {
  check_sizes("cuda::topk_forward", R, n, k);
  if (R == 0 || k == 0) return;
  launch_topk<false>(values, indices, nullptr, x, R, n, k);
}

void topk_backward(float* dx, const float* dvalues, const int32_t* indices, int64_t R, int64_t n, int64_t k) {
  check_sizes("cuda::topk_backward", R, n, k);
  if (R == 0 || n == 0) return;
  topk_backward_kernel<<<warp_rows_grid(R), kRowThreads, 0, stream()>>>(dx, dvalues, indices, R, (int)n, (int)k);
  cudaCheckLaunch("topk_backward_kernel");
}

void softmax_topk_forward(float* probs, float* gates, int32_t* indices, const float* logits, int64_t R, int64_t n,
                          int64_t k) {
  check_sizes("cuda::softmax_topk_forward", R, n, k);
  if (R == 0 || n == 0) return;
  if (k == 0) {
    if (probs) launch_topk<true>(gates, indices, probs, logits, R, n, 0);  // the block path: softmax only
    return;
  }
  launch_topk<true>(gates, indices, probs, logits, R, n, k);
}

void softmax_topk_backward(float* dlogits, const float* dprobs, const float* dgates, const int32_t* indices,
                           const float* probs, int64_t R, int64_t n, int64_t k) {
  check_sizes("cuda::softmax_topk_backward", R, n, k);
  if (R == 0 || n == 0) return;
  softmax_topk_backward_kernel<<<warp_rows_grid(R), kRowThreads, 0, stream()>>>(dlogits, dprobs, dgates, indices,
                                                                                probs, R, (int)n, (int)k);
  cudaCheckLaunch("softmax_topk_backward_kernel");
}

}  // namespace cm::cuda
