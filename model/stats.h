// Per-layer routing statistics of one forward (part of the model API, see model/coe.h).
#pragma once
#include <cstdint>
#include <vector>

#include "engine/tensor.h"

namespace cm {

// What one layer's FFN did in one forward. Dense layers report N = 1, K = 1.
//
// The forward counts where the layer computes (the tensors below, on the layer's device) and reads nothing: a
// training step does not wait for its statistics. read() fills the host values from them in one read-out. The
// model's evaluation forwards (ClusterMoELM::eval()) read every layer's before they return, in one read-out for the
// whole forward (read_routing_stats); after a training forward, call read() before using the host values (until
// then they hold zeros, except a dense layer's share and rows, which are known without counting).
struct LayerRoutingStats {
  int64_t layer = 0;
  bool moe = false;
  int64_t num_experts = 1;  // N
  int64_t slots = 0;        // T*K slots this forward routed (a dense layer: T), known on the host

  // ---- host values (read() fills them)
  std::vector<float> expert_share;   // [N] share of the layer's routed slots (before capacity), sums to 1
  std::vector<int64_t> expert_rows;  // [N] rows each expert computed (after capacity and pruning)
  float dropped_fraction = 0.f;      // slots dropped by capacity / all slots
  float router_entropy = 0.f;        // mean entropy (nats) of the first level's routing distribution (NaN when
                                     // the model computes none: ClusterMoELM::set_router_entropy(false))
  // The fault guard's counts (model/health.h): expert output rows that were not finite, and rows whose norm was far
  // outside their expert's running statistics. 0 when the guard did not run (no reliability, evaluation).
  int64_t nonfinite_rows = 0;
  int64_t outlier_rows = 0;

  // ---- the counts where the layer computed them (undefined: nothing counted there)
  Tensor routed;        // i32 [N] slots routed to each expert, before capacity (the router's last-level histogram)
  Tensor rows;          // i32 [N] rows each expert computed (the dispatch plan's offsets, differenced)
  Tensor entropy;       // f32 0-d, router_entropy
  Tensor guard_counts;  // i32 [2] non-finite rows, outlier rows

  int64_t routing_flops = 0;  // multiply-adds x 2 spent on router logits (counted, not estimated)
  // (The layer's weighted aux terms are tensors, MoELayer::Output::lb_loss, z_loss, div_loss: copying them here
  // made the host wait three times per layer and step.)
  float routing_ms = 0.f;   // wall time of the router's forward (host clock, its device reads included)
  float reliability = 1.f;  // layer reliability as of the last pull of its state (model/health.h)

  // Fills the host values above from the tensors: one read-out, none when there is nothing to read or when they
  // were read already.
  void read();

 private:
  bool read_ = false;
  friend void read_routing_stats(std::vector<LayerRoutingStats>& layers);
};

// read() of every layer of a forward in one read-out (the layers' tensors live on one device).
void read_routing_stats(std::vector<LayerRoutingStats>& layers);

// acc += counts, where the counts are: int64 sums [n] (held in i32 words [2n]) of i32 counts [n] (kernels/route.h
// route_counts_add). acc is zeros at first use and follows the counts to another device with its sums (a moved
// model). The counters the model keeps on its device between read-outs: utilization, the aux-free and pruning loads.
void add_counts(Tensor& acc, const Tensor& counts, int64_t n);

}  // namespace cm
