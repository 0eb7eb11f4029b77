#include "model/data.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "engine/check.h"

namespace cm {

namespace fs = std::filesystem;

Corpus read_corpus(const std::string& path) {
  std::error_code ec;
  CM_REQUIRE(fs::exists(path, ec), "data file not found: ", path);
  CM_REQUIRE(!fs::is_directory(path, ec), "data path is a directory, expected a file: ", path);
  std::ifstream f(path, std::ios::binary);
  CM_REQUIRE(f, "cannot open data file ", path);
  std::ostringstream ss;
  ss << f.rdbuf();
  CM_REQUIRE(!f.bad(), "error reading data file ", path);
  Corpus c;
  c.source = path;
  c.bytes = ss.str();
  CM_REQUIRE(!c.bytes.empty(), "data file is empty: ", path);
  return c;
}

// The fortunes package: one file per topic, fortunes separated by lines holding a single '%'. Index files
// (*.dat) and the *.u8 links are skipped; the separators become blank lines, so the text reads as prose.
static std::string read_fortunes(const std::string& dir, int64_t* nfiles) {
  std::vector<fs::path> files;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    if (!e.is_regular_file(ec) || e.is_symlink(ec)) continue;
    std::string ext = e.path().extension().string();
    if (ext == ".dat" || ext == ".u8") continue;
    files.push_back(e.path());
  }
  std::sort(files.begin(), files.end());  // directory order is not stable across machines
  std::string out;
  *nfiles = 0;
  for (const auto& p : files) {
    std::ifstream f(p, std::ios::binary);
    if (!f) continue;
    std::string line;
    while (std::getline(f, line)) out += (line == "%" ? std::string() : line) + "\n";
    ++*nfiles;
  }
  return out;
}

Corpus default_corpus(const std::string& tinyshakespeare, const std::string& fortunes_dir) {
  std::error_code ec;
  if (fs::exists(tinyshakespeare, ec)) return read_corpus(tinyshakespeare);
  int64_t nfiles = 0;
  std::string text = fs::is_directory(fortunes_dir, ec) ? read_fortunes(fortunes_dir, &nfiles) : std::string();
  CM_REQUIRE(!text.empty(), "no training data: ", tinyshakespeare, " is missing and no fortunes are installed in ",
             fortunes_dir, ".\n  Run `make data` to fetch tinyshakespeare (or `make data SRC=/path/to/input.txt`),",
             "\n  or install the fortunes (`sudo apt-get install fortunes`), or pass --data PATH.");
  Corpus c;
  c.source = str(fortunes_dir, " (", nfiles, " files)");
  c.note = str(tinyshakespeare, " not found (run `make data` to fetch it); training on the fortunes in ", fortunes_dir,
               " instead");
  c.bytes = std::move(text);
  return c;
}

TextDataset::TextDataset(const std::string& bytes, const ByteTokenizer& tok, int64_t seq_len) : T_(seq_len) {
  CM_REQUIRE(seq_len >= 1, "seq_len must be at least 1, got ", seq_len);
  std::vector<int32_t> ids = tok.encode(bytes);
  int64_t n = (int64_t)ids.size();
  int64_t n_train = n * 9 / 10;  // nanoGPT: int(n * 0.9)
  int64_t need = seq_len + 1;
  if (n_train < need || n - n_train < need) {
    int64_t n_min = 10 * (need - 1) + 1;  // the validation tenth is the tighter bound; step up to be exact
    while (n_min * 9 / 10 < need || n_min - n_min * 9 / 10 < need) ++n_min;
    fail("data too short: ", n, " bytes split 90/10 into ", n_train, " training and ", n - n_train,
         " validation bytes, but each split needs at least seq_len + 1 = ", need, " bytes. Use a file of at least ",
         n_min, " bytes or a smaller --seq_len");
  }
  train_.assign(ids.begin(), ids.begin() + n_train);
  val_.assign(ids.begin() + n_train, ids.end());
}

std::pair<Tensor, Tensor> TextDataset::batch(Split s, int64_t B, Generator& gen, Device device) const {
  const std::vector<int32_t>& src = s == Split::Train ? train_ : val_;
  const int64_t T = T_;
  const uint64_t starts = (uint64_t)((int64_t)src.size() - T);  // window start in [0, size - T - 1]
  Tensor x = Tensor::empty({B, T}, DType::I32), y = Tensor::empty({B, T}, DType::I32);
  int32_t* px = x.i32();  // [B, T]
  int32_t* py = y.i32();  // [B, T]
  for (int64_t b = 0; b < B; ++b) {
    Philox4 r = philox4x32(gen.offset++, gen.seed);
    // 64 random bits, so the modulo bias is below 2^-40 for any corpus that fits in memory.
    uint64_t u = ((uint64_t)r.v[0] << 32) | r.v[1];
    const int32_t* w = src.data() + (int64_t)(u % starts);
    std::copy(w, w + T, px + b * T);
    std::copy(w + 1, w + T + 1, py + b * T);
  }
  if (device != Device::CPU) return {x.to(device), y.to(device)};
  return {x, y};
}

}  // namespace cm
