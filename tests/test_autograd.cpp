// Autograd machinery: recording, fan-out accumulation, long chains, NoGrad, zero_grad, detach, freeing the graph.
// The ops used here are views (they belong to the core) plus the arithmetic ops of ops.h.
#include "helpers.h"

using namespace cm;
using cm::test::param;
using cm::test::uniform;

TEST_SUITE("autograd") {

TEST_CASE("gradients flow back through views") {
  Tensor x = param({2, 3, 4}, 1);
  // out = some rearrangement; the gradient of sum(out * w) w.r.t. x is w put back where each element came from
  auto fn = [](const std::vector<Tensor>& in) {
    return in[0].transpose(0, 2).slice(1, 1, 3).reshape({4, 4}).unsqueeze(0).squeeze(0).select(0, 2);
  };
  CHECK_GRAD(fn, {x});
  CHECK_GRAD([](const std::vector<Tensor>& in) { return in[0].permute({2, 0, 1}).contiguous().slice(0, 0, 4, 3); },
             {x});
}

TEST_CASE("many windows of one tensor: each view's gradient lands in its window, overlaps add") {
  // Window nodes (slice, split pieces) add into a gradient allocated once; checked against a dense reference: for
  // out = sum_v sum(view_v * w_v), d out / dx[i] = sum of w_v at every place x[i] appears in view_v.
  for (bool leaf : {true, false}) {
    CAPTURE(leaf);
    Tensor x = param({6, 5}, 3);
    Tensor base = leaf ? x : mul(x, 1.f);  // a non-leaf input: its gradient is pending in the sweep
    std::vector<Tensor> views = {base.slice(0, 0, 2), base.slice(0, 2, 6), base.slice(0, 1, 4),  // overlapping
                                 base.slice(1, 1, 5, 2), base.select(0, 5), base.transpose(0, 1).slice(0, 4, 5)};
    std::vector<Tensor> pieces = split(base, {1, 0, 3, 2}, 0);  // an empty piece too
    views.insert(views.end(), pieces.begin(), pieces.end());
    pieces = split(base, {2, 3}, 1);  // windows of whole columns: rows of a stride past their width
    views.insert(views.end(), pieces.begin(), pieces.end());
    std::vector<float> ref(30, 0.f);
    Tensor out;
    for (size_t v = 0; v < views.size(); ++v) {
      Tensor w = uniform(views[v].shape(), 100 + v);
      Tensor term = sum(mul(views[v], w));
      out = out.defined() ? add(out, term) : term;
      // The reference: backward of the same view from a fresh, detached copy of x.
      Tensor probe = x.detach().clone();
      probe.requires_grad_(true);
      std::vector<Tensor> again = {probe.slice(0, 0, 2), probe.slice(0, 2, 6), probe.slice(0, 1, 4),
                                   probe.slice(1, 1, 5, 2), probe.select(0, 5), probe.transpose(0, 1).slice(0, 4, 5)};
      std::vector<Tensor> again_pieces = split(probe, {1, 0, 3, 2}, 0);
      again.insert(again.end(), again_pieces.begin(), again_pieces.end());
      again_pieces = split(probe, {2, 3}, 1);
      again.insert(again.end(), again_pieces.begin(), again_pieces.end());
      if (again[v].numel() == 0) continue;
      sum(mul(again[v], w)).backward();
      std::vector<float> g = probe.grad().to_f32_vector();
      for (int i = 0; i < 30; ++i) ref[i] += g[i];
    }
    out.backward();
    CHECK_CLOSE(x.grad(), ref, 1e-6f, 1e-6f);
  }
  // Attention's split of one [rows, 3C] product into q, k and v, at a size the threads share: each piece's
  // gradient lands in its columns, exactly (added once into zeros).
  Tensor qkv = param({256, 3 * 256}, 5);
  std::vector<Tensor> qkv_pieces = split(qkv, {256, 256, 256}, 1), ws;
  Tensor total;
  for (int p = 0; p < 3; ++p) {
    ws.push_back(uniform({256, 256}, 120 + p));
    Tensor term = sum(mul(qkv_pieces[(size_t)p], ws.back()));
    total = total.defined() ? add(total, term) : term;
  }
  total.backward();
  CHECK(qkv.grad().to_f32_vector() == concat(ws, 1).to_f32_vector());
  // And through gradcheck, with a window of a non-contiguous view.
  Tensor y = param({4, 6}, 4);
  CHECK_GRAD([](const std::vector<Tensor>& in) {
    Tensor t = in[0].transpose(0, 1);  // [6, 4], not contiguous
    return concat({t.slice(0, 0, 3).flatten(), t.slice(0, 2, 6, 2).flatten(), t.slice(1, 1, 3).slice(0, 1, 3).flatten()},
                  0);
  }, {y});
}

TEST_CASE("fan-out accumulates") {
  Tensor x = param({3}, 2);
  Tensor y = x + x * x;  // dy/dx = 1 + 2x
  sum(y).backward();
  std::vector<float> xv = x.to_f32_vector(), g = x.grad().to_f32_vector();
  for (int i = 0; i < 3; ++i) CHECK(g[i] == doctest::Approx(1 + 2 * xv[i]));
  // a second backward accumulates into the leaf
  Tensor y2 = mul(x, 3.f);
  sum(y2).backward();
  g = x.grad().to_f32_vector();
  for (int i = 0; i < 3; ++i) CHECK(g[i] == doctest::Approx(4 + 2 * xv[i]));
}

TEST_CASE("a chain of 10,000 ops runs backward without recursion and frees the graph") {
  Tensor x = param({4}, 3, 0.5f, 1.5f);
  Tensor y = x;
  for (int i = 0; i < 10000; ++i) y = (i % 2) ? mul(y, 1.0001f) : add(y, 0.0001f);
  Tensor l = sum(y);
  l.backward();
  double expect = std::pow(1.0001, 5000);
  for (float g : x.grad().to_f32_vector()) CHECK(g == doctest::Approx(expect).epsilon(1e-4));
  // the graph is freed: a second backward through it is an error, not a crash
  CHECK_THROWS_AS(l.backward(), Error);
}

TEST_CASE("an unconsumed long chain is destroyed without deep recursion") {
  Tensor x = param({1}, 4);
  {
    Tensor y = x;
    for (int i = 0; i < 200000; ++i) y = y.reshape({1});
  }
  CHECK(x.requires_grad());
}

TEST_CASE("NoGrad records nothing; detach cuts history") {
  Tensor x = param({3}, 5);
  {
    NoGrad ng;
    Tensor y = x * 2.f;
    CHECK(!y.requires_grad());
    CHECK(y.is_leaf());
  }
  CHECK(grad_mode_enabled());
  Tensor d = (x * 2.f).detach();
  CHECK(!d.requires_grad());
  Tensor z = x * d;  // d is a constant: dz/dx = d
  sum(z).backward();
  CHECK(x.grad().to_f32_vector() == d.to_f32_vector());
}

TEST_CASE("a leaf's first gradient: taken when nothing else holds it, a private copy when something does") {
  // A rule's fresh result becomes the leaf's gradient as it is (no copy: with zero_grad every step, a copy was a pass
  // over every parameter's gradient). One that anything else still holds (the rule's own state, another input's
  // gradient, the caller's seed) is copied, so adding later gradients into it changes nothing else.
  Tensor x = param({4}, 9);
  const float* made = nullptr;
  Tensor kept;
  auto probe = [&](bool keep) {
    made = nullptr;
    kept = Tensor();
    Tensor y = record("probe", mul(x.detach(), 2.f), {x}, [&made, &kept, keep](const Tensor& gy) {
      Tensor g = mul(gy, 2.f);
      made = g.f32();
      if (keep) kept = g;
      return grads{g};
    });
    x.zero_grad();
    sum(y).backward();
    REQUIRE(made != nullptr);
  };
  probe(false);
  CHECK(x.grad().f32() == made);  // taken
  probe(true);
  CHECK(x.grad().f32() != made);  // held by the rule: copied
  CHECK(x.grad().to_f32_vector() == kept.to_f32_vector());
  sum(mul(x, 3.f)).backward();  // accumulates into the leaf's copy only
  CHECK(kept.to_f32_vector() == std::vector<float>(4, 2.f));
  CHECK(x.grad().to_f32_vector() == std::vector<float>(4, 5.f));

  // add passes its gradient through to both inputs, and the seed is the caller's: three tensors, no sharing.
  Tensor a = param({3}, 10), b = param({3}, 11), seed = uniform({3}, 12);
  const std::vector<float> s0 = seed.to_f32_vector();
  add(a, b).backward(seed);
  sum(mul(a, 4.f)).backward();
  std::vector<float> ga = a.grad().to_f32_vector(), gb = b.grad().to_f32_vector();
  for (int i = 0; i < 3; ++i) {
    CHECK(ga[i] == s0[i] + 4.f);
    CHECK(gb[i] == s0[i]);
  }
  CHECK(seed.to_f32_vector() == s0);
}

TEST_CASE("zero_grad clears; backward on a non-grad tensor is an error") {
  Tensor x = param({2}, 6);
  sum(x * 3.f).backward();
  CHECK(x.grad().defined());
  x.zero_grad();
  CHECK(!x.grad().defined());
  sum(x * 3.f).backward();
  CHECK(x.grad().to_f32_vector() == std::vector<float>{3.f, 3.f});
  CHECK_THROWS_AS(Tensor::ones({2}).backward(), Error);
  CHECK_THROWS_AS((x * 2.f).backward(), Error);  // not a scalar and no gradient given
}

TEST_CASE("inputs that do not require grad get none") {
  Tensor x = param({3}, 7);
  Tensor c = uniform({3}, 8);
  sum(x * c).backward();
  CHECK(!c.grad().defined());
  CHECK(x.grad().to_f32_vector() == c.to_f32_vector());
}

TEST_CASE("gradcheck catches a wrong gradient") {
  // A deliberately wrong op: forward x^2, backward claims x (a factor of 2 off).
  auto wrong = [](const std::vector<Tensor>& in) {
    Tensor x = in[0];
    Tensor y = Tensor::empty(x.shape());
    for (int64_t i = 0; i < x.numel(); ++i) y.f32()[i] = x.f32()[i] * x.f32()[i];
    return record("wrong_square", y, {x}, [xd = x.detach()](const Tensor& g) { return grads{g * xd}; });
  };
  Tensor x = param({5}, 9);
  GradcheckResult r = gradcheck(wrong, {x});
  CHECK(!r.ok);
  CHECK(r.message.find("mismatch") != std::string::npos);
  // And a transposed index: forward x^T, backward returns g unchanged reshaped (wrong element order).
  auto wrong_t = [](const std::vector<Tensor>& in) {
    Tensor y = in[0].transpose(0, 1).contiguous().detach();
    return record("wrong_t", y, {in[0]}, [](const Tensor& g) { return grads{g.contiguous().reshape({3, 2})}; });
  };
  Tensor m = param({3, 2}, 10);
  CHECK(!gradcheck(wrong_t, {m}).ok);
}

}  // TEST_SUITE
