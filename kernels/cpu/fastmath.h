// Vectorisable math shared by the CPU kernels. libm's expf and tanhf are scalar calls (4 and 11 ns per element
// here) and glibc only vectorises them under -ffast-math, which we do not use; these are written branch-free
// (selects, not ifs) so that GCC vectorises the loops that call them.
#pragma once
#include <cstdint>
#include <cstring>

namespace cm::cpu {

// e^x (Cephes expf): x = k ln2 + r with |r| <= ln2/2, e^r by a degree-6 polynomial, times 2^k. About 1 ulp.
// 2^k is applied as two factors 2^(k/2) 2^(k - k/2), each a normal float, so the result overflows to inf above
// 88.72 and underflows gradually through the denormals, like expf. NaN stays NaN.
inline float fast_exp(float x) {
  const float xc =
      x > -104.f ? (x < 89.f ? x : 89.f) : -104.f;  // past both ends e^x is inf or 0 anyway (NaN -> -104)
  // k = round(x / ln2) by the 1.5 * 2^23 trick: std::floor would stop the loop from vectorising.
  const float k = (xc * 1.44269504088896341f + 12582912.f) - 12582912.f;
  const float r = xc - k * 0.693359375f + k * 2.12194440e-4f;  // ln2 split in two: r is exact enough
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float er = p * r * r + r + 1.f;
  const int32_t k1 = (int32_t)k >> 1, k2 = (int32_t)k - k1;  // k in [-150, 128]: both halves in [-75, 64]
  const int32_t b1 = (k1 + 127) << 23, b2 = (k2 + 127) << 23;
  float s1, s2;
  std::memcpy(&s1, &b1, 4);
  std::memcpy(&s2, &b2, 4);
  const float y = er * s1 * s2;
  return x != x ? x : y;
}

}  // namespace cm::cpu
