// The routing bias as the MoE layer computed it on the host before kernels/route.h route_bias_forward took over
// (model/moe.cpp node_reliability() then routing_bias(), kept here verbatim in their arithmetic): the reference the
// kernel and the layer are checked against, bit for bit.
#pragma once
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace cm::test {

// Per level l of a tree with branching [b_0 .. b_{D-1}]: [n_l * b_l] (n_l = prod of the branching above). rel, use,
// pruned [N] (pruned: 1 = pruned). Levels the former code left without a bias come back as zeros (the router adds
// nothing there either way).
inline std::vector<std::vector<float>> host_routing_bias(const std::vector<int64_t>& branching,
                                                         const std::vector<float>& rel_e,
                                                         const std::vector<float>& use_e,
                                                         const std::vector<float>& pruned, bool reliability) {
  const int64_t D = (int64_t)branching.size();
  std::vector<int64_t> nodes((size_t)D);
  int64_t N = 1;
  for (int64_t l = 0; l < D; ++l) {
    nodes[(size_t)l] = N;
    N *= branching[(size_t)l];
  }
  std::vector<std::vector<float>> out((size_t)D);
  if (reliability) {  // node_reliability()
    std::vector<std::vector<float>> rel((size_t)D), use((size_t)D);
    rel[D - 1] = rel_e;
    use[D - 1] = use_e;
    for (int64_t l = D - 2; l >= 0; --l) {
      const int64_t n = nodes[l + 1], b = branching[l + 1];
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
    for (int64_t l = 0; l < D; ++l) {
      out[l].resize(rel[l].size());
      for (size_t i = 0; i < rel[l].size(); ++i) out[l][i] = std::log(rel[l][i]);
    }
  }
  bool any_pruned = false;
  for (float p : pruned) any_pruned = any_pruned || p != 0.f;
  if (any_pruned) {
    std::vector<float>& last = out[D - 1];
    if (last.empty()) last.assign((size_t)N, 0.f);
    for (int64_t e = 0; e < N; ++e)
      if (pruned[e] != 0.f) last[e] = -std::numeric_limits<float>::infinity();
  }
  for (int64_t l = 0; l < D; ++l)
    if (out[l].empty()) out[l].assign((size_t)(nodes[l] * branching[l]), 0.f);
  return out;
}

}  // namespace cm::test
