// Indexing kernels behind autograd/ops_index.cpp: concat/split, index_select/index_add, gather/scatter_add,
// where/masked_fill. (top-k has its own family: kernels/topk.h.)
//
// Layout: an op that works along one axis sees each contiguous tensor as [O, D, I]: O = product of the dims before
// the axis, D = the axis, I = product of the dims after it (I = 1 for the last axis). An index into the axis is
// i32 and must lie in [0, D): these kernels trust it; the ops check first with index_first_bad.
//
// Determinism: the adding kernels (index_add, scatter_add) give each output element one thread, which adds its
// contributions in increasing source position. They are parallel over O and over chunks of I (the dims that are
// not indexed), never over the indexed axis, so repeated indices sum in the same order for any thread count.
//
// The copying kernels come for f32 and i32 (both 4 bytes; indices get concatenated and selected too); the adding
// and masking kernels are f32.
#pragma once
#include <cstdint>

namespace cm::cpu {

// First position p in [0, n) with index[p] outside [0, D), or -1 when all are in range.
int64_t index_first_bad(const int32_t* index,  // [n]
                        int64_t n, int64_t D);

// Concat, one input at a time: dst[o, at + d, i] = src[o, d, i] for d < Ds.
void concat_piece(float* dst,        // [O, Dd, I]
                  const float* src,  // [O, Ds, I]
                  int64_t O, int64_t Dd, int64_t at, int64_t Ds, int64_t I);
void concat_piece(int32_t* dst, const int32_t* src, int64_t O, int64_t Dd, int64_t at, int64_t Ds, int64_t I);

// Split, one output at a time: dst[o, d, i] = src[o, at + d, i] for d < Dd.
void split_piece(float* dst,        // [O, Dd, I]
                 const float* src,  // [O, Ds, I]
                 int64_t O, int64_t Ds, int64_t at, int64_t Dd, int64_t I);
void split_piece(int32_t* dst, const int32_t* src, int64_t O, int64_t Ds, int64_t at, int64_t Dd, int64_t I);

// out[o, j, i] = a[o, index[j], i].
void index_select(float* out,             // [O, n, I]
                  const float* a,         // [O, D, I]
                  const int32_t* index,   // [n]
                  int64_t O, int64_t D, int64_t n, int64_t I);
void index_select(int32_t* out, const int32_t* a, const int32_t* index, int64_t O, int64_t D, int64_t n, int64_t I);

// out[o, index[j], i] += src[o, j, i], j = 0..n-1 in order. Accumulates into out (the op copies a there first).
void index_add(float* out,            // [O, D, I]
               const float* src,      // [O, n, I]
               const int32_t* index,  // [n]
               int64_t O, int64_t D, int64_t n, int64_t I);

// out[o, j, i] = a[o, index[o, j, i], i]   (gather along the middle axis; index has out's shape).
void gather(float* out,            // [O, m, I]
            const float* a,        // [O, D, I]
            const int32_t* index,  // [O, m, I]
            int64_t O, int64_t D, int64_t m, int64_t I);
void gather(int32_t* out, const int32_t* a, const int32_t* index, int64_t O, int64_t D, int64_t m, int64_t I);

// out[o, index[o, j, i], i] += src[o, j, i], j = 0..m-1 in order. Accumulates into out.
void scatter_add(float* out,            // [O, D, I]
                 const float* src,      // [O, m, I]
                 const int32_t* index,  // [O, m, I]
                 int64_t O, int64_t D, int64_t m, int64_t I);

// Broadcast select over an output of `ndim` dims `shape` (contiguous, row-major):
//   out[p] = mask[p] != 0 ? a[p] : b[p]
// where each input is read through its own element strides over the output's dims (0 along a broadcast dim), so
// e.g. a 0-d b is one float with all strides 0.
void where(float* out,                // [shape]
           const int32_t* mask,       // strided by mask_strides
           const float* a,            // strided by a_strides
           const float* b,            // strided by b_strides
           int64_t ndim, const int64_t* shape, const int64_t* mask_strides, const int64_t* a_strides,
           const int64_t* b_strides);

// out[p] = mask[p] != 0 ? value : a[p]; out and a contiguous with `shape`, mask read through mask_strides.
void masked_fill(float* out,           // [shape]
                 const float* a,       // [shape]
                 const int32_t* mask,  // strided by mask_strides
                 float value, int64_t ndim, const int64_t* shape, const int64_t* mask_strides);

}  // namespace cm::cpu

#if CM_CUDA
// CUDA twins (kernels/cuda/index.cu): the same contracts on device pointers (shape and stride arrays stay on the
// host), launched on the engine's stream. index_first_bad waits for its answer. The adding kernels keep the CPU's
// per-element order (bit-identical); broadcasts take up to 8 dims after merging.
namespace cm::cuda {

int64_t index_first_bad(const int32_t* index, int64_t n, int64_t D);
void concat_piece(float* dst, const float* src, int64_t O, int64_t Dd, int64_t at, int64_t Ds, int64_t I);
void concat_piece(int32_t* dst, const int32_t* src, int64_t O, int64_t Dd, int64_t at, int64_t Ds, int64_t I);
void split_piece(float* dst, const float* src, int64_t O, int64_t Ds, int64_t at, int64_t Dd, int64_t I);
void split_piece(int32_t* dst, const int32_t* src, int64_t O, int64_t Ds, int64_t at, int64_t Dd, int64_t I);
void index_select(float* out, const float* a, const int32_t* index, int64_t O, int64_t D, int64_t n, int64_t I);
void index_select(int32_t* out, const int32_t* a, const int32_t* index, int64_t O, int64_t D, int64_t n, int64_t I);
void index_add(float* out, const float* src, const int32_t* index, int64_t O, int64_t D, int64_t n, int64_t I);
void gather(float* out, const float* a, const int32_t* index, int64_t O, int64_t D, int64_t m, int64_t I);
void gather(int32_t* out, const int32_t* a, const int32_t* index, int64_t O, int64_t D, int64_t m, int64_t I);
void scatter_add(float* out, const float* src, const int32_t* index, int64_t O, int64_t D, int64_t m, int64_t I);
void where(float* out, const int32_t* mask, const float* a, const float* b, int64_t ndim, const int64_t* shape,
           const int64_t* mask_strides, const int64_t* a_strides, const int64_t* b_strides);
void masked_fill(float* out, const float* a, const int32_t* mask, float value, int64_t ndim, const int64_t* shape,
                 const int64_t* mask_strides);

}  // namespace cm::cuda
#endif
