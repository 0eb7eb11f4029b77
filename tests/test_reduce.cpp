// Reduction kernels (suite "kernels") and differentiable reductions (suite "ops"): sums in double against naive
// references, first-maximum rules, bit-identical results for 1 and 2 threads, gradients, bad axes.
#include <cmath>
#include <cstring>
#include <limits>
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
    const int64_t shapes[][3] = {{1, 1, 1}, {3, 7, 1},  {1, 20000, 1}, {1, 5, 300}, {4, 9, 257},  {2, 0, 3},
                                 {5, 1, 5}, {13, 3, 2}, {1, 8193, 1},  {0, 4, 4},   {7, 100, 513}};
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

  TEST_CASE("max_axis matches a naive scan on odd shapes") {
    const int64_t shapes[][3] = {{3, 7, 1}, {1, 5, 300}, {4, 9, 257}, {2, 1, 3}, {6, 33, 5}};
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
