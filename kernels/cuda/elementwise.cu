// CUDA elementwise kernels, twins of kernels/cpu/elementwise.cpp (contracts in kernels/elementwise.h). One thread
// per output element in grid-stride loops; the op is a template parameter, chosen once per call by a switch.
// No __restrict__ here: same-shape maps may run in place (out == a), which restrict would make undefined.
// i32 arithmetic wraps and i32 division follows the CPU's rules (0 for b == 0, -a for b == -1).
#include <vector>

#include "kernels/cuda/common.cuh"
#include "kernels/copy.h"
#include "kernels/elementwise.h"

namespace cm::cuda {

namespace {

// ---------------------------------------------------------------- functors

struct AddF {
  __device__ float operator()(float a, float b) const { return a + b; }
  __device__ int32_t operator()(int32_t a, int32_t b) const { return (int32_t)((uint32_t)a + (uint32_t)b); }
};
struct SubF {
  __device__ float operator()(float a, float b) const { return a - b; }
  __device__ int32_t operator()(int32_t a, int32_t b) const { return (int32_t)((uint32_t)a - (uint32_t)b); }
};
struct MulF {
  __device__ float operator()(float a, float b) const { return a * b; }
  __device__ int32_t operator()(int32_t a, int32_t b) const { return (int32_t)((uint32_t)a * (uint32_t)b); }
};
struct DivF {
  __device__ float operator()(float a, float b) const { return a / b; }
  __device__ int32_t operator()(int32_t a, int32_t b) const {
    return b == 0 ? 0 : (b == -1 ? (int32_t)(0u - (uint32_t)a) : a / b);
  }
};

template <class Fn>
void with_binary(Binary op, Fn&& fn) {
  switch (op) {
    case Binary::Add: fn(AddF{}); break;
    case Binary::Sub: fn(SubF{}); break;
    case Binary::Mul: fn(MulF{}); break;
    case Binary::Div: fn(DivF{}); break;
  }
}

// ---------------------------------------------------------------- kernels

template <class T, class F>
__global__ void binary_same_kernel(F f, T* out, const T* a, const T* b, int64_t n) {
  for (int64_t i = gtid(); i < n; i += gstride()) out[i] = f(a[i], b[i]);
}

// [R, C] OP [C]: a 2-d grid-stride (blockIdx.y walks rows) avoids a division per element.
template <class T, class F>
__global__ void binary_rows_kernel(F f, T* out, const T* a, const T* b, int64_t R, int64_t C) {
  for (int64_t r = blockIdx.y; r < R; r += gridDim.y)
    for (int64_t c = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; c < C; c += (int64_t)gridDim.x * blockDim.x)
      out[r * C + c] = f(a[r * C + c], b[c]);
}

template <class T, class F>
__global__ void binary_strided_kernel(F f, T* out, const T* a, const T* b, Strided<2> L, int64_t n) {
  for (int64_t i = gtid(); i < n; i += gstride()) {
    int64_t off[2];
    strided_offsets<2>(L, i, off);
    out[i] = f(a[off[0]], b[off[1]]);
  }
}

template <class F>
__global__ void map_kernel(F f, float* out, const float* a, int64_t n) {
  for (int64_t i = gtid(); i < n; i += gstride()) out[i] = f(a[i]);
}

__global__ void pow_backward_kernel(float* dx, const float* dy, const float* a, float p, int64_t n) {
  for (int64_t i = gtid(); i < n; i += gstride()) dx[i] = p == 0.f ? 0.f : dy[i] * p * powf(a[i], p - 1.f);
}

// Scalar and unary functors (device lambdas would need --extended-lambda; plain structs need nothing).
struct AddS {
  float s;
  __device__ float operator()(float x) const { return x + s; }
};
struct MulS {
  float s;
  __device__ float operator()(float x) const { return x * s; }
};
struct RSubS {
  float s;
  __device__ float operator()(float x) const { return s - x; }
};
struct RDivS {
  float s;
  __device__ float operator()(float x) const { return s / x; }
};
struct PowS {
  float s;
  __device__ float operator()(float x) const { return powf(x, s); }
};
struct SquareF {
  __device__ float operator()(float x) const { return x * x; }
};
struct NegF {
  __device__ float operator()(float x) const { return -x; }
};
struct LogF {
  __device__ float operator()(float x) const { return logf(x); }
};
struct SqrtF {
  __device__ float operator()(float x) const { return sqrtf(x); }
};

constexpr int kThreads = 256;

template <class F>
void launch_map(F f, float* out, const float* a, int64_t n) {
  if (n <= 0) return;
  map_kernel<<<grid_for(n, kThreads), kThreads, 0, stream()>>>(f, out, a, n);
  cudaCheckLaunch("map_kernel");
}

template <class T>
void binary_impl(Binary op, T* out, const T* a, const T* b, int64_t n) {
  CM_CHECK(n >= 0, "cuda::binary: n=", n);
  if (n == 0) return;
  with_binary(op, [&](auto f) {
    binary_same_kernel<<<grid_for(n, kThreads), kThreads, 0, stream()>>>(f, out, a, b, n);
  });
  cudaCheckLaunch("binary_same_kernel");
}

template <class T>
void binary_rows_impl(Binary op, T* out, const T* a, const T* b, int64_t R, int64_t C) {
  CM_CHECK(R >= 0 && C >= 0, "cuda::binary_rows: R=", R, " C=", C);
  if (R == 0 || C == 0) return;
  const unsigned gx = (unsigned)(ceil_div(C, kThreads) < 1024 ? ceil_div(C, kThreads) : 1024);
  const unsigned gy = (unsigned)(R < kGridCapY ? R : kGridCapY);
  with_binary(op, [&](auto f) {
    binary_rows_kernel<<<dim3(gx, gy), kThreads, 0, stream()>>>(f, out, a, b, R, C);
  });
  cudaCheckLaunch("binary_rows_kernel");
}

template <class T>
void binary_strided_impl(Binary op, T* out, const T* a, const T* b, int64_t D, const int64_t* shape,
                         const int64_t* a_strides, const int64_t* b_strides) {
  int64_t n = 1;
  for (int64_t d = 0; d < D; ++d) n *= shape[d];
  if (n == 0) return;
  const int64_t* st[2] = {a_strides, b_strides};
  const Strided<2> L = collapse_strided<2>(D, shape, st);
  with_binary(op, [&](auto f) {
    binary_strided_kernel<<<grid_for(n, kThreads), kThreads, 0, stream()>>>(f, out, a, b, L, n);
  });
  cudaCheckLaunch("binary_strided_kernel");
}

}  // namespace

// ---------------------------------------------------------------- launchers

void binary(Binary op, float* out, const float* a, const float* b, int64_t n) { binary_impl(op, out, a, b, n); }
void binary(Binary op, int32_t* out, const int32_t* a, const int32_t* b, int64_t n) { binary_impl(op, out, a, b, n); }

void binary_rows(Binary op, float* out, const float* a, const float* b, int64_t R, int64_t C) {
  binary_rows_impl(op, out, a, b, R, C);
}
void binary_rows(Binary op, int32_t* out, const int32_t* a, const int32_t* b, int64_t R, int64_t C) {
  binary_rows_impl(op, out, a, b, R, C);
}

void binary_strided(Binary op, float* out, const float* a, const float* b, int64_t D, const int64_t* shape,
                    const int64_t* a_strides, const int64_t* b_strides) {
  binary_strided_impl(op, out, a, b, D, shape, a_strides, b_strides);
}
void binary_strided(Binary op, int32_t* out, const int32_t* a, const int32_t* b, int64_t D, const int64_t* shape,
                    const int64_t* a_strides, const int64_t* b_strides) {
  binary_strided_impl(op, out, a, b, D, shape, a_strides, b_strides);
}

void scalar(Scalar op, float* out, const float* a, float s, int64_t n) {
  CM_CHECK(n >= 0, "cuda::scalar: n=", n);
  switch (op) {
    case Scalar::Add: launch_map(AddS{s}, out, a, n); break;
    case Scalar::Mul: launch_map(MulS{s}, out, a, n); break;
    case Scalar::RSub: launch_map(RSubS{s}, out, a, n); break;
    case Scalar::RDiv: launch_map(RDivS{s}, out, a, n); break;
    case Scalar::Pow:
      if (s == 2.f)  // exact and cheap, as on the CPU
        launch_map(SquareF{}, out, a, n);
      else
        launch_map(PowS{s}, out, a, n);
      break;
  }
}

void unary(Unary op, float* out, const float* a, int64_t n) {
  CM_CHECK(n >= 0, "cuda::unary: n=", n);
  switch (op) {
    case Unary::Neg: launch_map(NegF{}, out, a, n); break;
    case Unary::Log: launch_map(LogF{}, out, a, n); break;
    case Unary::Sqrt: launch_map(SqrtF{}, out, a, n); break;
    case Unary::Square: launch_map(SquareF{}, out, a, n); break;
  }
}

void pow_backward(float* dx, const float* dy, const float* a, float p, int64_t n) {
  CM_CHECK(n >= 0, "cuda::pow_backward: n=", n);
  if (n == 0) return;
  pow_backward_kernel<<<grid_for(n, kThreads), kThreads, 0, stream()>>>(dx, dy, a, p, n);
  cudaCheckLaunch("pow_backward_kernel");
}

// A materialised broadcast is a strided copy into a contiguous output.
void broadcast_to(float* out, const float* a, int64_t D, const int64_t* shape, const int64_t* a_strides) {
  std::vector<int64_t> out_strides((size_t)D);
  int64_t acc = 1;
  for (int64_t d = D - 1; d >= 0; --d) {
    out_strides[(size_t)d] = acc;
    acc *= shape[d];
  }
  strided_copy(out, out_strides.data(), a, a_strides, shape, D, 4);
}
void broadcast_to(int32_t* out, const int32_t* a, int64_t D, const int64_t* shape, const int64_t* a_strides) {
  broadcast_to((float*)out, (const float*)a, D, shape, a_strides);
}

}  // namespace cm::cuda
