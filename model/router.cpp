// The tree router: per-level sparse evaluation of the kept nodes, selection, gates, and the routing losses.
#include "model/router.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "autograd/ops_moe.h"
#include "autograd/ops_route.h"
#include "engine/dispatch.h"
#include "engine/host_sync.h"
#include "kernels/route.h"
#include "model/stats.h"

namespace cm {

Segments counting_sort(const std::vector<int32_t>& ids, int64_t n) {
  Segments s;
  s.offsets.assign((size_t)n + 1, 0);
  for (int32_t id : ids) {
    CM_CHECK(id >= 0 && id < n, "id ", id, " outside [0, ", n, ")");
    ++s.offsets[(size_t)id + 1];
  }
  for (int64_t j = 0; j < n; ++j) s.offsets[j + 1] += s.offsets[j];  // exclusive scan
  std::vector<int64_t> next(s.offsets.begin(), s.offsets.end() - 1);
  s.order.resize(ids.size());
  for (size_t i = 0; i < ids.size(); ++i) s.order[(size_t)next[ids[i]]++] = (int32_t)i;
  return s;
}

int64_t routing_flops_per_token(int64_t C, const std::vector<int64_t>& branching, const std::vector<int64_t>& top_k) {
  int64_t flops = 0, kept = 1;
  for (size_t l = 0; l < branching.size(); ++l) {
    flops += kept * branching[l] * 2 * C;
    kept *= top_k[l];
  }
  return flops;
}

RouterBias router_bias_over(const TreeRouter& r, const Tensor& all) {
  RouterBias rb;
  rb.all = all;
  int64_t off = 0;
  for (int64_t l = 0; l < r.depth(); ++l) {
    const int64_t n = r.nodes[l] * r.branching[l];
    rb.level.push_back(all.slice(0, off, off + n));
    off += n;
  }
  CM_CHECK(all.dim() == 1 && all.numel() == off, "router bias ", shape_str(all.shape()), " for ", off,
           " children in all levels");
  return rb;
}

RouterBias router_bias_from_host(const TreeRouter& r, const std::vector<std::vector<float>>& levels, Device dev) {
  std::vector<float> all;
  for (int64_t l = 0; l < r.depth(); ++l) {
    const size_t n = (size_t)(r.nodes[l] * r.branching[l]);
    const bool given = l < (int64_t)levels.size() && !levels[l].empty();
    CM_REQUIRE(!given || levels[l].size() == n, "router bias level ", l, ": ", levels[l].size(), " values for ", n,
               " children");
    if (given) all.insert(all.end(), levels[l].begin(), levels[l].end());
    else all.insert(all.end(), n, 0.f);
  }
  return router_bias_over(r, Tensor::from_vector(all, {(int64_t)all.size()}, dev));
}

// The labels grouped for kernels/route.h ac_scales_forward (a stable counting sort; the labels checked here).
static Segments group_labels(const std::vector<int32_t>& labels, int64_t T, int64_t N) {
  CM_CHECK((int64_t)labels.size() == T, "labels ", labels.size(), " for ", T, " tokens");
  for (int32_t k : labels) CM_CHECK(k >= 0 && k < N, "label ", k, " outside [0, ", N, ")");
  return counting_sort(labels, N);
}

std::vector<float> ac_scales(const Tensor& h, const std::vector<int32_t>& labels, int64_t N,
                             std::vector<bool>* has_tokens) {
  const int64_t T = h.size(0), C = h.size(1);
  const Segments g = group_labels(labels, T, N);
  const std::vector<float> hv = h.to_f32_vector();  // [T, C]
  std::vector<float> m((size_t)(N * C));
  std::vector<int32_t> has((size_t)N);
  std::vector<double> w((size_t)(N * C + N + C + 2));
  cpu::ac_scales_forward(m.data(), has.data(), nullptr, w.data(), hv.data(), g.order.data(), g.offsets.data(), N, C);
  if (has_tokens) has_tokens->assign(has.begin(), has.end());
  return m;
}

TreeRouter::TreeRouter(const CoEConfig& cfg, Generator& gen) {
  branching = cfg.branching();
  top_k = cfg.top_k();
  C_ = cfg.d_model;
  N_ = cfg.num_experts();
  temperature_ = cfg.routing_temperature;
  gate_mode_ = cfg.gate_mode;
  lb_w_ = cfg.load_balancing_weight;
  z_w_ = cfg.router_z_loss_weight;
  div_w_ = cfg.diversity_weight;
  aux_free_ = cfg.aux_free_bias;
  ac_scaling_ = cfg.ac_scaling;
  int64_t n = 1;
  bool any_ac = false;
  for (int64_t l = 0; l < depth(); ++l) {
    nodes.push_back(n);
    weights.push_back(normal_param({n * branching[l], C_}, cfg.init_std, gen));
    aux_bias.push_back(Tensor::zeros({n * branching[l]}));
    aux_mirror_.emplace_back();
    ac_level_.push_back(cfg.level_uses_ac(l));
    any_ac = any_ac || ac_level_.back();
    n *= branching[l];
  }
  if (any_ac) ac_scale = Tensor::ones({N_, C_});
}

void TreeRouter::collect(const std::string& prefix, NamedParams& out) const {
  for (int64_t l = 0; l < depth(); ++l) out.emplace_back(prefix + ".levels." + std::to_string(l) + ".weight", weights[l]);
}

void TreeRouter::pull_buffers() const {
  if (ac_scale.defined()) ac_mirror_.pull(ac_scale);
  for (int64_t l = 0; l < depth(); ++l) aux_mirror_[l].pull(aux_bias[l]);
}

void TreeRouter::collect_buffers(const std::string& prefix, NamedParams& out) const {
  pull_buffers();  // the caller may read them (a checkpoint): the host holds the device's values now
  for (int64_t l = 0; l < depth(); ++l)
    out.emplace_back(prefix + ".levels." + std::to_string(l) + ".aux_bias", aux_bias[l]);
  if (ac_scale.defined()) out.emplace_back(prefix + ".ac_scale", ac_scale);
}

void TreeRouter::add_aux_load(const Routing& r) {
  CM_CHECK((int64_t)r.level_counts_dev.size() == depth(), "add_aux_load: ", r.level_counts_dev.size(),
           " levels of counts for ", depth());
  aux_load_.resize((size_t)depth());
  for (int64_t l = 0; l < depth(); ++l) add_counts(aux_load_[l], r.level_counts_dev[l], nodes[l] * branching[l]);
}

void TreeRouter::update_aux_bias(float rate) {
  if (aux_load_.empty()) return;  // no training forward yet: no load, nothing moves (add_aux_load fills every level)
  const Device dev = aux_load_[0].device();
  for (int64_t l = 0; l < depth(); ++l)
    CM_KERNEL(dev, route_aux_bias_update, aux_running(l, dev).f32(), static_cast<int64_t*>(aux_load_[l].raw()),
              nodes[l], branching[l], rate);
}

// Rows of W [R, C] scaled to unit length (AC: e_j / ||e_j||; diversity: cosine similarity).
static Tensor unit_rows(const Tensor& W) { return div(W, sqrt(add(sum(square(W), -1, true), 1e-12f))); }

// Load balance at one level (DESIGN.md 4.3), unweighted: router_balance_loss (kernels/losses.h) over the pairs
// [P] grouped by their node, each parent's term b' * sum_c f_c P_c with b' = 1 / q_c, q the target share of each
// child, token-weighted over parents. The counts f come from the selection idx [P, k] where it lives (on the
// device in a CUDA build), not from host bookkeeping. Targets are proportional to the children's reliability (exp of
// the logit bias; pruned children: 0, and they take no part), so a degraded child is balanced towards a share in
// proportion to its reliability instead of being pushed back to 1/b. All healthy (no bias, or all zero): q = 1/b,
// and this is b * sum f P, the Switch loss, whose balanced value is 1. The kernel makes that decision and the
// shares from the bias where it is: the host never reads it.
// probs [P, b]; idx i32 [P, k]; node i32 [P] (undefined when n_nodes == 1); lbias [n_nodes * b] or undefined.
static Tensor balance_term(const Tensor& probs, const Tensor& idx, const Tensor& node, int64_t n_nodes,
                           const Tensor& lbias) {
  return router_balance_loss(probs, idx, node, n_nodes, lbias, 1.f);
}

Routing TreeRouter::route(const Tensor& h, const RouterBias& bias, const Tensor* labels,
                          bool training, bool read_out) {
  CM_REQUIRE(h.dim() == 2 && h.size(1) == C_, "router input must be [T, ", C_, "], got ", shape_str(h.shape()));
  const int64_t T = h.size(0), D = depth();
  const Device dev = h.device();  // parameters, activations and the routing's bookkeeping
  if (bias.defined()) {
    CM_CHECK((int64_t)bias.level.size() == D, "router bias with ", bias.level.size(), " levels for ", D);
    for (int64_t l = 0; l < D; ++l)
      CM_CHECK(bias.level[l].numel() == nodes[l] * branching[l] && bias.level[l].device() == dev, "router bias level ",
               l, ": ", shape_str(bias.level[l].shape()), " on ", device_name(bias.level[l].device()), " for ",
               nodes[l] * branching[l], " children on ", device_name(dev));
  }
  Routing r;
  r.T = T;

  // AC input m_{label} * h (one m for the layer, shared by its AC levels): in training this batch's m, made on h's
  // device, whose EMA the running m follows there; in evaluation the running m.
  Tensor h_ac = h;
  if (ac_scale.defined() && labels && ac_scaling_) {
    const Tensor run = ac_running(dev);  // [N, C]
    Tensor mt = run;
    CM_REQUIRE(labels->dtype() == DType::I32 && labels->numel() == T && labels->device() == dev, "AC labels ",
               shape_str(labels->shape()), " for ", T, " tokens on ", device_name(dev));
    const Tensor lab = labels->contiguous();
    if (training) {
      // The labels grouped where they are: a stable counting sort (the dispatch plan's kernels, one label per
      // token), whose order and offsets ac_scales_forward reads. An out-of-range label is an error found there.
      const DispatchPlan g = make_dispatch_plan_nowait(lab, 1, N_);
      const Tensor hc = h.detach().contiguous();
      mt = Tensor::empty({N_, C_}, DType::F32, dev);
      Tensor has = Tensor::empty({N_}, DType::I32, dev);
      Tensor w = Tensor::empty({2 * (N_ * C_ + N_ + C_ + 2)}, DType::F32, dev);  // the doubles' scratch
      CM_KERNEL(dev, ac_scales_forward, mt.f32(), has.i32(), run.f32(), static_cast<double*>(w.raw()), hc.f32(),
                g.assign_of.i32(), g.offsets_ptr(), N_, C_);
    }
    h_ac = mul(h, index_select(mt, 0, lab));  // [T, C]
  }

  if (gate_mode_ == GateMode::GroupLimited) return route_grouped(ac_level_[D - 1] ? h_ac : h, bias, read_out);

  // The (token, node) pairs alive at the current level, token-major with a fixed fan-out: pair p is token p / (P / T).
  // Everything per pair stays on h's device; the host reads the results once, at the end (read_out below).
  Tensor node;  // [P] i32, the pair's node at this level (undefined at the root: one node)
  Tensor path;  // [P] product of conditionals so far (undefined at the root)
  int64_t P = T;
  std::vector<Tensor> lb_terms, z_terms;
  r.level_counts_dev.resize((size_t)D);

  for (int64_t l = 0; l < D; ++l) {
    const int64_t b = branching[l], k = top_k[l], n_nodes = nodes[l];
    Tensor W = ac_level_[l] ? unit_rows(weights[l]) : weights[l];  // [n_nodes * b, C]
    Tensor hin = ac_level_[l] ? h_ac : h;                         // [T, C]

    // ---- logits [P, b]: each pair against its own node's router only, one kernel (autograd/ops_route.h).
    CM_CHECK(n_nodes > 1 || P == T, "one node at level ", l, " but ", P, " pairs");
    Tensor logits = routed_logits(hin, W, node, b);
    r.flops += 2 * P * b * C_;
    if (z_w_ > 0.f) z_terms.push_back(router_z_loss(logits, 1.f));

    // ---- one fused selection: probs [P, b] = softmax(logits / temperature + log r (-inf: pruned)); the k best
    // of probs + aux-free bias per pair (no gradient); path [P * k] = path * gate; the next level's nodes.
    // The logit bias as it is, on the device (all zeros for a healthy model: adding 0.0f changes no bit).
    const Tensor lb_t = bias.defined() ? bias.level[l] : Tensor();  // [n_nodes * b]
    Tensor ab_t;
    if (aux_free_) ab_t = aux_running(l, dev);
    // renorm_last: the last level's kept siblings share 1 (only when k > 1: a lone child's share would be 1).
    const bool renorm = gate_mode_ == GateMode::RenormLast && l == D - 1 && k > 1;
    // Whether the balance term below differentiates probs too (ops_route.h: else the gates' gradient goes straight
    // to the logits).
    LevelSelection sel = route_select(logits, node, path, lb_t, ab_t, n_nodes, temperature_, k, renorm,
                                      l == 0 && entropy_, lb_w_ > 0.f);
    if (l == 0) r.entropy_dev = sel.entropy;
    // How often each child was selected: a histogram of the child ids, on the device.
    r.level_counts_dev[l] = Tensor::empty({n_nodes * b}, DType::I32, dev);
    CM_KERNEL(dev, route_histogram, r.level_counts_dev[l].i32(), sel.child.i32(), P * k, n_nodes * b, false);
    // ---- load balance at this level (balance_term), on the selection where it is.
    if (lb_w_ > 0.f) lb_terms.push_back(balance_term(sel.probs, sel.idx, node, n_nodes, lb_t));

    // ---- descend: pairs (t, node) -> (t, node * b + child), token-major.
    path = sel.path;
    node = sel.child;
    P *= k;
  }

  r.K = P / T;
  r.expert_ids = node;
  r.gate = path;
  if (gate_mode_ == GateMode::RenormPath && r.K > 1)
    r.gate = div(path.view({T, r.K}), sum(path.view({T, r.K}), 1, true)).view({P});

  // ---- the host read-out, one copy and one wait for the whole call, when the caller needs host values (moe.cpp:
  // evaluation only). A training step asks for none: then route() reads nothing. (The routing losses need no host
  // values: they run on the loss kernels.)
  if (read_out) read_host(r, dev);
  finish(r, lb_terms, z_terms, dev);
  return r;
}

// Routing's host fields from its device tensors: one packed copy and one wait (read_out_words).
void TreeRouter::read_host(Routing& r, Device dev) const {
  const int64_t D = depth();
  std::vector<Tensor> want = {r.expert_ids, r.gate, r.entropy_dev};
  for (int64_t l = 0; l < D; ++l) want.push_back(r.level_counts_dev[l]);
  std::vector<std::vector<int32_t>> got = read_out_words(want, dev);
  r.expert = got[0];
  r.gate_value.resize(got[1].size());
  std::memcpy(r.gate_value.data(), got[1].data(), got[1].size() * 4);
  r.entropy = std::numeric_limits<float>::quiet_NaN();  // not computed (set_entropy(false))
  if (!got[2].empty()) std::memcpy(&r.entropy, got[2].data(), 4);
  r.level_counts.resize((size_t)D);
  for (int64_t l = 0; l < D; ++l) r.level_counts[l].assign(got[(size_t)(3 + l)].begin(), got[(size_t)(3 + l)].end());
}

// group_limited (DeepSeek-V2/V3 group-limited routing on our tree): one softmax over all N leaves from the last
// level's weights [N, C] (its rows are the leaves in order), probs [T, N]. The levels then only select: at level l
// a kept node's child scores the total probability of the leaves under it (+ aux-free bias; the leaves of a
// child are contiguous), and the top_k[l] children stay (kernels/route.h route_group_select, on the device). A
// leaf's gate is its probability under the one softmax, not renormalised over the token's K leaves. The upper
// levels' weights take no part (their gradient is zero); routing costs 2 N C FLOPs per token, as a flat router.
// h [T, C]: already AC-transformed when the last level is. read_out: as route().
Routing TreeRouter::route_grouped(const Tensor& h, const RouterBias& bias, bool read_out) {
  const int64_t T = h.size(0), D = depth(), L = D - 1;
  const Device dev = h.device();
  Routing r;
  r.T = T;
  std::vector<Tensor> lb_terms, z_terms;

  Tensor W = ac_level_[L] ? unit_rows(weights[L]) : weights[L];  // [N, C]
  Tensor logits = matmul(h, W, false, true);                     // [T, N]
  r.flops = 2 * T * N_ * C_;
  if (z_w_ > 0.f) z_terms.push_back(router_z_loss(logits, 1.f));
  Tensor s = temperature_ != 1.f ? mul(logits, 1.f / temperature_) : logits;
  const Tensor leaf_bias = bias.defined() ? bias.level[L] : Tensor();  // [N]: log reliability, -inf for pruned leaves
  if (leaf_bias.defined()) s = add(s, leaf_bias.view({1, N_}));  // on the device; + 0.0f changes no bit
  s = s.contiguous();
  Tensor probs = softmax(s);  // [T, N]
  if (entropy_) {
    r.entropy_dev = Tensor::empty({}, DType::F32, dev);  // of the one N-way distribution
    CM_KERNEL(dev, route_mean_entropy, r.entropy_dev.f32(), probs.f32(), s.f32(), T, N_);
  }

  // Selection, level by level, on the leaves' probability mass (no gradient), where probs are: every level's kept
  // children in one buffer, level l's block [T * K_l] at T * (K_0 + .. + K_{l-1}) (K_l = top_k[0] * .. * top_k[l]),
  // the last block the experts. The pruned children (-inf in the logit bias) are never kept.
  std::vector<int64_t> block_at, kept;  // [D] each level's block offset (in units of T) and K_l
  int64_t K = 1, total = 0;
  for (int64_t l = 0; l < D; ++l) {
    K *= top_k[l];
    block_at.push_back(total);
    kept.push_back(K);
    total += K;
  }
  Tensor ab;  // aux-free bias, every level's concatenated (from the working copies on the device)
  if (aux_free_) {
    std::vector<Tensor> parts;
    for (int64_t l = 0; l < D; ++l) parts.push_back(aux_running(l, dev));
    ab = D == 1 ? parts[0].contiguous() : concat(parts, 0);
  }
  const Tensor lb = bias.defined() ? bias.all.contiguous() : Tensor();
  Tensor ids = Tensor::empty({T * total}, DType::I32, dev);
  CM_KERNEL(dev, route_group_select, ids.i32(), probs.f32(), ab.defined() ? ab.f32() : nullptr,
            lb.defined() ? lb.f32() : nullptr, branching.data(), top_k.data(), D, T);
  // How often each child was selected: a histogram of each level's block.
  for (int64_t l = 0; l < D; ++l) {
    r.level_counts_dev.push_back(Tensor::empty({nodes[l] * branching[l]}, DType::I32, dev));
    CM_KERNEL(dev, route_histogram, r.level_counts_dev[l].i32(), ids.i32() + T * block_at[l], T * kept[l],
              nodes[l] * branching[l], false);
  }
  r.K = K;
  r.expert_ids = ids.slice(0, T * block_at[L], T * (block_at[L] + K));  // [T*K] token-major: slot t*K + j
  r.gate = gather(probs, 1, r.expert_ids.view({T, K})).view({T * K});
  // Load balance over the leaves as one flat level (the upper levels have no probabilities of their own).
  if (lb_w_ > 0.f)
    lb_terms.push_back(balance_term(probs, r.expert_ids.view({T, K}), Tensor(), 1, leaf_bias));
  if (read_out) read_host(r, dev);
  finish(r, lb_terms, z_terms, dev);
  return r;
}

// The weighted routing losses (diversity: siblings at each level whose router is used).
void TreeRouter::finish(Routing& r, const std::vector<Tensor>& lb_terms, const std::vector<Tensor>& z_terms,
                        Device dev) const {
  const int64_t D = depth();

  auto mean_of = [](const std::vector<Tensor>& xs, float w) {
    Tensor acc = xs[0];
    for (size_t i = 1; i < xs.size(); ++i) acc = add(acc, xs[i]);
    return mul(acc, w / (float)xs.size());
  };
  if (!lb_terms.empty()) r.lb_loss = mean_of(lb_terms, lb_w_);
  if (!z_terms.empty()) r.z_loss = mean_of(z_terms, z_w_);
  if (div_w_ > 0.f) {
    std::vector<Tensor> terms;
    for (int64_t l = gate_mode_ == GateMode::GroupLimited ? D - 1 : 0; l < D; ++l) {
      const int64_t b = branching[l], n = nodes[l];
      if (b < 2) continue;
      Tensor Wn = unit_rows(weights[l]).view({n, b, C_});
      Tensor G = matmul(Wn, Wn, false, true);  // [n, b, b] cosine similarities of siblings
      // The off-diagonal mask [b, b] made on the device, no upload: rows [0, 1, .., 1] of [b, b + 1], read flat,
      // put the zeros at i * (b + 1) = i * b + i, the diagonal of the first b * b entries.
      Tensor off = concat({Tensor::zeros({b, 1}, DType::F32, dev), Tensor::ones({b, b}, DType::F32, dev)}, 1)
                       .view({b * (b + 1)})
                       .slice(0, 0, b * b)
                       .view({b, b});
      terms.push_back(mul(sum(mul(square(G), off)), 1.f / (float)(n * b * (b - 1))));
    }
    if (!terms.empty()) r.div_loss = mean_of(terms, div_w_);
  }
}

}  // namespace cm
