// CUDA softmax / log-softmax over the last axis, and the attention's scaled causal softmax. Numerics follow
// kernels/softmax.h: rows shifted by their (NaN-blind) maximum, -inf gives exactly 0, a row with NaN or +inf or
// all -inf gives NaN. expf here is CUDA's (max 2 ulp), the CPU's fast_exp about 1 ulp: results agree to a few
// ulp, not to the bit.
//
// Rows of up to 1024 elements get one warp each (no shared memory, no block barrier); longer rows (a vocabulary)
// one block of 512 threads. Inside a row: max pass, exp-sum pass, write pass; the re-reads hit L1/L2, so device
// memory sees each input once and each output once. Reductions use a fixed shuffle tree: deterministic.
#include "kernels/cuda/common.cuh"
#include "kernels/softmax.h"

namespace cm::cuda {

namespace {

// ---------------------------------------------------------------- kernels

template <bool WARP>
__global__ void softmax_forward_kernel(float* __restrict__ out, const float* __restrict__ inp, int64_t N, int64_t C) {
  using G = Group<WARP>;
  __shared__ float sh[kWarp];
  for (int64_t n = G::first_row(); n < N; n += G::row_stride()) {
    const float* x = inp + n * C;
    float* y = out + n * C;
    float m = -INFINITY;
    for (int64_t c = G::rank(); c < C; c += G::size()) m = fmaxf(m, x[c]);
    m = G::max(m, sh);
    float s = 0.f;
    for (int64_t c = G::rank(); c < C; c += G::size()) s += expf(x[c] - m);
    s = G::sum(s, sh);
    const float inv = 1.0f / s;  // s >= 1 unless the row is NaN / all -inf, where NaN is the honest answer
    for (int64_t c = G::rank(); c < C; c += G::size()) y[c] = expf(x[c] - m) * inv;
  }
}

template <bool WARP>
__global__ void softmax_backward_kernel(float* __restrict__ dinp, const float* __restrict__ dout,
                                        const float* __restrict__ out, int64_t N, int64_t C) {
  using G = Group<WARP>;
  __shared__ float sh[kWarp];
  for (int64_t n = G::first_row(); n < N; n += G::row_stride()) {
    const float* dy = dout + n * C;
    const float* y = out + n * C;
    float* dx = dinp + n * C;
    float dot = 0.f;
    for (int64_t c = G::rank(); c < C; c += G::size()) dot += dy[c] * y[c];
    dot = G::sum(dot, sh);
    for (int64_t c = G::rank(); c < C; c += G::size()) dx[c] = y[c] * (dy[c] - dot);
  }
}

template <bool WARP>
__global__ void log_softmax_forward_kernel(float* __restrict__ out, const float* __restrict__ inp, int64_t N,
                                           int64_t C) {
  using G = Group<WARP>;
  __shared__ float sh[kWarp];
  for (int64_t n = G::first_row(); n < N; n += G::row_stride()) {
    const float* x = inp + n * C;
    float* y = out + n * C;
    float m = -INFINITY;
    for (int64_t c = G::rank(); c < C; c += G::size()) m = fmaxf(m, x[c]);
    m = G::max(m, sh);
    float s = 0.f;
    for (int64_t c = G::rank(); c < C; c += G::size()) s += expf(x[c] - m);
    s = G::sum(s, sh);
    const float ls = logf(s);
    for (int64_t c = G::rank(); c < C; c += G::size()) y[c] = (x[c] - m) - ls;  // keeps low bits for large x
  }
}

template <bool WARP>
__global__ void log_softmax_backward_kernel(float* __restrict__ dinp, const float* __restrict__ dout,
                                            const float* __restrict__ out, int64_t N, int64_t C) {
  using G = Group<WARP>;
  __shared__ float sh[kWarp];
  for (int64_t n = G::first_row(); n < N; n += G::row_stride()) {
    const float* dy = dout + n * C;
    const float* y = out + n * C;
    float* dx = dinp + n * C;
    float s = 0.f;
    for (int64_t c = G::rank(); c < C; c += G::size()) s += dy[c];
    s = G::sum(s, sh);
    for (int64_t c = G::rank(); c < C; c += G::size()) dx[c] = dy[c] - expf(y[c]) * s;
  }
}

// Attention scores [BH, T, T]: row n is query i = n % T; keys j > i are masked (probability exactly 0), the rest
// get softmax(scale * s). Only the first i + 1 elements of a row are read.
template <bool WARP>
__global__ void causal_softmax_forward_kernel(float* __restrict__ out, const float* __restrict__ scores, float scale,
                                              int64_t N, int64_t T) {
  using G = Group<WARP>;
  __shared__ float sh[kWarp];
  for (int64_t n = G::first_row(); n < N; n += G::row_stride()) {
    const int64_t len = n % T + 1;
    const float* x = scores + n * T;
    float* y = out + n * T;
    float m = -INFINITY;
    for (int64_t c = G::rank(); c < len; c += G::size()) m = fmaxf(m, scale * x[c]);
    m = G::max(m, sh);
    float s = 0.f;
    for (int64_t c = G::rank(); c < len; c += G::size()) s += expf(scale * x[c] - m);
    s = G::sum(s, sh);
    const float inv = 1.0f / s;
    for (int64_t c = G::rank(); c < T; c += G::size()) y[c] = c < len ? expf(scale * x[c] - m) * inv : 0.f;
  }
}

// d scores = scale * y * (dy - sum(dy * y)); masked positions get 0 (y is 0 there).
template <bool WARP>
__global__ void causal_softmax_backward_kernel(float* __restrict__ dscores, const float* __restrict__ dout,
                                               const float* __restrict__ out, float scale, int64_t N, int64_t T) {
  using G = Group<WARP>;
  __shared__ float sh[kWarp];
  for (int64_t n = G::first_row(); n < N; n += G::row_stride()) {
    const int64_t len = n % T + 1;
    const float* dy = dout + n * T;
    const float* y = out + n * T;
    float* dx = dscores + n * T;
    float dot = 0.f;
    for (int64_t c = G::rank(); c < len; c += G::size()) dot += dy[c] * y[c];
    dot = G::sum(dot, sh);
    for (int64_t c = G::rank(); c < T; c += G::size()) dx[c] = c < len ? scale * (y[c] * (dy[c] - dot)) : 0.f;
  }
}

// ---------------------------------------------------------------- launchers

// Launches KERNEL<true> (warp per row) or KERNEL<false> (block per row) by row length.

void check_rows(const char* what, int64_t N, int64_t C) { CM_CHECK(N >= 0 && C >= 0, what, ": N=", N, " C=", C); }

}  // namespace

void softmax_forward(float* out, const float* inp, int64_t N, int64_t C) {
  check_rows("cuda::softmax_forward", N, C);
  if (N == 0 || C == 0) return;
  CM_ROW_LAUNCH(softmax_forward_kernel, N, C, out, inp, N, C);
}

void softmax_backward(float* dinp, const float* dout, const float* out, int64_t N, int64_t C) {
  check_rows("cuda::softmax_backward", N, C);
  if (N == 0 || C == 0) return;
  CM_ROW_LAUNCH(softmax_backward_kernel, N, C, dinp, dout, out, N, C);
}

void log_softmax_forward(float* out, const float* inp, int64_t N, int64_t C) {
  check_rows("cuda::log_softmax_forward", N, C);
  if (N == 0 || C == 0) return;
  CM_ROW_LAUNCH(log_softmax_forward_kernel, N, C, out, inp, N, C);
}

void log_softmax_backward(float* dinp, const float* dout, const float* out, int64_t N, int64_t C) {
  check_rows("cuda::log_softmax_backward", N, C);
  if (N == 0 || C == 0) return;
  CM_ROW_LAUNCH(log_softmax_backward_kernel, N, C, dinp, dout, out, N, C);
}

void causal_softmax_forward(float* out, const float* scores, float scale, int64_t BH, int64_t T) {
  check_rows("cuda::causal_softmax_forward", BH, T);
  if (BH == 0 || T == 0) return;
  const int64_t N = BH * T;
  CM_ROW_LAUNCH(causal_softmax_forward_kernel, N, T, out, scores, scale, N, T);
}

void causal_softmax_backward(float* dscores, const float* dout, const float* out, float scale, int64_t BH,
                             int64_t T) {
  check_rows("cuda::causal_softmax_backward", BH, T);
  if (BH == 0 || T == 0) return;
  const int64_t N = BH * T;
  CM_ROW_LAUNCH(causal_softmax_backward_kernel, N, T, dscores, dout, out, scale, N, T);
}

}  // namespace cm::cuda
