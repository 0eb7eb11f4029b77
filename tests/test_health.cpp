// The dense FFN's fault guard and health update on the layer's device (model/health.h, kernels/health.h): the
// kernels' contract on the CPU twin, the layer's behaviour (bad rows zeroed, the FFN cut from the backward, the
// reliability falling), and that the device-resident state reaches the host buffers and checkpoints.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "kernels/health.h"
#include "model/coe.h"
#include "model/moe.h"
#include "model/optim.h"
#include "tests/helpers.h"

using namespace cm;
using cm::test::uniform;

namespace {

CoEConfig dense_config() {
  CoEConfig c = make_coe_config(16, 2, 2, 2, 20, 2, 32, 8);
  c.router = RouterKind::Dense;
  c.validate();
  return c;
}

float buffer_value(const ClusterMoELM& m, const std::string& name) {
  for (auto& [n, t] : m.named_buffers())
    if (n == name) return t.f32()[0];
  FAIL("no buffer ", name);
  return 0.f;
}

std::vector<float> buffer_of(const MoELayer& layer, const std::string& name) {
  NamedParams bufs;
  layer.collect_buffers("moe", bufs);
  for (auto& [n, t] : bufs)
    if (n == name) return t.to_f32_vector();
  FAIL("no buffer ", name);
  return {};
}

}  // namespace

TEST_SUITE("health") {
  TEST_CASE("health kernels: rows judged against the running norm, counted in order, bad rows zeroed") {
    const int64_t n = 6, C = 4;
    Tensor y = uniform({n, C}, 11);
    float* p = y.f32();
    p[1 * C + 2] = std::numeric_limits<float>::quiet_NaN();  // row 1: non-finite
    for (int64_t c = 0; c < C; ++c) p[4 * C + c] *= 1000.f;  // row 4: an outlier against the running norm
    float state[4] = {1.f, 1.0f, 0.f, 1.f};                  // running row norm 1: factor 20 allows up to 20
    double pend[5] = {0, 0, 0, 0, 0}, norms[n];
    std::vector<float> out((size_t)(n * C), -7.f);
    int32_t ok = -1, counts[2] = {-1, -1};
    cpu::expert_guard_forward(out.data(), &ok, counts, pend, norms, p, nullptr, 1, n, C, state, 20.f, true, true, true);
    CHECK(ok == 0);
    CHECK(counts[0] == 1);  // the NaN row
    CHECK(counts[1] == 1);  // the outlier
    CHECK(pend[4] == 6.0);  // a dense FFN's traffic: its rows
    CHECK(pend[0] == 6.0);
    CHECK(pend[1] == 2.0);
    CHECK(pend[2] == 4.0);
    double good_sum = 0.0;
    for (int64_t i : {0, 2, 3, 5}) {
      double ss = 0.0;
      for (int64_t c = 0; c < C; ++c) ss += (double)p[i * C + c] * p[i * C + c];
      good_sum += std::sqrt(ss);
      for (int64_t c = 0; c < C; ++c) CHECK(out[i * C + c] == p[i * C + c]);
    }
    CHECK(pend[3] == good_sum);
    for (int64_t i : {1, 4})
      for (int64_t c = 0; c < C; ++c) CHECK(out[i * C + c] == 0.f);
    // No statistics yet (state[1] = 0): only the NaN row is bad; not counting leaves pend alone; no zeroing.
    state[1] = 0.f;
    cpu::expert_guard_forward(out.data(), &ok, counts, pend, norms, p, nullptr, 1, n, C, state, 20.f, false, false,
                              true);
    CHECK(ok == 0);
    CHECK((counts[0] == 1 && counts[1] == 0));
    CHECK(pend[0] == 6.0);
    CHECK(out[4 * C] == p[4 * C]);
    CHECK(std::isnan(out[1 * C + 2]));

    // Backward: the gradient passes when every row was healthy, else nothing does (selected, not multiplied).
    std::vector<float> g = {1.f, std::numeric_limits<float>::quiet_NaN(), 3.f}, dx(3, -1.f);
    int32_t pass = 1, cut = 0;
    cpu::expert_gate_backward(dx.data(), g.data(), &pass, 3);
    CHECK(dx[0] == 1.f);
    CHECK(std::isnan(dx[1]));
    cpu::expert_gate_backward(dx.data(), g.data(), &cut, 3);
    CHECK(dx == std::vector<float>{0.f, 0.f, 0.f});

    // The update: healthy weights start their running norm; 4 good of 6 rows -> health 2/3.
    float st[4] = {1.f, 0.f, 0.f, 0.5f};
    double pd[5] = {6, 2, 4, 8.0, 6};
    const float sums[3] = {9.f, 16.f, 1.f};  // two weights (norm 5), one gradient
    const int64_t meta21[2] = {2, 1}, meta20[2] = {2, 0};
    cpu::expert_health_update(st, pd, sums, meta21, nullptr, 1, 0.9f, 20.f, 1e-3f, true);
    CHECK(st[2] == 5.f);
    CHECK(st[1] == 0.f);  // a step with bad rows does not move the output statistics
    CHECK(st[0] == std::clamp(0.9f * 1.f + (1.f - 0.9f) * (1.f - 2.f / 6.f), 1e-3f, 1.f));
    CHECK(st[3] == 0.9f * 0.5f + (1.f - 0.9f) * 6.f / 6.f);
    CHECK((pd[0] == 0.0 && pd[1] == 0.0 && pd[2] == 0.0 && pd[3] == 0.0 && pd[4] == 0.0));
    // Non-finite gradient: health 0. A weight norm 100x its running value: health 0, the norm not followed.
    const float bad_grad[3] = {9.f, 16.f, std::numeric_limits<float>::infinity()};
    double pd2[5] = {6, 0, 6, 6.0, 6};
    const float rel0 = st[0];
    cpu::expert_health_update(st, pd2, bad_grad, meta21, nullptr, 1, 0.9f, 20.f, 1e-3f, true);
    CHECK(st[0] == std::clamp(0.9f * rel0, 1e-3f, 1.f));
    CHECK(st[1] == 1.f);  // mean norm of 6 healthy rows summing to 6
    const float huge[2] = {9e6f, 16e6f};  // weight norm 5000: 1000x the running 5
    double pd3[5] = {6, 0, 6, 6.0, 6};
    const float rel1 = st[0];
    cpu::expert_health_update(st, pd3, huge, meta20, nullptr, 1, 0.9f, 20.f, 1e-3f, true);
    CHECK(st[2] == 5.f);
    CHECK(st[0] == std::clamp(0.9f * rel1, 1e-3f, 1.f));
  }

  TEST_CASE("health kernels: row norms sixteen rows at a time give the row-by-row sums' bits and verdicts") {
    // S = 37: two blocks of sixteen rows and five rows alone; C = 20 and 128: a short column strip and full ones.
    // Values over six orders of magnitude (an order-sensitive double sum), a NaN row and an infinite row inside a
    // block, and an outlier row in the tail.
    for (int64_t C : {20, 128}) {
      CAPTURE(C);
      const int64_t S = 37;
      Tensor y = uniform({S, C}, 31 + C);
      float* p = y.f32();
      for (int64_t i = 0; i < S * C; ++i) p[i] *= std::pow(10.f, (float)(i % 7) - 3.f);
      p[3 * C + C - 1] = std::numeric_limits<float>::quiet_NaN();
      p[18 * C + 1] = std::numeric_limits<float>::infinity();
      for (int64_t c = 0; c < C; ++c) p[35 * C + c] *= 1e4f;
      float state[4] = {1.f, 50.f, 0.f, 1.f};  // running row norm 50: factor 20 allows up to 1000
      double pend[5] = {}, norms[S];
      int32_t ok = -1, counts[2] = {-1, -1};
      cpu::expert_guard_forward(nullptr, &ok, counts, pend, norms, p, nullptr, 1, S, C, state, 20.f, false, true,
                                false);
      int64_t outliers = 0;
      for (int64_t i = 0; i < S; ++i) {
        double ss = 0.0;
        for (int64_t c = 0; c < C; ++c) ss += (double)p[i * C + c] * p[i * C + c];
        const double nm = std::sqrt(ss);
        const bool bad = !std::isfinite(nm) || nm > 20.0 * 50.0;
        outliers += std::isfinite(nm) && bad;
        if (bad)
          CHECK(norms[i] == -1.0);  // marked
        else
          CHECK(norms[i] == nm);
      }
      CHECK(outliers >= 1);
      CHECK((counts[0] == 2 && counts[1] == outliers));
    }
  }

  TEST_CASE("health kernels: experts judged each on its own rows and statistics; a cut expert's rows zeroed") {
    // Three experts over 7 rows: expert 0 rows 0-2 (a NaN in row 1), expert 1 none, expert 2 rows 3-6 (row 5 an
    // outlier against its running norm 1; expert 0 has no statistics yet, so a huge row there is not an outlier).
    const int64_t N = 3, S = 7, C = 5;
    const int64_t off[N + 1] = {0, 3, 3, 7};
    Tensor y = uniform({S, C}, 21);
    float* p = y.f32();
    p[1 * C + 3] = std::numeric_limits<float>::quiet_NaN();
    for (int64_t c = 0; c < C; ++c) p[2 * C + c] *= 1e4f, p[5 * C + c] *= 1e3f;
    const float state[4 * N] = {1, 1, 1, /*norm_ema*/ 0, 1, 1, /*wnorm*/ 0, 0, 0, /*usage*/ 0.3f, 0.3f, 0.4f};
    double pend[5 * N] = {}, norms[S];
    std::vector<float> orig = y.to_f32_vector();
    int32_t ok[N] = {-1, -1, -1}, counts[2] = {-1, -1};
    cpu::expert_guard_forward(p, ok, counts, pend, norms, p, off, N, S, C, state, 20.f, true, true, false);
    CHECK((ok[0] == 0 && ok[1] == 1 && ok[2] == 0));
    CHECK((counts[0] == 1 && counts[1] == 1));
    CHECK((pend[0] == 3 && pend[1] == 0 && pend[2] == 4));           // rows
    CHECK((pend[N + 0] == 1 && pend[N + 1] == 0 && pend[N + 2] == 1));  // bad rows
    CHECK((pend[2 * N + 0] == 2 && pend[2 * N + 2] == 3));             // good rows
    CHECK((pend[4 * N + 0] == 0 && pend[4 * N + 2] == 0));             // traffic: the router's, not the rows
    for (int64_t i = 0; i < S; ++i)
      for (int64_t c = 0; c < C; ++c)
        CHECK(p[i * C + c] == (i == 1 || i == 5 ? 0.f : orig[(size_t)(i * C + c)]));  // in place, bad rows only

    // The backward of the cut experts: their rows, or their one block each (weight gradients).
    std::vector<float> dx((size_t)(S * 2), 1.f), dw((size_t)(N * 4), 1.f);
    const int32_t only0[N] = {0, 1, 1};
    cpu::expert_rows_zero(dx.data(), only0, off, N, 2);
    for (int64_t i = 0; i < S; ++i) CHECK(dx[(size_t)(i * 2 + 1)] == (i < 3 ? 0.f : 1.f));
    cpu::expert_rows_zero(dw.data(), ok, nullptr, N, 4);
    for (int64_t e = 0; e < N; ++e) CHECK(dw[(size_t)(e * 4 + 3)] == (ok[e] ? 1.f : 0.f));

    // The update: expert 1 pruned (no tensors), usage from the traffic of every expert.
    const int32_t routed[N] = {3, 0, 5};
    cpu::expert_traffic_add(pend, routed, N);
    float st[4 * N];
    std::copy(state, state + 4 * N, st);
    const float sums[4] = {4.f, 0.f, 9.f, 0.f};  // expert 0: one weight (norm 2), one gradient; expert 2 the same
    const int64_t meta[2 * N] = {1, 0, 1, 1, 0, 1};
    // The same with expert 1's tensors there and its flag set where the pruning lives: passed over, the same bits.
    float st_flagged[4 * N];
    double pend_flagged[5 * N];
    std::copy(st, st + 4 * N, st_flagged);
    std::copy(pend, pend + 5 * N, pend_flagged);
    const float sums_all[6] = {4.f, 0.f, 1e30f, -1.f, 9.f, 0.f};  // expert 1's would poison its state if read
    const int64_t meta_all[2 * N] = {1, 1, 1, 1, 1, 1};
    const float flags[N] = {0.f, 1.f, 0.f};
    cpu::expert_health_update(st_flagged, pend_flagged, sums_all, meta_all, flags, N, 0.9f, 20.f, 1e-3f, true);
    cpu::expert_health_update(st, pend, sums, meta, nullptr, N, 0.9f, 20.f, 1e-3f, true);
    CHECK(std::memcmp(st_flagged, st, sizeof st) == 0);
    CHECK((st[2 * N + 0] == 2.f && st[2 * N + 1] == 0.f && st[2 * N + 2] == 3.f));
    CHECK(st[0] == 0.9f * 1.f + (1.f - 0.9f) * (1.f - 1.f / 3.f));
    CHECK(st[1] == 1.f);  // pruned: untouched
    CHECK(st[2] == 0.9f * 1.f + (1.f - 0.9f) * (1.f - 1.f / 4.f));
    CHECK(st[3 * N + 0] == 0.9f * 0.3f + (1.f - 0.9f) * 3.f / 8.f);
    CHECK(st[3 * N + 1] == 0.9f * 0.3f + (1.f - 0.9f) * 0.f);  // a pruned expert's usage still decays
    CHECK(st[3 * N + 2] == 0.9f * 0.4f + (1.f - 0.9f) * 5.f / 8.f);
    for (double v : pend) CHECK(v == 0.0);
  }

  TEST_CASE("pruning kernel: consecutive low steps counted per live expert; pruned at the window if the parent keeps "
            "top_k") {
    // 2 parents of 3 experts, top_k 2: a parent may lose one expert. Threshold 0.1 of the routed slots.
    constexpr int64_t N = 6;
    float low[N] = {0.f, 2.f, 2.f, 2.f, 1.f, 0.f}, pruned[N] = {0.f, 0.f, 0.f, 0.f, 0.f, 1.f};
    float state[4 * N];
    std::fill(state, state + 4 * N, 1.f);
    state[0] = 0.05f;                                // expert 0 unreliable, though busy
    int64_t load[N] = {40, 1, 2, 0, 50, 7};          // total 100: experts 1, 2, 3 under 10%; 5 is pruned already
    cpu::expert_prune_update(low, pruned, load, state, N, 3, 2, 0.1f, 3, true);
    CHECK(low[0] == 1.f);  // reliability under 0.1: low
    CHECK((low[1] == 3.f && low[2] == 3.f && low[3] == 3.f));
    CHECK(low[4] == 0.f);  // busy and reliable: the count restarts
    CHECK(low[5] == 0.f);  // pruned: untouched
    // Expert 1 reaches the window first and goes; expert 2 would leave parent 0 one live expert: stays. Expert 3's
    // parent already lost expert 5: it stays too.
    CHECK(std::vector<float>(pruned, pruned + N) == std::vector<float>{0.f, 1.f, 0.f, 0.f, 0.f, 1.f});
    CHECK(std::all_of(load, load + N, [](int64_t v) { return v == 0; }));  // cleared
    // No routed slot since the last step: nothing moves. Without reliability, expert 0's state is not read.
    const std::vector<float> before(low, low + N);
    cpu::expert_prune_update(low, pruned, load, state, N, 3, 2, 0.1f, 3, true);
    CHECK(std::vector<float>(low, low + N) == before);
    int64_t load2[N] = {40, 0, 30, 30, 0, 0};
    cpu::expert_prune_update(low, pruned, load2, state, N, 3, 2, 0.1f, 3, false);
    CHECK(low[0] == 0.f);
  }

  TEST_CASE("MoE layer: usage follows the routed traffic, output statistics the healthy rows, on the device") {
    CoEConfig c = make_coe_config(16, 2, 2, 2, 20, 2, 32, 8);
    c.validate();
    Generator g(5);
    MoELayer layer(c, 1, true, g);
    const float decay = c.reliability_decay;
    Tensor x = uniform({12, 16}, 9);
    MoELayer::Output o = layer.forward(x, nullptr, nullptr, true);
    o.read();  // a training step leaves its routing and statistics on the device
    sum(square(o.y)).backward();
    layer.after_step();
    const int64_t N = layer.N;
    std::vector<int64_t> routed((size_t)N, 0);
    for (int32_t e : o.expert) ++routed[(size_t)e];
    const std::vector<float> use = buffer_of(layer, "moe.usage_ema"), ema = buffer_of(layer, "moe.norm_ema");
    for (int64_t e = 0; e < N; ++e) {
      CAPTURE(e);
      const float share = (float)routed[(size_t)e] / (float)o.expert.size();
      CHECK(use[(size_t)e] == decay * (1.f / (float)N) + (1.f - decay) * share);
      CHECK((ema[(size_t)e] > 0.f) == (o.stats.expert_rows[(size_t)e] > 0));  // the first mean of its healthy rows
    }
  }

  TEST_CASE("dense layer: a healthy forward and backward are the FFN's own, bit for bit") {
    CoEConfig c = dense_config();
    Generator g1(3), g2(3);
    MoELayer guarded(c, 0, false, g1);
    CoEConfig off = c;
    off.use_reliability = false;
    MoELayer plain(off, 0, false, g2);
    Tensor x = uniform({10, 16}, 5);
    Tensor xa = x.detach(), xb = x.detach();
    xa.requires_grad_(true);
    xb.requires_grad_(true);
    Tensor ya = guarded.forward(xa, nullptr, nullptr, true).y, yb = plain.forward(xb, nullptr, nullptr, true).y;
    CHECK(ya.to_f32_vector() == yb.to_f32_vector());
    sum(square(ya)).backward();
    sum(square(yb)).backward();
    CHECK(xa.grad().to_f32_vector() == xb.grad().to_f32_vector());
    auto ta = guarded.experts[0].tensors(), tb = plain.experts[0].tensors();
    for (size_t i = 0; i < ta.size(); ++i) CHECK(ta[i].grad().to_f32_vector() == tb[i].grad().to_f32_vector());
  }

  TEST_CASE("dense layer: NaN weights are zeroed out of the output, cut from the backward, and lose reliability") {
    CoEConfig c = dense_config();
    Generator gen(4);
    MoELayer layer(c, 0, false, gen);
    layer.experts[0].w2.w.fill_(std::numeric_limits<float>::quiet_NaN());
    Tensor x = uniform({8, 16}, 6);
    x.requires_grad_(true);
    MoELayer::Output o = layer.forward(x, nullptr, nullptr, true);
    for (float v : o.y.to_f32_vector()) CHECK(v == 0.f);
    sum(o.y).backward();
    for (float v : x.grad().to_f32_vector()) CHECK(v == 0.f);  // not NaN: the cut selects
    for (const Tensor& t : layer.experts[0].tensors())
      for (float v : t.grad().to_f32_vector()) CHECK(v == 0.f);
    layer.after_step();
    const float r1 = layer.expert_reliability()[0];  // pulled from the layer's state
    CHECK(r1 == doctest::Approx(0.9f));
    for (int i = 0; i < 5; ++i) {
      layer.forward(x, nullptr, nullptr, true);
      layer.after_step();
    }
    CHECK(layer.layer_reliability() < 0.6f);
  }

  TEST_CASE("dense model: the device-resident health reaches the buffers, checkpoints and a reloaded model") {
    CoEConfig c = dense_config();
    ClusterMoELM a(c);
    AdamW opt(a.named_parameters());
    std::vector<int32_t> ids(2 * 8);
    for (size_t i = 0; i < ids.size(); ++i) ids[i] = (int32_t)(i * 7 % 20);
    Tensor x = Tensor::from_vector(ids, {2, 8}), y = x;
    for (int s = 0; s < 3; ++s) {
      a.forward(x, y).total_loss.backward();
      opt.step(1e-3f);
      a.after_step();
      opt.zero_grad();
    }
    // Three healthy steps: the weight and output statistics exist, and reliability stays 1.
    const float wn = buffer_value(a, "blocks.0.ffn.wnorm_ema"), on = buffer_value(a, "blocks.0.ffn.norm_ema");
    CHECK(wn > 0.f);
    CHECK(on > 0.f);
    CHECK(buffer_value(a, "blocks.0.ffn.reliability") == 1.f);
    // A second model loaded with these buffers and parameters continues with the same losses.
    ClusterMoELM b(c);
    auto pa = a.named_parameters(), pb = b.named_parameters();
    for (size_t i = 0; i < pa.size(); ++i) pb[i].second.copy_(pa[i].second);
    auto ba = a.named_buffers(), bb = b.named_buffers();
    for (size_t i = 0; i < ba.size(); ++i) bb[i].second.copy_(ba[i].second);
    CHECK(a.forward(x, y).loss.item() == b.forward(x, y).loss.item());
    // A corrupted FFN (x100 weights, finite) is judged against the running statistics carried over.
    for (auto& [n, t] : b.expert_parameters(0, 0)) t.copy_(mul(t, 100.f));
    b.forward(x, y).total_loss.backward();
    b.after_step();
    CHECK(b.get_reliability_stats()["layer_0_reliability"] < 1.f);
    CHECK(buffer_value(b, "blocks.0.ffn.wnorm_ema") == wn);  // a jump is not followed
  }
}
