#include "model/cli.h"

#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>

namespace cm {

// ---------------------------------------------------------------- numbers
std::string format_float(float v) {
  // The shortest %g text that reads back as the same float: 0.001, not 0.00100000005.
  char buf[32];
  for (int prec = 6; prec <= 9; ++prec) {
    std::snprintf(buf, sizeof buf, "%.*g", prec, (double)v);
    if (std::strtof(buf, nullptr) == v) break;
  }
  return buf;
}

int64_t parse_int(const std::string& text, const std::string& what) {
  // strtoll alone accepts " 12", "12abc" (stopping early) and wraps silently; be strict instead.
  if (text.empty() || text.find_first_of(" \t\n") != std::string::npos)
    throw UsageError(str(what, ": expected an integer, got '", text, "'"));
  errno = 0;
  char* end = nullptr;
  long long v = std::strtoll(text.c_str(), &end, 10);
  if (*end != '\0') throw UsageError(str(what, ": expected an integer, got '", text, "'"));
  if (errno == ERANGE) throw UsageError(str(what, ": integer out of range: ", text));
  return (int64_t)v;
}

double parse_double(const std::string& text, const std::string& what) {
  if (text.empty() || text.find_first_of(" \t\n") != std::string::npos)
    throw UsageError(str(what, ": expected a number, got '", text, "'"));
  errno = 0;
  char* end = nullptr;
  double v = std::strtod(text.c_str(), &end);
  if (*end != '\0') throw UsageError(str(what, ": expected a number, got '", text, "'"));
  if (!std::isfinite(v) || errno == ERANGE) throw UsageError(str(what, ": expected a finite number, got '", text, "'"));
  return v;
}

// ---------------------------------------------------------------- Flags
const Flags::Spec* Flags::find(const std::string& name) const {
  for (const auto& s : specs_)
    if (s.name == name) return &s;
  return nullptr;
}

void Flags::add(Spec s) {
  CM_CHECK(!find(s.name), "flag registered twice: --", s.name);
  specs_.push_back(std::move(s));
}

void Flags::add_int(const std::string& name, int64_t* v, int64_t lo, int64_t hi, const std::string& help) {
  Spec s;
  s.name = name;
  s.help = help;
  s.range = str(lo, "..", hi);
  s.set = [=](const std::string& t) {
    int64_t x = parse_int(t, "--" + name);
    if (x < lo || x > hi) throw UsageError(str("--", name, " must be in ", lo, "..", hi, ", got ", x));
    *v = x;
  };
  s.get = [=] { return std::to_string(*v); };
  add(std::move(s));
}

void Flags::add_float(const std::string& name, float* v, double lo, double hi, bool lo_open, const std::string& help) {
  Spec s;
  s.name = name;
  s.help = help;
  s.range = str(lo_open ? "(" : "[", lo, ", ", hi, "]");
  s.set = [=](const std::string& t) {
    double x = parse_double(t, "--" + name);
    bool ok = (lo_open ? x > lo : x >= lo) && x <= hi;
    if (!ok) throw UsageError(str("--", name, " must be in ", lo_open ? "(" : "[", lo, ", ", hi, "], got ", t));
    *v = (float)x;
  };
  s.get = [=] { return format_float(*v); };
  add(std::move(s));
}

void Flags::add_u64(const std::string& name, uint64_t* v, const std::string& help) {
  Spec s;
  s.name = name;
  s.help = help;
  s.range = "0..2^64-1";
  s.set = [=](const std::string& t) {
    if (t.empty() || t.find_first_not_of("0123456789") != std::string::npos)
      throw UsageError(str("--", name, ": expected a non-negative integer, got '", t, "'"));
    errno = 0;
    unsigned long long x = std::strtoull(t.c_str(), nullptr, 10);
    if (errno == ERANGE) throw UsageError(str("--", name, ": integer out of range: ", t));
    *v = (uint64_t)x;
  };
  s.get = [=] { return std::to_string(*v); };
  add(std::move(s));
}

void Flags::add_string(const std::string& name, std::string* v, const std::string& help, bool allow_empty) {
  Spec s;
  s.name = name;
  s.help = help;
  s.range = "text";
  s.set = [=](const std::string& t) {
    if (t.empty() && !allow_empty) throw UsageError(str("--", name, ": expected a value, got an empty string"));
    *v = t;
  };
  s.get = [=] { return *v; };
  add(std::move(s));
}

void Flags::add_choice(const std::string& name, std::string* v, std::vector<std::string> choices,
                       const std::string& help) {
  Spec s;
  s.name = name;
  s.help = help;
  for (size_t i = 0; i < choices.size(); ++i) s.range += (i ? "|" : "") + choices[i];
  std::string range = s.range;
  s.set = [=](const std::string& t) {
    for (const auto& c : choices)
      if (t == c) {
        *v = t;
        return;
      }
    throw UsageError(str("--", name, " must be one of ", range, ", got '", t, "'"));
  };
  s.get = [=] { return *v; };
  add(std::move(s));
}

void Flags::add_bool(const std::string& name, bool* v, const std::string& help) {
  Spec s;
  s.name = name;
  s.help = help;
  s.range = "0|1";
  s.bare_ok = true;
  s.bare_value = "1";
  s.set = [=](const std::string& t) {
    if (t == "1" || t == "true" || t == "yes" || t == "on")
      *v = true;
    else if (t == "0" || t == "false" || t == "no" || t == "off")
      *v = false;
    else
      throw UsageError(str("--", name, ": expected 0 or 1 (or true/false), got '", t, "'"));
  };
  s.get = [=] { return std::string(*v ? "1" : "0"); };
  add(std::move(s));
}

void Flags::add_optional(const std::string& name, std::string* v, std::string bare_value, const std::string& help) {
  Spec s;
  s.name = name;
  s.help = help;
  s.range = "[text]";
  s.bare_ok = true;
  s.bare_value = bare_value;
  s.set = [=](const std::string& t) { *v = t; };  // split() already turned a bare flag into bare_value
  s.get = [=] { return *v; };
  add(std::move(s));
}

void Flags::add_custom(const std::string& name, const std::string& range, const std::string& help,
                       std::function<void(const std::string&)> set, std::function<std::string()> get) {
  Spec s;
  s.name = name;
  s.help = help;
  s.range = range;
  s.set = std::move(set);
  s.get = std::move(get);
  add(std::move(s));
}

static bool is_bool_word(const std::string& t) {
  for (const char* w : {"0", "1", "true", "false", "yes", "no", "on", "off"})
    if (t == w) return true;
  return false;
}

std::vector<FlagArg> Flags::split(const std::vector<std::string>& args) const {
  std::vector<FlagArg> out;
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& a = args[i];
    if (a.size() < 3 || a.compare(0, 2, "--") != 0)
      throw UsageError(str("unexpected argument '", a, "': flags are --name value or --name=value"));
    std::string name = a.substr(2), value;
    size_t eq = name.find('=');
    bool has_value = eq != std::string::npos;
    if (has_value) {
      value = name.substr(eq + 1);
      name = name.substr(0, eq);
    }
    const Spec* s = find(name);
    if (!s) throw UsageError(str("unknown flag --", name));
    if (!has_value) {
      bool next_is_value = i + 1 < args.size() && args[i + 1].compare(0, 2, "--") != 0;
      // A bare bool is only followed by a value when that value reads as a bool: `--tf32 --lr 1` and
      // `--tf32 0` both work. A bare optional flag takes any non-flag word after it.
      if (s->bare_ok && s->range == "0|1") next_is_value = next_is_value && is_bool_word(args[i + 1]);
      if (next_is_value) {
        value = args[++i];
      } else if (s->bare_ok) {
        value = s->bare_value;
      } else {
        throw UsageError(str("flag --", name, " needs a value"));
      }
    }
    out.push_back({name, value});
  }
  return out;
}

void Flags::set(const std::string& name, const std::string& value) {
  const Spec* s = find(name);
  if (!s) throw UsageError(str("unknown flag --", name));
  s->set(value);
}

std::vector<std::pair<std::string, std::string>> Flags::values() const {
  std::vector<std::pair<std::string, std::string>> out;
  for (const auto& s : specs_) out.emplace_back(s.name, s.get());
  return out;
}

std::string Flags::usage() const {
  std::string u = str("usage: ", program_, " [--flag value | --flag=value]...\n", summary_, "\n\nflags (default):\n");
  for (const auto& s : specs_) {
    std::string left = str("  --", s.name, " ", s.range);
    std::string def = s.get();
    if (def == "\n") def = "\\n";
    if (left.size() < 34) left.resize(34, ' ');
    u += str(left, " ", s.help, " (", def.empty() ? "none" : def, ")\n");
  }
  return u;
}

// ---------------------------------------------------------------- train_lm
// "4x4x4" -> {4, 4, 4}; the flag name goes into the message.
static std::vector<int64_t> parse_factors(const std::string& text, const std::string& flag) {
  std::vector<int64_t> out;
  if (text.empty()) return out;
  size_t p = 0;
  for (;;) {
    size_t q = text.find('x', p);
    std::string f = text.substr(p, q == std::string::npos ? std::string::npos : q - p);
    int64_t b = 0;
    try {
      b = parse_int(f, flag);
    } catch (const UsageError&) {
      throw UsageError(str(flag, ": expected factors like 4x4x4, got '", text, "'"));
    }
    if (b < 1 || b > 4096) throw UsageError(str(flag, ": each factor must be in 1..4096, got '", text, "'"));
    out.push_back(b);
    if (q == std::string::npos) return out;
    p = q + 1;
  }
}
static std::string join_factors(const std::vector<int64_t>& v) {
  std::string s;
  for (size_t i = 0; i < v.size(); ++i) s += (i ? "x" : "") + std::to_string(v[i]);
  return s;
}

void TrainOptions::validate() const {
  auto bad = [](const std::string& m) { throw UsageError(m); };
  if (min_lr > lr) bad(str("--min_lr ", format_float(min_lr), " is above --lr ", format_float(lr)));
  if (model.router == RouterKind::Tree && model.tree_branching.empty())
    bad("--router tree needs --tree, e.g. --tree 4x4x4");
  if (model.router != RouterKind::Tree && (!model.tree_branching.empty() || !model.tree_top_k.empty()))
    bad("--tree and --tree_top_k are only used with --router tree");
  // Each factor is at most 4096 (parse_factors) and the product at most 2^24 experts (CoEConfig's limit), checked
  // level by level: model_config() multiplies the factors, and 7 levels of 4096 overflow int64.
  int64_t experts = 1;
  for (int64_t b : model.tree_branching) {
    experts *= b;
    if (experts > ((int64_t)1 << 24))
      bad(str("--tree ", join_factors(model.tree_branching), ": more than 2^24 experts"));
  }
  if (!model.tree_top_k.empty() && model.tree_top_k.size() != model.tree_branching.size())
    bad(str("--tree_top_k ", join_factors(model.tree_top_k), " needs one factor per level of --tree ",
            join_factors(model.tree_branching)));
}

CoEConfig TrainOptions::model_config(int64_t vocab_size) const {
  CoEConfig c = model;
  c.vocab_size = vocab_size;
  c.seq_len = seq_len;
  c.seed = seed;
  if (c.router == RouterKind::Tree && !c.tree_branching.empty()) {
    // --tree fixes the number of experts: the root's children are the clusters, their subtrees the experts.
    c.num_clusters = c.tree_branching.front();
    c.experts_per_cluster = 1;
    for (size_t l = 1; l < c.tree_branching.size(); ++l) c.experts_per_cluster *= c.tree_branching[l];
  }
  // --router tree without --tree_top_k: top_k_clusters at the root, top_k_experts at the leaves, 1 in between.
  if (c.router == RouterKind::Tree && c.tree_top_k.empty() && !c.tree_branching.empty()) {
    c.tree_top_k.assign(c.tree_branching.size(), 1);
    c.tree_top_k.front() = c.top_k_clusters;
    if (c.tree_top_k.size() > 1) c.tree_top_k.back() = c.top_k_experts;
  }
  c.validate();
  return c;
}

void apply_preset(TrainOptions& o, const std::string& name) {
  CoEConfig& m = o.model;
  if (name == "cpu") {
    // Sized for about five minutes on two CPU cores: nanoGPT's CPU shakespeare_char run (4 layers, 4 heads,
    // 128 wide, block 64, batch 12, 2000 iterations, lr 1e-3, no dropout) with its FFN split into experts.
    o.max_steps = 2000;
    o.batch_size = 12;
    o.seq_len = 64;
    o.grad_accum = 1;
    o.lr = 1e-3f;
    o.min_lr = 1e-4f;
    o.warmup_steps = 100;
    o.weight_decay = 0.1f;
    o.beta2 = 0.99f;
    o.grad_clip = 1.0f;
    o.eval_every = 200;
    o.eval_iters = 20;
    o.sample_every = 1000;
    o.sample_len = 200;
    o.save_every = 1000;
    m.dropout = 0.0f;
    m.router = RouterKind::Cluster;
    m.tree_branching.clear();
    m.tree_top_k.clear();
    m.d_model = 128;
    m.n_layers = 4;
    m.n_heads = 4;
    m.d_ff = 512;
    m.num_clusters = 2;
    m.experts_per_cluster = 2;
    m.top_k_clusters = 1;
    m.top_k_experts = 1;
    m.capacity_factor = 0.0f;
  } else if (name == "shakespeare") {
    // nanoGPT's shakespeare_char (6 layers, 6 heads, 384 wide, block 256, batch 64, 5000 iterations, lr 1e-3,
    // beta2 0.99, dropout 0.2) with 4 clusters of 4 experts, 2 active per token, each half the dense FFN width,
    // so a token's FFN compute matches the dense model's.
    o.max_steps = 5000;
    o.batch_size = 64;
    o.seq_len = 256;
    o.grad_accum = 1;
    o.lr = 1e-3f;
    o.min_lr = 1e-4f;
    o.warmup_steps = 100;
    o.weight_decay = 0.1f;
    o.beta2 = 0.99f;
    o.grad_clip = 1.0f;
    o.eval_every = 250;
    o.eval_iters = 200;
    o.sample_every = 1000;
    o.sample_len = 300;
    o.save_every = 1000;
    m.dropout = 0.2f;
    m.router = RouterKind::Cluster;
    m.tree_branching.clear();
    m.tree_top_k.clear();
    m.d_model = 384;
    m.n_layers = 6;
    m.n_heads = 6;
    m.d_ff = 768;
    m.num_clusters = 4;
    m.experts_per_cluster = 4;
    m.top_k_clusters = 1;
    m.top_k_experts = 2;
    m.capacity_factor = 0.0f;
  } else {
    throw UsageError(str("--preset must be one of cpu|shakespeare, got '", name, "'"));
  }
  o.preset = name;
}

void add_train_flags(Flags& f, TrainOptions& o, bool* help) {
  const int64_t BIG = 1000000000;
  CoEConfig& m = o.model;
  // ---- data, files, device
  f.add_string("data", &o.data, "training text or byte file (default data/tinyshakespeare.txt)", true);
  f.add_string("out_dir", &o.out_dir, "where log.csv, routing.csv, curves.svg and checkpoints go");
  f.add_choice("device", &o.device, {"auto", "cpu", "cuda"}, "auto: CUDA when built and present, else CPU");
  f.add_choice("preset", &o.preset, {"cpu", "shakespeare"},
               "settings bundle (default: cpu on CPU, shakespeare on CUDA)");
  f.add_optional("resume", &o.resume, "latest", "continue from the newest checkpoint in out_dir, or a path");
  f.add_u64("seed", &o.seed, "seed for initialisation, data order and dropout");
  f.add_bool("deterministic", &o.deterministic, "bit-reproducible kernels (always: every kernel here is)");
  f.add_bool("tf32", &o.tf32, "TF32 matrix products on CUDA");
  // ---- optimisation
  f.add_int("max_steps", &o.max_steps, 1, BIG, "optimizer steps");
  f.add_int("batch_size", &o.batch_size, 1, 1 << 20, "B, sequences per micro-batch");
  f.add_int("seq_len", &o.seq_len, 1, 1 << 20, "T, context length");
  f.add_int("grad_accum", &o.grad_accum, 1, 1 << 20, "micro-batches per step");
  f.add_float("lr", &o.lr, 0, 10, true, "peak learning rate");
  f.add_float("min_lr", &o.min_lr, 0, 10, false, "learning rate at the end of the cosine");
  f.add_int("warmup_steps", &o.warmup_steps, 0, BIG, "linear warm-up steps");
  f.add_float("weight_decay", &o.weight_decay, 0, 10, false, "AdamW decoupled weight decay");
  f.add_float("beta1", &o.beta1, 0, 1, false, "AdamW beta1");
  f.add_float("beta2", &o.beta2, 0, 1, false, "AdamW beta2");
  f.add_float("grad_clip", &o.grad_clip, 0, 1e6, false, "clip the global gradient norm; 0 = off");
  f.add_bool("decay_embeddings", &o.decay_embeddings, "apply weight decay to embeddings too");
  f.add_float("dropout", &m.dropout, 0, 0.95, false, "dropout probability");
  // ---- along the way
  f.add_int("eval_every", &o.eval_every, 0, BIG, "steps between evaluations; 0 = off");
  f.add_int("eval_iters", &o.eval_iters, 1, 1 << 20, "fixed batches per split per evaluation");
  f.add_int("log_every", &o.log_every, 0, BIG, "steps between step lines; 0 = off");
  f.add_int("sample_every", &o.sample_every, 0, BIG, "steps between text samples; 0 = off");
  f.add_int("sample_len", &o.sample_len, 1, 1 << 20, "bytes per text sample");
  f.add_int("save_every", &o.save_every, 0, BIG, "steps between checkpoints (and at the end); 0 = off");
  f.add_int("keep_last", &o.keep_last, 0, BIG, "checkpoints kept in out_dir; 0 = all");
  // ---- model
  f.add_custom(
      "router", "dense|flat|cluster|tree|ac", "FFN routing",
      [&m](const std::string& v) {
        try {
          m.router = parse_router_kind(v);
        } catch (const Error&) {
          throw UsageError(str("--router must be one of dense|flat|cluster|tree|ac, got '", v, "'"));
        }
      },
      [&m] { return std::string(router_kind_name(m.router)); });
  f.add_custom(
      "tree", "BxBx..", "branching factors for --router tree, e.g. 4x4x4",
      [&m](const std::string& v) { m.tree_branching = parse_factors(v, "--tree"); },
      [&m] { return join_factors(m.tree_branching); });
  f.add_custom(
      "tree_top_k", "KxKx..", "children kept per level for --router tree (default k_clusters x 1 .. x k_experts)",
      [&m](const std::string& v) { m.tree_top_k = parse_factors(v, "--tree_top_k"); },
      [&m] { return join_factors(m.tree_top_k); });
  f.add_int("num_clusters", &m.num_clusters, 1, 4096, "clusters (flat: experts = clusters x per cluster)");
  f.add_int("experts_per_cluster", &m.experts_per_cluster, 1, 4096, "experts in each cluster");
  f.add_int("top_k_clusters", &m.top_k_clusters, 1, 4096, "clusters kept per token");
  f.add_int("top_k_experts", &m.top_k_experts, 1, 4096, "experts kept per kept cluster");
  f.add_float("capacity_factor", &m.capacity_factor, 0, 1e4, false, "expert capacity factor; 0 = dropless");
  f.add_float("load_balancing_weight", &m.load_balancing_weight, 0, 1e3, false, "load-balance loss weight");
  f.add_float("router_z_loss_weight", &m.router_z_loss_weight, 0, 1e3, false, "router z-loss weight");
  f.add_float("diversity_weight", &m.diversity_weight, 0, 1e3, false, "sibling-router diversity loss weight");
  f.add_int("d_model", &m.d_model, 1, 1 << 16, "C, model width");
  f.add_int("n_layers", &m.n_layers, 1, 1024, "transformer blocks");
  f.add_int("n_heads", &m.n_heads, 1, 1024, "attention heads");
  f.add_int("d_ff", &m.d_ff, 1, 1 << 20, "hidden width of each expert");
  // Every other CoEConfig key, parsed by CoEConfig::set. seq_len, seed and vocab_size are derived (above, data).
  for (const auto& kv : CoEConfig().to_map()) {
    const std::string key = kv.first;
    if (f.has(key) || key == "seq_len" || key == "seed" || key == "vocab_size" || key == "tree_branching") continue;
    f.add_custom(
        key, "value", "model setting (model/config.h)", [&m, key](const std::string& v) { m.set(key, v); },
        [&m, key] { return m.get(key); });
  }
  f.add_bool("help", help, "print this and exit");
}

// ---------------------------------------------------------------- sample
void add_sample_flags(Flags& f, SampleOptions& o, bool* help) {
  f.add_string("ckpt", &o.ckpt, "checkpoint (*.safetensors); default: the newest in --out_dir", true);
  f.add_string("out_dir", &o.out_dir, "where to look for the newest checkpoint when --ckpt is not given");
  f.add_string("prompt", &o.prompt, "text to continue", true);
  f.add_int("max_new_tokens", &o.max_new_tokens, 0, 1 << 24, "bytes to generate");
  f.add_float("temperature", &o.temperature, 0, 100, false, "softmax temperature; 0 = greedy");
  f.add_int("top_k", &o.top_k, 0, 1 << 20, "sample from the k most likely bytes; 0 = all");
  f.add_u64("seed", &o.seed, "sampling seed");
  f.add_choice("device", &o.device, {"auto", "cpu", "cuda"}, "auto: CUDA when built and present, else CPU");
  f.add_bool("cache", &o.use_cache, "use the expert-selection cache (KV and routing)");
  f.add_bool("help", help, "print this and exit");
}

}  // namespace cm
