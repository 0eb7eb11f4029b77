// Matrix products: the raw SGEMM (cm::cpu::gemm, kernels suite) against a double-precision reference, and the
// differentiable matmul / linear ops (ops suite): values, finite-difference gradients, shape errors.
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "helpers.h"
#include "kernels/gemm.h"
#include "kernels/cpu/gemm_tile.h"

using namespace cm;
using cm::test::ThreadCount;
using cm::test::param;
using cm::test::uniform;

namespace {

// Deterministic values in [-1, 1).
std::vector<float> random_vec(int64_t n, uint64_t seed) {
  std::vector<float> v(n);
  uint64_t s = seed * 0x9E3779B97F4A7C15ull + 12345;
  for (float& x : v) {
    s ^= s << 13, s ^= s >> 7, s ^= s << 17;
    x = (float)((s >> 40) * (1.0 / (1ull << 24))) * 2.0f - 1.0f;
  }
  return v;
}

// One strided-batched problem with padded leading dimensions and its own reference.
struct GemmCase {
  int64_t M, N, K;
  bool ta, tb;
  float alpha, beta;
  int64_t batch;
  int64_t pad = 3;  // extra columns in every leading dimension: sub-matrix access
  GemmCase(int64_t M_, int64_t N_, int64_t K_, bool ta_, bool tb_, float alpha_, float beta_, int64_t batch_ = 1)
      : M(M_), N(N_), K(K_), ta(ta_), tb(tb_), alpha(alpha_), beta(beta_), batch(batch_) {}

  int64_t lda() const { return (ta ? M : K) + pad; }
  int64_t ldb() const { return (tb ? K : N) + pad; }
  int64_t ldc() const { return N + pad; }
  int64_t sa() const { return (ta ? K : M) * lda() + 5; }  // batch strides with gaps
  int64_t sb() const { return (tb ? N : K) * ldb() + 7; }
  int64_t sc() const { return M * ldc() + 2; }

  std::vector<float> A, B, C0;  // C0: C before the call
  void init(uint64_t seed) {
    A = random_vec(batch * sa(), seed);
    B = random_vec(batch * sb(), seed + 1);
    C0 = random_vec(batch * sc(), seed + 2);
    if (beta == 0.0f)  // beta == 0 must not read C: NaN would poison any read
      for (float& c : C0) c = std::numeric_limits<float>::quiet_NaN();
  }
  std::vector<float> run() const {
    std::vector<float> C = C0;
    cpu::gemm_strided_batched(C.data(), ldc(), sc(), A.data(), lda(), sa(), B.data(), ldb(), sb(), batch, M, N, K,
                              ta, tb, alpha, beta);
    return C;
  }
  // Every C element against sum_k in double; elements outside the [M, N] windows must be untouched.
  // Tolerance scales with the magnitude of the terms (sum |alpha a b| + |beta c|).
  std::string check(const std::vector<float>& C) const {
    std::vector<bool> inside(C.size(), false);
    for (int64_t b = 0; b < batch; ++b)
      for (int64_t i = 0; i < M; ++i)
        for (int64_t j = 0; j < N; ++j) {
          const int64_t ci = b * sc() + i * ldc() + j;
          inside[ci] = true;
          double ref = 0, mag = 0;
          for (int64_t k = 0; k < K; ++k) {
            const double a = A[b * sa() + (ta ? k * lda() + i : i * lda() + k)];
            const double bv = B[b * sb() + (tb ? j * ldb() + k : k * ldb() + j)];
            ref += a * bv, mag += std::fabs(a * bv);
          }
          ref *= alpha, mag *= std::fabs(alpha);
          if (beta != 0.0f) ref += (double)beta * C0[ci], mag += std::fabs((double)beta * C0[ci]);
          const double err = std::fabs(C[ci] - ref);
          if (!(err <= 1e-6 + 2e-6 * mag))
            return str("C[", b, "][", i, "][", j, "] = ", C[ci], " expected ", ref);
        }
    for (size_t i = 0; i < C.size(); ++i)
      if (!inside[i] && std::memcmp(&C[i], &C0[i], sizeof(float)) != 0)
        return str("wrote outside C at flat index ", i);
    return "";
  }
  std::string name() const {
    return str(M, "x", N, "x", K, (ta ? " T" : " N"), (tb ? "T" : "N"), " alpha ", alpha, " beta ", beta,
               " batch ", batch);
  }
};

// Naive double-precision product of logical matrices given as row-major vectors: [M, K] x [K, N].
std::vector<float> ref_matmul(const std::vector<float>& a, const std::vector<float>& b, int64_t M, int64_t N,
                              int64_t K) {
  std::vector<float> c(M * N);
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < N; ++j) {
      double s = 0;
      for (int64_t k = 0; k < K; ++k) s += (double)a[i * K + k] * b[k * N + j];
      c[i * N + j] = (float)s;
    }
  return c;
}

// The logical op(t) of the last two dims of a rank-2 or rank-3 tensor, as a vector per batch entry.
std::vector<float> op_values(const Tensor& t, bool trans) {
  Tensor v = trans ? t.transpose(-1, -2) : t;
  return v.to_f32_vector();
}

}  // namespace

TEST_SUITE("kernels") {

TEST_CASE("gemm: random shapes, all transposes, alpha/beta, padded leading dims") {
  // Sizes around the register tile (12 x 32), the K block (256) and 1s; K = 300, 600 cross K-block edges.
  const int64_t dims[][3] = {{1, 1, 1},    {1, 37, 5},    {29, 1, 17},  {7, 5, 1},     {12, 32, 16},
                             {13, 33, 17}, {11, 31, 300}, {25, 48, 64}, {40, 17, 600}, {3, 100, 45},
                             {100, 3, 45}, {64, 70, 257}, {150, 170, 90}};
  const float ab[][2] = {{1.0f, 0.0f}, {0.5f, 1.0f}, {-1.5f, 0.25f}};
  uint64_t seed = 1;
  for (const auto& d : dims)
    for (int t = 0; t < 4; ++t)
      for (const auto& p : ab) {
        GemmCase g{d[0], d[1], d[2], (t & 1) != 0, (t & 2) != 0, p[0], p[1]};
        g.init(seed++);
        const std::string err = g.check(g.run());
        CHECK_MESSAGE(err.empty(), g.name(), ": ", err);
      }
}

TEST_CASE("gemm: strided batches, and a stride of 0 shares one operand") {
  uint64_t seed = 100;
  for (int t = 0; t < 4; ++t) {
    GemmCase g{19, 45, 70, (t & 1) != 0, (t & 2) != 0, 1.0f, 0.5f, 5};
    g.init(seed++);
    const std::string err = g.check(g.run());
    CHECK_MESSAGE(err.empty(), g.name(), ": ", err);
  }
  // One B [K, N] for all batch entries equals the same call with B replicated.
  const int64_t batch = 4, M = 9, N = 20, K = 33;
  std::vector<float> A = random_vec(batch * M * K, 7), B = random_vec(K * N, 8), Brep;
  for (int64_t b = 0; b < batch; ++b) Brep.insert(Brep.end(), B.begin(), B.end());
  std::vector<float> C1(batch * M * N), C2(batch * M * N);
  cpu::gemm_strided_batched(C1.data(), N, M * N, A.data(), K, M * K, B.data(), N, 0, batch, M, N, K, false, false);
  cpu::gemm_strided_batched(C2.data(), N, M * N, A.data(), K, M * K, Brep.data(), N, K * N, batch, M, N, K, false,
                            false);
  CHECK(C1 == C2);
}

TEST_CASE("gemm: beta = 0 ignores NaN in C; K = 0 and alpha = 0 only scale C") {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const int64_t M = 5, N = 7, K = 3;
  std::vector<float> A = random_vec(M * K, 1), B = random_vec(K * N, 2);
  std::vector<float> C(M * N, nan);
  cpu::gemm(C.data(), N, A.data(), K, B.data(), N, M, N, K, false, false, 1.0f, 0.0f);
  for (float c : C) CHECK(std::isfinite(c));

  // K = 0: C = beta * C; beta = 0 clears NaN.
  std::vector<float> C0 = random_vec(M * N, 3), Ck = C0;
  cpu::gemm(Ck.data(), N, nullptr, 1, nullptr, N, M, N, 0, false, false, 1.0f, 2.0f);
  for (int64_t i = 0; i < M * N; ++i) CHECK(Ck[i] == 2.0f * C0[i]);
  std::vector<float> Cn(M * N, nan);
  cpu::gemm(Cn.data(), N, nullptr, 1, nullptr, N, M, N, 0, true, true, 1.0f, 0.0f);
  for (float c : Cn) CHECK(c == 0.0f);

  // alpha = 0: A and B are not read (NaN there must not leak into C).
  std::vector<float> An(M * K, nan), Ca = C0;
  cpu::gemm(Ca.data(), N, An.data(), K, B.data(), N, M, N, K, false, false, 0.0f, 1.0f);
  CHECK(Ca == C0);
}

TEST_CASE("gemm: bit-identical results for 1 and 2 threads") {
  // Big enough to take the parallel path (> 4 MFLOP), K over several K blocks, edges in every dimension.
  uint64_t seed = 200;
  for (int t = 0; t < 4; ++t)
    for (int64_t batch : {1, 3}) {
      GemmCase g{203, 301, 530, (t & 1) != 0, (t & 2) != 0, 0.75f, batch == 1 ? 0.0f : 1.0f, batch};
      g.init(seed++);
      std::vector<float> c1, c2;
      {
        ThreadCount one(1);
        c1 = g.run();
      }
      {
        ThreadCount two(2);
        c2 = g.run();
      }
      CHECK_MESSAGE(std::memcmp(c1.data(), c2.data(), c1.size() * sizeof(float)) == 0, g.name());
      if (t == 0) {
        const std::string err = g.check(c2);
        CHECK_MESSAGE(err.empty(), g.name(), ": ", err);
      }
    }
}

TEST_CASE("gemm_row: one row of cpu::gemm, bit for bit (K over several K blocks, ragged N)") {
  // The router's narrow products (kernels/cpu/route.cpp) take a row of A B without packing; its bits must be the
  // GEMM's for every K (one K block or several: the first block stored, later ones added) and N (full groups of 8
  // vectors, single vectors, a short last vector).
  for (int64_t K : {1, 4, 17, 385, 900})
    for (int64_t N : {1, 16, 20, 128, 131, 300}) {
      CAPTURE(K);
      CAPTURE(N);
      const int64_t M = 3, ldb = N + 5;
      const std::vector<float> A = random_vec(M * K, 7 + K), B = random_vec(K * ldb, 11 + N);
      std::vector<float> want((size_t)(M * N)), got((size_t)(M * N), NAN);
      cpu::gemm(want.data(), N, A.data(), K, B.data(), ldb, M, N, K, false, false);
      for (int64_t i = 0; i < M; ++i)
        cpu::gemm_detail::gemm_row(got.data() + i * N, A.data() + i * K, B.data(), ldb, N, K);
      CHECK(std::memcmp(want.data(), got.data(), want.size() * sizeof(float)) == 0);
    }
}

}  // TEST_SUITE("kernels")

TEST_SUITE("ops") {

TEST_CASE("matmul: 2-D values for all transposes") {
  for (int t = 0; t < 4; ++t) {
    const bool ta = t & 1, tb = t & 2;
    const int64_t M = 13, N = 35, K = 20;
    Tensor a = uniform(ta ? Shape{K, M} : Shape{M, K}, 1 + t), b = uniform(tb ? Shape{N, K} : Shape{K, N}, 9 + t);
    Tensor c = matmul(a, b, ta, tb);
    CHECK(c.shape() == Shape{M, N});
    CHECK_CLOSE(c, ref_matmul(op_values(a, ta), op_values(b, tb), M, N, K), 1e-5f, 1e-5f);
  }
  // size-1 dims and an empty inner dimension (the product is zeros)
  Tensor a = uniform({1, 7}, 3), b = uniform({7, 1}, 4);
  CHECK_CLOSE(matmul(a, b), ref_matmul(a.to_f32_vector(), b.to_f32_vector(), 1, 1, 7), 1e-5f, 1e-5f);
  Tensor z = matmul(Tensor::zeros({3, 0}), Tensor::zeros({0, 4}));
  CHECK(z.shape() == Shape{3, 4});
  CHECK_CLOSE(z, std::vector<float>(12, 0.0f), 0.0f, 0.0f);
}

TEST_CASE("matmul: batched 3-D and rank>=3 times 2-D values") {
  const int64_t B = 3, M = 6, N = 10, K = 17;
  for (int t = 0; t < 4; ++t) {
    const bool ta = t & 1, tb = t & 2;
    Tensor a = uniform(ta ? Shape{B, K, M} : Shape{B, M, K}, 20 + t);
    Tensor b = uniform(tb ? Shape{B, N, K} : Shape{B, K, N}, 30 + t);
    Tensor c = matmul(a, b, ta, tb);
    REQUIRE(c.shape() == Shape{B, M, N});
    std::vector<float> ref;
    for (int64_t i = 0; i < B; ++i) {
      auto r = ref_matmul(op_values(a.select(0, i), ta), op_values(b.select(0, i), tb), M, N, K);
      ref.insert(ref.end(), r.begin(), r.end());
    }
    CHECK_CLOSE(c, ref, 1e-5f, 1e-5f);

    // rank 4 a [2, B, .., ..] times a shared 2-D b
    Tensor a4 = uniform(ta ? Shape{2, B, K, M} : Shape{2, B, M, K}, 40 + t);
    Tensor b2 = uniform(tb ? Shape{N, K} : Shape{K, N}, 50 + t);
    Tensor c4 = matmul(a4, b2, ta, tb);
    REQUIRE(c4.shape() == Shape{2, B, M, N});
    Tensor a3 = a4.reshape({2 * B, a4.size(2), a4.size(3)});
    ref.clear();
    for (int64_t i = 0; i < 2 * B; ++i) {
      auto r = ref_matmul(op_values(a3.select(0, i), ta), op_values(b2, tb), M, N, K);
      ref.insert(ref.end(), r.begin(), r.end());
    }
    CHECK_CLOSE(c4, ref, 1e-5f, 1e-5f);
  }
}

TEST_CASE("matmul: gradients for every rank and transpose form") {
  for (int t = 0; t < 4; ++t) {
    const bool ta = t & 1, tb = t & 2;
    CAPTURE(ta);
    CAPTURE(tb);
    auto f = [ta, tb](const std::vector<Tensor>& v) { return matmul(v[0], v[1], ta, tb); };
    const int64_t M = 5, N = 4, K = 3;
    Tensor a2 = param(ta ? Shape{K, M} : Shape{M, K}, 60 + t), b2 = param(tb ? Shape{N, K} : Shape{K, N}, 70 + t);
    CHECK_GRAD(f, {a2, b2});
    Tensor a3 = param(ta ? Shape{2, K, M} : Shape{2, M, K}, 80 + t);
    Tensor b3 = param(tb ? Shape{2, N, K} : Shape{2, K, N}, 90 + t);
    CHECK_GRAD(f, {a3, b3});  // batched
    CHECK_GRAD(f, {a3, b2});  // rank 3 times 2-D
    Tensor a4 = param(ta ? Shape{2, 3, K, M} : Shape{2, 3, M, K}, 100 + t);
    CHECK_GRAD(f, {a4, b2});  // rank 4 times 2-D
    // only one side requiring grad
    Tensor bc = uniform(b2.shape(), 110 + t);
    CHECK_GRAD(f, {a2, bc});
  }
}

TEST_CASE("matmul: non-contiguous inputs") {
  Tensor a = param({6, 4}, 1), b = param({5, 6}, 2);
  // a^T [4, 6] as a view times b^T [6, 5] as a view
  Tensor c = matmul(a.transpose(0, 1), b.transpose(0, 1));
  CHECK_CLOSE(c, ref_matmul(op_values(a, true), op_values(b, true), 4, 5, 6), 1e-5f, 1e-5f);
  // gradients through a transposed view and a column slice: x^T [3, 7] times (y[:, 1:8] [2, 7])^T -> [3, 2]
  auto f = [](const std::vector<Tensor>& v) {
    return matmul(v[0].transpose(0, 1), v[1].slice(1, 1, 8), false, true);
  };
  Tensor x = param({7, 3}, 3), y = param({2, 8}, 4);
  CHECK_GRAD(f, {x, y});
}

TEST_CASE("linear: values and gradients, with and without bias") {
  const int64_t in = 11, out = 6;
  Tensor w = param({out, in}, 1), b = param({out}, 2);
  for (const Shape& xs : {Shape{in}, Shape{4, in}, Shape{2, 3, in}}) {
    Tensor x = param(xs, 3);
    Tensor y = linear(x, w, b);
    Shape ys = xs;
    ys.back() = out;
    REQUIRE(y.shape() == ys);
    const int64_t R = x.numel() / in;
    std::vector<float> ref = ref_matmul(x.to_f32_vector(), op_values(w, true), R, out, in);
    std::vector<float> bv = b.to_f32_vector();
    for (int64_t r = 0; r < R; ++r)
      for (int64_t j = 0; j < out; ++j) ref[r * out + j] += bv[j];
    CHECK_CLOSE(y, ref, 1e-5f, 1e-5f);
    auto fb = [](const std::vector<Tensor>& v) { return linear(v[0], v[1], v[2]); };
    CHECK_GRAD(fb, {x, w, b});
    auto fn = [](const std::vector<Tensor>& v) { return linear(v[0], v[1]); };
    CHECK_GRAD(fn, {x, w});
    CHECK_CLOSE(linear(x, w), ref_matmul(x.to_f32_vector(), op_values(w, true), R, out, in), 1e-5f, 1e-5f);
  }
}

TEST_CASE("matmul and linear: bad shapes are errors that name both shapes") {
  Tensor a = uniform({3, 4}, 1), b = uniform({5, 6}, 2);
  CHECK_THROWS_AS(matmul(a, b), Error);
  try {
    matmul(a, b);
    FAIL("no exception");
  } catch (const Error& e) {
    const std::string m = e.what();
    CHECK(m.find("[3, 4]") != std::string::npos);
    CHECK(m.find("[5, 6]") != std::string::npos);
  }
  CHECK_THROWS_AS(matmul(uniform({2, 3, 4}, 1), uniform({3, 4, 5}, 2)), Error);  // batch 2 vs 3
  CHECK_THROWS_AS(matmul(uniform({3, 4}, 1), uniform({2, 4, 5}, 2)), Error);     // 2-D times 3-D
  CHECK_THROWS_AS(matmul(uniform({4}, 1), uniform({4, 5}, 2)), Error);           // 1-D
  CHECK_THROWS_AS(matmul(a, uniform({3, 4}, 2), false, false), Error);           // [3,4] x [3,4]
  CHECK_NOTHROW(matmul(a, uniform({3, 4}, 2), true, false));                     // [4,3] x [3,4]
  CHECK_THROWS_AS(matmul(a, Tensor::zeros({4, 2}, DType::I32)), Error);
  CHECK_THROWS_AS(linear(uniform({2, 5}, 1), uniform({3, 4}, 2)), Error);
  CHECK_THROWS_AS(linear(uniform({2, 4}, 1), uniform({3, 4}, 2), uniform({4}, 3)), Error);
  CHECK_THROWS_AS(linear(uniform({2, 4}, 1), uniform({4}, 2)), Error);
}

}  // TEST_SUITE("ops")
