// CPU top-k. See kernels/topk.h for the order (descending, ties -> lower index, NaN first) and the two paths.
#include "kernels/topk.h"
#include "kernels/cpu/rows.h"

#include <algorithm>
#include <cstring>
#include <numeric>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace cm::cpu {
namespace {

// Bit j set where xb[j] is not <= w: greater, or a NaN on either side (unordered compares true). One vector
// compare per 16 scores; the portable loop is the reference for what the intrinsics compute.
inline uint32_t not_le_mask16(const float* xb, float w) {
#if defined(__AVX512F__)
  return (uint32_t)_mm512_cmp_ps_mask(_mm512_loadu_ps(xb), _mm512_set1_ps(w), _CMP_NLE_UQ);
#elif defined(__AVX2__)
  const __m256 wv = _mm256_set1_ps(w);
  uint32_t lo = (uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(xb), wv, _CMP_NLE_UQ));
  uint32_t hi = (uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(xb + 8), wv, _CMP_NLE_UQ));
  return lo | hi << 8;
#else
  uint32_t m = 0;
  for (int j = 0; j < 16; ++j) m |= (uint32_t)!(xb[j] <= w) << j;
  return m;
#endif
}

// "a ranks before b" on values alone: larger, or NaN against a number. Equal values (and two NaNs) are not
// ordered here; the caller breaks those ties by index.
inline bool ranks_above(float a, float b) { return a > b || (a != a && b == b); }

// Fast path, one row: keep the best K seen so far in bv/bi, sorted by rank. Elements arrive in index order, so a
// newcomer that ties an element already kept goes after it: that is the "lower index first" rule for free.
template <int K>
void topk_row_small(float* __restrict values, int32_t* __restrict indices, const float* __restrict x, int64_t n) {
  float bv[K] = {};  // filled from the first K elements (k <= n)
  int32_t bi[K] = {};
  int m = 0;  // how many kept so far (< K only while filling)
  auto insert = [&](float v, int32_t i) {
    int p = (m < K) ? m++ : K - 1;  // when full, the old K-th is dropped
    while (p > 0 && ranks_above(v, bv[p - 1])) {
      bv[p] = bv[p - 1];
      bi[p] = bi[p - 1];
      --p;
    }
    bv[p] = v;
    bi[p] = i;
  };
  int64_t i = 0;
  for (; i < n && m < K; ++i) insert(x[i], (int32_t)i);
  float worst = bv[K - 1];
  // Blocks of 16: one vector compare against the current K-th gives the candidates; only those are visited, in
  // index order, each re-tested exactly (the K-th rises as we insert, and a NaN K-th lets everything through the
  // vector test). A random row of n scores sees about K ln(n/K) insertions, so most blocks cost one compare.
  for (; i + 16 <= n; i += 16) {
    const float* xb = x + i;
    for (uint32_t m = not_le_mask16(xb, worst); m != 0; m &= m - 1) {
      const int j = __builtin_ctz(m);
      if (ranks_above(xb[j], worst)) {
        insert(xb[j], (int32_t)(i + j));
        worst = bv[K - 1];
      }
    }
  }
  for (; i < n; ++i)
    if (ranks_above(x[i], worst)) {
      insert(x[i], (int32_t)i);
      worst = bv[K - 1];
    }
  for (int j = 0; j < K; ++j) {
    values[j] = bv[j];
    indices[j] = bi[j];
  }
}

template <int K>
void topk_small(float* values, int32_t* indices, const float* x, int64_t R, int64_t n) {
  for (int64_t r = 0; r < R; ++r) topk_row_small<K>(values + r * K, indices + r * K, x + r * n, n);
}

// General path: partial selection on an index array. The comparator is a strict total order (value rank, then
// index), so nth_element/sort give one answer whatever their internal pivots.
void topk_general(float* values, int32_t* indices, const float* x, int64_t R, int64_t n, int64_t k) {
  std::vector<int32_t> ord((size_t)n);
  for (int64_t r = 0; r < R; ++r) {
    const float* xr = x + r * n;
    std::iota(ord.begin(), ord.end(), 0);
    auto before = [xr](int32_t a, int32_t b) {
      float va = xr[a], vb = xr[b];
      if (ranks_above(va, vb)) return true;
      if (ranks_above(vb, va)) return false;
      return a < b;
    };
    if (k < n) std::nth_element(ord.begin(), ord.begin() + k, ord.end(), before);
    std::sort(ord.begin(), ord.begin() + k, before);
    for (int64_t j = 0; j < k; ++j) {
      indices[r * k + j] = ord[(size_t)j];
      values[r * k + j] = xr[ord[(size_t)j]];
    }
  }
}

}  // namespace

void topk_rows(float* values, int32_t* indices, const float* x, int64_t R, int64_t n, int64_t k) {
  if (R == 0 || k == 0) return;
  switch (k) {
    case 1: return topk_small<1>(values, indices, x, R, n);
    case 2: return topk_small<2>(values, indices, x, R, n);
    case 3: return topk_small<3>(values, indices, x, R, n);
    case 4: return topk_small<4>(values, indices, x, R, n);
    case 5: return topk_small<5>(values, indices, x, R, n);
    case 6: return topk_small<6>(values, indices, x, R, n);
    case 7: return topk_small<7>(values, indices, x, R, n);
    case 8: return topk_small<8>(values, indices, x, R, n);
    default: return topk_general(values, indices, x, R, n, k);
  }
}

// Rows in parallel, in static chunks of whole rows: each row is computed by one thread, so the result does not
// depend on the thread count.
void topk_forward(float* values, int32_t* indices, const float* x, int64_t R, int64_t n, int64_t k) {
  if (R == 0 || k == 0) return;
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(R, 256));
#pragma omp parallel for schedule(static) if (R * n > 32768)  // below that, thread start-up costs more
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t r0 = R * c / chunks, r1 = R * (c + 1) / chunks;
    topk_rows(values + r0 * k, indices + r0 * k, x + r0 * n, r1 - r0, n, k);
  }
}

void topk_backward(float* dx, const float* dvalues, const int32_t* indices, int64_t R, int64_t n, int64_t k) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < R; ++r) {
    float* dr = dx + r * n;
    std::memset(dr, 0, (size_t)n * sizeof(float));
    for (int64_t j = 0; j < k; ++j) dr[indices[r * k + j]] = dvalues[r * k + j];
  }
}

}  // namespace cm::cpu
