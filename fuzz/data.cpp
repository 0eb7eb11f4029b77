// Fuzz target: the data loader (model/data.*, model/tokenizer.*): the corpus file, the fortunes fallback, the
// byte tokenizer and the random windows.
// Input: byte 0 picks T (seq_len 1..32), byte 1 picks B (1..8); the rest is the corpus. Properties beyond
// "no crash, no leak, no UB":
//   - every rejection is a cm::Error; nothing else escapes;
//   - read_corpus returns the file's bytes exactly; decode(encode(corpus)) == corpus;
//   - the vocabulary round-trips through to_hex/from_hex;
//   - every window is a slice of its split: ids in [0, V), y is x shifted by one.
#include <sys/stat.h>

#include "fuzz/fuzz_util.h"
#include "model/data.h"
#include "model/tokenizer.h"

using namespace cm;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 2) return 0;
  const int64_t T = 1 + data[0] % 32, B = 1 + data[1] % 8;
  const std::string bytes(reinterpret_cast<const char*>(data + 2), size - 2);

  // ---- read_corpus: the file, whole, or an error for an empty one
  const std::string path = fuzz::write_file("corpus.txt", data + 2, size - 2);
  try {
    Corpus c = read_corpus(path);
    FUZZ_ASSERT(c.bytes == bytes, "read_corpus did not return the file's bytes");
  } catch (const Error&) {
    FUZZ_ASSERT(bytes.empty(), "read_corpus rejected a non-empty file");
  }

  // ---- the fortunes fallback: one fortune file holding the input
  const std::string dir = fuzz::scratch_dir() + "/fortunes";
  ::mkdir(dir.c_str(), 0700);
  fuzz::write_file("fortunes/f", data + 2, size - 2);
  try {
    Corpus c = default_corpus(fuzz::scratch_dir() + "/no-such-file.txt", dir);
    FUZZ_ASSERT(!c.bytes.empty(), "an empty fallback corpus was accepted");
  } catch (const Error&) {
  }

  // ---- tokenizer and windows
  ByteTokenizer tok;
  try {
    tok = ByteTokenizer::from_corpus(bytes);
  } catch (const Error&) {
    FUZZ_ASSERT(bytes.empty(), "from_corpus rejected a non-empty corpus");
    return 0;
  }
  FUZZ_ASSERT(ByteTokenizer::from_hex(tok.to_hex()).vocab() == tok.vocab(), "vocabulary changed in a hex round trip");
  const std::vector<int32_t> ids = tok.encode(bytes);
  FUZZ_ASSERT(tok.decode(ids) == bytes, "decode(encode(corpus)) != corpus");
  try {
    TextDataset ds(bytes, tok, T);
    Generator g(data[0] * 256u + data[1], 0);
    for (Split s : {Split::Train, Split::Val}) {
      auto xy = ds.batch(s, B, g);
      const int32_t* x = xy.first.i32();
      const int32_t* y = xy.second.i32();
      for (int64_t b = 0; b < B; ++b)
        for (int64_t t = 0; t < T; ++t) {
          const int64_t i = b * T + t;
          FUZZ_ASSERT(x[i] >= 0 && x[i] < tok.vocab_size() && y[i] >= 0 && y[i] < tok.vocab_size(), "id out of range");
          if (t + 1 < T) FUZZ_ASSERT(y[i] == x[i + 1], "y is not x shifted by one");
        }
    }
    FUZZ_ASSERT(g.offset == (uint64_t)(2 * B), "batch() must advance the generator by B per call");
  } catch (const Error&) {
  }
  return 0;
}
