// Indexing ops: concat/split, index_select/index_add, gather/scatter_add, topk, where/masked_fill.
// Each forward checks its arguments, calls one raw kernel (kernels/index.h, kernels/topk.h) and records its
// backward right beside it. The backward rules pair up: concat <-> split, index_select <-> index_add,
// gather <-> scatter_add; topk scatters into the chosen columns; where/masked_fill pass the gradient by mask.
//
// Layout: along an axis `dim` a contiguous tensor is [O, D, I] (kernels/index.h). Indices are i32 in [0, D):
// negative indices are an error here, not "from the end" (the mistake they usually are is an unfilled slot).
// Determinism: index_add and scatter_add add repeated indices in source order for any thread count.
#include <algorithm>

#include "autograd/ops.h"
#include "engine/dispatch.h"
#include "kernels/index.h"
#include "kernels/topk.h"

namespace cm {

namespace {

// Data of t as a contiguous tensor, without recording a clone in the graph (the op records itself on t).
Tensor dense(const Tensor& t) {
  NoGrad g;
  return t.contiguous();
}

// Every op runs on the device of its inputs (one device for all of them); CM_KERNEL picks the CPU or CUDA twin.

struct ODI {
  int64_t O = 1, D = 1, I = 1;
};
ODI odi(const Shape& s, int64_t dim) {
  ODI r;
  for (int64_t d = 0; d < dim; ++d) r.O *= s[d];
  r.D = s[dim];
  for (int64_t d = dim + 1; d < (int64_t)s.size(); ++d) r.I *= s[d];
  return r;
}

// Throws naming the first index outside [0, D) (index contiguous). CPU only: the CUDA kernels check each index
// themselves and record a bad one, reported at the next read-out (engine/cuda.h), so no op waits for a check.
void check_indices(const char* op, const Tensor& index, int64_t dim, int64_t D, const Shape& a_shape) {
  const int64_t n = index.numel();
  if (index.device() != Device::CPU || n == 0) return;
  const int64_t bad = cpu::index_first_bad(index.i32(), n, D);
  CM_REQUIRE(bad < 0, op, ": index ", (bad < 0 ? 0 : index.i32()[bad]), " (at position ", bad,
             ") is out of range [0, ", D, ") for dimension ", dim, " of ", shape_str(a_shape));
}

void require_dtype(const char* op, const char* what, const Tensor& t, DType want) {
  CM_REQUIRE(t.dtype() == want, op, ": ", what, " must be ", dtype_name(want), ", got ", dtype_name(t.dtype()), " ",
             shape_str(t.shape()));
}

// The NumPy broadcast of `shapes` into `out`; false when they do not broadcast.
bool broadcast_shape(const std::vector<Shape>& shapes, Shape& out) {
  size_t r = 0;
  for (const Shape& s : shapes) r = std::max(r, s.size());
  out.assign(r, 1);
  for (const Shape& s : shapes)
    for (size_t i = 0; i < s.size(); ++i) {
      int64_t& o = out[r - s.size() + i];
      int64_t v = s[i];
      if (v == o || v == 1) continue;
      if (o != 1) return false;
      o = v;
    }
  return true;
}

// Element strides of a contiguous tensor of shape s read over the broadcast shape `out` (0 along stretched dims).
Shape broadcast_strides(const Shape& s, const Shape& out) {
  Shape st(out.size(), 0);
  Shape cs = contiguous_strides(s);
  const size_t lead = out.size() - s.size();
  for (size_t i = 0; i < s.size(); ++i) st[lead + i] = (s[i] == 1 && out[lead + i] != 1) ? 0 : cs[i];
  return st;
}

}  // namespace

// ---------------------------------------------------------------- concat / split

Tensor concat(const std::vector<Tensor>& xs, int64_t dim) {
  CM_REQUIRE(!xs.empty(), "concat: no tensors given");
  const Tensor& x0 = xs[0];
  const int64_t d = x0.axis(dim);
  Shape out_shape = x0.shape();
  out_shape[d] = 0;
  std::vector<int64_t> sizes;
  for (const Tensor& x : xs) {
    common_device("concat", {&x0, &x});
    CM_REQUIRE(x.dtype() == x0.dtype(), "concat: dtypes differ: ", dtype_name(x0.dtype()), " ",
               shape_str(x0.shape()), " and ", dtype_name(x.dtype()), " ", shape_str(x.shape()));
    bool ok = x.dim() == x0.dim();
    for (int64_t i = 0; ok && i < x.dim(); ++i) ok = i == d || x.shape()[i] == x0.shape()[i];
    CM_REQUIRE(ok, "concat along dim ", dim, ": shapes ", shape_str(x0.shape()), " and ", shape_str(x.shape()),
               " differ outside that dim");
    sizes.push_back(x.shape()[d]);
    out_shape[d] += x.shape()[d];
  }
  const Device dev = x0.device();
  Tensor out = Tensor::empty(out_shape, x0.dtype(), dev);
  const ODI o = odi(out_shape, d);
  int64_t at = 0;
  for (const Tensor& x : xs) {
    Tensor xc = dense(x);
    if (x.dtype() == DType::F32)
      CM_KERNEL(dev, concat_piece, out.f32(), xc.f32(), o.O, o.D, at, x.shape()[d], o.I);
    else
      CM_KERNEL(dev, concat_piece, out.i32(), xc.i32(), o.O, o.D, at, x.shape()[d], o.I);
    at += x.shape()[d];
  }
  return record("concat", out, xs, [sizes, d](const Tensor& g) { return split(g, sizes, d); });
}

std::vector<Tensor> split(const Tensor& a, const std::vector<int64_t>& sizes, int64_t dim) {
  const int64_t d = a.axis(dim);
  int64_t total = 0;
  for (int64_t s : sizes) {
    CM_REQUIRE(s >= 0, "split: negative size ", s);
    total += s;
  }
  CM_REQUIRE(total == a.shape()[d], "split: sizes add up to ", total, " but dim ", dim, " of ", shape_str(a.shape()),
             " has size ", a.shape()[d]);
  Tensor ac = dense(a);
  const ODI o = odi(a.shape(), d);
  std::vector<Tensor> outs;
  int64_t at = 0;
  for (size_t p = 0; p < sizes.size(); ++p) {
    Shape s = a.shape();
    s[d] = sizes[p];
    Tensor out = Tensor::empty(s, a.dtype(), a.device());
    if (a.dtype() == DType::F32)
      CM_KERNEL(a.device(), split_piece, out.f32(), ac.f32(), o.O, o.D, at, sizes[p], o.I);
    else
      CM_KERNEL(a.device(), split_piece, out.i32(), ac.i32(), o.O, o.D, at, sizes[p], o.I);
    // Backward of piece p: its gradient goes into its own window of a's gradient (graph.h, record_window).
    outs.push_back(record_window("split", out, a, {d, at, at + sizes[p], 1}));
    at += sizes[p];
  }
  return outs;
}

// ---------------------------------------------------------------- index_select / index_add

Tensor index_select(const Tensor& a, int64_t dim, const Tensor& index) {
  common_device("index_select", {&a, &index});
  require_dtype("index_select", "index", index, DType::I32);
  CM_REQUIRE(index.dim() == 1, "index_select: index must be 1-D, got ", shape_str(index.shape()));
  const int64_t d = a.axis(dim);
  Tensor ix = dense(index), ac = dense(a);
  const ODI o = odi(a.shape(), d);
  check_indices("index_select", ix, d, o.D, a.shape());
  const int64_t n = ix.numel();
  Shape s = a.shape();
  s[d] = n;
  Tensor out = Tensor::empty(s, a.dtype(), a.device());
  if (a.dtype() == DType::F32)
    CM_KERNEL(a.device(), index_select, out.f32(), ac.f32(), ix.i32(), o.O, o.D, n, o.I);
  else
    CM_KERNEL(a.device(), index_select, out.i32(), ac.i32(), ix.i32(), o.O, o.D, n, o.I);
  return record("index_select", out, {a}, [shape = a.shape(), d, ix](const Tensor& g) {
    return grads{index_add(Tensor::zeros(shape, DType::F32, g.device()), d, ix, g)};
  });
}

Tensor index_add(const Tensor& a, int64_t dim, const Tensor& index, const Tensor& src) {
  common_device("index_add", {&a, &index, &src});
  require_dtype("index_add", "a", a, DType::F32);
  require_dtype("index_add", "src", src, DType::F32);
  require_dtype("index_add", "index", index, DType::I32);
  CM_REQUIRE(index.dim() == 1, "index_add: index must be 1-D, got ", shape_str(index.shape()));
  const int64_t d = a.axis(dim);
  const int64_t n = index.numel();
  Shape want = a.shape();
  want[d] = n;
  CM_REQUIRE(src.shape() == want, "index_add: src ", shape_str(src.shape()), " must be ", shape_str(want), " (a ",
             shape_str(a.shape()), " with dim ", dim, " = index size ", n, ")");
  Tensor ix = dense(index);
  const ODI o = odi(a.shape(), d);
  check_indices("index_add", ix, d, o.D, a.shape());
  Tensor out = Tensor::empty(a.shape(), DType::F32, a.device());
  {
    NoGrad g;
    out.copy_(a);
  }
  Tensor sc = dense(src);
  CM_KERNEL(a.device(), index_add, out.f32(), sc.f32(), ix.i32(), o.O, o.D, n, o.I);
  return record("index_add", out, {a, src}, [d, ix](const Tensor& g) {
    return grads{g, index_select(g, d, ix)};
  });
}

// ---------------------------------------------------------------- gather / scatter_add

namespace {
// index (and src) must have a's rank and a's sizes except along dim (any size there).
void check_gather_shape(const char* op, const Tensor& a, int64_t d, const Tensor& index) {
  bool ok = index.dim() == a.dim();
  for (int64_t i = 0; ok && i < a.dim(); ++i) ok = i == d || index.shape()[i] == a.shape()[i];
  CM_REQUIRE(ok, op, ": index ", shape_str(index.shape()), " must match ", shape_str(a.shape()),
             " in every dim but ", d);
}
}  // namespace

Tensor gather(const Tensor& a, int64_t dim, const Tensor& index) {
  common_device("gather", {&a, &index});
  require_dtype("gather", "index", index, DType::I32);
  const int64_t d = a.axis(dim);
  check_gather_shape("gather", a, d, index);
  Tensor ix = dense(index), ac = dense(a);
  const ODI o = odi(a.shape(), d);
  check_indices("gather", ix, d, o.D, a.shape());
  const int64_t m = index.shape()[d];
  Tensor out = Tensor::empty(index.shape(), a.dtype(), a.device());
  if (a.dtype() == DType::F32)
    CM_KERNEL(a.device(), gather, out.f32(), ac.f32(), ix.i32(), o.O, o.D, m, o.I);
  else
    CM_KERNEL(a.device(), gather, out.i32(), ac.i32(), ix.i32(), o.O, o.D, m, o.I);
  return record("gather", out, {a}, [shape = a.shape(), d, ix](const Tensor& g) {
    return grads{scatter_add(Tensor::zeros(shape, DType::F32, g.device()), d, ix, g)};
  });
}

Tensor scatter_add(const Tensor& a, int64_t dim, const Tensor& index, const Tensor& src) {
  common_device("scatter_add", {&a, &index, &src});
  require_dtype("scatter_add", "a", a, DType::F32);
  require_dtype("scatter_add", "src", src, DType::F32);
  require_dtype("scatter_add", "index", index, DType::I32);
  const int64_t d = a.axis(dim);
  CM_REQUIRE(src.shape() == index.shape(), "scatter_add: src ", shape_str(src.shape()), " and index ",
             shape_str(index.shape()), " must have one shape");
  check_gather_shape("scatter_add", a, d, index);
  Tensor ix = dense(index), sc = dense(src);
  const ODI o = odi(a.shape(), d);
  check_indices("scatter_add", ix, d, o.D, a.shape());
  Tensor out = Tensor::empty(a.shape(), DType::F32, a.device());
  {
    NoGrad g;
    out.copy_(a);
  }
  CM_KERNEL(a.device(), scatter_add, out.f32(), sc.f32(), ix.i32(), o.O, o.D, index.shape()[d], o.I);
  return record("scatter_add", out, {a, src}, [d, ix](const Tensor& g) {
    return grads{g, gather(g, d, ix)};
  });
}

// ---------------------------------------------------------------- topk

std::pair<Tensor, Tensor> topk(const Tensor& a, int64_t k) {
  require_dtype("topk", "input", a, DType::F32);
  CM_REQUIRE(a.dim() >= 1, "topk: needs at least one dimension, got a scalar");
  const int64_t n = a.shape().back();
  CM_REQUIRE(k >= 0 && k <= n, "topk: k = ", k, " must be in [0, n] with n = ", n, " (last dim of ",
             shape_str(a.shape()), ")");
  int64_t R = 1;
  for (int64_t i = 0; i + 1 < a.dim(); ++i) R *= a.shape()[(size_t)i];
  Shape s = a.shape();
  s.back() = k;
  Tensor values = Tensor::empty(s, DType::F32, a.device()), indices = Tensor::empty(s, DType::I32, a.device());
  Tensor ac = dense(a);
  CM_KERNEL(a.device(), topk_forward, values.f32(), indices.i32(), ac.f32(), R, n, k);
  values = record("topk", values, {a}, [shape = a.shape(), ix = indices, R, n, k](const Tensor& g) {
    Tensor dx = Tensor::empty(shape, DType::F32, g.device());
    Tensor gc = g.contiguous();
    CM_KERNEL(g.device(), topk_backward, dx.f32(), gc.f32(), ix.i32(), R, n, k);
    return grads{dx};
  });
  return {values, indices};
}

// ---------------------------------------------------------------- where / masked_fill

Tensor where(const Tensor& mask, const Tensor& a, const Tensor& b) {
  const Device dev = common_device("where", {&mask, &a, &b});
  require_dtype("where", "mask", mask, DType::I32);
  require_dtype("where", "a", a, DType::F32);
  require_dtype("where", "b", b, DType::F32);
  Shape s;
  CM_REQUIRE(broadcast_shape({mask.shape(), a.shape(), b.shape()}, s), "where: mask ", shape_str(mask.shape()),
             ", a ", shape_str(a.shape()), " and b ", shape_str(b.shape()), " do not broadcast");
  Tensor mc = dense(mask), ac = dense(a), bc = dense(b);
  Shape ms = broadcast_strides(mask.shape(), s), as = broadcast_strides(a.shape(), s),
        bs = broadcast_strides(b.shape(), s);
  Tensor out = Tensor::empty(s, DType::F32, dev);
  CM_KERNEL(dev, where, out.f32(), mc.i32(), ac.f32(), bc.f32(), (int64_t)s.size(), s.data(), ms.data(), as.data(),
            bs.data());
  // Gradient: through a where the mask is set, through b elsewhere; summed back over broadcast dims.
  return record("where", out, {a, b}, [mc, sa = a.shape(), sb = b.shape(), s](const Tensor& g) {
    Tensor zero = Tensor::zeros({}, DType::F32, g.device());
    Tensor ga = where(mc, g, zero), gb = where(mc, zero, g);
    return grads{sa == s ? ga : sum_to(ga, sa), sb == s ? gb : sum_to(gb, sb)};
  });
}

Tensor masked_fill(const Tensor& a, const Tensor& mask, float value) {
  const Device dev = common_device("masked_fill", {&a, &mask});
  require_dtype("masked_fill", "a", a, DType::F32);
  require_dtype("masked_fill", "mask", mask, DType::I32);
  Shape s;
  CM_REQUIRE(broadcast_shape({mask.shape(), a.shape()}, s) && s == a.shape(), "masked_fill: mask ",
             shape_str(mask.shape()), " does not broadcast to a ", shape_str(a.shape()));
  Tensor mc = dense(mask), ac = dense(a);
  Shape ms = broadcast_strides(mask.shape(), s);
  Tensor out = Tensor::empty(s, DType::F32, dev);
  CM_KERNEL(dev, masked_fill, out.f32(), ac.f32(), mc.i32(), value, (int64_t)s.size(), s.data(), ms.data());
  return record("masked_fill", out, {a}, [mc](const Tensor& g) { return grads{masked_fill(g, mc, 0.f)}; });
}

}  // namespace cm
