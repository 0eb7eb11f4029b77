// End-to-end training throughput of the model configurations of equal active compute (bench/bench_configs.h: dense,
// flat top-k, ClusterMoE two-level, a deeper tree, AC, AC inside ClusterMoE), one full training step each as
// train_lm runs it (model/trainer.h):
//
//   out = model.forward(x, y); out.total_loss.backward(); clip_grad_norm(1.0); AdamW step; after_step(); zero_grad
//
// Per configuration: ms per step (median over all timed steps) and its split into forward / backward + clipping /
// AdamW + after_step, tokens/s, model FLOPs per token (trainer.h's train_flops_per_token: 6 x active parameters +
// 12 L T C for attention) and the achieved model GFLOP/s (MFU on CUDA against --peak_tflops), peak memory (the
// process's peak RSS on CPU, the caching allocator's peak on CUDA), the tokens/s ratio to dense from the same run,
// and the page faults of a step (median; on the CPU, each is a page of fresh memory that the kernel zeroes).
//
// Method: every configuration runs in a child process of its own (fork), so that peak RSS is that configuration's
// alone; the parent does nothing but fork, wait and print (it never starts OpenMP, which is not fork-safe). The
// configurations are run in `--rounds` interleaved rounds (dense, flat, ..., dense, flat, ...) of `--warmup` untimed
// and `--steps` timed steps each, so that a slow phase of a shared machine hits every configuration alike; the
// median is over the timed steps of all rounds. All configurations see the same batches (random token ids).
// Besides wall-clock time, each step's process CPU time (all threads) is measured: on a machine shared with other
// jobs it counts the work the step did rather than the time the scheduler gave to others, so the "vs dense (CPU)"
// ratio is the steadier one there (it does not see parallel efficiency: compare both columns).
//
// Device: --device auto picks CUDA when this build has it and a device answers; the model moves its parameters
// there with ClusterMoELM::to (its buffers and routing bookkeeping stay on the host). A configuration that fails on
// a device is reported as skipped with the model's error (or as crashed with the signal), not measured.
//
//   make -j2 USE_CUDA=0 build/bench/train_bench
//   OMP_NUM_THREADS=2 ./build/bench/train_bench                       # the CPU table (cpu preset size)
//   ./build/bench/train_bench --device cuda --size gpu --peak_tflops 67   # CUDA (shakespeare preset size)
//   ./build/bench/train_bench --json --save_init DIR                  # for bench/reference/compare_train.py
// --save_init DIR writes each configuration's initial parameters and buffers (DIR/<config>.safetensors, the config in
// its metadata) and the batches of its steps (DIR/<config>.batches.safetensors), so that PyTorch trains the same
// model from the same state on the same data and its losses can be compared step by step.
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "bench/bench_configs.h"
#include "model/checkpoint.h"
#include "model/coe.h"
#include "model/json.h"
#include "model/optim.h"
#include "model/trainer.h"

#if CM_CUDA
#include "engine/cuda.h"
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

using namespace cm;

namespace {

struct Options {
  std::string device = "auto", size, save_init;
  std::vector<std::string> configs = bench::config_names();
  int64_t B = 0, steps = 10, warmup = 2, rounds = 3;
  double peak_tflops = 67.0;  // H100 SXM FP32 (our default matmul precision); for MFU on CUDA only
  bool json = false;
};

[[noreturn]] void usage(const std::string& why) {
  std::fprintf(stderr,
               "train_bench: %s\nusage: train_bench [--device auto|cpu|cuda] [--size cpu|gpu] [--configs a,b,...]\n"
               "                   [--B n] [--steps 10] [--warmup 2] [--rounds 3] [--peak_tflops 67] [--json]\n"
               "                   [--save_init DIR]\n",
               why.c_str());
  std::exit(2);
}

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    std::string k = argv[i];
    auto val = [&]() -> std::string {
      if (i + 1 >= argc) usage(k + " needs a value");
      return argv[++i];
    };
    auto num = [&](int64_t lo) -> int64_t {
      std::string v = val();
      char* end = nullptr;
      long long x = std::strtoll(v.c_str(), &end, 10);
      if (v.empty() || *end || x < lo) usage(k + " = '" + v + "': expected an integer >= " + std::to_string(lo));
      return x;
    };
    if (k == "--device") o.device = val();
    else if (k == "--size") o.size = val();
    else if (k == "--save_init") o.save_init = val();
    else if (k == "--B") o.B = num(1);
    else if (k == "--steps") o.steps = num(1);
    else if (k == "--warmup") o.warmup = num(0);
    else if (k == "--rounds") o.rounds = num(1);
    else if (k == "--peak_tflops") o.peak_tflops = std::atof(val().c_str());
    else if (k == "--json") o.json = true;
    else if (k == "--configs") {
      o.configs.clear();
      std::stringstream ss(val());
      std::string c;
      while (std::getline(ss, c, ',')) o.configs.push_back(c);
    } else usage("unknown flag '" + k + "'");
  }
  if (o.device != "auto" && o.device != "cpu" && o.device != "cuda") usage("--device must be auto, cpu or cuda");
  if (!o.size.empty() && o.size != "cpu" && o.size != "gpu") usage("--size must be cpu or gpu");
  for (const auto& c : o.configs)
    if (std::find(bench::config_names().begin(), bench::config_names().end(), c) == bench::config_names().end())
      usage("unknown config '" + c + "'");
  return o;
}

// ---------------------------------------------------------------- one configuration (in the child)

struct Result {
  std::string name, router, tree;
  int64_t N = 1, K = 1, params = 0, active = 0, threads = 1, peak_device_bytes = -1;
  double flops_per_token = 0, first_loss = 0, last_loss = 0;
  std::vector<double> step_ms, fwd_ms, bwd_ms, opt_ms;  // timed steps of this round (wall clock)
  std::vector<double> cpu_ms;                           // the same steps in process CPU time (all threads)
  std::vector<double> faults;                           // the same steps' page faults (minor: memory the kernel
                                                        // maps and zeroes on first touch)
  std::vector<double> losses;                           // cross-entropy of every step, warm-up included
};

// Page faults of the process so far that needed no disk (ru_minflt): a step's fresh pages.
double minor_faults() {
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  return (double)ru.ru_minflt;
}

double ms_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

// CPU time of the whole process (every thread), in ms. On a shared machine it counts the work a step did, not the
// time the scheduler gave to other jobs, so its ratios are the steadier ones (see the header).
double process_cpu_ms() {
  timespec ts;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec * 1e-6;
}

std::string tree_str(const CoEConfig& c) {
  if (c.router == RouterKind::Dense) return "-";
  std::string s;
  auto b = c.branching(), k = c.top_k();
  for (size_t i = 0; i < b.size(); ++i) s += (i ? "," : "") + std::to_string(b[i]);
  s += " top ";
  for (size_t i = 0; i < k.size(); ++i) s += (i ? "," : "") + std::to_string(k[i]);
  return s;
}

std::string config_json(const CoEConfig& c) {
  Json j = Json::object();
  for (const auto& kv : c.to_map()) j.set(kv.first, Json::string(kv.second));
  return json_dump(j);
}

Result run_config(const std::string& name, const bench::ModelSize& size, int64_t B, const Options& o, Device dev,
                  int round) {
  Result r;
  r.name = name;
  const CoEConfig cfg = bench::make_config(name, size);
  const int64_t T = cfg.seq_len;
  ClusterMoELM model(cfg);
  model.train();
  model.set_router_entropy(false);  // as train_lm: a statistic it reports nowhere
  ModelSummary s = model.get_model_summary();
  r.router = router_kind_name(cfg.router);
  r.tree = tree_str(cfg);
  r.N = s.num_experts;
  r.K = s.experts_per_token;
  r.params = s.total_params;
  r.active = s.active_params_per_token;
  r.flops_per_token = train_flops_per_token(s.active_params_per_token, cfg.n_layers, T, cfg.d_model);
#ifdef _OPENMP
  r.threads = omp_get_max_threads();
#endif
  if (!o.save_init.empty() && round == 0) {  // the initial state, for the PyTorch side of the comparison
    std::filesystem::create_directories(o.save_init);
    NamedTensors st = model.named_parameters();
    for (auto& kv : model.named_buffers()) st.push_back(kv);
    save_safetensors(o.save_init + "/" + name + ".safetensors", st,
                     {{"format", "clustermoe-bench/1"}, {"config", config_json(cfg)}, {"step", "0"}});
  }
  model.to(dev);  // before the optimizer: its moments live with the parameters

  // The trainer's optimizer settings (train_lm defaults).
  AdamWOptions ao;
  ao.lr = 1e-3f;
  ao.beta1 = 0.9f;
  ao.beta2 = 0.99f;
  ao.weight_decay = 0.1f;
  ao.step_sums = true;
  NamedTensors params = model.named_parameters();
  AdamW opt(params, ao);

  // The same batches for every configuration and round: uniform ids from a fixed stream.
  const int64_t n = o.warmup + o.steps;
  Generator g(4242);
  std::vector<std::pair<Tensor, Tensor>> batches;
  std::vector<Tensor> all_ids;
  for (int64_t i = 0; i < n; ++i) {
    std::vector<int32_t> v((size_t)(B * (T + 1)));
    uint64_t off = g.take(v.size());
    for (size_t j = 0; j < v.size(); ++j)
      v[j] = (int32_t)std::min<int64_t>(cfg.vocab_size - 1, (int64_t)(philox_uniform(g.seed, off, j) * cfg.vocab_size));
    Tensor ids = Tensor::from_vector(v, {B, T + 1});
    batches.emplace_back(ids.slice(1, 0, T).contiguous().to(dev), ids.slice(1, 1, T + 1).contiguous().to(dev));
    all_ids.push_back(ids);
  }
  if (!o.save_init.empty() && round == 0)  // the same batches for the PyTorch side: ids [n, B, T + 1]
    save_safetensors(o.save_init + "/" + name + ".batches.safetensors", {{"ids", concat(all_ids, 0).view({n, B, T + 1})}},
                     {{"format", "clustermoe-bench-batches/1"}, {"warmup", std::to_string(o.warmup)}});
#if CM_CUDA
  if (dev == Device::CUDA) cuda::reset_peak();
#endif
  for (int64_t i = 0; i < n; ++i) {
    const double c0 = process_cpu_ms(), pf0 = minor_faults();
    auto t0 = std::chrono::steady_clock::now();
    CoEOutput out = model.forward(batches[i].first, batches[i].second);
    double loss = out.loss.item();  // a device sync on CUDA: the forward is done
    double f = ms_since(t0);
    auto t1 = std::chrono::steady_clock::now();
    out.total_loss.backward();
    clip_grad_norm(params, 1.0f);  // one copy of the norms to the host: the backward is done
    double bw = ms_since(t1);
    auto t2 = std::chrono::steady_clock::now();
    opt.step();
    {
      FreshSums fresh(opt);  // as the trainer: the step's own sums of squares (CPU)
      model.after_step();    // one copy of the experts' weight and gradient norms: the update is done
    }
    opt.zero_grad();
    double op = ms_since(t2);
    double total = ms_since(t0);
    double cpu = process_cpu_ms() - c0, faults = minor_faults() - pf0;
    if (!std::isfinite(loss)) fail("non-finite loss at step ", i);
    if (i == 0) r.first_loss = loss;
    r.last_loss = loss;
    r.losses.push_back(loss);
    if (i >= o.warmup) {
      r.step_ms.push_back(total);
      r.cpu_ms.push_back(cpu);
      r.faults.push_back(faults);
      r.fwd_ms.push_back(f);
      r.bwd_ms.push_back(bw);
      r.opt_ms.push_back(op);
    }
  }
#if CM_CUDA
  if (dev == Device::CUDA) r.peak_device_bytes = (int64_t)cuda::mem_stats().peak;
#endif
  return r;
}

// ---------------------------------------------------------------- child <-> parent

std::string join(const std::vector<double>& v) {
  std::string s;
  char buf[32];
  for (size_t i = 0; i < v.size(); ++i) {
    std::snprintf(buf, sizeof buf, "%s%.9g", i ? "," : "", v[i]);
    s += buf;
  }
  return s;
}
std::vector<double> split_d(const std::string& s) {
  std::vector<double> v;
  std::stringstream ss(s);
  std::string x;
  while (std::getline(ss, x, ',')) v.push_back(std::atof(x.c_str()));
  return v;
}

// One line "key=value;key=value;..." (values contain no ';').
std::string encode(const Result& r) {
  std::ostringstream os;
  os.precision(9);
  os << "name=" << r.name << ";router=" << r.router << ";tree=" << r.tree << ";N=" << r.N << ";K=" << r.K
     << ";params=" << r.params << ";active=" << r.active << ";threads=" << r.threads
     << ";peak_dev=" << r.peak_device_bytes << ";flops=" << r.flops_per_token << ";first_loss=" << r.first_loss
     << ";last_loss=" << r.last_loss << ";step=" << join(r.step_ms) << ";fwd=" << join(r.fwd_ms)
     << ";bwd=" << join(r.bwd_ms) << ";opt=" << join(r.opt_ms) << ";cpu=" << join(r.cpu_ms) << ";faults=" << join(r.faults) << ";losses=" << join(r.losses) << "\n";
  return os.str();
}
Result decode(const std::string& line) {
  std::map<std::string, std::string> m;
  std::stringstream ss(line);
  std::string kv;
  while (std::getline(ss, kv, ';')) {
    size_t eq = kv.find('=');
    if (eq != std::string::npos) m[kv.substr(0, eq)] = kv.substr(eq + 1);
  }
  Result r;
  r.name = m["name"];
  r.router = m["router"];
  r.tree = m["tree"];
  r.N = std::atoll(m["N"].c_str());
  r.K = std::atoll(m["K"].c_str());
  r.params = std::atoll(m["params"].c_str());
  r.active = std::atoll(m["active"].c_str());
  r.threads = std::atoll(m["threads"].c_str());
  r.peak_device_bytes = std::atoll(m["peak_dev"].c_str());
  r.flops_per_token = std::atof(m["flops"].c_str());
  r.first_loss = std::atof(m["first_loss"].c_str());
  r.last_loss = std::atof(m["last_loss"].c_str());
  r.step_ms = split_d(m["step"]);
  r.fwd_ms = split_d(m["fwd"]);
  r.bwd_ms = split_d(m["bwd"]);
  r.opt_ms = split_d(m["opt"]);
  r.cpu_ms = split_d(m["cpu"]);
  r.faults = split_d(m["faults"]);
  r.losses = split_d(m["losses"]);
  return r;
}

struct ChildOutcome {
  bool ok = false;
  std::string error;  // why not
  Result result;
  long max_rss_kib = 0;
};

ChildOutcome run_in_child(const std::string& name, const bench::ModelSize& size, int64_t B, const Options& o,
                          Device dev, int round) {
  int fd[2];
  CM_CHECK(pipe(fd) == 0, "pipe: ", std::strerror(errno));
  std::fflush(stdout);
  pid_t pid = fork();
  CM_CHECK(pid >= 0, "fork: ", std::strerror(errno));
  if (pid == 0) {
    close(fd[0]);
    std::string msg;
    try {
      msg = encode(run_config(name, size, B, o, dev, round));
    } catch (const std::exception& e) {
      msg = std::string("error=") + e.what();
      std::replace(msg.begin(), msg.end(), '\n', ' ');
      msg += "\n";
    }
    ssize_t w = write(fd[1], msg.data(), msg.size());
    (void)w;
    close(fd[1]);
    _exit(0);
  }
  close(fd[1]);
  std::string text;
  char buf[4096];
  ssize_t n;
  while ((n = read(fd[0], buf, sizeof buf)) > 0) text.append(buf, (size_t)n);
  close(fd[0]);
  int status = 0;
  struct rusage ru;
  std::memset(&ru, 0, sizeof ru);
  wait4(pid, &status, 0, &ru);
  ChildOutcome c;
  c.max_rss_kib = ru.ru_maxrss;
  if (WIFSIGNALED(status)) {
    c.error = std::string("crashed (signal ") + std::to_string(WTERMSIG(status)) + ": " + strsignal(WTERMSIG(status)) +
              ")";
  } else if (text.rfind("error=", 0) == 0) {
    c.error = "skipped: " + text.substr(6, text.size() - 7);
  } else if (text.empty()) {
    c.error = "no result (exit status " + std::to_string(WEXITSTATUS(status)) + ")";
  } else {
    c.ok = true;
    c.result = decode(text);
  }
  return c;
}

double median(std::vector<double> v) {
  if (v.empty()) return NAN;
  std::sort(v.begin(), v.end());
  size_t m = v.size() / 2;
  return v.size() % 2 ? v[m] : 0.5 * (v[m - 1] + v[m]);
}

}  // namespace

int main(int argc, char** argv) {
  reexec_with_passive_openmp(argv);  // sleeping OpenMP waits on a shared machine (model/trainer.h), as train_lm
  Options o = parse(argc, argv);
  // Device resolution without touching OpenMP (see the header): cuda_available() only asks the runtime.
  Device dev = Device::CPU;
  if (o.device == "cuda" || (o.device == "auto" && cuda_available())) dev = Device::CUDA;
  if (dev == Device::CUDA && !cuda_available()) {
    std::fprintf(stderr, "train_bench: --device cuda: no CUDA device here (or this build has no CUDA)\n");
    return 2;
  }
  if (o.size.empty()) o.size = dev == Device::CUDA ? "gpu" : "cpu";
  const bench::ModelSize size = o.size == "gpu" ? bench::gpu_size() : bench::cpu_size();
  const int64_t B = o.B > 0 ? o.B : o.size == "gpu" ? 64 : 12;
  const int64_t T = size.seq_len;

  std::map<std::string, ChildOutcome> acc;  // per config: results of all rounds merged
  for (int round = 0; round < o.rounds; ++round)
    for (const auto& name : o.configs) {
      ChildOutcome c = run_in_child(name, size, B, o, dev, round);
      ChildOutcome& a = acc[name];
      if (!c.ok) {
        if (a.error.empty()) a.error = c.error;
        continue;
      }
      if (!a.ok) {
        a = c;
        continue;
      }
      auto append = [](std::vector<double>& d, const std::vector<double>& s) { d.insert(d.end(), s.begin(), s.end()); };
      append(a.result.step_ms, c.result.step_ms);
      append(a.result.fwd_ms, c.result.fwd_ms);
      append(a.result.bwd_ms, c.result.bwd_ms);
      append(a.result.opt_ms, c.result.opt_ms);
      append(a.result.cpu_ms, c.result.cpu_ms);
      append(a.result.faults, c.result.faults);
      a.max_rss_kib = std::max(a.max_rss_kib, c.max_rss_kib);
      a.result.peak_device_bytes = std::max(a.result.peak_device_bytes, c.result.peak_device_bytes);
    }

  const double tokens = (double)(B * T);
  double dense_tps = NAN, dense_cpu = NAN;
  if (acc.count("dense") && acc["dense"].ok) {
    dense_tps = tokens / (median(acc["dense"].result.step_ms) / 1e3);
    dense_cpu = median(acc["dense"].result.cpu_ms);
  }
  int64_t threads = 1;
  for (auto& kv : acc)
    if (kv.second.ok) threads = kv.second.result.threads;

  if (!o.json) {
    std::printf("train_bench: device %s (%lld threads), size %s: C=%lld L=%lld H=%lld F=%lld (experts F/2, 16 experts, "
                "2 per token) V=%lld, batch B=%lld x T=%lld = %lld tokens/step\n",
                device_name(dev), (long long)threads, o.size.c_str(), (long long)size.d_model,
                (long long)size.n_layers, (long long)size.n_heads, (long long)size.d_ff, (long long)size.vocab,
                (long long)B, (long long)T, (long long)(B * T));
    const char* wait = std::getenv("OMP_WAIT_POLICY");
    std::printf("%lld rounds x (%lld warm-up + %lld timed steps) per config, interleaved; medians over the timed steps; "
                "OMP_WAIT_POLICY=%s\n\n",
                (long long)o.rounds, (long long)o.warmup, (long long)o.steps, wait ? wait : "unset");
    std::printf("| config | routing tree | params | active/token | MFLOP/token | ms/step | fwd | bwd+clip | opt+after | "
                "tokens/s | vs dense | CPU ms/step | vs dense (CPU) | GFLOP/s%s | peak %s MiB | page faults/step |\n",
                dev == Device::CUDA ? " (MFU)" : "", dev == Device::CUDA ? "device" : "RSS");
    std::printf("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
  }
  for (const auto& name : o.configs) {
    const ChildOutcome& c = acc[name];
    if (!c.ok) {
      if (o.json) std::printf("{\"config\":\"%s\",\"error\":\"%s\"}\n", name.c_str(), c.error.c_str());
      else std::printf("| %s | %s |\n", name.c_str(), c.error.c_str());
      continue;
    }
    const Result& r = c.result;
    const double ms = median(r.step_ms), tps = tokens / (ms / 1e3), gflops = r.flops_per_token * tps / 1e9;
    const double peak_mib = dev == Device::CUDA ? (double)r.peak_device_bytes / (1 << 20) : (double)c.max_rss_kib / 1024;
    if (o.json) {
      std::printf("{\"config\":\"%s\",\"device\":\"%s\",\"threads\":%lld,\"B\":%lld,\"T\":%lld,\"params\":%lld,"
                  "\"active\":%lld,\"flops_per_token\":%.6g,\"ms_step\":%.4f,\"ms_fwd\":%.4f,\"ms_bwd\":%.4f,"
                  "\"ms_opt\":%.4f,\"cpu_ms_step\":%.4f,\"cpu_step_ms\":[%s],\"tokens_per_s\":%.2f,\"gflops\":%.4f,\"peak_mib\":%.1f,\"faults_step\":%.1f,\"samples\":%zu,"
                  "\"step_ms\":[%s],\"losses\":[%s]}\n",
                  name.c_str(), device_name(dev), (long long)r.threads, (long long)B, (long long)T,
                  (long long)r.params, (long long)r.active, r.flops_per_token, ms, median(r.fwd_ms), median(r.bwd_ms),
                  median(r.opt_ms), median(r.cpu_ms), join(r.cpu_ms).c_str(), tps, gflops, peak_mib, median(r.faults), r.step_ms.size(), join(r.step_ms).c_str(), join(r.losses).c_str());
      continue;
    }
    char g[64];
    if (dev == Device::CUDA) std::snprintf(g, sizeof g, "%.1f (%.1f%%)", gflops, 100.0 * gflops / (o.peak_tflops * 1e3));
    else std::snprintf(g, sizeof g, "%.1f", gflops);
    const double cpu = median(r.cpu_ms);
    std::printf("| %s | %s | %.2fM | %.2fM | %.2f | %.1f | %.1f | %.1f | %.1f | %.0f | %.2f | %.1f | %.2f | %s | %.0f | %.0f |\n",
                name.c_str(), r.tree.c_str(), r.params / 1e6, r.active / 1e6, r.flops_per_token / 1e6, ms,
                median(r.fwd_ms), median(r.bwd_ms), median(r.opt_ms), tps, tps / dense_tps, cpu, dense_cpu / cpu, g,
                peak_mib, median(r.faults));
  }
  if (!o.json && dev == Device::CUDA)
    std::printf("\nMFU against a peak of %.0f TFLOP/s (--peak_tflops; 67 = H100 SXM FP32, our default precision)\n",
                o.peak_tflops);
  return 0;
}
