// Tensor: a handle (shared_ptr) to shape + strides + offset over shared Storage, PyTorch style.
// Copying a Tensor copies the handle: both names see the same data and the same autograd state.
// Views (view/reshape, transpose/permute, slice) share storage; contiguous() copies when needed.
// Sizes and strides are in elements and int64_t; dtypes are f32 and i32; devices CPU and (when built) CUDA.
#pragma once
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <string>
#include <vector>

#include "engine/check.h"
#include "engine/rng.h"

namespace cm {

enum class DType : uint8_t { F32, I32 };
enum class Device : uint8_t { CPU, CUDA };
using Shape = std::vector<int64_t>;

const char* dtype_name(DType d);
const char* device_name(Device d);
size_t dtype_size(DType d);
std::string shape_str(const Shape& s);  // "[2, 3]"
int64_t shape_numel(const Shape& s);
Shape contiguous_strides(const Shape& s);

// Raw memory on one device. CPU memory is 64-byte aligned; CUDA memory comes from the caching allocator.
struct Storage {
  void* ptr = nullptr;
  size_t nbytes = 0;
  Device device = Device::CPU;
  // Set by code that cuts the buffer into disjoint blocks, hands each block out as a tensor of its own and keeps
  // no tensor of the whole (autograd/ops_moe.cpp: every expert's weight gradient in one allocation). A block's
  // only tensor then owns it (autograd/graph.cpp owned()): backward takes it as a leaf's gradient, no copy.
  bool partitioned = false;
  Storage(size_t nbytes, Device device);
  ~Storage();
  Storage(const Storage&) = delete;
  Storage& operator=(const Storage&) = delete;
};

struct Node;  // autograd/graph.h

struct TensorImpl {
  std::shared_ptr<Storage> storage;
  Shape shape;
  Shape strides;
  int64_t offset = 0;  // in elements
  DType dtype = DType::F32;
  // autograd state
  bool requires_grad = false;
  std::shared_ptr<TensorImpl> grad;  // leaves only: accumulated by backward()
  std::shared_ptr<Node> grad_fn;     // set on outputs of recorded ops
};

class Tensor {
 public:
  Tensor() = default;  // undefined tensor (no storage)
  explicit Tensor(std::shared_ptr<TensorImpl> impl) : impl_(std::move(impl)) {}

  // ---- creation
  static Tensor empty(const Shape& shape, DType dtype = DType::F32, Device device = Device::CPU);
  static Tensor zeros(const Shape& shape, DType dtype = DType::F32, Device device = Device::CPU);
  static Tensor ones(const Shape& shape, DType dtype = DType::F32, Device device = Device::CPU);
  static Tensor full(const Shape& shape, float value, DType dtype = DType::F32, Device device = Device::CPU);
  static Tensor arange(int64_t n, DType dtype = DType::F32, Device device = Device::CPU);  // 0..n-1
  static Tensor rand(const Shape& shape, Generator& gen, Device device = Device::CPU);   // U[0,1)
  static Tensor randn(const Shape& shape, Generator& gen, Device device = Device::CPU);  // N(0,1)
  static Tensor from_vector(const std::vector<float>& v, const Shape& shape, Device device = Device::CPU);
  static Tensor from_vector(const std::vector<int32_t>& v, const Shape& shape, Device device = Device::CPU);
  // A scalar (0-d) f32 tensor.
  static Tensor scalar(float v, Device device = Device::CPU);

  // ---- metadata
  bool defined() const { return impl_ != nullptr; }
  const Shape& shape() const { return impl().shape; }
  const Shape& strides() const { return impl().strides; }
  int64_t offset() const { return impl().offset; }
  int64_t dim() const { return (int64_t)impl().shape.size(); }
  int64_t size(int64_t d) const;  // negative d counts from the end
  int64_t numel() const { return shape_numel(impl().shape); }
  DType dtype() const { return impl().dtype; }
  Device device() const { return impl().storage->device; }
  bool is_contiguous() const;
  // Normalises a possibly negative axis for this tensor's rank; names the axis and rank if out of range.
  int64_t axis(int64_t d) const;

  // ---- data access. Pointers include the view offset. Checks dtype.
  float* f32() const;
  int32_t* i32() const;
  void* raw() const;  // untyped, offset applied
  float item() const;  // one-element tensor, any device, as float
  std::vector<float> to_f32_vector() const;  // values in logical (row-major) order, any layout or device
  std::vector<int32_t> to_i32_vector() const;

  // ---- views (share storage; recorded by autograd)
  Tensor view(const Shape& shape) const;     // contiguous input; one dim may be -1
  Tensor reshape(const Shape& shape) const;  // view if possible, else contiguous copy
  Tensor transpose(int64_t d0, int64_t d1) const;
  Tensor permute(const std::vector<int64_t>& dims) const;
  Tensor slice(int64_t dim, int64_t start, int64_t end, int64_t step = 1) const;  // [start, end) python-style
  Tensor select(int64_t dim, int64_t index) const;                                // drops dim
  Tensor unsqueeze(int64_t dim) const;
  Tensor squeeze(int64_t dim) const;
  Tensor flatten() const { return reshape({numel()}); }
  Tensor contiguous() const;  // self if already contiguous
  Tensor clone() const;       // always a fresh contiguous copy (recorded)
  Tensor to(Device device) const;
  Tensor to(DType dtype) const;  // value conversion f32 <-> i32 (not differentiable)

  // ---- autograd
  bool requires_grad() const { return impl().requires_grad; }
  Tensor& requires_grad_(bool on = true);
  Tensor grad() const;  // undefined until backward reaches this leaf
  void set_grad(const Tensor& g) const;
  void zero_grad() const;  // drops the gradient (like PyTorch's set_to_none)
  bool is_leaf() const { return impl().grad_fn == nullptr; }
  Tensor detach() const;  // same storage, no history
  // Reverse-mode sweep from this tensor. Without an argument the tensor must hold one element (seed 1).
  void backward(const Tensor& grad_output = Tensor()) const;

  // ---- in place, no autograd (optimizers, initialisation, fault injection)
  Tensor& fill_(float v);
  Tensor& copy_(const Tensor& src);  // same shape; any layouts; any devices

  std::string str(int64_t max_per_dim = 6) const;  // "tensor([2, 3] f32 cpu)\n[[...]]"

  TensorImpl& impl() const {
    CM_CHECK(impl_, "use of an undefined tensor");
    return *impl_;
  }
  const std::shared_ptr<TensorImpl>& impl_ptr() const { return impl_; }
  bool same(const Tensor& o) const { return impl_ == o.impl_; }

 private:
  std::shared_ptr<TensorImpl> impl_;
};

std::ostream& operator<<(std::ostream& os, const Tensor& t);

// The host's read-out of several tensors on dev (f32 or i32, 4 bytes an element) in one copy and one wait: they are
// packed bit for bit into one i32 buffer there, which is read once. Returns each tensor's words in order (an f32
// tensor's are its floats' bits; an int64 array held in an i32 tensor gives its words). Undefined tensors give no
// words; when there is nothing to read, nothing is read (no wait).
std::vector<std::vector<int32_t>> read_out_words(const std::vector<Tensor>& ts, Device dev);

// True when a CUDA device can be used (built with CUDA and a device answers). Never throws.
bool cuda_available();
// Throws a clear cm::Error if `device` cannot be used here.
void require_device(Device device);

}  // namespace cm
