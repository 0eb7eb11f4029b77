// The ClusterMoE language model: embeddings, pre-norm blocks (attention + FFN/MoE), final norm, LM head;
// metrics, summary and generation with the KV / expert-selection cache.
#include "model/coe.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <sstream>

#include "model/layers.h"
#include "model/moe.h"
#include "model/optim.h"

namespace cm {

struct Block {
  Norm norm1;
  Attention attn;
  Norm norm2;
  MoELayer ffn;  // dense FFN or MoE
};

// What incremental decoding keeps per layer: attention keys/values of the window, and the routing decisions of
// every byte read so far (each recorded once, when the byte is first read: a learned-position re-prefill re-routes
// bytes it already recorded, and those keep their first decision).
struct DecodeCache {
  std::vector<KVCache> kv;                   // [L]
  std::vector<std::vector<int32_t>> routes;  // [L] k[l] experts per byte from `first` on, highest gate first
  std::vector<std::vector<float>> gates;     // [L] their gates, same layout
  std::vector<int64_t> k;                    // [L] slots per byte
  int64_t first = 0;                         // sequence index of the first recorded byte
  int64_t recorded = 0;                      // sequence index one past the last recorded byte
  int64_t start = 0;                         // sequence index of ids[0] in the coming run()
};

static const CoEConfig& validated(const CoEConfig& c) {
  c.validate();
  return c;
}

ClusterMoELM::ClusterMoELM(const CoEConfig& cfg) : cfg_(validated(cfg)), rng_(cfg.seed ^ 0x5DEECE66Dull) {
  const int64_t C = cfg.d_model, V = cfg.vocab_size;
  Generator gen(cfg.seed);
  tok_emb_ = normal_param({V, C}, cfg.init_std, gen);
  if (cfg.pos == PosKind::Learned) pos_emb_ = normal_param({cfg.seq_len, C}, cfg.init_std, gen);
  for (int64_t l = 0; l < cfg.n_layers; ++l) {
    auto b = std::make_unique<Block>();
    b->norm1 = Norm(cfg.norm, C);
    b->attn = Attention(cfg, gen);
    b->norm2 = Norm(cfg.norm, C);
    b->ffn = MoELayer(cfg, l, cfg.is_moe_layer(l), gen);
    blocks_.push_back(std::move(b));
  }
  Norm nf(cfg.norm, C);
  norm_f_w_ = nf.w;
  norm_f_b_ = nf.b;
  if (!cfg.tie_embeddings) lm_head_ = normal_param({V, C}, cfg.init_std, gen);
  step_ = Tensor::zeros({1}, DType::I32);
}

ClusterMoELM::~ClusterMoELM() = default;

std::unique_ptr<ClusterMoELM> create_coe_model(const CoEConfig& cfg) { return std::make_unique<ClusterMoELM>(cfg); }

std::unique_ptr<ClusterMoELM> create_coe_model(int64_t d_model, int64_t num_layers, int64_t num_clusters,
                                               int64_t experts_per_cluster, int64_t vocab_size, int64_t n_heads,
                                               int64_t d_ff, int64_t seq_len) {
  return create_coe_model(
      make_coe_config(d_model, num_layers, num_clusters, experts_per_cluster, vocab_size, n_heads, d_ff, seq_len));
}

// ---------------------------------------------------------------- parameters and buffers

std::vector<std::pair<std::string, Tensor>> ClusterMoELM::named_parameters() const {
  NamedParams out;
  out.emplace_back("tok_emb.weight", tok_emb_);
  if (pos_emb_.defined()) out.emplace_back("pos_emb.weight", pos_emb_);
  for (size_t l = 0; l < blocks_.size(); ++l) {
    const Block& b = *blocks_[l];
    const std::string p = "blocks." + std::to_string(l);
    b.norm1.collect(p + ".norm1", out);
    b.attn.collect(p + ".attn", out);
    b.norm2.collect(p + ".norm2", out);
    b.ffn.collect(p + (b.ffn.moe ? ".moe" : ".ffn"), out);
  }
  out.emplace_back("norm_f.weight", norm_f_w_);
  if (norm_f_b_.defined()) out.emplace_back("norm_f.bias", norm_f_b_);
  if (lm_head_.defined()) out.emplace_back("lm_head.weight", lm_head_);
  return out;
}

std::vector<std::pair<std::string, Tensor>> ClusterMoELM::named_buffers() const {
  NamedParams out;
  for (size_t l = 0; l < blocks_.size(); ++l) {
    const Block& b = *blocks_[l];
    b.ffn.collect_buffers("blocks." + std::to_string(l) + (b.ffn.moe ? ".moe" : ".ffn"), out);
  }
  out.emplace_back("step", step_);
  return out;
}

int64_t ClusterMoELM::num_parameters() const {
  int64_t n = 0;
  for (const auto& [name, t] : named_parameters()) n += t.numel();
  return n;
}

void ClusterMoELM::to(Device device) {
  require_device(device);
  if (device == device_) return;
  NoGrad ng;
  // Swap each parameter's storage in place: every holder of the handle (layers, optimizer lists) sees the move.
  for (auto& kv : named_parameters()) {
    Tensor moved = kv.second.detach().to(device);
    TensorImpl& impl = kv.second.impl();
    impl.storage = moved.impl().storage;
    impl.strides = moved.strides();
    impl.offset = moved.offset();
    impl.grad.reset();
  }
  device_ = device;
  rope_cos_ = rope_sin_ = Tensor();
}

int64_t ClusterMoELM::step() const { return step_.i32()[0]; }

void ClusterMoELM::after_step() {
  for (auto& b : blocks_) b->ffn.after_step();  // each layer's health update where it computes (model/health.h)
  step_.i32()[0] += 1;
}

void ClusterMoELM::after_replayed_step() { step_.i32()[0] += 1; }

void ClusterMoELM::set_router_entropy(bool on) {
  for (auto& b : blocks_)
    if (b->ffn.moe) b->ffn.router.set_entropy(on);
}

// ---------------------------------------------------------------- forward

namespace {
// The routing cache: appends layer l's decisions for the bytes of this run not yet recorded (sequence indices
// cache.start + t >= cache.recorded), each byte's k experts ordered by gate, highest first (ties: slot order).
void record_routes(DecodeCache& cache, size_t l, int64_t B, int64_t T, const MoELayer::Output& o) {
  const int64_t k = cache.k[l];
  CM_CHECK(B == 1 && (int64_t)o.expert.size() == T * k && o.gate.size() == o.expert.size(), "routing cache: ",
           o.expert.size(), " slots for T ", T, " k ", k);
  std::vector<int64_t> order((size_t)k);
  for (int64_t t = std::max<int64_t>(0, cache.recorded - cache.start); t < T; ++t) {
    std::iota(order.begin(), order.end(), t * k);
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return o.gate[a] > o.gate[b]; });
    for (int64_t s : order) {
      cache.routes[l].push_back(o.expert[s]);
      cache.gates[l].push_back(o.gate[s]);
    }
  }
}

Tensor mean_terms(const std::vector<Tensor>& xs, Device dev) {
  if (xs.empty()) return Tensor::scalar(0.f, dev);
  Tensor acc = xs[0];
  for (size_t i = 1; i < xs.size(); ++i) acc = add(acc, xs[i]);
  return xs.size() == 1 ? acc : mul(acc, 1.f / (float)xs.size());
}
}  // namespace

void ClusterMoELM::rope_rows_for(int64_t p0, int64_t T, Tensor& cos, Tensor& sin) {
  if (!rope_cos_.defined() || rope_cos_.size(0) < p0 + T) {
    int64_t P = std::max<int64_t>(cfg_.seq_len, 64);
    while (P < p0 + T) P *= 2;  // generation far past the window rebuilds the tables a few times, not per byte
    RopeRows r = rope_rows(0, P, cfg_.head_dim(), cfg_.rope_base, device_);
    rope_cos_ = r.cos;
    rope_sin_ = r.sin;
  }
  cos = rope_cos_.slice(0, p0, p0 + T);
  sin = rope_sin_.slice(0, p0, p0 + T);
}

CoEOutput ClusterMoELM::run(const Tensor& ids, const Tensor& targets_in, DecodeCache* cache, int64_t pos0) {
  CM_REQUIRE(ids.defined() && ids.dtype() == DType::I32 && ids.dim() == 2,
             "forward: ids must be i32 [B, T], got ", ids.defined() ? shape_str(ids.shape()) : "undefined");
  const int64_t B = ids.size(0), T = ids.size(1), C = cfg_.d_model, V = cfg_.vocab_size;
  const bool rope_pos = cfg_.pos == PosKind::Rope;
  CM_REQUIRE(B > 0 && T > 0, "forward: empty ids ", shape_str(ids.shape()));
  CM_REQUIRE(rope_pos || pos0 + T <= cfg_.seq_len, "forward: sequence length ", pos0 + T, " exceeds seq_len ",
             cfg_.seq_len, " (learned positions; pos rope slides a window of seq_len instead)");
  // The ids are not read here: the embedding checks them (at once on the CPU, in its kernel on a device, reported at
  // the next read-out, engine/cuda.h), and the MoE layers count their specialization statistics on the device.
  if (targets_in.defined())
    CM_REQUIRE(targets_in.dtype() == DType::I32 && targets_in.shape() == ids.shape(), "forward: targets must be i32 ",
               shape_str(ids.shape()), ", got ", shape_str(targets_in.shape()));
  auto here = [&](const Tensor& t) { return !t.defined() || t.device() == device_ ? t : t.to(device_); };
  const Tensor ids_d = here(ids), targets = here(targets_in);
  const Tensor ids_flat = ids_d.contiguous().view({B * T});  // the input token of each row of h

  const bool drop = training_ && cfg_.dropout > 0.f;
  auto dropout_ = [&](const Tensor& t) { return drop ? dropout(t, cfg_.dropout, true, rng_) : t; };

  Tensor x = embedding(tok_emb_, ids_d);  // [B, T, C]
  RopeRows rr;                            // rope: [T, D] rows shared by every layer
  if (rope_pos)
    rope_rows_for(pos0, T, rr.cos, rr.sin);
  else
    x = add(x, pos_emb_.slice(0, pos0, pos0 + T));
  x = dropout_(x);

  CoEOutput out;
  Tensor labels;  // i32 [B*T] on the model's device: the previous MoE layer's top-1 expert per token (AC)
  std::vector<Tensor> lb, z, dv;
  float rel_sum = 0.f;
  for (size_t l = 0; l < blocks_.size(); ++l) {
    Block& b = *blocks_[l];
    x = add(x, dropout_(b.attn.forward(b.norm1.forward(x), pos0, rr, cache ? &cache->kv[l] : nullptr)));
    Tensor h = b.norm2.forward(x).view({B * T, C});
    // A dense layer's specialization is 0 whatever its counts (one expert): it gets no ids.
    MoELayer::Output o = b.ffn.forward(h, b.ffn.moe ? &ids_flat : nullptr, labels.defined() ? &labels : nullptr, training_);
    x = add(x, dropout_(o.y.view({B, T, C})));
    if (b.ffn.moe) {
      labels = o.top1_ids;
      if (o.lb_loss.defined()) lb.push_back(o.lb_loss);
      if (o.z_loss.defined()) z.push_back(o.z_loss);
      if (o.div_loss.defined()) dv.push_back(o.div_loss);
    }
    if (cache) record_routes(*cache, l, B, T, o);
    rel_sum += o.stats.reliability;
    out.layers.push_back(std::move(o.stats));
  }
  if (cache) cache->recorded = std::max(cache->recorded, cache->start + T);
  x = cfg_.norm == NormKind::LayerNorm ? layernorm(x, norm_f_w_, norm_f_b_) : rmsnorm(x, norm_f_w_);
  out.logits = linear(x, lm_head_.defined() ? lm_head_ : tok_emb_);  // [B, T, V]

  // Each aux term is the mean over MoE layers, so its balanced value does not depend on depth.
  out.load_balance_loss = mean_terms(lb, device_);
  out.z_loss = mean_terms(z, device_);
  out.diversity_loss = mean_terms(dv, device_);
  out.aux_loss = add(add(out.load_balance_loss, out.z_loss), out.diversity_loss);
  out.model_reliability = rel_sum / (float)blocks_.size();
  if (targets.defined()) {
    out.loss = cross_entropy(out.logits.view({B * T, V}), targets.view({B * T}));
    out.total_loss = add(out.loss, out.aux_loss);
  }
  // An evaluation forward hands back its statistics read (one read-out for all layers); a training forward leaves
  // them where they were counted (LayerRoutingStats::read()). Decoding (generate) does not look at them.
  if (!training_ && !cache) read_routing_stats(out.layers);
  return out;
}

CoEOutput ClusterMoELM::forward(const Tensor& ids, const Tensor& targets) { return run(ids, targets, nullptr, 0); }

// ---------------------------------------------------------------- metrics

namespace {
std::string expert_key(int64_t l, int64_t c, int64_t e) {
  return "layer_" + std::to_string(l) + "_cluster_" + std::to_string(c) + "_expert_" + std::to_string(e);
}
}  // namespace

std::map<std::string, float> ClusterMoELM::get_expert_utilization() const {
  std::map<std::string, float> m;
  for (size_t l = 0; l < blocks_.size(); ++l) {
    const MoELayer& f = blocks_[l]->ffn;
    std::vector<double> u = f.utilization();
    const int64_t epc = f.experts_per_cluster();
    for (int64_t e = 0; e < f.N; ++e) m[expert_key((int64_t)l, e / epc, e % epc)] = (float)u[e];
  }
  return m;
}

std::map<std::string, float> ClusterMoELM::get_reliability_stats() const {
  std::map<std::string, float> m;
  double model = 0.0;
  for (size_t l = 0; l < blocks_.size(); ++l) {
    const MoELayer& f = blocks_[l]->ffn;
    const std::string lk = "layer_" + std::to_string(l);
    std::vector<float> cr = f.cluster_reliability(), er = f.expert_reliability();
    const int64_t epc = f.experts_per_cluster();
    for (size_t c = 0; c < cr.size(); ++c) m[lk + "_cluster_" + std::to_string(c) + "_reliability"] = cr[c];
    for (int64_t e = 0; e < f.N; ++e) m[expert_key((int64_t)l, e / epc, e % epc) + "_reliability"] = er[e];
    float lr = f.layer_reliability();
    m[lk + "_reliability"] = lr;
    model += lr;
  }
  m["model_reliability"] = (float)(model / (double)blocks_.size());
  m["training_step"] = (float)step();
  return m;
}

std::map<std::string, float> ClusterMoELM::get_expert_specialization() const {
  std::map<std::string, float> m;
  for (size_t l = 0; l < blocks_.size(); ++l) {
    const MoELayer& f = blocks_[l]->ffn;
    std::vector<float> s = f.specialization();
    const int64_t epc = f.experts_per_cluster();
    for (int64_t e = 0; e < f.N; ++e) m[expert_key((int64_t)l, e / epc, e % epc) + "_specialization"] = s[e];
    m["layer_" + std::to_string(l) + "_specialization"] = f.mutual_information();
  }
  return m;
}

ModelSummary ClusterMoELM::get_model_summary() const {
  ModelSummary s;
  s.total_params = num_parameters();
  s.num_layers = cfg_.n_layers;
  s.router = router_kind_name(cfg_.router);
  s.step = step();
  s.num_experts = 1;
  s.num_clusters = 1;
  s.experts_per_cluster = 1;
  s.experts_per_token = 1;
  double rel = 0.0;
  for (const auto& b : blocks_) {
    const MoELayer& f = b->ffn;
    rel += f.layer_reliability();
    if (!f.moe) continue;
    ++s.num_moe_layers;
    const int64_t per_expert = f.experts[0].numel();
    s.expert_params += f.N * per_expert;
    s.active_params_per_token += f.K * per_expert;
    s.active_experts += f.active_experts();
    s.num_experts = f.N;
    s.num_clusters = f.num_clusters();
    s.experts_per_cluster = f.experts_per_cluster();
    s.experts_per_token = f.K;
  }
  s.active_params_per_token += s.total_params - s.expert_params;
  s.model_reliability = (float)(rel / (double)blocks_.size());
  return s;
}

std::map<std::string, double> ModelSummary::to_map() const {
  return {{"total_params", (double)total_params},
          {"expert_params", (double)expert_params},
          {"active_params_per_token", (double)active_params_per_token},
          {"num_layers", (double)num_layers},
          {"num_moe_layers", (double)num_moe_layers},
          {"num_clusters", (double)num_clusters},
          {"experts_per_cluster", (double)experts_per_cluster},
          {"num_experts", (double)num_experts},
          {"experts_per_token", (double)experts_per_token},
          {"active_experts", (double)active_experts},
          {"model_reliability", (double)model_reliability},
          {"step", (double)step}};
}

std::string ModelSummary::str() const {
  std::ostringstream os;
  os << "ClusterMoE (" << router << " router): " << total_params << " parameters, " << expert_params
     << " in experts, " << active_params_per_token << " active per token\n"
     << "  " << num_layers << " layers (" << num_moe_layers << " MoE), " << num_clusters << " clusters x "
     << experts_per_cluster << " experts = " << num_experts << " per MoE layer, " << experts_per_token
     << " per token, " << active_experts << " active in all\n"
     << "  model reliability " << model_reliability << ", step " << step << "\n";
  return os.str();
}

void ClusterMoELM::reset_metrics() {
  for (auto& b : blocks_) b->ffn.reset_metrics();
}

// ---------------------------------------------------------------- experts

static MoELayer& moe_layer(const std::vector<std::unique_ptr<Block>>& blocks, int64_t layer) {
  CM_REQUIRE(layer >= 0 && layer < (int64_t)blocks.size(), "layer ", layer, " outside [0, ", blocks.size(), ")");
  return blocks[layer]->ffn;
}

void ClusterMoELM::prune_expert(int64_t layer, int64_t expert) {
  MoELayer& f = moe_layer(blocks_, layer);
  CM_REQUIRE(f.moe, "prune_expert: layer ", layer, " is a dense layer");
  f.prune(expert);
}

bool ClusterMoELM::expert_pruned(int64_t layer, int64_t expert) const {
  MoELayer& f = moe_layer(blocks_, layer);
  CM_REQUIRE(expert >= 0 && expert < f.N, "expert ", expert, " outside [0, ", f.N, ")");
  return f.pruned(expert);
}

std::vector<std::pair<std::string, Tensor>> ClusterMoELM::expert_parameters(int64_t layer, int64_t expert) const {
  MoELayer& f = moe_layer(blocks_, layer);
  CM_REQUIRE(expert >= 0 && expert < f.N, "expert ", expert, " outside [0, ", f.N, ")");
  NamedParams out;
  const std::string p = "blocks." + std::to_string(layer) + (f.moe ? ".moe.experts." + std::to_string(expert) : ".ffn");
  f.experts[expert].collect(p, out);
  return out;
}

// ---------------------------------------------------------------- generation

// Next token from one row of logits [V]: greedy for temperature <= 0, else temperature + top-k sampling with one
// uniform draw from the counter-based stream (the same draw whatever path produced the logits).
static int32_t sample_token(const std::vector<float>& row, float temperature, int64_t top_k, Generator& g) {
  const int64_t V = (int64_t)row.size();
  if (temperature <= 0.f) return (int32_t)(std::max_element(row.begin(), row.end()) - row.begin());
  std::vector<int32_t> idx((size_t)V);
  std::iota(idx.begin(), idx.end(), 0);
  std::stable_sort(idx.begin(), idx.end(), [&](int32_t a, int32_t b) { return row[a] > row[b]; });
  const int64_t k = top_k > 0 ? std::min(top_k, V) : V;
  std::vector<double> p((size_t)k);
  double mx = row[idx[0]], s = 0.0;
  for (int64_t i = 0; i < k; ++i) s += (p[i] = std::exp(((double)row[idx[i]] - mx) / temperature));
  double u = philox_uniform(g.seed, g.take(1), 0) * s, c = 0.0;
  for (int64_t i = 0; i < k; ++i) {
    c += p[i];
    if (u < c) return idx[i];
  }
  return idx[k - 1];
}

// Learned: the last W bytes, re-encoded at positions 0 .. W - 1. Rope: each layer looks W - 1 positions further
// back, so through L layers the last L * (W - 1) + 1 bytes, at their absolute positions: a forward of those gives
// the last position exactly what the full sliding-window forward gives it.
int64_t ClusterMoELM::generation_reach() const {
  return cfg_.pos == PosKind::Rope ? cfg_.n_layers * (cfg_.seq_len - 1) + 1 : cfg_.seq_len;
}

std::vector<int32_t> ClusterMoELM::generate(const std::vector<int32_t>& prompt, int64_t n, float temperature,
                                            int64_t top_k, uint64_t seed, bool use_cache,
                                            GenerationRouting* routing) {
  CM_REQUIRE(!prompt.empty(), "generate: empty prompt");
  CM_REQUIRE(n >= 0, "generate: n = ", n, " must be >= 0");
  const bool cached = use_cache && cfg_.use_expert_selection_cache;
  CM_REQUIRE(!routing || cached, "generate: the routing decisions are read from the expert-selection cache, which ",
             use_cache ? "the model's config turns off (use_expert_selection_cache = false)" : "is off");
  NoGrad ng;
  const bool was_training = training_;
  training_ = false;
  const int64_t L = cfg_.n_layers, H = cfg_.n_heads, D = cfg_.head_dim(), W = cfg_.seq_len, V = cfg_.vocab_size;
  const bool rope_pos = cfg_.pos == PosKind::Rope;
  const int64_t reach = generation_reach();
  std::vector<int32_t> seq = prompt, out;
  Generator g(seed);
  DecodeCache cache;
  cache.routes.assign((size_t)L, {});
  cache.gates.assign((size_t)L, {});
  for (const auto& b : blocks_) cache.k.push_back(b->ffn.moe ? b->ffn.K : 1);
  auto window = [&](int64_t len) {
    std::vector<int32_t> w(seq.end() - len, seq.end());
    return Tensor::from_vector(w, {1, len});
  };
  auto fresh_kv = [&] {
    cache.kv.assign((size_t)L, KVCache{});
    for (auto& kv : cache.kv) {
      kv.k = Tensor::zeros({1, H, W, D}, DType::F32, device_);
      kv.v = Tensor::zeros({1, H, W, D}, DType::F32, device_);
    }
  };
  // One forward that reads the newest byte of seq; returns the logits of the next one [V].
  auto step = [&](bool first) {
    const int64_t len = (int64_t)seq.size(), ctx = std::min(len, reach);
    const int64_t p0 = rope_pos ? len - ctx : 0;  // model position of the window's first byte
    CoEOutput o;
    if (!cached) {
      o = run(window(ctx), Tensor(), nullptr, p0);
    } else if (first || (cache.kv[0].next >= W && !rope_pos)) {
      // Prefill. Learned positions also land here once the window is full: the kept bytes move to new positions.
      fresh_kv();
      cache.start = len - ctx;
      if (first) cache.first = cache.recorded = cache.start;
      o = run(window(ctx), Tensor(), &cache, p0);
    } else {
      cache.start = len - 1;
      o = run(window(1), Tensor(), &cache, cache.kv[0].next);  // one position through every layer
    }
    const int64_t T = o.logits.size(1);
    return o.logits.select(1, T - 1).reshape({V}).to_f32_vector();
  };
  try {
    for (int64_t i = 0; i < n; ++i) {
      int32_t next = sample_token(step(i == 0), temperature, top_k, g);
      seq.push_back(next);
      out.push_back(next);
    }
    if (routing) {
      if (n > 0) step(false);  // read the last generated byte: its routing decision (logits unused)
      routing->first = cache.first;
      routing->k = cache.k;
      routing->experts = cache.routes;
      routing->gates = cache.gates;
      if (n == 0) {  // nothing generated, nothing read
        routing->first = (int64_t)seq.size();
        for (auto& r : routing->experts) r.clear();
        for (auto& r : routing->gates) r.clear();
      }
    }
  } catch (...) {
    training_ = was_training;
    throw;
  }
  training_ = was_training;
  return out;
}

}  // namespace cm
