// The tree router against brute force: selection per level, gates, the flat case as the standard top-k MoE,
// counted routing FLOPs, capacity, the routing losses in closed form, and the AC router on a Gaussian mixture.
#include <algorithm>
#include <cmath>
#include <numeric>
#include <set>

#include "kernels/gemm.h"
#include "kernels/route.h"
#include "engine/host_sync.h"
#include "model/moe.h"
#include "model/router.h"
#include "tests/helpers.h"

using namespace cm;
using cm::test::uniform;

namespace {

CoEConfig tree_config(int64_t C, std::vector<int64_t> b, std::vector<int64_t> k) {
  CoEConfig c;
  c.d_model = C;
  c.n_heads = 1;
  c.router = RouterKind::Tree;
  c.tree_branching = b;
  c.tree_top_k = k;
  int64_t n = 1;
  for (int64_t v : b) n *= v;
  c.num_clusters = b[0];
  c.experts_per_cluster = n / b[0];
  c.init_std = 1.0f;  // well-separated logits: no near-ties on random inputs
  c.use_reliability = false;
  c.validate();
  return c;
}

// Brute force: every node's full softmax, top-k per node by recursion, gate = product along the path.
struct BruteRoute {
  std::vector<int32_t> leaves;  // [T*K] in the router's order (the DFS order of the selections)
  std::vector<double> gates;    // [T*K] products of conditionals (not renormalised)
  std::vector<double> parent;   // [T*K] the product of the conditionals above the leaf's level
};
BruteRoute brute_route(const TreeRouter& r, const Tensor& h, float temperature) {
  const int64_t T = h.size(0), C = h.size(1), D = r.depth();
  std::vector<float> hv = h.to_f32_vector();
  std::vector<std::vector<float>> W;
  for (const Tensor& w : r.weights) W.push_back(w.to_f32_vector());
  BruteRoute out;
  std::function<void(int64_t, int64_t, int64_t, double)> rec = [&](int64_t t, int64_t l, int64_t node,
                                                                   double path) {
    const int64_t b = r.branching[l], k = r.top_k[l];
    std::vector<double> z((size_t)b);
    double mx = -1e300, s = 0.0;
    for (int64_t c = 0; c < b; ++c) {
      double acc = 0.0;
      for (int64_t q = 0; q < C; ++q) acc += (double)hv[t * C + q] * W[l][(node * b + c) * C + q];
      z[c] = acc / temperature;
      mx = std::max(mx, z[c]);
    }
    for (double& v : z) s += (v = std::exp(v - mx));
    for (double& v : z) v /= s;
    std::vector<int64_t> idx((size_t)b);
    std::iota(idx.begin(), idx.end(), 0);
    std::stable_sort(idx.begin(), idx.end(), [&](int64_t a, int64_t c) { return z[a] > z[c]; });
    for (int64_t j = 0; j < k; ++j) {
      int64_t child = node * b + idx[j];
      if (l == D - 1) {
        out.leaves.push_back((int32_t)child);
        out.gates.push_back(path * z[idx[j]]);
        out.parent.push_back(path);
      } else {
        rec(t, l + 1, child, path * z[idx[j]]);
      }
    }
  };
  for (int64_t t = 0; t < T; ++t) rec(t, 0, 0, 1.0);
  return out;
}

// Brute force for gate_mode group_limited: one softmax over all N leaves (the last level's weights), then per level
// the top-k children of each kept node by the total probability of their leaves; gate = the leaf's probability.
BruteRoute brute_grouped(const TreeRouter& r, const Tensor& h) {
  const int64_t T = h.size(0), C = h.size(1), D = r.depth();
  int64_t N = 1;
  for (int64_t b : r.branching) N *= b;
  std::vector<float> hv = h.to_f32_vector(), W = r.weights[D - 1].to_f32_vector();
  BruteRoute out;
  for (int64_t t = 0; t < T; ++t) {
    std::vector<double> p((size_t)N);
    double mx = -1e300, s = 0.0;
    for (int64_t e = 0; e < N; ++e) {
      double acc = 0.0;
      for (int64_t q = 0; q < C; ++q) acc += (double)hv[t * C + q] * W[e * C + q];
      mx = std::max(mx, p[e] = acc);
    }
    for (double& v : p) s += (v = std::exp(v - mx));
    for (double& v : p) v /= s;
    std::function<void(int64_t, int64_t, int64_t)> rec = [&](int64_t l, int64_t node, int64_t span) {
      const int64_t b = r.branching[l], k = r.top_k[l], child_span = span / b;
      std::vector<double> mass((size_t)b, 0.0);
      for (int64_t c = 0; c < b; ++c)
        for (int64_t i = 0; i < child_span; ++i) mass[c] += p[(node * b + c) * child_span + i];
      std::vector<int64_t> idx((size_t)b);
      std::iota(idx.begin(), idx.end(), 0);
      std::stable_sort(idx.begin(), idx.end(), [&](int64_t a, int64_t c) { return mass[a] > mass[c]; });
      for (int64_t j = 0; j < k; ++j) {
        const int64_t child = node * b + idx[j];
        if (l == D - 1) {
          out.leaves.push_back((int32_t)child);
          out.gates.push_back(p[child]);
        } else {
          rec(l + 1, child, child_span);
        }
      }
    };
    rec(0, 0, N);
  }
  return out;
}

// Naive SwiGLU expert in double: w2 (silu(w1 x) * (w3 x)).
std::vector<double> expert_ref(const ExpertFFN& e, const float* x, int64_t C) {
  std::vector<float> w1 = e.w1.w.to_f32_vector(), w2 = e.w2.w.to_f32_vector(), w3 = e.w3.w.to_f32_vector();
  const int64_t F = e.w1.w.size(0);
  std::vector<double> hdn((size_t)F), y((size_t)C, 0.0);
  for (int64_t f = 0; f < F; ++f) {
    double a = 0.0, b = 0.0;
    for (int64_t q = 0; q < C; ++q) {
      a += (double)w1[f * C + q] * x[q];
      b += (double)w3[f * C + q] * x[q];
    }
    hdn[f] = a / (1.0 + std::exp(-a)) * b;
  }
  for (int64_t q = 0; q < C; ++q)
    for (int64_t f = 0; f < F; ++f) y[q] += (double)w2[q * F + f] * hdn[f];
  return y;
}

// The smallest gap, over every token and every node it reaches, between the k-th and (k+1)-th largest logit
// (plus the logit bias rb, log r): a finite-difference step that moves no logit by more than half of it cannot
// flip a selection (nor the counts f of the load-balance loss). Only levels with k < b have a gap.
double min_selection_gap(const TreeRouter& r, const Tensor& h, const std::vector<std::vector<float>>& lbias = {}) {
  const int64_t T = h.size(0), C = h.size(1);
  std::vector<float> hv = h.to_f32_vector();
  double gap = 1e300;
  std::function<void(int64_t, int64_t, int64_t)> rec = [&](int64_t t, int64_t l, int64_t node) {
    if (l == r.depth()) return;
    std::vector<float> W = r.weights[l].to_f32_vector();
    const int64_t b = r.branching[l], k = r.top_k[l];
    std::vector<std::pair<double, int64_t>> z((size_t)b);
    for (int64_t j = 0; j < b; ++j) {
      double v = l < (int64_t)lbias.size() && !lbias[l].empty() ? lbias[l][node * b + j] : 0.0;
      for (int64_t q = 0; q < C; ++q) v += (double)hv[t * C + q] * W[(node * b + j) * C + q];
      z[j] = {v, j};
    }
    std::sort(z.begin(), z.end(), std::greater<std::pair<double, int64_t>>());
    if (k < b) gap = std::min(gap, z[k - 1].first - z[k].first);
    for (int64_t j = 0; j < k; ++j) rec(t, l + 1, node * b + z[j].second);
  };
  for (int64_t t = 0; t < T; ++t) rec(t, 0, 0);
  return gap;
}

// Largest |element| of a gradient (0 when undefined).
double max_abs_grad(const Tensor& t) {
  if (!t.grad().defined()) return 0.0;
  double m = 0.0;
  for (float v : t.grad().to_f32_vector()) m = std::max(m, (double)std::fabs(v));
  return m;
}

}  // namespace

TEST_SUITE("routing") {
  TEST_CASE("selected experts are the true top-k per level, gates the products along the path") {
    struct Case {
      std::vector<int64_t> b, k;
      float temp;
    };
    for (const Case& cs : {Case{{4, 3, 2}, {2, 2, 1}, 1.0f}, Case{{3, 5}, {2, 3}, 0.7f}, Case{{6}, {3}, 1.5f},
                           Case{{2, 2, 2, 2}, {1, 2, 1, 2}, 1.0f}}) {
      CAPTURE(cs.b.size());
      CoEConfig c = tree_config(8, cs.b, cs.k);
      c.routing_temperature = cs.temp;
      c.gate_mode = GateMode::Product;
      Generator gen(21);
      TreeRouter r(c, gen);
      Tensor h = uniform({13, 8}, 22);
      Routing rt = r.route(h, RouterBias{}, nullptr, false);
      BruteRoute bf = brute_route(r, h, cs.temp);
      CHECK(rt.K == c.experts_per_token());
      CHECK(rt.expert == bf.leaves);
      std::vector<float> ref(bf.gates.begin(), bf.gates.end());
      CHECK_CLOSE(rt.gate, ref, 1e-6f, 1e-5f);
    }
  }

  TEST_CASE("gate designs: renorm_path, renorm_last and group_limited gates equal their formulas") {
    struct Case {
      std::vector<int64_t> b, k;
    };
    for (const Case& cs : {Case{{4, 3, 2}, {2, 2, 1}}, Case{{3, 5}, {2, 3}}, Case{{6}, {3}},
                           Case{{2, 2, 2, 2}, {1, 2, 1, 2}}, Case{{4, 4}, {1, 2}}}) {
      CAPTURE(cs.b.size());
      CAPTURE(cs.k[0]);
      const int64_t D = (int64_t)cs.b.size(), k_last = cs.k.back();
      Tensor h = uniform({13, 8}, 22);
      std::vector<Routing> rt;
      std::vector<TreeRouter> routers;
      for (GateMode g : {GateMode::Product, GateMode::RenormPath, GateMode::RenormLast, GateMode::GroupLimited}) {
        CoEConfig c = tree_config(8, cs.b, cs.k);
        c.gate_mode = g;
        Generator gen(21);  // the same weights for every design
        routers.emplace_back(c, gen);
        rt.push_back(routers.back().route(h, RouterBias{}, nullptr, false));
      }
      BruteRoute bf = brute_route(routers[0], h, 1.f);
      const int64_t K = rt[0].K, T = rt[0].T;
      std::vector<float> path(bf.gates.begin(), bf.gates.end()), whole((size_t)(T * K)), last((size_t)(T * K));
      for (int64_t t = 0; t < T; ++t) {
        double sum = 0.0;
        for (int64_t j = 0; j < K; ++j) sum += bf.gates[t * K + j];
        for (int64_t j = 0; j < K; ++j) whole[t * K + j] = K > 1 ? (float)(bf.gates[t * K + j] / sum) : path[t * K + j];
        // A leaf's k_last siblings are consecutive slots (DFS order) and share the parents' factor.
        for (int64_t j0 = 0; j0 < K; j0 += k_last) {
          double sib = 0.0;
          for (int64_t j = j0; j < j0 + k_last; ++j) sib += bf.gates[t * K + j];
          for (int64_t j = j0; j < j0 + k_last; ++j)
            last[t * K + j] =
                k_last > 1 ? (float)(bf.parent[t * K + j] * bf.gates[t * K + j] / sib) : path[t * K + j];
        }
      }
      for (size_t i = 0; i < 3; ++i) CHECK(rt[i].expert == bf.leaves);  // the same selection
      CHECK_CLOSE(rt[0].gate, path, 1e-6f, 1e-5f);
      CHECK_CLOSE(rt[1].gate, whole, 1e-6f, 1e-5f);
      CHECK_CLOSE(rt[2].gate, last, 1e-6f, 1e-5f);
      BruteRoute gl = brute_grouped(routers[3], h);
      CHECK(rt[3].expert == gl.leaves);
      CHECK_CLOSE(rt[3].gate, std::vector<float>(gl.gates.begin(), gl.gates.end()), 1e-6f, 1e-5f);
      int64_t N = 1;
      for (int64_t b : cs.b) N *= b;
      CHECK(rt[3].flops == 2 * T * N * 8);  // one N-way router, as flat
      if (D > 1) CHECK(rt[1].gate_value != rt[2].gate_value);  // the designs differ on these trees
    }
  }

  TEST_CASE("renorm_path gates sum to 1 per token") {
    for (auto bk : {std::pair<std::vector<int64_t>, std::vector<int64_t>>{{4, 4}, {2, 2}},
                    {{8}, {3}}, {{2, 3, 2}, {2, 1, 2}}}) {
      CoEConfig c = tree_config(6, bk.first, bk.second);
      c.gate_mode = GateMode::RenormPath;
      Generator gen(23);
      TreeRouter r(c, gen);
      Routing rt = r.route(uniform({17, 6}, 24), RouterBias{}, nullptr, false);
      std::vector<float> g = rt.gate.to_f32_vector();
      for (int64_t t = 0; t < rt.T; ++t) {
        double s = 0.0;
        for (int64_t j = 0; j < rt.K; ++j) s += g[t * rt.K + j];
        CHECK(s == doctest::Approx(1.0).epsilon(1e-6));
      }
    }
  }

  TEST_CASE("top_k equal to the branching at every level selects every expert") {
    CoEConfig c = tree_config(5, {3, 2, 2}, {3, 2, 2});
    Generator gen(25);
    TreeRouter r(c, gen);
    Routing rt = r.route(uniform({7, 5}, 26), RouterBias{}, nullptr, false);
    REQUIRE(rt.K == 12);
    for (int64_t t = 0; t < 7; ++t) {
      std::vector<int32_t> e(rt.expert.begin() + t * 12, rt.expert.begin() + (t + 1) * 12);
      std::sort(e.begin(), e.end());
      std::vector<int32_t> all(12);
      std::iota(all.begin(), all.end(), 0);
      CHECK(e == all);
    }
  }

  TEST_CASE("a flat tree [N] is the standard top-k MoE") {
    CoEConfig c;
    c.d_model = 6;
    c.n_heads = 1;
    c.d_ff = 10;
    c.router = RouterKind::Flat;
    c.num_clusters = 1;
    c.experts_per_cluster = 6;
    c.top_k_clusters = 1;
    c.top_k_experts = 2;
    c.init_std = 0.5f;
    c.use_reliability = false;
    c.validate();
    Generator gen(27);
    MoELayer layer(c, 0, true, gen);
    const int64_t T = 11, C = 6, N = 6;
    Tensor x = uniform({T, C}, 28);
    MoELayer::Output o = layer.forward(x, nullptr, nullptr, false);
    // Reference: softmax over all N logits, top-2, renormalise, gate-weighted sum of expert outputs.
    std::vector<float> xv = x.to_f32_vector(), W = layer.router.weights[0].to_f32_vector();
    std::vector<float> ref;
    for (int64_t t = 0; t < T; ++t) {
      std::vector<double> p((size_t)N);
      double mx = -1e300, s = 0.0;
      for (int64_t e = 0; e < N; ++e) {
        double z = 0.0;
        for (int64_t q = 0; q < C; ++q) z += (double)xv[t * C + q] * W[e * C + q];
        mx = std::max(mx, p[e] = z);
      }
      for (double& v : p) s += (v = std::exp(v - mx));
      std::vector<int64_t> idx((size_t)N);
      std::iota(idx.begin(), idx.end(), 0);
      std::stable_sort(idx.begin(), idx.end(), [&](int64_t a, int64_t b) { return p[a] > p[b]; });
      double g0 = p[idx[0]] / s, g1 = p[idx[1]] / s;
      CHECK(o.expert[t * 2] == idx[0]);
      CHECK(o.expert[t * 2 + 1] == idx[1]);
      std::vector<double> y0 = expert_ref(layer.experts[idx[0]], &xv[t * C], C);
      std::vector<double> y1 = expert_ref(layer.experts[idx[1]], &xv[t * C], C);
      for (int64_t q = 0; q < C; ++q) ref.push_back((float)((g0 * y0[q] + g1 * y1[q]) / (g0 + g1)));
    }
    CHECK_CLOSE(o.y, ref, 1e-5f, 1e-4f);
  }

  TEST_CASE("counted routing FLOPs follow the formula and grow like log N for a fixed branching") {
    const int64_t C = 16, T = 9;
    auto counted = [&](std::vector<int64_t> b, std::vector<int64_t> k) {
      CoEConfig c = tree_config(C, b, k);
      Generator gen(29);
      TreeRouter r(c, gen);
      Routing rt = r.route(uniform({T, C}, 30), RouterBias{}, nullptr, false);
      CHECK(rt.flops == T * routing_flops_per_token(C, b, k));
      return rt.flops / T;
    };
    // Branching 4, one child kept per level: D levels cost D * 4 * 2C, for N = 4^D experts.
    CHECK(counted({4}, {1}) == 1 * 4 * 2 * C);
    CHECK(counted({4, 4}, {1, 1}) == 2 * 4 * 2 * C);
    CHECK(counted({4, 4, 4}, {1, 1, 1}) == 3 * 4 * 2 * C);
    CHECK(counted({4, 4, 4, 4}, {1, 1, 1, 1}) == 4 * 4 * 2 * C);
    CHECK(counted({256}, {1}) == 256 * 2 * C);  // flat: linear in N
    // top-k > 1 multiplies the nodes evaluated below: 4 + 2*4 + 2*2*4 router columns per token.
    CHECK(counted({4, 4, 4}, {2, 2, 1}) == (4 + 8 + 16) * 2 * C);
    CHECK(routing_flops_per_token(C, {16, 16}, {1, 2}) == 32 * 2 * C);
  }

  TEST_CASE("router work: the products issued are the kept nodes' routers only, counted in the GEMM kernel") {
    // The multiply-adds the CPU GEMM kernel was asked for while route() ran (the routed-logits kernel issues one GEMM
    // per node): not a formula the router reports.
    // Only the kept nodes' routers may be evaluated: T * C * sum_l K_{l-1} * b_l multiply-adds. Evaluating every
    // node of a level would cost T * C * nodes_l * b_l there. With one child kept per level of branching 4, the
    // work grows like log N: 4 C per level, for N = 4^D experts.
    const int64_t C = 16, T = 9;
    auto issued = [&](std::vector<int64_t> b, std::vector<int64_t> k) {
      CoEConfig c = tree_config(C, b, k);
      c.load_balancing_weight = 0.f;  // the losses' own products (diversity) are not routing
      c.router_z_loss_weight = 0.f;
      c.diversity_weight = 0.f;
      Generator gen(29);
      TreeRouter r(c, gen);
      Tensor h = uniform({T, C}, 30);
      const int64_t before = cpu::gemm_multiply_adds();
      Routing rt = r.route(h, RouterBias{}, nullptr, true);
      const int64_t macs = cpu::gemm_multiply_adds() - before;
      CHECK(rt.flops == 2 * macs);  // the reported statistic is the work done
      int64_t every_node = 0;
      for (int64_t l = 0; l < r.depth(); ++l) every_node += T * C * r.nodes[l] * b[l];
      CAPTURE(every_node);
      return macs;
    };
    CHECK(issued({4}, {1}) == T * C * 4);
    CHECK(issued({4, 4}, {1, 1}) == T * C * 4 * 2);            // every node: 4 + 16 columns
    CHECK(issued({4, 4, 4}, {1, 1, 1}) == T * C * 4 * 3);      // every node: 4 + 16 + 64
    CHECK(issued({4, 4, 4, 4}, {1, 1, 1, 1}) == T * C * 4 * 4);  // every node: 340
    CHECK(issued({256}, {1}) == T * C * 256);                  // flat: linear in N
    CHECK(issued({4, 4, 4}, {2, 2, 1}) == T * C * (4 + 2 * 4 + 4 * 4));
    CHECK(issued({2, 3, 2}, {2, 1, 2}) == T * C * (2 + 2 * 3 + 2 * 2));  // every node: 2 + 6 + 12
  }

  TEST_CASE("route() waits for the host once per call: one packed read-out of leaves, gates, counts, entropy") {
    // Per level the selection, the counts and the path stay on h's device (engine/host_sync.h counts the CPU
    // build's would-be waits too). What moe.cpp still reads on the host comes back in one copy; the device
    // tensors hold the same values.
    for (GateMode gm : {GateMode::Product, GateMode::RenormPath, GateMode::RenormLast}) {
      CoEConfig c = tree_config(8, {3, 2, 2}, {2, 1, 2});
      c.gate_mode = gm;
      c.aux_free_bias = true;
      Generator gen(61);
      TreeRouter r(c, gen);
      Tensor h = uniform({11, 8}, 62);
      reset_host_sync_stats();
      Routing rt = r.route(h, RouterBias{}, nullptr, true);
      CHECK(host_sync_stats().stream_syncs == 1);
      CHECK(rt.expert_ids.to_i32_vector() == rt.expert);
      CHECK(rt.gate.to_f32_vector() == rt.gate_value);
      CHECK(rt.entropy_dev.item() == rt.entropy);
      for (int64_t l = 0; l < r.depth(); ++l) {
        std::vector<int32_t> counts = rt.level_counts_dev[l].to_i32_vector();
        CHECK(std::vector<int64_t>(counts.begin(), counts.end()) == rt.level_counts[l]);
      }
    }
  }

  TEST_CASE("auxiliary losses' gradients, each in isolation, with top-k below the branching at every level") {
    // Each term is checked alone (weight 1, load balance 10, the others 0): its gradient is O(1e-2..1), an error in it
    // is far above the check's tolerance. Level l's terms depend on W_l only (the selection has no gradient), so
    // the gradient with respect to W_0 is the level-0 term's and the one with respect to W_1 the level-1 term's.
    // Both levels keep fewer children than they have (k < b): the level-0 term is not a constant.
    enum Term { LB, Z, DIV, LB_RELIABILITY };
    for (Term term : {LB, Z, DIV, LB_RELIABILITY}) {
      CAPTURE((int)term);
      CoEConfig c = tree_config(5, {3, 4}, {2, 2});
      c.init_std = 0.7f;
      c.load_balancing_weight = term == LB || term == LB_RELIABILITY ? 10.f : 0.f;  // f near uniform: small
      c.router_z_loss_weight = term == Z ? 1.f : 0.f;
      c.diversity_weight = term == DIV ? 1.f : 0.f;
      const int64_t T = 10, C = 5;
      // The first seed whose selections have a margin: the check perturbs one element by 1e-2, which moves a
      // logit gap by at most 2e-2 max(|h|, |W|) (|h| < 1, |W| < 3 here).
      std::vector<std::vector<float>> lbias;
      if (term == LB_RELIABILITY)  // targets q proportional to the children's reliability
        lbias = {{0.f, std::log(0.3f), 0.f},
                 {0.f, std::log(0.5f), 0.f, 0.f, 0.f, 0.f, std::log(0.2f), 0.f, 0.f, 0.f, 0.f, 0.f}};
      std::unique_ptr<TreeRouter> r;
      Tensor h;
      for (uint64_t seed = 1; seed < 200 && !r; ++seed) {
        Generator gen(100 + seed);
        auto cand = std::make_unique<TreeRouter>(c, gen);
        Tensor hc = uniform({T, C}, 300 + seed);
        if (min_selection_gap(*cand, hc, lbias) > 0.08) r = std::move(cand), h = hc;
      }
      REQUIRE(r);
      const RouterBias rb = lbias.empty() ? RouterBias{} : router_bias_from_host(*r, lbias);
      h.requires_grad_(true);
      auto fn = [&](const std::vector<Tensor>& in) {
        Routing rt = r->route(in[0], rb, nullptr, true);
        Tensor loss = term == Z ? rt.z_loss : term == DIV ? rt.div_loss : rt.lb_loss;
        return loss.view({1});
      };
      std::vector<Tensor> inputs = {h, r->weights[0], r->weights[1]};
      // Both levels' selections matter: each keeps 2 of its children, and more than one cluster is reached.
      Routing rt = r->route(h, rb, nullptr, true);
      std::set<int32_t> clusters;
      for (int32_t e : rt.expert) clusters.insert(e / 4);
      REQUIRE(clusters.size() == 3);
      GradcheckResult g = gradcheck(fn, inputs, 1e-2f, 1e-4f, 1e-2f);
      CHECK_MESSAGE(g.ok, g.message);
      // The gradients are large enough for an error to show: per level, and for h unless the term ignores it.
      for (size_t i = 0; i < inputs.size(); ++i) {
        CAPTURE(i);
        if (i == 0 && term == DIV) {
          CHECK(max_abs_grad(inputs[i]) == 0.0);
          continue;
        }
        CHECK(max_abs_grad(inputs[i]) > 5e-3);
      }
      for (const Tensor& t : inputs) t.zero_grad();
    }
  }

  TEST_CASE("capacity drops exactly the overflow, lowest gate first, and reports the dropped fraction") {
    CoEConfig c;
    c.d_model = 8;
    c.n_heads = 1;
    c.d_ff = 12;
    c.router = RouterKind::Flat;
    c.num_clusters = 1;
    c.experts_per_cluster = 4;
    c.top_k_clusters = 1;
    c.top_k_experts = 2;
    c.capacity_factor = 0.75f;
    c.init_std = 0.7f;
    c.use_reliability = false;
    Generator gen(31);
    MoELayer layer(c, 0, true, gen);
    const int64_t T = 24, K = 2, N = 4, C = 8;
    const int64_t cap = (int64_t)std::ceil(0.75 * T * K / N);  // 9
    Tensor x = uniform({T, C}, 32);
    MoELayer::Output o = layer.forward(x, nullptr, nullptr, true);
    o.read();  // a training step leaves its routing and statistics on the device
    // Expected: per expert, its slots sorted by gate (descending, stable) keep the first cap.
    std::vector<char> keep((size_t)(T * K), 1);
    int64_t overflow = 0;
    for (int64_t e = 0; e < N; ++e) {
      std::vector<int64_t> s;
      for (int64_t i = 0; i < T * K; ++i)
        if (o.expert[i] == e) s.push_back(i);
      std::stable_sort(s.begin(), s.end(), [&](int64_t a, int64_t b) { return o.gate[a] > o.gate[b]; });
      for (size_t i = (size_t)cap; i < s.size(); ++i) keep[s[i]] = 0;
      overflow += std::max<int64_t>(0, (int64_t)s.size() - cap);
      CHECK(o.stats.expert_rows[e] == std::min<int64_t>((int64_t)s.size(), cap));
    }
    REQUIRE(overflow > 0);  // the test must exercise dropping
    for (int64_t e = 0; e < N; ++e)  // the shares are of the routed slots, before capacity
      CHECK(o.stats.expert_share[e] == (float)std::count(o.expert.begin(), o.expert.end(), e) / (float)(T * K));
    CHECK(o.keep == keep);
    CHECK(o.stats.dropped_fraction == doctest::Approx((double)overflow / (T * K)));
    // The output is the gate-weighted sum over the kept slots only (dropped slots leave the token's residual).
    std::vector<float> xv = x.to_f32_vector(), ref((size_t)(T * C), 0.f);
    for (int64_t i = 0; i < T * K; ++i) {
      if (!keep[i]) continue;
      std::vector<double> y = expert_ref(layer.experts[o.expert[i]], &xv[(i / K) * C], C);
      for (int64_t q = 0; q < C; ++q) ref[(i / K) * C + q] += (float)(o.gate[i] * y[q]);
    }
    CHECK_CLOSE(o.y, ref, 1e-5f, 1e-4f);
    // Evaluation is dropless.
    MoELayer::Output ev = layer.forward(x, nullptr, nullptr, false);
    ev.stats.read();
    CHECK(ev.stats.dropped_fraction == 0.f);
    int64_t kept = 0;
    for (int64_t r : ev.stats.expert_rows) kept += r;
    CHECK(kept == T * K);  // every slot computed
  }

  TEST_CASE("load-balance loss: closed form per level, balanced value, finite with unused experts") {
    // Two levels against the formula computed by brute force.
    CoEConfig c = tree_config(6, {3, 4}, {2, 1});
    c.load_balancing_weight = 0.05f;
    Generator gen(33);
    TreeRouter r(c, gen);
    const int64_t T = 40, C = 6;
    Tensor h = uniform({T, C}, 34);
    Routing rt = r.route(h, RouterBias{}, nullptr, false);
    std::vector<float> hv = h.to_f32_vector(), W0 = r.weights[0].to_f32_vector(), W1 = r.weights[1].to_f32_vector();
    auto probs = [&](const std::vector<float>& W, int64_t node, int64_t b, int64_t t) {
      std::vector<double> p((size_t)b);
      double mx = -1e300, s = 0.0;
      for (int64_t c2 = 0; c2 < b; ++c2) {
        double z = 0.0;
        for (int64_t q = 0; q < C; ++q) z += (double)hv[t * C + q] * W[(node * b + c2) * C + q];
        mx = std::max(mx, p[c2] = z);
      }
      for (double& v : p) s += (v = std::exp(v - mx));
      for (double& v : p) v /= s;
      return p;
    };
    BruteRoute bf = brute_route(r, h, 1.f);
    // level 0: one parent, T pairs, k = 2
    std::vector<double> f0(3, 0.0), P0(3, 0.0);
    std::vector<std::vector<int64_t>> reached(3);  // tokens that reached each cluster
    for (int64_t t = 0; t < T; ++t) {
      auto p = probs(W0, 0, 3, t);
      for (int64_t c2 = 0; c2 < 3; ++c2) P0[c2] += p[c2] / T;
      for (int64_t j = 0; j < 2; ++j) {
        int64_t cl = bf.leaves[t * 2 + j] / 4;
        f0[cl] += 1.0 / (T * 2);
        reached[cl].push_back(t);
      }
    }
    double lb0 = 0.0;
    for (int64_t c2 = 0; c2 < 3; ++c2) lb0 += 3 * f0[c2] * P0[c2];
    // level 1: parents are clusters, weighted by their share of the 2T pairs
    double lb1 = 0.0;
    for (int64_t cl = 0; cl < 3; ++cl) {
      const double n = (double)reached[cl].size();
      if (n == 0) continue;
      std::vector<double> f(4, 0.0), P(4, 0.0);
      for (int64_t t : reached[cl]) {
        auto p = probs(W1, cl, 4, t);
        for (int64_t e = 0; e < 4; ++e) P[e] += p[e] / n;
        int64_t best = std::max_element(p.begin(), p.end()) - p.begin();
        f[best] += 1.0 / n;
      }
      double s = 0.0;
      for (int64_t e = 0; e < 4; ++e) s += 4 * f[e] * P[e];
      lb1 += n / (2.0 * T) * s;
    }
    REQUIRE(rt.lb_loss.defined());
    CHECK(rt.lb_loss.item() == doctest::Approx(0.05 * (lb0 + lb1) / 2).epsilon(1e-5));

    // Balanced: N tokens, token t strongly prefers expert t, symmetric -> f = P = 1/N -> loss == weight.
    CoEConfig fc = tree_config(4, {4}, {1});
    fc.load_balancing_weight = 0.03f;
    Generator g2(35);
    TreeRouter flat(fc, g2);
    std::vector<float> eye(16, 0.f), hb(32, 0.f);
    for (int64_t i = 0; i < 4; ++i) eye[i * 4 + i] = 3.f;
    for (int64_t t = 0; t < 8; ++t) hb[t * 4 + t % 4] = 1.f;
    flat.weights[0].copy_(Tensor::from_vector(eye, {4, 4}));
    Routing bal = flat.route(Tensor::from_vector(hb, {8, 4}), RouterBias{}, nullptr, false);
    CHECK(bal.lb_loss.item() == doctest::Approx(0.03).epsilon(1e-6));

    // With reliabilities r (logit bias log r) the targets are q = r / sum r: loss = w * sum_c f_c P_c / q_c, on
    // the biased probabilities; q = 1/N gives back the Switch form.
    {
      flat.weights[0].copy_(uniform({4, 4}, 38, -2.f, 2.f));
      std::vector<float> r = {1.f, 0.5f, 1.f, 0.1f};
      const RouterBias rb =
          router_bias_from_host(flat, {{std::log(r[0]), std::log(r[1]), std::log(r[2]), std::log(r[3])}});
      Tensor hr = uniform({30, 4}, 39);
      Routing rr = flat.route(hr, rb, nullptr, false);
      std::vector<float> hv = hr.to_f32_vector(), W = flat.weights[0].to_f32_vector();
      std::vector<double> f(4, 0.0), P(4, 0.0);
      for (int64_t t = 0; t < 30; ++t) {
        std::vector<double> p(4);
        double s = 0.0;
        for (int64_t e = 0; e < 4; ++e) {
          double z = std::log((double)r[e]);
          for (int64_t q = 0; q < 4; ++q) z += (double)hv[t * 4 + q] * W[e * 4 + q];
          s += (p[e] = std::exp(z));
        }
        for (int64_t e = 0; e < 4; ++e) P[e] += p[e] / s / 30.0;
        f[rr.expert[t]] += 1.0 / 30.0;
        CHECK(rr.expert[t] == std::max_element(p.begin(), p.end()) - p.begin());
      }
      double rsum = 2.6, ref = 0.0;
      for (int64_t e = 0; e < 4; ++e) ref += f[e] * P[e] / (r[e] / rsum);
      CHECK(rr.lb_loss.item() == doctest::Approx(0.03 * ref).epsilon(1e-5));
    }

    // Unused experts (never selected, or pruned with -inf logits) and a cluster no token reaches: finite.
    std::vector<float> skew(16, 0.f);
    for (int64_t q = 0; q < 4; ++q) skew[0 * 4 + q] = 2.f, skew[2 * 4 + q] = -2.f, skew[3 * 4 + q] = -3.f;
    flat.weights[0].copy_(Tensor::from_vector(skew, {4, 4}));
    Tensor hp = uniform({8, 4}, 36, 0.1f, 1.f);
    Routing un = flat.route(hp, RouterBias{}, nullptr, false);
    CHECK(std::count(un.expert.begin(), un.expert.end(), 3) == 0);
    CHECK(std::isfinite(un.lb_loss.item()));
    const RouterBias pruned = router_bias_from_host(flat, {{0.f, 0.f, -INFINITY, -INFINITY}});
    Routing pr = flat.route(hp, pruned, nullptr, false);
    CHECK(std::isfinite(pr.lb_loss.item()));
    CHECK(std::count(pr.expert.begin(), pr.expert.end(), 2) + std::count(pr.expert.begin(), pr.expert.end(), 3) == 0);
    CoEConfig c2 = tree_config(4, {2, 2}, {1, 1});
    c2.load_balancing_weight = 1.f;
    Generator g3(37);
    TreeRouter two(c2, g3);
    std::vector<float> w0 = {3, 3, 3, 3, -3, -3, -3, -3};  // cluster 1 never reached by positive inputs
    two.weights[0].copy_(Tensor::from_vector(w0, {2, 4}));
    Routing empty_parent = two.route(hp, RouterBias{}, nullptr, false);
    for (int32_t e : empty_parent.expert) CHECK(e < 2);
    CHECK(std::isfinite(empty_parent.lb_loss.item()));
  }

  TEST_CASE("load-balance term: router_balance_loss equals the composite the router used before, value and "
            "gradient, within float rounding") {
    // The router's per-level load balance used to be a composite (counts and coefficients on the host, an
    // index_add of probs per node); it is now router_balance_loss. Random routing: pairs at random nodes, softmax
    // probabilities with the node's logit bias (reliabilities, a pruned child), top-k selection.
    uint64_t seed = 4000;
    double worst = 0.0, worst_grad = 0.0;
    for (int64_t n_nodes : {1, 4, 16})
      for (int64_t b : {2, 4, 16})
        for (int64_t k : {1, 2})
          for (int64_t P : {40, 1000})
            for (int bias = 0; bias < 3; ++bias) {  // none, reliabilities, reliabilities and a pruned child
              if (k >= b) continue;
              CAPTURE(n_nodes);
              CAPTURE(b);
              CAPTURE(k);
              CAPTURE(P);
              CAPTURE(bias);
              std::vector<float> lb((size_t)(n_nodes * b), 0.f);
              for (size_t i = 0; bias && i < lb.size(); ++i)
                lb[i] = std::log(0.05f + 0.95f * philox_uniform(++seed, 0, i));
              if (bias == 2) lb[1] = -INFINITY;
              std::vector<int32_t> node((size_t)P);
              for (int64_t p = 0; p < P; ++p)
                node[(size_t)p] = (int32_t)(philox_uniform(seed, 1, (uint64_t)p) * (float)n_nodes) % (int32_t)n_nodes;
              Tensor node_t = Tensor::from_vector(node, {P});
              Tensor logits = add(uniform({P, b}, ++seed, -2.f, 2.f),
                                  index_select(Tensor::from_vector(lb, {n_nodes, b}), 0, node_t));
              Tensor probs = softmax(logits).detach();
              Tensor idx = topk(probs, k).second;  // [P, k]
              const std::vector<int32_t> iv = idx.to_i32_vector();
              // Before: coef = f / q per (node, child) on the host, then (1/P) sum_{node, c} coef * Psum.
              std::vector<int64_t> counts((size_t)(n_nodes * b), 0), pairs_at((size_t)n_nodes, 0);
              for (int64_t p = 0; p < P; ++p) {
                ++pairs_at[(size_t)node[(size_t)p]];
                for (int64_t j = 0; j < k; ++j) ++counts[(size_t)(node[(size_t)p] * b + iv[(size_t)(p * k + j)])];
              }
              std::vector<float> coef((size_t)(n_nodes * b), 0.f), inv((size_t)(n_nodes * b), 0.f);
              for (int64_t j = 0; j < n_nodes; ++j) {
                double rsum = 0.0;
                for (int64_t c2 = 0; c2 < b; ++c2) rsum += std::exp((double)lb[(size_t)(j * b + c2)]);
                for (int64_t c2 = 0; c2 < b; ++c2) {
                  const double rho = std::exp((double)lb[(size_t)(j * b + c2)]);
                  if (rho == 0.0) continue;
                  inv[(size_t)(j * b + c2)] = (float)(rsum / rho);
                  if (pairs_at[(size_t)j])
                    coef[(size_t)(j * b + c2)] = (float)((double)counts[(size_t)(j * b + c2)] /
                                                         (double)(pairs_at[(size_t)j] * k) * (rsum / rho));
                }
              }
              Tensor x_old = probs.detach(), x_new = probs.detach();
              x_old.requires_grad_();
              x_new.requires_grad_();
              Tensor psum = n_nodes == 1 ? sum(x_old, 0).view({1, b})
                                         : index_add(Tensor::zeros({n_nodes, b}), 0, node_t, x_old);
              Tensor before = mul(sum(mul(psum, Tensor::from_vector(coef, {n_nodes, b}))), 1.f / (float)P);
              // After: the op, with the router's inputs (no target shares when there is no bias).
              Tensor after = router_balance_loss(x_new, idx, n_nodes == 1 ? Tensor() : node_t, n_nodes,
                                                 bias ? Tensor::from_vector(lb, {n_nodes, b}) : Tensor(), 1.f);
              const double rel = std::fabs((double)after.item() - before.item()) / std::fabs(before.item());
              worst = std::max(worst, rel);
              CHECK(rel <= 1e-6);
              before.backward();
              after.backward();
              const std::vector<float> go = x_old.grad().to_f32_vector(), gn = x_new.grad().to_f32_vector();
              for (size_t i = 0; i < go.size(); ++i) {
                const double d = std::fabs((double)gn[i] - go[i]);
                worst_grad = std::max(worst_grad, d / std::max(1e-30, std::fabs((double)go[i])));
                REQUIRE(d <= 4e-7 * std::fabs(go[i]));
              }
            }
    MESSAGE("load balance, op vs the former composite: largest relative difference ", worst, " (value), ",
            worst_grad, " (gradient)");
  }

  TEST_CASE("z-loss is weight * mean logsumexp(logits)^2, averaged over levels") {
    CoEConfig c = tree_config(5, {3, 2}, {2, 1});
    c.router_z_loss_weight = 0.01f;
    c.routing_temperature = 0.5f;  // the z-loss is on the raw logits, not the tempered ones
    Generator gen(39);
    TreeRouter r(c, gen);
    const int64_t T = 10, C = 5;
    Tensor h = uniform({T, C}, 40);
    Routing rt = r.route(h, RouterBias{}, nullptr, false);
    std::vector<float> hv = h.to_f32_vector(), W0 = r.weights[0].to_f32_vector(), W1 = r.weights[1].to_f32_vector();
    auto lse = [&](const std::vector<float>& W, int64_t node, int64_t b, int64_t t) {
      std::vector<double> z((size_t)b);
      double mx = -1e300, s = 0.0;
      for (int64_t j = 0; j < b; ++j) {
        z[j] = 0.0;
        for (int64_t q = 0; q < C; ++q) z[j] += (double)hv[t * C + q] * W[(node * b + j) * C + q];
        mx = std::max(mx, z[j]);
      }
      for (double v : z) s += std::exp(v - mx);
      return mx + std::log(s);
    };
    BruteRoute bf = brute_route(r, h, 0.5f);
    double z0 = 0.0, z1 = 0.0;
    for (int64_t t = 0; t < T; ++t) {
      double a = lse(W0, 0, 3, t);
      z0 += a * a / T;
      for (int64_t j = 0; j < 2; ++j) {
        double b = lse(W1, bf.leaves[t * 2 + j] / 2, 2, t);
        z1 += b * b / (2 * T);
      }
    }
    CHECK(rt.z_loss.item() == doctest::Approx(0.01 * (z0 + z1) / 2).epsilon(1e-5));
  }

  TEST_CASE("diversity loss is the mean squared cosine similarity of sibling router vectors") {
    CoEConfig c = tree_config(4, {2, 3}, {1, 1});
    c.diversity_weight = 0.2f;
    Generator gen(41);
    TreeRouter r(c, gen);
    Routing rt = r.route(uniform({3, 4}, 42), RouterBias{}, nullptr, false);
    double level[2] = {0.0, 0.0};
    for (int64_t l = 0; l < 2; ++l) {
      std::vector<float> W = r.weights[l].to_f32_vector();
      const int64_t b = r.branching[l], n = r.nodes[l];
      int64_t pairs = 0;
      for (int64_t node = 0; node < n; ++node)
        for (int64_t i = 0; i < b; ++i)
          for (int64_t j = 0; j < b; ++j) {
            if (i == j) continue;
            double d = 0.0, ni = 0.0, nj = 0.0;
            for (int64_t q = 0; q < 4; ++q) {
              double a = W[(node * b + i) * 4 + q], e = W[(node * b + j) * 4 + q];
              d += a * e, ni += a * a, nj += e * e;
            }
            level[l] += d * d / (ni * nj);
            ++pairs;
          }
      level[l] /= pairs;
    }
    CHECK(rt.div_loss.item() == doctest::Approx(0.2 * (level[0] + level[1]) / 2).epsilon(1e-5));
    // Its gradient pushes siblings apart: one step of descent lowers it.
    rt.div_loss.backward();
    for (Tensor& w : r.weights) {
      Tensor g = w.grad();
      for (int64_t i = 0; i < w.numel(); ++i) w.f32()[i] -= 0.5f * g.f32()[i];
    }
    CHECK(r.route(uniform({3, 4}, 42), RouterBias{}, nullptr, false).div_loss.item() < rt.div_loss.item());
  }

  TEST_CASE("aux-free bias: sign update towards the mean load, selection only") {
    CoEConfig c = tree_config(4, {4}, {1});
    c.aux_free_bias = true;
    c.aux_free_bias_rate = 0.25f;
    Generator gen(43);
    TreeRouter r(c, gen);
    Tensor h = uniform({20, 4}, 44);
    Routing a = r.route(h, RouterBias{}, nullptr, false);
    r.add_aux_load(a);  // the loads summed where the routing ran, the bias moved there; the buffer reads it back
    r.update_aux_bias(0.25f);
    r.pull_buffers();
    std::vector<float> bias = r.aux_bias[0].to_f32_vector();
    for (int64_t e = 0; e < 4; ++e) {
      double load = (double)a.level_counts[0][e], mean = 20.0 / 4;
      CHECK(bias[e] == doctest::Approx(load > mean ? -0.25 : load < mean ? 0.25 : 0.0));
    }
    // Large bias on one expert makes it win selection, but its gate stays its (unbiased) probability. With
    // K = 1 the gate is not renormalised (it would be identically 1 and the router would get no gradient).
    std::vector<float> big = {0.f, 0.f, 5.f, 0.f};
    r.aux_bias[0].copy_(Tensor::from_vector(big, {4}));
    Routing b = r.route(h, RouterBias{}, nullptr, false);
    std::vector<float> hv = h.to_f32_vector(), W = r.weights[0].to_f32_vector(), g = b.gate.to_f32_vector();
    for (int64_t t = 0; t < 20; ++t) {
      CHECK(b.expert[t] == 2);
      std::vector<double> p(4);
      double s = 0.0;
      for (int64_t e = 0; e < 4; ++e) {
        double z = 0.0;
        for (int64_t q = 0; q < 4; ++q) z += (double)hv[t * 4 + q] * W[e * 4 + q];
        s += (p[e] = std::exp(z));
      }
      CHECK(g[t] == doctest::Approx(p[2] / s).epsilon(1e-5));
    }
  }

  TEST_CASE("selection with aux-free bias, reliability, pruned children and exact ties; entropy; too few left") {
    // Brute force in double of the selection rule: per kept node, p = softmax(logits / temperature + logit bias),
    // score = p + aux-free bias, pruned children (bias -inf) excluded, the k best by score, ties to the lower index.
    // Rows of h that are zero make every logit 0: their children tie exactly unless the biases separate them.
    struct Case {
      std::vector<int64_t> b, k;
      std::vector<std::vector<float>> lbias, abias;
    };
    const float ninf = -INFINITY, half = std::log(0.5f);
    for (const Case& cs :
         {Case{{6}, {2}, {{0.f, half, 0.f, ninf, 0.f, 0.f}}, {{0.1f, 0.f, 0.1f, 0.3f, 0.f, 0.1f}}},
          Case{{2, 4}, {1, 2}, {{0.f, half}, {0.f, ninf, ninf, 0.f, std::log(0.8f), 0.f, 0.f, 0.f}},
               {{0.f, 0.f}, {0.f, 0.2f, 0.f, 0.f, 0.f, 0.f, 0.1f, 0.1f}}},
          Case{{3, 4}, {2, 3}, {{}, {0.f, 0.f, 0.f, 0.f, ninf, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, ninf}},
               {{0.05f, 0.f, 0.05f}, {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f}}}}) {
      CAPTURE(cs.b.size());
      const int64_t C = 5, T = 19, D = (int64_t)cs.b.size();
      CoEConfig c = tree_config(C, cs.b, cs.k);
      c.aux_free_bias = true;
      c.gate_mode = GateMode::Product;
      Generator gen(45);
      TreeRouter r(c, gen);
      for (int64_t l = 0; l < D; ++l)
        r.aux_bias[l].copy_(Tensor::from_vector(cs.abias[l], {(int64_t)cs.abias[l].size()}));
      const RouterBias rb = router_bias_from_host(r, cs.lbias);
      Tensor h = uniform({T, C}, 46);
      for (int64_t t = 0; t < T; t += 4)
        for (int64_t q = 0; q < C; ++q) h.f32()[t * C + q] = 0.f;
      Routing rt = r.route(h, rb, nullptr, false);

      std::vector<float> hv = h.to_f32_vector();
      std::vector<int32_t> leaves;
      std::vector<float> gates;
      double entropy = 0.0;
      std::function<void(int64_t, int64_t, int64_t, double)> rec = [&](int64_t t, int64_t l, int64_t node,
                                                                       double path) {
        const int64_t b = cs.b[l], k = cs.k[l];
        std::vector<float> W = r.weights[l].to_f32_vector();
        std::vector<double> p((size_t)b);
        double mx = -1e300, s = 0.0;
        for (int64_t ch = 0; ch < b; ++ch) {
          double z = cs.lbias[l].empty() ? 0.0 : (double)cs.lbias[l][node * b + ch];
          for (int64_t q = 0; q < C; ++q) z += (double)hv[t * C + q] * W[(node * b + ch) * C + q];
          mx = std::max(mx, p[ch] = z);
        }
        for (double& v : p) s += (v = std::exp(v - mx));
        for (double& v : p) v /= s;
        if (l == 0)
          for (double v : p)
            if (v > 0.0) entropy -= v * std::log(v) / (double)T;
        std::vector<int64_t> cand;
        for (int64_t ch = 0; ch < b; ++ch)
          if (cs.lbias[l].empty() || !std::isinf(cs.lbias[l][node * b + ch])) cand.push_back(ch);
        auto score = [&](int64_t ch) { return p[ch] + (double)cs.abias[l][node * b + ch]; };
        std::stable_sort(cand.begin(), cand.end(), [&](int64_t a, int64_t x) { return score(a) > score(x); });
        for (int64_t j = 0; j < k; ++j) {
          const int64_t child = node * b + cand[j];
          if (l == D - 1) {
            leaves.push_back((int32_t)child);
            gates.push_back((float)(path * p[cand[j]]));
          } else {
            rec(t, l + 1, child, path * p[cand[j]]);
          }
        }
      };
      for (int64_t t = 0; t < T; ++t) rec(t, 0, 0, 1.0);
      CHECK(rt.expert == leaves);
      CHECK_CLOSE(rt.gate, gates, 1e-6f, 1e-5f);
      CHECK(rt.entropy == doctest::Approx(entropy).epsilon(1e-5));

      // Prune all but one child of the node the zero rows reach at the last level: fewer than k are left.
      std::vector<std::vector<float>> few = cs.lbias;
      std::vector<float>& last = few.back();
      const int64_t b = cs.b.back(), node = leaves[0] / b;
      for (int64_t ch = 1; ch < b; ++ch) last[node * b + ch] = ninf;
      CHECK_THROWS_AS(r.route(h, router_bias_from_host(r, few), nullptr, false), Error);
    }
  }

  TEST_CASE("AC scales on a hand-computed example: mean absolute deviation, the 10x clip, per-feature normalisation") {
    // 3 experts, 6 features, 4 tokens; expert 2 has no tokens. Labels 0, 0, 1, 1.
    //   expert 0: (0,1,0,0,0,0), (2,1,2,2,2,2): mean 1 everywhere; s = 1, except feature 1: s = 0
    //   expert 1: (0,0,0,0,0,0), (4,2,2,2,2,2): mean (2,1,1,1,1,1);   s = (2,1,1,1,1,1)
    // w = 1/(s + 1e-4): a = 1/1.0001 (s = 1), 1/2.0001 (s = 2), 1e4 (s = 0). Over the 12 labelled entries
    // sum w = 10a + 1/2.0001 + 1e4, so the clip 10 * mean w = (10a + 1/2.0001 + 1e4) / 1.2 = 8342.08 < 1e4: it
    // fires on expert 0's feature 1. m = w / (mean of w over the two labelled experts), per feature:
    //   feature 0: w = (a, 1/2.0001) -> m = 2 * 2.0001 / 3.0002 and 2 * 1.0001 / 3.0002
    //   feature 1: w = (clip, a)     -> m = 2 clip / (clip + a) and 2 a / (clip + a)   (1.99976 and 2.397e-4;
    //              without the clip 1.99980 and 2.000e-4)
    //   features 2..5: w = (a, a)    -> m = 1 and 1
    // Expert 2 (no tokens) keeps m = 1.
    std::vector<float> hv = {0, 1, 0, 0, 0, 0, 2, 1, 2, 2, 2, 2, 0, 0, 0, 0, 0, 0, 4, 2, 2, 2, 2, 2};
    std::vector<int32_t> labels = {0, 0, 1, 1};
    std::vector<bool> has;
    std::vector<float> m = ac_scales(Tensor::from_vector(hv, {4, 6}), labels, 3, &has);
    const double a = 1.0 / 1.0001, half = 1.0 / 2.0001, clip = (10 * a + half + 1e4) / 1.2;
    std::vector<double> ref = {2 * 2.0001 / 3.0002, 2 * clip / (clip + a), 1, 1, 1, 1,
                               2 * 1.0001 / 3.0002, 2 * a / (clip + a),    1, 1, 1, 1,
                               1,                   1,                     1, 1, 1, 1};
    REQUIRE(m.size() == ref.size());
    for (size_t i = 0; i < m.size(); ++i) CHECK_MESSAGE(m[i] == doctest::Approx(ref[i]).epsilon(1e-5), "m[", i, "]");
    CHECK(m[7] == doctest::Approx(2.397e-4).epsilon(1e-3));  // the clip fired (unclipped: 2.000e-4)
    CHECK(has == std::vector<bool>{true, true, false});
    // The kernel behind it also moves the running m: 0.9 run + 0.1 m for the labelled experts, expert 2 unchanged.
    const Segments g = counting_sort(labels, 3);
    std::vector<float> m2(18), run(18, 2.f);
    std::vector<int32_t> has2(3);
    std::vector<double> w(3 * 6 + 3 + 6 + 2);
    cpu::ac_scales_forward(m2.data(), has2.data(), run.data(), w.data(), hv.data(), g.order.data(), g.offsets.data(),
                           3, 6);
    CHECK(m2 == m);
    for (size_t i = 0; i < 18; ++i)  // (within float rounding: the compiler may fuse the multiply-add)
      CHECK(run[i] == doctest::Approx(i < 12 ? 0.9 * 2.0 + 0.1 * m[i] : 2.0).epsilon(1e-6));
  }

  TEST_CASE("AC router on a Gaussian mixture: up-weights the separating features, misassigns fewer points") {
    // 4 clusters in 16 features; they differ only in features 0..3: cluster k has mean 2 on feature k, is tight
    // there (sd 0.3) and wide on the other separating features (sd 1.5); features 4..15 are the same noise for all.
    const int64_t N = 4, C = 16, T = 4000;
    Generator gen(45);
    Tensor noise = Tensor::randn({T, C}, gen);
    std::vector<float> nv = noise.to_f32_vector(), hv((size_t)(T * C));
    std::vector<int32_t> truth((size_t)T), labels((size_t)T);
    for (int64_t t = 0; t < T; ++t) {
      const int64_t k = t % N;
      truth[t] = (int32_t)k;
      for (int64_t q = 0; q < C; ++q) {
        float mu = q == k ? 2.f : 0.f, sd = q >= N ? 1.f : (q == k ? 0.3f : 1.5f);
        hv[t * C + q] = mu + sd * nv[t * C + q];
      }
      // The previous layer's top-1 labels: right 80% of the time.
      float u = philox_uniform(46, 0, (uint64_t)t);
      labels[t] = u < 0.8f ? (int32_t)k : (int32_t)((k + 1 + (t / N) % 3) % N);
    }
    Tensor h = Tensor::from_vector(hv, {T, C});

    std::vector<float> m = ac_scales(h, labels, N);
    double own = 0.0, cross = 0.0, noise_dev = 0.0;
    for (int64_t k = 0; k < N; ++k) {
      own += m[k * C + k] / N;
      for (int64_t j = 0; j < N; ++j)
        if (j != k) cross += m[k * C + j] / (N * (N - 1));
      for (int64_t q = N; q < C; ++q) noise_dev += std::fabs(m[k * C + q] - 1.f) / (N * (C - N));
    }
    CHECK(own > 1.3);        // each cluster's tight separating feature is up-weighted
    CHECK(cross < 0.9);      // and the features along which it is wide are down-weighted
    CHECK(noise_dev < 0.1);  // shared noise features stay ~1

    auto misassigned = [&](bool scaling) {
      CoEConfig c;
      c.d_model = C;
      c.n_heads = 1;
      c.router = RouterKind::AC;
      c.num_clusters = 1;
      c.experts_per_cluster = N;
      c.top_k_clusters = 1;
      c.top_k_experts = 1;
      c.ac_scaling = scaling;
      c.use_reliability = false;
      Generator g(47);
      TreeRouter r(c, g);
      std::vector<float> e((size_t)(N * C), 0.f);  // expert embeddings at the cluster means
      for (int64_t k = 0; k < N; ++k) e[k * C + k] = 2.f;
      r.weights[0].copy_(Tensor::from_vector(e, {N, C}));
      const Tensor lab = Tensor::from_vector(labels, {T});
      Routing rt = r.route(h, RouterBias{}, &lab, true);
      int64_t bad = 0;
      for (int64_t t = 0; t < T; ++t) bad += rt.expert[t] != truth[t];
      return (double)bad / T;
    };
    double with_m = misassigned(true), without_m = misassigned(false);
    MESSAGE("AC misassignment: m = ", with_m, ", m = 1: ", without_m);
    CHECK(with_m < 0.75 * without_m);
  }
}
