// The fault guard and health state of a layer's experts (DESIGN.md 4.5): the N experts of an MoE layer, or the one
// FFN of a dense layer (N = 1). Kept where the layer computes, so that a training step never waits for the host to
// judge the layer (engine/host_sync.h).
//
// The layer's checkpointed buffers (reliability, norm_ema, wnorm_ema, usage_ema: [N] each, on the host) stay the
// state at rest. While the layer runs, a copy of them lives on the layer's device, f32 [4, N] (kernels/health.h),
// with the pending counters of the forwards since the last after_step: the guard reads and counts there, after_step()
// updates there. pull() brings the copy back into the host buffers (one read-out) when the host reads them
// (statistics, checkpoints, pruning decisions). Values written into the host buffers since the last pull (a
// checkpoint being loaded) win: the next forward uploads them into the copy, at the same device address (a captured
// CUDA graph keeps pointing at it, engine/cuda.h).
//
// Between two pulls, the host buffers lag the device copy: a forward's LayerRoutingStats::reliability is the value
// as of the last pull (every evaluation, checkpoint and statistics read pulls). Its guard counts stay on the device
// (LayerRoutingStats::guard_counts) until something reads them.
#pragma once
#include <vector>

#include "engine/tensor.h"

namespace cm {

struct HealthBuffers {
  Tensor reliability, norm_ema, wnorm_ema, usage_ema;  // [N] each, host
};

class ExpertHealth {
 public:
  // ---- a dense FFN (N = 1). With use_reliability, a forward is: begin(dev); the FFN on gate(x) and gate(w) for
  // each of its tensors; guard(y). A gated tensor is the same values, whose gradient passes only when the guard
  // found every row of this forward healthy (else 0, selected, never multiplied: a NaN gradient made behind NaN
  // weights does not leak). So a bad output cuts the whole FFN from the backward, its input's gradient and its
  // weights' alike, without the host looking: the weights then get a zero gradient rather than none.
  void begin(Device dev);
  Tensor gate(const Tensor& t) const;
  // y [n, C], the FFN's output. Returns y with the bad rows zeroed when zero_bad (use_reliability), cut from the
  // graph when any row is bad (the backward then passes nothing, decided on the device); counts the rows into the
  // pending counters (and the traffic) when training. *counts (when given): i32 [2] on y's device, this forward's
  // non-finite and outlier rows. Not zero_bad and not training: returns y itself (nothing to do).
  Tensor guard(const Tensor& y, bool training, bool zero_bad, float factor, const HealthBuffers& host,
               Tensor* counts = nullptr);

  // ---- the experts of an MoE layer. ys [S, C] expert-contiguous, offsets_dev the dispatch plan's int64 [N+1] on
  // ys's device (DispatchPlan::offsets_dev). In place: the bad rows of ys are zeroed when zero_bad. ok (i32 [N] on
  // ys's device, or undefined): 1 for each expert with no bad row, else 0, which grouped_linear's backward reads to
  // cut the expert (it was handed the same tensor in the forward, before the guard wrote it). Counts into the
  // pending counters when training. Returns this forward's counts, i32 [2]: non-finite rows, outlier rows.
  Tensor guard_experts(const Tensor& ys, const Tensor& offsets_dev, const Tensor& ok, bool training, bool zero_bad,
                       float factor, const HealthBuffers& host);
  // The slots routed to each expert by one training forward (i32 [N] on the layer's device): the usage's traffic.
  void add_traffic(const Tensor& counts, const HealthBuffers& host);

  // After an optimizer step (before zero_grad): ts are the experts' weights and (use_reliability) gradients, expert
  // by expert; meta [2N]: each expert's count of weights there (0: pruned, skipped), then of gradients. pruned: the
  // pruned flags [N] on the weights' device (an expert flagged there is skipped too), or undefined. The state on the
  // weights' device follows kernels/health.h's expert_health_update (no tensors: nothing to judge).
  void after_step(const std::vector<Tensor>& ts, const std::vector<int64_t>& meta, const Tensor& pruned, float decay,
                  float factor, float rel_min, bool use_reliability, const HealthBuffers& host);
  // Device copy -> host buffers (one read-out), unless the host buffers were written since the last pull. const:
  // the host buffers are the layer's view of the same state.
  void pull(const HealthBuffers& host) const;
  // The state f32 [4, N] on dev (kernels that read it where it lives: the routing bias).
  const Tensor& state(Device dev, const HealthBuffers& host);

 private:
  // The device copy exists on dev and holds what was written into the host buffers since the last pull.
  void ensure(Device dev, const HealthBuffers& host);

  Tensor ok_;             // i32 [1] of the current dense forward: 1 = every row healthy (written by guard)
  mutable Tensor state_;  // f32 [4, N] on the layer's device
  Tensor pend_;           // f32 [10 N] = double [5, N]: rows, bad, good, sum of good norms, traffic
  Tensor meta_;           // i64 [2N] (in i32 words) on the device: after_step's meta as last uploaded
  std::vector<int64_t> meta_seen_;
  mutable std::vector<float> seen_;  // the host buffers as of the last upload or pull, [4N]
};

}  // namespace cm
