// CUDA activations, twins of kernels/cpu/activation.cpp (contracts in kernels/activation.h). Each is one
// elementwise map; CUDA's libdevice functions (expf, tanhf, erfcf: within 2 ulp) stand in for the CPU's
// vectorised approximations, so results agree to a few ulp. No __restrict__: maps may run in place.
#include "kernels/activation.h"
#include "kernels/cuda/common.cuh"

namespace cm::cuda {

namespace {

constexpr float kSqrt2OverPi = 0.7978845608028654f;
constexpr float kGeluCoef = 0.044715f;
constexpr float kInvSqrt2 = 0.7071067811865476f;
constexpr float kInvSqrt2Pi = 0.3989422804014327f;

// exp only ever sees a non-positive argument: no overflow for large |x|, no lost tail.
__device__ __forceinline__ float sigmoidf(float x) {
  if (x >= 0.f) return 1.f / (1.f + expf(-x));
  const float e = expf(x);
  return e / (1.f + e);
}
// Phi(x) through erfc: keeps relative accuracy in the lower tail, where 0.5 (1 + erf) cancels to 0.
__device__ __forceinline__ float normal_cdf(float x) { return 0.5f * erfcf(-x * kInvSqrt2); }

// One functor per forward or backward formula; `Unary` maps read one input, `Binary` maps two (dy and a saved
// tensor).
struct ExpF {
  __device__ float operator()(float x) const { return expf(x); }
};
struct TanhF {
  __device__ float operator()(float x) const { return tanhf(x); }
};
struct SigmoidF {
  __device__ float operator()(float x) const { return sigmoidf(x); }
};
struct ReluF {
  __device__ float operator()(float x) const { return x > 0.f ? x : 0.f; }
};
// GELU (tanh form) through e = e^-2|u| rather than t = tanh(u), as on the CPU (kernels/cpu/activation.cpp says why).
__device__ __forceinline__ float gelu_h(float u, float e) { return (u >= 0.f ? 1.f : e) / (1.f + e); }
struct GeluTanhF {
  __device__ float operator()(float v) const {
    const float u = kSqrt2OverPi * (v + kGeluCoef * v * v * v);
    return v * gelu_h(u, expf(-2.f * fabsf(u)));
  }
};
struct GeluExactF {
  __device__ float operator()(float v) const { return v * normal_cdf(v); }
};
struct SiluF {
  __device__ float operator()(float x) const { return x * sigmoidf(x); }
};

struct ExpB {  // (dy, y)
  __device__ float operator()(float dy, float y) const { return dy * y; }
};
struct TanhB {  // (dy, y)
  __device__ float operator()(float dy, float y) const { return dy * (1.f - y * y); }
};
struct SigmoidB {  // (dy, y)
  __device__ float operator()(float dy, float y) const { return dy * y * (1.f - y); }
};
struct ReluB {  // (dy, x): the derivative at 0 is 0
  __device__ float operator()(float dy, float x) const { return x > 0.f ? dy : 0.f; }
};
struct GeluTanhB {  // (dy, x)
  __device__ float operator()(float dy, float v) const {
    const float u = kSqrt2OverPi * (v + kGeluCoef * v * v * v), e = expf(-2.f * fabsf(u));
    const float du = kSqrt2OverPi * (1.f + 3.f * kGeluCoef * v * v);
    return dy * (gelu_h(u, e) + 2.f * v * (e / ((1.f + e) * (1.f + e))) * du);
  }
};
struct GeluExactB {  // (dy, x)
  __device__ float operator()(float dy, float v) const {
    const float pdf = kInvSqrt2Pi * expf(-0.5f * v * v);
    return dy * (normal_cdf(v) + v * pdf);
  }
};
struct SiluB {  // (dy, x)
  __device__ float operator()(float dy, float x) const {
    const float s = sigmoidf(x);
    return dy * s * (1.f + x * (1.f - s));
  }
};

template <class F>
__global__ void map1_kernel(F f, float* y, const float* x, int64_t n) {
  for (int64_t i = gtid(); i < n; i += gstride()) y[i] = f(x[i]);
}
template <class F>
__global__ void map2_kernel(F f, float* dx, const float* dy, const float* s, int64_t n) {
  for (int64_t i = gtid(); i < n; i += gstride()) dx[i] = f(dy[i], s[i]);
}

constexpr int kThreads = 256;

template <class F>
void fwd(F f, float* y, const float* x, int64_t n, const char* what) {
  CM_CHECK(n >= 0, what, ": n=", n);
  if (n == 0) return;
  map1_kernel<<<grid_for(n, kThreads), kThreads, 0, stream()>>>(f, y, x, n);
  cudaCheckLaunch(what);
}
template <class F>
void bwd(F f, float* dx, const float* dy, const float* s, int64_t n, const char* what) {
  CM_CHECK(n >= 0, what, ": n=", n);
  if (n == 0) return;
  map2_kernel<<<grid_for(n, kThreads), kThreads, 0, stream()>>>(f, dx, dy, s, n);
  cudaCheckLaunch(what);
}

}  // namespace

void exp_forward(float* y, const float* x, int64_t n) { fwd(ExpF{}, y, x, n, "cuda::exp_forward"); }
void exp_backward(float* dx, const float* dy, const float* y, int64_t n) {
  bwd(ExpB{}, dx, dy, y, n, "cuda::exp_backward");
}
void tanh_forward(float* y, const float* x, int64_t n) { fwd(TanhF{}, y, x, n, "cuda::tanh_forward"); }
void tanh_backward(float* dx, const float* dy, const float* y, int64_t n) {
  bwd(TanhB{}, dx, dy, y, n, "cuda::tanh_backward");
}
void sigmoid_forward(float* y, const float* x, int64_t n) { fwd(SigmoidF{}, y, x, n, "cuda::sigmoid_forward"); }
void sigmoid_backward(float* dx, const float* dy, const float* y, int64_t n) {
  bwd(SigmoidB{}, dx, dy, y, n, "cuda::sigmoid_backward");
}
void relu_forward(float* y, const float* x, int64_t n) { fwd(ReluF{}, y, x, n, "cuda::relu_forward"); }
void relu_backward(float* dx, const float* dy, const float* x, int64_t n) {
  bwd(ReluB{}, dx, dy, x, n, "cuda::relu_backward");
}
void gelu_tanh_forward(float* y, const float* x, int64_t n) { fwd(GeluTanhF{}, y, x, n, "cuda::gelu_tanh_forward"); }
void gelu_tanh_backward(float* dx, const float* dy, const float* x, int64_t n) {
  bwd(GeluTanhB{}, dx, dy, x, n, "cuda::gelu_tanh_backward");
}
void gelu_exact_forward(float* y, const float* x, int64_t n) {
  fwd(GeluExactF{}, y, x, n, "cuda::gelu_exact_forward");
}
void gelu_exact_backward(float* dx, const float* dy, const float* x, int64_t n) {
  bwd(GeluExactB{}, dx, dy, x, n, "cuda::gelu_exact_backward");
}
void silu_forward(float* y, const float* x, int64_t n) { fwd(SiluF{}, y, x, n, "cuda::silu_forward"); }
void silu_backward(float* dx, const float* dy, const float* x, int64_t n) {
  bwd(SiluB{}, dx, dy, x, n, "cuda::silu_backward");
}

}  // namespace cm::cuda
