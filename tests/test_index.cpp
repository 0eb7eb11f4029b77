// Top-k and indexing: the raw kernels (kernels/topk.h, kernels/index.h) against brute force, then the
// differentiable ops of autograd/ops_index.cpp (values against naive references, CHECK_GRAD, bad inputs).
#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include "engine/rng.h"
#include "kernels/index.h"
#include "kernels/topk.h"
#include "tests/helpers.h"

#ifdef _OPENMP
#include <omp.h>
#endif

using namespace cm;

namespace {

// Brute-force top-k of one row: a stable sort by rank (NaN first, then larger), so ties keep index order.
void brute_topk(std::vector<float>& vals, std::vector<int32_t>& idx, const float* x, int64_t n, int64_t k) {
  std::vector<int32_t> ord((size_t)n);
  std::iota(ord.begin(), ord.end(), 0);
  std::stable_sort(ord.begin(), ord.end(), [x](int32_t a, int32_t b) {
    float va = x[a], vb = x[b];
    return va > vb || (std::isnan(va) && !std::isnan(vb));
  });
  vals.clear();
  idx.clear();
  for (int64_t j = 0; j < k; ++j) {
    idx.push_back(ord[(size_t)j]);
    vals.push_back(x[ord[(size_t)j]]);
  }
}

// Rows of distinct values: a random permutation of 0..n-1, scaled (no ties anywhere).
std::vector<float> distinct_rows(int64_t R, int64_t n, uint64_t seed) {
  std::vector<float> x((size_t)(R * n));
  for (int64_t r = 0; r < R; ++r) {
    std::vector<int32_t> p((size_t)n);
    std::iota(p.begin(), p.end(), 0);
    for (int64_t i = n - 1; i > 0; --i) {  // Fisher-Yates on Philox
      int64_t j = (int64_t)(philox_uniform(seed, (uint64_t)r * 1000003, (uint64_t)i) * (float)(i + 1));
      std::swap(p[(size_t)i], p[(size_t)std::min(j, i)]);
    }
    for (int64_t i = 0; i < n; ++i) x[(size_t)(r * n + i)] = 0.37f * (float)p[(size_t)i] - 5.f;
  }
  return x;
}

// Checks our kernel against brute force on every row of x [R, n]; exact equality of values and indices.
void check_topk_rows(const std::vector<float>& x, int64_t R, int64_t n, int64_t k) {
  std::vector<float> v((size_t)(R * k), -123.f);
  std::vector<int32_t> ix((size_t)(R * k), -123);
  cpu::topk_forward(v.data(), ix.data(), x.data(), R, n, k);
  std::vector<float> bv;
  std::vector<int32_t> bi;
  for (int64_t r = 0; r < R; ++r) {
    brute_topk(bv, bi, x.data() + r * n, n, k);
    for (int64_t j = 0; j < k; ++j) {
      INFO("row ", r, " rank ", j);
      REQUIRE(ix[(size_t)(r * k + j)] == bi[(size_t)j]);
      float got = v[(size_t)(r * k + j)], want = bv[(size_t)j];
      REQUIRE((got == want || (std::isnan(got) && std::isnan(want))));
    }
  }
}

}  // namespace

TEST_SUITE("kernels") {
  TEST_CASE("topk vs brute-force sort, distinct values, many (n, k)") {
    const int64_t R = 5;
    for (int64_t n : {1, 2, 3, 4, 7, 8, 9, 15, 16, 17, 31, 33, 64, 100, 257, 1024}) {
      auto x = distinct_rows(R, n, 1000 + (uint64_t)n);
      for (int64_t k : {1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 16, 40, 100}) {
        if (k > n) continue;
        CAPTURE(n);
        CAPTURE(k);
        check_topk_rows(x, R, n, k);
      }
      CAPTURE(n);
      check_topk_rows(x, R, n, n);  // k = n: a full descending sort
    }
  }

  TEST_CASE("topk ties: lower index first; NaN ranks first; -0 ties +0") {
    // Values from {0, 1, 2}: ties everywhere, on both paths (k <= 8 and k > 8).
    const int64_t R = 6;
    for (int64_t n : {5, 16, 40, 300}) {
      std::vector<float> x((size_t)(R * n));
      for (size_t i = 0; i < x.size(); ++i) x[i] = std::floor(3.f * philox_uniform(77, 0, i));
      for (int64_t k : {1, 2, 3, 5, 8, 9, 20}) {
        if (k > n) continue;
        CAPTURE(n);
        CAPTURE(k);
        check_topk_rows(x, R, n, k);
      }
    }
    // Short rows (n <= 64, the branch-free path) and long ones (n > 64, the two-pass path) from {-inf, -0, +0, 1,
    // 2}: ties at the k-th place, -inf to be taken (k past the finite scores), -0 tying +0, and rows ending inside
    // a block of 16 or exactly on one.
    for (int64_t n : {3, 16, 17, 33, 48, 63, 64, 65, 80, 100, 1024}) {
      std::vector<float> x((size_t)(R * n));
      const float pick[] = {-INFINITY, -0.f, 0.f, 1.f, 2.f};
      for (size_t i = 0; i < x.size(); ++i) x[i] = pick[(int)(5.f * philox_uniform(78, 0, i)) % 5];
      // Long rows also with few scores above the rest: the 2s are rare, so the k-th place falls among the 1s.
      if (n > 64)
        for (size_t i = 0; i < x.size(); ++i)
          if (x[i] == 2.f && philox_uniform(79, 0, i) < 0.9f) x[i] = 1.f;
      for (int64_t k : {1, 2, 3, 5, 8}) {
        if (k > n) continue;
        CAPTURE(n);
        CAPTURE(k);
        check_topk_rows(x, R, n, k);
      }
    }
    float v[2];
    int32_t i[2];
    const float row[] = {1.f, 3.f, 3.f, 2.f, 3.f};
    cpu::topk_forward(v, i, row, 1, 5, 2);
    CHECK(i[0] == 1);
    CHECK(i[1] == 2);
    const float flat[] = {0.5f, 0.5f, 0.5f};
    cpu::topk_forward(v, i, flat, 1, 3, 1);
    CHECK(i[0] == 0);
    const float zeros[] = {-0.f, 0.f};
    cpu::topk_forward(v, i, zeros, 1, 2, 1);
    CHECK(i[0] == 0);

    const float nan = std::numeric_limits<float>::quiet_NaN();
    std::vector<float> withnan = distinct_rows(4, 50, 5);
    withnan[7] = nan;          // row 0
    withnan[50 + 49] = nan;    // row 1, last column
    withnan[100 + 3] = nan;    // row 2: two NaNs
    withnan[100 + 30] = nan;
    for (int64_t k : {1, 2, 4, 10}) check_topk_rows(withnan, 4, 50, k);
    std::vector<float> longnan = distinct_rows(3, 300, 6);  // long rows: the NaN in a whole block, in the tail
    longnan[40] = nan;
    longnan[300 + 299] = nan;
    for (int64_t k : {1, 2, 4}) check_topk_rows(longnan, 3, 300, k);
    cpu::topk_forward(v, i, withnan.data() + 50, 1, 50, 1);
    CHECK(i[0] == 49);
    CHECK(std::isnan(v[0]));
  }

  TEST_CASE("topk backward scatters to the chosen columns") {
    const int64_t R = 3, n = 20, k = 4;
    auto x = distinct_rows(R, n, 9);
    std::vector<float> v((size_t)(R * k)), dv((size_t)(R * k)), dx((size_t)(R * n), 99.f);
    std::vector<int32_t> ix((size_t)(R * k));
    for (size_t j = 0; j < dv.size(); ++j) dv[j] = 1.f + (float)j;
    cpu::topk_forward(v.data(), ix.data(), x.data(), R, n, k);
    cpu::topk_backward(dx.data(), dv.data(), ix.data(), R, n, k);
    for (int64_t r = 0; r < R; ++r)
      for (int64_t c = 0; c < n; ++c) {
        float want = 0.f;
        for (int64_t j = 0; j < k; ++j)
          if (ix[(size_t)(r * k + j)] == c) want = dv[(size_t)(r * k + j)];
        REQUIRE(dx[(size_t)(r * n + c)] == want);
      }
  }

  TEST_CASE("index kernels: repeated indices add in order; bad index found") {
    // index_add over [O=2, D=3, I=5] from n=4 source slices with index {2, 0, 2, 2}.
    const int64_t O = 2, D = 3, I = 5, n = 4;
    const int32_t idx[] = {2, 0, 2, 2};
    std::vector<float> out((size_t)(O * D * I), 1.f), src((size_t)(O * n * I));
    for (size_t i = 0; i < src.size(); ++i) src[i] = (float)i;
    cpu::index_add(out.data(), src.data(), idx, O, D, n, I);
    for (int64_t o = 0; o < O; ++o)
      for (int64_t d = 0; d < D; ++d)
        for (int64_t i = 0; i < I; ++i) {
          float want = 1.f;
          for (int64_t j = 0; j < n; ++j)
            if (idx[j] == d) want += src[(size_t)((o * n + j) * I + i)];
          REQUIRE(out[(size_t)((o * D + d) * I + i)] == want);
        }
    const int32_t bad[] = {0, 2, 3, 1};
    CHECK(cpu::index_first_bad(bad, 4, 3) == 2);
    CHECK(cpu::index_first_bad(idx, 4, 3) == -1);
    const int32_t neg[] = {0, -1};
    CHECK(cpu::index_first_bad(neg, 2, 3) == 1);
  }

  TEST_CASE("index_add and scatter_add add repeated indices in source order, for any thread count") {
    // Many sources onto few outputs: a float sum in any other order would differ in the last bits.
    for (auto [O, I] : {std::pair<int64_t, int64_t>{1, 3000}, {700, 3}}) {
      const int64_t D = 3, n = 40;
      std::vector<int32_t> idx((size_t)n), sidx((size_t)(O * n * I));
      for (int64_t j = 0; j < n; ++j) idx[(size_t)j] = (int32_t)(philox_uniform(3, 0, (uint64_t)j) * D);
      for (size_t p = 0; p < sidx.size(); ++p) sidx[p] = (int32_t)(philox_uniform(4, 0, p) * D);
      std::vector<float> src((size_t)(O * n * I));
      for (size_t p = 0; p < src.size(); ++p) src[p] = 1e3f * (philox_uniform(5, 0, p) - 0.5f);
      std::vector<float> ref_ia((size_t)(O * D * I), 0.f), ref_sa = ref_ia;  // sequential, source order
      for (int64_t o = 0; o < O; ++o)
        for (int64_t j = 0; j < n; ++j)
          for (int64_t i = 0; i < I; ++i) {
            float s = src[(size_t)((o * n + j) * I + i)];
            ref_ia[(size_t)((o * D + idx[(size_t)j]) * I + i)] += s;
            ref_sa[(size_t)((o * D + sidx[(size_t)((o * n + j) * I + i)]) * I + i)] += s;
          }
#ifdef _OPENMP
      const int maxt = omp_get_max_threads();
#else
      const int maxt = 1;
#endif
      for (int threads : {1, 2}) {
#ifdef _OPENMP
        omp_set_num_threads(threads);
#endif
        std::vector<float> ia((size_t)(O * D * I), 0.f), sa = ia;
        cpu::index_add(ia.data(), src.data(), idx.data(), O, D, n, I);
        cpu::scatter_add(sa.data(), src.data(), sidx.data(), O, D, n, I);
        CAPTURE(threads);
        CHECK(ia == ref_ia);
        CHECK(sa == ref_sa);
      }
#ifdef _OPENMP
      omp_set_num_threads(maxt);
#endif
      (void)maxt;
    }
  }
}

namespace {

// The message of the cm::Error that f throws ("" if none: the CHECKs on it then fail).
template <class F>
std::string error_of(F f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}
bool has(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

Tensor ints(const std::vector<int32_t>& v, const Shape& s) { return Tensor::from_vector(v, s); }

// Row-major position of a multi-index, and the multi-index of a position.
int64_t pos_of(const Shape& s, const std::vector<int64_t>& ix) {
  int64_t p = 0;
  for (size_t d = 0; d < s.size(); ++d) p = p * s[d] + ix[d];
  return p;
}
std::vector<int64_t> index_of(const Shape& s, int64_t p) {
  std::vector<int64_t> ix(s.size());
  for (int64_t d = (int64_t)s.size() - 1; d >= 0; --d) {
    ix[(size_t)d] = p % s[(size_t)d];
    p /= s[(size_t)d];
  }
  return ix;
}

// Random i32 indices in [0, D) (with repeats).
Tensor random_index(const Shape& s, int64_t D, uint64_t seed) {
  std::vector<int32_t> v((size_t)shape_numel(s));
  for (size_t i = 0; i < v.size(); ++i) v[i] = (int32_t)std::min<int64_t>(D - 1, (int64_t)(philox_uniform(seed, 0, i) * D));
  return ints(v, s);
}

}  // namespace

TEST_SUITE("ops") {
  TEST_CASE("concat and split: values, gradients, i32, empty pieces, negative dims") {
    using test::param;
    Tensor a = param({3, 4, 5}, 1), b = param({3, 2, 5}, 2), e = param({3, 0, 5}, 3);
    Tensor c = concat({a, e, b}, -2);
    REQUIRE(c.shape() == Shape{3, 6, 5});
    std::vector<float> av = a.to_f32_vector(), bv = b.to_f32_vector(), ref;
    for (int64_t i = 0; i < 3; ++i) {
      ref.insert(ref.end(), av.begin() + i * 20, av.begin() + (i + 1) * 20);
      ref.insert(ref.end(), bv.begin() + i * 10, bv.begin() + (i + 1) * 10);
    }
    CHECK_CLOSE(c, ref, 0.f, 0.f);
    CHECK_GRAD([](const std::vector<Tensor>& x) { return concat(x, 1); }, {a, e, b});
    CHECK_GRAD([](const std::vector<Tensor>& x) { return concat(x, 0); },
               {test::param({2, 3}, 4), test::param({1, 3}, 5)});
    CHECK_GRAD([](const std::vector<Tensor>& x) { return concat(x, -1); },
               {test::param({2, 3}, 6), test::param({2, 1}, 7)});

    auto parts = split(c, {4, 0, 2}, 1);
    REQUIRE(parts.size() == 3);
    CHECK_CLOSE(parts[0], av, 0.f, 0.f);
    CHECK(parts[1].shape() == Shape{3, 0, 5});
    CHECK_CLOSE(parts[2], bv, 0.f, 0.f);
    // Pieces used out of order and one unused: each gets its own gradient slab, the unused one zeros.
    CHECK_GRAD(
        [](const std::vector<Tensor>& x) {
          auto p = split(x[0], {2, 3, 1, 1}, -1);
          return concat({p[2], p[0], p[1]}, -1);
        },
        {test::param({4, 7}, 8)});

    Tensor i = concat({ints({1, 2}, {1, 2}), ints({3, 4, 5, 6}, {2, 2})}, 0);
    CHECK(i.to_i32_vector() == std::vector<int32_t>{1, 2, 3, 4, 5, 6});
    auto ip = split(i, {2, 1}, 0);
    CHECK(ip[1].to_i32_vector() == std::vector<int32_t>{5, 6});

    std::string m = error_of([&] { concat({a, test::uniform({3, 4, 6}, 9)}, 1); });
    CHECK(has(m, "[3, 4, 5]"));
    CHECK(has(m, "[3, 4, 6]"));
    CHECK_THROWS_AS(concat({}, 0), Error);
    CHECK_THROWS_AS(concat({a, ints({1}, {1})}, 0), Error);
    CHECK_THROWS_AS(concat({a, b}, 3), Error);
    m = error_of([&] { split(c, {4, 1}, 1); });
    CHECK(has(m, "5"));
    CHECK(has(m, "[3, 6, 5]"));
    CHECK_THROWS_AS(split(c, {7, -1}, 1), Error);
  }

  TEST_CASE("index_select and index_add: values vs naive, repeated indices, gradients") {
    Tensor a = test::param({4, 5, 3}, 11);
    Tensor idx = ints({4, 0, 4, 2, 4}, {5});
    for (int64_t dim : {1, -2}) {
      Tensor y = index_select(a, dim, idx);
      REQUIRE(y.shape() == Shape{4, 5, 3});
      std::vector<float> av = a.to_f32_vector(), ref;
      std::vector<int32_t> iv = idx.to_i32_vector();
      for (int64_t o = 0; o < 4; ++o)
        for (int64_t j = 0; j < 5; ++j)
          for (int64_t i = 0; i < 3; ++i) ref.push_back(av[(size_t)pos_of({4, 5, 3}, {o, iv[(size_t)j], i})]);
      CHECK_CLOSE(y, ref, 0.f, 0.f);
    }
    for (int64_t dim : {0, 1, 2})
      CHECK_GRAD([dim](const std::vector<Tensor>& x) { return index_select(x[0], dim, ints({2, 0, 2, 2}, {4})); },
                 {a});
    CHECK(index_select(ints({7, 8, 9}, {3}), 0, ints({2, 2, 0}, {3})).to_i32_vector() ==
          std::vector<int32_t>{9, 9, 7});
    CHECK(index_select(a, 0, ints({}, {0})).shape() == Shape{0, 5, 3});

    // index_add: out = a; out[:, idx[j], :] += src[:, j, :], in double for the reference.
    Tensor base = test::param({3, 4, 6}, 12), src = test::param({3, 7, 6}, 13);
    Tensor ix = ints({3, 3, 0, 1, 3, 0, 3}, {7});
    Tensor y = index_add(base, -2, ix, src);
    std::vector<double> ref(base.numel());
    std::vector<float> bv = base.to_f32_vector(), sv = src.to_f32_vector();
    std::vector<int32_t> iv = ix.to_i32_vector();
    for (size_t p = 0; p < ref.size(); ++p) ref[p] = bv[p];
    for (int64_t o = 0; o < 3; ++o)
      for (int64_t j = 0; j < 7; ++j)
        for (int64_t i = 0; i < 6; ++i) ref[(size_t)pos_of({3, 4, 6}, {o, iv[(size_t)j], i})] += sv[(size_t)pos_of({3, 7, 6}, {o, j, i})];
    CHECK_CLOSE(y, std::vector<float>(ref.begin(), ref.end()), 1e-6f, 1e-6f);
    CHECK_GRAD([ix](const std::vector<Tensor>& x) { return index_add(x[0], 1, ix, x[1]); }, {base, src});
    CHECK_GRAD([](const std::vector<Tensor>& x) { return index_add(x[0], 0, ints({1, 1, 0}, {3}), x[1]); },
               {test::param({2, 5}, 14), test::param({3, 5}, 15)});

    std::string m = error_of([&] { index_select(a, 1, ints({0, 5}, {2})); });
    CHECK(has(m, "index 5"));
    CHECK(has(m, "[0, 5)"));
    m = error_of([&] { index_select(a, 0, ints({-1}, {1})); });
    CHECK(has(m, "index -1"));
    CHECK_THROWS_AS(index_select(a, 0, ints({0, 1}, {1, 2})), Error);  // not 1-D
    CHECK_THROWS_AS(index_select(a, 0, test::uniform({2}, 1)), Error);   // f32 index
    CHECK_THROWS_AS(index_select(a, 3, idx), Error);
    m = error_of([&] { index_add(base, 1, ix, test::uniform({3, 6, 6}, 16)); });
    CHECK(has(m, "[3, 6, 6]"));
    CHECK(has(m, "[3, 7, 6]"));
    m = error_of([&] { index_add(base, 1, ints({0, 9, 0, 0, 0, 0, 0}, {7}), src); });
    CHECK(has(m, "index 9"));
    CHECK(has(m, "[0, 4)"));
  }

  TEST_CASE("gather and scatter_add: values vs naive, repeated indices, gradients") {
    Tensor a = test::param({3, 6, 4}, 21);
    for (int64_t dim : {0, 1, 2, -1}) {
      const int64_t d = dim < 0 ? dim + 3 : dim;
      Shape is = a.shape();
      is[(size_t)d] = 5;  // more positions than some axes have: repeats are certain along dim 0 and 2
      Tensor ix = random_index(is, a.shape()[(size_t)d], 30 + (uint64_t)d);
      Tensor y = gather(a, dim, ix);
      REQUIRE(y.shape() == is);
      std::vector<float> av = a.to_f32_vector(), ref;
      std::vector<int32_t> iv = ix.to_i32_vector();
      for (int64_t p = 0; p < shape_numel(is); ++p) {
        auto m = index_of(is, p);
        m[(size_t)d] = iv[(size_t)p];
        ref.push_back(av[(size_t)pos_of(a.shape(), m)]);
      }
      CHECK_CLOSE(y, ref, 0.f, 0.f);
      CHECK_GRAD([=](const std::vector<Tensor>& x) { return gather(x[0], dim, ix); }, {a});

      // scatter_add into a fresh base with the same index: naive double reference.
      Tensor base = test::param(a.shape(), 40 + (uint64_t)d), src = test::param(is, 50 + (uint64_t)d);
      Tensor s = scatter_add(base, dim, ix, src);
      std::vector<float> bv = base.to_f32_vector(), sv = src.to_f32_vector();
      std::vector<double> sref(bv.begin(), bv.end());
      for (int64_t p = 0; p < shape_numel(is); ++p) {
        auto m = index_of(is, p);
        m[(size_t)d] = iv[(size_t)p];
        sref[(size_t)pos_of(a.shape(), m)] += sv[(size_t)p];
      }
      CHECK_CLOSE(s, std::vector<float>(sref.begin(), sref.end()), 1e-6f, 1e-6f);
      CHECK_GRAD([=](const std::vector<Tensor>& x) { return scatter_add(x[0], dim, ix, x[1]); }, {base, src});
    }
    // Router use: probabilities [T, N] gathered at the chosen experts [T, K]; i32 gather.
    Tensor probs = test::param({5, 8}, 60);
    Tensor chosen = random_index({5, 2}, 8, 61);
    CHECK(gather(probs, 1, chosen).shape() == Shape{5, 2});
    CHECK(gather(ints({1, 2, 3, 4}, {2, 2}), 1, ints({1, 1, 0, 1}, {2, 2})).to_i32_vector() ==
          std::vector<int32_t>{2, 2, 3, 4});

    std::string m = error_of([&] { gather(a, 1, ints({0, 6, 0}, {3, 1, 1})); });
    CHECK(has(m, "[3, 1, 1]"));  // shape mismatch outside dim 1 (a has 4 there)
    Tensor bad = random_index({3, 2, 4}, 6, 62);
    bad.i32()[5] = 6;
    m = error_of([&] { gather(a, 1, bad); });
    CHECK(has(m, "index 6"));
    CHECK(has(m, "[0, 6)"));
    CHECK_THROWS_AS(gather(a, 1, ints({0}, {1})), Error);  // rank differs
    m = error_of([&] { scatter_add(a, 1, random_index({3, 2, 4}, 6, 63), test::uniform({3, 3, 4}, 64)); });
    CHECK(has(m, "[3, 3, 4]"));
    CHECK_THROWS_AS(scatter_add(a, 1, bad, test::uniform({3, 2, 4}, 65)), Error);
  }

  TEST_CASE("topk: values and indices vs brute force, gradient to the chosen positions, errors") {
    // Distinct values 0.37 apart: the finite-difference step (0.01) cannot reorder them.
    const int64_t R = 6, n = 11;
    std::vector<float> xv = distinct_rows(R, n, 70);
    Tensor x = Tensor::from_vector(xv, {2, 3, n});
    x.requires_grad_(true);
    for (int64_t k : {0, 1, 3, 9, 11}) {
      auto [v, i] = topk(x, k);
      REQUIRE(v.shape() == Shape{2, 3, k});
      REQUIRE(i.dtype() == DType::I32);
      std::vector<float> bv, refv;
      std::vector<int32_t> bi, refi;
      for (int64_t r = 0; r < R; ++r) {
        brute_topk(bv, bi, xv.data() + r * n, n, k);
        refv.insert(refv.end(), bv.begin(), bv.end());
        refi.insert(refi.end(), bi.begin(), bi.end());
      }
      CHECK_CLOSE(v, refv, 0.f, 0.f);
      CHECK(i.to_i32_vector() == refi);
      if (k > 0)
        CHECK_GRAD([k](const std::vector<Tensor>& in) { return topk(in[0], k).first; }, {x});
    }
    // Ties: lower index first.
    auto [tv, ti] = topk(Tensor::from_vector(std::vector<float>{2, 5, 5, 1, 5}, {5}), 2);
    CHECK(ti.to_i32_vector() == std::vector<int32_t>{1, 2});
    // Routing width through the op: [T, N] with k = 2.
    auto [rv, ri] = topk(test::uniform({37, 64}, 71), 2);
    CHECK(ri.shape() == Shape{37, 2});

    std::string m = error_of([&] { topk(test::uniform({2, 3}, 72), 5); });
    CHECK(has(m, "k = 5"));
    CHECK(has(m, "n = 3"));
    CHECK_THROWS_AS(topk(test::uniform({2, 3}, 72), -1), Error);
    CHECK_THROWS_AS(topk(Tensor::scalar(1.f), 1), Error);
    CHECK_THROWS_AS(topk(ints({1, 2}, {2}), 1), Error);
  }

  TEST_CASE("where and masked_fill: broadcasting, gradients by mask, errors") {
    Tensor mask = ints({1, 0, 0, 1, 1}, {1, 5});
    Tensor a = test::param({3, 5}, 80), b = test::param({5}, 81), s = test::param({}, 82);
    Tensor y = where(mask, a, b);
    REQUIRE(y.shape() == Shape{3, 5});
    std::vector<float> av = a.to_f32_vector(), bv = b.to_f32_vector(), ref;
    std::vector<int32_t> mv = mask.to_i32_vector();
    for (int64_t r = 0; r < 3; ++r)
      for (int64_t c = 0; c < 5; ++c) ref.push_back(mv[(size_t)c] ? av[(size_t)(r * 5 + c)] : bv[(size_t)c]);
    CHECK_CLOSE(y, ref, 0.f, 0.f);
    CHECK_GRAD([mask](const std::vector<Tensor>& x) { return where(mask, x[0], x[1]); }, {a, b});
    CHECK_GRAD([mask](const std::vector<Tensor>& x) { return where(mask, x[0], x[1]); }, {a, s});
    // Same shapes everywhere (the vectorised path), mask broadcast over a leading dim.
    Tensor m3 = random_index({4, 3, 6}, 2, 83), a3 = test::param({4, 3, 6}, 84), b3 = test::param({4, 3, 6}, 85);
    CHECK_GRAD([m3](const std::vector<Tensor>& x) { return where(m3, x[0], x[1]); }, {a3, b3});
    Tensor m2 = random_index({3, 6}, 2, 86);
    Tensor y2 = where(m2, a3, b3);
    std::vector<float> a3v = a3.to_f32_vector(), b3v = b3.to_f32_vector(), ref2;
    std::vector<int32_t> m2v = m2.to_i32_vector();
    for (int64_t p = 0; p < 72; ++p) ref2.push_back(m2v[(size_t)(p % 18)] ? a3v[(size_t)p] : b3v[(size_t)p]);
    CHECK_CLOSE(y2, ref2, 0.f, 0.f);

    // masked_fill: the attention-mask use, [T, T] over [B, T, T].
    Tensor causal = ints({0, 1, 1, 0, 0, 1, 0, 0, 0}, {3, 3});
    Tensor sc = test::param({2, 3, 3}, 87);
    Tensor f = masked_fill(sc, causal, -1e9f);
    std::vector<float> scv = sc.to_f32_vector(), fref;
    std::vector<int32_t> cv = causal.to_i32_vector();
    for (int64_t p = 0; p < 18; ++p) fref.push_back(cv[(size_t)(p % 9)] ? -1e9f : scv[(size_t)p]);
    CHECK_CLOSE(f, fref, 0.f, 0.f);
    CHECK_GRAD([causal](const std::vector<Tensor>& x) { return masked_fill(x[0], causal, 3.f); }, {sc});

    std::string m = error_of([&] { where(ints({1, 0, 1, 0}, {4}), a, b); });
    CHECK(has(m, "[4]"));
    CHECK(has(m, "[3, 5]"));
    m = error_of([&] { masked_fill(a, ints({1, 0, 1, 0}, {4}), 0.f); });
    CHECK(has(m, "[4]"));
    CHECK(has(m, "[3, 5]"));
    CHECK_THROWS_AS(masked_fill(a, random_index({2, 3, 5}, 2, 88), 0.f), Error);  // mask would grow a
    CHECK_THROWS_AS(where(test::uniform({1, 5}, 89), a, b), Error);                // f32 mask
    CHECK_THROWS_AS(masked_fill(a, test::uniform({3, 5}, 90), 0.f), Error);
  }
}
