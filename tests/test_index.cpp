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
}
