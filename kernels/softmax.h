// Softmax family: softmax and log-softmax over the last axis of a row-major [N, C] buffer.
// Letters: N rows (everything but the last axis, flattened), C the axis being normalised (classes, keys, ...).
//
// Numerics: every row is shifted by its maximum before exponentiating, so logits of any magnitude (1e4, -1e30)
// give finite results; a -inf entry (a masked position) gives exactly 0. A row that is entirely -inf, or holds a
// NaN or +inf, gives NaN in that row: PyTorch does the same, and the model's fault detection wants to see it.
// Backward kernels overwrite their output (they do not accumulate); autograd does the accumulation.
// Determinism: each row is computed by one thread in a fixed order, so results do not depend on thread count.
#pragma once
#include <cstdint>
#include <cstring>

namespace cm::cpu {

// out [N, C] = softmax(inp [N, C]) per row.
void softmax_forward(float* out, const float* inp, int64_t N, int64_t C);
// dinp [N, C] = out * (dout - sum_c(dout * out)), from the forward's out [N, C] and dout [N, C].
void softmax_backward(float* dinp, const float* dout, const float* out, int64_t N, int64_t C);

// out [N, C] = inp - max - log(sum(exp(inp - max))) per row.
void log_softmax_forward(float* out, const float* inp, int64_t N, int64_t C);
// dinp [N, C] = dout - exp(out) * sum_c(dout), from the forward's out [N, C] (log-probabilities) and dout [N, C].
void log_softmax_backward(float* dinp, const float* dout, const float* out, int64_t N, int64_t C);

}  // namespace cm::cpu

#if CM_CUDA
// CUDA twins (kernels/cuda/softmax.cu): the same contracts on device pointers, launched on the engine's stream.
// A warp per row up to 1024 columns, a block per row beyond.
namespace cm::cuda {

void softmax_forward(float* out, const float* inp, int64_t N, int64_t C);
void softmax_backward(float* dinp, const float* dout, const float* out, int64_t N, int64_t C);
void log_softmax_forward(float* out, const float* inp, int64_t N, int64_t C);
void log_softmax_backward(float* dinp, const float* dout, const float* out, int64_t N, int64_t C);

// The attention's scaled causal softmax, fused (on the CPU: mul by scale, masked_fill of j > i with -inf,
// softmax). scores/out [BH, T, T]: out[b, i, j] = softmax over j' <= i of scale * scores[b, i, j'], and exactly 0
// for j > i (the masked half of scores is never read). Backward: dscores = scale * out * (dout - sum(dout * out))
// on the causal half, 0 elsewhere; out [BH, T, T] from the forward.
void causal_softmax_forward(float* out, const float* scores, float scale, int64_t BH, int64_t T);
void causal_softmax_backward(float* dscores, const float* dout, const float* out, float scale, int64_t BH, int64_t T);

}  // namespace cm::cuda
#endif
