// Reduction kernels. An axis reduction sees its input as a [O, R, I] block: O outer rows (the dims before the
// axis, flattened), R the reduced axis, I inner (the dims after it, flattened); the result is [O, I].
// Determinism: every sum is accumulated in double in a fixed order that does not depend on the thread count
// (long sums are cut into fixed-size blocks whose partials are added in block order), so 1 and 16 threads give
// the same bits, and a sum of 1e6 floats keeps float accuracy (double accumulation, one final rounding).
#pragma once
#include <cstdint>

namespace cm::cpu {

// out [1] = scale * sum of a [n]. n == 0 gives 0 (times scale; scale = 1/0 makes the mean of nothing NaN).
// scale_at [1] or null: when given, the scale is read from there (on the device for the CUDA twin), not `scale`.
void sum_all(float* out, const float* a, int64_t n, float scale, const float* scale_at = nullptr);
// out [O, I] = scale * sum over r of a [O, R, I].
void sum_axis(float* out, const float* a, int64_t O, int64_t R, int64_t I, float scale);
// Sum of a[i]^2 over a [n], in double, returned (CPU only: the norms of gradient clipping and of the experts'
// health checks). Finite exactly when every element is finite: a float squared in double cannot overflow.
double sum_squares(const float* a, int64_t n);
// sum_squares in pieces, for a pass that makes the sum on its way (kernels/adamw.h adamw_step_multi): a [n] is cut
// into blocks of kSumBlock elements (the last one shorter), out [ceil(n / kSumBlock)] gets each block's sum of
// squares, and sum_squares(a, n) is out[0] when n <= kSumBlock, else the blocks' sums added in block order to a
// double starting at 0. Meant for data in cache (it interleaves four blocks to run faster than one add per cycle).
constexpr int64_t kSumBlock = 8192;
void sum_squares_blocks(double* out, const float* a, int64_t n);

// Inverse of broadcasting: a has shape a_shape[D]; out_shape[D] has the same rank with each dim either equal to
// a's or 1 (align a shorter target shape from the right with 1s first). out is contiguous, out_shape.
void sum_to(float* out, const float* a, int64_t D, const int64_t* a_shape, const int64_t* out_shape);

// out [1] = max of a [n], idx [1] = its FIRST position. n >= 1. A NaN counts as larger than everything (it
// propagates, as in PyTorch); the first NaN wins.
void max_all(float* out, int64_t* idx, const float* a, int64_t n);
// out [O, I] = max over r of a [O, R, I]; idx [O, I] = the first r reaching it. R >= 1. Either output may be
// null (argmax wants only idx).
void max_axis(float* out, int32_t* idx, const float* a, int64_t O, int64_t R, int64_t I);
// Backward of max_axis: dx [O, R, I] = dy [O, I] at r = idx [O, I], 0 elsewhere. Overwrites dx.
void max_axis_backward(float* dx, const float* dy, const int32_t* idx, int64_t O, int64_t R, int64_t I);

}  // namespace cm::cpu

#if CM_CUDA
// CUDA twins (kernels/cuda/reduce.cu): the same contracts on device pointers (sum_to's shape arrays stay on the
// host), launched on the engine's stream. Deterministic: sums split by the sizes alone, in double.
namespace cm::cuda {

void sum_all(float* out, const float* a, int64_t n, float scale, const float* scale_at = nullptr);
void sum_axis(float* out, const float* a, int64_t O, int64_t R, int64_t I, float scale);
void sum_to(float* out, const float* a, int64_t D, const int64_t* a_shape, const int64_t* out_shape);
void max_all(float* out, int64_t* idx, const float* a, int64_t n);
void max_axis(float* out, int32_t* idx, const float* a, int64_t O, int64_t R, int64_t I);
void max_axis_backward(float* dx, const float* dy, const int32_t* idx, int64_t O, int64_t R, int64_t I);

}  // namespace cm::cuda
#endif
