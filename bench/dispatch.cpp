// MoE dispatch lab: the five stages of kernels/dispatch.h at a routing shape (T = 65536 tokens, N = 64 experts,
// C = 384 channels, K = 1..8 experts per token, 5% of assignments dropped as a capacity filter would), each
// against a naive scalar version written the straightforward way: a serial counting sort, an element-by-element
// row copy, and combine / permute-backward as a serial scatter-add over the expert-ordered rows (what an
// index_add-based implementation does). Ours runs with OpenMP, so the ratio includes the threads.
// Expert ids come from our top-k of random logits [T, N] (K distinct experts per token, as the router makes them).
// Validation first: the plan must equal the naive one exactly, the float stages within 1e-5 (abs + rel) (they add
// the same terms in a different order). Time: median of REPEATS runs after one warm-up run.
// GB/s counts the bytes a stage must move at least once (rows of C floats, plus ids/gates/rows as 4 bytes each).
//
//   make -j2 USE_CUDA=0 build/bench/dispatch
//   OMP_NUM_THREADS=2 ./build/bench/dispatch [--quick]
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "bench/timing.h"
#include "engine/rng.h"
#include "kernels/dispatch.h"
#include "kernels/topk.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

using cm::bench::median_seconds;

constexpr int REPEATS = 5;


// ---------------------------------------------------------------- the naive versions (serial, scalar)

void naive_plan(int64_t* offsets, int32_t* row_of, int32_t* assign_of, const int32_t* expert, int64_t A, int64_t N) {
  std::vector<int64_t> cnt((size_t)N, 0);
  for (int64_t a = 0; a < A; ++a)
    if (expert[a] >= 0) cnt[(size_t)expert[a]]++;
  offsets[0] = 0;
  for (int64_t e = 0; e < N; ++e) offsets[e + 1] = offsets[e] + cnt[(size_t)e];
  std::vector<int64_t> cur(offsets, offsets + N);
  for (int64_t a = 0; a < A; ++a) {
    row_of[a] = -1;
    if (expert[a] < 0) continue;
    int64_t r = cur[(size_t)expert[a]]++;
    row_of[a] = (int32_t)r;
    assign_of[r] = (int32_t)a;
  }
}

void naive_permute(float* xe, const float* x, const int32_t* assign_of, int64_t Ap, int64_t K, int64_t C) {
  for (int64_t r = 0; r < Ap; ++r)
    for (int64_t c = 0; c < C; ++c) xe[r * C + c] = x[assign_of[r] / K * C + c];
}

void naive_combine(float* out, const float* ye, const float* gate, const int32_t* assign_of, int64_t Ap, int64_t T,
                   int64_t K, int64_t C) {
  std::memset(out, 0, (size_t)(T * C) * 4);
  for (int64_t r = 0; r < Ap; ++r) {
    int64_t a = assign_of[r], t = a / K;
    for (int64_t c = 0; c < C; ++c) out[t * C + c] += gate[a] * ye[r * C + c];
  }
}

void naive_combine_backward(float* d_ye, float* d_gate, const float* d_out, const float* ye, const float* gate,
                            const int32_t* assign_of, int64_t Ap, int64_t A, int64_t K, int64_t C) {
  std::memset(d_gate, 0, (size_t)A * 4);
  for (int64_t r = 0; r < Ap; ++r) {
    int64_t a = assign_of[r], t = a / K;
    float s = 0.f;
    for (int64_t c = 0; c < C; ++c) {
      d_ye[r * C + c] = gate[a] * d_out[t * C + c];
      s += d_out[t * C + c] * ye[r * C + c];
    }
    d_gate[a] = s;
  }
}

void naive_permute_backward(float* dx, const float* d_xe, const int32_t* assign_of, int64_t Ap, int64_t T, int64_t K,
                            int64_t C) {
  std::memset(dx, 0, (size_t)(T * C) * 4);
  for (int64_t r = 0; r < Ap; ++r) {
    int64_t t = assign_of[r] / K;
    for (int64_t c = 0; c < C; ++c) dx[t * C + c] += d_xe[r * C + c];
  }
}

// ---------------------------------------------------------------- driver

bool close(const std::vector<float>& a, const std::vector<float>& b, size_t n, const char* what) {
  for (size_t i = 0; i < n; ++i)
    if (!(std::fabs(a[i] - b[i]) <= 1e-5f + 1e-5f * std::fabs(b[i]))) {
      std::printf("MISMATCH in %s at %zu: %g vs %g\n", what, i, a[i], b[i]);
      return false;
    }
  return true;
}

void line(const char* stage, double ours, double ref, double bytes) {
  std::printf("  %-18s ours %8.3f ms %7.2f GB/s | naive %8.3f ms %7.2f GB/s | x%.1f\n", stage, ours * 1e3,
              bytes / ours * 1e-9, ref * 1e3, bytes / ref * 1e-9, ref / ours);
  std::fflush(stdout);
}

bool run(int64_t T, int64_t N, int64_t K, int64_t C, float drop) {
  const int64_t A = T * K;
  // Router stand-in: K distinct experts per token from random logits, then a random 5% dropped.
  std::vector<float> logits((size_t)(T * N)), topv((size_t)A);
  for (size_t i = 0; i < logits.size(); ++i) logits[i] = cm::philox_uniform(1, 0, i);
  std::vector<int32_t> expert((size_t)A);
  cm::cpu::topk_forward(topv.data(), expert.data(), logits.data(), T, N, K);
  for (int64_t a = 0; a < A; ++a)
    if (cm::philox_uniform(2, 0, (uint64_t)a) < drop) expert[(size_t)a] = -1;
  std::vector<float> x((size_t)(T * C)), gate((size_t)A), d_out((size_t)(T * C));
  for (size_t i = 0; i < x.size(); ++i) x[i] = 2.f * cm::philox_uniform(3, 0, i) - 1.f;
  for (size_t i = 0; i < gate.size(); ++i) gate[i] = cm::philox_uniform(4, 0, i);
  for (size_t i = 0; i < d_out.size(); ++i) d_out[i] = 2.f * cm::philox_uniform(5, 0, i) - 1.f;

  // Plan: ours and naive must agree exactly.
  std::vector<int64_t> counts((size_t)N), offsets((size_t)N + 1), roffsets((size_t)N + 1);
  std::vector<int32_t> row_of((size_t)A), assign_of((size_t)A), rrow_of((size_t)A), rassign_of((size_t)A);
  cm::cpu::dispatch_plan(counts.data(), offsets.data(), row_of.data(), assign_of.data(), expert.data(), A, N);
  naive_plan(roffsets.data(), rrow_of.data(), rassign_of.data(), expert.data(), A, N);
  const int64_t Ap = offsets[(size_t)N];
  if (offsets != roffsets || row_of != rrow_of ||
      !std::equal(assign_of.begin(), assign_of.begin() + Ap, rassign_of.begin())) {
    std::printf("MISMATCH in the plan\n");
    return false;
  }

  // Expert outputs: the permuted inputs themselves (an identity expert) are as good as any for moving bytes.
  const size_t rowsC = (size_t)(Ap * C), tokC = (size_t)(T * C);
  std::vector<float> xe(rowsC), rxe(rowsC), out(tokC), rout(tokC), dye(rowsC), rdye(rowsC), dg((size_t)A),
      rdg((size_t)A), dx(tokC), rdx(tokC);
  cm::cpu::dispatch_permute(xe.data(), x.data(), assign_of.data(), Ap, K, C);
  naive_permute(rxe.data(), x.data(), assign_of.data(), Ap, K, C);
  cm::cpu::dispatch_combine(out.data(), xe.data(), gate.data(), row_of.data(), T, K, C);
  naive_combine(rout.data(), xe.data(), gate.data(), assign_of.data(), Ap, T, K, C);
  cm::cpu::dispatch_combine_backward(dye.data(), dg.data(), d_out.data(), xe.data(), gate.data(), row_of.data(), T, K,
                                     C);
  naive_combine_backward(rdye.data(), rdg.data(), d_out.data(), xe.data(), gate.data(), assign_of.data(), Ap, A, K, C);
  cm::cpu::dispatch_permute_backward(dx.data(), dye.data(), row_of.data(), T, K, C);
  naive_permute_backward(rdx.data(), dye.data(), assign_of.data(), Ap, T, K, C);
  if (!close(xe, rxe, rowsC, "permute") || !close(out, rout, tokC, "combine") ||
      !close(dye, rdye, rowsC, "combine_bwd d_ye") || !close(dg, rdg, (size_t)A, "combine_bwd d_gate") ||
      !close(dx, rdx, tokC, "permute_bwd"))
    return false;

  std::printf("T=%lld N=%lld K=%lld C=%lld: %lld of %lld assignments kept\n", (long long)T, (long long)N,
              (long long)K, (long long)C, (long long)Ap, (long long)A);
  const double row_bytes = 4.0 * (double)Ap * (double)C, tok_bytes = 4.0 * (double)T * (double)C;
  line("plan (sort)",
       median_seconds([&] {
         cm::cpu::dispatch_plan(counts.data(), offsets.data(), row_of.data(), assign_of.data(), expert.data(), A, N);
       }, REPEATS),
       median_seconds([&] { naive_plan(roffsets.data(), rrow_of.data(), rassign_of.data(), expert.data(), A, N); }, REPEATS),
       4.0 * (2.0 * (double)A + (double)Ap));
  line("permute", median_seconds([&] { cm::cpu::dispatch_permute(xe.data(), x.data(), assign_of.data(), Ap, K, C); }, REPEATS),
       median_seconds([&] { naive_permute(rxe.data(), x.data(), assign_of.data(), Ap, K, C); }, REPEATS), 2.0 * row_bytes);
  line("combine",
       median_seconds([&] { cm::cpu::dispatch_combine(out.data(), xe.data(), gate.data(), row_of.data(), T, K, C); }, REPEATS),
       median_seconds([&] { naive_combine(rout.data(), xe.data(), gate.data(), assign_of.data(), Ap, T, K, C); }, REPEATS),
       row_bytes + tok_bytes + 8.0 * (double)A);
  line("combine backward",
       median_seconds([&] {
         cm::cpu::dispatch_combine_backward(dye.data(), dg.data(), d_out.data(), xe.data(), gate.data(), row_of.data(),
                                            T, K, C);
       }, REPEATS),
       median_seconds([&] {
         naive_combine_backward(rdye.data(), rdg.data(), d_out.data(), xe.data(), gate.data(), assign_of.data(), Ap, A,
                                K, C);
       }, REPEATS),
       2.0 * row_bytes + tok_bytes + 12.0 * (double)A);
  line("permute backward",
       median_seconds([&] { cm::cpu::dispatch_permute_backward(dx.data(), dye.data(), row_of.data(), T, K, C); }, REPEATS),
       median_seconds([&] { naive_permute_backward(rdx.data(), dye.data(), assign_of.data(), Ap, T, K, C); }, REPEATS),
       row_bytes + tok_bytes);
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  bool quick = argc > 1 && std::string(argv[1]) == "--quick";
#ifdef _OPENMP
  std::printf("dispatch lab, %d threads (naive: 1), median of %d\n", omp_get_max_threads(), REPEATS);
#endif
  bool ok = true;
  std::vector<int64_t> Ks = quick ? std::vector<int64_t>{2} : std::vector<int64_t>{1, 2, 4, 8};
  for (int64_t K : Ks) ok = run(65536, 64, K, 384, 0.05f) && ok;
  if (!quick) ok = run(65536, 1024, 2, 384, 0.05f) && ok;  // many small experts: the sort's histogram is wider
  return ok ? 0 : 1;
}
