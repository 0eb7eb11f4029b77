// Elementwise kernels (suite "kernels") and differentiable elementwise ops (suite "ops"): values against naive
// double-precision references on broadcast shapes of every pattern, gradients by finite differences, bad input.
#include <cmath>
#include <functional>
#include <numeric>
#include <string>
#include <vector>

#include "kernels/activation.h"
#include "kernels/elementwise.h"
#include "tests/helpers.h"

using namespace cm;

namespace {

std::vector<float> rand_vec(int64_t n, uint64_t seed, float lo = -1.f, float hi = 1.f) {
  std::vector<float> v((size_t)n);
  for (int64_t i = 0; i < n; ++i) v[(size_t)i] = lo + (hi - lo) * philox_uniform(seed, 0, (uint64_t)i);
  return v;
}

// Broadcast of two shapes the slow and obvious way: out shape, and each input's strides aligned to it with 0 on
// stretched (or missing) dims.
struct Bcast {
  Shape out, sa, sb;
};
Bcast bcast(const Shape& a, const Shape& b) {
  const size_t D = std::max(a.size(), b.size());
  Bcast r{Shape(D), Shape(D, 0), Shape(D, 0)};
  int64_t ma = 1, mb = 1;
  for (size_t k = 0; k < D; ++k) {  // k counts from the right
    const size_t d = D - 1 - k;
    const int64_t da = k < a.size() ? a[a.size() - 1 - k] : 1, db = k < b.size() ? b[b.size() - 1 - k] : 1;
    REQUIRE((da == db || da == 1 || db == 1));
    r.out[d] = da == 1 ? db : da;
    r.sa[d] = da == 1 ? 0 : ma;
    r.sb[d] = db == 1 ? 0 : mb;
    ma *= da;
    mb *= db;
  }
  return r;
}

// Element offset in an operand for flat output index i.
int64_t offset_of(int64_t i, const Shape& out, const Shape& st) {
  int64_t off = 0;
  for (int64_t d = (int64_t)out.size() - 1; d >= 0; --d) {
    off += (i % out[d]) * st[d];
    i /= out[d];
  }
  return off;
}

double ref_binary(cpu::Binary op, double x, double y) {
  switch (op) {
    case cpu::Binary::Add: return x + y;
    case cpu::Binary::Sub: return x - y;
    case cpu::Binary::Mul: return x * y;
    case cpu::Binary::Div: return x / y;
  }
  return 0;
}

const std::vector<std::pair<Shape, Shape>> kBroadcastCases = {{{3, 1, 5}, {4, 5}},
                                                              {{4, 5}, {3, 1, 5}},
                                                              {{2, 3, 4}, {4}},
                                                              {{4}, {2, 3, 4}},
                                                              {{2, 3, 4}, {2, 1, 4}},
                                                              {{2, 3, 4}, {2, 3, 1}},
                                                              {{5, 1}, {1, 7}},
                                                              {{}, {3, 4}},
                                                              {{3, 4}, {}},
                                                              {{}, {}},
                                                              {{1}, {1}},
                                                              {{0, 4}, {4}},
                                                              {{3, 0}, {3, 1}},
                                                              {{67, 129}, {129}},
                                                              {{67, 129}, {67, 1}},
                                                              {{33, 1, 17}, {1, 45, 1}},
                                                              {{2, 1, 3, 1}, {5, 1, 6}},
                                                              {{7, 9}, {7, 9}},
                                                              {{1, 1, 6}, {4, 1, 1}}};

}  // namespace

TEST_SUITE("kernels") {
  TEST_CASE("binary broadcast kernels match a double reference") {
    const cpu::Binary ops[] = {cpu::Binary::Add, cpu::Binary::Sub, cpu::Binary::Mul, cpu::Binary::Div};
    uint64_t seed = 1;
    for (const auto& [as, bs] : kBroadcastCases) {
      const Bcast bc = bcast(as, bs);
      const int64_t na = shape_numel(as), nb = shape_numel(bs), n = shape_numel(bc.out);
      std::vector<float> a = rand_vec(na, seed++), b = rand_vec(nb, seed++, 0.5f, 2.f);  // b away from 0 for div
      for (cpu::Binary op : ops) {
        CAPTURE(shape_str(as));
        CAPTURE(shape_str(bs));
        CAPTURE((int)op);
        std::vector<double> ref((size_t)n);
        for (int64_t i = 0; i < n; ++i)
          ref[(size_t)i] =
              ref_binary(op, a[(size_t)offset_of(i, bc.out, bc.sa)], b[(size_t)offset_of(i, bc.out, bc.sb)]);
        std::vector<float> out((size_t)n, -7.f);
        cpu::binary_strided(op, out.data(), a.data(), b.data(), (int64_t)bc.out.size(), bc.out.data(), bc.sa.data(),
                            bc.sb.data());
        for (int64_t i = 0; i < n; ++i)
          REQUIRE(std::fabs(out[(size_t)i] - ref[(size_t)i]) <= 1e-6 + 1e-6 * std::fabs(ref[(size_t)i]));
        // The fast paths where they apply.
        if (as == bs) {
          std::vector<float> o2((size_t)n);
          cpu::binary(op, o2.data(), a.data(), b.data(), n);
          CHECK(o2 == out);
        }
        if (bs.size() == 1 && !as.empty() && as.back() == bs[0]) {
          std::vector<float> o2((size_t)n);
          cpu::binary_rows(op, o2.data(), a.data(), b.data(), na / std::max<int64_t>(bs[0], 1), bs[0]);
          CHECK(o2 == out);
        }
      }
    }
  }

  TEST_CASE("binary kernels on i32 wrap instead of overflowing") {
    const std::vector<int32_t> a = {1, -5, 7, 2147483647, -2147483647 - 1, 12};
    const std::vector<int32_t> b = {3, 4, -2, 1, -1, 0};
    std::vector<int32_t> out(6);
    cpu::binary(cpu::Binary::Add, out.data(), a.data(), b.data(), 6);
    CHECK(out == std::vector<int32_t>{4, -1, 5, -2147483647 - 1, 2147483647, 12});
    cpu::binary(cpu::Binary::Sub, out.data(), a.data(), b.data(), 6);
    CHECK(out == std::vector<int32_t>{-2, -9, 9, 2147483646, -2147483647, 12});
    cpu::binary(cpu::Binary::Mul, out.data(), a.data(), b.data(), 6);
    CHECK(out == std::vector<int32_t>{3, -20, -14, 2147483647, -2147483647 - 1, 0});
    // Row broadcast and a column broadcast through the strided path.
    const std::vector<int32_t> m = {1, 2, 3, 4, 5, 6}, row = {10, 20, 30}, col = {100, 200};
    cpu::binary_rows(cpu::Binary::Add, out.data(), m.data(), row.data(), 2, 3);
    CHECK(out == std::vector<int32_t>{11, 22, 33, 14, 25, 36});
    const int64_t shape[] = {2, 3}, sm[] = {3, 1}, sc[] = {1, 0};
    cpu::binary_strided(cpu::Binary::Mul, out.data(), m.data(), col.data(), 2, shape, sm, sc);
    CHECK(out == std::vector<int32_t>{100, 200, 300, 800, 1000, 1200});
  }

  TEST_CASE("scalar, unary and pow_backward kernels match a double reference") {
    const int64_t n = 1037;
    std::vector<float> a = rand_vec(n, 11, 0.1f, 3.f), out((size_t)n), dy = rand_vec(n, 12);
    const float s = 1.7f;
    struct S {
      cpu::Scalar op;
      std::function<double(double)> f;
    };
    const std::vector<S> sc = {{cpu::Scalar::Add, [&](double x) { return x + s; }},
                               {cpu::Scalar::Mul, [&](double x) { return x * s; }},
                               {cpu::Scalar::RSub, [&](double x) { return s - x; }},
                               {cpu::Scalar::RDiv, [&](double x) { return s / x; }},
                               {cpu::Scalar::Pow, [&](double x) { return std::pow(x, (double)s); }}};
    for (const S& c : sc) {
      cpu::scalar(c.op, out.data(), a.data(), s, n);
      for (int64_t i = 0; i < n; ++i) {
        const double r = c.f(a[(size_t)i]);
        REQUIRE(std::fabs(out[(size_t)i] - r) <= 1e-6 + 2e-6 * std::fabs(r));
      }
    }
    cpu::scalar(cpu::Scalar::Pow, out.data(), a.data(), 2.f, n);
    for (int64_t i = 0; i < n; ++i) REQUIRE(out[(size_t)i] == a[(size_t)i] * a[(size_t)i]);
    struct U {
      cpu::Unary op;
      std::function<double(double)> f;
    };
    const std::vector<U> un = {{cpu::Unary::Neg, [](double x) { return -x; }},
                               {cpu::Unary::Log, [](double x) { return std::log(x); }},
                               {cpu::Unary::Sqrt, [](double x) { return std::sqrt(x); }},
                               {cpu::Unary::Square, [](double x) { return x * x; }}};
    for (const U& c : un) {
      cpu::unary(c.op, out.data(), a.data(), n);
      for (int64_t i = 0; i < n; ++i) {
        const double r = c.f(a[(size_t)i]);
        REQUIRE(std::fabs(out[(size_t)i] - r) <= 1e-6 + 2e-6 * std::fabs(r));
      }
    }
    for (float p : {0.f, 1.f, 2.f, -1.5f, 0.5f}) {
      CAPTURE(p);
      cpu::pow_backward(out.data(), dy.data(), a.data(), p, n);
      for (int64_t i = 0; i < n; ++i) {
        const double r = p == 0.f ? 0.0 : dy[(size_t)i] * p * std::pow((double)a[(size_t)i], p - 1.0);
        REQUIRE(std::fabs(out[(size_t)i] - r) <= 1e-6 + 2e-6 * std::fabs(r));
      }
    }
    // pow'(0) with p == 0 is 0, not 0 * inf.
    const float zero = 0.f, one = 1.f;
    float d = -1.f;
    cpu::pow_backward(&d, &one, &zero, 0.f, 1);
    CHECK(d == 0.f);
  }

  TEST_CASE("activation kernels: forward against double formulas, backward against double differences") {
    using Fwd = void (*)(float*, const float*, int64_t);
    using Bwd = void (*)(float*, const float*, const float*, int64_t);
    const double k = std::sqrt(2.0 / M_PI);
    struct A {
      const char* name;
      Fwd fwd;
      Bwd bwd;
      bool bwd_takes_output;
      std::function<double(double)> f;
    };
    const std::vector<A> acts = {
        {"exp", cpu::exp_forward, cpu::exp_backward, true, [](double x) { return std::exp(x); }},
        {"tanh", cpu::tanh_forward, cpu::tanh_backward, true, [](double x) { return std::tanh(x); }},
        {"sigmoid", cpu::sigmoid_forward, cpu::sigmoid_backward, true,
         [](double x) { return 1.0 / (1.0 + std::exp(-x)); }},
        {"relu", cpu::relu_forward, cpu::relu_backward, false, [](double x) { return x > 0 ? x : 0.0; }},
        {"gelu_tanh", cpu::gelu_tanh_forward, cpu::gelu_tanh_backward, false,
         [k](double x) { return 0.5 * x * (1 + std::tanh(k * (x + 0.044715 * x * x * x))); }},
        {"gelu_exact", cpu::gelu_exact_forward, cpu::gelu_exact_backward, false,
         [](double x) { return 0.5 * x * (1 + std::erf(x / std::sqrt(2.0))); }},
        {"silu", cpu::silu_forward, cpu::silu_backward, false, [](double x) { return x / (1.0 + std::exp(-x)); }},
    };
    const int64_t n = 40001;  // above the threading threshold, not a multiple of any vector width
    std::vector<float> x = rand_vec(n, 21, -6.f, 6.f), dy = rand_vec(n, 22), y((size_t)n), dx((size_t)n);
    for (float& v : x)
      if (std::fabs(v) < 1e-3f) v = 0.5f;  // relu: stay away from the kink
    for (const A& a : acts) {
      CAPTURE(a.name);
      a.fwd(y.data(), x.data(), n);
      a.bwd(dx.data(), dy.data(), a.bwd_takes_output ? y.data() : x.data(), n);
      for (int64_t i = 0; i < n; ++i) {
        const double xi = x[(size_t)i], r = a.f(xi), h = 1e-5;
        const double g = dy[(size_t)i] * (a.f(xi + h) - a.f(xi - h)) / (2 * h);
        CAPTURE(xi);
        REQUIRE(std::fabs(y[(size_t)i] - r) <= 2e-6 + 2e-6 * std::fabs(r));
        REQUIRE(std::fabs(dx[(size_t)i] - g) <= 2e-6 + 1e-5 * std::fabs(g));
      }
    }
  }

  TEST_CASE("vectorised exp, tanh, sigmoid: a few ulp over the whole float range") {
    std::vector<float> x;
    for (float v = -110.f; v <= 95.f; v += 0.0173f) x.push_back(v);
    for (float v = -1.f; v <= 1.f; v += 0.000731f) x.push_back(v);  // tanh's polynomial / exp switch at 0.625
    for (float v : {0.f, -0.f, 1e-30f, -1e-30f, 88.7f, 88.73f, -87.3f, -103.f, -104.5f, 0.625f, -0.625f})
      x.push_back(v);
    const int64_t n = (int64_t)x.size();
    std::vector<float> e((size_t)n), t((size_t)n), s((size_t)n);
    cpu::exp_forward(e.data(), x.data(), n);
    cpu::tanh_forward(t.data(), x.data(), n);
    cpu::sigmoid_forward(s.data(), x.data(), n);
    auto ulps = [](float got, double ref) {  // error in units of the float spacing at ref (denormal spacing floor)
      const double spacing =
          std::max(std::ldexp(1.0, std::ilogb(std::max(std::fabs(ref), 1e-300)) - 23), std::ldexp(1.0, -149));
      return std::fabs((double)got - ref) / spacing;
    };
    for (int64_t i = 0; i < n; ++i) {
      const double xi = x[(size_t)i], re = std::exp(xi), rs = 1.0 / (1.0 + std::exp(-xi));
      CAPTURE(xi);
      if (re > 3.4028234663852886e38)
        REQUIRE(std::isinf(e[(size_t)i]));
      else
        REQUIRE(ulps(e[(size_t)i], re) <= 3.0);
      REQUIRE(ulps(t[(size_t)i], std::tanh(xi)) <= 4.0);
      REQUIRE(ulps(s[(size_t)i], rs) <= 4.0);
    }
    const float special[] = {INFINITY, -INFINITY, NAN};
    float se[3], st[3], ss[3];
    cpu::exp_forward(se, special, 3);
    cpu::tanh_forward(st, special, 3);
    cpu::sigmoid_forward(ss, special, 3);
    CHECK(std::isinf(se[0]));
    CHECK(se[1] == 0.f);
    CHECK(std::isnan(se[2]));
    CHECK(st[0] == 1.f);
    CHECK(st[1] == -1.f);
    CHECK(std::isnan(st[2]));
    CHECK(ss[0] == 1.f);
    CHECK(ss[1] == 0.f);
    CHECK(std::isnan(ss[2]));
  }

  TEST_CASE("exact gelu keeps relative accuracy in the lower tail") {
    // 0.5 x (1 + erf(x / sqrt 2)) in float cancels to 0 below x = -5; x Phi(x) through erfc does not.
    std::vector<float> x;
    for (float v = -12.f; v <= -3.f; v += 0.01f) x.push_back(v);
    std::vector<float> y(x.size());
    cpu::gelu_exact_forward(y.data(), x.data(), (int64_t)x.size());
    for (size_t i = 0; i < x.size(); ++i) {
      const double v = x[i], r = v * 0.5 * std::erfc(-v / std::sqrt(2.0));
      CAPTURE(v);
      REQUIRE(std::fabs(y[i] - r) <= 3e-5 * std::fabs(r));
    }
  }

  TEST_CASE("sigmoid and silu stay finite at large |x|") {
    const std::vector<float> x = {-1000.f, -100.f, -88.f, 88.f, 100.f, 1000.f};
    std::vector<float> y(6), dx(6), ones(6, 1.f);
    cpu::sigmoid_forward(y.data(), x.data(), 6);
    CHECK(y[0] == 0.f);
    CHECK(y[5] == 1.f);
    for (float v : y) CHECK(std::isfinite(v));
    cpu::silu_forward(y.data(), x.data(), 6);
    CHECK(y[0] == doctest::Approx(0.f));
    CHECK(y[5] == 1000.f);
    cpu::silu_backward(dx.data(), ones.data(), x.data(), 6);
    for (float v : dx) CHECK(std::isfinite(v));
  }

  TEST_CASE("broadcast_to materialises every broadcast pattern") {
    uint64_t seed = 31;
    for (const auto& [as, bs] : kBroadcastCases) {
      const Bcast bc = bcast(as, bs);
      const int64_t n = shape_numel(bc.out);
      std::vector<float> a = rand_vec(shape_numel(as), seed++), out((size_t)n);
      cpu::broadcast_to(out.data(), a.data(), (int64_t)bc.out.size(), bc.out.data(), bc.sa.data());
      for (int64_t i = 0; i < n; ++i) REQUIRE(out[(size_t)i] == a[(size_t)offset_of(i, bc.out, bc.sa)]);
    }
    // A non-broadcast stride (a transposed read) goes through the general inner loop.
    const std::vector<int32_t> m = {1, 2, 3, 4, 5, 6};  // [2, 3]
    std::vector<int32_t> t(6);
    const int64_t shape[] = {3, 2}, st[] = {1, 3};
    cpu::broadcast_to(t.data(), m.data(), 2, shape, st);
    CHECK(t == std::vector<int32_t>{1, 4, 2, 5, 3, 6});
  }
}

namespace {

using cm::test::param;
using cm::test::uniform;

// Runs f, expects a cm::Error whose message contains every piece.
template <class F>
void check_error_names(F f, const std::vector<std::string>& pieces) {
  try {
    f();
    FAIL("no cm::Error thrown");
  } catch (const Error& e) {
    const std::string msg = e.what();
    for (const std::string& p : pieces) CHECK_MESSAGE(msg.find(p) != std::string::npos, "'", p, "' not in: ", msg);
  }
}

// Values of a tensor in double, in logical order.
std::vector<double> values(const Tensor& t) {
  std::vector<float> v = t.to_f32_vector();
  return std::vector<double>(v.begin(), v.end());
}

// f applied to each element, rounded to float: a reference for CHECK_CLOSE.
std::vector<float> map_ref(const Tensor& t, const std::function<double(double)>& f) {
  std::vector<float> r;
  for (double x : values(t)) r.push_back((float)f(x));
  return r;
}

// Pushes values at least `gap` away from 0 (relu's kink), keeping their sign.
Tensor away_from_zero(Tensor t, float gap = 0.1f) {
  float* p = t.f32();
  for (int64_t i = 0; i < t.numel(); ++i) p[i] = p[i] < 0 ? p[i] - gap : p[i] + gap;
  return t;
}

}  // namespace

TEST_SUITE("ops") {
  TEST_CASE("add/sub/mul/div broadcast like PyTorch") {
    using BinOp = Tensor (*)(const Tensor&, const Tensor&);
    const std::vector<std::pair<BinOp, cpu::Binary>> ops = {{static_cast<BinOp>(add), cpu::Binary::Add},
                                                            {static_cast<BinOp>(sub), cpu::Binary::Sub},
                                                            {static_cast<BinOp>(mul), cpu::Binary::Mul},
                                                            {static_cast<BinOp>(div), cpu::Binary::Div}};
    uint64_t seed = 100;
    for (const auto& [as, bs] : kBroadcastCases) {
      Tensor a = uniform(as, seed++), b = uniform(bs, seed++, 0.5f, 2.f);
      const Bcast bc = bcast(as, bs);
      const std::vector<double> av = values(a), bv = values(b);
      for (const auto& [f, op] : ops) {
        CAPTURE(shape_str(as));
        CAPTURE(shape_str(bs));
        CAPTURE((int)op);
        Tensor y = f(a, b);
        REQUIRE(y.shape() == bc.out);
        std::vector<float> ref;
        for (int64_t i = 0; i < shape_numel(bc.out); ++i)
          ref.push_back((float)ref_binary(op, av[(size_t)offset_of(i, bc.out, bc.sa)],
                                          bv[(size_t)offset_of(i, bc.out, bc.sb)]));
        CHECK_CLOSE(y, ref, 1e-6f, 1e-6f);
      }
    }
    // Non-contiguous inputs: a transposed [5, 3] view plus a [5, 1] column.
    Tensor t = uniform({3, 5}, 7).transpose(0, 1), c = uniform({5, 1}, 8);
    Tensor y = t * c;
    std::vector<float> tv = t.to_f32_vector(), cv = c.to_f32_vector(), ref;
    for (int i = 0; i < 5; ++i)
      for (int j = 0; j < 3; ++j) ref.push_back(tv[i * 3 + j] * cv[i]);
    CHECK_CLOSE(y, ref, 0.f, 0.f);
  }

  TEST_CASE("scalar forms and operators") {
    Tensor a = uniform({4, 7}, 9, 0.5f, 2.f);
    const float s = 1.5f;
    CHECK_CLOSE(a + s, map_ref(a, [&](double x) { return x + s; }), 1e-6f, 1e-6f);
    CHECK_CLOSE(s + a, map_ref(a, [&](double x) { return x + s; }), 1e-6f, 1e-6f);
    CHECK_CLOSE(a - s, map_ref(a, [&](double x) { return x - s; }), 1e-6f, 1e-6f);
    CHECK_CLOSE(s - a, map_ref(a, [&](double x) { return s - x; }), 1e-6f, 1e-6f);
    CHECK_CLOSE(a * s, map_ref(a, [&](double x) { return x * s; }), 1e-6f, 1e-6f);
    CHECK_CLOSE(s * a, map_ref(a, [&](double x) { return x * s; }), 1e-6f, 1e-6f);
    CHECK_CLOSE(a / s, map_ref(a, [&](double x) { return x / s; }), 1e-6f, 1e-6f);
    CHECK_CLOSE(s / a, map_ref(a, [&](double x) { return s / x; }), 1e-6f, 1e-6f);
    CHECK_CLOSE(-a, map_ref(a, [](double x) { return -x; }), 0.f, 0.f);
    // 0-d tensors behave as scalars in broadcasting.
    Tensor z = Tensor::scalar(2.f);
    CHECK((a * z).shape() == a.shape());
    CHECK_CLOSE(a * z, map_ref(a, [](double x) { return 2 * x; }), 0.f, 0.f);
    CHECK((z + z).dim() == 0);
    CHECK((z + z).item() == 4.f);
  }

  TEST_CASE("unary ops and activations match double references") {
    Tensor a = uniform({7, 13}, 10, -3.f, 3.f), pos = uniform({7, 13}, 11, 0.1f, 4.f);
    const double k = std::sqrt(2.0 / M_PI);
    CHECK_CLOSE(exp(a), map_ref(a, [](double x) { return std::exp(x); }), 1e-6f, 1e-6f);
    CHECK_CLOSE(log(pos), map_ref(pos, [](double x) { return std::log(x); }), 1e-6f, 1e-6f);
    CHECK_CLOSE(sqrt(pos), map_ref(pos, [](double x) { return std::sqrt(x); }), 1e-6f, 1e-6f);
    CHECK_CLOSE(square(a), map_ref(a, [](double x) { return x * x; }), 1e-6f, 1e-6f);
    for (float p : {2.f, 3.f, 0.5f, -1.5f, 0.f})
      CHECK_CLOSE(pow(pos, p), map_ref(pos, [p](double x) { return std::pow(x, (double)p); }), 1e-6f, 2e-6f);
    CHECK_CLOSE(tanh(a), map_ref(a, [](double x) { return std::tanh(x); }), 1e-6f, 1e-6f);
    CHECK_CLOSE(sigmoid(a), map_ref(a, [](double x) { return 1 / (1 + std::exp(-x)); }), 1e-6f, 1e-6f);
    CHECK_CLOSE(relu(a), map_ref(a, [](double x) { return x > 0 ? x : 0; }), 0.f, 0.f);
    CHECK_CLOSE(gelu(a),
                map_ref(a, [k](double x) { return 0.5 * x * (1 + std::tanh(k * (x + 0.044715 * x * x * x))); }),
                1e-6f, 1e-6f);
    CHECK_CLOSE(gelu(a, GeluKind::Exact),
                map_ref(a, [](double x) { return 0.5 * x * (1 + std::erf(x / std::sqrt(2.0))); }), 1e-6f, 1e-6f);
    CHECK_CLOSE(silu(a), map_ref(a, [](double x) { return x / (1 + std::exp(-x)); }), 1e-6f, 1e-6f);
    // Empty and 0-d inputs keep their shapes.
    CHECK(gelu(Tensor::zeros({0, 3})).shape() == Shape{0, 3});
    CHECK(exp(Tensor::scalar(0.f)).item() == 1.f);
  }

  TEST_CASE("i32 add/sub/mul broadcast; mixed dtypes and i32 div are errors") {
    Tensor a = Tensor::from_vector(std::vector<int32_t>{1, 2, 3, 4, 5, 6}, {2, 3});
    Tensor r = Tensor::from_vector(std::vector<int32_t>{10, 20, 30}, {3});
    Tensor c = Tensor::from_vector(std::vector<int32_t>{-1, 2}, {2, 1});
    CHECK((a + r).dtype() == DType::I32);
    CHECK((a + r).to_i32_vector() == std::vector<int32_t>{11, 22, 33, 14, 25, 36});
    CHECK((r - a).to_i32_vector() == std::vector<int32_t>{9, 18, 27, 6, 15, 24});
    CHECK((a * c).to_i32_vector() == std::vector<int32_t>{-1, -2, -3, 8, 10, 12});
    CHECK(expand(c, {2, 2}).to_i32_vector() == std::vector<int32_t>{-1, -1, 2, 2});
    check_error_names([&] { add(a, Tensor::ones({2, 3})); }, {"add", "i32", "f32", "[2, 3]"});
    check_error_names([&] { div(a, a); }, {"div", "i32"});
    CHECK_THROWS_AS(exp(a), Error);
    CHECK_THROWS_AS(mul(a, 2.f), Error);
    CHECK_THROWS_AS(relu(a), Error);
  }

  TEST_CASE("sum_to and expand are inverse broadcasts") {
    Tensor a = uniform({3, 4, 5}, 12);
    const std::vector<double> av = values(a);
    Tensor s = sum_to(a, {4, 1});
    REQUIRE(s.shape() == Shape{4, 1});
    std::vector<float> ref(4, 0.f);
    for (int i = 0; i < 3; ++i)
      for (int j = 0; j < 4; ++j) {
        double acc = 0;
        for (int k = 0; k < 5; ++k) acc += av[(size_t)(i * 20 + j * 5 + k)];
        ref[(size_t)j] += (float)acc;
      }
    CHECK_CLOSE(s, ref, 1e-5f, 1e-5f);
    CHECK(sum_to(a, {}).dim() == 0);
    CHECK(sum_to(a, {}).item() == doctest::Approx(std::accumulate(av.begin(), av.end(), 0.0)).epsilon(1e-5));
    CHECK(sum_to(a, {3, 4, 5}).same(a));  // nothing to do
    Tensor e = expand(uniform({4, 1}, 13), {2, 4, 3});
    REQUIRE(e.shape() == Shape{2, 4, 3});
    std::vector<float> ev = e.to_f32_vector(), src = uniform({4, 1}, 13).to_f32_vector();
    for (int i = 0; i < 24; ++i) CHECK(ev[(size_t)i] == src[(size_t)((i / 3) % 4)]);
    CHECK(expand(Tensor::scalar(3.f), {0, 2}).shape() == Shape{0, 2});
    CHECK(sum_to(Tensor::zeros({0, 2}), {1, 2}).to_f32_vector() == std::vector<float>{0.f, 0.f});
    check_error_names([&] { sum_to(a, {2, 5}); }, {"sum_to", "[3, 4, 5]", "[2, 5]"});
    check_error_names([&] { sum_to(a, {1, 3, 4, 5}); }, {"sum_to", "[1, 3, 4, 5]"});
    check_error_names([&] { expand(a, {3, 2, 5}); }, {"expand", "[3, 4, 5]", "[3, 2, 5]"});
    check_error_names([&] { expand(a, {4, 5}); }, {"expand", "[4, 5]"});
  }

  TEST_CASE("incompatible broadcast shapes name both shapes") {
    check_error_names([] { add(Tensor::zeros({3, 4}), Tensor::zeros({5})); }, {"add", "[3, 4]", "[5]"});
    check_error_names(
        [] {
          mul(Tensor::zeros({2, 3, 4}), Tensor::zeros({3, 1, 4}));
        },
        {"mul", "[2, 3, 4]", "[3, 1, 4]"});
    check_error_names([] { div(Tensor::zeros({0}), Tensor::zeros({2})); }, {"div", "[0]", "[2]"});
    CHECK_THROWS_AS(sub(Tensor::zeros({2}), Tensor()), Error);  // undefined input
  }

  TEST_CASE("binary op gradients with broadcasting") {
    const std::vector<std::pair<Shape, Shape>> cases = {{{3, 1, 5}, {4, 5}}, {{2, 3}, {2, 3}},       {{2, 3}, {3}},
                                                        {{3}, {2, 3}},       {{}, {2, 3}},           {{2, 3}, {}},
                                                        {{2, 1}, {1, 3}},    {{2, 3, 1}, {2, 1, 4}}, {{0, 3}, {3}}};
    uint64_t seed = 200;
    for (const auto& [as, bs] : cases) {
      CAPTURE(shape_str(as));
      CAPTURE(shape_str(bs));
      Tensor a = param(as, seed++), b = param(bs, seed++, 0.5f, 2.f);
      CHECK_GRAD([](const std::vector<Tensor>& x) { return add(x[0], x[1]); }, {a, b});
      CHECK_GRAD([](const std::vector<Tensor>& x) { return sub(x[0], x[1]); }, {a, b});
      CHECK_GRAD([](const std::vector<Tensor>& x) { return mul(x[0], x[1]); }, {a, b});
      CHECK_GRAD([](const std::vector<Tensor>& x) { return div(x[0], x[1]); }, {a, b});
    }
    // Only one side requiring grad, and the same tensor on both sides (fan-out).
    Tensor a = param({3, 4}, 250, 0.5f, 2.f), c = uniform({4}, 251);
    CHECK_GRAD([c](const std::vector<Tensor>& x) { return div(c, x[0]); }, {a});
    CHECK_GRAD([](const std::vector<Tensor>& x) { return mul(x[0], x[0]); }, {a});
    CHECK_GRAD([](const std::vector<Tensor>& x) { return sub(x[0], x[0].transpose(0, 1).transpose(0, 1)); }, {a});
  }

  TEST_CASE("scalar, unary and activation gradients") {
    using Fn = std::function<Tensor(const Tensor&)>;
    const std::vector<std::pair<const char*, Fn>> any = {
        {"add_s", [](const Tensor& x) { return x + 0.7f; }},
        {"mul_s", [](const Tensor& x) { return x * -1.3f; }},
        {"rsub", [](const Tensor& x) { return 2.f - x; }},
        {"neg", [](const Tensor& x) { return -x; }},
        {"exp", [](const Tensor& x) { return exp(x); }},
        {"square", [](const Tensor& x) { return square(x); }},
        {"pow2", [](const Tensor& x) { return pow(x, 2.f); }},
        {"pow3", [](const Tensor& x) { return pow(x, 3.f); }},
        {"tanh", [](const Tensor& x) { return tanh(x); }},
        {"sigmoid", [](const Tensor& x) { return sigmoid(x); }},
        {"gelu", [](const Tensor& x) { return gelu(x); }},
        {"gelu_exact", [](const Tensor& x) { return gelu(x, GeluKind::Exact); }},
        {"silu", [](const Tensor& x) { return silu(x); }},
    };
    const std::vector<std::pair<const char*, Fn>> positive = {
        {"rdiv", [](const Tensor& x) { return 1.5f / x; }},
        {"log", [](const Tensor& x) { return log(x); }},
        {"sqrt", [](const Tensor& x) { return sqrt(x); }},
        {"pow0.5", [](const Tensor& x) { return pow(x, 0.5f); }},
        {"pow-1.5", [](const Tensor& x) { return pow(x, -1.5f); }},
        {"pow0", [](const Tensor& x) { return pow(x, 0.f); }},
    };
    for (const auto& [name, f] : any) {
      CAPTURE(name);
      Tensor x = param({3, 5}, 300, -2.f, 2.f);
      CHECK_GRAD([f = f](const std::vector<Tensor>& v) { return f(v[0]); }, {x});
    }
    for (const auto& [name, f] : positive) {
      CAPTURE(name);
      Tensor x = param({3, 5}, 301, 0.5f, 2.f);
      CHECK_GRAD([f = f](const std::vector<Tensor>& v) { return f(v[0]); }, {x});
    }
    Tensor r = away_from_zero(uniform({4, 6}, 302));
    r.requires_grad_(true);
    CHECK_GRAD([](const std::vector<Tensor>& v) { return relu(v[0]); }, {r});
    // A non-contiguous input and a non-contiguous incoming gradient (a transposed view on either side).
    Tensor t = param({4, 3}, 303);
    CHECK_GRAD([](const std::vector<Tensor>& v) { return gelu(v[0].transpose(0, 1)).transpose(0, 1); }, {t});
    CHECK_GRAD([](const std::vector<Tensor>& v) { return exp(v[0].transpose(0, 1)) * 0.5f; }, {t});
  }

  TEST_CASE("sum_to and expand gradients") {
    Tensor a = param({3, 4, 5}, 400), b = param({4, 1}, 401), s = param({}, 402);
    CHECK_GRAD([](const std::vector<Tensor>& v) { return sum_to(v[0], {4, 1}); }, {a});
    CHECK_GRAD([](const std::vector<Tensor>& v) { return sum_to(v[0], {3, 1, 5}); }, {a});
    CHECK_GRAD([](const std::vector<Tensor>& v) { return sum_to(v[0], {}); }, {a});
    CHECK_GRAD([](const std::vector<Tensor>& v) { return expand(v[0], {2, 4, 3}); }, {b});
    CHECK_GRAD([](const std::vector<Tensor>& v) { return expand(v[0], {3, 2}); }, {s});
  }
}
