// The fault guard and health update of a dense FFN (DESIGN.md 4.5), computed where the data lives, so that a
// training step never waits for the host to judge a layer's output (engine/host_sync.h). model/health.h uses them.
//
// State of one FFN, f32 [4] on its device: state[0] reliability, state[1] running mean of healthy output-row norms
// (0 = no statistics yet), state[2] running weight norm (0 = none yet), state[3] usage (traffic share; a dense
// layer routes every token to its one expert).
// Pending counters since the last health update, double [4] (stored in an f32 [8] tensor): pend[0] rows seen,
// pend[1] bad rows, pend[2] good rows, pend[3] sum of the good rows' norms.
// The arithmetic is the host's of MoELayer (model/moe.cpp): row norms sqrt of a double sum of squares in column
// order, counters and norm sums in double in row order, EMAs in float. Both twins compute the same bits.
// Letters: n rows, C columns (d_model), m tensors.
#pragma once
#include <cstdint>

namespace cm::cpu {

// Forward of the guard over y [n, C]. A row is bad when its norm is not finite, or when state[1] > 0 and the norm
// exceeds factor * state[1]. out [n, C] or null (counters only): y, with bad rows zeroed when zero_bad (else a
// plain copy). all_ok [1] i32:
// 1 when no row is bad (the backward then passes the gradient), else 0 (the backward cuts the whole output from the
// graph: with NaN or huge weights even the good rows' gradients would poison the rest). norms [n] double scratch.
// When count, pend += (n, bad, good, sum of good norms).
void ffn_guard_forward(float* out, int32_t* all_ok, double* pend, double* norms, const float* y, int64_t n, int64_t C,
                       const float* state, float factor, bool zero_bad, bool count);
// dx [n] = all_ok ? g : 0.
void ffn_guard_backward(float* dx, const float* g, const int32_t* all_ok, int64_t n);

// After an optimizer step: sums [nw + ng] holds the float sums of squares of the expert's nw weight tensors, then of
// its ng gradients (ng = 0 without reliability). Updates state from them and pend, then clears pend:
//   weights ok: finite norm within [1/factor, factor] x state[2] (any when state[2] = 0) -> state[2] follows it;
//   rows this step, none bad -> state[1] follows their mean norm;
//   use_reliability: health 0 for bad weights or non-finite gradients, else the share of good rows (no rows: no
//     update); state[0] = clamp(decay * state[0] + (1 - decay) * health, rel_min, 1);
//   rows this step -> state[3] = decay * state[3] + (1 - decay) (all of the layer's traffic).
void ffn_health_update(float* state, double* pend, const float* sums, int64_t nw, int64_t ng, float decay,
                       float factor, float rel_min, bool use_reliability);

}  // namespace cm::cpu

#if CM_CUDA
// CUDA twins (kernels/cuda/health.cu), launched on the engine's stream; same arguments, device pointers.
namespace cm::cuda {
void ffn_guard_forward(float* out, int32_t* all_ok, double* pend, double* norms, const float* y, int64_t n, int64_t C,
                       const float* state, float factor, bool zero_bad, bool count);
void ffn_guard_backward(float* dx, const float* g, const int32_t* all_ok, int64_t n);
void ffn_health_update(float* state, double* pend, const float* sums, int64_t nw, int64_t ng, float decay,
                       float factor, float rel_min, bool use_reliability);
}  // namespace cm::cuda
#endif
