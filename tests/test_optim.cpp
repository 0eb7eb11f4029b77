// AdamW against a double-precision reference, no-decay groups, state for checkpoints, clipping, LR schedule.
#include <cmath>

#include "engine/host_sync.h"
#include "model/optim.h"
#include "tests/helpers.h"

using namespace cm;
using cm::test::uniform;

namespace {
// Reference AdamW (PyTorch's formula) in double, one element at a time.
struct RefAdam {
  std::vector<double> p, m, v;
  void step(const std::vector<float>& g, double lr, double b1, double b2, double eps, double wd, int64_t t) {
    for (size_t i = 0; i < p.size(); ++i) {
      p[i] -= lr * wd * p[i];
      m[i] = b1 * m[i] + (1 - b1) * g[i];
      v[i] = b2 * v[i] + (1 - b2) * (double)g[i] * g[i];
      double mh = m[i] / (1 - std::pow(b1, (double)t)), vh = v[i] / (1 - std::pow(b2, (double)t));
      p[i] -= lr * mh / (std::sqrt(vh) + eps);
    }
  }
};
std::vector<float> to_f(const std::vector<double>& d) { return std::vector<float>(d.begin(), d.end()); }
}  // namespace

TEST_SUITE("optim") {
  TEST_CASE("AdamW matches the reference update over several steps, decay and no-decay groups") {
    Tensor w = uniform({5, 7}, 1);  // decays
    Tensor b = uniform({7}, 2);     // 1-D: no decay
    Tensor emb = uniform({3, 4}, 3);
    w.requires_grad_(true);
    b.requires_grad_(true);
    emb.requires_grad_(true);
    NamedTensors params = {{"blocks.0.w", w}, {"blocks.0.b", b}, {"tok_emb.weight", emb}};
    AdamWOptions opt;
    opt.beta1 = 0.8f;
    opt.beta2 = 0.9f;
    opt.eps = 1e-6f;
    opt.weight_decay = 0.3f;
    AdamW adam(params, opt);
    CHECK(adam.decays(0));
    CHECK_FALSE(adam.decays(1));
    CHECK_FALSE(adam.decays(2));
    std::vector<RefAdam> ref(3);
    for (int i = 0; i < 3; ++i) {
      auto v = params[i].second.to_f32_vector();
      ref[i].p.assign(v.begin(), v.end());
      ref[i].m.assign(v.size(), 0.0);
      ref[i].v.assign(v.size(), 0.0);
    }
    for (int64_t t = 1; t <= 4; ++t) {
      for (int i = 0; i < 3; ++i) {
        Tensor g = uniform(params[i].second.shape(), 100 + t * 10 + i);
        params[i].second.set_grad(g);
        ref[i].step(g.to_f32_vector(), 0.01 * t, 0.8, 0.9, 1e-6, i == 0 ? 0.3 : 0.0, t);
      }
      adam.step(0.01f * (float)t);
      CHECK(adam.step_count() == t);
    }
    for (int i = 0; i < 3; ++i) CHECK_CLOSE(params[i].second, to_f(ref[i].p), 1e-6f, 1e-5f);
  }

  TEST_CASE("parameters without a gradient are left alone; zero_grad drops gradients") {
    Tensor a = uniform({4}, 4), b = uniform({4}, 5);
    a.requires_grad_(true);
    b.requires_grad_(true);
    auto b0 = b.to_f32_vector();
    AdamW adam({{"a", a}, {"b", b}});
    a.set_grad(uniform({4}, 6));
    adam.step(0.1f);
    CHECK(b.to_f32_vector() == b0);
    CHECK(adam.state()[3].second.to_f32_vector() == std::vector<float>(4, 0.f));  // b's exp_avg_sq untouched
    adam.zero_grad();
    CHECK_FALSE(a.grad().defined());
  }

  TEST_CASE("state exposes the moment tensors by name for checkpoints") {
    Tensor a = uniform({2, 3}, 7);
    a.requires_grad_(true);
    AdamW adam({{"layer.w", a}});
    NamedTensors s = adam.state();
    REQUIRE(s.size() == 2);
    CHECK(s[0].first == "layer.w.exp_avg");
    CHECK(s[1].first == "layer.w.exp_avg_sq");
    CHECK(s[0].second.shape() == a.shape());
    a.set_grad(Tensor::full({2, 3}, 0.5f));
    adam.step(0.01f);
    CHECK(s[0].second.to_f32_vector()[0] == doctest::Approx(0.05f));  // (1 - 0.9) * 0.5: the same tensor
    s[1].second.fill_(0.f);  // a loader writes into them
    adam.set_step_count(10);
    CHECK(adam.step_count() == 10);
  }

  TEST_CASE("bad options are rejected") {
    Tensor a = uniform({2}, 8);
    AdamWOptions o;
    o.beta1 = 1.f;
    CHECK_THROWS_AS(AdamW({{"a", a}}, o), Error);
    o = AdamWOptions();
    o.eps = 0.f;
    CHECK_THROWS_AS(AdamW({{"a", a}}, o), Error);
  }

  TEST_CASE("clip_grad_norm returns the global norm and scales only above max_norm") {
    Tensor a = uniform({3, 4}, 9), b = uniform({5}, 10), c = uniform({2}, 11);
    for (Tensor* t : {&a, &b, &c}) t->requires_grad_(true);
    Tensor ga = uniform({3, 4}, 12, -2.f, 2.f), gb = uniform({5}, 13, -2.f, 2.f);
    a.set_grad(ga.clone());
    b.set_grad(gb.clone());  // c has no gradient: skipped
    double ss = 0.0;
    for (float v : ga.to_f32_vector()) ss += (double)v * v;
    for (float v : gb.to_f32_vector()) ss += (double)v * v;
    const float norm = (float)std::sqrt(ss);
    NamedTensors ps = {{"a", a}, {"b", b}, {"c", c}};
    CHECK(clip_grad_norm(ps, 1000.f) == doctest::Approx(norm).epsilon(1e-6));
    CHECK(a.grad().to_f32_vector() == ga.to_f32_vector());  // below the max: untouched
    CHECK(clip_grad_norm(ps, 1.0f) == doctest::Approx(norm).epsilon(1e-6));
    CHECK(clip_grad_norm(ps, 0.f) == doctest::Approx(1.0f).epsilon(1e-5));  // now norm 1; 0 only measures
    std::vector<float> sa = ga.to_f32_vector();
    for (float& v : sa) v /= norm;
    CHECK_CLOSE(a.grad(), sa, 1e-6f, 1e-5f);
    b.grad().f32()[0] = NAN;
    std::vector<float> before = a.grad().to_f32_vector();
    CHECK_FALSE(std::isfinite(clip_grad_norm(ps, 0.5f)));
    CHECK(a.grad().to_f32_vector() == before);  // non-finite norm: nothing scaled
  }

  TEST_CASE("clip_grad_norm_tensor: the same bits as clip_grad_norm, no read-out; AdamW skips on a non-finite flag") {
    Tensor a = uniform({3, 4}, 21), b = uniform({5}, 22);
    Tensor a2 = a.clone().detach(), b2 = b.clone().detach();
    for (Tensor* t : {&a, &b, &a2, &b2}) t->requires_grad_(true);
    Tensor ga = uniform({3, 4}, 23, -2.f, 2.f), gb = uniform({5}, 24, -2.f, 2.f);
    a.set_grad(ga.clone());
    b.set_grad(gb.clone());
    a2.set_grad(ga.clone());
    b2.set_grad(gb.clone());
    NamedTensors ps = {{"a", a}, {"b", b}}, ps2 = {{"a", a2}, {"b", b2}};
    const float host_norm = clip_grad_norm(ps2, 0.7f);
    reset_host_sync_stats();
    Tensor norm = clip_grad_norm_tensor(ps, 0.7f);
    CHECK(host_sync_stats().stream_syncs == 0);  // the norm and the scaling stay where the gradients are
    REQUIRE(norm.numel() == 1);
    CHECK(norm.f32()[0] == host_norm);
    CHECK(a.grad().to_f32_vector() == a2.grad().to_f32_vector());  // scaled alike, bit for bit
    CHECK(b.grad().to_f32_vector() == b2.grad().to_f32_vector());

    // The skip flag: finite, the update is step(lr)'s; non-finite, nothing moves (moments neither).
    AdamW o1(ps), o2(ps2);
    o1.step(1e-2f, norm);
    o2.step(1e-2f);
    CHECK(a.to_f32_vector() == a2.to_f32_vector());
    const std::vector<float> before = a.to_f32_vector();
    const std::vector<float> m_before = o1.state()[0].second.to_f32_vector();
    Tensor bad = Tensor::from_vector(std::vector<float>{NAN}, {1});
    o1.step(1e-2f, bad);
    CHECK(a.to_f32_vector() == before);
    CHECK(o1.state()[0].second.to_f32_vector() == m_before);
    bad.f32()[0] = INFINITY;
    o1.step(1e-2f, bad);
    CHECK(a.to_f32_vector() == before);
    CHECK_THROWS_AS(o1.step(1e-2f, Tensor::zeros({2})), Error);  // one value
  }

  TEST_CASE("LR schedule: linear warmup, cosine to min_lr, then flat") {
    LRSchedule s;
    s.max_lr = 1.0f;
    s.min_lr = 0.1f;
    s.warmup_steps = 10;
    s.total_steps = 110;
    CHECK(lr_at(0, s) == doctest::Approx(0.1f));
    CHECK(lr_at(4, s) == doctest::Approx(0.5f));
    CHECK(lr_at(9, s) == doctest::Approx(1.0f));
    CHECK(lr_at(10, s) == doctest::Approx(1.0f));
    CHECK(lr_at(60, s) == doctest::Approx(0.55f));  // half way: (max + min) / 2
    CHECK(lr_at(110, s) == doctest::Approx(0.1f));
    CHECK(lr_at(500, s) == doctest::Approx(0.1f));
    for (int64_t t = 10; t < 110; ++t) CHECK(lr_at(t + 1, s) <= lr_at(t, s));
    s.warmup_steps = 0;
    CHECK(lr_at(0, s) == doctest::Approx(1.0f));
  }

  TEST_CASE("AdamW minimises a quadratic") {
    Tensor x = uniform({6}, 14, 2.f, 3.f);
    x.requires_grad_(true);
    AdamWOptions o;
    o.weight_decay = 0.f;
    AdamW adam({{"x", x}}, o);
    for (int i = 0; i < 300; ++i) {
      Tensor loss = sum(square(x));
      loss.backward();
      adam.step(0.05f);
      adam.zero_grad();
    }
    for (float v : x.to_f32_vector()) CHECK(std::fabs(v) < 0.05f);
  }
}
