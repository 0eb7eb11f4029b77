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
#include "model/config.h"

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
  // lo_open / hi_open: that bound itself is excluded (e.g. lr > 0).
  void add_float(const std::string& name, float* v, double lo, double hi, bool lo_open, const std::string& help,
                 bool hi_open = false);
  void add_u64(const std::string& name, uint64_t* v, const std::string& help);
  void add_string(const std::string& name, std::string* v, const std::string& help, bool allow_empty = false);
  void add_choice(const std::string& name, std::string* v, std::vector<std::string> choices, const std::string& help);
  // Booleans accept 1/0, true/false, on/off, yes/no; a bare `--name` means true. Anything else is an error
  // naming the flag and these words.
  void add_bool(const std::string& name, bool* v, const std::string& help);
  // A string flag that may also appear bare; bare gives `bare_value` (--resume alone = "latest").
  void add_optional(const std::string& name, std::string* v, std::string bare_value, const std::string& help);
  // Anything else: `set` parses and stores (throwing UsageError or cm::Error on bad text), `get` shows.
  void add_custom(const std::string& name, const std::string& range, const std::string& help,
                  std::function<void(const std::string&)> set, std::function<std::string()> get);
  // A flag that no longer exists: using it is an error that says why (`why`), not "unknown flag". It is not
  // listed, not stored, and has() is false for it (a checkpoint that stored it resumes without it).
  void add_retired(const std::string& name, const std::string& why);

  // Split argv into (name, value) pairs: syntax and names are checked, values are not yet.
  std::vector<FlagArg> split(const std::vector<std::string>& args) const;
  // Convert and range-check one value into its field.
  void set(const std::string& name, const std::string& value);
  void apply(const std::vector<FlagArg>& args) {
    for (const auto& a : args) set(a.name, a.value);
  }
  bool has(const std::string& name) const { return find(name) != nullptr; }
  // Names of the flags registered with add_bool, in registration order.
  std::vector<std::string> bool_flags() const;
  // Every flag's name, range and one-line help, in registration order (usage() prints these).
  struct Info {
    std::string name, range, help;
  };
  std::vector<Info> infos() const;
  // Current value of every flag, in registration order, as text that set() reads back exactly.
  std::vector<std::pair<std::string, std::string>> values() const;
  std::string usage() const;

 private:
  struct Spec {
    std::string name, help, range;  // range: for usage ("1..1000000", "dense|flat|...")
    bool is_bool = false;  // registered by add_bool
    bool bare_ok = false;
    std::string bare_value;
    std::function<void(const std::string&)> set;
    std::function<std::string()> get;
  };
  const Spec* find(const std::string& name) const;
  void add(Spec s);
  std::string program_, summary_;
  std::vector<Spec> specs_;
  std::vector<std::pair<std::string, std::string>> retired_;  // name, why
};

// Flags::values(), --help and the start-up table write floats with format_float (model/config.h): the shortest
// text that reads back as the same float (0.001, not 0.00100000005).
// Number parsing that rejects trailing junk, empty text, and out-of-range values; `what` names the flag.
int64_t parse_int(const std::string& text, const std::string& what);
double parse_double(const std::string& text, const std::string& what);

// ---------------------------------------------------------------- train_lm
// Letters as in DESIGN.md: B batch_size, T seq_len, C d_model.
struct TrainOptions {
  // data, files, device
  std::string data;  // "" = the default corpus (data/tinyshakespeare.txt, else the fortunes)
  std::string out_dir = "out";
  std::string device = "auto";  // auto | cpu | cuda
  std::string preset;           // "" = the device's default: cpu on CPU, shakespeare on CUDA
  std::string resume;           // "" = fresh run; "latest" = newest checkpoint in out_dir; else a path
  uint64_t seed = 1337;         // initialisation (model.seed), data order, dropout
  // No --deterministic: every run is bit-reproducible (same seed, device and build: the same losses bit for
  // bit; no floating-point atomics, cuBLAS with atomics off), so there is nothing to switch. The flag is retired:
  // using it is an error that says so (README "Training").
  bool tf32 = false;            // TF32 matrix products on CUDA (opt-in, DESIGN.md section 6)
  bool cuda_graph = false;      // capture the training step once as a CUDA graph and replay it (engine/cuda.h)
  // schedule and optimisation
  int64_t max_steps = 2000;
  int64_t batch_size = 12;  // B: sequences per micro-batch
  int64_t seq_len = 64;     // T: context length (block size); also the model's maximum context
  int64_t grad_accum = 1;   // micro-batches per optimizer step
  float lr = 1e-3f;         // peak learning rate
  float min_lr = 1e-4f;     // cosine floor
  int64_t warmup_steps = 100;
  float weight_decay = 0.1f;
  float beta1 = 0.9f, beta2 = 0.99f;
  float grad_clip = 1.0f;         // global-norm clipping; 0 = off
  bool decay_embeddings = false;  // AdamW decays matrices; embeddings only when asked (norms, biases never)
  // what happens along the way (0 = off)
  int64_t eval_every = 200;
  int64_t eval_iters = 20;  // fixed batches per split per evaluation
  int64_t log_every = 1;
  int64_t sample_every = 1000;
  int64_t sample_len = 200;
  int64_t save_every = 1000;
  int64_t keep_last = 3;  // checkpoints kept in out_dir; 0 = keep all
  int64_t stop_at = 0;    // not a flag: stop after this step as if interrupted (tests of --resume); 0 = never
  // The model. Its seq_len and seed are taken from the fields above when the model is built; vocab_size comes
  // from the data.
  CoEConfig model;

  // Cross-field checks that a single flag's range cannot express; UsageError names the flags.
  void validate() const;
  // The model's config as trained: `model` with seq_len, seed and vocab_size filled in, validated.
  CoEConfig model_config(int64_t vocab_size) const;
};

// "cpu" or "shakespeare": sets the fields of that preset (every one of them also has a flag).
void apply_preset(TrainOptions& o, const std::string& name);

// Registers every train_lm flag on `o`: the training ones, the main model ones (--router, --tree, --d_model,
// ...), and every other CoEConfig key under its own name (--expert gelu, --use_reliability 0, ...).
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
  // Show the routing decisions the cache recorded: "" off; "last" (the bare flag) the last MoE layer; "all"
  // every MoE layer; or a layer number.
  std::string show_routing;
  std::string routing_html = "routing.html";  // with --show_routing: the same as an HTML page here
  std::string color = "auto";                 // auto (ANSI colours when stdout is a terminal) | always | never
};
void add_sample_flags(Flags& f, SampleOptions& o, bool* help);

}  // namespace cm
