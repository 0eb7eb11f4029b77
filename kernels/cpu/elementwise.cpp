// CPU elementwise kernels. The op is chosen once per call (a switch that instantiates a template per op), so the
// inner loops are plain arithmetic over contiguous memory that the compiler vectorises.
#include "kernels/elementwise.h"

#include <array>
#include <cmath>
#include <vector>

#include "kernels/cpu/parallel.h"

namespace cm::cpu {
namespace {

// i32 arithmetic wraps (two's complement) instead of overflowing into undefined behaviour.
struct AddF {
  float operator()(float a, float b) const { return a + b; }
  int32_t operator()(int32_t a, int32_t b) const { return (int32_t)((uint32_t)a + (uint32_t)b); }
};
struct SubF {
  float operator()(float a, float b) const { return a - b; }
  int32_t operator()(int32_t a, int32_t b) const { return (int32_t)((uint32_t)a - (uint32_t)b); }
};
struct MulF {
  float operator()(float a, float b) const { return a * b; }
  int32_t operator()(int32_t a, int32_t b) const { return (int32_t)((uint32_t)a * (uint32_t)b); }
};
struct DivF {
  float operator()(float a, float b) const { return a / b; }
  // INT_MIN / -1 overflows too; both traps are answered with something defined.
  int32_t operator()(int32_t a, int32_t b) const {
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

// A broadcast walk over K operands reduced to its essentials: size-1 dims dropped, and neighbouring dims merged
// when every operand steps through them as one (outer stride == inner stride * inner size). What is left is a set
// of outer dims, walked with a mixed-radix counter per row, and one inner dim, walked by a plain loop.
// [B, T, C] + [C] collapses to rows [B*T] x inner [C] with b's row stride 0; [R, C] / [R, 1] to inner [C]
// with b's inner stride 0.
template <int K>
struct Walk {
  std::vector<int64_t> shape;                  // collapsed dims, outermost first; never empty
  std::vector<std::array<int64_t, K>> stride;  // per dim, per operand
  int64_t numel = 1;

  Walk(int64_t D, const int64_t* shp, const std::array<const int64_t*, K>& st) {
    for (int64_t d = 0; d < D; ++d) {
      numel *= shp[d];
      if (shp[d] == 1) continue;
      std::array<int64_t, K> s;
      for (int k = 0; k < K; ++k) s[k] = st[k][d];
      if (!shape.empty()) {
        bool merge = true;
        for (int k = 0; k < K; ++k) merge = merge && stride.back()[k] == s[k] * shp[d];
        if (merge) {
          shape.back() *= shp[d];
          stride.back() = s;
          continue;
        }
      }
      shape.push_back(shp[d]);
      stride.push_back(s);
    }
    if (shape.empty()) {  // a scalar: one row of one element
      shape.push_back(1);
      stride.push_back({});
    }
  }
  int64_t inner() const { return shape.back(); }
  int64_t rows() const { return inner() == 0 ? 0 : numel / inner(); }
  // Element offsets of operand k at the start of row r (rows are the outer dims in row-major order).
  std::array<int64_t, K> row_offsets(int64_t r) const {
    std::array<int64_t, K> off{};
    for (int64_t d = (int64_t)shape.size() - 2; d >= 0; --d) {
      int64_t i = r % shape[d];
      r /= shape[d];
      for (int k = 0; k < K; ++k) off[k] += i * stride[d][k];
    }
    return off;
  }
};

template <class T, class F>
void binary_same(F f, T* out, const T* a, const T* b, int64_t n) {
#pragma omp parallel for schedule(static) if (n >= parallel_min())
  for (int64_t i = 0; i < n; ++i) out[i] = f(a[i], b[i]);
}

template <class T, class F>
void binary_rows_impl(F f, T* __restrict out, const T* a, const T* b, int64_t R, int64_t C) {
#pragma omp parallel for schedule(static) if (R * C >= parallel_min())
  for (int64_t r = 0; r < R; ++r) {
    T* __restrict o = out + r * C;
    const T* __restrict x = a + r * C;
    const T* __restrict y = b;
    for (int64_t c = 0; c < C; ++c) o[c] = f(x[c], y[c]);
  }
}

template <class T, class F>
void binary_walk(F f, T* __restrict out, const T* a, const T* b, const Walk<2>& w) {
  const int64_t n = w.inner(), rows = w.rows();
  const int64_t sa = w.stride.back()[0], sb = w.stride.back()[1];
#pragma omp parallel for schedule(static) if (w.numel >= parallel_min())
  for (int64_t r = 0; r < rows; ++r) {
    std::array<int64_t, 2> off = w.row_offsets(r);
    T* __restrict o = out + r * n;
    const T* __restrict x = a + off[0];
    const T* __restrict y = b + off[1];
    // The three inner layouts that broadcasting produces, then anything else.
    if (sa == 1 && sb == 1) {
      for (int64_t i = 0; i < n; ++i) o[i] = f(x[i], y[i]);
    } else if (sa == 1 && sb == 0) {
      const T v = y[0];
      for (int64_t i = 0; i < n; ++i) o[i] = f(x[i], v);
    } else if (sa == 0 && sb == 1) {
      const T v = x[0];
      for (int64_t i = 0; i < n; ++i) o[i] = f(v, y[i]);
    } else {
      for (int64_t i = 0; i < n; ++i) o[i] = f(x[i * sa], y[i * sb]);
    }
  }
}

template <class T>
void broadcast_impl(T* __restrict out, const T* a, int64_t D, const int64_t* shape, const int64_t* a_strides) {
  Walk<1> w(D, shape, {a_strides});
  const int64_t n = w.inner(), rows = w.rows(), sa = w.stride.back()[0];
#pragma omp parallel for schedule(static) if (w.numel >= parallel_min())
  for (int64_t r = 0; r < rows; ++r) {
    const T* __restrict x = a + w.row_offsets(r)[0];
    T* __restrict o = out + r * n;
    if (sa == 1) {
      for (int64_t i = 0; i < n; ++i) o[i] = x[i];
    } else if (sa == 0) {
      for (int64_t i = 0; i < n; ++i) o[i] = x[0];
    } else {
      for (int64_t i = 0; i < n; ++i) o[i] = x[i * sa];
    }
  }
}

template <class F>
void map(F f, float* out, const float* a, int64_t n) {
#pragma omp parallel for schedule(static) if (n >= parallel_min())
  for (int64_t i = 0; i < n; ++i) out[i] = f(a[i]);
}

}  // namespace

// ---------------------------------------------------------------- binary
void binary(Binary op, float* out, const float* a, const float* b, int64_t n) {
  with_binary(op, [&](auto f) { binary_same(f, out, a, b, n); });
}
void binary(Binary op, int32_t* out, const int32_t* a, const int32_t* b, int64_t n) {
  with_binary(op, [&](auto f) { binary_same(f, out, a, b, n); });
}
void binary_rows(Binary op, float* out, const float* a, const float* b, int64_t R, int64_t C) {
  with_binary(op, [&](auto f) { binary_rows_impl(f, out, a, b, R, C); });
}
void binary_rows(Binary op, int32_t* out, const int32_t* a, const int32_t* b, int64_t R, int64_t C) {
  with_binary(op, [&](auto f) { binary_rows_impl(f, out, a, b, R, C); });
}
void binary_strided(Binary op, float* out, const float* a, const float* b, int64_t D, const int64_t* shape,
                    const int64_t* a_strides, const int64_t* b_strides) {
  Walk<2> w(D, shape, {a_strides, b_strides});
  with_binary(op, [&](auto f) { binary_walk(f, out, a, b, w); });
}
void binary_strided(Binary op, int32_t* out, const int32_t* a, const int32_t* b, int64_t D, const int64_t* shape,
                    const int64_t* a_strides, const int64_t* b_strides) {
  Walk<2> w(D, shape, {a_strides, b_strides});
  with_binary(op, [&](auto f) { binary_walk(f, out, a, b, w); });
}

// ---------------------------------------------------------------- scalar and unary
void scalar(Scalar op, float* out, const float* a, float s, int64_t n) {
  switch (op) {
    case Scalar::Add: map([s](float x) { return x + s; }, out, a, n); break;
    case Scalar::Mul: map([s](float x) { return x * s; }, out, a, n); break;
    case Scalar::RSub: map([s](float x) { return s - x; }, out, a, n); break;
    case Scalar::RDiv: map([s](float x) { return s / x; }, out, a, n); break;
    case Scalar::Pow:
      if (s == 2.f)  // the common case, exact and cheap
        map([](float x) { return x * x; }, out, a, n);
      else
        map([s](float x) { return std::pow(x, s); }, out, a, n);
      break;
  }
}

void unary(Unary op, float* out, const float* a, int64_t n) {
  switch (op) {
    case Unary::Neg: map([](float x) { return -x; }, out, a, n); break;
    case Unary::Log: map([](float x) { return std::log(x); }, out, a, n); break;
    case Unary::Sqrt: map([](float x) { return std::sqrt(x); }, out, a, n); break;
    case Unary::Square: map([](float x) { return x * x; }, out, a, n); break;
  }
}

void pow_backward(float* dx, const float* dy, const float* a, float p, int64_t n) {
  if (p == 0.f) {
#pragma omp parallel for schedule(static) if (n >= parallel_min())
    for (int64_t i = 0; i < n; ++i) dx[i] = 0.f;
    return;
  }
#pragma omp parallel for schedule(static) if (n >= parallel_min())
  for (int64_t i = 0; i < n; ++i) dx[i] = dy[i] * p * std::pow(a[i], p - 1.f);
}

// ---------------------------------------------------------------- broadcast
void broadcast_to(float* out, const float* a, int64_t D, const int64_t* shape, const int64_t* a_strides) {
  broadcast_impl(out, a, D, shape, a_strides);
}
void broadcast_to(int32_t* out, const int32_t* a, int64_t D, const int64_t* shape, const int64_t* a_strides) {
  broadcast_impl(out, a, D, shape, a_strides);
}

}  // namespace cm::cpu
