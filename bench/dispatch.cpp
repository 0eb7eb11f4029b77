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
// Second part (--layer runs it alone): the MoE layer's routing + dispatch path as a training step runs it
// (model/router.cpp, model/moe.cpp) at N = 256 and 1024 experts, against its memory-traffic floor. From the router
// logits to the combined output [T, C], with an identity standing in for the experts, for two routers with K = 2
// experts per token: flat top-2 ([T, N] logits) and the two-level tree (16 x 16 and 32 x 32; top 1 cluster, then
// top 2 experts in it, their gates renormalised), whose level 1 scores only its pairs' own node, [T, b1]. Per level
//   route_select (softmax, top k, gates, path) -> route_histogram (the level's counts);
// then make_dispatch_plan_nowait (the plan a training step makes: nothing read on the host) -> moe_permute ->
// moe_combine, the autograd ops recording their graph as in training; then the backward of that graph (combine,
// permute, each level's gates and softmax) from a random output gradient. The logits' GEMMs are not part of it
// (bench/routing_cost measures them), nor is the level-0 entropy statistic, which train_lm does not compute
// (ClusterMoELM::set_router_entropy): the stages line times the level-0 selection with it and without. The floor
// of each pass is the bytes it must read and write at least once (listed in layer_bytes) at this machine's copy
// bandwidth, measured in the same run: a copy of half as many bytes (it reads and writes them), by one thread
// (memcpy) and by all (an OpenMP split), the faster taken. The rounds alternate path and copies; medians over the
// rounds, in wall time and in process CPU time (the steadier on a shared machine). A ratio of 1 is the floor. The
// last two columns put the same bytes against a copy by streaming stores, split over the threads: no store reads
// its line first, so it moves them faster than memcpy does (the floor of a path whose kernels stream every output;
// ours store plainly, their outputs read back from the cache by the next kernel).
//
// Third part (--select, alone): the router's selection by itself (run_select below).
//
//   make -j2 USE_CUDA=0 build/bench/dispatch
//   OMP_NUM_THREADS=2 ./build/bench/dispatch [--quick | --layer | --select]
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <string>
#include <vector>

#include "autograd/ops.h"
#include "autograd/ops_moe.h"
#include "autograd/ops_route.h"
#include "bench/timing.h"
#include "engine/rng.h"
#include "kernels/dispatch.h"
#include "kernels/route.h"
#include "kernels/topk.h"

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX512F__)
#include <immintrin.h>
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
  cm::cpu::dispatch_combine_backward(dye.data(), dg.data(), d_out.data(), xe.data(), gate.data(), row_of.data(),
                                     assign_of.data(), T, Ap, K, C);
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
                                            assign_of.data(), T, Ap, K, C);
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

// ---------------------------------------------------------------- the layer's path against its floor

// A router's levels: branching b and the k kept per pair (the flat router is one level of N).
struct Level {
  int64_t b, k;
};

// The bytes the layer's routing + dispatch path must read and write at least once, forward and backward, for T
// tokens, a router's levels (K = the product of their k slots per token), N experts, C channels; f32 and i32
// values are 4 bytes, offsets 8. Level l has P = T * k_0 * .. * k_{l-1} pairs.
struct LayerBytes {
  double forward = 0, backward = 0;
};
LayerBytes layer_bytes(int64_t T, const std::vector<Level>& levels, int64_t N, int64_t C) {
  LayerBytes by;
  double P = (double)T, nodes = 1;
  for (size_t l = 0; l < levels.size(); ++l) {
    const double b = (double)levels[l].b, Pk = P * (double)levels[l].k, deeper = l > 0 ? 1 : 0;
    by.forward += 4 * (P * b + deeper * 2 * P)  // route_select: logits in, the pairs' nodes and parent path in
                  + 4 * (P * b + 3 * Pk)        // probs out; path, child ids, idx out
                  + 4 * (Pk + nodes * b);       // route_histogram: ids in, counts out
    by.backward += 4 * (P * b + 2 * Pk + P * b)  // gates + softmax backward: probs, idx, d_path in; d_logits out
                   + 4 * deeper * (P + P);        // parent path in, d_parent out
    P = Pk;
    nodes *= b;
  }
  const double TK = P, TC = (double)T * C, TKC = TK * C;
  by.forward += 4 * (3 * TK) + 8 * (N + 1)  // plan: ids in; row_of, assign_of, offsets out
                + 4 * (TK + TC + TKC)       // permute: assign_of, x in; rows out
                + 4 * (TKC + 2 * TK + TC);  // combine: rows, gates, row_of in; out
  by.backward += 4 * (TC + TKC + 2 * TK + TKC + TK)  // combine backward: d_out, rows, gates, row_of in; d_rows, d_gates
                 + 4 * (TKC + TK + TC);              // permute backward: d_rows, row_of in; dx out
  return by;
}


bool run_layer(int64_t T, const char* router, const std::vector<Level>& levels, int64_t C, int rounds) {
  using namespace cm;
  int64_t N = 1, K = 1;
  for (const Level& lv : levels) N *= lv.b, K *= lv.k;
  Generator g(1234 + N + (int64_t)levels.size());
  // Level l's logits [P_l, b_l]: each pair scored against its own node only (the tree's level 1 as routed_logits
  // makes it), random here as the flat router's are.
  std::vector<Tensor> logits;
  int64_t P = T;
  for (const Level& lv : levels) {
    logits.push_back(Tensor::randn({P, lv.b}, g).requires_grad_(true));
    P *= lv.k;
  }
  Tensor x = Tensor::randn({T, C}, g).requires_grad_(true);
  Tensor d_out = Tensor::randn({T, C}, g);
  Tensor out, gates;  // the output and the last level's gates [T * K] (the path products)
  // The forward's stages, each timed on its own (stage[]) besides the whole.
  std::vector<std::vector<double>> stage(5);
  const char* stage_name[5] = {"select", "histogram", "plan", "permute", "combine"};
  auto forward = [&] {
    auto t = std::chrono::steady_clock::now();
    std::vector<double> lapped(5, 0.0);
    auto lap = [&](int i) {
      const auto now = std::chrono::steady_clock::now();
      lapped[(size_t)i] += std::chrono::duration<double>(now - t).count();
      t = now;
    };
    // model/router.cpp: per level the fused selection (renorm_last: the last level's kept siblings share 1 when
    // k > 1; no entropy statistic, which train_lm turns off: timed on its own below; no loss on the probabilities,
    // as with aux-free balancing: the gates' gradient goes straight to the logits) and the level's counts.
    Tensor node, path;
    int64_t Pl = T, nodes = 1;
    for (size_t l = 0; l < levels.size(); ++l) {
      const Level& lv = levels[l];
      const bool renorm = l + 1 == levels.size() && lv.k > 1;
      LevelSelection sel =
          route_select(logits[l], node, path, Tensor(), Tensor(), nodes, 1.0f, lv.k, renorm, false, false);
      lap(0);
      Tensor counts = Tensor::empty({nodes * lv.b}, DType::I32);
      cpu::route_histogram(counts.i32(), sel.child.i32(), Pl * lv.k, nodes * lv.b, false);
      lap(1);
      node = sel.child;
      path = sel.path;
      Pl *= lv.k;
      nodes *= lv.b;
    }
    // model/moe.cpp, a dropless training step: the plan on the device's side (nothing read on the host), permute,
    // (experts), combine.
    DispatchPlan plan = make_dispatch_plan_nowait(node, K, N);
    lap(2);
    Tensor xs = moe_permute(x, plan);
    lap(3);
    out = moe_combine(xs, path, plan);  // identity experts
    lap(4);
    gates = path.detach();
    for (int i = 0; i < 5; ++i) stage[(size_t)i].push_back(lapped[(size_t)i]);
  };
  auto backward = [&] {
    out.backward(d_out);
    for (Tensor& l : logits) l.zero_grad();
    x.zero_grad();
  };
  // Validation: with identity experts, out[t] = x[t] * (the sum of t's K gates): 1 for the flat router (its two
  // gates renormalised), the chosen cluster's probability for the tree (its two experts share it).
  forward();
  {
    const std::vector<float> o = out.to_f32_vector(), xv = x.to_f32_vector(), gv = gates.to_f32_vector();
    for (size_t i = 0; i < o.size(); ++i) {
      const size_t t = i / (size_t)C;
      float share = 0.f;
      for (int64_t j = 0; j < K; ++j) share += gv[t * (size_t)K + (size_t)j];
      const float want = xv[i] * share;
      if (!(std::fabs(o[i] - want) <= 1e-5f + 1e-5f * std::fabs(want))) {
        std::printf("MISMATCH: the identity layer's output is not its input times the gates' sum at %zu\n", i);
        return false;
      }
    }
  }
  backward();

  const LayerBytes lb = layer_bytes(T, levels, N, C);
  const size_t copy_bytes = (size_t)(std::max(lb.forward, lb.backward) / 2);
  std::vector<float> src_f(copy_bytes / 4 + 16, 1.f), dst_f(copy_bytes / 4 + 16, 0.f);  // 64-aligned views below
  auto aligned = [](std::vector<float>& v) { return (char*)(((uintptr_t)v.data() + 63) / 64 * 64); };
  char *src = aligned(src_f), *dst = aligned(dst_f);
  auto copy_one = [&](size_t n) { std::memcpy(dst, src, n); };
  // The copy split over the threads, by memcpy or by streaming stores (which write a line without first reading
  // it: a plain store's read-for-ownership is a third transfer per line, which glibc's memcpy only avoids above
  // 240 MB here). The path's kernels store plainly: their outputs are read back by the next kernel, from the cache
  // (streaming stores in permute and combine were tried, and gained nothing in this path).
  auto copy_all = [&](size_t n, bool stream) {
#pragma omp parallel
    {
      int th = 0, nth = 1;
#ifdef _OPENMP
      th = omp_get_thread_num(), nth = omp_get_num_threads();
#endif
      size_t lo = n * (size_t)th / (size_t)nth, hi = n * (size_t)(th + 1) / (size_t)nth;
#if defined(__AVX512F__)
      if (stream) {
        lo = lo / 64 * 64, hi = th + 1 == nth ? n : hi / 64 * 64;  // whole lines (the vectors are 64-aligned)
        size_t i = lo;
        for (; i + 64 <= hi; i += 64)
          _mm512_stream_ps((float*)(dst + i), _mm512_load_ps((const float*)(src + i)));
        std::memcpy(dst + i, src + i, hi - i);
        _mm_sfence();
        lo = hi;
      }
#endif
      std::memcpy(dst + lo, src + lo, hi - lo);
    }
  };
  // Wall time and process CPU time (all threads, system time included: page faults are work too). On a shared
  // machine the CPU-time ratio is the steadier one: it counts the work, not the time the scheduler gave to others.
  struct Times {
    std::vector<double> wall, cpu;
  };
  auto cpu_now = [] {
    timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
  };
  auto timed = [&](Times& t, auto&& f) {
    const double c0 = cpu_now();
    const auto t0 = std::chrono::steady_clock::now();
    f();
    t.wall.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    t.cpu.push_back(cpu_now() - c0);
  };
  Times tf, tb, cf1, cfa, cfs, cb1, cba, cbs;
  for (int r = 0; r < rounds; ++r) {  // interleaved: path, then the copies of its bytes
    timed(tf, forward);
    timed(tb, backward);
    timed(cf1, [&] { copy_one((size_t)(lb.forward / 2)); });
    timed(cfa, [&] { copy_all((size_t)(lb.forward / 2), false); });
    timed(cfs, [&] { copy_all((size_t)(lb.forward / 2), true); });
    timed(cb1, [&] { copy_one((size_t)(lb.backward / 2)); });
    timed(cba, [&] { copy_all((size_t)(lb.backward / 2), false); });
    timed(cbs, [&] { copy_all((size_t)(lb.backward / 2), true); });
  }
  auto med = [](std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
  };
  auto row = [&](const char* what, const Times& t, const Times& one, const Times& all, const Times& st, double bytes) {
    const double fw = std::min(med(one.wall), med(all.wall)), fc = std::min(med(one.cpu), med(all.cpu));
    std::printf("| %lld | %s | %s | %.1f | %.2f | %.2f (%.1f GB/s; memcpy %.2f, %d threads %.2f) | **%.2f** | %.2f | %.2f "
                "| **%.2f** | %.2f (%.1f GB/s) | %.2f |\n",
                (long long)N, router, what, bytes / 1e6, 1e3 * med(t.wall), 1e3 * fw, bytes / fw / 1e9, 1e3 * med(one.wall),
#ifdef _OPENMP
                omp_get_max_threads(),
#else
                1,
#endif
                1e3 * med(all.wall), med(t.wall) / fw, 1e3 * med(t.cpu), 1e3 * fc, med(t.cpu) / fc,
                1e3 * med(st.wall), bytes / med(st.wall) / 1e9, med(t.wall) / med(st.wall));
  };
  row("forward", tf, cf1, cfa, cfs, lb.forward);
  row("backward", tb, cb1, cba, cbs, lb.backward);
  // The level-0 selection with the entropy statistic (on by default: tests, experiments) and without, in turn.
  std::vector<double> sel_ent, sel_plain;
  for (int r = 0; r < rounds; ++r)
    for (bool ent : {true, false}) {
      const auto t0 = std::chrono::steady_clock::now();
      const Level& lv = levels[0];
      LevelSelection sel = route_select(logits[0], Tensor(), Tensor(), Tensor(), Tensor(), 1, 1.0f, lv.k,
                                        levels.size() == 1 && lv.k > 1, ent, false);
      (ent ? sel_ent : sel_plain).push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
  std::string stages;
  for (int i = 0; i < 5; ++i) {
    std::vector<double> v(stage[(size_t)i].end() - rounds, stage[(size_t)i].end());  // the timed rounds
    char buf[96];
    std::snprintf(buf, sizeof buf, "%s%s %.2f", i ? ", " : "", stage_name[i], 1e3 * med(v));
    stages += buf;
  }
  std::printf("|  |  | forward stages, wall ms | %s; level-0 select %.2f, with the entropy statistic %.2f | | | | | | | | |\n",
              stages.c_str(), 1e3 * med(sel_plain), 1e3 * med(sel_ent));
  std::fflush(stdout);
  return true;
}

bool run_layer_paths() {
  const int64_t T = 16384, C = 128;
  const int rounds = 11;
  std::printf("\nMoE layer routing + dispatch path against its memory-traffic floor: T=%lld tokens, C=%lld, K=2 "
              "experts per token, identity experts; medians of %d interleaved rounds\n\n",
              (long long)T, (long long)C, rounds);
  std::printf("| N | router | pass | MB moved (floor) | path ms | floor ms (copy bandwidth) | path / floor | path CPU ms "
              "| floor CPU ms | path / floor (CPU) | streaming copy ms | path / streaming copy |\n"
              "|---|---|---|---|---|---|---|---|---|---|---|---|\n");
  bool ok = true;
  // The trees first: the flat router's [T, N] blocks (64 MB at N = 1024) change the heap's state for whatever
  // runs after them (a tree measured after them took up to 1.6x as long in the backward).
  for (int64_t N : {256, 1024}) {
    const int64_t b0 = N == 256 ? 16 : 32;
    ok = run_layer(T, "tree top-1 x top-2", {{b0, 1}, {N / b0, 2}}, C, rounds) && ok;
  }
  for (int64_t N : {256, 1024}) ok = run_layer(T, "flat top-2", {{N, 2}}, C, rounds) && ok;
  return ok;
}

// ---------------------------------------------------------------- the router's selection alone (--select)

// route_select alone, no graph, T = 16384 random rows of b children keeping k, on one thread (ns a row: the
// kernel's own speed, the row units of kernels/cpu/rows.h and topk.cpp, or the sixteen-row block); then a
// two-level tree's level 1 in training mode, on all threads: its forward (its parent path from level 0, its gates
// renormalised), and the backward of both levels from a random gate gradient. Medians of 101 runs after a warm-up.
bool run_select() {
  using namespace cm;
  const int64_t T = 16384;
  Generator g(99);
  std::printf("\nThe router's selection alone (route_select, T = %lld rows, no graph), one thread, median of 101\n\n"
              "| children | k | ns a row |\n|---|---|---|\n",
              (long long)T);
#ifdef _OPENMP
  const int threads = omp_get_max_threads();
  omp_set_num_threads(1);
#endif
  for (int64_t b : {4, 16, 32, 64, 256, 1024})
    for (int64_t k : {1, 2}) {
      const Tensor x = Tensor::randn({T, b}, g);
      const double s = bench::median_seconds(
          [&] { route_select(x, Tensor(), Tensor(), Tensor(), Tensor(), 1, 1.f, k, k > 1, false, false); }, 101);
      std::printf("| %lld | %lld | %.1f |\n", (long long)b, (long long)k, s * 1e9 / (double)T);
    }
#ifdef _OPENMP
  omp_set_num_threads(threads);
  std::printf("\nA two-level tree's level 1 in training mode (T = %lld; level 0 top 1, level 1 top 2 with its "
              "parent path), %d threads, median of 101\n\n",
              (long long)T, threads);
#endif
  std::printf("| children per level | level-1 forward ms | backward of both levels ms |\n|---|---|---|\n");
  for (int64_t b : {16, 32}) {
    Tensor x0 = Tensor::randn({T, b}, g).requires_grad_(true), x1 = Tensor::randn({T, b}, g).requires_grad_(true);
    const Tensor w = Tensor::randn({T * 2}, g);
    std::vector<double> fwd, bwd;
    for (int r = 0; r <= 101; ++r) {  // run 0 warms up
      LevelSelection s0 = route_select(x0, Tensor(), Tensor(), Tensor(), Tensor(), 1, 1.f, 1, false, false, false);
      const auto t0 = std::chrono::steady_clock::now();
      LevelSelection s1 = route_select(x1, s0.child, s0.path, Tensor(), Tensor(), b, 1.f, 2, true, false, false);
      const auto t1 = std::chrono::steady_clock::now();
      Tensor loss = sum(mul(s1.path, w));
      const auto t2 = std::chrono::steady_clock::now();
      loss.backward();
      const auto t3 = std::chrono::steady_clock::now();
      if (r > 0) {
        fwd.push_back(std::chrono::duration<double>(t1 - t0).count());
        bwd.push_back(std::chrono::duration<double>(t3 - t2).count());
      }
      x0.zero_grad();
      x1.zero_grad();
    }
    std::sort(fwd.begin(), fwd.end());
    std::sort(bwd.begin(), bwd.end());
    std::printf("| %lld | %.3f | %.3f |\n", (long long)b, fwd[fwd.size() / 2] * 1e3, bwd[bwd.size() / 2] * 1e3);
  }
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string arg = argc > 1 ? argv[1] : "";
  if (argc > 2 || (!arg.empty() && arg != "--quick" && arg != "--layer" && arg != "--select")) {
    std::fprintf(stderr, "usage: dispatch [--quick | --layer | --select]\n");
    return 2;
  }
  if (arg == "--select") return run_select() ? 0 : 1;
  const bool quick = arg == "--quick", layer_only = arg == "--layer";
  bool ok = true;
  if (!layer_only) {
#ifdef _OPENMP
    std::printf("dispatch lab, %d threads (naive: 1), median of %d\n", omp_get_max_threads(), REPEATS);
#endif
    std::vector<int64_t> Ks = quick ? std::vector<int64_t>{2} : std::vector<int64_t>{1, 2, 4, 8};
    for (int64_t K : Ks) ok = run(65536, 64, K, 384, 0.05f) && ok;
    if (!quick) ok = run(65536, 1024, 2, 384, 0.05f) && ok;  // many small experts: the sort's histogram is wider
  }
  if (!quick) ok = run_layer_paths() && ok;
  return ok ? 0 : 1;
}
