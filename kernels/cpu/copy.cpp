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

}  // namespace

void strided_copy(void* dst, const int64_t* dst_strides, const void* src, const int64_t* src_strides,
                  const int64_t* shape, int64_t rank, int64_t esize) {
  if (rank == 0) {
    std::memcpy(dst, src, (size_t)esize);
    return;
  }
  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < rank; ++d) rows *= shape[d];
  const int64_t n = shape[rank - 1];
  if (rows == 0 || n == 0) return;
  // Each outer row is independent: split rows across threads. Large rows are cheap to index; tiny ones are
  // memory bound either way.
#pragma omp parallel for schedule(static) if (rows * n >= parallel_min())
  for (int64_t r = 0; r < rows; ++r) {
    int64_t rem = r, doff = 0, soff = 0;
    for (int64_t d = rank - 2; d >= 0; --d) {
      int64_t i = rem % shape[d];
      rem /= shape[d];
      doff += i * dst_strides[d];
      soff += i * src_strides[d];
    }
    copy_row((char*)dst + doff * esize, dst_strides[rank - 1], (const char*)src + soff * esize,
             src_strides[rank - 1], n, esize);
  }
}

void strided_add(float* dst, const int64_t* dst_strides, const float* src, const int64_t* shape, int64_t rank) {
  if (rank == 0) {
    dst[0] += src[0];
    return;
  }
  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < rank; ++d) rows *= shape[d];
  const int64_t n = shape[rank - 1], ds = dst_strides[rank - 1];
  if (rows == 0 || n == 0) return;
#pragma omp parallel for schedule(static) if (rows * n >= parallel_min())
  for (int64_t r = 0; r < rows; ++r) {
    int64_t rem = r, doff = 0;
    for (int64_t d = rank - 2; d >= 0; --d) {
      doff += rem % shape[d] * dst_strides[d];
      rem /= shape[d];
    }
    float* __restrict dp = dst + doff;
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
