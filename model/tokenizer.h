// Byte-level tokenizer, nanoGPT's shakespeare_char way: the vocabulary is the sorted set of distinct bytes in the
// corpus, so V is small (65 for tinyshakespeare) and any file - text or binary - can be trained on.
// The vocabulary travels in the checkpoint (as hex), so sample.cpp decodes exactly what train_lm learned.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace cm {

class ByteTokenizer {
 public:
  ByteTokenizer() : ByteTokenizer(std::string()) {}
  // Vocabulary = the distinct bytes of `corpus`, ascending. An empty corpus is an error.
  static ByteTokenizer from_corpus(const std::string& corpus);
  // Inverse of to_hex(): two lowercase or uppercase hex digits per byte, strictly ascending, no repeats.
  static ByteTokenizer from_hex(const std::string& hex);

  int64_t vocab_size() const { return (int64_t)vocab_.size(); }
  const std::string& vocab() const { return vocab_; }  // id -> byte
  std::string to_hex() const;

  bool has(unsigned char byte) const { return id_[byte] >= 0; }
  // Every byte must be in the vocabulary; the error names the first one that is not and where it is.
  std::vector<int32_t> encode(const std::string& text) const;
  // Ids outside [0, V) are an error.
  std::string decode(const std::vector<int32_t>& ids) const;
  std::string decode_one(int32_t id) const { return decode({id}); }

 private:
  explicit ByteTokenizer(std::string vocab);
  std::string vocab_;  // [V] the bytes, ascending
  int16_t id_[256];    // byte -> id, -1 when absent
};

// A byte for messages: 'a', '\n', or 0x9c.
std::string byte_repr(unsigned char c);

}  // namespace cm
