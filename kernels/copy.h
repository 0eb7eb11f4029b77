// Strided copies: the one kernel behind contiguous(), clone(), copy_ into views, and dtype conversion.
#pragma once
#include <cstdint>

namespace cm::cpu {

// dst[i] = src[i] over an n-d index space `shape` (rank dims), each side with its own element strides.
// esize: bytes per element (4 for f32 and i32). Rank 0 copies one element.
void strided_copy(void* dst, const int64_t* dst_strides, const void* src, const int64_t* src_strides,
                  const int64_t* shape, int64_t rank, int64_t esize);

// dst[i] += src[i] over `shape`: dst with its own element strides, src contiguous. The backward sweep's
// gradient accumulation into a window of a gradient that is not a block of rows (a piece of split() along the last
// dimension: attention's q, k and v of one [B, T, 3C] product), in one pass where a contiguous copy, an add and a
// copy back took three. The same add per element as into a contiguous gradient: the same bits.
void strided_add(float* dst, const int64_t* dst_strides, const float* src, const int64_t* shape, int64_t rank);

// Value conversion between contiguous arrays of n elements.
void f32_to_i32(int32_t* dst, const float* src, int64_t n);  // truncation toward zero, like a C cast
void i32_to_f32(float* dst, const int32_t* src, int64_t n);

}  // namespace cm::cpu

#if CM_CUDA
// CUDA twins: the same contracts on device pointers (shape and stride arrays stay on the host). Launched on the
// engine's stream (engine/cuda.h); they return before the work is done.
namespace cm::cuda {

void strided_copy(void* dst, const int64_t* dst_strides, const void* src, const int64_t* src_strides,
                  const int64_t* shape, int64_t rank, int64_t esize);
// f32 -> i32 truncates toward zero; out-of-range values saturate (the CPU's cast gives INT32_MIN there).
void f32_to_i32(int32_t* dst, const float* src, int64_t n);
void i32_to_f32(float* dst, const int32_t* src, int64_t n);
// dst [n] = one 4-byte pattern (a float's or an int's bits): Tensor::fill_ on the device.
void fill32(void* dst, uint32_t bits, int64_t n);

}  // namespace cm::cuda
#endif
