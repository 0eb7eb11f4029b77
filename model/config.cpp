// CoEConfig: derived quantities, validation (every message names the field), string-map round trip.
#include "model/config.h"

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <functional>
#include <sstream>
#include <type_traits>
#include <cstdio>

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
const char* pos_kind_name(PosKind k) { return k == PosKind::Learned ? "learned" : "rope"; }
const char* gate_mode_name(GateMode g) {
  switch (g) {
    case GateMode::Product: return "product";
    case GateMode::RenormPath: return "renorm_path";
    case GateMode::RenormLast: return "renorm_last";
    case GateMode::GroupLimited: return "group_limited";
  }
  return "?";
}

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
GateMode parse_gate_mode(const std::string& s) {
  for (GateMode g : {GateMode::Product, GateMode::RenormPath, GateMode::RenormLast, GateMode::GroupLimited})
    if (s == gate_mode_name(g)) return g;
  fail("gate mode '", s, "': expected product, renorm_path, renorm_last or group_limited");
}
NormKind parse_norm_kind(const std::string& s) {
  if (s == "layernorm") return NormKind::LayerNorm;
  if (s == "rmsnorm") return NormKind::RMSNorm;
  fail("norm kind '", s, "': expected layernorm or rmsnorm");
}
PosKind parse_pos_kind(const std::string& s) {
  if (s == "learned") return PosKind::Learned;
  if (s == "rope") return PosKind::Rope;
  fail("position kind '", s, "': expected learned or rope");
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
  if (pos == PosKind::Rope) {
    // Rotary pairs dimension i with i + D/2 of each head.
    CFG_REQUIRE(head_dim() % 2 == 0, "pos", "rope",
                str("needs an even head size, got d_model / n_heads = ", d_model, " / ", n_heads, " = ", head_dim()));
    CFG_REQUIRE(rope_base > 1.f && std::isfinite(rope_base), "rope_base", rope_base, "must be > 1 and finite");
  }
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
      CFG_REQUIRE(tree_branching[l] > 0 && tree_branching[l] <= MAX_EXPERTS, "tree_branching",
                  vec_str(tree_branching), str("level ", l, " must be in [1, 2^24]"));
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
  if (gate_mode == GateMode::GroupLimited)
    for (int64_t l : ac_levels)
      CFG_REQUIRE(l == depth - 1, "ac_levels", vec_str(ac_levels),
                  str("gate_mode group_limited routes with the last level's router only: AC applies to level ",
                      depth - 1, " alone"));
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

// ---------------------------------------------------------------- text forms

namespace {
// Shortest of "%.{p-1}e" (p = 1, 2, ...) whose text reads back as v, then laid out as a person writes numbers.
template <class T>
std::string format_shortest(T v, T (*read)(const char*, char**), int max_digits) {
  if (std::isnan(v)) return "nan";
  if (std::isinf(v)) return v > 0 ? "inf" : "-inf";
  char buf[48];
  for (int p = 1; p <= max_digits; ++p) {
    std::snprintf(buf, sizeof buf, "%.*e", p - 1, (double)v);
    if (read(buf, nullptr) == v) break;
  }
  // buf = [-]d[.ddd]e(+|-)xx: split into sign, digits and the decimal exponent of the first digit.
  std::string t = buf, digits;
  bool neg = t[0] == '-';
  size_t epos = t.find('e');
  for (size_t i = neg ? 1 : 0; i < epos; ++i)
    if (t[i] != '.') digits += t[i];
  int e = std::atoi(t.c_str() + epos + 1);
  while (digits.size() > 1 && digits.back() == '0') digits.pop_back();
  std::string out;
  if (e >= -4 && e < 16) {  // 0.0001 .. 9999999999999999: plain decimal
    if (e >= 0)
      out = digits.size() > (size_t)e + 1 ? digits.substr(0, e + 1) + "." + digits.substr(e + 1)
                                          : digits + std::string(e + 1 - digits.size(), '0');
    else
      out = "0." + std::string(-e - 1, '0') + digits;
  } else {  // 1e-5 (as learning rates are written), 2.5e16
    out = digits.substr(0, 1) + (digits.size() > 1 ? "." + digits.substr(1) : "") + "e" + std::to_string(e);
  }
  return neg ? "-" + out : out;
}
float read_float(const char* s, char** end) { return std::strtof(s, end); }
double read_double(const char* s, char** end) { return std::strtod(s, end); }
}  // namespace

std::string format_float(float v) { return format_shortest<float>(v, read_float, 9); }
std::string format_double(double v) { return format_shortest<double>(v, read_double, 17); }

const char* const BOOL_WORDS = "1|0, true|false, on|off, yes|no";

bool parse_bool_word(const std::string& t, bool* v) {
  if (t == "1" || t == "true" || t == "on" || t == "yes") {
    *v = true;
    return true;
  }
  if (t == "0" || t == "false" || t == "off" || t == "no") {
    *v = false;
    return true;
  }
  return false;
}

// ---------------------------------------------------------------- string map

namespace {

int64_t parse_int(const std::string& key, const std::string& v) {
  char* end = nullptr;
  errno = 0;
  long long x = std::strtoll(v.c_str(), &end, 10);
  CM_REQUIRE(!v.empty() && end && *end == 0 && errno == 0, "CoEConfig.", key, " = '", v, "': expected an integer");
  return (int64_t)x;
}
uint64_t parse_u64(const std::string& key, const std::string& v) {
  // The whole uint64 range (train_lm's --seed takes it): strtoll would refuse seeds from 2^63 up.
  char* end = nullptr;
  errno = 0;
  unsigned long long x = std::strtoull(v.c_str(), &end, 10);
  CM_REQUIRE(!v.empty() && v.find_first_not_of("0123456789") == std::string::npos && *end == 0 && errno == 0,
             "CoEConfig.", key, " = '", v, "': expected an integer in 0..18446744073709551615");
  return (uint64_t)x;
}
float parse_float(const std::string& key, const std::string& v) {
  char* end = nullptr;
  errno = 0;
  float x = std::strtof(v.c_str(), &end);
  CM_REQUIRE(!v.empty() && end && *end == 0 && errno == 0, "CoEConfig.", key, " = '", v, "': expected a number");
  return x;
}
bool parse_bool(const std::string& key, const std::string& v) {
  bool b = false;
  if (!parse_bool_word(v, &b)) fail("CoEConfig.", key, " = '", v, "': expected one of ", BOOL_WORDS);
  return b;
}
std::vector<int64_t> parse_ints(const std::string& key, const std::string& v) {
  std::vector<int64_t> r;
  if (v.empty()) return r;
  std::stringstream ss(v);
  std::string item;
  while (std::getline(ss, item, ',')) r.push_back(parse_int(key, item));
  return r;
}

// One table drives to_map, set, from_map and the command line, so a field cannot be forgotten in one of them.
struct Field {
  ConfigKey info;
  std::function<std::string(const CoEConfig&)> get;
  std::function<void(CoEConfig&, const std::string&)> set;
};

ConfigKey key_info(const char* key, ConfigKey::Kind kind, double lo, double hi, const char* range, const char* help) {
  ConfigKey k;
  k.key = key;
  k.kind = kind;
  k.lo = lo;
  k.hi = hi;
  k.range = range;
  k.help = help;
  return k;
}
ConfigKey open_ends(ConfigKey k, bool lo_open, bool hi_open) {
  k.lo_open = lo_open;
  k.hi_open = hi_open;
  return k;
}
ConfigKey derived(ConfigKey k) {
  k.derived = true;
  return k;
}
template <class M>
ConfigKey bind(ConfigKey k, M CoEConfig::*p) {
  if constexpr (std::is_same_v<M, int64_t>) k.i = p;
  if constexpr (std::is_same_v<M, float>) k.f = p;
  if constexpr (std::is_same_v<M, bool>) k.b = p;
  return k;
}

// F_INT(name, lo, hi, help): an integer in [lo, hi]. F_FLOAT(name, lo, hi, help): a number in [lo, hi];
// F_FLOAT_OPEN(name, lo_open, lo, hi, hi_open, help) when an end is excluded. F_BOOL(name, help).
// F_INTS(name, "how it is written", help): a comma list. F_CHOICE(name, "a|b", to_text, from_text, help).
#define F_INT(name, lo, hi, help)                                                                               \
  Field{bind(key_info(#name, ConfigKey::Kind::Int, lo, hi, "", help), &CoEConfig::name),                        \
        [](const CoEConfig& c) { return std::to_string(c.name); },                                              \
        [](CoEConfig& c, const std::string& v) { c.name = parse_int(#name, v); }}
#define F_FLOAT_OPEN(name, lo_open, lo, hi, hi_open, help)                                                      \
  Field{bind(open_ends(key_info(#name, ConfigKey::Kind::Float, lo, hi, "", help), lo_open, hi_open),            \
             &CoEConfig::name),                                                                                 \
        [](const CoEConfig& c) { return format_float(c.name); },                                                \
        [](CoEConfig& c, const std::string& v) { c.name = parse_float(#name, v); }}
#define F_FLOAT(name, lo, hi, help) F_FLOAT_OPEN(name, false, lo, hi, false, help)
#define F_BOOL(name, help)                                                                                      \
  Field{bind(key_info(#name, ConfigKey::Kind::Bool, 0, 1, "", help), &CoEConfig::name),                         \
        [](const CoEConfig& c) { return std::string(c.name ? "true" : "false"); },                              \
        [](CoEConfig& c, const std::string& v) { c.name = parse_bool(#name, v); }}
#define F_INTS(name, range, help)                                                                               \
  Field{key_info(#name, ConfigKey::Kind::Text, 0, 0, range, help),                                              \
        [](const CoEConfig& c) { return vec_str(c.name); },                                                     \
        [](CoEConfig& c, const std::string& v) { c.name = parse_ints(#name, v); }}
#define F_CHOICE(name, choices, to_text, from_text, help)                                                       \
  Field{key_info(#name, ConfigKey::Kind::Choice, 0, 0, choices, help),                                          \
        [](const CoEConfig& c) { return std::string(to_text(c.name)); },                                        \
        [](CoEConfig& c, const std::string& v) { c.name = from_text(v); }}

const double BIG = 1e9;

const std::vector<Field>& fields() {
  static const std::vector<Field> f = {
      // ---- transformer
      F_INT(d_model, 1, 1 << 16, "C, model width (a multiple of n_heads)"),
      F_INT(n_layers, 1, 1024, "transformer blocks"),
      F_INT(n_heads, 1, 1024, "attention heads"),
      F_INT(d_ff, 1, 1 << 20, "hidden width of each expert (and of a dense FFN)"),
      Field{derived(key_info("vocab_size", ConfigKey::Kind::Int, 1, 1 << 24, "", "V, from the tokenizer")),
            [](const CoEConfig& c) { return std::to_string(c.vocab_size); },
            [](CoEConfig& c, const std::string& v) { c.vocab_size = parse_int("vocab_size", v); }},
      Field{derived(key_info("seq_len", ConfigKey::Kind::Int, 1, 1 << 20, "", "T, maximum context (--seq_len)")),
            [](const CoEConfig& c) { return std::to_string(c.seq_len); },
            [](CoEConfig& c, const std::string& v) { c.seq_len = parse_int("seq_len", v); }},
      F_CHOICE(norm, "layernorm|rmsnorm", norm_kind_name, parse_norm_kind, "normalisation before each sublayer"),
      F_CHOICE(pos, "learned|rope", pos_kind_name, parse_pos_kind,
               "positions: a learned table, or rotary (rope: windows slide past seq_len)"),
      F_FLOAT_OPEN(rope_base, true, 1, 1e30, false, "rope: pair i of a head turns by position * base^(-2i/D)"),
      F_BOOL(bias, "biases in the attention and FFN linears"),
      F_BOOL(tie_embeddings, "LM head shares the token embedding"),
      F_FLOAT_OPEN(dropout, false, 0, 0.95, false, "dropout probability (training only)"),
      F_FLOAT_OPEN(init_std, true, 0, 1e30, false, "std of the initial weights (output projections / sqrt(2 L))"),
      // ---- routing
      F_CHOICE(router, "dense|flat|cluster|tree|ac", router_kind_name, parse_router_kind,
               "FFN routing: dense FFN, flat top-k, two-level clusters, a deeper tree, or AC"),
      F_INT(num_clusters, 1, 4096, "clusters (flat, ac: experts = clusters x experts_per_cluster)"),
      F_INT(experts_per_cluster, 1, 4096, "experts in each cluster"),
      F_INT(top_k_clusters, 1, 4096, "clusters kept per token"),
      F_INT(top_k_experts, 1, 4096, "experts kept per kept cluster"),
      F_INTS(tree_branching, "B,B,..", "branching factors of --router tree (flag: --tree BxBx..)"),
      F_INTS(tree_top_k, "K,K,..", "children kept per level of --router tree"),
      F_INTS(ac_levels, "L,L,..", "tree levels (0-based) with the Adaptive Clustering transform"),
      F_BOOL(ac_scaling, "AC router's per-feature scaling (off: the m = 1 ablation)"),
      F_FLOAT_OPEN(routing_temperature, true, 0, 1e3, false, "router softmax temperature"),
      F_CHOICE(gate_mode, "product|renorm_path|renorm_last|group_limited", gate_mode_name, parse_gate_mode,
               "how a token's gates follow from its path's probabilities (README: Gate designs)"),
      F_INT(moe_every, 1, 1024, "layer l is an MoE layer iff l % moe_every == 0"),
      F_CHOICE(expert, "swiglu|gelu", expert_kind_name, parse_expert_kind, "expert FFN activation"),
      F_FLOAT(capacity_factor, 0, 1e4, "expert capacity ceil(cf T K / N) slots in training; 0 = dropless"),
      // ---- losses
      F_FLOAT(load_balancing_weight, 0, 1e3, "load-balance loss weight (every level and node)"),
      F_FLOAT(router_z_loss_weight, 0, 1e3, "router z-loss weight"),
      F_FLOAT(diversity_weight, 0, 1e3, "sibling-router diversity loss weight"),
      F_BOOL(aux_free_bias, "auxiliary-loss-free balancing bias on selection (DeepSeek-V3)"),
      F_FLOAT(aux_free_bias_rate, 0, 1e3, "step of the aux-free bias update per optimizer step"),
      // ---- reliability, adaptivity, pruning
      F_BOOL(use_reliability, "fault guard and reliability-aware routing"),
      F_FLOAT_OPEN(reliability_decay, false, 0, 1, true, "EMA decay of reliability per optimizer step"),
      F_FLOAT_OPEN(reliability_min, true, 0, 1, false, "floor of every reliability"),
      F_FLOAT_OPEN(reliability_outlier_factor, true, 1, 1e6, false,
                   "an expert row norm above this x its running mean is a fault"),
      F_BOOL(use_adaptive_routing, "learned per-token sigmoid gate on the MoE output"),
      F_BOOL(use_expert_selection_cache, "KV and routing cache when generating"),
      F_BOOL(enable_expert_pruning, "remove experts that stay under pruning_threshold or unreliable"),
      F_FLOAT_OPEN(pruning_threshold, false, 0, 1, true, "traffic share under which a step counts as low"),
      F_INT(pruning_window, 1, BIG, "consecutive low steps before an expert is removed"),
      Field{derived(key_info("seed", ConfigKey::Kind::Text, 0, 0, "0..2^64-1", "initialisation seed (--seed)")),
            [](const CoEConfig& c) { return std::to_string(c.seed); },
            [](CoEConfig& c, const std::string& v) { c.seed = parse_u64("seed", v); }},
  };
  return f;
}

#undef F_INT
#undef F_FLOAT_OPEN
#undef F_FLOAT
#undef F_BOOL
#undef F_INTS
#undef F_CHOICE

}  // namespace

const std::vector<ConfigKey>& config_keys() {
  static const std::vector<ConfigKey> keys = [] {
    std::vector<ConfigKey> k;
    for (const Field& f : fields()) k.push_back(f.info);
    return k;
  }();
  return keys;
}

std::map<std::string, std::string> CoEConfig::to_map() const {
  std::map<std::string, std::string> m;
  for (const Field& f : fields()) m[f.info.key] = f.get(*this);
  return m;
}

void CoEConfig::set(const std::string& key, const std::string& value) {
  // The key of checkpoints written before gate_mode: renormalised path products or plain ones.
  if (key == "renormalize_gates") {
    gate_mode = parse_bool(key, value) ? GateMode::RenormPath : GateMode::Product;
    return;
  }
  for (const Field& f : fields())
    if (key == f.info.key) {
      f.set(*this, value);
      return;
    }
  fail("CoEConfig: unknown key '", key, "'");
}

std::string CoEConfig::get(const std::string& key) const {
  for (const Field& f : fields())
    if (key == f.info.key) return f.get(*this);
  fail("CoEConfig: unknown key '", key, "'");
}

CoEConfig CoEConfig::from_map(const std::map<std::string, std::string>& m) {
  CM_REQUIRE(!(m.count("gate_mode") && m.count("renormalize_gates")),
             "CoEConfig: both gate_mode and its old form renormalize_gates are set; keep gate_mode");
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
