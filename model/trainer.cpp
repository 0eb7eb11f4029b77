#include "model/trainer.h"

#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <iostream>
#include <map>
#include <memory>

#include "engine/dispatch.h"
#include "engine/host_sync.h"
#include "kernels/route.h"
#include "model/checkpoint.h"
#include "model/coe.h"
#include "model/data.h"
#include "model/json.h"
#include "model/optim.h"
#include "model/tokenizer.h"

#if CM_CUDA
#include "engine/cuda.h"
#endif

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace cm {

namespace fs = std::filesystem;

static const char* CHECKPOINT_FORMAT = "clustermoe-train/1";

// ---------------------------------------------------------------- random streams
// Each stream is a Philox key derived from the run's seed; positions within a stream are counters (data.h).
enum class Stream : uint64_t { TrainData = 1, EvalTrain = 2, EvalVal = 3 };
static uint64_t stream_seed(uint64_t seed, Stream s) {
  // splitmix64 of (seed, stream): distinct, well-mixed keys for neighbouring seeds.
  uint64_t z = seed + 0x9E3779B97F4A7C15ull * ((uint64_t)s + 1);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

static Json generator_json(const Generator& g) {
  Json j = Json::object();
  j.set("seed", Json::string(std::to_string(g.seed)));
  j.set("offset", Json::string(std::to_string(g.offset)));
  return j;
}
static Generator generator_from(const std::string& text, const std::string& what) {
  Json j;
  try {
    j = json_parse(text);
  } catch (const Error& e) {
    fail(what, ": ", e.what());
  }
  auto u64 = [&](const char* k) {
    const Json* v = j.find(k);
    CM_REQUIRE(v, what, ": missing '", k, "'");
    const std::string& s = v->as_string(what + "." + k);
    errno = 0;
    uint64_t x = std::strtoull(s.c_str(), nullptr, 10);
    CM_REQUIRE(
        !s.empty() && s.size() <= 20 && s.find_first_not_of("0123456789") == std::string::npos && errno != ERANGE, what,
        ".", k, ": expected an unsigned 64-bit integer, got '", s, "'");
    return x;
  };
  return Generator(u64("seed"), u64("offset"));
}
static int64_t meta_int(const SafeTensors& ck, const std::string& key) {
  const std::string& s = ck.require_meta(key);
  CM_REQUIRE(!s.empty() && s.size() <= 18 && s.find_first_not_of("0123456789") == std::string::npos, ck.path,
             ": metadata '", key, "' is not a non-negative integer: '", s, "'");
  return std::stoll(s);
}

// ---------------------------------------------------------------- options
// The settings a checkpoint stores: every flag's value, as set() reads it back (help and resume excluded).
static std::vector<std::pair<std::string, std::string>> flag_values(const TrainOptions& o) {
  TrainOptions copy = o;
  bool help = false;
  Flags f("train_lm", "");
  add_train_flags(f, copy, &help);
  std::vector<std::pair<std::string, std::string>> out;
  for (auto& kv : f.values())
    if (kv.first != "help" && kv.first != "resume") out.push_back(kv);
  return out;
}

static std::string resolve_resume_path(const std::string& resume, const std::string& out_dir) {
  std::error_code ec;
  if (resume == "latest" || fs::is_directory(resume, ec)) {
    std::string dir = resume == "latest" ? out_dir : resume;
    std::string p = latest_checkpoint(dir);
    CM_REQUIRE(!p.empty(), "--resume: no checkpoint (ckpt_*.safetensors) in ", dir);
    return p;
  }
  CM_REQUIRE(fs::exists(resume, ec), "--resume: checkpoint not found: ", resume);
  return resume;
}

// "auto": CUDA when this build has it and a device answers, else the CPU (and a note says why); "cuda" without a
// usable device is an error naming the reason.
static Device resolve_device(const std::string& name, std::string* note) {
  if (name == "cuda") {
    require_device(Device::CUDA);
    return Device::CUDA;
  }
  if (name == "auto") {
    if (cuda_available()) return Device::CUDA;
#if CM_CUDA
    *note = "no CUDA device answers: training on the CPU";
#else
    *note = "this build has no CUDA (no nvcc at make time): training on the CPU";
#endif
  }
  return Device::CPU;
}

static TrainOptions resolve_train_flags(const std::vector<std::string>& args, bool* help);

// The usage text; formatted only when it is shown (--help, a flag error): with every model key it costs more than
// the rest of the flag parsing. It shows what a run here gets: the defaults under this device's default preset.
static std::string train_usage() {
  TrainOptions shown;
  std::string note;
  const char* preset = resolve_device("auto", &note) == Device::CUDA ? "shakespeare" : "cpu";
  apply_preset(shown, preset);
  shown.preset.clear();
  bool unused = false;
  Flags fs("train_lm", str("Trains a ClusterMoE byte-level language model. Defaults below: the ", preset,
                           " preset, the default on this machine (", preset == std::string("cpu") ? "no " : "a ",
                           "CUDA device)."));
  add_train_flags(fs, shown, &unused);
  return fs.usage();
}

TrainOptions resolve_train_args(const std::vector<std::string>& args, bool* help, std::string* usage) {
  try {
    TrainOptions o = resolve_train_flags(args, help);
    if (*help && usage) *usage = train_usage();
    return o;
  } catch (const UsageError&) {
    if (usage) *usage = train_usage();
    throw;
  }
}

static TrainOptions resolve_train_flags(const std::vector<std::string>& args, bool* help) {
  TrainOptions o;
  Flags f("train_lm", "Trains a ClusterMoE byte-level language model.");
  add_train_flags(f, o, help);
  std::vector<FlagArg> given = f.split(args);
  std::map<std::string, std::string> last;  // the last value of each flag given
  for (const auto& a : given) last[a.name] = a.value;
  if (last.count("help")) {
    f.set("help", last["help"]);
    if (*help) return o;
  }
  if (last.count("resume")) {
    // Continue the same run: the checkpoint's settings, then any flags given now (e.g. a larger --max_steps).
    if (last.count("out_dir")) f.set("out_dir", last["out_dir"]);
    std::string path = resolve_resume_path(last["resume"].empty() ? "latest" : last["resume"], o.out_dir);
    Metadata meta = read_safetensors_metadata(path);
    const std::string* stored = nullptr;
    for (const auto& kv : meta)
      if (kv.first == "train_options") stored = &kv.second;
    CM_REQUIRE(stored, path, ": not a train_lm checkpoint (no train_options in its metadata)");
    Json j;
    try {
      j = json_parse(*stored);
    } catch (const Error& e) {
      fail(path, ": corrupt train_options: ", e.what());
    }
    CM_REQUIRE(j.is(Json::Kind::Object), path, ": corrupt train_options");
    for (const auto& kv : j.obj) {
      if (!f.has(kv.first)) continue;  // a setting this build no longer has
      try {
        f.set(kv.first, kv.second.as_string(kv.first));
      } catch (const Error& e) {
        fail(path, ": stored setting ", kv.first, ": ", e.what());
      }
    }
    if (last.count("preset")) apply_preset(o, last["preset"]);
    f.apply(given);
    o.resume = path;
  } else {
    if (last.count("device")) f.set("device", last["device"]);
    std::string note;
    Device dev = resolve_device(o.device, &note);
    apply_preset(o, last.count("preset") ? last["preset"] : dev == Device::CUDA ? "shakespeare" : "cpu");
    f.apply(given);
  }
  o.validate();
  return o;
}

double train_flops_per_token(int64_t active_params, int64_t n_layers, int64_t seq_len, int64_t d_model) {
  return 6.0 * (double)active_params + 12.0 * (double)n_layers * (double)seq_len * (double)d_model;
}

// ---------------------------------------------------------------- the run
namespace {

// Routed slots per expert of each MoE layer, summed over the training forwards since the last evaluation: exact
// counts. A training step adds its forwards' counts where they were made (LayerRoutingStats::routed and rows, on the
// model's device) into int64 sums there, and reads nothing; fold() brings the sums into the host's doubles (one
// read-out for all layers), at evaluation and checkpoint time.
struct RoutingTally {
  std::vector<int64_t> layers;             // MoE layer indices
  std::vector<std::vector<double>> slots;  // [layers][N] as of the last fold
  std::vector<double> dropped, total;      // [layers]
  // [layers] since the last fold: int64 [2N] in i32 words [4N] on the device, the routed slots then the computed rows
  // of each expert (undefined: 0); and the slots those forwards routed (host arithmetic).
  std::vector<Tensor> pending;
  std::vector<int64_t> pending_slots;

  void add(const CoEOutput& out) {
    size_t li = 0;
    for (const auto& l : out.layers) {
      if (!l.moe) continue;
      const int64_t N = l.num_experts;
      if (li == layers.size()) {
        layers.push_back(l.layer);
        slots.emplace_back((size_t)N, 0.0);
        dropped.push_back(0);
        total.push_back(0);
      }
      pending.resize(layers.size());
      pending_slots.resize(layers.size(), 0);
      const Device dev = l.routed.device();
      Tensor& acc = pending[li];
      if (!acc.defined()) acc = Tensor::zeros({4 * N}, DType::I32, dev);
      int64_t* sums = static_cast<int64_t*>(acc.raw());
      CM_KERNEL(dev, route_counts_add, sums, l.routed.contiguous().i32(), N);
      CM_KERNEL(dev, route_counts_add, sums + N, l.rows.contiguous().i32(), N);
      pending_slots[li] += l.slots;
      ++li;
    }
  }
  void fold() {
    if (pending.empty()) return;
    Device dev = Device::CPU;
    for (const Tensor& t : pending)
      if (t.defined()) dev = t.device();
    const std::vector<std::vector<int32_t>> words = read_out_words(pending, dev);
    for (size_t li = 0; li < pending.size(); ++li) {
      if (words[li].empty()) continue;
      const size_t N = slots[li].size();
      std::vector<int64_t> c(2 * N);
      std::memcpy(c.data(), words[li].data(), 2 * N * 8);
      int64_t kept = 0;
      for (size_t e = 0; e < N; ++e) {
        slots[li][e] += (double)c[e];
        kept += c[N + e];
      }
      dropped[li] += (double)(pending_slots[li] - kept);
      total[li] += (double)pending_slots[li];
      pending[li] = Tensor();
      pending_slots[li] = 0;
    }
  }
  void reset() {
    fold();  // nothing of the past interval is left on the device
    for (auto& s : slots) std::fill(s.begin(), s.end(), 0.0);
    std::fill(dropped.begin(), dropped.end(), 0.0);
    std::fill(total.begin(), total.end(), 0.0);
  }

  // Checkpoint metadata "routing_tally": the counts since the last evaluation travel with the checkpoint, so that
  // a run resumed between two evaluations writes the same routing.csv rows as the uninterrupted run.
  // {"layers": ["1", ...], "slots": [["12", ...], ...], "dropped": [...], "total": [...]}; numbers as "%.17g"
  // strings (exact round trip of the doubles), integer counts. Folds first (a read-out).
  std::string to_json() {
    fold();
    auto num = [](double v) {
      char b[40];
      std::snprintf(b, sizeof b, "%.17g", v);
      return Json::string(b);
    };
    auto list = [&](const std::vector<double>& v) {
      Json a = Json::array();
      for (double x : v) a.push(num(x));
      return a;
    };
    Json j = Json::object(), l = Json::array(), s = Json::array();
    for (int64_t x : layers) l.push(Json::string(std::to_string(x)));
    for (const auto& v : slots) s.push(list(v));
    j.set("layers", l);
    j.set("slots", s);
    j.set("dropped", list(dropped));
    j.set("total", list(total));
    return json_dump(j);
  }
  static RoutingTally from_json(const std::string& text, const std::string& what) {
    Json j;
    try {
      j = json_parse(text);
    } catch (const Error& e) {
      fail(what, ": ", e.what());
    }
    auto arr = [&](const Json* v, const char* k) -> const std::vector<Json>& {
      CM_REQUIRE(v && v->is(Json::Kind::Array), what, ": '", k, "' must be a list");
      return v->arr;
    };
    auto num = [&](const Json& v) {
      const std::string& t = v.as_string(what);
      char* end = nullptr;
      double x = std::strtod(t.c_str(), &end);
      CM_REQUIRE(!t.empty() && *end == '\0' && std::isfinite(x) && x >= 0, what, ": expected a count, got '", t, "'");
      return x;
    };
    RoutingTally r;
    const auto& l = arr(j.find("layers"), "layers");
    const auto& s = arr(j.find("slots"), "slots");
    const auto& d = arr(j.find("dropped"), "dropped");
    const auto& t = arr(j.find("total"), "total");
    CM_REQUIRE(s.size() == l.size() && d.size() == l.size() && t.size() == l.size(), what,
               ": layers, slots, dropped and total must have one entry per layer");
    for (size_t i = 0; i < l.size(); ++i) {
      r.layers.push_back((int64_t)num(l[i]));
      r.slots.emplace_back();
      for (const Json& x : arr(&s[i], "slots")) r.slots.back().push_back(num(x));
      r.dropped.push_back(num(d[i]));
      r.total.push_back(num(t[i]));
    }
    return r;
  }
};

// layer_{l}_cluster_{c}_expert_{e}_reliability -> per-expert values of layer l in (c, e) order.
std::vector<double> expert_reliability(const std::map<std::string, float>& stats, int64_t layer) {
  std::vector<std::pair<std::pair<long, long>, double>> found;
  std::string pre = str("layer_", layer, "_cluster_");
  for (const auto& kv : stats) {
    if (kv.first.compare(0, pre.size(), pre) != 0) continue;
    long c = -1, e = -1;
    char tail[32] = {0};
    if (std::sscanf(kv.first.c_str() + pre.size(), "%ld_expert_%ld_%31s", &c, &e, tail) == 3 &&
        std::string(tail) == "reliability")
      found.push_back({{c, e}, kv.second});
  }
  std::sort(found.begin(), found.end());
  std::vector<double> r;
  for (const auto& f : found) r.push_back(f.second);
  return r;
}

double evaluate(ClusterMoELM& model, const TextDataset& ds, Split split, int64_t iters, int64_t B, uint64_t seed,
                Device dev) {
  NoGrad ng;
  bool was_training = model.training();
  model.eval();
  Generator g(seed, 0);  // the same windows at every evaluation: curves compare like with like
  double sum = 0;
  for (int64_t i = 0; i < iters; ++i) {
    auto xy = ds.batch(split, B, g, dev);
    sum += model.forward(xy.first, xy.second).loss.item();
  }
  model.train(was_training);
  return sum / (double)iters;
}

NamedTensors checkpoint_tensors(const ClusterMoELM& model, const AdamW& opt) {
  NamedTensors all = model.named_parameters();
  for (auto& kv : model.named_buffers()) all.push_back(kv);
  for (auto& kv : opt.state()) all.emplace_back("adamw." + kv.first, kv.second);
  return all;
}

std::string fmt(const char* f, double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, f, v);
  return buf;
}

}  // namespace

TrainResult train(const TrainOptions& o_in, std::ostream& out) {
  TrainOptions o = o_in;
  o.validate();
  TrainResult res;

  // ---- device
  std::string device_note;
  const Device dev = resolve_device(o.device, &device_note);
  res.device = device_name(dev);
  if (o.cuda_graph) {
    CM_REQUIRE(dev == Device::CUDA, "--cuda_graph captures the training step's CUDA work: it needs --device cuda ",
               "(this run is on the ", device_name(dev), ")");
    // A step that waits for the host cannot be recorded (engine/cuda.h, Graph: the capture throws, naming the wait).
    // No training step waits: every model's routing and bookkeeping stay on the device.
  }

  // ---- checkpoint to resume (read and checked in full before anything in out_dir is touched)
  SafeTensors ck;
  const bool resuming = !o.resume.empty();
  if (resuming) {
    o.resume = resolve_resume_path(o.resume, o.out_dir);
    ck = load_safetensors(o.resume);
    CM_REQUIRE(ck.require_meta("format") == CHECKPOINT_FORMAT, o.resume, ": unknown checkpoint format '",
               ck.require_meta("format"), "' (expected ", CHECKPOINT_FORMAT, ")");
  } else {
    std::string old = latest_checkpoint(o.out_dir);
    CM_REQUIRE(old.empty(), "out_dir ", o.out_dir, " already holds checkpoints of another run (newest: ", old,
               "). Continue it with --resume, or pick another --out_dir (or delete them).");
  }

  // ---- data
  Corpus corpus = o.data.empty() ? default_corpus() : read_corpus(o.data);
  ByteTokenizer tok =
      resuming ? ByteTokenizer::from_hex(ck.require_meta("tokenizer")) : ByteTokenizer::from_corpus(corpus.bytes);
  TextDataset ds(corpus.bytes, tok, o.seq_len);

  // ---- model and optimizer
  CoEConfig cfg = o.model_config(tok.vocab_size());
  ClusterMoELM model(cfg);
  model.to(dev);  // before the optimizer: its moments are made where the parameters live
  model.train();
  model.set_router_entropy(false);  // a statistic this trainer reports nowhere: no pass computes it
#if CM_CUDA
  // The matmul precision is process-wide: put it back when this run ends, however it ends, so that whatever runs
  // next in the process (another run, sampling, the parity tests) is not left on TF32 by this one's --tf32.
  struct RestorePrecision {
    cuda::MatmulPrecision saved = cuda::matmul_precision();
    ~RestorePrecision() { cuda::set_matmul_precision(saved); }
  } restore_precision;
  if (dev == Device::CUDA)
    cuda::set_matmul_precision(o.tf32 ? cuda::MatmulPrecision::TF32 : cuda::MatmulPrecision::FP32);
#endif
  NamedTensors params = model.named_parameters();
  AdamWOptions ao;
  ao.lr = o.lr;
  ao.beta1 = o.beta1;
  ao.beta2 = o.beta2;
  ao.weight_decay = o.weight_decay;
  ao.step_sums = true;  // the experts' health checks take the weight and gradient norms from the step (FreshSums)
  if (o.decay_embeddings) ao.no_decay = [](const std::string&, const Tensor& p) { return p.dim() < 2; };
  AdamW opt(params, ao);
  LRSchedule sched{o.lr, o.min_lr, o.warmup_steps, o.max_steps};
  Generator data_gen(stream_seed(o.seed, Stream::TrainData), 0);

  RoutingTally tally;
  int64_t step = 0;
  if (resuming) {
    if (const std::string* t = ck.meta("routing_tally"))  // absent in checkpoints of older builds: start empty
      tally = RoutingTally::from_json(*t, ck.path + ": routing_tally");
    restore_tensors(ck, checkpoint_tensors(model, opt));
    step = meta_int(ck, "step");
    opt.set_step_count(meta_int(ck, "adamw_step"));
    data_gen = generator_from(ck.require_meta("data_rng"), ck.path + ": data_rng");
    model.rng() = generator_from(ck.require_meta("dropout_rng"), ck.path + ": dropout_rng");
    CM_REQUIRE(model.step() == step, ck.path, ": the model's step buffer says ", model.step(),
               " but the metadata says ", step);
    ck = SafeTensors();  // free the copies
  }
  res.start_step = step;
  res.final_step = step;

  // ---- start-up tables
  ModelSummary summary = model.get_model_summary();
  {
    std::map<std::string, std::string> model_map = cfg.to_map();
    std::vector<std::pair<std::string, std::string>> train_rows;
    for (auto& kv : flag_values(o))
      if (!model_map.count(kv.first) && kv.first != "tree")
        train_rows.push_back({kv.first, kv.first == "data" && kv.second.empty() ? "(default corpus)" : kv.second});
    if (resuming) train_rows.push_back({"resume", o.resume});
    print_table(out, "training", train_rows);
    std::vector<std::pair<std::string, std::string>> model_rows;
    for (const auto& kv : model_map) model_rows.push_back(kv);  // floats already in their shortest exact form
    print_table(out, "model (CoEConfig)", model_rows);
    int threads = 1;
#if defined(_OPENMP)
    threads = omp_get_max_threads();
#endif
    const int64_t tokens_per_step = o.batch_size * o.seq_len * o.grad_accum;
    std::vector<std::pair<std::string, std::string>> run = {
        {"device", str(device_name(dev), dev == Device::CPU ? str(" (", threads, " OpenMP threads)") : "")},
        {"parameters", with_commas(summary.total_params)},
        {"  active per token", with_commas(summary.active_params_per_token)},
        {"  in experts", with_commas(summary.expert_params)},
        {"experts", summary.num_moe_layers == 0 ? std::string("none (dense FFN)")
                                                : str(summary.num_moe_layers, " MoE layers x ", summary.num_experts,
                                                      " (", summary.experts_per_token, " per token)")},
        {"corpus", corpus.source},
        {"  bytes", with_commas((int64_t)corpus.bytes.size())},
        {"  vocabulary", str(tok.vocab_size(), " bytes")},
        {"  train / val tokens", str(with_commas(ds.size(Split::Train)), " / ", with_commas(ds.size(Split::Val)))},
        {"tokens per step", with_commas(tokens_per_step)},
        {"out_dir", o.out_dir},
    };
    if (resuming) run.push_back({"resumed at step", std::to_string(step)});
    print_table(out, "run", run);
    if (!device_note.empty()) out << "note: " << device_note << "\n";
    if (!corpus.note.empty()) out << "note: " << corpus.note << "\n";
    out.flush();
  }

  // ---- files (only now: a failed resume above leaves out_dir as it was)
  RunReport report(o.out_dir, resuming ? step : -1);
  const std::map<std::string, std::string> cfg_map = cfg.to_map();
  Json cfg_json = Json::object(), opts_json = Json::object(), sched_json = Json::object();
  for (const auto& kv : cfg_map) cfg_json.set(kv.first, Json::string(kv.second));
  for (const auto& kv : flag_values(o)) opts_json.set(kv.first, Json::string(kv.second));
  sched_json.set("max_lr", Json::string(format_float(sched.max_lr)));
  sched_json.set("min_lr", Json::string(format_float(sched.min_lr)));
  sched_json.set("warmup_steps", Json::number(sched.warmup_steps));
  sched_json.set("total_steps", Json::number(sched.total_steps));

  auto save = [&](int64_t s) {
    Metadata md = {
        {"format", CHECKPOINT_FORMAT},
        {"step", std::to_string(s)},
        {"adamw_step", std::to_string(opt.step_count())},
        {"config", json_dump(cfg_json)},
        {"train_options", json_dump(opts_json)},
        {"tokenizer", tok.to_hex()},
        {"data_rng", json_dump(generator_json(data_gen))},
        {"dropout_rng", json_dump(generator_json(model.rng()))},
        {"schedule", json_dump(sched_json)},
        {"corpus", corpus.source},
        {"routing_tally", tally.to_json()},
    };
    fs::create_directories(o.out_dir);
    std::string path = checkpoint_path(o.out_dir, s);
    save_safetensors(path, checkpoint_tensors(model, opt), md);
    prune_checkpoints(o.out_dir, o.keep_last);
    res.last_checkpoint = path;
    out << "saved " << path << "\n";
  };

  const int64_t N = cfg.router == RouterKind::Dense ? 1 : cfg.num_experts();
  const int64_t per_cluster = N / std::max<int64_t>(1, cfg.branching().front());

  auto do_eval = [&](int64_t s) {
    auto t0 = std::chrono::steady_clock::now();
    // Routing of the training forwards since the last evaluation (eval forwards are not counted).
    tally.fold();
    std::vector<LayerRouting> routing;
    std::map<std::string, float> rel = model.get_reliability_stats();
    for (size_t li = 0; li < tally.layers.size(); ++li) {
      LayerRouting l;
      l.layer = tally.layers[li];
      l.experts_per_cluster = std::max<int64_t>(1, per_cluster);
      l.tokens = tally.slots[li];
      double tot = tally.total[li];
      for (double t : l.tokens) l.share.push_back(tot > 0 ? t / tot : 0.0);
      l.dropped_fraction = tot > 0 ? tally.dropped[li] / tot : 0.0;
      l.reliability = expert_reliability(rel, l.layer);
      auto it = rel.find(str("layer_", l.layer, "_reliability"));
      l.mean_reliability = it != rel.end() ? it->second : 1.0;
      if (tot > 0) routing.push_back(l);
    }
    double tr =
        evaluate(model, ds, Split::Train, o.eval_iters, o.batch_size, stream_seed(o.seed, Stream::EvalTrain), dev);
    double va = evaluate(model, ds, Split::Val, o.eval_iters, o.batch_size, stream_seed(o.seed, Stream::EvalVal), dev);
    double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    char line[160];
    std::snprintf(line, sizeof line, "eval step %lld | train loss %.4f | val loss %.4f | %.1fs\n", (long long)s, tr, va,
                  secs);
    out << line;
    print_routing_summary(out, routing);
    EvalRecord er{s, tr, va};
    report.add_eval(er, routing);
    report.write_svg();
    res.evals.push_back(er);
    tally.reset();
    model.reset_metrics();
    CM_REQUIRE(std::isfinite(tr) && std::isfinite(va), "evaluation loss is not finite at step ", s, " (train ", tr,
               ", val ", va, "): training stopped");
  };
  auto do_sample = [&](int64_t s) {
    std::vector<int32_t> prompt = {tok.has('\n') ? tok.encode("\n")[0] : 0};
    std::vector<int32_t> ids = model.generate(prompt, o.sample_len, 0.8f, 0, o.seed + (uint64_t)s, true);
    if (ids.size() > (size_t)o.sample_len) ids.erase(ids.begin(), ids.begin() + (ids.size() - o.sample_len));
    out << "---- sample at step " << s << " ----\n" << tok.decode(ids) << "\n----\n";
  };
  auto is_boundary = [&](int64_t s) {
    const bool last = s == o.max_steps;
    return (o.eval_every > 0 && (s % o.eval_every == 0 || last)) ||
           (o.sample_every > 0 && s > 0 && (s % o.sample_every == 0 || last)) ||
           (o.save_every > 0 && s > 0 && (s % o.save_every == 0 || last));
  };
  auto at_boundary = [&](int64_t s) {
    bool last = s == o.max_steps;
    if (o.eval_every > 0 && (s % o.eval_every == 0 || last)) do_eval(s);
    if (o.sample_every > 0 && s > 0 && (s % o.sample_every == 0 || last)) do_sample(s);
    if (o.save_every > 0 && s > 0 && (s % o.save_every == 0 || last)) save(s);
    out.flush();
  };

  if (!resuming) at_boundary(0);
  if (step >= o.max_steps)
    out << "nothing to do: the checkpoint is at step " << step << ", --max_steps is " << o.max_steps << "\n";

  const double tokens_per_step = (double)(o.batch_size * o.seq_len * o.grad_accum);
  const double flops_per_step =
      train_flops_per_token(summary.active_params_per_token, cfg.n_layers, o.seq_len, cfg.d_model) * tokens_per_step;
  double ema_ms = -1;
  // A step's loss, aux loss and gradient norm stay where they were computed until a step logs or reaches a
  // boundary: then every pending step's values come back in one read-out (a device step does not wait for the
  // host otherwise; at most 64 steps wait). The checks on them (a non-finite loss stops training, naming its step; a non-finite norm
  // skipped the update, which AdamW decided on the device) run at that point.
  struct Pending {
    int64_t step;
    float lr;
    std::vector<Tensor> losses, auxes;  // [1] per micro-batch (aux: undefined when the model has none)
    Tensor norm;                        // [1]
  };
  std::vector<Pending> pending;
  StepRecord last{};
  // A step's time: the pending steps' interval, from the first one's start to their read-out, shared evenly. A
  // device step that waits for nothing returns once its work is queued, so its own host time is not its cost: the
  // read-out waits for all of it. (On the CPU every step runs where it is timed; the share is their mean.)
  auto interval_start = std::chrono::steady_clock::now();
  auto flush = [&] {
    if (pending.empty()) return;
    std::vector<Tensor> parts;
    for (const Pending& p : pending) {
      for (const Tensor& t : p.losses) parts.push_back(t);
      for (const Tensor& t : p.auxes)
        if (t.defined()) parts.push_back(t);
      parts.push_back(p.norm);
    }
    const std::vector<float> v = (parts.size() == 1 ? parts[0] : concat(parts, 0)).to_f32_vector();
    const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - interval_start)
                          .count() / (double)pending.size();
    size_t at = 0;
    for (const Pending& p : pending) {
      ema_ms = ema_ms < 0 ? ms : 0.9 * ema_ms + 0.1 * ms;
      double loss = 0, aux = 0;
      for (size_t i = 0; i < p.losses.size(); ++i) loss += v[at++] / (double)o.grad_accum;
      for (const Tensor& t : p.auxes) aux += (t.defined() ? v[at++] : 0.0) / (double)o.grad_accum;
      const float norm = v[at++];
      CM_REQUIRE(std::isfinite(loss) && std::isfinite(aux), "loss is ", loss, " (aux ", aux, ") at step ", p.step,
                 ": training stopped",
                 res.last_checkpoint.empty() ? std::string() : ". Last checkpoint: " + res.last_checkpoint,
                 ". A lower --lr or a --grad_clip may help.");
      if (!std::isfinite(norm)) out << "step " << p.step << ": gradient norm is " << norm << ", update skipped\n";
      res.step_losses.push_back(loss);
      last = {p.step, loss, aux, p.lr, norm, ms, tokens_per_step / (ms / 1000.0)};
      report.add_step(last);
    }
    pending.clear();
  };
  // One training step's work, from batches on the model's device to the gradients dropped: what --cuda_graph
  // captures. The batches' values are read where `inputs` point (the captured input buffers, with a graph).
  auto run_step = [&](const std::vector<std::pair<Tensor, Tensor>>& inputs, Pending& pd, std::vector<CoEOutput>& fws) {
    for (int64_t micro = 0; micro < o.grad_accum; ++micro) {
      CoEOutput fw = model.forward(inputs[(size_t)micro].first, inputs[(size_t)micro].second);
      // Scale before backward: accumulated gradients are then the mean over micro-batches, as one big batch.
      Tensor l = o.grad_accum > 1 ? mul(fw.total_loss, 1.0f / (float)o.grad_accum) : fw.total_loss;
      l.backward();
      pd.losses.push_back(fw.loss.detach().reshape({1}));
      pd.auxes.push_back(fw.aux_loss.defined() ? fw.aux_loss.detach().reshape({1}) : Tensor());
      fws.push_back(std::move(fw));
    }
    // The norm stays where the gradients are; a non-finite one makes AdamW skip the update there.
    pd.norm = clip_grad_norm_tensor(params, o.grad_clip);
    opt.step_prepared(pd.norm);  // after opt.prepare(lr): the learning rate and step count are read on the device
    {
      FreshSums fresh(opt);  // CPU: the step's own sums of squares of the weights and gradients (model/optim.h)
      model.after_step();
    }
    opt.zero_grad();
  };
#if CM_CUDA
  // --cuda_graph: the first step runs as usual (it makes what the model creates on first use: the health copies,
  // rope tables, the optimizer's device values); the second is captured, then launched; every later step writes
  // its batches into the captured input buffers, its learning rate and step count where AdamW reads them
  // (AdamW::prepare), and replays it. The host's share of after_step() (the step count) runs beside each replay.
  // What the capture computed stays in its buffers and is overwritten by each replay: copied out per step.
  std::unique_ptr<cuda::Graph> graph;
  std::vector<std::pair<Tensor, Tensor>> graph_inputs;  // [grad_accum] (x, y) i32 [B, T] on the device
  Pending graph_out;                                    // the captured step's losses, aux losses and norm
  std::vector<CoEOutput> graph_fws;                     // its forwards (routing statistics for the tally)
  auto copy_out = [](const Tensor& t) {
    if (!t.defined()) return t;
    Tensor c = Tensor::empty(t.shape(), t.dtype(), t.device());
    c.copy_(t);  // device to device, queued after the replay: no wait
    return c;
  };
#endif
  while (step < o.max_steps) {
    if (pending.empty()) interval_start = std::chrono::steady_clock::now();  // evaluations and saves left out
    const int64_t syncs0 = host_sync_stats().stream_syncs;
    const float lr = lr_at(step, sched);
    Pending pd{step + 1, lr, {}, {}, Tensor()};
    std::vector<std::pair<Tensor, Tensor>> batches;
    for (int64_t micro = 0; micro < o.grad_accum; ++micro)
      batches.push_back(ds.batch(Split::Train, o.batch_size, data_gen, dev));
    opt.prepare(lr);
    const bool replay = o.cuda_graph && step > res.start_step;  // the run's first step runs eagerly
    if (!replay) {
      std::vector<CoEOutput> fws;
      run_step(batches, pd, fws);
      for (const CoEOutput& fw : fws) tally.add(fw);
    } else {
#if CM_CUDA
      if (!graph) {
        for (const auto& b : batches) graph_inputs.push_back({b.first.clone(), b.second.clone()});
        graph = std::make_unique<cuda::Graph>();
        graph->bind_generator(&model.rng());  // dropout draws fresh masks at every replay
        graph->capture_begin();
        try {
          run_step(graph_inputs, graph_out, graph_fws);
          graph->capture_end();
        } catch (const Error& e) {
          graph->capture_abort();
          fail("--cuda_graph: the training step cannot be captured as a CUDA graph: ", e.what());
        }
      } else {
        for (size_t i = 0; i < batches.size(); ++i) {
          graph_inputs[i].first.copy_(batches[i].first);  // device to device, before the replay in stream order
          graph_inputs[i].second.copy_(batches[i].second);
        }
        model.after_replayed_step();
      }
      graph->replay();
      for (size_t i = 0; i < graph_out.losses.size(); ++i) {
        pd.losses.push_back(copy_out(graph_out.losses[i]));
        pd.auxes.push_back(copy_out(graph_out.auxes[i]));
      }
      pd.norm = copy_out(graph_out.norm);
      for (const CoEOutput& fw : graph_fws) tally.add(fw);
#endif
    }
    ++step;
    res.final_step = step;

    pending.push_back(std::move(pd));
    const bool logs = o.log_every > 0 && (step % o.log_every == 0 || step == o.max_steps);
    // At most 64 steps stay pending (a run that never logs still stops soon after a non-finite loss).
    const bool quiet = !logs && !is_boundary(step) && !(o.stop_at > 0 && step >= o.stop_at) && pending.size() < 64;
    if (quiet) {  // what a quiet step waited for is the step's own cost
      res.quiet_steps++;
      res.quiet_step_syncs += host_sync_stats().stream_syncs - syncs0;
      continue;
    }
    flush();
    if (logs) {
      std::string mfu;
      if (dev == Device::CUDA) {
        // H100 SXM dense peaks: 67 TFLOP/s fp32, 495 TFLOP/s TF32.
        double peak = o.tf32 ? 494.7e12 : 66.9e12;
        mfu = fmt(" | MFU %.1f%%", 100.0 * flops_per_step / (last.ms / 1000.0) / peak);
      }
      char line[256];
      std::snprintf(line, sizeof line,
                    "step %lld/%lld | loss %.4f | aux %.4f | lr %.2e | norm %.3f | %.1f ms | %.0f tok/s%s | ETA %s\n",
                    (long long)step, (long long)o.max_steps, last.loss, last.aux, lr, last.grad_norm, last.ms,
                    last.tok_per_s, mfu.c_str(),
                    format_duration(ema_ms / 1000.0 * (double)(o.max_steps - step)).c_str());
      out << line;
    }
    at_boundary(step);
    if (o.stop_at > 0 && step >= o.stop_at) break;
  }
  flush();  // nothing is pending here (the last step always flushes); kept for safety
  return res;
}

// ---------------------------------------------------------------- programs
void reexec_with_passive_openmp(char** argv) {
#if defined(_OPENMP)
  if (std::getenv("OMP_WAIT_POLICY") || std::getenv("GOMP_SPINCOUNT")) return;
  if (::setenv("OMP_WAIT_POLICY", "passive", 1) != 0) return;
  ::execv("/proc/self/exe", argv);  // returns only on failure: then run as we are
  ::unsetenv("OMP_WAIT_POLICY");
#else
  (void)argv;
#endif
}

int run_train_lm(const std::vector<std::string>& args, std::ostream& out, std::ostream& err) {
  std::string usage;
  try {
    bool help = false;
    TrainOptions o = resolve_train_args(args, &help, &usage);
    if (help) {
      out << usage;
      return 0;
    }
    TrainResult r = train(o, out);
    if (!r.evals.empty())
      out << "done: step " << r.final_step << " | val loss " << fmt("%.4f", r.evals.back().val_loss)
          << " | host syncs/step " << fmt("%.4g", r.host_syncs_per_step()) << "\n";
    return 0;
  } catch (const UsageError& e) {
    err << "train_lm: " << e.what() << "\n\n" << usage;
    return 2;
  } catch (const Error& e) {
    err << "train_lm: " << e.what() << "\n";
    return 2;
  } catch (const std::exception& e) {  // out of memory, filesystem errors: still a message, never a crash
    err << "train_lm: " << e.what() << "\n";
    return 1;
  }
}

// The layers --show_routing asks for (empty: off). Every bad value is a UsageError naming it.
static std::vector<int64_t> routing_layers(const SampleOptions& o, const CoEConfig& cfg) {
  if (o.show_routing.empty()) return {};
  if (!o.use_cache)
    throw UsageError("--show_routing reads the routing decisions from the expert-selection cache: drop --cache 0");
  std::vector<int64_t> moe;
  for (int64_t l = 0; l < cfg.n_layers; ++l)
    if (cfg.is_moe_layer(l)) moe.push_back(l);
  if (moe.empty())
    throw UsageError(str("--show_routing: this model has no MoE layer (router ", router_kind_name(cfg.router), ")"));
  std::string list;
  for (int64_t l : moe) list += (list.empty() ? "" : ", ") + std::to_string(l);
  if (o.show_routing == "last") return {moe.back()};
  if (o.show_routing == "all") return moe;
  int64_t l = -1;
  try {
    l = parse_int(o.show_routing, "--show_routing");
  } catch (const Error&) {
    throw UsageError(str("--show_routing must be last, all or an MoE layer (", list, "), got '", o.show_routing, "'"));
  }
  if (std::find(moe.begin(), moe.end(), l) == moe.end())
    throw UsageError(str("--show_routing ", l, ": not an MoE layer of this model (MoE layers: ", list, ")"));
  return {l};
}

int run_sample(const std::vector<std::string>& args, std::ostream& out, std::ostream& err) {
  SampleOptions o;
  bool help = false;
  Flags f("sample", "Continues --prompt with a model trained by train_lm.");
  add_sample_flags(f, o, &help);
  try {
    f.apply(f.split(args));
    if (help) {
      out << f.usage();
      return 0;
    }
    std::string note;
    const Device dev = resolve_device(o.device, &note);
    if (o.ckpt.empty()) {
      o.ckpt = latest_checkpoint(o.out_dir);
      CM_REQUIRE(!o.ckpt.empty(), "no checkpoint in ", o.out_dir, ": train one with ./train_lm, or pass --ckpt PATH");
    }
    SafeTensors ck = load_safetensors(o.ckpt);
    Json cj;
    try {
      cj = json_parse(ck.require_meta("config"));
    } catch (const Error& e) {
      fail(o.ckpt, ": corrupt config: ", e.what());
    }
    CM_REQUIRE(cj.is(Json::Kind::Object), o.ckpt, ": corrupt config");
    std::map<std::string, std::string> cmap;
    for (const auto& kv : cj.obj) cmap[kv.first] = kv.second.as_string(o.ckpt + ": config." + kv.first);
    CoEConfig cfg;
    try {
      cfg = CoEConfig::from_map(cmap);
    } catch (const Error& e) {
      fail(o.ckpt, ": stored config: ", e.what());
    }
    ByteTokenizer tok = ByteTokenizer::from_hex(ck.require_meta("tokenizer"));
    CM_REQUIRE(tok.vocab_size() == cfg.vocab_size, o.ckpt, ": the tokenizer has ", tok.vocab_size(),
               " bytes but the model's vocab_size is ", cfg.vocab_size);
    ClusterMoELM model(cfg);
    NamedTensors state = model.named_parameters();
    for (auto& kv : model.named_buffers()) state.push_back(kv);
    restore_tensors(ck, state, "adamw.");  // the optimizer's moments are for resuming, not for sampling
    ck = SafeTensors();
    model.to(dev);

    CM_REQUIRE(!o.prompt.empty(), "--prompt: give at least one character to continue");
    const std::vector<int64_t> shown = routing_layers(o, cfg);  // checked before the work
    std::vector<int32_t> prompt = tok.encode(o.prompt);
    GenerationRouting routing;
    auto t0 = std::chrono::steady_clock::now();
    std::vector<int32_t> ids = model.generate(prompt, o.max_new_tokens, o.temperature, o.top_k, o.seed, o.use_cache,
                                              shown.empty() ? nullptr : &routing);
    double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (ids.size() > (size_t)o.max_new_tokens) ids.erase(ids.begin(), ids.begin() + (ids.size() - o.max_new_tokens));
    const std::string text = o.prompt + tok.decode(ids);
    if (shown.empty()) {
      out << text << std::endl;
    } else {
      // Byte i of text was read with the decisions at routing index i - routing.first (bytes before were not read).
      CM_CHECK(text.size() == prompt.size() + ids.size(), "one byte per token");
      std::vector<RoutedLayer> layers;
      for (int64_t l : shown) {
        RoutedLayer rl{l, cfg.branching(), std::vector<int32_t>(text.size(), -1)};
        const int64_t k = routing.k[(size_t)l];
        for (int64_t i = routing.first; i < (int64_t)text.size(); ++i)
          rl.expert[(size_t)i] = routing.experts[(size_t)l][(size_t)((i - routing.first) * k)];
        layers.push_back(std::move(rl));
      }
      const bool colour = o.color == "always" || (o.color == "auto" && &out == &std::cout && isatty(STDOUT_FILENO));
      if (colour)
        out << render_routing_ansi(text, layers);
      else
        out << text << std::endl;
      if (!o.routing_html.empty()) {
        write_text_file(o.routing_html, render_routing_html(text, layers, "ClusterMoE routing: " + o.ckpt));
        err << "routing page: " << o.routing_html << "\n";
      }
    }
    err << ids.size() << " tokens in " << fmt("%.3f", secs) << " s: " << fmt("%.1f", secs > 0 ? ids.size() / secs : 0.0)
        << " tokens/s (" << (o.use_cache ? "expert-selection cache on" : "cache off: full recompute per token")
        << ")\n";
    return 0;
  } catch (const UsageError& e) {
    err << "sample: " << e.what() << "\n\n" << f.usage();
    return 2;
  } catch (const Error& e) {
    err << "sample: " << e.what() << "\n";
    return 2;
  } catch (const std::exception& e) {
    err << "sample: " << e.what() << "\n";
    return 1;
  }
}

}  // namespace cm
