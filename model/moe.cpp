// The FFN / MoE layer: routing, capacity, dispatch by counting sort, grouped expert GEMMs, fault guard, combine;
// and the layer's no-gradient state (reliability, statistics, pruning).
#include "model/moe.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>

#include "engine/dispatch.h"
#include "engine/host_sync.h"
#include "kernels/capacity.h"
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
  pend_routed_.assign(N, 0);
  pend_rows_.assign(N, 0);
  pend_bad_.assign(N, 0);
  pend_good_.assign(N, 0);
  pend_norm_.assign(N, 0.0);
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

std::vector<float> MoELayer::cluster_reliability() const {
  std::vector<std::vector<float>> rel = node_reliability();
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

float MoELayer::layer_reliability() const {
  std::vector<float> c = cluster_reliability();
  double s = 0.0;
  for (float v : c) s += v;
  return (float)(s / (double)c.size());
}

// The inputs of the routing bias on dev, [3, N]: reliability, usage EMA, pruned flags (1 = pruned). Today they are
// the layer's host buffers, uploaded (an upload, no wait); this is the one place that says where they come from.
Tensor MoELayer::health_state_for_bias(Device dev) const {
  health_.pull(health_buffers());  // (a no-op for an MoE layer: its state lives in the host buffers)
  std::vector<float> v = host_buffer(reliability_), u = host_buffer(usage_ema_), p = host_buffer(pruned_);
  v.insert(v.end(), u.begin(), u.end());
  v.insert(v.end(), p.begin(), p.end());
  return Tensor::from_vector(v, {3, N}, dev);
}

// Every level's logit bias, made on dev from tensors (kernels/route.h route_bias_forward: log of the node
// reliabilities of node_reliability(), -inf for pruned experts): the host never reads it. Whether there is any bias
// at all is the host's decision, from the config and the pruned flags (host state).
RouterBias MoELayer::routing_bias(Device dev) const {
  const bool any_pruned = active_experts() < N;
  if (!cfg_.use_reliability && !any_pruned) return RouterBias{};
  const Tensor state = health_state_for_bias(dev);  // [3, N]
  int64_t total = 0, width = 1;
  for (int64_t b : router.branching) total += (width *= b);
  Tensor all = Tensor::empty({total}, DType::F32, dev);
  CM_KERNEL(dev, route_bias_forward, all.f32(), state.f32(), state.f32() + N, state.f32() + 2 * N,
            router.branching.data(), router.depth(), cfg_.use_reliability);
  return router_bias_over(router, all);
}

// ---------------------------------------------------------------- forward

// Each row's sum of squares of every expert output ys[i] [n_i, C]: in double from the data on the CPU; on a device,
// float sums made there and one copy for the whole layer (a row whose squares overflow float reads as non-finite).
static std::vector<std::vector<double>> row_sums_of_squares(const std::vector<Tensor>& ys) {
  std::vector<std::vector<double>> sq(ys.size());
  if (ys.empty()) return sq;
  if (ys[0].device() == Device::CPU) {
    note_host_read();  // one read-out for the layer, as the device path's one copy (engine/host_sync.h)
    for (size_t k = 0; k < ys.size(); ++k) {
      const int64_t n = ys[k].size(0), C = ys[k].size(1);
      const Tensor yc = ys[k].detach().contiguous();
      const float* v = yc.f32();
      sq[k].assign((size_t)n, 0.0);
      for (int64_t i = 0; i < n; ++i) {
        double ss = 0.0;
        for (int64_t q = 0; q < C; ++q) ss += (double)v[i * C + q] * v[i * C + q];
        sq[k][i] = ss;
      }
    }
    return sq;
  }
  NoGrad ng;
  std::vector<Tensor> sums;
  for (const Tensor& y : ys) sums.push_back(sum(square(y.detach()), 1));
  std::vector<float> all = (sums.size() == 1 ? sums[0] : concat(sums, 0)).to_f32_vector();
  size_t at = 0;
  for (size_t k = 0; k < ys.size(); ++k) {
    const size_t n = (size_t)ys[k].size(0);
    sq[k].assign(all.begin() + at, all.begin() + at + n);
    at += n;
  }
  return sq;
}

// Fault guard (DESIGN.md 4.5) on the rows of one expert: a row is bad when its norm is non-finite or exceeds
// outlier_factor x the expert's running mean. When reliability is on and any row is bad, the expert's rows are
// replaced by a constant copy with the bad rows zeroed: the whole expert is cut from the graph. Cutting it whole is
// deliberate: with NaN or huge weights even the good rows' backward (through those weights) would poison every
// other gradient.
int64_t MoELayer::guard_rows(int64_t e, const double* sq, int64_t n, bool training, LayerRoutingStats& st,
                             char* bad) {
  const float ema = norm_ema_.f32()[e], factor = cfg_.reliability_outlier_factor;
  int64_t nonfinite = 0, outlier = 0, good = 0;
  double norm_sum = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    double norm = std::sqrt(sq[i]);
    bad[i] = 0;
    if (!std::isfinite(norm)) {
      bad[i] = 1;
      ++nonfinite;
    } else if (ema > 0.f && norm > (double)factor * ema) {
      bad[i] = 1;
      ++outlier;
    } else {
      ++good;
      norm_sum += norm;
    }
  }
  st.nonfinite_rows += nonfinite;
  st.outlier_rows += outlier;
  if (training) {
    pend_rows_[e] += n;
    pend_bad_[e] += nonfinite + outlier;
    pend_good_[e] += good;
    pend_norm_[e] += norm_sum;
  }
  return nonfinite + outlier;
}

Tensor MoELayer::guard(int64_t e, const Tensor& y, const std::vector<double>& sq, bool training,
                       LayerRoutingStats& st) {
  const int64_t n = y.size(0);
  std::vector<char> bad((size_t)n, 0);
  if (guard_rows(e, sq.data(), n, training, st, bad.data()) == 0 || !cfg_.use_reliability) return y;
  std::vector<float> clean = y.to_f32_vector();
  for (int64_t i = 0; i < n; ++i)
    if (bad[i]) std::fill(clean.begin() + i * C, clean.begin() + (i + 1) * C, 0.f);
  return Tensor::from_vector(clean, {n, C}, y.device());
}

Tensor MoELayer::guard_experts(const Tensor& ys, const std::vector<int64_t>& offsets, bool training,
                               LayerRoutingStats& st, const ExpertCut& cut) {
  const int64_t S = ys.size(0);
  const std::vector<double> sq = row_sums_of_squares({ys})[0];  // one device round trip per layer
  std::vector<char> bad((size_t)S, 0);
  bool any_cut = false;
  for (int64_t e = 0; e < N; ++e) {
    const int64_t a = offsets[e], n = offsets[e + 1] - a;
    if (n == 0) continue;  // no rows (pruned experts always): nothing to judge
    const int64_t nbad = guard_rows(e, sq.data() + a, n, training, st, bad.data() + a);
    if (nbad > 0 && cfg_.use_reliability) (*cut)[e] = 1, any_cut = true;
  }
  if (!any_cut) return ys;
  // Rows of cut experts: a constant (bad rows zeroed, good rows their values) chosen by `where`, so no gradient
  // reaches them; grouped_linear's backward reads *cut and skips those experts entirely.
  std::vector<float> clean = ys.to_f32_vector();
  std::vector<int32_t> in_cut((size_t)S, 0);
  for (int64_t e = 0; e < N; ++e)
    if ((*cut)[e])
      for (int64_t i = offsets[e]; i < offsets[e + 1]; ++i) {
        in_cut[i] = 1;
        if (bad[i]) std::fill(clean.begin() + i * C, clean.begin() + (i + 1) * C, 0.f);
      }
  const Device dev = ys.device();
  return where(Tensor::from_vector(in_cut, {S, 1}, dev), Tensor::from_vector(clean, {S, C}, dev), ys);
}

Tensor MoELayer::experts_forward(const Tensor& xs, const DispatchPlan& plan, const ExpertCut& cut) const {
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
  Tensor h = grouped_linear(xs, w1, b1, offsets, cut, plan.offsets_dev, gemm_lists_[0]);  // [S, F]
  if (experts[0].kind == ExpertKind::SwiGLU)
    h = mul(silu(h), grouped_linear(xs, w3, b3, offsets, cut, plan.offsets_dev, gemm_lists_[2]));
  else
    h = gelu(h);
  return grouped_linear(h, w2, b2, offsets, cut, plan.offsets_dev, gemm_lists_[1]);  // [S, C]
}

MoELayer::Output MoELayer::forward(const Tensor& x, const Tensor* ids,
                                   const std::vector<int32_t>* labels, bool training) {
  CM_REQUIRE(x.dim() == 2 && x.size(1) == C, "FFN layer input must be [T, ", C, "], got ", shape_str(x.shape()));
  const int64_t T = x.size(0);
  Output out;
  LayerRoutingStats& st = out.stats;
  st.layer = layer;
  st.moe = moe;
  st.num_experts = N;
  st.expert_share.assign(N, 0.f);
  st.expert_rows.assign(N, 0);
  // A dense layer's host buffer may lag its device state by the steps since the last pull (model/health.h).
  st.reliability = moe ? layer_reliability() : reliability_.f32()[0];
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
    out.y = health_.guard(y, training, cfg_.use_reliability, cfg_.reliability_outlier_factor, health_buffers());
    st.expert_share[0] = T ? 1.f : 0.f;
    st.expert_rows[0] = T;
    out.expert.assign((size_t)T, 0);
    out.gate.assign((size_t)T, 1.f);
    out.keep.assign((size_t)T, 1);
    out.top1.assign((size_t)T, 0);
    util_[0] += (double)T;
    if (ids) count_specialization(Tensor(), *ids);
    return out;
  }

  // 1. Route.
  const auto route_t0 = std::chrono::steady_clock::now();
  Routing rt = router.route(x, routing_bias(x.device()), labels, training);
  st.routing_ms = std::chrono::duration<float, std::milli>(std::chrono::steady_clock::now() - route_t0).count();
  const int64_t S0 = T * K;
  out.lb_loss = rt.lb_loss;
  out.z_loss = rt.z_loss;
  out.div_loss = rt.div_loss;
  st.routing_flops = rt.flops;
  st.router_entropy = rt.entropy;  // (the layer's aux terms stay on the device: out.lb_loss, z_loss, div_loss)
  out.expert = rt.expert;
  out.top1.resize((size_t)T);
  for (int64_t t = 0; t < T; ++t) {
    int64_t best = 0;
    for (int64_t j = 1; j < K; ++j)
      if (rt.gate_value[t * K + j] > rt.gate_value[t * K + best]) best = j;
    out.top1[t] = rt.expert[t * K + best];
  }
  std::vector<int64_t> routed((size_t)N, 0);
  for (int64_t s = 0; s < S0; ++s) ++routed[rt.expert[s]];
  for (int64_t e = 0; e < N; ++e) {
    st.expert_share[e] = S0 ? (float)routed[e] / (float)S0 : 0.f;
    util_[e] += (double)routed[e];
  }
  if (training) {
    for (int64_t e = 0; e < N; ++e) pend_routed_[e] += routed[e];
    if (pend_level_counts_.empty()) pend_level_counts_ = rt.level_counts;
    else
      for (size_t l = 0; l < rt.level_counts.size(); ++l)
        for (size_t i = 0; i < rt.level_counts[l].size(); ++i) pend_level_counts_[l][i] += rt.level_counts[l][i];
  }

  // 2. The dispatch plan on the layer's device: a stable counting sort of the slots by expert.
  const Device dev = x.device();
  // The router's choices, i32 [T*K] on x's device (the group_limited gate selects on the host: one upload).
  Tensor expert = rt.expert_ids.defined() ? rt.expert_ids : Tensor::from_vector(rt.expert, {S0}, dev);
  if (ids) count_specialization(expert, *ids);  // the routed slots, before capacity
  DispatchPlan plan = make_dispatch_plan(expert, K, N, &rt.expert);  // rt.expert: the router's host copy

  // 3. Capacity (training only: evaluation and decoding are dropless, so a token's output never depends on the
  //    rest of the batch there). Each expert keeps its cap highest-gate slots; ties keep the earlier slot
  //    (kernels/capacity.h). Only when some expert is over capacity: filter, then plan the kept slots again.
  int64_t dropped = 0;
  out.keep.assign((size_t)S0, 1);
  if (training && cfg_.capacity_factor > 0.f) {
    const int64_t cap = (int64_t)std::ceil((double)cfg_.capacity_factor * (double)S0 / (double)N);
    bool over = false;
    for (int64_t e = 0; e < N; ++e) over = over || plan.offsets[e + 1] - plan.offsets[e] > cap;
    if (over) {
      expert = capacity_filter(expert, rt.gate, plan, cap);  // where the layer computes
      // The same filter on the router's host copies (the kernel's CPU twin: integer comparisons, the same ids) gives
      // the keep list and the new plan's offsets without a read-out.
      const Segments by_expert = counting_sort(rt.expert, N);  // the plan's assign_of and offsets, on the host
      std::vector<int32_t> kept((size_t)S0);
      cpu::capacity_filter(kept.data(), rt.expert.data(), rt.gate_value.data(), by_expert.order.data(),
                           by_expert.offsets.data(), S0, N, cap);
      plan = make_dispatch_plan(expert, K, N, &kept);
      dropped = S0 - plan.rows;
      for (int64_t s = 0; s < S0; ++s) out.keep[s] = kept[s] >= 0;
    }
  }
  st.dropped_fraction = S0 ? (float)dropped / (float)S0 : 0.f;
  out.gate = rt.gate_value;
  for (int64_t e = 0; e < N; ++e) st.expert_rows[e] = plan.offsets[e + 1] - plan.offsets[e];
  if (plan.rows == 0) {
    out.y = Tensor::zeros({T, C}, DType::F32, dev);
    return out;
  }

  // 4. Gather rows, run every expert on its rows (grouped), guard the outputs.
  Tensor xs = moe_permute(x, plan);  // [S, C] expert-contiguous
  ExpertCut cut = std::make_shared<std::vector<char>>((size_t)N, 0);
  Tensor ys = experts_forward(xs, plan, cut);  // [S, C]
  ys = guard_experts(ys, plan.offsets, training, st, cut);

  // 5. Combine: each token adds its slots' gated rows in slot order.
  Tensor y = moe_combine(ys, rt.gate, plan);  // [T, C]
  if (gate.w.defined()) y = mul(y, sigmoid(gate.forward(x)));  // adaptive gate [T, 1]
  out.y = y;
  return out;
}

// ---------------------------------------------------------------- after a step

void MoELayer::after_step() {
  const float decay = cfg_.reliability_decay, factor = cfg_.reliability_outlier_factor;
  if (!moe) {  // the dense layer's health update runs on its device (model/health.h)
    std::vector<Tensor> w = experts[0].tensors(), g;
    if (cfg_.use_reliability)
      for (const Tensor& p : w)
        if (p.grad().defined()) g.push_back(p.grad());
    health_.after_step(w, g, decay, factor, cfg_.reliability_min, cfg_.use_reliability);
    return;
  }
  const std::vector<double> sq = sums_of_squares(health_tensors());  // one copy back from a device
  after_step_from(sq.data());
}

// Every active expert's weights and (with reliability) their gradients, expert by expert: their sums of squares
// judge the experts after a step. nw [N], ng [N] (when given): how many weights and gradients each expert has there.
std::vector<Tensor> MoELayer::health_tensors(std::vector<size_t>* nw, std::vector<size_t>* ng) const {
  std::vector<Tensor> ts;
  if (nw) nw->assign((size_t)N, 0);
  if (ng) ng->assign((size_t)N, 0);
  for (int64_t e = 0; e < N; ++e) {
    if (pruned(e)) continue;
    const std::vector<Tensor> w = experts[e].tensors();
    ts.insert(ts.end(), w.begin(), w.end());
    if (nw) (*nw)[e] = w.size();
    if (cfg_.use_reliability)
      for (const Tensor& p : w)
        if (p.grad().defined()) {
          ts.push_back(p.grad());
          if (ng) ++(*ng)[e];
        }
  }
  return ts;
}

void MoELayer::after_step_from(const double* sq) {
  const float decay = cfg_.reliability_decay, factor = cfg_.reliability_outlier_factor;
  float* rel = reliability_.f32();
  float* ema = norm_ema_.f32();
  float* wema = wnorm_ema_.f32();
  float* use = usage_ema_.f32();
  int64_t total = 0;
  for (int64_t e = 0; e < N; ++e) total += pend_routed_[e];

  // sq: the sums of squares of health_tensors() (a sum is non-finite exactly when its tensor is).
  std::vector<size_t> nw, ng;
  health_tensors(&nw, &ng);
  std::vector<size_t> first((size_t)N + 1, 0);  // expert e's weights at [first[e], first[e] + nw[e]), grads after
  for (int64_t e = 0; e < N; ++e) first[e + 1] = first[e] + nw[e] + ng[e];

  for (int64_t e = 0; e < N; ++e) {
    if (pruned(e)) continue;
    // Weights: finite, and their norm within [1/factor, factor] x its running value (training moves it slowly;
    // a corrupted expert jumps). The statistics only follow healthy values, so a fault cannot drag them along.
    double wss = 0.0, gss = 0.0;
    for (size_t i = first[e]; i < first[e] + nw[e]; ++i) wss += sq[i];
    for (size_t i = first[e] + nw[e]; i < first[e + 1]; ++i) gss += sq[i];
    const double wn = std::sqrt(wss);
    bool weights_ok = std::isfinite(wn) && (wema[e] <= 0.f || (wn <= (double)factor * wema[e] &&
                                                               wn >= (double)wema[e] / factor));
    if (weights_ok) wema[e] = wema[e] > 0.f ? decay * wema[e] + (1.f - decay) * (float)wn : (float)wn;
    // Output-norm statistics from steps whose rows were all healthy.
    if (pend_good_[e] > 0 && pend_bad_[e] == 0) {
      float mean = (float)(pend_norm_[e] / (double)pend_good_[e]);
      ema[e] = ema[e] > 0.f ? decay * ema[e] + (1.f - decay) * mean : mean;
    }
    if (!cfg_.use_reliability) continue;
    // Health in [0, 1]: 0 for bad weights or non-finite gradients; else the share of healthy output rows; no
    // evidence (no rows this step) leaves the reliability where it is.
    const bool grads_ok = std::isfinite(gss);
    float health;
    if (!weights_ok || !grads_ok) health = 0.f;
    else if (pend_rows_[e] > 0) health = 1.f - (float)pend_bad_[e] / (float)pend_rows_[e];
    else continue;
    rel[e] = std::clamp(decay * rel[e] + (1.f - decay) * health, cfg_.reliability_min, 1.f);
  }
  if (total > 0)
    for (int64_t e = 0; e < N; ++e) use[e] = decay * use[e] + (1.f - decay) * (float)pend_routed_[e] / (float)total;

  if (moe && cfg_.aux_free_bias && !pend_level_counts_.empty())
    router.update_aux_bias(pend_level_counts_, cfg_.aux_free_bias_rate);

  if (moe && cfg_.enable_expert_pruning && total > 0) {
    float* low = low_steps_.f32();
    for (int64_t e = 0; e < N; ++e) {
      if (pruned(e)) continue;
      bool is_low = (float)pend_routed_[e] / (float)total < cfg_.pruning_threshold ||
                    (cfg_.use_reliability && rel[e] < 0.1f);
      low[e] = is_low ? low[e] + 1.f : 0.f;
      if (low[e] >= (float)cfg_.pruning_window && can_prune(e)) prune(e);
    }
  }

  std::fill(pend_routed_.begin(), pend_routed_.end(), 0);
  std::fill(pend_rows_.begin(), pend_rows_.end(), 0);
  std::fill(pend_bad_.begin(), pend_bad_.end(), 0);
  std::fill(pend_good_.begin(), pend_good_.end(), 0);
  std::fill(pend_norm_.begin(), pend_norm_.end(), 0.0);
  pend_level_counts_.clear();
}

// ---------------------------------------------------------------- metrics

std::vector<double> MoELayer::utilization() const {
  double s = 0.0;
  for (double v : util_) s += v;
  std::vector<double> r((size_t)N, 0.0);
  for (int64_t e = 0; e < N; ++e) r[e] = s > 0.0 ? util_[e] / s : 0.0;
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
  spec_ = Tensor();  // zeros again at the next count
}

// ---------------------------------------------------------------- pruning

int64_t MoELayer::active_experts() const {
  int64_t n = 0;
  for (int64_t e = 0; e < N; ++e) n += !pruned(e);
  return n;
}

// An expert may go only if its parent keeps at least top_k active children (so every node can still select).
bool MoELayer::can_prune(int64_t e) const {
  if (!moe || pruned(e)) return false;
  const int64_t b = router.branching.back(), k = router.top_k.back(), parent = e / b;
  int64_t active = 0;
  for (int64_t c = 0; c < b; ++c) active += !pruned(parent * b + c);
  return active - 1 >= k;
}

void MoELayer::prune(int64_t e) {
  CM_REQUIRE(e >= 0 && e < N, "expert ", e, " outside [0, ", N, ") in layer ", layer);
  CM_REQUIRE(can_prune(e), "layer ", layer, " expert ", e,
             moe ? ": pruning it would leave its parent fewer active children than top_k" : ": a dense layer");
  pruned_.f32()[e] = 1.f;
}

}  // namespace cm
