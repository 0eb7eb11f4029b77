// MoE dispatch kernels (kernels/dispatch.h) against naive references: the counting sort (histogram, scan,
// stable permutation), permute/combine forward and backward, dropped assignments, thread-count independence.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#include "engine/rng.h"
#include "kernels/dispatch.h"

#ifdef _OPENMP
#include <omp.h>
#endif

using namespace cm;

namespace {

// Expert ids for A assignments: uniform in [0, N), with about `drop` of them set to -1.
std::vector<int32_t> random_experts(int64_t A, int64_t N, float drop, uint64_t seed) {
  std::vector<int32_t> e((size_t)A);
  for (int64_t a = 0; a < A; ++a) {
    float u = philox_uniform(seed, 0, (uint64_t)(2 * a));
    float v = philox_uniform(seed, 0, (uint64_t)(2 * a + 1));
    e[(size_t)a] = v < drop ? -1 : (int32_t)std::min<int64_t>(N - 1, (int64_t)(u * (float)N));
  }
  return e;
}

std::vector<float> random_floats(int64_t n, uint64_t seed, float lo = -1.f, float hi = 1.f) {
  std::vector<float> x((size_t)n);
  for (int64_t i = 0; i < n; ++i) x[(size_t)i] = lo + (hi - lo) * philox_uniform(seed, 0, (uint64_t)i);
  return x;
}

// The plan, naively: for each expert in order, its assignments in increasing a.
struct Plan {
  std::vector<int64_t> counts, offsets;
  std::vector<int32_t> row_of, assign_of;
};
Plan naive_plan(const std::vector<int32_t>& expert, int64_t N) {
  Plan p;
  int64_t A = (int64_t)expert.size();
  p.counts.assign((size_t)N, 0);
  p.offsets.assign((size_t)N + 1, 0);
  p.row_of.assign((size_t)A, -1);
  for (int64_t e = 0; e < N; ++e) {
    for (int64_t a = 0; a < A; ++a)
      if (expert[(size_t)a] == e) {
        p.row_of[(size_t)a] = (int32_t)p.assign_of.size();
        p.assign_of.push_back((int32_t)a);
        p.counts[(size_t)e]++;
      }
    p.offsets[(size_t)e + 1] = (int64_t)p.assign_of.size();
  }
  return p;
}

Plan our_plan(const std::vector<int32_t>& expert, int64_t N, int64_t* bad = nullptr) {
  Plan p;
  int64_t A = (int64_t)expert.size();
  p.counts.assign((size_t)N, -7);
  p.offsets.assign((size_t)N + 1, -7);
  p.row_of.assign((size_t)A, -7);
  p.assign_of.assign((size_t)A, -7);
  int64_t b = cpu::dispatch_plan(p.counts.data(), p.offsets.data(), p.row_of.data(), p.assign_of.data(),
                                 expert.data(), A, N);
  p.assign_of.resize((size_t)p.offsets[(size_t)N]);
  if (bad) *bad = b;
  return p;
}

// The plan a training step makes without the host: a row per slot, the dropped slots' rows (past offsets[N])
// unfilled (assign_of -1).
Plan nowait_plan(const std::vector<int32_t>& expert, int64_t N) {
  Plan p;
  const int64_t A = (int64_t)expert.size();
  p.counts.assign((size_t)N, 0);
  p.offsets.assign((size_t)N + 1, 0);
  p.row_of.assign((size_t)A, 0);
  p.assign_of.assign((size_t)A, 0);
  cpu::dispatch_plan_nowait(p.counts.data(), p.offsets.data(), p.row_of.data(), p.assign_of.data(), expert.data(), A,
                            N);
  return p;
}

// n floats set to `fill`, 64-byte aligned as a tensor's storage is (rows of 16k floats are then whole lines).
std::unique_ptr<float, decltype(&std::free)> aligned_floats(int64_t n, float fill) {
  std::unique_ptr<float, decltype(&std::free)> buf(
      static_cast<float*>(std::aligned_alloc(64, (size_t)n * sizeof(float))), &std::free);
  std::fill(buf.get(), buf.get() + n, fill);
  return buf;
}

void set_threads(int n) {
#ifdef _OPENMP
  omp_set_num_threads(n);
#else
  (void)n;
#endif
}
int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

}  // namespace

TEST_SUITE("kernels") {
  TEST_CASE("dispatch plan: histogram, scan, stable permutation vs naive") {
    struct Case {
      int64_t T, K, N;
      float drop;
    };
    // A = T*K from tiny to > 2 chunks of the parallel counting sort (16384 assignments each).
    for (Case c : {Case{1, 1, 1, 0.f}, Case{7, 2, 4, 0.2f}, Case{33, 3, 5, 0.f}, Case{100, 8, 64, 0.1f},
                   Case{5000, 8, 1024, 0.05f}, Case{20000, 2, 8, 0.3f}, Case{3, 4, 1000, 0.f}}) {
      CAPTURE(c.T);
      CAPTURE(c.K);
      CAPTURE(c.N);
      auto expert = random_experts(c.T * c.K, c.N, c.drop, 100 + (uint64_t)c.T);
      Plan ref = naive_plan(expert, c.N);
      int64_t bad = -1;
      Plan got = our_plan(expert, c.N, &bad);
      CHECK(bad == 0);
      CHECK(got.counts == ref.counts);
      CHECK(got.offsets == ref.offsets);
      CHECK(got.row_of == ref.row_of);
      CHECK(got.assign_of == ref.assign_of);

      // The separate entry points agree with the fused one.
      std::vector<int64_t> counts((size_t)c.N), offsets((size_t)c.N + 1);
      CHECK(cpu::dispatch_histogram(counts.data(), expert.data(), c.T * c.K, c.N) == 0);
      CHECK(counts == ref.counts);
      cpu::dispatch_offsets(offsets.data(), counts.data(), c.N);
      CHECK(offsets == ref.offsets);
      std::vector<int32_t> row_of(expert.size(), -7), assign_of((size_t)offsets[(size_t)c.N], -7);
      cpu::dispatch_scatter(row_of.data(), assign_of.data(), expert.data(), offsets.data(), c.T * c.K, c.N);
      CHECK(row_of == ref.row_of);
      CHECK(assign_of == ref.assign_of);
    }
  }

  TEST_CASE("dispatch plan: all dropped, empty, out-of-range ids") {
    std::vector<int32_t> none(12, -1);
    Plan p = our_plan(none, 3);
    CHECK(p.offsets == std::vector<int64_t>{0, 0, 0, 0});
    CHECK(p.row_of == std::vector<int32_t>(12, -1));

    Plan e = our_plan({}, 4);
    CHECK(e.offsets == std::vector<int64_t>{0, 0, 0, 0, 0});

    // 3 and -2 are outside [-1, 3): counted, skipped, never written out of bounds.
    std::vector<int32_t> ids = {0, 3, 2, -2, -1, 2, 0};
    int64_t bad = 0;
    Plan q = our_plan(ids, 3, &bad);
    CHECK(bad == 2);
    CHECK(q.counts == std::vector<int64_t>{2, 0, 2});
    CHECK(q.row_of == std::vector<int32_t>{0, -1, 2, -1, -1, 3, 1});
    CHECK(q.assign_of == std::vector<int32_t>{0, 6, 2, 5});
  }

  TEST_CASE("dispatch permute then combine with unit gates gives each token times its kept slots") {
    const int64_t T = 131, K = 3, N = 6, C = 37;
    auto expert = random_experts(T * K, N, 0.25f, 7);
    Plan p = our_plan(expert, N);
    const int64_t Ap = p.offsets[(size_t)N];
    auto x = random_floats(T * C, 8);
    std::vector<float> xe((size_t)(Ap * C)), out((size_t)(T * C), 99.f), ones((size_t)(T * K), 1.f);
    cpu::dispatch_permute(xe.data(), x.data(), p.assign_of.data(), Ap, K, C);
    // every buffer row is its token's row
    for (int64_t r = 0; r < Ap; ++r)
      REQUIRE(std::memcmp(&xe[(size_t)(r * C)], &x[(size_t)(p.assign_of[(size_t)r] / K * C)], C * 4) == 0);
    cpu::dispatch_combine(out.data(), xe.data(), ones.data(), p.row_of.data(), T, K, C);
    int64_t all_dropped = 0;
    for (int64_t t = 0; t < T; ++t) {
      int kept = 0;
      for (int64_t j = 0; j < K; ++j) kept += expert[(size_t)(t * K + j)] >= 0;
      all_dropped += kept == 0;
      for (int64_t c = 0; c < C; ++c) {
        float want = 0.f;
        for (int i = 0; i < kept; ++i) want += x[(size_t)(t * C + c)];
        REQUIRE(out[(size_t)(t * C + c)] == want);
      }
    }
    CHECK(all_dropped > 0);  // the case with no kept slot (output 0, not the 99 left there) was exercised
  }

  TEST_CASE("dispatch permute: a buffer of 4 MB and more, written token by token, holds each row's token row; "
            "unfilled rows are zeros") {
    // The nowait plan's buffer: a row per slot, the dropped slots' rows (past offsets[N]) unfilled (-1). The last
    // tokens' slots are dropped, so the slots a row holds end before T * K. C = 128 streams; C = 120 (rows that
    // end mid-line) stores plainly.
    for (int64_t C : {128, 120}) {
      CAPTURE(C);
      const int64_t T = 9000, K = 2, N = 16;
      auto expert = random_experts(T * K, N, 0.1f, 21);
      for (int64_t a = (T - 3) * K; a < T * K; ++a) expert[(size_t)a] = -1;
      const Plan p = nowait_plan(expert, N);
      const std::vector<int32_t>& assign_of = p.assign_of;
      const int64_t Ap = T * K;
      REQUIRE(Ap * C * 4 >= (int64_t)4 << 20);
      REQUIRE(p.offsets[(size_t)N] < Ap);  // some rows unfilled
      auto x = random_floats(T * C, 22);
      auto buf = aligned_floats(Ap * C, 99.f);
      float* xe = buf.get();
      cpu::dispatch_permute(xe, x.data(), assign_of.data(), Ap, K, C);
      int64_t wrong = 0;
      for (int64_t r = 0; r < Ap; ++r) {
        const int32_t a = assign_of[(size_t)r];
        for (int64_t c = 0; c < C; ++c)
          wrong += xe[(size_t)(r * C + c)] != (a < 0 ? 0.f : x[(size_t)(a / K * C + c)]);
      }
      CHECK(wrong == 0);
    }
  }

  TEST_CASE("dispatch combine backward: past the last-level cache, d_ye by streaming stores, the same products; "
            "each gate's dot product as at a small size") {
    // (T + 2 * Ap) * C floats touched >= 32 MB: C = 128 streams d_ye; C = 120 (rows ending mid-line) stores plainly.
    // The nowait plan's unfilled rows keep what was there. d_gate against the same rows' dot product computed by
    // the kernel on a one-token problem (the dot's bits do not depend on the size).
    for (int64_t C : {128, 120}) {
      CAPTURE(C);
      const int64_t T = 14000, K = 2, N = 16;
      const Plan p = nowait_plan(random_experts(T * K, N, 0.1f, 31), N);
      const std::vector<int32_t>& row_of = p.row_of;
      const std::vector<int32_t>& assign_of = p.assign_of;
      const int64_t Ap = T * K;
      REQUIRE((T + 2 * Ap) * C * 4 >= (int64_t)32 << 20);
      REQUIRE(p.offsets[(size_t)N] < Ap);  // some rows unfilled
      auto ye = random_floats(Ap * C, 32), gate = random_floats(T * K, 33, 0.f, 1.f), dout = random_floats(T * C, 34);
      auto buf = aligned_floats(Ap * C, 99.f);
      float* dye = buf.get();
      std::vector<float> dgate((size_t)(T * K), 99.f);
      cpu::dispatch_combine_backward(dye, dgate.data(), dout.data(), ye.data(), gate.data(), row_of.data(),
                                     assign_of.data(), T, Ap, K, C);
      int64_t wrong = 0, wrong_gate = 0;
      for (int64_t r = 0; r < Ap; ++r) {
        const int32_t a = assign_of[(size_t)r];
        for (int64_t c = 0; c < C; ++c)
          wrong += dye[(size_t)(r * C + c)] != (a < 0 ? 99.f : gate[(size_t)a] * dout[(size_t)(a / K * C + c)]);
        if (a < 0 || r % 97) continue;  // every 97th row's gate, against a one-row problem
        const int32_t one_row = 0, one_assign = 0;
        float g1 = 0.f;
        cpu::dispatch_combine_backward(nullptr, &g1, dout.data() + a / K * C, ye.data() + r * C, gate.data() + a,
                                       &one_row, &one_assign, 1, 1, 1, C);
        wrong_gate += dgate[(size_t)a] != g1;
      }
      for (int64_t a = 0; a < T * K; ++a) wrong_gate += row_of[(size_t)a] < 0 && dgate[(size_t)a] != 0.f;
      CHECK(wrong == 0);
      CHECK(wrong_gate == 0);
    }
  }

  TEST_CASE("dispatch combine and backward vs naive double, dropped slots") {
    const int64_t T = 97, K = 4, N = 9, C = 53;  // C not a multiple of 16: the dot's tail runs
    auto expert = random_experts(T * K, N, 0.2f, 11);
    for (int64_t j = 0; j < K; ++j) expert[(size_t)(3 * K + j)] = -1;  // token 3: every slot dropped
    Plan p = our_plan(expert, N);
    const int64_t Ap = p.offsets[(size_t)N];
    auto ye = random_floats(Ap * C, 12);
    auto gate = random_floats(T * K, 13, 0.f, 1.f);
    auto dout = random_floats(T * C, 14);
    // Token 5's terms of column 0 all -0.0: the sums start from +0, as index_add into zeros made them, so its
    // output and its input gradient there are +0.0.
    for (int64_t j = 0; j < K; ++j)
      if (p.row_of[(size_t)(5 * K + j)] >= 0) ye[(size_t)(p.row_of[(size_t)(5 * K + j)] * C)] = -0.f;
    dout[(size_t)(5 * C)] = -0.f;

    std::vector<float> out((size_t)(T * C), 99.f), dye((size_t)(Ap * C), 99.f), dgate((size_t)(T * K), 99.f),
        dx((size_t)(T * C), 99.f);
    cpu::dispatch_combine(out.data(), ye.data(), gate.data(), p.row_of.data(), T, K, C);
    cpu::dispatch_combine_backward(dye.data(), dgate.data(), dout.data(), ye.data(), gate.data(), p.row_of.data(),
                                   p.assign_of.data(), T, Ap, K, C);
    cpu::dispatch_permute_backward(dx.data(), dye.data(), p.row_of.data(), T, K, C);

    for (int64_t t = 0; t < T; ++t) {
      for (int64_t c = 0; c < C; ++c) {
        double o = 0, g = 0;
        for (int64_t j = 0; j < K; ++j) {
          int32_t r = p.row_of[(size_t)(t * K + j)];
          if (r < 0) continue;
          o += (double)gate[(size_t)(t * K + j)] * ye[(size_t)(r * C + c)];
          g += (double)dye[(size_t)(r * C + c)];
        }
        REQUIRE(std::fabs(out[(size_t)(t * C + c)] - o) <= 1e-5 + 1e-5 * std::fabs(o));
        REQUIRE(std::fabs(dx[(size_t)(t * C + c)] - g) <= 1e-5 + 1e-5 * std::fabs(g));
      }
      if (t == 3 || t == 5) {  // no kept slot: zeros (not the 99 left there); -0.0 terms: +0.0
        CHECK(!std::signbit(out[(size_t)(t * C)]));
        CHECK(!std::signbit(dx[(size_t)(t * C)]));
        CHECK(out[(size_t)(t * C)] == 0.f);
        CHECK(dx[(size_t)(t * C)] == 0.f);
      }
      for (int64_t j = 0; j < K; ++j) {
        int64_t a = t * K + j;
        int32_t r = p.row_of[(size_t)a];
        if (r < 0) {
          REQUIRE(dgate[(size_t)a] == 0.f);
          continue;
        }
        double d = 0;
        for (int64_t c = 0; c < C; ++c) {
          d += (double)dout[(size_t)(t * C + c)] * ye[(size_t)(r * C + c)];
          double want = (double)gate[(size_t)a] * dout[(size_t)(t * C + c)];
          REQUIRE(std::fabs(dye[(size_t)(r * C + c)] - want) <= 1e-6 + 1e-6 * std::fabs(want));
        }
        REQUIRE(std::fabs(dgate[(size_t)a] - d) <= 1e-5 + 1e-5 * std::fabs(d));
      }
    }

    // d_gate by central differences of L = sum(dout * combine(gate)), in double (combine is linear in each gate,
    // so a large step is exact up to rounding).
    for (int64_t a : {int64_t(0), int64_t(5), T * K / 2, T * K - 1}) {
      if (p.row_of[(size_t)a] < 0) continue;
      auto L = [&](float g) {
        auto gg = gate;
        gg[(size_t)a] = g;
        std::vector<float> o((size_t)(T * C));
        cpu::dispatch_combine(o.data(), ye.data(), gg.data(), p.row_of.data(), T, K, C);
        double s = 0;
        for (size_t i = 0; i < o.size(); ++i) s += (double)dout[i] * o[i];
        return s;
      };
      double num = (L(gate[(size_t)a] + 0.25f) - L(gate[(size_t)a] - 0.25f)) / 0.5;
      CHECK(std::fabs(dgate[(size_t)a] - num) <= 1e-3 + 1e-3 * std::fabs(num));
    }

    // Null outputs are skipped.
    cpu::dispatch_combine_backward(nullptr, dgate.data(), dout.data(), ye.data(), gate.data(), p.row_of.data(),
                                   p.assign_of.data(), T, Ap, K, C);
    cpu::dispatch_combine_backward(dye.data(), nullptr, dout.data(), ye.data(), gate.data(), p.row_of.data(),
                                   p.assign_of.data(), T, Ap, K, C);
  }

  TEST_CASE("dispatch results are bit-identical for 1 thread and all threads") {
    const int64_t T = 9000, K = 4, N = 16, C = 24;  // A = 36000: the counting sort uses several chunks
    auto expert = random_experts(T * K, N, 0.1f, 21);
    auto x = random_floats(T * C, 22);
    auto gate = random_floats(T * K, 23);
    auto run = [&](int threads) {
      set_threads(threads);
      Plan p = our_plan(expert, N);
      int64_t Ap = p.offsets[(size_t)N];
      std::vector<float> xe((size_t)(Ap * C)), out((size_t)(T * C)), dye((size_t)(Ap * C)), dg((size_t)(T * K)),
          dx((size_t)(T * C));
      cpu::dispatch_permute(xe.data(), x.data(), p.assign_of.data(), Ap, K, C);
      cpu::dispatch_combine(out.data(), xe.data(), gate.data(), p.row_of.data(), T, K, C);
      cpu::dispatch_combine_backward(dye.data(), dg.data(), x.data(), xe.data(), gate.data(), p.row_of.data(),
                                     p.assign_of.data(), T, Ap, K, C);
      cpu::dispatch_permute_backward(dx.data(), dye.data(), p.row_of.data(), T, K, C);
      std::vector<float> all = out;
      all.insert(all.end(), dg.begin(), dg.end());
      all.insert(all.end(), dx.begin(), dx.end());
      return std::make_pair(p.row_of, all);
    };
    int maxt = max_threads();
    auto one = run(1);
    auto many = run(std::max(2, maxt));
    set_threads(maxt);
    CHECK(one.first == many.first);
    CHECK(std::memcmp(one.second.data(), many.second.data(), one.second.size() * 4) == 0);
  }
}
