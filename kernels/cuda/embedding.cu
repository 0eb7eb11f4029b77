// CUDA embedding (contracts in kernels/embedding.h). Forward: a warp per looked-up row, 16-byte copies when the
// rows allow. Backward, deterministic as on the CPU: positions are stably sorted by id (the LSD radix sort of
// kernels/cuda/sort.cuh), then one warp per distinct id adds that id's dout rows into its dweight row in
// increasing position: the same additions in the same order as the CPU's serial loop, so the results match it
// bit for bit, and no two warps touch one row (no atomics).
#include <climits>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/sort.cuh"
#include "kernels/embedding.h"

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

// Warp i looks at sorted position i; only the first position of each id's run works: it walks the run in order.
__global__ void embedding_backward_kernel(float* __restrict__ dweight, const float* __restrict__ dout,
                                          const int32_t* __restrict__ sorted_ids, const int32_t* __restrict__ pos,
                                          int64_t N, int64_t Vocab, int64_t C) {
  const int lane = threadIdx.x % kWarp;
  for (int64_t i = (int64_t)blockIdx.x * (blockDim.x / kWarp) + threadIdx.x / kWarp; i < N;
       i += (int64_t)gridDim.x * (blockDim.x / kWarp)) {
    const int32_t v = sorted_ids[i];
    if (i > 0 && sorted_ids[i - 1] == v) continue;  // not the head of its run (uniform across the warp)
    if (v < 0 || v >= Vocab) continue;              // a bad id: the forward recorded it; never written
    int64_t end = i + 1;
    while (end < N && sorted_ids[end] == v) ++end;
    float* dw = dweight + (int64_t)v * C;
    for (int64_t c = lane; c < C; c += kWarp) {
      float acc = dw[c];
      for (int64_t j = i; j < end; ++j) acc += dout[(int64_t)pos[j] * C + c];
      dw[c] = acc;
    }
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
  embedding_backward_kernel<<<grid_for(N, kRowThreads / kWarp), kRowThreads, 0, stream()>>>(dweight, dout, sorted_ids,
                                                                                          pos, N, V, C);
  cudaCheckLaunch("embedding_backward_kernel");
}

}  // namespace cm::cuda
