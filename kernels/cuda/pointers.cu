// CUDA twin of the pointer tables (contract in kernels/pointers.h): one thread per entry.
#include "kernels/pointers.h"
#include "kernels/cuda/common.cuh"

namespace cm::cuda {

namespace {

constexpr int kThreads = 128;

__global__ void pointer_table_kernel(float** __restrict__ out, float* base, int64_t stride, int64_t G) {
  for (int64_t e = gtid(); e < G; e += gstride()) out[e] = base + e * stride;
}

}  // namespace

void pointer_table(float** out, float* base, int64_t stride, int64_t G) {
  if (G <= 0) return;
  pointer_table_kernel<<<grid_for(G, kThreads), kThreads, 0, stream()>>>(out, base, stride, G);
  cudaCheckLaunch("pointer_table_kernel");
}

}  // namespace cm::cuda
