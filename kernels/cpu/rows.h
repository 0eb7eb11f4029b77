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
#include <utility>

#include "kernels/cpu/fastmath.h"

namespace cm::cpu {

inline float row_max(const float* __restrict x, int64_t C) {
  float m = -INFINITY;
#pragma omp simd reduction(max : m)
  for (int64_t c = 0; c < C; ++c) m = x[c] > m ? x[c] : m;
  return m;
}

// Sixteen lane sums folded as a tree: lane j += lane j + 8, then + 4, + 2, + 1; the result is lane 0.
inline float fold16(float* acc) {
  for (int w = 8; w >= 1; w /= 2)
    for (int j = 0; j < w; ++j) acc[j] += acc[j + w];
  return acc[0];
}
#if defined(__AVX512F__)
// The same fold of a vector's sixteen lanes, in registers (the same adds of the same pairs: the same bits), where
// storing the vector and adding its lanes back from memory stalls on every reload.
// (The masked forms with every lane set: GCC 12's unmasked ones merge into an undefined vector, which
// -Wmaybe-uninitialized reports once inlined.)
inline float fold16(__m512 v) {
  constexpr __mmask16 all = 0xFFFF;
  v = _mm512_add_ps(v, _mm512_mask_shuffle_f32x4(v, all, v, v, _MM_SHUFFLE(1, 0, 3, 2)));  // j < 8: += lane j + 8
  v = _mm512_add_ps(v, _mm512_mask_shuffle_f32x4(v, all, v, v, _MM_SHUFFLE(2, 3, 0, 1)));  // j < 4: += lane j + 4
  v = _mm512_add_ps(v, _mm512_mask_permute_ps(v, all, v, _MM_SHUFFLE(1, 0, 3, 2)));        // j < 2: += lane j + 2
  v = _mm512_add_ps(v, _mm512_mask_permute_ps(v, all, v, _MM_SHUFFLE(2, 3, 0, 1)));        // lane 0 += lane 1
  return _mm512_cvtss_f32(v);
}
#endif

// y [C] = softmax(x [C]): the max, e = exp(x - max) (our fast_exp), their sum, e / sum. The sum's order is written
// out rather than left to `omp simd`: 16 lane sums (lane j adds e[j], e[j + 16], e[j + 32], ... in turn, from 0),
// taken in the exp pass, then the lanes folded as a tree (lane j += lane j + 8, then + 4, + 2, + 1). The order is
// the code's, not the compiler's, so route_select_forward can take sixteen rows at once, a row per SIMD lane, in
// exactly this order (kernels/cpu/route.cpp, select_block16).
inline void softmax_row(float* __restrict y, const float* __restrict x, int64_t C) {
  const float m = row_max(x, C);
  float acc[16] = {0};
  int64_t c = 0;
#if defined(__AVX512F__)
  __m512 acc16 = _mm512_setzero_ps();
  for (; c + 16 <= C; c += 16) {
    const __m512 e = fast_exp16(_mm512_sub_ps(_mm512_loadu_ps(x + c), _mm512_set1_ps(m)));
    _mm512_storeu_ps(y + c, e);
    acc16 = _mm512_add_ps(acc16, e);
  }
  _mm512_storeu_ps(acc, acc16);
#else
  for (; c + 16 <= C; c += 16)
    for (int j = 0; j < 16; ++j) {
      const float e = fast_exp(x[c + j] - m);
      y[c + j] = e;
      acc[j] += e;
    }
#endif
  for (int j = 0; c + j < C; ++j) {
    const float e = fast_exp(x[c + j] - m);
    y[c + j] = e;
    acc[j] += e;
  }
  // acc[0] >= 1 (the max contributes exp(0)) unless the row is NaN/all -inf, where NaN is the honest answer.
  const float inv = 1.0f / fold16(acc);
  for (int64_t i = 0; i < C; ++i) y[i] *= inv;
}

// a * b + c rounded once where the machine has fused multiply-add (as the compiler contracts a * b + c there), twice
// where it has not: written out so that code reproducing another's sums can name the same operation.
inline float fmadd(float a, float b, float c) {
#if defined(__FMA__)
  return std::fma(a, b, c);
#else
  return a * b + c;
#endif
}

// The dot product of x [C] and y [C] in a written-out order, as softmax_row's sum: 16 lane sums (lane j takes
// x[j] y[j], x[j + 16] y[j + 16], ... in turn, from 0, each a fused multiply-add), then the lanes folded as a tree.
// softmax_backward's dot and combine's gate gradient (kernels/cpu/dispatch.cpp); the router's selection backward
// reproduces it over a row that is zero off the kept children (a zero term leaves a lane's sum as it is),
// kernels/cpu/route.cpp.
inline float dot_row(const float* __restrict x, const float* __restrict y, int64_t C) {
  int64_t c = 0;
#if defined(__AVX512F__)
  __m512 acc16 = _mm512_setzero_ps();
  for (; c + 16 <= C; c += 16) acc16 = _mm512_fmadd_ps(_mm512_loadu_ps(x + c), _mm512_loadu_ps(y + c), acc16);
  if (c < C) {  // the tail's lanes only
    const __mmask16 m = (__mmask16)((1u << (C - c)) - 1u);
    acc16 = _mm512_mask3_fmadd_ps(_mm512_maskz_loadu_ps(m, x + c), _mm512_maskz_loadu_ps(m, y + c), acc16, m);
  }
  return fold16(acc16);
#else
  float acc[16] = {0};
  for (; c + 16 <= C; c += 16)
    for (int j = 0; j < 16; ++j) acc[j] = fmadd(x[c + j], y[c + j], acc[j]);
  for (int j = 0; c + j < C; ++j) acc[j] = fmadd(x[c + j], y[c + j], acc[j]);
  return fold16(acc);
#endif
}

// Sum of a [n] (n <= a few blocks) in double: 8 independent lanes (the compiler vectorises the lane loop), then a
// fixed pairwise combine of the lanes. The unit of the long sums and of sum_axis's rows (kernels/cpu/reduce.cpp):
// sum_axis over a row of n <= kSumBlock floats is (float)(scale * block_sum(row, n)).
// Square: the sum of a[i]^2 instead (squared in double: exact, and no float overflow).
template <bool Square = false>
inline double block_sum(const float* a, int64_t n) {
  double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  auto term = [](float v) { return Square ? (double)v * (double)v : (double)v; };
  if (n <= 8) {  // a lane holds one term (0.0 + it) or none (+0): the same fold, in registers, not through the stack
    auto t = [&](int64_t i) { return i < n ? 0.0 + term(a[i]) : 0.0; };
    return ((t(0) + t(1)) + (t(2) + t(3))) + ((t(4) + t(5)) + (t(6) + t(7)));
  }
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) acc[j] += term(a[i + j]);
  for (int j = 0; i < n; ++i, ++j) acc[j] += term(a[i]);
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

#if defined(__AVX512F__)
// The largest score of v, in every lane (exact in any order for scores without NaN). (Masked forms with every
// lane set, as in fold16.)
inline __m512 hmax16(__m512 v) {
  constexpr __mmask16 all = 0xFFFF;
  v = _mm512_maskz_max_ps(all, v, _mm512_mask_shuffle_f32x4(v, all, v, v, 0x4E));  // 256-bit halves
  v = _mm512_maskz_max_ps(all, v, _mm512_mask_shuffle_f32x4(v, all, v, v, 0xB1));  // 128-bit quarters
  v = _mm512_maskz_max_ps(all, v, _mm512_mask_permute_ps(v, all, v, 0x4E));        // pairs within a quarter
  return _mm512_maskz_max_ps(all, v, _mm512_mask_permute_ps(v, all, v, 0xB1));     // neighbours
}

// The K largest scores of a long row in topk_forward's order (the largest first, ties to the lower index), in two
// steps that test no candidate one by one:
//   1. down(): blocks of 16 scores go down K registers that keep the K largest of each lane sorted (a sorting
//      network's column: K max/min pairs, no branch). The row's K largest, counted with multiplicity, are among
//      these 16 K, so kth() is the row's K-th largest score w;
//   2. take(): the scores >= w, in index order (a vector compare per block, almost always empty). Fewer than K are
//      above w, and all of them are kept; the rest of the K are the first scores equal to w, by index. result()
//      writes the K.
// A row holding a NaN (which ranks above every number) sets `nan` in step 1: the caller takes another path.
template <int K>
struct LongTopK {
  static constexpr __mmask16 all = 0xFFFF;
  __m512 t[K];
  __mmask16 nan = 0;
  float above[K];                    // step 2: the scores > w, in index order
  int32_t above_at[K], equal_at[K];  // their indices; the first indices whose score == w
  int na = 0, ne = 0;

  LongTopK() {
    for (__m512& v : t) v = _mm512_set1_ps(-INFINITY);
  }
  void down(__m512 v) {
    nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    for (int j = 0; j < K; ++j) {
      const __m512 hi = _mm512_maskz_max_ps(all, t[j], v);
      v = _mm512_maskz_min_ps(all, t[j], v);
      t[j] = hi;
    }
  }
  // K - 1 times take the largest head off its lane (that lane's list moves up one), then the largest head.
  float kth() {
    __m512 w = hmax16(t[0]);
    for (int r = 1; r < K; ++r) {
      const __mmask16 lane = (__mmask16)(1u << __builtin_ctz(_mm512_cmp_ps_mask(t[0], w, _CMP_EQ_OQ)));
      for (int j = 0; j + 1 < K; ++j) t[j] = _mm512_mask_blend_ps(lane, t[j], t[j + 1]);
      t[K - 1] = _mm512_mask_blend_ps(lane, t[K - 1], _mm512_set1_ps(-INFINITY));
      w = hmax16(t[0]);
    }
    return _mm512_cvtss_f32(w);
  }
  // Step 2 on the block at x + i of the row x, whose scores >= w are the bits of m.
  void take(uint32_t m, int64_t i, const float* x, float w) {
    for (; m != 0; m &= m - 1) {
      const int32_t at = (int32_t)(i + __builtin_ctz(m));
      if (x[at] > w) {
        // Fewer than K scores are above the K-th largest (none when K = 1): the test never fails.
        if constexpr (K > 1)
          if (na < K - 1) {
            above[na] = x[at];
            above_at[na++] = at;
          }
      } else if (ne < K) {
        equal_at[ne++] = at;
      }
    }
  }
  // The scores above w by rank (a stable insertion sort: equal scores keep their index order), then those equal.
  void result(float* values, int32_t* indices, const float* x) {
    if constexpr (K > 1)  // (with K = 1 none is above w)
      for (int a = 1; a < na; ++a)
        for (int p = a; p > 0 && above[p] > above[p - 1]; --p) {
          std::swap(above[p], above[p - 1]);
          std::swap(above_at[p], above_at[p - 1]);
        }
    for (int r = 0; r < K; ++r) {
      indices[r] = r < na ? above_at[r] : equal_at[r - na];
      values[r] = x[indices[r]];
    }
  }
};
#endif

// topk_forward's arithmetic on R rows, on the calling thread (kernels/topk.h: order, ties, NaN).
void topk_rows(float* values, int32_t* indices, const float* x, int64_t R, int64_t n, int64_t k);

}  // namespace cm::cpu
