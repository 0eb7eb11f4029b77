#include "model/checkpoint.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <memory>
#include <set>

#include "model/json.h"

namespace cm {

namespace fs = std::filesystem;

const Tensor* SafeTensors::find(const std::string& name) const {
  for (const auto& kv : tensors)
    if (kv.first == name) return &kv.second;
  return nullptr;
}
const std::string* SafeTensors::meta(const std::string& key) const {
  for (const auto& kv : metadata)
    if (kv.first == key) return &kv.second;
  return nullptr;
}
const std::string& SafeTensors::require_meta(const std::string& key) const {
  const std::string* v = meta(key);
  CM_REQUIRE(v, path, ": not a ClusterMoE checkpoint: metadata '", key, "' is missing");
  return *v;
}

static bool little_endian() {
  const uint32_t one = 1;
  unsigned char b;
  std::memcpy(&b, &one, 1);
  return b == 1;
}

namespace {
struct FileCloser {
  void operator()(FILE* f) const {
    if (f) std::fclose(f);
  }
};
using File = std::unique_ptr<FILE, FileCloser>;
}  // namespace

// ---------------------------------------------------------------- save
// Test hook for the crash tests (tests/crash_test.sh, the "crash" test case): CM_TEST_SAVE_PAUSE_MS=<ms> makes
// every save pause that long with half of its tensors written to `<path>.tmp`, so that a SIGKILL can be aimed at
// the write window. Unset (or 0) in normal use: nothing changes.
static int save_pause_ms() {
  const char* v = std::getenv("CM_TEST_SAVE_PAUSE_MS");
  return v ? std::max(0, std::min(60000, std::atoi(v))) : 0;
}

void save_safetensors(const std::string& path, const NamedTensors& tensors, const Metadata& metadata) {
  CM_CHECK(little_endian(), "safetensors writer assumes a little-endian host");
  Json header = Json::object();
  Json meta = Json::object();
  for (const auto& kv : metadata) meta.set(kv.first, Json::string(kv.second));
  header.set("__metadata__", meta);

  std::set<std::string> names;
  std::vector<Tensor> host;  // contiguous CPU copies, in write order
  int64_t offset = 0;
  for (const auto& kv : tensors) {
    CM_REQUIRE(!kv.first.empty() && kv.first != "__metadata__", "invalid tensor name '", kv.first, "'");
    CM_REQUIRE(names.insert(kv.first).second, "tensor name '", kv.first, "' appears twice");
    Tensor t = kv.second.detach().to(Device::CPU).contiguous();
    int64_t nbytes = t.numel() * (int64_t)dtype_size(t.dtype());
    Json e = Json::object();
    e.set("dtype", Json::string(t.dtype() == DType::F32 ? "F32" : "I32"));
    Json shape = Json::array();
    for (int64_t d : t.shape()) shape.push(Json::number(d));
    e.set("shape", shape);
    Json off = Json::array();
    off.push(Json::number(offset));
    off.push(Json::number(offset + nbytes));
    e.set("data_offsets", off);
    header.set(kv.first, e);
    offset += nbytes;
    host.push_back(t);
  }
  std::string h = json_dump(header);
  h.resize((h.size() + 7) / 8 * 8, ' ');  // the data then starts 8-byte aligned, as the reference writer does

  std::string tmp = path + ".tmp";
  {
    File f(std::fopen(tmp.c_str(), "wb"));
    CM_REQUIRE(f, "cannot write ", tmp, ": ", std::strerror(errno));
    uint64_t n = h.size();
    unsigned char len[8];
    for (int i = 0; i < 8; ++i) len[i] = (unsigned char)(n >> (8 * i));
    bool ok = std::fwrite(len, 1, 8, f.get()) == 8 && std::fwrite(h.data(), 1, h.size(), f.get()) == h.size();
    const int pause_ms = save_pause_ms();
    for (size_t i = 0; i < host.size(); ++i) {
      const Tensor& t = host[i];
      size_t nb = (size_t)t.numel() * dtype_size(t.dtype());
      if (ok && nb) ok = std::fwrite(t.raw(), 1, nb, f.get()) == nb;
      if (pause_ms > 0 && i == host.size() / 2) {  // test hook: hold a half-written file on disk
        ok = ok && std::fflush(f.get()) == 0;
        ::usleep((useconds_t)pause_ms * 1000);
      }
    }
    // fflush moves our buffer to the kernel; fsync moves the kernel's to the disk. Only then is a rename safe.
    ok = ok && std::fflush(f.get()) == 0 && ::fsync(fileno(f.get())) == 0;
    if (!ok) {
      int err = errno;
      f.reset();
      std::remove(tmp.c_str());
      fail("error writing ", tmp, ": ", std::strerror(err));
    }
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    int err = errno;
    std::remove(tmp.c_str());
    fail("cannot rename ", tmp, " to ", path, ": ", std::strerror(err));
  }
  // The rename itself lives in the directory: sync it too, or a power cut can forget it.
  std::string dir = fs::path(path).parent_path().string();
  int dfd = ::open(dir.empty() ? "." : dir.c_str(), O_RDONLY);
  if (dfd >= 0) {
    ::fsync(dfd);
    ::close(dfd);
  }
}

// ---------------------------------------------------------------- load
namespace {
struct Entry {
  std::string name;
  DType dtype;
  Shape shape;
  uint64_t begin, end;  // byte offsets into the data buffer
};
struct Header {
  Metadata metadata;
  std::vector<Entry> entries;  // header order
  uint64_t data_start = 0;     // 8 + header length
};

// Reads and validates the length, the JSON and every entry against the file's size. Leaves `f` at data_start.
Header read_header(const std::string& path, FILE* f, uint64_t size) {
  CM_REQUIRE(size >= 8, path, ": truncated or not a safetensors file (", size,
             " bytes; the format starts with an 8-byte header length)");
  unsigned char len[8];
  CM_REQUIRE(std::fread(len, 1, 8, f) == 8, path, ": read error");
  uint64_t n = 0;
  for (int i = 0; i < 8; ++i) n |= (uint64_t)len[i] << (8 * i);
  CM_REQUIRE(n >= 2 && n <= size - 8, path, ": header length ", n, " does not fit in a file of ", size,
             " bytes (truncated or not a safetensors file)");
  CM_REQUIRE(n <= (100u << 20), path, ": header length ", n, " exceeds the 100 MB limit");
  std::string h(n, '\0');
  CM_REQUIRE(std::fread(&h[0], 1, n, f) == n, path, ": read error in the header");
  Json header;
  try {
    header = json_parse(h);
  } catch (const Error& e) {
    fail(path, ": corrupt header: ", e.what());
  }
  CM_REQUIRE(header.is(Json::Kind::Object), path, ": corrupt header: expected a JSON object");

  Header out;
  out.data_start = 8 + n;
  const uint64_t data_len = size - 8 - n;
  std::set<std::string> names;
  for (const auto& kv : header.obj) {
    const std::string& name = kv.first;
    const Json& v = kv.second;
    if (name == "__metadata__") {
      CM_REQUIRE(v.is(Json::Kind::Object), path, ": __metadata__ must be an object of strings");
      for (const auto& m : v.obj)
        out.metadata.emplace_back(m.first, m.second.as_string(path + ": __metadata__." + m.first));
      continue;
    }
    const std::string what = str(path, ": tensor '", name, "'");
    CM_REQUIRE(names.insert(name).second, what, " appears twice");
    CM_REQUIRE(v.is(Json::Kind::Object), what, ": expected an object");
    const Json* dt = v.find("dtype");
    const Json* shape = v.find("shape");
    const Json* off = v.find("data_offsets");
    CM_REQUIRE(dt && shape && off, what, ": needs dtype, shape and data_offsets");
    Entry e;
    e.name = name;
    const std::string& d = dt->as_string(what + " dtype");
    if (d == "F32")
      e.dtype = DType::F32;
    else if (d == "I32")
      e.dtype = DType::I32;
    else
      fail(what, ": dtype ", d, " is not supported (ClusterMoE reads F32 and I32)");
    CM_REQUIRE(shape->is(Json::Kind::Array) && shape->arr.size() <= 8, what,
               ": shape must be a list of at most 8 sizes");
    uint64_t numel = 1;
    for (const Json& s : shape->arr) {
      int64_t x = s.as_index(what + " shape");
      CM_REQUIRE(x <= (int64_t(1) << 40), what, ": dimension ", x, " is too large");
      e.shape.push_back(x);
      numel *= (uint64_t)x;
      CM_REQUIRE(numel <= (uint64_t(1) << 40), what, ": too many elements");
    }
    CM_REQUIRE(off->is(Json::Kind::Array) && off->arr.size() == 2, what, ": data_offsets must be [begin, end]");
    e.begin = (uint64_t)off->arr[0].as_index(what + " data_offsets");
    e.end = (uint64_t)off->arr[1].as_index(what + " data_offsets");
    CM_REQUIRE(e.begin <= e.end, what, ": data_offsets [", e.begin, ", ", e.end, "] run backwards");
    CM_REQUIRE(e.end - e.begin == numel * dtype_size(e.dtype), what, ": data_offsets span ", e.end - e.begin,
               " bytes but shape ", shape_str(e.shape), " of ", d, " needs ", numel * dtype_size(e.dtype));
    CM_REQUIRE(e.end <= data_len, what, ": data ends at byte ", e.end, " but the file holds only ", data_len,
               " data bytes (truncated?)");
    out.entries.push_back(std::move(e));
  }
  // The format requires the tensors to tile the data buffer: no holes, no overlaps, nothing after the last one.
  std::vector<const Entry*> by_off;
  for (const auto& e : out.entries) by_off.push_back(&e);
  std::sort(by_off.begin(), by_off.end(), [](const Entry* a, const Entry* b) {
    return a->begin != b->begin ? a->begin < b->begin : a->end < b->end;
  });
  uint64_t pos = 0;
  for (const Entry* e : by_off) {
    CM_REQUIRE(e->begin == pos, path, ": tensor '", e->name, "' starts at byte ", e->begin,
               " but the previous one ends at ", pos, " (overlapping or missing data)");
    pos = e->end;
  }
  CM_REQUIRE(pos == data_len, path, ": ", data_len - pos, " bytes after the last tensor (corrupt file?)");
  return out;
}

File open_checked(const std::string& path, uint64_t* size) {
  CM_CHECK(little_endian(), "safetensors reader assumes a little-endian host");
  std::error_code ec;
  CM_REQUIRE(fs::exists(path, ec), "checkpoint not found: ", path);
  CM_REQUIRE(fs::is_regular_file(path, ec), "checkpoint is not a regular file: ", path);
  *size = fs::file_size(path, ec);
  CM_REQUIRE(!ec, "cannot read the size of ", path);
  File f(std::fopen(path.c_str(), "rb"));
  CM_REQUIRE(f, "cannot open ", path, ": ", std::strerror(errno));
  return f;
}
}  // namespace

Metadata read_safetensors_metadata(const std::string& path) {
  uint64_t size = 0;
  File f = open_checked(path, &size);
  return read_header(path, f.get(), size).metadata;
}

SafeTensors load_safetensors(const std::string& path) {
  uint64_t size = 0;
  File f = open_checked(path, &size);
  Header h = read_header(path, f.get(), size);
  SafeTensors st;
  st.path = path;
  st.metadata = h.metadata;
  for (const Entry& e : h.entries) {
    Tensor t = Tensor::empty(e.shape, e.dtype);
    size_t nb = (size_t)(e.end - e.begin);
    if (nb) {
      bool ok = ::fseeko(f.get(), (off_t)(h.data_start + e.begin), SEEK_SET) == 0 &&
                std::fread(t.raw(), 1, nb, f.get()) == nb;
      CM_REQUIRE(ok, path, ": read error in tensor '", e.name, "'");
    }
    st.tensors.emplace_back(e.name, t);
  }
  return st;
}

void restore_tensors(const SafeTensors& file, const NamedTensors& dst, const std::string& ignore_prefix) {
  std::set<std::string> wanted;
  for (const auto& kv : dst) {
    wanted.insert(kv.first);
    const Tensor* src = file.find(kv.first);
    CM_REQUIRE(src, file.path, ": tensor '", kv.first,
               "' is missing (a checkpoint of another model configuration, or of an older build?)");
    CM_REQUIRE(src->dtype() == kv.second.dtype(), file.path, ": tensor '", kv.first, "' is ", dtype_name(src->dtype()),
               ", the model expects ", dtype_name(kv.second.dtype()));
    CM_REQUIRE(src->shape() == kv.second.shape(), file.path, ": tensor '", kv.first, "' has shape ",
               shape_str(src->shape()), ", the model expects ", shape_str(kv.second.shape()));
  }
  for (const auto& kv : file.tensors) {
    bool ignored = !ignore_prefix.empty() && kv.first.compare(0, ignore_prefix.size(), ignore_prefix) == 0;
    CM_REQUIRE(ignored || wanted.count(kv.first), file.path, ": unexpected tensor '", kv.first,
               "' (checkpoint of a different model configuration?)");
  }
  for (const auto& kv : dst) {
    Tensor d = kv.second;  // a handle: copies into the caller's storage
    d.copy_(*file.find(kv.first));
  }
}

// ---------------------------------------------------------------- files in out_dir
std::string checkpoint_path(const std::string& out_dir, int64_t step) {
  char name[64];
  std::snprintf(name, sizeof name, "ckpt_%08lld.safetensors", (long long)step);
  return (fs::path(out_dir) / name).string();
}

// (step, path) of every ckpt_<digits>.safetensors in out_dir, oldest first.
static std::vector<std::pair<int64_t, std::string>> list_checkpoints(const std::string& out_dir) {
  std::vector<std::pair<int64_t, std::string>> out;
  std::error_code ec;
  if (!fs::is_directory(out_dir, ec)) return out;
  for (const auto& e : fs::directory_iterator(out_dir, ec)) {
    std::string n = e.path().filename().string();
    const std::string pre = "ckpt_", suf = ".safetensors";
    if (n.size() <= pre.size() + suf.size() || n.compare(0, pre.size(), pre) != 0 ||
        n.compare(n.size() - suf.size(), suf.size(), suf) != 0)
      continue;
    std::string digits = n.substr(pre.size(), n.size() - pre.size() - suf.size());
    if (digits.size() > 18 || digits.find_first_not_of("0123456789") != std::string::npos) continue;
    out.emplace_back(std::stoll(digits), e.path().string());
  }
  std::sort(out.begin(), out.end());
  return out;
}

std::string latest_checkpoint(const std::string& out_dir) {
  auto all = list_checkpoints(out_dir);
  return all.empty() ? std::string() : all.back().second;
}

std::vector<std::string> prune_checkpoints(const std::string& out_dir, int64_t keep_last) {
  std::vector<std::string> removed;
  if (keep_last <= 0) return removed;
  auto all = list_checkpoints(out_dir);
  for (size_t i = 0; i + (size_t)keep_last < all.size(); ++i) {
    std::error_code ec;
    if (fs::remove(all[i].second, ec)) removed.push_back(all[i].second);
  }
  return removed;
}

}  // namespace cm
