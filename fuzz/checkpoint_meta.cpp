// Fuzz target: what a checkpoint's metadata feeds into - the JSON reader/writer (model/json.*), the model config
// (CoEConfig::from_map, as sample.cpp reads "config"), the stored training settings (train_lm --resume reads
// "train_options" through resolve_train_args) and the tokenizer's vocabulary ("tokenizer", hex).
// Input: one text, tried as each of them. Properties beyond "no crash, no leak, no UB":
//   - every rejection is a cm::Error (UsageError included); nothing else escapes;
//   - json_dump of a parsed value parses back to a value that dumps to the same text;
//   - an accepted config round-trips through to_map/from_map unchanged;
//   - an accepted vocabulary round-trips through to_hex/from_hex unchanged.
#include <map>

#include "fuzz/fuzz_util.h"
#include "model/checkpoint.h"
#include "model/config.h"
#include "model/json.h"
#include "model/tokenizer.h"
#include "model/trainer.h"

using namespace cm;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);

  // ---- JSON, and the config as sample.cpp reads it
  Json j;
  bool parsed = false;
  try {
    j = json_parse(text);
    parsed = true;
  } catch (const Error&) {
  }
  if (parsed) {
    const std::string once = json_dump(j);
    Json again;
    try {
      again = json_parse(once);
    } catch (const Error& e) {
      FUZZ_ASSERT(false, e.what());  // our own output must parse
    }
    FUZZ_ASSERT(json_dump(again) == once, "json_dump(json_parse(json_dump(x))) != json_dump(x)");

    if (j.is(Json::Kind::Object)) {
      try {
        std::map<std::string, std::string> m;
        for (const auto& kv : j.obj) m[kv.first] = kv.second.as_string("config." + kv.first);
        CoEConfig c = CoEConfig::from_map(m);
        CoEConfig c2 = CoEConfig::from_map(c.to_map());
        FUZZ_ASSERT(c2.to_map() == c.to_map(), "CoEConfig changed in a to_map/from_map round trip");
      } catch (const Error&) {
      }
    }
  }

  // ---- the stored training settings, as train_lm --resume reads them (only the metadata is read there)
  {
    NamedTensors none;
    const std::string ck = fuzz::scratch_dir() + "/meta.safetensors";
    save_safetensors(ck, none, {{"train_options", text}});
    try {
      bool help = false;
        TrainOptions o = resolve_train_args({"--resume", ck}, &help, nullptr);
      o.model_config(65);  // what train() builds next (65: tinyshakespeare's vocabulary)
    } catch (const Error&) {
    }
  }

  // ---- the tokenizer's vocabulary
  try {
    ByteTokenizer t = ByteTokenizer::from_hex(text);
    FUZZ_ASSERT(ByteTokenizer::from_hex(t.to_hex()).vocab() == t.vocab(), "vocabulary changed in a hex round trip");
  } catch (const Error&) {
  }
  return 0;
}
