// The MoE dispatch ops of autograd/ops_moe.h: plan, capacity filter, permute, combine and grouped_linear. Forward
// against plain references, backward by finite differences, the capacity rule (ties, NaN) against a brute-force
// ranking, grouped_linear bit-identical to linear() per expert, and (suite "cuda") every op on the device against
// the CPU, values and gradients.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>

#include "autograd/ops_moe.h"
#include "engine/host_sync.h"
#if CM_CUDA
#include "engine/cuda.h"
#endif
#include "kernels/capacity.h"
#include "kernels/pointers.h"
#include "kernels/route.h"
#include "tests/helpers.h"

using namespace cm;
using cm::test::uniform;

namespace {

// Random expert ids in [0, N), some -1 when drop > 0 (every (drop)-th slot on average).
std::vector<int32_t> random_experts(int64_t A, int64_t N, uint64_t seed, int drop = 0) {
  Generator g(seed);
  Tensor r = Tensor::rand({2 * A}, g);
  std::vector<int32_t> e((size_t)A);
  for (int64_t a = 0; a < A; ++a) {
    e[a] = std::min<int32_t>((int32_t)(r.f32()[a] * (float)N), (int32_t)N - 1);
    if (drop > 0 && r.f32()[A + a] < 1.f / (float)drop) e[a] = -1;
  }
  return e;
}

// The capacity rule by brute force: a slot is dropped when cap or more slots of its expert rank ahead of it.
std::vector<int32_t> capacity_ref(const std::vector<int32_t>& expert, const std::vector<float>& gate, int64_t cap) {
  auto ahead = [&](size_t b, size_t a) {  // does b rank ahead of a?
    const bool na = std::isnan(gate[a]), nb = std::isnan(gate[b]);
    if (na != nb) return na;
    if (!na && gate[a] != gate[b]) return gate[b] > gate[a];
    return b < a;
  };
  std::vector<int32_t> out = expert;
  for (size_t a = 0; a < expert.size(); ++a) {
    if (expert[a] < 0) continue;
    int64_t rank = 0;
    for (size_t b = 0; b < expert.size(); ++b) rank += b != a && expert[b] == expert[a] && ahead(b, a);
    if (rank >= cap) out[a] = -1;
  }
  return out;
}

struct Experts {  // G experts' Linear weights in -> out
  std::vector<Tensor> w, b;
};
Experts random_experts_linear(int64_t G, int64_t in, int64_t out, bool bias, uint64_t seed) {
  Experts x;
  for (int64_t e = 0; e < G; ++e) {
    x.w.push_back(cm::test::param({out, in}, seed + 2 * e));
    if (bias) x.b.push_back(cm::test::param({out}, seed + 2 * e + 1));
  }
  return x;
}

std::vector<int64_t> offsets_of(const std::vector<int64_t>& counts) {
  std::vector<int64_t> o(counts.size() + 1, 0);
  for (size_t e = 0; e < counts.size(); ++e) o[e + 1] = o[e] + counts[e];
  return o;
}

}  // namespace

TEST_SUITE("moe_ops") {
  TEST_CASE("moe ops: plan sorts kept slots by expert, stably; permute and combine against references") {
    const int64_t T = 37, C = 6, N = 5;
    for (int64_t K : {1, 2, 3}) {
      const std::vector<int32_t> ex = random_experts(T * K, N, 100 + K, 4);
      DispatchPlan p = make_dispatch_plan(Tensor::from_vector(ex, {T * K}), K, N);
      std::vector<int32_t> ao = p.assign_of.to_i32_vector(), ro = p.row_of.to_i32_vector();
      int64_t kept = 0;
      for (int32_t e : ex) kept += e >= 0;
      REQUIRE(p.rows == kept);
      for (int64_t e = 0; e < N; ++e)
        for (int64_t r = p.offsets[e]; r < p.offsets[e + 1]; ++r) {
          CHECK(ex[ao[r]] == e);
          if (r > p.offsets[e]) CHECK(ao[r - 1] < ao[r]);  // stable
        }
      for (int64_t a = 0; a < T * K; ++a) CHECK(ro[a] == (ex[a] < 0 ? -1 : (int32_t)std::distance(ao.begin(), std::find(ao.begin(), ao.end(), (int32_t)a))));
      // The plan from host ids (offsets counted on the host, scatter by the kernel) is the same plan.
      DispatchPlan ph = make_dispatch_plan(Tensor::from_vector(ex, {T * K}), K, N, &ex);
      CHECK(ph.offsets == p.offsets);
      CHECK(ph.row_of.to_i32_vector() == ro);
      CHECK(ph.assign_of.to_i32_vector() == ao);

      Tensor x = uniform({T, C}, 200 + K), gate = uniform({T * K}, 300 + K, 0.1f, 1.f);
      std::vector<float> xv = x.to_f32_vector(), gv = gate.to_f32_vector();
      Tensor xe = moe_permute(x, p);
      std::vector<float> xe_ref((size_t)(p.rows * C));
      for (int64_t r = 0; r < p.rows; ++r)
        for (int64_t c = 0; c < C; ++c) xe_ref[r * C + c] = xv[(ao[r] / K) * C + c];
      CHECK_CLOSE(xe, xe_ref, 0.f, 0.f);
      // combine in slot order, in double
      Tensor ye = uniform({p.rows, C}, 400 + K);
      std::vector<float> yv = ye.to_f32_vector(), out_ref((size_t)(T * C), 0.f);
      for (int64_t t = 0; t < T; ++t)
        for (int64_t c = 0; c < C; ++c) {
          double s = 0.0;
          for (int64_t j = 0; j < K; ++j)
            if (ro[t * K + j] >= 0) s += (double)gv[t * K + j] * yv[ro[t * K + j] * C + c];
          out_ref[t * C + c] = (float)s;
        }
      CHECK_CLOSE(moe_combine(ye, gate, p), out_ref, 1e-6f, 1e-5f);
    }
  }

  TEST_CASE("moe ops: combine adds a token's slots in slot order (not expert order), exactly") {
    // One token, K = 3, gates 1 (products exact): rows 1, 1e8, -1e8 in slot order sum to (1 + 1e8) - 1e8 = 0 in
    // float; in expert order (experts 2, 0, 1: 1e8, -1e8, 1) or reversed they sum to 1.
    const std::vector<int32_t> ex = {2, 0, 1};
    DispatchPlan p = make_dispatch_plan(Tensor::from_vector(ex, {3}), 3, 3);
    const std::vector<int32_t> ro = p.row_of.to_i32_vector();
    const float slot_value[3] = {1.f, 1e8f, -1e8f};
    std::vector<float> ye(3);
    for (int a = 0; a < 3; ++a) ye[ro[a]] = slot_value[a];
    CHECK(moe_combine(Tensor::from_vector(ye, {3, 1}), Tensor::ones({3}), p).item() == 0.f);
  }

  TEST_CASE("moe ops: gradcheck of permute and of combine (to the expert rows and the gates)") {
    const int64_t T = 9, C = 5, N = 4;
    for (int64_t K : {1, 2, 3}) {
      const std::vector<int32_t> ex = random_experts(T * K, N, 500 + K, 5);
      DispatchPlan p = make_dispatch_plan(Tensor::from_vector(ex, {T * K}), K, N);
      Tensor x = cm::test::param({T, C}, 510 + K);
      CHECK_GRAD([&](const std::vector<Tensor>& in) { return moe_permute(in[0], p); }, {x});
      Tensor ye = cm::test::param({p.rows, C}, 520 + K), gate = cm::test::param({T * K}, 530 + K);
      CHECK_GRAD([&](const std::vector<Tensor>& in) { return moe_combine(in[0], in[1], p); }, {ye, gate});
      // permute then combine: a token's gradient gathers all of its slots
      CHECK_GRAD([&](const std::vector<Tensor>& in) { return moe_combine(moe_permute(in[0], p), in[1], p); },
                 {x, gate});
      // a dropped slot's gate gets exactly 0
      sum(moe_combine(ye, gate, p)).backward();
      std::vector<float> dg = gate.grad().to_f32_vector();
      for (int64_t a = 0; a < T * K; ++a)
        if (ex[a] < 0) CHECK(dg[a] == 0.f);
    }
  }

  TEST_CASE("moe ops: capacity keeps each expert's cap highest gates; ties keep the earlier slot; NaN goes first") {
    const int64_t N = 4;
    for (int64_t A : {1, 12, 40, 301})
      for (int64_t cap : {0, 1, 3, 7, 1000}) {
        std::vector<int32_t> ex = random_experts(A, N, 600 + A, 7);
        // gates from a small set of values: many ties; and a few NaN
        Tensor r = uniform({A}, 700 + A + cap, 0.f, 1.f);
        std::vector<float> gv((size_t)A);
        for (int64_t a = 0; a < A; ++a) gv[a] = std::floor(r.f32()[a] * 4.f) / 4.f;
        if (A > 10) gv[3] = gv[9] = std::nanf("");
        Tensor e = Tensor::from_vector(ex, {A});
        DispatchPlan p = make_dispatch_plan(e, 1, N);
        std::vector<int32_t> got = capacity_filter(e, Tensor::from_vector(gv, {A}), p, cap).to_i32_vector();
        CHECK_MESSAGE(got == capacity_ref(ex, gv, cap), "A=", A, " cap=", cap);
        std::vector<int64_t> kept((size_t)N, 0);
        for (int32_t v : got)
          if (v >= 0) ++kept[v];
        for (int64_t k = 0; k < N; ++k)
          CHECK(kept[k] == std::min<int64_t>(cap, p.offsets[k + 1] - p.offsets[k]));
      }
  }

  TEST_CASE("moe ops: grouped_linear equals linear() per expert bit for bit, forward and gradients") {
    const int64_t in = 7, out = 5;
    for (bool bias : {false, true}) {
      const std::vector<int64_t> off = offsets_of({3, 0, 8, 1, 0});  // empty experts in the middle and at the end
      const int64_t G = 5, R = off.back();
      Experts E = random_experts_linear(G, in, out, bias, 800);
      Tensor x = cm::test::param({R, in}, 810), gy = uniform({R, out}, 811);
      Tensor y = grouped_linear(x, E.w, E.b, off);
      sum(mul(y, gy)).backward();
      std::vector<float> yv = y.to_f32_vector(), dx = x.grad().to_f32_vector();
      for (int64_t e = 0; e < G; ++e) {
        const int64_t n = off[e + 1] - off[e];
        if (n == 0) {
          CHECK(!E.w[e].grad().defined());  // an expert without rows gets no gradient, as if it had not run
          continue;
        }
        Tensor xe = x.detach().slice(0, off[e], off[e + 1]).contiguous();
        xe.requires_grad_(true);
        Tensor w = E.w[e].detach().contiguous(), b = bias ? E.b[e].detach().contiguous() : Tensor();
        w.requires_grad_(true);
        if (bias) b.requires_grad_(true);
        Tensor ye = linear(xe, w, b);
        sum(mul(ye, gy.slice(0, off[e], off[e + 1]))).backward();
        std::vector<float> yr = ye.to_f32_vector(), dxr = xe.grad().to_f32_vector();
        CHECK(std::equal(yr.begin(), yr.end(), yv.begin() + off[e] * out));
        CHECK(std::equal(dxr.begin(), dxr.end(), dx.begin() + off[e] * in));
        CHECK(E.w[e].grad().to_f32_vector() == w.grad().to_f32_vector());
        if (bias) CHECK(E.b[e].grad().to_f32_vector() == b.grad().to_f32_vector());
      }
    }
  }

  TEST_CASE("moe ops: the experts' weight gradients are blocks of one buffer, taken uncopied; later gradients add "
            "into each expert's block alone") {
    const int64_t in = 6, out = 4, G = 3;
    const std::vector<int64_t> off = offsets_of({2, 3, 4});
    Experts E = random_experts_linear(G, in, out, true, 830);
    Tensor x = uniform({off.back(), in}, 831), gy = uniform({off.back(), out}, 832);
    sum(mul(grouped_linear(x, E.w, E.b, off), gy)).backward();
    std::vector<std::vector<float>> once;
    for (int64_t e = 0; e < G; ++e) once.push_back(E.w[e].grad().to_f32_vector());
    for (const auto* ps : {&E.w, &E.b}) {
      const Tensor& g0 = (*ps)[0].grad();
      CHECK(g0.impl().storage->partitioned);
      for (int64_t e = 1; e < G; ++e) {  // one buffer, block after block: no expert's gradient was copied out
        CHECK(ps->at(e).grad().impl().storage == g0.impl().storage);
        CHECK(ps->at(e).grad().f32() == g0.f32() + e * g0.numel());
      }
    }
    // The second backward through expert 1 only: its block doubles (x + x is exact), its neighbours' do not move.
    const Tensor only1 = Tensor::from_vector(std::vector<float>{0, 0, 1, 1, 1, 0, 0, 0, 0}, {9, 1});  // its rows
    sum(mul(grouped_linear(x, E.w, E.b, off), mul(gy, only1))).backward();
    for (int64_t e = 0; e < G; ++e) {
      std::vector<float> want = once[(size_t)e];
      if (e == 1)
        for (float& v : want) v += v;
      CHECK(E.w[e].grad().to_f32_vector() == want);
    }
  }

  TEST_CASE("moe ops: gradcheck of grouped_linear; a cut expert gets a zero gradient and passes none") {
    const int64_t in = 4, out = 3, G = 3;
    const std::vector<int64_t> off = offsets_of({2, 3, 2});
    for (bool bias : {false, true}) {
      Experts E = random_experts_linear(G, in, out, bias, 900);
      Tensor x = cm::test::param({off.back(), in}, 910);
      std::vector<Tensor> inputs = {x};
      inputs.insert(inputs.end(), E.w.begin(), E.w.end());
      inputs.insert(inputs.end(), E.b.begin(), E.b.end());
      auto fn = [&](const std::vector<Tensor>& v) {
        std::vector<Tensor> w(v.begin() + 1, v.begin() + 1 + G), b(v.begin() + 1 + G, v.end());
        return grouped_linear(v[0], w, b, off);
      };
      CHECK_GRAD(fn, inputs);
      // Expert 1 cut after the forward (the guard's timing), with a NaN weight: nothing of it reaches x or w.
      for (Tensor& t : inputs) t.zero_grad();
      E.w[1].f32()[0] = std::nanf("");
      Tensor ok = Tensor::from_vector(std::vector<int32_t>((size_t)G, 1), {G});
      Tensor y = grouped_linear(x, E.w, E.b, off, ok);
      ok.i32()[1] = 0;  // the guard's verdict, written after the forward
      sum(y).backward();
      std::vector<float> dx = x.grad().to_f32_vector();
      for (int64_t r = 0; r < off.back(); ++r)
        for (int64_t q = 0; q < in; ++q) {
          CHECK(std::isfinite(dx[r * in + q]));
          if (r >= off[1] && r < off[2]) CHECK(dx[r * in + q] == 0.f);
          else CHECK(dx[r * in + q] != 0.f);
        }
      for (const Tensor& t : bias ? std::vector<Tensor>{E.w[1], E.b[1]} : std::vector<Tensor>{E.w[1]})
        for (float v : t.grad().to_f32_vector()) CHECK(v == 0.f);  // selected, not NaN * 0
      std::vector<float> g0 = E.w[0].grad().to_f32_vector();
      CHECK(std::any_of(g0.begin(), g0.end(), [](float v) { return v != 0.f; }));
    }
  }

  TEST_CASE("moe ops: a plan without the host equals the host's; grouped_linear on device offsets gives the same "
            "products, and an empty expert a zero gradient") {
    const int64_t N = 5, T = 9, K = 2, A = T * K, in = 4, out = 3;
    std::vector<int32_t> ex = random_experts(A, N, 77, 0);  // no dropped slots: the router's ids
    for (int32_t& e : ex) e = e == 3 ? 2 : e;                // expert 3 empty
    const Tensor et = Tensor::from_vector(ex, {A});
    const DispatchPlan ph = make_dispatch_plan(et, K, N, &ex), pn = make_dispatch_plan_nowait(et, K, N);
    CHECK(pn.offsets.empty());
    CHECK(pn.rows == A);
    CHECK(pn.row_of.to_i32_vector() == ph.row_of.to_i32_vector());
    CHECK(pn.assign_of.to_i32_vector() == ph.assign_of.to_i32_vector());
    CHECK(pn.offsets_dev.to_i32_vector() == ph.offsets_dev.to_i32_vector());
    // An out-of-range id is named (on the CPU at once; on CUDA at the next read-out).
    std::vector<int32_t> badv = ex;
    badv[4] = (int32_t)N;
    CHECK_THROWS_WITH(make_dispatch_plan_nowait(Tensor::from_vector(badv, {A}), K, N),
                      doctest::Contains("1 expert ids out of range [-1, 5)"));
    // Dropped slots (-1, capacity's): a row for every slot still, the kept ones as the host's plan has them, then
    // rows of -1 that moe_permute fills with zeros (the experts never compute them: offsets[N] ends before).
    const std::vector<int32_t> dr = random_experts(A, N, 79, 3);
    const int64_t kept = A - std::count(dr.begin(), dr.end(), -1);
    REQUIRE((kept < A && kept > 0));
    const Tensor dt = Tensor::from_vector(dr, {A});
    const DispatchPlan dh = make_dispatch_plan(dt, K, N, &dr), dn = make_dispatch_plan_nowait(dt, K, N);
    CHECK(dn.rows == A);
    CHECK(dn.row_of.to_i32_vector() == dh.row_of.to_i32_vector());
    CHECK(dn.offsets_dev.to_i32_vector() == dh.offsets_dev.to_i32_vector());
    std::vector<int32_t> tail = dh.assign_of.to_i32_vector();
    tail.resize((size_t)A, -1);
    CHECK(dn.assign_of.to_i32_vector() == tail);
    const Tensor xt = cm::test::uniform({T, 3}, 81);
    const std::vector<float> xh = moe_permute(xt, dh).to_f32_vector(), xn = moe_permute(xt, dn).to_f32_vector();
    CHECK(std::equal(xh.begin(), xh.end(), xn.begin()));
    CHECK(std::all_of(xn.begin() + kept * 3, xn.end(), [](float v) { return v == 0.f; }));
    // Each token's top-1 expert (AC's labels): the higher gate, a tie to the earlier slot.
    std::vector<float> gv = {0.2f, 0.7f, 0.5f, 0.5f, 0.9f, 0.1f};
    std::vector<int32_t> ev = {4, 1, 0, 3, 2, 1}, top((size_t)3, -1);
    cpu::route_top1(top.data(), ev.data(), gv.data(), 3, 2);
    CHECK(top == std::vector<int32_t>{1, 0, 2});

    for (bool bias : {false, true}) {
      CAPTURE(bias);
      Experts E = random_experts_linear(N, in, out, bias, 950);
      Tensor x = cm::test::param({A, in}, 960);
      Tensor yh = grouped_linear(x, E.w, E.b, ph.offsets, Tensor(), ph.offsets_dev);
      sum(square(yh)).backward();
      std::vector<std::vector<float>> gw, gb;
      for (int64_t e = 0; e < N; ++e) {
        CHECK(E.w[e].grad().defined() == (e != 3));  // the host knows expert 3 ran on no rows: no gradient
        gw.push_back(e != 3 ? E.w[e].grad().to_f32_vector() : std::vector<float>());
        if (bias) gb.push_back(e != 3 ? E.b[e].grad().to_f32_vector() : std::vector<float>());
      }
      const std::vector<float> gx = x.grad().to_f32_vector();
      for (Tensor t : E.w) t.zero_grad();
      for (Tensor t : E.b) t.zero_grad();
      x.zero_grad();
      Tensor yn = grouped_linear(x, E.w, E.b, {}, Tensor(), pn.offsets_dev);
      CHECK(yn.to_f32_vector() == yh.to_f32_vector());
      sum(square(yn)).backward();
      CHECK(x.grad().to_f32_vector() == gx);
      for (int64_t e = 0; e < N; ++e) {
        CAPTURE(e);
        const std::vector<float> g = E.w[e].grad().to_f32_vector();  // defined for every expert now
        if (e != 3) CHECK(g == gw[(size_t)e]);
        else CHECK(std::all_of(g.begin(), g.end(), [](float v) { return v == 0.f; }));
        if (bias && e != 3) CHECK(E.b[e].grad().to_f32_vector() == gb[(size_t)e]);
      }
    }
  }

  TEST_CASE("moe ops: pointer_table lists G consecutive blocks of one buffer") {
    std::vector<float> buf(40);
    for (int64_t G : {0, 1, 5}) {
      std::vector<float*> table((size_t)G + 1, nullptr);
      cpu::pointer_table(table.data(), buf.data() + 2, 7, G);
      for (int64_t e = 0; e < G; ++e) CHECK(table[e] == buf.data() + 2 + 7 * e);
      CHECK(table[G] == nullptr);  // nothing past G
    }
  }

  TEST_CASE("moe ops: bad arguments are named") {
    Tensor e = Tensor::from_vector(std::vector<int32_t>{0, 5, 1}, {3});
    CHECK_THROWS_WITH(make_dispatch_plan(e, 1, 4), doctest::Contains("outside [-1, 4)"));
    CHECK_THROWS_WITH(make_dispatch_plan(e, 2, 4), doctest::Contains("3 slots for K = 2"));
    DispatchPlan p = make_dispatch_plan(Tensor::from_vector(std::vector<int32_t>{0, 1, 1}, {3}), 1, 4);
    CHECK_THROWS_WITH(moe_permute(uniform({4, 2}, 1), p), doctest::Contains("for a plan of 3 tokens"));
    CHECK_THROWS_WITH(grouped_linear(uniform({3, 2}, 1), {uniform({2, 2}, 2)}, {}, {0, 2}),
                      doctest::Contains("grouped_linear"));
  }
}

#if CM_CUDA
TEST_SUITE("cuda") {
  using cm::test::needs_device;

  TEST_CASE("cuda ops: the plan without the host and each token's top-1 expert equal the CPU; nothing waits; a bad "
            "id is raised at the next read-out" * needs_device()) {
    const int64_t N = 7;
    for (int64_t T : {1, 37, 500})
      for (int64_t K : {1, 2}) {
        CAPTURE(T);
        CAPTURE(K);
        const int64_t A = T * K;
        const std::vector<int32_t> ex = random_experts(A, N, 1300 + A, K == 2 ? 3 : 0);  // K 2: some dropped
        const Tensor ec = Tensor::from_vector(ex, {A}), ed = ec.to(Device::CUDA);
        const Tensor gc = cm::test::uniform({A}, 1400 + A), gd = gc.to(Device::CUDA);
        cuda::sync();
        const int64_t before = host_sync_stats().stream_syncs;
        const DispatchPlan pc = make_dispatch_plan_nowait(ec, K, N), pd = make_dispatch_plan_nowait(ed, K, N);
        Tensor tc = Tensor::empty({T}, DType::I32), td = Tensor::empty({T}, DType::I32, Device::CUDA);
        cpu::route_top1(tc.i32(), ec.i32(), gc.f32(), T, K);
        cuda::route_top1(td.i32(), ed.i32(), gd.f32(), T, K);
        CHECK(host_sync_stats().stream_syncs == before);
        CHECK(pd.row_of.to_i32_vector() == pc.row_of.to_i32_vector());
        CHECK(pd.assign_of.to_i32_vector() == pc.assign_of.to_i32_vector());
        CHECK(pd.offsets_dev.to_i32_vector() == pc.offsets_dev.to_i32_vector());
        CHECK(td.to_i32_vector() == tc.to_i32_vector());
        const Tensor xc = cm::test::uniform({T, 5}, 1450 + A);  // the unfilled rows' zeros, as on the CPU
        CHECK(moe_permute(xc.to(Device::CUDA), pd).to_f32_vector() == moe_permute(xc, pc).to_f32_vector());
      }
    std::vector<int32_t> bad = random_experts(40, N, 1500, 0);
    bad[3] = -7;
    bad[9] = (int32_t)N;
    if (cuda::sync_each_launch()) {
      CHECK_THROWS_WITH_AS(make_dispatch_plan_nowait(Tensor::from_vector(bad, {40}).to(Device::CUDA), 2, N),
                           doctest::Contains("dispatch_plan: 2 expert ids out of range [-1, 7)"), Error);
    } else {
      const DispatchPlan p = make_dispatch_plan_nowait(Tensor::from_vector(bad, {40}).to(Device::CUDA), 2, N);
      CHECK_THROWS_WITH_AS(p.row_of.to_i32_vector(), doctest::Contains("dispatch_plan: 2 expert ids out of range"),
                           Error);
      CHECK_NOTHROW(p.row_of.to_i32_vector());  // reported once
    }
  }

  TEST_CASE("cuda kernels: pointer_table equals the CPU twin on random sizes" * needs_device()) {
    Generator g(31);
    for (int rep = 0; rep < 6; ++rep) {
      Tensor r = Tensor::rand({2}, g);
      const int64_t G = 1 + (int64_t)(r.f32()[0] * 300.f), stride = (int64_t)(r.f32()[1] * 5000.f);
      Tensor buf = Tensor::empty({G * stride + 1}, DType::F32, Device::CUDA);
      Tensor table = Tensor::empty({2 * G}, DType::I32, Device::CUDA);
      cuda::pointer_table((float**)table.raw(), buf.f32(), stride, G);
      std::vector<int32_t> words = table.to_i32_vector();
      std::vector<float*> got((size_t)G), want((size_t)G);
      std::memcpy(got.data(), words.data(), (size_t)G * sizeof(float*));
      cpu::pointer_table(want.data(), buf.f32(), stride, G);  // the same addresses, computed on the host
      CHECK_MESSAGE(got == want, "G=", G, " stride=", stride);
    }
  }

  TEST_CASE("cuda ops: grouped_linear with a call-site cache reuses its lists: equal results, nothing waits, "
            "nothing is uploaded again" *
            needs_device()) {
    const int64_t in = 6, out = 4, G = 4;
    const std::vector<int64_t> off = offsets_of({3, 0, 5, 2});
    Experts E = random_experts_linear(G, in, out, true, 1700);
    std::vector<Tensor> w, b;
    for (int64_t e = 0; e < G; ++e) {
      w.push_back(E.w[e].detach().to(Device::CUDA).requires_grad_(true));
      b.push_back(E.b[e].detach().to(Device::CUDA).requires_grad_(true));
    }
    Tensor x = cm::test::param({off.back(), in}, 1710).detach().to(Device::CUDA);
    auto cache = make_grouped_linear_cache();
    // The offsets on the device once, as the model's plan holds them: int64 [G+1] in an i32 tensor [2(G+1)].
    std::vector<int32_t> off_words(2 * off.size());
    std::memcpy(off_words.data(), off.data(), off.size() * sizeof(int64_t));
    const Tensor off_dev = Tensor::from_vector(off_words, {(int64_t)off_words.size()}, Device::CUDA);
    std::vector<std::vector<float>> first;
    for (int call = 0; call < 3; ++call) {
      CAPTURE(call);
      for (Tensor& t : w) t.zero_grad();
      for (Tensor& t : b) t.zero_grad();
      const HostSyncStats before = host_sync_stats();
      Tensor y = grouped_linear(x, w, b, off, Tensor(), off_dev, cache);
      sum(square(y)).backward();
      if (call > 0) {  // the lists and the offsets are on the device already
        CHECK(host_sync_stats().stream_syncs == before.stream_syncs);
        CHECK(host_sync_stats().h2d_uploads == before.h2d_uploads);
      }
      std::vector<std::vector<float>> got = {y.to_f32_vector()};
      for (int64_t e = 0; e < G; ++e) {
        CHECK(w[e].grad().defined() == (off[e + 1] > off[e]));  // an expert without rows: no gradient
        if (!w[e].grad().defined()) continue;
        got.push_back(w[e].grad().to_f32_vector());
        got.push_back(b[e].grad().to_f32_vector());
      }
      if (call == 0) first = got;
      else CHECK(got == first);
    }
    // The CPU's values (the uncached call), within the parity tolerance.
    std::vector<Tensor> wc, bc;
    for (int64_t e = 0; e < G; ++e) {
      wc.push_back(E.w[e].detach().requires_grad_(true));
      bc.push_back(E.b[e].detach().requires_grad_(true));
    }
    Tensor yc = grouped_linear(x.to(Device::CPU), wc, bc, off);
    sum(square(yc)).backward();
    std::vector<std::vector<float>> want = {yc.to_f32_vector()};
    for (int64_t e = 0; e < G; ++e)
      if (wc[e].grad().defined()) {
        want.push_back(wc[e].grad().to_f32_vector());
        want.push_back(bc[e].grad().to_f32_vector());
      }
    REQUIRE(want.size() == first.size());
    for (size_t i = 0; i < want.size(); ++i) CHECK(cm::test::first_mismatch(first[i], want[i], 1e-5f, 1e-4f) < 0);
  }

  TEST_CASE("cuda ops: capacity with a hot expert (rows past one block, blocks across experts) equals the CPU" *
            needs_device()) {
    // 3000 slots over 5 experts, about a ninth dropped, expert 3 taking two thirds of the rest (1790 rows: seven of
    // the kernel's 256-row chunks); gates with ties and NaNs.
    const int64_t A = 3000, N = 5, K = 2;
    std::vector<int32_t> ex = random_experts(A, N, 1700, 9);
    Tensor r = uniform({2 * A}, 1701, 0.f, 1.f);
    std::vector<float> gv((size_t)A);
    for (int64_t a = 0; a < A; ++a) {
      if (ex[a] >= 0 && r.f32()[A + a] < 0.6f) ex[a] = 3;
      gv[a] = a % 97 == 5 ? std::nanf("") : std::floor(r.f32()[a] * 50.f) / 50.f;
    }
    Tensor ecpu = Tensor::from_vector(ex, {A}), edev = ecpu.to(Device::CUDA);
    DispatchPlan pc = make_dispatch_plan(ecpu, K, N), pd = make_dispatch_plan(edev, K, N);
    REQUIRE(pc.offsets[4] - pc.offsets[3] > 6 * 256);
    const Tensor gh = Tensor::from_vector(gv, {A});
    for (int64_t cap : {(int64_t)0, (int64_t)1, (int64_t)255, (int64_t)300, (int64_t)1500, A}) {
      const std::vector<int32_t> want = capacity_ref(ex, gv, cap);
      CHECK_MESSAGE(capacity_filter(ecpu, gh, pc, cap).to_i32_vector() == want, "cap=", cap);
      CHECK_MESSAGE(capacity_filter(edev, gh.to(Device::CUDA), pd, cap).to_i32_vector() == want, "cap=", cap);
    }
  }

  TEST_CASE("cuda ops: MoE dispatch ops (plan, capacity, permute, combine, grouped_linear) equal the CPU" *
            needs_device()) {
    const int64_t N = 6, C = 9, F = 11;
    for (int64_t T : {1, 40, 300})
      for (int64_t K : {1, 2, 3}) {
        const int64_t A = T * K;
        const std::string what = "T=" + std::to_string(T) + " K=" + std::to_string(K);
        const std::vector<int32_t> ex = random_experts(A, N, 1000 + A, 6);
        Tensor ecpu = Tensor::from_vector(ex, {A}), edev = ecpu.to(Device::CUDA);
        DispatchPlan pc = make_dispatch_plan(ecpu, K, N), pd = make_dispatch_plan(edev, K, N);
        CHECK_MESSAGE(pd.offsets == pc.offsets, what);
        CHECK_MESSAGE(pd.row_of.to_i32_vector() == pc.row_of.to_i32_vector(), what);
        CHECK_MESSAGE(pd.assign_of.to_i32_vector() == pc.assign_of.to_i32_vector(), what);
        DispatchPlan ph = make_dispatch_plan(edev, K, N, &ex);  // offsets from the host, scatter on the device
        CHECK_MESSAGE(ph.offsets == pc.offsets, what);
        CHECK_MESSAGE(ph.row_of.to_i32_vector() == pc.row_of.to_i32_vector(), what);
        CHECK_MESSAGE(ph.assign_of.to_i32_vector() == pc.assign_of.to_i32_vector(), what);
        // capacity with ties and a NaN
        Tensor r = uniform({A}, 1100 + A, 0.f, 1.f);
        std::vector<float> gv((size_t)A);
        for (int64_t a = 0; a < A; ++a) gv[a] = std::floor(r.f32()[a] * 5.f) / 5.f;
        gv[A / 2] = std::nanf("");
        const Tensor gh = Tensor::from_vector(gv, {A});
        for (int64_t cap : {(int64_t)0, (int64_t)1, A / N + 1}) {
          std::vector<int32_t> kc = capacity_filter(ecpu, gh, pc, cap).to_i32_vector();
          std::vector<int32_t> kd = capacity_filter(edev, gh.to(Device::CUDA), pd, cap).to_i32_vector();
          CHECK_MESSAGE(kd == kc, what, " cap=", cap);
        }
        if (T == 1 && K == 3) {  // slot order on the device too (the CPU case's exact sum above)
          const std::vector<int32_t> e3 = {2, 0, 1};
          DispatchPlan p3 = make_dispatch_plan(Tensor::from_vector(e3, {3}).to(Device::CUDA), 3, 3);
          const std::vector<int32_t> ro = p3.row_of.to_i32_vector();
          const float slot_value[3] = {1.f, 1e8f, -1e8f};
          std::vector<float> ye(3);
          for (int a = 0; a < 3; ++a) ye[ro[a]] = slot_value[a];
          CHECK(moe_combine(Tensor::from_vector(ye, {3, 1}, Device::CUDA), Tensor::ones({3}, DType::F32, Device::CUDA),
                            p3).item() == 0.f);
        }
        // forward and gradients of permute -> grouped SwiGLU-like chain -> combine
        Tensor x = cm::test::param({T, C}, 1200 + A), gate = cm::test::param({A}, 1300 + A, 0.1f, 1.f);
        Experts E1 = random_experts_linear(N, C, F, true, 1400), E2 = random_experts_linear(N, F, C, false, 1500);
        auto run = [&](Device d, const DispatchPlan& p) {
          std::vector<Tensor> leaves = {x.detach().to(d), gate.detach().to(d)};
          std::vector<Tensor> w1, b1, w2;
          for (int64_t e = 0; e < N; ++e) {
            w1.push_back(E1.w[e].detach().to(d));
            b1.push_back(E1.b[e].detach().to(d));
            w2.push_back(E2.w[e].detach().to(d));
          }
          for (Tensor& t : leaves) t.requires_grad_(true);
          for (auto* v : {&w1, &b1, &w2})
            for (Tensor& t : *v) t.requires_grad_(true);
          Tensor xe = moe_permute(leaves[0], p);
          Tensor h = silu(grouped_linear(xe, w1, b1, p.offsets));
          Tensor y = moe_combine(grouped_linear(h, w2, {}, p.offsets), leaves[1], p);
          sum(mul(y, uniform({T, C}, 77).to(d))).backward();
          std::vector<std::vector<float>> res = {y.to_f32_vector(), leaves[0].grad().to_f32_vector(),
                                                 leaves[1].grad().to_f32_vector()};
          for (int64_t e = 0; e < N; ++e)
            if (w1[e].grad().defined()) {
              res.push_back(w1[e].grad().to_f32_vector());
              res.push_back(b1[e].grad().to_f32_vector());
              res.push_back(w2[e].grad().to_f32_vector());
            }
          return res;
        };
        auto rc = run(Device::CPU, pc), rd = run(Device::CUDA, pd);
        REQUIRE(rc.size() == rd.size());
        for (size_t i = 0; i < rc.size(); ++i) {
          const int64_t bad = cm::test::first_mismatch(rd[i], rc[i], 1e-5f, 1e-4f);
          CHECK_MESSAGE(bad < 0, what, " tensor ", i, " element ", bad);
        }
      }
  }
}
#endif
