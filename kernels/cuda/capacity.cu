// CUDA capacity filter: the contract and rule of kernels/capacity.h. A copy of `expert`, then one thread per row of
// the unfiltered plan: if its expert is over capacity, it counts the rows of that expert ranking ahead of it (the
// expert's rows are contiguous in assign_of) and writes -1 when that rank reaches cap. A block's 256 rows read the
// rows they rank against together, 256 at a time through shared memory: the rows of the experts its rows belong to
// (contiguous too), each thread counting within its own expert's. Each output element has one writer; integer
// counts of comparisons: the CPU's ids exactly. (A thread walking its expert's rows alone made a hot expert's m rows
// m dependent gathers each, on m threads: milliseconds once routing collapses onto one expert.)
#include "kernels/capacity.h"
#include "kernels/cuda/common.cuh"

namespace cm::cuda {

namespace {

constexpr int kCapThreads = 256;

__global__ void capacity_kernel(int32_t* __restrict__ expert_out, const float* __restrict__ gate,
                                const int32_t* __restrict__ assign_of, const int64_t* __restrict__ offsets, int64_t N,
                                int64_t cap) {
  __shared__ float g_chunk[kCapThreads];
  __shared__ int32_t a_chunk[kCapThreads];
  const int64_t Ap = offsets[N];
  for (int64_t t0 = (int64_t)blockIdx.x * kCapThreads; t0 < Ap; t0 += (int64_t)gridDim.x * kCapThreads) {
    const int64_t r = t0 + threadIdx.x, t1 = t0 + kCapThreads < Ap ? t0 + kCapThreads : Ap;
    const bool have = r < Ap;
    int64_t r0 = 0, r1 = 0, rank = 0;
    int32_t a = 0;
    float ga = 0.f;
    if (have) {
      const int64_t e = segment_of(offsets, N, r);
      r0 = offsets[e];
      r1 = offsets[e + 1];
      a = assign_of[r];
      ga = gate[a];
    }
    bool done = !have || r1 - r0 <= cap;  // decided: under capacity, or ranked past cap
    // The rows of the experts of the tile's first and last rows, and of every expert between.
    const int64_t u0 = offsets[segment_of(offsets, N, t0)], u1 = offsets[segment_of(offsets, N, t1 - 1) + 1];
    for (int64_t c0 = u0; c0 < u1; c0 += kCapThreads) {
      if (__syncthreads_and(done)) break;  // also: every thread is done with the previous chunk
      const int64_t q = c0 + threadIdx.x;
      if (q < u1) {
        a_chunk[threadIdx.x] = assign_of[q];
        g_chunk[threadIdx.x] = gate[a_chunk[threadIdx.x]];
      }
      __syncthreads();
      if (!done) {
        const int64_t q0 = c0 > r0 ? c0 : r0, q1 = c0 + kCapThreads < r1 ? c0 + kCapThreads : r1;
        for (int64_t j = q0; j < q1 && rank < cap; ++j)
          rank += shared::capacity_ahead(g_chunk[j - c0], a_chunk[j - c0], ga, a);
        done = rank >= cap;
      }
    }
    if (have && r1 - r0 > cap && rank >= cap) expert_out[a] = -1;
  }
}

}  // namespace

void capacity_filter(int32_t* expert_out, const int32_t* expert, const float* gate, const int32_t* assign_of,
                     const int64_t* offsets, int64_t A, int64_t N, int64_t cap) {
  CM_CHECK(A >= 0 && N >= 1, "cuda::capacity_filter: A=", A, " N=", N);
  if (A == 0) return;
  if (cap < 0) cap = 0;
  cudaCheck(cudaMemcpyAsync(expert_out, expert, (size_t)A * sizeof(int32_t), cudaMemcpyDeviceToDevice, stream()));
  // Rows of the plan: at most A (the exact count lives on the device; threads past it exit at once).
  capacity_kernel<<<grid_for(A, kCapThreads), kCapThreads, 0, stream()>>>(expert_out, gate, assign_of, offsets, N,
                                                                          cap);
  cudaCheckLaunch("capacity_kernel");
}

}  // namespace cm::cuda
