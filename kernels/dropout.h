// Inverted dropout with a counter-based mask: element i is kept when philox_uniform(seed, offset, i) >= p and
// then scaled by 1 / (1 - p). The mask is never stored: backward regenerates it from (seed, offset), so forward
// and backward agree bit for bit, and a CUDA twin drawing from the same (seed, offset) drops the same elements.
// offset_base (optional, where the kernel runs): the offset used is *offset_base + offset. A step captured in a CUDA
// graph draws relative to a base written before each replay (engine/cuda.h, Graph::bind_generator), so each replay
// draws fresh masks, the ones the uncaptured step would have drawn.
// Letters: n elements (any shape, flattened).
#pragma once
#include <cstdint>

namespace cm::cpu {

// out [n] = keep(i) ? inp[i] * (1 / (1 - p)) : 0;   inp [n]. Requires 0 <= p < 1.
void dropout_forward(float* out, const float* inp, int64_t n, float p, uint64_t seed, uint64_t offset,
                     const uint64_t* offset_base = nullptr);
// dinp [n] = keep(i) ? dout[i] * (1 / (1 - p)) : 0;  dout [n]. The same mask and scale as the forward.
void dropout_backward(float* dinp, const float* dout, int64_t n, float p, uint64_t seed, uint64_t offset,
                      const uint64_t* offset_base = nullptr);

}  // namespace cm::cpu

#if CM_CUDA
// CUDA twins (kernels/cuda/dropout.cu): the same mask as the CPU for the same (seed, offset), bit for bit.
namespace cm::cuda {

void dropout_forward(float* out, const float* inp, int64_t n, float p, uint64_t seed, uint64_t offset,
                     const uint64_t* offset_base = nullptr);
void dropout_backward(float* dinp, const float* dout, int64_t n, float p, uint64_t seed, uint64_t offset,
                      const uint64_t* offset_base = nullptr);

}  // namespace cm::cuda
#endif
