// CPU top-k. See kernels/topk.h for the order (descending, ties -> lower index, NaN first) and the two paths.
#include "kernels/topk.h"

#include <algorithm>
#include <cstring>
#include <numeric>
#include <vector>

namespace cm::cpu {
namespace {

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
  // Blocks of 16: one vectorised test "is any score not <= the current K-th?" (true for NaN as well, so a NaN in
  // the block or as the K-th sends us to the exact scalar test below). In a long routing row almost every block
  // is rejected here after the first few.
  for (; i + 16 <= n; i += 16) {
    const float* xb = x + i;
    int any = 0;
    for (int j = 0; j < 16; ++j) any |= !(xb[j] <= worst);
    if (!any) continue;
    for (int j = 0; j < 16; ++j)
      if (ranks_above(xb[j], worst)) {
        insert(xb[j], (int32_t)(i + j));
        worst = bv[K - 1];
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
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < R; ++r) topk_row_small<K>(values + r * K, indices + r * K, x + r * n, n);
}

// General path: partial selection on an index array. The comparator is a strict total order (value rank, then
// index), so nth_element/sort give one answer whatever their internal pivots.
void topk_general(float* values, int32_t* indices, const float* x, int64_t R, int64_t n, int64_t k) {
#pragma omp parallel
  {
    std::vector<int32_t> ord((size_t)n);  // per-thread scratch
#pragma omp for schedule(static)
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
}

}  // namespace

void topk_forward(float* values, int32_t* indices, const float* x, int64_t R, int64_t n, int64_t k) {
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

void topk_backward(float* dx, const float* dvalues, const int32_t* indices, int64_t R, int64_t n, int64_t k) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < R; ++r) {
    float* dr = dx + r * n;
    std::memset(dr, 0, (size_t)n * sizeof(float));
    for (int64_t j = 0; j < k; ++j) dr[indices[r * k + j]] = dvalues[r * k + j];
  }
}

}  // namespace cm::cpu
