// Routing cost alone as the number of experts N grows (8 to 1024): flat top-k against ClusterMoE's two levels against
// deeper trees, in FLOPs and in time. This is the measured form of DESIGN.md 4.2's claim: a tree with branching
// [b1, ..., bD] scores sum_l K_{l-1} b_l children per token instead of N, i.e. O(D b C) instead of O(N C).
//
// Every tree sends a token to K = 2 experts the same way the train bench's configurations do: the top 1 child at
// every level but the last, the top 2 leaves under the kept node. Trees per N (a power of two):
//   flat     [N]                     routing FLOPs/token 2 C N
//   2-level  [b1, N / b1], b1 = 2^floor(log2(N) / 2)  (ClusterMoE: sqrt(N) clusters of sqrt(N) experts)
//   b=4      [4, ..., 4] (a leading 2 when log2 N is odd)
//   b=2      [2, ..., 2] (binary)
// FLOPs per token are model/router.h's routing_flops_per_token (2 per multiply-add on the router logits).
//
// Three timings of routing T tokens of width C, each the median of REPEATS runs after a warm-up run:
//   infer   the model's TreeRouter::route (model/router.h) under NoGrad with the loss weights at 0: logits of the
//           kept nodes only, softmax, top-k selection, gates - what inference pays.
//   train   TreeRouter::route with the default loss weights (load balance, z-loss, diversity) plus backward of the
//           gates (times a random upstream gradient, as the combine sends) and the losses - what training pays.
//   floor   the same routing written with device-neutral ops only (per level: pairs grouped by node, one product per
//           node against its b router rows, softmax, topk; the selection's index bookkeeping on the host), no losses,
//           no reliability: what the routing arithmetic itself costs. It runs on CUDA as soon as the ops do; the
//           router's own CUDA path depends on model/router.cpp.
// Each "vs flat" ratio is flat's time over the tree's (> 1: the tree is cheaper), from the same run; the last
// column, infer over floor, is what the router's own bookkeeping (host selection, entropy statistic) costs on top of
// the routing arithmetic (1: none).
// Validation first: for every tree the floor's selected experts must equal TreeRouter's (both pick the top k of the
// same softmax, ties to the lower index).
//
//   make -j2 USE_CUDA=0 build/bench/routing_cost
//   OMP_NUM_THREADS=2 ./build/bench/routing_cost [--T 4096] [--C 256] [--device auto|cpu|cuda] [--quick]
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "bench/timing.h"
#include "autograd/ops.h"
#include "model/config.h"
#include "model/router.h"
#include "model/trainer.h"

#ifdef _OPENMP
#include <omp.h>
#endif

using namespace cm;

namespace {

constexpr int REPEATS = 9;  // more than the labs' 5: the small trees' timings are a few ms on a shared machine

// f must leave its results on the host (a device sync): every timed function below ends in a host read.
template <class F>
double median_ms(F f) {
  return 1e3 * cm::bench::median_seconds(f, REPEATS);
}

struct Tree {
  std::string name;
  std::vector<int64_t> b, k;
};

std::vector<Tree> trees_for(int64_t N) {
  int64_t lg = 0;
  while (((int64_t)1 << lg) < N) ++lg;
  auto last2 = [](std::vector<int64_t> b) {
    std::vector<int64_t> k(b.size(), 1);
    k.back() = 2;
    return k;
  };
  std::vector<Tree> t;
  t.push_back({"flat", {N}, {2}});
  const int64_t b1 = (int64_t)1 << (lg / 2);
  t.push_back({"2-level", {b1, N / b1}, {1, 2}});
  std::vector<int64_t> b4;
  if (lg % 2) b4.push_back(2);
  for (int64_t i = 0; i < lg / 2; ++i) b4.push_back(4);
  if (b4.size() > 2) t.push_back({"b=4", b4, last2(b4)});
  std::vector<int64_t> b2((size_t)lg, 2);
  if (b2.size() > 2 && b2 != b4) t.push_back({"b=2", b2, last2(b2)});
  for (auto& x : t) x.k = x.k.size() == x.b.size() ? x.k : last2(x.b);
  return t;
}

std::string vec_str(const std::vector<int64_t>& v) {
  std::string s;
  for (size_t i = 0; i < v.size(); ++i) s += (i ? "," : "") + std::to_string(v[i]);
  return s;
}

CoEConfig router_config(const Tree& t, int64_t C, bool losses) {
  CoEConfig c;
  c.d_model = C;
  c.n_heads = 1;
  c.router = RouterKind::Tree;
  c.tree_branching = t.b;
  c.tree_top_k = t.k;
  int64_t N = 1;
  for (int64_t b : t.b) N *= b;
  c.num_clusters = t.b[0];
  c.experts_per_cluster = N / t.b[0];
  if (!losses) c.load_balancing_weight = c.router_z_loss_weight = c.diversity_weight = 0.f;
  c.validate();
  return c;
}

// The floor: tree routing from ops alone on h's device. weights[l] [nodes_l * b_l, C]. Returns the experts [T*K].
std::vector<int32_t> route_ops(const Tensor& h, const std::vector<Tensor>& weights, const Tree& t) {
  NoGrad ng;
  const Device dev = h.device();
  const int64_t T = h.size(0);
  std::vector<int32_t> node((size_t)T, 0), tok((size_t)T);
  for (int64_t i = 0; i < T; ++i) tok[i] = (int32_t)i;
  Tensor path;
  int64_t P = T;
  for (size_t l = 0; l < t.b.size(); ++l) {
    const int64_t b = t.b[l], k = t.k[l];
    Tensor logits;  // [P, b]
    if (l == 0) {
      logits = matmul(h, weights[0], false, true);
    } else {
      // Pairs grouped by node (counting sort on the host), one [n_j, C] x [C, b] product per node with pairs, then
      // back to pair order: the O(P b C) arithmetic without materialising each pair's router rows.
      const int64_t nodes = weights[l].size(0) / b;
      Segments seg = counting_sort(node, nodes);
      std::vector<int32_t> tok_sorted((size_t)P), inv((size_t)P);
      for (int64_t i = 0; i < P; ++i) {
        tok_sorted[i] = tok[seg.order[i]];
        inv[seg.order[i]] = (int32_t)i;
      }
      Tensor hs = index_select(h, 0, Tensor::from_vector(tok_sorted, {P}, dev));  // [P, C] node-major
      std::vector<Tensor> parts;
      for (int64_t j = 0; j < nodes; ++j) {
        const int64_t a = seg.offsets[j], e = seg.offsets[j + 1];
        if (a < e) parts.push_back(matmul(hs.slice(0, a, e), weights[l].slice(0, j * b, j * b + b), false, true));
      }
      Tensor ls = parts.size() == 1 ? parts[0] : concat(parts, 0);
      logits = index_select(ls, 0, Tensor::from_vector(inv, {P}, dev));
    }
    auto [vals, idx] = topk(softmax(logits), k);  // [P, k]
    path = l == 0 ? vals.view({P * k}) : mul(path.view({P, 1}), vals).view({P * k});
    std::vector<int32_t> iv = idx.to_i32_vector();  // host read: the level is done
    std::vector<int32_t> node2((size_t)(P * k)), tok2((size_t)(P * k));
    for (int64_t p = 0; p < P; ++p)
      for (int64_t j = 0; j < k; ++j) {
        node2[p * k + j] = node[p] * (int32_t)b + iv[p * k + j];
        tok2[p * k + j] = tok[p];
      }
    node.swap(node2);
    tok.swap(tok2);
    P *= k;
  }
  (void)path.to_f32_vector();  // the gates reach the host too (what a combine would need)
  return node;
}

struct Row {
  int64_t N;
  Tree tree;
  int64_t flops, params;
  double infer = NAN, train = NAN, floor = NAN;
  std::string note;
};

}  // namespace

int main(int argc, char** argv) {
  reexec_with_passive_openmp(argv);  // sleeping OpenMP waits on a shared machine (model/trainer.h), as train_lm
  int64_t T = 4096, C = 256;
  std::string device = "auto";
  bool quick = false;
  for (int i = 1; i < argc; ++i) {
    std::string k = argv[i];
    if (k == "--T" && i + 1 < argc) T = std::atoll(argv[++i]);
    else if (k == "--C" && i + 1 < argc) C = std::atoll(argv[++i]);
    else if (k == "--device" && i + 1 < argc) device = argv[++i];
    else if (k == "--quick") quick = true;
    else {
      std::fprintf(stderr, "usage: routing_cost [--T 4096] [--C 256] [--device auto|cpu|cuda] [--quick]\n");
      return 2;
    }
  }
  if (T < 1 || C < 1) {
    std::fprintf(stderr, "routing_cost: --T and --C must be positive\n");
    return 2;
  }
  Device dev = Device::CPU;
  if (device == "cuda" || (device == "auto" && cuda_available())) dev = Device::CUDA;
  if (dev == Device::CUDA && !cuda_available()) {
    std::fprintf(stderr, "routing_cost: --device cuda: no CUDA device here (or this build has no CUDA)\n");
    return 2;
  }
  int threads = 1;
#ifdef _OPENMP
  threads = omp_get_max_threads();
#endif
  const char* wait = std::getenv("OMP_WAIT_POLICY");
  std::printf("routing_cost: device %s (%d threads, OMP_WAIT_POLICY=%s), T=%lld tokens, C=%lld, K=2 experts per token;"
              " median of %d after a warm-up\n\n",
              device_name(dev), threads, wait ? wait : "unset", (long long)T, (long long)C, REPEATS);
  std::printf("| N | tree | branching | top-k | router params | FLOPs/token | infer ms | vs flat | train ms | vs flat | "
              "floor ms | vs flat | infer / floor |\n"
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");

  Generator g(99);
  Tensor h = Tensor::randn({T, C}, g);
  Tensor upstream = Tensor::randn({T * 2}, g);  // the combine's gradient with respect to the gates
  const std::vector<int64_t> Ns = quick ? std::vector<int64_t>{8, 64, 512} : std::vector<int64_t>{8, 16, 32, 64, 128, 256, 512, 1024};
  bool all_valid = true;
  for (int64_t N : Ns) {
    std::vector<Row> rows;
    for (const Tree& t : trees_for(N)) {
      Row r{N, t, routing_flops_per_token(C, t.b, t.k), 0, NAN, NAN, NAN, ""};
      Generator wg(7);
      TreeRouter infer_router(router_config(t, C, false), wg);
      Generator wg2(7);
      TreeRouter train_router(router_config(t, C, true), wg2);  // the same weights (same seed)
      for (const Tensor& w : infer_router.weights) r.params += w.numel();
      Tensor hd = h.to(dev), ud = upstream.to(dev);
      std::vector<Tensor> wd;
      for (const Tensor& w : infer_router.weights) wd.push_back(w.to(dev));
      // On CUDA the routers get device copies of their weights (leaves of their own).
      if (dev != Device::CPU) {
        for (size_t l = 0; l < wd.size(); ++l) {
          infer_router.weights[l] = wd[l];
          train_router.weights[l] = wd[l].detach().clone().requires_grad_(true);
        }
      }
      try {
        std::vector<int32_t> floor_experts = route_ops(hd, wd, t);
        r.floor = median_ms([&] { route_ops(hd, wd, t); });
        try {
          std::vector<int32_t> router_experts;
          {
            NoGrad ng;
            router_experts = infer_router.route(hd, RouterBias{}, nullptr, false).expert;
          }
          if (router_experts != floor_experts) {
            r.note = "VALIDATION FAILED: floor and router pick different experts";
            all_valid = false;
          }
          r.infer = median_ms([&] {
            NoGrad ng;
            infer_router.route(hd, RouterBias{}, nullptr, false);
          });
          r.train = median_ms([&] {
            Routing rt = train_router.route(hd, RouterBias{}, nullptr, true);
            Tensor loss = sum(mul(rt.gate, ud));
            for (const Tensor& a : {rt.lb_loss, rt.z_loss, rt.div_loss})
              if (a.defined()) loss = add(loss, a);
            loss.backward();
            for (Tensor& w : train_router.weights) {
              (void)w.grad().to_f32_vector().size();  // host read of the gradient: backward is done
              w.zero_grad();
            }
          });
        } catch (const Error& e) {
          r.note = std::string("router skipped: ") + e.what();
        }
      } catch (const Error& e) {
        r.note = std::string("skipped: ") + e.what();
      }
      rows.push_back(r);
    }
    const Row& flat = rows[0];
    for (const Row& r : rows) {
      auto ratio = [](double a, double b) {
        char buf[32];
        if (std::isnan(a) || std::isnan(b)) return std::string("-");
        std::snprintf(buf, sizeof buf, "%.2f", a / b);
        return std::string(buf);
      };
      auto ms = [](double v) {
        char buf[32];
        if (std::isnan(v)) return std::string("-");
        std::snprintf(buf, sizeof buf, "%.2f", v);
        return std::string(buf);
      };
      std::printf("| %lld | %s | %s | %s | %lld | %lld | %s | %s | %s | %s | %s | %s | %s |%s%s\n", (long long)r.N,
                  r.tree.name.c_str(), vec_str(r.tree.b).c_str(), vec_str(r.tree.k).c_str(), (long long)r.params,
                  (long long)r.flops, ms(r.infer).c_str(), ratio(flat.infer, r.infer).c_str(), ms(r.train).c_str(),
                  ratio(flat.train, r.train).c_str(), ms(r.floor).c_str(), ratio(flat.floor, r.floor).c_str(),
                  ratio(r.infer, r.floor).c_str(), r.note.empty() ? "" : " ", r.note.c_str());
    }
    std::fflush(stdout);
  }
  std::printf("\nvalidation (floor's experts == TreeRouter's for every tree): %s\n", all_valid ? "ok" : "FAILED");
  return all_valid ? 0 : 1;
}
