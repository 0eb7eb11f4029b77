// Elementwise kernels: binary arithmetic with broadcasting, scalar forms, simple unary maps, materialised
// broadcast. Raw pointers, outputs first, sizes as int64_t; no Tensor, no autograd.
// Letters: n element count; R rows, C columns (a row-major [R, C] block); D rank of a broadcast.
// Every output element is computed by exactly one thread from its own inputs, so results do not depend on the
// thread count. Outputs must not alias inputs unless said otherwise (same-shape maps may run in place).
#pragma once
#include <cstdint>

namespace cm::cpu {

enum class Binary : uint8_t { Add, Sub, Mul, Div };
// out = a OP s (Add, Mul, Pow) or s OP a (RSub: s - a, RDiv: s / a).
enum class Scalar : uint8_t { Add, Mul, RSub, RDiv, Pow };
// (exp lives with the activations, kernels/activation.h)
enum class Unary : uint8_t { Neg, Log, Sqrt, Square };

// ---- binary, three layouts. i32 overloads do Add/Sub/Mul; i32 Div truncates like C and gives 0 for b == 0
// (the ops refuse i32 div before getting here).
// Same shape: out [n] = a [n] OP b [n]. May run in place (out == a or out == b).
void binary(Binary op, float* out, const float* a, const float* b, int64_t n);
void binary(Binary op, int32_t* out, const int32_t* a, const int32_t* b, int64_t n);
// Row vector over rows, the bias case: out [R, C] = a [R, C] OP b [C].
void binary_rows(Binary op, float* out, const float* a, const float* b, int64_t R, int64_t C);
void binary_rows(Binary op, int32_t* out, const int32_t* a, const int32_t* b, int64_t R, int64_t C);
// General broadcast: out is contiguous with shape[D]; element (i0..iD-1) reads a at sum(ik * a_strides[k]) and b
// likewise. Strides are in elements; a broadcast (stretched) dim has stride 0.
void binary_strided(Binary op, float* out, const float* a, const float* b, int64_t D, const int64_t* shape,
                    const int64_t* a_strides, const int64_t* b_strides);
void binary_strided(Binary op, int32_t* out, const int32_t* a, const int32_t* b, int64_t D, const int64_t* shape,
                    const int64_t* a_strides, const int64_t* b_strides);

// ---- scalar and unary maps. out [n], a [n]; may run in place.
void scalar(Scalar op, float* out, const float* a, float s, int64_t n);
void unary(Unary op, float* out, const float* a, int64_t n);
// Backward of out = a^p: dx [n] = dy [n] * p * a^(p-1). Overwrites dx. p == 0 gives 0 (not 0 * inf at a == 0).
void pow_backward(float* dx, const float* dy, const float* a, float p, int64_t n);

// ---- materialised broadcast: out contiguous with shape[D] = a read through a_strides[D] (0 on stretched dims).
// 4-byte elements of any kind; the i32 overload is the same copy.
void broadcast_to(float* out, const float* a, int64_t D, const int64_t* shape, const int64_t* a_strides);
void broadcast_to(int32_t* out, const int32_t* a, int64_t D, const int64_t* shape, const int64_t* a_strides);

}  // namespace cm::cpu

#if CM_CUDA
// CUDA twins (kernels/cuda/elementwise.cu): the same enums, contracts and in-place rules on device pointers
// (shape and stride arrays stay on the host), launched on the engine's stream. Broadcasts of up to 8 dims after
// merging.
namespace cm::cuda {

using cpu::Binary;
using cpu::Scalar;
using cpu::Unary;

void binary(Binary op, float* out, const float* a, const float* b, int64_t n);
void binary(Binary op, int32_t* out, const int32_t* a, const int32_t* b, int64_t n);
void binary_rows(Binary op, float* out, const float* a, const float* b, int64_t R, int64_t C);
void binary_rows(Binary op, int32_t* out, const int32_t* a, const int32_t* b, int64_t R, int64_t C);
void binary_strided(Binary op, float* out, const float* a, const float* b, int64_t D, const int64_t* shape,
                    const int64_t* a_strides, const int64_t* b_strides);
void binary_strided(Binary op, int32_t* out, const int32_t* a, const int32_t* b, int64_t D, const int64_t* shape,
                    const int64_t* a_strides, const int64_t* b_strides);
void scalar(Scalar op, float* out, const float* a, float s, int64_t n);
void unary(Unary op, float* out, const float* a, int64_t n);
void pow_backward(float* dx, const float* dy, const float* a, float p, int64_t n);
void broadcast_to(float* out, const float* a, int64_t D, const int64_t* shape, const int64_t* a_strides);
void broadcast_to(int32_t* out, const int32_t* a, int64_t D, const int64_t* shape, const int64_t* a_strides);

}  // namespace cm::cuda
#endif
