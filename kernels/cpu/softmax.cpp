// CPU softmax / log-softmax over the last axis. One row per iteration of a static OpenMP loop; inside a row,
// passes over contiguous memory that GCC vectorises (fast_exp is branch-free; softmax's row: kernels/cpu/rows.h).
// The other row reductions use `omp simd reduction`: the compiler may reassociate the sum across SIMD lanes (we
// build without -ffast-math, so it would not otherwise), with a lane split fixed at compile time: still
// deterministic. Softmax's sum and its backward's dot have their order written out (softmax_row, dot_row), which the
// router's selection and its backward reproduce.
#include "kernels/softmax.h"
#include "kernels/cpu/fastmath.h"
#include "kernels/cpu/parallel.h"
#include "kernels/cpu/rows.h"
#include "kernels/cpu/stream.h"

#include <cmath>

namespace cm::cpu {

// Below this many elements a parallel region costs more than it saves (same result either way).

void softmax_forward(float* out, const float* inp, int64_t N, int64_t C) {
#pragma omp parallel for schedule(static) if (N * C >= parallel_min_compute())
  for (int64_t n = 0; n < N; ++n) softmax_row(out + n * C, inp + n * C, C);
}

// dx = y * (dy - dot(dy, y)) per row (the dot: dot_row); a large dx by streaming stores (kernels/cpu/stream.h),
// the same values.
void softmax_backward(float* dinp, const float* dout, const float* out, int64_t N, int64_t C) {
  const bool stream = stream_rows(dinp, N * C, C);
#pragma omp parallel if (N * C >= parallel_min_compute())
  {
#pragma omp for schedule(static) nowait  // the region's end is the barrier
    for (int64_t n = 0; n < N; ++n) {
      const float* __restrict dy = dout + n * C;
      const float* __restrict y = out + n * C;
      float* __restrict dx = dinp + n * C;
      const float dot = dot_row(dy, y, C);
#if defined(__AVX512F__)
      if (stream) {
        const __m512 d = _mm512_set1_ps(dot);
        for (int64_t c = 0; c < C; c += 16)
          _mm512_stream_ps(dx + c, _mm512_mul_ps(_mm512_loadu_ps(y + c), _mm512_sub_ps(_mm512_loadu_ps(dy + c), d)));
        continue;
      }
#endif
      for (int64_t c = 0; c < C; ++c) dx[c] = y[c] * (dy[c] - dot);
    }
    if (stream) stream_fence();
  }
}

void log_softmax_forward(float* out, const float* inp, int64_t N, int64_t C) {
#pragma omp parallel for schedule(static) if (N * C >= parallel_min_compute())
  for (int64_t n = 0; n < N; ++n) {
    const float* __restrict x = inp + n * C;
    float* __restrict y = out + n * C;
    float m = row_max(x, C);
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t c = 0; c < C; ++c) s += fast_exp(x[c] - m);
    // (x - m) - log s rather than x - (m + log s): for logits near 1e4 the latter loses the low bits.
    float ls = std::log(s);
    for (int64_t c = 0; c < C; ++c) y[c] = (x[c] - m) - ls;
  }
}

void log_softmax_backward(float* dinp, const float* dout, const float* out, int64_t N, int64_t C) {
#pragma omp parallel for schedule(static) if (N * C >= parallel_min_compute())
  for (int64_t n = 0; n < N; ++n) {
    const float* __restrict dy = dout + n * C;
    const float* __restrict y = out + n * C;
    float* __restrict dx = dinp + n * C;
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t c = 0; c < C; ++c) s += dy[c];
    for (int64_t c = 0; c < C; ++c) dx[c] = dy[c] - fast_exp(y[c]) * s;
  }
}

}  // namespace cm::cpu
