// CUDA reductions, twins of kernels/cpu/reduce.cpp (contracts in kernels/reduce.h). Sums accumulate in double
// and every sum is split by the sizes alone (never by the launch), so results are deterministic; the splits match
// the CPU's where it is cheap to (8192-element blocks for long sums, 256-row blocks for column sums), so results
// usually agree with the CPU to the last bit of the final float rounding. Max keeps the first maximum and lets
// NaN win, like the CPU: the arg-best combine is a strict total order on (value, index), so any reduction tree
// returns the same element.
#include <algorithm>
#include <vector>

#include "kernels/cuda/common.cuh"
#include "kernels/reduce.h"

namespace cm::cuda {

namespace {

constexpr int64_t kBlock = 8192;     // elements per partial of a long sum
constexpr int64_t kRowBlock = 256;   // rows per partial of a column sum
constexpr int kThreads = 256;

// ---------------------------------------------------------------- sum kernels

// part[b] = sum of a[b * kBlock, ...) in double; one block per partial.
__global__ void block_sums_kernel(double* __restrict__ part, const float* __restrict__ a, int64_t n) {
  __shared__ double sh[kWarp];
  const int64_t lo = (int64_t)blockIdx.x * kBlock, hi = lo + kBlock < n ? lo + kBlock : n;
  double acc = 0.0;
  for (int64_t i = lo + threadIdx.x; i < hi; i += blockDim.x) acc += (double)a[i];
  acc = block_sum(acc, sh);
  if (threadIdx.x == 0) part[blockIdx.x] = acc;
}

// out[0] = scale * sum of part[nb] (one block).
__global__ void __launch_bounds__(1024) finish_sum_kernel(float* __restrict__ out, const double* __restrict__ part,
                                                          int64_t nb, float scale, const float* __restrict__ scale_at) {
  __shared__ double sh[kWarp];
  if (scale_at) scale = *scale_at;
  double acc = 0.0;
  for (int64_t b = threadIdx.x; b < nb; b += blockDim.x) acc += part[b];
  acc = block_sum(acc, sh);
  if (threadIdx.x == 0) out[0] = (float)((double)scale * acc);
}

// out[o] = scale * sum of row o of a [O, R] (I == 1), a group per row.
template <bool WARP>
__global__ void row_sums_kernel(float* __restrict__ out, const float* __restrict__ a, int64_t O, int64_t R,
                                float scale) {
  using G = Group<WARP>;
  __shared__ double sh[kWarp];
  for (int64_t o = G::first_row(); o < O; o += G::row_stride()) {
    double acc = 0.0;
    for (int64_t r = G::rank(); r < R; r += G::size()) acc += (double)a[o * R + r];
    acc = WARP ? warp_sum(acc) : block_sum(acc, sh);
    if (G::rank() == 0) out[o] = (float)((double)scale * acc);
  }
}

// Column sums of [O, R, I] with rows in nb blocks of kRowBlock: part[b, o, i] = sum over the block's r, in order.
// grid.y strides over the row blocks (at most kGridCapY of them at once); threads over the O * I outputs
// (consecutive i: coalesced).
__global__ void col_partials_kernel(double* __restrict__ part, const float* __restrict__ a, int64_t O, int64_t R,
                                    int64_t I, int64_t nb) {
  const int64_t OI = O * I;
  for (int64_t b = blockIdx.y; b < nb; b += gridDim.y) {
    const int64_t r0 = b * kRowBlock, r1 = r0 + kRowBlock < R ? r0 + kRowBlock : R;
    for (int64_t j = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; j < OI; j += (int64_t)gridDim.x * blockDim.x) {
      const int64_t o = j / I, i = j - o * I;
      const float* col = a + o * R * I + i;
      double acc = 0.0;
      for (int64_t r = r0; r < r1; ++r) acc += (double)col[r * I];
      part[b * OI + j] = acc;
    }
  }
}

// out[j] = scale * sum over row blocks, in order, of part[b, j].
__global__ void col_finish_kernel(float* __restrict__ out, const double* __restrict__ part, int64_t nb, int64_t OI,
                                  float scale) {
  for (int64_t j = gtid(); j < OI; j += gstride()) {
    double acc = part[j];
    for (int64_t b = 1; b < nb; ++b) acc += part[b * OI + j];
    out[j] = (float)((double)scale * acc);
  }
}

// ---------------------------------------------------------------- max kernels

// beats / warp_best / block_best: kernels/cuda/common.cuh.

// pv/pi[b] = best of a[b * kBlock, ...).
__global__ void block_max_kernel(float* __restrict__ pv, int64_t* __restrict__ pi, const float* __restrict__ a,
                                 int64_t n) {
  __shared__ float sv[kWarp];
  __shared__ int64_t si[kWarp];
  const int64_t lo = (int64_t)blockIdx.x * kBlock, hi = lo + kBlock < n ? lo + kBlock : n;
  float v = -INFINITY;
  int64_t i = INT64_MAX;
  for (int64_t k = lo + threadIdx.x; k < hi; k += blockDim.x)
    if (beats(a[k], k, v, i)) {
      v = a[k];
      i = k;
    }
  block_best(v, i, sv, si);
  if (threadIdx.x == 0) {
    pv[blockIdx.x] = v;
    pi[blockIdx.x] = i;
  }
}

__global__ void __launch_bounds__(1024)
    finish_max_kernel(float* __restrict__ out, int64_t* __restrict__ idx, const float* __restrict__ pv,
                      const int64_t* __restrict__ pi, int64_t nb) {
  __shared__ float sv[kWarp];
  __shared__ int64_t si[kWarp];
  float v = -INFINITY;
  int64_t i = INT64_MAX;
  for (int64_t b = threadIdx.x; b < nb; b += blockDim.x)
    if (beats(pv[b], pi[b], v, i)) {
      v = pv[b];
      i = pi[b];
    }
  block_best(v, i, sv, si);
  if (threadIdx.x == 0) {
    if (out) out[0] = v;
    if (idx) idx[0] = i;
  }
}

// Row arg-max (I == 1), a warp per row (rows here are axes of a tensor: short or long, a warp loops).
__global__ void row_max_kernel(float* __restrict__ out, int32_t* __restrict__ idx, const float* __restrict__ a,
                               int64_t O, int64_t R) {
  const int lane = threadIdx.x % kWarp;
  for (int64_t o = (int64_t)blockIdx.x * (blockDim.x / kWarp) + threadIdx.x / kWarp; o < O;
       o += (int64_t)gridDim.x * (blockDim.x / kWarp)) {
    const float* row = a + o * R;
    float v = -INFINITY;
    int64_t i = INT64_MAX;
    for (int64_t r = lane; r < R; r += kWarp)
      if (beats(row[r], r, v, i)) {
        v = row[r];
        i = r;
      }
    warp_best(v, i);
    if (lane == 0) {
      if (out) out[o] = v;
      if (idx) idx[o] = (int32_t)i;
    }
  }
}

// Column arg-max (I > 1): a thread per (o, i) walks r in order; strict "beats" keeps the first maximum.
__global__ void col_max_kernel(float* __restrict__ out, int32_t* __restrict__ idx, const float* __restrict__ a,
                               int64_t O, int64_t R, int64_t I) {
  const int64_t OI = O * I;
  for (int64_t j = gtid(); j < OI; j += gstride()) {
    const int64_t o = j / I, i = j - o * I;
    const float* col = a + o * R * I + i;
    float v = col[0];
    int64_t at = 0;
    for (int64_t r = 1; r < R; ++r)
      if (beats(col[r * I], r, v, at)) {
        v = col[r * I];
        at = r;
      }
    if (out) out[j] = v;
    if (idx) idx[j] = (int32_t)at;
  }
}

__global__ void max_backward_kernel(float* __restrict__ dx, const float* __restrict__ dy,
                                    const int32_t* __restrict__ idx, int64_t O, int64_t R, int64_t I) {
  const int64_t n = O * R * I;
  for (int64_t e = gtid(); e < n; e += gstride()) {
    const int64_t i = e % I, orr = e / I, r = orr % R, o = orr / R;
    const int64_t j = o * I + i;
    dx[e] = idx[j] == r ? dy[j] : 0.f;
  }
}

}  // namespace

// ---------------------------------------------------------------- launchers

void sum_all(float* out, const float* a, int64_t n, float scale, const float* scale_at) {
  CM_CHECK(n >= 0, "cuda::sum_all: n=", n);
  const int64_t nb = ceil_div(n, kBlock);
  CM_CHECK(nb < (int64_t(1) << 31), "cuda::sum_all: n=", n, " too large");
  Scratch s((size_t)(nb > 0 ? nb : 1) * sizeof(double));
  double* part = s.at<double>();
  if (nb > 0) {
    block_sums_kernel<<<(unsigned)nb, kThreads, 0, stream()>>>(part, a, n);
    cudaCheckLaunch("block_sums_kernel");
  }
  finish_sum_kernel<<<1, 1024, 0, stream()>>>(out, part, nb, scale, scale_at);  // nb == 0: writes 0 * scale
  cudaCheckLaunch("finish_sum_kernel");
}

void sum_axis(float* out, const float* a, int64_t O, int64_t R, int64_t I, float scale) {
  CM_CHECK(O >= 0 && R >= 0 && I >= 0, "cuda::sum_axis: O=", O, " R=", R, " I=", I);
  if (O == 0 || I == 0) return;
  if (I == 1) {
    if (O == 1) return sum_all(out, a, R, scale);
    if (R == 0) {
      cudaCheck(cudaMemsetAsync(out, 0, (size_t)O * 4, stream()));
      return;
    }
    CM_ROW_LAUNCH(row_sums_kernel, O, R, out, a, O, R, scale);
    return;
  }
  const int64_t OI = O * I, nb = R > 0 ? ceil_div(R, kRowBlock) : 1;
  Scratch s((size_t)(nb * OI) * sizeof(double));
  double* part = s.at<double>();
  const dim3 grid(grid_for(OI, kThreads, kColumnCap), (unsigned)(nb < kGridCapY ? nb : kGridCapY));
  col_partials_kernel<<<grid, kThreads, 0, stream()>>>(part, a, O, R, I, nb);  // R == 0: one block of zeros
  cudaCheckLaunch("col_partials_kernel");
  col_finish_kernel<<<grid_for(OI, kThreads), kThreads, 0, stream()>>>(out, part, nb, OI, scale);
  cudaCheckLaunch("col_finish_kernel");
}

// The CPU's algorithm: collapse into alternating kept/reduced groups, then reduce the innermost reduced group
// first, one sum_axis pass per reduced group (float intermediates, like the CPU).
void sum_to(float* out, const float* a, int64_t D, const int64_t* a_shape, const int64_t* out_shape) {
  struct Grp {
    int64_t size;
    bool reduce;
  };
  std::vector<Grp> g;
  int64_t out_n = 1;
  for (int64_t d = 0; d < D; ++d) {
    out_n *= out_shape[d];
    if (a_shape[d] == 1) continue;
    const bool red = out_shape[d] == 1;
    if (!g.empty() && g.back().reduce == red)
      g.back().size *= a_shape[d];
    else
      g.push_back({a_shape[d], red});
  }
  if (out_n == 0) return;
  int64_t nred = 0;
  for (const Grp& x : g) nred += x.reduce;
  if (nred == 0) {
    cudaCheck(cudaMemcpyAsync(out, a, (size_t)out_n * 4, cudaMemcpyDeviceToDevice, stream()));
    return;
  }
  // Two scratch buffers alternate as intermediates; each is as large as the first pass's output at most.
  size_t max_mid = 1;
  {
    std::vector<Grp> h = g;
    for (int64_t k = (int64_t)h.size() - 1; k >= 0; --k) {
      if (!h[k].reduce) continue;
      int64_t O = 1, I = 1;
      for (int64_t j = 0; j < k; ++j) O *= h[j].size;
      for (int64_t j = k + 1; j < (int64_t)h.size(); ++j) I *= h[j].size;
      max_mid = std::max(max_mid, (size_t)(O * I));
      h.erase(h.begin() + k);
    }
  }
  const size_t buf = nred > 1 ? align256(max_mid * 4) : 0;
  Scratch s(2 * buf);
  float* mids[2] = {s.at<float>(), s.at<float>(buf)};
  const float* src = a;
  int pass = 0;
  for (int64_t k = (int64_t)g.size() - 1; k >= 0; --k) {
    if (!g[k].reduce) continue;
    int64_t O = 1, I = 1;
    for (int64_t j = 0; j < k; ++j) O *= g[j].size;
    for (int64_t j = k + 1; j < (int64_t)g.size(); ++j) I *= g[j].size;
    float* dst = --nred > 0 ? mids[pass++ % 2] : out;
    sum_axis(dst, src, O, g[k].size, I, 1.f);
    g.erase(g.begin() + k);
    src = dst;
  }
}

void max_all(float* out, int64_t* idx, const float* a, int64_t n) {
  CM_CHECK(n >= 1, "cuda::max_all: n=", n, " (needs at least one element)");
  const int64_t nb = ceil_div(n, kBlock);
  CM_CHECK(nb < (int64_t(1) << 31), "cuda::max_all: n=", n, " too large");
  const size_t vb = align256((size_t)nb * 4);
  Scratch s(vb + (size_t)nb * 8);
  float* pv = s.at<float>();
  int64_t* pi = s.at<int64_t>(vb);
  block_max_kernel<<<(unsigned)nb, kThreads, 0, stream()>>>(pv, pi, a, n);
  cudaCheckLaunch("block_max_kernel");
  finish_max_kernel<<<1, 1024, 0, stream()>>>(out, idx, pv, pi, nb);
  cudaCheckLaunch("finish_max_kernel");
}

void max_axis(float* out, int32_t* idx, const float* a, int64_t O, int64_t R, int64_t I) {
  CM_CHECK(O >= 0 && R >= 1 && I >= 0, "cuda::max_axis: O=", O, " R=", R, " I=", I);
  if (O == 0 || I == 0) return;
  if (I == 1) {
    row_max_kernel<<<grid_for(O, kThreads / kWarp), kThreads, 0, stream()>>>(out, idx, a, O, R);
    cudaCheckLaunch("row_max_kernel");
    return;
  }
  col_max_kernel<<<grid_for(O * I, kThreads), kThreads, 0, stream()>>>(out, idx, a, O, R, I);
  cudaCheckLaunch("col_max_kernel");
}

void max_axis_backward(float* dx, const float* dy, const int32_t* idx, int64_t O, int64_t R, int64_t I) {
  CM_CHECK(O >= 0 && R >= 0 && I >= 0, "cuda::max_axis_backward: O=", O, " R=", R, " I=", I);
  const int64_t n = O * R * I;
  if (n == 0) return;
  max_backward_kernel<<<grid_for(n, kThreads), kThreads, 0, stream()>>>(dx, dy, idx, O, R, I);
  cudaCheckLaunch("max_backward_kernel");
}

}  // namespace cm::cuda
