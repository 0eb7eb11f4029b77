// Tensor storage, creation, metadata, raw access, in-place fills/copies and printing.
// View ops and everything that records autograd history live in autograd/ (views.cpp, graph.cpp).
#include "engine/tensor.h"

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <iomanip>
#include <mutex>
#include <sstream>
#include <utility>
#if defined(__GLIBC__)
#include <malloc.h>
#endif

#include "engine/device.h"
#include "engine/host_sync.h"
#include "kernels/copy.h"
#if CM_CUDA
#include "engine/cuda.h"
#endif

namespace cm {

const char* dtype_name(DType d) { return d == DType::F32 ? "f32" : "i32"; }
const char* device_name(Device d) { return d == Device::CPU ? "cpu" : "cuda"; }
size_t dtype_size(DType) { return 4; }

std::string shape_str(const Shape& s) {
  std::string r = "[";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + "]";
}

int64_t shape_numel(const Shape& s) {
  int64_t n = 1;
  for (int64_t d : s) n *= d;
  return n;
}

Shape contiguous_strides(const Shape& s) {
  Shape st(s.size());
  int64_t acc = 1;
  for (int64_t i = (int64_t)s.size() - 1; i >= 0; --i) {
    st[i] = acc;
    acc *= s[i];
  }
  return st;
}

// ---------------------------------------------------------------- storage

namespace {

// Large CPU blocks are kept for reuse. glibc serves an allocation over 32 MiB (its largest mmap threshold) with a
// fresh mmap and gives it back with munmap on free, so every use of such a block page-faults and the kernel zeroes
// it again: at 16384 tokens and 1024 experts the router's [T, N] probabilities and their gradient cost more in
// page faults than in arithmetic (bench/dispatch --layer). Freed blocks of at least kMin bytes wait here, up to kMax
// bytes in all (the oldest go back to the system first); an allocation of the same size takes one back. Exact
// sizes: a training step asks for the same shapes every time. Not under AddressSanitizer, which would no longer
// see a use after free of these blocks.
class BigBlocks {
 public:
  static constexpr size_t kMin = (size_t)4 << 20, kMax = (size_t)512 << 20;
  void* take(size_t bytes) {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto it = free_.begin(); it != free_.end(); ++it)
      if (it->first == bytes) {
        void* p = it->second;
        held_ -= bytes;
        free_.erase(it);
        return p;
      }
    return nullptr;
  }
  void give(void* p, size_t bytes) {
    std::lock_guard<std::mutex> lock(mu_);
    free_.emplace_back(bytes, p);
    held_ += bytes;
    while (held_ > kMax) {  // the oldest first
      held_ -= free_.front().first;
      std::free(free_.front().second);
      free_.pop_front();
    }
  }

 private:
  std::mutex mu_;
  std::deque<std::pair<size_t, void*>> free_;  // (bytes, block), oldest first
  size_t held_ = 0;
};

#if defined(__SANITIZE_ADDRESS__)
BigBlocks* big_blocks() { return nullptr; }
#else
BigBlocks* big_blocks() {
  static BigBlocks* b = new BigBlocks;  // never destroyed: storages freed by other statics' destructors use it
  return b;
}
#endif

// glibc's heap below the blocks above. Left to itself, glibc hands the top of its heap back to the system as soon as
// a free leaves more than M_TRIM_THRESHOLD there, a threshold that starts at 128 KiB and only follows the largest
// block ever freed. A training step frees most of what it allocated when it ends (the graph's saved tensors, then
// the gradients at zero_grad), so the next step page-faulted the same memory back in, zeroed page by page by the
// kernel: about 1,000 faults a step for train_bench's flat MoE (bench/RESULTS.md). Set once, before the first
// CPU allocation: the heap keeps up to kMax of free top (the blocks above hold that much too), and blocks under
// 32 MiB always come from the heap (glibc's largest mmap threshold: above it they would be mapped and unmapped at
// every use).
void configure_heap() {
#if defined(__GLIBC__) && !defined(__SANITIZE_ADDRESS__)
  static const bool done = [] {
    mallopt(M_MMAP_THRESHOLD, 32 << 20);
    mallopt(M_TRIM_THRESHOLD, (int)BigBlocks::kMax);
    return true;
  }();
  (void)done;
#endif
}

}  // namespace

Storage::Storage(size_t n, Device dev) : nbytes(n), device(dev) {
  if (dev == Device::CUDA) {
    ptr = n ? cuda_alloc(n) : nullptr;
    return;
  }
  configure_heap();
  // 64-byte alignment: whole cache lines and aligned AVX-512 loads. aligned_alloc wants a multiple of 64.
  size_t rounded = (n + 63) / 64 * 64;
  if (rounded >= BigBlocks::kMin && big_blocks()) ptr = big_blocks()->take(rounded);
  if (!ptr) ptr = rounded ? std::aligned_alloc(64, rounded) : nullptr;
  if (rounded && !ptr) fail("out of memory allocating ", n, " bytes on cpu");
}

Storage::~Storage() {
  if (!ptr) return;
  if (device == Device::CUDA) {
    cuda_free(ptr);
    return;
  }
  const size_t rounded = (nbytes + 63) / 64 * 64;
  if (rounded >= BigBlocks::kMin && big_blocks())
    big_blocks()->give(ptr, rounded);
  else
    std::free(ptr);
}

// ---------------------------------------------------------------- creation

static void check_shape(const Shape& s) {
  for (int64_t d : s) CM_REQUIRE(d >= 0, "negative dimension in shape ", shape_str(s));
}

Tensor Tensor::empty(const Shape& shape, DType dtype, Device device) {
  check_shape(shape);
  require_device(device);
  auto impl = std::make_shared<TensorImpl>();
  impl->storage = std::make_shared<Storage>((size_t)shape_numel(shape) * dtype_size(dtype), device);
  impl->shape = shape;
  impl->strides = contiguous_strides(shape);
  impl->dtype = dtype;
  return Tensor(std::move(impl));
}

Tensor Tensor::zeros(const Shape& shape, DType dtype, Device device) { return full(shape, 0.f, dtype, device); }
Tensor Tensor::ones(const Shape& shape, DType dtype, Device device) { return full(shape, 1.f, dtype, device); }

Tensor Tensor::full(const Shape& shape, float value, DType dtype, Device device) {
  Tensor t = empty(shape, dtype, device);
  t.fill_(value);
  return t;
}

Tensor Tensor::arange(int64_t n, DType dtype, Device device) {
  CM_REQUIRE(n >= 0, "arange: n must be >= 0, got ", n);
  Tensor t = empty({n}, dtype, Device::CPU);
  for (int64_t i = 0; i < n; ++i) {
    if (dtype == DType::F32)
      t.f32()[i] = (float)i;
    else
      t.i32()[i] = (int32_t)i;
  }
  return device == Device::CPU ? t : t.to(device);
}

// Random tensors are generated on the CPU from the counter-based stream, then moved: identical on every device.
Tensor Tensor::rand(const Shape& shape, Generator& gen, Device device) {
  Tensor t = empty(shape, DType::F32, Device::CPU);
  const int64_t n = t.numel();
  const uint64_t off = gen.take((uint64_t)n), seed = gen.seed;
  float* p = t.f32();
#pragma omp parallel for schedule(static) if (n > (1 << 16))
  for (int64_t i = 0; i < n; ++i) p[i] = philox_uniform(seed, off, (uint64_t)i);
  return device == Device::CPU ? t : t.to(device);
}

Tensor Tensor::randn(const Shape& shape, Generator& gen, Device device) {
  Tensor t = empty(shape, DType::F32, Device::CPU);
  const int64_t n = t.numel();
  const uint64_t off = gen.take((uint64_t)n), seed = gen.seed;
  float* p = t.f32();
#pragma omp parallel for schedule(static) if (n > (1 << 16))
  for (int64_t i = 0; i < n; ++i) p[i] = philox_normal(seed, off, (uint64_t)i);
  return device == Device::CPU ? t : t.to(device);
}

template <class T>
static Tensor from_vec(const std::vector<T>& v, const Shape& shape, DType dtype, Device device) {
  CM_REQUIRE((int64_t)v.size() == shape_numel(shape), "from_vector: ", v.size(), " values do not fill shape ",
             shape_str(shape));
  Tensor t = Tensor::empty(shape, dtype, Device::CPU);
  if (!v.empty()) std::memcpy(t.raw(), v.data(), v.size() * sizeof(T));
  return device == Device::CPU ? t : t.to(device);
}
Tensor Tensor::from_vector(const std::vector<float>& v, const Shape& shape, Device device) {
  return from_vec(v, shape, DType::F32, device);
}
Tensor Tensor::from_vector(const std::vector<int32_t>& v, const Shape& shape, Device device) {
  return from_vec(v, shape, DType::I32, device);
}
// A fill, not an upload: no host memory is read (a captured CUDA graph may make scalars, engine/cuda.h).
Tensor Tensor::scalar(float v, Device device) { return full({}, v, DType::F32, device); }

// ---------------------------------------------------------------- metadata and access

int64_t Tensor::axis(int64_t d) const {
  const int64_t r = dim();
  CM_REQUIRE(d >= -r && d < r, "axis ", d, " out of range for a tensor of rank ", r, " (shape ", shape_str(shape()),
             ")");
  return d < 0 ? d + r : d;
}

int64_t Tensor::size(int64_t d) const { return shape()[axis(d)]; }

bool Tensor::is_contiguous() const {
  int64_t acc = 1;
  const Shape &s = shape(), &st = strides();
  for (int64_t i = (int64_t)s.size() - 1; i >= 0; --i) {
    if (s[i] != 1 && st[i] != acc) return false;
    acc *= s[i];
  }
  return true;
}

void* Tensor::raw() const { return (char*)impl().storage->ptr + impl().offset * (int64_t)dtype_size(dtype()); }

float* Tensor::f32() const {
  CM_REQUIRE(dtype() == DType::F32, "expected an f32 tensor, got ", dtype_name(dtype()), " ", shape_str(shape()));
  return (float*)raw();
}

int32_t* Tensor::i32() const {
  CM_REQUIRE(dtype() == DType::I32, "expected an i32 tensor, got ", dtype_name(dtype()), " ", shape_str(shape()));
  return (int32_t*)raw();
}

// A contiguous CPU copy (or this tensor itself if it already is one). No autograd.
static Tensor cpu_contiguous(const Tensor& t) {
  if (t.device() == Device::CPU && t.is_contiguous()) return t;
  Tensor c = Tensor::empty(t.shape(), t.dtype(), Device::CPU);
  c.copy_(t);
  return c;
}

// The same, for a read-out of values by the host. A read-out counts one copy and one wait (engine/host_sync.h):
// here for a CPU tensor, where a device build would copy; in cuda_copy for a CUDA tensor.
static Tensor read_out(const Tensor& t) {
  if (t.device() == Device::CPU) note_host_read();
  return cpu_contiguous(t);
}

float Tensor::item() const {
  CM_REQUIRE(numel() == 1, "item() needs a one-element tensor, got shape ", shape_str(shape()));
  Tensor c = read_out(*this);
  return dtype() == DType::F32 ? c.f32()[0] : (float)c.i32()[0];
}

std::vector<float> Tensor::to_f32_vector() const {
  Tensor c = read_out(*this);
  std::vector<float> v((size_t)numel());
  if (v.empty()) return v;  // an empty tensor's data pointer may be null, which memcpy must not get
  if (dtype() == DType::F32)
    std::memcpy(v.data(), c.raw(), v.size() * 4);
  else
    cpu::i32_to_f32(v.data(), c.i32(), numel());
  return v;
}

std::vector<int32_t> Tensor::to_i32_vector() const {
  Tensor c = read_out(*this);
  std::vector<int32_t> v((size_t)numel());
  if (v.empty()) return v;
  if (dtype() == DType::I32)
    std::memcpy(v.data(), c.raw(), v.size() * 4);
  else
    cpu::f32_to_i32(v.data(), c.f32(), numel());
  return v;
}

std::vector<std::vector<int32_t>> read_out_words(const std::vector<Tensor>& ts, Device dev) {
  int64_t total = 0;
  for (const Tensor& t : ts) {
    if (!t.defined()) continue;
    CM_CHECK(t.device() == dev && dtype_size(t.dtype()) == 4, "read_out_words: a ", dtype_name(t.dtype()), " ",
             shape_str(t.shape()), " on ", device_name(t.device()), " among tensors on ", device_name(dev));
    total += t.numel();
  }
  std::vector<std::vector<int32_t>> out;
  if (total == 0) {  // nothing to read: no wait
    for (size_t i = 0; i < ts.size(); ++i) out.emplace_back();
    return out;
  }
  Tensor pack = Tensor::empty({total}, DType::I32, dev);
  int64_t off = 0;
  for (const Tensor& t : ts) {
    if (!t.defined() || t.numel() == 0) continue;
    const Tensor c = t.contiguous();
    const int64_t n = c.numel(), one = 1;
#if CM_CUDA
    if (dev == Device::CUDA)
      cuda::strided_copy(pack.i32() + off, &one, c.raw(), &one, &n, 1, 4);
    else
#endif
      cpu::strided_copy(pack.i32() + off, &one, c.raw(), &one, &n, 1, 4);
    off += n;
  }
  const std::vector<int32_t> all = pack.to_i32_vector();  // the one read-out
  off = 0;
  for (const Tensor& t : ts) {
    const int64_t n = t.defined() ? t.numel() : 0;
    out.emplace_back(all.begin() + off, all.begin() + off + n);
    off += n;
  }
  return out;
}

// ---------------------------------------------------------------- autograd state (the sweep is in graph.cpp)

Tensor& Tensor::requires_grad_(bool on) {
  CM_REQUIRE(!on || dtype() == DType::F32, "only f32 tensors can require grad (got ", dtype_name(dtype()), ")");
  impl().requires_grad = on;
  return *this;
}

Tensor Tensor::grad() const { return impl().grad ? Tensor(impl().grad) : Tensor(); }

void Tensor::set_grad(const Tensor& g) const {
  if (g.defined()) {
    CM_REQUIRE(g.shape() == shape(), "gradient shape ", shape_str(g.shape()), " does not match tensor shape ",
               shape_str(shape()));
    // Backward accumulates into it and the optimizer reads it beside the tensor: both need one device.
    CM_REQUIRE(g.device() == device(), "gradient on ", device_name(g.device()), " for a tensor on ",
               device_name(device()), " (shape ", shape_str(shape()), ")");
  }
  impl().grad = g.impl_ptr();
}

void Tensor::zero_grad() const { impl().grad.reset(); }

Tensor Tensor::detach() const {
  auto impl2 = std::make_shared<TensorImpl>();
  impl2->storage = impl().storage;
  impl2->shape = impl().shape;
  impl2->strides = impl().strides;
  impl2->offset = impl().offset;
  impl2->dtype = impl().dtype;
  return Tensor(std::move(impl2));
}

// ---------------------------------------------------------------- in place

Tensor& Tensor::fill_(float v) {
  const int64_t n = numel();
  if (n == 0) return *this;
#if CM_CUDA
  if (device() == Device::CUDA && is_contiguous()) {  // zeros() for gradients on the device: no host round trip
    uint32_t bits;
    if (dtype() == DType::F32)
      std::memcpy(&bits, &v, 4);
    else {
      const int32_t iv = (int32_t)v;
      std::memcpy(&bits, &iv, 4);
    }
    cuda::fill32(raw(), bits, n);
    return *this;
  }
#endif
  if (device() == Device::CUDA || !is_contiguous()) {
    // Fill a contiguous CPU buffer and copy it over: rare paths (initialisation), simplicity wins.
    Tensor c = full(shape(), v, dtype(), Device::CPU);
    return copy_(c);
  }
  if (dtype() == DType::F32) {
    float* p = f32();
    for (int64_t i = 0; i < n; ++i) p[i] = v;
  } else {
    int32_t* p = i32();
    const int32_t iv = (int32_t)v;
    for (int64_t i = 0; i < n; ++i) p[i] = iv;
  }
  return *this;
}

Tensor& Tensor::copy_(const Tensor& src) {
  CM_REQUIRE(src.shape() == shape(), "copy_: source shape ", shape_str(src.shape()), " does not match destination ",
             shape_str(shape()));
  CM_REQUIRE(src.dtype() == dtype(), "copy_: source dtype ", dtype_name(src.dtype()), " does not match destination ",
             dtype_name(dtype()));
  if (numel() == 0) return *this;
  const size_t nbytes = (size_t)numel() * dtype_size(dtype());
  if (device() == Device::CPU && src.device() == Device::CPU) {
    cpu::strided_copy(raw(), strides().data(), src.raw(), src.strides().data(), shape().data(), dim(), 4);
    return *this;
  }
#if CM_CUDA
  // On the device: one strided kernel handles any pair of layouts (contiguous(), slice backward, transposes).
  if (device() == Device::CUDA && src.device() == Device::CUDA) {
    cuda::strided_copy(raw(), strides().data(), src.raw(), src.strides().data(), shape().data(), dim(), 4);
    return *this;
  }
  // Across devices: the bus only sees contiguous buffers; strided layouts are handled on either side of it.
  if (device() == Device::CUDA) {  // CPU -> CUDA
    if (is_contiguous()) {
      Tensor s = cpu_contiguous(src);
      cuda_copy(raw(), s.raw(), nbytes, CopyKind::HostToDevice);
    } else {
      Tensor tmp = empty(shape(), dtype(), Device::CUDA);
      tmp.copy_(src);
      copy_(tmp);
    }
    return *this;
  }
  // CUDA -> CPU
  Tensor s = src;
  if (!src.is_contiguous()) {
    s = empty(src.shape(), src.dtype(), Device::CUDA);
    s.copy_(src);
  }
  if (is_contiguous()) {
    cuda_copy(raw(), s.raw(), nbytes, CopyKind::DeviceToHost);
  } else {
    Tensor tmp = empty(shape(), dtype(), Device::CPU);
    cuda_copy(tmp.raw(), s.raw(), nbytes, CopyKind::DeviceToHost);
    copy_(tmp);
  }
  return *this;
#else
  (void)nbytes;
  fail("copy_: this build has no CUDA support");
#endif
}

// ---------------------------------------------------------------- printing

std::string Tensor::str(int64_t max_per_dim) const {
  std::ostringstream os;
  os << "tensor(" << shape_str(shape()) << " " << dtype_name(dtype()) << " " << device_name(device());
  if (requires_grad()) os << " requires_grad";
  os << ")\n";
  std::vector<float> v = to_f32_vector();
  const Shape& s = shape();
  const int64_t r = dim();
  const bool is_int = dtype() == DType::I32;
  os << std::setprecision(4);
  // Recursive over dims is fine here: rank is small. Prints at most max_per_dim entries per dim (head ... tail).
  std::function<void(int64_t, int64_t)> rec = [&](int64_t d, int64_t base) {
    if (d == r) {
      if (is_int)
        os << (int64_t)v[base];
      else
        os << v[base];
      return;
    }
    os << "[";
    const int64_t n = s[d], stride = shape_numel(Shape(s.begin() + d + 1, s.end()));
    for (int64_t i = 0; i < n; ++i) {
      if (n > max_per_dim && i == max_per_dim / 2) {
        os << "...";
        i = n - max_per_dim / 2 - 1;
        if (i + 1 < n) os << ", ";
        continue;
      }
      rec(d + 1, base + i * stride);
      if (i + 1 < n) os << ", ";
    }
    os << "]";
  };
  if (numel() > 0 || r == 0) rec(0, 0);
  else os << "[]";
  return os.str();
}

std::ostream& operator<<(std::ostream& os, const Tensor& t) { return os << t.str(); }

// ---------------------------------------------------------------- devices

bool cuda_available() { return cuda_device_present(); }

void require_device(Device device) {
  if (device == Device::CPU) return;
#if CM_CUDA
  CM_REQUIRE(cuda_device_present(), "no CUDA device is available (none found by the driver); use --device cpu");
#else
  fail("this build has no CUDA support (nvcc was not found at build time); use --device cpu");
#endif
}

}  // namespace cm
