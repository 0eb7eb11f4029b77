// The model, its optimizer and the trainer on CUDA against the CPU. Both models are built from the same seed on the
// CPU and one is moved with to(Device::CUDA), so they start from the same weights; they see the same batches.
// Forward values, routing decisions and every gradient must match within abs + rel * |ref| tolerances, a few
// optimizer steps must follow the CPU's, greedy generation must give the same tokens, and `train_lm --device cuda`
// must train, checkpoint and resume bit for bit. Skipped (and counted) without a device, like the rest of the
// CUDA suite; the CPU-only checks of the device plumbing live in test_model.cpp and test_trainer.cpp.
#include <algorithm>
#include <cmath>
#include <filesystem>
#include <sstream>

#include "helpers.h"
#include "model/checkpoint.h"
#include "model/coe.h"
#include "model/optim.h"
#include "model/trainer.h"
#include "tests/files.h"

#if CM_CUDA
#include "engine/cuda.h"
#endif

using namespace cm;

#if CM_CUDA
using cm::test::needs_device;

namespace {

// A small model of each router kind. cluster also has capacity, aux-free bias and dropout; ac routes with the AC
// transform from the second MoE layer on (labels come from the first).
CoEConfig tiny(RouterKind kind) {
  CoEConfig c;
  c.d_model = 32;
  c.n_layers = 2;
  c.n_heads = 2;
  c.d_ff = 48;
  c.vocab_size = 29;
  c.seq_len = 16;
  c.router = kind;
  c.num_clusters = 4;
  c.experts_per_cluster = 4;
  c.top_k_clusters = 2;
  c.top_k_experts = 1;
  if (kind == RouterKind::Tree) {
    c.tree_branching = {2, 2, 4};
    c.tree_top_k = {2, 1, 1};
  }
  if (kind == RouterKind::Cluster) {
    c.capacity_factor = 1.25f;
    c.aux_free_bias = true;
    c.dropout = 0.1f;
  }
  c.validate();
  return c;
}

const RouterKind kKinds[] = {RouterKind::Dense, RouterKind::Flat, RouterKind::Cluster, RouterKind::Tree,
                             RouterKind::AC};

Tensor random_ids(int64_t B, int64_t T, int64_t V, uint64_t seed) {
  std::vector<int32_t> v((size_t)(B * T));
  for (size_t i = 0; i < v.size(); ++i) v[i] = (int32_t)(philox_uniform(seed, 0, i) * (float)V) % (int32_t)V;
  return Tensor::from_vector(v, {B, T});
}

float max_abs(const std::vector<float>& v) {
  float m = 0.f;
  for (float x : v) m = std::max(m, std::fabs(x));
  return m;
}

// got within atol + rtol * |ref|, atol relative to the largest |ref| (gradients span orders of magnitude), plus
// extra_atol where a known absolute error adds to that.
void check_scaled(const Tensor& got, const Tensor& ref, float scale_tol, float rtol, const std::string& what,
                  float extra_atol = 0.f) {
  CAPTURE(what);
  std::vector<float> r = ref.to_f32_vector();
  CHECK_CLOSE(got, r, scale_tol * max_abs(r) + 1e-7f + extra_atol, rtol);
}

// Backward of both outputs; every parameter has a gradient on both models or on neither, the CUDA one on the
// device and within tolerance of the CPU's.
void check_gradients(ClusterMoELM& a, CoEOutput& oa, ClusterMoELM& b, CoEOutput& ob) {
  oa.total_loss.backward();
  ob.total_loss.backward();
  NamedTensors pa = a.named_parameters(), pb = b.named_parameters();
  REQUIRE(pa.size() == pb.size());
  for (size_t i = 0; i < pa.size(); ++i) {
    Tensor ga = pa[i].second.grad(), gb = pb[i].second.grad();
    REQUIRE_MESSAGE(ga.defined() == gb.defined(), pa[i].first);
    if (!ga.defined()) continue;
    CHECK(gb.device() == Device::CUDA);
    check_scaled(gb, ga, 1e-3f, 1e-3f, pa[i].first + ".grad");
  }
}

}  // namespace

TEST_SUITE("cuda") {
  TEST_CASE("cuda model: to() moves the parameters under the same handles, keeps them leaves, drops gradients" *
            needs_device()) {
    ClusterMoELM m(tiny(RouterKind::Cluster));
    const NamedTensors held = m.named_parameters();  // what an optimizer or a layer holds: handles
    std::vector<std::vector<float>> values;
    for (const auto& kv : held) values.push_back(kv.second.to_f32_vector());
    m.forward(random_ids(2, 16, 29, 1), random_ids(2, 16, 29, 2)).total_loss.backward();
    REQUIRE(held[0].second.grad().defined());
    m.to(Device::CUDA);
    CHECK(m.device() == Device::CUDA);
    const NamedTensors now = m.named_parameters();
    REQUIRE(now.size() == held.size());
    for (size_t i = 0; i < held.size(); ++i) {
      CAPTURE(held[i].first);
      const Tensor& p = held[i].second;
      CHECK(now[i].second.same(p));  // moved in place: every holder of the handle sees the move
      CHECK(p.device() == Device::CUDA);
      CHECK(p.requires_grad());
      CHECK(p.is_leaf());
      CHECK_FALSE(p.grad().defined());  // a CPU gradient beside a CUDA parameter would be refused by AdamW
      CHECK(p.is_contiguous());
      CHECK(p.to_f32_vector() == values[i]);  // copies are exact
    }
    for (const auto& kv : m.named_buffers()) CHECK_MESSAGE(kv.second.device() == Device::CPU, kv.first);
    m.to(Device::CPU);  // and back
    for (size_t i = 0; i < held.size(); ++i) {
      CHECK(held[i].second.device() == Device::CPU);
      CHECK(held[i].second.to_f32_vector() == values[i]);
    }
  }

  TEST_CASE("cuda model: forward, routing and every gradient match the CPU for each router kind" * needs_device()) {
    for (RouterKind kind : kKinds) {
      CAPTURE(router_kind_name(kind));
      CoEConfig cfg = tiny(kind);
      ClusterMoELM a(cfg), b(cfg);
      b.to(Device::CUDA);
      CHECK(b.device() == Device::CUDA);
      for (const auto& kv : b.named_parameters()) CHECK_MESSAGE(kv.second.device() == Device::CUDA, kv.first);
      for (const auto& kv : b.named_buffers()) CHECK_MESSAGE(kv.second.device() == Device::CPU, kv.first);

      Tensor ids = random_ids(4, 16, cfg.vocab_size, 11), tg = random_ids(4, 16, cfg.vocab_size, 12);
      CoEOutput oa = a.forward(ids, tg), ob = b.forward(ids, tg);  // CPU ids: forward moves them
      read_routing_stats(oa.layers);  // training forwards: their statistics are read on demand
      read_routing_stats(ob.layers);
      CHECK(ob.logits.device() == Device::CUDA);
      check_scaled(ob.logits, oa.logits, 1e-4f, 1e-3f, "logits");
      check_scaled(ob.loss, oa.loss, 0.f, 1e-5f, "loss");
      check_scaled(ob.aux_loss, oa.aux_loss, 1e-6f, 1e-4f, "aux loss");
      REQUIRE(oa.layers.size() == ob.layers.size());
      for (size_t l = 0; l < oa.layers.size(); ++l) {
        CAPTURE(l);
        CHECK(oa.layers[l].expert_rows == ob.layers[l].expert_rows);  // the same routing, slot for slot counted
        CHECK(oa.layers[l].dropped_fraction == ob.layers[l].dropped_fraction);
      }

      check_gradients(a, oa, b, ob);
    }
  }

  TEST_CASE("cuda model: the other model options match the CPU too (forward, gradients, greedy tokens)" *
            needs_device()) {
    // RMSNorm, GELU experts, biases, an untied head, the adaptive gate, a routing temperature, AC on both levels
    // of the cluster tree (labels from the first MoE layer for the third), a dense layer between, a pruned expert.
    CoEConfig c = tiny(RouterKind::Cluster);
    c.n_layers = 3;
    c.moe_every = 2;
    c.norm = NormKind::RMSNorm;
    c.expert = ExpertKind::GELU;
    c.bias = true;
    c.tie_embeddings = false;
    c.use_adaptive_routing = true;
    c.routing_temperature = 0.7f;
    c.ac_levels = {0, 1};
    c.validate();
    ClusterMoELM a(c), b(c);
    a.prune_expert(0, 3);
    b.prune_expert(0, 3);
    b.to(Device::CUDA);
    Tensor ids = random_ids(4, 16, c.vocab_size, 31), tg = random_ids(4, 16, c.vocab_size, 32);
    CoEOutput oa = a.forward(ids, tg), ob = b.forward(ids, tg);
    read_routing_stats(oa.layers);
    read_routing_stats(ob.layers);
    check_scaled(ob.logits, oa.logits, 1e-4f, 1e-3f, "logits");
    check_scaled(ob.loss, oa.loss, 0.f, 1e-5f, "loss");
    check_scaled(ob.aux_loss, oa.aux_loss, 1e-6f, 1e-4f, "aux loss");
    REQUIRE(oa.layers.size() == 3);
    CHECK(oa.layers[0].expert_rows[3] == 0);  // pruned: no rows, no compute
    for (size_t l = 0; l < oa.layers.size(); ++l) CHECK(ob.layers[l].expert_rows == oa.layers[l].expert_rows);
    // The specialization counters, counted on each model's device from the same routing: the same statistic.
    CHECK(b.get_expert_specialization() == a.get_expert_specialization());
    // AC's running m follows this batch's m on each model's device (pulled back when the buffers are read).
    const auto ba = a.named_buffers(), bb = b.named_buffers();
    REQUIRE(ba.size() == bb.size());
    int64_t moved = 0;  // the layers after the first MoE layer have labels: their running m left 1
    for (size_t i = 0; i < ba.size(); ++i)
      if (ba[i].first.find("ac_scale") != std::string::npos) {
        check_scaled(bb[i].second, ba[i].second, 1e-6f, 1e-5f, ba[i].first);
        moved += ba[i].second.to_f32_vector() != std::vector<float>((size_t)ba[i].second.numel(), 1.f);
      }
    CHECK(moved >= 1);
    check_gradients(a, oa, b, ob);
    const std::vector<int32_t> prompt = {7, 3, 9};
    CHECK(b.generate(prompt, 20, 0.f) == a.generate(prompt, 20, 0.f));
    // The utilization counters, summed on each model's device over that forward and the decoding's: the same.
    CHECK(b.get_expert_utilization() == a.get_expert_utilization());
  }

  TEST_CASE("cuda model: every gate design routes and differentiates as on the CPU" * needs_device()) {
    // Trees where the designs differ: top-k 1 above top-k 2 (renorm_path cancels the upper levels there).
    for (GateMode g : {GateMode::Product, GateMode::RenormPath, GateMode::RenormLast, GateMode::GroupLimited})
      for (RouterKind kind : {RouterKind::Cluster, RouterKind::Tree}) {
        const std::string mode = gate_mode_name(g);
        CAPTURE(mode);
        CAPTURE(router_kind_name(kind));
        CoEConfig cfg = tiny(kind);
        cfg.gate_mode = g;
        cfg.top_k_clusters = 1;
        cfg.top_k_experts = 2;
        cfg.tree_top_k = {1, 1, 2};
        cfg.dropout = 0.f;
        cfg.validate();
        ClusterMoELM a(cfg), b(cfg);
        b.to(Device::CUDA);
        Tensor ids = random_ids(4, 16, cfg.vocab_size, 41), tg = random_ids(4, 16, cfg.vocab_size, 42);
        CoEOutput oa = a.forward(ids, tg), ob = b.forward(ids, tg);
        read_routing_stats(oa.layers);
        read_routing_stats(ob.layers);
        check_scaled(ob.logits, oa.logits, 1e-4f, 1e-3f, "logits");
        check_scaled(ob.loss, oa.loss, 0.f, 1e-5f, "loss");
        check_scaled(ob.aux_loss, oa.aux_loss, 1e-6f, 1e-4f, "aux loss");
        for (size_t l = 0; l < oa.layers.size(); ++l) CHECK(oa.layers[l].expert_rows == ob.layers[l].expert_rows);
        check_gradients(a, oa, b, ob);
      }
  }

  TEST_CASE("cuda model: AdamW steps with clipping and after_step follow the CPU" * needs_device()) {
    for (RouterKind kind : {RouterKind::Dense, RouterKind::Cluster, RouterKind::Tree}) {
      CAPTURE(router_kind_name(kind));
      CoEConfig cfg = tiny(kind);
      ClusterMoELM a(cfg), b(cfg);
      b.to(Device::CUDA);
      NamedTensors pa = a.named_parameters(), pb = b.named_parameters();
      AdamW oa(pa), ob(pb);
      for (int step = 0; step < 4; ++step) {
        CAPTURE(step);
        Tensor ids = random_ids(4, 16, cfg.vocab_size, 100 + step), tg = random_ids(4, 16, cfg.vocab_size, 200 + step);
        CoEOutput fa = a.forward(ids, tg), fb = b.forward(ids.to(Device::CUDA), tg.to(Device::CUDA));
        CHECK(std::fabs(fb.loss.item() - fa.loss.item()) <= 1e-4f + 1e-3f * std::fabs(fa.loss.item()));
        fa.total_loss.backward();
        fb.total_loss.backward();
        const float na = clip_grad_norm(pa, 0.05f), nb = clip_grad_norm(pb, 0.05f);  // small: clipping happens
        CHECK(std::fabs(nb - na) <= 1e-3f * na);
        oa.step(3e-3f);
        ob.step(3e-3f);
        a.after_step();  // while the gradients are there: the health check reads them
        b.after_step();
        oa.zero_grad();
        ob.zero_grad();
      }
      // Adam turns rounding into steps of up to lr: where a gradient element nearly cancels, the devices'
      // summation orders can give it different signs, and its updates then differ by a fraction of lr whatever the
      // relative tolerance. Measured on the CPU with one model's weights perturbed by 1e-6 relative (the size of
      // FP32 GEMM rounding): 2 of 60 such runs had an element 2% to 5% of lr apart, over 1e-3 of max |p| + 1e-3 of
      // |p|. A quarter of lr is allowed on top: a wrong update rule (bias corrections, a learning rate off by 10%)
      // moves most elements further than that in 4 steps.
      for (size_t i = 0; i < pa.size(); ++i)
        check_scaled(pb[i].second, pa[i].second, 1e-3f, 1e-3f, pa[i].first, 0.25f * 3e-3f);
      NamedTensors sa = oa.state(), sb = ob.state();
      for (size_t i = 0; i < sa.size(); ++i) check_scaled(sb[i].second, sa[i].second, 1e-2f, 1e-2f, sa[i].first);
      CHECK(b.step() == 4);
      const auto ra = a.get_reliability_stats(), rb = b.get_reliability_stats();
      for (const auto& kv : ra) CHECK_MESSAGE(std::fabs(rb.at(kv.first) - kv.second) <= 1e-4f, kv.first);
      // Every buffer after_step keeps (output-norm and weight-norm statistics from the device-side norms, usage,
      // aux-free biases, pruning counters), on the host for both models.
      const auto ba = a.named_buffers(), bb = b.named_buffers();
      REQUIRE(ba.size() == bb.size());
      for (size_t i = 0; i < ba.size(); ++i) {
        CHECK_MESSAGE(bb[i].second.device() == Device::CPU, bb[i].first);
        check_scaled(bb[i].second, ba[i].second, 1e-5f, 1e-4f, ba[i].first);
      }
    }
  }

  TEST_CASE("cuda model: a NaN expert is cut from the graph and loses reliability as on the CPU" * needs_device()) {
    // The fault guard's device path (row norms made on the GPU, the segment replaced by a zeroed constant there)
    // and after_step's device norms of weights and gradients, against the CPU's double-precision ones.
    CoEConfig cfg = tiny(RouterKind::Cluster);
    cfg.dropout = 0.f;  // the corrupted expert's rows then follow from routing alone
    cfg.capacity_factor = 0.f;
    ClusterMoELM a(cfg), b(cfg);
    b.to(Device::CUDA);
    Tensor ids = random_ids(4, 16, cfg.vocab_size, 21), tg = random_ids(4, 16, cfg.vocab_size, 22);
    // The busiest expert of layer 0 (its input does not depend on layer 0's experts, so it keeps its rows).
    int64_t e = 0;
    {
      NoGrad ng;
      a.eval();
      const std::vector<int64_t> rows = a.forward(ids).layers[0].expert_rows;
      a.train();
      e = std::max_element(rows.begin(), rows.end()) - rows.begin();
      REQUIRE(rows[e] > 0);
    }
    for (ClusterMoELM* m : {&a, &b})
      for (const auto& kv : m->expert_parameters(0, e)) Tensor(kv.second).fill_(NAN);

    CoEOutput oa = a.forward(ids, tg), ob = b.forward(ids, tg);
    read_routing_stats(oa.layers);
    read_routing_stats(ob.layers);
    CHECK(oa.layers[0].nonfinite_rows == oa.layers[0].expert_rows[e]);
    CHECK(ob.layers[0].nonfinite_rows == oa.layers[0].nonfinite_rows);
    CHECK(ob.layers[0].expert_rows == oa.layers[0].expert_rows);
    CHECK(std::isfinite(ob.loss.item()));
    check_scaled(ob.loss, oa.loss, 0.f, 1e-5f, "loss");
    oa.total_loss.backward();
    ob.total_loss.backward();
    NamedTensors pa = a.named_parameters(), pb = b.named_parameters();
    std::vector<Tensor> grads_b;
    for (size_t i = 0; i < pa.size(); ++i) {
      Tensor ga = pa[i].second.grad(), gb = pb[i].second.grad();
      REQUIRE_MESSAGE(ga.defined() == gb.defined(), pa[i].first);
      if (!ga.defined()) continue;
      grads_b.push_back(gb);
      check_scaled(gb, ga, 1e-3f, 1e-3f, pa[i].first + ".grad");
    }
    for (const auto& kv : b.expert_parameters(0, e))  // cut: a zero gradient, selected where the verdict lives
      for (float v : kv.second.grad().to_f32_vector()) CHECK_MESSAGE(v == 0.f, kv.first);
    for (double ss : sums_of_squares(grads_b)) CHECK(std::isfinite(ss));

    // after_step while the gradients are still there, so that their device norms are taken too.
    a.after_step();
    b.after_step();
    const auto ra = a.get_reliability_stats(), rb = b.get_reliability_stats();
    for (const auto& kv : ra) CHECK_MESSAGE(std::fabs(rb.at(kv.first) - kv.second) <= 1e-6f, kv.first);
    CHECK(b.get_reliability_stats().at(str("layer_0_cluster_", e / cfg.experts_per_cluster, "_expert_",
                                           e % cfg.experts_per_cluster, "_reliability")) < 0.95f);
    const auto ba = a.named_buffers(), bb = b.named_buffers();
    for (size_t i = 0; i < ba.size(); ++i) check_scaled(bb[i].second, ba[i].second, 1e-5f, 1e-4f, ba[i].first);
  }

  TEST_CASE("cuda optimizer: AdamW and clipping on the device follow the CPU, decay and no-decay alike" *
            needs_device()) {
    // A large learning rate and weight decay, so that a lost decay or a slice with another tensor's settings
    // shows at once: "w" decays, "b" (1-D) and "tok_emb.weight" (an embedding) do not; "big" spans several blocks
    // of the fused kernel. w's gradient is a transposed view: scaled through set_grad when clipped, and handed to
    // AdamW as it is at step 1, which only measures the norm.
    const std::vector<std::pair<std::string, Shape>> shapes = {
        {"w", {5, 7}}, {"b", {7}}, {"tok_emb.weight", {4, 3}}, {"big", {3, 1500}}};
    auto make = [&](Device dev) {
      NamedTensors ps;
      for (size_t i = 0; i < shapes.size(); ++i) {
        Tensor t = test::uniform(shapes[i].second, 10 + i).to(dev);
        t.requires_grad_(true);
        ps.emplace_back(shapes[i].first, t);
      }
      return ps;
    };
    NamedTensors pa = make(Device::CPU), pb = make(Device::CUDA);
    AdamWOptions o;
    o.weight_decay = 0.5f;
    AdamW oa(pa, o), ob(pb, o);
    for (int step = 0; step < 3; ++step) {
      CAPTURE(step);
      for (size_t i = 0; i < pa.size(); ++i) {
        const Shape& s = shapes[i].second;
        const uint64_t seed = 100 + 10 * (uint64_t)step + i;
        if (i == 0) {
          Tensor g = test::uniform({s[1], s[0]}, seed);
          pa[i].second.set_grad(g.transpose(0, 1));
          pb[i].second.set_grad(g.to(Device::CUDA).transpose(0, 1));
          REQUIRE_FALSE(pb[i].second.grad().is_contiguous());
        } else {
          Tensor g = test::uniform(s, seed);
          pa[i].second.set_grad(g);
          pb[i].second.set_grad(g.to(Device::CUDA));
        }
      }
      const float max_norm = step == 1 ? 0.f : 0.5f;
      const float na = clip_grad_norm(pa, max_norm), nb = clip_grad_norm(pb, max_norm);
      CHECK(na > 0.5f);  // the clipping steps do clip
      CHECK(std::fabs(nb - na) <= 1e-5f * na);
      oa.step(0.05f);
      ob.step(0.05f);
      oa.zero_grad();
      ob.zero_grad();
    }
    for (size_t i = 0; i < pa.size(); ++i) check_scaled(pb[i].second, pa[i].second, 1e-5f, 1e-5f, pa[i].first);
    NamedTensors sa = oa.state(), sb = ob.state();
    for (size_t i = 0; i < sa.size(); ++i) check_scaled(sb[i].second, sa[i].second, 1e-5f, 1e-4f, sa[i].first);
    CHECK(ob.step_count() == 3);

    // sums_of_squares keeps the order of a list that mixes devices (the device sums come back in one copy).
    const std::vector<Tensor> mixed = {pa[0].second, pb[1].second, pa[2].second, pb[3].second};
    const std::vector<double> got = sums_of_squares(mixed);
    REQUIRE(got.size() == mixed.size());
    for (size_t i = 0; i < mixed.size(); ++i) {
      const double want = sums_of_squares({mixed[i].detach().to(Device::CPU)})[0];
      CHECK_MESSAGE(std::fabs(got[i] - want) <= 1e-5 * want, "tensor ", i);
    }
  }

  TEST_CASE("cuda optimizer: an AdamW built before the model moved is refused and changes nothing" *
            needs_device()) {
    // Its moments stay where they were made; the parameters' storage moved under the same handles. Without the
    // check the fused kernel would get host pointers for m and v.
    ClusterMoELM m(tiny(RouterKind::Dense));
    AdamW early(m.named_parameters());
    m.to(Device::CUDA);
    m.forward(random_ids(2, 16, 29, 5), random_ids(2, 16, 29, 6)).total_loss.backward();
    const Tensor p0 = m.named_parameters()[0].second;
    const std::vector<float> before = p0.to_f32_vector();
    CHECK_THROWS_WITH_AS(early.step(1e-3f), doctest::Contains("build the optimizer after moving the model"), Error);
    CHECK(early.step_count() == 0);
    CHECK(p0.to_f32_vector() == before);
    AdamW late(m.named_parameters());  // built after the move: fine
    late.step(1e-3f);
    CHECK(p0.to_f32_vector() != before);
  }

  TEST_CASE("cuda autograd: a gradient on the wrong device is refused where it is made, naming the rule" *
            needs_device()) {
    Tensor x = test::uniform({3}, 1).to(Device::CUDA);
    x.requires_grad_(true);
    // A backward rule that forgets its input's device (what a CUDA branch copied from the CPU one could do).
    Tensor y = record("stray_rule", mul(x.detach(), 2.f), {x},
                      [](const Tensor& g) { return grads{g.to(Device::CPU)}; });
    CHECK_THROWS_WITH_AS(sum(y).backward(), doctest::Contains("op 'stray_rule' gave input 0 a gradient on cpu"),
                         Error);
    CHECK_FALSE(x.grad().defined());
    CHECK_THROWS_WITH_AS(sum(mul(x, 3.f)).backward(Tensor::scalar(1.f)),
                         doctest::Contains("backward(): gradient on cpu"), Error);
    CHECK_THROWS_WITH_AS(x.set_grad(Tensor::zeros({3})), doctest::Contains("gradient on cpu for a tensor on cuda"),
                         Error);
    sum(mul(x, 3.f)).backward();  // the right device throughout: fine
    CHECK(x.grad().device() == Device::CUDA);
    CHECK(x.grad().to_f32_vector() == std::vector<float>{3.f, 3.f, 3.f});
  }

  TEST_CASE("cuda model: a warm training step serves its memory from the cache" * needs_device()) {
    CoEConfig cfg = tiny(RouterKind::Cluster);
    ClusterMoELM m(cfg);
    m.to(Device::CUDA);
    NamedTensors p = m.named_parameters();
    AdamW opt(p);
    int64_t mallocs0 = 0, requests0 = 0;
    for (int step = 0; step < 10; ++step) {
      if (step == 5) {
        mallocs0 = cuda::mem_stats().mallocs;
        requests0 = cuda::mem_stats().requests;
      }
      Tensor ids = random_ids(4, 16, cfg.vocab_size, 300 + step), tg = random_ids(4, 16, cfg.vocab_size, 400 + step);
      m.forward(ids, tg).total_loss.backward();
      clip_grad_norm(p, 1.f);
      opt.step(1e-3f);
      m.after_step();
      opt.zero_grad();
    }
    const cuda::MemStats s = cuda::mem_stats();
    MESSAGE("5 warm steps: ", s.requests - requests0, " allocations, ", s.mallocs - mallocs0, " cudaMalloc");
    CHECK(s.requests - requests0 > 100);
    // Routing makes segment sizes vary from step to step; the size classes still absorb nearly all of them.
    CHECK((s.mallocs - mallocs0) * 100 <= s.requests - requests0);
  }

  TEST_CASE("cuda model: greedy generation gives the CPU's tokens, with and without the cache" * needs_device()) {
    for (PosKind pk : {PosKind::Learned, PosKind::Rope}) {  // rope: the rolling cache, 24 + 5 bytes past seq_len 8
      CAPTURE(pos_kind_name(pk));
      CoEConfig cfg = tiny(RouterKind::Cluster);
      cfg.dropout = 0.f;
      cfg.pos = pk;
      cfg.seq_len = 8;
      ClusterMoELM a(cfg), b(cfg);
      b.to(Device::CUDA);
      std::vector<int32_t> prompt = {3, 1, 4, 1, 5};
      std::vector<int32_t> ta = a.generate(prompt, 24, 0.f), tb = b.generate(prompt, 24, 0.f);
      CHECK(ta == tb);
      CHECK(b.generate(prompt, 24, 0.f, 0, 0, false) == tb);
      CHECK(b.training());  // generate restores the mode
    }
  }

  TEST_CASE("cuda trainer: --cuda_graph replays the step with the eager run's losses, bit for bit" * needs_device()) {
    test::TempDir dir("cuda_graph");
    std::string text;
    for (int i = 0; i < 300; ++i) text += "Now is the winter of our discontent. " + std::to_string(i) + "\n";
    const std::string data = dir.file("text.txt");
    test::write_bytes(data, text);
    // Warm-up then cosine: the learning rate changes at every step, and so does AdamW's bias correction; dropout
    // draws new masks at every step; two micro-batches per step; checkpoints and evaluations between replays.
    auto args = [&](const std::string& out, std::vector<std::string> extra) {
      std::vector<std::string> a = {"--data", data, "--device", "cuda", "--preset", "cpu", "--out_dir", dir.file(out),
                                    "--router", "dense", "--d_model", "32", "--n_layers", "2", "--n_heads", "2",
                                    "--d_ff", "64", "--seq_len", "16", "--batch_size", "4", "--grad_accum", "2",
                                    "--eval_iters", "1", "--sample_every", "0", "--log_every", "3",
                                    "--warmup_steps", "3", "--lr", "3e-3", "--max_steps", "9", "--eval_every", "4",
                                    "--save_every", "4", "--keep_last", "0", "--dropout", "0.1"};
      a.insert(a.end(), extra.begin(), extra.end());
      return a;
    };
    auto options = [&](std::vector<std::string> a) {
      bool help = false;
      std::string usage;
      return resolve_train_args(a, &help, &usage);
    };
    std::ostringstream sink;
    // The device memory each run obtains (a run's tensors are freed when it returns, into the cache).
    auto reserved_by = [&](auto run) {
      cuda::empty_cache();
      const size_t before = cuda::mem_stats().reserved;
      TrainResult r = run();
      return std::make_pair(r, cuda::mem_stats().reserved - before);
    };
    auto [eager, eager_bytes] = reserved_by([&] { return train(options(args("eager", {})), sink); });
    auto [graph, graph_bytes] = reserved_by([&] { return train(options(args("graph", {"--cuda_graph"})), sink); });
    // The capture reuses the blocks the eager first step freed, not a second working set beside them.
    CHECK_MESSAGE(graph_bytes <= eager_bytes * 5 / 4, "eager ", eager_bytes, " bytes, graph ", graph_bytes);
    REQUIRE(eager.step_losses.size() == 9);
    REQUIRE(graph.step_losses.size() == 9);
    for (size_t i = 0; i < 9; ++i) CHECK_MESSAGE(graph.step_losses[i] == eager.step_losses[i], "step ", i + 1);
    REQUIRE(graph.evals.size() == eager.evals.size());
    for (size_t i = 0; i < eager.evals.size(); ++i) CHECK(graph.evals[i].val_loss == eager.evals[i].val_loss);
    CHECK(graph.quiet_step_syncs == 0);
    // The checkpoints hold the same parameters, moments, health buffers and step count.
    SafeTensors a = load_safetensors(checkpoint_path(dir.file("eager"), 8));
    SafeTensors b = load_safetensors(checkpoint_path(dir.file("graph"), 8));
    REQUIRE(a.tensors.size() == b.tensors.size());
    for (size_t i = 0; i < a.tensors.size(); ++i) {
      CAPTURE(a.tensors[i].first);
      CHECK(a.tensors[i].second.to_f32_vector() == b.tensors[i].second.to_f32_vector());
    }
    CHECK(*a.meta("adamw_step") == *b.meta("adamw_step"));
    // Resumed with --cuda_graph from step 4: the first step runs eagerly, then it captures again.
    std::filesystem::create_directories(dir.file("resumed"));
    std::filesystem::copy_file(checkpoint_path(dir.file("eager"), 4), checkpoint_path(dir.file("resumed"), 4));
    TrainResult rest = train(options({"--out_dir", dir.file("resumed"), "--resume", "--cuda_graph", "1"}), sink);
    REQUIRE(rest.step_losses.size() == 5);
    for (size_t i = 0; i < 5; ++i) CHECK_MESSAGE(rest.step_losses[i] == eager.step_losses[4 + i], "step ", 5 + i);

    // An MoE model whose training step reads nothing on the host is captured as well: the cluster router with
    // reliability (its guard, health update, routing bias and statistics on the device), capacity (its filter and
    // plan there, some expert over capacity in every step) and the aux-free bias (its loads and update there), 5
    // steps (an evaluation, a checkpoint and reset_metrics after step 4, between replays).
    for (const char* router : {"cluster"}) {
      CAPTURE(router);
      const std::string r = router;
      const std::vector<std::string> moe = {"--router", r, "--max_steps", "5", "--top_k_experts", "2",
                                            "--capacity_factor", "1.0", "--aux_free_bias", "1"};
      TrainResult me = train(options(args("moe_eager_" + r, moe)), sink);
      std::vector<std::string> moe_graph = moe;
      moe_graph.push_back("--cuda_graph");
      TrainResult mg = train(options(args("moe_graph_" + r, moe_graph)), sink);
      REQUIRE(me.step_losses.size() == 5);
      REQUIRE(mg.step_losses.size() == 5);
      for (size_t i = 0; i < 5; ++i) CHECK_MESSAGE(mg.step_losses[i] == me.step_losses[i], "step ", i + 1);
      CHECK(me.quiet_step_syncs == 0);
      CHECK(mg.quiet_step_syncs == 0);
      SafeTensors ma = load_safetensors(checkpoint_path(dir.file("moe_eager_" + r), 4));
      SafeTensors mb = load_safetensors(checkpoint_path(dir.file("moe_graph_" + r), 4));
      REQUIRE(ma.tensors.size() == mb.tensors.size());
      for (size_t i = 0; i < ma.tensors.size(); ++i) {
        CAPTURE(ma.tensors[i].first);
        CHECK(ma.tensors[i].second.to_f32_vector() == mb.tensors[i].second.to_f32_vector());
      }
      CHECK(*ma.meta("routing_tally") == *mb.meta("routing_tally"));
    }

    // group_limited selects on the device (kernels/route.h route_group_select): captured too, with pruning (its
    // loads, decision and flags there; a threshold that prunes within the captured steps). 3 steps: eager, captured,
    // replayed.
    const std::vector<std::string> gl = {"--router",  "cluster", "--gate_mode",         "group_limited",
                                         "--max_steps", "3",     "--enable_expert_pruning", "1",
                                         "--pruning_threshold", "0.45", "--pruning_window", "1"};
    std::vector<std::string> gl_graph = gl;
    gl_graph.push_back("--cuda_graph");
    TrainResult ge = train(options(args("gl_eager", gl)), sink);
    TrainResult gg = train(options(args("gl_graph", gl_graph)), sink);
    REQUIRE(ge.step_losses.size() == 3);
    REQUIRE(gg.step_losses.size() == 3);
    for (size_t i = 0; i < 3; ++i) CHECK_MESSAGE(gg.step_losses[i] == ge.step_losses[i], "group_limited step ", i + 1);
    CHECK(gg.quiet_step_syncs == 0);

    // On the CPU --cuda_graph is refused with a message naming the reason, before any step.
    std::ostringstream out, err;
    CHECK(run_train_lm(args("cpu", {"--cuda_graph", "--device", "cpu"}), out, err) == 2);
    CHECK(err.str().find("--cuda_graph captures the training step's CUDA work: it needs --device cuda") !=
          std::string::npos);
  }

  TEST_CASE("cuda trainer: train_lm --device cuda follows the CPU run and resumes bit for bit" * needs_device()) {
    test::TempDir dir("cuda_train");
    std::string text;
    for (int i = 0; i < 400; ++i) text += "To be, or not to be, that is the question. " + std::to_string(i) + "\n";
    const std::string data = dir.file("text.txt");
    test::write_bytes(data, text);
    auto options = [&](const std::string& device, const std::string& out, std::vector<std::string> extra) {
      std::vector<std::string> a = {"--data", data, "--device", device, "--preset", "cpu", "--out_dir", dir.file(out),
                                    "--d_model", "32",
                                    "--n_layers", "2", "--n_heads", "2", "--d_ff", "64", "--num_clusters", "2",
                                    "--experts_per_cluster", "2", "--top_k_clusters", "1", "--top_k_experts", "1",
                                    "--seq_len", "32", "--batch_size", "8", "--eval_iters", "2", "--sample_every", "0",
                                    "--log_every", "0", "--warmup_steps", "2", "--lr", "3e-3", "--max_steps", "12",
                                    "--eval_every", "6", "--save_every", "6", "--keep_last", "0", "--dropout", "0.1"};
      a.insert(a.end(), extra.begin(), extra.end());
      bool help = false;
      std::string usage;
      return resolve_train_args(a, &help, &usage);
    };
    std::ostringstream sink;
    TrainResult cpu = train(options("cpu", "cpu", {}), sink);
    TrainResult gpu = train(options("cuda", "gpu", {}), sink);
    CHECK(gpu.device == "cuda");
    REQUIRE(gpu.step_losses.size() == 12);
    for (size_t i = 0; i < 3; ++i)  // early steps, before Adam amplifies rounding differences
      CHECK_MESSAGE(std::fabs(gpu.step_losses[i] - cpu.step_losses[i]) <= 1e-3 * cpu.step_losses[i], "step ", i + 1);
    CHECK(std::fabs(gpu.evals.back().val_loss - cpu.evals.back().val_loss) <= 0.05);
    CHECK(gpu.evals.back().val_loss < gpu.evals.front().val_loss);
    // engine/host_sync.h: the CPU build counts the read-outs where a device build waits; the device build counts
    // its real waits. They agree: nothing else waits on the device (index checks and uploads do not).
    CHECK(gpu.quiet_steps == cpu.quiet_steps);
    CHECK(gpu.quiet_step_syncs == cpu.quiet_step_syncs);
    // The dense model's quiet steps wait for nothing on the device either (real waits, counted by engine/cuda.cu):
    // ids, dropout, the fault guard, clipping, AdamW and the health update stay there.
    TrainResult dense = train(options("cuda", "dense", {"--router", "dense", "--max_steps", "6", "--save_every", "0"}),
                              sink);
    REQUIRE(dense.quiet_steps == 5);  // steps 1 to 5; step 6, the last, evaluates
    CHECK(dense.quiet_step_syncs == 0);
    // The other MoE routers' device counts equal their CPU counts too (tests/test_trainer.cpp asserts the CPU's):
    // AC's batch scales, group_limited's selection, pruning, the capacity filter and the aux-free bias on the device.
    const std::vector<std::vector<std::string>> kinds = {
        {"--router", "ac"},
        {"--router", "cluster", "--gate_mode", "group_limited", "--enable_expert_pruning", "1"},
        {"--router", "cluster", "--top_k_experts", "2", "--capacity_factor", "1.0", "--aux_free_bias", "1"}};
    for (size_t i = 0; i < kinds.size(); ++i) {
      CAPTURE(i);
      std::vector<std::string> extra = kinds[i];
      for (const char* a : {"--max_steps", "4", "--eval_every", "4", "--save_every", "0", "--eval_iters", "1"})
        extra.push_back(a);
      TrainResult kc = train(options("cpu", "kind_cpu_" + std::to_string(i), extra), sink);
      TrainResult kg = train(options("cuda", "kind_gpu_" + std::to_string(i), extra), sink);
      REQUIRE(kg.quiet_steps == 3);
      CHECK(kg.quiet_step_syncs == kc.quiet_step_syncs);
      // None waits (AC's labels, group_limited's selection, pruning, the capacity filter and plan, the aux-free
      // update on the device).
      CHECK(kg.quiet_step_syncs == 0);
    }

    // --tf32 lasts for its run: the matmul precision is process-wide, and what runs next here is on FP32 again.
    REQUIRE(cuda::matmul_precision() == cuda::MatmulPrecision::FP32);
    TrainResult tf = train(options("cuda", "tf32", {"--tf32", "1", "--max_steps", "3"}), sink);
    REQUIRE(tf.step_losses.size() == 3);
    // Step 1 sees the same weights and batch as the FP32 run; only the products' rounding differs.
    CHECK(std::fabs(tf.step_losses[0] - gpu.step_losses[0]) <= 1e-2 * gpu.step_losses[0]);
    CHECK(cuda::matmul_precision() == cuda::MatmulPrecision::FP32);

    // sample --device cuda continues a prompt from the CUDA run's checkpoint as the CPU does (greedy).
    auto sample = [&](const std::string& device) {
      std::ostringstream text, err;
      const int rc = run_sample({"--out_dir", dir.file("gpu"), "--device", device, "--prompt", "To be",
                                 "--max_new_tokens", "40", "--temperature", "0"},
                                text, err);
      CHECK_MESSAGE(rc == 0, err.str());
      return text.str();
    };
    const std::string sampled_gpu = sample("cuda"), sampled_cpu = sample("cpu");
    CHECK(sampled_gpu.size() > 40);  // the prompt, 40 bytes, a newline
    CHECK(sampled_gpu == sampled_cpu);

    // The same device and build: an interrupted run resumed from its step-6 checkpoint gives the same bits.
    TrainOptions first = options("cuda", "split", {});
    first.stop_at = 9;
    train(first, sink);
    bool help = false;
    std::string usage;
    TrainResult rest = train(resolve_train_args({"--out_dir", dir.file("split"), "--resume"}, &help, &usage), sink);
    CHECK(rest.device == "cuda");
    REQUIRE(rest.step_losses.size() == 6);
    for (size_t i = 0; i < 6; ++i) CHECK_MESSAGE(rest.step_losses[i] == gpu.step_losses[6 + i], "step ", 7 + i);
    CHECK(rest.evals.back().val_loss == gpu.evals.back().val_loss);

    // A CUDA checkpoint resumes on the CPU: it holds host copies, and the device is a flag like any other. The
    // first resumed step starts from the same state, so its loss is the CUDA run's up to rounding.
    std::filesystem::create_directories(dir.file("cross"));
    std::filesystem::copy_file(checkpoint_path(dir.file("split"), 6), checkpoint_path(dir.file("cross"), 6));
    TrainResult cross = train(resolve_train_args({"--out_dir", dir.file("cross"), "--resume", "--device", "cpu"},
                                                 &help, &usage),
                              sink);
    CHECK(cross.device == "cpu");
    REQUIRE(cross.step_losses.size() == 6);
    CHECK(std::fabs(cross.step_losses[0] - gpu.step_losses[6]) <= 1e-3 * gpu.step_losses[6]);
  }
}
#endif  // CM_CUDA

// Device-independent, but here because it guards the fused CUDA step: its slices are updated concurrently, so two
// entries over the same memory would race there. On the CPU they would be updated twice in turn.
TEST_SUITE("cuda") {
  TEST_CASE("cuda optimizer: AdamW refuses parameters that share memory") {
    auto run = [](Device dev) {
      CAPTURE(device_name(dev));
      Tensor w = test::uniform({4, 4}, 1).to(dev), flat = test::uniform({10}, 2).to(dev);
      CHECK_THROWS_WITH_AS(AdamW({{"a", w}, {"b", w}}), doctest::Contains("'a' and 'b' share memory"), Error);
      CHECK_THROWS_WITH_AS(AdamW({{"x", flat.slice(0, 4, 10)}, {"w", w}, {"y", flat.slice(0, 0, 6)}}),
                           doctest::Contains("share memory"), Error);
      CHECK_NOTHROW(AdamW({{"x", flat.slice(0, 5, 10)}, {"w", w}, {"y", flat.slice(0, 0, 5)}}));  // adjacent: fine
    };
    run(Device::CPU);
    if (cuda_available()) run(Device::CUDA);
  }
}
