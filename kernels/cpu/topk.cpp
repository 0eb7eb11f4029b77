// CPU top-k. See kernels/topk.h for the order (descending, ties -> lower index, NaN first) and the paths.
#include "kernels/topk.h"
#include "kernels/cpu/parallel.h"
#include "kernels/cpu/rows.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__)
#if defined(__GNUC__) && !defined(__clang__)
// GCC 12 flags the self-initialised _mm512_undefined_ps() inside the AVX-512 max and shuffle intrinsics (a false
// positive, as in kernels/cpu/gemm.cpp); the pragma must precede the header for the warning's location to fall
// under it.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>
#endif

namespace cm::cpu {
namespace {

// The compares of a block of 16 scores against w, one vector compare each (the portable loops are the reference
// for what the intrinsics compute). Bit j set where xb[j]:
//   NotLe: is not <= w: greater, or a NaN on either side (unordered compares true);
//   Eq:    == w (-0.0 == +0.0; a NaN equals nothing);
//   Unord: is a NaN (w unused).
enum class Cmp { NotLe, Eq, Unord };

template <Cmp op>
inline uint32_t mask16(const float* xb, float w) {
#if defined(__AVX512F__)
  const __m512 v = _mm512_loadu_ps(xb);
  if constexpr (op == Cmp::NotLe) return (uint32_t)_mm512_cmp_ps_mask(v, _mm512_set1_ps(w), _CMP_NLE_UQ);
  if constexpr (op == Cmp::Eq) return (uint32_t)_mm512_cmp_ps_mask(v, _mm512_set1_ps(w), _CMP_EQ_OQ);
  return (uint32_t)_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
#elif defined(__AVX2__)
  uint32_t m = 0;
  for (int h = 0; h < 2; ++h) {
    const __m256 v = _mm256_loadu_ps(xb + 8 * h), wv = _mm256_set1_ps(w);
    __m256 c;
    if constexpr (op == Cmp::NotLe) c = _mm256_cmp_ps(v, wv, _CMP_NLE_UQ);
    else if constexpr (op == Cmp::Eq) c = _mm256_cmp_ps(v, wv, _CMP_EQ_OQ);
    else c = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
    m |= (uint32_t)_mm256_movemask_ps(c) << (8 * h);
  }
  return m;
#else
  uint32_t m = 0;
  for (int j = 0; j < 16; ++j) {
    bool bit;
    if constexpr (op == Cmp::NotLe) bit = !(xb[j] <= w);
    else if constexpr (op == Cmp::Eq) bit = xb[j] == w;
    else bit = xb[j] != xb[j];
    m |= (uint32_t)bit << j;
  }
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
  for (int64_t i = 0; i < K; ++i) insert(x[i], (int32_t)i);
  float worst = bv[K - 1];
  // Blocks of 16 from the row's start (the first K, kept above, masked out): one vector compare against the
  // current K-th gives the candidates; only those are visited, in index order, each re-tested exactly (the K-th
  // rises as we insert, and a NaN K-th lets everything through the vector test). A random row of n scores sees
  // about K ln(n/K) insertions, so most blocks cost one compare. The last, short block is compared from a copy
  // padded with -inf (never above the K-th) and masked to the row: a router's rows of 16 or 32 scores are one or
  // two compares, with no scalar tail.
  for (int64_t i = 0; i < n; i += 16) {
    const float* xb = x + i;
    uint32_t cand;
    if (i + 16 <= n) {
      cand = mask16<Cmp::NotLe>(xb, worst);
    } else {
      float pad[16];
      for (int j = 0; j < 16; ++j) pad[j] = i + j < n ? xb[j] : -INFINITY;
      cand = mask16<Cmp::NotLe>(pad, worst) & ((1u << (n - i)) - 1u);
    }
    if (i == 0) cand &= ~((1u << K) - 1u);
    for (; cand != 0; cand &= cand - 1) {
      const int j = __builtin_ctz(cand);
      if (ranks_above(xb[j], worst)) {
        insert(xb[j], (int32_t)(i + j));
        worst = bv[K - 1];
      }
    }
  }
  for (int j = 0; j < K; ++j) {
    values[j] = bv[j];
    indices[j] = bi[j];
  }
}

// Short rows (n <= 64: a tree router's levels), branch-free: K rounds of "the largest score not yet taken, at its
// lowest index", each a vector max over the row and a vector equality test, where the streaming path above tests
// its candidates one by one and mispredicts on rows this short (at n = 32: 9 ns a row for k = 1 and 16 ns for
// k = 2, against 15 and 57). The row is padded with -inf to whole blocks (never above a score, and masked off); a
// taken score becomes -inf and its bit is set in `taken`, so a later round skips it even when the scores left
// are -inf too. The same order as the streaming path: the largest first, ties (and -0.0 against +0.0) to the
// lower index. A row holding a NaN (which ranks above every number) is left to the streaming path: returns
// false, having written nothing.
template <int K>
bool topk_row_short(float* __restrict values, int32_t* __restrict indices, const float* __restrict x, int64_t n) {
  const uint64_t row = n == 64 ? ~0ull : (1ull << n) - 1;
  uint64_t taken = 0;
#if defined(__AVX512F__)
  // The row in (up to) four registers; a taken score becomes -inf by a masked blend there (a scalar store into a
  // copy and the next round's vector load of it would stall on store forwarding: 40 ns a round).
  const int blocks = (int)((n + 15) / 16);
  const __m512 ninf = _mm512_set1_ps(-INFINITY);
  __m512 v[4];
  uint64_t nan = 0;
  for (int q = 0; q < 4; ++q) {
    // The row's scores only: a masked load reads no lane outside the mask (the last block's tail).
    v[q] = q < blocks ? _mm512_mask_loadu_ps(ninf, (__mmask16)(row >> (16 * q)), x + 16 * q) : ninf;
    nan |= _mm512_cmp_ps_mask(v[q], v[q], _CMP_UNORD_Q);
  }
  if (nan) return false;
  for (int r = 0; r < K; ++r) {
    // The max in every lane, by halving (exact in any order here: no NaN, and -0.0 against +0.0 either way, the
    // equality test takes both).
    __m512 mv = _mm512_max_ps(_mm512_max_ps(v[0], v[1]), _mm512_max_ps(v[2], v[3]));
    mv = _mm512_max_ps(mv, _mm512_shuffle_f32x4(mv, mv, 0x4E));  // 256-bit halves
    mv = _mm512_max_ps(mv, _mm512_shuffle_f32x4(mv, mv, 0xB1));  // 128-bit quarters
    mv = _mm512_max_ps(mv, _mm512_permute_ps(mv, 0x4E));         // pairs within a quarter
    mv = _mm512_max_ps(mv, _mm512_permute_ps(mv, 0xB1));         // neighbours
    uint64_t eq = 0;
    for (int q = 0; q < blocks; ++q) eq |= (uint64_t)_mm512_cmp_ps_mask(v[q], mv, _CMP_EQ_OQ) << (16 * q);
    const int j = __builtin_ctzll(eq & row & ~taken);  // nonempty: K <= n scores, the max among those not taken
    taken |= 1ull << j;
    for (int q = 0; q < 4; ++q) v[q] = _mm512_mask_blend_ps((__mmask16)(taken >> (16 * q)), v[q], ninf);
    values[r] = x[j];
    indices[r] = j;
  }
#else  // the same rounds on a copy in memory
  float c[64];
  const int64_t padded = (n + 15) / 16 * 16;
  for (int64_t i = 0; i < padded; ++i) c[i] = i < n ? x[i] : -INFINITY;
  uint64_t nan = 0;
  for (int64_t i = 0; i < padded; i += 16) nan |= mask16<Cmp::Unord>(c + i, 0.f);
  if (nan) return false;
  for (int r = 0; r < K; ++r) {
    const float m = row_max(c, padded);
    uint64_t eq = 0;
    for (int64_t i = 0; i < padded; i += 16) eq |= (uint64_t)mask16<Cmp::Eq>(c + i, m) << i;
    const int j = __builtin_ctzll(eq & row & ~taken);  // nonempty: K <= n scores, the max among those not taken
    taken |= 1ull << j;
    c[j] = -INFINITY;
    values[r] = x[j];
    indices[r] = j;
  }
#endif
  return true;
}

#if defined(__AVX512F__)
// Long rows (n > 64: flat routing over many experts): LongTopK's two steps (kernels/cpu/rows.h), neither testing
// candidates one by one. The same answer as the streaming path (the largest first, ties and -0.0 against +0.0 to
// the lower index), at 1024 scores and k = 2 about twice as fast: a random row makes the streaming path insert
// about K ln(n / K) times, each a mispredicted branch. A row holding a NaN returns false, having written nothing.
template <int K>
bool topk_row_long(float* __restrict values, int32_t* __restrict indices, const float* __restrict x, int64_t n) {
  const __m512 ninf = _mm512_set1_ps(-INFINITY);
  const int64_t tail = n % 16, whole = n - tail;
  const __mmask16 tail_mask = (__mmask16)((1u << tail) - 1u);
  LongTopK<K> top;
  for (int64_t i = 0; i < whole; i += 16) top.down(_mm512_loadu_ps(x + i));
  if (tail) top.down(_mm512_mask_loadu_ps(ninf, tail_mask, x + whole));  // reads no lane past the row
  if (top.nan) return false;
  const float w = top.kth();
  const __m512 wv = _mm512_set1_ps(w);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 in = i < whole ? (__mmask16)0xFFFF : tail_mask;
    top.take(_mm512_mask_cmp_ps_mask(in, _mm512_maskz_loadu_ps(in, x + i), wv, _CMP_GE_OQ), i, x, w);
  }
  top.result(values, indices, x);
  return true;
}
#endif

template <int K>
void topk_small(float* values, int32_t* indices, const float* x, int64_t R, int64_t n) {
  for (int64_t r = 0; r < R; ++r) {
    float* v = values + r * K;
    int32_t* ix = indices + r * K;
    const float* xr = x + r * n;
#if defined(__AVX512F__)
    if (n > 64 ? topk_row_long<K>(v, ix, xr, n) : topk_row_short<K>(v, ix, xr, n)) continue;
#else
    if (n <= 64 && topk_row_short<K>(v, ix, xr, n)) continue;
#endif
    topk_row_small<K>(v, ix, xr, n);  // a row holding a NaN (or a long row, without AVX-512)
  }
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
#pragma omp parallel for schedule(static) if (R * n >= parallel_min_compute())
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t r0 = R * c / chunks, r1 = R * (c + 1) / chunks;
    topk_rows(values + r0 * k, indices + r0 * k, x + r0 * n, r1 - r0, n, k);
  }
}

void topk_backward(float* dx, const float* dvalues, const int32_t* indices, int64_t R, int64_t n, int64_t k) {
#pragma omp parallel for schedule(static) if (R * n >= parallel_min())
  for (int64_t r = 0; r < R; ++r) {
    float* dr = dx + r * n;
    std::memset(dr, 0, (size_t)n * sizeof(float));
    for (int64_t j = 0; j < k; ++j) dr[indices[r * k + j]] = dvalues[r * k + j];
  }
}

}  // namespace cm::cpu
