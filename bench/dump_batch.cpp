// Writes what bench/reference/check_parity.py needs to check the PyTorch reference against our model on one batch:
//
//   <out>/model.safetensors  parameters and buffers (the names of model.named_parameters() / named_buffers()), with
//                            the config in __metadata__["config"] as train_lm's checkpoints store it (a JSON object
//                            of CoEConfig key -> string)
//   <out>/batch.safetensors  ids, targets i32 [B, T]; our logits [B, T, V]; loss, load_balance_loss, z_loss,
//                            diversity_loss, aux_loss, total_loss (0-d); grad.<parameter> for every parameter that
//                            received a gradient from total_loss.backward(); layer.<l>.expert_rows i32 [N] (rows
//                            each expert computed: the routing decisions, summed) and layer.<l>.dropped (0-d)
//
// The model is either built from a bench config (bench/bench_configs.h) with --set overrides, optionally trained for
// --train_steps AdamW steps on random batches first (so that the buffers - reliability, output-norm statistics,
// usage, aux-free biases, AC running scales - hold trained values, not their initial ones), or loaded from a
// train_lm checkpoint (--ckpt). The forward runs in training mode (capacity, AC batch statistics) unless --eval.
//
//   make -j2 USE_CUDA=0 build/bench/dump_batch
//   ./build/bench/dump_batch --config cluster --out /tmp/parity/cluster [--train_steps 20] [--set key=value ...]
//   ./build/bench/dump_batch --ckpt out/ckpt_00002000.safetensors --out /tmp/parity/trained
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <iostream>
#include <map>
#include <string>
#include <vector>

#include "bench/bench_configs.h"
#include "model/checkpoint.h"
#include "model/coe.h"
#include "model/json.h"
#include "model/optim.h"

using namespace cm;

namespace {

struct Args {
  std::string config = "cluster", ckpt, out;
  std::vector<std::pair<std::string, std::string>> sets;  // --set key=value, in order
  int64_t B = 4, T = 32, train_steps = 0;
  uint64_t seed = 7;
  bool eval = false;
};

[[noreturn]] void usage(const std::string& why) {
  std::cerr << "dump_batch: " << why << "\n"
            << "usage: dump_batch --out DIR [--config dense|flat|cluster|tree|ac|ac_cluster] [--set key=value]...\n"
            << "                  [--ckpt train_lm.safetensors] [--B 4] [--T 32] [--seed 7] [--train_steps 0] "
               "[--eval]\n";
  std::exit(2);
}

Args parse(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    std::string k = argv[i];
    auto val = [&]() -> std::string {
      if (i + 1 >= argc) usage(k + " needs a value");
      return argv[++i];
    };
    auto num = [&]() -> int64_t {
      std::string v = val();
      char* end = nullptr;
      long long x = std::strtoll(v.c_str(), &end, 10);
      if (v.empty() || *end || x < 0) usage(k + " = '" + v + "': expected a non-negative integer");
      return x;
    };
    if (k == "--config") a.config = val();
    else if (k == "--ckpt") a.ckpt = val();
    else if (k == "--out") a.out = val();
    else if (k == "--B") a.B = num();
    else if (k == "--T") a.T = num();
    else if (k == "--seed") a.seed = (uint64_t)num();
    else if (k == "--train_steps") a.train_steps = num();
    else if (k == "--eval") a.eval = true;
    else if (k == "--set") {
      std::string kv = val();
      size_t eq = kv.find('=');
      if (eq == std::string::npos) usage("--set '" + kv + "': expected key=value");
      a.sets.emplace_back(kv.substr(0, eq), kv.substr(eq + 1));
    } else usage("unknown flag '" + k + "'");
  }
  if (a.out.empty()) usage("--out is required");
  if (a.B < 1 || a.T < 1) usage("--B and --T must be positive");
  return a;
}

// Uniform token ids in [0, V) from the counter-based stream: [B, T] i32.
Tensor random_ids(int64_t B, int64_t T, int64_t V, Generator& g) {
  std::vector<int32_t> v((size_t)(B * T));
  uint64_t off = g.take((uint64_t)v.size());
  for (size_t i = 0; i < v.size(); ++i) v[i] = (int32_t)std::min<int64_t>(V - 1, (int64_t)(philox_uniform(g.seed, off, i) * V));
  return Tensor::from_vector(v, {B, T});
}

std::string config_json(const CoEConfig& c) {
  Json j = Json::object();
  for (const auto& kv : c.to_map()) j.set(kv.first, Json::string(kv.second));
  return json_dump(j);
}

CoEConfig config_from_checkpoint(const SafeTensors& ck) {
  Json j = json_parse(ck.require_meta("config"));
  CM_REQUIRE(j.is(Json::Kind::Object), ck.path, ": metadata 'config' is not a JSON object");
  std::map<std::string, std::string> m;
  for (const auto& kv : j.obj) m[kv.first] = kv.second.as_string("config." + kv.first);
  return CoEConfig::from_map(m);
}

int run(const Args& a) {
  CoEConfig cfg;
  SafeTensors ck;
  if (!a.ckpt.empty()) {
    ck = load_safetensors(a.ckpt);
    cfg = config_from_checkpoint(ck);
  } else {
    bench::ModelSize s;
    s.d_model = 64;
    s.n_layers = 3;  // three MoE layers: AC's labels come from the previous one from layer 1 on
    s.n_heads = 4;
    s.d_ff = 256;
    s.vocab = 65;
    s.seq_len = 32;
    cfg = bench::make_config(a.config, s);
  }
  for (const auto& kv : a.sets) cfg.set(kv.first, kv.second);
  cfg.validate();
  CM_REQUIRE(a.T <= cfg.seq_len, "--T ", a.T, " exceeds the model's seq_len ", cfg.seq_len);

  ClusterMoELM model(cfg);
  if (!a.ckpt.empty()) {
    NamedTensors dst = model.named_parameters();
    for (auto& kv : model.named_buffers()) dst.push_back(kv);
    restore_tensors(ck, dst, "adamw.");
    ck = SafeTensors();
  }
  model.train(!a.eval);
  Generator g(a.seed);

  if (a.train_steps > 0) {
    AdamWOptions ao;
    ao.lr = 1e-2f;  // large, so that a few steps move weights and statistics visibly
    AdamW opt(model.named_parameters(), ao);
    model.train(true);
    for (int64_t s = 0; s < a.train_steps; ++s) {
      Tensor ids = random_ids(a.B, a.T + 1, cfg.vocab_size, g);
      CoEOutput o = model.forward(ids.slice(1, 0, a.T).contiguous(), ids.slice(1, 1, a.T + 1).contiguous());
      o.total_loss.backward();
      clip_grad_norm(model.named_parameters(), 1.0f);
      opt.step();
      model.after_step();
      opt.zero_grad();
    }
    model.train(!a.eval);
  }

  std::filesystem::create_directories(a.out);
  NamedTensors state = model.named_parameters();
  for (auto& kv : model.named_buffers()) state.push_back(kv);
  save_safetensors(a.out + "/model.safetensors", state,
                   {{"format", "clustermoe-bench/1"}, {"config", config_json(cfg)},
                    {"step", std::to_string(model.step())}});

  Tensor ids = random_ids(a.B, a.T + 1, cfg.vocab_size, g);
  Tensor x = ids.slice(1, 0, a.T).contiguous(), y = ids.slice(1, 1, a.T + 1).contiguous();
  CoEOutput o = model.forward(x, y);
  read_routing_stats(o.layers);  // a training forward's statistics stay on the device until read
  o.total_loss.backward();

  NamedTensors out = {{"ids", x},
                      {"targets", y},
                      {"logits", o.logits},
                      {"loss", o.loss},
                      {"load_balance_loss", o.load_balance_loss},
                      {"z_loss", o.z_loss},
                      {"diversity_loss", o.diversity_loss},
                      {"aux_loss", o.aux_loss},
                      {"total_loss", o.total_loss}};
  int64_t with_grad = 0;
  for (const auto& [name, p] : model.named_parameters())
    if (p.grad().defined()) {
      out.emplace_back("grad." + name, p.grad());
      ++with_grad;
    }
  for (const auto& st : o.layers) {
    std::vector<int32_t> rows(st.expert_rows.begin(), st.expert_rows.end());
    out.emplace_back("layer." + std::to_string(st.layer) + ".expert_rows",
                     Tensor::from_vector(rows, {(int64_t)rows.size()}));
    out.emplace_back("layer." + std::to_string(st.layer) + ".dropped", Tensor::scalar(st.dropped_fraction));
  }
  save_safetensors(a.out + "/batch.safetensors", out,
                   {{"format", "clustermoe-bench-batch/1"}, {"training", a.eval ? "false" : "true"}});
  std::printf("%s: %s router, %lld parameters (%lld with a gradient), loss %.6f, aux %.6g -> %s/\n",
              a.ckpt.empty() ? a.config.c_str() : a.ckpt.c_str(), router_kind_name(cfg.router),
              (long long)model.named_parameters().size(), (long long)with_grad, o.loss.item(), o.aux_loss.item(),
              a.out.c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  Args a = parse(argc, argv);
  try {
    return run(a);
  } catch (const Error& e) {
    std::cerr << "dump_batch: " << e.what() << "\n";
    return 2;
  }
}
