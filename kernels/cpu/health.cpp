// CPU twin of the experts' fault guard and health update (contract in kernels/health.h).
#include "kernels/health.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "kernels/cpu/parallel.h"
#include "kernels/cpu/transpose.h"

namespace cm::cpu {

namespace {

int64_t first_row(const int64_t* offsets, int64_t e) { return offsets ? offsets[e] : 0; }

// A row's norm: the square root of its double sum of squares, in column order.
double row_norm(const float* r, int64_t C) {
  double ss = 0.0;
  for (int64_t c = 0; c < C; ++c) ss += (double)r[c] * r[c];
  return std::sqrt(ss);
}

#if defined(__AVX512F__)
// row_norm of the sixteen rows y[0 .. 16) at once, a row per lane (two vectors of eight doubles): each strip of 16
// columns transposed in registers, then one chain per row in column order, as row_norm's. A float squared in
// double is exact (a 48-bit product), so the fused multiply-add rounds as ss + x * x does: row_norm's bits. One row
// alone is a chain of C dependent adds; sixteen of them side by side run at the adds' throughput, not latency.
void row_norms16(double* norms, const float* y, int64_t C) {
  __m512d lo = _mm512_setzero_pd(), hi = _mm512_setzero_pd();  // rows 0-7, 8-15
  for (int64_t c = 0; c < C; c += 16) {
    const int cols = (int)std::min<int64_t>(16, C - c);
    const __mmask16 in = (__mmask16)((1u << cols) - 1);
    __m512 r[16];
    for (int i = 0; i < 16; ++i) r[i] = _mm512_maskz_loadu_ps(in, y + i * C + c);
    transpose16(r);  // r[t] lane i: row i, column c + t
    for (int t = 0; t < cols; ++t) {
      const __m512d a = _mm512_cvtps_pd(_mm512_castps512_ps256(r[t]));
      const __m512d b = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(r[t]), 1)));
      lo = _mm512_fmadd_pd(a, a, lo);
      hi = _mm512_fmadd_pd(b, b, hi);
    }
  }
  _mm512_storeu_pd(norms, _mm512_sqrt_pd(lo));
  _mm512_storeu_pd(norms + 8, _mm512_sqrt_pd(hi));
}
#endif

}  // namespace

void expert_guard_forward(float* out, int32_t* ok, int32_t* counts, double* pend, double* norms, const float* y,
                          const int64_t* offsets, int64_t N, int64_t S, int64_t C, const float* state, float factor,
                          bool zero_bad, bool count, bool count_traffic) {
  int64_t done = 0;  // rows whose norm is made sixteen at a time
#if defined(__AVX512F__)
  done = S / 16 * 16;
#pragma omp parallel for schedule(static) if (S * C >= parallel_min())
  for (int64_t i = 0; i < done; i += 16) row_norms16(norms + i, y + i * C, C);
#endif
  for (int64_t i = done; i < S; ++i) norms[i] = row_norm(y + i * C, C);
  // Classification and counters per expert in row order (deterministic double sums).
  int64_t nonfinite = 0, outlier = 0;
  for (int64_t e = 0; e < N; ++e) {
    const int64_t a = first_row(offsets, e), z = offsets ? offsets[e + 1] : S;
    const float ema = state[N + e];
    int64_t bad = 0, good = 0;
    double norm_sum = 0.0;
    for (int64_t i = a; i < z; ++i) {
      const double nm = norms[i];
      const bool inf = shared::guard_nonfinite(nm), far = shared::guard_outlier(nm, ema, factor);
      if (inf || far) {
        ++bad;
        nonfinite += inf;
        outlier += far;
        norms[i] = -1.0;  // marks the row for the copy below
      } else {
        ++good;
        norm_sum += nm;
      }
    }
    shared::guard_record(ok, pend, e, N, z - a, bad, good, norm_sum, count, count_traffic);
  }
  if (counts) {
    counts[0] = (int32_t)nonfinite;
    counts[1] = (int32_t)outlier;
  }
  if (!out) return;
#pragma omp parallel for schedule(static) if (S * C >= parallel_min())
  for (int64_t i = 0; i < S; ++i) {
    if (zero_bad && norms[i] < 0.0)
      std::memset(out + i * C, 0, (size_t)C * sizeof(float));
    else if (out != y)
      std::memcpy(out + i * C, y + i * C, (size_t)C * sizeof(float));
  }
}

void expert_gate_backward(float* dx, const float* g, const int32_t* ok, int64_t n) {
  if (*ok) {
    if (dx != g) std::memcpy(dx, g, (size_t)n * sizeof(float));
  } else {
    std::memset(dx, 0, (size_t)n * sizeof(float));
  }
}

void expert_rows_zero(float* x, const int32_t* ok, const int64_t* offsets, int64_t N, int64_t cols) {
  for (int64_t e = 0; e < N; ++e) {
    if (ok[e]) continue;
    const int64_t a = offsets ? offsets[e] : e, z = offsets ? offsets[e + 1] : e + 1;
    if (z > a) std::memset(x + a * cols, 0, (size_t)((z - a) * cols) * sizeof(float));
  }
}

void expert_traffic_add(double* pend, const int32_t* counts, int64_t N) {
  for (int64_t e = 0; e < N; ++e) pend[4 * N + e] += (double)counts[e];
}

void expert_health_update(float* state, double* pend, const float* sums, const int64_t* meta, const float* pruned,
                          int64_t N, float decay, float factor, float rel_min, bool use_reliability) {
  int64_t at = 0;  // expert e's sums start here
  for (int64_t e = 0; e < N; ++e) {
    const int64_t nw = meta[e], ng = meta[N + e];
    if (pruned && pruned[e] != 0.f) {  // pruned where the flags live: its sums are there, unread
      at += nw + ng;
      continue;
    }
    if (nw == 0) continue;  // pruned
    double wss = 0.0, gss = 0.0;
    for (int64_t i = at; i < at + nw; ++i) wss += (double)sums[i];
    for (int64_t i = at + nw; i < at + nw + ng; ++i) gss += (double)sums[i];
    at += nw + ng;
    const double wn = std::sqrt(wss);
    float& rel = state[e];
    float& ema = state[N + e];
    float& wema = state[2 * N + e];
    const bool weights_ok =
        std::isfinite(wn) && (wema <= 0.f || (wn <= (double)factor * wema && wn >= (double)wema / factor));
    if (weights_ok) wema = wema > 0.f ? decay * wema + (1.f - decay) * (float)wn : (float)wn;
    const double rows = pend[e], bad = pend[N + e], good = pend[2 * N + e];
    if (good > 0.0 && bad == 0.0) {
      const float mean = (float)(pend[3 * N + e] / good);
      ema = ema > 0.f ? decay * ema + (1.f - decay) * mean : mean;
    }
    if (!use_reliability) continue;
    const bool grads_ok = std::isfinite(gss);
    float health = 0.f;
    if (weights_ok && grads_ok) {
      if (rows <= 0.0) continue;  // no evidence this step: the reliability stays
      health = 1.f - (float)bad / (float)rows;
    }
    rel = std::clamp(decay * rel + (1.f - decay) * health, rel_min, 1.f);
  }
  double total = 0.0;
  for (int64_t e = 0; e < N; ++e) total += pend[4 * N + e];
  if (total > 0.0)
    for (int64_t e = 0; e < N; ++e)
      state[3 * N + e] = decay * state[3 * N + e] + (1.f - decay) * (float)pend[4 * N + e] / (float)total;
  std::fill(pend, pend + 5 * N, 0.0);
}

void expert_prune_update(float* low_steps, float* pruned, int64_t* load, const float* state, int64_t N, int64_t b,
                         int64_t k, float threshold, int64_t window, bool use_reliability) {
  shared::expert_prune_pass(low_steps, pruned, load, state, N, b, k, threshold, window, use_reliability);
}

}  // namespace cm::cpu
