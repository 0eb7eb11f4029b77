// AdamW against a double-precision reference, no-decay groups, state for checkpoints, clipping, LR schedule.
#include <cmath>
#include <cstring>
#include <limits>

#include "engine/host_sync.h"
#include "kernels/adamw.h"
#include "kernels/reduce.h"
#include "model/coe.h"
#include "model/optim.h"
#include "tests/helpers.h"

using namespace cm;
using cm::test::ThreadCount;
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

CoEConfig tiny_moe() {
  CoEConfig c;
  c.d_model = 16;
  c.n_layers = 2;
  c.n_heads = 2;
  c.d_ff = 24;
  c.vocab_size = 13;
  c.seq_len = 8;
  c.num_clusters = 2;
  c.experts_per_cluster = 2;
  c.top_k_clusters = 1;
  c.top_k_experts = 2;
  c.validate();
  return c;
}

bool same_bits(const Tensor& a, const Tensor& b) {
  if (a.numel() != b.numel()) return false;
  return a.numel() == 0 || std::memcmp(a.f32(), b.f32(), sizeof(float) * (size_t)a.numel()) == 0;  // no null to memcmp
}
bool same_bits(double a, double b) { return std::memcmp(&a, &b, sizeof a) == 0; }

// Sizes around the sum blocks (kSumBlock = 8192) and the fused step's runs of 4 blocks, and an empty tensor.
const std::vector<int64_t> kSliceSizes = {0, 1, 7, 8191, 8192, 8193, 32768, 32769, 40000, 100003};

// One set of tensors for the fused step: param, m, v, grad per slice (m and v from earlier steps: v >= 0).
struct Slices {
  std::vector<Tensor> p, m, v, g;
  explicit Slices(uint64_t seed) {
    for (size_t i = 0; i < kSliceSizes.size(); ++i) {
      const Shape s = {kSliceSizes[i]};
      p.push_back(uniform(s, seed + 10 * i));
      m.push_back(uniform(s, seed + 10 * i + 1, -0.1f, 0.1f));
      v.push_back(uniform(s, seed + 10 * i + 2, 0.f, 0.01f));
      g.push_back(uniform(s, seed + 10 * i + 3));
    }
  }
  Slices copy() const {
    Slices c = *this;
    for (auto* ts : {&c.p, &c.m, &c.v, &c.g})
      for (Tensor& t : *ts) t = t.clone();
    return c;
  }
  std::vector<AdamWSlice> slices() const {
    std::vector<AdamWSlice> out;
    for (size_t i = 0; i < p.size(); ++i)
      out.push_back({p[i].f32(), m[i].f32(), v[i].f32(), g[i].f32(), p[i].numel(), i % 3 ? 0.1f : 0.f});
    return out;
  }
};
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

  TEST_CASE("fused CPU AdamW: every tensor gets adamw_step's bits; its sums of squares are sum_squares's") {
    for (int threads : {1, 2}) {
      CAPTURE(threads);
      ThreadCount tc(threads);
      const Slices base(7);
      Slices one = base.copy(), fused = base.copy();
      for (size_t i = 0; i < kSliceSizes.size(); ++i) {
        const AdamWSlice s = one.slices()[i];
        cpu::adamw_step(s.param, s.m, s.v, s.grad, s.n, 3e-3f, 0.9f, 0.95f, 1e-8f, s.weight_decay, 3);
      }
      const std::vector<AdamWSlice> sl = fused.slices();
      std::vector<double> sp(sl.size(), -1.0), sg(sl.size(), -1.0);
      cpu::adamw_step_multi(sl.data(), (int64_t)sl.size(), 3e-3f, 0.9f, 0.95f, 1e-8f, 3, nullptr, sp.data(), sg.data());
      for (size_t i = 0; i < kSliceSizes.size(); ++i) {
        CAPTURE(kSliceSizes[i]);
        CHECK(same_bits(fused.p[i], one.p[i]));
        CHECK(same_bits(fused.m[i], one.m[i]));
        CHECK(same_bits(fused.v[i], one.v[i]));
        CHECK(same_bits(sp[i], cpu::sum_squares(one.p[i].f32(), kSliceSizes[i])));
        CHECK(same_bits(sg[i], cpu::sum_squares(base.g[i].f32(), kSliceSizes[i])));
      }
      CHECK(!same_bits(fused.p[8], base.p[8]));  // it did update
      // A non-finite skip flag: nothing moves, and the sums are still given (of the parameters as they are).
      Slices skipped = base.copy();
      const float nan = std::numeric_limits<float>::quiet_NaN();
      const std::vector<AdamWSlice> sk = skipped.slices();
      cpu::adamw_step_multi(sk.data(), (int64_t)sk.size(), 3e-3f, 0.9f, 0.95f, 1e-8f, 3, &nan, sp.data(), sg.data());
      for (size_t i = 0; i < kSliceSizes.size(); ++i) {
        CHECK(same_bits(skipped.p[i], base.p[i]));
        CHECK(same_bits(skipped.m[i], base.m[i]));
        CHECK(same_bits(sp[i], cpu::sum_squares(base.p[i].f32(), kSliceSizes[i])));
      }
    }
  }

  TEST_CASE("sum_squares_blocks: its block sums, added in order, are sum_squares; a NaN shows") {
    Tensor a = uniform({6 * 8192 + 13}, 31, -3.f, 3.f);
    for (int64_t i = 0; i < a.numel(); ++i) a.f32()[i] *= std::pow(10.f, (float)(i % 7) - 3.f);  // rounding shows
    for (int64_t n : {1, 9, 8192, 8200, 4 * 8192, 4 * 8192 + 1, 5 * 8192, 6 * 8192 + 13}) {
      CAPTURE(n);
      std::vector<double> out((size_t)((n + cpu::kSumBlock - 1) / cpu::kSumBlock), -1.0);
      cpu::sum_squares_blocks(out.data(), a.f32(), n);
      double s = 0.0;
      for (double b : out) s += b;
      CHECK(same_bits(s, cpu::sum_squares(a.f32(), n)));
    }
    a.f32()[2 * 8192 + 5] = std::numeric_limits<float>::quiet_NaN();
    std::vector<double> out(7);
    cpu::sum_squares_blocks(out.data(), a.f32(), a.numel());
    CHECK(std::isnan(out[2]));
    CHECK(std::isfinite(out[1]));
    CHECK(std::isfinite(out[3]));
  }

  TEST_CASE("AdamW step_sums: the same update; inside FreshSums, sums_of_squares answers from the step") {
    auto make = [](uint64_t seed) {
      NamedTensors ps;
      for (size_t i = 0; i < 4; ++i) {
        Tensor t = uniform({(int64_t)(i + 1) * 5000, 2}, seed + i);
        t.requires_grad_(true);
        ps.emplace_back("p" + std::to_string(i), t);
      }
      return ps;
    };
    NamedTensors a = make(50), b = make(50);
    AdamWOptions plain, sums;
    sums.step_sums = true;
    AdamW oa(a, plain), ob(b, sums);
    for (int64_t t = 1; t <= 2; ++t) {
      for (size_t i = 0; i < a.size(); ++i) {
        Tensor g = uniform(a[i].second.shape(), 200 + 10 * t + i);
        a[i].second.set_grad(g);
        b[i].second.set_grad(g.clone());
      }
      oa.step(1e-2f);
      ob.step(1e-2f);
    }
    std::vector<Tensor> ts;  // b's parameters and gradients, and one tensor the step did not touch
    for (auto& kv : b) ts.push_back(kv.second);
    for (auto& kv : b) ts.push_back(kv.second.grad());
    ts.push_back(uniform({300}, 77));
    for (size_t i = 0; i < a.size(); ++i) CHECK(same_bits(a[i].second, b[i].second));
    const std::vector<double> read = sums_of_squares(ts);
    // The scope answers from the step: shown by changing a parameter inside it (what its contract forbids).
    // The other tensors' sums are the same bits as reading them; the untouched tensor is read.
    const float kept = b[1].second.f32()[3];
    {
      FreshSums fresh(ob);
      b[1].second.f32()[3] = 1000.f;
      const std::vector<double> got = sums_of_squares(ts);
      for (size_t i = 0; i < ts.size(); ++i) {
        CAPTURE(i);
        CHECK(same_bits(got[i], read[i]));
      }
      ts.back().f32()[0] = 1000.f;  // not from the step: read again
      CHECK(sums_of_squares({ts.back()})[0] > read.back() + 1e5);
      CHECK(sums_of_squares_tensor({ts[1]}).f32()[0] == (float)read[1]);
    }
    // Outside the scope, and in a scope of an optimizer without step_sums, the tensor is read.
    CHECK(sums_of_squares({ts[1]})[0] > read[1] + 1e5);
    {
      FreshSums none(oa);
      CHECK(sums_of_squares({ts[1]})[0] > read[1] + 1e5);
    }
    b[1].second.f32()[3] = kept;
    // After zero_grad a gradient is offered while something still holds it (its values are the step's), and
    // a scope of the same step still answers for the parameters.
    ob.zero_grad();
    {
      FreshSums fresh(ob);
      double s = 0.0;
      CHECK(fresh.find(ts[4], s));
      CHECK(same_bits(s, read[4]));
      CHECK(fresh.find(ts[0], s));
      CHECK(same_bits(s, read[0]));
      CHECK_FALSE(fresh.find(ts[0].view({-1}).slice(0, 1, 3), s));  // a view of a parameter is another tensor
    }
  }

  TEST_CASE("a ClusterMoE trained with the step's sums (FreshSums) gives the same losses and health, a fault included") {
    const CoEConfig c = tiny_moe();
    std::vector<int32_t> xs, ys;
    for (int i = 0; i < 4 * 8; ++i) xs.push_back((i * 5) % 13), ys.push_back((i * 5 + 3) % 13);
    const Tensor X = Tensor::from_vector(xs, {4, 8}), Y = Tensor::from_vector(ys, {4, 8});
    auto train = [&](bool fresh_sums) {
      ClusterMoELM m(c);
      NamedTensors ps = m.named_parameters();
      AdamWOptions o;
      o.step_sums = fresh_sums;
      AdamW opt(ps, o);
      std::vector<float> losses;
      for (int s = 0; s < 6; ++s) {
        if (s == 3) {  // a fault: one expert's first weight x100 (its health check must see it either way)
          Tensor w = m.expert_parameters(0, 0)[0].second;
          for (int64_t i = 0; i < w.numel(); ++i) w.f32()[i] *= 100.f;
        }
        CoEOutput out = m.forward(X, Y);
        losses.push_back(out.loss.item());
        out.total_loss.backward();
        clip_grad_norm(ps, 1.0f);
        opt.step(1e-2f);
        if (fresh_sums) {
          FreshSums f(opt);
          m.after_step();
        } else {
          m.after_step();
        }
        opt.zero_grad();
      }
      NamedTensors state = m.named_buffers();
      for (auto& kv : ps) state.push_back(kv);
      return std::make_pair(losses, state);
    };
    const auto plain = train(false), fresh = train(true);
    REQUIRE(plain.first.size() == fresh.first.size());
    for (size_t s = 0; s < plain.first.size(); ++s) CHECK(plain.first[s] == fresh.first[s]);
    REQUIRE(plain.second.size() == fresh.second.size());
    bool health_moved = false;
    for (size_t i = 0; i < plain.second.size(); ++i) {
      CAPTURE(plain.second[i].first);
      const Tensor &p = plain.second[i].second, &f = fresh.second[i].second;
      if (p.dtype() == DType::F32) CHECK(same_bits(p, f));
      if (plain.second[i].first.find("reliability") != std::string::npos)
        for (float r : p.to_f32_vector()) health_moved |= r < 0.999f;
    }
    CHECK(health_moved);  // the fault lowered a reliability: the sums were used for something
  }

  TEST_CASE("MoELayer::after_step takes the experts' weight norms from the step inside FreshSums") {
    // Shown by a fault made inside the scope, after the step (what the scope's contract forbids): after_step then
    // judges the weights the step left, and the expert stays healthy; without the scope it sees the fault.
    std::vector<int32_t> xs;
    for (int i = 0; i < 4 * 8; ++i) xs.push_back((i * 7) % 13);
    const Tensor X = Tensor::from_vector(xs, {4, 8});
    auto reliability_after_fault = [&](bool scope) {
      ClusterMoELM m(tiny_moe());
      NamedTensors ps = m.named_parameters();
      AdamWOptions o;
      o.step_sums = true;
      AdamW opt(ps, o);
      for (int s = 0; s < 3; ++s) {
        m.forward(X, X).total_loss.backward();
        opt.step(1e-3f);
        auto fault = [&] {
          if (s < 2) return;
          for (auto& kv : m.expert_parameters(0, 0))
            for (int64_t i = 0; i < kv.second.numel(); ++i) kv.second.f32()[i] *= 100.f;
        };
        if (scope) {
          FreshSums f(opt);
          fault();
          m.after_step();
        } else {
          fault();
          m.after_step();
        }
        opt.zero_grad();
      }
      for (auto& kv : m.named_buffers())
        if (kv.first == "blocks.0.moe.reliability") return kv.second.to_f32_vector()[0];
      FAIL("no reliability buffer for layer 0");
      return 0.f;
    };
    const float with_scope = reliability_after_fault(true), without = reliability_after_fault(false);
    CHECK(with_scope > 0.999f);
    CHECK(without < 0.99f);
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
