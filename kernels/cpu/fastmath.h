// Vectorisable math shared by the CPU kernels. libm's expf and tanhf are scalar calls (4 and 11 ns per element
// here) and glibc only vectorises them under -ffast-math, which we do not use; these are written branch-free
// (selects, not ifs) so that GCC vectorises the loops that call them.
#pragma once
#include <cstdint>
#include <cstring>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace cm::cpu {

// a * b + c, rounded once where the machine has FMA. Written out, not left to the compiler's contraction, so the
// bits do not depend on the optimisation level (GCC fuses a * b + c only from -O2) and fast_exp16 below can
// reproduce them.
inline float mul_add(float a, float b, float c) {
#if defined(__FMA__)
  return __builtin_fmaf(a, b, c);
#else
  return a * b + c;
#endif
}

// e^x (Cephes expf): x = k ln2 + r with |r| <= ln2/2, e^r by a degree-6 polynomial, times 2^k. About 1 ulp.
// 2^k is applied as two factors 2^(k/2) 2^(k - k/2), each a normal float, so the result overflows to inf above
// 88.72 and underflows gradually through the denormals, like expf (the two products round once between them:
// er 2^(k/2) is a normal float, exact). NaN stays NaN.
inline float fast_exp(float x) {
  const float xc =
      x > -104.f ? (x < 89.f ? x : 89.f) : -104.f;  // past both ends e^x is inf or 0 anyway (NaN -> -104)
  // k = round(x / ln2) by the 1.5 * 2^23 trick: std::floor would stop the loop from vectorising.
  const float k = mul_add(xc, 1.44269504088896341f, 12582912.f) - 12582912.f;
  float r = mul_add(-k, 0.693359375f, xc);  // ln2 split in two: r is exact enough
  r = mul_add(k, 2.12194440e-4f, r);
  float p = 1.9875691500e-4f;
  p = mul_add(p, r, 1.3981999507e-3f);
  p = mul_add(p, r, 8.3334519073e-3f);
  p = mul_add(p, r, 4.1665795894e-2f);
  p = mul_add(p, r, 1.6666665459e-1f);
  p = mul_add(p, r, 5.0000001201e-1f);
  const float er = mul_add(p * r, r, r) + 1.f;
  const int32_t k1 = (int32_t)k >> 1, k2 = (int32_t)k - k1;  // k in [-150, 128]: both halves in [-75, 64]
  const int32_t b1 = (k1 + 127) << 23, b2 = (k2 + 127) << 23;
  float s1, s2;
  std::memcpy(&s1, &b1, 4);
  std::memcpy(&s2, &b2, 4);
  const float y = er * s1 * s2;
  return x != x ? x : y;
}

#if defined(__AVX512F__)
// fast_exp on sixteen lanes, bit for bit (every one of the 2^32 inputs, NaN payloads included). What the compiler
// makes of a loop over fast_exp spends a third of its instructions on 2^k: the clamps as masks, the integer halves
// and two multiplies; here one vscalefps applies 2^k (rounding once, as the two multiplies do), and a softmax's
// exp pass runs 1.6x as fast (0.23 against 0.38 ns a score, in L1).
inline __m512 fast_exp16(__m512 x) {
  // (The maskz forms with every lane set: the plain min, max and scalef intrinsics pass GCC 12 an uninitialised
  // source operand, which -Wmaybe-uninitialized flags in every file including this one.)
  const __mmask16 all = 0xFFFF;
  const __m512 xc =
      _mm512_maskz_max_ps(all, _mm512_maskz_min_ps(all, x, _mm512_set1_ps(89.f)), _mm512_set1_ps(-104.f));
  const __m512 big = _mm512_set1_ps(12582912.f);
  const __m512 k = _mm512_sub_ps(_mm512_fmadd_ps(xc, _mm512_set1_ps(1.44269504088896341f), big), big);
  __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693359375f), xc);
  r = _mm512_fmadd_ps(k, _mm512_set1_ps(2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  const __m512 er = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.f));
  const __m512 y = _mm512_maskz_scalef_ps(all, er, k);
  return _mm512_mask_mov_ps(y, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), x);
}
#endif

}  // namespace cm::cpu
