// Neural-net kernels and ops: softmax, log-softmax, cross-entropy, embedding, layernorm, rmsnorm, dropout,
// AdamW (kernel only), causal attention. Raw kernels are checked against naive double-precision references
// (suite "kernels"); ops against the same references plus finite differences (suite "ops").
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "helpers.h"
#include "kernels/adamw.h"
#include "kernels/dropout.h"
#include "kernels/embedding.h"
#include "kernels/losses.h"
#include "kernels/norm.h"
#include "kernels/softmax.h"
#include "kernels/cpu/fastmath.h"

using namespace cm;
using cm::test::param;
using cm::test::uniform;

namespace {

std::vector<float> rand_vec(int64_t n, uint64_t seed, float lo = -1.f, float hi = 1.f) {
  std::vector<float> v((size_t)n);
  for (int64_t i = 0; i < n; ++i) v[(size_t)i] = lo + (hi - lo) * philox_uniform(seed, 0, (uint64_t)i);
  return v;
}

std::vector<int32_t> rand_ids(int64_t n, uint64_t seed, int32_t V) {
  std::vector<int32_t> v((size_t)n);
  for (int64_t i = 0; i < n; ++i) v[(size_t)i] = (int32_t)(philox_uniform(seed, 0, (uint64_t)i) * (float)V) % V;
  return v;
}

std::vector<float> to_float(const std::vector<double>& v) { return std::vector<float>(v.begin(), v.end()); }

// ---- naive references, double precision
std::vector<double> ref_softmax(const std::vector<float>& x, int64_t N, int64_t C, bool log) {
  std::vector<double> y(x.size());
  for (int64_t n = 0; n < N; ++n) {
    double m = -INFINITY, s = 0;
    for (int64_t c = 0; c < C; ++c) m = std::max(m, (double)x[n * C + c]);
    for (int64_t c = 0; c < C; ++c) s += std::exp((double)x[n * C + c] - m);
    for (int64_t c = 0; c < C; ++c) {
      double z = (double)x[n * C + c] - m;
      y[n * C + c] = log ? z - std::log(s) : std::exp(z) / s;
    }
  }
  return y;
}

struct NormRef {
  std::vector<double> y, dx, dw, db;
};
// rms = false: layernorm with bias; rms = true: rmsnorm. dy the output gradient.
NormRef ref_norm(const std::vector<float>& x, const std::vector<float>& w, const std::vector<float>& b,
                 const std::vector<float>& dy, int64_t N, int64_t C, double eps, bool rms) {
  NormRef r{std::vector<double>(N * C), std::vector<double>(N * C), std::vector<double>(C, 0.0),
            std::vector<double>(C, 0.0)};
  for (int64_t n = 0; n < N; ++n) {
    const float* xr = &x[n * C];
    double mean = 0, var = 0;
    if (!rms) {
      for (int64_t c = 0; c < C; ++c) mean += xr[c];
      mean /= C;
    }
    for (int64_t c = 0; c < C; ++c) var += (xr[c] - mean) * (xr[c] - mean);
    var /= C;
    double rstd = 1.0 / std::sqrt(var + eps);
    std::vector<double> xhat(C), g(C);
    double a = 0, bb = 0;
    for (int64_t c = 0; c < C; ++c) {
      xhat[c] = (xr[c] - mean) * rstd;
      r.y[n * C + c] = xhat[c] * w[c] + (rms ? 0.0 : b[c]);
      g[c] = (double)w[c] * dy[n * C + c];
      a += g[c];
      bb += g[c] * xhat[c];
      r.dw[c] += (double)dy[n * C + c] * xhat[c];
      r.db[c] += dy[n * C + c];
    }
    a /= C;
    bb /= C;
    for (int64_t c = 0; c < C; ++c) r.dx[n * C + c] = (g[c] - (rms ? 0.0 : a) - xhat[c] * bb) * rstd;
  }
  return r;
}

#ifdef _OPENMP
struct Threads {  // sets the OpenMP thread count for a scope
  int prev;
  explicit Threads(int n) : prev(omp_get_max_threads()) { omp_set_num_threads(n); }
  ~Threads() { omp_set_num_threads(prev); }
};
#else
struct Threads {
  explicit Threads(int) {}
};
#endif

bool all_finite(const std::vector<float>& v) {
  for (float x : v)
    if (!std::isfinite(x)) return false;
  return true;
}

}  // namespace

TEST_SUITE("kernels") {

TEST_CASE("fast_exp: within a few ulp of exp; -inf, underflow, overflow and NaN handled") {
  double worst = 0;
  for (int i = 0; i <= 200000; ++i) {
    float x = -87.0f + 175.0f * (float)i / 200000.0f;
    double ref = std::exp((double)x);
    worst = std::max(worst, std::fabs((double)cpu::fast_exp(x) - ref) / ref);
  }
  CHECK(worst < 5e-7);
  CHECK(cpu::fast_exp(0.0f) == 1.0f);
  CHECK(cpu::fast_exp(-INFINITY) == 0.0f);
  CHECK(cpu::fast_exp(-1e4f) == 0.0f);
  CHECK(cpu::fast_exp(100.0f) == INFINITY);
  CHECK(std::isnan(cpu::fast_exp(NAN)));
}

#if defined(__AVX512F__)
TEST_CASE("fast_exp16: fast_exp's bits on sixteen lanes, NaN payloads included") {
  // Every 509th bit pattern of the 2^32 (all signs, exponents, NaNs), then every float where 2^k is applied at
  // the edges: the results going denormal (x in [-104, -87]) and overflowing (x in [88, 89.5]).
  std::vector<float> x;
  for (uint64_t u = 7; u < (1ull << 32); u += 509) {
    const uint32_t b = (uint32_t)u;
    float f;
    std::memcpy(&f, &b, 4);
    x.push_back(f);
  }
  for (float f = -104.f; f <= -87.f; f = std::nextafter(f, INFINITY)) x.push_back(f);
  for (float f = 88.f; f <= 89.5f; f = std::nextafter(f, INFINITY)) x.push_back(f);
  while (x.size() % 16) x.push_back(0.f);
  int64_t differ = 0;
  for (size_t i = 0; i < x.size(); i += 16) {
    float got[16];
    _mm512_storeu_ps(got, cpu::fast_exp16(_mm512_loadu_ps(&x[i])));
    for (int l = 0; l < 16; ++l) {
      const float want = cpu::fast_exp(x[i + l]);
      if (std::memcmp(&got[l], &want, 4) != 0 && differ++ < 5) FAIL_CHECK("x = ", x[i + l], ": ", got[l], " != ", want);
    }
  }
  CHECK(differ == 0);
}
#endif

TEST_CASE("softmax / log_softmax forward and backward match double references") {
  const std::vector<std::pair<int64_t, int64_t>> shapes{{1, 1}, {1, 7}, {3, 17}, {64, 1}, {5, 1000}, {33, 4099}};
  for (auto [N, C] : shapes) {
    CAPTURE(N);
    CAPTURE(C);
    std::vector<float> x = rand_vec(N * C, 1 + N + C, -4.f, 4.f), dy = rand_vec(N * C, 7 + C);
    std::vector<float> y(N * C), ly(N * C), dx(N * C), ldx(N * C);
    cpu::softmax_forward(y.data(), x.data(), N, C);
    cpu::log_softmax_forward(ly.data(), x.data(), N, C);
    std::vector<double> ry = ref_softmax(x, N, C, false), rly = ref_softmax(x, N, C, true);
    CHECK(test::first_mismatch(y, to_float(ry), 1e-7f, 1e-5f) < 0);
    CHECK(test::first_mismatch(ly, to_float(rly), 1e-5f, 1e-5f) < 0);
    // References for backward, from the reference outputs.
    std::vector<double> rdx(N * C), rldx(N * C);
    for (int64_t n = 0; n < N; ++n) {
      double dot = 0, s = 0;
      for (int64_t c = 0; c < C; ++c) dot += dy[n * C + c] * ry[n * C + c], s += dy[n * C + c];
      for (int64_t c = 0; c < C; ++c) {
        rdx[n * C + c] = ry[n * C + c] * (dy[n * C + c] - dot);
        rldx[n * C + c] = dy[n * C + c] - ry[n * C + c] * s;
      }
    }
    cpu::softmax_backward(dx.data(), dy.data(), y.data(), N, C);
    cpu::log_softmax_backward(ldx.data(), dy.data(), ly.data(), N, C);
    CHECK(test::first_mismatch(dx, to_float(rdx), 1e-6f, 1e-4f) < 0);
    CHECK(test::first_mismatch(ldx, to_float(rldx), 1e-5f, 1e-4f) < 0);
  }
}

TEST_CASE("softmax of large and masked logits is finite and exact where it should be") {
  // Row 0: logits around 1e4 (a naive exp overflows). Row 1: -inf entries (masked) must get exactly 0.
  std::vector<float> x{1e4f, 1e4f - 1.f, -1e4f, 9999.5f, 3.f, -INFINITY, 1.f, -INFINITY};
  std::vector<float> y(8), ly(4);
  cpu::softmax_forward(y.data(), x.data(), 2, 4);
  cpu::log_softmax_forward(ly.data(), x.data(), 1, 4);
  CHECK(all_finite(y));
  CHECK(all_finite(ly));
  CHECK(test::first_mismatch(y, to_float(ref_softmax(x, 2, 4, false)), 1e-7f, 1e-5f) < 0);
  CHECK(y[5] == 0.0f);
  CHECK(y[7] == 0.0f);
  CHECK(y[2] == 0.0f);
  std::vector<float> lx(x.begin(), x.begin() + 4);
  CHECK(test::first_mismatch(ly, to_float(ref_softmax(lx, 1, 4, true)), 1e-5f, 1e-6f) < 0);
}

TEST_CASE("cross_entropy kernel: per-row loss, lse and gradient, ignored rows zero") {
  for (auto [N, V] : std::vector<std::pair<int64_t, int64_t>>{{1, 1}, {1, 5}, {7, 13}, {40, 1001}}) {
    CAPTURE(N);
    CAPTURE(V);
    std::vector<float> x = rand_vec(N * V, 11 + V, -5.f, 5.f);
    std::vector<int32_t> t = rand_ids(N, 3 + N, (int32_t)V);
    if (N > 1) t[1] = -100;  // one ignored row
    std::vector<float> losses(N), lse(N), dx(N * V);
    cpu::cross_entropy_forward(losses.data(), lse.data(), x.data(), t.data(), N, V, -100);
    const float scale = 0.37f;
    cpu::cross_entropy_backward(dx.data(), x.data(), lse.data(), t.data(), scale, N, V, -100);
    std::vector<double> lp = ref_softmax(x, N, V, true);
    std::vector<double> rl(N), rdx(N * V, 0.0);
    for (int64_t n = 0; n < N; ++n) {
      if (t[n] == -100) continue;
      rl[n] = -lp[n * V + t[n]];
      for (int64_t v = 0; v < V; ++v) rdx[n * V + v] = (std::exp(lp[n * V + v]) - (v == t[n])) * scale;
    }
    CHECK(test::first_mismatch(losses, to_float(rl), 1e-5f, 1e-5f) < 0);
    CHECK(test::first_mismatch(dx, to_float(rdx), 1e-7f, 1e-5f) < 0);
    if (N > 1) {
      CHECK(losses[1] == 0.0f);
      for (int64_t v = 0; v < V; ++v) CHECK(dx[V + v] == 0.0f);
    }
  }
}

TEST_CASE("layernorm / rmsnorm kernels match double references (bias and no bias)") {
  for (auto [N, C] : std::vector<std::pair<int64_t, int64_t>>{{1, 1}, {1, 9}, {17, 33}, {300, 97}, {5, 1030}}) {
    CAPTURE(N);
    CAPTURE(C);
    // A large mean (3) relative to the spread tests the two-pass variance.
    std::vector<float> x = rand_vec(N * C, 21 + C, 2.f, 4.f), w = rand_vec(C, 5, 0.5f, 1.5f),
                       b = rand_vec(C, 6), dy = rand_vec(N * C, 8 + N);
    const float eps = 1e-5f;
    NormRef ln = ref_norm(x, w, b, dy, N, C, eps, false), rms = ref_norm(x, w, b, dy, N, C, eps, true);
    std::vector<float> y(N * C), mean(N), rstd(N), dx(N * C), dw(C), db(C);
    cpu::layernorm_forward(y.data(), mean.data(), rstd.data(), x.data(), w.data(), b.data(), N, C, eps);
    CHECK(test::first_mismatch(y, to_float(ln.y), 1e-4f, 1e-4f) < 0);
    cpu::layernorm_backward(dx.data(), dw.data(), db.data(), dy.data(), x.data(), w.data(), mean.data(),
                            rstd.data(), N, C);
    // dx of a normalisation cancels (sums to ~0 per row), so its tolerance scales with rstd, large when C = 1.
    CHECK(test::first_mismatch(dx, to_float(ln.dx), 2e-3f, 1e-3f) < 0);
    CHECK(test::first_mismatch(dw, to_float(ln.dw), 1e-4f, 1e-4f) < 0);
    CHECK(test::first_mismatch(db, to_float(ln.db), 1e-4f, 1e-4f) < 0);
    // No bias: same y minus b.
    std::vector<float> y0(N * C), dw0(C);
    cpu::layernorm_forward(y0.data(), mean.data(), rstd.data(), x.data(), w.data(), nullptr, N, C, eps);
    std::vector<double> ynb(ln.y);
    for (int64_t i = 0; i < N * C; ++i) ynb[i] -= b[i % C];
    CHECK(test::first_mismatch(y0, to_float(ynb), 1e-4f, 1e-4f) < 0);
    cpu::layernorm_backward(dx.data(), dw0.data(), nullptr, dy.data(), x.data(), w.data(), mean.data(),
                            rstd.data(), N, C);
    CHECK(dw0 == dw);

    cpu::rmsnorm_forward(y.data(), rstd.data(), x.data(), w.data(), N, C, eps);
    CHECK(test::first_mismatch(y, to_float(rms.y), 1e-5f, 1e-5f) < 0);
    cpu::rmsnorm_backward(dx.data(), dw.data(), dy.data(), x.data(), w.data(), rstd.data(), N, C);
    CHECK(test::first_mismatch(dx, to_float(rms.dx), 1e-5f, 1e-4f) < 0);
    CHECK(test::first_mismatch(dw, to_float(rms.dw), 1e-4f, 1e-4f) < 0);
  }
}

TEST_CASE("layernorm / rmsnorm backward: bit-identical with 1 and 2 threads") {
  const int64_t N = 300, C = 97;  // above the parallel threshold; 19 row chunks
  std::vector<float> x = rand_vec(N * C, 31), w = rand_vec(C, 32), b = rand_vec(C, 33), dy = rand_vec(N * C, 34);
  std::vector<float> y(N * C), mean(N), rstd(N);
  cpu::layernorm_forward(y.data(), mean.data(), rstd.data(), x.data(), w.data(), b.data(), N, C, 1e-5f);
  std::vector<float> dx[2], dw[2], db[2], rdx[2], rdw[2];
  for (int k = 0; k < 2; ++k) {
    Threads th(k + 1);
    dx[k].resize(N * C), dw[k].resize(C), db[k].resize(C), rdx[k].resize(N * C), rdw[k].resize(C);
    cpu::layernorm_backward(dx[k].data(), dw[k].data(), db[k].data(), dy.data(), x.data(), w.data(), mean.data(),
                            rstd.data(), N, C);
    cpu::rmsnorm_backward(rdx[k].data(), rdw[k].data(), dy.data(), x.data(), w.data(), rstd.data(), N, C);
  }
  CHECK(dx[0] == dx[1]);
  CHECK(dw[0] == dw[1]);
  CHECK(db[0] == db[1]);
  CHECK(rdx[0] == rdx[1]);
  CHECK(rdw[0] == rdw[1]);
}

TEST_CASE("embedding kernels: gather rows, accumulate repeated ids, bit-identical with 1 and 2 threads") {
  const int64_t N = 2000, V = 50, C = 33;  // ~40 repeats per id
  std::vector<float> w = rand_vec(V * C, 41), dy = rand_vec(N * C, 42);
  std::vector<int32_t> ids = rand_ids(N, 43, (int32_t)V);
  std::vector<float> out(N * C);
  cpu::embedding_forward(out.data(), w.data(), ids.data(), N, V, C);
  bool same = true;
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c) same = same && out[n * C + c] == w[ids[n] * C + c];
  CHECK(same);
  std::vector<double> ref(V * C, 0.0);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c) ref[ids[n] * C + c] += dy[n * C + c];
  std::vector<float> dw[2];
  for (int k = 0; k < 2; ++k) {
    Threads th(k + 1);
    dw[k].assign(V * C, 0.5f);  // accumulates: the 0.5 must survive
    cpu::embedding_backward(dw[k].data(), dy.data(), ids.data(), N, V, C);
  }
  for (double& r : ref) r += 0.5;
  CHECK(test::first_mismatch(dw[0], to_float(ref), 1e-4f, 1e-5f) < 0);
  CHECK(dw[0] == dw[1]);
  // Same additions as the serial loop over n, in the same order: bit for bit.
  std::vector<float> serial(V * C, 0.5f);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c) serial[ids[n] * C + c] += dy[n * C + c];
  CHECK(dw[0] == serial);
}

TEST_CASE("dropout kernel: mask from philox_uniform, scale 1/(1-p), backward uses the same mask") {
  const int64_t n = 1003;  // not a multiple of 4: the last Philox block is partial
  const float p = 0.3f;
  const uint64_t seed = 99, offset = 12345;
  std::vector<float> x = rand_vec(n, 51), y(n), dx(n);
  cpu::dropout_forward(y.data(), x.data(), n, p, seed, offset);
  cpu::dropout_backward(dx.data(), x.data(), n, p, seed, offset);
  int64_t dropped = 0;
  bool match = true;
  for (int64_t i = 0; i < n; ++i) {
    bool keep = philox_uniform(seed, offset, (uint64_t)i) >= p;
    float want = keep ? x[i] * (1.0f / (1.0f - p)) : 0.0f;
    match = match && y[i] == want && dx[i] == want;
    dropped += !keep;
  }
  CHECK(match);
  CHECK(dropped > 0.2 * n);
  CHECK(dropped < 0.4 * n);
}

TEST_CASE("adamw kernel matches a naive double reference over several steps") {
  const int64_t n = 20001;  // above the parallel threshold, odd
  std::vector<float> p = rand_vec(n, 61), m(n, 0.f), v(n, 0.f);
  std::vector<double> rp(p.begin(), p.end()), rm(n, 0.0), rv(n, 0.0);
  const float lr = 1e-2f, b1 = 0.9f, b2 = 0.95f, eps = 1e-8f, wd = 0.1f;
  for (int64_t t = 1; t <= 5; ++t) {
    std::vector<float> g = rand_vec(n, 100 + t, -2.f, 2.f);
    cpu::adamw_step(p.data(), m.data(), v.data(), g.data(), n, lr, b1, b2, eps, wd, t);
    for (int64_t i = 0; i < n; ++i) {
      rp[i] -= (double)lr * wd * rp[i];
      rm[i] = b1 * rm[i] + (1.0 - b1) * g[i];
      rv[i] = b2 * rv[i] + (1.0 - b2) * (double)g[i] * g[i];
      double mh = rm[i] / (1.0 - std::pow((double)b1, (double)t)), vh = rv[i] / (1.0 - std::pow((double)b2, (double)t));
      rp[i] -= lr * mh / (std::sqrt(vh) + eps);
    }
  }
  CHECK(test::first_mismatch(p, to_float(rp), 1e-5f, 1e-5f) < 0);
  CHECK(test::first_mismatch(m, to_float(rm), 1e-6f, 1e-5f) < 0);
  CHECK(test::first_mismatch(v, to_float(rv), 1e-6f, 1e-5f) < 0);
  // Something moved: each step changes every parameter by about lr.
  CHECK(std::fabs(p[0] - rand_vec(1, 61)[0]) > 1e-3f);
}

}  // TEST_SUITE("kernels")

TEST_SUITE("ops") {

TEST_CASE("softmax / log_softmax ops: values on random shapes, gradients, non-contiguous input, empty") {
  for (Shape s : {Shape{7}, Shape{1, 1}, Shape{2, 3, 17}, Shape{4, 1}, Shape{3, 130}}) {
    CAPTURE(shape_str(s));
    Tensor x = uniform(s, 3, -3.f, 3.f);
    const int64_t C = s.back(), N = x.numel() / C;
    std::vector<float> xv = x.to_f32_vector();
    Tensor y = softmax(x), ly = log_softmax(x);
    CHECK(y.shape() == s);
    CHECK(ly.shape() == s);
    CHECK_CLOSE(y, to_float(ref_softmax(xv, N, C, false)), 1e-7f, 1e-5f);
    CHECK_CLOSE(ly, to_float(ref_softmax(xv, N, C, true)), 1e-5f, 1e-5f);
  }
  // A transposed view: the op must read it in logical order.
  Tensor base = uniform({5, 3}, 4, -2.f, 2.f);
  Tensor xt = base.transpose(0, 1);  // [3, 5], not contiguous
  Tensor xc = xt.contiguous();
  CHECK_CLOSE(softmax(xt), to_float(ref_softmax(xc.to_f32_vector(), 3, 5, false)), 1e-7f, 1e-5f);
  // Empty rows.
  CHECK(softmax(Tensor::zeros({0, 5})).shape() == Shape{0, 5});
  CHECK(log_softmax(Tensor::zeros({2, 0})).shape() == Shape{2, 0});

  Tensor a = param({3, 7}, 5, -2.f, 2.f);
  CHECK_GRAD([](const std::vector<Tensor>& in) { return softmax(in[0]); }, {a});
  CHECK_GRAD([](const std::vector<Tensor>& in) { return log_softmax(in[0]); }, {a});
  Tensor b = param({2, 2, 5}, 6, -2.f, 2.f);
  CHECK_GRAD([](const std::vector<Tensor>& in) { return softmax(in[0].transpose(1, 2)); }, {b});
}

TEST_CASE("softmax / log_softmax: large logits have no NaN; bad inputs throw") {
  Tensor x = Tensor::from_vector(std::vector<float>{1e4f, -1e4f, 1e4f - 2.f, 0.f, 3e4f, 3e4f}, {2, 3});
  std::vector<float> y = softmax(x).to_f32_vector(), ly = log_softmax(x).to_f32_vector();
  CHECK(all_finite(y));
  CHECK(all_finite(ly));
  CHECK_CLOSE(softmax(x), to_float(ref_softmax(x.to_f32_vector(), 2, 3, false)), 1e-7f, 1e-5f);
  CHECK_THROWS_AS(softmax(Tensor::scalar(1.f)), Error);
  CHECK_THROWS_AS(softmax(Tensor::zeros({2, 3}, DType::I32)), Error);
  CHECK_THROWS_AS(log_softmax(Tensor()), Error);
}

TEST_CASE("cross_entropy op: mean over non-ignored rows, gradient, all ignored, bad targets") {
  const int64_t N = 9, V = 13;
  Tensor logits = param({N, V}, 7, -3.f, 3.f);
  std::vector<int32_t> tv = rand_ids(N, 8, (int32_t)V);
  tv[2] = -100;
  tv[5] = -100;
  Tensor targets = Tensor::from_vector(tv, {N});
  Tensor loss = cross_entropy(logits, targets);
  CHECK(loss.dim() == 0);
  std::vector<double> lp = ref_softmax(logits.to_f32_vector(), N, V, true);
  double ref = 0;
  int valid = 0;
  for (int64_t n = 0; n < N; ++n)
    if (tv[n] != -100) ref -= lp[n * V + tv[n]], ++valid;
  CHECK(loss.item() == doctest::Approx(ref / valid).epsilon(1e-5));
  CHECK_GRAD([&](const std::vector<Tensor>& in) { return cross_entropy(in[0], targets); }, {logits});
  // A custom ignore_index, and rows = 1.
  Tensor one = param({1, 6}, 9, -2.f, 2.f);
  Tensor t1 = Tensor::from_vector(std::vector<int32_t>{4}, {1});
  CHECK(cross_entropy(one, t1, 4).item() == 0.0f);
  CHECK_GRAD([&](const std::vector<Tensor>& in) { return cross_entropy(in[0], t1, -1); }, {one});

  // All ignored: loss 0 and gradient 0, not NaN.
  Tensor x = param({3, 4}, 10);
  Tensor ign = Tensor::from_vector(std::vector<int32_t>{-100, -100, -100}, {3});
  Tensor l = cross_entropy(x, ign);
  CHECK(l.item() == 0.0f);
  l.backward();
  for (float g : x.grad().to_f32_vector()) CHECK(g == 0.0f);

  // Bad targets and shapes: the message names the target and V.
  Tensor bad = Tensor::from_vector(std::vector<int32_t>{0, 4, 1}, {3});
  CHECK_THROWS_WITH_AS(cross_entropy(x, bad), doctest::Contains("target 4 at row 1 is out of range for V = 4"),
                       Error);
  CHECK_THROWS_AS(cross_entropy(x, Tensor::from_vector(std::vector<int32_t>{0, -1, 1}, {3})), Error);
  CHECK_THROWS_AS(cross_entropy(x, Tensor::from_vector(std::vector<int32_t>{0, 1}, {2})), Error);
  CHECK_THROWS_AS(cross_entropy(x, Tensor::zeros({3})), Error);            // f32 targets
  CHECK_THROWS_AS(cross_entropy(x.reshape({12}), ign), Error);            // not [N, V]
}

TEST_CASE("router_z_loss op: weight * mean logsumexp^2 against a double reference, gradients, empty, bad shapes") {
  for (auto [R, E] : {std::pair<int64_t, int64_t>{7, 4}, {1, 1}, {33, 16}}) {
    CAPTURE(R);
    CAPTURE(E);
    Tensor x = param({R, E}, 40 + (uint64_t)R, -4.f, 4.f);
    const std::vector<float> xv = x.to_f32_vector();
    double ref = 0.0;
    for (int64_t r = 0; r < R; ++r) {
      double m = -INFINITY, s = 0.0;
      for (int64_t e = 0; e < E; ++e) m = std::max(m, (double)xv[r * E + e]);
      for (int64_t e = 0; e < E; ++e) s += std::exp((double)xv[r * E + e] - m);
      ref += (m + std::log(s)) * (m + std::log(s));
    }
    ref = 0.3 * ref / (double)R;
    Tensor z = router_z_loss(x, 0.3f);
    CHECK(z.dim() == 0);
    CHECK(z.item() == doctest::Approx(ref).epsilon(1e-5));
    CHECK_GRAD([&](const std::vector<Tensor>& in) { return router_z_loss(in[0], 0.3f); }, {x});
  }
  // No rows: 0 and an empty gradient.
  Tensor none = param({0, 5}, 50);
  Tensor z0 = router_z_loss(none, 1.f);
  CHECK(z0.item() == 0.f);
  z0.backward();
  CHECK(none.grad().numel() == 0);
  CHECK_THROWS_AS(router_z_loss(param({6}, 51), 1.f), Error);
  CHECK_THROWS_AS(router_z_loss(param({2, 0}, 52), 1.f), Error);
}

// Double-precision reference of the load-balance loss (kernels/losses.h): value and d loss / d probs.
static double balance_ref(const std::vector<float>& p, const std::vector<int32_t>& idx, const std::vector<int32_t>* grp,
                          const std::vector<float>* inv, int64_t R, int64_t E, int64_t K, int64_t G, double w,
                          std::vector<double>* dp) {
  std::vector<double> T((size_t)G, 0), S((size_t)(G * E), 0), cnt((size_t)(G * E), 0);
  for (int64_t r = 0; r < R; ++r) {
    const int64_t g = grp ? (*grp)[(size_t)r] : 0;
    if (g < 0 || g >= G) continue;
    T[(size_t)g] += 1;
    for (int64_t e = 0; e < E; ++e) S[(size_t)(g * E + e)] += p[(size_t)(r * E + e)];
    for (int64_t j = 0; j < K; ++j) {
      const int32_t e = idx[(size_t)(r * K + j)];
      if (e >= 0 && e < E) cnt[(size_t)(g * E + e)] += 1;
    }
  }
  double tall = 0, loss = 0;
  for (double t : T) tall += t;
  std::vector<double> coef((size_t)(G * E), 0);  // d loss / d probs[r, e] for a row of group g
  for (int64_t g = 0; g < G; ++g)
    for (int64_t e = 0; e < E; ++e) {
      const size_t i = (size_t)(g * E + e);
      if (T[(size_t)g] == 0 || tall == 0) continue;
      const double q = inv ? (*inv)[i] : (double)E, f = cnt[i] / (T[(size_t)g] * (double)K);
      loss += w * q * (T[(size_t)g] / tall) * f * S[i] / T[(size_t)g];
      coef[i] = w * q * f / tall;
    }
  if (dp) {
    dp->assign((size_t)(R * E), 0.0);
    for (int64_t r = 0; r < R; ++r) {
      const int64_t g = grp ? (*grp)[(size_t)r] : 0;
      if (g >= 0 && g < G)
        for (int64_t e = 0; e < E; ++e) (*dp)[(size_t)(r * E + e)] = coef[(size_t)(g * E + e)];
    }
  }
  return loss;
}

TEST_CASE("router_balance_loss op: double reference (flat, grouped, target shares, skipped rows and slots), "
          "gradients, balanced value, empty, bad shapes") {
  uint64_t seed = 70;
  for (int64_t R : {1, 9, 257})
    for (int64_t E : {2, 5, 64})
      for (int64_t K : {1, 2})
        for (int64_t G : {1, 3})
          for (int shares = 0; shares < 2; ++shares) {
            if (K > E) continue;
            CAPTURE(R);
            CAPTURE(E);
            CAPTURE(K);
            CAPTURE(G);
            CAPTURE(shares);
            // Softmax rows and their top-K; groups with a skipped row (-1) and an out-of-range one (G).
            Tensor logits = uniform({R, E}, ++seed, -2.f, 2.f);
            Tensor p = softmax(logits).detach();
            std::vector<int32_t> iv = topk(p, K).second.to_i32_vector(), gv((size_t)R);
            for (int64_t r = 0; r < R; ++r) gv[(size_t)r] = G == 1 ? 0 : (int32_t)(r % G);
            if (R > 5 && G > 1) gv[4] = -1, gv[5] = (int32_t)G;
            if (R > 3) iv[3] = -1;                 // a dropped slot is not counted
            if (R > 2) iv[2 * K - 1] = (int32_t)E;  // nor one outside [0, E)
            // The logit bias: log reliabilities, one excluded (pruned, -inf) child per group; the inverse target
            // shares it stands for, rsum / rho.
            std::vector<float> lb((size_t)(G * E)), inv((size_t)(G * E), 0.f);
            for (int64_t i = 0; i < G * E; ++i)
              lb[(size_t)i] = i % E == 1 ? -INFINITY : std::log(0.05f + 0.95f * philox_uniform(seed, 1, (uint64_t)i));
            for (int64_t g = 0; g < G; ++g) {
              double rsum = 0.0;
              for (int64_t e = 0; e < E; ++e) rsum += std::exp((double)lb[(size_t)(g * E + e)]);
              for (int64_t e = 0; e < E; ++e)
                if (lb[(size_t)(g * E + e)] > -INFINITY)
                  inv[(size_t)(g * E + e)] = (float)(rsum / std::exp((double)lb[(size_t)(g * E + e)]));
            }
            Tensor idx = Tensor::from_vector(iv, {R, K}), grp = Tensor::from_vector(gv, {R});
            Tensor q = shares ? Tensor::from_vector(lb, {G, E}) : Tensor();
            const std::vector<float> pv = p.to_f32_vector();
            std::vector<double> dref;
            const double ref = balance_ref(pv, iv, G == 1 ? nullptr : &gv, shares ? &inv : nullptr, R, E, K, G,
                                           0.02, &dref);
            Tensor x = p.detach();
            x.requires_grad_();
            Tensor l = router_balance_loss(x, idx, G == 1 ? Tensor() : grp, G, q, 0.02f);
            CHECK(l.dim() == 0);
            CHECK(std::fabs(l.item() - ref) <= 1e-9 + 1e-6 * std::fabs(ref));
            l.backward(Tensor::scalar(1.5f));
            const std::vector<float> gx = x.grad().to_f32_vector();
            for (int64_t i = 0; i < R * E; ++i)
              REQUIRE(std::fabs(gx[(size_t)i] - 1.5 * dref[(size_t)i]) <= 1e-10 + 1e-6 * std::fabs(1.5 * dref[(size_t)i]));
            if (R <= 9)
              CHECK_GRAD([&](const std::vector<Tensor>& in) {
                return router_balance_loss(in[0], idx, G == 1 ? Tensor() : grp, G, q, 0.02f);
              }, {param({R, E}, seed, 0.f, 1.f)});
          }
  // Balanced flat usage (uniform probabilities, round-robin choice) gives exactly the weight, the Switch floor;
  // the same with equal reliabilities (every target share 1/E), and an all-zero bias is no bias at all.
  const int64_t R = 64, E = 8;
  std::vector<int32_t> rr((size_t)R);
  for (int64_t r = 0; r < R; ++r) rr[(size_t)r] = (int32_t)(r % E);
  Tensor uni = Tensor::full({R, E}, 1.f / E), rrt = Tensor::from_vector(rr, {R, 1});
  CHECK(router_balance_loss(uni, rrt, Tensor(), 1, Tensor(), 0.5f).item() == doctest::Approx(0.5).epsilon(1e-6));
  CHECK(router_balance_loss(uni, rrt, Tensor(), 1, Tensor::full({1, E}, std::log(0.5f)), 0.5f).item() ==
        doctest::Approx(0.5).epsilon(1e-6));
  CHECK(router_balance_loss(uni, rrt, Tensor(), 1, Tensor::zeros({E}), 0.5f).item() ==
        router_balance_loss(uni, rrt, Tensor(), 1, Tensor(), 0.5f).item());
  // All traffic on one child with all its probability: E times the weight.
  Tensor one = Tensor::zeros({R, E});
  for (int64_t r = 0; r < R; ++r) one.f32()[r * E] = 1.f;
  CHECK(router_balance_loss(one, Tensor::zeros({R, 1}, DType::I32), Tensor(), 1, Tensor(), 0.5f).item() ==
        doctest::Approx(0.5 * E).epsilon(1e-6));
  // No rows, or every row skipped: 0, never NaN, and a zero gradient.
  Tensor none = param({0, 4}, 80);
  Tensor z0 = router_balance_loss(none, Tensor::zeros({0, 1}, DType::I32), Tensor(), 1, Tensor(), 1.f);
  CHECK(z0.item() == 0.f);
  z0.backward();
  CHECK(none.grad().numel() == 0);
  Tensor some = param({3, 4}, 81);
  Tensor skipped = router_balance_loss(some, Tensor::zeros({3, 1}, DType::I32),
                                       Tensor::from_vector(std::vector<int32_t>{-1, -1, -1}, {3}), 2, Tensor(), 1.f);
  CHECK(skipped.item() == 0.f);
  skipped.backward();
  for (float g : some.grad().to_f32_vector()) CHECK(g == 0.f);
  // Bad shapes and dtypes are refused by name.
  Tensor i31 = Tensor::zeros({3, 1}, DType::I32);
  CHECK_THROWS_WITH_AS(router_balance_loss(some, Tensor::zeros({2, 1}, DType::I32), Tensor(), 1, Tensor(), 1.f),
                       doctest::Contains("indices must be [3, K]"), Error);
  CHECK_THROWS_AS(router_balance_loss(some, Tensor::zeros({3, 1}), Tensor(), 1, Tensor(), 1.f), Error);  // f32
  CHECK_THROWS_AS(router_balance_loss(some.view({12}), i31, Tensor(), 1, Tensor(), 1.f), Error);
  CHECK_THROWS_WITH_AS(router_balance_loss(some, i31, Tensor(), 2, Tensor(), 1.f),
                       doctest::Contains("groups need a group tensor"), Error);
  CHECK_THROWS_AS(router_balance_loss(some, i31, Tensor::zeros({2}, DType::I32), 2, Tensor(), 1.f), Error);
  CHECK_THROWS_WITH_AS(router_balance_loss(some, i31, Tensor(), 1, Tensor::ones({1, 3}), 1.f),
                       doctest::Contains("log_bias must be [1, 4] or [4]"), Error);
  CHECK_THROWS_AS(router_balance_loss(some, i31, Tensor(), 0, Tensor(), 1.f), Error);
}

// The load balance as the router computed it before the kernel took the logit bias (model/router.cpp built the
// inverse shares on the host, only when some bias entry was nonzero, and kernels/cpu/losses.cpp took them or
// nullptr): that arithmetic, kept here verbatim, for a bit-for-bit comparison. Returns the loss; dp [R, E] the
// gradient for an upstream gradient gup.
static float former_balance(const std::vector<float>& probs, const std::vector<int32_t>& indices,
                            const std::vector<int32_t>* group, const std::vector<float>* lbias, int64_t R, int64_t E,
                            int64_t K, int64_t G, float weight, float gup, std::vector<float>* dp) {
  std::vector<float> inv;  // balance_term's host-made 1 / q
  if (lbias && std::any_of(lbias->begin(), lbias->end(), [](float v) { return v != 0.f; })) {
    inv.assign((size_t)(G * E), 0.f);
    std::vector<double> rho((size_t)E);
    for (int64_t j = 0; j < G; ++j) {
      double rsum = 0.0;
      for (int64_t c = 0; c < E; ++c) {
        rho[c] = std::exp((double)(*lbias)[j * E + c]);
        rsum += rho[c];
      }
      for (int64_t c = 0; c < E; ++c)
        if (rho[c] > 0.0) inv[j * E + c] = (float)(rsum / rho[c]);
    }
  }
  const float* inv_share = inv.empty() ? nullptr : inv.data();
  std::vector<double> S((size_t)(G * E), 0.0);
  std::vector<int64_t> cnt((size_t)(G * E), 0), T((size_t)G, 0);
  for (int64_t r = 0; r < R; ++r) {
    const int64_t g = group ? (*group)[r] : 0;
    if (g < 0 || g >= G) continue;
    ++T[(size_t)g];
    for (int64_t j = 0; j < K; ++j) {
      const int32_t e = indices[r * K + j];
      if (e >= 0 && e < E) ++cnt[(size_t)(g * E + e)];
    }
    for (int64_t e = 0; e < E; ++e) S[(size_t)(g * E + e)] += (double)probs[r * E + e];
  }
  std::vector<float> frac((size_t)(G * E)), tokens((size_t)G);
  double acc = 0.0, tall = 0.0;
  for (int64_t g = 0; g < G; ++g) {
    const int64_t t = T[(size_t)g];
    tokens[g] = (float)t;
    tall += (double)t;
    for (int64_t e = 0; e < E; ++e) {
      const int64_t i = g * E + e;
      const float f = t > 0 ? (float)cnt[(size_t)i] / (float)(t * K) : 0.f;
      const float p = t > 0 ? (float)(S[(size_t)i] / (double)t) : 0.f;
      frac[i] = f;
      acc += (double)t * (double)f * (double)p * (inv_share ? (double)inv_share[i] : 1.0);
    }
  }
  const float loss = tall > 0 ? (float)((double)weight * (inv_share ? 1.0 : (double)E) * acc / tall) : 0.f;
  double tall2 = 0.0;
  for (int64_t g = 0; g < G; ++g) tall2 += (double)tokens[g];
  const float k = tall2 > 0 ? (float)((double)gup * (double)weight * (inv_share ? 1.0 : (double)E) / tall2) : 0.f;
  dp->assign((size_t)(R * E), 0.f);
  for (int64_t r = 0; r < R; ++r) {
    const int64_t g = group ? (*group)[r] : 0;
    if (g < 0 || g >= G) continue;
    for (int64_t e = 0; e < E; ++e)
      (*dp)[r * E + e] = inv_share ? (k * inv_share[g * E + e]) * frac[g * E + e] : k * frac[g * E + e];
  }
  return loss;
}

TEST_CASE("router_balance_loss with a logit bias: the bits of the former host-made target shares, value and "
          "gradient; an all-zero bias is no bias") {
  // The kernel now decides on the bias itself (some entry nonzero: target shares rsum / rho; all zero: the 1/E
  // arithmetic). Against the former path on random routings: no bias, all zeros, reliabilities, and reliabilities
  // with a pruned child per group.
  uint64_t seed = 5000;
  for (int64_t R : {7, 300})
    for (int64_t E : {2, 3, 6, 7, 64})
      for (int64_t G : {1, 4})
        for (int bias = 0; bias < 4; ++bias) {
          const int64_t K = E > 2 ? 2 : 1;
          CAPTURE(R);
          CAPTURE(E);
          CAPTURE(G);
          CAPTURE(bias);
          Tensor p = softmax(uniform({R, E}, ++seed, -2.f, 2.f)).detach();
          const std::vector<int32_t> iv = topk(p, K).second.to_i32_vector();
          std::vector<int32_t> gv((size_t)R);
          for (int64_t r = 0; r < R; ++r) gv[(size_t)r] = (int32_t)(r * 7 % G);
          std::vector<float> lb((size_t)(G * E), 0.f);
          for (int64_t i = 0; bias >= 2 && i < G * E; ++i)
            lb[(size_t)i] = philox_uniform(seed, 2, (uint64_t)i) < 0.3f
                                ? 0.f
                                : std::log(0.05f + 0.95f * philox_uniform(seed, 3, (uint64_t)i));
          if (bias == 3)
            for (int64_t g = 0; g < G; ++g) lb[(size_t)(g * E + 1)] = -INFINITY;
          // Weights and upstream gradients drawn per case: the 1/E path and the shares path round k differently
          // for about a quarter of them (k = w E / T_all in double vs (float)(w / T_all) * E), so a wrong
          // decision shows in the gradient's bits.
          const float w = 0.01f + 0.05f * philox_uniform(seed, 4, 0), gup = 0.5f + 2.f * philox_uniform(seed, 4, 1);
          std::vector<float> dref;
          const float ref = former_balance(p.to_f32_vector(), iv, G == 1 ? nullptr : &gv, bias ? &lb : nullptr, R, E, K,
                                           G, w, gup, &dref);
          Tensor x = p.detach();
          x.requires_grad_();
          const Tensor grp = G == 1 ? Tensor() : Tensor::from_vector(gv, {R});
          Tensor l = router_balance_loss(x, Tensor::from_vector(iv, {R, K}), grp, G,
                                         bias ? Tensor::from_vector(lb, {G * E}) : Tensor(), w);
          const float got = l.item();
          CHECK(std::memcmp(&got, &ref, 4) == 0);
          l.backward(Tensor::scalar(gup));
          const std::vector<float> gx = x.grad().to_f32_vector();
          CHECK(std::memcmp(gx.data(), dref.data(), gx.size() * 4) == 0);
        }
  // The kernel's backward with an all-zero bias against no bias, over many upstream gradients: the shares path
  // would round k = dloss w / T_all before multiplying by E = rsum / rho, the 1/E path after, which differs for
  // some of them (E = 6 is not a power of 2).
  const int64_t R = 9, E = 6;
  std::vector<float> frac((size_t)E), tokens = {(float)R}, zeros((size_t)E, 0.f), d0((size_t)(R * E)),
      d1((size_t)(R * E));
  for (int64_t e = 0; e < E; ++e) frac[(size_t)e] = (float)(e + 1) / (float)(R * 2);
  int differ_from_shares = 0;
  for (int i = 0; i < 200; ++i) {
    const float dl = 0.5f + 0.0137f * (float)i, w = 0.01f + 0.00031f * (float)i;
    cpu::load_balance_backward(d0.data(), &dl, frac.data(), tokens.data(), nullptr, nullptr, R, E, 1, w);
    cpu::load_balance_backward(d1.data(), &dl, frac.data(), tokens.data(), nullptr, zeros.data(), R, E, 1, w);
    REQUIRE(d0 == d1);
    const float k = (float)((double)dl * (double)w / (double)R);  // what the shares path would use
    differ_from_shares += (k * (float)E) * frac[1] != d0[1];
  }
  CHECK(differ_from_shares > 0);  // the comparison above can tell the two paths apart
}

TEST_CASE("embedding op: rows gathered for any id shape, repeated ids accumulate, bad ids throw") {
  const int64_t V = 11, C = 5;
  Tensor w = param({V, C}, 12);
  std::vector<int32_t> iv{3, 0, 3, 10, 3, 7};  // id 3 three times
  Tensor ids = Tensor::from_vector(iv, {2, 3});
  Tensor y = embedding(w, ids);
  CHECK(y.shape() == Shape{2, 3, C});
  std::vector<float> wv = w.to_f32_vector(), ref;
  for (int32_t id : iv)
    for (int64_t c = 0; c < C; ++c) ref.push_back(wv[id * C + c]);
  CHECK_CLOSE(y, ref, 0.f, 0.f);
  CHECK_GRAD([&](const std::vector<Tensor>& in) { return embedding(in[0], ids); }, {w});
  // Gradient of sum: row 3 gets 3, unused rows 0.
  w.zero_grad();
  embedding(w, ids).backward(Tensor::ones({2, 3, C}));
  std::vector<float> g = w.grad().to_f32_vector();
  CHECK(g[3 * C] == 3.0f);
  CHECK(g[10 * C + 1] == 1.0f);
  CHECK(g[1 * C] == 0.0f);

  CHECK_THROWS_WITH_AS(embedding(w, Tensor::from_vector(std::vector<int32_t>{1, 11}, {2})),
                       doctest::Contains("id 11 at position 1 is out of range for V = 11"), Error);
  CHECK_THROWS_AS(embedding(w, Tensor::from_vector(std::vector<int32_t>{-1}, {1})), Error);
  CHECK_THROWS_AS(embedding(w, Tensor::zeros({2})), Error);  // f32 ids
  CHECK_THROWS_AS(embedding(w.reshape({V * C}), ids), Error);
}

TEST_CASE("layernorm / rmsnorm ops: values, gradients with and without bias, bad shapes throw") {
  const Shape s{2, 3, 13};
  const int64_t C = 13, N = 6;
  Tensor x = param(s, 13, -2.f, 2.f), w = param({C}, 14, 0.5f, 1.5f), b = param({C}, 15);
  std::vector<float> dy((size_t)(N * C), 0.f);
  NormRef ln = ref_norm(x.to_f32_vector(), w.to_f32_vector(), b.to_f32_vector(), dy, N, C, 1e-5, false);
  NormRef rms = ref_norm(x.to_f32_vector(), w.to_f32_vector(), b.to_f32_vector(), dy, N, C, 1e-6, true);
  CHECK(layernorm(x, w, b).shape() == s);
  CHECK_CLOSE(layernorm(x, w, b), to_float(ln.y), 1e-5f, 1e-5f);
  CHECK_CLOSE(rmsnorm(x, w), to_float(rms.y), 1e-5f, 1e-5f);
  CHECK_GRAD([](const std::vector<Tensor>& in) { return layernorm(in[0], in[1], in[2]); }, {x, w, b});
  CHECK_GRAD([](const std::vector<Tensor>& in) { return layernorm(in[0], in[1], Tensor()); }, {x, w});
  CHECK_GRAD([](const std::vector<Tensor>& in) { return rmsnorm(in[0], in[1]); }, {x, w});
  // One row of one channel: layernorm's output is the bias, its input gradient 0.
  Tensor x1 = param({1, 1}, 16);
  CHECK_CLOSE(layernorm(x1, w.slice(0, 0, 1).detach(), b.slice(0, 0, 1).detach()), b.slice(0, 0, 1).to_f32_vector(),
              1e-6f, 0.f);

  CHECK_THROWS_AS(layernorm(x, Tensor::ones({C + 1}), b), Error);
  CHECK_THROWS_AS(layernorm(x, w, Tensor::ones({2, C})), Error);
  CHECK_THROWS_AS(rmsnorm(x, Tensor::ones({C, 1})), Error);
  CHECK_THROWS_AS(rmsnorm(Tensor::scalar(1.f), Tensor::ones({1})), Error);
}

TEST_CASE("dropout op: fixed seed gives a reproducible mask, gradient through it, identity, bad p") {
  Tensor x = param({4, 37}, 17);
  const float p = 0.25f;
  Generator gen(1234, 10);
  Tensor y = dropout(x, p, true, gen);
  CHECK(gen.offset > 10);  // the draw consumed counters
  std::vector<float> xv = x.to_f32_vector(), yv = y.to_f32_vector();
  bool match = true;
  int dropped = 0;
  for (size_t i = 0; i < xv.size(); ++i) {
    bool keep = philox_uniform(1234, 10, i) >= p;
    match = match && yv[i] == (keep ? xv[i] * (1.0f / (1.0f - p)) : 0.0f);
    dropped += !keep;
  }
  CHECK(match);
  CHECK(dropped > 0);
  // A second draw from the same generator uses a different mask.
  Tensor y2 = dropout(x, p, true, gen);
  CHECK(y2.to_f32_vector() != yv);
  // Each evaluation makes a fresh generator at the same position: the same mask for every finite difference.
  CHECK_GRAD(
      [&](const std::vector<Tensor>& in) {
        Generator g(1234, 10);
        return dropout(in[0], p, true, g);
      },
      {x});
  // Identity: not training, or p = 0. Nothing drawn.
  Generator g2(5);
  CHECK(dropout(x, p, false, g2).same(x));
  CHECK(dropout(x, 0.f, true, g2).same(x));
  CHECK(g2.offset == 0);
  CHECK_THROWS_AS(dropout(x, 1.0f, true, g2), Error);
  CHECK_THROWS_AS(dropout(x, -0.1f, true, g2), Error);
  CHECK_THROWS_AS(dropout(x, NAN, false, g2), Error);
}

TEST_CASE("embedding / layernorm ops: backward bit-identical with 1 and 2 threads") {
  Tensor w = param({40, 64}, 18);
  Tensor ids = Tensor::from_vector(rand_ids(700, 19, 40), {7, 100});
  Tensor x = param({300, 97}, 20), lw = param({97}, 21), lb = param({97}, 22);
  std::vector<float> gw[2], gx[2], glw[2], glb[2];
  for (int k = 0; k < 2; ++k) {
    Threads th(k + 1);
    for (const Tensor& t : {w, x, lw, lb}) t.zero_grad();
    embedding(w, ids).backward(uniform({7, 100, 64}, 23));
    layernorm(x, lw, lb).backward(uniform({300, 97}, 24));
    gw[k] = w.grad().to_f32_vector();
    gx[k] = x.grad().to_f32_vector();
    glw[k] = lw.grad().to_f32_vector();
    glb[k] = lb.grad().to_f32_vector();
  }
  CHECK(gw[0] == gw[1]);
  CHECK(gx[0] == gx[1]);
  CHECK(glw[0] == glw[1]);
  CHECK(glb[0] == glb[1]);
}

TEST_CASE("causal_attention: matches a double reference, gradients, bad shapes throw") {
  const int64_t B = 2, H = 3, T = 5, D = 4;
  Tensor q = param({B, H, T, D}, 25), k = param({B, H, T, D}, 26), v = param({B, H, T, D}, 27);
  Tensor y = causal_attention(q, k, v);
  CHECK(y.shape() == Shape{B, H, T, D});
  std::vector<float> qv = q.to_f32_vector(), kv = k.to_f32_vector(), vv = v.to_f32_vector();
  std::vector<double> ref((size_t)(B * H * T * D), 0.0);
  for (int64_t bh = 0; bh < B * H; ++bh) {
    const int64_t o = bh * T * D;
    for (int64_t i = 0; i < T; ++i) {
      std::vector<double> s((size_t)(i + 1));
      double m = -INFINITY, z = 0;
      for (int64_t j = 0; j <= i; ++j) {
        for (int64_t d = 0; d < D; ++d) s[j] += (double)qv[o + i * D + d] * kv[o + j * D + d];
        s[j] /= std::sqrt((double)D);
        m = std::max(m, s[j]);
      }
      for (int64_t j = 0; j <= i; ++j) z += std::exp(s[j] - m);
      for (int64_t j = 0; j <= i; ++j)
        for (int64_t d = 0; d < D; ++d) ref[o + i * D + d] += std::exp(s[j] - m) / z * vv[o + j * D + d];
    }
  }
  CHECK_CLOSE(y, to_float(ref), 1e-5f, 1e-4f);
  Tensor q2 = param({1, 2, 4, 3}, 28), k2 = param({1, 2, 4, 3}, 29), v2 = param({1, 2, 4, 3}, 30);
  CHECK_GRAD([](const std::vector<Tensor>& in) { return causal_attention(in[0], in[1], in[2]); }, {q2, k2, v2});
  CHECK_THROWS_AS(causal_attention(q, k, Tensor::zeros({B, H, T, D + 1})), Error);
  CHECK_THROWS_AS(causal_attention(q.reshape({B * H, T, D}), k, v), Error);
}

}  // TEST_SUITE("ops")
