// CPU activation kernels: one independent loop per call, threads over contiguous chunks.
#include "kernels/activation.h"
#include "kernels/cpu/fastmath.h"
#include "kernels/cpu/parallel.h"

#include <cmath>
#include <cstring>

namespace cm::cpu {
namespace {

constexpr float kSqrt2OverPi = 0.7978845608028654f;
constexpr float kGeluCoef = 0.044715f;
constexpr float kInvSqrt2 = 0.7071067811865476f;
constexpr float kInvSqrt2Pi = 0.3989422804014327f;

// Phi(x) = P(N(0, 1) <= x) = 0.5 erfc(-x / sqrt 2), erfc from the Chebyshev fit in Numerical Recipes (relative
// error < 1.2e-7 for every argument). Unlike 0.5 (1 + erf(x / sqrt 2)), which cancels to 0 below x = -5, this
// stays accurate in relative terms in the lower tail; and unlike std::erf it vectorises.
inline float normal_cdf(float x) {
  const float z = std::fabs(x) * kInvSqrt2;
  const float t = 1.f / (1.f + 0.5f * z);
  float p = 0.17087277f;
  p = p * t - 0.82215223f;
  p = p * t + 1.48851587f;
  p = p * t - 1.13520398f;
  p = p * t + 0.27886807f;
  p = p * t - 0.18628806f;
  p = p * t + 0.09678418f;
  p = p * t + 0.37409196f;
  p = p * t + 1.00002368f;
  p = p * t - 1.26551223f;
  const float tail = 0.5f * t * fast_exp(p - z * z);  // Phi(-|x|)
  return x < 0.f ? tail : 1.f - tail;
}

// 1 / (1 + e^-x) as (x >= 0 ? 1 : e) / (1 + e) with e = e^-|x|.
inline float sigmoid1(float x) {
  const float e = fast_exp(-std::fabs(x));
  return (x >= 0.f ? 1.f : e) / (1.f + e);
}

// tanh: Cephes' odd polynomial for |x| < 0.625 (where 1 - e would cancel), else (1 - e) / (1 + e) with
// e = e^-2|x|; the sign is put back. A few ulp everywhere.
inline float tanh1(float x) {
  const float ax = std::fabs(x), z = x * x;
  float p = -5.70498872745e-3f;
  p = p * z + 2.06390887954e-2f;
  p = p * z - 5.37397155531e-2f;
  p = p * z + 1.33314422036e-1f;
  p = p * z - 3.33332819422e-1f;
  const float small = p * z * x + x;
  const float e = fast_exp(-2.f * ax);
  const float big = std::copysign((1.f - e) / (1.f + e), x);
  return ax < 0.625f ? small : big;
}

// Calls f(i) for i in [0, n), threads over contiguous chunks; f writes element i only.
template <class F>
inline void each(int64_t n, F f) {
#pragma omp parallel for schedule(static) if (n >= parallel_min_compute())
  for (int64_t i = 0; i < n; ++i) f(i);
}

}  // namespace

// ---------------------------------------------------------------- exp
void exp_forward(float* y, const float* x, int64_t n) {
  each(n, [=](int64_t i) { y[i] = fast_exp(x[i]); });
}
void exp_backward(float* dx, const float* dy, const float* y, int64_t n) {
  each(n, [=](int64_t i) { dx[i] = dy[i] * y[i]; });
}

// ---------------------------------------------------------------- tanh
void tanh_forward(float* y, const float* x, int64_t n) {
  each(n, [=](int64_t i) { y[i] = tanh1(x[i]); });
}
void tanh_backward(float* dx, const float* dy, const float* y, int64_t n) {
  each(n, [=](int64_t i) { dx[i] = dy[i] * (1.f - y[i] * y[i]); });
}

// ---------------------------------------------------------------- sigmoid
void sigmoid_forward(float* y, const float* x, int64_t n) {
  each(n, [=](int64_t i) { y[i] = sigmoid1(x[i]); });
}
void sigmoid_backward(float* dx, const float* dy, const float* y, int64_t n) {
  each(n, [=](int64_t i) { dx[i] = dy[i] * y[i] * (1.f - y[i]); });
}

// ---------------------------------------------------------------- relu
void relu_forward(float* y, const float* x, int64_t n) {
  each(n, [=](int64_t i) { y[i] = x[i] > 0.f ? x[i] : 0.f; });
}
void relu_backward(float* dx, const float* dy, const float* x, int64_t n) {
  each(n, [=](int64_t i) { dx[i] = x[i] > 0.f ? dy[i] : 0.f; });
}

// ---------------------------------------------------------------- gelu, tanh approximation
// y = 0.5 x (1 + t), t = tanh(u), u = k (x + c x^3)
// dy/dx = 0.5 (1 + t) + 0.5 x (1 - t^2) k (1 + 3 c x^2)
// Computed from e = e^-2|u| as h = 0.5 (1 + t) = (u >= 0 ? 1 : e) / (1 + e) and 1 - t^2 = 4 e / (1 + e)^2: the
// forms 1 + t and 1 - t^2 cancel near saturation, where one ulp of t (tanhf against this file's tanh1) made the
// CPU and CUDA gradients differ by 1e-6 at x = -5.
inline float gelu_h(float u, float e) { return (u >= 0.f ? 1.f : e) / (1.f + e); }
void gelu_tanh_forward(float* y, const float* x, int64_t n) {
  each(n, [=](int64_t i) {
    const float v = x[i];
    const float u = kSqrt2OverPi * (v + kGeluCoef * v * v * v);
    y[i] = v * gelu_h(u, fast_exp(-2.f * std::fabs(u)));
  });
}
void gelu_tanh_backward(float* dx, const float* dy, const float* x, int64_t n) {
  each(n, [=](int64_t i) {
    const float v = x[i];
    const float u = kSqrt2OverPi * (v + kGeluCoef * v * v * v), e = fast_exp(-2.f * std::fabs(u));
    const float du = kSqrt2OverPi * (1.f + 3.f * kGeluCoef * v * v);
    dx[i] = dy[i] * (gelu_h(u, e) + 2.f * v * (e / ((1.f + e) * (1.f + e))) * du);
  });
}

// ---------------------------------------------------------------- gelu, exact (erf)
// y = x Phi(x); dy/dx = Phi(x) + x phi(x), phi(x) = exp(-x^2/2) / sqrt(2 pi)
void gelu_exact_forward(float* y, const float* x, int64_t n) {
  each(n, [=](int64_t i) {
    const float v = x[i];
    y[i] = v * normal_cdf(v);
  });
}
void gelu_exact_backward(float* dx, const float* dy, const float* x, int64_t n) {
  each(n, [=](int64_t i) {
    const float v = x[i];
    const float cdf = normal_cdf(v);
    const float pdf = kInvSqrt2Pi * fast_exp(-0.5f * v * v);
    dx[i] = dy[i] * (cdf + v * pdf);
  });
}

// ---------------------------------------------------------------- silu
// y = x s, s = sigmoid(x); dy/dx = s + x s (1 - s) = s (1 + x (1 - s))
void silu_forward(float* y, const float* x, int64_t n) {
  each(n, [=](int64_t i) { y[i] = x[i] * sigmoid1(x[i]); });
}
void silu_backward(float* dx, const float* dy, const float* x, int64_t n) {
  each(n, [=](int64_t i) {
    const float s = sigmoid1(x[i]);
    dx[i] = dy[i] * s * (1.f + x[i] * (1.f - s));
  });
}

}  // namespace cm::cpu
