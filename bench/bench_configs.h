// The model configurations the end-to-end benches compare, shared by bench/train_bench.cpp and bench/dump_batch.cpp.
//
// Equal active compute: every configuration spends the same FFN FLOPs per token. The dense model's FFN has width F;
// the MoE models have N = 16 experts of width F / 2 and send each token to K = 2 of them, so the active FFN
// parameters per token are equal (2 x F/2 = F) and only the routing differs:
//   dense       one FFN of width F                                   (no router)
//   flat        [16], top 2                                          (Switch / Mixtral style)
//   cluster     [4, 4], top [1, 2]: 1 cluster, then 2 of its experts (ClusterMoE, two levels)
//   tree        [2, 2, 4], top [1, 1, 2]                             (a deeper tree, same 16 leaves)
//   ac          [16], top 2 with the Adaptive Clustering transform   (DESIGN.md 4.7)
//   ac_cluster  [4, 4], top [1, 2] with AC on both levels            (AC inside ClusterMoE)
// The routers add D levels of (kept nodes x b x C) parameters: under 0.3% of the active parameters here.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "engine/check.h"
#include "model/config.h"

namespace cm::bench {

struct ModelSize {
  int64_t d_model = 128;  // C
  int64_t n_layers = 4;   // L
  int64_t n_heads = 4;    // H
  int64_t d_ff = 512;     // F: the dense FFN's width; each expert gets F / 2
  int64_t vocab = 65;     // V (tinyshakespeare's byte vocabulary)
  int64_t seq_len = 64;   // T
};

// train_lm's cpu preset (nanoGPT's CPU shakespeare_char shape) and shakespeare preset (the GPU one).
inline ModelSize cpu_size() { return ModelSize{}; }
inline ModelSize gpu_size() { return ModelSize{384, 6, 6, 1536, 65, 256}; }

inline const std::vector<std::string>& config_names() {
  static const std::vector<std::string> names = {"dense", "flat", "cluster", "tree", "ac", "ac_cluster"};
  return names;
}

inline CoEConfig make_config(const std::string& name, const ModelSize& s, uint64_t seed = 1337) {
  CoEConfig c;
  c.d_model = s.d_model;
  c.n_layers = s.n_layers;
  c.n_heads = s.n_heads;
  c.vocab_size = s.vocab;
  c.seq_len = s.seq_len;
  c.seed = seed;
  c.dropout = 0.f;
  c.d_ff = s.d_ff / 2;
  c.num_clusters = 4;
  c.experts_per_cluster = 4;
  c.top_k_clusters = 1;
  c.top_k_experts = 2;
  if (name == "dense") {
    c.router = RouterKind::Dense;
    c.d_ff = s.d_ff;
  } else if (name == "flat") {
    c.router = RouterKind::Flat;  // [16], top 1 * 2
  } else if (name == "cluster") {
    c.router = RouterKind::Cluster;
  } else if (name == "tree") {
    c.router = RouterKind::Tree;
    c.tree_branching = {2, 2, 4};
    c.tree_top_k = {1, 1, 2};
  } else if (name == "ac") {
    c.router = RouterKind::AC;
  } else if (name == "ac_cluster") {
    c.router = RouterKind::Cluster;
    c.ac_levels = {0, 1};
  } else {
    fail("unknown bench config '", name, "': expected dense, flat, cluster, tree, ac or ac_cluster");
  }
  c.validate();
  return c;
}

}  // namespace cm::bench
