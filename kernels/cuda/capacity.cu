// CUDA capacity filter: the contract and rule of kernels/capacity.h. A copy of `expert`, then one thread per row of
// the unfiltered plan: if its expert is over capacity, it counts the rows of that expert ranking ahead of it
// (the expert's rows are contiguous in assign_of) and writes -1 when that rank reaches cap. Each output element
// has one writer; comparisons only: the CPU's ids exactly.
#include "kernels/capacity.h"
#include "kernels/cuda/common.cuh"

namespace cm::cuda {

namespace {

__device__ __forceinline__ bool ahead(const float* gate, int32_t a, int32_t b) {
  const float ga = gate[a], gb = gate[b];
  const bool na = ga != ga, nb = gb != gb;
  if (na != nb) return nb;
  if (!na && ga != gb) return ga > gb;
  return a < b;
}

// Row r belongs to the expert whose [offsets[e], offsets[e+1]) holds it: binary search over N+1 offsets.
__global__ void capacity_kernel(int32_t* expert_out, const float* gate, const int32_t* assign_of,
                                const int64_t* offsets, int64_t N, int64_t cap) {
  const int64_t Ap = offsets[N];
  for (int64_t r = gtid(); r < Ap; r += gstride()) {
    int64_t lo = 0, hi = N;  // invariant: offsets[lo] <= r < offsets[hi]
    while (hi - lo > 1) {
      const int64_t mid = (lo + hi) / 2;
      if (offsets[mid] <= r) lo = mid;
      else hi = mid;
    }
    const int64_t r0 = offsets[lo], r1 = offsets[lo + 1];
    if (r1 - r0 <= cap) continue;
    const int32_t a = assign_of[r];
    int64_t rank = 0;
    for (int64_t q = r0; q < r1 && rank < cap; ++q) rank += ahead(gate, assign_of[q], a);
    if (rank >= cap) expert_out[a] = -1;
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
  capacity_kernel<<<grid_for(A, 256), 256, 0, stream()>>>(expert_out, gate, assign_of, offsets, N, cap);
  cudaCheckLaunch("capacity_kernel");
}

}  // namespace cm::cuda
