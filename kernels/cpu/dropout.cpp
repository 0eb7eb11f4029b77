// CPU dropout. philox_uniform(seed, offset, i) takes word i % 4 of block offset + i / 4, so the loop runs over
// blocks of 4 elements and computes each Philox block once instead of four times.
#include "kernels/dropout.h"

#include "engine/rng.h"
#include "kernels/cpu/parallel.h"

namespace cm::cpu {

// Forward and backward are the same masked scaling; one body keeps them from drifting apart.
static void dropout_apply(float* out, const float* inp, int64_t n, float p, uint64_t seed, uint64_t offset) {
  const float scale = 1.0f / (1.0f - p);
  const int64_t nblocks = (n + 3) / 4;
#pragma omp parallel for schedule(static) if (n >= parallel_min_compute())
  for (int64_t b = 0; b < nblocks; ++b) {
    Philox4 r = philox4x32(offset + (uint64_t)b, seed);
    for (int64_t j = 0; j < 4; ++j) {
      int64_t i = 4 * b + j;
      if (i >= n) break;
      float u = u32_to_unit(r.v[j]);
      out[i] = u >= p ? inp[i] * scale : 0.0f;
    }
  }
}

void dropout_forward(float* out, const float* inp, int64_t n, float p, uint64_t seed, uint64_t offset,
                     const uint64_t* offset_base) {
  dropout_apply(out, inp, n, p, seed, offset + (offset_base ? *offset_base : 0));
}

void dropout_backward(float* dinp, const float* dout, int64_t n, float p, uint64_t seed, uint64_t offset,
                      const uint64_t* offset_base) {
  dropout_apply(dinp, dout, n, p, seed, offset + (offset_base ? *offset_base : 0));
}

}  // namespace cm::cpu
