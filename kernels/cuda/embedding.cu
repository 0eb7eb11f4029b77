// CUDA embedding (contracts in kernels/embedding.h). Forward: a warp per looked-up row, 16-byte copies when the
// rows allow. Backward, deterministic: positions are stably sorted by id (the LSD radix sort of
// kernels/cuda/sort.cuh), then the sorted add of kernels/index.h (index_add_sorted) adds each id's dout rows into
// its dweight row in increasing position, in chunks of kRunChunk for a frequent id, the chunk sums in chunk order:
// the CPU's bits for ids seen at most kRunChunk times, within the header's rounding bound beyond; no atomics.
#include <climits>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/sort.cuh"
#include "kernels/embedding.h"
#include "kernels/index.h"

namespace cm::cuda {

namespace {

// ---------------------------------------------------------------- kernels

template <class V>
__global__ void embedding_forward_kernel(V* __restrict__ out, const V* __restrict__ weight,
                                         const int32_t* __restrict__ ids, int64_t N, int64_t Vocab, int64_t Cv,
                                         int64_t* rec) {
  const int lane = threadIdx.x % kWarp;
  for (int64_t n = (int64_t)blockIdx.x * (blockDim.x / kWarp) + threadIdx.x / kWarp; n < N;
       n += (int64_t)gridDim.x * (blockDim.x / kWarp)) {
    const int32_t id = ids[n];
    V* dst = out + n * Cv;
    if (id < 0 || id >= Vocab) {  // recorded (engine/cuda.h), never read: the row is 0
      if (lane == 0) record_bad_index(rec, IndexOp::Embedding, id, n, Vocab);
      for (int64_t c = lane; c < Cv; c += kWarp) dst[c] = V{};
      continue;
    }
    const V* src = weight + (int64_t)id * Cv;
    for (int64_t c = lane; c < Cv; c += kWarp) dst[c] = src[c];
  }
}

constexpr int kRowThreads = 128;

}  // namespace

// ---------------------------------------------------------------- launchers

void embedding_forward(float* out, const float* weight, const int32_t* ids, int64_t N, int64_t V, int64_t C) {
  CM_CHECK(N >= 0 && V >= 0 && C >= 0, "cuda::embedding_forward: N=", N, " V=", V, " C=", C);
  if (N == 0 || C == 0) return;
  const unsigned g = grid_for(N, kRowThreads / kWarp);
  if (C % 4 == 0 && aligned16(out) && aligned16(weight))
    embedding_forward_kernel<float4><<<g, kRowThreads, 0, stream()>>>((float4*)out, (const float4*)weight, ids, N, V,
                                                                      C / 4, index_error_record());
  else
    embedding_forward_kernel<float><<<g, kRowThreads, 0, stream()>>>(out, weight, ids, N, V, C, index_error_record());
  cudaCheckLaunch("embedding_forward_kernel");
}

void embedding_backward(float* dweight, const float* dout, const int32_t* ids, int64_t N, int64_t V, int64_t C) {
  CM_CHECK(N >= 0 && V >= 0 && C >= 0, "cuda::embedding_backward: N=", N, " V=", V, " C=", C);
  CM_CHECK(N < INT_MAX && V <= INT_MAX, "cuda::embedding_backward: N=", N, " V=", V, " exceed i32");
  if (N == 0 || C == 0) return;
  int bits = 1;
  while (bits < 31 && (int64_t(1) << bits) < V) ++bits;  // keys in [0, V)
  const size_t bytes = align256((size_t)N * 4);
  Scratch s(2 * bytes);
  int32_t* sorted_ids = s.at<int32_t>();
  int32_t* pos = s.at<int32_t>(bytes);
  detail::stable_sort_pairs(sorted_ids, pos, ids, nullptr, N, bits);
  index_add_sorted(dweight, dout, sorted_ids, pos, 1, V, N, C, bits, IndexOp::Embedding);  // dweight [V, C] += ...
}

}  // namespace cm::cuda
