// CPU MoE dispatch. See kernels/dispatch.h for the layout (A = T*K assignments, rows, offsets) and the contract.
#include "kernels/dispatch.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "engine/check.h"
#include "kernels/cpu/fastmath.h"
#include "kernels/cpu/parallel.h"
#include "kernels/cpu/rows.h"
#include "kernels/cpu/stream.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace cm::cpu {
namespace {

// The counting sort runs on P contiguous chunks of the assignment list: chunk p counts its own ids, then its
// start inside expert e's segment is offsets[e] + (ids of e in chunks before p). Chunks are in assignment order,
// so the scatter is stable, and the permutation comes out the same for any P: P only changes the speed.
struct Chunks {
  int64_t P;
  int64_t A;
  int64_t begin(int64_t p) const { return A * p / P; }
};

Chunks make_chunks(int64_t A) {
  int64_t P = 1;
#ifdef _OPENMP
  P = omp_get_max_threads();
#endif
  P = std::max<int64_t>(1, std::min<int64_t>(P, A / 16384));  // small lists: one chunk, no thread start-up
  return Chunks{P, A};
}

// local[p*N + e] = ids of e in chunk p. Returns the number of ids outside [-1, N).
int64_t chunk_histograms(std::vector<int64_t>& local, const Chunks& ch, const int32_t* __restrict expert,
                         int64_t N) {
  local.assign((size_t)(ch.P * N), 0);
  int64_t bad = 0;
#pragma omp parallel for schedule(static, 1) num_threads(ch.P) if (ch.P > 1) reduction(+ : bad)
  for (int64_t p = 0; p < ch.P; ++p) {
    int64_t* __restrict cnt = local.data() + p * N;
    const int64_t a0 = ch.begin(p), a1 = ch.begin(p + 1);  // locals: cnt[] stores could alias ch's fields
    for (int64_t a = a0; a < a1; ++a) {
      int32_t e = expert[a];
      if (e >= 0 && e < N)
        cnt[e]++;
      else if (e != -1)
        bad++;
    }
  }
  return bad;
}

void scatter_with(int32_t* __restrict row_of, int32_t* __restrict assign_of, const int32_t* __restrict expert,
                  const int64_t* offsets, std::vector<int64_t>& local, const Chunks& ch, int64_t N) {
  // Turn per-chunk counts into per-chunk write cursors, in place.
  for (int64_t e = 0; e < N; ++e) {
    int64_t pos = offsets[e];
    for (int64_t p = 0; p < ch.P; ++p) {
      int64_t c = local[(size_t)(p * N + e)];
      local[(size_t)(p * N + e)] = pos;
      pos += c;
    }
  }
#pragma omp parallel for schedule(static, 1) num_threads(ch.P) if (ch.P > 1)
  for (int64_t p = 0; p < ch.P; ++p) {
    int64_t* __restrict cur = local.data() + p * N;
    const int64_t a0 = ch.begin(p), a1 = ch.begin(p + 1);
    for (int64_t a = a0; a < a1; ++a) {
      int32_t e = expert[a];
      if (e >= 0 && e < N) {
        int64_t r = cur[e]++;
        row_of[a] = (int32_t)r;
        assign_of[r] = (int32_t)a;
      } else {
        row_of[a] = -1;
      }
    }
  }
}

// dst = src over C floats. A plain loop here is turned back into a call to memcpy, whose overhead on a row of 128
// floats is as much as the copy; without AVX-512 that call is what runs.
inline void copy_row(float* __restrict dst, const float* __restrict src, int64_t C) {
#if defined(__AVX512F__)
  int64_t c = 0;
  for (; c + 16 <= C; c += 16) _mm512_storeu_ps(dst + c, _mm512_loadu_ps(src + c));
  if (c < C) {
    const __mmask16 m = (__mmask16)((1u << (C - c)) - 1u);
    _mm512_mask_storeu_ps(dst + c, m, _mm512_maskz_loadu_ps(m, src + c));
  }
#else
  std::memcpy(dst, src, (size_t)C * sizeof(float));
#endif
}

}  // namespace

int64_t dispatch_histogram(int64_t* counts, const int32_t* expert, int64_t A, int64_t N) {
  Chunks ch = make_chunks(A);
  std::vector<int64_t> local;
  int64_t bad = chunk_histograms(local, ch, expert, N);
  for (int64_t e = 0; e < N; ++e) {
    int64_t s = 0;
    for (int64_t p = 0; p < ch.P; ++p) s += local[(size_t)(p * N + e)];
    counts[e] = s;
  }
  return bad;
}

void dispatch_offsets(int64_t* offsets, const int64_t* counts, int64_t N) {
  offsets[0] = 0;
  for (int64_t e = 0; e < N; ++e) offsets[e + 1] = offsets[e] + counts[e];
}

void dispatch_scatter(int32_t* row_of, int32_t* assign_of, const int32_t* expert, const int64_t* offsets, int64_t A,
                      int64_t N) {
  Chunks ch = make_chunks(A);
  std::vector<int64_t> local;
  chunk_histograms(local, ch, expert, N);
  scatter_with(row_of, assign_of, expert, offsets, local, ch, N);
}

int64_t dispatch_plan(int64_t* counts, int64_t* offsets, int32_t* row_of, int32_t* assign_of, const int32_t* expert,
                      int64_t A, int64_t N) {
  Chunks ch = make_chunks(A);
  std::vector<int64_t> local;
  int64_t bad = chunk_histograms(local, ch, expert, N);  // one counting pass serves counts and the scatter
  for (int64_t e = 0; e < N; ++e) {
    int64_t s = 0;
    for (int64_t p = 0; p < ch.P; ++p) s += local[(size_t)(p * N + e)];
    counts[e] = s;
  }
  dispatch_offsets(offsets, counts, N);
  scatter_with(row_of, assign_of, expert, offsets, local, ch, N);
  return bad;
}

void dispatch_plan_nowait(int64_t* counts, int64_t* offsets, int32_t* row_of, int32_t* assign_of,
                          const int32_t* expert, int64_t A, int64_t N) {
  const int64_t bad = dispatch_plan(counts, offsets, row_of, assign_of, expert, A, N);
  CM_CHECK(bad == 0, "dispatch_plan: ", bad, " expert ids out of range [-1, ", N, ")");
  for (int64_t r = offsets[N]; r < A; ++r) assign_of[r] = -1;  // rows no kept slot fills
}

// Row by row for a small buffer: each row's token row gathered from x. A large one (kTokenOrderBytes and more) is
// written token by token instead: x read once, in order, each token row stored to its slots' rows by streaming
// stores (kernels/cpu/stream.h: whole lines, without reading each line for ownership first) where the rows are
// whole lines. Gathering row by row read every token row K times from wherever it was and read each written line
// for ownership. At 16384 tokens, 2 slots and 128 channels (a 16 MB buffer): 1.15-1.72 ms row by row, 0.79-0.94
// token by token (bench/dispatch --layer's permute stage, bench/RESULTS.md). The next kernel then reads the rows
// from memory rather than the cache; combine, reading them at once, took no longer there. The values are the same
// copies.
constexpr int64_t kTokenOrderBytes = (int64_t)4 << 20;

void dispatch_permute(float* xe, const float* x, const int32_t* assign_of, int64_t Ap, int64_t K, int64_t C) {
  const uint32_t k = (uint32_t)K;  // a slot's token a / K in 32 bits: a 64-bit idiv a row cost more than its copy
  if (Ap * C * (int64_t)sizeof(float) < kTokenOrderBytes) {
#pragma omp parallel for schedule(static) if (Ap * C >= parallel_min())
    for (int64_t r = 0; r < Ap; ++r) {
      const int32_t a = assign_of[r];
      if (a < 0) std::memset(xe + r * C, 0, (size_t)C * sizeof(float));  // a row no slot fills: zeros
      else copy_row(xe + r * C, x + (int64_t)((uint32_t)a / k) * C, C);
    }
    return;
  }
  // The rows' slots inverted, inv[a] = r (-1: a dropped slot), up to the largest slot a row holds; rows no slot
  // fills are zeroed on the way.
  int32_t amax = -1;
#pragma omp parallel for schedule(static) reduction(max : amax) if (Ap >= parallel_min())
  for (int64_t r = 0; r < Ap; ++r) amax = std::max(amax, assign_of[r]);
  static thread_local std::vector<int32_t> inv_buf;
  inv_buf.assign((size_t)amax + 1, -1);
  int32_t* inv = inv_buf.data();
  [[maybe_unused]] const bool stream = stream_rows(xe, Ap * C, C, kTokenOrderBytes);  // false without AVX-512
  const int64_t T = (amax + K) / K;  // the tokens up to the largest slot's
#pragma omp parallel
  {
#pragma omp for schedule(static)
    for (int64_t r = 0; r < Ap; ++r) {
      const int32_t a = assign_of[r];
      if (a >= 0) inv[a] = (int32_t)r;
      else std::memset(xe + r * C, 0, (size_t)C * sizeof(float));
    }
#pragma omp for schedule(static)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t j = 0; j < K && t * K + j <= amax; ++j) {
        const int32_t r = inv[t * K + j];
        if (r < 0) continue;
#if defined(__AVX512F__)
        if (stream) {
          stream_row(xe + (int64_t)r * C, x + t * C, C);
          continue;
        }
#endif
        copy_row(xe + (int64_t)r * C, x + t * C, C);
      }
    stream_fence();
  }
}

// A token's rows lie anywhere in the expert-ordered buffer, a few lines each: too short for the hardware prefetcher
// to find them before they are read, so a loop gathering them asks for the rows of the token kPrefetchTokens on.
constexpr int64_t kPrefetchTokens = 2;
inline void prefetch_token_rows(const float* base, const int32_t* rows, int64_t K, int64_t C) {
  for (int64_t j = 0; j < K; ++j) {
    if (rows[j] < 0) continue;
    const char* p = (const char*)(base + (int64_t)rows[j] * C);
    for (int64_t b = 0; b < C * (int64_t)sizeof(float); b += 64) __builtin_prefetch(p + b);
  }
}

// dx[t] = (0 + d_xe[first kept row]) + d_xe[second] + ...: the sum from zero as index_add made it (0 + -0 is +0),
// each row of dx written once, without a pass zeroing it first.
void dispatch_permute_backward(float* dx, const float* d_xe, const int32_t* row_of, int64_t T, int64_t K, int64_t C) {
#pragma omp parallel for schedule(static) if (T * K * C >= parallel_min())
  for (int64_t t = 0; t < T; ++t) {
    if (t + kPrefetchTokens < T) prefetch_token_rows(d_xe, row_of + (t + kPrefetchTokens) * K, K, C);
    float* __restrict o = dx + t * C;
    bool first = true;
    for (int64_t j = 0; j < K; ++j) {
      int64_t r = row_of[t * K + j];
      if (r < 0) continue;
      const float* __restrict g = d_xe + r * C;
      if (first)
        for (int64_t c = 0; c < C; ++c) o[c] = 0.f + g[c];
      else
        for (int64_t c = 0; c < C; ++c) o[c] += g[c];
      first = false;
    }
    if (first) std::memset(o, 0, (size_t)C * sizeof(float));  // every slot of t dropped
  }
}

// out[t] = sum over t's kept slots, in slot order, of gate * ye[row], accumulated from zero: the first term is
// fma(gate, y, +0) (or gate * y + 0 without FMA), as an axpy into a zeroed row computed it, without the zeroing
// pass and a read of the row back.
void dispatch_combine(float* out, const float* ye, const float* gate, const int32_t* row_of, int64_t T, int64_t K,
                      int64_t C) {
#pragma omp parallel for schedule(static) if (T * K * C >= parallel_min())
  for (int64_t t = 0; t < T; ++t) {
    if (t + kPrefetchTokens < T) prefetch_token_rows(ye, row_of + (t + kPrefetchTokens) * K, K, C);
    float* __restrict o = out + t * C;
    bool first = true;
    for (int64_t j = 0; j < K; ++j) {
      int64_t r = row_of[t * K + j];
      if (r < 0) continue;
      const float s = gate[t * K + j];
      const float* __restrict y = ye + r * C;
      if (first)
        for (int64_t c = 0; c < C; ++c) o[c] = mul_add(s, y[c], 0.f);
      else
        for (int64_t c = 0; c < C; ++c) o[c] = mul_add(s, y[c], o[c]);
      first = false;
    }
    if (first) std::memset(o, 0, (size_t)C * sizeof(float));  // every slot of t dropped
  }
}

void dispatch_combine_backward(float* d_ye, float* d_gate, const float* d_out, const float* ye, const float* gate,
                               const int32_t* row_of, const int32_t* assign_of, int64_t T, int64_t Ap, int64_t K,
                               int64_t C) {
  // In the rows' order (the plan's assign_of): each row's gradient and its gate's dot product read and write the
  // expert-ordered rows in sequence, and the scattered access is a read of its token's d_out row. In the tokens'
  // order both rows were scattered, and the row writes (a line read for ownership, then written back) were most of
  // this kernel's time. The same arithmetic per row and per gate: the same bits.
  const int64_t A = T * K;
  if (d_gate)
#pragma omp parallel for schedule(static) if (A >= parallel_min())
    for (int64_t a = 0; a < A; ++a)
      if (row_of[a] < 0) d_gate[a] = 0.f;  // a dropped slot
  // d_ye by streaming stores when what the loop touches (d_out, ye, d_ye) outgrows the last-level cache: its first
  // rows are gone from the cache before the next kernel (the experts' backward) reads them, so writing each line
  // whole, without reading it for ownership first, is all gain. At 16384 tokens, 2 slots and 128 channels (40 MB):
  // 2.2-2.3 ms -> 1.7-1.9 with the next kernel's time unchanged; at 8192 (20 MB) streaming took as long and the
  // next kernel, reading from memory, 20-40% longer.
  const int64_t touched = (T + 2 * Ap) * C * (int64_t)sizeof(float);
  [[maybe_unused]] const bool stream = d_ye && touched >= kStreamBytes && stream_rows(d_ye, Ap * C, C, 0);
#pragma omp parallel if (Ap * C >= parallel_min())
  {
#pragma omp for schedule(static)
    for (int64_t r = 0; r < Ap; ++r) {
      const int64_t a = assign_of[r];
      if (a < 0) continue;  // a row no slot fills (a nowait plan's tail)
      const float* __restrict g = d_out + a / K * C;
      if (d_ye) {
        float* __restrict dy = d_ye + r * C;
        const float s = gate[a];
#if defined(__AVX512F__)
        if (stream) stream_scaled_row(dy, g, s, C);
        else
#endif
          for (int64_t c = 0; c < C; ++c) dy[c] = s * g[c];
      }
      if (d_gate) d_gate[a] = dot_row(g, ye + r * C, C);
    }
    stream_fence();
  }
}

}  // namespace cm::cpu
