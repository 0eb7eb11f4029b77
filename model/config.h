// CoEConfig: every knob of the ClusterMoE language model (DESIGN.md section 4), its validation, and its
// round trip through a flat string map (checkpoint metadata).
//
// The routing tree. Experts are the leaves of a tree with branching factors [b1, ..., bD] (product N); at level l
// each kept node keeps top_k[l] of its children, so a token reaches prod(top_k) experts. The router kind picks
// the tree:
//   dense    no routing: every FFN layer is one dense FFN (d -> d_ff -> d).
//   flat     [N] with N = num_clusters * experts_per_cluster and top_k = [top_k_clusters * top_k_experts]
//            (the same experts per token as the two-level model: Switch/Mixtral style top-k).
//   cluster  [num_clusters, experts_per_cluster], top_k = [top_k_clusters, top_k_experts] (ClusterMoE).
//   tree     tree_branching, tree_top_k as given (deeper trees: O(log N) routing).
//   ac       flat, with the Adaptive Clustering transform (DESIGN.md 4.7) on its one level.
// ac_levels adds the AC transform to chosen levels of any tree (0-based; e.g. {0, 1} for both ClusterMoE levels).
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace cm {

enum class RouterKind { Dense, Flat, Cluster, Tree, AC };
enum class ExpertKind { SwiGLU, GELU };
enum class NormKind { LayerNorm, RMSNorm };
// Positions: a learned table [seq_len, C] added to the embeddings, or rotary (RoPE) rotations of each head's
// queries and keys by absolute position (no parameters; windows past seq_len, see model/layers.h).
enum class PosKind { Learned, Rope };
// How a token's gates come from its routing path (DESIGN.md 4.2; router.h has the formulas):
//   product        (b) the product of the levels' conditional probabilities (Shazeer et al. 2017's hierarchical MoE)
//   renorm_path    (a) that product renormalised over the token's K leaves (K > 1). At a level where the token
//                  keeps one node (top-k 1 there and above) its probability is a common factor of all K leaves
//                  and cancels: that level learns nothing from the task loss (e.g. cluster top [1,2]).
//   renorm_last    (c) the parents' probabilities times the last level's, renormalised over the k kept siblings
//   group_limited  (d) DeepSeek-style: one softmax over all N leaves (the last level's weights); the levels above
//                  only mask (a child's score is its leaves' total probability); the upper levels' weights are unused
enum class GateMode { Product, RenormPath, RenormLast, GroupLimited };

const char* router_kind_name(RouterKind k);  // "dense", "flat", "cluster", "tree", "ac"
const char* expert_kind_name(ExpertKind k);  // "swiglu", "gelu"
const char* norm_kind_name(NormKind k);      // "layernorm", "rmsnorm"
const char* pos_kind_name(PosKind k);        // "learned", "rope"
const char* gate_mode_name(GateMode g);      // "product", "renorm_path", "renorm_last", "group_limited"
RouterKind parse_router_kind(const std::string& s);  // throws cm::Error naming the value and the choices
ExpertKind parse_expert_kind(const std::string& s);
NormKind parse_norm_kind(const std::string& s);
PosKind parse_pos_kind(const std::string& s);
GateMode parse_gate_mode(const std::string& s);

struct CoEConfig {
  // ---- transformer
  int64_t d_model = 128;     // C
  int64_t n_layers = 4;      // L
  int64_t n_heads = 4;       // H; d_model % n_heads == 0
  int64_t d_ff = 256;        // hidden width of each expert (and of a dense FFN)
  int64_t vocab_size = 256;  // V
  int64_t seq_len = 128;     // context window: the learned table's length; with rope, the attention window
  PosKind pos = PosKind::Learned;
  float rope_base = 10000.f;  // rope: pair i of a head turns by position * rope_base^(-2i/D)
  NormKind norm = NormKind::LayerNorm;
  bool bias = false;           // biases in attention and FFN linears
  bool tie_embeddings = true;  // LM head = token embedding
  float dropout = 0.0f;        // on attention/FFN outputs and embeddings, training only
  float init_std = 0.02f;      // N(0, init_std) for weights; output projections scaled by 1/sqrt(2 L)

  // ---- routing
  RouterKind router = RouterKind::Cluster;
  int64_t num_clusters = 4;
  int64_t experts_per_cluster = 4;
  int64_t top_k_clusters = 2;
  int64_t top_k_experts = 1;
  std::vector<int64_t> tree_branching;  // router == tree: [b1, ..., bD], product = number of experts
  std::vector<int64_t> tree_top_k;      // router == tree: one per level, 1 <= top_k[l] <= b[l]
  std::vector<int64_t> ac_levels;       // levels with the AC transform (router == ac: all, implicitly)
  bool ac_scaling = true;               // false: the AC router with m = 1 (the ablation of 4.7)
  float routing_temperature = 1.0f;     // p = softmax(logits / temperature)
  GateMode gate_mode = GateMode::RenormLast;  // see GateMode. Checkpoints from before this field carry the key
                                          // renormalize_gates instead: true reads as renorm_path, false as product
  int64_t moe_every = 1;                // layer l is an MoE layer iff l % moe_every == 0 (router != dense)
  ExpertKind expert = ExpertKind::SwiGLU;
  float capacity_factor = 0.0f;  // > 0: an expert takes at most ceil(cf * T * K / N) slots (training); 0: dropless

  // ---- losses
  float load_balancing_weight = 0.01f;
  float router_z_loss_weight = 0.001f;
  float diversity_weight = 0.001f;
  bool aux_free_bias = false;      // DeepSeek-V3 selection bias, updated in after_step()
  float aux_free_bias_rate = 0.001f;

  // ---- reliability, adaptivity, pruning
  bool use_reliability = true;           // fault guard + reliability-aware routing (DESIGN.md 4.5)
  float reliability_decay = 0.9f;        // EMA decay of reliability per optimizer step
  float reliability_min = 1e-3f;         // floor: reliability stays in (0, 1]
  float reliability_outlier_factor = 20.0f;  // an output row whose norm exceeds this x the running mean is a fault
  bool use_adaptive_routing = false;     // learned per-token sigmoid gate on the MoE output
  bool use_expert_selection_cache = true;  // incremental decoding with KV cache and cached routing
  bool enable_expert_pruning = false;
  float pruning_threshold = 0.01f;  // traffic share (of the layer's routed slots) below which a step counts
  int64_t pruning_window = 100;     // consecutive low steps (or low-reliability steps) before removal

  uint64_t seed = 1337;

  // ---- derived
  std::vector<int64_t> branching() const;  // resolved tree ([1] for dense)
  std::vector<int64_t> top_k() const;      // resolved per-level k ([1] for dense)
  int64_t num_experts() const;             // N per MoE layer (product of branching)
  int64_t experts_per_token() const;       // K = prod(top_k)
  bool is_moe_layer(int64_t layer) const;
  bool level_uses_ac(int64_t level) const;
  int64_t head_dim() const { return d_model / n_heads; }

  // Throws cm::Error("CoEConfig.<field> = <value>: <why>") for the first invalid setting.
  void validate() const;

  // Flat key -> value strings (vectors as "4,4"); from_map starts from defaults, rejects unknown keys and
  // unparsable values naming the key, then validates.
  std::map<std::string, std::string> to_map() const;
  static CoEConfig from_map(const std::map<std::string, std::string>& m);
  // One key=value update with the same parsing (command-line flags); throws on unknown keys.
  void set(const std::string& key, const std::string& value);
  // One key's value as to_map() writes it (one field formatted, not the whole map); throws on unknown keys.
  std::string get(const std::string& key) const;
};

// ---- the settings table
// One CoEConfig field as users see it: train_lm's flag --<key>, its --help line, its checkpoint entry. The table
// in config.cpp (fields()) lists every field once with a one-line description and its range; a new field goes
// there, and its flag, help line, start-up row and checkpoint entry follow (tests/test_cli.cpp checks that each
// has a description and that every bool field is a bool flag).
struct ConfigKey {
  enum class Kind { Int, Float, Bool, Choice, Text };  // Choice: one of `range`; Text: lists, the seed
  std::string key, help;
  Kind kind = Kind::Text;
  int64_t CoEConfig::*i = nullptr;  // Int
  float CoEConfig::*f = nullptr;    // Float
  bool CoEConfig::*b = nullptr;     // Bool
  double lo = 0, hi = 0;            // Int, Float: the range accepted from the command line (validate() decides
  bool lo_open = false, hi_open = false;  // for checkpoints); an open end excludes the bound itself
  std::string range;                // Choice: "a|b|c"; Text: how a value is written ("0,1")
  bool derived = false;             // not a train_lm flag: set from the data (vocab_size) or a train_lm flag
};
const std::vector<ConfigKey>& config_keys();

// ---- text forms shared by the config's string map and the command line
// The shortest decimal text that reads back as exactly the same value: 0.001 for 1e-3f (not 0.00100000005),
// 0.9 for 0.9f, 1e-5, 1000000. Exponent form only below 1e-4 or from 1e16 up.
std::string format_float(float v);
std::string format_double(double v);
// 1/0, true/false, on/off, yes/no -> *v and true; anything else -> false (*v untouched).
bool parse_bool_word(const std::string& text, bool* v);
extern const char* const BOOL_WORDS;  // "1|0, true|false, on|off, yes|no", for messages

// The seed API's constructor helper: a ClusterMoE config with these sizes and defaults for the rest (validated).
CoEConfig make_coe_config(int64_t d_model, int64_t num_layers, int64_t num_clusters, int64_t experts_per_cluster,
                          int64_t vocab_size, int64_t n_heads = 4, int64_t d_ff = 0 /* 0: 2 * d_model */,
                          int64_t seq_len = 128);

}  // namespace cm
