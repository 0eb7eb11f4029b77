// The fault guard and health update of a layer's experts (DESIGN.md 4.5), computed where the data lives, so that a
// training step never waits for the host to judge a layer's output (engine/host_sync.h). model/health.h uses them,
// for the N experts of an MoE layer and for a dense FFN (one expert, N = 1).
//
// State of N experts, f32 [4, N] on their device, field-major: state[0 * N + e] reliability, state[1 * N + e] running
// mean of healthy output-row norms (0 = no statistics yet), state[2 * N + e] running weight norm (0 = none yet),
// state[3 * N + e] usage (traffic share).
// Pending counters since the last health update, double [5, N] (stored in an f32 [10 N] tensor), field-major:
// rows seen, bad rows, good rows, sum of the good rows' norms, routed slots (traffic, before capacity).
// Rows: y [S, C] holds every expert's rows contiguously, expert e's at offsets[e] .. offsets[e+1] (int64 [N+1] on
// the backend's device, what dispatch_offsets produces); offsets == nullptr means one expert (N = 1) owning all S.
// The arithmetic is the host's of the layer before it moved here: row norms sqrt of a double sum of squares in
// column order, counters and norm sums in double in row order per expert, EMAs in float. Both twins compute the
// same bits.
// Letters: S rows, C columns (d_model), N experts.
#pragma once
#include <cmath>
#include <cstdint>

#include "engine/hd.h"

namespace cm::cpu {

// Forward of the guard over y [S, C]. A row of expert e is bad when its norm is not finite (counted in counts[0]),
// or when state[N + e] > 0 and the norm exceeds factor * state[N + e] (counts[1]). ok [N] i32: 1 when expert e has
// no bad row, else 0 (its backward is then cut, whole: with NaN or huge weights even the good rows' gradients would
// poison the rest). counts [2] i32 (or null): this call's non-finite and outlier rows, overwritten.
// out [S, C] or null (counters only): y, with bad rows zeroed when zero_bad (else a copy); out may be y (in place:
// only the bad rows are written). norms [S] double scratch. When count, pend += per expert (rows, bad, good, sum of
// good norms), and with count_traffic also traffic += rows (a dense FFN: every row is a slot routed to it).
void expert_guard_forward(float* out, int32_t* ok, int32_t* counts, double* pend, double* norms, const float* y,
                          const int64_t* offsets, int64_t N, int64_t S, int64_t C, const float* state, float factor,
                          bool zero_bad, bool count, bool count_traffic);
// dx [n] = ok[0] ? g : 0 (a gate on a whole tensor of the one expert of a dense FFN; selected, never multiplied).
void expert_gate_backward(float* dx, const float* g, const int32_t* ok, int64_t n);
// Rows of the experts the guard cut (ok[e] == 0) set to 0 in x [rows, cols]: expert e's rows per offsets, or
// with offsets == nullptr row e alone (one block per expert: their weight gradients). The backward of a cut expert.
void expert_rows_zero(float* x, const int32_t* ok, const int64_t* offsets, int64_t N, int64_t cols);
// pend's traffic [N] += counts [N] (i32: the slots routed to each expert by one forward).
void expert_traffic_add(double* pend, const int32_t* counts, int64_t N);

// After an optimizer step. meta [2N] int64: nw[e] (weight tensors of expert e; 0 = pruned: the expert is skipped,
// its usage still follows), then ng[e] (its gradients; 0 without reliability). sums: the float sums of squares of
// expert 0's nw weights then its ng gradients, then expert 1's, ... pruned [N] (or null): flags where the pruning
// lives (expert_prune_update); an expert flagged there is skipped as well, its sums passed over. Per live expert:
//   weights ok: finite norm within [1/factor, factor] x running weight norm (any when 0) -> it follows the norm;
//   rows this step, none bad -> the running row norm follows their mean norm;
//   use_reliability: health 0 for bad weights or non-finite gradients, else the share of good rows (no rows: no
//     update); reliability = clamp(decay * reliability + (1 - decay) * health, rel_min, 1).
// Then, when any slot was routed since the last update, every expert's usage = decay * usage + (1 - decay) *
// traffic[e] / total traffic. pend is cleared.
void expert_health_update(float* state, double* pend, const float* sums, const int64_t* meta, const float* pruned,
                          int64_t N, float decay, float factor, float rel_min, bool use_reliability);

// Pruning after a step (enable_expert_pruning), after expert_health_update, experts in order. load [N] int64: the
// slots routed to each expert since the last step (cleared); state [4, N]: the health state (reliability, row 0).
// When any slot was routed, each live expert (pruned[e] == 0) is low when load[e] / total < threshold, or with
// use_reliability when its reliability is under 0.1; low_steps[e] counts its consecutive low steps (0 when not
// low). At window such steps it is pruned (pruned[e] = 1) if its parent (experts e / b * b .. + b - 1) keeps at
// least k live children after it, counted with the experts pruned before it in this pass.
void expert_prune_update(float* low_steps, float* pruned, int64_t* load, const float* state, int64_t N, int64_t b,
                         int64_t k, float threshold, int64_t window, bool use_reliability);

}  // namespace cm::cpu

namespace cm::shared {
// expert_prune_update's pass, the one definition both twins run (the CUDA one on a single thread): experts in order,
// since a prune changes what the next expert's parent count sees.
CM_HD void expert_prune_pass(float* low_steps, float* pruned, int64_t* load, const float* state, int64_t N,
                             int64_t b, int64_t k, float threshold, int64_t window, bool use_reliability) {
  int64_t total = 0;
  for (int64_t e = 0; e < N; ++e) total += load[e];
  if (total > 0)
    for (int64_t e = 0; e < N; ++e) {
      if (pruned[e] != 0.f) continue;
      const bool low = (float)load[e] / (float)total < threshold || (use_reliability && state[e] < 0.1f);
      low_steps[e] = low ? low_steps[e] + 1.f : 0.f;
      if (low_steps[e] < (float)window) continue;
      const int64_t first = e / b * b;
      int64_t live = 0;
      for (int64_t c = first; c < first + b; ++c) live += pruned[c] == 0.f;
      if (live - 1 >= k) pruned[e] = 1.f;
    }
  for (int64_t e = 0; e < N; ++e) load[e] = 0;
}

// The guard's pass over one expert's rows, the parts both twins share: whether a row norm is bad (non-finite, or an
// outlier: past factor times the expert's running norm, when it has one), and what the expert's z - a rows leave
// behind (its verdict, and with `count` its pending counters: rows, bad, good, the good rows' norm sum, and with
// count_traffic its routed rows).
CM_HD bool guard_nonfinite(double nm) { return !std::isfinite(nm); }
CM_HD bool guard_outlier(double nm, float ema, float factor) {
  return std::isfinite(nm) && ema > 0.f && nm > (double)factor * ema;
}
CM_HD void guard_record(int32_t* ok, double* pend, int64_t e, int64_t N, int64_t rows, int64_t bad, int64_t good,
                        double norm_sum, bool count, bool count_traffic) {
  ok[e] = bad == 0 ? 1 : 0;
  if (!count) return;
  pend[e] += (double)rows;
  pend[N + e] += (double)bad;
  pend[2 * N + e] += (double)good;
  pend[3 * N + e] += norm_sum;
  if (count_traffic) pend[4 * N + e] += (double)rows;
}
}  // namespace cm::shared

#if CM_CUDA
// CUDA twins (kernels/cuda/health.cu), launched on the engine's stream; same arguments, device pointers.
namespace cm::cuda {
void expert_guard_forward(float* out, int32_t* ok, int32_t* counts, double* pend, double* norms, const float* y,
                          const int64_t* offsets, int64_t N, int64_t S, int64_t C, const float* state, float factor,
                          bool zero_bad, bool count, bool count_traffic);
void expert_gate_backward(float* dx, const float* g, const int32_t* ok, int64_t n);
void expert_rows_zero(float* x, const int32_t* ok, const int64_t* offsets, int64_t N, int64_t cols);
void expert_traffic_add(double* pend, const int32_t* counts, int64_t N);
void expert_health_update(float* state, double* pend, const float* sums, const int64_t* meta, const float* pruned,
                          int64_t N, float decay, float factor, float rel_min, bool use_reliability);
void expert_prune_update(float* low_steps, float* pruned, int64_t* load, const float* state, int64_t N, int64_t b,
                         int64_t k, float threshold, int64_t window, bool use_reliability);
}  // namespace cm::cuda
#endif
