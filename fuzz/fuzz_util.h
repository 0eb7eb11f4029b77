// Helpers shared by the libFuzzer targets in this folder (README: "Fuzzing the inputs").
#pragma once
#include <fcntl.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

namespace fuzz {

// A private scratch directory for the loaders that take a path: in /dev/shm when there is one (no disk traffic,
// and the savers' fsync costs nothing there), else in $TMPDIR or /tmp. Each target writes a few fixed names there,
// replaced at every input, so the directory stays small; it is left behind at exit (the last input's files).
inline const std::string& scratch_dir() {
  static const std::string dir = [] {
    const char* base = access("/dev/shm", W_OK) == 0 ? "/dev/shm" : (std::getenv("TMPDIR") ? std::getenv("TMPDIR") : "/tmp");
    std::string templ = std::string(base) + "/cm_fuzz_XXXXXX";
    std::vector<char> buf(templ.begin(), templ.end());
    buf.push_back('\0');
    if (!mkdtemp(buf.data())) {
      std::perror("mkdtemp");
      std::abort();
    }
    return std::string(buf.data());
  }();
  return dir;
}

// Writes `size` bytes to scratch_dir()/name (replacing it) and returns the path.
inline std::string write_file(const std::string& name, const uint8_t* data, size_t size) {
  std::string path = scratch_dir() + "/" + name;
  FILE* f = std::fopen(path.c_str(), "wb");
  if (!f || (size && std::fwrite(data, 1, size, f) != size) || std::fclose(f) != 0) {
    std::perror(path.c_str());
    std::abort();
  }
  return path;
}
inline std::string write_file(const std::string& name, const std::string& text) {
  return write_file(name, reinterpret_cast<const uint8_t*>(text.data()), text.size());
}

// A violated property of the code under test: report and abort, so that libFuzzer saves the input.
#define FUZZ_ASSERT(cond, msg)                                                              \
  do {                                                                                      \
    if (!(cond)) {                                                                          \
      std::fprintf(stderr, "fuzz property violated: %s (%s:%d): %s\n", #cond, __FILE__, __LINE__, msg); \
      std::abort();                                                                         \
    }                                                                                       \
  } while (0)

}  // namespace fuzz
