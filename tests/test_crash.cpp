// Crash safety of train_lm, the fast version of tests/crash_test.sh: the built ./train_lm is started as a child
// process, killed with SIGKILL (twice inside a checkpoint write, twice at a random moment), resumed each time,
// and must end exactly where an uninterrupted run ends. Every checkpoint left on disk after a kill must load.
//
// Kills inside a write are aimed with the test hook CM_TEST_SAVE_PAUSE_MS (model/checkpoint.cpp): each save
// pauses with half of its tensors written to ckpt_<step>.safetensors.tmp; the test waits for that file and kills.
#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <random>
#include <sstream>
#include <thread>

#include <doctest/doctest.h>
#include "model/checkpoint.h"
#include "tests/files.h"

using namespace cm;
using cm::test::read_bytes;
using cm::test::TempDir;
using cm::test::write_bytes;
namespace fs = std::filesystem;

namespace {

// ./train_lm of this build: the test binary is build/tests/run_tests, train_lm sits in the repository root
// (<build>/bin/train_lm in the emulator's and the sanitized builds).
std::string train_lm_binary() {
  std::error_code ec;
  fs::path exe = fs::read_symlink("/proc/self/exe", ec);
  for (fs::path p : {exe.parent_path() / "../bin/train_lm", exe.parent_path() / "../../train_lm", fs::path("train_lm")})
    if (fs::exists(p, ec)) return fs::absolute(p).lexically_normal().string();
  return "";
}

// A corpus the test writes itself (no download): 40 KB of words from a small vocabulary, seeded.
std::string generated_text() {
  const char* words[] = {"the", "king", "queen", "of", "and", "to", "my", "lord", "what", "shall", "we", "do", "thou",
                         "art", "good", "night", "sweet", "prince", "\n", ",", "."};
  std::mt19937 g(7);
  std::string s;
  while (s.size() < 40000) {
    s += words[g() % (sizeof words / sizeof *words)];
    s += ' ';
  }
  return s;
}

// Starts `bin args...` in `cwd` with stdout and stderr appended to cwd/train.out; returns the child's pid.
// The child's environment is ours plus the save-pause test hook, one OpenMP thread and passive waits (set, so
// train_lm does not re-exec itself); this process's own environment is left alone.
pid_t spawn(const std::string& bin, const std::vector<std::string>& args, const std::string& cwd) {
  std::vector<std::string> all = {bin};
  all.insert(all.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (auto& a : all) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  static std::vector<std::string> env_text;
  env_text = {"CM_TEST_SAVE_PAUSE_MS=30", "OMP_NUM_THREADS=1", "OMP_WAIT_POLICY=passive"};
  for (char** e = environ; *e; ++e) {
    std::string v = *e;
    if (v.rfind("CM_TEST_SAVE_PAUSE_MS=", 0) && v.rfind("OMP_NUM_THREADS=", 0) && v.rfind("OMP_WAIT_POLICY=", 0) &&
        v.rfind("GOMP_SPINCOUNT=", 0))
      env_text.push_back(v);
  }
  std::vector<char*> envp;
  for (auto& e : env_text) envp.push_back(const_cast<char*>(e.c_str()));
  envp.push_back(nullptr);
  const std::string log = cwd + "/train.out";
  pid_t pid = ::fork();
  if (pid == 0) {  // only async-signal-safe calls until exec
    if (::chdir(cwd.c_str()) != 0) ::_exit(126);
    int fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
    if (fd < 0) ::_exit(126);
    ::dup2(fd, 1);
    ::dup2(fd, 2);
    ::execve(bin.c_str(), argv.data(), envp.data());
    ::_exit(127);
  }
  return pid;
}
int wait_exit(pid_t pid) {
  int st = 0;
  ::waitpid(pid, &st, 0);
  return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}

std::vector<std::string> files_matching(const std::string& dir, const std::string& prefix, const std::string& suffix) {
  std::vector<std::string> out;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    std::string n = e.path().filename().string();
    if (n.size() >= prefix.size() + suffix.size() && n.compare(0, prefix.size(), prefix) == 0 &&
        n.compare(n.size() - suffix.size(), suffix.size(), suffix) == 0)
      out.push_back(e.path().string());
  }
  return out;
}

// ckpt_*.safetensors.tmp files in `dir` written after `marker` was.
std::vector<std::string> fresh_temps(const std::string& dir, const std::string& marker) {
  std::vector<std::string> out;
  std::error_code ec;
  const auto t0 = fs::last_write_time(marker, ec);
  for (const auto& p : files_matching(dir, "ckpt_", ".safetensors.tmp")) {
    auto t = fs::last_write_time(p, ec);
    if (!ec && t >= t0) out.push_back(p);
  }
  return out;
}

// log.csv without the timing columns (ms, tok/s): step,kind,loss,val_loss,aux,lr,grad_norm.
std::string loss_columns(const std::string& path) {
  std::istringstream in(read_bytes(path));
  std::string line, out;
  while (std::getline(in, line)) {
    size_t p = 0;
    for (int c = 0; c < 7 && p != std::string::npos; ++c) p = line.find(',', p + 1);
    out += line.substr(0, p) + "\n";
  }
  return out;
}

}  // namespace

TEST_SUITE("crash") {
  TEST_CASE("crash: train_lm killed with SIGKILL 4 times (2 inside checkpoint writes) ends like an uninterrupted run") {
    const std::string bin = train_lm_binary();
    REQUIRE_MESSAGE(!bin.empty(), "./train_lm is not built (make train_lm)");
    TempDir dir("crash");
    const std::string data = dir.file("corpus.txt");
    write_bytes(data, generated_text());
    fs::create_directories(dir.path / "ref");
    fs::create_directories(dir.path / "crash");
    const std::string ref = dir.file("ref"), crash = dir.file("crash");
    // Relative --out_dir in both runs: the stored settings, hence the checkpoints' bytes, can be equal.
    const std::vector<std::string> args = {
        "--data",          data,  "--device",      "cpu",  "--out_dir",     "out", "--max_steps",    "40",
        "--d_model",       "16",  "--n_layers",    "2",    "--n_heads",     "2",   "--d_ff",         "32",
        "--num_clusters",  "2",   "--experts_per_cluster", "2", "--top_k_clusters", "1", "--top_k_experts", "1",
        "--seq_len",       "16",  "--batch_size",  "4",    "--dropout",     "0.1", "--eval_every",   "7",
        "--eval_iters",    "2",   "--sample_every", "0",   "--log_every",   "0",   "--save_every",   "1",
        "--keep_last",     "2",   "--warmup_steps", "4"};
    REQUIRE(wait_exit(spawn(bin, args, ref)) == 0);

    std::mt19937 rng(2024);
    const std::string out = crash + "/out", marker = dir.file("marker");
    int in_write = 0;
    for (int k = 1; k <= 4; ++k) {
      const bool resume = !latest_checkpoint(out).empty();
      write_bytes(marker, "");  // temp files newer than this were written by the process started now
      pid_t pid = spawn(bin, resume ? std::vector<std::string>{"--out_dir", "out", "--resume"} : args, crash);
      if (k % 2 == 1) {
        // Inside a write: wait (up to 20 s) for a temp file of this process; the save holds it for 30 ms.
        for (int i = 0; i < 20000 && fresh_temps(out, marker).empty(); ++i)
          std::this_thread::sleep_for(std::chrono::milliseconds(1));
      } else {
        // Between writes: once this process has completed a checkpoint (so every kill leaves progress, however
        // slowly the binary starts: a CUDA build probes for a device first), then a random moment.
        auto completed = [&] {
          std::error_code ec;
          const auto t0 = fs::last_write_time(marker, ec);
          for (const auto& c : files_matching(out, "ckpt_", ".safetensors"))
            if (fs::last_write_time(c, ec) >= t0 && !ec) return true;
          return false;
        };
        for (int i = 0; i < 20000 && !completed(); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(1));
        std::this_thread::sleep_for(std::chrono::milliseconds(rng() % 60));
      }
      ::kill(pid, SIGKILL);
      const int rc = wait_exit(pid);
      INFO("kill ", k, ": train.out:\n", read_bytes(crash + "/train.out"));
      REQUIRE_MESSAGE(rc == 128 + SIGKILL, "the run ended by itself (rc ", rc, ") before kill ", k);
      const bool torn = !fresh_temps(out, marker).empty();
      in_write += torn;
      if (k % 2 == 1) CHECK_MESSAGE(torn, "kill ", k, " should have hit a checkpoint write");
      // Every checkpoint on disk loads (a temp file is never a checkpoint).
      for (const auto& c : files_matching(out, "ckpt_", ".safetensors")) {
        SafeTensors st;
        CHECK_NOTHROW(st = load_safetensors(c));
        CHECK(st.meta("step") != nullptr);
      }
    }
    const bool resume = !latest_checkpoint(out).empty();  // a kill inside the very first write leaves none
    REQUIRE(wait_exit(spawn(bin, resume ? std::vector<std::string>{"--out_dir", "out", "--resume"} : args, crash)) == 0);
    CHECK(in_write >= 2);

    // Same end: every byte of the final checkpoint (weights, AdamW moments, buffers, RNG streams, settings), the
    // losses in log.csv, routing.csv; and no temp file left behind.
    const std::string last = "out/ckpt_00000040.safetensors";
    REQUIRE(fs::exists(crash + "/" + last));
    CHECK_MESSAGE(read_bytes(crash + "/" + last) == read_bytes(ref + "/" + last), "final checkpoints differ");
    CHECK(loss_columns(crash + "/out/log.csv") == loss_columns(ref + "/out/log.csv"));
    CHECK(read_bytes(crash + "/out/routing.csv") == read_bytes(ref + "/out/routing.csv"));
    CHECK(files_matching(out, "", ".tmp").empty());
  }
}
