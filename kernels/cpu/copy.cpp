#include "kernels/copy.h"

#include <cstring>
#include <vector>

#include "kernels/cpu/parallel.h"

namespace cm::cpu {

namespace {

// Copies one innermost row of `n` elements; the common cases are specialised so the compiler vectorises them.
inline void copy_row(char* d, int64_t ds, const char* s, int64_t ss, int64_t n, int64_t esize) {
  if (ds == 1 && ss == 1) {
    std::memcpy(d, s, (size_t)(n * esize));
  } else if (esize == 4) {
    uint32_t* __restrict dp = (uint32_t*)d;
    const uint32_t* __restrict sp = (const uint32_t*)s;
    for (int64_t i = 0; i < n; ++i) dp[i * ds] = sp[i * ss];
  } else {
    for (int64_t i = 0; i < n; ++i) std::memcpy(d + i * ds * esize, s + i * ss * esize, (size_t)esize);
  }
}

// The rows of a strided walk: every dimension but the last (row-major order).
inline int64_t outer_rows(const int64_t* shape, int64_t rank) {
  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < rank; ++d) rows *= shape[d];
  return rows;
}

// Element offsets of outer row r under S stride sets at once (one index decomposition for all of them).
template <int S>
inline void row_offsets(int64_t r, const int64_t* shape, int64_t rank, const int64_t* const (&strides)[S],
                        int64_t (&off)[S]) {
  for (int s = 0; s < S; ++s) off[s] = 0;
  for (int64_t d = rank - 2; d >= 0; --d) {
    const int64_t i = r % shape[d];
    r /= shape[d];
    for (int s = 0; s < S; ++s) off[s] += i * strides[s][d];
  }
}

}  // namespace

void strided_copy(void* dst, const int64_t* dst_strides, const void* src, const int64_t* src_strides,
                  const int64_t* shape, int64_t rank, int64_t esize) {
  if (rank == 0) {
    std::memcpy(dst, src, (size_t)esize);
    return;
  }
  const int64_t rows = outer_rows(shape, rank), n = shape[rank - 1];
  if (rows == 0 || n == 0) return;
  // Each outer row is independent: split rows across threads. Large rows are cheap to index; tiny ones are
  // memory bound either way.
#pragma omp parallel for schedule(static) if (rows * n >= parallel_min())
  for (int64_t r = 0; r < rows; ++r) {
    int64_t off[2];  // dst, src
    row_offsets<2>(r, shape, rank, {dst_strides, src_strides}, off);
    copy_row((char*)dst + off[0] * esize, dst_strides[rank - 1], (const char*)src + off[1] * esize,
             src_strides[rank - 1], n, esize);
  }
}

void strided_add(float* dst, const int64_t* dst_strides, const float* src, const int64_t* shape, int64_t rank) {
  if (rank == 0) {
    dst[0] += src[0];
    return;
  }
  const int64_t rows = outer_rows(shape, rank), n = shape[rank - 1], ds = dst_strides[rank - 1];
  if (rows == 0 || n == 0) return;
#pragma omp parallel for schedule(static) if (rows * n >= parallel_min())
  for (int64_t r = 0; r < rows; ++r) {
    int64_t off[1];
    row_offsets<1>(r, shape, rank, {dst_strides}, off);
    float* __restrict dp = dst + off[0];
    const float* __restrict sp = src + r * n;
    if (ds == 1)
      for (int64_t i = 0; i < n; ++i) dp[i] += sp[i];
    else
      for (int64_t i = 0; i < n; ++i) dp[i * ds] += sp[i];
  }
}

void f32_to_i32(int32_t* dst, const float* src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = (int32_t)src[i];
}
void i32_to_f32(float* dst, const int32_t* src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = (float)src[i];
}

}  // namespace cm::cpu
