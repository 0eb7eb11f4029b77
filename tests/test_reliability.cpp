// Reliability (DESIGN.md 4.5): the fault guard, reliability-aware routing, the hierarchy, and fault injection
// during a short training run on tinyshakespeare (NaN weights, and x100 weights), with and without reliability.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <set>
#include <sstream>

#include "model/coe.h"
#include "model/moe.h"
#include "model/optim.h"
#include "tests/bias_ref.h"
#include "tests/corpus.h"
#include "tests/helpers.h"

using namespace cm;
using cm::test::uniform;

namespace {

Tensor buffer(const ClusterMoELM& m, const std::string& name) {
  for (auto& [n, t] : m.named_buffers())
    if (n == name) return t;
  FAIL("no buffer ", name);
  return Tensor();
}

// ---------------------------------------------------------------- data: real text, characters as tokens

struct CharData {
  std::vector<int32_t> ids;
  int64_t vocab = 0;
  int64_t n_train = 0;  // first 90% train, the rest held out
};

// tinyshakespeare when the machine has it, else the generated play (tests/corpus.h): the thresholds below hold
// on both (checked with CM_TEST_CORPUS=generated).
const CharData& shakespeare() {
  static CharData d = [] {
    CharData r;
    const std::string& text = cm::test::test_text().bytes;
    std::set<unsigned char> cs(text.begin(), text.end());
    int32_t map[256] = {0};
    int32_t n = 0;
    for (unsigned char c : cs) map[c] = n++;
    r.vocab = n;
    for (unsigned char c : text) r.ids.push_back(map[c]);
    r.n_train = (int64_t)r.ids.size() * 9 / 10;
    return r;
  }();
  REQUIRE(d.n_train > 100000);
  return d;
}

// Batch of B windows of T tokens (inputs, next-token targets), from the train split at positions drawn from a
// counter-based stream: the same batches for every run with the same step.
std::pair<Tensor, Tensor> train_batch(const CharData& d, int64_t step, int64_t B, int64_t T) {
  std::vector<int32_t> x, y;
  for (int64_t b = 0; b < B; ++b) {
    int64_t o = (int64_t)(philox_uniform(7, (uint64_t)step, (uint64_t)b) * (float)(d.n_train - T - 1));
    x.insert(x.end(), d.ids.begin() + o, d.ids.begin() + o + T);
    y.insert(y.end(), d.ids.begin() + o + 1, d.ids.begin() + o + T + 1);
  }
  return {Tensor::from_vector(x, {B, T}), Tensor::from_vector(y, {B, T})};
}

std::pair<Tensor, Tensor> heldout_batch(const CharData& d, int64_t B, int64_t T) {
  std::vector<int32_t> x, y;
  for (int64_t b = 0; b < B; ++b) {
    int64_t o = d.n_train + b * 997;
    x.insert(x.end(), d.ids.begin() + o, d.ids.begin() + o + T);
    y.insert(y.end(), d.ids.begin() + o + 1, d.ids.begin() + o + T + 1);
  }
  return {Tensor::from_vector(x, {B, T}), Tensor::from_vector(y, {B, T})};
}

CoEConfig tiny_lm(int64_t vocab, bool reliability) {
  CoEConfig c;
  c.d_model = 32;
  c.n_layers = 2;
  c.n_heads = 2;
  c.d_ff = 64;
  c.vocab_size = vocab;
  c.seq_len = 32;
  c.num_clusters = 2;
  c.experts_per_cluster = 2;
  c.top_k_clusters = 2;
  c.top_k_experts = 1;
  c.use_reliability = reliability;
  c.validate();
  return c;
}

// A model + optimizer that can be forked: the state (parameters, buffers, moments, steps) is copied into a
// fresh pair with another config (what a checkpoint round trip does).
struct Trainer {
  std::unique_ptr<ClusterMoELM> model;
  std::unique_ptr<AdamW> opt;
  int64_t step = 0;
  std::vector<float> losses;
  explicit Trainer(const CoEConfig& c) : model(create_coe_model(c)) {
    AdamWOptions o;
    o.weight_decay = 0.f;
    opt = std::make_unique<AdamW>(model->named_parameters(), o);
  }
  Trainer(const CoEConfig& c, const Trainer& from) : Trainer(c) {
    auto copy = [](const NamedTensors& dst, const NamedTensors& src) {
      REQUIRE(dst.size() == src.size());
      for (size_t i = 0; i < dst.size(); ++i) {
        REQUIRE(dst[i].first == src[i].first);
        Tensor t = dst[i].second;
        t.copy_(src[i].second);
      }
    };
    copy(model->named_parameters(), from.model->named_parameters());
    copy(model->named_buffers(), from.model->named_buffers());
    copy(opt->state(), from.opt->state());
    opt->set_step_count(from.opt->step_count());
    step = from.step;
  }
  // One step; returns the forward's stats of layer 0.
  LayerRoutingStats train_step(const CharData& d, int64_t total_steps) {
    auto [x, y] = train_batch(d, step, 8, 32);
    CoEOutput o = model->forward(x, y);
    losses.push_back(o.loss.item());
    o.total_loss.backward();
    clip_grad_norm(model->named_parameters(), 1.0f);
    opt->step(lr_at(step, LRSchedule{3e-3f, 3e-4f, 20, total_steps}));
    model->after_step();
    opt->zero_grad();
    ++step;
    o.layers[0].read();  // a training forward's statistics stay on the device until read
    return o.layers[0];
  }
  float heldout_loss(const CharData& d) {
    NoGrad ng;
    model->eval();
    auto [x, y] = heldout_batch(d, 16, 32);
    float l = model->forward(x, y).loss.item();
    model->train();
    return l;
  }
};

enum class Fault { NaN, Times100 };

void inject(ClusterMoELM& m, int64_t layer, int64_t expert, Fault f) {
  NoGrad ng;
  for (auto& [name, p] : m.expert_parameters(layer, expert)) {
    float* d = p.f32();
    for (int64_t i = 0; i < p.numel(); ++i) d[i] = f == Fault::NaN ? NAN : d[i] * 100.f;
  }
}

}  // namespace

TEST_SUITE("reliability") {
  TEST_CASE("after_step judges the gradients: a non-finite one makes its expert unhealthy") {
    // What an overflow in backward leaves behind. after_step runs before zero_grad (trainer.cpp), so it sees it.
    ClusterMoELM m(tiny_lm(13, true));
    std::vector<int32_t> v(4 * 16);
    for (size_t i = 0; i < v.size(); ++i) v[i] = (int32_t)((i * 7 + 3) % 13);
    Tensor ids = Tensor::from_vector(v, {4, 16});
    m.forward(ids, ids).total_loss.backward();
    Tensor w = m.expert_parameters(0, 1)[0].second;
    w.set_grad(Tensor::full(w.shape(), NAN));
    m.after_step();
    auto r = m.get_reliability_stats();
    CHECK(r.at("layer_0_cluster_0_expert_1_reliability") == doctest::Approx(0.9f));  // decay 0.9, health 0
    CHECK(r.at("layer_0_cluster_0_expert_0_reliability") == 1.f);
    CHECK(r.at("layer_1_cluster_0_expert_1_reliability") == 1.f);
  }

  TEST_CASE("the fault guard zeroes non-finite expert rows, reports them, and keeps every gradient finite") {
    CoEConfig c;
    c.d_model = 6;
    c.n_heads = 1;
    c.d_ff = 8;
    c.router = RouterKind::Flat;
    c.num_clusters = 1;
    c.experts_per_cluster = 3;
    c.top_k_clusters = 1;
    c.top_k_experts = 2;
    for (bool on : {true, false}) {
      c.use_reliability = on;
      Generator gen(81);
      MoELayer layer(c, 0, true, gen);
      layer.experts[1].w1.w.fill_(NAN);
      Tensor x = uniform({12, 6}, 82);
      x.requires_grad_(true);
      MoELayer::Output o = layer.forward(x, nullptr, nullptr, true);
      o.read();  // a training step leaves its routing on the device
      const int64_t to_faulty = std::count(o.expert.begin(), o.expert.end(), 1);
      REQUIRE(to_faulty > 0);
      o.stats.read();
      CHECK(o.stats.nonfinite_rows == to_faulty);
      std::vector<float> y = o.y.to_f32_vector();
      bool finite = std::all_of(y.begin(), y.end(), [](float v) { return std::isfinite(v); });
      CHECK(finite == on);  // without reliability the layer is a plain MoE: NaN goes through
      if (!on) continue;
      // The faulty expert's rows count 0: the output is the others' gate-weighted rows.
      std::vector<float> ref((size_t)(12 * 6), 0.f), xv = x.to_f32_vector();
      for (int64_t s = 0; s < 24; ++s) {
        if (o.expert[s] == 1) continue;
        Tensor ye = layer.experts[o.expert[s]].forward(x.slice(0, s / 2, s / 2 + 1).detach());
        for (int64_t q = 0; q < 6; ++q) ref[(s / 2) * 6 + q] += o.gate[s] * ye.to_f32_vector()[q];
      }
      CHECK_CLOSE(o.y, ref, 1e-6f, 1e-5f);
      sum(o.y).backward();
      for (const Tensor& t : {x, layer.router.weights[0], layer.experts[0].w1.w, layer.experts[2].w2.w}) {
        std::vector<float> g = t.grad().to_f32_vector();
        CHECK(std::all_of(g.begin(), g.end(), [](float v) { return std::isfinite(v); }));
      }
      for (float v : layer.experts[1].w1.w.grad().to_f32_vector()) CHECK(v == 0.f);  // cut: a zero gradient
    }
  }

  TEST_CASE("outlier rows (norm far above the expert's running mean) are caught and zeroed") {
    CoEConfig c;
    c.d_model = 6;
    c.n_heads = 1;
    c.d_ff = 8;
    c.router = RouterKind::Flat;
    c.num_clusters = 1;
    c.experts_per_cluster = 2;
    c.top_k_clusters = 1;
    c.top_k_experts = 2;
    Generator gen(83);
    MoELayer layer(c, 0, true, gen);
    Tensor x = uniform({10, 6}, 84);
    layer.forward(x, nullptr, nullptr, true);
    layer.after_step();  // running statistics from a healthy step
    MoELayer::Output ok = layer.forward(x, nullptr, nullptr, true);
    ok.stats.read();
    CHECK(ok.stats.outlier_rows == 0);
    for (Tensor t : layer.experts[0].tensors()) t.copy_(mul(t, 100.f));
    MoELayer::Output o = layer.forward(x, nullptr, nullptr, true);
    o.read();  // a training step leaves its routing and statistics on the device
    CHECK(o.stats.outlier_rows == 10);  // every token reaches both experts
    CHECK(o.stats.nonfinite_rows == 0);
    // Expert 0's rows count 0: each token's output is its gate to expert 1 times expert 1's row, no more.
    std::vector<float> ref((size_t)(10 * 6), 0.f);
    for (int64_t s = 0; s < 20; ++s) {
      if (o.expert[s] != 1) continue;
      std::vector<float> ye = layer.experts[1].forward(x.slice(0, s / 2, s / 2 + 1).contiguous()).to_f32_vector();
      for (int64_t q = 0; q < 6; ++q) ref[(s / 2) * 6 + q] += o.gate[s] * ye[q];
    }
    CHECK_CLOSE(o.y, ref, 1e-6f, 1e-5f);
    layer.after_step();
    CHECK(layer.expert_reliability()[0] < 0.95f);  // health 0 this step (rows and weight norm)
    CHECK(layer.expert_reliability()[1] == 1.f);
  }

  TEST_CASE("routing adds log(reliability): probabilities scale by r, r = 1 changes nothing") {
    CoEConfig c;
    c.d_model = 5;
    c.n_heads = 1;
    c.d_ff = 4;
    c.router = RouterKind::Flat;
    c.num_clusters = 1;
    c.experts_per_cluster = 4;
    c.top_k_clusters = 1;
    c.top_k_experts = 4;  // every expert: the gates are the whole distribution
    c.gate_mode = GateMode::Product;
    c.init_std = 0.5f;
    Generator gen(85);
    MoELayer layer(c, 0, true, gen);
    NamedParams bufs;
    layer.collect_buffers("moe", bufs);
    Tensor rel = bufs[0].second;
    REQUIRE(bufs[0].first == "moe.reliability");
    Tensor x = uniform({7, 5}, 86);
    MoELayer::Output base = layer.forward(x, nullptr, nullptr, false);
    c.use_reliability = false;
    Generator gen2(85);
    MoELayer plain(c, 0, true, gen2);
    MoELayer::Output p = plain.forward(x, nullptr, nullptr, false);
    CHECK(p.gate == base.gate);  // bit for bit
    CHECK(p.y.to_f32_vector() == base.y.to_f32_vector());
    std::vector<float> r = {1.f, 0.25f, 1.f, 0.5f};
    rel.copy_(Tensor::from_vector(r, {4}));
    MoELayer::Output o = layer.forward(x, nullptr, nullptr, false);
    for (int64_t t = 0; t < 7; ++t) {
      // p'_e = r_e p_e / sum r p
      double z = 0.0;
      std::map<int32_t, double> p0, p1;
      for (int64_t j = 0; j < 4; ++j) p0[base.expert[t * 4 + j]] = base.gate[t * 4 + j];
      for (int64_t j = 0; j < 4; ++j) p1[o.expert[t * 4 + j]] = o.gate[t * 4 + j];
      for (int e = 0; e < 4; ++e) z += r[e] * p0[e];
      for (int e = 0; e < 4; ++e) CHECK(p1[e] == doctest::Approx(r[e] * p0[e] / z).epsilon(1e-5));
    }
  }

  TEST_CASE("degraded reliability and a pruned expert: the layer routes and balances as the former host bias did") {
    // The layer makes its routing bias on its device (kernels/route.h route_bias_forward) and the router and the
    // load-balance kernel take it as a tensor. Reference: the router fed the bias of the former host formula
    // (tests/bias_ref.h) from the same buffers. Same experts, gate bits, load-balance bits and router gradients;
    // the pruned expert is never selected, and a degraded expert gets less traffic than with reliability off.
    for (GateMode gm : {GateMode::RenormPath, GateMode::GroupLimited}) {
      CAPTURE((int)gm);
      CoEConfig c;
      c.d_model = 8;
      c.n_heads = 1;
      c.d_ff = 8;
      c.router = RouterKind::Cluster;
      c.num_clusters = 3;
      c.experts_per_cluster = 4;
      c.top_k_clusters = 2;
      c.top_k_experts = 2;
      c.gate_mode = gm;
      c.load_balancing_weight = 0.1f;
      c.init_std = 0.5f;
      Generator gen(91);
      MoELayer layer(c, 0, true, gen);
      NamedParams bufs;
      layer.collect_buffers("moe", bufs);
      REQUIRE(bufs[0].first == "moe.reliability");
      REQUIRE(bufs[3].first == "moe.usage_ema");
      const std::vector<float> rel = {1.f, 0.4f, 1.f, 1.f, 0.7f, 1.f, 1.f, 0.9f, 0.2f, 1.f, 1.f, 0.6f};
      const std::vector<float> use = {0.1f, 0.05f, 0.1f, 0.1f, 0.f, 0.f, 0.f, 0.f, 0.2f, 0.1f, 0.15f, 0.2f};
      bufs[0].second.copy_(Tensor::from_vector(rel, {12}));
      bufs[3].second.copy_(Tensor::from_vector(use, {12}));  // cluster 1 unused: its plain mean
      layer.prune(5);
      std::vector<float> pruned(12, 0.f);
      pruned[5] = 1.f;
      const RouterBias former = router_bias_from_host(
          layer.router, cm::test::host_routing_bias(layer.router.branching, rel, use, pruned, true));

      Tensor x = uniform({40, 8}, 92);
      MoELayer::Output o = layer.forward(x, nullptr, nullptr, false);
      REQUIRE(o.lb_loss.defined());
      const float lb = o.lb_loss.item();
      o.lb_loss.backward();
      std::vector<std::vector<float>> grads;
      for (const Tensor& w : layer.router.weights) {
        grads.push_back(w.grad().defined() ? w.grad().to_f32_vector() : std::vector<float>{});
        w.zero_grad();
      }
      Routing ref = layer.router.route(x, former, nullptr, false);
      CHECK(o.expert == ref.expert);
      CHECK(o.gate == ref.gate_value);  // bit for bit
      const float lb_ref = ref.lb_loss.item();
      CHECK(std::memcmp(&lb, &lb_ref, 4) == 0);
      ref.lb_loss.backward();
      for (size_t l = 0; l < grads.size(); ++l) {
        CAPTURE(l);
        const Tensor& w = layer.router.weights[l];
        CHECK(grads[l] == (w.grad().defined() ? w.grad().to_f32_vector() : std::vector<float>{}));
      }
      CHECK(std::count(o.expert.begin(), o.expert.end(), 5) == 0);
      // The bias reached the routing: expert 8 (reliability 0.2) gets fewer slots than without reliability.
      CoEConfig off = c;
      off.use_reliability = false;
      Generator gen2(91);
      MoELayer plain(off, 0, true, gen2);
      MoELayer::Output po = plain.forward(x, nullptr, nullptr, false);
      CHECK(std::count(o.expert.begin(), o.expert.end(), 8) < std::count(po.expert.begin(), po.expert.end(), 8));
    }
  }

  TEST_CASE("cluster reliability moves tokens between clusters when fewer clusters are kept than there are") {
    // 4 clusters of 2 experts, 2 clusters and 1 expert kept per token. Cluster c's reliability (the usage-weighted
    // mean of its experts) adds log r_c to its level-0 logit, expert e's adds log r_e inside its cluster: the
    // selection is the top-k of logit + log r at each level.
    CoEConfig c;
    c.d_model = 6;
    c.n_heads = 1;
    c.d_ff = 8;
    c.router = RouterKind::Cluster;
    c.num_clusters = 4;
    c.experts_per_cluster = 2;
    c.top_k_clusters = 2;
    c.top_k_experts = 1;
    c.init_std = 0.5f;
    c.validate();
    Generator gen(87);
    MoELayer layer(c, 0, true, gen);
    NamedParams bufs;
    layer.collect_buffers("moe", bufs);
    REQUIRE(bufs[0].first == "moe.reliability");
    REQUIRE(bufs[3].first == "moe.usage_ema");
    const int64_t T = 48, C = 6;
    Tensor x = uniform({T, C}, 88);
    auto in_cluster = [](const MoELayer::Output& o, int64_t cl) {
      return std::count_if(o.expert.begin(), o.expert.end(), [&](int32_t e) { return e / 2 == cl; });
    };
    MoELayer::Output base = layer.forward(x, nullptr, nullptr, false);
    const int64_t before = in_cluster(base, 1);
    REQUIRE(before >= 8);  // cluster 1 carries traffic when every reliability is 1

    // Cluster 1: both experts at 0.05. Cluster 3: experts at 0.6 and 1 with usage 0.3 and 0.1 -> 0.7.
    std::vector<float> r = {1.f, 1.f, 0.05f, 0.05f, 1.f, 1.f, 0.6f, 1.f};
    std::vector<float> u = {0.1f, 0.1f, 0.1f, 0.1f, 0.1f, 0.1f, 0.3f, 0.1f};
    bufs[0].second.copy_(Tensor::from_vector(r, {8}));
    bufs[3].second.copy_(Tensor::from_vector(u, {8}));
    const std::vector<double> rc = {1.0, 0.05, 1.0, (0.3 * 0.6 + 0.1 * 1.0) / 0.4};
    CHECK(layer.cluster_reliability()[3] == doctest::Approx(rc[3]));
    MoELayer::Output o = layer.forward(x, nullptr, nullptr, false);
    std::vector<float> xv = x.to_f32_vector(), W0 = layer.router.weights[0].to_f32_vector(),
                       W1 = layer.router.weights[1].to_f32_vector();
    int64_t moved = 0;
    for (int64_t t = 0; t < T; ++t) {
      std::vector<std::pair<double, int64_t>> z0;
      for (int64_t cl = 0; cl < 4; ++cl) {
        double z = std::log(rc[cl]);
        for (int64_t q = 0; q < C; ++q) z += (double)xv[t * C + q] * W0[cl * C + q];
        z0.push_back({z, cl});
      }
      std::stable_sort(z0.begin(), z0.end(), [](auto& a, auto& b) { return a.first > b.first; });
      for (int64_t j = 0; j < 2; ++j) {
        const int64_t cl = z0[j].second;
        double best = -1e300;
        int64_t pick = -1;
        for (int64_t e = 0; e < 2; ++e) {
          double z = std::log((double)r[cl * 2 + e]);
          for (int64_t q = 0; q < C; ++q) z += (double)xv[t * C + q] * W1[(cl * 2 + e) * C + q];
          if (z > best) best = z, pick = cl * 2 + e;
        }
        CHECK(o.expert[t * 2 + j] == pick);
      }
      moved += base.expert[t * 2] / 2 != o.expert[t * 2] / 2 || base.expert[t * 2 + 1] / 2 != o.expert[t * 2 + 1] / 2;
    }
    MESSAGE("cluster 1 slots: ", before, " -> ", in_cluster(o, 1), "; tokens with another cluster: ", moved);
    CHECK(in_cluster(o, 1) < before / 4);  // log 0.05 = -3 on its logit
    CHECK(moved >= before / 2);
  }

  TEST_CASE("reliability-driven pruning: an expert whose reliability stays under 0.1 for the window is removed") {
    // The traffic criterion is off (threshold 0): only reliability can prune. Expert 2 of layer 0 has NaN
    // weights, so each step's health is 0 and its reliability (from 0.05) stays under 0.1.
    CoEConfig c;
    c.d_model = 8;
    c.n_layers = 1;
    c.n_heads = 2;
    c.d_ff = 8;
    c.vocab_size = 11;
    c.seq_len = 8;
    c.router = RouterKind::Flat;
    c.num_clusters = 1;
    c.experts_per_cluster = 4;
    c.top_k_clusters = 1;
    c.top_k_experts = 1;
    c.enable_expert_pruning = true;
    c.pruning_threshold = 0.f;
    c.pruning_window = 3;
    for (bool reliability : {true, false}) {
      CAPTURE(reliability);
      c.use_reliability = reliability;
      c.validate();
      ClusterMoELM m(c);
      inject(m, 0, 2, Fault::NaN);
      buffer(m, "blocks.0.moe.reliability").copy_(Tensor::from_vector(std::vector<float>{1.f, 1.f, 0.05f, 1.f}, {4}));
      std::vector<int32_t> v(16);
      for (size_t i = 0; i < v.size(); ++i) v[i] = (int32_t)((i * 5 + 1) % 11);
      Tensor ids = Tensor::from_vector(v, {2, 8});
      for (int step = 1; step <= 3; ++step) {
        m.forward(ids, ids);  // routes some tokens (the step's traffic) before after_step
        m.after_step();
        CHECK(m.expert_pruned(0, 2) == (reliability && step == 3));  // after the window, not before
      }
      for (int64_t e : {0, 1, 3}) CHECK_FALSE(m.expert_pruned(0, e));
      if (reliability) CHECK(m.get_model_summary().active_experts == 3);
    }
  }

  TEST_CASE("reliability hierarchy: cluster = usage-weighted mean, layer = mean of clusters, model = mean") {
    CoEConfig c;
    c.d_model = 8;
    c.n_layers = 2;
    c.n_heads = 2;
    c.d_ff = 8;
    c.vocab_size = 11;
    c.seq_len = 8;
    c.num_clusters = 2;
    c.experts_per_cluster = 3;
    c.top_k_clusters = 1;
    c.top_k_experts = 1;
    ClusterMoELM m(c);
    std::vector<float> r0 = {1.f, 0.5f, 0.2f, 0.9f, 0.9f, 0.6f}, u0 = {0.1f, 0.3f, 0.2f, 0.2f, 0.1f, 0.1f};
    buffer(m, "blocks.0.moe.reliability").copy_(Tensor::from_vector(r0, {6}));
    buffer(m, "blocks.0.moe.usage_ema").copy_(Tensor::from_vector(u0, {6}));
    auto s = m.get_reliability_stats();
    double c0 = (0.1 * 1.0 + 0.3 * 0.5 + 0.2 * 0.2) / 0.6, c1 = (0.2 * 0.9 + 0.1 * 0.9 + 0.1 * 0.6) / 0.4;
    CHECK(s.at("layer_0_cluster_0_reliability") == doctest::Approx(c0));
    CHECK(s.at("layer_0_cluster_1_reliability") == doctest::Approx(c1));
    CHECK(s.at("layer_0_cluster_0_expert_2_reliability") == doctest::Approx(0.2));
    CHECK(s.at("layer_0_cluster_1_expert_0_reliability") == doctest::Approx(0.9));
    CHECK(s.at("layer_0_reliability") == doctest::Approx((c0 + c1) / 2));
    CHECK(s.at("layer_1_reliability") == doctest::Approx(1.0));
    CHECK(s.at("model_reliability") == doctest::Approx(((c0 + c1) / 2 + 1.0) / 2));
    std::vector<int32_t> ids = {1, 2, 3, 4};
    CHECK(m.forward(Tensor::from_vector(ids, {1, 4})).model_reliability ==
          doctest::Approx(((c0 + c1) / 2 + 1.0) / 2));
    // A faulty expert's reliability stays in (0, 1]: it reaches the floor and stops.
    CoEConfig c2 = c;
    c2.reliability_min = 0.01f;
    ClusterMoELM m2(c2);
    inject(m2, 0, 0, Fault::NaN);
    for (int i = 0; i < 80; ++i) m2.after_step();
    CHECK(m2.get_reliability_stats().at("layer_0_cluster_0_expert_0_reliability") == doctest::Approx(0.01f));
  }

  TEST_CASE("without faults reliability stays near 1 and routing is unchanged") {
    const CharData& d = shakespeare();
    Trainer on(tiny_lm(d.vocab, true)), off(tiny_lm(d.vocab, false));
    for (int64_t s = 0; s < 40; ++s) {
      LayerRoutingStats a = on.train_step(d, 40), b = off.train_step(d, 40);
      CHECK(a.expert_share == b.expert_share);
      CHECK(a.outlier_rows == 0);
      CHECK(a.nonfinite_rows == 0);
    }
    CHECK(on.losses == off.losses);  // bit for bit: log(1) = 0 is added to the logits
    CHECK(on.losses.back() < on.losses.front() - 0.5f);
    for (auto& [k, v] : on.model->get_reliability_stats())
      if (k != "training_step") CHECK_MESSAGE(v >= 0.99f, k);
  }

  TEST_CASE("fault injection on real text: reliability and traffic fall, loss stays finite and recovers; "
            "without reliability the same fault is non-finite or clearly worse") {
    const CharData& d = shakespeare();
    const int64_t before = 120, after = 120, total = before + after, layer = 0;
    Trainer base(tiny_lm(d.vocab, true));
    std::vector<double> shares(4, 0.0);
    for (int64_t s = 0; s < before; ++s) {
      LayerRoutingStats st = base.train_step(d, total);
      if (s >= before - 60)
        for (int64_t e = 0; e < 4; ++e) shares[e] += st.expert_share[e] / 60.0;
    }
    // Corrupt the busiest expert of layer 0: the one whose loss hurts most.
    const int64_t expert = std::max_element(shares.begin(), shares.end()) - shares.begin();
    const double share_before = shares[expert];
    const float healthy = base.heldout_loss(d);
    REQUIRE(share_before > 0.05);  // the expert carried real traffic before the fault
    MESSAGE("on ", cm::test::test_text().name, ": held-out loss before the fault ", healthy, ", expert ", expert,
            " share ", share_before);

    float end_on[2] = {0.f, 0.f};
    for (Fault f : {Fault::NaN, Fault::Times100}) {
      const std::string fname = f == Fault::NaN ? "NaN" : "x100";
      CAPTURE(fname);
      // ---- with reliability
      Trainer on(tiny_lm(d.vocab, true), base);
      inject(*on.model, layer, expert, f);
      const float hit_on = on.heldout_loss(d);  // right after the fault: the guard already protects the loss
      double share_after = 0.0;
      int64_t caught = 0;
      for (int64_t s = 0; s < after; ++s) {
        LayerRoutingStats st = on.train_step(d, total);
        caught += st.nonfinite_rows + st.outlier_rows;
        if (s >= after - 60) share_after += st.expert_share[expert] / 60.0;
      }
      const float r = on.model->get_reliability_stats().at("layer_0_cluster_" + std::to_string(expert / 2) +
                                                           "_expert_" + std::to_string(expert % 2) + "_reliability");
      end_on[f == Fault::Times100] = on.heldout_loss(d);
      MESSAGE(fname, " with reliability: reliability ", r, ", share ", share_after, ", held-out loss ",
              end_on[f == Fault::Times100]);
      CHECK(caught > 0);
      CHECK(r < 0.05f);
      CHECK(share_after < 0.2 * share_before);
      for (float l : on.losses) REQUIRE(std::isfinite(l));
      CHECK(end_on[f == Fault::Times100] < healthy + 0.02f);  // recovered (and kept learning)

      // ---- the same fault without reliability
      Trainer off(tiny_lm(d.vocab, false), base);
      inject(*off.model, layer, expert, f);
      const float hit_off = off.heldout_loss(d);
      const int64_t steps_off = f == Fault::NaN ? 10 : after;
      for (int64_t s = 0; s < steps_off; ++s) off.train_step(d, total);
      const float end_off = off.heldout_loss(d);
      double mean_on = 0.0, mean_off = 0.0;  // paired: the same batches after the fault
      for (int64_t s = 0; s < steps_off; ++s) {
        mean_on += on.losses[s] / (double)steps_off;
        mean_off += off.losses[s] / (double)steps_off;
      }
      MESSAGE(fname, " right after the fault: held-out loss ", hit_off, " without reliability, ", hit_on, " with");
      MESSAGE(fname, " at the end: held-out loss ", end_off, " without reliability, ", end_on[f == Fault::Times100],
              " with; mean train loss after the fault ", mean_off, " vs ", mean_on);
      CHECK(std::isfinite(hit_on));
      CHECK(hit_on < healthy + 0.1f);
      if (f == Fault::NaN) {
        CHECK_FALSE(std::isfinite(hit_off));
        CHECK_FALSE(std::isfinite(end_off));
        CHECK_FALSE(std::isfinite(off.losses.back()));
      } else {
        // Right after the fault the unguarded model is worse, by 0.025 on tinyshakespeare under the default gate
        // design (renorm_last; 0.38 under renorm_path, whose gates a token's two clusters share). This margin
        // follows the 120-step trajectory's rounding: 0.024 before the fused z-loss op, 0.012 after it, 0.005 with
        // the MoE path on the dispatch kernels alone (their combine fuses each slot's multiply-add and sums the gate
        // gradient in another order), 0.025 with both. Later, clearly worse. The same margins hold on the generated
        // play (tests/corpus.h). The -O1 sanitized build (different summation orders) gives 0.005 on
        // tinyshakespeare, so the check asks only for "worse": a guard that did not act leaves the two models
        // identical and the two losses equal, which fails it.
        CHECK((!std::isfinite(hit_off) || hit_off > hit_on));
        CHECK((!std::isfinite(end_off) || end_off > end_on[1] + 0.05f));
        CHECK((!std::isfinite(mean_off) || mean_off > mean_on + 0.03));
      }
    }
  }
}
