// Activation kernels, forward and backward side by side. x [n] input, y [n] output, dy [n] gradient of the
// loss w.r.t. y, dx [n] gradient w.r.t. x. Backward kernels OVERWRITE dx (the graph does the accumulating).
// Each backward takes what is cheapest to save: exp, tanh and sigmoid the output y, the rest the input x.
// Forward maps may run in place (y == x); backward may run in place (dx == dy).
#pragma once
#include <cstdint>

namespace cm::cpu {

// exp counts as an activation here: it shares the vectorised exp that sigmoid, tanh and silu use (about 1 ulp;
// libm's expf is a scalar call).
void exp_forward(float* y, const float* x, int64_t n);
void exp_backward(float* dx, const float* dy, const float* y, int64_t n);  // dy * y

void tanh_forward(float* y, const float* x, int64_t n);
void tanh_backward(float* dx, const float* dy, const float* y, int64_t n);  // dy * (1 - y^2)

// Computed without overflow for large |x| (exp of a non-positive number only).
void sigmoid_forward(float* y, const float* x, int64_t n);
void sigmoid_backward(float* dx, const float* dy, const float* y, int64_t n);  // dy * y * (1 - y)

// The derivative at exactly 0 is taken as 0 (PyTorch's choice).
void relu_forward(float* y, const float* x, int64_t n);
void relu_backward(float* dx, const float* dy, const float* x, int64_t n);

// GELU with the tanh approximation (GPT-2): 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).
void gelu_tanh_forward(float* y, const float* x, int64_t n);
void gelu_tanh_backward(float* dx, const float* dy, const float* x, int64_t n);
// Exact GELU: x Phi(x) = 0.5 x (1 + erf(x / sqrt 2)), Phi the standard normal CDF (computed through erfc, which
// keeps relative accuracy in the lower tail).
void gelu_exact_forward(float* y, const float* x, int64_t n);
void gelu_exact_backward(float* dx, const float* dy, const float* x, int64_t n);  // dy * (Phi(x) + x phi(x))

// SiLU (swish): x sigmoid(x).
void silu_forward(float* y, const float* x, int64_t n);
void silu_backward(float* dx, const float* dy, const float* x, int64_t n);  // dy * s (1 + x (1 - s))

}  // namespace cm::cpu

#if CM_CUDA
// CUDA twins (kernels/cuda/activation.cu): the same contracts on device pointers, launched on the engine's stream.
namespace cm::cuda {

void exp_forward(float* y, const float* x, int64_t n);
void exp_backward(float* dx, const float* dy, const float* y, int64_t n);
void tanh_forward(float* y, const float* x, int64_t n);
void tanh_backward(float* dx, const float* dy, const float* y, int64_t n);
void sigmoid_forward(float* y, const float* x, int64_t n);
void sigmoid_backward(float* dx, const float* dy, const float* y, int64_t n);
void relu_forward(float* y, const float* x, int64_t n);
void relu_backward(float* dx, const float* dy, const float* x, int64_t n);
void gelu_tanh_forward(float* y, const float* x, int64_t n);
void gelu_tanh_backward(float* dx, const float* dy, const float* x, int64_t n);
void gelu_exact_forward(float* y, const float* x, int64_t n);
void gelu_exact_backward(float* dx, const float* dy, const float* x, int64_t n);
void silu_forward(float* y, const float* x, int64_t n);
void silu_backward(float* dx, const float* dy, const float* x, int64_t n);

}  // namespace cm::cuda
#endif
