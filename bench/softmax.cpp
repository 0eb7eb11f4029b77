// Softmax lab: forward softmax over the last axis of [rows, cols], the kernel in kernels/cpu/softmax.cpp against
// a naive reference (one thread, std::exp, the same three passes per row). Each size is validated first (both
// against a double-precision softmax), then timed: one warm-up, median of repeats, steady_clock.
// GB/s counts the bytes the op must move: rows*cols*4 read + rows*cols*4 written.
//
//   make -j2 USE_CUDA=0 build/bench/softmax && ./build/bench/softmax        (OMP_NUM_THREADS to pick threads)
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <functional>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "bench/timing.h"
#include "engine/rng.h"
#include "kernels/softmax.h"

namespace {

using cm::bench::median_seconds;

void softmax_naive(float* out, const float* inp, int64_t N, int64_t C) {
  for (int64_t n = 0; n < N; ++n) {
    const float* x = inp + n * C;
    float* y = out + n * C;
    float m = -INFINITY;
    for (int64_t c = 0; c < C; ++c) m = std::max(m, x[c]);
    float s = 0.0f;
    for (int64_t c = 0; c < C; ++c) {
      y[c] = std::exp(x[c] - m);
      s += y[c];
    }
    for (int64_t c = 0; c < C; ++c) y[c] /= s;
  }
}

// Max |got - ref| / (1e-7 + |ref|) against a double softmax, on the first `rows` rows.
double max_rel_err(const std::vector<float>& got, const std::vector<float>& x, int64_t rows, int64_t C) {
  double worst = 0;
  for (int64_t n = 0; n < rows; ++n) {
    double m = -INFINITY, s = 0;
    for (int64_t c = 0; c < C; ++c) m = std::max(m, (double)x[n * C + c]);
    for (int64_t c = 0; c < C; ++c) s += std::exp((double)x[n * C + c] - m);
    for (int64_t c = 0; c < C; ++c) {
      double ref = std::exp((double)x[n * C + c] - m) / s;
      worst = std::max(worst, std::fabs(got[n * C + c] - ref) / (1e-7 + ref));
    }
  }
  return worst;
}


}  // namespace

int main() {
  int threads = 1;
#ifdef _OPENMP
  threads = omp_get_max_threads();
#endif
  std::printf("softmax forward, fp32, %d thread(s); naive = 1 thread, std::exp\n", threads);
  std::printf("%-14s %12s %12s %10s %10s %8s %10s\n", "rows x cols", "naive ms", "ours ms", "naive GB/s",
              "ours GB/s", "speedup", "max rel err");
  const std::vector<std::pair<int64_t, int64_t>> sizes{{4096, 64}, {4096, 1024}, {65536, 64}, {16384, 4096}};
  bool ok = true;
  for (auto [N, C] : sizes) {
    const int64_t n = N * C;
    std::vector<float> x((size_t)n), y((size_t)n), yn((size_t)n);
    for (int64_t i = 0; i < n; ++i) x[(size_t)i] = 8.0f * cm::philox_uniform(7, 0, (uint64_t)i) - 4.0f;
    // Validate both on a sample of rows (the double reference is slower than either).
    cm::cpu::softmax_forward(y.data(), x.data(), N, C);
    softmax_naive(yn.data(), x.data(), N, C);
    const int64_t check_rows = std::min<int64_t>(N, 256);
    double err = max_rel_err(y, x, check_rows, C), err_naive = max_rel_err(yn, x, check_rows, C);
    if (err > 1e-5 || err_naive > 1e-5) {
      std::printf("VALIDATION FAILED at %lld x %lld: ours %.3g, naive %.3g\n", (long long)N, (long long)C, err,
                  err_naive);
      ok = false;
      continue;
    }
    const int repeats = n >= (1 << 24) ? 5 : 11;
    double tn = median_seconds([&] { softmax_naive(yn.data(), x.data(), N, C); }, repeats);
    double to = median_seconds([&] { cm::cpu::softmax_forward(y.data(), x.data(), N, C); }, repeats);
    const double bytes = 2.0 * 4.0 * (double)n;
    char label[32];
    std::snprintf(label, sizeof label, "%lld x %lld", (long long)N, (long long)C);
    std::printf("%-14s %12.3f %12.3f %10.2f %10.2f %7.2fx %10.2e\n", label, tn * 1e3, to * 1e3, bytes / tn * 1e-9,
                bytes / to * 1e-9, tn / to, err);
  }
  return ok ? 0 : 1;
}
