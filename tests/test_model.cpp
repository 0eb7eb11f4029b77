// The ClusterMoE language model and its API: output shapes and keys, stats names, parameter names and counts,
// generation with and without the selection cache, pruning, specialization, every router kind end to end.
#include <algorithm>
#include <cmath>
#include <functional>
#include <memory>
#include <set>

#include "engine/host_sync.h"
#include "model/coe.h"
#include "model/moe.h"
#include "model/optim.h"
#include "tests/helpers.h"

using namespace cm;
using cm::test::uniform;

namespace {
// A training forward's statistics, read: they stay where the layers counted them until read (model/stats.h).
CoEOutput read_stats(CoEOutput o) {
  read_routing_stats(o.layers);
  return o;
}

CoEConfig small_lm() {
  CoEConfig c;
  c.d_model = 16;
  c.n_layers = 3;
  c.n_heads = 2;
  c.d_ff = 24;
  c.vocab_size = 13;
  c.seq_len = 16;
  c.num_clusters = 4;
  c.experts_per_cluster = 4;
  c.top_k_clusters = 2;
  c.top_k_experts = 1;
  c.moe_every = 2;  // layers 0 and 2 are MoE, layer 1 dense
  c.validate();
  return c;
}

Tensor ids_tensor(int64_t B, int64_t T, int64_t V, uint64_t seed) {
  std::vector<int32_t> v((size_t)(B * T));
  for (size_t i = 0; i < v.size(); ++i) v[i] = (int32_t)(philox_uniform(seed, 0, i) * (float)V);
  return Tensor::from_vector(v, {B, T});
}

std::set<std::string> keys(const std::map<std::string, float>& m) {
  std::set<std::string> s;
  for (auto& kv : m) s.insert(kv.first);
  return s;
}

std::string ek(int64_t l, int64_t c, int64_t e) {
  return "layer_" + std::to_string(l) + "_cluster_" + std::to_string(c) + "_expert_" + std::to_string(e);
}

// A few steps on a repeating pattern so that the next-token distributions are peaked (greedy and sampled
// decoding are then insensitive to rounding).
void fit_pattern(ClusterMoELM& m, int64_t steps) {
  const int64_t V = m.config().vocab_size, T = m.config().seq_len;
  std::vector<int32_t> x, y;
  for (int64_t b = 0; b < 4; ++b)
    for (int64_t t = 0; t < T; ++t) {
      x.push_back((int32_t)((b + t * 3) % V));
      y.push_back((int32_t)((b + (t + 1) * 3) % V));
    }
  Tensor X = Tensor::from_vector(x, {4, T}), Y = Tensor::from_vector(y, {4, T});
  AdamW opt(m.named_parameters());
  for (int64_t s = 0; s < steps; ++s) {
    m.forward(X, Y).total_loss.backward();
    opt.step(1e-2f);
    m.after_step();
    opt.zero_grad();
  }
}

}  // namespace

TEST_SUITE("model") {
  TEST_CASE("forward: output shapes, loss terms and per-layer stats") {
    CoEConfig c = small_lm();
    c.load_balancing_weight = 0.02f;
    ClusterMoELM m(c);
    Tensor ids = ids_tensor(2, 7, 13, 1), tg = ids_tensor(2, 7, 13, 2);
    CoEOutput o = m.forward(ids, tg);
    CHECK(o.logits.shape() == Shape{2, 7, 13});
    for (const Tensor* t : {&o.loss, &o.aux_loss, &o.load_balance_loss, &o.z_loss, &o.diversity_loss, &o.total_loss}) {
      REQUIRE(t->defined());
      CHECK(t->numel() == 1);
      CHECK(std::isfinite(t->item()));
    }
    CHECK(o.aux_loss.item() ==
          doctest::Approx(o.load_balance_loss.item() + o.z_loss.item() + o.diversity_loss.item()));
    CHECK(o.total_loss.item() == doctest::Approx(o.loss.item() + o.aux_loss.item()));
    CHECK(o.loss.item() == doctest::Approx(std::log(13.0)).epsilon(0.05));  // near uniform at init
    CHECK(o.load_balance_loss.item() == doctest::Approx(0.02).epsilon(0.2));  // near balanced at init
    CHECK(o.model_reliability == 1.f);
    REQUIRE(o.layers.size() == 3);
    // A training forward: its statistics stay unread (zeros) until read, every layer's in one read-out.
    CHECK(o.layers[0].expert_share == std::vector<float>(16, 0.f));
    reset_host_sync_stats();
    read_routing_stats(o.layers);
    CHECK(host_sync_stats().stream_syncs == 1);
    read_routing_stats(o.layers);  // read already: nothing more
    CHECK(host_sync_stats().stream_syncs == 1);
    for (int64_t l = 0; l < 3; ++l) {
      const LayerRoutingStats& s = o.layers[l];
      CHECK(s.layer == l);
      CHECK(s.moe == (l != 1));
      CHECK(s.num_experts == (l != 1 ? 16 : 1));
      REQUIRE(s.expert_share.size() == (size_t)s.num_experts);
      double share = 0.0;
      int64_t rows = 0;
      for (int64_t e = 0; e < s.num_experts; ++e) share += s.expert_share[e], rows += s.expert_rows[e];
      CHECK(share == doctest::Approx(1.0));
      CHECK(rows == 14 * (l != 1 ? 2 : 1));  // B*T tokens x K
      CHECK(s.dropped_fraction == 0.f);
      if (s.moe) {
        CHECK(s.routing_flops == 14 * routing_flops_per_token(16, {4, 4}, {2, 1}));
        CHECK(s.router_entropy > 0.f);
      }
    }
    // An evaluation forward hands its statistics back read: the same routing, the same values.
    m.eval();
    CoEOutput oe = m.forward(ids, tg);
    for (int64_t l = 0; l < 3; ++l) {
      CHECK(oe.layers[l].expert_share == o.layers[l].expert_share);
      CHECK(oe.layers[l].expert_rows == o.layers[l].expert_rows);
      CHECK(oe.layers[l].router_entropy == o.layers[l].router_entropy);
    }
    m.train();
    // No targets: no loss.
    CoEOutput o2 = m.forward(ids);
    CHECK_FALSE(o2.loss.defined());
    CHECK_FALSE(o2.total_loss.defined());
    CHECK(o2.logits.to_f32_vector() == o.logits.to_f32_vector());
    // Bad inputs.
    CHECK_THROWS_AS(m.forward(ids_tensor(1, 17, 13, 3)), Error);  // > seq_len
    CHECK_THROWS_AS(m.forward(Tensor::from_vector(std::vector<int32_t>{0, 13}, {1, 2})), Error);
    CHECK_THROWS_AS(m.forward(Tensor::zeros({1, 4})), Error);  // f32 ids
    CHECK_THROWS_AS(m.forward(ids, ids_tensor(2, 6, 13, 4)), Error);
  }

  TEST_CASE("set_router_entropy(false): no entropy statistic (NaN), the same routing, losses and gradients") {
    for (GateMode g : {GateMode::RenormPath, GateMode::GroupLimited}) {
      CAPTURE(gate_mode_name(g));
      CoEConfig c = small_lm();
      c.load_balancing_weight = 0.02f;
      c.gate_mode = g;
      c.validate();
      Tensor ids = ids_tensor(2, 7, 13, 1), tg = ids_tensor(2, 7, 13, 2);
      std::vector<float> loss, grads;
      std::vector<std::vector<float>> shares, entropy;
      for (bool on : {true, false}) {
        ClusterMoELM m(c);
        if (!on) m.set_router_entropy(false);
        CoEOutput o = m.forward(ids, tg);
        o.total_loss.backward();
        read_routing_stats(o.layers);
        loss.push_back(o.total_loss.item());
        std::vector<float> g, sh, ent;
        for (const auto& [name, p] : m.named_parameters()) {
          const Tensor gr = p.grad();  // undefined: no gradient reached it (group_limited's upper levels)
          g.push_back(gr.defined() ? (float)gr.numel() : -1.f);
          if (gr.defined())
            for (float v : gr.to_f32_vector()) g.push_back(v);
        }
        for (const LayerRoutingStats& s : o.layers) {
          if (!s.moe) continue;
          sh.insert(sh.end(), s.expert_share.begin(), s.expert_share.end());
          ent.push_back(s.router_entropy);
        }
        if (on) grads = g;
        else CHECK(g == grads);
        shares.push_back(sh);
        entropy.push_back(ent);
        // An evaluation forward reads its statistics itself: the same rule.
        m.eval();
        for (const LayerRoutingStats& s : m.forward(ids, tg).layers)
          if (s.moe) CHECK(std::isnan(s.router_entropy) == !on);
      }
      CHECK(loss[0] == loss[1]);
      CHECK(shares[0] == shares[1]);
      REQUIRE(entropy[0].size() == 2);
      for (float e : entropy[0]) CHECK(e > 0.f);
      for (float e : entropy[1]) CHECK(std::isnan(e));
    }
  }

  TEST_CASE("stats key names: utilization, reliability, specialization, summary") {
    ClusterMoELM m(small_lm());
    m.forward(ids_tensor(2, 8, 13, 5));
    std::set<std::string> util, rel = {"model_reliability", "training_step"}, spec;
    for (int64_t l = 0; l < 3; ++l) {
      const std::string lk = "layer_" + std::to_string(l);
      const int64_t nc = l == 1 ? 1 : 4, ne = l == 1 ? 1 : 4;
      rel.insert(lk + "_reliability");
      spec.insert(lk + "_specialization");
      for (int64_t c = 0; c < nc; ++c) {
        rel.insert(lk + "_cluster_" + std::to_string(c) + "_reliability");
        for (int64_t e = 0; e < ne; ++e) {
          util.insert(ek(l, c, e));
          rel.insert(ek(l, c, e) + "_reliability");
          spec.insert(ek(l, c, e) + "_specialization");
        }
      }
    }
    CHECK(keys(m.get_expert_utilization()) == util);
    CHECK(keys(m.get_reliability_stats()) == rel);
    CHECK(keys(m.get_expert_specialization()) == spec);
    auto u = m.get_expert_utilization();
    double layer0 = 0.0;
    for (int64_t c = 0; c < 4; ++c)
      for (int64_t e = 0; e < 4; ++e) layer0 += u.at(ek(0, c, e));
    CHECK(layer0 == doctest::Approx(1.0));
    CHECK(u.at(ek(1, 0, 0)) == 1.f);
    m.reset_metrics();
    for (auto& kv : m.get_expert_utilization()) CHECK(kv.second == 0.f);
    std::set<std::string> sk;
    for (auto& kv : m.get_model_summary().to_map()) sk.insert(kv.first);
    CHECK(sk == std::set<std::string>{"total_params", "expert_params", "active_params_per_token", "num_layers",
                                      "num_moe_layers", "num_clusters", "experts_per_cluster", "num_experts",
                                      "experts_per_token", "active_experts", "model_reliability", "step"});
    CHECK(m.get_model_summary().str().find("ClusterMoE") != std::string::npos);
    // A flat router: one cluster holding every expert.
    CoEConfig f = small_lm();
    f.router = RouterKind::Flat;
    ClusterMoELM mf(f);
    auto uf = mf.get_expert_utilization();
    CHECK(uf.count(ek(0, 0, 15)) == 1);
    CHECK(mf.get_reliability_stats().count("layer_0_cluster_0_reliability") == 1);
    CHECK(mf.get_reliability_stats().count("layer_0_cluster_1_reliability") == 0);
  }

  TEST_CASE("parameter and buffer names are stable and unique; every parameter used gets a gradient") {
    ClusterMoELM m(small_lm());
    auto params = m.named_parameters();
    std::set<std::string> names;
    for (auto& [n, t] : params) {
      CHECK(names.insert(n).second);
      CHECK(t.requires_grad());
    }
    for (const char* n : {"tok_emb.weight", "pos_emb.weight", "blocks.0.norm1.weight", "blocks.0.norm1.bias",
                          "blocks.0.attn.qkv.weight", "blocks.0.attn.proj.weight", "blocks.0.norm2.weight",
                          "blocks.0.moe.router.levels.0.weight", "blocks.0.moe.router.levels.1.weight",
                          "blocks.0.moe.experts.3.w1", "blocks.0.moe.experts.3.w2", "blocks.0.moe.experts.15.w3",
                          "blocks.1.ffn.w1", "blocks.2.moe.experts.0.w2", "norm_f.weight", "norm_f.bias"})
      CHECK_MESSAGE(names.count(n) == 1, n);
    CHECK(names.count("lm_head.weight") == 0);  // tied
    std::set<std::string> bufs;
    for (auto& [n, t] : m.named_buffers()) CHECK(bufs.insert(n).second);
    for (const char* n : {"step", "blocks.0.moe.reliability", "blocks.0.moe.norm_ema", "blocks.0.moe.wnorm_ema",
                          "blocks.0.moe.usage_ema", "blocks.0.moe.pruned", "blocks.0.moe.low_steps",
                          "blocks.0.moe.router.levels.0.aux_bias", "blocks.0.moe.router.levels.1.aux_bias",
                          "blocks.1.ffn.reliability"})
      CHECK_MESSAGE(bufs.count(n) == 1, n);
    // Two models from one seed are identical; a step changes "step".
    ClusterMoELM m2(small_lm());
    auto p2 = m2.named_parameters();
    for (size_t i = 0; i < params.size(); ++i) CHECK(params[i].second.to_f32_vector() == p2[i].second.to_f32_vector());
    CoEOutput o = read_stats(m.forward(ids_tensor(4, 16, 13, 6), ids_tensor(4, 16, 13, 7)));
    o.total_loss.backward();
    for (auto& [n, t] : params) {
      bool expert = n.find(".experts.") != std::string::npos;
      if (!expert) {
        CHECK_MESSAGE(t.grad().defined(), n);
        continue;
      }
      // A training step has no host view of its routing (model/moe.cpp): every expert gets a gradient, zero exactly
      // when it computed no rows (before: none at all then).
      o.layers[(size_t)(n[7] - '0')].read();
      int64_t l = n[7] - '0', e = std::stoi(n.substr(n.find(".experts.") + 9));
      REQUIRE_MESSAGE(t.grad().defined(), n);
      const std::vector<float> g = t.grad().to_f32_vector();
      CHECK_MESSAGE(std::any_of(g.begin(), g.end(), [](float v) { return v != 0.f; }) ==
                        (o.layers[l].expert_rows[e] > 0),
                    n);
    }
    m.after_step();
    CHECK(m.step() == 1);
    CHECK(m.get_reliability_stats().at("training_step") == 1.f);
    // to(): the CPU is where the model already lives (the gradients stay); a device that cannot be used is
    // refused with its reason and leaves the model where it was (the CUDA suite moves models for real).
    m.to(Device::CPU);
    CHECK(m.device() == Device::CPU);
    CHECK(params[0].second.grad().defined());
    if (!cuda_available()) {
      CHECK_THROWS_WITH_AS(m.to(Device::CUDA), doctest::Contains("use --device cpu"), Error);
      CHECK(m.device() == Device::CPU);
      CHECK(params[0].second.device() == Device::CPU);
    }
  }

  TEST_CASE("the summary's parameter counts equal a hand count") {
    for (int variant = 0; variant < 2; ++variant) {
      CoEConfig c = small_lm();
      if (variant == 1) {  // every optional parameter on
        c.tie_embeddings = false;
        c.bias = true;
        c.expert = ExpertKind::GELU;
        c.use_adaptive_routing = true;
        c.norm = NormKind::RMSNorm;
        c.router = RouterKind::Tree;
        c.tree_branching = {2, 2, 4};
        c.tree_top_k = {1, 2, 2};
        c.moe_every = 1;
      }
      CAPTURE(variant);
      ClusterMoELM m(c);
      const int64_t C = 16, F = 24, V = 13, S = 16, L = 3;
      const int64_t norm = variant ? C : 2 * C;
      const int64_t attn = 3 * C * C + C * C + (variant ? 3 * C + C : 0);
      const int64_t expert = variant ? C * F + F + F * C + C : 3 * C * F;
      const int64_t router = variant ? (2 + 2 * 2 + 4 * 4) * C : (4 + 16) * C;
      const int64_t gate = variant ? C + 1 : 0;
      const int64_t moe_layers = variant ? 3 : 2, K = variant ? 4 : 2;
      int64_t total = V * C + S * C + norm + (variant ? V * C : 0);
      for (int64_t l = 0; l < L; ++l) {
        total += 2 * norm + attn;
        bool moe = variant || l != 1;
        total += moe ? router + 16 * expert + gate : expert;
      }
      ModelSummary s = m.get_model_summary();
      CHECK(s.total_params == total);
      CHECK(s.total_params == m.num_parameters());
      CHECK(s.expert_params == moe_layers * 16 * expert);
      CHECK(s.active_params_per_token == total - moe_layers * 16 * expert + moe_layers * K * expert);
      CHECK(s.num_layers == 3);
      CHECK(s.num_moe_layers == moe_layers);
      CHECK(s.num_experts == 16);
      CHECK(s.num_clusters == (variant ? 2 : 4));
      CHECK(s.experts_per_cluster == (variant ? 8 : 4));
      CHECK(s.experts_per_token == K);
      CHECK(s.active_experts == moe_layers * 16);
    }
  }

  TEST_CASE("generation with and without the selection cache gives the same tokens") {
    for (RouterKind rk : {RouterKind::Cluster, RouterKind::AC}) {
      CoEConfig c = small_lm();
      c.router = rk;
      c.moe_every = 1;  // AC needs a previous MoE layer for its labels
      ClusterMoELM m(c);
      fit_pattern(m, 30);
      std::vector<int32_t> prompt = {1, 4, 7, 10, 0};
      // 30 new tokens from a 5-token prompt with seq_len 16: the window slides (the cache is rebuilt) too.
      for (float temp : {0.f, 0.8f}) {
        std::vector<int32_t> a = m.generate(prompt, 30, temp, 5, 99, true);
        std::vector<int32_t> b = m.generate(prompt, 30, temp, 5, 99, false);
        CHECK(a.size() == 30);
        CHECK(a == b);
      }
      CHECK(m.training());  // restored
      // Greedy continues the learned pattern.
      std::vector<int32_t> g = m.generate({0, 3, 6}, 4, 0.f, 0, 1, true);
      CHECK(g == std::vector<int32_t>({9, 12, 2, 5}));
    }
    ClusterMoELM m(small_lm());
    CHECK_THROWS_AS(m.generate({}, 3), Error);
    CHECK_THROWS_AS(m.generate({20}, 3), Error);
  }

  TEST_CASE("a pruned expert is gone from routing and compute") {
    CoEConfig c = small_lm();
    ClusterMoELM m(c);
    m.prune_expert(0, 5);
    CHECK(m.expert_pruned(0, 5));
    CHECK(m.get_model_summary().active_experts == 31);
    m.reset_metrics();
    CoEOutput o = read_stats(m.forward(ids_tensor(4, 16, 13, 8), ids_tensor(4, 16, 13, 9)));
    CHECK(o.layers[0].expert_share[5] == 0.f);
    CHECK(o.layers[0].expert_rows[5] == 0);
    CHECK(m.get_expert_utilization().at(ek(0, 1, 1)) == 0.f);
    o.total_loss.backward();
    // No compute: no gradient, or a zero one (a training step plans on the device: every expert gets a gradient).
    for (auto& [n, t] : m.expert_parameters(0, 5)) {
      const std::vector<float> g = t.grad().defined() ? t.grad().to_f32_vector() : std::vector<float>();
      CHECK_MESSAGE(std::all_of(g.begin(), g.end(), [](float v) { return v == 0.f; }), n);
    }
    // A node must keep top_k active children: cluster 1 (experts 4..7) with top_k_experts = 1 can lose 3.
    m.prune_expert(0, 4);
    m.prune_expert(0, 6);
    CHECK_THROWS_AS(m.prune_expert(0, 7), Error);
    CHECK_THROWS_AS(m.prune_expert(1, 0), Error);  // dense layer
    CoEOutput o2 = read_stats(m.forward(ids_tensor(4, 16, 13, 10)));
    for (int64_t e : {4, 5, 6}) CHECK(o2.layers[0].expert_rows[e] == 0);

    // Automatic: traffic under the threshold for `window` steps removes an expert (here most of them, as far
    // as every node keeps top_k children).
    CoEConfig a = small_lm();
    a.router = RouterKind::Flat;
    a.num_clusters = 1;
    a.experts_per_cluster = 4;
    a.top_k_clusters = 1;
    a.top_k_experts = 1;
    a.enable_expert_pruning = true;
    a.pruning_threshold = 0.6f;  // no expert of 4 can hold 60% of the traffic for long: all but one go
    a.pruning_window = 3;
    a.load_balancing_weight = 0.f;
    ClusterMoELM ma(a);
    AdamW opt(ma.named_parameters());
    for (int s = 0; s < 12; ++s) {
      ma.forward(ids_tensor(4, 16, 13, 11 + s), ids_tensor(4, 16, 13, 31 + s)).total_loss.backward();
      opt.step(1e-3f);
      ma.after_step();
      opt.zero_grad();
    }
    int64_t pruned = 0;
    for (int64_t e = 0; e < 4; ++e) pruned += ma.expert_pruned(0, e);
    CHECK(pruned == 3);
    CHECK(ma.get_model_summary().active_experts == 2);  // one left in each MoE layer (0 and 2)
    CoEOutput oa = read_stats(ma.forward(ids_tensor(4, 16, 13, 50)));
    for (int64_t e = 0; e < 4; ++e)
      if (ma.expert_pruned(0, e)) CHECK(oa.layers[0].expert_rows[e] == 0);
  }

  TEST_CASE("specialization: mutual information between expert choice and input token") {
    // Two experts; the router sends token id parity to expert id parity: I(E; V) = H(E) = log 2.
    CoEConfig c;
    c.d_model = 2;
    c.n_heads = 1;
    c.d_ff = 2;
    c.vocab_size = 4;
    c.router = RouterKind::Flat;
    c.num_clusters = 1;
    c.experts_per_cluster = 2;
    c.top_k_clusters = 1;
    c.top_k_experts = 1;
    Generator gen(91);
    MoELayer layer(c, 0, true, gen);
    layer.router.weights[0].copy_(Tensor::from_vector(std::vector<float>{5, 0, 0, 5}, {2, 2}));
    std::vector<int32_t> idv = {0, 1, 2, 3, 0, 1, 2, 3};
    const Tensor ids = Tensor::from_vector(idv, {8});
    std::vector<float> x;
    for (int32_t v : idv) x.push_back(v % 2 == 0 ? 1.f : 0.f), x.push_back(v % 2 == 1 ? 1.f : 0.f);
    layer.forward(Tensor::from_vector(x, {8, 2}), &ids, nullptr, false);
    CHECK(layer.mutual_information() == doctest::Approx(std::log(2.0)).epsilon(1e-5));
    for (float kl : layer.specialization()) CHECK(kl == doctest::Approx(std::log(2.0)).epsilon(1e-5));
    // Routing that ignores the token: no information.
    layer.reset_metrics();
    layer.router.weights[0].copy_(Tensor::from_vector(std::vector<float>{5, 5, 0, 0}, {2, 2}));
    layer.forward(Tensor::from_vector(x, {8, 2}), &ids, nullptr, false);
    CHECK(layer.mutual_information() == doctest::Approx(0.0));
  }

  TEST_CASE("every router kind and option trains end to end with finite losses and gradients") {
    struct V {
      const char* name;
      std::function<void(CoEConfig&)> edit;
    };
    std::vector<V> variants = {
        {"dense", [](CoEConfig& c) { c.router = RouterKind::Dense; }},
        {"flat", [](CoEConfig& c) { c.router = RouterKind::Flat; }},
        {"cluster", [](CoEConfig&) {}},
        {"tree", [](CoEConfig& c) {
           c.router = RouterKind::Tree;
           c.tree_branching = {2, 2, 4};
           c.tree_top_k = {2, 1, 2};
         }},
        {"ac", [](CoEConfig& c) {
           c.router = RouterKind::AC;
           c.moe_every = 1;
         }},
        {"cluster+ac levels", [](CoEConfig& c) {
           c.ac_levels = {0, 1};
           c.moe_every = 1;
         }},
        {"capacity+aux-free+adaptive+gelu+rmsnorm+dropout", [](CoEConfig& c) {
           c.capacity_factor = 1.0f;
           c.aux_free_bias = true;
           c.use_adaptive_routing = true;
           c.expert = ExpertKind::GELU;
           c.norm = NormKind::RMSNorm;
           c.dropout = 0.1f;
           c.routing_temperature = 0.5f;
           c.bias = true;
           c.tie_embeddings = false;
         }},
    };
    for (const V& v : variants) {
      CAPTURE(v.name);
      CoEConfig c = small_lm();
      v.edit(c);
      c.validate();
      ClusterMoELM m(c);
      AdamW opt(m.named_parameters());
      float first = 0.f, last = 0.f;
      for (int s = 0; s < 8; ++s) {
        CoEOutput o = m.forward(ids_tensor(2, 16, 13, 100), ids_tensor(2, 16, 13, 101));
        REQUIRE(std::isfinite(o.total_loss.item()));
        (s == 0 ? first : last) = o.loss.item();
        o.total_loss.backward();
        CHECK(std::isfinite(clip_grad_norm(m.named_parameters(), 1.f)));
        opt.step(3e-3f);
        m.after_step();
        opt.zero_grad();
      }
      CHECK(last < first);  // it learns the fixed batch
      m.eval();
      CHECK(std::isfinite(m.forward(ids_tensor(1, 16, 13, 102), ids_tensor(1, 16, 13, 103)).loss.item()));
    }
  }

  TEST_CASE("each model option has the effect it names") {
    Tensor ids = ids_tensor(2, 16, 13, 100), tg = ids_tensor(2, 16, 13, 101);
    auto build = [](const std::function<void(CoEConfig&)>& edit) {
      CoEConfig c = small_lm();
      edit(c);
      c.validate();
      return std::make_unique<ClusterMoELM>(c);
    };
    auto find = [](const NamedTensors& ts, const std::string& name) {
      for (auto& [n, t] : ts)
        if (n == name) return t;
      return Tensor();
    };
    auto max_abs = [](const Tensor& t) {
      double m = 0.0;
      if (t.defined())
        for (float v : t.to_f32_vector()) m = std::max(m, (double)std::fabs(v));
      return m;
    };
    auto one_step = [&](ClusterMoELM& m) {
      m.forward(ids, tg).total_loss.backward();
      m.after_step();
    };

    SUBCASE("capacity_factor drops slots in training only") {
      auto m = build([](CoEConfig& c) { c.capacity_factor = 0.5f; });
      CoEOutput o = read_stats(m->forward(ids, tg));
      for (int64_t l : {0, 2}) CHECK(o.layers[l].dropped_fraction >= 0.25f);  // at most half the slots fit
      m->eval();
      for (int64_t l : {0, 2}) CHECK(m->forward(ids, tg).layers[l].dropped_fraction == 0.f);
      auto off = build([](CoEConfig&) {});
      CHECK(read_stats(off->forward(ids, tg)).layers[0].dropped_fraction == 0.f);
    }
    SUBCASE("aux_free_bias moves the selection biases after a step; off, they stay 0") {
      for (bool on : {true, false}) {
        auto m = build([&](CoEConfig& c) { c.aux_free_bias = on; });
        one_step(*m);
        for (const char* n : {"blocks.0.moe.router.levels.0.aux_bias", "blocks.0.moe.router.levels.1.aux_bias"})
          CHECK_MESSAGE((max_abs(find(m->named_buffers(), n)) == doctest::Approx(on ? 1e-3 : 0.0)), n);
      }
    }
    SUBCASE("use_adaptive_routing adds a per-token gate that learns") {
      auto m = build([](CoEConfig& c) { c.use_adaptive_routing = true; });
      one_step(*m);
      Tensor w = find(m->named_parameters(), "blocks.0.moe.gate.weight");
      REQUIRE(w.defined());
      CHECK(max_abs(w.grad()) > 1e-6);
      CHECK_FALSE(find(build([](CoEConfig&) {})->named_parameters(), "blocks.0.moe.gate.weight").defined());
    }
    SUBCASE("expert = gelu: two matrices per expert, no w3") {
      auto g = build([](CoEConfig& c) { c.expert = ExpertKind::GELU; });
      auto s = build([](CoEConfig&) {});
      CHECK_FALSE(find(g->named_parameters(), "blocks.0.moe.experts.0.w3").defined());
      CHECK(find(s->named_parameters(), "blocks.0.moe.experts.0.w3").defined());
      CHECK(g->num_parameters() < s->num_parameters());
    }
    SUBCASE("norm = rmsnorm: no bias, x / rms(x) * w, and other logits than layernorm's on the same weights") {
      auto r = build([](CoEConfig& c) { c.norm = NormKind::RMSNorm; });
      auto l = build([](CoEConfig&) {});
      CHECK_FALSE(find(r->named_parameters(), "blocks.0.norm1.bias").defined());
      CHECK(find(l->named_parameters(), "blocks.0.norm1.bias").defined());
      for (auto& [n, t] : r->named_parameters()) {  // same seed: copy layernorm's weights over
        Tensor dst = t;
        dst.copy_(find(l->named_parameters(), n));
      }
      CHECK(r->forward(ids).logits.to_f32_vector() != l->forward(ids).logits.to_f32_vector());
      // The blocks' norms: x / sqrt(mean x^2 + eps) * w, not centred (rows with a non-zero mean tell them apart).
      Norm rms(NormKind::RMSNorm, 6), ln(NormKind::LayerNorm, 6);
      Tensor x = uniform({3, 6}, 105, -0.5f, 1.5f);
      std::vector<float> xv = x.to_f32_vector(), ref;
      for (int64_t t = 0; t < 3; ++t) {
        double ms = 0.0;
        for (int64_t q = 0; q < 6; ++q) ms += (double)xv[t * 6 + q] * xv[t * 6 + q] / 6.0;
        for (int64_t q = 0; q < 6; ++q) ref.push_back((float)(xv[t * 6 + q] / std::sqrt(ms + 1e-6)));
      }
      CHECK_CLOSE(rms.forward(x), ref, 1e-5f, 1e-4f);
      CHECK(cm::test::first_mismatch(ln.forward(x).to_f32_vector(), ref, 1e-2f, 1e-2f) >= 0);
    }
    SUBCASE("dropout: two training forwards differ, evaluation is deterministic; without it training is too") {
      auto d = build([](CoEConfig& c) { c.dropout = 0.1f; });
      CHECK(d->forward(ids).logits.to_f32_vector() != d->forward(ids).logits.to_f32_vector());
      d->eval();
      CHECK(d->forward(ids).logits.to_f32_vector() == d->forward(ids).logits.to_f32_vector());
      auto n = build([](CoEConfig&) {});
      CHECK(n->forward(ids).logits.to_f32_vector() == n->forward(ids).logits.to_f32_vector());
    }
    SUBCASE("routing_temperature: lower is sharper (router entropy falls), higher is flatter") {
      std::vector<float> h;
      for (float temp : {0.5f, 1.f, 2.f}) {
        auto m = build([&](CoEConfig& c) {
          c.routing_temperature = temp;
          c.init_std = 0.5f;  // logits far enough from 0 for the temperature to matter
        });
        h.push_back(read_stats(m->forward(ids)).layers[0].router_entropy);
      }
      MESSAGE("router entropy at temperature 0.5, 1, 2: ", h[0], " ", h[1], " ", h[2]);
      CHECK(h[0] < h[1] - 0.05f);
      CHECK(h[1] < h[2] - 0.05f);
    }
    SUBCASE("bias: every linear layer gets a bias that receives a gradient") {
      auto m = build([](CoEConfig& c) { c.bias = true; });
      one_step(*m);
      for (const char* n :
           {"blocks.0.attn.qkv.bias", "blocks.0.attn.proj.bias", "blocks.1.ffn.b1", "blocks.0.norm1.bias"}) {
        Tensor b = find(m->named_parameters(), n);
        REQUIRE_MESSAGE(b.defined(), n);
        CHECK_MESSAGE(max_abs(b.grad()) > 0.0, n);
      }
      CHECK_FALSE(find(build([](CoEConfig&) {})->named_parameters(), "blocks.0.attn.qkv.bias").defined());
    }
    SUBCASE("tie_embeddings = false: a separate LM head decides the logits") {
      auto m = build([](CoEConfig& c) { c.tie_embeddings = false; });
      Tensor head = find(m->named_parameters(), "lm_head.weight");
      REQUIRE(head.defined());
      std::vector<float> before = m->forward(ids).logits.to_f32_vector();
      head.fill_(0.f);  // a zero head: every logit 0, whatever the embedding
      std::vector<float> after = m->forward(ids).logits.to_f32_vector();
      CHECK(after != before);
      CHECK(std::all_of(after.begin(), after.end(), [](float v) { return v == 0.f; }));
    }
    SUBCASE("router kinds: the experts per token and clusters each kind implies") {
      auto dense = build([](CoEConfig& c) { c.router = RouterKind::Dense; });
      CoEOutput od = dense->forward(ids);
      for (const auto& l : od.layers) CHECK(l.num_experts == 1);
      auto tree = build([](CoEConfig& c) {
        c.router = RouterKind::Tree;
        c.tree_branching = {2, 2, 4};
        c.tree_top_k = {2, 1, 2};
      });
      CoEOutput ot = read_stats(tree->forward(ids));
      int64_t rows = 0;
      for (int64_t r : ot.layers[0].expert_rows) rows += r;
      CHECK(rows == 32 * 4);  // B*T tokens x K = 2*1*2
      CHECK(tree->get_model_summary().num_clusters == 2);
      auto flat = build([](CoEConfig& c) { c.router = RouterKind::Flat; });
      CHECK(flat->get_model_summary().num_clusters == 1);
      // AC: the running scale of layer 1 (labelled by layer 0) moves from 1 in a training forward.
      auto ac = build([](CoEConfig& c) {
        c.router = RouterKind::AC;
        c.moe_every = 1;
      });
      Tensor scale = find(ac->named_buffers(), "blocks.1.moe.router.ac_scale");
      REQUIRE(scale.defined());
      CHECK(max_abs(add(scale, -1.f)) == 0.0);
      ac->forward(ids);
      // The running scale follows on the model's device; reading the buffers pulls it into the host buffer.
      CHECK(max_abs(add(scale, -1.f)) == 0.0);
      scale = find(ac->named_buffers(), "blocks.1.moe.router.ac_scale");
      CHECK(max_abs(add(scale, -1.f)) > 1e-3);
    }
  }

  TEST_CASE("create_coe_model builds the seed API's model") {
    auto m = create_coe_model(32, 2, 2, 4, 50);
    CHECK(m->config().d_model == 32);
    CHECK(m->config().num_experts() == 8);
    CHECK(m->get_model_summary().num_clusters == 2);
    CHECK(m->forward(ids_tensor(1, 5, 50, 104)).logits.shape() == Shape{1, 5, 50});
  }

  // The task loss alone (cross-entropy; auxiliary losses off; weight decay plays no part in a gradient) must reach
  // every level's router: a level that gets nothing from it chooses its children at random with respect to the
  // task. For each gate design, the routers this leaves without a task gradient are exactly the ones stated in
  // config.h: when a token has K > 1 experts, renorm_path loses every level at which the token still keeps a single
  // node (top-k 1 there and above: its probability is a common factor of the K leaves and cancels); group_limited never uses the upper levels' weights; product and
  // renorm_last reach every level for every router kind and top-k.
  TEST_CASE("every level's router gets a gradient from the task loss alone, per gate design and top-k") {
    struct Case {
      const char* name;
      RouterKind kind;
      std::vector<int64_t> b, k;  // tree / cluster layout
      std::vector<int64_t> ac;    // ac_levels
    };
    const std::vector<Case> cases = {
        {"flat top1", RouterKind::Flat, {8}, {1}, {}},         {"flat top2", RouterKind::Flat, {8}, {2}, {}},
        {"cluster [1,1]", RouterKind::Cluster, {4, 2}, {1, 1}, {}},
        {"cluster [1,2]", RouterKind::Cluster, {4, 2}, {1, 2}, {}},
        {"cluster [2,1]", RouterKind::Cluster, {4, 2}, {2, 1}, {}},
        {"cluster [2,2]", RouterKind::Cluster, {4, 2}, {2, 2}, {}},
        {"tree [1,1,2]", RouterKind::Tree, {2, 2, 2}, {1, 1, 2}, {}},
        {"tree [2,1,1]", RouterKind::Tree, {2, 2, 2}, {2, 1, 1}, {}},
        {"tree [1,2,1]", RouterKind::Tree, {2, 2, 2}, {1, 2, 1}, {}},
        {"tree [1,1,1]", RouterKind::Tree, {2, 2, 2}, {1, 1, 1}, {}},
        {"ac top2", RouterKind::AC, {8}, {2}, {}},
        {"ac cluster [1,2]", RouterKind::Cluster, {4, 2}, {1, 2}, {1}},
    };
    for (GateMode g : {GateMode::Product, GateMode::RenormPath, GateMode::RenormLast, GateMode::GroupLimited})
      for (const Case& cs : cases) {
        const std::string mode = gate_mode_name(g), name = cs.name;
        CAPTURE(mode);
        CAPTURE(name);
        CoEConfig c = small_lm();
        c.n_layers = 1;
        c.moe_every = 1;
        c.router = cs.kind;
        c.gate_mode = g;
        c.load_balancing_weight = c.router_z_loss_weight = c.diversity_weight = 0.f;
        if (cs.kind == RouterKind::Tree) {
          c.tree_branching = cs.b;
          c.tree_top_k = cs.k;
          c.num_clusters = 2;
          c.experts_per_cluster = 4;
        } else if (cs.kind == RouterKind::Cluster) {
          c.num_clusters = cs.b[0];
          c.experts_per_cluster = cs.b[1];
          c.top_k_clusters = cs.k[0];
          c.top_k_experts = cs.k[1];
        } else {
          c.num_clusters = 1;
          c.experts_per_cluster = cs.b[0];
          c.top_k_clusters = 1;
          c.top_k_experts = cs.k[0];
        }
        c.ac_levels = cs.ac;
        if (g == GateMode::GroupLimited && !cs.ac.empty() && cs.ac[0] != (int64_t)cs.b.size() - 1) continue;
        c.validate();
        ClusterMoELM m(c);
        CoEOutput o = m.forward(ids_tensor(4, 16, 13, 31), ids_tensor(4, 16, 13, 32));
        CHECK(o.aux_loss.to_f32_vector()[0] == 0.f);
        o.loss.backward();
        // Norm of each level's gradient, relative to the largest level's: rounding leaves about 1e-7 where the
        // gradient cancels exactly; a level that learns sits above 1e-3 here.
        const int64_t D = (int64_t)cs.b.size();
        int64_t K = 1;
        for (int64_t v : cs.k) K *= v;
        std::vector<double> norm((size_t)D, 0.0);
        for (auto& [n, t] : m.named_parameters())
          for (int64_t l = 0; l < D; ++l)
            if (n == "blocks.0.moe.router.levels." + std::to_string(l) + ".weight" && t.grad().defined())
              for (float v : t.grad().to_f32_vector()) norm[l] += (double)v * v;
        const double top = std::sqrt(*std::max_element(norm.begin(), norm.end()));
        REQUIRE(top > 0.0);
        int64_t kept = 1;  // nodes a token keeps at level l
        for (int64_t l = 0; l < D; ++l) {
          CAPTURE(l);
          kept *= cs.k[l];
          bool expect_none = false;
          if (g == GateMode::RenormPath) expect_none = kept == 1 && K > 1;
          if (g == GateMode::GroupLimited) expect_none = l < D - 1;
          const double rel = std::sqrt(norm[l]) / top;
          if (expect_none)
            CHECK(rel < 1e-5);
          else
            CHECK(rel > 1e-3);
        }
      }
  }
}
