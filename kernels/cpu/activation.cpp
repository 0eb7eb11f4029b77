// CPU activation kernels: one independent loop per call, threads over contiguous chunks.
#include "kernels/activation.h"

#include <cmath>

namespace cm::cpu {
namespace {

constexpr int64_t kParallelMin = 1 << 14;  // transcendental maps are worth threads earlier than plain adds
constexpr float kSqrt2OverPi = 0.7978845608028654f;
constexpr float kGeluCoef = 0.044715f;
constexpr float kInvSqrt2 = 0.7071067811865476f;
constexpr float kInvSqrt2Pi = 0.3989422804014327f;

// exp only ever sees a non-positive argument, so large |x| neither overflows nor loses the small tail.
inline float sigmoidf(float x) {
  if (x >= 0.f) return 1.f / (1.f + std::exp(-x));
  float e = std::exp(x);
  return e / (1.f + e);
}

// Calls f(i) for i in [0, n), threads over contiguous chunks; f writes element i only.
template <class F>
inline void each(int64_t n, F f) {
#pragma omp parallel for schedule(static) if (n >= kParallelMin)
  for (int64_t i = 0; i < n; ++i) f(i);
}

}  // namespace

// ---------------------------------------------------------------- tanh
void tanh_forward(float* y, const float* x, int64_t n) {
  each(n, [=](int64_t i) { y[i] = std::tanh(x[i]); });
}
void tanh_backward(float* dx, const float* dy, const float* y, int64_t n) {
  each(n, [=](int64_t i) { dx[i] = dy[i] * (1.f - y[i] * y[i]); });
}

// ---------------------------------------------------------------- sigmoid
void sigmoid_forward(float* y, const float* x, int64_t n) {
  each(n, [=](int64_t i) { y[i] = sigmoidf(x[i]); });
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
void gelu_tanh_forward(float* y, const float* x, int64_t n) {
  each(n, [=](int64_t i) {
    const float v = x[i];
    y[i] = 0.5f * v * (1.f + std::tanh(kSqrt2OverPi * (v + kGeluCoef * v * v * v)));
  });
}
void gelu_tanh_backward(float* dx, const float* dy, const float* x, int64_t n) {
  each(n, [=](int64_t i) {
    const float v = x[i];
    const float t = std::tanh(kSqrt2OverPi * (v + kGeluCoef * v * v * v));
    const float du = kSqrt2OverPi * (1.f + 3.f * kGeluCoef * v * v);
    dx[i] = dy[i] * (0.5f * (1.f + t) + 0.5f * v * (1.f - t * t) * du);
  });
}

// ---------------------------------------------------------------- gelu, exact (erf)
// y = x Phi(x); dy/dx = Phi(x) + x phi(x), phi(x) = exp(-x^2/2) / sqrt(2 pi)
void gelu_exact_forward(float* y, const float* x, int64_t n) {
  each(n, [=](int64_t i) {
    const float v = x[i];
    y[i] = 0.5f * v * (1.f + std::erf(v * kInvSqrt2));
  });
}
void gelu_exact_backward(float* dx, const float* dy, const float* x, int64_t n) {
  each(n, [=](int64_t i) {
    const float v = x[i];
    const float cdf = 0.5f * (1.f + std::erf(v * kInvSqrt2));
    const float pdf = kInvSqrt2Pi * std::exp(-0.5f * v * v);
    dx[i] = dy[i] * (cdf + v * pdf);
  });
}

// ---------------------------------------------------------------- silu
// y = x s, s = sigmoid(x); dy/dx = s + x s (1 - s) = s (1 + x (1 - s))
void silu_forward(float* y, const float* x, int64_t n) {
  each(n, [=](int64_t i) { y[i] = x[i] * sigmoidf(x[i]); });
}
void silu_backward(float* dx, const float* dy, const float* x, int64_t n) {
  each(n, [=](int64_t i) {
    const float s = sigmoidf(x[i]);
    dx[i] = dy[i] * s * (1.f + x[i] * (1.f - s));
  });
}

}  // namespace cm::cpu
