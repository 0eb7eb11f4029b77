// Fuzz target: the command-line flag parser (model/cli.*) with train_lm's and sample's flags, and train_lm's
// resolution of presets and cross-field checks (resolve_train_args, without --resume: that one reads files and
// is covered by the checkpoint_meta target).
// Input: NUL-separated arguments. Properties beyond "no crash, no leak, no UB":
//   - every rejection is a cm::Error (UsageError included); nothing else escapes;
//   - accepted options print (Flags::values) as text that set() reads back to the same options, which then pass
//     validate() again: what a checkpoint stores is what a resumed run gets.
#include "fuzz/fuzz_util.h"
#include "model/cli.h"
#include "model/trainer.h"

using namespace cm;

static std::vector<std::pair<std::string, std::string>> train_values(const TrainOptions& o) {
  TrainOptions copy = o;
  bool help = false;
  Flags f("train_lm", "");
  add_train_flags(f, copy, &help);
  return f.values();
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::vector<std::string> args(1);
  for (size_t i = 0; i < size; ++i) {
    if (data[i] == 0) {
      if (args.size() == 64) break;
      args.emplace_back();
    } else {
      args.back() += (char)data[i];
    }
  }
  for (const auto& a : args)
    if (a.compare(0, 8, "--resume") == 0) return 0;  // reads a checkpoint file: not this target's business

  // ---- train_lm
  TrainOptions o;
  bool ok = false;
  try {
    bool help = false;
    o = resolve_train_args(args, &help, nullptr);
    ok = !help;
  } catch (const Error&) {
  }
  if (ok) {
    auto vals = train_values(o);
    TrainOptions o2;
    bool help = false;
    Flags f("train_lm", "");
    add_train_flags(f, o2, &help);
    for (const auto& kv : vals) {
      try {
        f.set(kv.first, kv.second);
      } catch (const Error& e) {
        FUZZ_ASSERT(false, (kv.first + " = '" + kv.second + "' does not read back: " + e.what()).c_str());
      }
    }
    FUZZ_ASSERT(f.values() == vals, "options changed in a values()/set() round trip");
    try {
      o2.validate();
    } catch (const Error& e) {
      FUZZ_ASSERT(false, e.what());
    }
    try {
      o.model_config(65);
    } catch (const Error&) {
    }
  }

  // ---- sample
  try {
    SampleOptions so;
    bool help = false;
    Flags f("sample", "");
    add_sample_flags(f, so, &help);
    f.apply(f.split(args));
  } catch (const Error&) {
  }
  return 0;
}
