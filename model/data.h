// Training data: a corpus of bytes, tokenized by the byte vocabulary, split 90/10 by position (nanoGPT: the
// first 90% trains, the last 10% validates), served as random windows of T+1 tokens (x = the first T, y = the
// last T, shifted by one).
//
// Windows come from a counter-based stream (engine/rng.h): window j of the run uses Philox block (offset + j), so
// the data order is a function of (seed, offset) alone. That pair is the whole "data RNG state" a checkpoint
// stores, and a resumed run draws exactly the windows the uninterrupted run would have drawn.
#pragma once
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "engine/rng.h"
#include "engine/tensor.h"
#include "model/tokenizer.h"

namespace cm {

struct Corpus {
  std::string source;  // what was read: a path, or a description of the fallback
  std::string note;    // one line for the console when the default was replaced by a fallback ("" otherwise)
  std::string bytes;
};

// The file at `path`, whole. Missing, unreadable or empty: cm::Error naming the path.
Corpus read_corpus(const std::string& path);
// The default corpus: data/tinyshakespeare.txt (relative to the working directory); else the text of Debian's
// fortunes package under `fortunes_dir`; else a cm::Error that tells the user what to run.
Corpus default_corpus(const std::string& tinyshakespeare = "data/tinyshakespeare.txt",
                      const std::string& fortunes_dir = "/usr/share/games/fortunes");

enum class Split { Train, Val };

class TextDataset {
 public:
  // Encodes `bytes` with `tok` and splits it. Both splits must hold at least one window of seq_len + 1 tokens;
  // the error says how long the file is and what would fit.
  TextDataset(const std::string& bytes, const ByteTokenizer& tok, int64_t seq_len);

  int64_t seq_len() const { return T_; }
  int64_t size(Split s) const { return (int64_t)(s == Split::Train ? train_.size() : val_.size()); }

  // B random windows of `s`: x, y i32 [B, T] on `device`; advances gen.offset by B.
  std::pair<Tensor, Tensor> batch(Split s, int64_t B, Generator& gen, Device device = Device::CPU) const;

 private:
  int64_t T_;
  std::vector<int32_t> train_, val_;  // token ids
};

}  // namespace cm
