// The CUDA backend against the CPU: every CUDA kernel and op is run on random inputs (never all zeros) with its
// outputs poisoned first (NaN for f32, a sentinel for i32), so an element the kernel forgets to write fails, and
// compared with the CPU kernel (or a double-precision reference where the CPU has no twin) within
// abs + rel * |ref| tolerances; integer outputs (indices, permutations, counts) must match exactly.
//
// Without a device (no GPU, or the toolkit without a driver: cudaGetDeviceCount fails with error 35) every parity
// case is registered as skipped, and "cuda: backend status" says so in one visible line. In a build without CUDA
// only the status case runs.
#include <cstring>
#include <functional>

#include "helpers.h"

#if CM_CUDA
#include "engine/cuda.h"
#include "kernels/copy.h"
#endif

using namespace cm;
using cm::test::uniform;

namespace {

#if CM_CUDA
int g_skipped = 0;  // parity cases registered as skipped (counted at static initialisation)

// The decorator for every parity case: skipped, and counted, when there is no device.
doctest::skip needs_device() {
  const bool skip = !cuda_available();
  if (skip) ++g_skipped;
  return doctest::skip(skip);
}

constexpr uint32_t kPoisonI32 = 0x7eadbeef;

// An uninitialised device tensor filled with NaN (f32) or a sentinel (i32): what a kernel leaves unwritten shows.
Tensor poisoned(const Shape& s, DType dt = DType::F32) {
  Tensor t = Tensor::empty(s, dt, Device::CUDA);
  if (t.numel() == 0) return t;
  const uint32_t bits = dt == DType::F32 ? 0x7fc00000u : kPoisonI32;
  cuda::fill32(t.raw(), bits, t.numel());
  return t;
}
Tensor dev(const Tensor& t) { return t.to(Device::CUDA); }

// Random i32 in [lo, hi) from a fixed seed.
Tensor randint(const Shape& s, uint64_t seed, int32_t lo, int32_t hi) {
  Tensor u = uniform(s, seed, 0.f, 1.f);
  std::vector<float> v = u.to_f32_vector();
  std::vector<int32_t> r(v.size());
  for (size_t i = 0; i < v.size(); ++i) {
    int64_t x = lo + (int64_t)(v[i] * (float)(hi - lo));
    r[i] = (int32_t)(x < hi ? x : hi - 1);
  }
  return Tensor::from_vector(r, s);
}

// Exact equality of two integer tensors, naming the first difference.
#define CHECK_SAME_I32(got, ref)                                                                        \
  do {                                                                                                  \
    std::vector<int32_t> g_ = (got).to_i32_vector(), r_ = (ref).to_i32_vector();                        \
    REQUIRE(g_.size() == r_.size());                                                                    \
    size_t i_ = 0;                                                                                      \
    while (i_ < g_.size() && g_[i_] == r_[i_]) ++i_;                                                    \
    CHECK_MESSAGE(i_ == g_.size(), "element ", i_, ": got ", (i_ < g_.size() ? g_[i_] : 0), " expected ", \
                  (i_ < r_.size() ? r_[i_] : 0));                                                       \
  } while (0)
#endif

}  // namespace

TEST_SUITE("cuda") {

#if CM_CUDA

// ---------------------------------------------------------------- engine: allocator, copies

TEST_CASE("cuda: caching allocator reuses blocks and keeps statistics" * needs_device()) {
  cuda::empty_cache();
  cuda::MemStats s0 = cuda::mem_stats();
  {
    Tensor a = Tensor::empty({1000}, DType::F32, Device::CUDA);  // 4000 bytes -> one 4096-byte block
    cuda::MemStats s1 = cuda::mem_stats();
    CHECK(s1.in_use == s0.in_use + 4096);
    CHECK(s1.mallocs == s0.mallocs + 1);
    CHECK(s1.peak >= s1.in_use);
  }
  cuda::MemStats s2 = cuda::mem_stats();
  CHECK(s2.in_use == s0.in_use);
  CHECK(s2.reserved >= s0.reserved + 4096);  // cached, not returned
  // The steady state of a training step: the same sizes again come from the cache, no cudaMalloc.
  for (int step = 0; step < 3; ++step) {
    Tensor a = Tensor::empty({1000}, DType::F32, Device::CUDA);
    Tensor b = Tensor::empty({900}, DType::F32, Device::CUDA);  // 3600 bytes: also a 4096-byte block
    (void)a;
    (void)b;
  }
  cuda::MemStats s3 = cuda::mem_stats();
  CHECK(s3.mallocs <= s2.mallocs + 1);  // the second block once, then nothing
  Tensor big = Tensor::empty({3 << 20}, DType::F32, Device::CUDA);  // 12 MiB: rounded to 2 MiB multiples
  CHECK(cuda::mem_stats().in_use == s3.in_use + (size_t(12) << 20));
  big = Tensor();
  cuda::empty_cache();
  cuda::MemStats s4 = cuda::mem_stats();
  CHECK(s4.reserved == s4.in_use);
  CHECK(s4.frees > s3.frees);
}

TEST_CASE("cuda: round trips, fills and dtype conversion" * needs_device()) {
  Tensor x = uniform({37, 19}, 1);
  Tensor d = dev(x);
  CHECK(d.device() == Device::CUDA);
  CHECK(d.to_f32_vector() == x.to_f32_vector());
  CHECK(d.to(Device::CPU).to_f32_vector() == x.to_f32_vector());
  Tensor f = Tensor::full({1001}, 2.5f, DType::F32, Device::CUDA);
  for (float v : f.to_f32_vector()) REQUIRE(v == 2.5f);
  Tensor fi = Tensor::full({77}, -3.f, DType::I32, Device::CUDA);
  for (int32_t v : fi.to_i32_vector()) REQUIRE(v == -3);
  Tensor y = uniform({513}, 2, -50.f, 50.f);
  CHECK_SAME_I32(dev(y).to(DType::I32), y.to(DType::I32));
  Tensor yi = randint({300}, 3, -1000, 1000);
  CHECK(dev(yi).to(DType::F32).to_f32_vector() == yi.to(DType::F32).to_f32_vector());
  CHECK(Tensor::scalar(7.f, Device::CUDA).item() == 7.f);
  CHECK(Tensor::zeros({0, 5}, DType::F32, Device::CUDA).to_f32_vector().empty());
}

TEST_CASE("cuda: strided copies (contiguous of transposes, slices, permutes; writes into views)" * needs_device()) {
  Tensor x = uniform({5, 7, 3, 4}, 4);
  Tensor d = dev(x);
  struct Case {
    const char* name;
    std::function<Tensor(const Tensor&)> view;
  };
  std::vector<Case> cases = {
      {"transpose(0,1)", [](const Tensor& t) { return t.transpose(0, 1); }},
      {"transpose(1,3)", [](const Tensor& t) { return t.transpose(1, 3); }},
      {"permute(3,1,0,2)", [](const Tensor& t) { return t.permute({3, 1, 0, 2}); }},
      {"slice(1,2,7,2)", [](const Tensor& t) { return t.slice(1, 2, 7, 2); }},
      {"slice(3,1,3)", [](const Tensor& t) { return t.slice(3, 1, 3); }},
      {"select(2,1)", [](const Tensor& t) { return t.select(2, 1); }},
      {"slice+transpose", [](const Tensor& t) { return t.slice(0, 1, 4).transpose(2, 3); }},
  };
  for (auto& c : cases) {
    CAPTURE(c.name);
    Tensor ref = c.view(x).contiguous();
    Tensor got = c.view(d).contiguous();
    CHECK(got.is_contiguous());
    CHECK(got.shape() == ref.shape());
    CHECK(got.to_f32_vector() == ref.to_f32_vector());
    // CUDA strided tensor -> CPU directly, and CPU -> CUDA strided destination.
    CHECK(c.view(d).to_f32_vector() == ref.to_f32_vector());
    Tensor dst = poisoned(x.shape());
    Tensor vdst = c.view(dst);
    vdst.copy_(ref);
    CHECK(vdst.to_f32_vector() == ref.to_f32_vector());
  }
  // A slice written on the device, the rest untouched (slice backward does this).
  Tensor z = Tensor::zeros({6, 8}, DType::F32, Device::CUDA);
  Tensor g = uniform({6, 3}, 5);
  z.slice(1, 2, 8, 2).copy_(dev(g));
  std::vector<float> zv = z.to_f32_vector(), gv = g.to_f32_vector();
  for (int64_t i = 0; i < 6; ++i)
    for (int64_t j = 0; j < 8; ++j) {
      const float want = (j >= 2 && j % 2 == 0) ? gv[i * 3 + (j - 2) / 2] : 0.f;
      REQUIRE(zv[i * 8 + j] == want);
    }
  // i32 views too (indices get sliced and transposed).
  Tensor xi = randint({4, 9}, 6, -50, 50);
  CHECK_SAME_I32(dev(xi).transpose(0, 1).contiguous(), xi.transpose(0, 1).contiguous());
}

TEST_CASE("cuda: gradients accumulate on the device" * needs_device()) {
  Tensor x = dev(uniform({4, 6}, 7));
  x.requires_grad_(true);
  // x feeds two views whose gradients meet in x's gradient: fan-out accumulation runs on the device.
  Tensor y = x.transpose(0, 1);
  Tensor z = x.slice(1, 1, 5);
  Tensor gy = uniform({6, 4}, 8), gz = uniform({4, 4}, 9);
  y.backward(dev(gy));
  z.backward(dev(gz));
  REQUIRE(x.grad().defined());
  CHECK(x.grad().device() == Device::CUDA);
  std::vector<float> g = x.grad().to_f32_vector(), a = gy.to_f32_vector(), b = gz.to_f32_vector();
  for (int64_t i = 0; i < 4; ++i)
    for (int64_t j = 0; j < 6; ++j) {
      const float want = a[j * 4 + i] + ((j >= 1 && j < 5) ? b[i * 4 + j - 1] : 0.f);
      REQUIRE(g[i * 6 + j] == want);
    }
}

#endif  // CM_CUDA

// Runs last in this file (doctest orders by file and line): the skipped count is complete by then.
TEST_CASE("cuda: backend status") {
  CHECK_NOTHROW(cuda_available());
#if CM_CUDA
  if (!cuda_available()) {
    MESSAGE("CUDA: no device, " << g_skipped << " CUDA parity checks skipped");
    CHECK(g_skipped > 0);
    try {
      Tensor::zeros({2}, DType::F32, Device::CUDA);
      FAIL("a CUDA tensor without a device");
    } catch (const Error& e) {
      CHECK(std::string(e.what()).find("no CUDA device is available") != std::string::npos);
    }
  } else {
    const cudaDeviceProp& p = cuda::props();
    MESSAGE("CUDA: " << p.name << " (sm_" << p.major << p.minor << ", " << p.multiProcessorCount << " SMs, "
                     << (p.totalGlobalMem >> 20) << " MiB)");
  }
#else
  MESSAGE("CUDA: not built (nvcc not found or USE_CUDA=0), CUDA parity checks not compiled");
  CHECK_THROWS_AS(Tensor::zeros({2}, DType::F32, Device::CUDA), Error);
#endif
}

}  // TEST_SUITE("cuda")
