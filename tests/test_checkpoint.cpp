// The JSON reader/writer and the safetensors checkpoint files: round trips, the exact byte layout, atomic
// replacement, keep_last, and every kind of corrupt, truncated or mismatched file -> cm::Error, nothing changed.
#include <doctest/doctest.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "tests/files.h"
#include "model/checkpoint.h"
#include "model/json.h"
#include "tests/helpers.h"

using namespace cm;
namespace fs = std::filesystem;
using cm::test::read_bytes;
using cm::test::TempDir;
using cm::test::write_bytes;

namespace {


// A header + data file assembled by hand, to feed the reader exactly the damage we want.
std::string handmade(const std::string& header, const std::string& data) {
  std::string out(8, '\0');
  uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) out[i] = (char)(n >> (8 * i));
  return out + header + data;
}

std::string error_of(const std::string& path) {
  try {
    load_safetensors(path);
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

NamedTensors sample_tensors() {
  Tensor a = test::uniform({3, 5}, 1);
  Tensor b = Tensor::from_vector(std::vector<int32_t>{7, -1, 2147483647, 0}, {4});
  Tensor c = Tensor::scalar(2.5f);
  Tensor d = Tensor::zeros({0, 3});
  Tensor e = test::uniform({4, 6}, 2).transpose(0, 1);  // a non-contiguous view: saved in logical order
  return {{"w.a", a}, {"ids", b}, {"scalar", c}, {"empty", d}, {"view", e}};
}

}  // namespace

TEST_SUITE("checkpoint") {
  TEST_CASE("json: parse and dump round trip, escapes, numbers kept as written") {
    Json j = json_parse(
        R"( {"a": [1, -2.5e3, true, false, null], "s": "x\"\\\n\u00e9\ud83d\ude00", "n": 18446744073709551615} )");
    REQUIRE(j.is(Json::Kind::Object));
    CHECK(j.find("a")->arr.size() == 5);
    CHECK(j.find("a")->arr[1].s == "-2.5e3");
    CHECK(j.find("s")->s == "x\"\\\n\xc3\xa9\xf0\x9f\x98\x80");
    CHECK(j.find("n")->s == "18446744073709551615");
    CHECK(j.find("missing") == nullptr);
    Json back = json_parse(json_dump(j));
    CHECK(json_dump(back) == json_dump(j));
    // Control bytes are escaped on output and come back unchanged.
    std::string ctl = std::string("a\x01\x1f\tb", 5);
    CHECK(json_parse(json_dump(Json::string(ctl))).s == ctl);
    CHECK(json_parse("[]").arr.empty());
    CHECK(json_parse("{}").obj.empty());
  }

  TEST_CASE("json: malformed text is an error naming the offset") {
    for (const char* bad : {"", "{", "[1,]", "{\"a\" 1}", "{\"a\":1,}", "\"abc", "tru", "01x", "1.", "-", "{} x",
                            "\"\\q\"", "\"\\u12\"", "[1 2]", "{1:2}", "\"a\nb\""})
      CHECK_THROWS_AS(json_parse(bad), Error);
    CHECK_THROWS_AS(json_parse(std::string(100, '[') + std::string(100, ']')), Error);  // nesting limit
    try {
      json_parse("[1, 2, x]");
    } catch (const Error& e) {
      CHECK(contains(e.what(), "at byte 7"));
    }
    CHECK_THROWS_AS(json_parse("-1").as_index("x"), Error);
    CHECK_THROWS_AS(json_parse("1.5").as_index("x"), Error);
    CHECK(json_parse("123").as_index("x") == 123);
  }

  TEST_CASE("safetensors: round trip of values, dtypes, shapes and metadata") {
    TempDir dir("st_roundtrip");
    std::string path = dir.file("a.safetensors");
    NamedTensors ts = sample_tensors();
    Metadata md = {{"step", "12"}, {"tokenizer", "0a2041"}, {"json", "{\"k\":\"v\"}"}, {"nl", "a\nb"}};
    save_safetensors(path, ts, md);
    CHECK_FALSE(fs::exists(path + ".tmp"));
    SafeTensors st = load_safetensors(path);
    CHECK(st.metadata == md);
    REQUIRE(st.tensors.size() == ts.size());
    for (size_t i = 0; i < ts.size(); ++i) {
      CHECK(st.tensors[i].first == ts[i].first);
      const Tensor& got = st.tensors[i].second;
      CHECK(got.shape() == ts[i].second.shape());
      CHECK(got.dtype() == ts[i].second.dtype());
      if (got.dtype() == DType::F32)
        CHECK(got.to_f32_vector() == ts[i].second.to_f32_vector());
      else
        CHECK(got.to_i32_vector() == ts[i].second.to_i32_vector());
    }
    CHECK(st.find("view") != nullptr);
    CHECK(st.find("nope") == nullptr);
    CHECK(*st.meta("step") == "12");
    CHECK_THROWS_AS(st.require_meta("config"), Error);
    CHECK(read_safetensors_metadata(path) == md);
  }

  TEST_CASE("safetensors: the byte layout is the reference format's") {
    TempDir dir("st_layout");
    std::string path = dir.file("a.safetensors");
    Tensor a = Tensor::from_vector(std::vector<float>{1.f, 2.f, 3.f}, {3});
    Tensor b = Tensor::from_vector(std::vector<int32_t>{-1, 5}, {1, 2});
    save_safetensors(path, {{"a", a}, {"b", b}}, {{"k", "v"}});
    std::string bytes = read_bytes(path);
    uint64_t n = 0;
    for (int i = 0; i < 8; ++i) n |= (uint64_t)(unsigned char)bytes[i] << (8 * i);
    CHECK(n % 8 == 0);  // padded with spaces so the data starts aligned
    REQUIRE(bytes.size() == 8 + n + 12 + 8);
    Json h = json_parse(bytes.substr(8, n));
    CHECK(h.find("__metadata__")->find("k")->s == "v");
    CHECK(h.find("a")->find("dtype")->s == "F32");
    CHECK(json_dump(*h.find("a")->find("shape")) == "[3]");
    CHECK(json_dump(*h.find("a")->find("data_offsets")) == "[0,12]");
    CHECK(h.find("b")->find("dtype")->s == "I32");
    CHECK(json_dump(*h.find("b")->find("shape")) == "[1,2]");
    CHECK(json_dump(*h.find("b")->find("data_offsets")) == "[12,20]");
    float f[3];
    std::memcpy(f, bytes.data() + 8 + n, 12);
    CHECK(f[2] == 3.f);
    int32_t i[2];
    std::memcpy(i, bytes.data() + 8 + n + 12, 8);
    CHECK(i[0] == -1);
    CHECK(i[1] == 5);
  }

  TEST_CASE("safetensors: names must be unique and valid") {
    TempDir dir("st_names");
    Tensor a = Tensor::zeros({2});
    CHECK_THROWS_AS(save_safetensors(dir.file("x"), {{"a", a}, {"a", a}}, {}), Error);
    CHECK_THROWS_AS(save_safetensors(dir.file("x"), {{"", a}}, {}), Error);
    CHECK_THROWS_AS(save_safetensors(dir.file("x"), {{"__metadata__", a}}, {}), Error);
    CHECK_FALSE(fs::exists(dir.file("x")));
  }

  TEST_CASE("safetensors: a failed save leaves the old file as it was") {
    TempDir dir("st_atomic");
    std::string path = dir.file("a.safetensors");
    save_safetensors(path, {{"a", Tensor::ones({4})}}, {{"v", "1"}});
    std::string before = read_bytes(path);
    // The temp file cannot be created (a directory is in the way): error, old file intact, nothing left behind.
    fs::create_directories(path + ".tmp");
    CHECK_THROWS_AS(save_safetensors(path, {{"a", Tensor::zeros({4})}}, {{"v", "2"}}), Error);
    fs::remove_all(path + ".tmp");
    CHECK(read_bytes(path) == before);
    // A successful save replaces it.
    save_safetensors(path, {{"a", Tensor::zeros({4})}}, {{"v", "2"}});
    CHECK(*load_safetensors(path).meta("v") == "2");
    CHECK_THROWS_AS(save_safetensors(dir.file("no/such/dir/a.safetensors"), {{"a", Tensor::ones({1})}}, {}), Error);
  }

  TEST_CASE("safetensors: corrupt and truncated files are errors that say what is wrong") {
    TempDir dir("st_corrupt");
    std::string good = dir.file("good.safetensors");
    save_safetensors(good, sample_tensors(), {{"step", "3"}});
    std::string bytes = read_bytes(good);
    std::string p = dir.file("bad.safetensors");

    CHECK(contains(error_of(dir.file("missing.safetensors")), "not found"));
    CHECK(contains(error_of(dir.path.string()), "not a regular file"));
    write_bytes(p, "");
    CHECK(contains(error_of(p), "truncated"));
    write_bytes(p, "abc");
    CHECK(contains(error_of(p), "truncated"));
    // Every truncation point fails cleanly: in the length, the header, or the data.
    for (size_t cut : {(size_t)5, (size_t)8, (size_t)20, bytes.size() / 2, bytes.size() - 1}) {
      write_bytes(p, bytes.substr(0, cut));
      CHECK_MESSAGE(!error_of(p).empty(), "cut at ", cut);
    }
    // Extra bytes at the end.
    write_bytes(p, bytes + "xx");
    CHECK(contains(error_of(p), "after the last tensor"));
    // A huge header length.
    std::string huge = bytes;
    huge[7] = (char)0x7f;
    write_bytes(p, huge);
    CHECK(contains(error_of(p), "does not fit"));
    // Garbage in the header.
    std::string garbled = bytes;
    garbled[8] = '#';  // the opening brace
    write_bytes(p, garbled);
    CHECK(contains(error_of(p), "corrupt header"));

    std::string data(8, '\0');
    write_bytes(p, handmade(R"({"a":{"dtype":"F16","shape":[4],"data_offsets":[0,8]}})", data));
    CHECK(contains(error_of(p), "dtype F16 is not supported"));
    write_bytes(p, handmade(R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", data));
    CHECK(contains(error_of(p), "needs 12"));
    write_bytes(p, handmade(R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", data));
    CHECK(contains(error_of(p), "truncated"));
    write_bytes(p, handmade(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", data));
    CHECK(contains(error_of(p), "overlapping or missing"));
    write_bytes(
        p,
        handmade(
            R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
            R"("b":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})",
            data));
    CHECK(contains(error_of(p), "overlapping or missing"));
    write_bytes(p, handmade(R"({"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", data));
    CHECK(contains(error_of(p), "non-negative integer"));
    write_bytes(p, handmade(R"({"a":{"dtype":"F32","data_offsets":[0,8]}})", data));
    CHECK(contains(error_of(p), "needs dtype, shape and data_offsets"));
    write_bytes(p, handmade(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}})", data));
    CHECK(contains(error_of(p), "backwards"));
    write_bytes(p, handmade(R"({"__metadata__":{"k":1}})", ""));
    CHECK(contains(error_of(p), "expected a string"));
    write_bytes(p, handmade(R"([1,2])", ""));
    CHECK(contains(error_of(p), "expected a JSON object"));
    // A valid empty file (just metadata) loads.
    write_bytes(p, handmade(R"({"__metadata__":{"k":"v"}})", ""));
    CHECK(load_safetensors(p).tensors.empty());
  }

  TEST_CASE("safetensors: restore_tensors checks everything before copying anything") {
    TempDir dir("st_restore");
    std::string path = dir.file("a.safetensors");
    Tensor a = test::uniform({2, 3}, 5), b = test::uniform({4}, 6);
    save_safetensors(path, {{"a", a}, {"b", b}, {"adamw.a", a}}, {});
    SafeTensors st = load_safetensors(path);

    Tensor da = Tensor::zeros({2, 3}), db = Tensor::zeros({4});
    restore_tensors(st, {{"a", da}, {"b", db}}, "adamw.");
    CHECK(da.to_f32_vector() == a.to_f32_vector());
    CHECK(db.to_f32_vector() == b.to_f32_vector());

    auto untouched = [](const Tensor& t) {
      for (float v : t.to_f32_vector())
        if (v != 0.f) return false;
      return true;
    };
    // Each mismatch throws and leaves every destination as it was (the good one listed first is not written).
    Tensor x = Tensor::zeros({2, 3}), y = Tensor::zeros({5});
    CHECK_THROWS_AS(restore_tensors(st, {{"a", x}, {"b", y}}, "adamw."), Error);  // shape
    CHECK(untouched(x));
    Tensor z = Tensor::zeros({4}, DType::I32);
    CHECK_THROWS_AS(restore_tensors(st, {{"a", x}, {"b", z}}, "adamw."), Error);  // dtype
    CHECK(untouched(x));
    Tensor w = Tensor::zeros({4});
    CHECK_THROWS_AS(restore_tensors(st, {{"a", x}, {"c", w}}, "adamw."), Error);  // missing
    CHECK(untouched(x));
    CHECK_THROWS_AS(restore_tensors(st, {{"a", x}}, "adamw."), Error);  // unexpected "b"
    CHECK(untouched(x));
    CHECK_THROWS_AS(restore_tensors(st, {{"a", x}, {"b", w}}), Error);  // unexpected "adamw.a"
    CHECK(untouched(x));
    try {
      restore_tensors(st, {{"a", x}, {"b", y}}, "adamw.");
    } catch (const Error& e) {
      CHECK(contains(e.what(), "'b' has shape [4], the model expects [5]"));
    }
  }

  TEST_CASE("checkpoints in out_dir: names, latest, keep_last") {
    TempDir dir("st_outdir");
    std::string d = dir.path.string();
    CHECK(latest_checkpoint(d).empty());
    CHECK(latest_checkpoint(dir.file("nope")).empty());
    CHECK(fs::path(checkpoint_path(d, 42)).filename() == "ckpt_00000042.safetensors");
    for (int64_t s : {5, 100, 20, 7}) save_safetensors(checkpoint_path(d, s), {{"a", Tensor::full({1}, (float)s)}}, {});
    write_bytes(dir.file("ckpt_abc.safetensors"), "not one of ours");
    write_bytes(dir.file("notes.txt"), "x");
    CHECK(latest_checkpoint(d) == checkpoint_path(d, 100));
    auto removed = prune_checkpoints(d, 2);
    CHECK(removed.size() == 2);
    CHECK_FALSE(fs::exists(checkpoint_path(d, 5)));
    CHECK_FALSE(fs::exists(checkpoint_path(d, 7)));
    CHECK(fs::exists(checkpoint_path(d, 20)));
    CHECK(fs::exists(checkpoint_path(d, 100)));
    CHECK(fs::exists(dir.file("ckpt_abc.safetensors")));
    CHECK(prune_checkpoints(d, 0).empty());  // 0 keeps all
  }

}  // TEST_SUITE
