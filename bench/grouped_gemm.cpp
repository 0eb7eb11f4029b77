// Grouped GEMM lab: the experts' matrix products of one MoE layer as one grouped call per product
// (kernels/grouped_gemm.h) against a loop of cm::cpu::gemm calls, one per expert segment (what per-expert linear()
// runs), on the shapes of train_bench: C = 128, expert width F = 256, T*K = 1536 rows (768 tokens, 2 experts
// each), 16 and 64 experts, uneven segment sizes from a fixed seed (skewed expert popularity, empty experts too).
//
// Both sides compute the same bits (the header's contract; checked before timing). Times are medians over rounds
// in which the two sides take turns (a block of runs each), so a load change on a shared machine hits both; the
// ratio loop / grouped is taken within the run.
//
//   make -j2 build/bench/grouped_gemm
//   OMP_WAIT_POLICY=passive OMP_NUM_THREADS=2 ./build/bench/grouped_gemm [--rounds N] [--quick] [--cpu-time]
// --cpu-time: this process's CPU time instead of wall time; with one thread on a loaded machine it leaves out the
// time the scheduler gave to others (with several threads it sums them: work, not latency).
//
// Rows per expert layer (SwiGLU: w1 and w3 are C -> F, w2 is F -> C):
//   C->F forward / backward_input / backward_weight, F->C likewise, each as its own line;
//   "permute + C->F forward": dispatch_permute then the loop, against the grouped forward that reads the tokens
//   through the row gather (the permutation is never materialised);
//   "expert FFN step": the sum for one SwiGLU expert layer's products, forward and backward (2 x C->F, 1 x F->C).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <functional>
#include <string>
#include <vector>

#include "kernels/dispatch.h"
#include "kernels/gemm.h"
#include "kernels/grouped_gemm.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

void fill(std::vector<float>& v, uint64_t seed) {
  uint64_t s = seed * 0x9E3779B97F4A7C15ull + 1;
  for (float& x : v) {
    s ^= s << 13, s ^= s >> 7, s ^= s << 17;
    x = (float)((s >> 40) * (1.0 / (1ull << 24))) * 2.0f - 1.0f;
  }
}
uint64_t mix(uint64_t& s) {
  s ^= s << 13, s ^= s >> 7, s ^= s << 17;
  return s;
}

// The routing of T tokens to K = 2 distinct experts out of E, with expert e chosen with weight 1 / (e + 1)^0.8
// (skewed: a few popular experts, a tail of small and empty ones), and the expert-contiguous plan.
struct Routing {
  int64_t T, K, E;
  std::vector<int32_t> expert, row_of, assign_of;
  std::vector<int64_t> counts, offsets;
  Routing(int64_t T_, int64_t K_, int64_t E_, uint64_t seed) : T(T_), K(K_), E(E_) {
    std::vector<double> cdf((size_t)E);
    double acc = 0;
    for (int64_t e = 0; e < E; ++e) cdf[e] = acc += 1.0 / std::pow((double)e + 1.0, 0.8);
    uint64_t s = seed * 7919 + 13;
    auto draw = [&] {
      const double u = (double)(mix(s) >> 11) / (double)(1ull << 53) * acc;
      return (int32_t)(std::upper_bound(cdf.begin(), cdf.end(), u) - cdf.begin());
    };
    expert.resize((size_t)(T * K));
    for (int64_t t = 0; t < T; ++t)
      for (int64_t k = 0; k < K; ++k) {
        int32_t e;
        do e = std::min<int32_t>(draw(), (int32_t)E - 1);
        while (k > 0 && e == expert[t * K]);
        expert[t * K + k] = e;
      }
    counts.resize((size_t)E), offsets.resize((size_t)E + 1);
    row_of.resize(expert.size()), assign_of.resize(expert.size());
    cm::cpu::dispatch_plan(counts.data(), offsets.data(), row_of.data(), assign_of.data(), expert.data(), T * K, E);
  }
};

// One product kind on one routing: the operands of both sides.
struct Product {
  const char* name;
  int64_t M, N, Kd, G;
  const int64_t* off;
  std::vector<std::vector<float>> W, dW;
  std::vector<float> X, Y, dY, dX;
  std::vector<const float*> Wp;
  std::vector<float*> dWp;
  Product(const char* n, const Routing& r, int64_t N_, int64_t Kd_, uint64_t seed)
      : name(n), M(r.offsets[r.E]), N(N_), Kd(Kd_), G(r.E), off(r.offsets.data()) {
    for (int64_t g = 0; g < G; ++g) {
      W.emplace_back((size_t)(N * Kd)), dW.emplace_back((size_t)(N * Kd));
      fill(W.back(), seed + g), fill(dW.back(), seed + 1000 + g);
      Wp.push_back(W.back().data()), dWp.push_back(dW.back().data());
    }
    X.resize((size_t)(M * Kd)), Y.resize((size_t)(M * N)), dY.resize((size_t)(M * N)), dX.resize((size_t)(M * Kd));
    fill(X, seed + 2000), fill(dY, seed + 3000);
  }
  int64_t rows(int64_t g) const { return off[g + 1] - off[g]; }

  void loop_forward() {
    for (int64_t g = 0; g < G; ++g)
      if (rows(g) > 0)
        cm::cpu::gemm(Y.data() + off[g] * N, N, X.data() + off[g] * Kd, Kd, Wp[g], Kd, rows(g), N, Kd, false, true);
  }
  void loop_backward_input() {
    for (int64_t g = 0; g < G; ++g)
      if (rows(g) > 0)
        cm::cpu::gemm(dX.data() + off[g] * Kd, Kd, dY.data() + off[g] * N, N, Wp[g], Kd, rows(g), Kd, N, false,
                      false);
  }
  void loop_backward_weight() {
    for (int64_t g = 0; g < G; ++g)
      if (rows(g) > 0)
        cm::cpu::gemm(dWp[g], Kd, dY.data() + off[g] * N, N, X.data() + off[g] * Kd, Kd, N, Kd, rows(g), true, false,
                      1.0f, 1.0f);
  }
  void grouped_forward() {
    cm::cpu::grouped_gemm_forward(Y.data(), X.data(), Wp.data(), off, G, M, N, Kd, nullptr, false);
  }
  void grouped_backward_input() {
    cm::cpu::grouped_gemm_backward_input(dX.data(), dY.data(), Wp.data(), off, G, M, N, Kd, false);
  }
  void grouped_backward_weight() {
    cm::cpu::grouped_gemm_backward_weight(dWp.data(), nullptr, dY.data(), X.data(), off, G, M, N, Kd, true);
  }
};

bool g_cpu_time = false;
double now() {
  if (g_cpu_time) {
    timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
  }
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}
double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// Medians of the two sides, in milliseconds, over `rounds` rounds in which each side runs kBlock times in a row
// (after one warm-up run each). Blocks rather than single alternating runs: a parallel region that follows a
// stretch of single-threaded work (the loop's small experts) waits for its sleeping worker threads, several ms on
// a loaded machine, and that wait belongs to neither side; within a block each side follows itself.
constexpr int kBlock = 5;
struct Timing {
  double loop_ms, grouped_ms;
};
Timing time_pair(const std::function<void()>& loop, const std::function<void()>& grouped, int rounds) {
  loop(), grouped();
  std::vector<double> a, b;
  for (int r = 0; r < rounds; ++r) {
    for (int i = 0; i < kBlock; ++i) {
      const double t0 = now();
      loop();
      a.push_back(now() - t0);
    }
    for (int i = 0; i < kBlock; ++i) {
      const double t0 = now();
      grouped();
      b.push_back(now() - t0);
    }
  }
  return {1e3 * median(a), 1e3 * median(b)};
}

bool same(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

}  // namespace

int main(int argc, char** argv) {
  int rounds = 9;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--quick") {
      rounds = 2;
    } else if (a == "--cpu-time") {
      g_cpu_time = true;
    } else if (a == "--rounds" && i + 1 < argc) {
      rounds = std::atoi(argv[++i]);
    } else {
      std::fprintf(stderr, "grouped_gemm: unknown argument '%s' (usage: grouped_gemm [--rounds N] [--quick] "
                   "[--cpu-time])\n", a.c_str());
      return 2;
    }
  }
  if (rounds < 1) {
    std::fprintf(stderr, "grouped_gemm: --rounds must be >= 1\n");
    return 2;
  }
  int threads = 1;
#ifdef _OPENMP
  threads = omp_get_max_threads();
#endif
  const int64_t T = 768, K = 2, C = 128, F = 256;
  std::printf("grouped_gemm: %d threads, T*K = %lld rows, C = %lld, F = %lld, medians of %d runs (%d rounds of %d in "
              "a row per side), %s\n",
              threads, (long long)(T * K), (long long)C, (long long)F, rounds * kBlock, rounds, kBlock,
              g_cpu_time ? "process CPU time" : "wall time");

  for (int64_t E : {16, 64}) {
    const Routing r(T, K, E, 42);
    int64_t empty = 0, lo = T * K, hi = 0;
    for (int64_t e = 0; e < E; ++e) {
      empty += r.counts[e] == 0;
      if (r.counts[e] > 0) lo = std::min(lo, r.counts[e]);
      hi = std::max(hi, r.counts[e]);
    }
    std::printf("\n%lld experts: segment sizes %lld..%lld rows, %lld empty\n", (long long)E, (long long)lo,
                (long long)hi, (long long)empty);
    std::printf("  %-34s %12s %12s %8s\n", "product", "loop ms", "grouped ms", "ratio");

    Product up("C->F", r, F, C, 1), down("F->C", r, C, F, 2);
    double total_loop = 0, total_grouped = 0;
    for (Product* p : {&up, &down}) {
      // The contract: both sides give the same bits (dW accumulates: compare from equal starting values).
      p->loop_forward();
      const std::vector<float> y = p->Y;
      p->grouped_forward();
      p->loop_backward_input();
      const std::vector<float> dx = p->dX;
      p->grouped_backward_input();
      const std::vector<std::vector<float>> dw0 = p->dW;
      p->loop_backward_weight();
      const std::vector<std::vector<float>> dw1 = p->dW;
      p->dW = dw0;
      for (int64_t g = 0; g < p->G; ++g) p->dWp[g] = p->dW[g].data();
      p->grouped_backward_weight();
      bool ok = same(y, p->Y) && same(dx, p->dX);
      for (int64_t g = 0; g < p->G; ++g) ok = ok && same(dw1[g], p->dW[g]);
      if (!ok) {
        std::fprintf(stderr, "grouped_gemm: %s: the grouped results differ from the loop of cpu::gemm\n", p->name);
        return 1;
      }
      const double weight = p == &up ? 2.0 : 1.0;  // SwiGLU: w1 and w3 are C->F, w2 is F->C
      const struct {
        const char* what;
        std::function<void()> loop, grouped;
      } kinds[] = {
          {"forward", [&] { p->loop_forward(); }, [&] { p->grouped_forward(); }},
          {"backward_input", [&] { p->loop_backward_input(); }, [&] { p->grouped_backward_input(); }},
          {"backward_weight", [&] { p->loop_backward_weight(); }, [&] { p->grouped_backward_weight(); }},
      };
      for (const auto& k : kinds) {
        const Timing t = time_pair(k.loop, k.grouped, rounds);
        std::printf("  %-34s %12.3f %12.3f %7.2fx\n", (std::string(p->name) + " " + k.what).c_str(), t.loop_ms,
                    t.grouped_ms, t.loop_ms / t.grouped_ms);
        total_loop += weight * t.loop_ms, total_grouped += weight * t.grouped_ms;
      }
    }
    // The permutation folded into the packing: tokens [T, C] read through assign_of / K.
    std::vector<float> x((size_t)(T * C));
    fill(x, 99);
    const Timing t = time_pair(
        [&] {
          cm::cpu::dispatch_permute(up.X.data(), x.data(), r.assign_of.data(), up.M, K, C);
          up.loop_forward();
        },
        [&] {
          cm::cpu::grouped_gemm_forward(up.Y.data(), x.data(), up.Wp.data(), up.off, up.G, up.M, up.N, up.Kd, nullptr,
                                        false, cm::RowGather{r.assign_of.data(), K});
        },
        rounds);
    std::printf("  %-34s %12.3f %12.3f %7.2fx\n", "permute + C->F forward", t.loop_ms, t.grouped_ms,
                t.loop_ms / t.grouped_ms);
    std::printf("  %-34s %12.3f %12.3f %7.2fx\n", "expert FFN step (2 C->F + 1 F->C)", total_loop, total_grouped,
                total_loop / total_grouped);
  }
  return 0;
}
