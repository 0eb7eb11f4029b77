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
// host), launched on the engine's stream. index_first_bad waits for its answer. scatter_add, and index_add of
// fewer than 64 indices, keep the CPU's per-element order (bit-identical); index_add of 64 or more indices is the
// sorted add below. Broadcasts take up to 8 dims after merging.
namespace cm::cuda {

enum class IndexOp : int32_t;  // engine/cuda.h

// The sorted add (index_add of 64 or more indices, and embedding_backward): the positions are stably sorted by
// index, so each index value's sources form a run in increasing source position. A run is cut into chunks of
// kRunChunk sorted positions, counted from its first; one warp per chunk, lanes over I:
//   - a run of at most kRunChunk: one chunk that adds its sources to the output row in order, exactly the CPU's
//     serial order: bit-identical to the CPU twin;
//   - a longer run: chunk 0 adds its sources to the row's value, each later chunk sums its own sources (from
//     -0.0, the additive identity, so the sum starts at its first source exactly), and a second kernel sets the
//     row to chunk 0 + chunk 1 + ... in chunk order. Deterministic (the chunking depends on the run lengths only:
//     the same bits on every run and every GPU), but not the CPU's order: for a run of m sources into a row of
//     value r the two differ by at most (m + kRunChunk + m / kRunChunk) * 2^-24 * (|r| + sum |src|), the error
//     bounds of the two summation orders added (tests/test_cuda.cpp, "sorted adds", checks that bound and the
//     exact chunked order, and reports the largest difference seen).
// A run of 1000 equal keys (the space byte of a batch) is 16 warps of 64 additions and one of 16, instead of one
// warp walking 1000.
constexpr int64_t kRunChunk = 64;
// out [O, D, I] += src [O, n, I] along sorted [n] (index values in sort order) and pos [n] (the source position of
// each), as stable_sort_pairs (kernels/cuda/sort.cuh) leaves them for keys of key_bits bits. A value outside
// [0, D) is recorded under `op` and skipped.
void index_add_sorted(float* out, const float* src, const int32_t* sorted, const int32_t* pos, int64_t O, int64_t D,
                      int64_t n, int64_t I, int key_bits, IndexOp op);

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
