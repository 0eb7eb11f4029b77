// Top-k lab: cm::cpu::topk_forward at routing shapes (T tokens x N experts, k = 1..8, plus the general path at
// larger k) against a naive reference that fully sorts every row (std::sort of an index array by value, ties to
// the lower index), both OpenMP-parallel over rows, so the ratio measures the algorithm, not the threads.
// Validation first: values and indices of every row must equal the reference exactly. Time: median of REPEATS
// runs after one warm-up run. GB/s counts the logits read once plus values and indices written (R*n*4 + R*k*8).
// Inputs are uniform random logits; an ascending row (every element enters the kept set) is the small path's
// worst case and is timed on one line (adversarial) for honesty.
//
//   make -j2 USE_CUDA=0 build/bench/topk
//   OMP_NUM_THREADS=2 ./build/bench/topk [--quick]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <string>
#include <vector>

#include "bench/timing.h"
#include "engine/rng.h"
#include "kernels/topk.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

using cm::bench::median_seconds;

constexpr int REPEATS = 5;


// The reference: sort the whole row, keep the first k.
void naive_topk(float* values, int32_t* indices, const float* x, int64_t R, int64_t n, int64_t k) {
#pragma omp parallel
  {
    std::vector<int32_t> ord((size_t)n);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < R; ++r) {
      const float* xr = x + r * n;
      std::iota(ord.begin(), ord.end(), 0);
      std::sort(ord.begin(), ord.end(), [xr](int32_t a, int32_t b) { return xr[a] > xr[b] || (xr[a] == xr[b] && a < b); });
      for (int64_t j = 0; j < k; ++j) {
        indices[r * k + j] = ord[(size_t)j];
        values[r * k + j] = xr[ord[(size_t)j]];
      }
    }
  }
}

bool run(int64_t R, int64_t n, int64_t k, bool ascending) {
  std::vector<float> x((size_t)(R * n));
  for (size_t i = 0; i < x.size(); ++i)
    x[i] = ascending ? (float)(i % (size_t)n) : 4.f * cm::philox_uniform(42, 0, i) - 2.f;
  std::vector<float> v((size_t)(R * k)), rv((size_t)(R * k));
  std::vector<int32_t> ix((size_t)(R * k)), rix((size_t)(R * k));

  cm::cpu::topk_forward(v.data(), ix.data(), x.data(), R, n, k);
  naive_topk(rv.data(), rix.data(), x.data(), R, n, k);
  if (ix != rix || std::memcmp(v.data(), rv.data(), v.size() * 4) != 0) {
    std::printf("MISMATCH at T=%lld N=%lld k=%lld\n", (long long)R, (long long)n, (long long)k);
    return false;
  }
  double ours = median_seconds([&] { cm::cpu::topk_forward(v.data(), ix.data(), x.data(), R, n, k); }, REPEATS);
  double ref = median_seconds([&] { naive_topk(rv.data(), rix.data(), x.data(), R, n, k); }, REPEATS);
  double bytes = (double)R * n * 4 + (double)R * k * 8;
  std::printf("T=%6lld N=%5lld k=%3lld %-12s ours %8.3f ms %7.2f GB/s | full sort %9.3f ms %6.2f GB/s | x%.1f\n",
              (long long)R, (long long)n, (long long)k, ascending ? "adversarial" : (k <= 8 ? "small-k" : "general"),
              ours * 1e3, bytes / ours * 1e-9, ref * 1e3, bytes / ref * 1e-9, ref / ours);
  std::fflush(stdout);
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  bool quick = argc > 1 && std::string(argv[1]) == "--quick";
#ifdef _OPENMP
  std::printf("top-k lab, %d threads, median of %d\n", omp_get_max_threads(), REPEATS);
#endif
  bool ok = true;
  // The full sort of 65536 rows of 1024 takes seconds per run, so the widest rows stop at 16384 tokens.
  std::vector<int64_t> Ts = quick ? std::vector<int64_t>{4096} : std::vector<int64_t>{4096, 16384, 65536};
  for (int64_t T : Ts)
    for (int64_t N : {8, 64, 256})
      for (int64_t k : {1, 2, 8}) ok = run(T, N, k, false) && ok;
  for (int64_t T : {int64_t(4096), int64_t(16384)})
    for (int64_t k : {1, 2, 4, 8})
      if (!quick || T == 4096) ok = run(T, 1024, k, false) && ok;
  for (int64_t k : {16, 64}) ok = run(4096, 1024, k, false) && ok;
  ok = run(4096, 1024, 8, true) && ok;
  return ok ? 0 : 1;
}
