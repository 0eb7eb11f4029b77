// CPU LayerNorm / RMSNorm. Forward: one row per iteration of a static OpenMP loop. Backward: a static loop over
// fixed row chunks (each writes its rows of dinp and its own partial dweight/dbias), then a loop over channels
// that adds the partials in chunk order. See kernels/norm.h for why the chunking makes the result thread-count
// independent.
#include "kernels/norm.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels/cpu/parallel.h"

namespace cm::cpu {

// Row chunks for the parameter-gradient reduction: at most 64 chunks of at least 16 rows. Depends on N only.
static int64_t chunk_rows(int64_t N) { return std::max<int64_t>(16, (N + 63) / 64); }

// Adds part [nchunks, C] over chunks, in chunk order, into dst [C] (overwritten).
static void sum_chunks(float* dst, const float* part, int64_t nchunks, int64_t C) {
#pragma omp parallel for schedule(static) if (nchunks * C >= parallel_min())
  for (int64_t c = 0; c < C; ++c) {
    float s = 0.0f;
    for (int64_t k = 0; k < nchunks; ++k) s += part[k * C + c];
    dst[c] = s;
  }
}

void layernorm_forward(float* out, float* mean, float* rstd, const float* inp, const float* weight,
                       const float* bias, int64_t N, int64_t C, float eps) {
#pragma omp parallel for schedule(static) if (N * C >= parallel_min())
  for (int64_t n = 0; n < N; ++n) {
    const float* __restrict x = inp + n * C;
    float* __restrict y = out + n * C;
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t c = 0; c < C; ++c) s += x[c];
    float m = s / (float)C;
    // Two passes (sum of squared deviations) rather than E[x^2] - m^2, which cancels badly when |m| >> std.
    float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
    for (int64_t c = 0; c < C; ++c) ss += (x[c] - m) * (x[c] - m);
    float r = 1.0f / std::sqrt(ss / (float)C + eps);
    if (bias) {
      for (int64_t c = 0; c < C; ++c) y[c] = (x[c] - m) * r * weight[c] + bias[c];
    } else {
      for (int64_t c = 0; c < C; ++c) y[c] = (x[c] - m) * r * weight[c];
    }
    mean[n] = m;
    rstd[n] = r;
  }
}

void layernorm_backward(float* dinp, float* dweight, float* dbias, const float* dout, const float* inp,
                        const float* weight, const float* mean, const float* rstd, int64_t N, int64_t C) {
  const int64_t rows = chunk_rows(N), nchunks = (N + rows - 1) / rows;
  std::vector<float> pw((size_t)(nchunks * C), 0.0f), pb((size_t)(nchunks * C), 0.0f);  // [nchunks, C]
#pragma omp parallel for schedule(static) if (N * C >= parallel_min())
  for (int64_t k = 0; k < nchunks; ++k) {
    float* __restrict gw = pw.data() + k * C;
    float* __restrict gb = pb.data() + k * C;
    for (int64_t n = k * rows; n < std::min(N, (k + 1) * rows); ++n) {
      const float* __restrict x = inp + n * C;
      const float* __restrict dy = dout + n * C;
      float* __restrict dx = dinp + n * C;
      const float m = mean[n], r = rstd[n];
      // dxhat = weight * dy; dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)).
      float a = 0.0f, b = 0.0f;
#pragma omp simd reduction(+ : a, b)
      for (int64_t c = 0; c < C; ++c) {
        float xhat = (x[c] - m) * r;
        float dxhat = weight[c] * dy[c];
        a += dxhat;
        b += dxhat * xhat;
      }
      a /= (float)C;
      b /= (float)C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        float xhat = (x[c] - m) * r;
        dx[c] = (weight[c] * dy[c] - a - xhat * b) * r;
        gw[c] += dy[c] * xhat;
        gb[c] += dy[c];
      }
    }
  }
  sum_chunks(dweight, pw.data(), nchunks, C);
  if (dbias) sum_chunks(dbias, pb.data(), nchunks, C);
}

void rmsnorm_forward(float* out, float* rstd, const float* inp, const float* weight, int64_t N, int64_t C,
                     float eps) {
#pragma omp parallel for schedule(static) if (N * C >= parallel_min())
  for (int64_t n = 0; n < N; ++n) {
    const float* __restrict x = inp + n * C;
    float* __restrict y = out + n * C;
    float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
    for (int64_t c = 0; c < C; ++c) ss += x[c] * x[c];
    float r = 1.0f / std::sqrt(ss / (float)C + eps);
    for (int64_t c = 0; c < C; ++c) y[c] = x[c] * r * weight[c];
    rstd[n] = r;
  }
}

void rmsnorm_backward(float* dinp, float* dweight, const float* dout, const float* inp, const float* weight,
                      const float* rstd, int64_t N, int64_t C) {
  const int64_t rows = chunk_rows(N), nchunks = (N + rows - 1) / rows;
  std::vector<float> pw((size_t)(nchunks * C), 0.0f);  // [nchunks, C]
#pragma omp parallel for schedule(static) if (N * C >= parallel_min())
  for (int64_t k = 0; k < nchunks; ++k) {
    float* __restrict gw = pw.data() + k * C;
    for (int64_t n = k * rows; n < std::min(N, (k + 1) * rows); ++n) {
      const float* __restrict x = inp + n * C;
      const float* __restrict dy = dout + n * C;
      float* __restrict dx = dinp + n * C;
      const float r = rstd[n];
      // xhat = x * rstd has no mean term, so dx = rstd * (dxhat - xhat * mean(dxhat * xhat)).
      float b = 0.0f;
#pragma omp simd reduction(+ : b)
      for (int64_t c = 0; c < C; ++c) b += weight[c] * dy[c] * x[c] * r;
      b /= (float)C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        float xhat = x[c] * r;
        dx[c] = (weight[c] * dy[c] - xhat * b) * r;
        gw[c] += dy[c] * xhat;
      }
    }
  }
  sum_chunks(dweight, pw.data(), nchunks, C);
}

}  // namespace cm::cpu
