// The fault guard and health state of a dense FFN layer (DESIGN.md 4.5), kept where the layer computes, so that a
// training step never waits for the host to judge the layer (engine/host_sync.h; the MoE layer's experts keep their
// host-side bookkeeping in model/moe.cpp).
//
// The layer's checkpointed buffers (reliability, norm_ema, wnorm_ema, usage_ema: [1] each, on the host) stay the
// state at rest. While the layer runs, a copy of them lives on the layer's device, f32 [4] (kernels/health.h), with
// the pending counters of the forwards since the last after_step: guard() reads and counts there, after_step()
// updates there. pull() brings the copy back into the host buffers (one read-out) when the host reads them
// (statistics, checkpoints). Values written into the host buffers since the last pull (a checkpoint being loaded)
// win: the next forward uploads them into the copy, at the same device address (a captured CUDA graph keeps
// pointing at it, engine/cuda.h).
//
// Between two pulls, the host buffers lag the device copy: a forward's LayerRoutingStats::reliability of a dense
// layer is the value as of the last pull (every evaluation, checkpoint and statistics read pulls), and its
// nonfinite_rows / outlier_rows stay 0 (the counts live on the device and feed the reliability).
#pragma once
#include <vector>

#include "engine/tensor.h"

namespace cm {

struct FfnHealthBuffers {
  Tensor reliability, norm_ema, wnorm_ema, usage_ema;  // [1] each, host
};

class FfnHealth {
 public:
  // With use_reliability, a forward is: begin(dev); the FFN on gate(x) and gate(w) for each of its tensors;
  // guard(y). A gated tensor is the same values, whose gradient passes only when the guard found every row of this
  // forward healthy (else 0, selected, never multiplied: a NaN gradient made behind NaN weights does not leak). So
  // a bad output cuts the whole FFN from the backward, its input's gradient and its weights' alike, without the
  // host looking: the weights then get a zero gradient rather than none.
  void begin(Device dev);
  Tensor gate(const Tensor& t) const;
  // y [n, C], the FFN's output. Returns y with the bad rows zeroed when zero_bad (use_reliability), cut from the
  // graph when any row is bad (the backward then passes nothing, decided on the device); counts the rows into the
  // pending counters when training. Not zero_bad and not training: returns y itself (nothing to do).
  Tensor guard(const Tensor& y, bool training, bool zero_bad, float factor, const FfnHealthBuffers& host);
  // After an optimizer step (before zero_grad): weights and (use_reliability) their gradients judge the health;
  // the device copy follows kernels/health.h's ffn_health_update. Does nothing when the layer has not computed
  // since the last update on any device (no copy): there is nothing to judge.
  void after_step(const std::vector<Tensor>& weights, const std::vector<Tensor>& grads, float decay, float factor,
                  float rel_min, bool use_reliability);
  // Device copy -> host buffers (one read-out), unless the host buffers were written since the last pull. const:
  // the host buffers are the layer's view of the same state.
  void pull(const FfnHealthBuffers& host) const;

 private:
  // The device copy exists on dev and holds what was written into the host buffers since the last pull.
  void ensure(Device dev, const FfnHealthBuffers& host);

  Tensor ok_;             // i32 [1] of the current forward: 1 = every row healthy (written by guard)
  mutable Tensor state_;  // f32 [4] on the layer's device: reliability, norm_ema, wnorm_ema, usage_ema
  Tensor pend_;           // f32 [8] = double [4]: rows, bad rows, good rows, sum of good norms
  mutable float seen_[4] = {0, 0, 0, 0};  // the host buffers as of the last upload or pull
};

}  // namespace cm
