// View ops: new shape/strides/offset over the same storage, recorded so gradients flow back through them.
// (These are Tensor methods declared in engine/tensor.h; they live here because they record autograd history.)
#include "autograd/graph.h"

#include <numeric>

#include "kernels/copy.h"

namespace cm {

namespace {

Tensor make_view(const Tensor& src, Shape shape, Shape strides, int64_t offset) {
  auto impl = std::make_shared<TensorImpl>();
  impl->storage = src.impl().storage;
  impl->shape = std::move(shape);
  impl->strides = std::move(strides);
  impl->offset = offset;
  impl->dtype = src.dtype();
  return Tensor(std::move(impl));
}

// Resolves one -1 entry and checks the element count.
Shape infer_shape(const Shape& want, int64_t numel, const Shape& from) {
  Shape s = want;
  int64_t known = 1, infer = -1;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == -1) {
      CM_REQUIRE(infer < 0, "reshape to ", shape_str(want), ": only one dimension may be -1");
      infer = (int64_t)i;
    } else {
      CM_REQUIRE(s[i] >= 0, "reshape to ", shape_str(want), ": negative dimension");
      known *= s[i];
    }
  }
  if (infer >= 0) {
    CM_REQUIRE(known != 0 && numel % known == 0, "cannot reshape ", shape_str(from), " to ", shape_str(want));
    s[infer] = numel / known;
  }
  CM_REQUIRE(shape_numel(s) == numel, "cannot reshape ", shape_str(from), " (", numel, " elements) to ",
             shape_str(want));
  return s;
}

}  // namespace

Tensor Tensor::view(const Shape& shape) const {
  CM_REQUIRE(is_contiguous(), "view() needs a contiguous tensor (shape ", shape_str(this->shape()),
             "); use reshape()");
  Shape s = infer_shape(shape, numel(), this->shape());
  Tensor out = make_view(*this, s, contiguous_strides(s), offset());
  return record("view", out, {*this}, [in = this->shape()](const Tensor& g) { return grads{g.reshape(in)}; });
}

Tensor Tensor::reshape(const Shape& shape) const { return is_contiguous() ? view(shape) : contiguous().view(shape); }

Tensor Tensor::transpose(int64_t d0, int64_t d1) const {
  d0 = axis(d0);
  d1 = axis(d1);
  std::vector<int64_t> p(dim());
  std::iota(p.begin(), p.end(), 0);
  std::swap(p[d0], p[d1]);
  return permute(p);
}

Tensor Tensor::permute(const std::vector<int64_t>& dims) const {
  CM_REQUIRE((int64_t)dims.size() == dim(), "permute: ", dims.size(), " dims given for a tensor of rank ", dim());
  Shape s(dims.size()), st(dims.size());
  std::vector<int64_t> inverse(dims.size(), -1);
  for (size_t i = 0; i < dims.size(); ++i) {
    int64_t d = axis(dims[i]);
    CM_REQUIRE(inverse[d] < 0, "permute: dimension ", d, " repeated");
    inverse[d] = (int64_t)i;
    s[i] = shape()[d];
    st[i] = strides()[d];
  }
  Tensor out = make_view(*this, s, st, offset());
  return record("permute", out, {*this}, [inverse](const Tensor& g) { return grads{g.permute(inverse)}; });
}

Tensor Tensor::slice(int64_t d, int64_t start, int64_t end, int64_t step) const {
  d = axis(d);
  const int64_t n = shape()[d];
  CM_REQUIRE(step > 0, "slice: step must be positive, got ", step);
  if (start < 0) start += n;
  if (end < 0) end += n;
  start = std::min(std::max<int64_t>(start, 0), n);
  end = std::min(std::max<int64_t>(end, start), n);
  Shape s = shape(), st = strides();
  s[d] = (end - start + step - 1) / step;
  st[d] *= step;
  Tensor out = make_view(*this, s, st, offset() + start * strides()[d]);
  return record_window("slice", out, *this, {d, start, end, step});
}

Tensor Tensor::select(int64_t d, int64_t index) const {
  d = axis(d);
  const int64_t n = shape()[d];
  CM_REQUIRE(index >= -n && index < n, "select: index ", index, " out of range for dimension ", d, " of size ", n);
  if (index < 0) index += n;
  return slice(d, index, index + 1).squeeze(d);
}

Tensor Tensor::unsqueeze(int64_t d) const {
  const int64_t r = dim();
  CM_REQUIRE(d >= -r - 1 && d <= r, "unsqueeze: axis ", d, " out of range for rank ", r);
  if (d < 0) d += r + 1;
  Shape s = shape(), st = strides();
  s.insert(s.begin() + d, 1);
  st.insert(st.begin() + d, d < r ? strides()[d] * shape()[d] : 1);
  Tensor out = make_view(*this, s, st, offset());
  return record("unsqueeze", out, {*this}, [in = shape()](const Tensor& g) { return grads{g.reshape(in)}; });
}

Tensor Tensor::squeeze(int64_t d) const {
  d = axis(d);
  CM_REQUIRE(shape()[d] == 1, "squeeze: dimension ", d, " has size ", shape()[d], ", not 1");
  Shape s = shape(), st = strides();
  s.erase(s.begin() + d);
  st.erase(st.begin() + d);
  Tensor out = make_view(*this, s, st, offset());
  return record("squeeze", out, {*this}, [in = shape()](const Tensor& g) { return grads{g.reshape(in)}; });
}

Tensor Tensor::contiguous() const {
  if (is_contiguous()) return *this;
  return clone();
}

Tensor Tensor::clone() const {
  Tensor out = empty(shape(), dtype(), device());
  out.copy_(*this);
  return record("clone", out, {*this}, [](const Tensor& g) { return grads{g}; });
}

Tensor Tensor::to(Device device) const {
  if (device == this->device()) return *this;
  require_device(device);
  Tensor src = this->device() == Device::CPU ? contiguous().detach() : *this;
  Tensor out = empty(shape(), dtype(), device);
  out.copy_(src);
  return record("to_device", out, {*this}, [from = this->device()](const Tensor& g) { return grads{g.to(from)}; });
}

Tensor Tensor::to(DType dtype) const {
  if (dtype == this->dtype()) return *this;
  Tensor src = contiguous();
#if CM_CUDA
  if (device() == Device::CUDA) {
    Tensor out = empty(shape(), dtype, Device::CUDA);
    if (dtype == DType::I32)
      cuda::f32_to_i32(out.i32(), src.f32(), numel());
    else
      cuda::i32_to_f32(out.f32(), src.i32(), numel());
    return out;
  }
#endif
  Tensor out = empty(shape(), dtype, Device::CPU);
  if (dtype == DType::I32)
    cpu::f32_to_i32(out.i32(), src.f32(), numel());
  else
    cpu::i32_to_f32(out.f32(), src.i32(), numel());
  return out;
}

}  // namespace cm
