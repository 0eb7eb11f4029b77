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

// topk_forward's arithmetic on R rows, on the calling thread (kernels/topk.h: order, ties, NaN).
void topk_rows(float* values, int32_t* indices, const float* x, int64_t R, int64_t n, int64_t k);

}  // namespace cm::cpu
