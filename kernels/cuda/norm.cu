// CUDA LayerNorm / RMSNorm, the twins of kernels/cpu/norm.cpp (contracts in kernels/norm.h).
// Forward: a group (warp, or block for rows over 1024) per row: mean and variance by two passes over the row (the
// second from L1), then the write pass. Backward: the same per row for dinp; dweight/dbias by the CPU's own
// chunking (chunks of max(16, ceil(N/64)) rows, each summed in row order, then the chunk partials added in chunk
// order), so with the same inputs they can match the CPU to the bit, and they never depend on the launch shape.
#include <algorithm>

#include "kernels/cuda/common.cuh"
#include "kernels/norm.h"

namespace cm::cuda {

namespace {

// ---------------------------------------------------------------- kernels

template <bool WARP>
__global__ void layernorm_forward_kernel(float* __restrict__ out, float* __restrict__ mean, float* __restrict__ rstd,
                                         const float* __restrict__ inp, const float* __restrict__ weight,
                                         const float* __restrict__ bias, int64_t N, int64_t C, float eps) {
  using G = Group<WARP>;
  __shared__ float sh[kWarp];
  for (int64_t n = G::first_row(); n < N; n += G::row_stride()) {
    const float* x = inp + n * C;
    float* y = out + n * C;
    float s = 0.f;
    for (int64_t c = G::rank(); c < C; c += G::size()) s += x[c];
    const float m = G::sum(s, sh) / (float)C;
    float ss = 0.f;  // two passes: E[x^2] - m^2 cancels badly when |m| >> std
    for (int64_t c = G::rank(); c < C; c += G::size()) ss += (x[c] - m) * (x[c] - m);
    const float r = 1.0f / sqrtf(G::sum(ss, sh) / (float)C + eps);
    for (int64_t c = G::rank(); c < C; c += G::size())
      y[c] = bias ? (x[c] - m) * r * weight[c] + bias[c] : (x[c] - m) * r * weight[c];
    if (G::rank() == 0) {
      mean[n] = m;
      rstd[n] = r;
    }
  }
}

// dx = (w dy - mean(w dy) - xhat mean(w dy xhat)) * rstd.
template <bool WARP>
__global__ void layernorm_backward_dx_kernel(float* __restrict__ dinp, const float* __restrict__ dout,
                                             const float* __restrict__ inp, const float* __restrict__ weight,
                                             const float* __restrict__ mean, const float* __restrict__ rstd,
                                             int64_t N, int64_t C) {
  using G = Group<WARP>;
  __shared__ float sh[kWarp];
  for (int64_t n = G::first_row(); n < N; n += G::row_stride()) {
    const float* x = inp + n * C;
    const float* dy = dout + n * C;
    float* dx = dinp + n * C;
    const float m = mean[n], r = rstd[n];
    float a = 0.f, b = 0.f;
    for (int64_t c = G::rank(); c < C; c += G::size()) {
      const float xhat = (x[c] - m) * r;
      const float dxhat = weight[c] * dy[c];
      a += dxhat;
      b += dxhat * xhat;
    }
    a = G::sum(a, sh) / (float)C;
    b = G::sum(b, sh) / (float)C;
    for (int64_t c = G::rank(); c < C; c += G::size()) {
      const float xhat = (x[c] - m) * r;
      dx[c] = (weight[c] * dy[c] - a - xhat * b) * r;
    }
  }
}

template <bool WARP>
__global__ void rmsnorm_forward_kernel(float* __restrict__ out, float* __restrict__ rstd,
                                       const float* __restrict__ inp, const float* __restrict__ weight, int64_t N,
                                       int64_t C, float eps) {
  using G = Group<WARP>;
  __shared__ float sh[kWarp];
  for (int64_t n = G::first_row(); n < N; n += G::row_stride()) {
    const float* x = inp + n * C;
    float* y = out + n * C;
    float ss = 0.f;
    for (int64_t c = G::rank(); c < C; c += G::size()) ss += x[c] * x[c];
    const float r = 1.0f / sqrtf(G::sum(ss, sh) / (float)C + eps);
    for (int64_t c = G::rank(); c < C; c += G::size()) y[c] = x[c] * r * weight[c];
    if (G::rank() == 0) rstd[n] = r;
  }
}

// dx = (w dy - xhat mean(w dy xhat)) * rstd (no mean term).
template <bool WARP>
__global__ void rmsnorm_backward_dx_kernel(float* __restrict__ dinp, const float* __restrict__ dout,
                                           const float* __restrict__ inp, const float* __restrict__ weight,
                                           const float* __restrict__ rstd, int64_t N, int64_t C) {
  using G = Group<WARP>;
  __shared__ float sh[kWarp];
  for (int64_t n = G::first_row(); n < N; n += G::row_stride()) {
    const float* x = inp + n * C;
    const float* dy = dout + n * C;
    float* dx = dinp + n * C;
    const float r = rstd[n];
    float b = 0.f;
    for (int64_t c = G::rank(); c < C; c += G::size()) b += weight[c] * dy[c] * x[c] * r;
    b = G::sum(b, sh) / (float)C;
    for (int64_t c = G::rank(); c < C; c += G::size()) {
      const float xhat = x[c] * r;
      dx[c] = (weight[c] * dy[c] - xhat * b) * r;
    }
  }
}

// Parameter-gradient partials: block (column tile, chunk k) sums rows [k * rows, (k + 1) * rows) in order, one
// thread per column: pw[k, c] = sum dy * xhat, pb[k, c] = sum dy. RMS: mean == nullptr (xhat = x * rstd), no pb.
__global__ void norm_param_partials_kernel(float* __restrict__ pw, float* __restrict__ pb,
                                           const float* __restrict__ dout, const float* __restrict__ inp,
                                           const float* __restrict__ mean, const float* __restrict__ rstd, int64_t N,
                                           int64_t C, int64_t rows) {
  const int64_t c = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  const int64_t k = blockIdx.y;
  if (c >= C) return;
  const int64_t n0 = k * rows, n1 = n0 + rows < N ? n0 + rows : N;
  float gw = 0.f, gb = 0.f;
  for (int64_t n = n0; n < n1; ++n) {
    const float dy = dout[n * C + c];
    const float xhat = mean ? (inp[n * C + c] - mean[n]) * rstd[n] : inp[n * C + c] * rstd[n];
    gw += dy * xhat;
    gb += dy;
  }
  pw[k * C + c] = gw;
  if (pb) pb[k * C + c] = gb;
}

// dst[c] = sum over chunks, in chunk order, of part[k, c].
__global__ void sum_chunks_kernel(float* __restrict__ dst, const float* __restrict__ part, int64_t nchunks,
                                  int64_t C) {
  for (int64_t c = gtid(); c < C; c += gstride()) {
    float s = 0.f;
    for (int64_t k = 0; k < nchunks; ++k) s += part[k * C + c];
    dst[c] = s;
  }
}

// ---------------------------------------------------------------- launchers

// The CPU's chunking (kernels/cpu/norm.cpp): at most 64 chunks of at least 16 rows, a function of N only.
int64_t chunk_rows(int64_t N) { return std::max<int64_t>(16, (N + 63) / 64); }

void param_grads(float* dweight, float* dbias, const float* dout, const float* inp, const float* mean,
                 const float* rstd, int64_t N, int64_t C) {
  const int64_t rows = chunk_rows(N), nchunks = ceil_div(N, rows);
  const size_t part_bytes = align256((size_t)(nchunks * C) * 4);
  Scratch s(part_bytes * (dbias ? 2 : 1));
  float* pw = s.at<float>();
  float* pb = dbias ? s.at<float>(part_bytes) : nullptr;
  const dim3 grid((unsigned)ceil_div(C, 256), (unsigned)nchunks);
  norm_param_partials_kernel<<<grid, 256, 0, stream()>>>(pw, pb, dout, inp, mean, rstd, N, C, rows);
  cudaCheckLaunch("norm_param_partials_kernel");
  sum_chunks_kernel<<<grid_for(C, 256), 256, 0, stream()>>>(dweight, pw, nchunks, C);
  cudaCheckLaunch("sum_chunks_kernel");
  if (dbias) {
    sum_chunks_kernel<<<grid_for(C, 256), 256, 0, stream()>>>(dbias, pb, nchunks, C);
    cudaCheckLaunch("sum_chunks_kernel");
  }
}

void check_nc(const char* what, int64_t N, int64_t C) {
  CM_CHECK(N >= 0 && C >= 1, what, ": N=", N, " C=", C);
  CM_CHECK(ceil_div(C, 256) < (int64_t(1) << 31), what, ": C=", C, " too large");
}

}  // namespace

void layernorm_forward(float* out, float* mean, float* rstd, const float* inp, const float* weight, const float* bias,
                       int64_t N, int64_t C, float eps) {
  check_nc("cuda::layernorm_forward", N, C);
  if (N == 0) return;
  CM_ROW_LAUNCH(layernorm_forward_kernel, N, C, out, mean, rstd, inp, weight, bias, N, C, eps);
}

void layernorm_backward(float* dinp, float* dweight, float* dbias, const float* dout, const float* inp,
                        const float* weight, const float* mean, const float* rstd, int64_t N, int64_t C) {
  check_nc("cuda::layernorm_backward", N, C);
  if (N == 0) {  // no rows: the parameter gradients are sums of nothing
    cudaCheck(cudaMemsetAsync(dweight, 0, (size_t)C * 4, stream()));
    if (dbias) cudaCheck(cudaMemsetAsync(dbias, 0, (size_t)C * 4, stream()));
    return;
  }
  CM_ROW_LAUNCH(layernorm_backward_dx_kernel, N, C, dinp, dout, inp, weight, mean, rstd, N, C);
  param_grads(dweight, dbias, dout, inp, mean, rstd, N, C);
}

void rmsnorm_forward(float* out, float* rstd, const float* inp, const float* weight, int64_t N, int64_t C, float eps) {
  check_nc("cuda::rmsnorm_forward", N, C);
  if (N == 0) return;
  CM_ROW_LAUNCH(rmsnorm_forward_kernel, N, C, out, rstd, inp, weight, N, C, eps);
}

void rmsnorm_backward(float* dinp, float* dweight, const float* dout, const float* inp, const float* weight,
                      const float* rstd, int64_t N, int64_t C) {
  check_nc("cuda::rmsnorm_backward", N, C);
  if (N == 0) {
    cudaCheck(cudaMemsetAsync(dweight, 0, (size_t)C * 4, stream()));
    return;
  }
  CM_ROW_LAUNCH(rmsnorm_backward_dx_kernel, N, C, dinp, dout, inp, weight, rstd, N, C);
  param_grads(dweight, nullptr, dout, inp, nullptr, rstd, N, C);
}

}  // namespace cm::cuda
