// Flag parsing for train_lm and sample: syntax, conversions, ranges, presets, and the errors for bad input.
#include <doctest/doctest.h>

#include <algorithm>
#include <string>
#include <vector>

#include "model/cli.h"
#include "model/trainer.h"

using namespace cm;

namespace {

// The cases here are about flags on the CPU: unless a case names --device, it is cpu. (--device auto would pick
// CUDA, and with it the shakespeare preset, wherever a device answers: a GPU, or the emulator of CUDA_EMU=1.)
TrainOptions resolve(std::vector<std::string> args) {
  if (std::find(args.begin(), args.end(), "--device") == args.end()) args.insert(args.begin(), {"--device", "cpu"});
  bool help = false;
  std::string usage;
  return resolve_train_args(args, &help, &usage);
}

// The message of the UsageError that `args` raise ("" if none).
std::string usage_error(const std::vector<std::string>& args) {
  try {
    resolve(args);
  } catch (const UsageError& e) {
    return e.what();
  }
  return "";
}

bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

}  // namespace

TEST_SUITE("cli") {
  TEST_CASE("cli: --name value and --name=value set the same field") {
    TrainOptions a = resolve({"--lr", "0.002", "--max_steps", "77", "--out_dir", "x"});
    TrainOptions b = resolve({"--lr=0.002", "--max_steps=77", "--out_dir=x"});
    CHECK(a.lr == 0.002f);
    CHECK(b.lr == 0.002f);
    CHECK(a.max_steps == 77);
    CHECK(b.max_steps == 77);
    CHECK(a.out_dir == "x");
    CHECK(b.out_dir == "x");
    // The last of repeated flags wins, as in most CLIs.
    CHECK(resolve({"--max_steps", "5", "--max_steps", "9"}).max_steps == 9);
    // A value may itself contain '=' or start with '-' (a negative number is then a range error, not a syntax one).
    CHECK(resolve({"--data=a=b.txt"}).data == "a=b.txt");
  }

  TEST_CASE("cli: booleans, bare flags and optional values") {
    CHECK(resolve({"--tf32"}).tf32);
    CHECK(resolve({"--tf32", "--lr", "0.01"}).tf32);
    CHECK_FALSE(resolve({"--tf32", "0"}).tf32);
    CHECK_FALSE(resolve({"--deterministic=false"}).deterministic);
    CHECK(resolve({"--deterministic", "on"}).deterministic);
    CHECK(contains(usage_error({"--tf32=maybe"}), "--tf32"));
    bool help = false;
    std::string usage;
    resolve_train_args({"--help"}, &help, &usage);
    CHECK(help);
    // The usage names every flag of the issue.
    for (const char* name : {"data",
                             "out_dir",
                             "device",
                             "preset",
                             "max_steps",
                             "batch_size",
                             "seq_len",
                             "grad_accum",
                             "lr",
                             "min_lr",
                             "warmup_steps",
                             "weight_decay",
                             "grad_clip",
                             "dropout",
                             "eval_every",
                             "eval_iters",
                             "sample_every",
                             "sample_len",
                             "save_every",
                             "keep_last",
                             "resume",
                             "seed",
                             "deterministic",
                             "router",
                             "tree",
                             "num_clusters",
                             "experts_per_cluster",
                             "top_k_clusters",
                             "top_k_experts",
                             "capacity_factor",
                             "load_balancing_weight",
                             "router_z_loss_weight",
                             "diversity_weight",
                             "d_model",
                             "n_layers",
                             "n_heads",
                             "d_ff",
                             "tf32",
                             "help"})
      CHECK_MESSAGE(contains(usage, std::string("--") + name + " "), name);
  }

  TEST_CASE("cli: unknown, malformed and out-of-range flags name the flag") {
    CHECK(contains(usage_error({"--learning_rate", "1"}), "unknown flag --learning_rate"));
    CHECK(contains(usage_error({"lr", "1"}), "unexpected argument 'lr'"));
    CHECK(contains(usage_error({"-lr", "1"}), "unexpected argument"));
    CHECK(contains(usage_error({"--lr"}), "--lr needs a value"));
    CHECK(contains(usage_error({"--lr", "abc"}), "--lr: expected a number, got 'abc'"));
    CHECK(contains(usage_error({"--lr", "1e-3x"}), "--lr"));
    CHECK(contains(usage_error({"--lr", "nan"}), "--lr"));
    CHECK(contains(usage_error({"--lr", "inf"}), "--lr"));
    CHECK(contains(usage_error({"--lr="}), "--lr"));
    CHECK(contains(usage_error({"--max_steps", "1.5"}), "--max_steps: expected an integer"));
    CHECK(contains(usage_error({"--max_steps", "12abc"}), "--max_steps"));
    CHECK(contains(usage_error({"--max_steps", " 12"}), "--max_steps"));
    CHECK(contains(usage_error({"--max_steps", "99999999999999999999"}), "--max_steps"));
    CHECK(contains(usage_error({"--seed", "-1"}), "--seed"));
    CHECK(contains(usage_error({"--max_steps", "0"}), "--max_steps must be in 1.."));
    CHECK(contains(usage_error({"--lr", "0"}), "--lr must be in (0"));
    CHECK(contains(usage_error({"--dropout", "1"}), "--dropout"));
    CHECK(contains(usage_error({"--batch_size", "-4"}), "--batch_size"));
    CHECK(contains(usage_error({"--router", "hash"}), "--router must be one of dense|flat|cluster|tree|ac"));
    CHECK(contains(usage_error({"--device", "tpu"}), "--device"));
    CHECK(contains(usage_error({"--preset", "huge"}), "--preset"));
    CHECK(contains(usage_error({"--router", "tree", "--tree", "4xx4"}), "--tree"));
    CHECK(contains(usage_error({"--router", "tree", "--tree", "4x0"}), "--tree"));
    CHECK(contains(usage_error({"--out_dir", ""}), "--out_dir"));
  }

  TEST_CASE("cli: cross-field checks name both flags") {
    CHECK(contains(usage_error({"--lr", "1e-4", "--min_lr", "1e-3"}), "--min_lr"));
    CHECK(contains(usage_error({"--router", "tree"}), "--router tree needs --tree"));
    CHECK(contains(usage_error({"--tree", "4x4"}), "only used with --router tree"));
    CHECK(contains(usage_error({"--router", "tree", "--tree", "4x4", "--tree_top_k", "1"}), "--tree_top_k"));
  }

  TEST_CASE("cli: presets set their fields and explicit flags win whatever their position") {
    TrainOptions d = resolve({});  // CPU here: the cpu preset
    CHECK(d.preset == "cpu");
    CHECK(d.model.n_layers == 4);
    CHECK(d.model.d_model == 128);
    CHECK(d.seq_len == 64);
    TrainOptions s = resolve({"--preset", "shakespeare"});
    CHECK(s.preset == "shakespeare");
    CHECK(s.model.n_layers == 6);
    CHECK(s.model.n_heads == 6);
    CHECK(s.model.d_model == 384);
    CHECK(s.seq_len == 256);
    CHECK(s.batch_size == 64);
    CHECK(s.max_steps == 5000);
    TrainOptions o = resolve({"--n_layers", "2", "--preset", "shakespeare", "--max_steps=10"});
    CHECK(o.model.n_layers == 2);
    CHECK(o.max_steps == 10);
    CHECK(o.model.d_model == 384);
  }

  TEST_CASE("cli: model flags reach CoEConfig, including keys without a dedicated flag") {
    TrainOptions o = resolve({"--router", "tree", "--tree", "2x2x2", "--top_k_clusters", "2", "--d_model", "32",
                              "--n_heads", "2", "--expert", "gelu"});
    CHECK(o.model.router == RouterKind::Tree);
    CHECK(o.model.tree_branching == std::vector<int64_t>{2, 2, 2});
    CHECK(o.model.expert == ExpertKind::GELU);
    CoEConfig c = o.model_config(65);
    CHECK(c.vocab_size == 65);
    CHECK(c.seq_len == o.seq_len);
    CHECK(c.seed == o.seed);
    CHECK(c.tree_top_k == std::vector<int64_t>{2, 1, 1});  // k_clusters at the root, k_experts at the leaves
    CHECK(c.num_clusters == 2);                            // --tree fixes the expert count
    CHECK(c.experts_per_cluster == 4);
    CHECK_THROWS_AS(resolve({"--expert", "relu6"}), Error);
  }

  TEST_CASE("cli: invalid model settings are reported when the config is built") {
    // 128 is not divisible by 3 heads: CoEConfig::validate names the field.
    TrainOptions o = resolve({"--n_heads", "3"});
    CHECK_THROWS_AS(o.model_config(65), Error);
    TrainOptions k = resolve({"--top_k_experts", "3", "--experts_per_cluster", "2"});
    CHECK_THROWS_AS(k.model_config(65), Error);
  }

  TEST_CASE("cli: values() reads back exactly through set()") {
    TrainOptions a = resolve({"--lr", "0.0003", "--min_lr", "3e-5", "--dropout", "0.1", "--seed",
                              "18446744073709551615", "--router", "tree", "--tree", "4x2", "--tree_top_k", "2x1"});
    bool h = false;
    Flags fa("t", ""), fb("t", "");
    TrainOptions b;
    add_train_flags(fa, a, &h);
    add_train_flags(fb, b, &h);
    for (const auto& kv : fa.values()) fb.set(kv.first, kv.second);
    auto va = fa.values(), vb = fb.values();
    REQUIRE(va.size() == vb.size());
    for (size_t i = 0; i < va.size(); ++i)
      CHECK_MESSAGE(va[i] == vb[i], va[i].first, ": ", va[i].second, " vs ", vb[i].second);
    CHECK(b.lr == a.lr);
    CHECK(b.min_lr == a.min_lr);
    CHECK(b.seed == 18446744073709551615ull);
    CHECK(b.model.tree_top_k == std::vector<int64_t>{2, 1});
  }

  TEST_CASE("cli: sample flags") {
    SampleOptions o;
    bool help = false;
    Flags f("sample", "");
    add_sample_flags(f, o, &help);
    f.apply(f.split({"--ckpt", "a.safetensors", "--prompt=ROMEO:", "--max_new_tokens", "7", "--temperature", "0",
                     "--top_k", "5", "--seed", "3"}));
    CHECK(o.ckpt == "a.safetensors");
    CHECK(o.prompt == "ROMEO:");
    CHECK(o.max_new_tokens == 7);
    CHECK(o.temperature == 0.0f);
    CHECK(o.top_k == 5);
    CHECK(o.seed == 3);
    CHECK_THROWS_AS(f.apply(f.split({"--temperature", "-1"})), UsageError);
    CHECK_THROWS_AS(f.apply(f.split({"--top_k", "x"})), UsageError);
    CHECK_THROWS_AS(f.split({"--ckpt"}), UsageError);
  }

}  // TEST_SUITE
