// The CUDA backend against the CPU: every CUDA kernel and op is run on random inputs (never all zeros) with its
// outputs poisoned first (NaN for f32, a sentinel for i32), so an element the kernel forgets to write fails, and
// compared with the CPU kernel (or a double-precision reference where the CPU has no twin) within
// abs + rel * |ref| tolerances; integer outputs (indices, permutations, counts) must match exactly.
//
// Without a device (no GPU, or the toolkit without a driver: cudaGetDeviceCount fails with error 35) every parity
// case is registered as skipped, and "cuda: backend status" says so in one visible line. In a build without CUDA
// only the status case runs.
#include <algorithm>
#include <cstring>
#include <functional>
#include <numeric>

#include "helpers.h"
#include "sorted_add.h"

#if CM_CUDA
#include "engine/cuda.h"
#include "engine/host_sync.h"
#include "kernels/activation.h"
#include "kernels/adamw.h"
#include "kernels/health.h"
#include "kernels/copy.h"
#include "kernels/cuda/sort.cuh"
#include "kernels/dispatch.h"
#include "kernels/dropout.h"
#include "kernels/elementwise.h"
#include "kernels/embedding.h"
#include "kernels/gemm.h"
#include "kernels/index.h"
#include "kernels/losses.h"
#include "kernels/norm.h"
#include "kernels/reduce.h"
#include "kernels/softmax.h"
#include "kernels/topk.h"
#endif

using namespace cm;
using cm::test::uniform;
#if CM_CUDA
using cm::test::needs_device;
#endif

namespace {

#if CM_CUDA
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
// Device tensors whose data starts one element past an allocator block (256-byte aligned): contiguous, but no row
// is 16-byte aligned. That is what a view at an odd offset hands a kernel; float4 paths must not take it.
Tensor poisoned_odd(const Shape& s, DType dt = DType::F32) {
  const int64_t n = shape_numel(s);
  return poisoned({n + 1}, dt).slice(0, 1, n + 1).view(s);
}
Tensor dev_odd(const Tensor& t) {
  Tensor d = poisoned_odd(t.shape(), t.dtype());
  d.copy_(t);
  return d;
}
bool aligned16(const Tensor& t) { return ((uintptr_t)t.raw() & 15) == 0; }

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

// got (any device) against ref within atol + rtol * |ref|, naming the case on failure.
void check_near(const Tensor& got, const Tensor& ref, float atol, float rtol, const std::string& what) {
  CAPTURE(what);
  CHECK_CLOSE(got, ref.to_f32_vector(), atol, rtol);
}
void check_near(const Tensor& got, const std::vector<double>& ref, float atol, float rtol, const std::string& what) {
  CAPTURE(what);
  CHECK_CLOSE(got, std::vector<float>(ref.begin(), ref.end()), atol, rtol);
}
// Bit-identical f32 (NaN matches NaN).
void same(const Tensor& got, const Tensor& ref, const std::string& what) {
  CAPTURE(what);
  std::vector<float> g = got.to_f32_vector(), r = ref.to_f32_vector();
  REQUIRE(g.size() == r.size());
  size_t i = 0;
  while (i < g.size() && (std::memcmp(&g[i], &r[i], 4) == 0 || (g[i] != g[i] && r[i] != r[i]))) ++i;
  CHECK_MESSAGE(i == g.size(), "element ", i, ": got ", (i < g.size() ? g[i] : 0.f), " expected ",
                (i < r.size() ? r[i] : 0.f));
}
void same_i32(const Tensor& got, const Tensor& ref, const std::string& what) {
  CAPTURE(what);
  CHECK_SAME_I32(got, ref);
}
Tensor i32s(const std::vector<int32_t>& v, const Shape& s) { return Tensor::from_vector(v, s); }
// Reads back a device buffer of int64 (kernels that write int64 counts/offsets: no i64 dtype in tensors).
std::vector<int64_t> read_i64(const Tensor& t, int64_t n) {
  std::vector<int32_t> w = t.to_i32_vector();
  std::vector<int64_t> r((size_t)n);
  std::memcpy(r.data(), w.data(), (size_t)n * 8);
  return r;
}
// The CPU's dispatch plan of A random assignments to N experts, every 7th (a % 7 == 2) dropped as -1:
// row_of [A] and the kept assignments in expert order, assign_of [Ap].
struct RandomPlan {
  int64_t Ap = 0;
  Tensor row_of, assign_of;
};
RandomPlan random_plan(int64_t A, int64_t N, uint64_t seed) {
  std::vector<float> uv = uniform({A}, seed, 0.f, 1.f).to_f32_vector();
  std::vector<int32_t> ev((size_t)A);
  for (int64_t a = 0; a < A; ++a)
    ev[(size_t)a] = a % 7 == 2 ? -1 : (int32_t)std::min<int64_t>(N - 1, (int64_t)(uv[(size_t)a] * N));
  std::vector<int64_t> counts((size_t)N), offsets((size_t)N + 1);
  std::vector<int32_t> row_of((size_t)A), assign_of((size_t)A);
  cpu::dispatch_plan(counts.data(), offsets.data(), row_of.data(), assign_of.data(), ev.data(), A, N);
  RandomPlan p;
  p.Ap = offsets[(size_t)N];
  p.row_of = i32s(row_of, {A});
  p.assign_of = i32s(std::vector<int32_t>(assign_of.begin(), assign_of.begin() + p.Ap), {p.Ap});
  return p;
}
// Distinct values: a random permutation of 0..n-1 per row, scaled into [lo, lo + n * step).
Tensor distinct_rows(int64_t R, int64_t n, uint64_t seed, float lo, float step) {
  std::vector<float> v((size_t)(R * n));
  for (int64_t r = 0; r < R; ++r) {
    std::vector<int64_t> p((size_t)n);
    std::iota(p.begin(), p.end(), 0);
    for (int64_t i = n - 1; i > 0; --i) {  // Fisher-Yates from the counter-based stream
      const int64_t j = (int64_t)(philox_uniform(seed, 0, (uint64_t)(r * n + i)) * (float)(i + 1)) % (i + 1);
      std::swap(p[(size_t)i], p[(size_t)j]);
    }
    for (int64_t i = 0; i < n; ++i) v[(size_t)(r * n + i)] = lo + step * (float)p[(size_t)i];
  }
  return Tensor::from_vector(v, {R, n});
}
// The sorted add behind index_add (64 or more indices) and the embedding backward: got (device) must be the chunked
// order of kernels/index.h bit for bit, and within its bound of the CPU twin's serial result (the same bits where no
// index value occurs more than kRunChunk times). Returns the largest |got - cpu| seen, as a fraction of the bound.
double check_sorted_add(const Tensor& got, const std::vector<float>& cpu_result, const std::vector<float>& out0,
                        const std::vector<float>& src, const std::vector<int32_t>& index, int64_t O, int64_t D,
                        int64_t n, int64_t I, const std::string& what) {
  CAPTURE(what);
  const int64_t L = cuda::kRunChunk;
  const std::vector<float> g = got.to_f32_vector(), chunked = cm::test::chunked_add(out0, src, index, O, D, n, I, L);
  const std::vector<double> bound = cm::test::chunked_add_bound(out0, src, index, O, D, n, I, L);
  REQUIRE(g.size() == chunked.size());
  REQUIRE(cpu_result.size() == chunked.size());
  size_t i = 0;
  while (i < g.size() && std::memcmp(&g[i], &chunked[i], 4) == 0) ++i;
  CHECK_MESSAGE(i == g.size(), "chunked order: element ", i, " got ", (i < g.size() ? g[i] : 0.f), " expected ",
                (i < g.size() ? chunked[i] : 0.f));
  double worst = 0.0;
  size_t bad = g.size();
  for (size_t e = 0; e < g.size(); ++e) {
    const double diff = std::fabs((double)g[e] - (double)cpu_result[e]);
    if (!(diff <= bound[e]) && bad == g.size()) bad = e;
    if (bound[e] > 0) worst = std::max(worst, diff / bound[e]);
  }
  CHECK_MESSAGE(bad == g.size(), "against the CPU: element ", bad, " got ", (bad < g.size() ? g[bad] : 0.f),
                " CPU ", (bad < g.size() ? cpu_result[bad] : 0.f), " bound ", (bad < g.size() ? bound[bad] : 0.0));
  return worst;
}
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

TEST_CASE("cuda: a graph replays its capture on new input values; its memory is its own; nothing waits" *
          needs_device()) {
  Tensor x = dev(uniform({257}, 1)), w = dev(uniform({257, 8}, 2));
  Tensor y;
  void* scratch = nullptr;  // a block freed during the capture, which each replay still writes
  Tensor pre = Tensor::empty({257}, DType::F32, Device::CUDA);
  void* pre_block = pre.raw();  // made before the capture, written by it and freed during it: each replay writes it
  {
    cuda::Graph g;
    g.capture_begin();
    {
      Tensor t = exp(mul(x, 2.f));  // made and freed while capturing: a block of the graph's pool
      scratch = t.raw();
      y = sum(matmul(t.view({1, 257}), w));  // cuBLAS is captured too
      pre.copy_(t);
      pre = Tensor();
    }
    CHECK(cuda::capturing());
    g.capture_end();
    CHECK_FALSE(cuda::capturing());
    // Nothing ran yet: replays compute, each on the values x holds when it is launched.
    for (uint64_t seed : {3, 4}) {
      Tensor xv = uniform({257}, seed);
      x.copy_(dev(xv));
      // A tensor made after the capture never gets a block of the graph (the replay would overwrite it).
      Tensor other = Tensor::empty({257}, DType::F32, Device::CUDA);
      CHECK(other.raw() != scratch);
      CHECK(other.raw() != pre_block);
      other.fill_(7.f);
      g.replay();
      Tensor ref = sum(matmul(exp(mul(xv, 2.f)).view({1, 257}), w.to(Device::CPU)));
      CHECK(y.item() == doctest::Approx(ref.item()).epsilon(1e-5));
      CHECK(other.to_f32_vector() == std::vector<float>(257, 7.f));
    }
  }
  // Waiting or reading the host while capturing is refused with a message; the engine goes on afterwards.
  {
    cuda::Graph g;
    g.capture_begin();
    CHECK_THROWS_WITH_AS(x.to_f32_vector(), doctest::Contains("while a CUDA graph is being captured"), Error);
    CHECK_THROWS_WITH_AS(Tensor::from_vector(std::vector<float>{1.f}, {1}, Device::CUDA),
                         doctest::Contains("an upload from host memory while a CUDA graph is being captured"), Error);
    CHECK_THROWS_AS(cuda::sync(), Error);
    g.capture_abort();
    CHECK_FALSE(g.ready());
  }
  CHECK_FALSE(cuda::capturing());
  CHECK(dev(uniform({5}, 9)).to_f32_vector() == uniform({5}, 9).to_f32_vector());
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

TEST_CASE("cuda: uploads from short-lived host buffers arrive intact, even behind queued work" * needs_device()) {
  // Tensor::from_vector(..., CUDA) uploads a temporary CPU tensor that is freed as soon as the call returns, and
  // the next temporary of the same size usually gets the same host memory back. A product queued before each
  // upload keeps the stream busy, so a copy that had not read its host buffer by the time cuda_copy returned
  // would read the next iteration's values.
  // 256 KiB per upload: not a tiny inline copy. (The emulator runs everything in order: a small product will do.)
  const int64_t M = cuda::emulated() ? 128 : 2048, n = (int64_t(1) << 16) + 3;
  Tensor A = dev(uniform({M, M}, 1)), C = Tensor::empty({M, M}, DType::F32, Device::CUDA);
  std::vector<Tensor> up;
  for (int i = 0; i < 48; ++i) {
    cuda::gemm(C.f32(), M, A.f32(), M, A.f32(), M, M, M, M, false, false);
    up.push_back(Tensor::from_vector(std::vector<float>((size_t)n, (float)i), {n}, Device::CUDA));
  }
  for (int i = 0; i < 48; ++i) {
    CAPTURE(i);
    const std::vector<float> v = up[(size_t)i].to_f32_vector();
    CHECK(std::count(v.begin(), v.end(), (float)i) == n);
  }
}

TEST_CASE("cuda: strided copies with offsets past 2^30 elements (64-bit index path)" * needs_device()) {
  // strided_copy indexes in 32 bits while every offset stays below 2^30 elements and switches to 64 bits beyond.
  // Rows 2^28 apart in a [2^28 + 1, 4] tensor (4 GiB) make a two-row view whose row stride is 2^30 elements.
  if (cuda::props().totalGlobalMem < (size_t(12) << 30)) {
    MESSAGE("skipped: the 64-bit strided-copy case needs a GPU with 12 GiB");
    return;
  }
  const int64_t step = int64_t(1) << 28, R = step + 1;
  Tensor big = Tensor::empty({R, 4}, DType::F32, Device::CUDA);
  if (cuda::emulated()) {  // only the rows read below: the pages of the others are never touched (nor committed)
    big.slice(0, 0, 2).fill_(-7.f);
    big.slice(0, R - 1, R).fill_(-7.f);
  } else {
    big.fill_(-7.f);
  }
  Tensor view = big.slice(0, 0, R, step);
  REQUIRE(view.shape() == Shape{2, 4});
  REQUIRE(view.strides()[0] == int64_t(1) << 30);
  Tensor rows = uniform({2, 4}, 2);
  view.copy_(dev(rows));  // device to device into the view: destination offsets reach 2^30
  CHECK(view.contiguous().to_f32_vector() == rows.to_f32_vector());  // and out of it: source offsets
  CHECK(big.select(0, R - 1).to_f32_vector() == rows.select(0, 1).to_f32_vector());
  CHECK(big.select(0, 1).to_f32_vector() == std::vector<float>(4, -7.f));  // untouched between the two rows
  // A transpose of the view (column-major walk of the same far-apart rows).
  CHECK(view.transpose(0, 1).contiguous().to_f32_vector() == rows.transpose(0, 1).contiguous().to_f32_vector());
}

// ---------------------------------------------------------------- kernels: softmax family

TEST_CASE("cuda kernels: softmax and log-softmax, forward and backward, warp and block rows" * needs_device()) {
  const int64_t Ns[] = {1, 7, 130};
  const int64_t Cs[] = {1, 5, 33, 1000, 1024, 1025, 5000};
  uint64_t seed = 100;
  for (int64_t N : Ns)
    for (int64_t C : Cs) {
      const std::string what = "N=" + std::to_string(N) + " C=" + std::to_string(C);
      Tensor x = uniform({N, C}, ++seed, -4.f, 4.f), dy = uniform({N, C}, ++seed);
      Tensor y = Tensor::empty({N, C}), dx = Tensor::empty({N, C});
      Tensor gy = poisoned({N, C}), gdx = poisoned({N, C});
      Tensor dX = dev(x), dDY = dev(dy);
      cpu::softmax_forward(y.f32(), x.f32(), N, C);
      cuda::softmax_forward(gy.f32(), dX.f32(), N, C);
      check_near(gy, y, 1e-7f, 1e-5f, "softmax " + what);
      cpu::softmax_backward(dx.f32(), dy.f32(), y.f32(), N, C);
      cuda::softmax_backward(gdx.f32(), dDY.f32(), dev(y).f32(), N, C);
      check_near(gdx, dx, 1e-6f, 1e-4f, "softmax backward " + what);
      gy = poisoned({N, C});
      gdx = poisoned({N, C});
      cpu::log_softmax_forward(y.f32(), x.f32(), N, C);
      cuda::log_softmax_forward(gy.f32(), dX.f32(), N, C);
      check_near(gy, y, 1e-5f, 1e-5f, "log_softmax " + what);
      cpu::log_softmax_backward(dx.f32(), dy.f32(), y.f32(), N, C);
      cuda::log_softmax_backward(gdx.f32(), dDY.f32(), dev(y).f32(), N, C);
      check_near(gdx, dx, 1e-5f, 1e-4f, "log_softmax backward " + what);
    }
  // Special rows: -inf entries give exactly 0, huge logits stay finite, a NaN or all -inf row is NaN everywhere.
  const float inf = INFINITY, nan = NAN;
  Tensor x = Tensor::from_vector(std::vector<float>{1e4f, 1e4f - 1, -inf, 3,   -inf, -inf, -inf, -inf,
                                                    1,    nan,       2,    3,   -1e30f, 0,  -inf, 5},
                                 {4, 4});
  Tensor y = Tensor::empty({4, 4}), gy = poisoned({4, 4});
  cpu::softmax_forward(y.f32(), x.f32(), 4, 4);
  cuda::softmax_forward(gy.f32(), dev(x).f32(), 4, 4);
  std::vector<float> g = gy.to_f32_vector(), r = y.to_f32_vector();
  for (int i = 0; i < 16; ++i) {
    CAPTURE(i);
    if (r[i] != r[i])
      CHECK(g[i] != g[i]);
    else
      CHECK(std::fabs(g[i] - r[i]) <= 1e-6f + 1e-5f * std::fabs(r[i]));
  }
  CHECK(g[2] == 0.f);
}

TEST_CASE("cuda kernels: scaled causal softmax against mul + masked_fill + softmax" * needs_device()) {
  uint64_t seed = 200;
  for (int64_t BH : {1, 3})
    for (int64_t T : {1, 2, 17, 64, 1025}) {
      const std::string what = "BH=" + std::to_string(BH) + " T=" + std::to_string(T);
      const float scale = 0.37f;
      Tensor s = uniform({BH, T, T}, ++seed, -3.f, 3.f), dy = uniform({BH, T, T}, ++seed);
      // CPU composition: z = scale * s with the future masked to -inf, then softmax rows.
      Tensor z = Tensor::empty({BH, T, T});
      std::vector<float> sv = s.to_f32_vector();
      float* zp = z.f32();
      for (int64_t b = 0; b < BH; ++b)
        for (int64_t i = 0; i < T; ++i)
          for (int64_t j = 0; j < T; ++j) {
            const int64_t e = (b * T + i) * T + j;
            zp[e] = j > i ? -INFINITY : scale * sv[(size_t)e];
          }
      Tensor y = Tensor::empty({BH, T, T}), dz = Tensor::empty({BH, T, T});
      cpu::softmax_forward(y.f32(), z.f32(), BH * T, T);
      cpu::softmax_backward(dz.f32(), dy.f32(), y.f32(), BH * T, T);
      float* dzp = dz.f32();
      for (int64_t e = 0; e < BH * T * T; ++e) dzp[e] *= scale;  // masked entries: y = 0 there, so dz = 0
      Tensor gy = poisoned({BH, T, T}), gds = poisoned({BH, T, T});
      cuda::causal_softmax_forward(gy.f32(), dev(s).f32(), scale, BH, T);
      check_near(gy, y, 1e-7f, 1e-5f, "forward " + what);
      cuda::causal_softmax_backward(gds.f32(), dev(dy).f32(), dev(y).f32(), scale, BH, T);
      check_near(gds, dz, 1e-6f, 1e-4f, "backward " + what);
    }
}

// ---------------------------------------------------------------- kernels: top-k and the router

TEST_CASE("cuda kernels: top-k equals the CPU exactly (distinct values, ties, NaN, -inf; warp and block paths)" *
          needs_device()) {
  uint64_t seed = 300;
  const int64_t ns[] = {1, 5, 8, 31, 64, 1000, 1024, 3000};
  const int64_t ks[] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 20};
  for (int64_t R : {1, 37, 300})
    for (int64_t n : ns)
      if (!(cuda::emulated() && R == 300))  // the emulator: rows past one block of warps (37) are enough
      for (int64_t k : ks) {
        if (k > n) continue;
        for (int variant = 0; variant < 2; ++variant) {
          const std::string what = "R=" + std::to_string(R) + " n=" + std::to_string(n) + " k=" +
                                   std::to_string(k) + (variant ? " ties" : " distinct");
          Tensor x = variant == 0 ? distinct_rows(R, n, ++seed, -50.f, 0.1f) : uniform({R, n}, ++seed);
          if (variant == 1) {  // few levels: many ties, plus some NaN and -inf
            float* p = x.f32();
            for (int64_t i = 0; i < R * n; ++i) {
              p[i] = std::floor(p[i] * 3.f);
              if (i % 97 == 13) p[i] = NAN;
              if (i % 89 == 7) p[i] = -INFINITY;
              if (i % 83 == 5) p[i] = -0.0f;
            }
          }
          Tensor v = Tensor::empty({R, k}), ix = Tensor::empty({R, k}, DType::I32);
          cpu::topk_forward(v.f32(), ix.i32(), x.f32(), R, n, k);
          Tensor gv = poisoned({R, k}), gi = poisoned({R, k}, DType::I32);
          cuda::topk_forward(gv.f32(), gi.i32(), dev(x).f32(), R, n, k);
          same_i32(gi, ix, "indices " + what);
          same(gv, v, "values " + what);
          // Backward: a scatter, exact.
          Tensor dv = uniform({R, k}, ++seed), dx = Tensor::empty({R, n}), gdx = poisoned({R, n});
          cpu::topk_backward(dx.f32(), dv.f32(), ix.i32(), R, n, k);
          cuda::topk_backward(gdx.f32(), dev(dv).f32(), dev(ix).i32(), R, n, k);
          same(gdx, dx, "backward " + what);
        }
      }
}

TEST_CASE("cuda kernels: fused router softmax + top-k, forward and backward" * needs_device()) {
  uint64_t seed = 400;
  for (int64_t R : {1, 33, 257})
    for (int64_t n : {2, 8, 64, 1000, 1024})
      for (int64_t k : {0, 1, 2, 4, 8, 9}) {
        if (k > n) continue;
        const std::string what = "R=" + std::to_string(R) + " n=" + std::to_string(n) + " k=" + std::to_string(k);
        // Logits spaced 0.01 apart: probabilities distinct by far more than rounding, so indices must match.
        Tensor x = distinct_rows(R, n, ++seed, -0.005f * (float)n, 0.01f);
        Tensor p = Tensor::empty({R, n}), v = Tensor::empty({R, k}), ix = Tensor::empty({R, k}, DType::I32);
        cpu::softmax_forward(p.f32(), x.f32(), R, n);
        if (k > 0) cpu::topk_forward(v.f32(), ix.i32(), p.f32(), R, n, k);
        Tensor gp = poisoned({R, n}), gv = poisoned({R, k}), gi = poisoned({R, k}, DType::I32);
        Tensor dX = dev(x);
        cuda::softmax_topk_forward(gp.f32(), gv.f32(), gi.i32(), dX.f32(), R, n, k);
        check_near(gp, p, 1e-7f, 1e-5f, "probs " + what);
        if (k == 0) continue;
        same_i32(gi, ix, "indices " + what);
        check_near(gv, v, 1e-7f, 1e-5f, "gates " + what);
        // gates == probs[indices] to the bit, on the device.
        std::vector<float> pv = gp.to_f32_vector(), gvv = gv.to_f32_vector();
        std::vector<int32_t> iv = gi.to_i32_vector();
        bool bit_same = true;
        for (int64_t r = 0; r < R; ++r)
          for (int64_t j = 0; j < k; ++j)
            bit_same = bit_same && pv[(size_t)(r * n + iv[(size_t)(r * k + j)])] == gvv[(size_t)(r * k + j)];
        CHECK_MESSAGE(bit_same, "gates differ from probs at their indices, " << what);
        // Without the probabilities: the same gates and indices.
        Tensor gv2 = poisoned({R, k}), gi2 = poisoned({R, k}, DType::I32);
        cuda::softmax_topk_forward(nullptr, gv2.f32(), gi2.i32(), dX.f32(), R, n, k);
        same(gv2, gv, "gates without probs " + what);
        same_i32(gi2, gi, "indices without probs " + what);
        // Backward of both outputs against the CPU composition.
        Tensor dp = uniform({R, n}, ++seed), dg = uniform({R, k}, ++seed);
        Tensor g = Tensor::empty({R, n}), dl = Tensor::empty({R, n});
        cpu::topk_backward(g.f32(), dg.f32(), ix.i32(), R, n, k);
        float* gp_ = g.f32();
        const float* dpp = dp.f32();
        for (int64_t i = 0; i < R * n; ++i) gp_[i] += dpp[i];
        cpu::softmax_backward(dl.f32(), g.f32(), p.f32(), R, n);
        Tensor gdl = poisoned({R, n});
        cuda::softmax_topk_backward(gdl.f32(), dev(dp).f32(), dev(dg).f32(), gi.i32(), gp.f32(), R, n, k);
        check_near(gdl, dl, 1e-6f, 1e-4f, "backward " + what);
        // Gates only (dprobs = nullptr).
        cpu::topk_backward(g.f32(), dg.f32(), ix.i32(), R, n, k);
        cpu::softmax_backward(dl.f32(), g.f32(), p.f32(), R, n);
        gdl = poisoned({R, n});
        cuda::softmax_topk_backward(gdl.f32(), nullptr, dev(dg).f32(), gi.i32(), gp.f32(), R, n, k);
        check_near(gdl, dl, 1e-6f, 1e-4f, "backward, gates only " + what);
      }
}

// ---------------------------------------------------------------- kernels: MoE dispatch

TEST_CASE("cuda kernels: dispatch plan (histogram, scan, stable scatter) equals the CPU exactly" * needs_device()) {
  uint64_t seed = 500;
  for (int64_t A : {0, 1, 31, 1000, 5000, 70001})
    for (int64_t N : {1, 4, 64, 1000, 5000}) {
      const std::string what = "A=" + std::to_string(A) + " N=" + std::to_string(N);
      // Experts in [0, N), about 10% dropped (-1) and 1% out of range (N + 3, -7).
      Tensor u = uniform({A}, ++seed, 0.f, 1.f);
      std::vector<float> uv = u.to_f32_vector();
      std::vector<int32_t> ev((size_t)A);
      for (int64_t a = 0; a < A; ++a) {
        const float f = uv[(size_t)a];
        ev[(size_t)a] = (int32_t)std::min<int64_t>(N - 1, (int64_t)(f * (float)N));
        if (a % 10 == 3) ev[(size_t)a] = -1;
        if (a % 100 == 42) ev[(size_t)a] = (a % 200 == 42) ? (int32_t)N + 3 : -7;
      }
      Tensor e = i32s(ev, {A});
      std::vector<int64_t> counts((size_t)N), offsets((size_t)N + 1);
      std::vector<int32_t> row_of((size_t)A), assign_of((size_t)A);
      const int64_t bad = cpu::dispatch_plan(counts.data(), offsets.data(), row_of.data(), assign_of.data(), ev.data(),
                                             A, N);
      const int64_t Ap = offsets[(size_t)N];
      Tensor dE = dev(e);
      Tensor gc = poisoned({2 * N}, DType::I32), go = poisoned({2 * (N + 1)}, DType::I32);
      Tensor gr = poisoned({A}, DType::I32), ga = poisoned({A}, DType::I32);
      const int64_t gbad =
          cuda::dispatch_plan((int64_t*)gc.raw(), (int64_t*)go.raw(), gr.i32(), ga.i32(), dE.i32(), A, N);
      CAPTURE(what);
      CHECK(gbad == bad);
      CHECK(read_i64(gc, N) == counts);
      CHECK(read_i64(go, N + 1) == offsets);
      same_i32(gr, i32s(row_of, {A}), "row_of " + what);
      same_i32(ga.slice(0, 0, Ap), i32s(std::vector<int32_t>(assign_of.begin(), assign_of.begin() + Ap), {Ap}),
               "assign_of " + what);
      // The pieces one by one.
      Tensor gc2 = poisoned({2 * N}, DType::I32);
      CHECK(cuda::dispatch_histogram((int64_t*)gc2.raw(), dE.i32(), A, N) == bad);
      CHECK(read_i64(gc2, N) == counts);
      Tensor go2 = poisoned({2 * (N + 1)}, DType::I32);
      cuda::dispatch_offsets((int64_t*)go2.raw(), (const int64_t*)gc2.raw(), N);
      CHECK(read_i64(go2, N + 1) == offsets);
      Tensor gr2 = poisoned({A}, DType::I32), ga2 = poisoned({A}, DType::I32);
      cuda::dispatch_scatter(gr2.i32(), ga2.i32(), dE.i32(), (const int64_t*)go2.raw(), A, N);
      same_i32(gr2, gr, "scatter row_of " + what);
      same_i32(ga2.slice(0, 0, Ap), ga.slice(0, 0, Ap), "scatter assign_of " + what);
    }
}

TEST_CASE("cuda kernels: dispatch permute, combine and their backward against the CPU" * needs_device()) {
  uint64_t seed = 600;
  for (int64_t T : {1, 50, 1000})
    for (int64_t K : {1, 2, 3})
      for (int64_t C : {1, 3, 4, 64, 130}) {
        const int64_t N = 8, A = T * K;
        const std::string what = "T=" + std::to_string(T) + " K=" + std::to_string(K) + " C=" + std::to_string(C);
        const RandomPlan plan = random_plan(A, N, ++seed);
        const int64_t Ap = plan.Ap;
        const Tensor &ro = plan.row_of, &ao = plan.assign_of;
        Tensor dRO = dev(ro), dAO = dev(ao);
        Tensor x = uniform({T, C}, ++seed), ye = uniform({Ap, C}, ++seed), gate = uniform({A}, ++seed, 0.f, 1.f);
        Tensor dout = uniform({T, C}, ++seed), dxe = uniform({Ap, C}, ++seed);
        // permute
        Tensor xe = Tensor::empty({Ap, C}), gxe = poisoned({Ap, C});
        cpu::dispatch_permute(xe.f32(), x.f32(), ao.i32(), Ap, K, C);
        cuda::dispatch_permute(gxe.f32(), dev(x).f32(), dAO.i32(), Ap, K, C);
        same(gxe, xe, "permute " + what);
        // permute backward
        Tensor dx = Tensor::empty({T, C}), gdx = poisoned({T, C});
        cpu::dispatch_permute_backward(dx.f32(), dxe.f32(), ro.i32(), T, K, C);
        cuda::dispatch_permute_backward(gdx.f32(), dev(dxe).f32(), dRO.i32(), T, K, C);
        check_near(gdx, dx, 1e-6f, 1e-6f, "permute backward " + what);
        // combine
        Tensor out = Tensor::empty({T, C}), gout = poisoned({T, C});
        cpu::dispatch_combine(out.f32(), ye.f32(), gate.f32(), ro.i32(), T, K, C);
        cuda::dispatch_combine(gout.f32(), dev(ye).f32(), dev(gate).f32(), dRO.i32(), T, K, C);
        check_near(gout, out, 1e-6f, 1e-5f, "combine " + what);
        // combine backward, both outputs and each alone
        Tensor dye = Tensor::empty({Ap, C}), dg = Tensor::empty({A});
        cpu::dispatch_combine_backward(dye.f32(), dg.f32(), dout.f32(), ye.f32(), gate.f32(), ro.i32(), ao.i32(), T, Ap, K,
                                       C);
        Tensor gdye = poisoned({Ap, C}), gdg = poisoned({A});
        Tensor dDO = dev(dout), dYE = dev(ye), dG = dev(gate);
        cuda::dispatch_combine_backward(gdye.f32(), gdg.f32(), dDO.f32(), dYE.f32(), dG.f32(), dRO.i32(), dAO.i32(), T, Ap,
                                        K, C);
        check_near(gdye, dye, 1e-7f, 1e-6f, "combine backward d_ye " + what);
        check_near(gdg, dg, 1e-5f, 1e-4f, "combine backward d_gate " + what);
        Tensor gdg2 = poisoned({A});
        cuda::dispatch_combine_backward(nullptr, gdg2.f32(), dDO.f32(), dYE.f32(), dG.f32(), dRO.i32(), dAO.i32(), T, Ap, K,
                                        C);
        same(gdg2, gdg, "d_gate alone " + what);
        Tensor gdye2 = poisoned({Ap, C});
        cuda::dispatch_combine_backward(gdye2.f32(), nullptr, dDO.f32(), dYE.f32(), dG.f32(), dRO.i32(), dAO.i32(), T, Ap,
                                        K, C);
        same(gdye2, gdye, "d_ye alone " + what);
      }
}

// ---------------------------------------------------------------- kernels: embedding, losses, norms, dropout, AdamW

TEST_CASE("cuda kernels: embedding forward equals the CPU; the (sorted, deterministic) backward its chunked order, "
          "within the bound of the CPU" * needs_device()) {
  uint64_t seed = 700;
  for (int64_t V : {1, 50, 300, 70000})
    for (int64_t N : {0, 1, 100, 5000})
      for (int64_t C : {3, 64}) {
        const std::string what = "V=" + std::to_string(V) + " N=" + std::to_string(N) + " C=" + std::to_string(C);
        std::vector<float> uv = uniform({N}, ++seed, 0.f, 1.f).to_f32_vector();
        std::vector<int32_t> idv((size_t)N);
        // Skewed ids (a few very frequent ones, like real text), all in [0, V).
        for (int64_t i = 0; i < N; ++i)
          idv[(size_t)i] = (int32_t)std::min<int64_t>(V - 1, (int64_t)(uv[(size_t)i] * uv[(size_t)i] * (float)V));
        Tensor ids = i32s(idv, {N}), w = uniform({V, C}, ++seed), dout = uniform({N, C}, ++seed);
        Tensor out = Tensor::empty({N, C}), gout = poisoned({N, C});
        cpu::embedding_forward(out.f32(), w.f32(), ids.i32(), N, V, C);
        Tensor dIds = dev(ids);
        cuda::embedding_forward(gout.f32(), dev(w).f32(), dIds.i32(), N, V, C);
        same(gout, out, "forward " + what);
        // Backward accumulates: start both from the same nonzero gradient. Frequent ids (more than kRunChunk) are
        // summed in chunks: the chunked order exactly, the CPU within the bound (kernels/index.h).
        Tensor dw = uniform({V, C}, ++seed), gdw = dev(dw);
        const std::vector<float> dw0 = dw.to_f32_vector();
        cpu::embedding_backward(dw.f32(), dout.f32(), ids.i32(), N, V, C);
        cuda::embedding_backward(gdw.f32(), dev(dout).f32(), dIds.i32(), N, V, C);
        check_sorted_add(gdw, dw.to_f32_vector(), dw0, dout.to_f32_vector(), idv, 1, V, N, C, "backward " + what);
      }
}

TEST_CASE("cuda kernels: sorted adds with long runs of equal keys (index_add, embedding backward): the chunked "
          "order bit for bit, the same bits twice, within the stated bound of the CPU" * needs_device()) {
  const int64_t L = cuda::kRunChunk, D = 50;
  uint64_t seed = 1700;
  // Index lists: fixed counts for some keys, the rest uniform over [0, D), then shuffled (positions matter: each
  // run is summed in increasing position).
  auto keyed = [&](const std::vector<std::pair<int32_t, int64_t>>& fixed, int64_t n) {
    std::vector<int32_t> v;
    for (auto [k, c] : fixed) v.insert(v.end(), (size_t)c, k);
    const std::vector<float> u = uniform({n}, ++seed, 0.f, 1.f).to_f32_vector();
    for (int64_t j = (int64_t)v.size(); j < n; ++j) v.push_back((int32_t)std::min<int64_t>(D - 1, (int64_t)(u[(size_t)j] * D)));
    for (int64_t i = n - 1; i > 0; --i) {  // Fisher-Yates from the counter-based stream
      const int64_t j = (int64_t)(philox_uniform(seed, 1, (uint64_t)i) * (float)(i + 1)) % (i + 1);
      std::swap(v[(size_t)i], v[(size_t)j]);
    }
    return v;
  };
  struct Keys {
    std::string name;
    std::vector<int32_t> index;
  };
  const std::vector<Keys> lists = {
      {"one key 20%", keyed({{7, 400}}, 2000)},
      {"one key 90%", keyed({{3, 1800}}, 2000)},
      // Runs around the chunk length, long ones adjacent in sorted order (the chunk-sum slots of neighbours), and
      // a short run first so that the long ones start off the chunk grid.
      {"runs L-1 .. 3L+1", keyed({{0, 5}, {1, L - 1}, {2, L}, {3, L + 1}, {4, 2 * L - 1}, {5, 2 * L}, {6, 2 * L + 1},
                                  {7, 3 * L + 1}, {8, L + 1}, {9, 130}, {10, 1}},
                                 5 + (L - 1) + L + (L + 1) + (2 * L - 1) + 2 * L + (2 * L + 1) + (3 * L + 1) + (L + 1) +
                                     130 + 1)},
  };
  double worst = 0.0;
  for (const Keys& k : lists) {
    const int64_t n = (int64_t)k.index.size();
    Tensor idx = i32s(k.index, {n}), dIdx = dev(idx);
    for (int64_t O : {1, 2})
      for (int64_t I : {1, 33}) {
        const std::string what = k.name + " index_add O=" + std::to_string(O) + " I=" + std::to_string(I);
        Tensor src = uniform({O, n, I}, ++seed), acc = uniform({O, D, I}, ++seed);
        const std::vector<float> out0 = acc.to_f32_vector(), sv = src.to_f32_vector();
        Tensor g1 = dev(acc), g2 = dev(acc), dSrc = dev(src);
        cpu::index_add(acc.f32(), src.f32(), idx.i32(), O, D, n, I);
        cuda::index_add(g1.f32(), dSrc.f32(), dIdx.i32(), O, D, n, I);
        cuda::index_add(g2.f32(), dSrc.f32(), dIdx.i32(), O, D, n, I);
        worst = std::max(worst, check_sorted_add(g1, acc.to_f32_vector(), out0, sv, k.index, O, D, n, I, what));
        same(g2, g1, "run twice: " + what);
      }
    for (int64_t C : {8, 33}) {
      const std::string what = k.name + " embedding backward C=" + std::to_string(C);
      Tensor dout = uniform({n, C}, ++seed), dw = uniform({D, C}, ++seed);  // accumulates into a nonzero gradient
      const std::vector<float> out0 = dw.to_f32_vector(), sv = dout.to_f32_vector();
      Tensor g1 = dev(dw), g2 = dev(dw), dDout = dev(dout);
      cpu::embedding_backward(dw.f32(), dout.f32(), idx.i32(), n, D, C);
      cuda::embedding_backward(g1.f32(), dDout.f32(), dIdx.i32(), n, D, C);
      cuda::embedding_backward(g2.f32(), dDout.f32(), dIdx.i32(), n, D, C);
      worst = std::max(worst, check_sorted_add(g1, dw.to_f32_vector(), out0, sv, k.index, 1, D, n, C, what));
      same(g2, g1, "run twice: " + what);
    }
  }
  MESSAGE("sorted adds against the CPU's serial order: largest difference ", worst, " of the stated bound");
  CHECK(worst > 0.0);  // the long runs did take the chunked order (the CPU's bits would give 0)
}

TEST_CASE("cuda kernels: cross-entropy forward and backward, ignored rows, device-side scale" * needs_device()) {
  uint64_t seed = 800;
  for (int64_t N : {1, 17, 300})
    for (int64_t V : {1, 10, 65, 1500}) {
      const std::string what = "N=" + std::to_string(N) + " V=" + std::to_string(V);
      Tensor x = uniform({N, V}, ++seed, -5.f, 5.f);
      std::vector<float> uv = uniform({N}, ++seed, 0.f, 1.f).to_f32_vector();
      std::vector<int32_t> tv((size_t)N);
      for (int64_t n = 0; n < N; ++n)
        tv[(size_t)n] = n % 5 == 1 ? -100 : (int32_t)std::min<int64_t>(V - 1, (int64_t)(uv[(size_t)n] * V));
      Tensor t = i32s(tv, {N});
      Tensor losses = Tensor::empty({N}), lse = Tensor::empty({N});
      cpu::cross_entropy_forward(losses.f32(), lse.f32(), x.f32(), t.i32(), N, V, -100);
      Tensor gl = poisoned({N}), glse = poisoned({N});
      Tensor dX = dev(x), dT = dev(t);
      cuda::cross_entropy_forward(gl.f32(), glse.f32(), dX.f32(), dT.i32(), N, V, -100);
      check_near(gl, losses, 1e-5f, 1e-5f, "losses " + what);
      check_near(glse, lse, 1e-5f, 1e-5f, "lse " + what);
      const float scale = 0.37f;
      Tensor dx = Tensor::empty({N, V}), gdx = poisoned({N, V});
      cpu::cross_entropy_backward(dx.f32(), x.f32(), lse.f32(), t.i32(), scale, N, V, -100);
      cuda::cross_entropy_backward(gdx.f32(), dX.f32(), dev(lse).f32(), dT.i32(), scale, N, V, -100);
      check_near(gdx, dx, 1e-7f, 1e-5f, "backward " + what);
      // The same with the upstream gradient on the device: scale = gout[0] * 0.5.
      Tensor gout = Tensor::scalar(0.74f, Device::CUDA);
      Tensor gdx2 = poisoned({N, V});
      cuda::cross_entropy_backward(gdx2.f32(), dX.f32(), dev(lse).f32(), dT.i32(), gout.f32(), 0.5f, N, V, -100);
      check_near(gdx2, dx, 1e-7f, 1e-5f, "backward, device scale " + what);
    }
}

TEST_CASE("cuda kernels: router z-loss against a double reference" * needs_device()) {
  uint64_t seed = 900;
  for (int64_t R : {1, 100, 3000})
    for (int64_t E : {2, 8, 64, 1500}) {
      const std::string what = "R=" + std::to_string(R) + " E=" + std::to_string(E);
      const float w = 0.01f;
      Tensor x = uniform({R, E}, ++seed, -3.f, 3.f);
      std::vector<float> xv = x.to_f32_vector();
      std::vector<double> lse((size_t)R), dl((size_t)(R * E));
      double loss = 0;
      const double gup = 1.7;
      for (int64_t r = 0; r < R; ++r) {
        double m = -1e300, s = 0;
        for (int64_t e = 0; e < E; ++e) m = std::max(m, (double)xv[(size_t)(r * E + e)]);
        for (int64_t e = 0; e < E; ++e) s += std::exp((double)xv[(size_t)(r * E + e)] - m);
        lse[(size_t)r] = m + std::log(s);
        loss += lse[(size_t)r] * lse[(size_t)r];
        for (int64_t e = 0; e < E; ++e)
          dl[(size_t)(r * E + e)] = gup * w * 2.0 * lse[(size_t)r] / (double)R *
                                    std::exp((double)xv[(size_t)(r * E + e)] - lse[(size_t)r]);
      }
      loss *= (double)w / (double)R;
      Tensor gloss = poisoned({1}), glse = poisoned({R});
      Tensor dX = dev(x);
      cuda::z_loss_forward(gloss.f32(), glse.f32(), dX.f32(), R, E, w);
      check_near(glse, lse, 1e-5f, 1e-5f, "lse " + what);
      check_near(gloss, std::vector<double>{loss}, 1e-7f, 1e-5f, "loss " + what);
      Tensor gdl = poisoned({R, E});
      cuda::z_loss_backward(gdl.f32(), Tensor::scalar((float)gup, Device::CUDA).f32(), dX.f32(), glse.f32(), R, E, w);
      check_near(gdl, dl, 1e-8f, 1e-4f, "backward " + what);
    }
}

TEST_CASE("cuda kernels: load-balance loss (flat, grouped, target shares, shared and global partials) against a "
          "double reference and the CPU twin" * needs_device()) {
  uint64_t seed = 1000;
  struct Case {
    int64_t R, E, K, G;
  };
  std::vector<Case> cases;
  for (int64_t R : {1, 64, 5000})
    for (int64_t E : {4, 16, 256})
      for (int64_t K : {1, 2})
        for (int64_t G : {1, 3})
          if (K <= E) cases.push_back({R, E, K, G});
  cases.push_back({3000, 128, 2, 40});  // G * E = 5120: partials in global scratch, 256 chunks
  cases.push_back({700, 512, 1, 64});   // G * E = 32768: global scratch, 128 chunks of 6 rows
  for (const Case& cs : cases)
    for (int bias = 0; bias < 3; ++bias) {  // no logit bias, reliabilities with a pruned child, all zeros
      const int64_t R = cs.R, E = cs.E, K = cs.K, G = cs.G;
      const bool shares = bias == 1;  // all zeros: no target shares, the kernel decides on the device
      const std::string what = "R=" + std::to_string(R) + " E=" + std::to_string(E) + " K=" + std::to_string(K) +
                               " G=" + std::to_string(G) + " bias=" + std::to_string(bias);
      const float w = 0.02f;
      // Router probabilities (softmax of random logits) and their top-K; groups with some skipped rows.
      Tensor logits = uniform({R, E}, ++seed, -2.f, 2.f);
      Tensor p = Tensor::empty({R, E}), v = Tensor::empty({R, K}), ix = Tensor::empty({R, K}, DType::I32);
      cpu::softmax_forward(p.f32(), logits.f32(), R, E);
      cpu::topk_forward(v.f32(), ix.i32(), p.f32(), R, E, K);
      std::vector<int32_t> iv = ix.to_i32_vector(), gv((size_t)R);
      for (int64_t r = 0; r < R; ++r) gv[(size_t)r] = G == 1 ? 0 : (r % 11 == 4 ? -1 : (int32_t)(r % G));
      if (R > 3) iv[3] = -1;  // a dropped slot is not counted
      // The logit bias: log reliabilities, -inf for one child per group (a pruned one takes no part); the target
      // shares it makes, 1 / q = rsum / rho (kernels/losses.h), in double.
      std::vector<float> lbv((size_t)(G * E), 0.f), qv((size_t)(G * E), 0.f);
      for (int64_t i = 0; bias == 1 && i < G * E; ++i)
        lbv[(size_t)i] = i % E == 2 ? -INFINITY : std::log(0.05f + 0.95f * philox_uniform(seed, 7, (uint64_t)i));
      for (int64_t g = 0; g < G; ++g) {
        double rsum = 0.0;
        for (int64_t e = 0; e < E; ++e) rsum += std::exp((double)lbv[(size_t)(g * E + e)]);
        for (int64_t e = 0; e < E; ++e) {
          const double rho = std::exp((double)lbv[(size_t)(g * E + e)]);
          qv[(size_t)(g * E + e)] = rho > 0.0 ? (float)(rsum / rho) : 0.f;
        }
      }
      Tensor idx = i32s(iv, {R, K}), grp = i32s(gv, {R}), q = Tensor::from_vector(lbv, {G, E});
      // Reference.
      std::vector<float> pv = p.to_f32_vector();
      std::vector<double> T((size_t)G, 0), S((size_t)(G * E), 0), cnt((size_t)(G * E), 0);
      for (int64_t r = 0; r < R; ++r) {
        const int32_t g = gv[(size_t)r];
        if (g < 0) continue;
        T[(size_t)g] += 1;
        for (int64_t e = 0; e < E; ++e) S[(size_t)(g * E + e)] += pv[(size_t)(r * E + e)];
        for (int64_t j = 0; j < K; ++j) {
          const int32_t e = iv[(size_t)(r * K + j)];
          if (e >= 0 && e < E) cnt[(size_t)(g * E + e)] += 1;
        }
      }
      double tall = 0, loss = 0;
      for (double t : T) tall += t;
      std::vector<double> frac((size_t)(G * E), 0), mp((size_t)(G * E), 0);
      for (int64_t g = 0; g < G; ++g)
        for (int64_t e = 0; e < E; ++e) {
          const double t = T[(size_t)g], inv = shares ? qv[(size_t)(g * E + e)] : (double)E;
          frac[(size_t)(g * E + e)] = t > 0 ? cnt[(size_t)(g * E + e)] / (t * (double)K) : 0;
          mp[(size_t)(g * E + e)] = t > 0 ? S[(size_t)(g * E + e)] / t : 0;
          loss += tall > 0 ? inv * (t / tall) * frac[(size_t)(g * E + e)] * mp[(size_t)(g * E + e)] : 0;
        }
      loss *= (double)w;
      const double gup = 0.6;
      std::vector<double> dp((size_t)(R * E), 0);
      for (int64_t r = 0; r < R; ++r) {
        const int32_t g = gv[(size_t)r];
        if (g < 0) continue;
        for (int64_t e = 0; e < E; ++e)
          dp[(size_t)(r * E + e)] =
              gup * w * (shares ? qv[(size_t)(g * E + e)] : (double)E) * frac[(size_t)(g * E + e)] / tall;
      }
      // CUDA against the reference.
      Tensor gloss = poisoned({1}), gfrac = poisoned({G, E}), gmp = poisoned({G, E}), gtok = poisoned({G});
      Tensor dP = dev(p), dIdx = dev(idx), dGrp = dev(grp), dQ = dev(q);
      const int32_t* gptr = G == 1 ? nullptr : dGrp.i32();
      const float* qptr = bias ? dQ.f32() : nullptr;
      cuda::load_balance_forward(gloss.f32(), gfrac.f32(), gmp.f32(), gtok.f32(), dP.f32(), dIdx.i32(), gptr, qptr, R,
                                 E, K, G, w);
      check_near(gloss, std::vector<double>{loss}, 1e-7f, 1e-5f, "loss " + what);
      check_near(gfrac, frac, 1e-7f, 1e-6f, "frac " + what);
      check_near(gmp, mp, 1e-7f, 1e-5f, "mean_prob " + what);
      check_near(gtok, T, 0.f, 0.f, "tokens " + what);
      Tensor gdp = poisoned({R, E});
      cuda::load_balance_backward(gdp.f32(), Tensor::scalar((float)gup, Device::CUDA).f32(), gfrac.f32(), gtok.f32(),
                                  gptr, qptr, R, E, G, w);
      check_near(gdp, dp, 1e-9f, 1e-5f, "backward " + what);
      // The CPU twin: the same loss and mean_prob within float rounding (float chunk partials on the GPU, double
      // sums on the CPU); frac, tokens and the backward bit for bit (integer counts, the same float expressions).
      Tensor closs = Tensor::empty({1}), cfrac = Tensor::empty({G, E}), cmp = Tensor::empty({G, E}),
             ctok = Tensor::empty({G}), cdp = Tensor::empty({R, E});
      cpu::load_balance_forward(closs.f32(), cfrac.f32(), cmp.f32(), ctok.f32(), p.f32(), idx.i32(),
                                G == 1 ? nullptr : grp.i32(), bias ? q.f32() : nullptr, R, E, K, G, w);
      const float gupf = (float)gup;
      cpu::load_balance_backward(cdp.f32(), &gupf, cfrac.f32(), ctok.f32(), G == 1 ? nullptr : grp.i32(),
                                 bias ? q.f32() : nullptr, R, E, G, w);
      check_near(gloss, closs, 1e-7f, 1e-5f, "loss, CPU twin " + what);
      check_near(gmp, cmp, 1e-7f, 1e-5f, "mean_prob, CPU twin " + what);
      same(gfrac, cfrac, "frac, CPU twin " + what);
      same(gtok, ctok, "tokens, CPU twin " + what);
      same(gdp, cdp, "backward, CPU twin " + what);
    }
  // Balanced usage gives exactly the weight (the Switch loss's floor): uniform probabilities, round-robin choice.
  const int64_t R = 64, E = 8;
  Tensor p = Tensor::full({R, E}, 1.f / E);
  std::vector<int32_t> iv((size_t)R);
  for (int64_t r = 0; r < R; ++r) iv[(size_t)r] = (int32_t)(r % E);
  Tensor gloss = poisoned({1}), gfrac = poisoned({1, E}), gmp = poisoned({1, E}), gtok = poisoned({1});
  cuda::load_balance_forward(gloss.f32(), gfrac.f32(), gmp.f32(), gtok.f32(), dev(p).f32(), dev(i32s(iv, {R, 1})).i32(),
                             nullptr, nullptr, R, E, 1, 1, 0.5f);
  CHECK(std::fabs(gloss.item() - 0.5f) < 1e-6f);
  {  // An all-zero bias is no bias, bit for bit (the kernel decides on the device), over many weights and upstream
     // gradients, with E = 6: the shares path would multiply by E = rsum / rho in float, which rounds differently.
    const int64_t R2 = 9, E2 = 6;
    Tensor p2 = dev(uniform({R2, E2}, 1990, 0.f, 1.f));
    std::vector<int32_t> iv2((size_t)R2);
    for (int64_t r = 0; r < R2; ++r) iv2[(size_t)r] = (int32_t)(r * 5 % E2);
    Tensor i2 = dev(i32s(iv2, {R2, 1})), zeros = Tensor::zeros({E2}, DType::F32, Device::CUDA);
    Tensor l0 = poisoned({1}), l1 = poisoned({1}), f0 = poisoned({1, E2}), f1 = poisoned({1, E2}),
           m0 = poisoned({1, E2}), m1 = poisoned({1, E2}), t0 = poisoned({1}), t1 = poisoned({1}),
           d0 = poisoned({R2, E2}), d1 = poisoned({R2, E2});
    int differ_from_shares = 0;
    for (int i = 0; i < 40; ++i) {
      const float w = 0.01f + 0.0031f * (float)i, dl = 0.5f + 0.137f * (float)i;
      const Tensor dlt = Tensor::scalar(dl, Device::CUDA);
      cuda::load_balance_forward(l0.f32(), f0.f32(), m0.f32(), t0.f32(), p2.f32(), i2.i32(), nullptr, nullptr, R2, E2,
                                 1, 1, w);
      cuda::load_balance_forward(l1.f32(), f1.f32(), m1.f32(), t1.f32(), p2.f32(), i2.i32(), nullptr, zeros.f32(), R2,
                                 E2, 1, 1, w);
      cuda::load_balance_backward(d0.f32(), dlt.f32(), f0.f32(), t0.f32(), nullptr, nullptr, R2, E2, 1, w);
      cuda::load_balance_backward(d1.f32(), dlt.f32(), f1.f32(), t1.f32(), nullptr, zeros.f32(), R2, E2, 1, w);
      same(l1, l0, "loss, zero bias");
      same(d1, d0, "backward, zero bias");
      const std::vector<float> fr = f0.to_f32_vector(), dv = d0.to_f32_vector();
      const float k = (float)((double)dl * (double)w / (double)R2);  // the shares path's k
      for (int64_t e = 0; e < E2; ++e) differ_from_shares += (k * (float)E2) * fr[(size_t)e] != dv[(size_t)e];
    }
    CHECK(differ_from_shares > 0);  // the comparison can tell the two paths apart
  }
}

TEST_CASE("cuda kernels: layernorm and rmsnorm forward/backward against the CPU" * needs_device()) {
  uint64_t seed = 1100;
  for (int64_t N : {1, 17, 300})
    for (int64_t C : {1, 3, 64, 768, 1500})
      for (int with_bias = 0; with_bias < 2; ++with_bias) {
        const std::string what = "N=" + std::to_string(N) + " C=" + std::to_string(C) + (with_bias ? " bias" : "");
        Tensor x = uniform({N, C}, ++seed, -2.f, 3.f), w = uniform({C}, ++seed, 0.5f, 1.5f), b = uniform({C}, ++seed);
        Tensor dy = uniform({N, C}, ++seed);
        Tensor dX = dev(x), dW = dev(w), dB = dev(b), dDY = dev(dy);
        // layernorm
        Tensor y = Tensor::empty({N, C}), mean = Tensor::empty({N}), rstd = Tensor::empty({N});
        cpu::layernorm_forward(y.f32(), mean.f32(), rstd.f32(), x.f32(), w.f32(), with_bias ? b.f32() : nullptr, N, C,
                               1e-5f);
        Tensor gy = poisoned({N, C}), gm = poisoned({N}), gr = poisoned({N});
        cuda::layernorm_forward(gy.f32(), gm.f32(), gr.f32(), dX.f32(), dW.f32(), with_bias ? dB.f32() : nullptr, N, C,
                                1e-5f);
        check_near(gy, y, 1e-5f, 1e-5f, "layernorm " + what);
        check_near(gm, mean, 1e-6f, 1e-5f, "layernorm mean " + what);
        check_near(gr, rstd, 1e-6f, 1e-5f, "layernorm rstd " + what);
        Tensor dx = Tensor::empty({N, C}), dw = Tensor::empty({C}), db = Tensor::empty({C});
        cpu::layernorm_backward(dx.f32(), dw.f32(), with_bias ? db.f32() : nullptr, dy.f32(), x.f32(), w.f32(),
                                mean.f32(), rstd.f32(), N, C);
        Tensor gdx = poisoned({N, C}), gdw = poisoned({C}), gdb = poisoned({C});
        cuda::layernorm_backward(gdx.f32(), gdw.f32(), with_bias ? gdb.f32() : nullptr, dDY.f32(), dX.f32(), dW.f32(),
                                 dev(mean).f32(), dev(rstd).f32(), N, C);
        check_near(gdx, dx, 1e-5f, 1e-4f, "layernorm dx " + what);
        check_near(gdw, dw, 1e-5f, 1e-4f, "layernorm dweight " + what);
        if (with_bias) check_near(gdb, db, 1e-5f, 1e-4f, "layernorm dbias " + what);
        // rmsnorm
        Tensor ry = Tensor::empty({N, C}), rr = Tensor::empty({N});
        cpu::rmsnorm_forward(ry.f32(), rr.f32(), x.f32(), w.f32(), N, C, 1e-6f);
        Tensor gry = poisoned({N, C}), grr = poisoned({N});
        cuda::rmsnorm_forward(gry.f32(), grr.f32(), dX.f32(), dW.f32(), N, C, 1e-6f);
        check_near(gry, ry, 1e-5f, 1e-5f, "rmsnorm " + what);
        check_near(grr, rr, 1e-6f, 1e-5f, "rmsnorm rstd " + what);
        Tensor rdx = Tensor::empty({N, C}), rdw = Tensor::empty({C});
        cpu::rmsnorm_backward(rdx.f32(), rdw.f32(), dy.f32(), x.f32(), w.f32(), rr.f32(), N, C);
        Tensor grdx = poisoned({N, C}), grdw = poisoned({C});
        cuda::rmsnorm_backward(grdx.f32(), grdw.f32(), dDY.f32(), dX.f32(), dW.f32(), dev(rr).f32(), N, C);
        check_near(grdx, rdx, 1e-5f, 1e-4f, "rmsnorm dx " + what);
        check_near(grdw, rdw, 1e-5f, 1e-4f, "rmsnorm dweight " + what);
      }
}

TEST_CASE("cuda kernels: dropout drops exactly the CPU's elements" * needs_device()) {
  uint64_t seed = 1200;
  for (int64_t n : {1, 3, 4, 1001, 100000})
    for (float p : {0.f, 0.1f, 0.5f, 0.9f}) {
      const std::string what = "n=" + std::to_string(n) + " p=" + std::to_string(p);
      Tensor x = uniform({n}, ++seed);
      const uint64_t s = 77 + (uint64_t)n, off = 12345;
      Tensor y = Tensor::empty({n}), gy = poisoned({n});
      cpu::dropout_forward(y.f32(), x.f32(), n, p, s, off);
      cuda::dropout_forward(gy.f32(), dev(x).f32(), n, p, s, off);
      same(gy, y, "forward " + what);
      Tensor dx = Tensor::empty({n}), gdx = poisoned({n});
      cpu::dropout_backward(dx.f32(), x.f32(), n, p, s, off + 1);
      cuda::dropout_backward(gdx.f32(), dev(x).f32(), n, p, s, off + 1);
      same(gdx, dx, "backward " + what);
    }
}

TEST_CASE("cuda kernels: clip scale and the norm from sums read their values on the device; AdamW skip flag" *
          needs_device()) {
  uint64_t seed = 1400;
  const int64_t n = 5003;
  for (float nv : {0.5f, 3.f, NAN, INFINITY}) {
    Tensor g = uniform({n}, ++seed), norm = Tensor::from_vector(std::vector<float>{nv}, {1});
    Tensor dg = dev(g);
    cpu::clip_scale(g.f32(), n, norm.f32(), 1.f);
    cuda::clip_scale(dg.f32(), n, dev(norm).f32(), 1.f);
    CHECK(dg.to_f32_vector() == g.to_f32_vector());  // one IEEE multiply by the same float scale
  }
  Tensor sums = uniform({300}, ++seed, 0.f, 5.f);
  double ss = 0.0;
  for (float v : sums.to_f32_vector()) ss += (double)v;
  Tensor dn = Tensor::empty({1}, DType::F32, Device::CUDA);
  cuda::norm_from_sums(dn.f32(), dev(sums).f32(), 300);
  CHECK(dn.item() == (float)std::sqrt(ss));
  // A non-finite flag: parameters and moments stay as they were.
  Tensor p = uniform({n}, ++seed), m = uniform({n}, ++seed), v = uniform({n}, ++seed, 0.f, 0.01f);
  Tensor dp = dev(p), dm = dev(m), dv = dev(v), dgr = dev(uniform({n}, ++seed));
  Tensor flag = dev(Tensor::from_vector(std::vector<float>{NAN}, {1}));
  cuda::adamw_step(dp.f32(), dm.f32(), dv.f32(), dgr.f32(), n, 1e-2f, 0.9f, 0.95f, 1e-8f, 0.1f, 1, flag.f32());
  cuda::AdamWSlice sl{dp.f32(), dm.f32(), dv.f32(), dgr.f32(), n, 0.1f};
  cuda::adamw_step_multi(&sl, 1, 1e-2f, 0.9f, 0.95f, 1e-8f, 1, flag.f32());
  CHECK(dp.to_f32_vector() == p.to_f32_vector());
  CHECK(dm.to_f32_vector() == m.to_f32_vector());
}

TEST_CASE("cuda kernels: the experts' guard and health update match their CPU twins" * needs_device()) {
  uint64_t seed = 1500;
  // N = 1 without offsets (a dense FFN), and 5 and 11 experts (more than the kernel's 8 warps) with uneven rows (one
  // empty) over the same S rows.
  for (int64_t N : {int64_t(1), int64_t(5), int64_t(11)})
    for (int64_t S : {int64_t(1), int64_t(37), int64_t(300)})
      for (int64_t C : {int64_t(1), int64_t(33)})
        for (float ema : {0.f, 1.5f}) {
          CAPTURE(N);
          CAPTURE(S);
          CAPTURE(C);
          CAPTURE(ema);
          std::vector<int64_t> off((size_t)N + 1, 0);
          for (int64_t e = 1; e < N; ++e) off[e] = e == 2 ? off[e - 1] : std::min(S, off[e - 1] + S / N + e);
          off[N] = S;
          std::vector<int32_t> words(2 * off.size());
          std::memcpy(words.data(), off.data(), off.size() * sizeof(int64_t));
          Tensor doff = dev(Tensor::from_vector(words, {(int64_t)words.size()}));
          const int64_t* hoff = N == 1 ? nullptr : off.data();
          const int64_t* goff = N == 1 ? nullptr : (const int64_t*)doff.raw();
          // Not multiples of 2^-23 (as uniform's [-1, 1) values are): their squares' double sums round, so a
          // row's column order shows in its norm's bits.
          Tensor y = uniform({S, C}, ++seed, -1.3f, 2.9f);
          float* p = y.f32();
          p[(S / 2) * C] = NAN;                      // a non-finite row
          if (S > 2) p[(S - 1) * C + C - 1] = 1e4f;  // an outlier once there are statistics
          std::vector<float> st((size_t)(4 * N), 1.f);
          for (int64_t e = 0; e < N; ++e) st[(size_t)(N + e)] = ema * (float)(1 + e), st[(size_t)(2 * N + e)] = 0.f;
          Tensor state = Tensor::from_vector(st, {4 * N});
          Tensor pend = uniform({10 * N}, ++seed, 0.f, 0.f);  // zeros: doubles 0.0
          Tensor norms = Tensor::empty({2 * S}), out = Tensor::empty({S, C}), ok = Tensor::empty({N}, DType::I32),
                 cnt = Tensor::empty({2}, DType::I32);
          Tensor dstate = dev(state), dpend = dev(pend), dnorms = poisoned({2 * S}), dout = poisoned({S, C}),
                 dok = poisoned({N}, DType::I32), dcnt = poisoned({2}, DType::I32);
          for (bool zero : {false, true})
            for (bool traffic : {false, true}) {
              cpu::expert_guard_forward(out.f32(), ok.i32(), cnt.i32(), (double*)pend.raw(), (double*)norms.raw(),
                                        y.f32(), hoff, N, S, C, state.f32(), 20.f, zero, true, traffic);
              cuda::expert_guard_forward(dout.f32(), dok.i32(), dcnt.i32(), (double*)dpend.raw(),
                                         (double*)dnorms.raw(), dev(y).f32(), goff, N, S, C, dstate.f32(), 20.f, zero,
                                         true, traffic);
              same(dout, out, "guard output");
              same_i32(dok, ok, "ok flags");
              same_i32(dcnt, cnt, "row counts");
              same(dpend, pend, "pending counters (as bits)");
            }
          // In place (out == y): only the bad rows are written.
          Tensor yin = y.clone(), dyin = dev(y);
          cpu::expert_guard_forward(yin.f32(), ok.i32(), nullptr, (double*)pend.raw(), (double*)norms.raw(), yin.f32(),
                                    hoff, N, S, C, state.f32(), 20.f, true, false, false);
          cuda::expert_guard_forward(dyin.f32(), dok.i32(), nullptr, (double*)dpend.raw(), (double*)dnorms.raw(),
                                     dyin.f32(), goff, N, S, C, dstate.f32(), 20.f, true, false, false);
          same(dyin, yin, "guard in place");
          Tensor g = uniform({S * C}, ++seed), dx = Tensor::empty({S * C}), gdx = poisoned({S * C});
          cpu::expert_gate_backward(dx.f32(), g.f32(), ok.i32(), S * C);
          cuda::expert_gate_backward(gdx.f32(), dev(g).f32(), dok.i32(), S * C);
          same(gdx, dx, "gate backward");
          Tensor rz = g.clone(), grz = dev(g);
          cpu::expert_rows_zero(rz.f32(), ok.i32(), hoff ? hoff : off.data(), N, C);
          cuda::expert_rows_zero(grz.f32(), dok.i32(), hoff ? goff : (const int64_t*)doff.raw(), N, C);
          same(grz, rz, "cut rows zeroed");
          Tensor bz = uniform({N * 3}, ++seed), gbz = dev(bz);
          cpu::expert_rows_zero(bz.f32(), ok.i32(), nullptr, N, 3);
          cuda::expert_rows_zero(gbz.f32(), dok.i32(), nullptr, N, 3);
          same(gbz, bz, "cut blocks zeroed");
          std::vector<int32_t> routed((size_t)N);
          for (int64_t e = 0; e < N; ++e) routed[(size_t)e] = (int32_t)(3 * e + 1);
          Tensor rt = Tensor::from_vector(routed, {N});
          cpu::expert_traffic_add((double*)pend.raw(), rt.i32(), N);
          cuda::expert_traffic_add((double*)dpend.raw(), dev(rt).i32(), N);
          same(dpend, pend, "traffic added");
          // Expert 1 (when there is one) pruned; the others 3 weights and 2 gradients each.
          std::vector<int64_t> meta((size_t)(2 * N));
          for (int64_t e = 0; e < N; ++e) meta[(size_t)e] = e == 1 ? 0 : 3, meta[(size_t)(N + e)] = e == 1 ? 0 : 2;
          std::vector<int32_t> mw(2 * meta.size());
          std::memcpy(mw.data(), meta.data(), meta.size() * sizeof(int64_t));
          Tensor dmeta = dev(Tensor::from_vector(mw, {(int64_t)mw.size()}));
          Tensor sums = uniform({5 * N}, ++seed, 0.f, 3.f);
          // The last expert (of 3 or more) flagged where the pruning lives: its sums passed over.
          std::vector<float> flags((size_t)N, 0.f);
          if (N > 2) flags[(size_t)(N - 1)] = 1.f;
          const Tensor hflags = Tensor::from_vector(flags, {N});
          cpu::expert_health_update(state.f32(), (double*)pend.raw(), sums.f32(), meta.data(), hflags.f32(), N, 0.9f,
                                    20.f, 1e-3f, true);
          cuda::expert_health_update(dstate.f32(), (double*)dpend.raw(), dev(sums).f32(),
                                     (const int64_t*)dmeta.raw(), dev(hflags).f32(), N, 0.9f, 20.f, 1e-3f, true);
          check_near(dstate, state, 1e-6f, 1e-6f, "state after the update");  // EMAs: nvcc may fuse a multiply-add
          same(dpend, pend, "counters cleared");
          // Pruning on that state: random loads (some under the threshold), low counters near the window.
          if (N >= 2) {
            std::vector<float> lowv((size_t)N);
            std::vector<int64_t> loadv((size_t)N);
            const std::vector<float> u = uniform({2 * N}, ++seed, 0.f, 1.f).to_f32_vector();
            for (int64_t e = 0; e < N; ++e) {
              lowv[(size_t)e] = std::floor(u[(size_t)e] * 3.f);
              loadv[(size_t)e] = (int64_t)(u[(size_t)(N + e)] * 20.f);
            }
            std::vector<int32_t> lw((size_t)(2 * N));
            std::memcpy(lw.data(), loadv.data(), lw.size() * 4);
            Tensor low = Tensor::from_vector(lowv, {N}), pr = hflags.clone(), ld = Tensor::from_vector(lw, {2 * N});
            Tensor dlow = dev(low), dpr = dev(pr), dld = dev(ld);
            cpu::expert_prune_update(low.f32(), pr.f32(), (int64_t*)ld.raw(), state.f32(), N, N, 1,
                                     0.15f, 3, true);
            cuda::expert_prune_update(dlow.f32(), dpr.f32(), (int64_t*)dld.raw(), dstate.f32(), N, N, 1,
                                      0.15f, 3, true);
            same(dlow, low, "pruning: low counters");
            same(dpr, pr, "pruning: flags");
            same(dld, ld, "pruning: loads cleared");
          }
        }
}

TEST_CASE("cuda kernels: step values read from device memory (AdamW's lr and bias corrections, dropout's offset "
          "base) give the bits of their argument forms" * needs_device()) {
  uint64_t seed = 1600;
  const int64_t n = 3001;
  for (int64_t t : {int64_t(1), int64_t(7), int64_t(1000)}) {
    CAPTURE(t);
    Tensor p = uniform({n}, ++seed), m = uniform({n}, ++seed), v = uniform({n}, ++seed, 0.f, 0.01f);
    Tensor g = dev(uniform({n}, ++seed));
    Tensor p1 = dev(p), m1 = dev(m), v1 = dev(v), p2 = dev(p), m2 = dev(m), v2 = dev(v);
    const float lr = 3e-3f / (float)t;
    cuda::AdamWSlice a{p1.f32(), m1.f32(), v1.f32(), g.f32(), n, 0.1f};
    cuda::AdamWSlice b{p2.f32(), m2.f32(), v2.f32(), g.f32(), n, 0.1f};
    cuda::adamw_step_multi(&a, 1, lr, 0.9f, 0.95f, 1e-8f, t);
    float h[3];
    cpu::adamw_hyper(h, lr, 0.9f, 0.95f, t);
    Tensor hyper = dev(Tensor::from_vector(std::vector<float>(h, h + 3), {3}));
    cuda::adamw_step_multi(&b, 1, 99.f, 0.9f, 0.95f, 1e-8f, 12345, nullptr, hyper.f32());  // lr and t ignored
    same(p2, p1, "parameters");
    same(m2, m1, "first moments");
    same(v2, v1, "second moments");
  }
  Tensor x = uniform({n}, ++seed), base = Tensor::empty({2}, DType::F32);  // one u64 in 8 bytes
  *static_cast<uint64_t*>(base.raw()) = 977;
  Tensor ref = Tensor::empty({n}), cpu_based = Tensor::empty({n}), got = poisoned({n});
  cpu::dropout_forward(ref.f32(), x.f32(), n, 0.3f, 42, 977 + 5);
  cpu::dropout_forward(cpu_based.f32(), x.f32(), n, 0.3f, 42, 5, static_cast<const uint64_t*>(base.raw()));
  cuda::dropout_forward(got.f32(), dev(x).f32(), n, 0.3f, 42, 5, static_cast<const uint64_t*>(dev(base).raw()));
  same(cpu_based, ref, "CPU twin, offset from memory");
  same(got, ref, "CUDA, offset from device memory");
}

TEST_CASE("cuda kernels: AdamW step, single tensor and fused over many tensors" * needs_device()) {
  uint64_t seed = 1300;
  const float lr = 3e-3f, b1 = 0.9f, b2 = 0.95f, eps = 1e-8f;
  for (int64_t t : {1, 2, 1000}) {
    // Single tensor.
    const int64_t n = 10007;
    Tensor p = uniform({n}, ++seed), m = uniform({n}, ++seed, -0.1f, 0.1f), v = uniform({n}, ++seed, 0.f, 0.01f);
    Tensor g = uniform({n}, ++seed);
    Tensor gp = dev(p), gm = dev(m), gv = dev(v);
    cpu::adamw_step(p.f32(), m.f32(), v.f32(), g.f32(), n, lr, b1, b2, eps, 0.1f, t);
    cuda::adamw_step(gp.f32(), gm.f32(), gv.f32(), dev(g).f32(), n, lr, b1, b2, eps, 0.1f, t);
    check_near(gp, p, 1e-6f, 1e-5f, "param, t=" + std::to_string(t));
    check_near(gm, m, 1e-7f, 1e-5f, "m, t=" + std::to_string(t));
    check_near(gv, v, 1e-9f, 1e-5f, "v, t=" + std::to_string(t));
  }
  // Fused: 60 tensors (two launches of at most 48), sizes 0..5000, two weight decays.
  std::vector<Tensor> P, M, V, G, dP, dM, dV, dG;
  std::vector<cuda::AdamWSlice> slices;
  for (int i = 0; i < 60; ++i) {
    const int64_t n = (i * 977) % 5001;
    P.push_back(uniform({n}, ++seed));
    M.push_back(uniform({n}, ++seed, -0.1f, 0.1f));
    V.push_back(uniform({n}, ++seed, 0.f, 0.01f));
    G.push_back(uniform({n}, ++seed));
    dP.push_back(dev(P.back()));
    dM.push_back(dev(M.back()));
    dV.push_back(dev(V.back()));
    dG.push_back(dev(G.back()));
    const float wd = i % 3 == 0 ? 0.f : 0.1f;
    slices.push_back({n ? dP.back().f32() : nullptr, n ? dM.back().f32() : nullptr, n ? dV.back().f32() : nullptr,
                      n ? dG.back().f32() : nullptr, n, wd});
    if (n) cpu::adamw_step(P.back().f32(), M.back().f32(), V.back().f32(), G.back().f32(), n, lr, b1, b2, eps, wd, 5);
  }
  cuda::adamw_step_multi(slices.data(), (int64_t)slices.size(), lr, b1, b2, eps, 5);
  for (int i = 0; i < 60; ++i) {
    check_near(dP[(size_t)i], P[(size_t)i], 1e-6f, 1e-5f, "fused param " + std::to_string(i));
    check_near(dM[(size_t)i], M[(size_t)i], 1e-7f, 1e-5f, "fused m " + std::to_string(i));
    check_near(dV[(size_t)i], V[(size_t)i], 1e-9f, 1e-5f, "fused v " + std::to_string(i));
  }
}

// ---------------------------------------------------------------- kernels: elementwise, activations, reductions

TEST_CASE("cuda kernels: binary (same, rows, broadcast), scalar, unary, pow_backward, broadcast_to" * needs_device()) {
  uint64_t seed = 1400;
  const cpu::Binary ops[] = {cpu::Binary::Add, cpu::Binary::Sub, cpu::Binary::Mul, cpu::Binary::Div};
  for (cpu::Binary op : ops) {
    const std::string name = "op " + std::to_string((int)op);
    // same shape, f32 and i32 (i32 division by 0 and -1 included)
    const int64_t n = 10001;
    Tensor a = uniform({n}, ++seed), b = uniform({n}, ++seed, 0.5f, 2.f);
    Tensor out = Tensor::empty({n}), gout = poisoned({n});
    cpu::binary(op, out.f32(), a.f32(), b.f32(), n);
    cuda::binary(op, gout.f32(), dev(a).f32(), dev(b).f32(), n);
    same(gout, out, "same f32 " + name);
    std::vector<int32_t> ai((size_t)n), bi((size_t)n);
    for (int64_t i = 0; i < n; ++i) {
      ai[(size_t)i] = (int32_t)(i * 2654435761u);  // wraps: large magnitudes of both signs
      bi[(size_t)i] = i % 5 == 0 ? 0 : (i % 7 == 0 ? -1 : (int32_t)(i % 13) - 6);
    }
    Tensor ta = i32s(ai, {n}), tb = i32s(bi, {n}), oi = Tensor::empty({n}, DType::I32);
    Tensor goi = poisoned({n}, DType::I32);
    cpu::binary(op, oi.i32(), ta.i32(), tb.i32(), n);
    cuda::binary(op, goi.i32(), dev(ta).i32(), dev(tb).i32(), n);
    same_i32(goi, oi, "same i32 " + name);
    // rows: [R, C] OP [C]
    const int64_t R = 70, C = 129;
    Tensor m = uniform({R, C}, ++seed), row = uniform({C}, ++seed, 0.5f, 2.f);
    Tensor mo = Tensor::empty({R, C}), gmo = poisoned({R, C});
    cpu::binary_rows(op, mo.f32(), m.f32(), row.f32(), R, C);
    cuda::binary_rows(op, gmo.f32(), dev(m).f32(), dev(row).f32(), R, C);
    same(gmo, mo, "rows " + name);
    // general broadcast: [4, 1, 6, 5] with [3, 1, 5] -> [4, 3, 6, 5]
    const Shape os = {4, 3, 6, 5};
    Tensor x = uniform({4, 1, 6, 5}, ++seed), y = uniform({3, 1, 5}, ++seed, 0.5f, 2.f);
    const std::vector<int64_t> xs = {30, 0, 5, 1}, ys = {0, 5, 0, 1};
    Tensor bo = Tensor::empty(os), gbo = poisoned(os);
    cpu::binary_strided(op, bo.f32(), x.f32(), y.f32(), 4, os.data(), xs.data(), ys.data());
    cuda::binary_strided(op, gbo.f32(), dev(x).f32(), dev(y).f32(), 4, os.data(), xs.data(), ys.data());
    same(gbo, bo, "strided " + name);
  }
  // scalar, unary, pow_backward
  const int64_t n = 5003;
  Tensor a = uniform({n}, ++seed, 0.1f, 3.f), dy = uniform({n}, ++seed);
  Tensor dA = dev(a);
  const cpu::Scalar sops[] = {cpu::Scalar::Add, cpu::Scalar::Mul, cpu::Scalar::RSub, cpu::Scalar::RDiv,
                              cpu::Scalar::Pow};
  for (cpu::Scalar op : sops)
    for (float s : {2.f, -1.5f, 0.5f}) {
      Tensor out = Tensor::empty({n}), gout = poisoned({n});
      cpu::scalar(op, out.f32(), a.f32(), s, n);
      cuda::scalar(op, gout.f32(), dA.f32(), s, n);
      check_near(gout, out, 1e-7f, 2e-6f, "scalar " + std::to_string((int)op) + " s=" + std::to_string(s));
    }
  const cpu::Unary uops[] = {cpu::Unary::Neg, cpu::Unary::Log, cpu::Unary::Sqrt, cpu::Unary::Square};
  for (cpu::Unary op : uops) {
    Tensor out = Tensor::empty({n}), gout = poisoned({n});
    cpu::unary(op, out.f32(), a.f32(), n);
    cuda::unary(op, gout.f32(), dA.f32(), n);
    check_near(gout, out, 1e-7f, 2e-6f, "unary " + std::to_string((int)op));
  }
  for (float p : {0.f, 1.f, 2.f, 0.5f, -1.5f}) {
    Tensor dx = Tensor::empty({n}), gdx = poisoned({n});
    cpu::pow_backward(dx.f32(), dy.f32(), a.f32(), p, n);
    cuda::pow_backward(gdx.f32(), dev(dy).f32(), dA.f32(), p, n);
    check_near(gdx, dx, 1e-7f, 2e-6f, "pow_backward p=" + std::to_string(p));
  }
  // In place (out == a) is allowed for maps.
  Tensor ip = dev(a), ref = Tensor::empty({n});
  cpu::scalar(cpu::Scalar::Mul, ref.f32(), a.f32(), 3.f, n);
  cuda::scalar(cpu::Scalar::Mul, ip.f32(), ip.f32(), 3.f, n);
  same(ip, ref, "in place");
  // broadcast_to: [3, 1, 5] -> [2, 3, 4, 5]
  const Shape os = {2, 3, 4, 5};
  const std::vector<int64_t> st = {0, 5, 0, 1};
  Tensor src = uniform({3, 1, 5}, ++seed), bo = Tensor::empty(os), gbo = poisoned(os);
  cpu::broadcast_to(bo.f32(), src.f32(), 4, os.data(), st.data());
  cuda::broadcast_to(gbo.f32(), dev(src).f32(), 4, os.data(), st.data());
  same(gbo, bo, "broadcast_to");
}

TEST_CASE("cuda kernels: activations forward and backward against the CPU" * needs_device()) {
  const int64_t n = 20011;
  Tensor x = uniform({n}, 1500, -8.f, 8.f), dy = uniform({n}, 1501);
  Tensor dX = dev(x), dDY = dev(dy);
  using Fwd = void (*)(float*, const float*, int64_t);
  using Bwd = void (*)(float*, const float*, const float*, int64_t);
  struct Act {
    const char* name;
    Fwd cf, gf;
    Bwd cb, gb;
    bool bwd_from_y;  // backward takes the output (exp, tanh, sigmoid) rather than the input
  };
  const Act acts[] = {
      {"exp", cpu::exp_forward, cuda::exp_forward, cpu::exp_backward, cuda::exp_backward, true},
      {"tanh", cpu::tanh_forward, cuda::tanh_forward, cpu::tanh_backward, cuda::tanh_backward, true},
      {"sigmoid", cpu::sigmoid_forward, cuda::sigmoid_forward, cpu::sigmoid_backward, cuda::sigmoid_backward, true},
      {"relu", cpu::relu_forward, cuda::relu_forward, cpu::relu_backward, cuda::relu_backward, false},
      {"gelu_tanh", cpu::gelu_tanh_forward, cuda::gelu_tanh_forward, cpu::gelu_tanh_backward,
       cuda::gelu_tanh_backward, false},
      {"gelu_exact", cpu::gelu_exact_forward, cuda::gelu_exact_forward, cpu::gelu_exact_backward,
       cuda::gelu_exact_backward, false},
      {"silu", cpu::silu_forward, cuda::silu_forward, cpu::silu_backward, cuda::silu_backward, false},
  };
  for (const Act& a : acts) {
    Tensor y = Tensor::empty({n}), gy = poisoned({n});
    a.cf(y.f32(), x.f32(), n);
    a.gf(gy.f32(), dX.f32(), n);
    check_near(gy, y, 1e-6f, 1e-5f, std::string(a.name) + " forward");
    Tensor s = a.bwd_from_y ? y : x;
    Tensor dx = Tensor::empty({n}), gdx = poisoned({n});
    a.cb(dx.f32(), dy.f32(), s.f32(), n);
    a.gb(gdx.f32(), dDY.f32(), dev(s).f32(), n);
    check_near(gdx, dx, 1e-6f, 1e-5f, std::string(a.name) + " backward");
  }
}

TEST_CASE("cuda kernels: sums, sum_to, max and arg-max against the CPU" * needs_device()) {
  uint64_t seed = 1600;
  for (int64_t n : {0, 1, 8191, 8193, 100000}) {
    Tensor a = uniform({n}, ++seed, -1.f, 3.f);
    float out = 0;
    if (n > 0) cpu::sum_all(&out, a.f32(), n, 0.5f);
    Tensor g = poisoned({1});
    cuda::sum_all(g.f32(), dev(a).f32(), n, 0.5f);
    check_near(g, std::vector<double>{out}, 1e-6f, 1e-6f, "sum_all n=" + std::to_string(n));
  }
  struct ORI {
    int64_t O, R, I;
  };
  const ORI cases[] = {{1, 1000, 1}, {7, 33, 1}, {300, 2000, 1}, {3, 1, 5}, {1, 5000, 768}, {4, 300, 9}, {2, 0, 3},
                       {5, 7, 1}, {1, 70000, 3}};
  for (const ORI& c : cases) {
    const std::string what = "O=" + std::to_string(c.O) + " R=" + std::to_string(c.R) + " I=" + std::to_string(c.I);
    Tensor a = uniform({c.O, c.R, c.I}, ++seed, -1.f, 3.f);
    Tensor out = Tensor::empty({c.O, c.I}), gout = poisoned({c.O, c.I});
    cpu::sum_axis(out.f32(), a.f32(), c.O, c.R, c.I, 2.f);
    Tensor dA = dev(a);
    cuda::sum_axis(gout.f32(), dA.f32(), c.O, c.R, c.I, 2.f);
    check_near(gout, out, 1e-5f, 1e-6f, "sum_axis " + what);
    if (c.R == 0) continue;
    Tensor mv = Tensor::empty({c.O, c.I}), mi = Tensor::empty({c.O, c.I}, DType::I32);
    // Ties and NaN: quantised values, one NaN.
    float* ap = a.f32();
    for (int64_t i = 0; i < a.numel(); ++i) ap[i] = std::floor(ap[i] * 2.f);
    if (a.numel() > 10) ap[a.numel() / 2] = NAN;
    dA = dev(a);
    cpu::max_axis(mv.f32(), mi.i32(), a.f32(), c.O, c.R, c.I);
    Tensor gmv = poisoned({c.O, c.I}), gmi = poisoned({c.O, c.I}, DType::I32);
    cuda::max_axis(gmv.f32(), gmi.i32(), dA.f32(), c.O, c.R, c.I);
    same(gmv, mv, "max_axis values " + what);
    same_i32(gmi, mi, "max_axis indices " + what);
    Tensor dy = uniform({c.O, c.I}, ++seed), dx = Tensor::empty({c.O, c.R, c.I}), gdx = poisoned({c.O, c.R, c.I});
    cpu::max_axis_backward(dx.f32(), dy.f32(), mi.i32(), c.O, c.R, c.I);
    cuda::max_axis_backward(gdx.f32(), dev(dy).f32(), gmi.i32(), c.O, c.R, c.I);
    same(gdx, dx, "max_axis_backward " + what);
    float v = 0;
    int64_t at = 0;
    cpu::max_all(&v, &at, a.f32(), a.numel());
    Tensor gv = poisoned({1}), gat = poisoned({2}, DType::I32);
    cuda::max_all(gv.f32(), (int64_t*)gat.raw(), dA.f32(), a.numel());
    same(gv, Tensor::from_vector(std::vector<float>{v}, {1}), "max_all value " + what);
    CHECK(read_i64(gat, 1)[0] == at);
  }
  // sum_to over several reduced groups: [3, 4, 5, 6] -> [1, 4, 1, 6], -> [3, 1, 1, 1], -> [1, 1, 1, 1], identity.
  const Shape as = {3, 4, 5, 6};
  const Shape tos[] = {{1, 4, 1, 6}, {3, 1, 1, 1}, {1, 1, 1, 1}, {3, 4, 5, 6}, {1, 4, 5, 1}};
  Tensor a = uniform(as, ++seed);
  for (const Shape& to : tos) {
    Tensor out = Tensor::empty(to), gout = poisoned(to);
    cpu::sum_to(out.f32(), a.f32(), 4, as.data(), to.data());
    cuda::sum_to(gout.f32(), dev(a).f32(), 4, as.data(), to.data());
    check_near(gout, out, 1e-6f, 1e-6f, "sum_to " + shape_str(to));
  }
}

// ---------------------------------------------------------------- kernels: cuBLAS products

TEST_CASE("cuda kernels: gemm, strided-batched gemm and segment gemms against the CPU" * needs_device()) {
  uint64_t seed = 1700;
  struct MNK {
    int64_t M, N, K;
  };
  const MNK sizes[] = {{1, 1, 1}, {7, 5, 3}, {64, 48, 80}, {130, 67, 257}, {5, 3, 0}};
  for (const MNK& s : sizes)
    for (int ta = 0; ta < 2; ++ta)
      for (int tb = 0; tb < 2; ++tb)
        for (float beta : {0.f, 1.f, 0.5f}) {
          const int64_t M = s.M, N = s.N, K = s.K;
          const std::string what = "M=" + std::to_string(M) + " N=" + std::to_string(N) + " K=" + std::to_string(K) +
                                   " ta=" + std::to_string(ta) + " tb=" + std::to_string(tb) +
                                   " beta=" + std::to_string(beta);
          // Padded leading dimensions: sub-matrices of wider buffers.
          const int64_t lda = (ta ? M : K) + 3, ldb = (tb ? K : N) + 2, ldc = N + 5;
          Tensor A = uniform({ta ? K : M, lda}, ++seed), B = uniform({tb ? N : K, ldb}, ++seed);
          Tensor C = uniform({M, ldc}, ++seed);
          Tensor gC = dev(C);
          if (beta == 0.f) gC.fill_(NAN);  // beta = 0 must not read C
          cpu::gemm(C.f32(), ldc, A.f32(), lda, B.f32(), ldb, M, N, K, ta, tb, 0.75f, beta);
          cuda::gemm(gC.f32(), ldc, dev(A).f32(), lda, dev(B).f32(), ldb, M, N, K, ta, tb, 0.75f, beta);
          // Only the [M, N] block is defined output; the padding keeps its old contents on both sides (except
          // for the NaN fill): compare the block.
          check_near(gC.slice(1, 0, N), C.slice(1, 0, N), 1e-5f, 1e-4f, what);
        }
  // Strided batched, with a shared (stride 0) operand.
  {
    const int64_t batch = 5, M = 33, N = 20, K = 17;
    Tensor A = uniform({batch, M, K}, ++seed), B = uniform({K, N}, ++seed), C = Tensor::empty({batch, M, N});
    cpu::gemm_strided_batched(C.f32(), N, M * N, A.f32(), K, M * K, B.f32(), N, 0, batch, M, N, K, false, false);
    Tensor gC = poisoned({batch, M, N});
    cuda::gemm_strided_batched(gC.f32(), N, M * N, dev(A).f32(), K, M * K, dev(B).f32(), N, 0, batch, M, N, K, false,
                               false);
    check_near(gC, C, 1e-5f, 1e-4f, "strided batched");
    // q k^T as attention does: [B, T, D] x [B, T, D]^T.
    Tensor q = uniform({batch, M, K}, ++seed), k = uniform({batch, N, K}, ++seed), S = Tensor::empty({batch, M, N});
    cpu::gemm_strided_batched(S.f32(), N, M * N, q.f32(), K, M * K, k.f32(), K, N * K, batch, M, N, K, false, true,
                              0.25f);
    Tensor gS = poisoned({batch, M, N});
    cuda::gemm_strided_batched(gS.f32(), N, M * N, dev(q).f32(), K, M * K, dev(k).f32(), K, N * K, batch, M, N, K,
                               false, true, 0.25f);
    check_near(gS, S, 1e-5f, 1e-4f, "strided batched q k^T");
  }
  // Per-expert segments: 4 experts with 10, 0, 7, 25 rows; W_g [K, N] (or [N, K] transposed).
  {
    const int64_t G = 4, K = 24, N = 40;
    const std::vector<int64_t> off = {0, 10, 10, 17, 42};
    const int64_t Ap = off.back();
    for (int tb = 0; tb < 2; ++tb) {
      Tensor X = uniform({Ap, K}, ++seed), W = uniform({G, tb ? N : K, tb ? K : N}, ++seed);
      Tensor Y = Tensor::empty({Ap, N});
      for (int64_t g = 0; g < G; ++g) {
        const int64_t rows = off[(size_t)g + 1] - off[(size_t)g];
        if (rows)
          cpu::gemm(Y.f32() + off[(size_t)g] * N, N, X.f32() + off[(size_t)g] * K, K, W.f32() + g * K * N, tb ? K : N,
                    rows, N, K, false, tb);
      }
      Tensor gY = poisoned({Ap, N});
      cuda::gemm_segments(gY.f32(), N, dev(X).f32(), K, dev(W).f32(), tb ? K : N, K * N, off.data(), G, N, K, tb);
      check_near(gY, Y, 1e-5f, 1e-4f, "segments tb=" + std::to_string(tb));
    }
    // Weight gradient: dW_g [K, N] = X_g^T dY_g, accumulated (beta = 1) into an existing gradient.
    Tensor X = uniform({Ap, K}, ++seed), dY = uniform({Ap, N}, ++seed), dW = uniform({G, K, N}, ++seed);
    Tensor gdW = dev(dW);
    for (int64_t g = 0; g < G; ++g) {
      const int64_t rows = off[(size_t)g + 1] - off[(size_t)g];
      cpu::gemm(dW.f32() + g * K * N, N, X.f32() + off[(size_t)g] * K, K, dY.f32() + off[(size_t)g] * N, N, K, N, rows,
                true, false, 1.f, 1.f);
    }
    cuda::gemm_segments_wgrad(gdW.f32(), N, K * N, dev(X).f32(), K, dev(dY).f32(), N, off.data(), G, K, N, 1.f, 1.f);
    check_near(gdW, dW, 1e-5f, 1e-4f, "segments wgrad");
  }
  // TF32 and BF16 are opt-in and less precise: within their expected error, and FP32 is restored after.
  {
    const int64_t M = 128, N = 128, K = 512;
    Tensor A = uniform({M, K}, ++seed), B = uniform({K, N}, ++seed), C = Tensor::empty({M, N});
    cpu::gemm(C.f32(), N, A.f32(), K, B.f32(), N, M, N, K, false, false);
    for (auto p : {cuda::MatmulPrecision::TF32, cuda::MatmulPrecision::BF16}) {
      cuda::set_matmul_precision(p);
      Tensor gC = poisoned({M, N});
      cuda::gemm(gC.f32(), N, dev(A).f32(), K, dev(B).f32(), N, M, N, K, false, false);
      cuda::set_matmul_precision(cuda::MatmulPrecision::FP32);
      double num = 0, den = 0;
      std::vector<float> g = gC.to_f32_vector(), r = C.to_f32_vector();
      for (size_t i = 0; i < g.size(); ++i) {
        num += ((double)g[i] - r[i]) * ((double)g[i] - r[i]);
        den += (double)r[i] * r[i];
      }
      const double rel = std::sqrt(num / den);
      CAPTURE((int)p);
      CHECK(rel < (p == cuda::MatmulPrecision::TF32 ? 3e-3 : 2e-2));
    }
    CHECK(cuda::matmul_precision() == cuda::MatmulPrecision::FP32);
  }
}

// ---------------------------------------------------------------- kernels: indexing

TEST_CASE("cuda kernels: index family against the CPU" * needs_device()) {
  uint64_t seed = 1800;
  const int64_t O = 3, D = 7, I = 5, n = 11;
  std::vector<int32_t> iv = {0, 6, 3, 3, 1, 6, 6, 2, 0, 5, 4};  // repeated indices: additions in order matter
  Tensor index = i32s(iv, {n}), dIndex = dev(index);
  CHECK(cuda::index_first_bad(dIndex.i32(), n, D) == -1);
  std::vector<int32_t> badv = iv;
  badv[4] = 7;
  badv[9] = -1;
  CHECK(cuda::index_first_bad(dev(i32s(badv, {n})).i32(), n, D) == 4);
  // index_select / index_add
  Tensor a = uniform({O, D, I}, ++seed), out = Tensor::empty({O, n, I}), gout = poisoned({O, n, I});
  cpu::index_select(out.f32(), a.f32(), index.i32(), O, D, n, I);
  cuda::index_select(gout.f32(), dev(a).f32(), dIndex.i32(), O, D, n, I);
  same(gout, out, "index_select");
  Tensor src = uniform({O, n, I}, ++seed), acc = uniform({O, D, I}, ++seed), gacc = dev(acc);
  cpu::index_add(acc.f32(), src.f32(), index.i32(), O, D, n, I);
  cuda::index_add(gacc.f32(), dev(src).f32(), dIndex.i32(), O, D, n, I);
  same(gacc, acc, "index_add");
  // Long index lists take the sorted path: the CPU's bits for runs up to kRunChunk, the chunked order beyond.
  for (int64_t LO : {1, 2})
    for (int64_t LI : {3, 70}) {
      const int64_t LD = 37, Ln = 500;
      std::vector<float> u = uniform({Ln}, ++seed, 0.f, 1.f).to_f32_vector();
      std::vector<int32_t> lv((size_t)Ln);
      for (int64_t j = 0; j < Ln; ++j)
        lv[(size_t)j] = (int32_t)std::min<int64_t>(LD - 1, (int64_t)(u[(size_t)j] * u[(size_t)j] * LD));
      Tensor lidx = i32s(lv, {Ln}), lsrc = uniform({LO, Ln, LI}, ++seed), lacc = uniform({LO, LD, LI}, ++seed);
      Tensor glacc = dev(lacc);
      const std::vector<float> lacc0 = lacc.to_f32_vector();
      cpu::index_add(lacc.f32(), lsrc.f32(), lidx.i32(), LO, LD, Ln, LI);
      cuda::index_add(glacc.f32(), dev(lsrc).f32(), dev(lidx).i32(), LO, LD, Ln, LI);
      check_sorted_add(glacc, lacc.to_f32_vector(), lacc0, lsrc.to_f32_vector(), lv, LO, LD, Ln, LI,
                       "index_add, long index list, O=" + std::to_string(LO) + " I=" + std::to_string(LI));
    }
  // gather / scatter_add along the middle axis, index [O, m, I]
  const int64_t m = 9;
  std::vector<float> uv = uniform({O, m, I}, ++seed, 0.f, 1.f).to_f32_vector();
  std::vector<int32_t> gi((size_t)(O * m * I));
  for (size_t i = 0; i < gi.size(); ++i) gi[i] = (int32_t)std::min<int64_t>(D - 1, (int64_t)(uv[i] * D));
  Tensor gidx = i32s(gi, {O, m, I}), dG = dev(gidx);
  Tensor go = Tensor::empty({O, m, I}), ggo = poisoned({O, m, I});
  cpu::gather(go.f32(), a.f32(), gidx.i32(), O, D, m, I);
  cuda::gather(ggo.f32(), dev(a).f32(), dG.i32(), O, D, m, I);
  same(ggo, go, "gather");
  Tensor ssrc = uniform({O, m, I}, ++seed), sacc = uniform({O, D, I}, ++seed), gsacc = dev(sacc);
  cpu::scatter_add(sacc.f32(), ssrc.f32(), gidx.i32(), O, D, m, I);
  cuda::scatter_add(gsacc.f32(), dev(ssrc).f32(), dG.i32(), O, D, m, I);
  same(gsacc, sacc, "scatter_add");
  // concat / split pieces
  Tensor dst = uniform({O, 12, I}, ++seed), piece = uniform({O, 4, I}, ++seed), gdst = dev(dst);
  cpu::concat_piece(dst.f32(), piece.f32(), O, 12, 5, 4, I);
  cuda::concat_piece(gdst.f32(), dev(piece).f32(), O, 12, 5, 4, I);
  same(gdst, dst, "concat_piece");
  Tensor sp = Tensor::empty({O, 4, I}), gsp = poisoned({O, 4, I});
  cpu::split_piece(sp.f32(), dst.f32(), O, 12, 7, 4, I);
  cuda::split_piece(gsp.f32(), gdst.f32(), O, 12, 7, 4, I);
  same(gsp, sp, "split_piece");
  // i32 variants
  Tensor ai = i32s(std::vector<int32_t>((size_t)(O * D * I), 0), {O, D, I});
  for (int64_t i = 0; i < ai.numel(); ++i) ai.i32()[i] = (int32_t)(i * 7 - 50);
  Tensor oi = Tensor::empty({O, n, I}, DType::I32), goi = poisoned({O, n, I}, DType::I32);
  cpu::index_select(oi.i32(), ai.i32(), index.i32(), O, D, n, I);
  cuda::index_select(goi.i32(), dev(ai).i32(), dIndex.i32(), O, D, n, I);
  same_i32(goi, oi, "index_select i32");
  Tensor gi2 = Tensor::empty({O, m, I}, DType::I32), ggi2 = poisoned({O, m, I}, DType::I32);
  cpu::gather(gi2.i32(), ai.i32(), gidx.i32(), O, D, m, I);
  cuda::gather(ggi2.i32(), dev(ai).i32(), dG.i32(), O, D, m, I);
  same_i32(ggi2, gi2, "gather i32");
  // where / masked_fill with broadcast operands: out [4, 3, 5], mask [4, 1, 5], a [3, 5], b a scalar.
  const Shape os = {4, 3, 5};
  std::vector<int32_t> mv(20);
  for (int i = 0; i < 20; ++i) mv[(size_t)i] = (i * 7) % 3 == 0;
  Tensor mask = i32s(mv, {4, 1, 5}), wa = uniform({3, 5}, ++seed), wb = uniform({1}, ++seed);
  const std::vector<int64_t> ms = {5, 0, 1}, as = {0, 5, 1}, bs = {0, 0, 0};
  Tensor wo = Tensor::empty(os), gwo = poisoned(os);
  cpu::where(wo.f32(), mask.i32(), wa.f32(), wb.f32(), 3, os.data(), ms.data(), as.data(), bs.data());
  cuda::where(gwo.f32(), dev(mask).i32(), dev(wa).f32(), dev(wb).f32(), 3, os.data(), ms.data(), as.data(), bs.data());
  same(gwo, wo, "where");
  Tensor fa = uniform(os, ++seed), fo = Tensor::empty(os), gfo = poisoned(os);
  cpu::masked_fill(fo.f32(), fa.f32(), mask.i32(), -INFINITY, 3, os.data(), ms.data());
  cuda::masked_fill(gfo.f32(), dev(fa).f32(), dev(mask).i32(), -INFINITY, 3, os.data(), ms.data());
  same(gfo, fo, "masked_fill");
}

// ---------------------------------------------------------------- kernels: edge sizes

TEST_CASE("cuda kernels: empty problems launch nothing and write what the contract says" * needs_device()) {
  // A grid of zero blocks is a launch error (cudaErrorInvalidConfiguration). Every launcher must return early on
  // an empty problem, or write what the contract gives for one (sums of nothing, scaled outputs), and the stream
  // must stay free of errors. Null pointers stand for buffers of zero elements.
  float* nf = nullptr;
  int32_t* ni = nullptr;
  const int64_t sh0[2] = {0, 3}, st0[2] = {3, 1};
  // copies and elementwise
  cuda::strided_copy(nf, st0, nf, st0, sh0, 2, 4);
  cuda::f32_to_i32(ni, nf, 0);
  cuda::i32_to_f32(nf, ni, 0);
  cuda::fill32(nf, 0u, 0);
  for (cpu::Binary op : {cpu::Binary::Add, cpu::Binary::Div}) {
    cuda::binary(op, nf, nf, nf, 0);
    cuda::binary(op, ni, ni, ni, 0);
    cuda::binary_rows(op, nf, nf, nf, 0, 7);
    cuda::binary_rows(op, nf, nf, nf, 3, 0);
    const int64_t shb[3] = {2, 0, 3}, sta[3] = {3, 3, 1}, stb[3] = {0, 0, 1};
    cuda::binary_strided(op, nf, nf, nf, 3, shb, sta, stb);
  }
  cuda::scalar(cpu::Scalar::Pow, nf, nf, 1.5f, 0);
  cuda::unary(cpu::Unary::Log, nf, nf, 0);
  cuda::pow_backward(nf, nf, nf, 2.f, 0);
  const int64_t stbc[2] = {0, 1};
  cuda::broadcast_to(nf, nf, 2, sh0, stbc);
  cuda::exp_forward(nf, nf, 0);
  cuda::gelu_exact_backward(nf, nf, nf, 0);
  cuda::dropout_forward(nf, nf, 0, 0.5f, 1, 2);
  // row kernels: no rows, or rows of no columns
  cuda::softmax_forward(nf, nf, 0, 5);
  cuda::softmax_backward(nf, nf, nf, 4, 0);
  cuda::log_softmax_forward(nf, nf, 4, 0);
  cuda::log_softmax_backward(nf, nf, nf, 0, 2000);
  cuda::causal_softmax_forward(nf, nf, 0.5f, 0, 4);
  cuda::causal_softmax_backward(nf, nf, nf, 0.5f, 3, 0);
  cuda::topk_forward(nf, ni, nf, 0, 5, 2);
  cuda::topk_forward(nf, ni, nf, 3, 0, 0);
  cuda::topk_backward(nf, nf, ni, 0, 5, 2);
  cuda::softmax_topk_forward(nf, nf, ni, nf, 0, 5, 2);
  cuda::softmax_topk_forward(nf, nf, ni, nf, 0, 20, 12);
  cuda::softmax_topk_backward(nf, nf, nf, ni, nf, 0, 5, 2);
  cuda::cross_entropy_forward(nf, nf, nf, ni, 0, 10, -100);
  cuda::cross_entropy_backward(nf, nf, nf, ni, 1.f, 0, 10, -100);
  cuda::embedding_forward(nf, nf, ni, 0, 10, 8);
  cuda::embedding_backward(nf, nf, ni, 0, 10, 8);
  cuda::layernorm_forward(nf, nf, nf, nf, nf, nf, 0, 8, 1e-5f);
  cuda::rmsnorm_forward(nf, nf, nf, nf, 0, 8, 1e-5f);
  // Norm backward over no rows: the parameter gradients are sums of nothing, written as 0.
  Tensor dw = poisoned({8}), db = poisoned({8}), rdw = poisoned({8});
  cuda::layernorm_backward(nf, dw.f32(), db.f32(), nf, nf, nf, nf, nf, 0, 8);
  cuda::rmsnorm_backward(nf, rdw.f32(), nf, nf, nf, nf, 0, 8);
  CHECK(dw.to_f32_vector() == std::vector<float>(8, 0.f));
  CHECK(db.to_f32_vector() == std::vector<float>(8, 0.f));
  CHECK(rdw.to_f32_vector() == std::vector<float>(8, 0.f));
  // Router losses over no rows: 0, never NaN.
  Tensor zl = poisoned({1});
  cuda::z_loss_forward(zl.f32(), nf, nf, 0, 4, 0.1f);
  cuda::z_loss_backward(nf, zl.f32(), nf, nf, 0, 4, 0.1f);
  CHECK(zl.item() == 0.f);
  Tensor ll = poisoned({1}), fr = poisoned({2, 4}), mp = poisoned({2, 4}), tk = poisoned({2});
  Tensor grp = poisoned({1}, DType::I32);  // two groups need a group array, even of no rows
  cuda::load_balance_forward(ll.f32(), fr.f32(), mp.f32(), tk.f32(), nf, ni, grp.i32(), nullptr, 0, 4, 1, 2, 0.1f);
  cuda::load_balance_backward(nf, ll.f32(), fr.f32(), tk.f32(), grp.i32(), nullptr, 0, 4, 2, 0.1f);
  CHECK(ll.item() == 0.f);
  CHECK(fr.to_f32_vector() == std::vector<float>(8, 0.f));
  CHECK(mp.to_f32_vector() == std::vector<float>(8, 0.f));
  CHECK(tk.to_f32_vector() == std::vector<float>(2, 0.f));
  // MoE dispatch of no assignments: zero counts, offsets all 0.
  Tensor cnt = poisoned({2 * 4}, DType::I32), off = poisoned({2 * 5}, DType::I32);
  CHECK(cuda::dispatch_plan((int64_t*)cnt.raw(), (int64_t*)off.raw(), ni, ni, ni, 0, 4) == 0);
  CHECK(read_i64(cnt, 4) == std::vector<int64_t>(4, 0));
  CHECK(read_i64(off, 5) == std::vector<int64_t>(5, 0));
  CHECK(cuda::dispatch_histogram((int64_t*)cnt.raw(), ni, 0, 4) == 0);
  cuda::dispatch_scatter(ni, ni, ni, (const int64_t*)off.raw(), 0, 4);
  cuda::dispatch_permute(nf, nf, ni, 0, 2, 8);
  cuda::dispatch_permute_backward(nf, nf, ni, 0, 2, 8);
  cuda::dispatch_combine(nf, nf, nf, ni, 0, 2, 8);
  cuda::dispatch_combine_backward(nf, nf, nf, nf, nf, ni, ni, 0, 0, 2, 8);
  cuda::detail::stable_sort_pairs(ni, ni, ni, nullptr, 0, 8);
  // Reductions: sums of nothing are 0 (times scale), max over no rows writes nothing.
  Tensor s0 = poisoned({1}), s3 = poisoned({3}), s23 = poisoned({2, 3});
  cuda::sum_all(s0.f32(), nf, 0, 2.f);
  CHECK(s0.item() == 0.f);
  cuda::sum_axis(nf, nf, 0, 5, 3, 1.f);
  cuda::sum_axis(s3.f32(), nf, 3, 0, 1, 1.f);
  CHECK(s3.to_f32_vector() == std::vector<float>(3, 0.f));
  cuda::sum_axis(s23.f32(), nf, 2, 0, 3, 1.f);
  CHECK(s23.to_f32_vector() == std::vector<float>(6, 0.f));
  s0 = poisoned({1});
  cuda::sum_axis(s0.f32(), nf, 1, 0, 1, 1.f);
  CHECK(s0.item() == 0.f);
  const int64_t ash[2] = {0, 3}, osh[2] = {1, 3};
  s3 = poisoned({3});
  cuda::sum_to(s3.f32(), nf, 2, ash, osh);
  CHECK(s3.to_f32_vector() == std::vector<float>(3, 0.f));
  cuda::max_axis(nf, ni, nf, 0, 3, 1);
  cuda::max_axis(nf, ni, nf, 2, 3, 0);
  cuda::max_axis_backward(nf, nf, ni, 0, 3, 4);
  // Products: empty C, an empty batch, and K == 0 (C = beta * C; beta == 0 writes zeros without reading C).
  cuda::gemm(nf, 4, nf, 4, nf, 4, 0, 4, 4, false, false);
  cuda::gemm(nf, 1, nf, 4, nf, 1, 3, 0, 4, false, false);
  cuda::gemm_strided_batched(nf, 4, 16, nf, 4, 16, nf, 4, 16, 0, 4, 4, 4, false, false);
  Tensor c0 = poisoned({3, 2});
  cuda::gemm(c0.f32(), 2, nf, 1, nf, 2, 3, 2, 0, false, false, 1.f, 0.f);
  CHECK(c0.to_f32_vector() == std::vector<float>(6, 0.f));
  const std::vector<int64_t> empty_segments = {0, 0, 0};
  cuda::gemm_segments(nf, 4, nf, 3, nf, 4, 12, empty_segments.data(), 2, 4, 3, false);
  Tensor wg = poisoned({2, 3, 4});
  cuda::gemm_segments_wgrad(wg.f32(), 4, 12, nf, 3, nf, 4, empty_segments.data(), 2, 3, 4, 1.f, 0.f);
  CHECK(wg.to_f32_vector() == std::vector<float>(24, 0.f));
  // Indexing
  CHECK(cuda::index_first_bad(ni, 0, 5) == -1);
  cuda::concat_piece(nf, nf, 0, 7, 2, 3, 4);
  cuda::split_piece(ni, ni, 3, 7, 2, 0, 4);
  cuda::index_select(nf, nf, ni, 3, 5, 0, 4);
  cuda::index_add(nf, nf, ni, 3, 5, 0, 4);
  cuda::gather(nf, nf, ni, 3, 5, 0, 4);
  cuda::scatter_add(nf, nf, ni, 0, 5, 2, 4);
  const int64_t shw[2] = {0, 2}, stw[2] = {2, 1};
  cuda::where(nf, ni, nf, nf, 2, shw, stw, stw, stw);
  cuda::masked_fill(nf, nf, ni, 1.f, 2, shw, stw);
  // AdamW with nothing to update
  cuda::adamw_step(nf, nf, nf, nf, 0, 1e-3f, 0.9f, 0.95f, 1e-8f, 0.1f, 1);
  const cuda::AdamWSlice none[2] = {{nf, nf, nf, nf, 0, 0.1f}, {nf, nf, nf, nf, 0, 0.f}};
  cuda::adamw_step_multi(none, 2, 1e-3f, 0.9f, 0.95f, 1e-8f, 1);
  cuda::adamw_step_multi(none, 0, 1e-3f, 0.9f, 0.95f, 1e-8f, 1);
  cuda::sync();
  CHECK(cudaGetLastError() == cudaSuccess);
}

TEST_CASE("cuda kernels: float4 paths fall back on data that is not 16-byte aligned" * needs_device()) {
  // Dispatch permute / permute backward / combine and embedding forward move float4s when C % 4 == 0 and the base
  // pointers are 16-byte aligned. Views at odd offsets are contiguous but not aligned: a float4 access there
  // faults (misaligned address), so the kernels must take their scalar path. Each side is shifted alone and both.
  uint64_t seed = 1900;
  const int64_t T = 45, K = 2, C = 12, N = 5, A = T * K, V = 30, Ne = 77;
  const RandomPlan plan = random_plan(A, N, ++seed);
  const int64_t Ap = plan.Ap;
  const Tensor &ro = plan.row_of, &ao = plan.assign_of;
  Tensor dRO = dev(ro), dAO = dev(ao);
  Tensor x = uniform({T, C}, ++seed), ye = uniform({Ap, C}, ++seed), dxe = uniform({Ap, C}, ++seed);
  Tensor gate = uniform({A}, ++seed, 0.f, 1.f), dG = dev(gate);
  Tensor xe = Tensor::empty({Ap, C}), dx = Tensor::empty({T, C}), out = Tensor::empty({T, C});
  cpu::dispatch_permute(xe.f32(), x.f32(), ao.i32(), Ap, K, C);
  cpu::dispatch_permute_backward(dx.f32(), dxe.f32(), ro.i32(), T, K, C);
  cpu::dispatch_combine(out.f32(), ye.f32(), gate.f32(), ro.i32(), T, K, C);
  std::vector<int32_t> idv((size_t)Ne);
  for (int64_t i = 0; i < Ne; ++i) idv[(size_t)i] = (int32_t)((i * 7) % V);
  Tensor ids = i32s(idv, {Ne}), w = uniform({V, C}, ++seed), emb = Tensor::empty({Ne, C});
  cpu::embedding_forward(emb.f32(), w.f32(), ids.i32(), Ne, V, C);
  Tensor dIds = dev(ids);
  REQUIRE_FALSE(aligned16(dev_odd(x)));
  for (int odd_out = 0; odd_out < 2; ++odd_out)
    for (int odd_in = 0; odd_in < 2; ++odd_in) {
      if (!odd_out && !odd_in) continue;  // the aligned case is the dispatch and embedding tests above
      const std::string what = std::string(odd_out ? "odd output" : "aligned output") +
                               (odd_in ? ", odd input" : ", aligned input");
      auto in = [&](const Tensor& t) { return odd_in ? dev_odd(t) : dev(t); };
      auto fresh = [&](const Shape& s) { return odd_out ? poisoned_odd(s) : poisoned(s); };
      Tensor gxe = fresh({Ap, C}), gdx = fresh({T, C}), gout = fresh({T, C}), gemb = fresh({Ne, C});
      Tensor dX = in(x), dDXE = in(dxe), dYE = in(ye), dW = in(w);
      cuda::dispatch_permute(gxe.f32(), dX.f32(), dAO.i32(), Ap, K, C);
      cuda::dispatch_permute_backward(gdx.f32(), dDXE.f32(), dRO.i32(), T, K, C);
      cuda::dispatch_combine(gout.f32(), dYE.f32(), dG.f32(), dRO.i32(), T, K, C);
      cuda::embedding_forward(gemb.f32(), dW.f32(), dIds.i32(), Ne, V, C);
      same(gxe, xe, "permute, " + what);
      check_near(gdx, dx, 1e-6f, 1e-6f, "permute backward, " + what);
      check_near(gout, out, 1e-6f, 1e-5f, "combine, " + what);
      same(gemb, emb, "embedding, " + what);
    }
  cuda::sync();
  CHECK(cudaGetLastError() == cudaSuccess);
}

TEST_CASE("cuda kernels: sizes past the grid caps, where grid-stride loops take several turns" * needs_device()) {
  // Launchers cap their grids and the kernels loop over the rest: 65536 blocks for element loops (2^24 elements
  // per turn at 256 threads) and block-per-row kernels (65536 rows per turn), 65536 blocks of 4 warps for
  // warp-per-row kernels (262144 rows per turn), 65535 for binary_rows' rows, 4096 blocks for column sums.
  // Every case below is just past its cap, so the second turn and the tail both run. The emulator's caps are 256
  // times smaller (engine/cuda.h), and so are the sizes here.
  const int64_t cap = cuda::kGridCap, rows4 = 4 * cap;  // element loops, block rows; warp rows (4 per block)
  uint64_t seed = 2000;
  {
    const int64_t n = cap * 256 + 4099;
    Tensor a = uniform({n}, ++seed), b = uniform({n}, ++seed, 0.5f, 2.f), out = Tensor::empty({n});
    cpu::binary(cpu::Binary::Div, out.f32(), a.f32(), b.f32(), n);
    Tensor g = poisoned({n});
    cuda::binary(cpu::Binary::Div, g.f32(), dev(a).f32(), dev(b).f32(), n);
    same(g, out, "binary, n = cap * 256 + 4099");
    // A transpose just past cap * 256 elements (2^24 + 16387 on a GPU): the strided copy kernel.
    Tensor m = cuda::emulated() ? uniform({259, 257}, ++seed) : uniform({4099, 4097}, ++seed);
    REQUIRE(m.numel() > cap * 256);
    same(dev(m).transpose(0, 1).contiguous(), m.transpose(0, 1).contiguous(), "transpose, just past cap * 256");
  }
  {
    const int64_t R = cuda::kGridCapY + 10, C = 7;
    Tensor a = uniform({R, C}, ++seed), row = uniform({C}, ++seed), out = Tensor::empty({R, C});
    cpu::binary_rows(cpu::Binary::Mul, out.f32(), a.f32(), row.f32(), R, C);
    Tensor g = poisoned({R, C});
    cuda::binary_rows(cpu::Binary::Mul, g.f32(), dev(a).f32(), dev(row).f32(), R, C);
    same(g, out, "binary_rows, R = kGridCapY + 10");
  }
  {
    const int64_t N = rows4 + 37, C = 3;  // a warp per row
    Tensor x = uniform({N, C}, ++seed, -4.f, 4.f), y = Tensor::empty({N, C});
    cpu::softmax_forward(y.f32(), x.f32(), N, C);
    Tensor g = poisoned({N, C});
    cuda::softmax_forward(g.f32(), dev(x).f32(), N, C);
    check_near(g, y, 1e-7f, 1e-5f, "softmax, warp rows, N = 4 cap + 37");
  }
  {
    const int64_t N = cap + 3, V = 1025;  // a block per row
    Tensor x = uniform({N, V}, ++seed, -5.f, 5.f);
    std::vector<int32_t> tv((size_t)N);
    for (int64_t i = 0; i < N; ++i) tv[(size_t)i] = (int32_t)((i * 131) % V);
    Tensor t = i32s(tv, {N}), losses = Tensor::empty({N}), lse = Tensor::empty({N});
    cpu::cross_entropy_forward(losses.f32(), lse.f32(), x.f32(), t.i32(), N, V, -100);
    Tensor gl = poisoned({N}), glse = poisoned({N});
    cuda::cross_entropy_forward(gl.f32(), glse.f32(), dev(x).f32(), dev(t).i32(), N, V, -100);
    check_near(gl, losses, 1e-5f, 1e-5f, "cross-entropy, block rows, N = cap + 3");
    check_near(glse, lse, 1e-5f, 1e-5f, "cross-entropy lse, block rows, N = cap + 3");
  }
  {
    const int64_t R = rows4 + 5, n = 8, k = 3;
    Tensor x = distinct_rows(R, n, ++seed, -1.f, 0.25f);
    Tensor v = Tensor::empty({R, k}), ix = Tensor::empty({R, k}, DType::I32);
    cpu::topk_forward(v.f32(), ix.i32(), x.f32(), R, n, k);
    Tensor gv = poisoned({R, k}), gi = poisoned({R, k}, DType::I32);
    cuda::topk_forward(gv.f32(), gi.i32(), dev(x).f32(), R, n, k);
    same_i32(gi, ix, "top-k indices, R = 4 cap + 5");
    same(gv, v, "top-k values, R = 4 cap + 5");
  }
  {
    const int64_t T = rows4 + 5, K = 1, C = 4, N = 3;  // combine: a warp per token, float4 rows
    std::vector<int32_t> ev((size_t)T);
    for (int64_t a = 0; a < T; ++a) ev[(size_t)a] = a % 5 == 4 ? -1 : (int32_t)(a % N);
    std::vector<int64_t> counts((size_t)N), offsets((size_t)N + 1);
    std::vector<int32_t> row_of((size_t)T), assign_of((size_t)T);
    cpu::dispatch_plan(counts.data(), offsets.data(), row_of.data(), assign_of.data(), ev.data(), T, N);
    const int64_t Ap = offsets[(size_t)N];
    Tensor ro = i32s(row_of, {T}), ye = uniform({Ap, C}, ++seed), gate = uniform({T}, ++seed, 0.f, 1.f);
    Tensor out = Tensor::empty({T, C}), gout = poisoned({T, C});
    cpu::dispatch_combine(out.f32(), ye.f32(), gate.f32(), ro.i32(), T, K, C);
    cuda::dispatch_combine(gout.f32(), dev(ye).f32(), dev(gate).f32(), dev(ro).i32(), T, K, C);
    check_near(gout, out, 1e-6f, 1e-5f, "combine, T = 4 cap + 5");
  }
  {
    const int64_t O = 1, R = 3, I = cuda::kColumnCap * 256 + 7;  // column sums: kColumnCap blocks of 256 columns
    Tensor a = uniform({O, R, I}, ++seed), out = Tensor::empty({O, I}), g = poisoned({O, I});
    cpu::sum_axis(out.f32(), a.f32(), O, R, I, 1.f);
    cuda::sum_axis(g.f32(), dev(a).f32(), O, R, I, 1.f);
    check_near(g, out, 1e-6f, 1e-6f, "sum_axis columns, I = kColumnCap * 256 + 7");
  }
}

TEST_CASE("cuda kernels: the radix sort is stable for any key width, with and without values" * needs_device()) {
  // stable_sort_pairs (kernels/cuda/sort.cuh) does one 8-bit pass per key byte through two ping-pong buffers.
  // Embedding and index_add use it with values = positions (vals_in == nullptr) and up to 3 passes; here also
  // 1 and 4 passes, and given values.
  uint64_t seed = 2100;
  for (int bits : {1, 8, 9, 17, 24, 31})
    for (int64_t n : {1, 1000, 70001}) {
      const std::string what = "bits=" + std::to_string(bits) + " n=" + std::to_string(n);
      std::vector<float> u = uniform({n}, ++seed, 0.f, 1.f).to_f32_vector();
      std::vector<int32_t> keys((size_t)n), vals((size_t)n);
      const int64_t range = int64_t(1) << bits;
      for (int64_t i = 0; i < n; ++i) {
        // Few distinct keys for small widths (long runs of equal keys: stability shows), the whole range else.
        keys[(size_t)i] = (int32_t)std::min<int64_t>(range - 1, (int64_t)((double)u[(size_t)i] * (double)range));
        vals[(size_t)i] = (int32_t)(n - i) * 3;
      }
      std::vector<int64_t> order((size_t)n);
      std::iota(order.begin(), order.end(), 0);
      std::stable_sort(order.begin(), order.end(),
                       [&](int64_t a, int64_t b) { return keys[(size_t)a] < keys[(size_t)b]; });
      std::vector<int32_t> rk((size_t)n), rv((size_t)n), rp((size_t)n);
      for (int64_t i = 0; i < n; ++i) {
        rk[(size_t)i] = keys[(size_t)order[(size_t)i]];
        rv[(size_t)i] = vals[(size_t)order[(size_t)i]];
        rp[(size_t)i] = (int32_t)order[(size_t)i];
      }
      Tensor dk = dev(i32s(keys, {n})), dv = dev(i32s(vals, {n}));
      Tensor ok = poisoned({n}, DType::I32), ov = poisoned({n}, DType::I32);
      cuda::detail::stable_sort_pairs(ok.i32(), ov.i32(), dk.i32(), dv.i32(), n, bits);
      same_i32(ok, i32s(rk, {n}), "keys, " + what);
      same_i32(ov, i32s(rv, {n}), "values, " + what);
      Tensor ok2 = poisoned({n}, DType::I32), op = poisoned({n}, DType::I32);
      cuda::detail::stable_sort_pairs(ok2.i32(), op.i32(), dk.i32(), nullptr, n, bits);
      same_i32(ok2, i32s(rk, {n}), "keys, positions, " + what);
      same_i32(op, i32s(rp, {n}), "positions, " + what);
    }
}

// ---------------------------------------------------------------- ops: every op on CUDA against the CPU

namespace {
// Runs fn on CPU inputs and on CUDA copies of them (leaves, requiring grad where the CPU input does), compares the
// outputs, then backpropagates the same random output gradient through both and compares every input gradient.
void op_parity(const std::string& name, const std::function<Tensor(const std::vector<Tensor>&)>& fn,
               const std::vector<Tensor>& in, float atol = 1e-5f, float rtol = 1e-4f) {
  CAPTURE(name);
  std::vector<Tensor> gin;
  for (const Tensor& t : in) {
    Tensor d = t.detach().to(Device::CUDA);
    if (t.requires_grad()) d.requires_grad_(true);
    gin.push_back(d);
  }
  Tensor yc = fn(in), yg = fn(gin);
  REQUIRE(yg.device() == Device::CUDA);
  REQUIRE(yg.shape() == yc.shape());
  REQUIRE(yg.dtype() == yc.dtype());
  if (yc.dtype() == DType::I32) {
    same_i32(yg, yc, name + " (values)");
    return;
  }
  check_near(yg, yc, atol, rtol, name + " (values)");
  if (!yc.requires_grad()) return;
  Tensor gy = uniform(yc.shape(), 4242);
  yc.backward(gy);
  yg.backward(gy.to(Device::CUDA));
  for (size_t i = 0; i < in.size(); ++i) {
    if (!in[i].requires_grad()) continue;
    REQUIRE(gin[i].grad().defined());
    CHECK(gin[i].grad().device() == Device::CUDA);
    check_near(gin[i].grad(), in[i].grad(), atol, rtol, name + " (gradient of input " + std::to_string(i) + ")");
  }
}
using cm::test::param;
}  // namespace

TEST_CASE("cuda ops: elementwise, activations, broadcasting, sum_to/expand" * needs_device()) {
  auto P = [](const Shape& s, uint64_t seed, float lo = -1.f, float hi = 1.f) { return param(s, seed, lo, hi); };
  using V = std::vector<Tensor>;
  op_parity("add bias", [](const V& x) { return add(x[0], x[1]); }, {P({4, 5, 6}, 1), P({6}, 2)});
  op_parity("sub broadcast", [](const V& x) { return sub(x[0], x[1]); }, {P({4, 1, 6}, 3), P({5, 1}, 4)});
  op_parity("mul same", [](const V& x) { return mul(x[0], x[1]); }, {P({7, 9}, 5), P({7, 9}, 6)});
  op_parity("div broadcast", [](const V& x) { return div(x[0], x[1]); }, {P({3, 4}, 7), P({3, 1}, 8, 0.5f, 2.f)});
  op_parity("scalar forms", [](const V& x) { return rdiv(2.f, add(mul(rsub(1.f, x[0]), 3.f), 5.f)); },
            {P({33}, 9)});
  op_parity("neg exp log sqrt square", [](const V& x) { return square(sqrt(log(exp(neg(x[0])) + 2.f))); },
            {P({5, 7}, 10)});
  op_parity("pow", [](const V& x) { return pow(x[0], 1.5f); }, {P({40}, 11, 0.2f, 2.f)});
  op_parity("tanh", [](const V& x) { return tanh(x[0]); }, {P({100}, 12, -3.f, 3.f)});
  op_parity("sigmoid", [](const V& x) { return sigmoid(x[0]); }, {P({100}, 13, -6.f, 6.f)});
  op_parity("relu", [](const V& x) { return relu(x[0]); }, {P({100}, 14)});
  op_parity("gelu tanh", [](const V& x) { return gelu(x[0]); }, {P({100}, 15, -4.f, 4.f)});
  op_parity("gelu exact", [](const V& x) { return gelu(x[0], GeluKind::Exact); }, {P({100}, 16, -4.f, 4.f)});
  op_parity("silu", [](const V& x) { return silu(x[0]); }, {P({100}, 17, -6.f, 6.f)});
  op_parity("sum_to", [](const V& x) { return sum_to(x[0], {4, 1}); }, {P({3, 4, 5}, 18)});
  op_parity("expand", [](const V& x) { return expand(x[0], {2, 3, 4}); }, {P({3, 1}, 19)});
  // i32 arithmetic on the device.
  Tensor ia = i32s({1, -2, 3, 4, 5, -6}, {2, 3}), ib = i32s({7, 8, -9}, {3});
  op_parity("i32 mul", [](const V& x) { return mul(x[0], x[1]); }, {ia, ib});
  // Mixed devices are refused by name.
  CHECK_THROWS_AS(add(uniform({2}, 1), uniform({2}, 2).to(Device::CUDA)), Error);
}

TEST_CASE("cuda ops: reductions, matrix products, views" * needs_device()) {
  auto P = [](const Shape& s, uint64_t seed) { return param(s, seed); };
  using V = std::vector<Tensor>;
  op_parity("sum", [](const V& x) { return sum(x[0]); }, {P({30, 40}, 1)});
  op_parity("mean axis", [](const V& x) { return mean(x[0], 1, true); }, {P({6, 50, 7}, 2)});
  op_parity("sum axis 0", [](const V& x) { return sum(x[0], 0); }, {P({300, 70}, 3)});
  op_parity("max", [](const V& x) { return max(x[0]); }, {P({9, 11}, 4)});
  op_parity("max axis", [](const V& x) { return max(x[0], -1); }, {P({9, 11}, 5)});
  op_parity("max axis 1 of 3", [](const V& x) { return max(x[0], 1, true); }, {P({4, 9, 6}, 6)});
  op_parity("argmax", [](const V& x) { return argmax(x[0], 0); }, {P({9, 11}, 7)});
  op_parity("matmul 2x2", [](const V& x) { return matmul(x[0], x[1]); }, {P({17, 9}, 8), P({9, 13}, 9)});
  op_parity("matmul ta tb", [](const V& x) { return matmul(x[0], x[1], true, true); },
            {P({9, 17}, 10), P({13, 9}, 11)});
  op_parity("matmul batched", [](const V& x) { return matmul(x[0], x[1], false, true); },
            {P({3, 8, 5}, 12), P({3, 6, 5}, 13)});
  op_parity("matmul rank 3 x 2", [](const V& x) { return matmul(x[0], x[1]); }, {P({2, 3, 8, 5}, 14), P({5, 4}, 15)});
  op_parity("matmul shared b, ta", [](const V& x) { return matmul(x[0], x[1], true); },
            {P({3, 5, 8}, 16), P({5, 4}, 17)});
  op_parity("linear with bias", [](const V& x) { return linear(x[0], x[1], x[2]); },
            {P({2, 7, 16}, 18), P({12, 16}, 19), P({12}, 20)});
  op_parity("linear without bias", [](const V& x) { return linear(x[0], x[1]); }, {P({7, 16}, 21), P({12, 16}, 22)});
  op_parity("views", [](const V& x) { return x[0].transpose(0, 2).slice(1, 1, 4).reshape({-1}) * 2.f; },
            {P({3, 5, 4}, 23)});
}

TEST_CASE("cuda ops: neural-net ops (softmax, cross-entropy, embedding, norms, dropout, attention)" *
          needs_device()) {
  auto P = [](const Shape& s, uint64_t seed, float lo = -1.f, float hi = 1.f) { return param(s, seed, lo, hi); };
  using V = std::vector<Tensor>;
  op_parity("softmax", [](const V& x) { return softmax(x[0]); }, {P({5, 37}, 1, -3.f, 3.f)});
  op_parity("softmax long rows", [](const V& x) { return softmax(x[0]); }, {P({3, 3000}, 2, -3.f, 3.f)});
  op_parity("log_softmax", [](const V& x) { return log_softmax(x[0]); }, {P({5, 37}, 3, -3.f, 3.f)});
  Tensor targets = i32s({3, -100, 0, 36, 7}, {5});
  op_parity("cross_entropy", [](const V& x) { return cross_entropy(x[0], x[1]); }, {P({5, 37}, 4, -3.f, 3.f), targets});
  Tensor all_ignored = i32s({-100, -100}, {2});
  op_parity("cross_entropy, all ignored", [](const V& x) { return cross_entropy(x[0], x[1]); },
            {P({2, 37}, 5), all_ignored});
  Tensor ids = i32s({3, 1, 3, 0, 9, 3}, {2, 3});
  op_parity("embedding", [](const V& x) { return embedding(x[0], x[1]); }, {P({10, 8}, 6), ids});
  op_parity("router_z_loss", [](const V& x) { return router_z_loss(x[0], 0.3f); }, {P({40, 16}, 21, -3.f, 3.f)});
  {  // the load balance of a two-level router's second level: 3 parents, 4 children each, top-2, target shares
    std::vector<int32_t> sel, par;
    for (int32_t r = 0; r < 40; ++r) {
      sel.push_back(r % 4), sel.push_back((r % 4 + 1 + r / 4 % 3) % 4);  // two distinct children
      par.push_back(r % 7 == 3 ? -1 : r % 3);
    }
    Tensor sel_t = i32s(sel, {40, 2}), par_t = i32s(par, {40});
    // The level's logit bias: log reliabilities in [log 0.2, 0], one pruned child (-inf).
    Tensor shares = P({3, 4}, 23, -1.6f, 0.f).detach();
    shares.f32()[6] = -INFINITY;
    op_parity("router_balance_loss", [&](const V& x) { return router_balance_loss(x[0], x[1], x[2], 3, x[3], 0.1f); },
              {P({40, 4}, 22, 0.f, 1.f), sel_t, par_t, shares.detach()});
    op_parity("router_balance_loss flat", [&](const V& x) {
      return router_balance_loss(x[0], x[1], Tensor(), 1, Tensor(), 0.1f);
    }, {P({40, 4}, 24, 0.f, 1.f), sel_t});
    op_parity("router_balance_loss, an all-zero bias", [&](const V& x) {
      return router_balance_loss(x[0], x[1], x[2], 3, x[3], 0.1f);
    }, {P({40, 4}, 25, 0.f, 1.f), sel_t, par_t, Tensor::zeros({3, 4})});
  }
  op_parity("layernorm", [](const V& x) { return layernorm(x[0], x[1], x[2]); },
            {P({4, 6, 32}, 7, -2.f, 2.f), P({32}, 8, 0.5f, 1.5f), P({32}, 9)});
  op_parity("rmsnorm", [](const V& x) { return rmsnorm(x[0], x[1]); }, {P({24, 32}, 10, -2.f, 2.f), P({32}, 11)});
  op_parity("dropout (the same mask on both devices)", [](const V& x) {
    Generator g(99);
    return dropout(x[0], 0.3f, true, g);
  }, {P({1001}, 12)});
  op_parity("causal attention", [](const V& x) { return causal_attention(x[0], x[1], x[2]); },
            {P({2, 3, 17, 8}, 13), P({2, 3, 17, 8}, 14), P({2, 3, 17, 8}, 15)});
}

TEST_CASE("cuda ops: indexing (concat, split, index_select/add, gather/scatter_add, topk, where, masked_fill)" *
          needs_device()) {
  auto P = [](const Shape& s, uint64_t seed) { return param(s, seed); };
  using V = std::vector<Tensor>;
  op_parity("concat", [](const V& x) { return concat({x[0], x[1]}, 1); }, {P({3, 2, 4}, 1), P({3, 5, 4}, 2)});
  op_parity("split", [](const V& x) { return split(x[0], {1, 3, 2}, 1)[1] * 3.f; }, {P({4, 6}, 3)});
  Tensor ix = i32s({2, 0, 2, 4}, {4});
  op_parity("index_select", [](const V& x) { return index_select(x[0], 1, x[1]); }, {P({3, 5, 2}, 4), ix});
  op_parity("index_add", [](const V& x) { return index_add(x[0], 0, x[1], x[2]); }, {P({5, 3}, 5), ix, P({4, 3}, 6)});
  Tensor gi = i32s({0, 2, 1, 1, 0, 2}, {2, 3});
  op_parity("gather", [](const V& x) { return gather(x[0], 1, x[1]); }, {P({2, 3}, 7), gi});
  op_parity("scatter_add", [](const V& x) { return scatter_add(x[0], 1, x[1], x[2]); },
            {P({2, 3}, 8), gi, P({2, 3}, 9)});
  op_parity("topk values", [](const V& x) { return topk(x[0], 3).first; }, {P({6, 20}, 10)});
  op_parity("topk indices", [](const V& x) { return topk(x[0], 3).second; }, {P({6, 20}, 11)});
  Tensor mask = i32s({1, 0, 0, 1, 1, 0}, {2, 3});
  op_parity("where", [](const V& x) { return where(x[0], x[1], x[2]); }, {mask, P({2, 3}, 12), P({3}, 13)});
  op_parity("masked_fill", [](const V& x) { return masked_fill(x[0], x[1], -5.f); }, {P({2, 3}, 14), mask});
}

TEST_CASE("cuda ops: the kernels find bad indices without a wait; the next read-out names the op, index and bound" *
          needs_device()) {
  // engine/cuda.h: no op waits for an index check; a bad index is recorded on the device, never used, and the
  // first read-out after it throws. Each case: the op's launch counts no stream wait, the read-out throws with
  // the op, the index and its bound, and the record is clear afterwards (the next read-out is fine).
  Tensor a = dev(uniform({3, 4}, 1)), w = dev(uniform({10, 8}, 2)), logits = dev(uniform({2, 5}, 3));
  struct Case {
    const char* what;
    std::function<Tensor()> op;
    const char* message;
  };
  const std::vector<Case> cases = {
      {"index_select", [&] { return index_select(a, 1, dev(i32s({0, 4}, {2}))); },
       "index_select: index 4 (at position 1) is out of range [0, 4)"},
      {"index_add", [&] { return index_add(a, 0, dev(i32s({1, -1}, {2})), dev(uniform({2, 4}, 4))); },
       "index_add: index -1 (at position 1) is out of range [0, 3)"},
      {"index_add, sorted path", [&] {
         std::vector<int32_t> ix(100, 2);
         ix[57] = 3;
         return index_add(a, 0, dev(i32s(ix, {100})), dev(uniform({100, 4}, 5)));
       },
       "index_add: index 3 (at position 57) is out of range [0, 3)"},
      {"index_add, a bad index in a run of more than kRunChunk: its first position, whichever chunk records it", [&] {
         std::vector<int32_t> ix(40 + 3 * cuda::kRunChunk, 3);
         for (int i = 0; i < 40; ++i) ix[(size_t)i] = i % 3;
         return index_add(a, 0, dev(i32s(ix, {(int64_t)ix.size()})), dev(uniform({(int64_t)ix.size(), 4}, 5)));
       },
       "index_add: index 3 (at position 40) is out of range [0, 3)"},
      {"gather", [&] { return gather(a, 1, dev(i32s({0, 1, 7}, {3, 1}))); },  // index [3, 1]: a's other dims
       "gather: index 7 (at position 2) is out of range [0, 4)"},
      {"scatter_add", [&] { return scatter_add(a, 1, dev(i32s({5, 1, 0}, {3, 1})), dev(uniform({3, 1}, 6))); },
       "scatter_add: index 5 (at position 0) is out of range [0, 4)"},
      {"embedding", [&] { return embedding(w, dev(i32s({1, 10}, {2}))); },
       "embedding: id 10 (at position 1) is out of range [0, 10)"},
      {"cross_entropy", [&] { return cross_entropy(logits, dev(i32s({1, 6}, {2}))); },
       "cross_entropy: target 6 (at position 1) is out of range [0, 5)"},
  };
  for (const Case& c : cases) {
    CAPTURE(std::string(c.what));
    if (cuda::sync_each_launch()) {  // CM_CUDA_SYNC=1: the launch itself reports it
      CHECK_THROWS_WITH_AS(c.op(), doctest::Contains(c.message), Error);
      continue;
    }
    cuda::sync();
    const int64_t before = host_sync_stats().stream_syncs;
    Tensor out = c.op();
    CHECK(host_sync_stats().stream_syncs == before);  // the op itself never waited
    CHECK_THROWS_WITH_AS(out.to_f32_vector(), doctest::Contains(c.message), Error);
    CHECK_NOTHROW(out.to_f32_vector());  // reported once: the record was cleared
  }
  // A good index after a bad one is unaffected, and check_index_errors() reports without a read-out.
  if (!cuda::sync_each_launch()) {
    Tensor bad = index_select(a, 1, dev(i32s({9}, {1})));
    CHECK_THROWS_WITH_AS(cuda::check_index_errors(), doctest::Contains("index_select: index 9"), Error);
  }
  CHECK_NOTHROW(cuda::check_index_errors());
  CHECK(index_select(a, 1, dev(i32s({3}, {1}))).to_f32_vector() == index_select(uniform({3, 4}, 1), 1,
                                                                                 i32s({3}, {1})).to_f32_vector());
}

TEST_CASE("cuda kernels: cross_entropy_inv_valid counts the valid targets as the CPU twin does" * needs_device()) {
  for (int64_t N : {0, 1, 37, 5000}) {
    std::vector<int32_t> t((size_t)N);
    for (int64_t n = 0; n < N; ++n) t[n] = n % 7 == 3 ? -100 : (int32_t)((n * 13) % 11);
    Tensor ht = i32s(t, {N}), inv = Tensor::empty({1}), dinv = Tensor::empty({1}, DType::F32, Device::CUDA);
    cpu::cross_entropy_inv_valid(inv.f32(), ht.i32(), N, 11, -100);
    cuda::cross_entropy_inv_valid(dinv.f32(), dev(ht).i32(), N, 11, -100);
    CHECK(dinv.item() == inv.f32()[0]);
  }
}

TEST_CASE("cuda ops: empty tensors (zero rows, zero inner size) give the CPU's values and gradients" *
          needs_device()) {
  // Zero-size launches are errors on the device; every op must skip them and still produce what the CPU does:
  // empty outputs, and parameter gradients that are sums over no rows (zeros).
  auto P = [](const Shape& s, uint64_t seed) { return param(s, seed); };
  using V = std::vector<Tensor>;
  const Tensor no_ids = i32s(std::vector<int32_t>{}, {0});
  op_parity("softmax of [0, 7]", [](const V& x) { return softmax(x[0]); }, {P({0, 7}, 1)});
  op_parity("log_softmax of [4, 0]", [](const V& x) { return log_softmax(x[0]); }, {P({4, 0}, 2)});
  op_parity("sum of [0, 3]", [](const V& x) { return sum(x[0]); }, {P({0, 3}, 3)});
  op_parity("sum over an empty axis", [](const V& x) { return sum(x[0], 0); }, {P({0, 3}, 4)});
  op_parity("linear of no rows", [](const V& x) { return linear(x[0], x[1], x[2]); },
            {P({0, 16}, 5), P({12, 16}, 6), P({12}, 7)});
  op_parity("matmul with inner size 0", [](const V& x) { return matmul(x[0], x[1]); }, {P({3, 0}, 8), P({0, 4}, 9)});
  op_parity("layernorm of no rows", [](const V& x) { return layernorm(x[0], x[1], x[2]); },
            {P({0, 8}, 10), P({8}, 11), P({8}, 12)});
  op_parity("rmsnorm of no rows", [](const V& x) { return rmsnorm(x[0], x[1]); }, {P({0, 8}, 13), P({8}, 14)});
  op_parity("cross_entropy of no rows", [](const V& x) { return cross_entropy(x[0], x[1]); }, {P({0, 5}, 15), no_ids});
  op_parity("embedding of no ids", [](const V& x) { return embedding(x[0], x[1]); }, {P({10, 8}, 16), no_ids});
  op_parity("max over rows of [0, 5]", [](const V& x) { return max(x[0], 1); }, {P({0, 5}, 17)});
  op_parity("topk of [0, 6]", [](const V& x) { return topk(x[0], 2).first; }, {P({0, 6}, 18)});
  op_parity("index_select of no indices", [](const V& x) { return index_select(x[0], 0, x[1]); },
            {P({5, 3}, 19), no_ids});
  // The mean of nothing is NaN on both devices (0 * 1/0).
  CHECK(std::isnan(mean(Tensor::zeros({0}, DType::F32, Device::CUDA)).item()));
}

TEST_CASE("cuda ops: inputs that are views at odd element offsets (data not 16-byte aligned)" * needs_device()) {
  // slice(0, 1, ...) of a flat tensor, then view(): contiguous, so the ops pass the pointer straight to the
  // kernels, but 4 bytes past an aligned block. Vectorised kernels must notice; cuBLAS takes any alignment.
  auto P = [](const Shape& s, uint64_t seed) { return param(s, seed); };
  using V = std::vector<Tensor>;
  auto odd = [](const Tensor& flat, const Shape& s) { return flat.slice(0, 1, 1 + shape_numel(s)).view(s); };
  Tensor ids = i32s({3, 1, 3, 0, 9, 3}, {2, 3});
  op_parity("embedding, weight at an odd offset", [odd](const V& x) { return embedding(odd(x[0], {10, 8}), x[1]); },
            {P({81}, 1), ids});
  op_parity("linear, input at an odd offset", [odd](const V& x) { return linear(odd(x[0], {7, 16}), x[1], x[2]); },
            {P({113}, 2), P({12, 16}, 3), P({12}, 4)});
  op_parity("matmul, both at odd offsets",
            [odd](const V& x) { return matmul(odd(x[0], {2, 9, 8}), odd(x[1], {2, 8, 5}), false, false); },
            {P({145}, 5), P({81}, 6)});
  op_parity("layernorm at an odd offset", [odd](const V& x) { return layernorm(odd(x[0], {6, 32}), x[1], x[2]); },
            {P({193}, 7), P({32}, 8), P({32}, 9)});
  op_parity("softmax at an odd offset", [odd](const V& x) { return softmax(odd(x[0], {5, 36})); }, {P({181}, 10)});
}

TEST_CASE("cuda: a small training run matches the CPU step for step, with no cudaMalloc once warm" *
          needs_device()) {
  // Two-layer MLP, cross-entropy, plain SGD; the same run on both devices.
  auto run = [](Device dev, int64_t* mallocs_warm, int64_t* mallocs_end) {
    Tensor w1 = uniform({32, 16}, 1, -0.3f, 0.3f).to(dev), w2 = uniform({10, 32}, 2, -0.3f, 0.3f).to(dev);
    w1.requires_grad_(true);
    w2.requires_grad_(true);
    Tensor x = uniform({64, 16}, 3).to(dev);
    std::vector<int32_t> tv(64);
    for (int i = 0; i < 64; ++i) tv[(size_t)i] = i % 10;
    Tensor t = i32s(tv, {64}).to(dev);
    std::vector<float> losses;
    for (int step = 0; step < 6; ++step) {
      if (step == 2 && mallocs_warm) *mallocs_warm = cuda::mem_stats().mallocs;
      w1.zero_grad();
      w2.zero_grad();
      Tensor loss = cross_entropy(linear(relu(linear(x, w1)), w2), t);
      loss.backward();
      {
        NoGrad ng;
        for (Tensor w : {w1, w2}) w.copy_(sub(w.detach(), mul(w.grad(), 0.2f)));
      }
      losses.push_back(loss.item());
    }
    if (mallocs_end) *mallocs_end = cuda::mem_stats().mallocs;
    return losses;
  };
  std::vector<float> ref = run(Device::CPU, nullptr, nullptr);
  int64_t warm = 0, end = 0;
  std::vector<float> got = run(Device::CUDA, &warm, &end);
  CHECK_CLOSE(Tensor::from_vector(got, {6}), ref, 1e-5f, 1e-4f);
  CHECK(ref.back() < ref.front());
  CHECK(end == warm);
}

#endif  // CM_CUDA

// The skipped count is complete before any case runs (static initialisation).
TEST_CASE("cuda: backend status") {
  CHECK_NOTHROW(cuda_available());
#if CM_CUDA
  if (!cuda_available()) {
    MESSAGE("CUDA: no device, " << test::cuda_skipped << " CUDA checks skipped");
    CHECK(test::cuda_skipped > 0);
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
