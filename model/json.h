// A small JSON reader and writer: enough for safetensors headers and the config stored in checkpoints.
// No dependencies. Numbers keep their source text, so an int64 offset or a float written with %.9g reads back
// exactly. Objects keep their key order (what safetensors and our checkpoints write is stable and diffable).
#pragma once
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace cm {

struct Json {
  enum class Kind : uint8_t { Null, Bool, Number, String, Array, Object };
  Kind kind = Kind::Null;
  bool b = false;
  std::string s;  // String: the decoded text; Number: the literal as written
  std::vector<Json> arr;
  std::vector<std::pair<std::string, Json>> obj;

  static Json string(std::string v);
  static Json number(int64_t v);
  static Json object();
  static Json array();

  bool is(Kind k) const { return kind == k; }
  // Object member lookup; nullptr when absent (or when this is not an object).
  const Json* find(const std::string& key) const;
  // Append a member (objects) or an element (arrays).
  Json& set(const std::string& key, Json v);
  Json& push(Json v);

  // Whole non-negative integer or a cm::Error that names `what` ("data_offsets of tensor 'w'").
  int64_t as_index(const std::string& what) const;
  const std::string& as_string(const std::string& what) const;
};

// Parse a complete JSON text; anything malformed (or trailing) is a cm::Error naming the byte offset.
// Nesting deeper than 64 levels is rejected, so a hostile file cannot exhaust the stack.
Json json_parse(const std::string& text);
// Compact serialisation (no spaces); strings escaped so that any byte sequence round-trips.
std::string json_dump(const Json& j);

}  // namespace cm
