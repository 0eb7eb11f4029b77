// CoEConfig: derived tree per router kind, validation naming the field, string-map round trip.
#include <doctest/doctest.h>

#include <functional>
#include <string>

#include "model/coe.h"
#include "model/config.h"

using namespace cm;

namespace {
// validate() must throw cm::Error and its message must name "CoEConfig.<field>".
void expect_invalid(const std::function<void(CoEConfig&)>& edit, const std::string& field) {
  CoEConfig c;
  edit(c);
  std::string msg;
  try {
    c.validate();
  } catch (const Error& e) {
    msg = e.what();
  }
  CHECK_MESSAGE(msg.find("CoEConfig." + field + " =") != std::string::npos,
                "expected a message naming ", field, ", got '", msg, "'");
}
}  // namespace

TEST_SUITE("config") {
  TEST_CASE("defaults validate and resolve the ClusterMoE tree") {
    CoEConfig c;
    CHECK_NOTHROW(c.validate());
    CHECK(c.branching() == std::vector<int64_t>{4, 4});
    CHECK(c.top_k() == std::vector<int64_t>{2, 1});
    CHECK(c.num_experts() == 16);
    CHECK(c.experts_per_token() == 2);
  }

  TEST_CASE("router kinds resolve to their trees") {
    CoEConfig c;
    c.router = RouterKind::Dense;
    CHECK(c.branching() == std::vector<int64_t>{1});
    CHECK(c.num_experts() == 1);
    CHECK_FALSE(c.is_moe_layer(0));
    c.router = RouterKind::Flat;
    CHECK(c.branching() == std::vector<int64_t>{16});
    CHECK(c.top_k() == std::vector<int64_t>{2});
    c.router = RouterKind::AC;
    CHECK(c.level_uses_ac(0));
    c.router = RouterKind::Tree;
    c.tree_branching = {2, 2, 4};
    c.tree_top_k = {1, 2, 1};
    CHECK_NOTHROW(c.validate());
    CHECK(c.num_experts() == 16);
    CHECK(c.experts_per_token() == 2);
    CHECK_FALSE(c.level_uses_ac(1));
    c.ac_levels = {1};
    CHECK(c.level_uses_ac(1));
    c.moe_every = 2;
    CHECK(c.is_moe_layer(0));
    CHECK_FALSE(c.is_moe_layer(1));
    CHECK(c.is_moe_layer(2));
  }

  TEST_CASE("every invalid setting is rejected naming the field") {
    expect_invalid([](CoEConfig& c) { c.d_model = 0; }, "d_model");
    expect_invalid([](CoEConfig& c) { c.d_model = -8; }, "d_model");
    expect_invalid([](CoEConfig& c) { c.d_model = 130; }, "d_model");  // not divisible by 4 heads
    expect_invalid([](CoEConfig& c) { c.n_layers = 0; }, "n_layers");
    expect_invalid([](CoEConfig& c) { c.n_heads = -1; }, "n_heads");
    expect_invalid([](CoEConfig& c) { c.d_ff = 0; }, "d_ff");
    expect_invalid([](CoEConfig& c) { c.vocab_size = 0; }, "vocab_size");
    expect_invalid([](CoEConfig& c) { c.seq_len = -3; }, "seq_len");
    expect_invalid([](CoEConfig& c) { c.dropout = 1.f; }, "dropout");
    expect_invalid([](CoEConfig& c) { c.dropout = -0.1f; }, "dropout");
    expect_invalid([](CoEConfig& c) { c.init_std = 0.f; }, "init_std");
    expect_invalid([](CoEConfig& c) { c.num_clusters = 0; }, "num_clusters");
    expect_invalid([](CoEConfig& c) { c.experts_per_cluster = -2; }, "experts_per_cluster");
    expect_invalid([](CoEConfig& c) { c.top_k_clusters = 0; }, "top_k_clusters");
    expect_invalid([](CoEConfig& c) { c.top_k_experts = 0; }, "top_k_experts");
    expect_invalid([](CoEConfig& c) { c.top_k_clusters = 5; }, "top_k_clusters");  // > 4 clusters
    expect_invalid([](CoEConfig& c) { c.top_k_experts = 5; }, "top_k_experts");    // > 4 per cluster
    expect_invalid(
        [](CoEConfig& c) {
          c.router = RouterKind::Flat;
          c.top_k_clusters = 4;
          c.top_k_experts = 5;
        },
        "top_k_experts");
    expect_invalid(
        [](CoEConfig& c) {
          c.router = RouterKind::Tree;
          c.tree_branching = {4, 2};  // product 8, but 16 experts
          c.tree_top_k = {1, 1};
        },
        "tree_branching");
    expect_invalid(
        [](CoEConfig& c) {
          c.router = RouterKind::Tree;
          c.tree_branching = {4, 4};
          c.tree_top_k = {1, 5};  // top-k above the branching
        },
        "tree_top_k");
    expect_invalid(
        [](CoEConfig& c) {
          c.router = RouterKind::Tree;
          c.tree_branching = {4, 4};
          c.tree_top_k = {1};  // one entry per level
        },
        "tree_top_k");
    expect_invalid(
        [](CoEConfig& c) {
          c.router = RouterKind::Tree;
          c.tree_branching = {};
        },
        "tree_branching");
    expect_invalid(
        [](CoEConfig& c) {
          c.router = RouterKind::Tree;
          c.tree_branching = {-4, -4};
          c.tree_top_k = {1, 1};
        },
        "tree_branching");
    expect_invalid([](CoEConfig& c) { c.ac_levels = {2}; }, "ac_levels");  // the cluster tree has levels 0, 1
    expect_invalid(
        [](CoEConfig& c) {
          c.gate_mode = GateMode::GroupLimited;  // routes with the last level only: AC on level 0 would do nothing
          c.ac_levels = {0, 1};
        },
        "ac_levels");
    expect_invalid([](CoEConfig& c) { c.routing_temperature = 0.f; }, "routing_temperature");
    expect_invalid([](CoEConfig& c) { c.moe_every = 0; }, "moe_every");
    expect_invalid([](CoEConfig& c) { c.capacity_factor = -1.f; }, "capacity_factor");
    expect_invalid([](CoEConfig& c) { c.load_balancing_weight = -0.01f; }, "load_balancing_weight");
    expect_invalid([](CoEConfig& c) { c.router_z_loss_weight = -1.f; }, "router_z_loss_weight");
    expect_invalid([](CoEConfig& c) { c.diversity_weight = -1.f; }, "diversity_weight");
    expect_invalid([](CoEConfig& c) { c.aux_free_bias_rate = -1.f; }, "aux_free_bias_rate");
    expect_invalid([](CoEConfig& c) { c.reliability_decay = 1.f; }, "reliability_decay");
    expect_invalid([](CoEConfig& c) { c.reliability_min = 0.f; }, "reliability_min");
    expect_invalid([](CoEConfig& c) { c.reliability_outlier_factor = 1.f; }, "reliability_outlier_factor");
    expect_invalid([](CoEConfig& c) { c.pruning_threshold = 1.f; }, "pruning_threshold");
    expect_invalid([](CoEConfig& c) { c.pruning_window = 0; }, "pruning_window");
  }

  TEST_CASE("the model constructor and create_coe_model reject an invalid config") {
    CoEConfig c;
    c.n_heads = 3;
    CHECK_THROWS_AS(ClusterMoELM m(c), Error);
    CHECK_THROWS_AS(create_coe_model(30, 1, 2, 2, 16, 4), Error);  // 30 % 4 != 0
    CHECK_THROWS_AS(make_coe_config(32, 0, 2, 2, 16), Error);
  }

  TEST_CASE("string map round trip, unknown keys and bad values") {
    CoEConfig c;
    c.router = RouterKind::Tree;
    c.tree_branching = {2, 8};
    c.tree_top_k = {2, 1};
    c.ac_levels = {0, 1};
    c.routing_temperature = 0.7f;
    c.capacity_factor = 1.25f;
    c.expert = ExpertKind::GELU;
    c.norm = NormKind::RMSNorm;
    c.use_reliability = false;
    c.gate_mode = GateMode::RenormLast;
    c.seed = 12345678901ull;
    auto m = c.to_map();
    CHECK(m.at("gate_mode") == "renorm_last");
    CHECK(m.count("renormalize_gates") == 0);
    CHECK(m.at("tree_branching") == "2,8");
    CHECK(m.at("router") == "tree");
    CoEConfig d = CoEConfig::from_map(m);
    CHECK(d.to_map() == m);
    CHECK(d.routing_temperature == c.routing_temperature);
    CHECK(d.seed == c.seed);

    auto bad = m;
    bad["no_such_field"] = "1";
    CHECK_THROWS_AS(CoEConfig::from_map(bad), Error);
    bad = m;
    bad["d_model"] = "12x";
    try {
      CoEConfig::from_map(bad);
      FAIL("accepted d_model = 12x");
    } catch (const Error& e) {
      CHECK(std::string(e.what()).find("d_model") != std::string::npos);
    }
    bad = m;
    bad["router"] = "mixture";
    CHECK_THROWS_AS(CoEConfig::from_map(bad), Error);
    bad = m;
    bad["tree_top_k"] = "2,9";  // parses, then validate() rejects
    CHECK_THROWS_AS(CoEConfig::from_map(bad), Error);

    // Gate designs: every name round-trips; a bad one is named; the key of older checkpoints
    // (renormalize_gates) reads as the design it meant, and both keys at once are refused.
    for (GateMode g : {GateMode::Product, GateMode::RenormPath, GateMode::RenormLast, GateMode::GroupLimited}) {
      auto mg = m;
      mg["gate_mode"] = gate_mode_name(g);
      mg["ac_levels"] = "1";  // group_limited: AC on the last level only
      CHECK(CoEConfig::from_map(mg).gate_mode == g);
    }
    bad = m;
    bad["gate_mode"] = "renorm";
    CHECK_THROWS_WITH_AS(CoEConfig::from_map(bad), doctest::Contains("gate mode 'renorm'"), Error);
    auto old = m;
    old.erase("gate_mode");
    old["renormalize_gates"] = "true";
    CHECK(CoEConfig::from_map(old).gate_mode == GateMode::RenormPath);
    old["renormalize_gates"] = "false";
    CHECK(CoEConfig::from_map(old).gate_mode == GateMode::Product);
    old["renormalize_gates"] = "maybe";
    CHECK_THROWS_WITH_AS(CoEConfig::from_map(old), doctest::Contains("renormalize_gates"), Error);
    old["renormalize_gates"] = "true";
    old["gate_mode"] = "product";
    CHECK_THROWS_WITH_AS(CoEConfig::from_map(old), doctest::Contains("renormalize_gates"), Error);
  }
}
