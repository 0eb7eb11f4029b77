// The tree router (DESIGN.md 4.2, 4.3, 4.7). Experts are the leaves of a tree with branching [b1, ..., bD]; a
// token starts at the root and, level by level, each of its kept nodes keeps the top_k[l] of its children:
//
//   level l, for the P = T * K_{l-1} (token, node) pairs still alive (K_{l-1} = prod of the top_k above):
//     logits [P, b]  = h_token . W_node^T               only the kept nodes' routers are evaluated: O(D b C)
//     probs  [P, b]  = softmax(logits / temperature + log r_child  (+ -inf for pruned children))
//     select         = top k of (probs + aux_free_bias) per pair     (no gradient)
//     path   [P, k]  = path_parent * probs[selected]                 (differentiable)
//   leaves: a token's K = prod(top_k) experts; the gate by CoEConfig::gate_mode, with path = product of the
//   conditionals along the token's path to the leaf:
//     product        gate = path                                    (Shazeer et al. 2017)
//     renorm_path    gate = path / sum of path over the token's K leaves (K > 1). A level where the token keeps
//                    one node (top-k 1 there and above) is a common factor of the K leaves and cancels: it gets
//                    no gradient from the task loss.
//     renorm_last    gate = path_parent * p_leaf / sum of p over the k kept siblings (k_last > 1)
//     group_limited  one softmax over all N leaves; the levels only select (route_grouped below)
//   Renormalising over a single element would give a constant 1 (no gradient), so K = 1 (k_last = 1) keeps path.
//
// Dense (no routing) is [1]; flat top-k is [N]; ClusterMoE is [num_clusters, experts_per_cluster].
// The Adaptive Clustering (AC) transform on a level replaces h by m_{label} * h and W's rows by unit vectors, with
// m computed from the previous MoE layer's top-1 labels (DESIGN.md 4.7; see ac_scales()).
// Letters: T tokens, C d_model, P (token, node) pairs at a level, b branching, k kept per node, N leaves.
#pragma once
#include <string>
#include <vector>

#include "autograd/ops.h"
#include "model/config.h"
#include "model/layers.h"
#include "model/mirror.h"

namespace cm {

// Stable counting sort of ids in [0, n): order[i] = position (in ids) of the i-th element in sorted order;
// offsets [n + 1]: the elements of id j are order[offsets[j] .. offsets[j+1]). Equal ids keep their order.
struct Segments {
  std::vector<int32_t> order;
  std::vector<int64_t> offsets;
};
Segments counting_sort(const std::vector<int32_t>& ids, int64_t n);

// No-gradient terms the owner (the MoE layer) adds to the router's logits, per level l [nodes[l] * b_l] f32 on h's
// device: log reliability of each child, and -inf for pruned children (kernels/route.h route_bias_forward makes
// them where the layer computes, levels concatenated in `all`). The router hands them to its kernels as they are
// and never looks at them on the host; the load-balance kernel decides on the device whether a level has targets
// other than 1/b. Undefined (the default): no bias at all (the layer has neither reliability nor a pruned expert).
struct RouterBias {
  Tensor all;                 // [sum_l nodes[l] * b_l], level 0 first; undefined: no bias
  std::vector<Tensor> level;  // [D] views of all, level l [nodes[l] * b_l]
  bool defined() const { return all.defined(); }
};
class TreeRouter;
// The views of a router's levels over all [sum_l nodes[l] * b_l] (on any device).
RouterBias router_bias_over(const TreeRouter& r, const Tensor& all);
// From host values per level (tests, tools): an empty level means zeros; uploaded to dev.
RouterBias router_bias_from_host(const TreeRouter& r, const std::vector<std::vector<float>>& levels,
                                 Device dev = Device::CPU);

struct Routing {
  int64_t T = 0, K = 0;
  Tensor expert_ids;  // [T*K] i32 on h's device: the leaf of slot s = t*K + j
  Tensor gate;        // [T*K] differentiable gates, on h's device
  std::vector<Tensor> level_counts_dev;  // per level [n_nodes * b] i32 on h's device: times each child was selected
  Tensor entropy_dev;                    // 0-d on h's device: mean entropy (nats) of the level-0 distribution
                                         // (undefined when the router's entropy statistic is off)
  Tensor lb_loss, z_loss, div_loss;      // weighted scalars; undefined when the weight is 0
  int64_t flops = 0;                     // 2 * multiply-adds spent on logits

  // Host read-outs of the tensors above, made by route() in one copy and one wait (read_out_words, engine/tensor.h)
  // when asked (route's read_out): empty otherwise. moe.cpp asks in evaluation only (statistics, generation).
  std::vector<int32_t> expert;                     // [T*K] = expert_ids
  std::vector<float> gate_value;                   // [T*K] the gates' values (evaluation's top-1, statistics)
  std::vector<std::vector<int64_t>> level_counts;  // = level_counts_dev
  float entropy = 0.f;                             // = entropy_dev (NaN: not computed, set_entropy(false))
};

class TreeRouter {
 public:
  TreeRouter() = default;
  TreeRouter(const CoEConfig& cfg, Generator& gen);

  // h [T, C]. labels i32 [T] on h's device: the previous MoE layer's top-1 expert per token (for AC levels; null ->
  // m = 1).
  // training: AC uses this batch's m (and updates the running m); otherwise the running m.
  // read_out: fill Routing's host fields (one packed read-out); false leaves them empty and reads nothing.
  Routing route(const Tensor& h, const RouterBias& bias, const Tensor* labels, bool training,
                bool read_out = true);

  // The level-0 entropy statistic (Routing::entropy_dev): on unless switched off. Off, route() computes none
  // (entropy_dev undefined): at many experts its pass is a large part of a flat router's selection.
  void set_entropy(bool on) { entropy_ = on; }
  bool entropy() const { return entropy_; }

  void collect(const std::string& prefix, NamedParams& out) const;          // levels.{l}.weight
  void collect_buffers(const std::string& prefix, NamedParams& out) const;  // levels.{l}.aux_bias, ac_scale
  // The host buffers (aux_bias, ac_scale) take the device's values (one read-out each that the device changed).
  // collect_buffers does it; so must whoever reads the buffers directly.

  // aux-free balancing (DeepSeek-V3): bias += rate * sign(mean sibling load - load), per node.
  // The loads are summed where the routing ran (add_aux_load, each training forward) and the bias moves there
  // (update_aux_bias, after the optimizer step: kernels/route.h route_aux_bias_update): nothing waits.
  void add_aux_load(const Routing& r);
  void update_aux_bias(float rate);
  void pull_buffers() const;

  int64_t depth() const { return (int64_t)branching.size(); }
  std::vector<int64_t> branching, top_k;
  std::vector<int64_t> nodes;     // [D] inner nodes at each level (prod of the branching above)
  std::vector<Tensor> weights;    // [D] each [nodes[l] * b_l, C]; rows of node j are j*b .. j*b + b - 1
  std::vector<Tensor> aux_bias;   // [D] each [nodes[l] * b_l] (buffers, selection only; at rest: in training
                                  // the working copies live on the device, aux_running)
  Tensor ac_scale;                // [N, C] running m for evaluation (buffer); undefined without AC levels
                                  // (its state at rest: while the model trains, the running m lives on its device)

 private:
  Routing route_grouped(const Tensor& h, const RouterBias& bias, bool read_out);  // gate_mode group_limited
  void read_host(Routing& r, Device dev) const;  // Routing's host fields, one packed read-out
  void finish(Routing& r, const std::vector<Tensor>& lb_terms, const std::vector<Tensor>& z_terms, Device dev) const;
  // The running AC m [N, C] and the aux-free bias of each level on the layer's device: the working copies of
  // ac_scale and aux_bias (model/mirror.h), pulled back into them when the buffers are read (pull_buffers).
  const Tensor& ac_running(Device dev) { return ac_mirror_.on(ac_scale, dev); }
  const Tensor& aux_running(int64_t l, Device dev) { return aux_mirror_[l].on(aux_bias[l], dev); }
  DeviceMirror ac_mirror_;
  std::vector<DeviceMirror> aux_mirror_;  // [D]
  std::vector<Tensor> aux_load_;          // [D] each int64 [nodes[l] * b_l] (i32 storage) on the device: loads
                                          // since the last update (undefined before the first training forward)
  int64_t C_ = 0, N_ = 0;
  std::vector<bool> ac_level_;
  bool ac_scaling_ = true;
  float temperature_ = 1.f;
  GateMode gate_mode_ = GateMode::RenormPath;
  float lb_w_ = 0.f, z_w_ = 0.f, div_w_ = 0.f;
  bool aux_free_ = false;
  bool entropy_ = true;
};

// AC feature weights (DESIGN.md 4.7) on one batch, no gradient: h [T, C], labels [T] in [0, N).
// s_kq = mean |h_q - mean_k(h_q)| over tokens labelled k; w = 1/(s + 1e-4), clipped at 10x the mean of w;
// m_kq = w_kq / mean over labelled experts of w_kq. Returns m [N * C] row-major; experts with no tokens get 1
// (has_tokens[k] = false).
std::vector<float> ac_scales(const Tensor& h, const std::vector<int32_t>& labels, int64_t N,
                             std::vector<bool>* has_tokens = nullptr);

// Routing cost per token of a tree, in FLOPs (2 per multiply-add): sum_l K_{l-1} * b_l * 2C, K_{-1} = 1.
int64_t routing_flops_per_token(int64_t C, const std::vector<int64_t>& branching, const std::vector<int64_t>& top_k);

}  // namespace cm
