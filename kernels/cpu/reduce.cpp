// CPU reductions. Determinism comes from the shape of the work, never from the thread count:
//   - a long sum is cut into fixed kBlock-element blocks; each block is summed by one thread into 8 double lanes
//     (lane j takes elements j, j+8, ...), and the block partials are added in block order;
//   - an axis sum over [O, R, I] gives each output element to one thread, which adds its R values in order.
#include "kernels/reduce.h"
#include "kernels/cpu/parallel.h"
#include "kernels/cpu/rows.h"

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace cm::cpu {
namespace {

constexpr int64_t kBlock = kSumBlock;      // elements per partial of a long sum (fixed: part of the result)
constexpr int64_t kChunk = 256;            // most inner elements per tile of an axis reduction
constexpr int64_t kRowBlock = 256;         // rows per partial of a column sum (fixed: part of the result)

// Sum of a [n] (or of its squares) by blocks. `parallel` only decides who computes the partials, not how they are
// combined, so both settings give the same bits.
template <bool Square = false>
double long_sum(const float* a, int64_t n, bool parallel) {
  if (n <= kBlock) return block_sum<Square>(a, n);
  const int64_t nb = (n + kBlock - 1) / kBlock;
  std::vector<double> part(nb);
#pragma omp parallel for schedule(static) if (parallel && n >= parallel_min())
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t lo = b * kBlock, len = (n - lo < kBlock) ? n - lo : kBlock;
    part[b] = block_sum<Square>(a + lo, len);
  }
  double s = 0;
  for (int64_t b = 0; b < nb; ++b) s += part[b];
  return s;
}

// Tile width for an [O, R, I] axis reduction with I > 1: kChunk, narrowed (down to 64) while there would be too
// few tiles to keep the threads busy. (Narrower tiles walk memory in short strided pieces.) The width only decides
// which thread owns which outputs; each output is still the same in-order sum, so it does not change results.
inline int64_t tile_width(int64_t O, int64_t I) {
  int64_t w = kChunk;
  while (w > 64 && O * ((I + w - 1) / w) < 64) w /= 2;
  return w;
}

// "v beats best" for a max that keeps the FIRST maximum and lets NaN win (and stay).
inline bool beats(float v, float best) { return v > best || (v != v && best == best); }

// The first maximum of one contiguous row a [R], R >= 1. A branchy running max does not vectorise (2 ns per
// element), so two vectorised passes: the maximum value (and whether there is a NaN), then a scan in chunks of 64
// for the first position holding it (or the first NaN). The row is still in cache for the second pass.
// (`omp simd` lets the compiler reorder the max and OR reductions, both exact; without OpenMP it is ignored.)
inline int64_t row_argmax(const float* a, int64_t R) {
  float m = -INFINITY;
  int nan = 0;
#pragma omp simd reduction(max : m) reduction(| : nan)
  for (int64_t i = 0; i < R; ++i) {
    m = a[i] > m ? a[i] : m;
    nan |= a[i] != a[i];
  }
  auto hit = [nan, m](float v) { return nan ? v != v : v == m; };  // an all -inf row finds -inf at 0
  constexpr int64_t S = 64;
  int64_t c = 0;
  for (; c + S <= R; c += S) {
    int any = 0;
    if (nan) {
#pragma omp simd reduction(| : any)
      for (int64_t j = 0; j < S; ++j) any |= a[c + j] != a[c + j];
    } else {
#pragma omp simd reduction(| : any)
      for (int64_t j = 0; j < S; ++j) any |= a[c + j] == m;
    }
    if (any) break;
  }
  for (int64_t k = c; k < R; ++k)
    if (hit(a[k])) return k;
  return 0;
}

}  // namespace

// ---------------------------------------------------------------- sums
void sum_all(float* out, const float* a, int64_t n, float scale, const float* scale_at) {
  if (scale_at) scale = *scale_at;
  out[0] = (float)((double)scale * long_sum(a, n, true));
}

double sum_squares(const float* a, int64_t n) { return long_sum<true>(a, n, true); }
void sum_squares_blocks(double* out, const float* a, int64_t n) {
  // Four full blocks at a time, their lane sums interleaved: four independent chains of adds where one block alone
  // waits on each add's latency (the sum then runs at cache speed, not at one add per cycle). Each block's lanes
  // take exactly block_sum's terms in block_sum's order, and are combined as there.
  // The lanes are one zmm per block, each lane a fused multiply-add per term. A float squared in double is exact
  // (24-bit mantissas, a 48-bit product), so the fma and block_sum's acc + v * v (contracted or not) round alike:
  // the same bits in any build. Builds without AVX-512 sum each block with block_sum itself. tests/test_optim.cpp
  // checks the bits against sum_squares.
  int64_t b = 0;
#if defined(__AVX512F__)
  for (; (b + 4) * kBlock <= n; b += 4) {
    __m512d acc[4] = {_mm512_setzero_pd(), _mm512_setzero_pd(), _mm512_setzero_pd(), _mm512_setzero_pd()};
    const float* x = a + b * kBlock;
    for (int64_t i = 0; i < kBlock; i += 8)
      for (int q = 0; q < 4; ++q) {
        const __m512d v = _mm512_maskz_cvtps_pd((__mmask8)0xFF, _mm256_loadu_ps(x + q * kBlock + i));
        acc[q] = _mm512_fmadd_pd(v, v, acc[q]);
      }
    for (int q = 0; q < 4; ++q) {
      alignas(64) double l[8];
      _mm512_store_pd(l, acc[q]);
      out[b + q] = ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
    }
  }
#endif
  for (; b * kBlock < n; ++b) out[b] = block_sum<true>(a + b * kBlock, std::min(kBlock, n - b * kBlock));
}

void sum_axis(float* out, const float* a, int64_t O, int64_t R, int64_t I, float scale) {
  const double sc = scale;
  if (I == 1) {  // each output is a contiguous row of R
    if (O == 1) return sum_all(out, a, R, scale);
#pragma omp parallel for schedule(static) if (O * R >= parallel_min())
    for (int64_t o = 0; o < O; ++o) out[o] = (float)(sc * long_sum(a + o * R, R, false));
    return;
  }
  // Column sums, [R, I] -> [I] (the bias gradient [B*T, C] -> [C]): too few outputs to share out, so the rows are
  // cut into fixed blocks of kRowBlock; each block's partial sums (double) are made by one thread streaming whole
  // rows, and the partials are added in block order.
  if (O == 1 && R > kRowBlock && I <= 8192) {
    const int64_t nb = (R + kRowBlock - 1) / kRowBlock;
    std::vector<double> part((size_t)(nb * I));
#pragma omp parallel for schedule(static) if (R * I >= parallel_min())
    for (int64_t b = 0; b < nb; ++b) {
      double* __restrict acc = part.data() + b * I;
      for (int64_t i = 0; i < I; ++i) acc[i] = 0;
      const int64_t r1 = (R - b * kRowBlock < kRowBlock) ? R : (b + 1) * kRowBlock;
      for (int64_t r = b * kRowBlock; r < r1; ++r) {
        const float* __restrict row = a + r * I;
        for (int64_t i = 0; i < I; ++i) acc[i] += (double)row[i];
      }
    }
    double* __restrict tot = part.data();  // block 0's partials, then blocks 1.. added in order
    for (int64_t b = 1; b < nb; ++b) {
      const double* __restrict pb = part.data() + b * I;
      for (int64_t i = 0; i < I; ++i) tot[i] += pb[i];
    }
    for (int64_t i = 0; i < I; ++i) out[i] = (float)(sc * tot[i]);
    return;
  }
  // Tiles of (o, W inner elements): a thread walks r in order and adds whole contiguous row pieces into
  // double accumulators, so the loads stream through memory and the adds vectorise.
  const int64_t W = tile_width(O, I), chunks = (I + W - 1) / W;
#pragma omp parallel for schedule(static) if (O * R * I >= parallel_min())
  for (int64_t t = 0; t < O * chunks; ++t) {
    const int64_t o = t / chunks, i0 = (t % chunks) * W;
    const int64_t w = (I - i0 < W) ? I - i0 : W;
    double acc[kChunk];
    for (int64_t i = 0; i < w; ++i) acc[i] = 0;
    for (int64_t r = 0; r < R; ++r) {
      const float* row = a + (o * R + r) * I + i0;
      for (int64_t i = 0; i < w; ++i) acc[i] += (double)row[i];
    }
    float* dst = out + o * I + i0;
    for (int64_t i = 0; i < w; ++i) dst[i] = (float)(sc * acc[i]);
  }
}

void sum_to(float* out, const float* a, int64_t D, const int64_t* a_shape, const int64_t* out_shape) {
  // Collapse to alternating groups of kept and reduced dims: [3, 4, 5] -> [1, 4, 1] is (reduce 3, keep 4,
  // reduce 5). Size-1 dims of a take no part.
  struct Group {
    int64_t size;
    bool reduce;
  };
  std::vector<Group> g;
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
  for (const Group& x : g) nred += x.reduce;
  if (nred == 0) {  // nothing to reduce: a copy
#pragma omp parallel for schedule(static) if (out_n >= parallel_min())
    for (int64_t i = 0; i < out_n; ++i) out[i] = a[i];
    return;
  }
  // Reduce the innermost reduced group first, then the next one out; each pass is a [O, R, I] sum_axis whose
  // inner part holds only kept groups. Intermediate results live in float (one extra rounding per pass).
  std::vector<float> cur, next;
  const float* src = a;
  for (int64_t k = (int64_t)g.size() - 1; k >= 0; --k) {
    if (!g[k].reduce) continue;
    int64_t O = 1, I = 1;
    for (int64_t j = 0; j < k; ++j) O *= g[j].size;
    for (int64_t j = k + 1; j < (int64_t)g.size(); ++j) I *= g[j].size;
    float* dst = out;
    if (--nred > 0) {
      next.resize((size_t)(O * I));
      dst = next.data();
    }
    sum_axis(dst, src, O, g[k].size, I, 1.f);
    g.erase(g.begin() + k);
    cur.swap(next);
    src = cur.data();
  }
}

// ---------------------------------------------------------------- max
void max_all(float* out, int64_t* idx, const float* a, int64_t n) {
  const int64_t nb = (n + kBlock - 1) / kBlock;
  std::vector<float> bv(nb);
  std::vector<int64_t> bi(nb);
#pragma omp parallel for schedule(static) if (n >= parallel_min())
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t lo = b * kBlock, hi = (n - lo < kBlock) ? n : lo + kBlock;
    const int64_t at = lo + row_argmax(a + lo, hi - lo);
    bv[b] = a[at];
    bi[b] = at;
  }
  // Blocks in order, strict "beats": a tie keeps the earlier block, so the first maximum wins overall.
  float best = bv[0];
  int64_t at = bi[0];
  for (int64_t b = 1; b < nb; ++b)
    if (beats(bv[b], best)) best = bv[b], at = bi[b];
  if (out) out[0] = best;
  if (idx) idx[0] = at;
}

void max_axis(float* out, int32_t* idx, const float* a, int64_t O, int64_t R, int64_t I) {
  if (I == 1) {  // each output is a contiguous row of R
#pragma omp parallel for schedule(static) if (O * R >= parallel_min())
    for (int64_t o = 0; o < O; ++o) {
      const int64_t at = row_argmax(a + o * R, R);
      if (out) out[o] = a[o * R + at];
      if (idx) idx[o] = (int32_t)at;
    }
    return;
  }
  const int64_t W = tile_width(O, I), chunks = (I + W - 1) / W;
#pragma omp parallel for schedule(static) if (O * R * I >= parallel_min())
  for (int64_t t = 0; t < O * chunks; ++t) {
    const int64_t o = t / chunks, i0 = (t % chunks) * W;
    const int64_t w = (I - i0 < W) ? I - i0 : W;
    const float* base = a + o * R * I + i0;
    float best[kChunk];
    int32_t at[kChunk];
    for (int64_t i = 0; i < w; ++i) best[i] = base[i], at[i] = 0;
    for (int64_t r = 1; r < R; ++r) {
      const float* row = base + r * I;
      for (int64_t i = 0; i < w; ++i) {  // selects, not branches: vectorises with masks
        const bool take = beats(row[i], best[i]);
        best[i] = take ? row[i] : best[i];
        at[i] = take ? (int32_t)r : at[i];
      }
    }
    if (out)
      for (int64_t i = 0; i < w; ++i) out[o * I + i0 + i] = best[i];
    if (idx)
      for (int64_t i = 0; i < w; ++i) idx[o * I + i0 + i] = at[i];
  }
}

void max_axis_backward(float* dx, const float* dy, const int32_t* idx, int64_t O, int64_t R, int64_t I) {
#pragma omp parallel for schedule(static) if (O * R * I >= parallel_min())
  for (int64_t o = 0; o < O; ++o) {
    float* d = dx + o * R * I;
    for (int64_t j = 0; j < R * I; ++j) d[j] = 0.f;
    for (int64_t i = 0; i < I; ++i) d[(int64_t)idx[o * I + i] * I + i] = dy[o * I + i];
  }
}

}  // namespace cm::cpu
