// 16 x 16 blocks of floats transposed in AVX-512 registers: the GEMM's transposing packs (kernels/cpu/gemm.cpp),
// the router's sixteen-rows-at-once selection (route.cpp) and the guard's row norms (health.cpp). Internal to
// kernels/cpu. Without AVX-512 nothing is declared: the callers have plain loops.
#pragma once
#include <cstdint>

#if defined(__AVX512F__)
#if defined(__GNUC__) && !defined(__clang__)
// GCC 12 flags the self-initialised _mm512_undefined_ps() inside the AVX-512 unpack intrinsics (a false positive);
// the pragma must precede the header for the warning's location to fall under it.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>

namespace cm::cpu {

// In-register transpose of a 16x16 block: r[i] lane j <- r[j] lane i (unpack, then 128-bit lane shuffles).
__attribute__((always_inline)) inline void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int h = 0; h < 16; h += 8)
    for (int i = 0; i < 4; ++i) {
      t[h + i] = _mm512_shuffle_f32x4(r[h + i], r[h + i + 4], 0x88);
      t[h + i + 4] = _mm512_shuffle_f32x4(r[h + i], r[h + i + 4], 0xdd);
    }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xdd);
  }
}

// dst[t*dst_stride + i] = row(i)[t] for i < rows, t < cols <= 16: one strip of a transpose, the inner step of the
// GEMM's transposing packs (row(i) points at source row i's first element of the strip). Lanes rows..store_lanes-1
// of each written row are written as 0.
template <class Row>
__attribute__((always_inline)) inline void transpose_strip(float* __restrict dst, int64_t dst_stride, Row row,
                                                           int rows, int cols, int store_lanes) {
  const __mmask16 in = (__mmask16)((1u << cols) - 1), out = (__mmask16)((1u << store_lanes) - 1);
  __m512 r[16];
  for (int i = 0; i < 16; ++i) r[i] = i < rows ? _mm512_maskz_loadu_ps(in, row(i)) : _mm512_setzero_ps();
  transpose16(r);
  for (int t = 0; t < cols; ++t) _mm512_mask_storeu_ps(dst + t * dst_stride, out, r[t]);
}

}  // namespace cm::cpu
#endif
