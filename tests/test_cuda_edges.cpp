// The CUDA twins against the CPU at the edges, one case per kernel family: empty dimensions on every axis, a single
// row, sizes around the warp and block boundaries (31/32/33, 1023/1024/1025), NaN, +-inf and -0.0, extreme finite
// values (3e38, whose square overflows float) and ties. Where a kernel's header promises the CPU's bits (integer
// plans, copies, top-k, max, dropout, the ordered adding kernels), outputs must be bit-identical (NaN matches any
// NaN); elsewhere within abs + rel * |ref|, where a NaN must meet a NaN and an infinity the same infinity.
//
// Suite "cuda": skipped without a device; `make test CUDA_EMU=1` runs it on the CPU-hosted emulator, so the
// shapes stay small. Device outputs start poisoned (NaN / a sentinel), so an element a kernel forgets shows.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>

#include "helpers.h"
#include "sorted_add.h"

#if CM_CUDA
#include "engine/cuda.h"
#include "kernels/activation.h"
#include "kernels/adamw.h"
#include "kernels/copy.h"
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

using namespace cm;
using cm::test::needs_device;

namespace {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kBig = 3e38f;  // finite; its square, and twice it, overflow float
// The sizes around a warp (32) and a block (1024) that every row/element family is tried at.
const int64_t kEdgeSizes[] = {1, 31, 32, 33, 1023, 1024, 1025};

using Vf = std::vector<float>;
using Vi = std::vector<int32_t>;

Vf rnd(int64_t n, uint64_t seed, float lo = -1.f, float hi = 1.f) {
  return n == 0 ? Vf() : cm::test::uniform({n}, seed, lo, hi).to_f32_vector();
}
// Random values with the specials spread through them: element i % 5 == 2 takes the next special in turn.
Vf spiced(int64_t n, uint64_t seed, const Vf& specials, float lo = -1.f, float hi = 1.f) {
  Vf v = rnd(n, seed, lo, hi);
  size_t s = 0;
  for (int64_t i = 2; i < n; i += 5) v[(size_t)i] = specials[s++ % specials.size()];
  return v;
}
const Vf kSpecials = {kNaN, kInf, -kInf, -0.f, kBig, -kBig, 0.f, 1e-40f /* subnormal */};

Tensor dev(const Vf& v) { return Tensor::from_vector(v, {(int64_t)v.size()}, Device::CUDA); }
Tensor dev(const Vi& v) { return Tensor::from_vector(v, {(int64_t)v.size()}, Device::CUDA); }
// A device buffer of n f32 (NaN) or i32 (a sentinel) for a kernel to overwrite.
Tensor out_f(int64_t n) { return Tensor::full({n}, kNaN, DType::F32, Device::CUDA); }
Tensor out_i(int64_t n) {
  Tensor t = Tensor::empty({n}, DType::I32, Device::CUDA);
  if (n > 0) cuda::fill32(t.raw(), 0x7eadbeefu, n);
  return t;
}
// int64 device buffers (counts, offsets) live in i32 tensors of twice the length.
std::vector<int64_t> read_i64(const Tensor& t, int64_t n) {
  Vi w = t.to_i32_vector();
  std::vector<int64_t> r((size_t)n);
  if (n > 0) std::memcpy(r.data(), w.data(), (size_t)n * 8);
  return r;
}

bool same_bits(float a, float b) { return std::memcmp(&a, &b, 4) == 0 || (a != a && b != b); }
// Bit-identical f32 (NaN matches NaN; -0.0 does not match 0.0).
void bits(const Tensor& got, const Vf& ref, const std::string& what) {
  CAPTURE(what);
  Vf g = got.to_f32_vector();
  REQUIRE(g.size() == ref.size());
  size_t i = 0;
  while (i < g.size() && same_bits(g[i], ref[i])) ++i;
  CHECK_MESSAGE(i == g.size(), "element ", i, ": got ", (i < g.size() ? g[i] : 0.f), " expected ",
                (i < ref.size() ? ref[i] : 0.f));
}
void bits(const Tensor& got, const Vi& ref, const std::string& what) {
  CAPTURE(what);
  Vi g = got.to_i32_vector();
  REQUIRE(g.size() == ref.size());
  size_t i = 0;
  while (i < g.size() && g[i] == ref[i]) ++i;
  CHECK_MESSAGE(i == g.size(), "element ", i, ": got ", (i < g.size() ? g[i] : 0), " expected ",
                (i < ref.size() ? ref[i] : 0));
}
// Within atol + rtol * |ref|; a NaN must meet a NaN, an infinity the same infinity.
bool close(float g, float r, float atol, float rtol) {
  if (r != r) return g != g;
  if (std::isinf(r)) return g == r;
  return std::fabs(g - r) <= atol + rtol * std::fabs(r);
}
void near(const Tensor& got, const Vf& ref, float atol, float rtol, const std::string& what) {
  CAPTURE(what);
  Vf g = got.to_f32_vector();
  REQUIRE(g.size() == ref.size());
  size_t i = 0;
  while (i < g.size() && close(g[i], ref[i], atol, rtol)) ++i;
  CHECK_MESSAGE(i == g.size(), "element ", i, ": got ", (i < g.size() ? g[i] : 0.f), " expected ",
                (i < ref.size() ? ref[i] : 0.f));
}
std::string sz(const char* name, std::initializer_list<int64_t> dims) {
  std::string s = name;
  for (int64_t d : dims) s += " " + std::to_string(d);
  return s;
}

// Rows of C columns for the row kernels (softmax, losses, norms, top-k), one kind per row:
//   0 random, 1 -inf at every third column, 2 all equal (ties), 3 +-3e38 among randoms, 4 zeros of both signs,
//   5 one NaN, 6 one +inf, 7 all -inf.
constexpr int64_t kRowKinds = 8;
Vf edge_rows(int64_t C, uint64_t seed, float lo = -4.f, float hi = 4.f) {
  Vf v = rnd(kRowKinds * C, seed, lo, hi);
  for (int64_t c = 0; c < C; ++c) {
    auto at = [&](int64_t r) -> float& { return v[(size_t)(r * C + c)]; };
    if (c % 3 == 1) at(1) = -kInf;
    at(2) = 0.5f;
    if (c % 4 == 1) at(3) = kBig;
    if (c % 4 == 3) at(3) = -kBig;
    at(4) = c % 2 ? -0.f : 0.f;
    at(7) = -kInf;
  }
  if (C > 0) {
    v[(size_t)(5 * C + C / 2)] = kNaN;
    v[(size_t)(6 * C + C - 1)] = kInf;
  }
  return v;
}

}  // namespace

TEST_SUITE("cuda") {
  TEST_CASE("cuda edges: gemm (empty axes, 31/32/33 and 1023/1024/1025, NaN/inf/-0 inputs, beta 0 never reads C)" *
            needs_device()) {
    struct Shape3 {
      int64_t M, N, K;
    };
    const Shape3 shapes[] = {{0, 5, 3},    {4, 0, 3},    {4, 5, 0},    {1, 1, 1},    {1, 33, 7},  {31, 32, 33},
                             {33, 31, 32}, {2, 1025, 3}, {3, 2, 1023}, {1, 1024, 1}, {1, 3, 1025}};
    uint64_t seed = 10;
    for (const Shape3& s : shapes)
      for (int t = 0; t < 4; ++t) {
        const bool ta = t & 1, tb = t & 2;
        const std::string what =
            sz("M N K", {s.M, s.N, s.K}) + " ta " + std::to_string(ta) + " tb " + std::to_string(tb);
        // NaN, inf and -0.0 in A only: a product row holding one stays non-finite on both sides (inf + -inf and
        // inf * 0 are NaN in any order); B without specials keeps the other rows comparable.
        Vf A = spiced(s.M * s.K, ++seed, {kNaN, kInf, -0.f, -kInf}), B = rnd(s.K * s.N, ++seed);
        Vf C0 = rnd(s.M * s.N, ++seed);
        const int64_t lda = ta ? s.M : s.K, ldb = tb ? s.K : s.N;
        for (float beta : {0.f, 0.5f}) {
          Vf C = beta == 0.f ? Vf((size_t)(s.M * s.N), kNaN) : C0;  // beta 0: NaN in C must not leak
          Tensor gC = beta == 0.f ? out_f(s.M * s.N) : dev(C0);
          cpu::gemm(C.data(), s.N, A.data(), lda, B.data(), ldb, s.M, s.N, s.K, ta, tb, 1.5f, beta);
          cuda::gemm(gC.f32(), s.N, dev(A).f32(), lda, dev(B).f32(), ldb, s.M, s.N, s.K, ta, tb, 1.5f, beta);
          near(gC, C, 1e-5f, 1e-5f, what + " beta " + std::to_string(beta));
        }
        // Batched: 3 products, the B operand shared (stride 0).
        const int64_t batch = 3;
        const int64_t stride_c = std::max<int64_t>(1, s.M * s.N);  // never 0 for batch > 1 (gemm.h)
        Vf Ab = rnd(batch * s.M * s.K, ++seed), Cb((size_t)(batch * s.M * s.N), kNaN);
        Tensor gCb = out_f(batch * s.M * s.N);
        cpu::gemm_strided_batched(Cb.data(), s.N, stride_c, Ab.data(), lda, s.M * s.K, B.data(), ldb, 0, batch, s.M,
                                  s.N, s.K, ta, tb);
        cuda::gemm_strided_batched(gCb.f32(), s.N, stride_c, dev(Ab).f32(), lda, s.M * s.K, dev(B).f32(), ldb, 0, batch,
                                   s.M, s.N, s.K, ta, tb);
        near(gCb, Cb, 1e-5f, 1e-5f, what + " batched");
      }
  }

  TEST_CASE("cuda edges: softmax and log-softmax rows of every kind, warp and block widths" * needs_device()) {
    uint64_t seed = 100;
    for (int64_t N : {int64_t(0), int64_t(1), kRowKinds})
      for (int64_t C : {int64_t(0), int64_t(1), int64_t(31), int64_t(32), int64_t(33), int64_t(1023), int64_t(1024),
                        int64_t(1025)}) {
        Vf x = edge_rows(C, ++seed);
        x.resize((size_t)(N * C));
        Vf dy = rnd(N * C, ++seed);
        const std::string what = sz("N C", {N, C});
        for (bool log : {false, true}) {
          Vf y((size_t)(N * C)), dx((size_t)(N * C));
          Tensor gy = out_f(N * C), gdx = out_f(N * C);
          if (log) {
            cpu::log_softmax_forward(y.data(), x.data(), N, C);
            cuda::log_softmax_forward(gy.f32(), dev(x).f32(), N, C);
            // The backward from the CPU's forward output, so each direction is compared on its own.
            cpu::log_softmax_backward(dx.data(), dy.data(), y.data(), N, C);
            cuda::log_softmax_backward(gdx.f32(), dev(dy).f32(), dev(y).f32(), N, C);
            near(gy, y, 1e-5f, 1e-5f, "log_softmax " + what);
            near(gdx, dx, 1e-5f, 1e-4f, "log_softmax backward " + what);
          } else {
            cpu::softmax_forward(y.data(), x.data(), N, C);
            cuda::softmax_forward(gy.f32(), dev(x).f32(), N, C);
            cpu::softmax_backward(dx.data(), dy.data(), y.data(), N, C);
            cuda::softmax_backward(gdx.f32(), dev(dy).f32(), dev(y).f32(), N, C);
            near(gy, y, 1e-7f, 1e-5f, "softmax " + what);
            near(gdx, dx, 1e-6f, 1e-4f, "softmax backward " + what);
          }
        }
      }
  }

  TEST_CASE("cuda edges: scaled causal softmax at T = 0, 1, 31, 32, 33 with NaN and inf scores" * needs_device()) {
    // CPU reference: scale, -inf above the diagonal, softmax; backward scale * softmax_backward. NaN in the masked
    // half of the scores must not be read.
    uint64_t seed = 200;
    for (int64_t BH : {int64_t(0), int64_t(1), int64_t(2)})
      for (int64_t T : {int64_t(0), int64_t(1), int64_t(31), int64_t(32), int64_t(33)}) {
        const float scale = 0.25f;
        Vf s = spiced(BH * T * T, ++seed, {kNaN, kInf, -kInf, -0.f, kBig}, -4.f, 4.f), dy = rnd(BH * T * T, ++seed);
        Vf z((size_t)(BH * T * T)), y(z.size()), dz(z.size());
        for (int64_t b = 0; b < BH; ++b)
          for (int64_t i = 0; i < T; ++i)
            for (int64_t j = 0; j < T; ++j) {
              const size_t at = (size_t)((b * T + i) * T + j);
              z[at] = j <= i ? scale * s[at] : -kInf;
            }
        cpu::softmax_forward(y.data(), z.data(), BH * T, T);
        cpu::softmax_backward(dz.data(), dy.data(), y.data(), BH * T, T);
        for (float& v : dz) v *= scale;
        // The kernel's contract (kernels/softmax.h): the masked half is exactly 0, also in a row that a NaN or +inf
        // made NaN, where the composition above gives NaN everywhere. The unmasked half is NaN either way.
        for (int64_t b = 0; b < BH; ++b)
          for (int64_t i = 0; i < T; ++i)
            for (int64_t j = i + 1; j < T; ++j)
              y[(size_t)((b * T + i) * T + j)] = dz[(size_t)((b * T + i) * T + j)] = 0.f;
        Tensor gy = out_f(BH * T * T), gdz = out_f(BH * T * T);
        cuda::causal_softmax_forward(gy.f32(), dev(s).f32(), scale, BH, T);
        cuda::causal_softmax_backward(gdz.f32(), dev(dy).f32(), dev(y).f32(), scale, BH, T);
        const std::string what = sz("BH T", {BH, T});
        near(gy, y, 1e-7f, 1e-5f, "forward " + what);
        near(gdz, dz, 1e-6f, 1e-4f, "backward " + what);
      }
  }

  TEST_CASE("cuda edges: top-k equals the CPU bit for bit (ties, NaN, -0/+0, inf; k 0, 1, 8, 9, n)" * needs_device()) {
    uint64_t seed = 300;
    for (int64_t n : kEdgeSizes)
      for (int64_t k : {int64_t(0), int64_t(1), int64_t(2), int64_t(8), int64_t(9), n}) {
        if (k > n) continue;
        for (int64_t R : {int64_t(0), int64_t(1), kRowKinds}) {
          Vf x = edge_rows(n, ++seed);
          x.resize((size_t)(R * n));
          Vf v((size_t)(R * k));
          Vi ix((size_t)(R * k));
          cpu::topk_forward(v.data(), ix.data(), x.data(), R, n, k);
          Tensor gv = out_f(R * k), gi = out_i(R * k);
          cuda::topk_forward(gv.f32(), gi.i32(), dev(x).f32(), R, n, k);
          const std::string what = sz("R n k", {R, n, k});
          bits(gi, ix, "indices " + what);
          bits(gv, v, "values " + what);
          Vf dv = rnd(R * k, ++seed), dx((size_t)(R * n));
          cpu::topk_backward(dx.data(), dv.data(), ix.data(), R, n, k);
          Tensor gdx = out_f(R * n);
          cuda::topk_backward(gdx.f32(), dev(dv).f32(), dev(ix).i32(), R, n, k);
          bits(gdx, dx, "backward " + what);
        }
      }
  }

  TEST_CASE("cuda edges: fused router softmax + top-k against softmax then top-k" * needs_device()) {
    // Rows whose probabilities are distinct (or tie exactly, as equal logits do) must select the CPU's indices;
    // a row holding NaN or +inf has NaN probabilities, where only the gates (NaN) are compared.
    uint64_t seed = 400;
    for (int64_t n : {int64_t(1), int64_t(31), int64_t(32), int64_t(33), int64_t(1025)})
      for (int64_t k : {int64_t(1), int64_t(2), int64_t(8), int64_t(9)}) {
        if (k > n) continue;
        // Rows: distinct spaced logits, all equal, -inf at every third column, one NaN, one +inf.
        const int64_t R = 5;
        Vf x((size_t)(R * n));
        for (int64_t c = 0; c < n; ++c) {
          x[(size_t)c] = 0.01f * (float)((c * 7919) % n) - 2.f;  // a permutation of 0..n-1 scaled: distinct
          x[(size_t)(n + c)] = 1.f;
          x[(size_t)(2 * n + c)] = c % 3 == 1 ? -kInf : 0.01f * (float)((c * 7919) % n);
          x[(size_t)(3 * n + c)] = x[(size_t)c];
          x[(size_t)(4 * n + c)] = x[(size_t)c];
        }
        x[(size_t)(3 * n + n / 2)] = kNaN;
        x[(size_t)(4 * n + n - 1)] = kInf;
        ++seed;
        Vf p((size_t)(R * n)), v((size_t)(R * k));
        Vi ix((size_t)(R * k));
        cpu::softmax_forward(p.data(), x.data(), R, n);
        cpu::topk_forward(v.data(), ix.data(), p.data(), R, n, k);
        Tensor gp = out_f(R * n), gv = out_f(R * k), gi = out_i(R * k);
        cuda::softmax_topk_forward(gp.f32(), gv.f32(), gi.i32(), dev(x).f32(), R, n, k);
        const std::string what = sz("n k", {n, k});
        near(gp, p, 1e-7f, 1e-5f, "probs " + what);
        near(gv, v, 1e-7f, 1e-5f, "gates " + what);
        const Vi gix = gi.to_i32_vector();
        const Vf gpv = gp.to_f32_vector(), gvv = gv.to_f32_vector();
        // Where -inf columns tie at probability 0 within the top k (n = 1: k > finite count), both take lower index.
        Vi head(ix.begin(), ix.begin() + 3 * k), ghead(gix.begin(), gix.begin() + 3 * k);
        CHECK_MESSAGE(ghead == head, "indices of the finite rows ", what);
        for (int64_t r = 0; r < R; ++r)
          for (int64_t j = 0; j < k; ++j) {
            const int32_t c = gix[(size_t)(r * k + j)];
            REQUIRE(c >= 0);
            REQUIRE(c < n);
            CHECK(same_bits(gvv[(size_t)(r * k + j)], gpv[(size_t)(r * n + c)]));  // gates are the probs' bits
          }
        // Backward from the CPU's selection, with and without dprobs.
        Vf dg = rnd(R * k, ++seed), dp = rnd(R * n, ++seed);
        for (bool with_dp : {true, false}) {
          Vf g = with_dp ? dp : Vf((size_t)(R * n), 0.f), dl((size_t)(R * n));
          for (int64_t r = 0; r < R; ++r)
            for (int64_t j = 0; j < k; ++j) g[(size_t)(r * n + ix[(size_t)(r * k + j)])] += dg[(size_t)(r * k + j)];
          cpu::softmax_backward(dl.data(), g.data(), p.data(), R, n);
          Tensor gdl = out_f(R * n), dP = dev(dp);
          cuda::softmax_topk_backward(gdl.f32(), with_dp ? dP.f32() : nullptr, dev(dg).f32(), dev(ix).i32(),
                                      dev(p).f32(), R, n, k);
          near(gdl, dl, 1e-6f, 1e-4f, std::string("backward ") + (with_dp ? "" : "gates only ") + what);
        }
      }
  }

  TEST_CASE(
      "cuda edges: dispatch plan, permute and combine (empty, one expert, 31..1025 assignments, drops, "
      "out-of-range ids, NaN gates of dropped slots)" *
      needs_device()) {
    uint64_t seed = 500;
    for (int64_t A :
         {int64_t(0), int64_t(1), int64_t(31), int64_t(32), int64_t(33), int64_t(1023), int64_t(1024), int64_t(1025)})
      for (int64_t N : {int64_t(1), int64_t(3), int64_t(33)})
        for (int variant = 0; variant < 3; ++variant) {
          // 0: random experts with every 7th dropped; 1: all on expert N-1 (a single tied key: stability);
          // 2: random with out-of-range ids (N, -2) that the plan skips and counts.
          Vf u = rnd(A, ++seed, 0.f, 1.f);
          Vi e((size_t)A);
          for (int64_t a = 0; a < A; ++a) {
            int32_t id = (int32_t)std::min<int64_t>(N - 1, (int64_t)(u[(size_t)a] * (float)N));
            if (variant == 0 && a % 7 == 2) id = -1;
            if (variant == 1) id = (int32_t)(N - 1);
            if (variant == 2 && a % 5 == 1) id = a % 2 ? (int32_t)N : -2;
            e[(size_t)a] = id;
          }
          const std::string what = sz("A N variant", {A, N, variant});
          std::vector<int64_t> counts((size_t)N), offsets((size_t)N + 1);
          Vi row_of((size_t)A), assign_of((size_t)A);
          const int64_t bad =
              cpu::dispatch_plan(counts.data(), offsets.data(), row_of.data(), assign_of.data(), e.data(), A, N);
          Tensor gc = out_i(2 * N), go = out_i(2 * (N + 1)), gr = out_i(A), ga = out_i(A);
          const int64_t gbad =
              cuda::dispatch_plan((int64_t*)gc.raw(), (int64_t*)go.raw(), gr.i32(), ga.i32(), dev(e).i32(), A, N);
          CAPTURE(what);
          CHECK(gbad == bad);
          CHECK(read_i64(gc, N) == counts);
          CHECK(read_i64(go, N + 1) == offsets);
          bits(gr, row_of, "row_of " + what);
          const int64_t Ap = offsets[(size_t)N];
          Vi kept(assign_of.begin(), assign_of.begin() + Ap);
          bits(ga.slice(0, 0, Ap), kept, "assign_of " + what);
          if (variant == 2) continue;  // permute/combine take plans without out-of-range ids
          // Permute and combine: K = 1 when A is odd (a token per assignment), else 2 slots per token.
          const int64_t K = A % 2 ? 1 : 2, T = A / K, C = A > 64 ? 3 : 33;
          // ye holds infinities but no 3e38: a dot product that overflows on the way would depend on the order of its
          // partial sums, which the two backends choose differently (d_gate is compared within tolerance).
          Vf x = spiced(T * C, ++seed, {kNaN, kInf, -0.f, kBig}), ye = spiced(Ap * C, ++seed, {-kInf, -0.f, 1e-40f});
          Vf gate = rnd(A, ++seed, 0.f, 1.f);
          for (int64_t a = 0; a < A; ++a)
            if (row_of[(size_t)a] < 0) gate[(size_t)a] = kNaN;  // dropped slots' gates are not read
          Vf xe((size_t)(Ap * C)), out((size_t)(T * C)), dx((size_t)(T * C));
          cpu::dispatch_permute(xe.data(), x.data(), kept.data(), Ap, K, C);
          cpu::dispatch_combine(out.data(), ye.data(), gate.data(), row_of.data(), T, K, C);
          Tensor gxe = out_f(Ap * C), gout = out_f(T * C), gdx = out_f(T * C);
          cuda::dispatch_permute(gxe.f32(), dev(x).f32(), dev(kept).i32(), Ap, K, C);
          cuda::dispatch_combine(gout.f32(), dev(ye).f32(), dev(gate).f32(), dev(row_of).i32(), T, K, C);
          bits(gxe, xe, "permute " + what);
          near(gout, out, 1e-6f, 1e-5f, "combine " + what);
          // Backward: d_xe carries the specials; the permute backward adds a token's slots in slot order.
          Vf dxe = spiced(Ap * C, ++seed, {kNaN, -0.f, kBig, kBig}), dout = spiced(T * C, ++seed, {-0.f, kInf});
          cpu::dispatch_permute_backward(dx.data(), dxe.data(), row_of.data(), T, K, C);
          cuda::dispatch_permute_backward(gdx.f32(), dev(dxe).f32(), dev(row_of).i32(), T, K, C);
          bits(gdx, dx, "permute backward " + what);
          Vf dye((size_t)(Ap * C)), dgate((size_t)A);
          cpu::dispatch_combine_backward(dye.data(), dgate.data(), dout.data(), ye.data(), gate.data(), row_of.data(),
                                         kept.data(), T, Ap, K, C);
          Tensor gdye = out_f(Ap * C), gdg = out_f(A);
          cuda::dispatch_combine_backward(gdye.f32(), gdg.f32(), dev(dout).f32(), dev(ye).f32(), dev(gate).f32(),
                                          dev(row_of).i32(), dev(kept).i32(), T, Ap, K, C);
          near(gdye, dye, 1e-7f, 1e-6f, "combine backward d_ye " + what);
          near(gdg, dgate, 1e-5f, 1e-4f, "combine backward d_gate " + what);
        }
  }

  TEST_CASE("cuda edges: cross-entropy (ignored rows, extreme and non-finite logits, V around 32 and 1024)" *
            needs_device()) {
    uint64_t seed = 600;
    for (int64_t V : kEdgeSizes)
      for (int64_t N : {int64_t(0), int64_t(1), kRowKinds}) {
        Vf x = edge_rows(V, ++seed);
        x.resize((size_t)(N * V));
        Vi t((size_t)N);
        for (int64_t r = 0; r < N; ++r) t[(size_t)r] = r == 3 ? -100 : (int32_t)((r * 13) % V);  // row 3 ignored
        Vf loss((size_t)N), lse((size_t)N), dx((size_t)(N * V));
        cpu::cross_entropy_forward(loss.data(), lse.data(), x.data(), t.data(), N, V, -100);
        cpu::cross_entropy_backward(dx.data(), x.data(), lse.data(), t.data(), 0.5f, N, V, -100);
        Tensor gl = out_f(N), glse = out_f(N), gdx = out_f(N * V);
        cuda::cross_entropy_forward(gl.f32(), glse.f32(), dev(x).f32(), dev(t).i32(), N, V, -100);
        cuda::cross_entropy_backward(gdx.f32(), dev(x).f32(), dev(lse).f32(), dev(t).i32(), 0.5f, N, V, -100);
        const std::string what = sz("N V", {N, V});
        near(gl, loss, 1e-5f, 1e-5f, "losses " + what);
        near(glse, lse, 1e-5f, 1e-5f, "lse " + what);
        near(gdx, dx, 1e-7f, 1e-5f, "backward " + what);
      }
  }

  TEST_CASE("cuda edges: router z-loss with logits whose logsumexp squared overflows" * needs_device()) {
    // Double reference: weight * mean_r lse_r^2 (rounded once), its gradient weight * 2 lse_r / R * softmax.
    uint64_t seed = 650;
    for (int64_t E : {int64_t(1), int64_t(31), int64_t(32), int64_t(33)})
      for (int64_t R : {int64_t(1), int64_t(33), int64_t(1025)})
        for (bool extreme : {false, true}) {
          Vf x = rnd(R * E, ++seed, -3.f, 3.f);
          if (extreme) x[0] = 2e19f;  // lse^2 = 4e38 is past float, weight * mean(lse^2) is not: no overflow allowed
          std::vector<double> lse((size_t)R);
          double sum = 0.0;
          for (int64_t r = 0; r < R; ++r) {
            double m = -INFINITY, s = 0.0;
            for (int64_t e = 0; e < E; ++e) m = std::max(m, (double)x[(size_t)(r * E + e)]);
            for (int64_t e = 0; e < E; ++e) s += std::exp((double)x[(size_t)(r * E + e)] - m);
            lse[(size_t)r] = m + std::log(s);
            sum += lse[(size_t)r] * lse[(size_t)r];
          }
          const float w = 0.01f;
          Tensor gloss = out_f(1), glse = out_f(R);
          cuda::z_loss_forward(gloss.f32(), glse.f32(), dev(x).f32(), R, E, w);
          const std::string what = sz("R E extreme", {R, E, extreme});
          near(glse, Vf(lse.begin(), lse.end()), 1e-5f, 1e-5f, "lse " + what);
          near(gloss, Vf{(float)((double)w * (sum / (double)R))}, 1e-7f, 1e-5f, "loss " + what);
          if (extreme) continue;
          Vf dl((size_t)(R * E));
          for (int64_t r = 0; r < R; ++r)
            for (int64_t e = 0; e < E; ++e)
              dl[(size_t)(r * E + e)] = (float)(0.5 * w * 2.0 * lse[(size_t)r] / (double)R *
                                                std::exp((double)x[(size_t)(r * E + e)] - lse[(size_t)r]));
          Tensor gdl = out_f(R * E);
          cuda::z_loss_backward(gdl.f32(), dev(Vf{0.5f}).f32(), dev(x).f32(), glse.f32(), R, E, w);
          near(gdl, dl, 1e-8f, 1e-4f, "backward " + what);
        }
  }

  TEST_CASE("cuda edges: layernorm and rmsnorm (constant rows, 1e19 rows whose squares overflow, NaN, inf)" *
            needs_device()) {
    uint64_t seed = 700;
    for (int64_t C : kEdgeSizes)
      for (int64_t N : {int64_t(0), int64_t(1), int64_t(6), int64_t(33)}) {
        // Rows: random, constant (variance 0), around 1e19 (x^2 past float), -0.0 only, one NaN, one +inf.
        Vf x = rnd(N * C, ++seed, -2.f, 2.f);
        for (int64_t r = 0; r < N; ++r)
          for (int64_t c = 0; c < C; ++c) {
            float& v = x[(size_t)(r * C + c)];
            if (r % 6 == 1) v = 0.75f;
            if (r % 6 == 2) v *= 1e19f;
            if (r % 6 == 3) v = -0.f;
            if (r % 6 == 4 && c == C / 2) v = kNaN;
            if (r % 6 == 5 && c == 0) v = kInf;
          }
        Vf w = rnd(C, ++seed, 0.5f, 1.5f), b = rnd(C, ++seed), dy = rnd(N * C, ++seed);
        const std::string what = sz("N C", {N, C});
        Vf y((size_t)(N * C)), mean((size_t)N), rstd((size_t)N), dx((size_t)(N * C)), dw((size_t)C), db((size_t)C);
        cpu::layernorm_forward(y.data(), mean.data(), rstd.data(), x.data(), w.data(), b.data(), N, C, 1e-5f);
        cpu::layernorm_backward(dx.data(), dw.data(), db.data(), dy.data(), x.data(), w.data(), mean.data(),
                                rstd.data(), N, C);
        Tensor gy = out_f(N * C), gm = out_f(N), gr = out_f(N), gdx = out_f(N * C), gdw = out_f(C), gdb = out_f(C);
        Tensor dX = dev(x), dW = dev(w);
        cuda::layernorm_forward(gy.f32(), gm.f32(), gr.f32(), dX.f32(), dW.f32(), dev(b).f32(), N, C, 1e-5f);
        cuda::layernorm_backward(gdx.f32(), gdw.f32(), gdb.f32(), dev(dy).f32(), dX.f32(), dW.f32(), dev(mean).f32(),
                                 dev(rstd).f32(), N, C);
        near(gy, y, 1e-5f, 1e-5f, "layernorm " + what);
        {  // a mean cancels: its rounding error scales with the row's magnitude, mean |x|, not with |mean|
          CAPTURE(what);
          const Vf g = gm.to_f32_vector();
          for (int64_t r = 0; r < N; ++r) {
            double mag = 0;
            for (int64_t c = 0; c < C; ++c) {
              const float v = x[(size_t)(r * C + c)];
              if (std::isfinite(v)) mag += std::fabs(v) / (double)C;
            }
            CHECK_MESSAGE(close(g[(size_t)r], mean[(size_t)r], 1e-6f + 1e-6f * (float)mag, 1e-5f), "layernorm mean row ",
                          r, ": got ", g[(size_t)r], " expected ", mean[(size_t)r]);
          }
        }
        near(gr, rstd, 1e-6f, 1e-5f, "layernorm rstd " + what);
        near(gdx, dx, 1e-5f, 1e-4f, "layernorm dx " + what);
        near(gdw, dw, 1e-5f, 1e-4f, "layernorm dweight " + what);
        near(gdb, db, 1e-5f, 1e-4f, "layernorm dbias " + what);
        Vf ry((size_t)(N * C)), rr((size_t)N), rdx((size_t)(N * C)), rdw((size_t)C);
        cpu::rmsnorm_forward(ry.data(), rr.data(), x.data(), w.data(), N, C, 1e-5f);
        cpu::rmsnorm_backward(rdx.data(), rdw.data(), dy.data(), x.data(), w.data(), rr.data(), N, C);
        Tensor gry = out_f(N * C), grr = out_f(N), grdx = out_f(N * C), grdw = out_f(C);
        cuda::rmsnorm_forward(gry.f32(), grr.f32(), dX.f32(), dW.f32(), N, C, 1e-5f);
        cuda::rmsnorm_backward(grdx.f32(), grdw.f32(), dev(dy).f32(), dX.f32(), dW.f32(), dev(rr).f32(), N, C);
        near(gry, ry, 1e-5f, 1e-5f, "rmsnorm " + what);
        near(grr, rr, 1e-6f, 1e-5f, "rmsnorm rstd " + what);
        near(grdx, rdx, 1e-5f, 1e-4f, "rmsnorm dx " + what);
        near(grdw, rdw, 1e-5f, 1e-4f, "rmsnorm dweight " + what);
      }
  }

  TEST_CASE("cuda edges: activations at NaN, +-inf, -0.0, 3e38 and saturation, sizes 0..1025" * needs_device()) {
    using Fwd = void (*)(float*, const float*, int64_t);
    using Bwd = void (*)(float*, const float*, const float*, int64_t);
    struct Act {
      const char* name;
      Fwd cf, gf;
      Bwd cb, gb;
      bool from_y;  // backward takes the forward's output
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
    // Saturation points (exp overflows past 88.7, sigmoid and tanh saturate) among the specials.
    const Vf specials = {kNaN, kInf, -kInf, -0.f, 0.f, kBig, -kBig, 88.f, 89.f, -104.f, 20.f, -20.f, 1e-40f};
    uint64_t seed = 800;
    for (int64_t n : {int64_t(0), int64_t(1), int64_t(31), int64_t(33), int64_t(1025)})
      for (const Act& a : acts) {
        Vf x = spiced(n, ++seed, specials, -6.f, 6.f), dy = rnd(n, ++seed);
        Vf y((size_t)n), dx((size_t)n);
        a.cf(y.data(), x.data(), n);
        Tensor gy = out_f(n), gdx = out_f(n);
        a.gf(gy.f32(), dev(x).f32(), n);
        const std::string what = std::string(a.name) + " n " + std::to_string(n);
        near(gy, y, 1e-6f, 1e-5f, what + " forward");
        const Vf& saved = a.from_y ? y : x;
        a.cb(dx.data(), dy.data(), saved.data(), n);
        a.gb(gdx.f32(), dev(dy).f32(), dev(saved).f32(), n);
        near(gdx, dx, 1e-6f, 1e-5f, what + " backward");
      }
  }

  TEST_CASE("cuda edges: embedding (one row, repeated ids, 31..1025 lookups, non-finite rows) bit for bit" *
            needs_device()) {
    uint64_t seed = 900;
    for (int64_t N : {int64_t(0), int64_t(1), int64_t(31), int64_t(32), int64_t(33), int64_t(1025)})
      for (int64_t V : {int64_t(1), int64_t(33)})
        for (int64_t C : {int64_t(1), int64_t(32), int64_t(33)}) {
          Vf w = spiced(V * C, ++seed, kSpecials), dout = spiced(N * C, ++seed, {-0.f, kBig, kBig, -kBig});
          Vf u = rnd(N, ++seed, 0.f, 1.f);
          Vi ids((size_t)N);
          for (int64_t n = 0; n < N; ++n)
            ids[(size_t)n] = n % 4 == 0 ? 0 : (int32_t)std::min<int64_t>(V - 1, (int64_t)(u[(size_t)n] * (float)V));
          Vf out((size_t)(N * C)), dw = rnd(V * C, ++seed);
          const Vf chunked = cm::test::chunked_add(dw, dout, ids, 1, V, N, C, cuda::kRunChunk);
          Tensor gout = out_f(N * C), gdw = dev(dw);
          cpu::embedding_forward(out.data(), w.data(), ids.data(), N, V, C);
          cpu::embedding_backward(dw.data(), dout.data(), ids.data(), N, V, C);
          cuda::embedding_forward(gout.f32(), dev(w).f32(), dev(ids).i32(), N, V, C);
          cuda::embedding_backward(gdw.f32(), dev(dout).f32(), dev(ids).i32(), N, V, C);
          const std::string what = sz("N V C", {N, V, C});
          bits(gout, out, "forward " + what);
          // The header's promise (kernels/index.h, the sorted add): the CPU's order for ids seen at most kRunChunk
          // times, chunk sums in chunk order beyond (N = 1025: a run of 1025 or 257), bit for bit with specials.
          bits(gdw, chunked, "backward (accumulated) " + what);
          int64_t longest = 0;
          for (int64_t v = 0; v < V; ++v) longest = std::max<int64_t>(longest, std::count(ids.begin(), ids.end(), v));
          if (longest <= cuda::kRunChunk) bits(gdw, dw, "backward (accumulated), the CPU's bits " + what);
        }
  }

  TEST_CASE("cuda edges: AdamW with gradients whose squares overflow, NaN and inf gradients, -0.0 parameters" *
            needs_device()) {
    uint64_t seed = 1000;
    for (int64_t n : {int64_t(0), int64_t(1), int64_t(31), int64_t(33), int64_t(1025)}) {
      // 3e38 squared overflows float: v becomes inf, the update lr * m / (inf + eps) = 0; both must agree.
      Vf p = spiced(n, ++seed, {-0.f, 0.f, kBig}), g = spiced(n, ++seed, {kBig, -kBig, kNaN, kInf, -0.f, 1e20f});
      Vf m = rnd(n, ++seed, -0.1f, 0.1f), v = rnd(n, ++seed, 0.f, 0.01f);
      Tensor gp = dev(p), gm = dev(m), gv = dev(v), gg = dev(g);
      Tensor fp = dev(p), fm = dev(m), fv = dev(v);
      for (int64_t t = 1; t <= 2; ++t) {
        cpu::adamw_step(p.data(), m.data(), v.data(), g.data(), n, 1e-3f, 0.9f, 0.95f, 1e-8f, 0.1f, t);
        cuda::adamw_step(gp.f32(), gm.f32(), gv.f32(), gg.f32(), n, 1e-3f, 0.9f, 0.95f, 1e-8f, 0.1f, t);
        const cuda::AdamWSlice s[2] = {
            {fp.f32(), fm.f32(), fv.f32(), gg.f32(), n / 2, 0.1f},
            {fp.f32() + n / 2, fm.f32() + n / 2, fv.f32() + n / 2, gg.f32() + n / 2, n - n / 2, 0.1f}};
        cuda::adamw_step_multi(s, 2, 1e-3f, 0.9f, 0.95f, 1e-8f, t);
      }
      const std::string what = "n " + std::to_string(n);
      near(gp, p, 1e-6f, 1e-5f, "param " + what);
      near(gm, m, 1e-7f, 1e-5f, "m " + what);
      near(gv, v, 1e-9f, 1e-5f, "v " + what);
      bits(fp, gp.to_f32_vector(), "fused param equals single " + what);  // the same arithmetic per element
      bits(fv, gv.to_f32_vector(), "fused v equals single " + what);
    }
  }

  TEST_CASE("cuda edges: sums and max (empty axes, 31..1025, NaN first-wins, ties, 3e38 sums past float)" *
            needs_device()) {
    uint64_t seed = 1100;
    // sum_all: double accumulation, so 3e38 + 3e38 - 3e38 stays finite until the final rounding.
    for (int64_t n :
         {int64_t(0), int64_t(1), int64_t(31), int64_t(32), int64_t(33), int64_t(1023), int64_t(1024), int64_t(1025)})
      for (const Vf& sp : {Vf{kBig, kBig, -kBig}, Vf{kBig, kBig}, Vf{kNaN}, Vf{kInf, -0.f}}) {
        Vf a = spiced(n, ++seed, sp);
        float s = kNaN;
        cpu::sum_all(&s, a.data(), n, 0.5f);
        Tensor gs = out_f(1);
        cuda::sum_all(gs.f32(), dev(a).f32(), n, 0.5f);
        near(gs, Vf{s}, 1e-6f, 1e-6f, "sum_all n " + std::to_string(n));
        if (n == 0) continue;
        float mv = 0.f;
        int64_t mi = -1;
        cpu::max_all(&mv, &mi, a.data(), n);
        Tensor gmv = out_f(1), gmi = out_i(2);
        cuda::max_all(gmv.f32(), (int64_t*)gmi.raw(), dev(a).f32(), n);
        bits(gmv, Vf{mv}, "max_all value n " + std::to_string(n));
        CHECK(read_i64(gmi, 1)[0] == mi);
      }
    // Axis reductions over [O, R, I] with every axis empty in turn; ties and NaN along R. The last shape has more
    // blocks of 256 rows than a grid's y dimension takes at once (kGridCapY: 255 under the emulator).
    struct ORI {
      int64_t O, R, I;
    };
    const ORI shapes[] = {{0, 3, 2},   {2, 0, 3},   {3, 2, 0},    {1, 1, 1},    {1, 1025, 1},
                          {2, 33, 31}, {1, 32, 33}, {3, 1, 1024}, {1, 1023, 2}, {31, 3, 1},
                          {2, (cuda::kGridCapY + 2) * 256 + 3, 2}};
    for (const ORI& s : shapes) {
      const int64_t n = s.O * s.R * s.I;
      Vf a = spiced(n, ++seed, {kNaN, 0.5f, 0.5f, -kInf, kBig, kBig, -0.f, 0.f});
      Vf sum((size_t)(s.O * s.I), kNaN);
      cpu::sum_axis(sum.data(), a.data(), s.O, s.R, s.I, 2.f);
      Tensor gsum = out_f(s.O * s.I);
      cuda::sum_axis(gsum.f32(), dev(a).f32(), s.O, s.R, s.I, 2.f);
      const std::string what = sz("O R I", {s.O, s.R, s.I});
      near(gsum, sum, 1e-6f, 1e-6f, "sum_axis " + what);
      // sum_to of [O, R, I] onto [O, 1, I] and [1, R, 1]
      const int64_t ash[3] = {s.O, s.R, s.I}, o1[3] = {s.O, 1, s.I}, o2[3] = {1, s.R, 1};
      Vf st1((size_t)(s.O * s.I), kNaN), st2((size_t)s.R, kNaN);
      cpu::sum_to(st1.data(), a.data(), 3, ash, o1);
      cpu::sum_to(st2.data(), a.data(), 3, ash, o2);
      Tensor gst1 = out_f(s.O * s.I), gst2 = out_f(s.R);
      cuda::sum_to(gst1.f32(), dev(a).f32(), 3, ash, o1);
      cuda::sum_to(gst2.f32(), dev(a).f32(), 3, ash, o2);
      near(gst1, st1, 1e-6f, 1e-6f, "sum_to [O,1,I] " + what);
      near(gst2, st2, 1e-6f, 1e-6f, "sum_to [1,R,1] " + what);
      if (s.R == 0) continue;  // max needs R >= 1
      Vf mv((size_t)(s.O * s.I));
      Vi mi((size_t)(s.O * s.I));
      cpu::max_axis(mv.data(), mi.data(), a.data(), s.O, s.R, s.I);
      Tensor gmv = out_f(s.O * s.I), gmi = out_i(s.O * s.I);
      cuda::max_axis(gmv.f32(), gmi.i32(), dev(a).f32(), s.O, s.R, s.I);
      bits(gmv, mv, "max_axis " + what);
      bits(gmi, mi, "argmax " + what);
      Vf dy = rnd(s.O * s.I, ++seed), dx((size_t)n);
      cpu::max_axis_backward(dx.data(), dy.data(), mi.data(), s.O, s.R, s.I);
      Tensor gdx = out_f(n);
      cuda::max_axis_backward(gdx.f32(), dev(dy).f32(), dev(mi).i32(), s.O, s.R, s.I);
      bits(gdx, dx, "max_axis backward " + what);
    }
  }

  TEST_CASE("cuda edges: elementwise (IEEE ops bit for bit on NaN, inf, -0.0, 3e38; empty and 1..1025 sizes)" *
            needs_device()) {
    // +, -, *, / are correctly rounded on both sides: bit-identical, signs of zero included. sqrt too (IEEE on the
    // GPU by default); log and pow go through libraries that differ by an ulp: near.
    uint64_t seed = 1200;
    for (int64_t n :
         {int64_t(0), int64_t(1), int64_t(31), int64_t(32), int64_t(33), int64_t(1023), int64_t(1024), int64_t(1025)}) {
      Vf a = spiced(n, ++seed, kSpecials), b = spiced(n, ++seed, {0.f, -0.f, kBig, kInf, kNaN, -kBig});
      const std::string what = "n " + std::to_string(n);
      for (cpu::Binary op : {cpu::Binary::Add, cpu::Binary::Sub, cpu::Binary::Mul, cpu::Binary::Div}) {
        Vf out((size_t)n);
        cpu::binary(op, out.data(), a.data(), b.data(), n);
        Tensor g = out_f(n);
        cuda::binary(op, g.f32(), dev(a).f32(), dev(b).f32(), n);
        bits(g, out, "binary " + std::to_string((int)op) + " " + what);
      }
      for (cpu::Scalar op : {cpu::Scalar::Add, cpu::Scalar::Mul, cpu::Scalar::RSub, cpu::Scalar::RDiv}) {
        Vf out((size_t)n);
        cpu::scalar(op, out.data(), a.data(), -0.f, n);  // x + -0.0 keeps -0.0, x * -0.0 flips signs, 1 / -0.0
        Tensor g = out_f(n);
        cuda::scalar(op, g.f32(), dev(a).f32(), -0.f, n);
        bits(g, out, "scalar " + std::to_string((int)op) + " " + what);
      }
      for (cpu::Unary op : {cpu::Unary::Neg, cpu::Unary::Sqrt, cpu::Unary::Square, cpu::Unary::Log}) {
        Vf out((size_t)n);
        cpu::unary(op, out.data(), a.data(), n);
        Tensor g = out_f(n);
        cuda::unary(op, g.f32(), dev(a).f32(), n);
        if (op == cpu::Unary::Log)
          near(g, out, 1e-7f, 2e-6f, "unary log " + what);
        else
          bits(g, out, "unary " + std::to_string((int)op) + " " + what);
      }
      for (float p : {0.f, 0.5f, 2.f, -1.f}) {
        Vf out((size_t)n), dx((size_t)n), dy = rnd(n, ++seed);
        cpu::scalar(cpu::Scalar::Pow, out.data(), a.data(), p, n);
        cpu::pow_backward(dx.data(), dy.data(), a.data(), p, n);
        Tensor g = out_f(n), gdx = out_f(n);
        cuda::scalar(cpu::Scalar::Pow, g.f32(), dev(a).f32(), p, n);
        cuda::pow_backward(gdx.f32(), dev(dy).f32(), dev(a).f32(), p, n);
        near(g, out, 1e-7f, 2e-6f, "pow " + std::to_string(p) + " " + what);
        near(gdx, dx, 1e-7f, 2e-6f, "pow_backward " + std::to_string(p) + " " + what);
      }
    }
    // Row broadcast and general broadcast with empty axes and rows of 1, 31..33, 1025.
    for (int64_t R : {int64_t(0), int64_t(1), int64_t(3)})
      for (int64_t C : {int64_t(0), int64_t(1), int64_t(31), int64_t(33), int64_t(1025)}) {
        Vf a = spiced(R * C, ++seed, kSpecials), b = spiced(C, ++seed, {-0.f, kInf, 0.f});
        Vf out((size_t)(R * C));
        cpu::binary_rows(cpu::Binary::Div, out.data(), a.data(), b.data(), R, C);
        Tensor g = out_f(R * C);
        cuda::binary_rows(cpu::Binary::Div, g.f32(), dev(a).f32(), dev(b).f32(), R, C);
        bits(g, out, sz("binary_rows R C", {R, C}));
        // [R, 1, C] op [1, 2, C] -> [R, 2, C]; and a materialised broadcast of b to it.
        const int64_t shape[3] = {R, 2, C}, as[3] = {C, 0, 1}, bs[3] = {0, C, 1};
        Vf b2 = spiced(2 * C, ++seed, {kNaN, -0.f}), o2((size_t)(R * 2 * C)), bc((size_t)(R * 2 * C));
        cpu::binary_strided(cpu::Binary::Mul, o2.data(), a.data(), b2.data(), 3, shape, as, bs);
        cpu::broadcast_to(bc.data(), b2.data(), 3, shape, bs);
        Tensor g2 = out_f(R * 2 * C), gbc = out_f(R * 2 * C);
        cuda::binary_strided(cpu::Binary::Mul, g2.f32(), dev(a).f32(), dev(b2).f32(), 3, shape, as, bs);
        cuda::broadcast_to(gbc.f32(), dev(b2).f32(), 3, shape, bs);
        bits(g2, o2, sz("binary_strided R C", {R, C}));
        bits(gbc, bc, sz("broadcast_to R C", {R, C}));
      }
  }

  TEST_CASE("cuda edges: index family (empty O, D, n, I; repeated indices in order; NaN and -0.0 payloads)" *
            needs_device()) {
    uint64_t seed = 1300;
    struct Case {
      int64_t O, D, n, I;
    };
    const Case cases[] = {{0, 3, 2, 4},   {2, 3, 0, 4},    {2, 3, 2, 0},  {1, 1, 1, 1},   {1, 5, 33, 1},
                          {2, 4, 31, 32}, {1, 3, 2, 1025}, {33, 2, 3, 1}, {1, 1025, 4, 1}};
    for (const Case& c : cases) {
      const std::string what = sz("O D n I", {c.O, c.D, c.n, c.I});
      Vf a = spiced(c.O * c.D * c.I, ++seed, kSpecials), src = spiced(c.O * c.n * c.I, ++seed, kSpecials);
      Vf u = rnd(c.n, ++seed, 0.f, 1.f), ug = rnd(c.O * c.n * c.I, ++seed, 0.f, 1.f);
      Vi idx((size_t)c.n), gidx((size_t)(c.O * c.n * c.I));
      for (int64_t j = 0; j < c.n; ++j)
        idx[(size_t)j] = j % 3 == 0 ? 0 : (int32_t)std::min<int64_t>(c.D - 1, (int64_t)(u[(size_t)j] * (float)c.D));
      for (size_t j = 0; j < gidx.size(); ++j)
        gidx[j] = j % 3 == 0 ? 0 : (int32_t)std::min<int64_t>(c.D - 1, (int64_t)(ug[j] * (float)c.D));
      CHECK(cuda::index_first_bad(dev(idx).i32(), c.n, c.D) == cpu::index_first_bad(idx.data(), c.n, c.D));
      Vi bad = idx;
      if (c.n > 1) bad[(size_t)(c.n - 1)] = (int32_t)c.D;  // one past the axis
      CHECK(cuda::index_first_bad(dev(bad).i32(), c.n, c.D) == cpu::index_first_bad(bad.data(), c.n, c.D));
      // index_select, index_add (into a copy of a), gather, scatter_add
      Vf sel((size_t)(c.O * c.n * c.I)), add = a, gat((size_t)(c.O * c.n * c.I)), sca = a;
      cpu::index_select(sel.data(), a.data(), idx.data(), c.O, c.D, c.n, c.I);
      cpu::index_add(add.data(), src.data(), idx.data(), c.O, c.D, c.n, c.I);
      cpu::gather(gat.data(), a.data(), gidx.data(), c.O, c.D, c.n, c.I);
      cpu::scatter_add(sca.data(), src.data(), gidx.data(), c.O, c.D, c.n, c.I);
      Tensor gsel = out_f(c.O * c.n * c.I), gadd = dev(a), ggat = out_f(c.O * c.n * c.I), gsca = dev(a);
      cuda::index_select(gsel.f32(), dev(a).f32(), dev(idx).i32(), c.O, c.D, c.n, c.I);
      cuda::index_add(gadd.f32(), dev(src).f32(), dev(idx).i32(), c.O, c.D, c.n, c.I);
      cuda::gather(ggat.f32(), dev(a).f32(), dev(gidx).i32(), c.O, c.D, c.n, c.I);
      cuda::scatter_add(gsca.f32(), dev(src).f32(), dev(gidx).i32(), c.O, c.D, c.n, c.I);
      bits(gsel, sel, "index_select " + what);
      bits(gadd, add, "index_add " + what);  // repeated indices summed in source order on both sides
      bits(ggat, gat, "gather " + what);
      bits(gsca, sca, "scatter_add " + what);
      // concat a [O, D, I] at 1 into [O, D + n, I] after src, then split it back out
      const int64_t Dd = c.D + c.n;
      Vf cat((size_t)(c.O * Dd * c.I), kNaN), back((size_t)(c.O * c.D * c.I));
      cpu::concat_piece(cat.data(), src.data(), c.O, Dd, 0, c.n, c.I);
      cpu::concat_piece(cat.data(), a.data(), c.O, Dd, c.n, c.D, c.I);
      cpu::split_piece(back.data(), cat.data(), c.O, Dd, c.n, c.D, c.I);
      Tensor gcat = out_f(c.O * Dd * c.I), gback = out_f(c.O * c.D * c.I);
      cuda::concat_piece(gcat.f32(), dev(src).f32(), c.O, Dd, 0, c.n, c.I);
      cuda::concat_piece(gcat.f32(), dev(a).f32(), c.O, Dd, c.n, c.D, c.I);
      cuda::split_piece(gback.f32(), gcat.f32(), c.O, Dd, c.n, c.D, c.I);
      bits(gcat, cat, "concat " + what);
      bits(gback, back, "split " + what);
      // where and masked_fill over [O, D*I] with a row mask broadcast along the last axis
      const int64_t shape[2] = {c.O, c.D * c.I}, full[2] = {c.D * c.I, 1}, rowm[2] = {1, 0}, scal[2] = {0, 0};
      Vi mask((size_t)c.O);
      for (int64_t o = 0; o < c.O; ++o) mask[(size_t)o] = o % 2;
      const Vf zero = {-0.f};
      Vf wh((size_t)(c.O * c.D * c.I)), mf(wh.size());
      cpu::where(wh.data(), mask.data(), a.data(), zero.data(), 2, shape, rowm, full, scal);
      cpu::masked_fill(mf.data(), a.data(), mask.data(), -kInf, 2, shape, rowm);
      Tensor gwh = out_f(c.O * c.D * c.I), gmf = out_f(c.O * c.D * c.I);
      cuda::where(gwh.f32(), dev(mask).i32(), dev(a).f32(), dev(zero).f32(), 2, shape, rowm, full, scal);
      cuda::masked_fill(gmf.f32(), dev(a).f32(), dev(mask).i32(), -kInf, 2, shape, rowm);
      bits(gwh, wh, "where " + what);
      bits(gmf, mf, "masked_fill " + what);
    }
  }

  TEST_CASE("cuda edges: dropout masks equal the CPU's bit for bit (p 0 and 0.5, n 0..1025, NaN payloads)" *
            needs_device()) {
    uint64_t seed = 1400;
    for (int64_t n :
         {int64_t(0), int64_t(1), int64_t(31), int64_t(32), int64_t(33), int64_t(1023), int64_t(1024), int64_t(1025)})
      for (float p : {0.f, 0.5f, 0.999f}) {
        Vf x = spiced(n, ++seed, kSpecials), y((size_t)n), dx((size_t)n);
        cpu::dropout_forward(y.data(), x.data(), n, p, 7, 123);
        cpu::dropout_backward(dx.data(), x.data(), n, p, 7, 123);
        Tensor gy = out_f(n), gdx = out_f(n);
        cuda::dropout_forward(gy.f32(), dev(x).f32(), n, p, 7, 123);
        cuda::dropout_backward(gdx.f32(), dev(x).f32(), n, p, 7, 123);
        const std::string what = "n " + std::to_string(n) + " p " + std::to_string(p);
        bits(gy, y, "forward " + what);
        bits(gdx, dx, "backward " + what);
      }
  }

  TEST_CASE("cuda edges: copies and conversions (empty axes, 31..1025 rows, NaN/inf/-0 and out-of-range to i32)" *
            needs_device()) {
    uint64_t seed = 1500;
    // strided_copy of a transpose of [A, B] with every size class, and of empty shapes.
    for (int64_t A : {int64_t(0), int64_t(1), int64_t(31), int64_t(33)})
      for (int64_t B : {int64_t(0), int64_t(1), int64_t(32), int64_t(1025)}) {
        Vf x = spiced(A * B, ++seed, kSpecials), y((size_t)(A * B), kNaN);
        const int64_t shape[2] = {B, A}, ds[2] = {A, 1}, ss[2] = {1, B};
        cpu::strided_copy(y.data(), ds, x.data(), ss, shape, 2, 4);
        Tensor gy = out_f(A * B);
        cuda::strided_copy(gy.f32(), ds, dev(x).f32(), ss, shape, 2, 4);
        bits(gy, y, sz("transpose A B", {A, B}));
      }
    // f32 -> i32 truncates toward zero. NaN, inf and values past 2^31 are outside C's cast (the CPU gives INT32_MIN,
    // the GPU saturates and gives 0 for NaN: kernels/copy.h), so they are compared only on in-range values.
    for (int64_t n : {int64_t(0), int64_t(1), int64_t(33), int64_t(1025)}) {
      Vf x = spiced(n, ++seed, {-0.f, 2147483520.f, -2147483648.f, -0.99f, 0.99f}, -1e6f, 1e6f);
      Vi ix((size_t)n);
      Vf back((size_t)n);
      cpu::f32_to_i32(ix.data(), x.data(), n);
      cpu::i32_to_f32(back.data(), ix.data(), n);
      Tensor gi = out_i(n), gb = out_f(n);
      cuda::f32_to_i32(gi.i32(), dev(x).f32(), n);
      cuda::i32_to_f32(gb.f32(), gi.i32(), n);
      bits(gi, ix, "f32_to_i32 n " + std::to_string(n));
      bits(gb, back, "i32_to_f32 n " + std::to_string(n));
      // Out of range: the documented saturation (and 0 for NaN) on the device.
      if (n == 0) continue;
      const Vf wild = {kNaN, kInf, -kInf, 3e9f, -3e9f, kBig};
      const Vi sat = {0, INT32_MAX, INT32_MIN, INT32_MAX, INT32_MIN, INT32_MAX};
      Tensor gw = out_i(6);
      cuda::f32_to_i32(gw.i32(), dev(wild).f32(), 6);
      bits(gw, sat, "f32_to_i32 saturation");
    }
  }

}  // TEST_SUITE
#else
// Without CUDA the edge cases are not compiled; "cuda: backend status" (tests/test_cuda.cpp) says so.
#endif
