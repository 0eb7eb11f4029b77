// Command-line flags for train_lm and sample, llm.c / nanoGPT style: long form only, `--name value` or
// `--name=value`. Every flag is bound to a field of an options struct; the struct's initial value is the default
// that usage() shows. A bad flag (unknown, malformed number, out of range) throws UsageError naming it; the
// programs print the message and the usage and exit 2.
//
// Order of resolution in train_lm (later wins):
//   built-in defaults -> the checkpoint's stored settings (--resume) -> the preset (--preset, or the device's
//   default preset when not resuming) -> the flags given on the command line.
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "engine/check.h"

namespace cm {

struct UsageError : Error {
  using Error::Error;
};

// One `--name value` pair as given on the command line (value "" for a bare flag that allows it).
struct FlagArg {
  std::string name;
  std::string value;
};

class Flags {
 public:
  Flags(std::string program, std::string summary) : program_(std::move(program)), summary_(std::move(summary)) {}

  // Bind flags to fields. Ranges are inclusive unless noted; `help` is one line.
  void add_int(const std::string& name, int64_t* v, int64_t lo, int64_t hi, const std::string& help);
  // lo_open: the lower bound itself is excluded (e.g. lr > 0).
  void add_float(const std::string& name, float* v, double lo, double hi, bool lo_open, const std::string& help);
  void add_u64(const std::string& name, uint64_t* v, const std::string& help);
  void add_string(const std::string& name, std::string* v, const std::string& help, bool allow_empty = false);
  void add_choice(const std::string& name, std::string* v, std::vector<std::string> choices,
                  const std::string& help);
  // Booleans accept 1/0, true/false, yes/no, on/off; a bare `--name` means true.
  void add_bool(const std::string& name, bool* v, const std::string& help);
  // A string flag that may also appear bare; bare gives `bare_value` (--resume alone = "latest").
  void add_optional(const std::string& name, std::string* v, std::string bare_value, const std::string& help);

  // Split argv into (name, value) pairs: syntax and names are checked, values are not yet.
  std::vector<FlagArg> split(const std::vector<std::string>& args) const;
  // Convert and range-check one value into its field.
  void set(const std::string& name, const std::string& value);
  void apply(const std::vector<FlagArg>& args) {
    for (const auto& a : args) set(a.name, a.value);
  }
  bool has(const std::string& name) const { return find(name) != nullptr; }
  // Current value of every flag, in registration order, as text that set() reads back exactly.
  std::vector<std::pair<std::string, std::string>> values() const;
  std::string usage() const;

 private:
  struct Spec {
    std::string name, help, range;  // range: for usage ("1..1000000", "dense|flat|...")
    bool bare_ok = false;
    std::string bare_value;
    std::function<void(const std::string&)> set;
    std::function<std::string()> get;
  };
  const Spec* find(const std::string& name) const;
  void add(Spec s);
  std::string program_, summary_;
  std::vector<Spec> specs_;
};

// Exact text forms used by Flags::values() (and the start-up table): floats with %.9g round-trip bit for bit.
std::string format_float(float v);
// Number parsing that rejects trailing junk, empty text, and out-of-range values; `what` names the flag.
int64_t parse_int(const std::string& text, const std::string& what);
double parse_double(const std::string& text, const std::string& what);

// ---------------------------------------------------------------- train_lm
// Letters as in DESIGN.md: B batch_size, T seq_len, C d_model.
struct TrainOptions {
  // data, files, device
  std::string data;             // "" = the default corpus (data/tinyshakespeare.txt, else the fortunes)
  std::string out_dir = "out";
  std::string device = "auto";  // auto | cpu | cuda
  std::string preset;           // "" = the device's default: cpu on CPU, shakespeare on CUDA
  std::string resume;           // "" = fresh run; "latest" = newest checkpoint in out_dir; else a path
  uint64_t seed = 1337;
  bool deterministic = true;  // CPU is always deterministic; on CUDA this forbids non-deterministic kernels
  bool tf32 = false;          // TF32 matrix products on CUDA (opt-in, DESIGN.md section 6)
  // schedule and optimisation
  int64_t max_steps = 2000;
  int64_t batch_size = 12;   // B: sequences per micro-batch
  int64_t seq_len = 64;      // T: context length (block size)
  int64_t grad_accum = 1;    // micro-batches per optimizer step
  float lr = 1e-3f;          // peak learning rate
  float min_lr = 1e-4f;      // cosine floor
  int64_t warmup_steps = 100;
  float weight_decay = 0.1f;
  float beta1 = 0.9f, beta2 = 0.99f;
  float grad_clip = 1.0f;    // global-norm clipping; 0 = off
  bool decay_embeddings = false;  // AdamW decays matrices; embeddings only when asked (norms, biases never)
  float dropout = 0.0f;
  // what happens along the way (0 = off)
  int64_t eval_every = 200;
  int64_t eval_iters = 20;  // fixed validation batches per evaluation
  int64_t log_every = 1;
  int64_t sample_every = 500;
  int64_t sample_len = 200;
  int64_t save_every = 500;
  int64_t keep_last = 3;  // checkpoints kept in out_dir; 0 = keep all
  // model
  std::string router = "cluster";  // dense | flat | cluster | tree | ac
  std::string tree;                // branching factors for router=tree, e.g. "4x4x4"
  int64_t d_model = 128;           // C
  int64_t n_layers = 4;
  int64_t n_heads = 4;
  int64_t d_ff = 512;  // each expert's hidden width
  int64_t num_clusters = 2;
  int64_t experts_per_cluster = 2;
  int64_t top_k_clusters = 1;
  int64_t top_k_experts = 1;
  float capacity_factor = 0.0f;  // 0 = dropless
  float load_balancing_weight = 0.01f;
  float router_z_loss_weight = 0.001f;
  float diversity_weight = 0.0f;

  // Cross-field checks that a single flag's range cannot express; UsageError names the flags.
  void validate() const;
};

// The preset names, and what each sets (every field it sets also has a flag).
const std::vector<std::string>& train_presets();
void apply_preset(TrainOptions& o, const std::string& name);

// Registers every train_lm flag on `o`.
void add_train_flags(Flags& f, TrainOptions& o, bool* help);

// ---------------------------------------------------------------- sample
struct SampleOptions {
  std::string ckpt;  // "" = newest checkpoint in out_dir
  std::string out_dir = "out";
  std::string prompt = "\n";
  int64_t max_new_tokens = 500;
  float temperature = 0.8f;
  int64_t top_k = 0;  // 0 = whole vocabulary
  uint64_t seed = 1337;
  std::string device = "auto";
  bool use_cache = true;  // the expert-selection cache (KV and routing); off recomputes the whole context
};
void add_sample_flags(Flags& f, SampleOptions& o, bool* help);

}  // namespace cm
