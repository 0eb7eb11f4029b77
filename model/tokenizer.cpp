#include "model/tokenizer.h"

#include <cstdio>

#include "engine/check.h"

namespace cm {

std::string byte_repr(unsigned char c) {
  if (c == '\n') return "'\\n'";
  if (c == '\t') return "'\\t'";
  if (c >= 0x20 && c < 0x7f) return str("'", (char)c, "'");
  char buf[8];
  std::snprintf(buf, sizeof buf, "0x%02x", c);
  return buf;
}

ByteTokenizer::ByteTokenizer(std::string vocab) : vocab_(std::move(vocab)) {
  for (int b = 0; b < 256; ++b) id_[b] = -1;
  for (size_t i = 0; i < vocab_.size(); ++i) id_[(unsigned char)vocab_[i]] = (int16_t)i;
}

ByteTokenizer ByteTokenizer::from_corpus(const std::string& corpus) {
  CM_REQUIRE(!corpus.empty(), "cannot build a vocabulary from an empty corpus");
  bool seen[256] = {};
  for (unsigned char c : corpus) seen[c] = true;
  std::string v;
  for (int b = 0; b < 256; ++b)
    if (seen[b]) v += (char)b;
  return ByteTokenizer(v);
}

ByteTokenizer ByteTokenizer::from_hex(const std::string& hex) {
  CM_REQUIRE(!hex.empty() && hex.size() % 2 == 0 && hex.size() <= 512, "tokenizer: expected 2 to 512 hex digits, got ",
             hex.size(), " characters");
  auto digit = [&](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    fail("tokenizer: '", c, "' is not a hex digit");
  };
  std::string v;
  for (size_t i = 0; i < hex.size(); i += 2) {
    int b = digit(hex[i]) * 16 + digit(hex[i + 1]);
    // Strictly ascending: ids are positions in sorted order, so anything else is a corrupted vocabulary.
    CM_REQUIRE(v.empty() || (unsigned char)v.back() < b, "tokenizer: vocabulary bytes are not strictly ascending");
    v += (char)b;
  }
  return ByteTokenizer(v);
}

std::string ByteTokenizer::to_hex() const {
  static const char* d = "0123456789abcdef";
  std::string h;
  for (unsigned char c : vocab_) {
    h += d[c >> 4];
    h += d[c & 15];
  }
  return h;
}

std::vector<int32_t> ByteTokenizer::encode(const std::string& text) const {
  std::vector<int32_t> ids(text.size());
  for (size_t i = 0; i < text.size(); ++i) {
    unsigned char c = (unsigned char)text[i];
    CM_REQUIRE(id_[c] >= 0, "byte ", byte_repr(c), " at position ", i, " is not in the vocabulary (", vocab_.size(),
               " bytes) this model was trained on");
    ids[i] = id_[c];
  }
  return ids;
}

std::string ByteTokenizer::decode(const std::vector<int32_t>& ids) const {
  std::string s(ids.size(), '\0');
  for (size_t i = 0; i < ids.size(); ++i) {
    CM_REQUIRE(ids[i] >= 0 && ids[i] < (int32_t)vocab_.size(), "token id ", ids[i], " is outside the vocabulary [0, ",
               vocab_.size(), ")");
    s[i] = vocab_[(size_t)ids[i]];
  }
  return s;
}

}  // namespace cm
