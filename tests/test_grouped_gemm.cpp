// The grouped GEMM (kernels/grouped_gemm.h): the CPU kernel against a naive double-precision reference and, bit
// for bit, against cm::cpu::gemm on each segment alone and across thread counts (kernels suite); the CUDA twin
// against the CPU, bit for bit as the header promises, without a host synchronisation (cuda suite).
//
// Every case runs all three products (forward, backward_input, backward_weight) with and without bias,
// accumulate and row gather, on random non-zero inputs; outputs that must be overwritten start as NaN, outputs
// that accumulate start as random values, so a forgotten or doubled write shows.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "helpers.h"
#include "kernels/gemm.h"
#include "kernels/grouped_gemm.h"
#if CM_CUDA
#include <memory>

#include "engine/cuda.h"
#include "engine/host_sync.h"
#endif

using namespace cm;
using cm::test::ThreadCount;

namespace {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// Deterministic values in [-1, 1), never all zero.
std::vector<float> random_vec(int64_t n, uint64_t seed) {
  std::vector<float> v((size_t)n);
  uint64_t s = seed * 0x9E3779B97F4A7C15ull + 777;
  for (float& x : v) {
    s ^= s << 13, s ^= s >> 7, s ^= s << 17;
    x = (float)((s >> 40) * (1.0 / (1ull << 24))) * 2.0f - 1.0f;
  }
  return v;
}
uint64_t mix(uint64_t& s) {
  s ^= s << 13, s ^= s >> 7, s ^= s << 17;
  return s;
}

// One grouped problem with every operand of the three products, and the flags of one run.
struct Problem {
  int64_t G = 0, M = 0, N = 0, Kd = 0;
  std::vector<int64_t> off;                 // [G+1]
  std::vector<float> X;                     // [M, Kd] the grouped rows (materialised, also when gathered)
  std::vector<float> Xsrc;                  // [T, Kd] what the gather reads (gathered problems only)
  std::vector<int32_t> index;               // [M] gather index into Xsrc (row index[i] / div)
  int64_t div = 1;
  std::vector<float> dY;                    // [M, N]
  std::vector<std::vector<float>> W, b;     // [G][N * Kd], [G][N]
  std::vector<float> Y0, dX0;               // accumulate starting values [M, N], [M, Kd]
  std::vector<std::vector<float>> dW0, dB0;  // [G][N * Kd], [G][N]

  bool bias = false, accumulate = false, gather = false;

  std::string name() const {
    std::string s = str("G ", G, " M ", M, " N ", N, " Kd ", Kd, bias ? " bias" : "", accumulate ? " accumulate" : "",
                        gather ? str(" gather/", div) : std::string(), " sizes");
    for (int64_t g = 0; g < G && g < 12; ++g) s += str(" ", off[g + 1] - off[g]);
    return G > 12 ? s + " ..." : s;
  }
};

Problem make_problem(const std::vector<int64_t>& sizes, int64_t N, int64_t Kd, uint64_t seed, int64_t div = 3) {
  Problem p;
  p.G = (int64_t)sizes.size(), p.N = N, p.Kd = Kd, p.div = div;
  p.off.assign(1, 0);
  for (int64_t s : sizes) p.off.push_back(p.off.back() + s);
  p.M = p.off.back();
  // The gather source: T rows, each row i of the grouped X reads Xsrc[index[i] / div] (index like assign_of: a
  // slot number; T < M, so rows repeat, as a token does for its K slots).
  const int64_t T = p.M / 2 + 1;
  p.Xsrc = random_vec(T * Kd, seed + 1);
  p.index.resize((size_t)p.M);
  p.X.resize((size_t)(p.M * Kd));
  uint64_t s = seed * 31 + 5;
  for (int64_t i = 0; i < p.M; ++i) {
    p.index[i] = (int32_t)(mix(s) % (uint64_t)(T * div));
    if (Kd > 0)  // Kd = 0: both vectors are empty, and [] on them would bind a reference to null
      std::memcpy(&p.X[i * Kd], &p.Xsrc[(p.index[i] / div) * Kd], sizeof(float) * Kd);
  }
  p.dY = random_vec(p.M * N, seed + 2);
  p.Y0 = random_vec(p.M * N, seed + 3);
  p.dX0 = random_vec(p.M * Kd, seed + 4);
  for (int64_t g = 0; g < p.G; ++g) {
    p.W.push_back(random_vec(N * Kd, seed + 10 + 4 * g));
    p.b.push_back(random_vec(N, seed + 11 + 4 * g));
    p.dW0.push_back(random_vec(N * Kd, seed + 12 + 4 * g));
    p.dB0.push_back(random_vec(N, seed + 13 + 4 * g));
  }
  return p;
}

// Random segment sizes from a fixed seed: about a quarter empty, some single rows, the rest up to `max_rows`.
std::vector<int64_t> random_sizes(int64_t G, int64_t max_rows, uint64_t seed) {
  std::vector<int64_t> sizes((size_t)G);
  uint64_t s = seed * 17 + 3;
  for (int64_t& n : sizes) {
    const uint64_t r = mix(s);
    n = r % 4 == 0 ? 0 : r % 7 == 0 ? 1 : (int64_t)((r >> 8) % (uint64_t)(max_rows + 1));
  }
  return sizes;
}

// What one run produces: Y, dX, every dW[g] and dB[g] (empty vectors for what a run does not compute).
struct Outputs {
  std::vector<float> Y, dX;
  std::vector<std::vector<float>> dW, dB;
};

std::vector<const float*> cptrs(const std::vector<std::vector<float>>& v) {
  std::vector<const float*> p;
  for (const auto& x : v) p.push_back(x.data());
  return p;
}
std::vector<float*> ptrs(std::vector<std::vector<float>>& v) {
  std::vector<float*> p;
  for (auto& x : v) p.push_back(x.data());
  return p;
}

// Starting values of the outputs: the accumulate values, or NaN where the run must overwrite.
Outputs initial(const Problem& p) {
  Outputs o;
  o.Y = p.accumulate ? p.Y0 : std::vector<float>(p.Y0.size(), kNaN);
  o.dX = p.accumulate ? p.dX0 : std::vector<float>(p.dX0.size(), kNaN);
  o.dW = p.dW0;
  o.dB = p.dB0;
  if (!p.accumulate)
    for (int64_t g = 0; g < p.G; ++g) {
      std::fill(o.dW[g].begin(), o.dW[g].end(), kNaN);
      std::fill(o.dB[g].begin(), o.dB[g].end(), kNaN);
    }
  return o;
}

Outputs run_cpu(const Problem& p) {
  Outputs o = initial(p);
  const std::vector<const float*> W = cptrs(p.W), b = cptrs(p.b);
  std::vector<float*> dW = ptrs(o.dW), dB = ptrs(o.dB);
  const RowGather gather = p.gather ? RowGather{p.index.data(), p.div} : RowGather{};
  const float* X = p.gather ? p.Xsrc.data() : p.X.data();
  cpu::grouped_gemm_forward(o.Y.data(), X, W.data(), p.off.data(), p.G, p.M, p.N, p.Kd, p.bias ? b.data() : nullptr,
                            p.accumulate, gather);
  cpu::grouped_gemm_backward_input(o.dX.data(), p.dY.data(), W.data(), p.off.data(), p.G, p.M, p.N, p.Kd,
                                   p.accumulate);
  cpu::grouped_gemm_backward_weight(dW.data(), p.bias ? dB.data() : nullptr, p.dY.data(), X, p.off.data(), p.G, p.M,
                                    p.N, p.Kd, p.accumulate, gather);
  return o;
}

// The naive reference in double, with the same starting values; |error| <= atol + rtol * |ref| per element.
std::string check_reference(const Problem& p, const Outputs& o) {
  const double atol = 3e-5, rtol = 1e-5;
  auto bad = [&](double got, double ref) { return !(std::fabs(got - ref) <= atol + rtol * std::fabs(ref)); };
  for (int64_t g = 0; g < p.G; ++g)
    for (int64_t i = p.off[g]; i < p.off[g + 1]; ++i) {
      for (int64_t j = 0; j < p.N; ++j) {
        double ref = p.accumulate ? p.Y0[i * p.N + j] : 0.0;
        if (p.bias) ref += p.b[g][j];
        for (int64_t k = 0; k < p.Kd; ++k) ref += (double)p.X[i * p.Kd + k] * p.W[g][j * p.Kd + k];
        if (bad(o.Y[i * p.N + j], ref))
          return str("forward: Y[", i, "][", j, "] (group ", g, ") = ", o.Y[i * p.N + j], " expected ", ref);
      }
      for (int64_t k = 0; k < p.Kd; ++k) {
        double ref = p.accumulate ? p.dX0[i * p.Kd + k] : 0.0;
        for (int64_t j = 0; j < p.N; ++j) ref += (double)p.dY[i * p.N + j] * p.W[g][j * p.Kd + k];
        if (bad(o.dX[i * p.Kd + k], ref))
          return str("backward_input: dX[", i, "][", k, "] (group ", g, ") = ", o.dX[i * p.Kd + k], " expected ",
                     ref);
      }
    }
  for (int64_t g = 0; g < p.G; ++g)
    for (int64_t j = 0; j < p.N; ++j) {
      for (int64_t k = 0; k < p.Kd; ++k) {
        double ref = p.accumulate ? p.dW0[g][j * p.Kd + k] : 0.0;
        for (int64_t i = p.off[g]; i < p.off[g + 1]; ++i) ref += (double)p.dY[i * p.N + j] * p.X[i * p.Kd + k];
        if (bad(o.dW[g][j * p.Kd + k], ref))
          return str("backward_weight: dW[", g, "][", j, "][", k, "] = ", o.dW[g][j * p.Kd + k], " expected ", ref);
      }
      double ref = p.bias ? (p.accumulate ? p.dB0[g][j] : 0.0) : p.dB0[g][j];  // no bias: dB untouched
      if (p.bias)
        for (int64_t i = p.off[g]; i < p.off[g + 1]; ++i) ref += p.dY[i * p.N + j];
      if (!p.bias && !p.accumulate) continue;  // dB was NaN and must stay unread and unwritten: checked below
      if (bad(o.dB[g][j], ref)) return str("backward_weight: dB[", g, "][", j, "] = ", o.dB[g][j], " expected ", ref);
    }
  if (!p.bias && !p.accumulate)  // dB == nullptr: the NaN it started with is still there
    for (int64_t g = 0; g < p.G; ++g)
      for (float v : o.dB[g])
        if (!std::isnan(v)) return str("backward_weight wrote dB[", g, "] although dB was nullptr");
  return "";
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0);
}
std::string compare_bits(const Outputs& a, const Outputs& b, const char* what) {
  if (!same_bits(a.Y, b.Y)) return str(what, ": forward Y differs");
  if (!same_bits(a.dX, b.dX)) return str(what, ": backward_input dX differs");
  for (size_t g = 0; g < a.dW.size(); ++g) {
    if (!same_bits(a.dW[g], b.dW[g])) return str(what, ": backward_weight dW[", g, "] differs");
    if (!same_bits(a.dB[g], b.dB[g])) return str(what, ": backward_weight dB[", g, "] differs");
  }
  return "";
}

// The same results from a loop of cm::cpu::gemm calls, one per segment, on the materialised X: what the header
// promises bit for bit. With a bias the forward is linear()'s order (Y_g = b_g, then the product with beta = 1) and
// dB_g is linear()'s ones-vector product.
Outputs run_segment_gemms(const Problem& p) {
  Outputs o = initial(p);
  const float beta = p.accumulate ? 1.0f : 0.0f;
  for (int64_t g = 0; g < p.G; ++g) {
    const int64_t r0 = p.off[g], rows = p.off[g + 1] - r0;
    float* Yg = o.Y.data() + r0 * p.N;
    if (p.bias)
      for (int64_t i = 0; i < rows; ++i)
        for (int64_t j = 0; j < p.N; ++j) Yg[i * p.N + j] = p.accumulate ? Yg[i * p.N + j] + p.b[g][j] : p.b[g][j];
    cpu::gemm(Yg, p.N, p.X.data() + r0 * p.Kd, p.Kd, p.W[g].data(), p.Kd, rows, p.N, p.Kd, false, true, 1.0f,
              p.bias ? 1.0f : beta);
    cpu::gemm(o.dX.data() + r0 * p.Kd, p.Kd, p.dY.data() + r0 * p.N, p.N, p.W[g].data(), p.Kd, rows, p.Kd, p.N,
              false, false, 1.0f, beta);
    if (rows == 0 && p.accumulate) continue;  // the grouped call leaves an empty group's gradients untouched
    cpu::gemm(o.dW[g].data(), p.Kd, p.dY.data() + r0 * p.N, p.N, p.X.data() + r0 * p.Kd, p.Kd, p.N, p.Kd, rows,
              true, false, 1.0f, beta);
    if (p.bias) {
      const std::vector<float> ones((size_t)rows, 1.0f);
      cpu::gemm(o.dB[g].data(), p.N, ones.data(), rows, p.dY.data() + r0 * p.N, p.N, 1, p.N, rows, false, false,
                1.0f, beta);
    }
  }
  return o;
}

// p with its last `drop` groups taken out of the offsets but their rows kept: rows past off[G] belong to no group
// (a nowait dispatch plan's unfilled rows). Their X and dY are NaN, so a read of them shows in the outputs.
Problem without_last_groups(Problem p, int64_t drop) {
  p.G -= drop;
  p.off.resize((size_t)(p.G + 1));
  for (auto* v : {&p.W, &p.b, &p.dW0, &p.dB0}) v->resize((size_t)p.G);
  std::fill(p.X.begin() + p.off[p.G] * p.Kd, p.X.end(), kNaN);
  std::fill(p.dY.begin() + p.off[p.G] * p.N, p.dY.end(), kNaN);
  return p;
}

// Rows past off[G] were neither written (Y and dX hold their starting values, bit for bit) nor read (no NaN
// anywhere else).
std::string check_unowned_rows(const Problem& p, const Outputs& o) {
  const Outputs init = initial(p);
  const size_t y0 = (size_t)(p.off[p.G] * p.N), x0 = (size_t)(p.off[p.G] * p.Kd);
  if (std::memcmp(o.Y.data() + y0, init.Y.data() + y0, (o.Y.size() - y0) * sizeof(float)) != 0)
    return "forward wrote a row past the last group";
  if (std::memcmp(o.dX.data() + x0, init.dX.data() + x0, (o.dX.size() - x0) * sizeof(float)) != 0)
    return "backward_input wrote a row past the last group";
  return "";
}

// Every combination of the flags on one shape: reference within tolerance, segment gemms bit for bit.
void check_all_flags(Problem p) {
  for (int f = 0; f < 8; ++f) {
    p.bias = f & 1, p.accumulate = f & 2, p.gather = f & 4;
    CAPTURE(p.name());
    const Outputs got = run_cpu(p);
    const std::string err = check_reference(p, got);
    CHECK_MESSAGE(err.empty(), err);
    const std::string bits = compare_bits(got, run_segment_gemms(p), "against cpu::gemm per segment");
    CHECK_MESSAGE(bits.empty(), bits);
  }
}

}  // namespace

TEST_SUITE("kernels") {

TEST_CASE("grouped gemm: groups of size 0, 1 and odd sizes, every flag, against double and cpu::gemm") {
  // Sizes around the register tile (MR = 12 on AVX-512, 6 on AVX2) and the tile heights (up to 8 MR); a group of
  // 400 rows gives backward_weight two K blocks (gemm_k_block(400) = 200); N and Kd odd, not multiples of 16.
  check_all_flags(make_problem({0, 1, 13, 0, 37, 5, 100, 0, 2, 12}, 33, 19, 1));
  check_all_flags(make_problem({3, 400, 0, 25}, 17, 45, 2, 1));
  check_all_flags(make_problem({0, 0, 7}, 5, 3, 3));  // leading empty groups
}

TEST_CASE("grouped gemm: G = 1 is cpu::gemm, M not a multiple of any tile") {
  check_all_flags(make_problem({131}, 40, 24, 4));
  check_all_flags(make_problem({1}, 1, 1, 5));
}

TEST_CASE("grouped gemm: G = 64 uneven groups, and two column tiles (N, Kd over 512)") {
  check_all_flags(make_problem(random_sizes(64, 30, 6), 24, 20, 7, 2));
  // N = 530 > 512: the forward and backward_weight cut their columns (dW's rows) in two.
  Problem p = make_problem({9, 0, 20}, 530, 8, 8);
  check_all_flags(p);
  Problem q = make_problem({9, 1, 20}, 6, 515, 9);  // Kd > 512: backward_input's and backward_weight's columns
  check_all_flags(q);
}

TEST_CASE("grouped gemm: empty inner sizes and no rows at all") {
  check_all_flags(make_problem({4, 0, 3}, 6, 0, 10));  // Kd = 0: Y = bias (or 0), dX and dW are empty
  check_all_flags(make_problem({4, 0, 3}, 0, 5, 11));  // N = 0: dX = 0 (or unchanged), Y and dW are empty
  check_all_flags(make_problem({0, 0}, 6, 5, 12));     // M = 0: only dW/dB of empty groups (zeros or untouched)
  check_all_flags(make_problem({}, 6, 5, 13));         // G = 0
}

TEST_CASE("grouped gemm: bit-identical for 1, 2 and 7 threads") {
  // Over 4 MFLOP per product, so that the parallel path runs; groups of every kind. The tiling follows the thread
  // count: 1 and 2 threads cut rows into tiles of 8 MR and each dW[g] whole, 7 threads into tiles of 4 MR and two
  // bands per dW[g]; 2 threads share tiles of the same shapes in a different order.
  Problem p = make_problem(random_sizes(16, 180, 14), 96, 80, 15);
  for (int f = 0; f < 8; ++f) {
    p.bias = f & 1, p.accumulate = f & 2, p.gather = f & 4;
    CAPTURE(p.name());
    REQUIRE(2.0 * p.M * p.N * p.Kd > 4e6);
    Outputs one, two, seven;
    {
      ThreadCount t(1);
      one = run_cpu(p);
    }
    {
      ThreadCount t(2);
      two = run_cpu(p);
    }
    {
      ThreadCount t(7);
      seven = run_cpu(p);
    }
    const std::string e2 = compare_bits(one, two, "1 vs 2 threads"), e7 = compare_bits(one, seven, "1 vs 7 threads");
    CHECK_MESSAGE(e2.empty(), e2);
    CHECK_MESSAGE(e7.empty(), e7);
    if (f == 7) {
      const std::string err = check_reference(p, seven);
      CHECK_MESSAGE(err.empty(), err);
    }
  }
}

TEST_CASE("grouped gemm: a popular expert's weight packed once for all its row tiles gives per-tile packing's bits") {
  // Groups of several row tiles (tiles are at most 8 MR = 96 rows) take the shared panels: 300 and 250 rows beside
  // small groups; N = 530 gives the forward two column blocks, Kd = 450 two K blocks (gemm_k_block(450) = 225),
  // and backward_input has them the other way round. Shared packing on and off (the earlier path), 1 and 2 threads.
  struct Restore {
    bool was = cpu::grouped_gemm_shared_packing();
    ~Restore() { cpu::grouped_gemm_set_shared_packing(was); }
  } restore;
  for (const Problem& base : {make_problem({300, 7, 0, 250, 40}, 530, 450, 21), make_problem({200, 130}, 64, 48, 22)})
    for (int threads : {1, 2})
      for (int f = 0; f < 8; ++f) {
        Problem p = base;
        p.bias = f & 1, p.accumulate = f & 2, p.gather = f & 4;
        CAPTURE(p.name());
        CAPTURE(threads);
        ThreadCount t(threads);
        cpu::grouped_gemm_set_shared_packing(false);
        const Outputs per_tile = run_cpu(p);
        cpu::grouped_gemm_set_shared_packing(true);
        const Outputs shared = run_cpu(p);
        const std::string e = compare_bits(shared, per_tile, "shared panels vs per-tile packing");
        CHECK_MESSAGE(e.empty(), e);
        const std::string g = compare_bits(shared, run_segment_gemms(p), "shared panels vs cpu::gemm per segment");
        CHECK_MESSAGE(g.empty(), g);
      }
}

TEST_CASE("grouped gemm: rows past the last group's are neither read nor written") {
  const Problem p = without_last_groups(make_problem({3, 0, 5, 4, 2}, 6, 7, 31), 2);  // rows 8 .. 13 unowned
  for (int f = 0; f < 8; ++f) {
    Problem q = p;
    q.bias = f & 1, q.accumulate = f & 2, q.gather = f & 4;
    CAPTURE(q.name());
    const Outputs got = run_cpu(q);
    const std::string err = check_reference(q, got) + check_unowned_rows(q, got);
    CHECK_MESSAGE(err.empty(), err);
  }
}

TEST_CASE("grouped gemm: counts its multiply-adds; bad offsets are errors that say what is wrong") {
  Problem p = make_problem({3, 0, 5}, 4, 6, 16);
  const int64_t before = cpu::gemm_multiply_adds();
  run_cpu(p);
  CHECK(cpu::gemm_multiply_adds() - before == 3 * p.M * p.N * p.Kd);

  std::vector<float> Y((size_t)(p.M * p.N));
  const std::vector<const float*> W = cptrs(p.W);
  std::vector<int64_t> off = p.off;
  off[3] = p.M + 1;  // ends past M
  CHECK_THROWS_WITH_AS(cpu::grouped_gemm_forward(Y.data(), p.X.data(), W.data(), off.data(), 3, p.M, p.N, p.Kd,
                                                 nullptr, false),
                       doctest::Contains("offsets must run from 0 to at most M=8"), Error);
  off = p.off;
  off[1] = 6, off[2] = 4;  // decreasing
  CHECK_THROWS_WITH_AS(cpu::grouped_gemm_backward_input(Y.data(), p.dY.data(), W.data(), off.data(), 3, p.M, p.N,
                                                        p.Kd, false),
                       doctest::Contains("offsets decrease at group 1"), Error);
}

}  // TEST_SUITE("kernels")

#if CM_CUDA
namespace {

// Device memory holding a copy of a host vector (cuda::upload: no wait); host() reads it back.
template <class T>
struct DeviceVec {
  T* p = nullptr;
  size_t n = 0;
  explicit DeviceVec(const std::vector<T>& v) : n(v.size()) {
    p = static_cast<T*>(cuda::allocate(std::max<size_t>(n, 1) * sizeof(T)));
    if (n > 0) cuda::upload(p, v.data(), n * sizeof(T));
  }
  DeviceVec(const DeviceVec&) = delete;
  DeviceVec& operator=(const DeviceVec&) = delete;
  ~DeviceVec() { cuda::deallocate(p); }
  std::vector<T> host() const {
    std::vector<T> v(n);
    if (n > 0) cuda::copy_to_host(v.data(), p, n * sizeof(T));
    return v;
  }
};
using DeviceList = std::vector<std::unique_ptr<DeviceVec<float>>>;

// The three products on the device, from the same starting values as run_cpu. `syncs`: the host waits (stream
// synchronisations and device-to-host copies) counted from just before the first launch to just after the last.
Outputs run_cuda(const Problem& p, int64_t& syncs) {
  const Outputs init = initial(p);
  DeviceVec<float> X(p.gather ? p.Xsrc : p.X), dY(p.dY), Y(init.Y), dX(init.dX);
  DeviceVec<int64_t> off(p.off);
  DeviceVec<int32_t> index(p.index);
  DeviceList W, b, dW, dB;
  std::vector<const float*> hW, hb;
  std::vector<float*> hdW, hdB;
  for (int64_t g = 0; g < p.G; ++g) {
    W.push_back(std::make_unique<DeviceVec<float>>(p.W[g]));
    b.push_back(std::make_unique<DeviceVec<float>>(p.b[g]));
    dW.push_back(std::make_unique<DeviceVec<float>>(init.dW[g]));
    dB.push_back(std::make_unique<DeviceVec<float>>(init.dB[g]));
    hW.push_back(W.back()->p), hb.push_back(b.back()->p), hdW.push_back(dW.back()->p), hdB.push_back(dB.back()->p);
  }
  // The pointer arrays are uploaded once, before the window (an upload may wait when it recycles the staging
  // ring); inside it, get() finds them unchanged and uploads nothing: a training step's steady state.
  cuda::DevicePointers pW, pb, pdW, pdB;
  pW.get(hW), pb.get(hb), pdW.get(hdW), pdB.get(hdB);
  const RowGather gather = p.gather ? RowGather{index.p, p.div} : RowGather{};
  const HostSyncStats before = host_sync_stats();
  cuda::grouped_gemm_forward(Y.p, X.p, pW.get(hW), off.p, p.G, p.M, p.N, p.Kd, p.bias ? pb.get(hb) : nullptr,
                             p.accumulate, gather);
  cuda::grouped_gemm_backward_input(dX.p, dY.p, pW.get(hW), off.p, p.G, p.M, p.N, p.Kd, p.accumulate);
  cuda::grouped_gemm_backward_weight(pdW.get(hdW), p.bias ? pdB.get(hdB) : nullptr, dY.p, X.p, off.p, p.G, p.M, p.N,
                                     p.Kd, p.accumulate, gather);
  const HostSyncStats after = host_sync_stats();
  syncs = (after.stream_syncs - before.stream_syncs) + (after.d2h_copies - before.d2h_copies);
  Outputs o;
  o.Y = Y.host();
  o.dX = dX.host();
  for (int64_t g = 0; g < p.G; ++g) o.dW.push_back(dW[g]->host()), o.dB.push_back(dB[g]->host());
  return o;
}

// run_cpu, with backward_weight as the CUDA twin makes it when a call's groups are cut into chunks of `chunk`
// rows (cuda::grouped_wgrad_chunks): each group's first chunk folded into dW[g] (dB[g]) by the CPU kernel as a
// group of its own, each further chunk's product from zero, then added in chunk order, c = part + c.
Outputs run_cpu_chunked(const Problem& p, int64_t chunk) {
  Outputs o = run_cpu(p);
  const Outputs init = initial(p);
  o.dW = init.dW, o.dB = init.dB;
  const float* X = p.gather ? p.Xsrc.data() : p.X.data();
  std::vector<float> part_w((size_t)(p.N * p.Kd)), part_b((size_t)p.N);
  for (int64_t g = 0; g < p.G; ++g) {
    const int64_t rows = p.off[g + 1] - p.off[g];
    for (int64_t m0 = 0; m0 == 0 || m0 < rows; m0 += chunk) {
      const int64_t r0 = p.off[g] + m0, n = std::min(chunk, rows - m0), off[2] = {0, n};
      float* dw = m0 == 0 ? o.dW[g].data() : part_w.data();
      float* db = m0 == 0 ? o.dB[g].data() : part_b.data();
      const RowGather gather = p.gather ? RowGather{p.index.data() + r0, p.div} : RowGather{};
      cpu::grouped_gemm_backward_weight(&dw, p.bias ? &db : nullptr, p.dY.data() + r0 * p.N,
                                        p.gather ? X : X + r0 * p.Kd, off, 1, n, p.N, p.Kd,
                                        m0 == 0 && p.accumulate, gather);
      if (m0 == 0) continue;
      for (int64_t e = 0; e < p.N * p.Kd; ++e) o.dW[g][e] = part_w[e] + o.dW[g][e];
      if (p.bias)
        for (int64_t e = 0; e < p.N; ++e) o.dB[g][e] = part_b[e] + o.dB[g][e];
    }
  }
  return o;
}

// The CUDA twin against the CPU for the given flag combinations (bit 0 bias, 1 accumulate, 2 gather): bit for bit
// where the CPU GEMM uses fused multiply-adds (the header's promise; run_cpu_chunked where the call's groups are
// cut into chunks), within the reference tolerance always, and no host wait.
void check_cuda(Problem p, std::vector<int> flags = {0, 1, 2, 3, 4, 5, 6, 7}) {
  const int64_t chunk = cuda::grouped_wgrad_chunks(p.M, p.N, p.Kd).rows;
  for (int f : flags) {
    p.bias = f & 1, p.accumulate = f & 2, p.gather = f & 4;
    CAPTURE(p.name());
    int64_t syncs = -1;
    const Outputs got = run_cuda(p, syncs);
    CHECK(syncs == 0);
    const std::string err = check_reference(p, got);
    CHECK_MESSAGE(err.empty(), err);
#if defined(__FMA__) || defined(__AVX512F__)
    const std::string bits = compare_bits(got, chunk ? run_cpu_chunked(p, chunk) : run_cpu(p), "CUDA against the CPU");
    CHECK_MESSAGE(bits.empty(), bits);
#endif
  }
}

}  // namespace

TEST_SUITE("cuda") {
using cm::test::needs_device;

TEST_CASE("cuda kernels: grouped gemm equals the CPU bit for bit, every flag, groups of 0, 1, odd and > 64 rows,"
          " no host sync" * needs_device()) {
  check_cuda(make_problem({0, 1, 70, 0, 5, 130, 2}, 33, 19, 21));
  check_cuda(make_problem({131}, 65, 17, 22), {0, 7});  // G = 1, two column tiles
}

TEST_CASE("cuda kernels: grouped gemm over several K blocks and column tiles" * needs_device()) {
  // Kd = 390 and a group of 400 rows: two K blocks of gemm_k_block (195, 200) in every product, 7 column tiles.
  check_cuda(make_problem({3, 400, 0}, 20, 390, 23), {0, 7});
}

TEST_CASE("cuda kernels: grouped gemm with 64 and 300 groups (the tile search's second step), empty sizes" *
          needs_device()) {
  check_cuda(make_problem(random_sizes(64, 20, 24), 9, 7, 25), {1, 6});
  check_cuda(make_problem(random_sizes(300, 3, 26), 5, 4, 27), {3, 4});  // G > 256 groups per search step
  check_cuda(make_problem({4, 0, 3}, 6, 0, 28), {1, 3});                 // Kd = 0: Y = bias, dB only
  check_cuda(make_problem({4, 0, 3}, 0, 5, 29), {0, 2});                 // N = 0
  check_cuda(make_problem({0, 0}, 6, 5, 30), {1, 3});                    // M = 0: empty groups only
}

TEST_CASE("cuda kernels: grouped gemm's weight gradient cuts a long group into chunks: the CPU's bits of those"
          " products, chunk slots left over, dB alone" * needs_device()) {
  // N x Kd = 9 x 7 (one tile): chunks of 2048 rows. Group 1 has two further chunks (2048 + 2048 + 404), group 3 one
  // of a single row: three further chunks, every slot of M / 2048 = 3 used.
  const Problem p = make_problem({5, 4500, 0, 2049, 30}, 9, 7, 41);
  REQUIRE(cuda::grouped_wgrad_chunks(p.M, p.N, p.Kd).rows == 2048);
  REQUIRE(cuda::grouped_wgrad_chunks(p.M, p.N, p.Kd).extra == 3);
  check_cuda(p, {0, 3, 6, 7});
#if defined(__FMA__) || defined(__AVX512F__)
  // the chunked products are another sum than one walk over the group: the test above tells them apart
  Problem q = p;
  q.bias = true;
  CHECK(!compare_bits(run_cpu_chunked(q, 2048), run_cpu(q), "").empty());
#endif
  // chunks off (the bench's before): each group walked whole, the CPU kernel's bits
  cuda::grouped_wgrad_set_chunks(false);
  {
    Problem q = p;
    q.bias = true, q.gather = true;
    int64_t syncs = -1;
    const Outputs got = run_cuda(q, syncs);
#if defined(__FMA__) || defined(__AVX512F__)
    const std::string bits = compare_bits(got, run_cpu(q), "CUDA unchunked against the CPU");
    CHECK_MESSAGE(bits.empty(), bits);
#endif
    const std::string err = check_reference(q, got);
    CHECK_MESSAGE(err.empty(), err);
  }
  cuda::grouped_wgrad_set_chunks(true);
  // one further chunk against M / 2048 = 2 slots: the second finds no chunk; Kd = 0: dB's chunks alone
  check_cuda(make_problem({2000, 2000, 2100}, 5, 3, 42), {1, 2, 5});
  check_cuda(make_problem({3000, 1200}, 6, 0, 43), {1, 3});
  // N x Kd past the scratch's 2^22 floats: no chunks whatever the rows
  CHECK(cuda::grouped_wgrad_chunks(1 << 20, 2048, 2048).rows == 0);
  CHECK(cuda::grouped_wgrad_chunks(2047, 9, 7).rows == 0);  // no group can be longer than a chunk
}

TEST_CASE("cuda kernels: grouped gemm leaves the rows past the last group's unread and unwritten" * needs_device()) {
  Problem p = without_last_groups(make_problem({3, 0, 70, 4, 2}, 6, 7, 32), 2);
  check_cuda(p, {0, 3, 6});  // the CPU's bits: the CPU test above shows those rows untouched
  for (int f : {1, 2}) {
    p.bias = f & 1, p.accumulate = f & 2, p.gather = false;
    int64_t syncs = -1;
    const std::string err = check_unowned_rows(p, run_cuda(p, syncs));
    CHECK_MESSAGE(err.empty(), err);
  }
}

TEST_CASE("cuda kernels: DevicePointers uploads a pointer list once and again only when it changes" *
          needs_device()) {
  DeviceVec<float> a(std::vector<float>{1.f}), b(std::vector<float>{2.f}), c(std::vector<float>{3.f});
  cuda::DevicePointers ptrs;
  const std::vector<const float*> ab = {a.p, b.p}, ac = {a.p, c.p};
  const float* const* d1 = ptrs.get(ab);
  const int64_t syncs = host_sync_stats().stream_syncs;
  CHECK(ptrs.get(ab) == d1);  // unchanged: the same array, nothing uploaded, nothing waited for
  CHECK(host_sync_stats().stream_syncs == syncs);
  const float* const* d2 = ptrs.get(ac);
  std::vector<const float*> back(2);
  cuda::copy_to_host(back.data(), d2, 2 * sizeof(float*));
  CHECK(back == ac);
}

}  // TEST_SUITE("cuda")
#endif  // CM_CUDA
