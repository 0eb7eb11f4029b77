// Elementwise ops: broadcasting binary arithmetic, scalar forms, unary maps and activations, sum_to/expand.
// Each op: check arguments, make inputs contiguous, call the raw kernel (one place per op, so a CUDA branch can
// sit beside it later), record the backward right below the forward.
// Broadcasting ops reduce each input's gradient with sum_to; sum_to and expand are each other's backward.
#include <algorithm>

#include "autograd/ops.h"
#include "engine/dispatch.h"
#include "kernels/activation.h"
#include "kernels/elementwise.h"
#include "kernels/reduce.h"

namespace cm {

namespace {

// Ops run on the device their inputs live on (engine/dispatch.h picks the CPU kernel or its CUDA twin).
void require_f32(const char* op, const Tensor& t) {
  CM_REQUIRE(t.dtype() == DType::F32, op, ": expected an f32 tensor, got ", dtype_name(t.dtype()), " ",
             shape_str(t.shape()));
}

// A contiguous copy (or the tensor itself) with no history: the op records its own node on the original input.
Tensor flat(const Tensor& t) { return t.detach().contiguous(); }

// NumPy broadcasting: align from the right; each pair of dims must be equal or contain a 1.
Shape broadcast_shape(const char* op, const Shape& a, const Shape& b) {
  const size_t D = std::max(a.size(), b.size());
  Shape out(D);
  for (size_t k = 0; k < D; ++k) {
    const int64_t da = k < a.size() ? a[a.size() - 1 - k] : 1, db = k < b.size() ? b[b.size() - 1 - k] : 1;
    CM_REQUIRE(da == db || da == 1 || db == 1, op, ": shapes ", shape_str(a), " and ", shape_str(b),
               " cannot be broadcast together (dimension ", (int64_t)(D - 1 - k), ": ", da, " vs ", db, ")");
    out[D - 1 - k] = da == 1 ? db : da;
  }
  return out;
}

// Element strides that read a contiguous tensor of shape `in` as if it had the (broadcast) shape `out`:
// rank padded on the left, 0 on every stretched dim.
Shape broadcast_strides(const Shape& in, const Shape& out) {
  Shape st(out.size(), 0);
  int64_t m = 1;
  for (size_t k = 0; k < in.size(); ++k) {
    const size_t di = in.size() - 1 - k, d = out.size() - 1 - k;
    st[d] = in[di] == 1 ? 0 : m;
    m *= in[di];
  }
  return st;
}

// ---------------------------------------------------------------- binary forward (f32 and i32)
template <class T>
void binary_kernel(Device dev, cpu::Binary op, T* out, const T* a, const T* b, const Shape& as, const Shape& bs,
                   const Shape& os) {
  const int64_t n = shape_numel(os);
  if (n == 0) return;
  if (as == bs) return CM_KERNEL(dev, binary, op, out, a, b, n);
  // The bias case: b holds one row ([C], [1, C], ...) and a already has the output shape.
  const int64_t C = os.empty() ? 1 : os.back();
  if (as == os && !bs.empty() && bs.back() == C && shape_numel(bs) == C)
    return CM_KERNEL(dev, binary_rows, op, out, a, b, n / C, C);
  const Shape sa = broadcast_strides(as, os), sb = broadcast_strides(bs, os);
  CM_KERNEL(dev, binary_strided, op, out, a, b, (int64_t)os.size(), os.data(), sa.data(), sb.data());
}

Tensor binary_forward(const char* name, cpu::Binary op, const Tensor& a, const Tensor& b) {
  const Device dev = common_device(name, {&a, &b});
  CM_REQUIRE(a.dtype() == b.dtype(), name, ": dtype mismatch, ", dtype_name(a.dtype()), " ", shape_str(a.shape()),
             " and ", dtype_name(b.dtype()), " ", shape_str(b.shape()));
  CM_REQUIRE(!(a.dtype() == DType::I32 && op == cpu::Binary::Div), name,
             ": integer division is not supported (i32 ", shape_str(a.shape()), "); convert to f32 first");
  const Shape os = broadcast_shape(name, a.shape(), b.shape());
  Tensor ac = flat(a), bc = flat(b), out = Tensor::empty(os, a.dtype(), dev);
  if (a.dtype() == DType::F32)
    binary_kernel(dev, op, out.f32(), ac.f32(), bc.f32(), a.shape(), b.shape(), os);
  else
    binary_kernel(dev, op, out.i32(), ac.i32(), bc.i32(), a.shape(), b.shape(), os);
  return out;
}

// ---------------------------------------------------------------- unary helpers
Tensor scalar_forward(const char* name, cpu::Scalar op, const Tensor& a, float s) {
  require_f32(name, a);
  Tensor ac = flat(a), out = Tensor::empty(a.shape(), DType::F32, a.device());
  CM_KERNEL(a.device(), scalar, op, out.f32(), ac.f32(), s, a.numel());
  return out;
}

Tensor unary_forward(const char* name, cpu::Unary op, const Tensor& a) {
  require_f32(name, a);
  Tensor ac = flat(a), out = Tensor::empty(a.shape(), DType::F32, a.device());
  CM_KERNEL(a.device(), unary, op, out.f32(), ac.f32(), a.numel());
  return out;
}

// An activation: forward kernel, and a backward kernel fed with the saved input x or output y.
using ActForward = void (*)(float* y, const float* x, int64_t n);
using ActBackward = void (*)(float* dx, const float* dy, const float* saved, int64_t n);
enum class Saves { Input, Output };
struct ActKernels {
  ActForward fwd;
  ActBackward bwd;
};
// The CPU pair and the CUDA pair of one activation (the CUDA pair is null in a build without CUDA).
#if CM_CUDA
#define CM_ACT(name)                                    \
  ActKernels{cpu::name##_forward, cpu::name##_backward}, \
      ActKernels { cuda::name##_forward, cuda::name##_backward }
#else
#define CM_ACT(name) \
  ActKernels{cpu::name##_forward, cpu::name##_backward}, ActKernels { nullptr, nullptr }
#endif

Tensor activation(const char* name, const Tensor& x, ActKernels on_cpu, ActKernels on_cuda, Saves saves) {
  require_f32(name, x);
  const ActKernels k = x.device() == Device::CUDA ? on_cuda : on_cpu;
  const ActForward fwd = k.fwd;
  const ActBackward bwd = k.bwd;
  Tensor xc = flat(x), y = Tensor::empty(x.shape(), DType::F32, x.device());
  fwd(y.f32(), xc.f32(), x.numel());
  // y.detach(): the closure must not own the output itself (output -> node -> closure -> output leaks).
  Tensor saved = saves == Saves::Output ? y.detach() : xc;
  return record(name, y, {x}, [saved, bwd](const Tensor& gy) {
    Tensor g = gy.contiguous(), dx = Tensor::empty(saved.shape(), DType::F32, saved.device());
    bwd(dx.f32(), g.f32(), saved.f32(), saved.numel());
    return grads{dx};
  });
}

}  // namespace

// ---------------------------------------------------------------- binary ops
// Gradients are computed only for inputs that want them; each is summed down to its input's shape.
Tensor add(const Tensor& a, const Tensor& b) {
  Tensor out = binary_forward("add", cpu::Binary::Add, a, b);
  return record("add", out, {a, b},
                [as = a.shape(), bs = b.shape(), ga = a.requires_grad(), gb = b.requires_grad()](const Tensor& gy) {
                  return grads{ga ? sum_to(gy, as) : Tensor(), gb ? sum_to(gy, bs) : Tensor()};
                });
}

Tensor sub(const Tensor& a, const Tensor& b) {
  Tensor out = binary_forward("sub", cpu::Binary::Sub, a, b);
  return record("sub", out, {a, b},
                [as = a.shape(), bs = b.shape(), ga = a.requires_grad(), gb = b.requires_grad()](const Tensor& gy) {
                  return grads{ga ? sum_to(gy, as) : Tensor(), gb ? neg(sum_to(gy, bs)) : Tensor()};
                });
}

Tensor mul(const Tensor& a, const Tensor& b) {
  Tensor out = binary_forward("mul", cpu::Binary::Mul, a, b);
  return record(
      "mul", out, {a, b},
      [ad = a.detach(), bd = b.detach(), ga = a.requires_grad(), gb = b.requires_grad()](const Tensor& gy) {
        // d(a*b)/da = b, d(a*b)/db = a
        return grads{ga ? sum_to(mul(gy, bd), ad.shape()) : Tensor(),
                     gb ? sum_to(mul(gy, ad), bd.shape()) : Tensor()};
      });
}

Tensor div(const Tensor& a, const Tensor& b) {
  Tensor out = binary_forward("div", cpu::Binary::Div, a, b);
  return record(
      "div", out, {a, b},
      [ad = a.detach(), bd = b.detach(), ga = a.requires_grad(), gb = b.requires_grad()](const Tensor& gy) {
        // d(a/b)/da = 1/b, d(a/b)/db = -a/b^2
        Tensor g_over_b = div(gy, bd);
        return grads{ga ? sum_to(g_over_b, ad.shape()) : Tensor(),
                     gb ? neg(sum_to(div(mul(g_over_b, ad), bd), bd.shape())) : Tensor()};
      });
}

// ---------------------------------------------------------------- scalar forms
Tensor add(const Tensor& a, float s) {
  Tensor out = scalar_forward("add", cpu::Scalar::Add, a, s);
  return record("add_scalar", out, {a}, [](const Tensor& gy) { return grads{gy}; });
}

Tensor mul(const Tensor& a, float s) {
  Tensor out = scalar_forward("mul", cpu::Scalar::Mul, a, s);
  return record("mul_scalar", out, {a}, [s](const Tensor& gy) { return grads{mul(gy, s)}; });
}

Tensor rsub(float s, const Tensor& a) {
  Tensor out = scalar_forward("rsub", cpu::Scalar::RSub, a, s);
  return record("rsub", out, {a}, [](const Tensor& gy) { return grads{neg(gy)}; });
}

Tensor rdiv(float s, const Tensor& a) {
  Tensor out = scalar_forward("rdiv", cpu::Scalar::RDiv, a, s);
  // d(s/a)/da = -s/a^2 = -y/a
  return record("rdiv", out, {a}, [ad = a.detach(), yd = out.detach()](const Tensor& gy) {
    return grads{neg(div(mul(gy, yd), ad))};
  });
}

Tensor pow(const Tensor& a, float p) {
  Tensor out = scalar_forward("pow", cpu::Scalar::Pow, a, p);
  return record("pow", out, {a}, [ad = a.detach(), p](const Tensor& gy) {
    Tensor g = gy.contiguous(), ac = ad.contiguous(), dx = Tensor::empty(ad.shape(), DType::F32, ad.device());
    CM_KERNEL(ad.device(), pow_backward, dx.f32(), g.f32(), ac.f32(), p, ad.numel());
    return grads{dx};
  });
}

// ---------------------------------------------------------------- unary maps
Tensor neg(const Tensor& a) {
  Tensor out = unary_forward("neg", cpu::Unary::Neg, a);
  return record("neg", out, {a}, [](const Tensor& gy) { return grads{neg(gy)}; });
}

Tensor log(const Tensor& a) {
  Tensor out = unary_forward("log", cpu::Unary::Log, a);
  return record("log", out, {a}, [ad = a.detach()](const Tensor& gy) { return grads{div(gy, ad)}; });
}

Tensor sqrt(const Tensor& a) {
  Tensor out = unary_forward("sqrt", cpu::Unary::Sqrt, a);
  // d sqrt(a)/da = 1 / (2 sqrt(a)) = 0.5 / y
  return record("sqrt", out, {a}, [yd = out.detach()](const Tensor& gy) { return grads{div(mul(gy, 0.5f), yd)}; });
}

Tensor square(const Tensor& a) {
  Tensor out = unary_forward("square", cpu::Unary::Square, a);
  return record("square", out, {a}, [ad = a.detach()](const Tensor& gy) { return grads{mul(gy, mul(ad, 2.f))}; });
}

// ---------------------------------------------------------------- activations (and exp, which shares their math)
Tensor exp(const Tensor& a) { return activation("exp", a, CM_ACT(exp), Saves::Output); }
Tensor tanh(const Tensor& a) { return activation("tanh", a, CM_ACT(tanh), Saves::Output); }
Tensor sigmoid(const Tensor& a) { return activation("sigmoid", a, CM_ACT(sigmoid), Saves::Output); }
Tensor relu(const Tensor& a) { return activation("relu", a, CM_ACT(relu), Saves::Input); }
Tensor gelu(const Tensor& a, GeluKind kind) {
  if (kind == GeluKind::Exact) return activation("gelu", a, CM_ACT(gelu_exact), Saves::Input);
  return activation("gelu", a, CM_ACT(gelu_tanh), Saves::Input);
}
Tensor silu(const Tensor& a) { return activation("silu", a, CM_ACT(silu), Saves::Input); }

// ---------------------------------------------------------------- sum_to / expand
Tensor sum_to(const Tensor& a, const Shape& shape) {
  require_f32("sum_to", a);
  const Shape& as = a.shape();
  // Valid targets are the shapes that broadcast to a's shape: rank <= a's, each dim equal to a's or 1.
  bool ok = shape.size() <= as.size();
  for (size_t k = 0; ok && k < shape.size(); ++k) {
    const int64_t dt = shape[shape.size() - 1 - k], da = as[as.size() - 1 - k];
    ok = dt == da || dt == 1;
  }
  CM_REQUIRE(ok, "sum_to: cannot sum shape ", shape_str(as), " down to ", shape_str(shape),
             " (the target must broadcast to the input)");
  if (shape == as) return a;  // nothing to sum: the input itself, like PyTorch's sum_to_size
  Shape aligned(as.size() - shape.size(), 1);  // target with a's rank
  aligned.insert(aligned.end(), shape.begin(), shape.end());
  Tensor ac = flat(a), out = Tensor::empty(shape, DType::F32, a.device());
  CM_KERNEL(a.device(), sum_to, out.f32(), ac.f32(), (int64_t)as.size(), as.data(), aligned.data());
  return record("sum_to", out, {a}, [as](const Tensor& gy) { return grads{expand(gy, as)}; });
}

Tensor expand(const Tensor& a, const Shape& shape) {
  const Shape& as = a.shape();
  bool ok = as.size() <= shape.size();
  for (size_t k = 0; ok && k < as.size(); ++k) {
    const int64_t da = as[as.size() - 1 - k], dt = shape[shape.size() - 1 - k];
    ok = da == dt || (da == 1 && dt >= 0);
  }
  CM_REQUIRE(ok, "expand: cannot broadcast shape ", shape_str(as), " to ", shape_str(shape));
  if (shape == as) return a;  // nothing to stretch: the input itself
  Tensor ac = flat(a), out = Tensor::empty(shape, a.dtype(), a.device());
  const Shape st = broadcast_strides(as, shape);
  if (a.dtype() == DType::F32)
    CM_KERNEL(a.device(), broadcast_to, out.f32(), ac.f32(), (int64_t)shape.size(), shape.data(), st.data());
  else
    CM_KERNEL(a.device(), broadcast_to, out.i32(), ac.i32(), (int64_t)shape.size(), shape.data(), st.data());
  return record("expand", out, {a}, [as](const Tensor& gy) { return grads{sum_to(gy, as)}; });
}

}  // namespace cm
