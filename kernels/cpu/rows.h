// Per-row units of the CPU kernels, shared by a whole-array kernel and the fused kernels built from the same
// arithmetic (route_select_forward runs softmax, entropy and top-k row by row while the row is in L1). Internal to
// kernels/cpu: not a kernel API of its own. None of these opens a parallel region: the caller owns the threads, so
// a fused kernel can call them once per row without paying for a (nested) region per call.
//
// A function here computes the bits its whole-array kernel computes on the same row: softmax_row is
// softmax_forward's row, topk_rows is topk_forward on the rows given.
#pragma once
#include <cmath>
#include <cstdint>

#include "kernels/cpu/fastmath.h"

namespace cm::cpu {

inline float row_max(const float* __restrict x, int64_t C) {
  float m = -INFINITY;
#pragma omp simd reduction(max : m)
  for (int64_t c = 0; c < C; ++c) m = x[c] > m ? x[c] : m;
  return m;
}

// y [C] = softmax(x [C]): three passes over the row (max, exp-and-sum, scale) that GCC vectorises. The sum's
// `omp simd reduction` lets the compiler split it across SIMD lanes (we build without -ffast-math, so it would not
// otherwise), with a lane split fixed at compile time: still deterministic.
inline void softmax_row(float* __restrict y, const float* __restrict x, int64_t C) {
  const float m = row_max(x, C);
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t c = 0; c < C; ++c) {
    const float e = fast_exp(x[c] - m);
    y[c] = e;
    s += e;
  }
  // s >= 1 (the max contributes exp(0)) unless the row is NaN/all -inf, where NaN is the honest answer.
  const float inv = 1.0f / s;
  for (int64_t c = 0; c < C; ++c) y[c] *= inv;
}

// softmax_row, and the row's entropy (nats) from the same pass: -sum_c p_c log p_c over the p_c > 0, as
// kernels/cpu/route.cpp's row_entropy computes it from p and x, -log(max p) * sum p - sum p (x - max x). Here
// max p is 1 / sum: the largest e is fast_exp(0) = 1 exactly and every other e <= 1, so no p exceeds 1 * inv. The
// scale pass adds the two sums as it writes p, with row_entropy's terms in row_entropy's loop shape. A NaN or
// all -inf row gives 0, as there.
inline double softmax_row_entropy(float* __restrict y, const float* __restrict x, int64_t C) {
  const float m = row_max(x, C);
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t c = 0; c < C; ++c) {
    const float e = fast_exp(x[c] - m);
    y[c] = e;
    s += e;
  }
  const float inv = 1.0f / s;
  float psum = 0.f, ps = 0.f;
#pragma omp simd reduction(+ : psum, ps)
  for (int64_t c = 0; c < C; ++c) {
    const float p = y[c] * inv;
    y[c] = p;
    const bool live = p > 0.f;  // selects, not ifs: 0 * (-inf - m) would be NaN
    psum += live ? p : 0.f;
    ps += live ? p * (x[c] - m) : 0.f;
  }
  return inv > 0.f ? -std::log((double)inv) * psum - ps : 0.0;  // inv NaN: a NaN row
}

// topk_forward's arithmetic on R rows, on the calling thread (kernels/topk.h: order, ties, NaN).
void topk_rows(float* values, int32_t* indices, const float* x, int64_t R, int64_t n, int64_t k);

}  // namespace cm::cpu
