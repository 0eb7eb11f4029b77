// CoEConfig: derived quantities, validation (every message names the field), string-map round trip.
#include "model/config.h"

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <functional>
#include <sstream>

#include "engine/check.h"

namespace cm {

const char* router_kind_name(RouterKind k) {
  switch (k) {
    case RouterKind::Dense: return "dense";
    case RouterKind::Flat: return "flat";
    case RouterKind::Cluster: return "cluster";
    case RouterKind::Tree: return "tree";
    case RouterKind::AC: return "ac";
  }
  return "?";
}
const char* expert_kind_name(ExpertKind k) { return k == ExpertKind::SwiGLU ? "swiglu" : "gelu"; }
const char* norm_kind_name(NormKind k) { return k == NormKind::LayerNorm ? "layernorm" : "rmsnorm"; }

RouterKind parse_router_kind(const std::string& s) {
  for (RouterKind k : {RouterKind::Dense, RouterKind::Flat, RouterKind::Cluster, RouterKind::Tree, RouterKind::AC})
    if (s == router_kind_name(k)) return k;
  fail("router kind '", s, "': expected dense, flat, cluster, tree or ac");
}
ExpertKind parse_expert_kind(const std::string& s) {
  if (s == "swiglu") return ExpertKind::SwiGLU;
  if (s == "gelu") return ExpertKind::GELU;
  fail("expert kind '", s, "': expected swiglu or gelu");
}
NormKind parse_norm_kind(const std::string& s) {
  if (s == "layernorm") return NormKind::LayerNorm;
  if (s == "rmsnorm") return NormKind::RMSNorm;
  fail("norm kind '", s, "': expected layernorm or rmsnorm");
}

// ---------------------------------------------------------------- derived

std::vector<int64_t> CoEConfig::branching() const {
  switch (router) {
    case RouterKind::Dense: return {1};
    case RouterKind::Flat:
    case RouterKind::AC: return {num_clusters * experts_per_cluster};
    case RouterKind::Cluster: return {num_clusters, experts_per_cluster};
    case RouterKind::Tree: return tree_branching;
  }
  return {1};
}

std::vector<int64_t> CoEConfig::top_k() const {
  switch (router) {
    case RouterKind::Dense: return {1};
    case RouterKind::Flat:
    case RouterKind::AC: return {top_k_clusters * top_k_experts};
    case RouterKind::Cluster: return {top_k_clusters, top_k_experts};
    case RouterKind::Tree: return tree_top_k;
  }
  return {1};
}

int64_t CoEConfig::num_experts() const {
  int64_t n = 1;
  for (int64_t b : branching()) n *= b;
  return n;
}

int64_t CoEConfig::experts_per_token() const {
  int64_t k = 1;
  for (int64_t v : top_k()) k *= v;
  return k;
}

bool CoEConfig::is_moe_layer(int64_t layer) const {
  return router != RouterKind::Dense && moe_every > 0 && layer % moe_every == 0;
}

bool CoEConfig::level_uses_ac(int64_t level) const {
  if (router == RouterKind::AC) return true;
  for (int64_t l : ac_levels)
    if (l == level) return true;
  return false;
}

// ---------------------------------------------------------------- validation

namespace {
std::string vec_str(const std::vector<int64_t>& v) {
  std::string s;
  for (size_t i = 0; i < v.size(); ++i) s += (i ? "," : "") + std::to_string(v[i]);
  return s;
}
}  // namespace

#define CFG_REQUIRE(cond, field, value, why) \
  CM_REQUIRE(cond, "CoEConfig." field " = ", value, ": ", why)

void CoEConfig::validate() const {
  CFG_REQUIRE(d_model > 0, "d_model", d_model, "must be positive");
  CFG_REQUIRE(n_layers > 0, "n_layers", n_layers, "must be positive");
  CFG_REQUIRE(n_heads > 0, "n_heads", n_heads, "must be positive");
  CFG_REQUIRE(d_model % n_heads == 0, "d_model", d_model, str("must be divisible by n_heads = ", n_heads));
  CFG_REQUIRE(d_ff > 0, "d_ff", d_ff, "must be positive");
  CFG_REQUIRE(vocab_size > 0, "vocab_size", vocab_size, "must be positive");
  CFG_REQUIRE(seq_len > 0, "seq_len", seq_len, "must be positive");
  CFG_REQUIRE(dropout >= 0.f && dropout < 1.f, "dropout", dropout, "must be in [0, 1)");
  CFG_REQUIRE(init_std > 0.f && std::isfinite(init_std), "init_std", init_std, "must be positive and finite");

  CFG_REQUIRE(num_clusters > 0, "num_clusters", num_clusters, "must be positive");
  CFG_REQUIRE(experts_per_cluster > 0, "experts_per_cluster", experts_per_cluster, "must be positive");
  CFG_REQUIRE(top_k_clusters > 0, "top_k_clusters", top_k_clusters, "must be positive");
  CFG_REQUIRE(top_k_experts > 0, "top_k_experts", top_k_experts, "must be positive");
  // Bounded before any product below: a stored config may hold any int64, and products of two of them overflow.
  const int64_t MAX_EXPERTS = (int64_t)1 << 24;
  CFG_REQUIRE(num_clusters <= MAX_EXPERTS, "num_clusters", num_clusters, "too many clusters (at most 2^24)");
  CFG_REQUIRE(experts_per_cluster <= MAX_EXPERTS, "experts_per_cluster", experts_per_cluster,
              "too many experts (at most 2^24)");
  CFG_REQUIRE(top_k_clusters <= MAX_EXPERTS, "top_k_clusters", top_k_clusters, "must be at most 2^24");
  CFG_REQUIRE(top_k_experts <= MAX_EXPERTS, "top_k_experts", top_k_experts, "must be at most 2^24");
  if (router == RouterKind::Cluster) {
    CFG_REQUIRE(top_k_clusters <= num_clusters, "top_k_clusters", top_k_clusters,
                str("must not exceed num_clusters = ", num_clusters));
    CFG_REQUIRE(top_k_experts <= experts_per_cluster, "top_k_experts", top_k_experts,
                str("must not exceed experts_per_cluster = ", experts_per_cluster));
  }
  if (router == RouterKind::Flat || router == RouterKind::AC) {
    CFG_REQUIRE(top_k_clusters * top_k_experts <= num_clusters * experts_per_cluster, "top_k_experts",
                top_k_experts,
                str("top_k_clusters * top_k_experts must not exceed the number of experts ",
                    num_clusters * experts_per_cluster));
  }
  if (router == RouterKind::Tree) {
    CFG_REQUIRE(!tree_branching.empty(), "tree_branching", "[]", "must list at least one level");
    CFG_REQUIRE(tree_top_k.size() == tree_branching.size(), "tree_top_k", vec_str(tree_top_k),
                str("needs one entry per level of tree_branching = ", vec_str(tree_branching)));
    int64_t prod = 1;
    for (size_t l = 0; l < tree_branching.size(); ++l) {
      CFG_REQUIRE(tree_branching[l] > 0 && tree_branching[l] <= MAX_EXPERTS, "tree_branching", vec_str(tree_branching),
                  str("level ", l, " must be in [1, 2^24]"));
      CFG_REQUIRE(tree_top_k[l] > 0 && tree_top_k[l] <= tree_branching[l], "tree_top_k", vec_str(tree_top_k),
                  str("level ", l, " must be in [1, ", tree_branching[l], "]"));
      prod *= tree_branching[l];
      CFG_REQUIRE(prod <= MAX_EXPERTS, "tree_branching", vec_str(tree_branching), "too many experts");
    }
    // A tree whose leaves do not match the cluster layout is a mistake when the user set both: the product
    // of the branching is the number of experts, so it must equal num_clusters * experts_per_cluster.
    CFG_REQUIRE(prod == num_clusters * experts_per_cluster, "tree_branching", vec_str(tree_branching),
                str("product ", prod, " must equal the number of experts num_clusters * experts_per_cluster = ",
                    num_clusters * experts_per_cluster));
  }
  int64_t depth = (int64_t)branching().size();
  for (int64_t l : ac_levels)
    CFG_REQUIRE(l >= 0 && l < depth, "ac_levels", vec_str(ac_levels),
                str("levels must be in [0, ", depth, ") for this router"));
  CFG_REQUIRE(routing_temperature > 0.f && std::isfinite(routing_temperature), "routing_temperature",
              routing_temperature, "must be positive and finite");
  CFG_REQUIRE(moe_every > 0, "moe_every", moe_every, "must be positive");
  CFG_REQUIRE(capacity_factor >= 0.f && std::isfinite(capacity_factor), "capacity_factor", capacity_factor,
              "must be >= 0 (0 = dropless)");
  CFG_REQUIRE(load_balancing_weight >= 0.f && std::isfinite(load_balancing_weight), "load_balancing_weight",
              load_balancing_weight, "must be >= 0");
  CFG_REQUIRE(router_z_loss_weight >= 0.f && std::isfinite(router_z_loss_weight), "router_z_loss_weight",
              router_z_loss_weight, "must be >= 0");
  CFG_REQUIRE(diversity_weight >= 0.f && std::isfinite(diversity_weight), "diversity_weight", diversity_weight,
              "must be >= 0");
  CFG_REQUIRE(aux_free_bias_rate >= 0.f && std::isfinite(aux_free_bias_rate), "aux_free_bias_rate",
              aux_free_bias_rate, "must be >= 0");
  CFG_REQUIRE(reliability_decay >= 0.f && reliability_decay < 1.f, "reliability_decay", reliability_decay,
              "must be in [0, 1)");
  CFG_REQUIRE(reliability_min > 0.f && reliability_min <= 1.f, "reliability_min", reliability_min,
              "must be in (0, 1]");
  CFG_REQUIRE(reliability_outlier_factor > 1.f, "reliability_outlier_factor", reliability_outlier_factor,
              "must be > 1");
  CFG_REQUIRE(pruning_threshold >= 0.f && pruning_threshold < 1.f, "pruning_threshold", pruning_threshold,
              "must be in [0, 1)");
  CFG_REQUIRE(pruning_window > 0, "pruning_window", pruning_window, "must be positive");
}

#undef CFG_REQUIRE

// ---------------------------------------------------------------- string map

namespace {

int64_t parse_int(const std::string& key, const std::string& v) {
  char* end = nullptr;
  errno = 0;
  long long x = std::strtoll(v.c_str(), &end, 10);
  CM_REQUIRE(!v.empty() && end && *end == 0 && errno == 0, "CoEConfig.", key, " = '", v, "': expected an integer");
  return (int64_t)x;
}
float parse_float(const std::string& key, const std::string& v) {
  char* end = nullptr;
  errno = 0;
  float x = std::strtof(v.c_str(), &end);
  CM_REQUIRE(!v.empty() && end && *end == 0 && errno == 0, "CoEConfig.", key, " = '", v, "': expected a number");
  return x;
}
bool parse_bool(const std::string& key, const std::string& v) {
  if (v == "1" || v == "true") return true;
  if (v == "0" || v == "false") return false;
  fail("CoEConfig.", key, " = '", v, "': expected true/false or 1/0");
}
std::vector<int64_t> parse_ints(const std::string& key, const std::string& v) {
  std::vector<int64_t> r;
  if (v.empty()) return r;
  std::stringstream ss(v);
  std::string item;
  while (std::getline(ss, item, ',')) r.push_back(parse_int(key, item));
  return r;
}
std::string fstr(float f) {
  std::ostringstream os;
  os.precision(9);  // round-trips every float
  os << f;
  return os.str();
}

// One table drives to_map, set and from_map, so a field cannot be forgotten in one of them.
struct Field {
  const char* key;
  std::function<std::string(const CoEConfig&)> get;
  std::function<void(CoEConfig&, const std::string&)> set;
};

#define F_INT(name) \
  Field{#name, [](const CoEConfig& c) { return std::to_string(c.name); }, \
        [](CoEConfig& c, const std::string& v) { c.name = parse_int(#name, v); }}
#define F_FLOAT(name) \
  Field{#name, [](const CoEConfig& c) { return fstr(c.name); }, \
        [](CoEConfig& c, const std::string& v) { c.name = parse_float(#name, v); }}
#define F_BOOL(name) \
  Field{#name, [](const CoEConfig& c) { return std::string(c.name ? "true" : "false"); }, \
        [](CoEConfig& c, const std::string& v) { c.name = parse_bool(#name, v); }}
#define F_INTS(name) \
  Field{#name, [](const CoEConfig& c) { return vec_str(c.name); }, \
        [](CoEConfig& c, const std::string& v) { c.name = parse_ints(#name, v); }}

const std::vector<Field>& fields() {
  static const std::vector<Field> f = {
      F_INT(d_model), F_INT(n_layers), F_INT(n_heads), F_INT(d_ff), F_INT(vocab_size), F_INT(seq_len),
      Field{"norm", [](const CoEConfig& c) { return std::string(norm_kind_name(c.norm)); },
            [](CoEConfig& c, const std::string& v) { c.norm = parse_norm_kind(v); }},
      F_BOOL(bias), F_BOOL(tie_embeddings), F_FLOAT(dropout), F_FLOAT(init_std),
      Field{"router", [](const CoEConfig& c) { return std::string(router_kind_name(c.router)); },
            [](CoEConfig& c, const std::string& v) { c.router = parse_router_kind(v); }},
      F_INT(num_clusters), F_INT(experts_per_cluster), F_INT(top_k_clusters), F_INT(top_k_experts),
      F_INTS(tree_branching), F_INTS(tree_top_k), F_INTS(ac_levels), F_BOOL(ac_scaling),
      F_FLOAT(routing_temperature), F_BOOL(renormalize_gates), F_INT(moe_every),
      Field{"expert", [](const CoEConfig& c) { return std::string(expert_kind_name(c.expert)); },
            [](CoEConfig& c, const std::string& v) { c.expert = parse_expert_kind(v); }},
      F_FLOAT(capacity_factor), F_FLOAT(load_balancing_weight), F_FLOAT(router_z_loss_weight),
      F_FLOAT(diversity_weight), F_BOOL(aux_free_bias), F_FLOAT(aux_free_bias_rate), F_BOOL(use_reliability),
      F_FLOAT(reliability_decay), F_FLOAT(reliability_min), F_FLOAT(reliability_outlier_factor),
      F_BOOL(use_adaptive_routing), F_BOOL(use_expert_selection_cache), F_BOOL(enable_expert_pruning),
      F_FLOAT(pruning_threshold), F_INT(pruning_window),
      Field{"seed", [](const CoEConfig& c) { return std::to_string(c.seed); },
            [](CoEConfig& c, const std::string& v) { c.seed = (uint64_t)parse_int("seed", v); }},
  };
  return f;
}

#undef F_INT
#undef F_FLOAT
#undef F_BOOL
#undef F_INTS

}  // namespace

std::map<std::string, std::string> CoEConfig::to_map() const {
  std::map<std::string, std::string> m;
  for (const Field& f : fields()) m[f.key] = f.get(*this);
  return m;
}

void CoEConfig::set(const std::string& key, const std::string& value) {
  for (const Field& f : fields())
    if (key == f.key) {
      f.set(*this, value);
      return;
    }
  fail("CoEConfig: unknown key '", key, "'");
}

std::string CoEConfig::get(const std::string& key) const {
  for (const Field& f : fields())
    if (key == f.key) return f.get(*this);
  fail("CoEConfig: unknown key '", key, "'");
}

CoEConfig CoEConfig::from_map(const std::map<std::string, std::string>& m) {
  CoEConfig c;
  for (const auto& [k, v] : m) c.set(k, v);
  c.validate();
  return c;
}

CoEConfig make_coe_config(int64_t d_model, int64_t num_layers, int64_t num_clusters, int64_t experts_per_cluster,
                          int64_t vocab_size, int64_t n_heads, int64_t d_ff, int64_t seq_len) {
  CoEConfig c;
  c.d_model = d_model;
  c.n_layers = num_layers;
  c.num_clusters = num_clusters;
  c.experts_per_cluster = experts_per_cluster;
  c.vocab_size = vocab_size;
  c.n_heads = n_heads;
  c.d_ff = d_ff > 0 ? d_ff : 2 * d_model;
  c.seq_len = seq_len;
  c.top_k_clusters = std::min<int64_t>(c.top_k_clusters, std::max<int64_t>(num_clusters, 1));
  c.top_k_experts = std::min<int64_t>(c.top_k_experts, std::max<int64_t>(experts_per_cluster, 1));
  c.validate();
  return c;
}

}  // namespace cm
