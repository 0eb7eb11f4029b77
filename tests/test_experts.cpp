// The MoE layer's data flow: one expert equals the dense FFN, dispatch/combine, gradcheck of the whole layer with
// its routing weights, per-token independence, GELU experts, the adaptive gate.
#include <algorithm>
#include <cmath>

#include "model/moe.h"
#include "tests/helpers.h"

using namespace cm;
using cm::test::first_mismatch;
using cm::test::uniform;

namespace {

CoEConfig small_moe(int64_t C, int64_t F, std::vector<int64_t> b, std::vector<int64_t> k) {
  CoEConfig c;
  c.d_model = C;
  c.n_heads = 1;
  c.d_ff = F;
  c.router = RouterKind::Tree;
  c.tree_branching = b;
  c.tree_top_k = k;
  int64_t n = 1;
  for (int64_t v : b) n *= v;
  c.num_clusters = b[0];
  c.experts_per_cluster = n / b[0];
  c.use_reliability = false;
  c.validate();
  return c;
}

double gelu_ref(double x) { return 0.5 * x * (1.0 + std::tanh(0.7978845608028654 * (x + 0.044715 * x * x * x))); }

}  // namespace

TEST_SUITE("experts") {
  TEST_CASE("an MoE layer with one expert and K = 1 equals the dense FFN") {
    CoEConfig c = small_moe(8, 12, {1}, {1});
    Generator gen(51);
    MoELayer moe(c, 0, true, gen);
    REQUIRE(moe.N == 1);
    REQUIRE(moe.K == 1);
    Generator gen2(52);
    MoELayer dense(c, 0, false, gen2);
    for (size_t i = 0; i < dense.experts[0].tensors().size(); ++i)
      dense.experts[0].tensors()[i].copy_(moe.experts[0].tensors()[i]);
    Tensor x = uniform({9, 8}, 53);
    Tensor y_moe = moe.forward(x, nullptr, nullptr, true).y;
    Tensor y_ffn = moe.experts[0].forward(x);
    Tensor y_dense = dense.forward(x, nullptr, nullptr, true).y;
    CHECK(y_moe.to_f32_vector() == y_ffn.to_f32_vector());  // gate = softmax of one logit = 1, exactly
    CHECK(y_dense.to_f32_vector() == y_ffn.to_f32_vector());
  }

  TEST_CASE("dispatch then combine is the identity for unit gates") {
    const int64_t T = 11, C = 5, N = 4;
    Tensor x = uniform({T, C}, 54);
    x.requires_grad_(true);
    for (int64_t K : {1, 3}) {
      std::vector<int32_t> expert((size_t)(T * K));
      for (size_t i = 0; i < expert.size(); ++i) expert[i] = (int32_t)((i * 7 + 3) % N);
      DispatchPlan plan = make_dispatch_plan(Tensor::from_vector(expert, {T * K}), K, N);
      REQUIRE(plan.rows == T * K);
      std::vector<int32_t> slot = plan.assign_of.to_i32_vector();
      for (int64_t i = 1; i < plan.rows; ++i) CHECK(expert[slot[i - 1]] <= expert[slot[i]]);  // sorted
      for (int64_t e = 0; e < N; ++e)
        for (int64_t i = plan.offsets[e]; i < plan.offsets[e + 1]; ++i) CHECK(expert[slot[i]] == e);
      Tensor xs = moe_permute(x, plan);
      Tensor y = moe_combine(xs, Tensor::full({T * K}, 1.f / (float)K), plan);
      CHECK_CLOSE(y, x.to_f32_vector(), 1e-6f, 1e-6f);
      if (K == 1) {
        CHECK(y.to_f32_vector() == x.to_f32_vector());
        // and backward is the identity too (it reuses the same permutation)
        Tensor w = uniform({T, C}, 55);
        sum(mul(y, w)).backward();
        CHECK(x.grad().to_f32_vector() == w.to_f32_vector());
        x.zero_grad();
      }
    }
    // Dropped slots contribute nothing.
    std::vector<int32_t> expert = {0, -1, 2, 3, -1, 1};  // -1: dropped by capacity
    DispatchPlan plan = make_dispatch_plan(Tensor::from_vector(expert, {6}), 1, N);
    CHECK(plan.rows == 4);
    Tensor x6 = uniform({6, C}, 56);
    std::vector<float> ref = x6.to_f32_vector();
    for (int64_t t : {1, 4}) std::fill(ref.begin() + t * C, ref.begin() + (t + 1) * C, 0.f);
    CHECK_CLOSE(moe_combine(moe_permute(x6, plan), Tensor::ones({6}), plan), ref, 0.f, 0.f);
  }

  TEST_CASE("gradcheck of a whole small MoE layer, routing weights included") {
    CoEConfig c = small_moe(4, 5, {2, 3}, {2, 1});
    c.load_balancing_weight = 0.1f;
    c.router_z_loss_weight = 0.05f;
    c.diversity_weight = 0.1f;
    c.init_std = 0.8f;
    Generator gen(57);
    MoELayer layer(c, 0, true, gen);
    Tensor x = uniform({6, 4}, 75);
    x.requires_grad_(true);
    // The check perturbs inputs by 1e-2; selection must not flip under that. Every top-k decision of this seed
    // has a logit margin of at least 0.1 (router entries and inputs are < 2 in magnitude).
    {
      NoGrad ng;
      std::vector<float> xv = x.to_f32_vector();
      double min_gap = 1e9;
      for (int64_t l = 0; l < 2; ++l) {
        std::vector<float> W = layer.router.weights[l].to_f32_vector();
        const int64_t b = layer.router.branching[l], k = layer.router.top_k[l];
        for (int64_t node = 0; node < layer.router.nodes[l]; ++node)
          for (int64_t t = 0; t < 6; ++t) {
            std::vector<double> z((size_t)b);
            for (int64_t j = 0; j < b; ++j)
              for (int64_t q = 0; q < 4; ++q) z[j] += (double)xv[t * 4 + q] * W[(node * b + j) * 4 + q];
            std::sort(z.begin(), z.end(), std::greater<double>());
            if (k < b) min_gap = std::min(min_gap, z[k - 1] - z[k]);
          }
      }
      REQUIRE(min_gap > 0.1);
    }
    std::vector<Tensor> inputs = {x};
    for (const Tensor& w : layer.router.weights) inputs.push_back(w);
    for (const ExpertFFN& e : layer.experts)
      for (const Tensor& t : e.tensors()) inputs.push_back(t);
    auto fn = [&](const std::vector<Tensor>&) {
      MoELayer::Output o = layer.forward(inputs[0], nullptr, nullptr, false);
      Tensor aux = add(add(o.lb_loss, o.z_loss), o.div_loss).view({1});
      return concat({o.y.reshape({-1}), aux}, 0);
    };
    CHECK_GRAD(fn, inputs);
  }

  TEST_CASE("with capacity off, a token's output does not depend on the rest of the batch") {
    CoEConfig c = small_moe(6, 10, {3, 2}, {2, 1});
    c.init_std = 0.5f;
    Generator gen(59);
    MoELayer layer(c, 0, true, gen);
    const int64_t T = 15, C = 6;
    Tensor x = uniform({T, C}, 60);
    for (bool training : {false, true}) {
      std::vector<float> yb = layer.forward(x, nullptr, nullptr, training).y.to_f32_vector();
      for (int64_t t = 0; t < T; ++t) {
        std::vector<float> ref(yb.begin() + t * C, yb.begin() + (t + 1) * C);
        CHECK_CLOSE(layer.forward(x.slice(0, t, t + 1).contiguous(), nullptr, nullptr, training).y, ref, 1e-6f,
                    1e-5f);
      }
      // reversed batch: rows reversed
      std::vector<int32_t> rev((size_t)T);
      for (int64_t t = 0; t < T; ++t) rev[t] = (int32_t)(T - 1 - t);
      std::vector<float> yr =
          layer.forward(index_select(x, 0, Tensor::from_vector(rev, {T})), nullptr, nullptr, training)
              .y.to_f32_vector();
      std::vector<float> ref((size_t)(T * C));
      for (int64_t t = 0; t < T; ++t) std::copy(yb.begin() + (T - 1 - t) * C, yb.begin() + (T - t) * C, ref.begin() + t * C);
      CHECK(first_mismatch(yr, ref, 1e-6f, 1e-5f) < 0);
    }
  }

  TEST_CASE("GELU experts: d -> d_ff -> d with gelu") {
    CoEConfig c = small_moe(5, 7, {3}, {1});
    c.expert = ExpertKind::GELU;
    c.bias = true;
    Generator gen(61);
    MoELayer layer(c, 0, true, gen);
    for (ExpertFFN& e : layer.experts) {
      CHECK_FALSE(e.w3.w.defined());
      e.w1.b.copy_(uniform({7}, 62));
      e.w2.b.copy_(uniform({5}, 63));
    }
    Tensor x = uniform({4, 5}, 64);
    MoELayer::Output o = layer.forward(x, nullptr, nullptr, false);
    std::vector<float> xv = x.to_f32_vector(), ref;
    for (int64_t t = 0; t < 4; ++t) {
      const ExpertFFN& e = layer.experts[o.expert[t]];
      std::vector<float> w1 = e.w1.w.to_f32_vector(), b1 = e.w1.b.to_f32_vector();
      std::vector<float> w2 = e.w2.w.to_f32_vector(), b2 = e.w2.b.to_f32_vector();
      std::vector<double> hdn(7);
      for (int64_t f = 0; f < 7; ++f) {
        double a = b1[f];
        for (int64_t q = 0; q < 5; ++q) a += (double)w1[f * 5 + q] * xv[t * 5 + q];
        hdn[f] = gelu_ref(a);
      }
      for (int64_t q = 0; q < 5; ++q) {
        double y = b2[q];
        for (int64_t f = 0; f < 7; ++f) y += (double)w2[q * 7 + f] * hdn[f];
        ref.push_back((float)(y * o.gate[t]));
      }
    }
    CHECK_CLOSE(o.y, ref, 1e-5f, 1e-4f);
  }

  TEST_CASE("adaptive gate scales each token's MoE output by sigmoid(w . x + b)") {
    CoEConfig c = small_moe(6, 8, {2, 2}, {1, 2});
    c.use_adaptive_routing = true;
    Generator gen(65);
    MoELayer layer(c, 0, true, gen);
    REQUIRE(layer.gate.w.defined());
    layer.gate.w.copy_(uniform({1, 6}, 66));
    layer.gate.b.fill_(0.3f);
    Tensor x = uniform({5, 6}, 67);
    std::vector<float> y = layer.forward(x, nullptr, nullptr, false).y.to_f32_vector();
    Linear saved = layer.gate;
    layer.gate = Linear();
    std::vector<float> y0 = layer.forward(x, nullptr, nullptr, false).y.to_f32_vector();
    layer.gate = saved;
    std::vector<float> xv = x.to_f32_vector(), w = saved.w.to_f32_vector(), ref;
    for (int64_t t = 0; t < 5; ++t) {
      double z = 0.3;
      for (int64_t q = 0; q < 6; ++q) z += (double)w[q] * xv[t * 6 + q];
      for (int64_t q = 0; q < 6; ++q) ref.push_back((float)(y0[t * 6 + q] / (1.0 + std::exp(-z))));
    }
    CHECK(first_mismatch(y, ref, 1e-6f, 1e-5f) < 0);
    NamedParams names;
    layer.collect("moe", names);
    CHECK(std::any_of(names.begin(), names.end(), [](const auto& p) { return p.first == "moe.gate.weight"; }));
  }

  TEST_CASE("gradcheck of the adaptive gate: its weight and bias, the input through both paths, the experts") {
    // Every expert selected (top_k = branching): no selection can flip under the check's perturbation.
    CoEConfig c = small_moe(4, 5, {3}, {3});
    c.use_adaptive_routing = true;
    c.init_std = 0.8f;
    Generator gen(69);
    MoELayer layer(c, 0, true, gen);
    layer.gate.w.copy_(uniform({1, 4}, 70));
    layer.gate.b.fill_(0.3f);
    Tensor x = uniform({5, 4}, 71);
    x.requires_grad_(true);
    std::vector<Tensor> inputs = {x, layer.gate.w, layer.gate.b, layer.router.weights[0]};
    for (const ExpertFFN& e : layer.experts)
      for (const Tensor& t : e.tensors()) inputs.push_back(t);
    auto fn = [&](const std::vector<Tensor>& in) { return layer.forward(in[0], nullptr, nullptr, false).y; };
    CHECK_GRAD(fn, inputs);
    // The gate's gradient is not negligible (an error in it would show).
    double gw = 0.0;
    for (float v : layer.gate.w.grad().to_f32_vector()) gw = std::max(gw, (double)std::fabs(v));
    CHECK(gw > 0.05);
    CHECK(std::fabs(layer.gate.b.grad().item()) > 0.05);
  }
}
