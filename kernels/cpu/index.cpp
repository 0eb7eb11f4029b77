// CPU indexing kernels. See kernels/index.h for the [O, D, I] layout and the determinism rule.
#include "kernels/index.h"

#include <algorithm>
#include <cstring>

#include "kernels/cpu/parallel.h"

namespace cm::cpu {
namespace {

// The adding kernels split the inner dims into chunks of IB elements: a tile (o, chunk) is one thread's, and it
// walks the source positions in order. IB keeps a tile's output rows in L1 while giving 2+ tiles when O is 1.
constexpr int64_t IB = 256;

template <class T>
void concat_piece_t(T* dst, const T* src, int64_t O, int64_t Dd, int64_t at, int64_t Ds, int64_t I) {
  const int64_t row = Ds * I;  // one outer slice of src is contiguous, and lands contiguously in dst
  if (row == 0) return;        // an empty piece: its pointers may be null, which memcpy must not get
#pragma omp parallel for schedule(static) if (O * row >= parallel_min())
  for (int64_t o = 0; o < O; ++o) std::memcpy(dst + (o * Dd + at) * I, src + o * row, (size_t)row * sizeof(T));
}

template <class T>
void split_piece_t(T* dst, const T* src, int64_t O, int64_t Ds, int64_t at, int64_t Dd, int64_t I) {
  const int64_t row = Dd * I;
  if (row == 0) return;  // as in concat_piece_t
#pragma omp parallel for schedule(static) if (O * row >= parallel_min())
  for (int64_t o = 0; o < O; ++o) std::memcpy(dst + o * row, src + (o * Ds + at) * I, (size_t)row * sizeof(T));
}

template <class T>
void index_select_t(T* out, const T* a, const int32_t* index, int64_t O, int64_t D, int64_t n, int64_t I) {
  if (I == 0) return;  // rows of no elements: `a` and `out` may be null
#pragma omp parallel for schedule(static) if (O * n * I >= parallel_min())
  for (int64_t oj = 0; oj < O * n; ++oj) {
    int64_t o = oj / n, j = oj % n;
    std::memcpy(out + oj * I, a + (o * D + index[j]) * I, (size_t)I * sizeof(T));
  }
}

template <class T>
void gather_t(T* out, const T* a, const int32_t* index, int64_t O, int64_t D, int64_t m, int64_t I) {
#pragma omp parallel for schedule(static) if (O * m * I >= parallel_min())
  for (int64_t oj = 0; oj < O * m; ++oj) {
    const int64_t o = oj / m;
    const T* ao = a + o * D * I;
    const int32_t* ix = index + oj * I;
    T* y = out + oj * I;
    for (int64_t i = 0; i < I; ++i) y[i] = ao[(int64_t)ix[i] * I + i];
  }
}

// Inner offset of the output row `row` (all dims but the last) for an input read through `st`.
inline int64_t row_offset(int64_t row, int64_t ndim, const int64_t* shape, const int64_t* st) {
  int64_t off = 0;
  for (int64_t d = ndim - 2; d >= 0; --d) {
    off += (row % shape[d]) * st[d];
    row /= shape[d];
  }
  return off;
}

}  // namespace

int64_t index_first_bad(const int32_t* index, int64_t n, int64_t D) {
  for (int64_t p = 0; p < n; ++p)
    if (index[p] < 0 || index[p] >= D) return p;
  return -1;
}

void concat_piece(float* dst, const float* src, int64_t O, int64_t Dd, int64_t at, int64_t Ds, int64_t I) {
  concat_piece_t(dst, src, O, Dd, at, Ds, I);
}
void concat_piece(int32_t* dst, const int32_t* src, int64_t O, int64_t Dd, int64_t at, int64_t Ds, int64_t I) {
  concat_piece_t(dst, src, O, Dd, at, Ds, I);
}
void split_piece(float* dst, const float* src, int64_t O, int64_t Ds, int64_t at, int64_t Dd, int64_t I) {
  split_piece_t(dst, src, O, Ds, at, Dd, I);
}
void split_piece(int32_t* dst, const int32_t* src, int64_t O, int64_t Ds, int64_t at, int64_t Dd, int64_t I) {
  split_piece_t(dst, src, O, Ds, at, Dd, I);
}
void index_select(float* out, const float* a, const int32_t* index, int64_t O, int64_t D, int64_t n, int64_t I) {
  index_select_t(out, a, index, O, D, n, I);
}
void index_select(int32_t* out, const int32_t* a, const int32_t* index, int64_t O, int64_t D, int64_t n,
                  int64_t I) {
  index_select_t(out, a, index, O, D, n, I);
}
void gather(float* out, const float* a, const int32_t* index, int64_t O, int64_t D, int64_t m, int64_t I) {
  gather_t(out, a, index, O, D, m, I);
}
void gather(int32_t* out, const int32_t* a, const int32_t* index, int64_t O, int64_t D, int64_t m, int64_t I) {
  gather_t(out, a, index, O, D, m, I);
}

void index_add(float* out, const float* src, const int32_t* index, int64_t O, int64_t D, int64_t n, int64_t I) {
  const int64_t nb = (I + IB - 1) / IB;
#pragma omp parallel for schedule(static) if (O * n * I >= parallel_min())
  for (int64_t tile = 0; tile < O * nb; ++tile) {
    const int64_t o = tile / nb, i0 = (tile % nb) * IB, i1 = std::min(I, i0 + IB);
    for (int64_t j = 0; j < n; ++j) {  // in order: repeated indices add up the same way every run
      float* __restrict y = out + (o * D + index[j]) * I;
      const float* __restrict s = src + (o * n + j) * I;
      for (int64_t i = i0; i < i1; ++i) y[i] += s[i];
    }
  }
}

void scatter_add(float* out, const float* src, const int32_t* index, int64_t O, int64_t D, int64_t m, int64_t I) {
  const int64_t nb = (I + IB - 1) / IB;
#pragma omp parallel for schedule(static) if (O * m * I >= parallel_min())
  for (int64_t tile = 0; tile < O * nb; ++tile) {
    const int64_t o = tile / nb, i0 = (tile % nb) * IB, i1 = std::min(I, i0 + IB);
    float* yo = out + o * D * I;
    for (int64_t j = 0; j < m; ++j) {
      const float* s = src + (o * m + j) * I;
      const int32_t* ix = index + (o * m + j) * I;
      for (int64_t i = i0; i < i1; ++i) yo[(int64_t)ix[i] * I + i] += s[i];
    }
  }
}

void where(float* out, const int32_t* mask, const float* a, const float* b, int64_t ndim, const int64_t* shape,
           const int64_t* mask_strides, const int64_t* a_strides, const int64_t* b_strides) {
  int64_t numel = 1;
  for (int64_t d = 0; d < ndim; ++d) numel *= shape[d];
  if (numel == 0) return;
  const int64_t inner = ndim > 0 ? shape[ndim - 1] : 1, rows = numel / inner;
  const int64_t ms = ndim > 0 ? mask_strides[ndim - 1] : 0, as = ndim > 0 ? a_strides[ndim - 1] : 0,
                bs = ndim > 0 ? b_strides[ndim - 1] : 0;
#pragma omp parallel for schedule(static) if (numel >= parallel_min())
  for (int64_t r = 0; r < rows; ++r) {
    const int32_t* __restrict m = mask + row_offset(r, ndim, shape, mask_strides);
    const float* __restrict x = a + row_offset(r, ndim, shape, a_strides);
    const float* __restrict y = b + row_offset(r, ndim, shape, b_strides);
    float* __restrict o = out + r * inner;
    if (ms == 1 && as == 1 && bs == 1) {  // the common same-shape case: a select that vectorises
      for (int64_t c = 0; c < inner; ++c) o[c] = m[c] != 0 ? x[c] : y[c];
    } else {
      for (int64_t c = 0; c < inner; ++c) o[c] = m[c * ms] != 0 ? x[c * as] : y[c * bs];
    }
  }
}

void masked_fill(float* out, const float* a, const int32_t* mask, float value, int64_t ndim, const int64_t* shape,
                 const int64_t* mask_strides) {
  int64_t numel = 1;
  for (int64_t d = 0; d < ndim; ++d) numel *= shape[d];
  if (numel == 0) return;
  const int64_t inner = ndim > 0 ? shape[ndim - 1] : 1, rows = numel / inner;
  const int64_t ms = ndim > 0 ? mask_strides[ndim - 1] : 0;
#pragma omp parallel for schedule(static) if (numel >= parallel_min())
  for (int64_t r = 0; r < rows; ++r) {
    const int32_t* __restrict m = mask + row_offset(r, ndim, shape, mask_strides);
    const float* __restrict x = a + r * inner;
    float* __restrict o = out + r * inner;
    if (ms == 1) {
      for (int64_t c = 0; c < inner; ++c) o[c] = m[c] != 0 ? value : x[c];
    } else {
      for (int64_t c = 0; c < inner; ++c) o[c] = m[c * ms] != 0 ? value : x[c];
    }
  }
}

}  // namespace cm::cpu
