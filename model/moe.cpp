// The FFN / MoE layer: routing, capacity, dispatch by counting sort, grouped expert GEMMs, fault guard, combine;
// and the layer's no-gradient state (reliability, statistics, pruning).
#include "model/moe.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <limits>

#include "engine/dispatch.h"
#include "engine/host_sync.h"
#include "kernels/health.h"
#include "kernels/route.h"
#include "model/optim.h"

namespace cm {

// ---------------------------------------------------------------- the layer

MoELayer::MoELayer(const CoEConfig& cfg, int64_t layer_, bool moe_, Generator& gen)
    : moe(moe_), layer(layer_), C(cfg.d_model), V(cfg.vocab_size), cfg_(cfg) {
  N = moe ? cfg.num_experts() : 1;
  K = moe ? cfg.experts_per_token() : 1;
  if (moe) router = TreeRouter(cfg, gen);
  for (auto& l : gemm_lists_) l = make_grouped_linear_cache();
  for (int64_t e = 0; e < N; ++e) experts.emplace_back(cfg, gen);
  if (moe && cfg.use_adaptive_routing) {
    gate = Linear(C, 1, true, cfg.init_std, gen);
    gate.w.fill_(0.f);  // starts as a constant 0.5 per token; learns which tokens need their experts
  }
  reliability_ = Tensor::ones({N});
  norm_ema_ = Tensor::zeros({N});
  wnorm_ema_ = Tensor::zeros({N});
  usage_ema_ = Tensor::full({N}, 1.f / (float)N);
  pruned_ = Tensor::zeros({N});
  low_steps_ = Tensor::zeros({N});
  util_.assign(N, 0.0);
}

void MoELayer::collect(const std::string& prefix, NamedParams& out) const {
  if (moe) router.collect(prefix + ".router", out);
  for (int64_t e = 0; e < N; ++e) experts[e].collect(moe ? prefix + ".experts." + std::to_string(e) : prefix, out);
  if (gate.w.defined()) gate.collect(prefix + ".gate", out);
}

void MoELayer::collect_buffers(const std::string& prefix, NamedParams& out) const {
  health_.pull(health_buffers());  // the caller may read them (a checkpoint): the host holds the state now
  out.emplace_back(prefix + ".reliability", reliability_);
  out.emplace_back(prefix + ".norm_ema", norm_ema_);
  out.emplace_back(prefix + ".wnorm_ema", wnorm_ema_);
  out.emplace_back(prefix + ".usage_ema", usage_ema_);
  pull_pruning();
  out.emplace_back(prefix + ".pruned", pruned_);
  out.emplace_back(prefix + ".low_steps", low_steps_);
  if (moe) router.collect_buffers(prefix + ".router", out);
}

// ---------------------------------------------------------------- reliability hierarchy

// The layer's buffers (reliability, EMAs, ...) live on the host in every build: reading them is no read-out of
// device values (engine/host_sync.h), so they are read through their pointers rather than to_f32_vector().
static std::vector<float> host_buffer(const Tensor& t) {
  CM_CHECK(t.device() == Device::CPU && t.is_contiguous(), "buffers live on the host, contiguous");
  return std::vector<float>(t.f32(), t.f32() + t.numel());
}

std::vector<float> MoELayer::expert_reliability() const {
  health_.pull(health_buffers());
  return host_buffer(reliability_);
}

std::vector<std::vector<float>> MoELayer::node_reliability() const {
  health_.pull(health_buffers());
  return node_reliability_at_rest();
}

std::vector<std::vector<float>> MoELayer::node_reliability_at_rest() const {
  std::vector<float> r = host_buffer(reliability_), u = host_buffer(usage_ema_);
  if (!moe) return {r};
  const int64_t D = router.depth();
  std::vector<std::vector<float>> rel((size_t)D), use((size_t)D);
  rel[D - 1] = r;
  use[D - 1] = u;
  // Level l's children are the nodes of level l + 1: each aggregates its own children (usage-weighted mean).
  for (int64_t l = D - 2; l >= 0; --l) {
    const int64_t n = router.nodes[l + 1], b = router.branching[l + 1];
    rel[l].assign((size_t)n, 1.f);
    use[l].assign((size_t)n, 0.f);
    for (int64_t j = 0; j < n; ++j) {
      double su = 0.0, sur = 0.0, sr = 0.0;
      for (int64_t c = 0; c < b; ++c) {
        su += use[l + 1][j * b + c];
        sur += (double)use[l + 1][j * b + c] * rel[l + 1][j * b + c];
        sr += rel[l + 1][j * b + c];
      }
      rel[l][j] = (float)(su > 0.0 ? sur / su : sr / (double)b);
      use[l][j] = (float)su;
    }
  }
  return rel;
}

int64_t MoELayer::num_clusters() const {
  return moe && router.depth() >= 2 ? router.branching[0] : 1;
}

// The clusters' reliability (below) and their mean from the host buffers as they are (pull first).
static float mean_of(const std::vector<float>& c) {
  double s = 0.0;
  for (float v : c) s += v;
  return (float)(s / (double)c.size());
}

std::vector<float> MoELayer::cluster_reliability() const {
  health_.pull(health_buffers());
  return cluster_reliability_at_rest();
}

std::vector<float> MoELayer::cluster_reliability_at_rest() const {
  std::vector<std::vector<float>> rel = node_reliability_at_rest();
  if (moe && router.depth() >= 2) return rel[0];
  // One cluster holding every expert: usage-weighted mean of the experts.
  std::vector<float> r = host_buffer(reliability_), u = host_buffer(usage_ema_);
  double su = 0.0, sur = 0.0;
  for (int64_t e = 0; e < N; ++e) {
    su += u[e];
    sur += (double)u[e] * r[e];
  }
  return {(float)(su > 0.0 ? sur / su : 1.0)};
}

float MoELayer::layer_reliability() const { return mean_of(cluster_reliability()); }

// The inputs of the routing bias on dev: the experts' health state where it lives ([4, N], model/health.h:
// reliability in row 0, usage in row 3) and the pruned flags' working copy, [N] (model/mirror.h: uploaded again only
// when the host wrote them, so a captured step uploads nothing).
MoELayer::BiasInputs MoELayer::bias_inputs(Device dev) {
  return {health_.state(dev, health_buffers()), pruned_mirror_.on(pruned_, dev)};
}

// Every level's logit bias, made on dev from tensors (kernels/route.h route_bias_forward: log of the node
// reliabilities of node_reliability(), -inf for pruned experts): the host never reads it. Whether there is any bias
// at all is the host's decision, from the config and the pruned flags (host state).
RouterBias MoELayer::routing_bias(Device dev) {
  // Without pruning in training, the host's flags are the flags (nothing else writes them): read without a pull.
  bool any_pruned = cfg_.enable_expert_pruning;
  for (int64_t e = 0; e < N && !any_pruned; ++e) any_pruned = pruned_.f32()[e] != 0.f;
  if (!cfg_.use_reliability && !any_pruned) return RouterBias{};
  const BiasInputs in = bias_inputs(dev);
  int64_t total = 0, width = 1;
  for (int64_t b : router.branching) total += (width *= b);
  Tensor all = Tensor::empty({total}, DType::F32, dev);
  CM_KERNEL(dev, route_bias_forward, all.f32(), in.state.f32(), in.state.f32() + 3 * N, in.pruned.f32(),
            router.branching.data(), router.depth(), cfg_.use_reliability);
  return router_bias_over(router, all);
}

// ---------------------------------------------------------------- forward

// Each token's highest-gate expert (ties: the earlier slot) from the host's copies: expert, gate [T*K] -> [T], by
// the CPU twin of the route_top1 kernel that makes the same on the layer's device.
static std::vector<int32_t> top1_of(const std::vector<int32_t>& expert, const std::vector<float>& gate, int64_t K) {
  std::vector<int32_t> top1(expert.size() / (size_t)K);
  cpu::route_top1(top1.data(), expert.data(), gate.data(), (int64_t)top1.size(), K);
  return top1;
}

void MoELayer::Output::read() {
  stats.read();
  if (!expert.empty() || !expert_ids.defined()) return;  // read already, or a dense layer's (filled)
  expert = expert_ids.to_i32_vector();
  gate = gates.to_f32_vector();
  keep.assign(expert.size(), 1);
  if (kept_ids.defined()) {  // capacity dropped some: -1 there
    const std::vector<int32_t> kept = kept_ids.to_i32_vector();
    for (size_t s = 0; s < kept.size(); ++s) keep[s] = kept[s] >= 0;
  }
  top1 = top1_of(expert, gate, K);
}

Tensor MoELayer::experts_forward(const Tensor& xs, const DispatchPlan& plan, const Tensor& ok) const {
  // Each weight family of all experts side by side (the parameters stay per expert: names and checkpoints as
  // before). One grouped op per family; the same arithmetic as ExpertFFN::forward on each expert's rows.
  std::vector<Tensor> w1, b1, w2, b2, w3, b3;
  for (const ExpertFFN& f : experts) {
    w1.push_back(f.w1.w);
    w2.push_back(f.w2.w);
    if (f.w1.b.defined()) b1.push_back(f.w1.b);
    if (f.w2.b.defined()) b2.push_back(f.w2.b);
    if (f.kind == ExpertKind::SwiGLU) {
      w3.push_back(f.w3.w);
      if (f.w3.b.defined()) b3.push_back(f.w3.b);
    }
  }
  const std::vector<int64_t>& offsets = plan.offsets;
  Tensor h = grouped_linear(xs, w1, b1, offsets, ok, plan.offsets_dev, gemm_lists_[0]);  // [S, F]
  if (experts[0].kind == ExpertKind::SwiGLU)
    h = mul(silu(h), grouped_linear(xs, w3, b3, offsets, ok, plan.offsets_dev, gemm_lists_[2]));
  else
    h = gelu(h);
  return grouped_linear(h, w2, b2, offsets, ok, plan.offsets_dev, gemm_lists_[1]);  // [S, C]
}

MoELayer::Output MoELayer::forward(const Tensor& x, const Tensor* ids,
                                   const Tensor* labels, bool training) {
  CM_REQUIRE(x.dim() == 2 && x.size(1) == C, "FFN layer input must be [T, ", C, "], got ", shape_str(x.shape()));
  const int64_t T = x.size(0);
  Output out;
  LayerRoutingStats& st = out.stats;
  st.layer = layer;
  st.moe = moe;
  st.num_experts = N;
  st.slots = T * K;
  st.expert_share.assign(N, 0.f);  // host values: read() fills them from the counts (model/stats.h)
  st.expert_rows.assign(N, 0);
  // The host buffers may lag the device state by the steps since the last pull (model/health.h).
  st.reliability = mean_of(cluster_reliability_at_rest());
  if (ids)
    CM_CHECK(ids->dtype() == DType::I32 && ids->numel() == T && ids->device() == x.device(), "ids ",
             shape_str(ids->shape()), " for ", T, " rows");

  if (!moe) {  // dense FFN: one expert, every token, gate 1; guarded on its device (no host round trip)
    Tensor y;
    if (cfg_.use_reliability) {  // the FFN on gated input and weights: a bad output cuts it from the backward
      health_.begin(x.device());
      ExpertFFN gated = experts[0];
      for (Tensor* t : {&gated.w1.w, &gated.w1.b, &gated.w2.w, &gated.w2.b, &gated.w3.w, &gated.w3.b})
        if (t->defined()) *t = health_.gate(*t);
      y = gated.forward(health_.gate(x));
    } else {
      y = experts[0].forward(x);
    }
    out.y = health_.guard(y, training, cfg_.use_reliability, cfg_.reliability_outlier_factor, health_buffers(),
                          &st.guard_counts);
    st.expert_share[0] = T ? 1.f : 0.f;  // known without counting
    st.expert_rows[0] = T;
    out.expert.assign((size_t)T, 0);
    out.gate.assign((size_t)T, 1.f);
    out.keep.assign((size_t)T, 1);
    out.top1.assign((size_t)T, 0);
    util_[0] += (double)T;
    if (ids) count_specialization(Tensor(), *ids);
    return out;
  }

  // 1. Route. A training step needs no host view of the routing: the plan, capacity, the guard, the statistics, the
  //    health traffic and the loads of the aux-free bias and of pruning all work from the device tensors, and the
  //    router reads nothing (host_view false); AC's labels, each token's top-1 expert, are made there too
  //    (route_top1). The host reads the router's choices for evaluation only (statistics, generation's routing).
  const bool host_view = !training;
  const auto route_t0 = std::chrono::steady_clock::now();
  Routing rt = router.route(x, routing_bias(x.device()), labels, training, host_view);
  st.routing_ms = std::chrono::duration<float, std::milli>(std::chrono::steady_clock::now() - route_t0).count();
  const int64_t S0 = T * K;
  out.lb_loss = rt.lb_loss;
  out.z_loss = rt.z_loss;
  out.div_loss = rt.div_loss;
  st.routing_flops = rt.flops;
  // The statistics stay where the router counted them (read() reads them): the routed slots per expert, the
  // level-0 entropy. (So do the layer's aux terms: out.lb_loss, z_loss, div_loss.)
  st.routed = rt.level_counts_dev.back();  // i32 [N]: the last level's children are the experts
  st.entropy = rt.entropy_dev;  // undefined when the router computes none: the host value stays NaN
  if (!st.entropy.defined()) st.router_entropy = std::numeric_limits<float>::quiet_NaN();
  add_counts(util_dev_, st.routed, N);  // utilization since reset_metrics(), read by utilization()
  out.K = K;
  out.expert_ids = rt.expert_ids;
  out.gates = rt.gate.detach().contiguous();
  out.top1_ids = Tensor::empty({T}, DType::I32, x.device());
  CM_KERNEL(x.device(), route_top1, out.top1_ids.i32(), out.expert_ids.i32(), out.gates.f32(), T, K);
  if (host_view) {
    out.expert = rt.expert;
    out.top1 = top1_of(rt.expert, rt.gate_value, K);
  }
  if (training) {
    health_.add_traffic(rt.level_counts_dev.back(), health_buffers());  // the usage's traffic, on the device
    // The slots routed to each expert, summed on the device for after_step's pruning.
    if (cfg_.enable_expert_pruning) add_counts(prune_load_, rt.level_counts_dev.back(), N);
    if (cfg_.aux_free_bias) router.add_aux_load(rt);  // the loads summed on the device for after_step
  }

  // 2. The dispatch plan on the layer's device: a stable counting sort of the slots by expert. With the host's view
  //    (evaluation) its copy of the ids counts the offsets (nothing is read back); in training all on the device.
  const Device dev = x.device();
  Tensor expert = rt.expert_ids;  // i32 [T*K] on x's device
  if (ids) count_specialization(expert, *ids);  // the routed slots, before capacity
  DispatchPlan plan =
      host_view ? make_dispatch_plan(expert, K, N, &rt.expert) : make_dispatch_plan_nowait(expert, K, N);

  // 3. Capacity (training only: evaluation and decoding are dropless, so a token's output never depends on the
  //    rest of the batch there). Each expert keeps its cap highest-gate slots; ties keep the earlier slot
  //    (kernels/capacity.h). The filter runs where the ids are and the kept slots are planned there again; the new
  //    plan's buffer still has a row per slot, the dropped slots' rows unfilled and never computed
  //    (make_dispatch_plan_nowait), so nothing waits for the kept count.
  if (host_view) out.keep.assign((size_t)S0, 1);
  if (training && cfg_.capacity_factor > 0.f) {
    const int64_t cap = (int64_t)std::ceil((double)cfg_.capacity_factor * (double)S0 / (double)N);
    expert = capacity_filter(expert, rt.gate, plan, cap);  // every slot kept where no expert is over
    plan = make_dispatch_plan_nowait(expert, K, N);
    out.kept_ids = expert;
  }
  out.gate = rt.gate_value;
  // The rows each expert computes, from the plan's offsets where they are (the dropped slots: S0 - their sum).
  st.rows = Tensor::empty({N}, DType::I32, dev);
  CM_KERNEL(dev, route_offset_counts, st.rows.i32(), plan.offsets_ptr(), N);
  if (plan.rows == 0) {
    out.y = Tensor::zeros({T, C}, DType::F32, dev);
    return out;
  }

  // 4. Gather rows, run every expert on its rows (grouped), guard the outputs.
  Tensor xs = moe_permute(x, plan);  // [S, C] expert-contiguous
  // The guard's verdict per expert, i32 [N]: grouped_linear's backward reads it, written by the guard below.
  const Tensor ok = cfg_.use_reliability ? Tensor::empty({N}, DType::I32, dev) : Tensor();
  Tensor ys = experts_forward(xs, plan, ok);  // [S, C]
  // Bad rows counted (training) and, with reliability, zeroed in place; an expert with any is cut (ok = 0).
  st.guard_counts = health_.guard_experts(ys, plan.offsets_dev, ok, training, cfg_.use_reliability,
                                          cfg_.reliability_outlier_factor, health_buffers());

  // 5. Combine: each token adds its slots' gated rows in slot order.
  Tensor y = moe_combine(ys, rt.gate, plan);  // [T, C]
  if (gate.w.defined()) y = mul(y, sigmoid(gate.forward(x)));  // adaptive gate [T, 1]
  out.y = y;
  return out;
}

// ---------------------------------------------------------------- after a step

void MoELayer::after_step() {
  std::vector<int64_t> meta;
  const std::vector<Tensor> ts = health_tensors(meta);
  const Tensor flags = moe && !ts.empty() ? pruned_mirror_.on(pruned_, ts[0].device()) : Tensor();
  health_.after_step(ts, meta, flags, cfg_.reliability_decay, cfg_.reliability_outlier_factor, cfg_.reliability_min,
                     cfg_.use_reliability, health_buffers());
  if (!moe) return;
  if (cfg_.aux_free_bias) router.update_aux_bias(cfg_.aux_free_bias_rate);  // on the device (no load: no move)
  // Pruning where the loads and the health state are (kernels/health.h expert_prune_update): the flags and the low
  // counters change in their working copies, read by the host when it asks (pull_pruning).
  if (cfg_.enable_expert_pruning && prune_load_.defined()) {
    const Device dev = prune_load_.device();
    CM_KERNEL(dev, expert_prune_update, low_mirror_.on(low_steps_, dev).f32(), pruned_mirror_.on(pruned_, dev).f32(),
              static_cast<int64_t*>(prune_load_.raw()), health_.state(dev, health_buffers()).f32(), N,
              router.branching.back(), router.top_k.back(), cfg_.pruning_threshold, cfg_.pruning_window,
              cfg_.use_reliability);
  }
}

// Every expert's weights and (with reliability) their gradients, expert by expert: their sums of squares judge the
// experts after a step (a pruned one's are passed over where the flags are). meta [2N]: how many weights and
// gradients each expert has there.
std::vector<Tensor> MoELayer::health_tensors(std::vector<int64_t>& meta) const {
  std::vector<Tensor> ts;
  meta.assign((size_t)(2 * N), 0);
  for (int64_t e = 0; e < N; ++e) {
    const std::vector<Tensor> w = experts[e].tensors();
    ts.insert(ts.end(), w.begin(), w.end());
    meta[e] = (int64_t)w.size();
    if (cfg_.use_reliability)
      for (const Tensor& p : w)
        if (p.grad().defined()) {
          ts.push_back(p.grad());
          ++meta[N + e];
        }
  }
  return ts;
}

// ---------------------------------------------------------------- metrics

std::vector<double> MoELayer::utilization() const {
  std::vector<double> u = util_;
  if (util_dev_.defined()) {  // the routed slots counted on the device: one read-out
    const std::vector<int32_t> words = util_dev_.to_i32_vector();
    std::vector<int64_t> c((size_t)N);
    std::memcpy(c.data(), words.data(), (size_t)N * 8);
    for (int64_t e = 0; e < N; ++e) u[e] += (double)c[e];
  }
  double s = 0.0;
  for (double v : u) s += v;
  std::vector<double> r((size_t)N, 0.0);
  for (int64_t e = 0; e < N; ++e) r[e] = s > 0.0 ? u[e] / s : 0.0;
  return r;
}

// spec_ += one count per (expert, input token) pair of the slots: expert i32 [T*K] (undefined: a dense layer, every
// token to expert 0), tokens i32 [T], on the layer's device. Counted there (kernels/route.h): nothing is read.
void MoELayer::count_specialization(const Tensor& expert, const Tensor& tokens) {
  const Device dev = tokens.device();
  if (spec_.defined() && spec_.device() != dev) spec_ = spec_.to(dev);
  if (!spec_.defined()) spec_ = Tensor::zeros({N * V}, DType::I32, dev);
  const Tensor tk = tokens.contiguous();
  if (!expert.defined()) {  // expert 0: the key is the token
    CM_KERNEL(dev, route_histogram, spec_.i32(), tk.i32(), tk.numel(), N * V, true);
    return;
  }
  const Tensor ex = expert.contiguous();
  const int64_t A = ex.numel();
  Tensor keys = Tensor::empty({A}, DType::I32, dev);
  CM_KERNEL(dev, route_pair_keys, keys.i32(), ex.i32(), tk.i32(), A, A / std::max<int64_t>(tk.numel(), 1), N, V);
  CM_KERNEL(dev, route_histogram, spec_.i32(), keys.i32(), A, N * V, true);
}

// The counts as doubles [N * V] (one read-out: a metric, read at evaluation time).
std::vector<double> MoELayer::specialization_counts() const {
  std::vector<double> c((size_t)(N * V), 0.0);
  if (!spec_.defined()) return c;
  const std::vector<int32_t> v = spec_.to_i32_vector();
  for (size_t i = 0; i < c.size(); ++i) c[i] = (double)v[i];
  return c;
}

std::vector<float> MoELayer::specialization() const {
  return specialization_of(specialization_counts());
}

std::vector<float> MoELayer::specialization_of(const std::vector<double>& spec) const {
  // p(v) over all routed slots; per expert KL(p(v | e) || p(v)).
  std::vector<double> pv((size_t)V, 0.0);
  double total = 0.0;
  for (int64_t e = 0; e < N; ++e)
    for (int64_t v = 0; v < V; ++v) pv[v] += spec[e * V + v];
  for (double x : pv) total += x;
  std::vector<float> kl((size_t)N, 0.f);
  if (total <= 0.0) return kl;
  for (int64_t e = 0; e < N; ++e) {
    double ne = 0.0, acc = 0.0;
    for (int64_t v = 0; v < V; ++v) ne += spec[e * V + v];
    if (ne <= 0.0) continue;
    for (int64_t v = 0; v < V; ++v) {
      double c = spec[e * V + v];
      if (c > 0.0) acc += (c / ne) * std::log((c / ne) / (pv[v] / total));
    }
    kl[e] = (float)acc;
  }
  return kl;
}

float MoELayer::mutual_information() const {
  // I(E; V) = sum_e p(e) KL(p(v | e) || p(v)).
  const std::vector<double> spec = specialization_counts();
  std::vector<float> kl = specialization_of(spec);
  double total = 0.0, mi = 0.0;
  std::vector<double> ne((size_t)N, 0.0);
  for (int64_t e = 0; e < N; ++e) {
    for (int64_t v = 0; v < V; ++v) ne[e] += spec[e * V + v];
    total += ne[e];
  }
  if (total <= 0.0) return 0.f;
  for (int64_t e = 0; e < N; ++e) mi += ne[e] / total * kl[e];
  return (float)mi;
}

void MoELayer::reset_metrics() {
  std::fill(util_.begin(), util_.end(), 0.0);
  // The device counters are zeroed where they are, not dropped: a captured CUDA graph of the training step adds
  // into them at every replay (train_lm --cuda_graph), so they keep their memory for the model's life.
  for (Tensor* t : {&util_dev_, &spec_})
    if (t->defined()) t->fill_(0.f);  // i32 zeros, set on the device
}

// ---------------------------------------------------------------- pruning

void MoELayer::pull_pruning() const {
  pruned_mirror_.pull(pruned_);
  low_mirror_.pull(low_steps_);
}

bool MoELayer::pruned(int64_t e) const {
  pull_pruning();
  return pruned_.f32()[e] != 0.f;
}

int64_t MoELayer::active_experts() const {
  pull_pruning();
  int64_t n = 0;
  for (int64_t e = 0; e < N; ++e) n += pruned_.f32()[e] == 0.f;
  return n;
}

// An expert may go only if its parent keeps at least top_k active children (so every node can still select).
bool MoELayer::can_prune(int64_t e) const {
  if (!moe || pruned(e)) return false;  // (pruned() pulls: the flags below are current)
  const int64_t b = router.branching.back(), k = router.top_k.back(), parent = e / b;
  int64_t active = 0;
  for (int64_t c = 0; c < b; ++c) active += pruned_.f32()[parent * b + c] == 0.f;
  return active - 1 >= k;
}

void MoELayer::prune(int64_t e) {
  CM_REQUIRE(e >= 0 && e < N, "expert ", e, " outside [0, ", N, ") in layer ", layer);
  CM_REQUIRE(can_prune(e), "layer ", layer, " expert ", e,
             moe ? ": pruning it would leave its parent fewer active children than top_k" : ": a dense layer");
  pruned_.f32()[e] = 1.f;
}

}  // namespace cm
