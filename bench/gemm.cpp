// SGEMM lab: cm::cpu::gemm throughput (GFLOP/s = 2*M*N*K / time) on square sizes and on the model's matrix
// products ((B*T) x C x 4C: the MLP's two linears, forward and both gradients), and, when built with OpenBLAS
// (CM_HAVE_OPENBLAS), cblas_sgemm on the same problems in the same run with the ratio ours / OpenBLAS.
// Validation first: every shape is checked against a double-precision reference (on a sample of rows for big
// problems) before anything is timed. Time: median of 15 runs (3 rounds of 5 after a warm-up; --quick: 1 round).
//
//   make -j2 USE_CUDA=0 build/bench/gemm
//   OMP_NUM_THREADS=2 OPENBLAS_NUM_THREADS=2 ./build/bench/gemm [--quick] [--cpu-time] [--keep-env] [filter]
// filter: run only the shapes whose name contains it (e.g. square, fc1).
//
// Letters: op(A) [M, K], op(B) [K, N], C [M, N]; "NT" = A as is, B transposed (PyTorch's linear: x W^T).
//
// Fair peer: OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE in the environment (one development machine sets
// CORETYPE=Haswell) force OpenBLAS onto another CPU's kernel, its AVX2 one here: about half the speed of the
// kernel it picks for this CPU (SkylakeX/Cooperlake, AVX-512). OpenBLAS reads them when the library loads, so the
// lab re-executes itself without them, and prints the kernel OpenBLAS reports (openblas_get_corename).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <string>
#include <thread>
#include <vector>

#include "kernels/gemm.h"

#ifdef _OPENMP
#include <omp.h>
#endif
#ifdef CM_HAVE_OPENBLAS
#include <cblas.h>
#include <cstdlib>
#include <unistd.h>
extern "C" {
char* openblas_get_corename(void);  // declared by OpenBLAS's cblas.h; repeated for a cblas.h of another BLAS
char* openblas_get_config(void);
}
#endif

namespace {

struct Shape {
  const char* name;
  int64_t M, N, K;
  bool ta, tb;
  int64_t batch = 1;
};

// Deterministic values in [-1, 1).
void fill(std::vector<float>& v, uint64_t seed) {
  uint64_t s = seed * 0x9E3779B97F4A7C15ull + 1;
  for (float& x : v) {
    s ^= s << 13, s ^= s >> 7, s ^= s << 17;
    x = (float)((s >> 40) * (1.0 / (1ull << 24))) * 2.0f - 1.0f;
  }
}

struct Problem {
  Shape s;
  int64_t lda, ldb, ldc, sa, sb, sc;
  std::vector<float> A, B, C;
  explicit Problem(const Shape& sh) : s(sh) {
    lda = s.ta ? s.M : s.K;
    ldb = s.tb ? s.K : s.N;
    ldc = s.N;
    sa = s.M * s.K, sb = s.K * s.N, sc = s.M * s.N;
    A.resize(sa * s.batch), B.resize(sb * s.batch), C.resize(sc * s.batch);
    fill(A, 1), fill(B, 2);
  }
  float a(int64_t b, int64_t i, int64_t k) const { return A[b * sa + (s.ta ? k * lda + i : i * lda + k)]; }
  float bv(int64_t b, int64_t k, int64_t j) const { return B[b * sb + (s.tb ? j * ldb + k : k * ldb + j)]; }
  void ours() {
    cm::cpu::gemm_strided_batched(C.data(), ldc, sc, A.data(), lda, sa, B.data(), ldb, sb, s.batch, s.M, s.N, s.K,
                                  s.ta, s.tb, 1.0f, 0.0f);
  }
#ifdef CM_HAVE_OPENBLAS
  void openblas() {
    for (int64_t b = 0; b < s.batch; ++b)
      cblas_sgemm(CblasRowMajor, s.ta ? CblasTrans : CblasNoTrans, s.tb ? CblasTrans : CblasNoTrans, (int)s.M,
                  (int)s.N, (int)s.K, 1.0f, A.data() + b * sa, (int)lda, B.data() + b * sb, (int)ldb, 0.0f,
                  C.data() + b * sc, (int)ldc);
  }
#endif
};

// Max relative error of C over a sample of (at most 64) rows of the first and last batch entries, against a
// double-precision reference. Relative to sum_k |a*b| (the scale of the rounding error).
double validate(Problem& p) {
  std::fill(p.C.begin(), p.C.end(), NAN);  // beta == 0 must overwrite everything
  p.ours();
  double worst = 0;
  for (int64_t b : {(int64_t)0, p.s.batch - 1}) {
    const int64_t step = std::max<int64_t>(1, p.s.M / 64);
    for (int64_t i = 0; i < p.s.M; i += step)
      for (int64_t j = 0; j < p.s.N; ++j) {
        double ref = 0, mag = 0;
        for (int64_t k = 0; k < p.s.K; ++k) {
          double t = (double)p.a(b, i, k) * p.bv(b, k, j);
          ref += t, mag += std::fabs(t);
        }
        double err = std::fabs(p.C[b * p.sc + i * p.ldc + j] - ref) / (mag + 1e-30);
        if (!(err <= 1.0)) err = 1.0;  // NaN
        worst = std::max(worst, err);
      }
  }
  return worst;
}

// Wall seconds, or (--cpu-time) this process's CPU seconds: with one thread on a loaded machine, CPU time leaves
// out the time the scheduler gave to others, so it stays steady where wall time does not.
bool g_cpu_time = false;
double now_s() {
  if (g_cpu_time) {
    timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return ts.tv_sec + 1e-9 * ts.tv_nsec;
  }
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

template <class F>
void time_runs(F&& f, int repeats, std::vector<double>& t) {
  f();  // warm-up: page faults, packing buffers, thread pool start
  for (int r = 0; r < repeats; ++r) {
    const double t0 = now_s();
    f();
    t.push_back(now_s() - t0);
  }
}

double median(std::vector<double> t) {
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  bool keep_env = false;  // --keep-env: measure the kernel the environment forces (to show what it costs)
  for (int i = 1; i < argc; ++i) keep_env = keep_env || std::strcmp(argv[i], "--keep-env") == 0;
#ifdef CM_HAVE_OPENBLAS
  // Before OpenBLAS's kernel choice matters: the library has already read the environment when it loaded.
  if (!keep_env && (std::getenv("OPENBLAS_CORETYPE") || std::getenv("OPENBLAS_L2_SIZE"))) {
    std::printf("gemm lab: OPENBLAS_CORETYPE=%s OPENBLAS_L2_SIZE=%s in the environment: re-running without them, "
                "so that OpenBLAS picks its kernel for this CPU\n",
                std::getenv("OPENBLAS_CORETYPE") ? std::getenv("OPENBLAS_CORETYPE") : "(unset)",
                std::getenv("OPENBLAS_L2_SIZE") ? std::getenv("OPENBLAS_L2_SIZE") : "(unset)");
    std::fflush(stdout);
    ::unsetenv("OPENBLAS_CORETYPE");
    ::unsetenv("OPENBLAS_L2_SIZE");
    ::execv("/proc/self/exe", argv);
    std::printf("gemm lab: re-exec failed: the OpenBLAS figures below use the forced kernel\n");
  }
#endif
  bool quick = false;
  std::string only;  // run only the shapes whose name contains this (e.g. "square", "fc1")
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--quick") == 0)
      quick = true;
    else if (std::strcmp(argv[i], "--cpu-time") == 0)
      g_cpu_time = true;
    else if (std::strcmp(argv[i], "--keep-env") == 0)
      continue;
    else
      only = argv[i];
  }
  const int repeats = 5, rounds = quick ? 1 : 3;
  int threads = 1;
#ifdef _OPENMP
  threads = omp_get_max_threads();
#endif
  std::printf("gemm lab: %d OpenMP thread(s), median of %d runs, %s%s\n", threads, repeats * rounds,
              g_cpu_time ? "process CPU time (meaningful with 1 thread)" : "wall time",
#ifdef CM_HAVE_OPENBLAS
              ", OpenBLAS in the same run (set OPENBLAS_NUM_THREADS to match)"
#else
              ", built without OpenBLAS"
#endif
  );
#ifdef CM_HAVE_OPENBLAS
  std::printf("OpenBLAS kernel: %s (config: %s)\n", openblas_get_corename(), openblas_get_config());
#endif

  // C = 384 channels, B*T = 4096 tokens, hidden 4C = 1536. fc1: [4096,384] x [1536,384]^T, fc2: [4096,1536] x
  // [384,1536]^T. Gradients: dX = dY W (NN), dW = dY^T X (TN). Attention: (B*H) x [T,D] x [T,D]^T.
  std::vector<Shape> shapes = {
      {"square", 256, 256, 256, false, false},        {"square", 512, 512, 512, false, false},
      {"square", 1024, 1024, 1024, false, false},     {"square", 2048, 2048, 2048, false, false},
      {"square TN", 1024, 1024, 1024, true, false},   {"square NT", 1024, 1024, 1024, false, true},
      {"square TT", 1024, 1024, 1024, true, true},    {"fc1 fwd NT", 4096, 1536, 384, false, true},
      {"fc2 fwd NT", 4096, 384, 1536, false, true},   {"fc1 dX NN", 4096, 384, 1536, false, false},
      {"fc2 dX NN", 4096, 1536, 384, false, false},   {"fc1 dW TN", 1536, 384, 4096, true, false},
      {"fc2 dW TN", 384, 1536, 4096, true, false},    {"router NT", 4096, 8, 384, false, true},
      {"attn qk^T x96", 256, 256, 64, false, true, 96}, {"attn pv x96", 256, 64, 256, false, false, 96},
  };
  if (quick) shapes.erase(shapes.begin() + 3);  // no 2048^3

  bool ok = true;
  for (const Shape& s : shapes) {
    if (!only.empty() && std::string(s.name).find(only) == std::string::npos) continue;
    Problem p(s);
    const double err = validate(p);
    if (err > 1e-5) {
      std::printf("FAIL %-14s %5ldx%5ldx%5ld  relative error %.3g\n", s.name, (long)s.M, (long)s.N, (long)s.K, err);
      ok = false;
      continue;
    }
    // Ours and OpenBLAS take turns (ROUNDS blocks of REPEATS each), so that a neighbour's load that comes and
    // goes hits both; the pauses let the other library's worker threads stop spinning first.
    const double gflop = 2.0 * s.M * s.N * s.K * s.batch * 1e-9;
    std::vector<double> t_ours, t_blas;
    for (int round = 0; round < rounds; ++round) {
      time_runs([&] { p.ours(); }, repeats, t_ours);
#ifdef CM_HAVE_OPENBLAS
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
      time_runs([&] { p.openblas(); }, repeats, t_blas);
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
#endif
    }
    // Median as the figure; the best run too, since on shared cores it shows what an idle machine gives.
    const double ours = gflop / median(t_ours), ours_best = gflop / *std::min_element(t_ours.begin(), t_ours.end());
    std::printf("%-14s %5ldx%5ldx%5ld%s  ours %6.1f GFLOP/s (best %6.1f)", s.name, (long)s.M, (long)s.N, (long)s.K,
                s.batch > 1 ? " x96" : "    ", ours, ours_best);
#ifdef CM_HAVE_OPENBLAS
    const double blas = gflop / median(t_blas), blas_best = gflop / *std::min_element(t_blas.begin(), t_blas.end());
    std::printf("  OpenBLAS %6.1f (best %6.1f)  ratio %.2f (best/best %.2f)", blas, blas_best, ours / blas,
                ours_best / blas_best);
#endif
    std::printf("  (max rel err %.1e)\n", err);
    std::fflush(stdout);
  }
  return ok ? 0 : 1;
}
