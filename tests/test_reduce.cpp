// Reduction kernels (suite "kernels") and differentiable reductions (suite "ops"): sums in double against naive
// references, first-maximum rules, bit-identical results for 1 and 2 threads, gradients, bad axes.
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "kernels/reduce.h"
#include "tests/helpers.h"

#ifdef _OPENMP
#include <omp.h>
#endif

using namespace cm;

namespace {

std::vector<float> rand_vec(int64_t n, uint64_t seed, float lo = -1.f, float hi = 1.f) {
  std::vector<float> v((size_t)n);
  for (int64_t i = 0; i < n; ++i) v[(size_t)i] = lo + (hi - lo) * philox_uniform(seed, 0, (uint64_t)i);
  return v;
}

// Runs f with the OpenMP thread count set to t (a no-op without OpenMP), then restores it.
template <class F>
void with_threads(int t, F f) {
#ifdef _OPENMP
  const int prev = omp_get_max_threads();
  omp_set_num_threads(t);
  f();
  omp_set_num_threads(prev);
#else
  (void)t;
  f();
#endif
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

// Naive [O, R, I] reductions in double.
std::vector<double> ref_sum_axis(const std::vector<float>& a, int64_t O, int64_t R, int64_t I) {
  std::vector<double> r((size_t)(O * I), 0.0);
  for (int64_t o = 0; o < O; ++o)
    for (int64_t k = 0; k < R; ++k)
      for (int64_t i = 0; i < I; ++i) r[(size_t)(o * I + i)] += a[(size_t)((o * R + k) * I + i)];
  return r;
}

}  // namespace

TEST_SUITE("kernels") {
  TEST_CASE("sum_all of 1e6 floats keeps float accuracy") {
    const int64_t n = 1000003;
    // Mostly positive values with a large common offset: a float running sum loses ~3 digits here.
    std::vector<float> a = rand_vec(n, 5, 0.f, 1.f);
    for (float& v : a) v += 1000.f;
    double ref = 0;
    for (float v : a) ref += v;
    float got = 0;
    cpu::sum_all(&got, a.data(), n, 1.f);
    CHECK(std::fabs(got - ref) <= 1e-7 * std::fabs(ref));  // within one float rounding of the exact sum
    float mean = 0;
    cpu::sum_all(&mean, a.data(), n, 1.f / (float)n);
    CHECK(std::fabs(mean - ref / n) <= 1e-6 * std::fabs(ref / n));
    // Empty: 0, and the mean of nothing is NaN.
    float z = -1;
    cpu::sum_all(&z, a.data(), 0, 1.f);
    CHECK(z == 0.f);
    cpu::sum_all(&z, a.data(), 0, 1.f / 0.f);
    CHECK(std::isnan(z));
  }

  TEST_CASE("sum_axis matches a double reference on odd [O, R, I] shapes") {
    const int64_t shapes[][3] = {{1, 1, 1},     {3, 7, 1},     {1, 20000, 1}, {1, 5, 300},  {4, 9, 257},
                                 {2, 0, 3},     {5, 1, 5},     {13, 3, 2},    {1, 8193, 1}, {0, 4, 4},
                                 {1, 1000, 37}, {1, 513, 300}, {1, 257, 2},   {7, 100, 513}};
    uint64_t seed = 40;
    for (const auto& s : shapes) {
      const int64_t O = s[0], R = s[1], I = s[2];
      CAPTURE(O);
      CAPTURE(R);
      CAPTURE(I);
      std::vector<float> a = rand_vec(O * R * I, seed++), out((size_t)(O * I), -7.f);
      const std::vector<double> ref = ref_sum_axis(a, O, R, I);
      for (float scale : {1.f, 0.25f}) {
        cpu::sum_axis(out.data(), a.data(), O, R, I, scale);
        for (size_t i = 0; i < ref.size(); ++i)
          REQUIRE(std::fabs(out[i] - scale * ref[i]) <= 1e-6 + 1e-6 * std::fabs(scale * ref[i]));
      }
    }
  }

  TEST_CASE("sum_to reduces every broadcast pattern") {
    struct C {
      Shape a, out;
    };
    const std::vector<C> cases = {{{3, 4, 5}, {1, 4, 1}},
                                  {{3, 4, 5}, {3, 1, 5}},
                                  {{3, 4, 5}, {1, 1, 1}},
                                  {{3, 4, 5}, {3, 4, 5}},
                                  {{6, 7}, {1, 7}},
                                  {{6, 7}, {6, 1}},
                                  {{2, 3, 4, 5}, {2, 1, 4, 1}},
                                  {{2, 1, 4}, {1, 1, 4}},
                                  {{0, 3}, {1, 3}},
                                  {{3, 0}, {3, 1}},
                                  {{4, 0}, {1, 0}},
                                  {{}, {}}};
    uint64_t seed = 60;
    for (const C& c : cases) {
      CAPTURE(shape_str(c.a));
      CAPTURE(shape_str(c.out));
      const int64_t na = shape_numel(c.a), no = shape_numel(c.out), D = (int64_t)c.a.size();
      std::vector<float> a = rand_vec(na, seed++), out((size_t)no, -7.f);
      std::vector<double> ref((size_t)no, 0.0);
      Shape ostr = contiguous_strides(c.out);
      for (int64_t i = 0; i < na; ++i) {  // each element of a lands on its out element (reduced dims -> 0)
        int64_t r = i, off = 0;
        for (int64_t d = D - 1; d >= 0; --d) {
          const int64_t k = r % c.a[d];
          r /= c.a[d];
          if (c.out[d] != 1) off += k * ostr[d];
        }
        ref[(size_t)off] += a[(size_t)i];
      }
      cpu::sum_to(out.data(), a.data(), D, c.a.data(), c.out.data());
      for (int64_t i = 0; i < no; ++i)
        REQUIRE(std::fabs(out[(size_t)i] - ref[(size_t)i]) <= 1e-5 + 1e-6 * std::fabs(ref[(size_t)i]));
    }
  }

  TEST_CASE("max kernels pick the first maximum and propagate NaN") {
    // Ties across the block boundary of the long path: the earlier one wins.
    const int64_t n = 30000;
    std::vector<float> a = rand_vec(n, 70);
    a[9000] = 5.f;
    a[20000] = 5.f;
    a[25000] = 5.f;
    float v = 0;
    int64_t at = -1;
    cpu::max_all(&v, &at, a.data(), n);
    CHECK(v == 5.f);
    CHECK(at == 9000);
    a[12345] = std::numeric_limits<float>::quiet_NaN();
    a[22222] = std::numeric_limits<float>::quiet_NaN();
    cpu::max_all(&v, &at, a.data(), n);
    CHECK(std::isnan(v));
    CHECK(at == 12345);
    // Axis: [O=2, R=4, I=3] with ties along r.
    const std::vector<float> m = {1,  9,  3,  7,  9,  2,  7,  0,  3,  -1, 9,  3,    // o = 0
                                  -5, -5, -5, -6, -4, -5, -5, -4, -1, -9, -9, -9};  // o = 1
    std::vector<float> mv(6);
    std::vector<int32_t> mi(6);
    cpu::max_axis(mv.data(), mi.data(), m.data(), 2, 4, 3);
    CHECK(mv == std::vector<float>{7, 9, 3, -5, -4, -1});
    CHECK(mi == std::vector<int32_t>{1, 0, 0, 0, 1, 2});
    // Only indices (argmax), and a NaN along the axis.
    std::vector<float> m2 = m;
    m2[7] = std::numeric_limits<float>::quiet_NaN();  // o = 0, r = 2, i = 1
    cpu::max_axis(nullptr, mi.data(), m2.data(), 2, 4, 3);
    CHECK(mi == std::vector<int32_t>{1, 2, 0, 0, 1, 2});
    // Backward scatters dy to the chosen positions only.
    const std::vector<int32_t> idx = {1, 0, 0, 0, 1, 2};
    const std::vector<float> dy = {1, 2, 3, 4, 5, 6};
    std::vector<float> dx(24, -1.f);
    cpu::max_axis_backward(dx.data(), dy.data(), idx.data(), 2, 4, 3);
    std::vector<float> want(24, 0.f);
    want[0 * 12 + 1 * 3 + 0] = 1;
    want[0 * 12 + 0 * 3 + 1] = 2;
    want[0 * 12 + 0 * 3 + 2] = 3;
    want[1 * 12 + 0 * 3 + 0] = 4;
    want[1 * 12 + 1 * 3 + 1] = 5;
    want[1 * 12 + 2 * 3 + 2] = 6;
    CHECK(dx == want);
  }

  TEST_CASE("max over long contiguous rows: ties across chunks, NaN, all -inf") {
    const int64_t R = 200;
    std::vector<float> a = rand_vec(3 * R, 75);
    a[150] = 3.f;  // row 0: max at 150, tie at 170
    a[170] = 3.f;
    a[R + 100] = std::numeric_limits<float>::quiet_NaN();  // row 1: first NaN at 100
    a[R + 130] = std::numeric_limits<float>::quiet_NaN();
    a[R + 20] = 9.f;
    for (int64_t k = 0; k < R; ++k) a[(size_t)(2 * R + k)] = -INFINITY;  // row 2
    std::vector<float> v(3);
    std::vector<int32_t> at(3);
    cpu::max_axis(v.data(), at.data(), a.data(), 3, R, 1);
    CHECK(at == std::vector<int32_t>{150, 100, 0});
    CHECK(v[0] == 3.f);
    CHECK(std::isnan(v[1]));
    CHECK(v[2] == -INFINITY);
    // Signed zeros compare equal: the first one is the maximum, with its own sign.
    const std::vector<float> z = {-1.f, -0.f, 0.f, -2.f};
    float zv = 1;
    int32_t zi = -1;
    cpu::max_axis(&zv, &zi, z.data(), 1, 4, 1);
    CHECK(zi == 1);
    CHECK(std::signbit(zv));
  }

  TEST_CASE("max_axis matches a naive scan on odd shapes") {
    const int64_t shapes[][3] = {{3, 7, 1},  {1, 5, 300}, {4, 9, 257}, {2, 1, 3},
                                 {6, 33, 5}, {5, 301, 1}, {2, 64, 1}};
    uint64_t seed = 80;
    for (const auto& s : shapes) {
      const int64_t O = s[0], R = s[1], I = s[2];
      std::vector<float> a = rand_vec(O * R * I, seed++), out((size_t)(O * I));
      for (float& x : a) x = std::round(x * 4.f);  // few distinct values: many ties
      std::vector<int32_t> idx((size_t)(O * I));
      cpu::max_axis(out.data(), idx.data(), a.data(), O, R, I);
      for (int64_t o = 0; o < O; ++o)
        for (int64_t i = 0; i < I; ++i) {
          int64_t best = 0;
          for (int64_t r = 1; r < R; ++r)
            if (a[(size_t)((o * R + r) * I + i)] > a[(size_t)((o * R + best) * I + i)]) best = r;
          REQUIRE(idx[(size_t)(o * I + i)] == best);
          REQUIRE(out[(size_t)(o * I + i)] == a[(size_t)((o * R + best) * I + i)]);
        }
    }
  }

  TEST_CASE("sums are bit-identical for 1 and 2 threads") {
    const int64_t n = 1 << 20;
    std::vector<float> a = rand_vec(n, 90);
    std::vector<float> s1(1), s2(1), r1(1024), r2(1024), c1(1024), c2(1024), t1(1024), t2(1024);
    const int64_t shp[] = {32, 32, 1024}, to[] = {1, 1, 1024};
    auto run = [&](std::vector<float>& s, std::vector<float>& r, std::vector<float>& c, std::vector<float>& t) {
      cpu::sum_all(s.data(), a.data(), n, 1.f);
      cpu::sum_axis(r.data(), a.data(), 1024, 1024, 1, 1.f);  // row sums
      cpu::sum_axis(c.data(), a.data(), 1, 1024, 1024, 1.f);  // column sums
      cpu::sum_to(t.data(), a.data(), 3, shp, to);
    };
    with_threads(1, [&] { run(s1, r1, c1, t1); });
    with_threads(2, [&] { run(s2, r2, c2, t2); });
    CHECK(same_bits(s1, s2));
    CHECK(same_bits(r1, r2));
    CHECK(same_bits(c1, c2));
    CHECK(same_bits(t1, t2));
  }
}

namespace {

using cm::test::param;
using cm::test::uniform;

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

// Values 0.05 * (a permutation of 0..n-1) plus a little noise: all distinct and at least 0.04 apart, so the
// finite differences of max (step 1e-2) never cross a tie.
Tensor distinct(const Shape& s, uint64_t seed) {
  const int64_t n = shape_numel(s);
  std::vector<int64_t> perm((size_t)n);
  for (int64_t i = 0; i < n; ++i) perm[(size_t)i] = i;
  for (int64_t i = n - 1; i > 0; --i) {  // Fisher-Yates from the counter-based stream
    const int64_t j = (int64_t)(philox_uniform(seed, 0, (uint64_t)i) * (float)(i + 1)) % (i + 1);
    std::swap(perm[(size_t)i], perm[(size_t)j]);
  }
  std::vector<float> v((size_t)n);
  for (int64_t i = 0; i < n; ++i)
    v[(size_t)i] = 0.05f * (float)perm[(size_t)i] - 1.f + 0.005f * philox_uniform(seed + 1, 0, (uint64_t)i);
  Tensor t = Tensor::from_vector(v, s);
  t.requires_grad_(true);
  return t;
}

// Reference axis reductions in double over a tensor's logical values: [O, R, I] around axis d.
struct Ref {
  std::vector<double> sum, max;
  std::vector<int32_t> arg;
};
Ref ref_axis(const Tensor& a, int64_t d) {
  const Shape& s = a.shape();
  int64_t O = 1, I = 1;
  for (int64_t k = 0; k < d; ++k) O *= s[k];
  for (int64_t k = d + 1; k < (int64_t)s.size(); ++k) I *= s[k];
  const int64_t R = s[d];
  std::vector<float> v = a.to_f32_vector();
  Ref r{std::vector<double>((size_t)(O * I), 0.0), std::vector<double>((size_t)(O * I)),
        std::vector<int32_t>((size_t)(O * I), 0)};
  for (int64_t o = 0; o < O; ++o)
    for (int64_t i = 0; i < I; ++i) {
      const size_t j = (size_t)(o * I + i);
      r.max[j] = v[(size_t)(o * R * I + i)];
      for (int64_t k = 0; k < R; ++k) {
        const double x = v[(size_t)((o * R + k) * I + i)];
        r.sum[j] += x;
        if (x > r.max[j]) r.max[j] = x, r.arg[j] = (int32_t)k;
      }
    }
  return r;
}

std::vector<float> to_float(const std::vector<double>& v) { return std::vector<float>(v.begin(), v.end()); }

}  // namespace

TEST_SUITE("ops") {
  TEST_CASE("sum, mean, max over all elements give 0-d tensors") {
    Tensor a = uniform({5, 7, 3}, 500);
    std::vector<float> v = a.to_f32_vector();
    double s = 0, m = v[0];
    for (float x : v) s += x, m = std::max(m, (double)x);
    Tensor ts = sum(a), tm = mean(a), tx = max(a);
    CHECK(ts.dim() == 0);
    CHECK(tm.dim() == 0);
    CHECK(tx.dim() == 0);
    CHECK_CLOSE(ts, std::vector<float>{(float)s}, 1e-6f, 1e-6f);
    CHECK_CLOSE(tm, std::vector<float>{(float)(s / v.size())}, 1e-6f, 1e-6f);
    CHECK(tx.item() == (float)m);
    // A non-contiguous view reduces its logical elements only.
    Tensor sl = a.slice(1, 2, 5).transpose(0, 2);
    std::vector<float> sv = sl.to_f32_vector();
    double ss = 0;
    for (float x : sv) ss += x;
    CHECK_CLOSE(sum(sl), std::vector<float>{(float)ss}, 1e-6f, 1e-6f);
    // Empty and 0-d inputs.
    CHECK(sum(Tensor::zeros({0, 3})).item() == 0.f);
    CHECK(std::isnan(mean(Tensor::zeros({0})).item()));
    CHECK(sum(Tensor::scalar(2.5f)).item() == 2.5f);
    CHECK(max(Tensor::scalar(-2.5f)).item() == -2.5f);
  }

  TEST_CASE("sum, mean, max, argmax over an axis match a double reference") {
    const std::vector<Shape> shapes = {{4, 5, 6}, {1, 9, 1}, {3, 1}, {2, 3, 4, 5}, {300, 3}, {3, 300}, {7}};
    uint64_t seed = 510;
    for (const Shape& s : shapes) {
      Tensor a = uniform(s, seed++);
      for (int64_t d = -(int64_t)s.size(); d < (int64_t)s.size(); ++d) {
        const int64_t dn = d < 0 ? d + (int64_t)s.size() : d;
        CAPTURE(shape_str(s));
        CAPTURE(d);
        const Ref r = ref_axis(a, dn);
        Shape dropped = s, kept = s;
        dropped.erase(dropped.begin() + dn);
        kept[(size_t)dn] = 1;
        std::vector<double> mean_ref = r.sum;
        for (double& x : mean_ref) x /= (double)s[(size_t)dn];
        for (bool keep : {false, true}) {
          const Shape want = keep ? kept : dropped;
          Tensor ts = sum(a, d, keep), tm = mean(a, d, keep), tx = max(a, d, keep);
          CHECK(ts.shape() == want);
          CHECK(tm.shape() == want);
          CHECK(tx.shape() == want);
          CHECK_CLOSE(ts, to_float(r.sum), 1e-6f, 1e-6f);
          CHECK_CLOSE(tm, to_float(mean_ref), 1e-6f, 1e-6f);
          CHECK_CLOSE(tx, to_float(r.max), 0.f, 0.f);
        }
        Tensor am = argmax(a, d);
        CHECK(am.dtype() == DType::I32);
        CHECK(am.shape() == dropped);
        CHECK(am.to_i32_vector() == r.arg);
      }
    }
    // An empty non-reduced dim gives an empty result; an empty reduced axis sums to 0.
    CHECK(sum(Tensor::zeros({0, 4}), 1).shape() == Shape{0});
    CHECK(sum(Tensor::zeros({0, 4}), 0).to_f32_vector() == std::vector<float>(4, 0.f));
    CHECK(max(Tensor::zeros({0, 4}), 1).shape() == Shape{0});
  }

  TEST_CASE("max sends its gradient to the first maximum") {
    Tensor a = Tensor::from_vector(std::vector<float>{1, 3, 3, 2, 3, 0}, {2, 3});
    a.requires_grad_(true);
    max(a).backward();
    CHECK(a.grad().to_f32_vector() == std::vector<float>{0, 1, 0, 0, 0, 0});
    a.zero_grad();
    // Along axis 1: row 0 ties at columns 1 and 2, row 1 max at column 1.
    sum(max(a, 1) * Tensor::from_vector(std::vector<float>{10, 20}, {2})).backward();
    CHECK(a.grad().to_f32_vector() == std::vector<float>{0, 10, 0, 0, 20, 0});
    a.zero_grad();
    // Along axis 0: columns 0 and 1 pick row 1 and row 0 (tie in column 1 -> row 0), column 2 row 0.
    sum(max(a, 0, true)).backward();
    CHECK(a.grad().to_f32_vector() == std::vector<float>{0, 1, 1, 1, 0, 0});
    CHECK(argmax(a, 1).to_i32_vector() == std::vector<int32_t>{1, 1});
    CHECK(argmax(a, 0).to_i32_vector() == std::vector<int32_t>{1, 0, 0});
  }

  TEST_CASE("reduction gradients") {
    Tensor a = param({3, 4, 5}, 520);
    CHECK_GRAD([](const std::vector<Tensor>& v) { return sum(v[0]); }, {a});
    CHECK_GRAD([](const std::vector<Tensor>& v) { return mean(v[0]); }, {a});
    for (int64_t d : {0, 1, 2, -1})
      for (bool keep : {false, true}) {
        CAPTURE(d);
        CAPTURE(keep);
        auto s = [d, keep](const std::vector<Tensor>& v) { return sum(v[0], d, keep); };
        auto mn = [d, keep](const std::vector<Tensor>& v) { return mean(v[0], d, keep); };
        CHECK_GRAD(s, {a});
        CHECK_GRAD(mn, {a});
      }
    Tensor m = distinct({3, 4, 5}, 521);
    CHECK_GRAD([](const std::vector<Tensor>& v) { return max(v[0]); }, {m});
    for (int64_t d : {0, 1, 2})
      for (bool keep : {false, true}) {
        CAPTURE(d);
        auto mx = [d, keep](const std::vector<Tensor>& v) { return max(v[0], d, keep); };
        CHECK_GRAD(mx, {m});
      }
    // Composed: a softmax-like normaliser through a non-contiguous view.
    Tensor x = param({4, 3}, 522);
    CHECK_GRAD(
        [](const std::vector<Tensor>& v) {
          Tensor t = v[0].transpose(0, 1);
          return exp(t) / sum(exp(t), -1, true);
        },
        {x});
  }

  TEST_CASE("reductions: bad axes and inputs are errors") {
    Tensor a = Tensor::zeros({2, 3});
    check_error_names([&] { sum(a, 2); }, {"axis 2", "rank 2"});
    check_error_names([&] { mean(a, -3); }, {"axis -3", "rank 2"});
    check_error_names([&] { max(a, 5, true); }, {"axis 5", "rank 2"});
    check_error_names([&] { argmax(a, 2); }, {"axis 2", "rank 2"});
    check_error_names([&] { sum(Tensor::scalar(1.f), 0); }, {"axis 0", "rank 0"});
    check_error_names([] { max(Tensor::zeros({0, 3})); }, {"max", "[0, 3]"});
    check_error_names([] { max(Tensor::zeros({2, 0}), 1); }, {"max", "[2, 0]"});
    check_error_names([] { argmax(Tensor::zeros({2, 0}), -1); }, {"argmax", "[2, 0]"});
    check_error_names([] { sum(Tensor::zeros({2}, DType::I32)); }, {"sum", "i32"});
  }

  TEST_CASE("sum op is bit-identical for 1 and 2 threads") {
    Tensor a = uniform({1000, 1000}, 530);
    std::vector<float> s1, s2, r1, r2, c1, c2;
    with_threads(1, [&] {
      s1 = sum(a).to_f32_vector();
      r1 = sum(a, 1).to_f32_vector();
      c1 = mean(a, 0).to_f32_vector();
    });
    with_threads(2, [&] {
      s2 = sum(a).to_f32_vector();
      r2 = sum(a, 1).to_f32_vector();
      c2 = mean(a, 0).to_f32_vector();
    });
    CHECK(same_bits(s1, s2));
    CHECK(same_bits(r1, r2));
    CHECK(same_bits(c1, c2));
  }
}
