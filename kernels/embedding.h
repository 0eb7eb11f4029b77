// Embedding lookup: row gather forward, row scatter-add backward.
// Letters: N looked-up ids (B*T flattened), V rows of the table (vocabulary), C channels.
//
// Preconditions (checked by the op): every id is in [0, V).
// Backward determinism: a counting sort groups the positions of each id in increasing n, then every id's row is
// summed by one thread in that order: the same additions in the same order as a serial loop over n, so the result
// is bit-identical for any thread count, and no two threads ever write the same row.
#pragma once
#include <cstdint>

namespace cm::cpu {

// out [N, C] = weight[ids[n]]; weight [V, C], ids [N].
void embedding_forward(float* out, const float* weight, const int32_t* ids, int64_t N, int64_t V, int64_t C);

// dweight [V, C] += dout[n] for every n with ids[n] = row (accumulates: zero it first for a fresh gradient);
// dout [N, C], ids [N].
void embedding_backward(float* dweight, const float* dout, const int32_t* ids, int64_t N, int64_t V, int64_t C);

}  // namespace cm::cpu

#if CM_CUDA
// CUDA twins (kernels/cuda/embedding.cu), launched on the engine's stream. Backward sorts positions by id on the
// device (stable radix sort) and adds each id's rows with the sorted add of kernels/index.h (cuda::index_add_sorted):
// bit-identical to the CPU for ids that occur at most cuda::kRunChunk (64) times; a more frequent id (the space
// byte) is summed in chunks of 64 whose sums are added in chunk order: deterministic, and within
// (m + 64 + m / 64) * 2^-24 * (|dweight| + sum |dout|) of the CPU's serial sum for an id seen m times.
namespace cm::cuda {

void embedding_forward(float* out, const float* weight, const int32_t* ids, int64_t N, int64_t V, int64_t C);
void embedding_backward(float* dweight, const float* dout, const int32_t* ids, int64_t N, int64_t V, int64_t C);

}  // namespace cm::cuda
#endif
