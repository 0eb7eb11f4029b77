// The experiments harness (docs/EXPERIMENTS.md): does clustered routing help? One process per run, so that the
// peak memory of a run is its own; bench/experiments/run.sh drives a sweep (plan, resume, progress, ETA).
//
//   experiments run    --config NAME --seed S --steps N --csv FILE [...]   train one configuration, append one row
//   experiments fault  --router flat|cluster --reliability 0|1 --fault nan|x100 --seed S --csv FILE
//   experiments speed  [--configs a,b,..] [--rounds R] [--steps S] [--md FILE]  training and generation speed,
//                                                                           side by side (cmd_speed)
//   experiments report --csv FILE [--fault_csv FILE] [--routing_cost FILE] [--target L] --md FILE --svg_dir DIR
//   experiments columns                                                     the CSV header of `run`, one per line
//
// Configurations (bench/bench_configs.h, the cpu preset's model: C 128, L 4, H 4, T 64, batch 12; every MoE has
// equal active compute: K = 2 experts of width F/2 = 256 against the dense FFN of width 512):
//   dense, flat [16] top 2, cluster [4,4] top [1,2], tree [2,2,4] top [1,1,2], ac ([16] with AC),
//   ac_cluster ([4,4] with AC on both levels), ac_m1 (ac with its scaling off, m = 1: the paper's ablation);
//   the 64-expert point: flat64 [64] top 2, cluster64 [8,8] top [1,2], tree64 [4,4,4] top [1,1,2];
//   NAME@GATE: NAME with CoEConfig::gate_mode GATE (product, renorm_path, renorm_last, group_limited).
//
// Per run (one CSV row): the val-loss curve and the final val loss (fixed val batches), the first evaluated step
// whose val loss is at most --target, training wall time and tokens/s, peak RSS, generation tokens/s with and
// without the expert-selection cache, utilisation (CV of the expert shares across experts per window of
// eval_every steps, its curve, the CV over time of each expert's share, dead experts in the last window, the
// fraction a capacity factor of 1.25 would drop), specialisation (mutual information between input byte and
// expert on the val batches, nats) and router entropy (level 0, nats), the routing forward's share of the step
// time, loss spikes (a step loss above 1.5x the median of the previous 50 steps) and the variance of the gradient
// norm after warm-up, and the val loss with 2.5% of the val split's bytes replaced by random ones.
// MoE-only measures are "na" for the dense model.
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <numeric>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "bench/bench_configs.h"
#include "bench/experiments/plot.h"
#include "model/coe.h"
#include "model/data.h"
#include "model/optim.h"
#include "model/tokenizer.h"
#include "model/trainer.h"

using namespace cm;
namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;
using bench::Chart;
using bench::Series;

namespace {

[[noreturn]] void usage_error(const std::string& msg) {
  std::fprintf(stderr, "experiments: %s\n(see the comment at the top of bench/experiments/experiments.cpp)\n",
               msg.c_str());
  std::exit(2);
}

// --key value flags into a map; every key must be in `known`.
std::map<std::string, std::string> parse_flags(int argc, char** argv, int from, const std::set<std::string>& known) {
  std::map<std::string, std::string> f;
  for (int i = from; i < argc; ++i) {
    std::string k = argv[i];
    if (k.rfind("--", 0) != 0 || i + 1 >= argc) usage_error("expected --flag value, got '" + k + "'");
    k = k.substr(2);
    if (!known.count(k)) usage_error("unknown flag --" + k);
    f[k] = argv[++i];
  }
  return f;
}
int64_t flag_int(const std::map<std::string, std::string>& f, const std::string& k, int64_t def, int64_t lo) {
  auto it = f.find(k);
  if (it == f.end()) return def;
  char* end = nullptr;
  long long v = std::strtoll(it->second.c_str(), &end, 10);
  if (it->second.empty() || *end || v < lo) usage_error("--" + k + " = '" + it->second + "': expected an integer >= " +
                                                        std::to_string(lo));
  return v;
}
double flag_num(const std::map<std::string, std::string>& f, const std::string& k, double def) {
  auto it = f.find(k);
  if (it == f.end()) return def;
  char* end = nullptr;
  double v = std::strtod(it->second.c_str(), &end);
  if (it->second.empty() || *end || !std::isfinite(v)) usage_error("--" + k + " = '" + it->second + "': expected a number");
  return v;
}
std::string flag_str(const std::map<std::string, std::string>& f, const std::string& k, const std::string& def) {
  auto it = f.find(k);
  return it == f.end() ? def : it->second;
}

std::string fmt(double v, int prec = 6) {
  if (!std::isfinite(v)) return std::isnan(v) ? "nan" : (v > 0 ? "inf" : "-inf");
  char b[64];
  std::snprintf(b, sizeof b, "%.*g", prec, v);
  return b;
}

double mean_of(const std::vector<double>& v) {
  if (v.empty()) return NAN;
  double s = 0;
  for (double x : v) s += x;
  return s / (double)v.size();
}
double std_of(const std::vector<double>& v) {  // sample standard deviation (n - 1)
  if (v.size() < 2) return NAN;
  const double m = mean_of(v);
  double s = 0;
  for (double x : v) s += (x - m) * (x - m);
  return std::sqrt(s / (double)(v.size() - 1));
}
double median_of(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? NAN : v.size() % 2 ? v[v.size() / 2] : 0.5 * (v[v.size() / 2 - 1] + v[v.size() / 2]);
}

double peak_rss_mib() {
  struct rusage ru;
  getrusage(RUSAGE_SELF, &ru);
  return (double)ru.ru_maxrss / 1024.0;  // Linux: KiB
}

// ---------------------------------------------------------------- configurations

CoEConfig experiment_config(const std::string& full, const bench::ModelSize& size, uint64_t seed) {
  const size_t at = full.find('@');
  const std::string name = full.substr(0, at);
  CoEConfig c;
  try {
    if (name == "ac_m1") {
      c = bench::make_config("ac", size, seed);
      c.ac_scaling = false;
    } else if (name == "flat64" || name == "cluster64" || name == "tree64") {
      c = bench::make_config(name.substr(0, name.size() - 2), size, seed);
      c.num_clusters = 8;
      c.experts_per_cluster = 8;
      if (name == "tree64") {
        c.num_clusters = 4;
        c.experts_per_cluster = 16;
        c.tree_branching = {4, 4, 4};
        c.tree_top_k = {1, 1, 2};
      }
    } else {
      c = bench::make_config(name, size, seed);
    }
    if (at != std::string::npos) c.gate_mode = parse_gate_mode(full.substr(at + 1));
    c.validate();
  } catch (const Error& e) {
    usage_error("--config " + full + ": " + e.what() +
                " (configurations: dense, flat, cluster, tree, ac, ac_cluster, ac_m1, flat64, cluster64, tree64, "
                "each optionally @product|@renorm_path|@renorm_last|@group_limited)");
  }
  return c;
}

// "4x4 top 1x2" (no commas: it is a CSV field)
std::string tree_str(const CoEConfig& c) {
  if (c.router == RouterKind::Dense) return "-";
  std::string s;
  for (size_t i = 0; i < c.branching().size(); ++i) s += (i ? "x" : "") + std::to_string(c.branching()[i]);
  s += " top ";
  for (size_t i = 0; i < c.top_k().size(); ++i) s += (i ? "x" : "") + std::to_string(c.top_k()[i]);
  return s;
}

// ---------------------------------------------------------------- CSV

const std::vector<std::string>& run_columns() {
  static const std::vector<std::string> cols = {
      "id", "config", "seed", "steps", "router", "gate_mode", "tree", "params", "active_params", "commit",
      "final_val_loss", "val_curve", "target", "steps_to_target", "train_wall_s", "train_tok_per_s", "peak_rss_mib",
      "infer_tok_per_s_cache", "infer_tok_per_s_nocache", "util_cv", "util_cv_curve", "share_cv_time",
      "dead_experts", "dropped_fraction", "overflow_cf1.25", "specialization_mi", "router_entropy", "routing_share",
      "loss_spikes", "grad_norm_var", "val_loss_corrupt", "corrupt_gap"};
  return cols;
}
const std::vector<std::string>& fault_columns() {
  static const std::vector<std::string> cols = {
      "id", "router", "reliability", "fault", "seed", "commit", "expert", "share_before", "heldout_before",
      "heldout_after_fault", "heldout_end", "share_after", "recovered_traffic", "final_reliability"};
  return cols;
}

// Minimal CSV: fields never contain commas or quotes here (curves use ';' and ':').
std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> r;
  std::string cur;
  for (char c : s) {
    if (c == sep) {
      r.push_back(cur);
      cur.clear();
    } else {
      cur += c;
    }
  }
  r.push_back(cur);
  return r;
}

struct Table {
  std::vector<std::string> header;
  std::vector<std::map<std::string, std::string>> rows;
};
Table read_csv(const std::string& path) {
  Table t;
  std::ifstream in(path);
  if (!in) return t;
  std::string line;
  if (!std::getline(in, line)) return t;
  t.header = split(line, ',');
  while (std::getline(in, line)) {
    if (line.empty()) continue;
    std::vector<std::string> f = split(line, ',');
    if (f.size() != t.header.size()) continue;  // a torn last line of a killed run: ignored (the run is redone)
    std::map<std::string, std::string> row;
    for (size_t i = 0; i < f.size(); ++i) row[t.header[i]] = f[i];
    t.rows.push_back(row);
  }
  return t;
}
bool has_id(const std::string& path, const std::string& id) {
  for (auto& r : read_csv(path).rows)
    if (r.at("id") == id) return true;
  return false;
}
// Appends one row (and the header when the file is new or empty), in one write.
void append_row(const std::string& path, const std::vector<std::string>& cols,
                const std::map<std::string, std::string>& row) {
  std::string line;
  const bool fresh = !fs::exists(path) || fs::file_size(path) == 0;
  if (fresh)
    for (size_t i = 0; i < cols.size(); ++i) line += (i ? "," : "") + cols[i];
  if (fresh) line += "\n";
  for (size_t i = 0; i < cols.size(); ++i) {
    auto it = row.find(cols[i]);
    if (it == row.end()) usage_error("internal: column " + cols[i] + " not filled");
    if (it->second.find(',') != std::string::npos || it->second.empty())
      usage_error("internal: column " + cols[i] + " = '" + it->second + "' (empty or with a comma)");
    line += (i ? "," : "") + it->second;
  }
  line += "\n";
  std::ofstream out(path, std::ios::app);
  out << line;
  if (!out) usage_error("cannot write " + path);
}

// ---------------------------------------------------------------- one training run

struct Data {
  ByteTokenizer tok;
  std::unique_ptr<TextDataset> clean, corrupt;
};

// The corpus, and a copy whose validation tenth has 2.5% of its bytes (an exact count, at positions and with
// bytes of the vocabulary drawn from a fixed seed) replaced by random ones: the robustness test.
Data load_data(const std::string& path, int64_t T) {
  Corpus corpus = read_corpus(path);
  Data d;
  d.tok = ByteTokenizer::from_corpus(corpus.bytes);
  d.clean = std::make_unique<TextDataset>(corpus.bytes, d.tok, T);
  std::string bytes = corpus.bytes;
  const int64_t n = (int64_t)bytes.size(), n_train = n * 9 / 10, n_val = n - n_train;  // TextDataset's split
  std::vector<int64_t> pos((size_t)n_val);
  std::iota(pos.begin(), pos.end(), n_train);
  std::mt19937_64 rng(20261205);
  for (int64_t i = 0; i < (int64_t)(0.025 * (double)n_val); ++i) {  // partial Fisher-Yates: distinct positions
    std::swap(pos[i], pos[i + (int64_t)(rng() % (uint64_t)(n_val - i))]);
    bytes[pos[i]] = d.tok.vocab()[rng() % (uint64_t)d.tok.vocab_size()];
  }
  d.corrupt = std::make_unique<TextDataset>(bytes, d.tok, T);
  return d;
}

// load_data on the corpus of --data (default data/tinyshakespeare.txt); a missing or bad corpus is a usage error.
Data load_data_flag(const std::map<std::string, std::string>& f, int64_t T) {
  try {
    return load_data(flag_str(f, "data", "data/tinyshakespeare.txt"), T);
  } catch (const Error& e) {
    usage_error(e.what());
  }
}

// Mean cross-entropy over `iters` fixed val batches (the same windows every call: a fixed generator).
double evaluate(ClusterMoELM& m, const TextDataset& ds, int64_t B, int64_t iters, bool reset_metrics = false) {
  NoGrad ng;
  m.eval();
  if (reset_metrics) m.reset_metrics();
  Generator g(4242);
  double s = 0;
  for (int64_t i = 0; i < iters; ++i) {
    auto [x, y] = ds.batch(Split::Val, B, g);
    s += m.forward(x, y).loss.item();
  }
  m.train();
  return s / (double)iters;
}

// The model, its optimiser (the cpu preset's AdamW) and its parameters, as train_lm sets them up.
struct Trainee {
  ClusterMoELM model;
  NamedTensors params;
  AdamW opt;
  explicit Trainee(const CoEConfig& cfg)
      : model(cfg), params(model.named_parameters()), opt(params, [] {
          AdamWOptions ao;
          ao.beta2 = 0.99f;
          ao.weight_decay = 0.1f;
          ao.step_sums = true;  // as train_lm: the experts' health checks take the step's sums (FreshSums)
          return ao;
        }()) {}
};

// One training step as train_lm runs it: forward, backward, clipping at 1, AdamW, the model's after-step
// bookkeeping (with the step's own sums of squares, model/optim.h). Returns the forward's output (its routing statistics), the loss and the gradient norm.
struct StepResult {
  CoEOutput out;
  double loss = 0, grad_norm = 0;
};
StepResult train_step(Trainee& tr, const TextDataset& ds, int64_t B, Generator& data_gen, float lr) {
  StepResult r;
  auto [x, y] = ds.batch(Split::Train, B, data_gen);
  r.out = tr.model.forward(x, y);
  r.loss = r.out.loss.item();
  r.out.total_loss.backward();
  r.grad_norm = clip_grad_norm(tr.params, 1.0f);
  tr.opt.step(lr);
  {
    FreshSums fresh(tr.opt);
    tr.model.after_step();
  }
  tr.opt.zero_grad();
  return r;
}

int cmd_run(int argc, char** argv) {
  auto f = parse_flags(argc, argv, 2,
                       {"config", "seed", "steps", "csv", "eval_every", "eval_iters", "target", "data", "commit",
                        "batch", "lr", "warmup", "infer_tokens"});
  if (!f.count("config") || !f.count("csv")) usage_error("run needs --config and --csv");
  const std::string name = f["config"], csv = f["csv"];
  const uint64_t seed = (uint64_t)flag_int(f, "seed", 1, 0);
  const int64_t steps = flag_int(f, "steps", 1000, 1), eval_every = flag_int(f, "eval_every", 100, 1);
  const int64_t eval_iters = flag_int(f, "eval_iters", 20, 1), B = flag_int(f, "batch", 12, 1);
  const int64_t warmup = flag_int(f, "warmup", std::min<int64_t>(100, steps / 10), 0);
  const int64_t infer_tokens = flag_int(f, "infer_tokens", 64, 1);
  const double target = flag_num(f, "target", 2.0), lr = flag_num(f, "lr", 1e-3);
  const std::string id = name + "/s" + std::to_string(seed) + "/n" + std::to_string(steps);
  if (has_id(csv, id)) {
    std::printf("%s: already in %s, skipped\n", id.c_str(), csv.c_str());
    return 0;
  }
  bench::ModelSize size = bench::cpu_size();
  Data data = load_data_flag(f, size.seq_len);
  size.vocab = data.tok.vocab_size();
  CoEConfig cfg = experiment_config(name, size, seed);
  const bool moe = cfg.router != RouterKind::Dense;
  const int64_t N = cfg.num_experts(), T = size.seq_len, K = cfg.experts_per_token();

  Trainee tr(cfg);
  ClusterMoELM& model = tr.model;
  const LRSchedule sched{(float)lr, (float)lr / 10.f, warmup, steps};
  Generator data_gen(seed * 1000003ull + 17);

  std::vector<double> losses, gnorms, val_steps, val_losses, cv_curve_steps, cv_curve;
  std::vector<std::vector<double>> window_share;  // per window: [layers * N] mean share
  std::vector<double> share_acc;                  // [layers * N] this window's summed shares
  std::vector<double> entropy_last, overflow, dropped;
  int64_t window_steps = 0;
  double step_s = 0, route_s = 0;
  int64_t spikes = 0, reached = -1;
  const int64_t n_layers = cfg.n_layers;
  share_acc.assign((size_t)(n_layers * N), 0.0);
  auto record_eval = [&](int64_t step) {
    const double v = evaluate(model, *data.clean, B, eval_iters);
    val_steps.push_back((double)step);
    val_losses.push_back(v);
    if (reached < 0 && v <= target) reached = step;
  };

  record_eval(0);
  const auto t_start = Clock::now();
  double eval_s = 0;
  for (int64_t step = 0; step < steps; ++step) {
    const auto t0 = Clock::now();
    StepResult sr = train_step(tr, *data.clean, B, data_gen, lr_at(step, sched));
    read_routing_stats(sr.out.layers);  // the routing statistics below (a training forward's stay unread otherwise)
    const CoEOutput& out = sr.out;
    const double loss = sr.loss, gn = sr.grad_norm;
    step_s += std::chrono::duration<double>(Clock::now() - t0).count();
    if (!std::isfinite(loss)) {
      std::fprintf(stderr, "%s: non-finite loss at step %lld\n", id.c_str(), (long long)step);
      return 2;
    }
    // stability
    if (losses.size() >= 20) {
      std::vector<double> prev(losses.end() - std::min<size_t>(50, losses.size()), losses.end());
      if (loss > 1.5 * median_of(prev)) ++spikes;
    }
    losses.push_back(loss);
    if (step >= warmup) gnorms.push_back(gn);
    // routing
    for (const LayerRoutingStats& st : out.layers) {
      if (!st.moe) continue;
      route_s += st.routing_ms / 1000.0;
      for (int64_t e = 0; e < N; ++e) share_acc[st.layer * N + e] += st.expert_share[e];
      const int64_t cap = (int64_t)std::ceil(1.25 * (double)(B * T * K) / (double)N);
      double over = 0;
      for (int64_t e = 0; e < N; ++e) over += (double)std::max<int64_t>(0, st.expert_rows[e] - cap);
      overflow.push_back(over / (double)(B * T * K));
      dropped.push_back(st.dropped_fraction);
      if (step >= steps - eval_every) entropy_last.push_back(st.router_entropy);
    }
    ++window_steps;
    if ((step + 1) % eval_every == 0 || step + 1 == steps) {
      if (moe) {
        std::vector<double> w(share_acc.size());
        for (size_t i = 0; i < w.size(); ++i) w[i] = share_acc[i] / (double)window_steps;
        window_share.push_back(w);
        // CV across experts of the window's shares, per MoE layer, averaged over layers.
        double cv = 0;
        int64_t nl = 0;
        for (int64_t l = 0; l < n_layers; ++l) {
          if (!cfg.is_moe_layer(l)) continue;
          std::vector<double> s(w.begin() + l * N, w.begin() + (l + 1) * N);
          cv += std_of(s) / mean_of(s);
          ++nl;
        }
        cv_curve_steps.push_back((double)(step + 1));
        cv_curve.push_back(cv / (double)nl);
      }
      std::fill(share_acc.begin(), share_acc.end(), 0.0);
      window_steps = 0;
      const auto te = Clock::now();
      record_eval(step + 1);
      eval_s += std::chrono::duration<double>(Clock::now() - te).count();
    }
  }
  const double wall = std::chrono::duration<double>(Clock::now() - t_start).count() - eval_s;

  // Specialisation: mutual information between input byte and expert, on the val batches (counters reset first).
  const double final_val = val_losses.back();
  evaluate(model, *data.clean, B, eval_iters, /*reset_metrics=*/true);
  double mi = 0;
  int64_t moe_layers = 0;
  if (moe) {
    auto spec = model.get_expert_specialization();
    for (int64_t l = 0; l < n_layers; ++l)
      if (cfg.is_moe_layer(l)) {
        mi += spec.at("layer_" + std::to_string(l) + "_specialization");
        ++moe_layers;
      }
    mi /= (double)moe_layers;
  }
  const double corrupt = evaluate(model, *data.corrupt, B, eval_iters);

  // Generation speed, with and without the expert-selection cache (the same tokens either way).
  std::vector<int32_t> prompt = data.tok.encode("ROMEO:\n");
  auto gen_speed = [&](bool cache) {
    const auto t0 = Clock::now();
    model.generate(prompt, infer_tokens, 1.0f, 0, 7, cache);
    return (double)infer_tokens / std::chrono::duration<double>(Clock::now() - t0).count();
  };
  const double tps_cache = gen_speed(true), tps_nocache = gen_speed(false);

  std::map<std::string, std::string> row;
  const std::string na = "na";
  ModelSummary sum = model.get_model_summary();
  row["id"] = id;
  row["config"] = name;
  row["seed"] = std::to_string(seed);
  row["steps"] = std::to_string(steps);
  row["router"] = router_kind_name(cfg.router);
  row["gate_mode"] = moe ? gate_mode_name(cfg.gate_mode) : na;
  row["tree"] = tree_str(cfg);
  row["params"] = std::to_string(sum.total_params);
  row["active_params"] = std::to_string(sum.active_params_per_token);
  row["commit"] = flag_str(f, "commit", "unknown");
  row["final_val_loss"] = fmt(final_val);
  std::string curve;
  for (size_t i = 0; i < val_steps.size(); ++i)
    curve += (i ? ";" : "") + std::to_string((int64_t)val_steps[i]) + ":" + fmt(val_losses[i], 5);
  row["val_curve"] = curve;
  row["target"] = fmt(target);
  row["steps_to_target"] = reached >= 0 ? std::to_string(reached) : na;
  row["train_wall_s"] = fmt(wall, 5);
  row["train_tok_per_s"] = fmt((double)(steps * B * T) / wall, 5);
  row["peak_rss_mib"] = fmt(peak_rss_mib(), 5);
  row["infer_tok_per_s_cache"] = fmt(tps_cache, 5);
  row["infer_tok_per_s_nocache"] = fmt(tps_nocache, 5);
  if (moe) {
    row["util_cv"] = fmt(mean_of(cv_curve));
    std::string cvc;
    for (size_t i = 0; i < cv_curve.size(); ++i)
      cvc += (i ? ";" : "") + std::to_string((int64_t)cv_curve_steps[i]) + ":" + fmt(cv_curve[i], 4);
    row["util_cv_curve"] = cvc;
    // Each expert's share over the windows: its CV over time, averaged over experts and MoE layers.
    double tcv = 0;
    int64_t cnt = 0;
    for (int64_t l = 0; l < n_layers; ++l)
      for (int64_t e = 0; e < N && cfg.is_moe_layer(l); ++e) {
        std::vector<double> s;
        for (auto& w : window_share) s.push_back(w[l * N + e]);
        if (s.size() < 2 || mean_of(s) <= 0) continue;
        tcv += std_of(s) / mean_of(s);
        ++cnt;
      }
    row["share_cv_time"] = cnt ? fmt(tcv / (double)cnt) : na;
    int64_t dead = 0;
    for (int64_t l = 0; l < n_layers; ++l)
      for (int64_t e = 0; e < N && cfg.is_moe_layer(l); ++e) dead += window_share.back()[l * N + e] == 0.0;
    row["dead_experts"] = std::to_string(dead);
    row["dropped_fraction"] = fmt(mean_of(dropped));
    row["overflow_cf1.25"] = fmt(mean_of(overflow));
    row["specialization_mi"] = fmt(mi);
    row["router_entropy"] = fmt(mean_of(entropy_last));
    row["routing_share"] = fmt(route_s / step_s);
  } else {
    for (const char* k : {"util_cv", "util_cv_curve", "share_cv_time", "dead_experts", "dropped_fraction",
                          "overflow_cf1.25", "specialization_mi", "router_entropy", "routing_share"})
      row[k] = na;
  }
  row["loss_spikes"] = std::to_string(spikes);
  double gm = mean_of(gnorms), gv = 0;
  for (double g : gnorms) gv += (g - gm) * (g - gm);
  row["grad_norm_var"] = gnorms.size() > 1 ? fmt(gv / (double)(gnorms.size() - 1)) : na;
  row["val_loss_corrupt"] = fmt(corrupt);
  row["corrupt_gap"] = fmt(corrupt - final_val);
  append_row(csv, run_columns(), row);
  std::printf("%s: val %.4f, %.0f tok/s, %.1f s\n", id.c_str(), final_val, (double)(steps * B * T) / wall, wall);
  return 0;
}

// ---------------------------------------------------------------- fault injection

// The fault-injection experiment of tests/test_reliability.cpp on the full corpus: a small model (C 32, L 2,
// 4 experts, K = 2) trains `before` steps; the busiest expert of layer 0 (over the last 60 steps) is corrupted
// (every weight NaN, or x100); training goes on `after` steps. Held-out loss before, right after and at the end;
// the expert's traffic share before and over the last 60 steps; recovered traffic = 1 - after / before.
int cmd_fault(int argc, char** argv) {
  auto f = parse_flags(argc, argv, 2,
                       {"router", "reliability", "fault", "seed", "csv", "data", "commit", "before", "after"});
  const std::string router = flag_str(f, "router", "cluster"), fault = flag_str(f, "fault", "nan");
  const bool rel = flag_int(f, "reliability", 1, 0) != 0;
  const uint64_t seed = (uint64_t)flag_int(f, "seed", 1, 0);
  const int64_t before = flag_int(f, "before", 120, 2), after = flag_int(f, "after", 120, 2);
  if (!f.count("csv")) usage_error("fault needs --csv");
  if (router != "flat" && router != "cluster") usage_error("--router must be flat or cluster, got '" + router + "'");
  if (fault != "nan" && fault != "x100") usage_error("--fault must be nan or x100, got '" + fault + "'");
  const std::string csv = f["csv"];
  const std::string id = router + "/" + (rel ? "rel" : "norel") + "/" + fault + "/s" + std::to_string(seed);
  if (has_id(csv, id)) {
    std::printf("%s: already in %s, skipped\n", id.c_str(), csv.c_str());
    return 0;
  }
  const int64_t T = 32, B = 8;
  Data data = load_data_flag(f, T);
  CoEConfig c;
  c.d_model = 32;
  c.n_layers = 2;
  c.n_heads = 2;
  c.d_ff = 64;
  c.vocab_size = data.tok.vocab_size();
  c.seq_len = T;
  c.num_clusters = 2;
  c.experts_per_cluster = 2;
  c.top_k_clusters = 2;
  c.top_k_experts = 1;
  c.router = router == "flat" ? RouterKind::Flat : RouterKind::Cluster;
  c.use_reliability = rel;
  c.seed = seed;
  c.validate();
  ClusterMoELM m(c);
  NamedTensors params = m.named_parameters();
  AdamWOptions ao;
  ao.weight_decay = 0.f;
  AdamW opt(params, ao);
  const LRSchedule sched{3e-3f, 3e-4f, 20, before + after};
  Generator gen(seed * 7919ull + 3);
  const int64_t N = 4;
  int64_t step = 0;
  bool finite = true;
  auto train = [&](int64_t n, std::vector<double>* shares) {
    for (int64_t s = 0; s < n && finite; ++s, ++step) {
      auto [x, y] = data.clean->batch(Split::Train, B, gen);
      CoEOutput o = m.forward(x, y);
      read_routing_stats(o.layers);  // the shares below
      if (!std::isfinite(o.loss.item())) {
        finite = false;  // without reliability a NaN expert poisons the model: training stops here
        break;
      }
      o.total_loss.backward();
      clip_grad_norm(params, 1.0f);
      opt.step(lr_at(step, sched));
      m.after_step();
      opt.zero_grad();
      const int64_t window = std::min<int64_t>(60, n);  // the shares: mean over the last 60 steps
      if (shares && s >= n - window)
        for (int64_t e = 0; e < N; ++e) (*shares)[e] += o.layers[0].expert_share[e] / (double)window;
    }
  };
  std::vector<double> sh_before(N, 0.0), sh_after(N, 0.0);
  train(before, &sh_before);
  const int64_t expert = std::max_element(sh_before.begin(), sh_before.end()) - sh_before.begin();
  const double held_before = evaluate(m, *data.clean, 16, 4);
  {
    NoGrad ng;
    for (auto& [pname, p] : m.expert_parameters(0, expert)) {
      float* d = p.f32();
      for (int64_t i = 0; i < p.numel(); ++i) d[i] = fault == "nan" ? NAN : d[i] * 100.f;
    }
  }
  const double held_hit = evaluate(m, *data.clean, 16, 4);
  train(after, &sh_after);
  const double held_end = finite ? evaluate(m, *data.clean, 16, 4) : NAN;
  const std::string rkey = router == "flat"
                               ? "layer_0_cluster_0_expert_" + std::to_string(expert) + "_reliability"
                               : "layer_0_cluster_" + std::to_string(expert / 2) + "_expert_" +
                                     std::to_string(expert % 2) + "_reliability";
  auto relstats = m.get_reliability_stats();
  std::map<std::string, std::string> row;
  row["id"] = id;
  row["router"] = router;
  row["reliability"] = rel ? "1" : "0";
  row["fault"] = fault;
  row["seed"] = std::to_string(seed);
  row["commit"] = flag_str(f, "commit", "unknown");
  row["expert"] = std::to_string(expert);
  row["share_before"] = fmt(sh_before[expert]);
  row["heldout_before"] = fmt(held_before);
  row["heldout_after_fault"] = fmt(held_hit);
  row["heldout_end"] = fmt(held_end);
  row["share_after"] = finite ? fmt(sh_after[expert]) : "nan";
  row["recovered_traffic"] = finite ? fmt(1.0 - sh_after[expert] / sh_before[expert]) : "nan";
  row["final_reliability"] = relstats.count(rkey) ? fmt(relstats.at(rkey)) : "na";
  append_row(csv, fault_columns(), row);
  std::printf("%s: held-out %.4f -> %.4f -> %s, share %.3f -> %s\n", id.c_str(), held_before, held_hit,
              row["heldout_end"].c_str(), sh_before[expert], row["share_after"].c_str());
  return 0;
}

// ---------------------------------------------------------------- speed

void write_text(const std::string& path, const std::string& text) {
  std::ofstream o(path);
  o << text;
  if (!o) usage_error("cannot write " + path);
}

double cpu_seconds() {  // the process's CPU time, all threads
  timespec ts;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

// Training step time and generation speed of several configurations, measured side by side in one process: each
// of --rounds rounds runs every configuration in turn (--warmup untimed steps, --steps timed ones, then
// --infer_tokens generated bytes with the selection cache and without), so that a slow phase of a shared machine
// hits every configuration alike. Medians over all timed steps (train) and over rounds (generation); ratios
// against the first configuration. Besides wall time, each step's process CPU time (all threads): on a shared
// machine it counts the work done rather than the time the scheduler gave to others. The models start from their
// seeds and train on the same batches; speed does not depend on what they have learned.
int cmd_speed(int argc, char** argv) {
  auto f = parse_flags(argc, argv, 2, {"configs", "rounds", "steps", "warmup", "infer_tokens", "seed", "data", "md"});
  const int64_t rounds = flag_int(f, "rounds", 10, 1), steps = flag_int(f, "steps", 8, 1);
  const int64_t warmup = flag_int(f, "warmup", 2, 0), infer_tokens = flag_int(f, "infer_tokens", 64, 1);
  const uint64_t seed = (uint64_t)flag_int(f, "seed", 1, 0);
  const std::vector<std::string> names =
      split(flag_str(f, "configs", "dense,flat,cluster,tree,ac,ac_cluster,ac_m1,flat64,cluster64,tree64"), ',');
  bench::ModelSize size = bench::cpu_size();
  Data data = load_data_flag(f, size.seq_len);
  size.vocab = data.tok.vocab_size();
  const int64_t B = 12;
  std::vector<CoEConfig> cfgs;
  for (const std::string& n : names) cfgs.push_back(experiment_config(n, size, seed));  // checks every name first
  std::vector<std::unique_ptr<Trainee>> tr;
  for (const CoEConfig& c : cfgs) tr.push_back(std::make_unique<Trainee>(c));
  const size_t n = names.size();
  std::vector<std::vector<double>> wall(n), cpu(n), gen_cache(n), gen_plain(n);
  const std::vector<int32_t> prompt = data.tok.encode("ROMEO:\n");
  for (int64_t r = 0; r < rounds; ++r) {
    for (size_t i = 0; i < n; ++i) {
      Generator g(seed * 1000003ull + 17 + (uint64_t)r);  // the same batches for every configuration
      for (int64_t s = 0; s < warmup + steps; ++s) {
        const auto t0 = Clock::now();
        const double c0 = cpu_seconds();
        train_step(*tr[i], *data.clean, B, g, 1e-3f);
        if (s < warmup) continue;
        wall[i].push_back(1e3 * std::chrono::duration<double>(Clock::now() - t0).count());
        cpu[i].push_back(1e3 * (cpu_seconds() - c0));
      }
      for (bool cache : {true, false}) {
        const auto t0 = Clock::now();
        tr[i]->model.generate(prompt, infer_tokens, 1.0f, 0, 7, cache);
        (cache ? gen_cache : gen_plain)[i].push_back((double)infer_tokens /
                                                     std::chrono::duration<double>(Clock::now() - t0).count());
      }
    }
    std::fprintf(stderr, "speed: round %lld of %lld done\n", (long long)(r + 1), (long long)rounds);
  }
  std::ostringstream md;
  md << "| config | tree | train ms/step | CPU ms/step | vs " << names[0] << " (wall) | vs " << names[0]
     << " (CPU) | gen tok/s, cache | gen tok/s, no cache | vs " << names[0] << " (cache) |\n"
     << "|---|---|---|---|---|---|---|---|---|\n";
  for (size_t i = 0; i < n; ++i)
    md << "| " << names[i] << " | " << tree_str(cfgs[i]) << " | " << fmt(median_of(wall[i]), 4) << " | "
       << fmt(median_of(cpu[i]), 4) << " | " << fmt(median_of(wall[i]) / median_of(wall[0]), 3) << " | "
       << fmt(median_of(cpu[i]) / median_of(cpu[0]), 3) << " | " << fmt(median_of(gen_cache[i]), 4) << " | "
       << fmt(median_of(gen_plain[i]), 4) << " | " << fmt(median_of(gen_cache[i]) / median_of(gen_cache[0]), 3)
       << " |\n";
  md << "\nMedians over " << rounds << " interleaved rounds of " << steps << " timed training steps (batch " << B
     << " x " << size.seq_len << " bytes) and " << infer_tokens << " generated bytes per configuration; "
     << (std::getenv("OMP_NUM_THREADS") ? std::getenv("OMP_NUM_THREADS") : "default") << " OpenMP threads.\n";
  std::printf("%s", md.str().c_str());
  if (f.count("md")) write_text(f["md"], md.str());
  return 0;
}

// ---------------------------------------------------------------- report

struct Stat {
  std::vector<double> v;
  int64_t na = 0;
};
double num(const std::string& s) {
  if (s == "na" || s.empty()) return NAN;
  char* end = nullptr;
  double v = std::strtod(s.c_str(), &end);
  return *end ? NAN : v;
}
std::string pm(const std::vector<double>& v, int prec = 4) {
  std::vector<double> f;
  for (double x : v)
    if (std::isfinite(x)) f.push_back(x);
  if (f.empty()) return "n/a";
  std::string s = fmt(mean_of(f), prec);
  if (f.size() > 1) s += " ± " + fmt(std_of(f), 2);
  if (f.size() < v.size()) s += " (" + std::to_string(v.size() - f.size()) + " n/a)";
  return s;
}
std::vector<std::pair<double, double>> parse_curve(const std::string& s) {
  std::vector<std::pair<double, double>> r;
  if (s == "na" || s.empty()) return r;
  for (const std::string& p : split(s, ';')) {
    auto kv = split(p, ':');
    if (kv.size() == 2) r.push_back({num(kv[0]), num(kv[1])});
  }
  return r;
}

// The step where a val curve (points (step, loss) in step order), taken as linear between its points, first
// reaches `target`: the first point at or below it, or the crossing on the segment before that point. NaN when it
// never does.
double steps_to_reach(const std::vector<std::pair<double, double>>& curve, double target) {
  for (size_t i = 0; i < curve.size(); ++i) {
    if (!(curve[i].second <= target)) continue;
    if (i == 0) return curve[0].first;
    const auto [s0, v0] = curve[i - 1];
    const auto [s1, v1] = curve[i];
    return s0 + (v0 - target) / (v0 - v1) * (s1 - s0);  // v0 > target >= v1
  }
  return NAN;
}

// Mean and band (mean ± std over seeds) of curves sampled at the same steps.
Series band_series(const std::string& name, const std::vector<std::vector<std::pair<double, double>>>& curves) {
  Series s;
  s.name = name + " (" + std::to_string(curves.size()) + ")";
  if (curves.empty()) return s;
  size_t n = curves[0].size();
  for (auto& c : curves) n = std::min(n, c.size());
  for (size_t i = 0; i < n; ++i) {
    std::vector<double> v;
    for (auto& c : curves) v.push_back(c[i].second);
    const double m = mean_of(v), sd = v.size() > 1 ? std_of(v) : 0.0;
    s.x.push_back(curves[0][i].first);
    s.y.push_back(m);
    s.lo.push_back(m - sd);
    s.hi.push_back(m + sd);
  }
  return s;
}

int cmd_report(int argc, char** argv) {
  auto f = parse_flags(argc, argv, 2,
                       {"csv", "fault_csv", "routing_cost", "md", "svg_dir", "skip_first_curve", "target"});
  if (!f.count("csv") || !f.count("md") || !f.count("svg_dir")) usage_error("report needs --csv, --md and --svg_dir");
  Table t = read_csv(f["csv"]);
  if (t.rows.empty()) usage_error(f["csv"] + ": no runs");
  const bool retarget = f.count("target") > 0;
  if (retarget) {  // steps to target from each run's val curve, for a target chosen after the runs
    const double target = flag_num(f, "target", 0.0);
    for (auto& r : t.rows) {
      r["target"] = fmt(target);
      r["steps_to_target"] = "na";
      const double s = steps_to_reach(parse_curve(r["val_curve"]), target);
      if (std::isfinite(s)) r["steps_to_target"] = fmt(s, 5);
    }
  }
  fs::create_directories(f["svg_dir"]);
  std::vector<std::string> order;  // configurations in order of first appearance
  std::map<std::string, std::vector<std::map<std::string, std::string>>> by;
  for (auto& r : t.rows) {
    if (!by.count(r["config"])) order.push_back(r["config"]);
    by[r["config"]].push_back(r);
  }
  std::ostringstream md;
  md << "Per configuration: mean ± sample standard deviation over seeds (n = seeds; na: not defined for the dense "
        "model).\n\n";
  const std::vector<std::pair<std::string, std::string>> measures = {
      {"final_val_loss", "val loss"},
      {"steps_to_target", "steps to target"},
      {"val_loss_corrupt", "val loss, 2.5% bytes corrupted"},
      {"corrupt_gap", "corruption gap"},
      {"train_tok_per_s", "train tok/s"},
      {"train_wall_s", "train wall s"},
      {"peak_rss_mib", "peak RSS MiB"},
      {"infer_tok_per_s_cache", "gen tok/s cache"},
      {"infer_tok_per_s_nocache", "gen tok/s no cache"},
      {"util_cv", "util CV"},
      {"share_cv_time", "share CV over time"},
      {"dead_experts", "dead experts"},
      {"dropped_fraction", "dropped"},
      {"overflow_cf1.25", "overflow at cf 1.25"},
      {"specialization_mi", "MI byte-expert (nats)"},
      {"router_entropy", "router entropy (nats)"},
      {"routing_share", "routing share of step"},
      {"loss_spikes", "loss spikes"},
      {"grad_norm_var", "grad-norm variance"},
  };
  // Two tables (quality, then cost and routing), so that each fits a page.
  const size_t split_at = 4;
  for (int part = 0; part < 2; ++part) {
    md << "| config | tree | gate | n |";
    for (size_t i = part ? split_at : 0; i < (part ? measures.size() : split_at); ++i)
      md << " " << measures[i].second << " |";
    md << "\n|---|---|---|---|";
    for (size_t i = part ? split_at : 0; i < (part ? measures.size() : split_at); ++i) md << "---|";
    md << "\n";
    for (const std::string& c : order) {
      auto& rs = by[c];
      md << "| " << c << " | " << rs[0]["tree"] << " | " << rs[0]["gate_mode"] << " | " << rs.size() << " |";
      for (size_t i = part ? split_at : 0; i < (part ? measures.size() : split_at); ++i) {
        std::vector<double> v;
        for (auto& r : rs) v.push_back(num(r[measures[i].first]));
        md << " " << (rs[0][measures[i].first] == "na" && measures[i].first != "steps_to_target" ? "na" : pm(v))
           << " |";
      }
      md << "\n";
    }
    md << "\n";
  }
  md << "Steps to target: " << (retarget ? "the step where the val loss curve, linear between its evaluations, first "
                                           "reaches "
                                         : "the first evaluation (every eval_every steps) with val loss <= ")
     << t.rows[0]["target"] << "; runs that never reach it count as n/a.\n\n";
  // Pairwise comparisons: B against A per measure, as the relative change of the mean, with the noise band
  // 2 x sqrt(sA^2/nA + sB^2/nB) (about a 95% interval of the difference of two means); a change inside that band
  // is "inside the noise".
  const std::vector<std::pair<std::string, std::string>> pairs = {
      {"flat", "cluster"},      {"flat", "tree"},           {"flat", "ac"},
      {"cluster", "ac_cluster"}, {"ac_m1", "ac"},            {"dense", "flat"},
      {"cluster", "cluster@renorm_path"}, {"cluster", "cluster@product"}, {"cluster", "cluster@group_limited"},
      {"tree", "tree@renorm_path"}, {"flat64", "cluster64"}, {"flat64", "tree64"}};
  const std::vector<std::pair<std::string, std::string>> cmp_measures = {
      {"final_val_loss", "val loss"},          {"steps_to_target", "steps to target"},
      {"corrupt_gap", "corruption gap"},       {"train_tok_per_s", "train tok/s"},
      {"peak_rss_mib", "peak RSS MiB"},        {"infer_tok_per_s_cache", "gen tok/s cache"},
      {"util_cv", "util CV"},                  {"share_cv_time", "share CV over time"},
      {"specialization_mi", "MI byte-expert"}, {"router_entropy", "router entropy"},
      {"routing_share", "routing share"},      {"loss_spikes", "loss spikes"},
      {"grad_norm_var", "grad-norm variance"}};
  md << "### Pairwise comparisons\n\nB against A: mean of B, mean of A, relative change (B - A) / A, and whether the "
        "difference of the means is larger than its noise band 2 sqrt(sA²/nA + sB²/nB).\n\n";
  for (auto& [a, b] : pairs) {
    if (!by.count(a) || !by.count(b)) continue;
    md << "**" << b << " against " << a << "** (n = " << by[b].size() << ", " << by[a].size() << ")\n\n"
       << "| measure | " << a << " | " << b << " | change | noise band | verdict |\n|---|---|---|---|---|---|\n";
    for (auto& [col, label] : cmp_measures) {
      std::vector<double> va, vb;
      for (auto& r : by[a]) if (std::isfinite(num(r[col]))) va.push_back(num(r[col]));
      for (auto& r : by[b]) if (std::isfinite(num(r[col]))) vb.push_back(num(r[col]));
      if (va.empty() || vb.empty()) continue;
      const double ma = mean_of(va), mb = mean_of(vb);
      const double sa = va.size() > 1 ? std_of(va) : NAN, sb = vb.size() > 1 ? std_of(vb) : NAN;
      const double band = 2.0 * std::sqrt(sa * sa / (double)va.size() + sb * sb / (double)vb.size());
      std::string verdict = !std::isfinite(band) ? "one seed" : std::fabs(mb - ma) > band ? "differs" : "inside the noise";
      md << "| " << label << " | " << fmt(ma, 4) << " | " << fmt(mb, 4) << " | "
         << (ma != 0 ? fmt(100.0 * (mb - ma) / std::fabs(ma), 3) + "%" : "-") << " | " << fmt(band, 2) << " | "
         << verdict << " |\n";
    }
    md << "\n";
  }
  write_text(f["md"], md.str());

  // Figures: val-loss curves with a band over seeds; utilisation CV over steps.
  const std::string dir = f["svg_dir"];
  auto chart_for = [&](const std::string& title, const std::string& col, const std::string& ylabel,
                       const std::vector<std::string>& configs, const std::string& file) {
    Chart ch{title, "step", ylabel};
    for (const std::string& c : configs) {
      if (!by.count(c)) continue;
      std::vector<std::vector<std::pair<double, double>>> curves;
      for (auto& r : by[c]) {
        auto cv = parse_curve(r[col]);
        if (col == "val_curve" && cv.size() > 1) cv.erase(cv.begin());  // step 0 (ln V) flattens the plot
        if (!cv.empty()) curves.push_back(cv);
      }
      if (!curves.empty()) ch.series.push_back(band_series(c, curves));
    }
    if (!ch.series.empty()) write_text(dir + "/" + file, ch.svg());
  };
  std::vector<std::string> core, scale, gates;
  for (const std::string& c : order) {
    if (c.find("64") != std::string::npos) scale.push_back(c);
    else if (c.find('@') != std::string::npos) gates.push_back(c);
    else core.push_back(c);
  }
  if (by.count("cluster")) gates.insert(gates.begin(), "cluster");
  chart_for("val loss, core configurations (band: ± 1 std over seeds)", "val_curve", "val loss", core,
            "val_loss_core.svg");
  chart_for("val loss, gate designs on cluster [4,4] top [1,2]", "val_curve", "val loss", gates, "val_loss_gates.svg");
  chart_for("val loss, 64 experts", "val_curve", "val loss", scale, "val_loss_64.svg");
  std::vector<std::string> moe_core;
  for (auto& c : core)
    if (c != "dense") moe_core.push_back(c);
  chart_for("utilisation: CV of expert shares per window (band: ± 1 std over seeds)", "util_cv_curve",
            "CV across experts", moe_core, "util_cv.svg");
  chart_for("utilisation CV, 64 experts", "util_cv_curve", "CV across experts", scale, "util_cv_64.svg");

  // Routing cost against N, from bench/routing_cost's table (its rows: | N | tree | branching | top-k | router
  // params | FLOPs/token | infer ms | vs flat | train ms | ...).
  if (f.count("routing_cost")) {
    std::ifstream in(f["routing_cost"]);
    std::string line;
    std::map<std::string, Series> flops, infer;
    std::vector<std::string> tree_order;
    while (std::getline(in, line)) {
      if (line.size() < 3 || line[0] != '|' || !std::isdigit((unsigned char)line[2])) continue;
      auto cells = split(line, '|');
      if (cells.size() < 10) continue;
      auto trim = [](std::string s) {
        s.erase(0, s.find_first_not_of(' '));
        s.erase(s.find_last_not_of(' ') + 1);
        return s;
      };
      const std::string tree = trim(cells[2]);
      if (!flops.count(tree)) {
        tree_order.push_back(tree);
        flops[tree].name = infer[tree].name = tree;
      }
      const double n = num(trim(cells[1]));
      flops[tree].x.push_back(n);
      flops[tree].y.push_back(num(trim(cells[6])));
      infer[tree].x.push_back(n);
      infer[tree].y.push_back(num(trim(cells[7])));
    }
    if (!tree_order.empty()) {
      Chart a{"routing FLOPs per token against N (C = 256, K = 2)", "experts N", "FLOPs / token"};
      Chart b{"routing time (inference, T = 4096 tokens) against N", "experts N", "ms"};
      a.log_x = a.log_y = b.log_x = b.log_y = true;
      for (auto& tr : tree_order) {
        a.series.push_back(flops[tr]);
        b.series.push_back(infer[tr]);
      }
      write_text(dir + "/routing_flops.svg", a.svg());
      write_text(dir + "/routing_time.svg", b.svg());
    }
  }

  // Fault injection.
  if (f.count("fault_csv")) {
    Table ft = read_csv(f["fault_csv"]);
    std::ostringstream fm;
    fm << "| router | reliability | fault | n | held-out before | right after the fault | at the end | share "
          "before | share after | recovered traffic | final reliability |\n|---|---|---|---|---|---|---|---|---|---|---|\n";
    std::vector<std::string> keys;
    std::map<std::string, std::vector<std::map<std::string, std::string>>> fb;
    for (auto& r : ft.rows) {
      const std::string k = r["router"] + "|" + r["reliability"] + "|" + r["fault"];
      if (!fb.count(k)) keys.push_back(k);
      fb[k].push_back(r);
    }
    for (auto& k : keys) {
      auto& rs = fb[k];
      fm << "| " << rs[0]["router"] << " | " << (rs[0]["reliability"] == "1" ? "on" : "off") << " | "
         << rs[0]["fault"] << " | " << rs.size() << " |";
      for (const char* col : {"heldout_before", "heldout_after_fault", "heldout_end", "share_before", "share_after",
                              "recovered_traffic", "final_reliability"}) {
        std::vector<double> v;
        for (auto& r : rs) v.push_back(num(r[col]));
        fm << " " << pm(v) << " |";
      }
      fm << "\n";
    }
    std::ofstream o(f["md"], std::ios::app);
    o << "Fault injection (n/a: the loss was not finite):\n\n" << fm.str() << "\n";
  }
  std::printf("report: %s, figures in %s\n", f["md"].c_str(), dir.c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  reexec_with_passive_openmp(argv);  // sleeping OpenMP waits on a shared machine (model/trainer.h)
  if (argc < 2) usage_error("expected a command: run, fault, speed, report or columns");
  const std::string cmd = argv[1];
  try {
    if (cmd == "run") return cmd_run(argc, argv);
    if (cmd == "fault") return cmd_fault(argc, argv);
    if (cmd == "report") return cmd_report(argc, argv);
    if (cmd == "speed") return cmd_speed(argc, argv);
    if (cmd == "columns") {
      for (auto& c : run_columns()) std::printf("%s\n", c.c_str());
      return 0;
    }
  } catch (const Error& e) {
    std::fprintf(stderr, "experiments: %s\n", e.what());
    return 2;
  }
  usage_error("unknown command '" + cmd + "': expected run, fault, speed, report or columns");
}
