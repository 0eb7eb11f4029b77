// CUDA dropout (contracts in kernels/dropout.h): the mask is Philox word i % 4 of block offset + i / 4 (engine/rng.h,
// compiled for host and device alike), so the GPU drops exactly the elements the CPU drops, and backward
// regenerates the mask instead of storing it. One thread per block of 4 elements: one Philox call each.
#include "engine/rng.h"
#include "kernels/cuda/common.cuh"
#include "kernels/dropout.h"

namespace cm::cuda {

namespace {

__global__ void dropout_kernel(float* __restrict__ out, const float* __restrict__ inp, int64_t n, float p,
                               float scale, uint64_t seed, uint64_t offset, const uint64_t* __restrict__ base) {
  if (base) offset += *base;
  const int64_t nblocks = (n + 3) / 4;
  for (int64_t b = gtid(); b < nblocks; b += gstride()) {
    const Philox4 r = philox4x32(offset + (uint64_t)b, seed);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t i = 4 * b + j;
      if (i < n) out[i] = u32_to_unit(r.v[j]) >= p ? inp[i] * scale : 0.0f;
    }
  }
}

void launch(float* out, const float* inp, int64_t n, float p, uint64_t seed, uint64_t offset, const uint64_t* base,
            const char* what) {
  CM_CHECK(n >= 0 && p >= 0.f && p < 1.f, what, ": n=", n, " p=", p);
  if (n == 0) return;
  const float scale = 1.0f / (1.0f - p);  // computed on the host exactly as the CPU computes it
  dropout_kernel<<<grid_for((n + 3) / 4, 256), 256, 0, stream()>>>(out, inp, n, p, scale, seed, offset, base);
  cudaCheckLaunch("dropout_kernel");
}

}  // namespace

void dropout_forward(float* out, const float* inp, int64_t n, float p, uint64_t seed, uint64_t offset,
                     const uint64_t* offset_base) {
  launch(out, inp, n, p, seed, offset, offset_base, "cuda::dropout_forward");
}

void dropout_backward(float* dinp, const float* dout, int64_t n, float p, uint64_t seed, uint64_t offset,
                      const uint64_t* offset_base) {
  launch(dinp, dout, n, p, seed, offset, offset_base, "cuda::dropout_backward");
}

}  // namespace cm::cuda
