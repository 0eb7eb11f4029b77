// Flag parsing for train_lm and sample: syntax, conversions, ranges, presets, and the errors for bad input.
#include <doctest/doctest.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "model/cli.h"
#include "model/trainer.h"

using namespace cm;

namespace {

TrainOptions resolve(const std::vector<std::string>& args) {
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

// The value of flag `name` as values() shows it ("1"/"0" for bools) after resolving `args`.
std::string flag_value(const std::vector<std::string>& args, const std::string& name) {
  TrainOptions o = resolve(args);
  bool h = false;
  Flags f("t", "");
  add_train_flags(f, o, &h);
  for (const auto& kv : f.values())
    if (kv.first == name) return kv.second;
  return "(no flag --" + name + ")";
}

std::string train_usage() {
  bool help = false;
  std::string usage;
  resolve_train_args({"--help"}, &help, &usage);
  return usage;
}

// The usage line of --name ("" if none).
std::string usage_line(const std::string& usage, const std::string& name) {
  size_t p = usage.find("\n  --" + name + " ");
  if (p == std::string::npos) return "";
  return usage.substr(p + 1, usage.find('\n', p + 1) - p - 1);
}

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

  TEST_CASE("cli: every bool setting takes 1/0, true/false, on/off, yes/no or nothing; other words name the flag") {
    bool h = false;
    TrainOptions o;
    Flags f("t", "");
    add_train_flags(f, o, &h);
    std::vector<std::string> bools = f.bool_flags();
    auto is_bool = [&](const std::string& n) { return std::find(bools.begin(), bools.end(), n) != bools.end(); };
    // Every bool field of CoEConfig is a bool flag (a new field declared otherwise in the table fails here).
    for (const auto& kv : CoEConfig().to_map())
      if (kv.second == "true" || kv.second == "false") CHECK_MESSAGE(is_bool(kv.first), kv.first);
    for (const char* n : {"aux_free_bias", "use_reliability", "enable_expert_pruning", "use_adaptive_routing",
                          "ac_scaling", "bias", "tie_embeddings", "use_expert_selection_cache",
                          "tf32", "decay_embeddings", "help"})
      CHECK_MESSAGE(is_bool(n), n);
    for (const std::string& b : bools) {
      if (b == "help") continue;
      const std::string flag = "--" + b;
      for (const char* w : {"1", "true", "on", "yes"}) {
        CHECK_MESSAGE(flag_value({flag, "off", flag, w}, b) == "1", flag, " ", w);
        CHECK_MESSAGE(flag_value({flag + "=0", flag + "=" + w}, b) == "1", flag, "=", w);
      }
      for (const char* w : {"0", "false", "off", "no"}) {
        CHECK_MESSAGE(flag_value({flag, "on", flag, w}, b) == "0", flag, " ", w);
        CHECK_MESSAGE(flag_value({flag + "=1", flag + "=" + w}, b) == "0", flag, "=", w);
      }
      // Bare: true, whether last or followed by another flag (whose value is still read).
      CHECK_MESSAGE(flag_value({flag, "0", flag}, b) == "1", flag);
      CHECK(flag_value({flag, "0", flag, "--max_steps", "7"}, b) == "1");
      CHECK(resolve({flag, "0", flag, "--max_steps", "7"}).max_steps == 7);
      for (const std::vector<std::string>& bad : {std::vector<std::string>{flag, "maybe"}, {flag + "=2"}, {flag + "="},
                                                  {flag, "On"}, {flag, "-1"}}) {
        std::string e = usage_error(bad);
        CHECK_MESSAGE(contains(e, flag + ": expected one of 1|0, true|false, on|off, yes|no"), e);
      }
    }
    // The value reaches the model's config.
    CHECK(resolve({"--aux_free_bias"}).model.aux_free_bias);
    CHECK(resolve({"--aux_free_bias", "on"}).model.aux_free_bias);
    CHECK_FALSE(resolve({"--use_reliability", "off"}).model.use_reliability);
    CHECK(resolve({"--use_reliability", "off", "--use_reliability"}).model.use_reliability);
    CHECK(resolve({"--enable_expert_pruning", "true"}).model.enable_expert_pruning);
    CHECK(resolve({"--use_adaptive_routing=yes"}).model.use_adaptive_routing);
    CHECK(resolve({"--gate_mode", "product"}).model.gate_mode == GateMode::Product);
    CHECK(resolve({"--tf32", "on"}).tf32);
    // The checkpoint's config map reads the same words (CoEConfig::set).
    CoEConfig c;
    c.set("aux_free_bias", "on");
    CHECK(c.aux_free_bias);
    c.set("aux_free_bias", "no");
    CHECK_FALSE(c.aux_free_bias);
    CHECK_THROWS_AS(c.set("aux_free_bias", "maybe"), Error);
  }

  TEST_CASE("cli: sample's bool flag parses as train_lm's") {
    for (const auto& [args, expect] : std::vector<std::pair<std::vector<std::string>, bool>>{
             {{"--cache", "off"}, false},
             {{"--cache=no"}, false},
             {{"--cache", "0", "--cache"}, true},
             {{"--cache", "false", "--cache", "on", "--seed", "3"}, true},
             {{"--cache", "false"}, false}}) {
      SampleOptions o;
      bool help = false;
      Flags f("sample", "");
      add_sample_flags(f, o, &help);
      f.apply(f.split(args));
      CHECK(o.use_cache == expect);
    }
    SampleOptions o;
    bool help = false;
    Flags f("sample", "");
    add_sample_flags(f, o, &help);
    std::string e;
    try {
      f.apply(f.split({"--cache", "maybe"}));
    } catch (const UsageError& x) {
      e = x.what();
    }
    CHECK_MESSAGE(contains(e, "--cache: expected one of 1|0, true|false, on|off, yes|no"), e);
  }

  TEST_CASE("cli: --help gives every flag a description and a range, and defaults as a user writes them") {
    const std::string usage = train_usage();
    bool h = false;
    TrainOptions o;
    Flags f("t", "");
    add_train_flags(f, o, &h);
    for (const auto& i : f.infos()) {
      CHECK_MESSAGE(i.help.size() >= 8, "--", i.name, " has no description");
      CHECK_MESSAGE(!contains(i.help, "model setting"), "--", i.name);
      CHECK_MESSAGE(i.help.find('\n') == std::string::npos, "--", i.name);
      CHECK_MESSAGE(!i.range.empty(), "--", i.name);
      std::string line = usage_line(usage, i.name);
      CHECK_MESSAGE(contains(line, i.help), "--", i.name, ": ", line);
      CHECK_MESSAGE(contains(line, i.range), "--", i.name, ": ", line);
    }
    // Every CoEConfig field has a description in its table, and every one not derived is a flag.
    for (const ConfigKey& k : config_keys()) {
      CHECK_MESSAGE(k.help.size() >= 8, k.key);
      if (!k.derived && k.key != "tree_branching") CHECK_MESSAGE(f.has(k.key), k.key);
    }
    // Defaults (the cpu preset's) print as written: no float noise anywhere in the usage.
    CHECK(contains(usage_line(usage, "lr"), "(0.001)"));
    CHECK(contains(usage_line(usage, "min_lr"), "(0.0001)"));
    CHECK(contains(usage_line(usage, "beta1"), "(0.9)"));
    CHECK(contains(usage_line(usage, "beta2"), "(0.99)"));
    CHECK(contains(usage_line(usage, "router_z_loss_weight"), "(0.001)"));
    CHECK(contains(usage_line(usage, "reliability_decay"), "(0.9)"));
    CHECK(contains(usage_line(usage, "reliability_decay"), "[0, 1)"));
    CHECK(contains(usage_line(usage, "init_std"), "(0, 1e30]"));
    CHECK(contains(usage_line(usage, "grad_clip"), "[0, 1000000]"));
    CHECK(contains(usage_line(usage, "aux_free_bias"), "[0|1]"));
    CHECK(contains(usage_line(usage, "router"), "dense|flat|cluster|tree|ac"));
    // No float noise (0.00100000005, 0.899999976): no fraction of more than 6 digits anywhere.
    for (size_t p = usage.find('.'); p != std::string::npos; p = usage.find('.', p + 1)) {
      if (p == 0 || !std::isdigit((unsigned char)usage[p - 1])) continue;  // "1..10" is a range, not a fraction
      size_t n = 0;
      while (p + 1 + n < usage.size() && std::isdigit((unsigned char)usage[p + 1 + n])) ++n;
      CHECK_MESSAGE(n <= 6, usage.substr(p > 20 ? p - 20 : 0, 40));
    }
    CHECK_FALSE(contains(usage, "model setting"));
    // sample too.
    SampleOptions so;
    Flags fs("sample", "");
    add_sample_flags(fs, so, &h);
    for (const auto& i : fs.infos()) {
      CHECK_MESSAGE(i.help.size() >= 8, "--", i.name);
      CHECK_MESSAGE(!i.range.empty(), "--", i.name);
    }
    CHECK(contains(usage_line(fs.usage(), "temperature"), "(0.8)"));
  }

  TEST_CASE("cli: numbers print in their shortest exact form") {
    CHECK(format_float(1e-3f) == "0.001");
    CHECK(format_float(0.9f) == "0.9");
    CHECK(format_float(0.99f) == "0.99");
    CHECK(format_float(1e-4f) == "0.0001");
    CHECK(format_float(3e-5f) == "3e-5");
    CHECK(format_float(1.0f) == "1");
    CHECK(format_float(0.0f) == "0");
    CHECK(format_float(-2.5f) == "-2.5");
    CHECK(format_float(1337.f) == "1337");
    CHECK(format_float(1e6f) == "1000000");
    CHECK(format_float(1e20f) == "1e20");
    CHECK(format_float(16777216.f) == "16777216");
    CHECK(format_float(0.1f + 0.2f) == "0.3");  // float sum: 0.3f exactly
    CHECK(format_double(0.1 + 0.2) == "0.30000000000000004");
    CHECK(format_double(1e6) == "1000000");
    CHECK(format_double(0.95) == "0.95");
    // Random bit patterns: the text reads back as the same value, and one digit fewer would not.
    uint32_t s = 12345;
    int checked = 0;
    for (int i = 0; i < 20000; ++i) {
      s ^= s << 13, s ^= s >> 17, s ^= s << 5;
      float v;
      std::memcpy(&v, &s, 4);
      if (!std::isfinite(v)) continue;
      std::string t = format_float(v);
      REQUIRE_MESSAGE(std::strtof(t.c_str(), nullptr) == v, t);
      std::string sig;  // significant digits: no leading zeros, no trailing ones
      for (char ch : t.substr(0, t.find('e')))
        if (ch >= '0' && ch <= '9' && !(sig.empty() && ch == '0')) sig += ch;
      while (!sig.empty() && sig.back() == '0') sig.pop_back();
      const int digits = (int)sig.size();
      if (digits > 1) {
        char shorter[40];
        std::snprintf(shorter, sizeof shorter, "%.*e", digits - 2, (double)v);
        CHECK_MESSAGE(std::strtof(shorter, nullptr) != v, t, " vs ", shorter);
      }
      ++checked;
    }
    CHECK(checked > 15000);
  }

  TEST_CASE("cli: --deterministic is retired with a message that says why") {
    for (const std::vector<std::string>& a : {std::vector<std::string>{"--deterministic"}, {"--deterministic", "1"},
                                              {"--deterministic=0"}}) {
      std::string e = usage_error(a);
      CHECK_MESSAGE(contains(e, "--deterministic was removed: every run is bit-reproducible"), e);
    }
    bool h = false;
    TrainOptions o;
    Flags f("t", "");
    add_train_flags(f, o, &h);
    CHECK_FALSE(f.has("deterministic"));  // a checkpoint that stored it resumes without it
    CHECK_FALSE(contains(train_usage(), "--deterministic"));
  }

  TEST_CASE("cli: seeds use the whole uint64 range in the config's text form") {
    for (uint64_t seed : {(uint64_t)0, (uint64_t)1337, (uint64_t)1 << 63, ~(uint64_t)0}) {
      CoEConfig c;
      c.seed = seed;
      CHECK(CoEConfig::from_map(c.to_map()).seed == seed);
      CHECK(resolve({"--seed", std::to_string(seed)}).model_config(65).seed == seed);
    }
    CoEConfig c;
    CHECK_THROWS_AS(c.set("seed", "18446744073709551616"), Error);
    CHECK_THROWS_AS(c.set("seed", "-1"), Error);
    CHECK_THROWS_AS(c.set("seed", "12x"), Error);
  }

}  // TEST_SUITE
