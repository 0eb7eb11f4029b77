// Reductions: sum, mean, max over everything (a 0-d result) or over one axis; argmax.
// An axis reduction views its contiguous input as [O, R, I]: O = dims before the axis, R = the axis, I = dims
// after it. Sums accumulate in double in a thread-count-independent order (kernels/reduce.h), so they are
// deterministic; backward of sum/mean is a broadcast, backward of max routes the gradient to the FIRST maximum.
#include <climits>

#include "autograd/ops.h"
#include "engine/dispatch.h"
#include "kernels/reduce.h"

namespace cm {

namespace {

void require_f32(const char* op, const Tensor& t) {
  CM_REQUIRE(t.dtype() == DType::F32, op, ": expected an f32 tensor, got ", dtype_name(t.dtype()), " ",
             shape_str(t.shape()));
}

// One axis of a, resolved: [O, R, I] sizes and the output shapes with the axis dropped or kept as 1.
struct AxisSplit {
  int64_t d, O = 1, R, I = 1;
  Shape kept;     // axis kept with size 1 (the shape a gradient is expanded from)
  Shape dropped;  // axis removed
};

AxisSplit split_axis(const Tensor& a, int64_t dim) {
  AxisSplit s;
  s.d = a.axis(dim);  // names the axis and the rank when out of range
  const Shape& sh = a.shape();
  s.R = sh[s.d];
  for (int64_t k = 0; k < s.d; ++k) s.O *= sh[k];
  for (int64_t k = s.d + 1; k < (int64_t)sh.size(); ++k) s.I *= sh[k];
  s.kept = sh;
  s.kept[s.d] = 1;
  s.dropped = sh;
  s.dropped.erase(s.dropped.begin() + s.d);
  return s;
}

// out = scale * sum over the axis; backward broadcasts scale * gy back over it.
Tensor sum_axis_scaled(const char* name, const Tensor& a, int64_t dim, bool keepdim, float scale) {
  require_f32(name, a);
  const AxisSplit s = split_axis(a, dim);
  Tensor ac = a.detach().contiguous(), out = Tensor::empty(keepdim ? s.kept : s.dropped, DType::F32, a.device());
  CM_KERNEL(a.device(), sum_axis, out.f32(), ac.f32(), s.O, s.R, s.I, scale);
  return record(name, out, {a}, [kept = s.kept, as = a.shape(), scale](const Tensor& gy) {
    Tensor g = expand(gy.reshape(kept), as);
    return grads{scale == 1.f ? g : mul(g, scale)};
  });
}

}  // namespace

// ---------------------------------------------------------------- sum, mean
Tensor sum(const Tensor& a) {
  require_f32("sum", a);
  Tensor ac = a.detach().contiguous(), out = Tensor::empty({}, DType::F32, a.device());
  CM_KERNEL(a.device(), sum_all, out.f32(), ac.f32(), a.numel(), 1.f);
  return record("sum", out, {a}, [as = a.shape()](const Tensor& gy) { return grads{expand(gy, as)}; });
}

Tensor sum(const Tensor& a, int64_t dim, bool keepdim) { return sum_axis_scaled("sum", a, dim, keepdim, 1.f); }

// The mean of nothing is NaN (0 * 1/0), as in PyTorch.
Tensor mean(const Tensor& a) {
  require_f32("mean", a);
  const float scale = 1.f / (float)a.numel();
  Tensor ac = a.detach().contiguous(), out = Tensor::empty({}, DType::F32, a.device());
  CM_KERNEL(a.device(), sum_all, out.f32(), ac.f32(), a.numel(), scale);
  return record("mean", out, {a},
                [as = a.shape(), scale](const Tensor& gy) { return grads{mul(expand(gy, as), scale)}; });
}

Tensor mean(const Tensor& a, int64_t dim, bool keepdim) {
  return sum_axis_scaled("mean", a, dim, keepdim, 1.f / (float)a.size(dim));  // size() checks the axis
}

// ---------------------------------------------------------------- max, argmax
Tensor max(const Tensor& a) {
  require_f32("max", a);
  CM_REQUIRE(a.numel() > 0, "max: the maximum of an empty tensor ", shape_str(a.shape()), " is undefined");
  CM_REQUIRE(a.numel() < INT32_MAX, "max: ", a.numel(), " elements; at most 2^31 - 1 are supported");
  Tensor ac = a.detach().contiguous(), out = Tensor::empty({}, DType::F32, a.device());
  // The position stays where the data is (no device-to-host wait): an int64 in two i32 slots, whose low word
  // (little-endian) is the position as the i32 index that max_axis_backward reads, with [O, R, I] = [1, n, 1].
  Tensor at = Tensor::empty({2}, DType::I32, a.device());
  CM_KERNEL(a.device(), max_all, out.f32(), (int64_t*)at.raw(), ac.f32(), a.numel());
  return record("max", out, {a}, [as = a.shape(), at](const Tensor& gy) {
    Tensor g = gy.contiguous(), dx = Tensor::empty(as, DType::F32, g.device());
    CM_KERNEL(g.device(), max_axis_backward, dx.f32(), g.f32(), at.i32(), 1, shape_numel(as), 1);
    return grads{dx};
  });
}

Tensor max(const Tensor& a, int64_t dim, bool keepdim) {
  require_f32("max", a);
  const AxisSplit s = split_axis(a, dim);
  CM_REQUIRE(s.R > 0, "max: axis ", dim, " of ", shape_str(a.shape()), " is empty");
  const Device dev = a.device();
  Tensor ac = a.detach().contiguous(), out = Tensor::empty(keepdim ? s.kept : s.dropped, DType::F32, dev);
  const bool want_grad = needs_grad({&a});
  Tensor idx = want_grad ? Tensor::empty({s.O, s.I}, DType::I32, dev) : Tensor();  // [O, I]: the r of each max
  CM_KERNEL(dev, max_axis, out.f32(), want_grad ? idx.i32() : nullptr, ac.f32(), s.O, s.R, s.I);
  return record("max_axis", out, {a}, [idx, s, as = a.shape()](const Tensor& gy) {
    Tensor g = gy.contiguous(), dx = Tensor::empty(as, DType::F32, g.device());
    CM_KERNEL(g.device(), max_axis_backward, dx.f32(), g.f32(), idx.i32(), s.O, s.R, s.I);
    return grads{dx};
  });
}

Tensor argmax(const Tensor& a, int64_t dim) {
  require_f32("argmax", a);
  const AxisSplit s = split_axis(a, dim);
  CM_REQUIRE(s.R > 0, "argmax: axis ", dim, " of ", shape_str(a.shape()), " is empty");
  Tensor ac = a.detach().contiguous(), out = Tensor::empty(s.dropped, DType::I32, a.device());
  CM_KERNEL(a.device(), max_axis, nullptr, out.i32(), ac.f32(), s.O, s.R, s.I);
  return out;
}

}  // namespace cm
