// Per-layer routing statistics of one forward (part of the model API, see model/coe.h).
#pragma once
#include <cstdint>
#include <vector>

#include "engine/tensor.h"

namespace cm {

// What one layer's FFN did in one forward. Dense layers report N = 1, K = 1.
struct LayerRoutingStats {
  int64_t layer = 0;
  bool moe = false;
  int64_t num_experts = 1;            // N
  std::vector<float> expert_share;    // [N] share of the layer's routed slots (before capacity), sums to 1
  std::vector<int64_t> expert_rows;   // [N] rows each expert computed (after capacity and pruning)
  float dropped_fraction = 0.f;       // slots dropped by capacity / all slots
  // The fault guard's counts, i32 [2] on the layer's device (counted there, model/health.h): expert output rows
  // that were not finite, and rows whose norm was far outside their expert's running statistics. Undefined when
  // the guard did not run (no reliability, evaluation). Read them with the two functions below, each a read-out.
  Tensor guard_counts;
  int64_t nonfinite_rows() const { return guard_count(0); }
  int64_t outlier_rows() const { return guard_count(1); }
  int64_t routing_flops = 0;          // multiply-adds x 2 spent on router logits (counted, not estimated)
  // (The layer's weighted aux terms are tensors, MoELayer::Output::lb_loss, z_loss, div_loss: copying them here
  // made the host wait three times per layer and step.)
  float router_entropy = 0.f;         // mean entropy (nats) of the first level's routing distribution
  float routing_ms = 0.f;             // wall time of the router's forward (host clock, its device reads included)
  float reliability = 1.f;            // layer reliability as of the last pull of its state (model/health.h)

 private:
  int64_t guard_count(int i) const { return guard_counts.defined() ? guard_counts.to_i32_vector()[(size_t)i] : 0; }
};

}  // namespace cm
