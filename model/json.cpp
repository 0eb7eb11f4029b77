#include "model/json.h"

#include <cstdio>
#include <cstring>

#include "engine/check.h"

namespace cm {

Json Json::string(std::string v) {
  Json j;
  j.kind = Kind::String;
  j.s = std::move(v);
  return j;
}
Json Json::number(int64_t v) {
  Json j;
  j.kind = Kind::Number;
  j.s = std::to_string(v);
  return j;
}
Json Json::object() {
  Json j;
  j.kind = Kind::Object;
  return j;
}
Json Json::array() {
  Json j;
  j.kind = Kind::Array;
  return j;
}

const Json* Json::find(const std::string& key) const {
  if (kind != Kind::Object) return nullptr;
  for (const auto& kv : obj)
    if (kv.first == key) return &kv.second;
  return nullptr;
}
Json& Json::set(const std::string& key, Json v) {
  CM_CHECK(kind == Kind::Object, "set on a non-object");
  obj.emplace_back(key, std::move(v));
  return obj.back().second;
}
Json& Json::push(Json v) {
  CM_CHECK(kind == Kind::Array, "push on a non-array");
  arr.push_back(std::move(v));
  return arr.back();
}

int64_t Json::as_index(const std::string& what) const {
  CM_REQUIRE(kind == Kind::Number, what, ": expected a number");
  // Digits only: no sign, fraction or exponent, at most 18 digits so the value fits in int64 unchecked.
  CM_REQUIRE(!s.empty() && s.size() <= 18 && s.find_first_not_of("0123456789") == std::string::npos, what,
             ": expected a non-negative integer, got ", s);
  return std::stoll(s);
}
const std::string& Json::as_string(const std::string& what) const {
  CM_REQUIRE(kind == Kind::String, what, ": expected a string");
  return s;
}

// ---------------------------------------------------------------- reader
namespace {

struct Parser {
  const std::string& t;
  size_t i = 0;

  [[noreturn]] void bad(const char* what) const { fail("JSON: ", what, " at byte ", i); }
  void ws() {
    while (i < t.size() && (t[i] == ' ' || t[i] == '\t' || t[i] == '\n' || t[i] == '\r')) ++i;
  }
  bool eat(char c) {
    ws();
    if (i < t.size() && t[i] == c) {
      ++i;
      return true;
    }
    return false;
  }
  void expect_word(const char* w) {
    size_t n = std::strlen(w);
    if (t.compare(i, n, w) != 0) bad("unexpected token");
    i += n;
  }
  static void put_utf8(std::string& out, uint32_t cp) {
    if (cp < 0x80) {
      out += (char)cp;
    } else if (cp < 0x800) {
      out += (char)(0xC0 | (cp >> 6));
      out += (char)(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
      out += (char)(0xE0 | (cp >> 12));
      out += (char)(0x80 | ((cp >> 6) & 0x3F));
      out += (char)(0x80 | (cp & 0x3F));
    } else {
      out += (char)(0xF0 | (cp >> 18));
      out += (char)(0x80 | ((cp >> 12) & 0x3F));
      out += (char)(0x80 | ((cp >> 6) & 0x3F));
      out += (char)(0x80 | (cp & 0x3F));
    }
  }
  uint32_t hex4() {
    if (i + 4 > t.size()) bad("truncated \\u escape");
    uint32_t v = 0;
    for (int k = 0; k < 4; ++k) {
      char c = t[i++];
      v <<= 4;
      if (c >= '0' && c <= '9')
        v |= (uint32_t)(c - '0');
      else if (c >= 'a' && c <= 'f')
        v |= (uint32_t)(c - 'a' + 10);
      else if (c >= 'A' && c <= 'F')
        v |= (uint32_t)(c - 'A' + 10);
      else
        bad("bad \\u escape");
    }
    return v;
  }
  std::string str() {
    if (!eat('"')) bad("expected a string");
    std::string out;
    for (;;) {
      if (i >= t.size()) bad("unterminated string");
      char c = t[i++];
      if (c == '"') return out;
      if ((unsigned char)c < 0x20) bad("control character in string");
      if (c != '\\') {
        out += c;
        continue;
      }
      if (i >= t.size()) bad("unterminated string");
      char e = t[i++];
      switch (e) {
        case '"':
          out += '"';
          break;
        case '\\':
          out += '\\';
          break;
        case '/':
          out += '/';
          break;
        case 'b':
          out += '\b';
          break;
        case 'f':
          out += '\f';
          break;
        case 'n':
          out += '\n';
          break;
        case 'r':
          out += '\r';
          break;
        case 't':
          out += '\t';
          break;
        case 'u': {
          uint32_t cp = hex4();
          // A surrogate pair encodes one code point above U+FFFF; a lone surrogate is kept as is.
          if (cp >= 0xD800 && cp < 0xDC00 && t.compare(i, 2, "\\u") == 0) {
            size_t save = i;
            i += 2;
            uint32_t lo = hex4();
            if (lo >= 0xDC00 && lo < 0xE000)
              cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
            else
              i = save;
          }
          put_utf8(out, cp);
          break;
        }
        default:
          bad("bad escape");
      }
    }
  }
  Json value(int depth) {
    if (depth > 64) bad("nesting too deep");
    ws();
    if (i >= t.size()) bad("unexpected end");
    char c = t[i];
    Json j;
    if (c == '{') {
      ++i;
      j.kind = Json::Kind::Object;
      if (eat('}')) return j;
      do {
        ws();
        std::string k = str();
        if (!eat(':')) bad("expected ':'");
        j.obj.emplace_back(std::move(k), value(depth + 1));
      } while (eat(','));
      if (!eat('}')) bad("expected ',' or '}'");
    } else if (c == '[') {
      ++i;
      j.kind = Json::Kind::Array;
      if (eat(']')) return j;
      do j.arr.push_back(value(depth + 1));
      while (eat(','));
      if (!eat(']')) bad("expected ',' or ']'");
    } else if (c == '"') {
      j.kind = Json::Kind::String;
      j.s = str();
    } else if (c == 't') {
      expect_word("true");
      j.kind = Json::Kind::Bool;
      j.b = true;
    } else if (c == 'f') {
      expect_word("false");
      j.kind = Json::Kind::Bool;
    } else if (c == 'n') {
      expect_word("null");
    } else if (c == '-' || (c >= '0' && c <= '9')) {
      size_t b = i;
      if (t[i] == '-') ++i;
      auto digits = [&] {
        size_t d = i;
        while (i < t.size() && t[i] >= '0' && t[i] <= '9') ++i;
        if (i == d) bad("malformed number");
      };
      digits();
      if (i < t.size() && t[i] == '.') {
        ++i;
        digits();
      }
      if (i < t.size() && (t[i] == 'e' || t[i] == 'E')) {
        ++i;
        if (i < t.size() && (t[i] == '+' || t[i] == '-')) ++i;
        digits();
      }
      j.kind = Json::Kind::Number;
      j.s = t.substr(b, i - b);
    } else {
      bad("unexpected character");
    }
    return j;
  }
};

void dump_string(std::string& out, const std::string& s) {
  out += '"';
  for (unsigned char c : s) {
    switch (c) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      case '\n':
        out += "\\n";
        break;
      case '\r':
        out += "\\r";
        break;
      case '\t':
        out += "\\t";
        break;
      default:
        if (c < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof buf, "\\u%04x", c);
          out += buf;
        } else {
          out += (char)c;
        }
    }
  }
  out += '"';
}

void dump(std::string& out, const Json& j) {
  switch (j.kind) {
    case Json::Kind::Null:
      out += "null";
      break;
    case Json::Kind::Bool:
      out += j.b ? "true" : "false";
      break;
    case Json::Kind::Number:
      out += j.s;
      break;
    case Json::Kind::String:
      dump_string(out, j.s);
      break;
    case Json::Kind::Array:
      out += '[';
      for (size_t k = 0; k < j.arr.size(); ++k) {
        if (k) out += ',';
        dump(out, j.arr[k]);
      }
      out += ']';
      break;
    case Json::Kind::Object:
      out += '{';
      for (size_t k = 0; k < j.obj.size(); ++k) {
        if (k) out += ',';
        dump_string(out, j.obj[k].first);
        out += ':';
        dump(out, j.obj[k].second);
      }
      out += '}';
      break;
  }
}

}  // namespace

Json json_parse(const std::string& text) {
  Parser p{text};
  Json j = p.value(0);
  p.ws();
  if (p.i != text.size()) p.bad("trailing characters");
  return j;
}

std::string json_dump(const Json& j) {
  std::string out;
  dump(out, j);
  return out;
}

}  // namespace cm
