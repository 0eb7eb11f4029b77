// Tensor: creation, views, copies, RNG, printing, error messages.
#include "helpers.h"
#include "engine/host_sync.h"
#include "engine/ring.h"
#include "model/optim.h"

using namespace cm;
using cm::test::uniform;

TEST_SUITE("tensor") {

TEST_CASE("creation: zeros, ones, full, arange, from_vector") {
  Tensor z = Tensor::zeros({2, 3});
  CHECK(z.shape() == Shape{2, 3});
  CHECK(z.numel() == 6);
  CHECK(z.is_contiguous());
  for (float v : z.to_f32_vector()) CHECK(v == 0.f);
  for (float v : Tensor::ones({4}).to_f32_vector()) CHECK(v == 1.f);
  for (float v : Tensor::full({3, 1}, 2.5f).to_f32_vector()) CHECK(v == 2.5f);
  CHECK(Tensor::arange(5).to_f32_vector() == std::vector<float>{0, 1, 2, 3, 4});
  CHECK(Tensor::arange(3, DType::I32).to_i32_vector() == std::vector<int32_t>{0, 1, 2});
  Tensor v = Tensor::from_vector(std::vector<float>{1, 2, 3, 4, 5, 6}, {3, 2});
  CHECK(v.size(0) == 3);
  CHECK(v.size(-1) == 2);
  CHECK(Tensor::scalar(3.f).dim() == 0);
  CHECK(Tensor::scalar(3.f).item() == 3.f);
  Tensor e = Tensor::zeros({0, 4});
  CHECK(e.numel() == 0);
  CHECK(e.to_f32_vector().empty());
}

TEST_CASE("storage: a freed block over 32 MiB is reused by the next tensor of its size, and holds what it is given") {
#if defined(__SANITIZE_ADDRESS__)
  MESSAGE("not under AddressSanitizer: big blocks go back to the system there");
#else
  const int64_t n = (40 << 20) / 4;  // 40 MiB of floats
  const void* first;
  {
    Tensor a = Tensor::full({n}, 3.f);
    first = a.raw();
  }
  Tensor b = Tensor::empty({n});
  CHECK(b.raw() == first);  // the same block, no fresh mapping to fault in (a fresh one would read 0 below)
  CHECK(b.f32()[0] == 3.f);
  CHECK(b.f32()[n - 1] == 3.f);
  Tensor c = Tensor::zeros({n});  // a second one of that size while b holds the first: a new block, zeroed
  CHECK(c.raw() != first);
  CHECK(c.f32()[n - 1] == 0.f);
  Tensor small = Tensor::full({1000}, 1.f);
  CHECK(small.raw() != first);
  // Another size does not take it; a copy into a reused block has the copied values.
  b = Tensor();
  Tensor d = Tensor::empty({n + 16});
  CHECK(d.raw() != first);
  Tensor e = Tensor::full({n}, 5.f).clone();
  CHECK(e.f32()[0] == 5.f);
  CHECK(e.f32()[n - 1] == 5.f);
#endif
}

TEST_CASE("staging ring: a region is handed out only after every reader of its bytes, the skipped tail's too") {
  // engine/ring.h, the bookkeeping of CUDA's pinned upload ring, on plain numbers: readers are retired oldest
  // first, never a pending region is overlapped, and the pending count stays bounded. The sequences wrap with a
  // previous lap's region left in the tail the wrap skips (the case that once stopped all retiring), and at random.
  const size_t kib = 1024, ring_bytes = 8192 * kib;
  std::vector<std::vector<size_t>> sequences = {
      {1536, 1536, 1536, 1536, 1536, 512, 1536, 1536, 1536, 1536, 1536, 1536, 1536, 1536, 1536, 1536, 1536, 1536},
      {2048, 2048, 2048, 1024, 1024, 2048, 2048, 2048, 2048, 2048, 1024, 3072, 256, 2048, 2048, 2048, 2048, 2048}};
  Generator g(5);
  std::vector<float> u = Tensor::rand({4000}, g).to_f32_vector();
  sequences.emplace_back();
  for (float x : u) sequences.back().push_back((size_t)(64 + x * 1984));  // 64 KiB to 2 MiB
  for (const std::vector<size_t>& sizes : sequences) {
    StagingRing<int> ring(ring_bytes);
    std::vector<int> retired;
    size_t most = 0;
    for (size_t i = 0; i < sizes.size(); ++i) {
      const size_t n = sizes[i] * kib;
      const size_t begin = ring.take(n, [&](int tag) { retired.push_back(tag); });
      REQUIRE(begin + n <= ring_bytes);
      CHECK_FALSE(ring.pending_overlaps(begin, n));
      ring.record(begin, n, (int)i);
      most = std::max(most, ring.pending());
    }
    for (size_t j = 1; j < retired.size(); ++j) CHECK(retired[j] == retired[j - 1] + 1);  // oldest first
    CHECK(retired.size() + ring.pending() == sizes.size());
    // Pending regions never overlap, so no more are pending than regions of the smallest size fit in the ring.
    CHECK(most <= 8192 / *std::min_element(sizes.begin(), sizes.end()));
  }
  StagingRing<int> ring(ring_bytes);
  CHECK_THROWS_WITH(ring.take(ring_bytes + 1, [](int) {}), doctest::Contains("in a ring of"));
}

TEST_CASE("creation: bad shapes and sizes are errors") {
  CHECK_THROWS_AS(Tensor::zeros({2, -1}), Error);
  CHECK_THROWS_AS(Tensor::from_vector(std::vector<float>{1, 2, 3}, {2, 2}), Error);
  CHECK_THROWS_AS(Tensor::zeros({2}, DType::I32).f32(), Error);
  CHECK_THROWS_AS(Tensor::zeros({2}).item(), Error);
  CHECK_THROWS_AS(Tensor::zeros({2, 3}).size(2), Error);
  try {
    Tensor::zeros({2, 3}).size(5);
    FAIL("no exception");
  } catch (const Error& e) {
    CHECK(std::string(e.what()).find("axis 5") != std::string::npos);
    CHECK(std::string(e.what()).find("rank 2") != std::string::npos);
  }
}

TEST_CASE("rng: counter-based, reproducible, sliceable, sensible moments") {
  Generator g1(42), g2(42), g3(43);
  Tensor a = Tensor::rand({1000}, g1), b = Tensor::rand({1000}, g2), c = Tensor::rand({1000}, g3);
  CHECK(a.to_f32_vector() == b.to_f32_vector());
  CHECK(a.to_f32_vector() != c.to_f32_vector());
  // Successive draws differ, and a draw is a pure function of (seed, offset): element i can be recomputed.
  Tensor a2 = Tensor::rand({1000}, g1);
  CHECK(a.to_f32_vector() != a2.to_f32_vector());
  CHECK(a.to_f32_vector()[777] == philox_uniform(42, 0, 777));
  double mean = 0, var = 0;
  Generator gn(7);
  std::vector<float> n = Tensor::randn({20000}, gn).to_f32_vector();
  for (float x : n) mean += x;
  mean /= n.size();
  for (float x : n) var += (x - mean) * (x - mean);
  var /= n.size();
  CHECK(std::fabs(mean) < 0.03);
  CHECK(std::fabs(var - 1.0) < 0.05);
  for (float x : a.to_f32_vector()) CHECK((x >= 0.f && x < 1.f));
}

TEST_CASE("views share storage: reshape, transpose, permute, slice, select, squeeze") {
  Tensor t = Tensor::arange(24).reshape({2, 3, 4});
  CHECK(t.shape() == Shape{2, 3, 4});
  Tensor tr = t.transpose(0, 2);  // [4, 3, 2]
  CHECK(tr.shape() == Shape{4, 3, 2});
  CHECK(!tr.is_contiguous());
  std::vector<float> v = tr.to_f32_vector();
  // tr[i][j][k] = t[k][j][i] = k*12 + j*4 + i
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 3; ++j)
      for (int k = 0; k < 2; ++k) CHECK(v[i * 6 + j * 2 + k] == (float)(k * 12 + j * 4 + i));
  Tensor p = t.permute({1, 2, 0});  // [3, 4, 2]
  std::vector<float> pv = p.contiguous().to_f32_vector();
  for (int j = 0; j < 3; ++j)
    for (int k = 0; k < 4; ++k)
      for (int i = 0; i < 2; ++i) CHECK(pv[j * 8 + k * 2 + i] == (float)(i * 12 + j * 4 + k));
  Tensor s = t.slice(2, 1, 4, 2);  // [2, 3, 2] picks columns 1 and 3
  CHECK(s.shape() == Shape{2, 3, 2});
  CHECK(s.to_f32_vector()[0] == 1.f);
  CHECK(s.to_f32_vector()[1] == 3.f);
  CHECK(t.slice(0, -1, 2).to_f32_vector()[0] == 12.f);  // negative start
  CHECK(t.slice(1, 2, 100).shape() == Shape{2, 1, 4});  // end clamps
  Tensor sel = t.select(1, -1);                           // [2, 4]: rows j = 2
  CHECK(sel.shape() == Shape{2, 4});
  CHECK(sel.to_f32_vector()[4] == 20.f);
  CHECK(t.unsqueeze(0).shape() == Shape{1, 2, 3, 4});
  CHECK(t.unsqueeze(-1).shape() == Shape{2, 3, 4, 1});
  CHECK(t.unsqueeze(1).squeeze(1).shape() == Shape{2, 3, 4});
  // writes through a view are visible in the base
  s.fill_(-1.f);
  CHECK(t.to_f32_vector()[1] == -1.f);
  CHECK(t.to_f32_vector()[2] == 2.f);
  CHECK(t.reshape({-1}).shape() == Shape{24});
  CHECK(tr.reshape({4, 6}).is_contiguous());  // copy when the view cannot be expressed
}

TEST_CASE("views: bad arguments are errors naming the problem") {
  Tensor t = Tensor::zeros({2, 3});
  CHECK_THROWS_AS(t.reshape({4, 2}), Error);
  CHECK_THROWS_AS(t.reshape({-1, -1}), Error);
  CHECK_THROWS_AS(t.transpose(0, 2), Error);
  CHECK_THROWS_AS(t.permute({0, 0}), Error);
  CHECK_THROWS_AS(t.select(0, 2), Error);
  CHECK_THROWS_AS(t.squeeze(1), Error);
  CHECK_THROWS_AS(t.transpose(0, 1).view({6}), Error);
  try {
    t.reshape({4, 2});
  } catch (const Error& e) {
    CHECK(std::string(e.what()).find("[2, 3]") != std::string::npos);
    CHECK(std::string(e.what()).find("[4, 2]") != std::string::npos);
  }
}

TEST_CASE("copy_, clone, contiguous, dtype conversion") {
  Tensor a = uniform({5, 7}, 1);
  Tensor c = a.clone();
  CHECK(c.to_f32_vector() == a.to_f32_vector());
  c.fill_(0.f);
  CHECK(a.to_f32_vector() != c.to_f32_vector());  // a fresh buffer
  Tensor at = a.transpose(0, 1).contiguous();
  CHECK(at.is_contiguous());
  CHECK(at.to_f32_vector()[1 * 5 + 2] == a.to_f32_vector()[2 * 7 + 1]);
  Tensor dst = Tensor::zeros({7, 5});
  dst.transpose(0, 1).copy_(a);  // strided destination
  CHECK(dst.to_f32_vector() == at.to_f32_vector());
  CHECK_THROWS_AS(dst.copy_(a), Error);
  Tensor f = Tensor::from_vector(std::vector<float>{1.7f, -2.2f, 3.f}, {3});
  CHECK(f.to(DType::I32).to_i32_vector() == std::vector<int32_t>{1, -2, 3});
  CHECK(f.to(DType::I32).to(DType::F32).to_f32_vector() == std::vector<float>{1.f, -2.f, 3.f});
}

TEST_CASE("printing shows shape, dtype and truncated values") {
  Tensor t = Tensor::arange(100).reshape({10, 10});
  std::string s = t.str();
  CHECK(s.find("[10, 10] f32 cpu") != std::string::npos);
  CHECK(s.find("...") != std::string::npos);
  CHECK(s.find("99") != std::string::npos);
  CHECK(Tensor::arange(3, DType::I32).str().find("[0, 1, 2]") != std::string::npos);
}

TEST_CASE("devices: CUDA is refused clearly when absent") {
  if (cuda_available()) return;
  CHECK_THROWS_AS(Tensor::zeros({2}, DType::F32, Device::CUDA), Error);
  CHECK_THROWS_AS(Tensor::zeros({2}).to(Device::CUDA), Error);
}

TEST_CASE("host syncs: each read-out counts one copy and one wait; ops, backward and AdamW count none") {
  // engine/host_sync.h: on the CPU a read-out is where a device build would wait, so it counts there too.
  Tensor w = cm::test::param({4, 3}, 1);
  Tensor x = cm::test::uniform({5, 4}, 2);
  Tensor ids = Tensor::from_vector(std::vector<int32_t>{0, 2, 1, 2, 0}, {5});
  reset_host_sync_stats();
  // A small training step: matmul, index ops, cross-entropy, backward, AdamW. Kernels read memory; the host reads
  // no value, so nothing counts.
  Tensor h = index_select(matmul(x, w), 0, ids);  // [5, 3]
  Tensor loss = cross_entropy(h, ids);
  loss.backward();
  AdamW opt({{"w", w}}, AdamWOptions{});
  opt.step(1e-2f);
  HostSyncStats s = host_sync_stats();
  CHECK(s.d2h_copies == 0);
  CHECK(s.stream_syncs == 0);
  // Read-outs: one copy and one wait each.
  (void)loss.item();
  (void)h.to_f32_vector();
  (void)ids.to_i32_vector();
  s = host_sync_stats();
  CHECK(s.d2h_copies == 3);
  CHECK(s.stream_syncs == 3);
  reset_host_sync_stats();
  CHECK(host_sync_stats().stream_syncs == 0);
}

}  // TEST_SUITE
