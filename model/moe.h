// The FFN layer of a block: a dense FFN (one expert, no router) or a Mixture of Experts, with the data flow of
// DESIGN.md section 3:
//
//   x [T, C] -> router -> slots (expert, gate) [T*K]                  (model/router.h)
//            -> dispatch plan: stable counting sort of the slots by expert (row_of, assign_of, offsets [N + 1])
//            -> capacity filter (training, cf > 0): overflow dropped lowest gate first (expert = -1), new plan
//            -> xs = moe_permute(x) [S, C]: each expert's rows contiguous
//            -> ys = every expert's FFN on its rows at once: grouped_linear for w1 (w3), w2   [S, C]
//            -> fault guard: non-finite / outlier rows counted; zeroed and cut from the graph when reliability is on
//            -> out = moe_combine(ys, gate) [T, C]: each token adds its slots in slot order (deterministic)
//   The ops and their kernels: autograd/ops_moe.h (kernels/dispatch.h, kernels/capacity.h, kernels/gemm.h).
//   backward: the same plan in reverse; no atomics anywhere.
//
// The layer also owns the reliability state of its experts (DESIGN.md 4.5), usage and specialization counters,
// the pruning state, and (through its router) the aux-free biases and the AC running scale.
// Letters: T tokens (B*T of the model), C d_model, N experts, K experts per token, S kept slots, V vocabulary.
#pragma once
#include <string>
#include <vector>

#include "autograd/ops_moe.h"
#include "model/health.h"
#include "model/mirror.h"
#include "model/layers.h"
#include "model/router.h"
#include "model/stats.h"

namespace cm {

class MoELayer {
 public:
  MoELayer() = default;
  MoELayer(const CoEConfig& cfg, int64_t layer, bool moe, Generator& gen);

  struct Output {
    Tensor y;                     // [T, C]
    Tensor lb_loss, z_loss, div_loss;  // weighted scalars; undefined when off or dense
    // The routing on the host: filled by an evaluation forward (the host's view), empty after a training forward
    // until read() copies it over.
    std::vector<int32_t> expert;  // [T*K] routed expert of each slot (before capacity)
    std::vector<float> gate;      // [T*K] gate values
    std::vector<char> keep;       // [T*K] 0 = dropped by capacity
    std::vector<int32_t> top1;    // [T] highest-gate expert per token
    Tensor top1_ids;              // MoE: the same, i32 [T] on the layer's device (the next AC layer's labels)
    Tensor expert_ids, gates;     // MoE: the same ids and gate values (before capacity) on the layer's device
    Tensor kept_ids;              // training with capacity: the ids after it (-1: dropped), for read()
    int64_t K = 1;                // slots per token
    LayerRoutingStats stats;
    void read();                  // the host fields and stats.read() from the device ones, when empty
  };
  // x [T, C] (normalised input). ids i32 [T] on x's device: the input token of each row (specialization counters,
  // counted on the device), or null.
  // labels i32 [T] on x's device: the previous MoE layer's top-1 experts (AC), or null. training: capacity, pending health
  // counters and AC batch statistics.
  Output forward(const Tensor& x, const Tensor* ids, const Tensor* labels,
                 bool training);

  // After an optimizer step (before zero_grad): health -> reliability, output-norm statistics, usage EMA (on the
  // layer's device, model/health.h), aux-free bias (on the device too, model/router.h), pruning (there too).
  void after_step();

  void collect(const std::string& prefix, NamedParams& out) const;
  void collect_buffers(const std::string& prefix, NamedParams& out) const;

  // ---- reliability hierarchy (DESIGN.md 4.5)
  std::vector<float> expert_reliability() const;  // [N]
  // Per tree level l, [nodes[l] * b_l]: reliability of each child of the level's nodes (inner nodes:
  // usage-weighted mean of their children; the last level: the experts).
  std::vector<std::vector<float>> node_reliability() const;
  std::vector<float> cluster_reliability() const;  // [num_clusters]
  float layer_reliability() const;                 // mean of the clusters
  // Naming: a cluster is a child of the tree's root (a flat tree has one cluster holding every expert).
  int64_t num_clusters() const;
  int64_t experts_per_cluster() const { return N / num_clusters(); }

  // ---- metrics since reset
  std::vector<double> utilization() const;   // [N] share of routed slots
  std::vector<float> specialization() const;  // [N] KL(p(token | expert) || p(token)), nats
  float mutual_information() const;           // I(expert; token), nats
  void reset_metrics();

  // ---- pruning. In training the flags and the low-step counters change where the layer computes (after_step);
  // these read them there first (one read-out: the host's view, pull_pruning) and prune() writes the host's.
  void prune(int64_t e);
  bool pruned(int64_t e) const;
  int64_t active_experts() const;
  bool can_prune(int64_t e) const;

  bool moe = false;
  int64_t layer = 0, N = 1, K = 1, C = 0, V = 0;
  TreeRouter router;               // MoE only
  std::vector<ExpertFFN> experts;  // [N] (a dense layer: one)
  Linear gate;                     // adaptive routing: C -> 1 (MoE only, when enabled)

 private:
  RouterBias routing_bias(Device dev);
  // routing_bias()'s inputs on dev: the health state [4, N] (model/health.h) and the pruned flags [N].
  struct BiasInputs {
    Tensor state, pruned;
  };
  BiasInputs bias_inputs(Device dev);
  void count_specialization(const Tensor& expert, const Tensor& tokens);
  std::vector<double> specialization_counts() const;
  std::vector<float> specialization_of(const std::vector<double>& spec) const;
  // The reliability of each tree level's children (node_reliability) from the host buffers as they are: pull first
  // for the current values.
  std::vector<std::vector<float>> node_reliability_at_rest() const;
  std::vector<float> cluster_reliability_at_rest() const;
  // Every expert's FFN on its rows of xs [S, C] -> [S, C] (the grouped form of ExpertFFN::forward); ok: the guard's
  // verdict for grouped_linear's backward (model/health.h), or undefined.
  Tensor experts_forward(const Tensor& xs, const DispatchPlan& plan, const Tensor& ok) const;
  // The experts' weights and (with reliability) gradients that judge them after a step, expert by expert, and the
  // meta of ExpertHealth::after_step.
  std::vector<Tensor> health_tensors(std::vector<int64_t>& meta) const;

  CoEConfig cfg_;
  // The grouped GEMM's pointer lists of the expert weights w1, w2, w3 (autograd/ops_moe.h): uploaded once on CUDA.
  // Shared by copies of the layer (a copy's parameters are the same tensors).
  std::shared_ptr<GroupedLinearCache> gemm_lists_[3];
  // Buffers (checkpointed), each [N].
  Tensor reliability_;  // in [reliability_min, 1]
  Tensor norm_ema_;     // running mean of healthy output-row norms (0 = no statistics yet)
  Tensor wnorm_ema_;    // running norm of each expert's weights (0 = no statistics yet)
  Tensor usage_ema_;    // running traffic share (weights the inner nodes' reliability)
  Tensor pruned_;       // 1 = removed from routing and compute
  Tensor low_steps_;    // consecutive after_step()s with traffic under the threshold or low reliability
  // The working copies of pruned_ and low_steps_ on the layer's device (model/mirror.h), and the slots routed to
  // each expert by the training forwards since the last after_step(), int64 [N] there (pruning's load; the guard's
  // counters and the traffic live with the device state, health_, the aux-free loads with the router).
  mutable DeviceMirror pruned_mirror_, low_mirror_;
  Tensor prune_load_;
  void pull_pruning() const;  // the working copies' values into pruned_ and low_steps_ (one read-out each)
  // Metrics since reset.
  std::vector<double> util_;  // [N] rows of a dense layer (counted on the host: T per forward)
  Tensor util_dev_;           // int64 [N] in i32 words [2N], an MoE layer's routed slots per expert, on its device;
                              // undefined: all 0 (add_counts adds, utilization() reads)
  Tensor spec_;  // i32 [N * V] routed slots per (expert, input token), on the layer's device; undefined: all 0
  // The experts are guarded and judged on the layer's device (model/health.h): the buffers above hold that state at
  // rest, pulled back when the host reads them.
  ExpertHealth health_;
  HealthBuffers health_buffers() const { return {reliability_, norm_ema_, wnorm_ema_, usage_ema_}; }
};

}  // namespace cm
