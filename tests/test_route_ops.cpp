// The router level ops (autograd/ops_route.h, kernels/route.h): against the composite they replace (bit for bit on
// the CPU), finite-difference gradients, bad input, and the CUDA twins against the CPU (suite "cuda").
#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>

#include "autograd/ops_route.h"
#include "bias_ref.h"
#include "helpers.h"
#include "kernels/gemm.h"
#include "kernels/route.h"
#include "kernels/topk.h"
#include "model/router.h"

#if CM_CUDA
#include "engine/cuda.h"
#include "kernels/copy.h"
#endif

using namespace cm;
using cm::test::uniform;

namespace {

// A random health state of N experts for route_bias_forward: reliabilities in [0.01, 1] with some exactly 1, usage
// shares with whole groups of `zero_group` consecutive experts at 0 (the inner levels' unweighted-mean branch), and
// about a fifth of the experts pruned. rel, use, pruned [N] each.
struct HealthState {
  std::vector<float> rel, use, pruned;
};
HealthState random_health(int64_t N, int64_t zero_group, uint64_t seed) {
  Generator g(seed);
  std::vector<float> u = Tensor::rand({3 * N}, g).to_f32_vector();
  HealthState h;
  for (int64_t e = 0; e < N; ++e) {
    h.rel.push_back(u[e] < 0.3f ? 1.f : 0.01f + 0.99f * u[e]);
    h.use.push_back(e / zero_group % 3 == 1 ? 0.f : u[N + e] / (float)N);
    h.pruned.push_back(u[2 * N + e] < 0.2f ? 1.f : 0.f);
  }
  return h;
}

// The trees the bias kernel is checked on: flat, two and three levels, and levels with a single child.
const std::vector<std::vector<int64_t>> kBiasTrees = {{5}, {2, 3}, {3, 2, 4}, {1, 4}, {2, 1, 3}, {4, 16}};

// Node ids for P = T * Kp token-major pairs: each token's Kp pairs at distinct nodes of [0, n), drawn at random
// with a skew (node 0 takes about `skew` of the pairs) so that one node can hold several GEMM K blocks of pairs.
std::vector<int32_t> random_nodes(int64_t T, int64_t Kp, int64_t n, uint64_t seed, double skew = 0.0) {
  Generator g(seed);
  std::vector<float> u = Tensor::rand({T * n + T}, g).to_f32_vector();
  std::vector<int32_t> node((size_t)(T * Kp));
  for (int64_t t = 0; t < T; ++t) {
    std::vector<int32_t> ids((size_t)n);
    std::iota(ids.begin(), ids.end(), 0);
    for (int64_t i = n - 1; i > 0; --i) std::swap(ids[(size_t)i], ids[(size_t)(u[t * n + i] * (float)(i + 1)) % (i + 1)]);
    if (u[T * n + t] < skew) std::swap(ids[0], *std::find(ids.begin(), ids.end(), 0));
    for (int64_t i = 0; i < Kp; ++i) node[(size_t)(t * Kp + i)] = ids[(size_t)i];
  }
  return node;
}

// The level-loop composite that routed_logits replaces (model/router.cpp before it): counting sort of the pairs
// by node, index_select of their token rows, one matmul per node's segment, concat, index_select back.
Tensor old_logits(const Tensor& h, const Tensor& W, const std::vector<int32_t>& node, int64_t n, int64_t b) {
  const int64_t T = h.size(0), P = (int64_t)node.size(), Kp = P / T;
  std::vector<int32_t> tok((size_t)P);
  for (int64_t p = 0; p < P; ++p) tok[(size_t)p] = (int32_t)(p / Kp);
  Segments seg = counting_sort(node, n);
  std::vector<int32_t> tok_sorted((size_t)P), inv((size_t)P);
  for (int64_t i = 0; i < P; ++i) {
    tok_sorted[(size_t)i] = tok[(size_t)seg.order[(size_t)i]];
    inv[(size_t)seg.order[(size_t)i]] = (int32_t)i;
  }
  Tensor hs = index_select(h, 0, Tensor::from_vector(tok_sorted, {P}));
  std::vector<Tensor> parts;
  for (int64_t j = 0; j < n; ++j) {
    const int64_t a = seg.offsets[(size_t)j], e = seg.offsets[(size_t)j + 1];
    if (a == e) continue;
    parts.push_back(matmul(hs.slice(0, a, e), W.slice(0, j * b, j * b + b), false, true));
  }
  Tensor ls = parts.size() == 1 ? parts[0] : concat(parts, 0);
  return index_select(ls, 0, Tensor::from_vector(inv, {P}));
}


// The selection composite that route_select replaces (model/router.cpp before it): scale, bias rows, softmax, the
// scores (probs + aux-free bias, -inf for pruned children) through cpu::topk_forward, gather, renormalise, path.
struct OldSelection {
  Tensor probs, path;
  std::vector<int32_t> child;
};
OldSelection old_select(const Tensor& logits, const std::vector<int32_t>& node, const Tensor& parent,
                        const std::vector<float>& lbias, const std::vector<float>& abias, int64_t n, float temperature,
                        int64_t k, bool renorm) {
  const int64_t P = logits.size(0), b = logits.size(1);
  std::vector<int32_t> nd = node.empty() ? std::vector<int32_t>((size_t)P, 0) : node;
  Tensor s = temperature != 1.f ? mul(logits, 1.f / temperature) : logits;
  if (!lbias.empty()) s = add(s, index_select(Tensor::from_vector(lbias, {n, b}), 0, Tensor::from_vector(nd, {P})));
  OldSelection o;
  o.probs = softmax(s);
  std::vector<float> pv = o.probs.to_f32_vector(), score = pv;
  for (int64_t p = 0; p < P; ++p)
    for (int64_t c = 0; c < b; ++c) {
      const int64_t at = (int64_t)nd[(size_t)p] * b + c;
      if (!abias.empty()) score[(size_t)(p * b + c)] = pv[(size_t)(p * b + c)] + abias[(size_t)at];
      if (!lbias.empty() && std::isinf(lbias[(size_t)at])) score[(size_t)(p * b + c)] = -INFINITY;
    }
  std::vector<float> top((size_t)(P * k));
  std::vector<int32_t> idx((size_t)(P * k));
  cpu::topk_forward(top.data(), idx.data(), score.data(), P, b, k);
  Tensor sel = gather(o.probs, 1, Tensor::from_vector(idx, {P, k}));
  if (renorm) sel = div(sel, sum(sel, 1, true));
  o.path = parent.defined() ? mul(parent.view({P, 1}), sel).view({P * k}) : sel.view({P * k});
  for (int64_t i = 0; i < P * k; ++i) o.child.push_back(nd[(size_t)(i / k)] * (int32_t)b + idx[(size_t)i]);
  return o;
}

// Mean entropy of softmax rows in double.
double entropy_ref(const std::vector<float>& probs, int64_t P, int64_t b) {
  double e = 0.0;
  for (int64_t i = 0; i < P * b; ++i)
    if (probs[(size_t)i] > 0.f) e -= (double)probs[(size_t)i] * std::log((double)probs[(size_t)i]);
  return e / (double)P;
}

struct SelCase {
  int64_t T, Kp, n, b, k;
  float temperature;
  bool lbias, abias, renorm, parent;
};
const SelCase kSelCases[] = {
    {17, 1, 1, 6, 2, 1.f, false, false, false, false},  // the root: one node, no path yet
    {11, 2, 3, 5, 2, 0.7f, true, false, true, true},    // renorm_last with reliability and pruned children
    {9, 3, 4, 4, 3, 1.f, true, true, false, true},      // aux-free bias and pruning, k = 3
    {13, 2, 2, 7, 1, 2.f, false, true, false, true},    // k = 1
    {40, 2, 3, 8, 4, 1.f, false, false, true, true},    // renorm_last over k = 4: the siblings' sum in double
    // Sixteen rows at a time (kernels/cpu/route.cpp, select_block16: b a power of 2 up to 64, k <= 2), with a
    // short tail of rows taken one by one.
    {20, 1, 1, 16, 2, 1.f, false, false, true, false},  // the root, renorm_last
    {24, 2, 3, 8, 1, 0.7f, true, true, false, true},    // reliability, pruning, aux-free bias
    {16, 2, 4, 32, 2, 1.f, true, true, true, true},     // everything at once
    {37, 1, 1, 2, 1, 1.f, false, false, false, false},  // two children
    {16, 2, 2, 64, 2, 1.f, false, true, true, true},    // 64 children: four 16 x 16 transposes a row block
    // More kept children than a warp has lanes (the CUDA kernel's slots past 32)
    {6, 2, 3, 40, 33, 0.8f, true, true, true, true},
};

// Biases for a case: log reliabilities in (log 0.5, 0], one pruned child per node (never enough to leave fewer
// than k), aux-free biases of the size of probability gaps.
std::vector<float> case_lbias(const SelCase& cs, uint64_t seed) {
  if (!cs.lbias) return {};
  std::vector<float> v = uniform({cs.n * cs.b}, seed, std::log(0.5f), 0.f).to_f32_vector();
  if (cs.b - 1 >= cs.k)
    for (int64_t j = 0; j < cs.n; ++j) v[(size_t)(j * cs.b + (j % cs.b))] = -INFINITY;
  return v;
}
std::vector<float> case_abias(const SelCase& cs, uint64_t seed) {
  return cs.abias ? uniform({cs.n * cs.b}, seed, -0.1f, 0.1f).to_f32_vector() : std::vector<float>{};
}
// A tensor's floats as their bit patterns, every NaN as one pattern (a NaN's sign and payload are not results: the
// same softmax row inlined into two kernels may give -nan in one and +nan in the other).
std::vector<uint32_t> bits_of(const Tensor& t) {
  const std::vector<float> v = t.to_f32_vector();
  std::vector<uint32_t> b(v.size());
  for (size_t i = 0; i < v.size(); ++i) {
    const float x = v[i] != v[i] ? NAN : v[i];
    std::memcpy(&b[i], &x, sizeof(float));
  }
  return b;
}

Tensor opt_tensor(const std::vector<float>& v) {
  return v.empty() ? Tensor() : Tensor::from_vector(v, {(int64_t)v.size()});
}

// The trees the group-limited selection (route_group_select) is checked on: branching, top_k per level.
struct GroupCase {
  std::vector<int64_t> b, k;
  bool abias, pruned;
};
const GroupCase kGroupCases[] = {
    {{8}, {3}, false, false},           // flat: the 3 best leaves
    {{2, 4}, {1, 2}, true, false},      // ClusterMoE's shape, aux-free bias
    {{3, 2, 4}, {2, 1, 2}, true, true},  // depth 3, aux-free bias and pruned children
    {{2, 2, 2}, {2, 2, 1}, false, true},  // depth 3, both children kept on the upper levels, pruned leaves
    {{40, 3}, {3, 2}, true, true},        // more children than a warp has lanes (the CUDA kernel's lane loop)
    {{2100}, {3}, false, false},          // wider than the CUDA kernel's shared score cache (2048): scored per round
};

// One input of a case: probs [T, N], rows of random positive probabilities, except every third token's row, which
// is uniform (all children of a node tie: the lower index wins); abias and lbias [sum_l n_l b_l], levels
// concatenated: aux-free biases of the size of probability gaps, and -inf (pruned) at one child of every second
// node where k selectable children remain (the rest 0: the selection reads only the -inf).
struct GroupInput {
  int64_t T = 0, N = 1;
  std::vector<float> probs, abias, lbias;
};
GroupInput group_input(const GroupCase& cs, int64_t T, uint64_t seed) {
  GroupInput in;
  in.T = T;
  int64_t n = 1, total = 0;
  for (size_t l = 0; l < cs.b.size(); ++l) {
    for (int64_t j = 0; j < n; ++j)
      for (int64_t c = 0; c < cs.b[l]; ++c)
        in.lbias.push_back(cs.pruned && j % 2 == 1 && cs.b[l] > cs.k[l] && c == (j / 2) % cs.b[l] ? -INFINITY : 0.f);
    total += n * cs.b[l];
    n *= cs.b[l];
  }
  in.N = n;
  in.probs = uniform({T, in.N}, seed, 0.01f, 1.f).to_f32_vector();
  for (int64_t t = 0; t < T; ++t) {
    float* row = in.probs.data() + t * in.N;
    float z = 0.f;
    for (int64_t e = 0; e < in.N; ++e) z += t % 3 == 0 ? (row[e] = 1.f) : row[e];
    for (int64_t e = 0; e < in.N; ++e) row[e] /= z;
  }
  if (cs.abias) in.abias = uniform({total}, seed + 1, -0.05f, 0.05f).to_f32_vector();
  if (!cs.pruned) in.lbias.clear();
  return in;
}

// Brute force of route_group_select: per token, level by level, each kept node's children sorted by score (larger
// first; std::stable_sort keeps ties in index order), the first k kept. *pruned_kept: some kept child is pruned.
std::vector<int32_t> group_select_ref(const GroupCase& cs, const GroupInput& in, bool* pruned_kept) {
  const size_t D = cs.b.size();
  std::vector<std::vector<int32_t>> level((size_t)D);
  *pruned_kept = false;
  for (int64_t t = 0; t < in.T; ++t) {
    std::vector<int32_t> kept = {0};
    int64_t n = 1, span = in.N, at = 0;
    for (size_t l = 0; l < D; ++l) {
      const int64_t b = cs.b[l];
      span /= b;
      std::vector<int32_t> next;
      for (int32_t j : kept) {
        std::vector<float> score((size_t)b);
        for (int64_t c = 0; c < b; ++c) {
          const int64_t i = j * b + c;
          double m = 0.0;
          for (int64_t q = 0; q < span; ++q) m += in.probs[(size_t)(t * in.N + i * span + q)];
          score[(size_t)c] = (float)m;
          if (!in.abias.empty()) score[(size_t)c] += in.abias[(size_t)(at + i)];
          if (!in.lbias.empty() && std::isinf(in.lbias[(size_t)(at + i)])) score[(size_t)c] = -INFINITY;
        }
        std::vector<int32_t> order((size_t)b);
        std::iota(order.begin(), order.end(), 0);
        std::stable_sort(order.begin(), order.end(), [&](int32_t x, int32_t y) { return score[x] > score[y]; });
        for (int64_t r = 0; r < cs.k[l]; ++r) {
          next.push_back((int32_t)(j * b + order[(size_t)r]));
          *pruned_kept = *pruned_kept || score[(size_t)order[(size_t)r]] == -INFINITY;
        }
      }
      level[l].insert(level[l].end(), next.begin(), next.end());
      kept = next;
      at += n * b;
      n *= b;
    }
  }
  std::vector<int32_t> all;
  for (const auto& v : level) all.insert(all.end(), v.begin(), v.end());
  return all;
}

// route_group_select on the host arrays of an input; ids [T * sum_l K_l].
std::vector<int32_t> group_select_cpu(const GroupCase& cs, const GroupInput& in) {
  int64_t K = 1, total = 0;
  for (int64_t k : cs.k) total += (K *= k);
  std::vector<int32_t> ids((size_t)(in.T * total), -7);
  cpu::route_group_select(ids.data(), in.probs.data(), in.abias.empty() ? nullptr : in.abias.data(),
                          in.lbias.empty() ? nullptr : in.lbias.data(), cs.b.data(), cs.k.data(),
                          (int64_t)cs.b.size(), in.T);
  return ids;
}

// A tree [2, 3] keeping 1 then 2 whose node 0 has only one selectable child (children 0 and 1 pruned), and tokens
// whose mass is all under node 0: the selection must keep a pruned child there.
GroupCase starved_case() { return GroupCase{{2, 3}, {1, 2}, false, true}; }
GroupInput starved_input() {
  GroupInput in;
  in.T = 3;
  in.N = 6;
  in.probs = {0.5f, 0.3f, 0.2f, 0.f, 0.f, 0.f, 0.2f, 0.2f, 0.2f, 0.1f, 0.2f, 0.1f, 0.f, 0.f, 0.f, 0.5f, 0.2f, 0.3f};
  in.lbias = {0.f, 0.f, -INFINITY, -INFINITY, 0.f, 0.f, 0.f, 0.f};
  return in;
}

}  // namespace

TEST_SUITE("routing") {
  TEST_CASE("routed logits: bit-identical to the sort + per-node matmul composite, forward and gradients") {
    struct Case {
      int64_t T, Kp, n, b, C;
      double skew;
    };
    // C = 800: the GEMM's K blocks (two of 400) in the logits; skew: node 0 holds several K blocks of pairs (dW).
    // b < 16 takes the narrow kernels (logits transposed, dh by rows), b = 20 the wide ones (one grouped GEMM);
    // T = 2048: over 4 MFLOP, the narrow logits and dh run on every thread.
    for (Case cs : {Case{13, 2, 4, 3, 20, 0.0}, Case{40, 3, 5, 4, 800, 0.0}, Case{900, 1, 3, 4, 24, 0.9},
                    Case{7, 1, 1, 6, 9, 0.0}, Case{37, 2, 3, 20, 40, 0.0}, Case{2048, 2, 4, 4, 128, 0.0},
                    Case{11, 1, 1, 20, 33, 0.0}}) {
      CAPTURE(cs.T);
      CAPTURE(cs.C);
      const std::vector<int32_t> node = random_nodes(cs.T, cs.Kp, cs.n, 11 + cs.T, cs.skew);
      const int64_t P = cs.T * cs.Kp;
      Tensor h1 = uniform({cs.T, cs.C}, 1), W1 = uniform({cs.n * cs.b, cs.C}, 2);
      Tensor h2 = h1.clone().detach(), W2 = W1.clone().detach();
      for (Tensor* t : {&h1, &W1, &h2, &W2}) t->requires_grad_(true);
      Tensor gy = uniform({P, cs.b}, 3);
      Tensor a = routed_logits(h1, W1, Tensor::from_vector(node, {P}), cs.b);
      Tensor r = old_logits(h2, W2, node, cs.n, cs.b);
      CHECK(a.to_f32_vector() == r.to_f32_vector());
      sum(mul(a, gy)).backward();
      sum(mul(r, gy)).backward();
      CHECK(h1.grad().to_f32_vector() == h2.grad().to_f32_vector());
      CHECK(W1.grad().to_f32_vector() == W2.grad().to_f32_vector());
      if (cs.n == 1) {  // no node ids: the plain product, forward and gradients
        Tensor h3 = h1.clone().detach(), W3 = W1.clone().detach(), h4 = h3.clone(), W4 = W3.clone();
        for (Tensor* t : {&h3, &W3, &h4, &W4}) t->requires_grad_(true);
        Tensor c = routed_logits(h3, W3, Tensor(), cs.b), m = matmul(h4, W4, false, true);
        CHECK(c.to_f32_vector() == m.to_f32_vector());
        sum(mul(c, gy)).backward();
        sum(mul(m, gy)).backward();
        CHECK(h3.grad().to_f32_vector() == h4.grad().to_f32_vector());
        CHECK(W3.grad().to_f32_vector() == W4.grad().to_f32_vector());
      }
    }
  }

  TEST_CASE("routed logits: finite-difference gradients; nodes no pair reached get zero rows") {
    const int64_t T = 5, Kp = 2, n = 4, b = 3, C = 6;
    const std::vector<int32_t> node = {0, 1, 1, 2, 2, 0, 0, 1, 2, 1};  // node 3: no pair
    Tensor nt = Tensor::from_vector(node, {T * Kp});
    Tensor h = cm::test::param({T, C}, 7), W = cm::test::param({n * b, C}, 8);
    GradcheckResult g = gradcheck([&](const std::vector<Tensor>& x) { return routed_logits(x[0], x[1], nt, b); },
                                  {h, W});
    CHECK_MESSAGE(g.ok, g.message);
    h.zero_grad();
    W.zero_grad();
    sum(routed_logits(h, W, nt, b)).backward();
    std::vector<float> dW = W.grad().to_f32_vector();
    for (int64_t i = 3 * b * C; i < 4 * b * C; ++i) CHECK(dW[(size_t)i] == 0.f);
  }

  TEST_CASE("routed logits: bad shapes and node ids are refused with a message naming them") {
    Tensor h = uniform({4, 3}, 1), W = uniform({6, 3}, 2);
    CHECK_THROWS_WITH(routed_logits(h, W, Tensor::from_vector(std::vector<int32_t>{0, 1, 2, 0}, {4}), 3),
                      doctest::Contains("node 2 of pair 2 outside [0, 2)"));
    CHECK_THROWS_WITH(routed_logits(h, W, Tensor::from_vector(std::vector<int32_t>{0, 1, 0}, {3}), 3),
                      doctest::Contains("not a multiple of T = 4"));
    CHECK_THROWS_WITH(routed_logits(h, W, Tensor(), 3), doctest::Contains("no node ids, but W holds 2 nodes"));
    CHECK_THROWS_WITH(routed_logits(h, W, Tensor(), 4), doctest::Contains("not a multiple of b = 4"));
  }
  TEST_CASE("route select: bit-identical to the softmax + top-k + gather + path composite, forward and gradients") {
    for (const SelCase& cs : kSelCases) {
      CAPTURE(cs.k);
      CAPTURE(cs.n);
      const int64_t P = cs.T * cs.Kp;
      std::vector<int32_t> node = cs.n == 1 ? std::vector<int32_t>{} : random_nodes(cs.T, cs.Kp, cs.n, 40 + cs.k);
      std::vector<float> lb = case_lbias(cs, 41), ab = case_abias(cs, 42);
      Tensor l1 = uniform({P, cs.b}, 43, -3.f, 3.f), par1 = uniform({P}, 44, 0.1f, 1.f);
      for (int64_t p = 0; p < P; p += 5)  // exact ties: equal logits in a row
        for (int64_t c = 0; c < cs.b; ++c) l1.f32()[p * cs.b + c] = 0.25f;
      Tensor l2 = l1.clone().detach(), par2 = par1.clone().detach();
      for (Tensor* t : {&l1, &par1, &l2, &par2}) t->requires_grad_(true);
      LevelSelection a = route_select(l1, node.empty() ? Tensor() : Tensor::from_vector(node, {P}),
                                      cs.parent ? par1 : Tensor(), opt_tensor(lb), opt_tensor(ab), cs.n, cs.temperature,
                                      cs.k, cs.renorm, true, true);
      OldSelection r = old_select(l2, node, cs.parent ? par2 : Tensor(), lb, ab, cs.n, cs.temperature, cs.k, cs.renorm);
      CHECK(a.child.to_i32_vector() == r.child);
      CHECK(a.probs.to_f32_vector() == r.probs.to_f32_vector());
      CHECK(a.path.to_f32_vector() == r.path.to_f32_vector());
      std::vector<int32_t> idx = a.idx.to_i32_vector();
      for (int64_t i = 0; i < P * cs.k; ++i) CHECK(idx[(size_t)i] == r.child[(size_t)i] % cs.b);
      CHECK(a.entropy.item() == doctest::Approx(entropy_ref(r.probs.to_f32_vector(), P, cs.b)).epsilon(1e-5));
      // Both outputs feed the loss, as in the router (load balance on probs, the task loss on the path).
      Tensor wp = uniform({P, cs.b}, 45), wg = uniform({P * cs.k}, 46);
      (sum(mul(a.probs, wp)) + sum(mul(a.path, wg))).backward();
      (sum(mul(r.probs, wp)) + sum(mul(r.path, wg))).backward();
      CHECK(l1.grad().to_f32_vector() == l2.grad().to_f32_vector());
      if (cs.parent) CHECK(par1.grad().to_f32_vector() == par2.grad().to_f32_vector());
    }
  }

  TEST_CASE("route select: the gates' gradient straight to the logits has the composite's bits") {
    // A loss on path alone: route_select_backward_logits against the gradient through dprobs, softmax_backward and
    // the temperature's product (route_select with probs_grad) and against the generic ops' composite, bit for bit,
    // k = 1 to 6, with and without parent, renorm, temperature, biases; kept children sharing a lane of the dot's
    // sixteen (48 and 32 children, k = 6 and 5). With a loss on probs as well, the two gradients are summed where
    // one softmax backward took both: equal within rounding.
    std::vector<SelCase> cases(std::begin(kSelCases), std::end(kSelCases));
    cases.push_back({50, 1, 1, 48, 6, 0.9f, false, false, true, false});
    cases.push_back({40, 2, 3, 32, 5, 1.f, true, true, false, true});
    for (const SelCase& cs : cases) {
      CAPTURE(cs.k);
      CAPTURE(cs.b);
      const int64_t P = cs.T * cs.Kp;
      std::vector<int32_t> node = cs.n == 1 ? std::vector<int32_t>{} : random_nodes(cs.T, cs.Kp, cs.n, 80 + cs.k);
      std::vector<float> lb = case_lbias(cs, 81), ab = case_abias(cs, 82);
      Tensor nt = node.empty() ? Tensor() : Tensor::from_vector(node, {P});
      Tensor l0 = uniform({P, cs.b}, 83, -3.f, 3.f), par0 = uniform({P}, 84, 0.1f, 1.f);
      Tensor wp = uniform({P, cs.b}, 85), wg = uniform({P * cs.k}, 86, -1.f, 1.f);
      for (bool probs_loss : {false, true}) {
        CAPTURE(probs_loss);
        Tensor l[3], par[3];
        for (int i = 0; i < 3; ++i) {
          l[i] = l0.clone().detach().requires_grad_(true);
          par[i] = par0.clone().detach().requires_grad_(true);
        }
        Tensor loss[3];
        for (int i = 0; i < 2; ++i) {  // 0: straight to the logits, 1: through dprobs
          LevelSelection s = route_select(l[i], nt, cs.parent ? par[i] : Tensor(), opt_tensor(lb), opt_tensor(ab),
                                          cs.n, cs.temperature, cs.k, cs.renorm, false, i == 1);
          CHECK(std::string(s.path.impl().grad_fn->name) == (i == 1 ? "route_gates" : "route_gates_logits"));
          loss[i] = probs_loss ? sum(mul(s.path, wg)) + sum(mul(s.probs, wp)) : sum(mul(s.path, wg));
        }
        OldSelection r = old_select(l[2], node, cs.parent ? par[2] : Tensor(), lb, ab, cs.n, cs.temperature, cs.k,
                                    cs.renorm);
        loss[2] = probs_loss ? sum(mul(r.path, wg)) + sum(mul(r.probs, wp)) : sum(mul(r.path, wg));
        for (Tensor& t : loss) t.backward();
        if (!probs_loss) {
          CHECK(bits_of(l[0].grad()) == bits_of(l[1].grad()));
          CHECK(bits_of(l[0].grad()) == bits_of(l[2].grad()));
          if (cs.parent) CHECK(bits_of(par[0].grad()) == bits_of(par[1].grad()));
        } else {
          CHECK_CLOSE(l[0].grad(), l[1].grad().to_f32_vector(), 1e-6f, 1e-5f);
          CHECK(bits_of(l[1].grad()) == bits_of(l[2].grad()));
        }
      }
    }
  }

  TEST_CASE("route select (CPU): the one-pass kernel, row by row, gives the separate passes' bits, entropy too") {
    // Rows split unevenly over 1 and 2 threads, in blocks of rows (the last one short); the reference is the
    // composite above (separate softmax, top-k, gather passes over all rows) and route_mean_entropy over all rows.
    const SelCase cases[] = {
        // Long rows of unbiased scores (b > 64, a multiple of 16): softmax and top k fused (softmax_topk_long)
        {100, 1, 1, 1024, 2, 1.f, false, false, true, false},  // a flat 1024-expert level
        {130, 1, 1, 256, 1, 1.f, false, false, false, false},  // k = 1
        {140, 1, 1, 80, 2, 0.7f, false, false, true, false},   // a temperature: the scores scaled first
        {450, 2, 3, 300, 2, 0.7f, true, true, true, true},     // reliability, pruning, aux-free
        {7001, 1, 1, 5, 3, 1.f, false, true, false, false},    // many short rows
        {160, 1, 1, 700, 9, 1.3f, true, false, false, false},  // k = 9: the general top-k path
        // Sixteen rows at a time, some of them NaN (a NaN or an infinite logit: such a block's rows go one by one)
        {500, 2, 4, 16, 2, 1.f, true, true, true, true},
        {301, 1, 1, 32, 1, 0.8f, true, false, false, false},
        {999, 1, 1, 4, 2, 1.f, false, true, true, false},
        {260, 2, 3, 64, 2, 1.f, true, true, true, true},
        {233, 1, 1, 64, 1, 1.f, false, false, false, false},
    };
    for (const SelCase& cs : cases)
      for (int threads : {1, 2}) {
        CAPTURE(cs.b);
        CAPTURE(threads);
        cm::test::ThreadCount tc(threads);
        const int64_t P = cs.T * cs.Kp;
        std::vector<int32_t> node = cs.n == 1 ? std::vector<int32_t>{} : random_nodes(cs.T, cs.Kp, cs.n, 60 + cs.k);
        std::vector<float> lb = case_lbias(cs, 61), ab = case_abias(cs, 62);
        Tensor l = uniform({P, cs.b}, 63, -3.f, 3.f), par = uniform({P}, 64, 0.1f, 1.f);
        REQUIRE(P > 92);
        for (int64_t p : {int64_t{37}, int64_t{50}, int64_t{123} % P}) {  // an all-NaN row, a NaN, an infinity
          for (int64_t c = 0; c < (p == 37 ? cs.b : 1); ++c) l.f32()[p * cs.b + c] = NAN;
          if (p != 37 && p != 50) l.f32()[p * cs.b + 1] = INFINITY;
        }
        // Ties: a row of equal scores; three equal largest scores far apart; the k-th largest shared by two
        // children (the lower index kept).
        for (int64_t c = 0; c < cs.b; ++c) l.f32()[77 * cs.b + c] = 0.25f;
        for (int64_t c : {cs.b - 1, cs.b / 2, int64_t{1}}) l.f32()[91 * cs.b + c] = 5.f;
        for (int64_t c : {cs.b - 2, int64_t{3}}) l.f32()[92 * cs.b + c] = 4.f;
        l.f32()[92 * cs.b + cs.b / 3] = 6.f;
        NoGrad ng;
        LevelSelection a = route_select(l, node.empty() ? Tensor() : Tensor::from_vector(node, {P}),
                                        cs.parent ? par : Tensor(), opt_tensor(lb), opt_tensor(ab), cs.n,
                                        cs.temperature, cs.k, cs.renorm, true, true);
        OldSelection r = old_select(l, node, cs.parent ? par : Tensor(), lb, ab, cs.n, cs.temperature, cs.k, cs.renorm);
        CHECK(a.child.to_i32_vector() == r.child);
        CHECK(bits_of(a.probs) == bits_of(r.probs));
        CHECK(bits_of(a.path) == bits_of(r.path));
        // The entropy of the separate passes: the scores as the composite made them, route_mean_entropy over all.
        Tensor sc = cs.temperature != 1.f ? mul(l, 1.f / cs.temperature) : l;
        if (!lb.empty())
          sc = add(sc, index_select(Tensor::from_vector(lb, {cs.n, cs.b}), 0,
                                    Tensor::from_vector(node.empty() ? std::vector<int32_t>((size_t)P, 0) : node, {P})));
        sc = sc.contiguous();
        float ent = 0.f;
        cpu::route_mean_entropy(&ent, r.probs.contiguous().f32(), sc.f32(), P, cs.b);
        CHECK(a.entropy.item() == ent);
      }
  }

  TEST_CASE("route select (CPU): outputs of 32 MB and more, stored by streaming stores, equal the rows' own results") {
    // [8192, 1024]: the probabilities, their gradient and the logits' gradient are 32 MB each, written by streaming
    // stores (kernels/cpu/stream.h); 128 of the rows selected on their own (small: plain stores) are the reference.
    const int64_t P = 8192, b = 1024, k = 2;
    Tensor l = uniform({P, b}, 71, -3.f, 3.f), wg = uniform({P * k}, 72);
    std::vector<int64_t> rows;
    for (int64_t p = 0; p < 64; ++p) rows.push_back(p);
    for (int64_t p = 4000; p < 4064; ++p) rows.push_back(p);
    Tensor ls = Tensor::empty({(int64_t)rows.size(), b}), ws = Tensor::empty({(int64_t)rows.size() * k});
    for (size_t i = 0; i < rows.size(); ++i) {
      std::memcpy(ls.f32() + i * b, l.f32() + rows[i] * b, b * sizeof(float));
      std::memcpy(ws.f32() + i * k, wg.f32() + rows[i] * k, k * sizeof(float));
    }
    l.requires_grad_(true);
    ls.requires_grad_(true);
    for (bool probs_grad : {true, false}) {  // the logits' gradient through dprobs, or straight from the gates
      CAPTURE(probs_grad);
      LevelSelection a = route_select(l, Tensor(), Tensor(), Tensor(), Tensor(), 1, 1.f, k, true, false, probs_grad);
      LevelSelection r = route_select(ls, Tensor(), Tensor(), Tensor(), Tensor(), 1, 1.f, k, true, false, probs_grad);
      sum(mul(a.path, wg)).backward();
      sum(mul(r.path, ws)).backward();
      const std::vector<uint32_t> pa = bits_of(a.probs), pr = bits_of(r.probs), ga = bits_of(l.grad()),
                                  gr = bits_of(ls.grad()), ya = bits_of(a.path), yr = bits_of(r.path);
      const std::vector<int32_t> ca = a.child.to_i32_vector(), cr = r.child.to_i32_vector();
      int64_t differ = 0;
      for (size_t i = 0; i < rows.size(); ++i) {
        for (int64_t c = 0; c < b; ++c) {
          differ += pa[(size_t)(rows[i] * b + c)] != pr[i * b + (size_t)c];
          differ += ga[(size_t)(rows[i] * b + c)] != gr[i * b + (size_t)c];
        }
        for (int64_t j = 0; j < k; ++j) {
          differ += ya[(size_t)(rows[i] * k + j)] != yr[i * k + (size_t)j];
          differ += ca[(size_t)(rows[i] * k + j)] != cr[i * k + (size_t)j];
        }
      }
      CHECK(differ == 0);
      l.zero_grad();
      ls.zero_grad();
    }
  }

  TEST_CASE("route select: finite-difference gradients through the probabilities, the gates and the parent path") {
    for (const SelCase& cs : kSelCases) {
      CAPTURE(cs.k);
      const int64_t P = cs.T * cs.Kp;
      std::vector<int32_t> node = cs.n == 1 ? std::vector<int32_t>{} : random_nodes(cs.T, cs.Kp, cs.n, 50 + cs.k);
      Tensor nt = node.empty() ? Tensor() : Tensor::from_vector(node, {P});
      Tensor lb = opt_tensor(case_lbias(cs, 51)), ab = opt_tensor(case_abias(cs, 52));
      Tensor logits = cm::test::param({P, cs.b}, 53, -3.f, 3.f), par = cm::test::param({P}, 54, 0.1f, 1.f);
      Tensor wp = uniform({P, cs.b}, 55);
      // The selection is piecewise constant: eps small against the gaps between random probabilities. Without
      // probs_grad the path's gradient goes straight to the logits, and probs still has its own (both summed).
      for (bool probs_grad : {true, false}) {
        CAPTURE(probs_grad);
        GradcheckResult g = gradcheck(
            [&](const std::vector<Tensor>& x) {
              LevelSelection s = route_select(x[0], nt, cs.parent ? x[1] : Tensor(), lb, ab, cs.n, cs.temperature,
                                              cs.k, cs.renorm, false, probs_grad);
              return concat({mul(s.probs, wp).view({P * cs.b}), s.path}, 0);
            },
            {logits, par}, 1e-3f, 2e-3f, 2e-2f);
        CHECK_MESSAGE(g.ok, g.message);
      }
    }
  }

  TEST_CASE("route pair keys: expert * V + token of each slot; a dropped slot or an id out of range gives -1") {
    const std::vector<int32_t> expert = {0, 2, -1, 1, 2, 3, 1, 0}, tokens = {4, 0, 3, 9};  // K = 2, N = 3, V = 5
    std::vector<int32_t> keys(8, 7);
    cpu::route_pair_keys(keys.data(), expert.data(), tokens.data(), 8, 2, 3, 5);
    CHECK(keys == std::vector<int32_t>{4, 14, -1, 5, 13, -1, -1, -1});  // expert 3 >= N; token 9 >= V
  }

  TEST_CASE("routing statistics counters: rows from a plan's offsets; int64 sums of i32 counts past 2^31") {
    const std::vector<int64_t> off = {0, 3, 3, 10, 11};
    std::vector<int32_t> rows(4, -7);
    cpu::route_offset_counts(rows.data(), off.data(), 4);
    CHECK(rows == std::vector<int32_t>{3, 0, 7, 1});
    std::vector<int64_t> acc = {5, (int64_t)INT32_MAX, -2};
    const std::vector<int32_t> c = {1, INT32_MAX, 0};
    cpu::route_counts_add(acc.data(), c.data(), 3);
    cpu::route_counts_add(acc.data(), c.data(), 2);  // n: only the first two
    CHECK(acc == std::vector<int64_t>{7, 3 * (int64_t)INT32_MAX, -2});
  }

  TEST_CASE("aux-free bias update: each child moves rate towards its node's mean load, ties stay; loads cleared") {
    // Two nodes of 3 children. Node 0: loads 1, 5, 3 (mean 3): +rate, -rate, 0. Node 1: all 4: nothing moves.
    std::vector<float> bias = {0.5f, 0.f, -1.f, 2.f, 2.f, 2.f};
    std::vector<int64_t> load = {1, 5, 3, 4, 4, 4};
    cpu::route_aux_bias_update(bias.data(), load.data(), 2, 3, 0.25f);
    CHECK(bias == std::vector<float>{0.75f, -0.25f, -1.f, 2.f, 2.f, 2.f});
    CHECK(load == std::vector<int64_t>(6, 0));
  }

  TEST_CASE("route bias: every level's log reliability and the pruned experts, the former host formula's bits") {
    // kernels/route.h route_bias_forward against tests/bias_ref.h (what model/moe.cpp computed on the host before):
    // the same floats bit for bit, -inf included, with reliability on and off.
    uint64_t seed = 900;
    for (const std::vector<int64_t>& br : kBiasTrees)
      for (int reliability = 0; reliability < 2; ++reliability) {
        CAPTURE(br.size());
        CAPTURE(br.back());
        CAPTURE(reliability);
        int64_t N = 1, total = 0;
        for (int64_t b : br) total += (N *= b);
        const HealthState h = random_health(N, br.back(), ++seed);
        std::vector<float> got((size_t)total, 7.f);
        cpu::route_bias_forward(got.data(), h.rel.data(), h.use.data(), h.pruned.data(), br.data(),
                                (int64_t)br.size(), reliability);
        std::vector<float> want;
        for (const std::vector<float>& lv : cm::test::host_routing_bias(br, h.rel, h.use, h.pruned, reliability))
          want.insert(want.end(), lv.begin(), lv.end());
        REQUIRE(want.size() == got.size());
        CHECK(std::memcmp(got.data(), want.data(), got.size() * 4) == 0);
        // Not a vacuous comparison: the inner levels are biased, and the pruned experts are -inf at the last level.
        if (reliability && br.size() > 1 && br[1] > 1)
          CHECK(std::any_of(got.begin(), got.begin() + br[0], [](float v) { return v < 0.f; }));
        for (int64_t e = 0; e < N; ++e) CHECK((got[(size_t)(total - N + e)] == -INFINITY) == (h.pruned[e] != 0.f));
      }
    // A healthy layer's bias is all zeros: log(1) == 0 exactly.
    const std::vector<int64_t> br = {3, 4};
    std::vector<float> rel(12, 1.f), use(12, 1.f / 12), none(12, 0.f), got(15, 7.f);
    cpu::route_bias_forward(got.data(), rel.data(), use.data(), none.data(), br.data(), 2, true);
    CHECK(got == std::vector<float>(15, 0.f));
  }

  TEST_CASE("route select: bad arguments and a node with fewer than k selectable children are refused") {
    Tensor logits = uniform({4, 3}, 1);
    CHECK_THROWS_WITH(route_select(logits, Tensor(), Tensor(), Tensor(), Tensor(), 1, 1.f, 4, false, false, true),
                      doctest::Contains("k = 4 outside [1, b = 3]"));
    CHECK_THROWS_WITH(route_select(logits, Tensor::from_vector(std::vector<int32_t>{0, 1, 2, 0}, {4}), Tensor(),
                                   Tensor(), Tensor(), 2, 1.f, 1, false, false, true),
                      doctest::Contains("node 2 of pair 2 outside [0, 2)"));
    CHECK_THROWS_WITH(route_select(logits, Tensor(), uniform({3}, 2), Tensor(), Tensor(), 1, 1.f, 1, false, false, true),
                      doctest::Contains("path_parent must be f32 [4]"));
    Tensor pruned = Tensor::from_vector(std::vector<float>{0.f, -INFINITY, -INFINITY}, {3});
    CHECK_THROWS_WITH(route_select(logits, Tensor(), Tensor(), pruned, Tensor(), 1, 1.f, 2, false, false, true),
                      doctest::Contains("node 0 has fewer than 2 selectable children"));
  }

  TEST_CASE("group-limited selection: every level's kept children equal a brute force, ties to the lower index") {
    for (const GroupCase& cs : kGroupCases) {
      CAPTURE(cs.b.size());
      CAPTURE(cs.b[0]);
      const GroupInput in = group_input(cs, 29, 70 + cs.b.size() + cs.b[0]);
      bool pruned_kept = true;
      const std::vector<int32_t> ref = group_select_ref(cs, in, &pruned_kept);
      CHECK_FALSE(pruned_kept);
      CHECK(group_select_cpu(cs, in) == ref);
      // A tie row (token 0: uniform) keeps the lowest children at level 0 unless the aux-free bias reorders them.
      if (!cs.abias)
        for (int64_t r = 0; r < cs.k[0]; ++r) CHECK(ref[(size_t)r] == r);
      // Not vacuous: the aux-free bias and the pruning each change some token's selection.
      bool ignored = false;
      if (cs.abias) {
        GroupInput plain = in;
        plain.abias.clear();
        CHECK(group_select_ref(cs, plain, &ignored) != ref);
      }
      if (cs.pruned) {
        GroupInput healthy = in;
        healthy.lbias.clear();
        CHECK(group_select_ref(cs, healthy, &ignored) != ref);
      }
    }
  }

  TEST_CASE("group-limited selection: a node with fewer than k selectable children is an error naming it") {
    const GroupCase cs = starved_case();
    const GroupInput in = starved_input();
    CHECK_THROWS_WITH(group_select_cpu(cs, in), doctest::Contains("level 1 node 0 has fewer than 2 selectable children"));
    GroupInput ok = in;
    ok.probs = std::vector<float>(ok.probs.begin() + 12, ok.probs.end());  // token 2 only: its mass is under node 1
    ok.T = 1;
    CHECK(group_select_cpu(cs, ok) == std::vector<int32_t>{1, 3, 5});
  }
}

#if CM_CUDA
TEST_SUITE("cuda") {
  TEST_CASE("cuda kernels: routed logits forward and both gradients against the CPU" * cm::test::needs_device()) {
    struct Case {
      int64_t T, Kp, n, b, C;
    };
    // Odd sizes: C not a multiple of 32 (lane tails), one node, many pairs on one node; nodes of more than 384 pairs
    // (dW in more than one K block of the CPU GEMM, summed side by side on the device); more than 384 channels (the
    // forward's K blocks) and more than 64 children (two column tiles of the device's grouped GEMM).
    for (Case cs : {Case{9, 2, 5, 3, 37}, Case{33, 1, 1, 7, 40}, Case{70, 4, 4, 2, 16}, Case{3, 1, 2, 5, 65},
                    Case{900, 2, 3, 4, 33}, Case{1000, 1, 2, 3, 20}, Case{40, 2, 3, 5, 400}, Case{50, 1, 2, 70, 24}}) {
      CAPTURE(cs.T);
      CAPTURE(cs.C);
      const int64_t P = cs.T * cs.Kp;
      std::vector<int32_t> node = random_nodes(cs.T, cs.Kp, cs.n, 21 + cs.C, 0.5);
      Tensor nt = cs.n == 1 ? Tensor() : Tensor::from_vector(node, {P});
      Tensor h = uniform({cs.T, cs.C}, 31), W = uniform({cs.n * cs.b, cs.C}, 32), gy = uniform({P, cs.b}, 33);
      Tensor hd = h.to(Device::CUDA), Wd = W.to(Device::CUDA);
      for (Tensor* t : {&h, &W, &hd, &Wd}) t->requires_grad_(true);
      Tensor ref = routed_logits(h, W, nt, cs.b);
      Tensor got = routed_logits(hd, Wd, nt.defined() ? nt.to(Device::CUDA) : Tensor(), cs.b);
      CHECK(got.device() == Device::CUDA);
      CHECK_CLOSE(got, ref.to_f32_vector(), 1e-5f, 1e-5f);
      sum(mul(ref, gy)).backward();
      sum(mul(got, gy.to(Device::CUDA))).backward();
      CHECK_CLOSE(hd.grad(), h.grad().to_f32_vector(), 1e-5f, 1e-5f);
      CHECK_CLOSE(Wd.grad(), W.grad().to_f32_vector(), 1e-5f, 1e-5f);
#if defined(__FMA__) || defined(__AVX512F__)
      // The logits, dh and dW: the CPU GEMM's K blocks and fused multiply-adds, and dh's pairs added in the CPU's
      // order, so its bits (kernels/cuda/route.cu)
      if (nt.defined()) {
        CHECK(got.to_f32_vector() == ref.to_f32_vector());
        CHECK(hd.grad().to_f32_vector() == h.grad().to_f32_vector());
        CHECK(Wd.grad().to_f32_vector() == W.grad().to_f32_vector());
      }
#endif
      // The same bits on a second run (fixed summation orders, no float atomics).
      Tensor again = routed_logits(hd.detach(), Wd.detach(), nt.defined() ? nt.to(Device::CUDA) : Tensor(), cs.b);
      CHECK(again.to_f32_vector() == got.to_f32_vector());
    }
  }

  TEST_CASE("cuda kernels: route histogram counts, overwrite and accumulate, ids out of range skipped" *
            cm::test::needs_device()) {
    std::vector<int32_t> ids;
    Generator g(3);
    std::vector<float> u = Tensor::rand({3001}, g).to_f32_vector();
    for (float x : u) ids.push_back((int32_t)(x * 19.f) - 1);  // -1 .. 17 over n = 17: -1 and 17 are skipped
    std::vector<int32_t> ref((size_t)17, 5);
    cpu::route_histogram(ref.data(), ids.data(), (int64_t)ids.size(), 17, false);
    Tensor idt = Tensor::from_vector(ids, {(int64_t)ids.size()}).to(Device::CUDA);
    Tensor counts = Tensor::full({17}, 3.f, DType::I32, Device::CUDA);
    cuda::route_histogram(counts.i32(), idt.i32(), (int64_t)ids.size(), 17, false);
    CHECK(counts.to_i32_vector() == ref);
    cuda::route_histogram(counts.i32(), idt.i32(), (int64_t)ids.size(), 17, true);
    for (int32_t& c : ref) c *= 2;
    CHECK(counts.to_i32_vector() == ref);
  }
  TEST_CASE("cuda kernels: routing statistics counters equal the CPU twins on random plans" *
            cm::test::needs_device()) {
    Generator g(6);
    for (int64_t N : {1, 7, 300}) {
      CAPTURE(N);
      std::vector<float> u = Tensor::rand({2 * N + 1}, g).to_f32_vector();
      std::vector<int64_t> off((size_t)N + 1, 0), acc((size_t)N);
      std::vector<int32_t> counts((size_t)N);
      for (int64_t e = 0; e < N; ++e) {
        off[e + 1] = off[e] + (int64_t)(u[e] * 50.f);
        counts[e] = (int32_t)(u[N + e] * 2e9f);  // near INT32_MAX: the sums pass it
        acc[e] = (int64_t)(u[2 * N] * 1e12f) + e;
      }
      std::vector<int32_t> ref((size_t)N);
      cpu::route_offset_counts(ref.data(), off.data(), N);
      std::vector<int32_t> off_words((size_t)(2 * (N + 1))), acc_words((size_t)(2 * N));
      std::memcpy(off_words.data(), off.data(), off_words.size() * 4);
      std::memcpy(acc_words.data(), acc.data(), acc_words.size() * 4);
      Tensor od = Tensor::from_vector(off_words, {2 * (N + 1)}).to(Device::CUDA);
      Tensor rows = Tensor::empty({N}, DType::I32, Device::CUDA);
      cuda::route_offset_counts(rows.i32(), static_cast<const int64_t*>(od.raw()), N);
      CHECK(rows.to_i32_vector() == ref);
      Tensor ad = Tensor::from_vector(acc_words, {2 * N}).to(Device::CUDA);
      Tensor cd = Tensor::from_vector(counts, {N}).to(Device::CUDA);
      for (int i = 0; i < 3; ++i) {
        cpu::route_counts_add(acc.data(), counts.data(), N);
        cuda::route_counts_add(static_cast<int64_t*>(ad.raw()), cd.i32(), N);
      }
      const std::vector<int32_t> got = ad.to_i32_vector();
      std::vector<int64_t> sums((size_t)N);
      std::memcpy(sums.data(), got.data(), (size_t)N * 8);
      CHECK(sums == acc);
    }
  }
  TEST_CASE("cuda kernels: the aux-free bias update equals the CPU twin on random loads" * cm::test::needs_device()) {
    Generator g(8);
    for (int64_t b : {1, 4, 33}) {
      CAPTURE(b);
      const int64_t n = 5, nb = n * b;
      std::vector<float> u = Tensor::rand({2 * nb}, g).to_f32_vector(), bias((size_t)nb);
      std::vector<int64_t> load((size_t)nb);
      for (int64_t i = 0; i < nb; ++i) {
        bias[i] = u[i] - 0.5f;
        load[i] = (int64_t)(u[nb + i] * 4.f) + (i % 3 == 0 ? (int64_t)3e9 : 0);  // small: ties; some past 2^31
      }
      std::vector<int32_t> words((size_t)(2 * nb));
      std::memcpy(words.data(), load.data(), words.size() * 4);
      Tensor bd = Tensor::from_vector(bias, {nb}).to(Device::CUDA);
      Tensor ld = Tensor::from_vector(words, {2 * nb}).to(Device::CUDA);
      cpu::route_aux_bias_update(bias.data(), load.data(), n, b, 1e-3f);
      cuda::route_aux_bias_update(bd.f32(), static_cast<int64_t*>(ld.raw()), n, b, 1e-3f);
      CHECK(bd.to_f32_vector() == bias);
      CHECK(ld.to_i32_vector() == std::vector<int32_t>((size_t)(2 * nb), 0));
    }
  }
  TEST_CASE("cuda kernels: route pair keys equal the CPU twin on random slots" * cm::test::needs_device()) {
    Generator g(5);
    for (int64_t K : {1, 3}) {
      const int64_t T = 257, A = T * K, N = 6, V = 11;
      std::vector<float> u = Tensor::rand({A + T}, g).to_f32_vector();
      std::vector<int32_t> expert((size_t)A), tokens((size_t)T);
      for (int64_t a = 0; a < A; ++a) expert[a] = (int32_t)(u[a] * (N + 2)) - 1;  // -1 .. N: both ends invalid
      for (int64_t t = 0; t < T; ++t) tokens[t] = (int32_t)(u[A + t] * (V + 1));  // 0 .. V
      std::vector<int32_t> ref((size_t)A);
      cpu::route_pair_keys(ref.data(), expert.data(), tokens.data(), A, K, N, V);
      Tensor ed = Tensor::from_vector(expert, {A}).to(Device::CUDA), td = Tensor::from_vector(tokens, {T}).to(Device::CUDA);
      Tensor keys = Tensor::empty({A}, DType::I32, Device::CUDA);
      cuda::route_pair_keys(keys.i32(), ed.i32(), td.i32(), A, K, N, V);
      CHECK_MESSAGE(keys.to_i32_vector() == ref, "K=", K);
    }
  }

  TEST_CASE("cuda kernels: AC scales and the running m's update equal the CPU twin on random batches" *
            cm::test::needs_device()) {
    Generator g(9);
    // N = 40 and C = 300: more labels than a warp's 32 rows, more features than a block's 128; T = 70 tokens under
    // one label (N = 1): three rounds of 32.
    for (int64_t N : {1, 5, 16, 40}) {
      const int64_t T = N == 40 ? 400 : 70, C = N == 40 ? 300 : 24;
      CAPTURE(N);
      std::vector<float> u = Tensor::rand({T}, g).to_f32_vector();
      std::vector<int32_t> labels((size_t)T);
      for (int64_t t = 0; t < T; ++t) labels[t] = (int32_t)(u[t] * (float)N) / 2 * 2 % N;  // odd labels empty
      const Segments sg = counting_sort(labels, N);
      Tensor h = uniform({T, C}, 40 + N, -2.f, 2.f), run0 = uniform({N, C}, 50 + N, 0.5f, 2.f);
      for (int64_t t = 0; t < T; ++t)  // label 0's feature 5 constant: w = 1e4 there, past the clip
        if (labels[t] == 0) h.f32()[t * C + 5] = 0.25f;
      std::vector<float> m((size_t)(N * C)), run = run0.to_f32_vector();
      std::vector<int32_t> has((size_t)N);
      std::vector<double> w((size_t)(N * C + N + C + 2));
      cpu::ac_scales_forward(m.data(), has.data(), run.data(), w.data(), h.f32(), sg.order.data(), sg.offsets.data(),
                             N, C);
      std::vector<int32_t> off_words((size_t)(2 * (N + 1)));
      std::memcpy(off_words.data(), sg.offsets.data(), off_words.size() * 4);
      Tensor hd = h.to(Device::CUDA), rd = run0.to(Device::CUDA);
      Tensor od = Tensor::from_vector(sg.order, {T}).to(Device::CUDA);
      Tensor offd = Tensor::from_vector(off_words, {2 * (N + 1)}).to(Device::CUDA);
      Tensor md = Tensor::empty({N, C}, DType::F32, Device::CUDA), hasd = Tensor::empty({N}, DType::I32, Device::CUDA);
      Tensor wd = Tensor::empty({2 * (N * C + N + C + 2)}, DType::F32, Device::CUDA);
      cuda::ac_scales_forward(md.f32(), hasd.i32(), rd.f32(), static_cast<double*>(wd.raw()), hd.f32(), od.i32(),
                              static_cast<const int64_t*>(offd.raw()), N, C);
      REQUIRE(has[0] == 1);
      CHECK(w[5] < 5e3);  // the clip fired (w keeps min(w, clip); unclipped 1e4)
      CHECK(hasd.to_i32_vector() == has);
      CHECK(cm::test::first_mismatch(md.to_f32_vector(), m, 1e-6f, 1e-5f) < 0);
      CHECK(cm::test::first_mismatch(rd.to_f32_vector(), run, 1e-6f, 1e-5f) < 0);
      CHECK(md.to_f32_vector() == m);  // the header's promise: every sum in the CPU's order
      CHECK(rd.to_f32_vector() == run);
      // m's float rounding hides most of the doubles' order; the weights themselves show it. The CPU clips w in
      // place, the CUDA twin as it reads: equal, or clipped on the CPU to the clip (w's largest value).
      const std::vector<float> words = wd.to_f32_vector();
      std::vector<double> gw((size_t)(N * C));
      std::memcpy(gw.data(), words.data(), gw.size() * sizeof(double));
      const double clip = *std::max_element(w.begin(), w.begin() + N * C);
      int64_t differ = 0;
      for (size_t i = 0; i < gw.size(); ++i) differ += !(gw[i] == w[i] || (gw[i] > clip && w[i] == clip));
      CHECK(differ == 0);
      if (N > 1) CHECK(has[1] == 0);  // an empty label keeps m = 1 and its running m
    }
  }

  TEST_CASE("cuda kernels: route bias equals the CPU twin on random health states" * cm::test::needs_device()) {
    // Double sums in the same order on both: the reliabilities are the same bits; the logs are the device's logf,
    // within float rounding of the CPU's, -inf and 0 exactly.
    uint64_t seed = 950;
    for (const std::vector<int64_t>& br : kBiasTrees)
      for (int reliability = 0; reliability < 2; ++reliability) {
        CAPTURE(br.size());
        CAPTURE(br.back());
        CAPTURE(reliability);
        int64_t N = 1, total = 0;
        for (int64_t b : br) total += (N *= b);
        const HealthState h = random_health(N, br.back(), ++seed);
        std::vector<float> ref((size_t)total);
        cpu::route_bias_forward(ref.data(), h.rel.data(), h.use.data(), h.pruned.data(), br.data(),
                                (int64_t)br.size(), reliability);
        Tensor rd = Tensor::from_vector(h.rel, {N}).to(Device::CUDA);
        Tensor ud = Tensor::from_vector(h.use, {N}).to(Device::CUDA);
        Tensor pd = Tensor::from_vector(h.pruned, {N}).to(Device::CUDA);
        Tensor out = Tensor::full({total}, 7.f, DType::F32, Device::CUDA);
        cuda::route_bias_forward(out.f32(), rd.f32(), ud.f32(), pd.f32(), br.data(), (int64_t)br.size(), reliability);
        const std::vector<float> got = out.to_f32_vector();
        for (int64_t i = 0; i < total; ++i) {
          CAPTURE(i);
          if (std::isinf(ref[(size_t)i]) || ref[(size_t)i] == 0.f) CHECK(got[(size_t)i] == ref[(size_t)i]);
          else CHECK(std::fabs(got[(size_t)i] - ref[(size_t)i]) <= 1e-7f + 1e-6f * std::fabs(ref[(size_t)i]));
        }
      }
  }

  TEST_CASE("cuda kernels: route select forward and backward against the CPU" * cm::test::needs_device()) {
    for (const SelCase& cs : kSelCases) {
      CAPTURE(cs.k);
      const int64_t P = cs.T * cs.Kp;
      std::vector<int32_t> node = cs.n == 1 ? std::vector<int32_t>{} : random_nodes(cs.T, cs.Kp, cs.n, 60 + cs.k);
      Tensor nt = node.empty() ? Tensor() : Tensor::from_vector(node, {P});
      Tensor lb = opt_tensor(case_lbias(cs, 61)), ab = opt_tensor(case_abias(cs, 62));
      Tensor logits = uniform({P, cs.b}, 63, -3.f, 3.f), par = uniform({P}, 64, 0.1f, 1.f);
      for (int64_t p = 0; p < P; p += 4)  // exact ties (equal logits give equal probabilities on both devices)
        for (int64_t c = 0; c < cs.b; ++c) logits.f32()[p * cs.b + c] = -0.5f;
      Tensor ld = logits.to(Device::CUDA), pd = par.to(Device::CUDA);
      for (Tensor* t : {&logits, &par, &ld, &pd}) t->requires_grad_(true);
      auto on = [](const Tensor& t) { return t.defined() ? t.to(Device::CUDA) : Tensor(); };
      // probs_grad: a loss on probs and path, the gradient through dprobs; without, a loss on path alone, its
      // gradient straight to the logits (route_select_backward_logits).
      for (bool probs_grad : {true, false}) {
        CAPTURE(probs_grad);
        LevelSelection r = route_select(logits, nt, cs.parent ? par : Tensor(), lb, ab, cs.n, cs.temperature, cs.k,
                                        cs.renorm, true, probs_grad);
        LevelSelection g = route_select(ld, on(nt), cs.parent ? pd : Tensor(), on(lb), on(ab), cs.n, cs.temperature,
                                        cs.k, cs.renorm, true, probs_grad);
        CHECK(g.child.device() == Device::CUDA);
        CHECK(g.child.to_i32_vector() == r.child.to_i32_vector());
        CHECK(g.idx.to_i32_vector() == r.idx.to_i32_vector());
        CHECK_CLOSE(g.probs, r.probs.to_f32_vector(), 1e-6f, 1e-5f);
        CHECK_CLOSE(g.path, r.path.to_f32_vector(), 1e-6f, 1e-5f);
        CHECK(g.entropy.item() == doctest::Approx(r.entropy.item()).epsilon(1e-5));
        Tensor wp = uniform({P, cs.b}, 65), wg = uniform({P * cs.k}, 66);
        Tensor lr = sum(mul(r.path, wg)), lg = sum(mul(g.path, wg.to(Device::CUDA)));
        if (probs_grad) {
          lr = lr + sum(mul(r.probs, wp));
          lg = lg + sum(mul(g.probs, wp.to(Device::CUDA)));
        }
        lr.backward();
        lg.backward();
        CHECK_CLOSE(ld.grad(), logits.grad().to_f32_vector(), 1e-6f, 1e-4f);
        if (cs.parent) CHECK_CLOSE(pd.grad(), par.grad().to_f32_vector(), 1e-6f, 1e-5f);
        for (Tensor* t : {&logits, &par, &ld, &pd}) t->zero_grad();
      }
    }
  }

  TEST_CASE("cuda kernels: group-limited selection and the routing entropy equal the CPU twins" *
            cm::test::needs_device()) {
    auto on = [](const std::vector<float>& v) {
      return v.empty() ? Tensor() : Tensor::from_vector(v, {(int64_t)v.size()}).to(Device::CUDA);
    };
    for (const GroupCase& cs : kGroupCases) {
      CAPTURE(cs.b.size());
      CAPTURE(cs.b[0]);
      const GroupInput in = group_input(cs, 41, 90 + cs.b.size() + cs.b[0]);
      const std::vector<int32_t> ref = group_select_cpu(cs, in);
      Tensor pd = on(in.probs), ad = on(in.abias), ld = on(in.lbias);
      Tensor ids = Tensor::full({(int64_t)ref.size()}, -7.f, DType::I32, Device::CUDA);
      cuda::route_group_select(ids.i32(), pd.f32(), ad.defined() ? ad.f32() : nullptr,
                               ld.defined() ? ld.f32() : nullptr, cs.b.data(), cs.k.data(), (int64_t)cs.b.size(),
                               in.T);
      CHECK(ids.to_i32_vector() == ref);  // the same double sums in the same order: the same ids
      // The entropy of the rows: probs and s = log probs (a softmax of its own logs), pruned leaves p = 0, s = -inf.
      std::vector<float> p = in.probs, s((size_t)(in.T * in.N));
      for (size_t i = 0; i < p.size(); ++i) {
        if (i % 7 == 3) p[i] = 0.f;
        s[i] = p[i] > 0.f ? std::log(p[i]) : -INFINITY;
      }
      float ent_ref = 0.f;
      cpu::route_mean_entropy(&ent_ref, p.data(), s.data(), in.T, in.N);
      Tensor ent = Tensor::empty({}, DType::F32, Device::CUDA);
      Tensor pe = on(p), se = on(s);
      cuda::route_mean_entropy(ent.f32(), pe.f32(), se.f32(), in.T, in.N);
      CHECK(ent.item() == doctest::Approx(ent_ref).epsilon(1e-5));
    }
  }

  TEST_CASE("cuda kernels: group-limited selection records a node with fewer than k selectable children" *
            cm::test::needs_device()) {
    const GroupCase cs = starved_case();
    const GroupInput in = starved_input();
    Tensor pd = Tensor::from_vector(in.probs, {in.T * in.N}).to(Device::CUDA);
    Tensor ld = Tensor::from_vector(in.lbias, {(int64_t)in.lbias.size()}).to(Device::CUDA);
    Tensor ids = Tensor::empty({in.T * 3}, DType::I32, Device::CUDA);
    cuda::route_group_select(ids.i32(), pd.f32(), nullptr, ld.f32(), cs.b.data(), cs.k.data(), 2, in.T);
    CHECK_THROWS_WITH(cuda::check_index_errors(),
                      doctest::Contains("group_limited routing: level 1 node 0 has fewer than 2 selectable children"));
    CHECK_NOTHROW(cuda::check_index_errors());  // reported once, then cleared
    // The same kernel on a token whose node has enough: no record.
    cuda::route_group_select(ids.i32(), pd.f32() + 12, nullptr, ld.f32(), cs.b.data(), cs.k.data(), 2, 1);
    CHECK(ids.slice(0, 0, 3).to_i32_vector() == std::vector<int32_t>{1, 3, 5});
  }
}
#endif
