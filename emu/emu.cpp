// The CPU-hosted CUDA emulator, host side: fibers and their scheduler, block barriers, warp collectives, launch
// checks, device memory, and the CUDA runtime API of emu/include/cuda_runtime.h. See emu/cuda_emu.h for the model
// and the environment variables.
#include <sys/mman.h>
#include <unistd.h>
#include <xmmintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>
#include <random>
#include <string>
#include <vector>

#include "emu/cuda_emu.h"

#if defined(__SANITIZE_ADDRESS__)
#define CM_EMU_ASAN 1
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#else
#define CM_EMU_ASAN 0
#endif

#if !defined(__x86_64__)
#error "the CUDA emulator's context switch is written for x86-64"
#endif

// ---------------------------------------------------------------- context switch (System V x86-64)
// cm_emu_switch(&save_sp, new_sp): pushes the callee-saved registers, MXCSR and the x87 control word on the current
// stack, stores the stack pointer in *save_sp, loads new_sp and pops the same frame from there. A fresh fiber's
// stack holds such a frame whose return address is cm_emu_fiber_start. Unlike swapcontext, no system call (no
// signal-mask save): about 5x faster.
extern "C" void cm_emu_switch(void** save_sp, void* new_sp);
extern "C" void cm_emu_fiber_start();
extern "C" void cm_emu_fiber_main();
asm(R"(
.text
.p2align 4
.globl cm_emu_switch
.hidden cm_emu_switch
.type cm_emu_switch,@function
cm_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size cm_emu_switch, .-cm_emu_switch
.p2align 4
.globl cm_emu_fiber_start
.hidden cm_emu_fiber_start
.type cm_emu_fiber_start,@function
cm_emu_fiber_start:
  call cm_emu_fiber_main@PLT
  ud2
.size cm_emu_fiber_start, .-cm_emu_fiber_start
)");

namespace cm_emu {

Current g_cur;
unsigned long long g_block_epoch = 0;

namespace {

// ---------------------------------------------------------------- settings
enum class Schedule { Fifo, Random, Warp };
struct Settings {
  Schedule schedule = Schedule::Fifo;
  uint64_t seed = 1;
  bool strict = true;
  bool abort_on_error = false;
};
Settings& settings() {
  static Settings s = [] {
    Settings r;
    if (const char* e = std::getenv("CM_EMU_SCHEDULE")) {
      const std::string v = e;
      if (v == "fifo" || v.empty()) r.schedule = Schedule::Fifo;
      else if (v == "random") r.schedule = Schedule::Random;
      else if (v == "warp") r.schedule = Schedule::Warp;
      else {
        std::fprintf(stderr, "CM_EMU_SCHEDULE=%s: expected fifo, random or warp\n", e);
        std::exit(2);
      }
    }
    if (const char* e = std::getenv("CM_EMU_SEED")) {
      char* end = nullptr;
      r.seed = std::strtoull(e, &end, 10);
      if (!*e || *end) {
        std::fprintf(stderr, "CM_EMU_SEED=%s: expected a non-negative integer\n", e);
        std::exit(2);
      }
    }
    if (const char* e = std::getenv("CM_EMU_STRICT")) r.strict = !(e[0] == '0' && e[1] == 0);
    if (const char* e = std::getenv("CM_EMU_ABORT")) r.abort_on_error = e[0] && !(e[0] == '0' && e[1] == 0);
    return r;
  }();
  return s;
}

}  // namespace

void set_mode(int schedule, uint64_t seed, bool strict) {
  settings().schedule = (Schedule)schedule;
  settings().seed = seed;
  settings().strict = strict;
}
Mode mode() { return Mode{(int)settings().schedule, settings().seed, settings().strict}; }

namespace {

// ---------------------------------------------------------------- fibers
#if CM_EMU_ASAN
constexpr size_t kStack = 256 << 10;  // ASan's larger frames and redzones
#else
constexpr size_t kStack = 64 << 10;
#endif
const size_t kPage = (size_t)sysconf(_SC_PAGESIZE);

struct Fiber {
  char* lo = nullptr;  // lowest usable address; a guard page lies below
  void* sp = nullptr;
  void* fake = nullptr;  // ASan fake stack of a suspended fiber
};

void fiber_init(Fiber& f) {
  if (!f.lo) {
    char* m = (char*)mmap(nullptr, kStack + kPage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                          -1, 0);
    if (m == MAP_FAILED) {
      std::fprintf(stderr, "cuda-emu: cannot map a fiber stack\n");
      std::abort();
    }
    mprotect(m, kPage, PROT_NONE);  // guard: a stack overflow faults instead of corrupting the neighbour
    f.lo = m + kPage;
  }
#if CM_EMU_ASAN
  __asan_unpoison_memory_region(f.lo, kStack);  // frames of a fiber abandoned after an error
#endif
  uintptr_t top = ((uintptr_t)(f.lo + kStack)) & ~(uintptr_t)15;
  uint64_t* s = (uint64_t*)top;
  // [top-8] return address; [top-56, top-8) rbp rbx r12 r13 r14 r15 (popped in reverse); [top-64] mxcsr, x87 cw.
  s[-1] = (uint64_t)(uintptr_t)&cm_emu_fiber_start;
  for (int i = 2; i <= 7; ++i) s[-i] = 0;
  uint32_t* csr = (uint32_t*)(s - 8);
  csr[0] = _mm_getcsr();
  uint16_t cw;
  asm volatile("fnstcw %0" : "=m"(cw));
  csr[1] = cw;
  f.sp = (void*)(s - 8);
  f.fake = nullptr;
}

// ---------------------------------------------------------------- block state
enum class St : uint8_t { Ready, Barrier, Warp, Exited };

struct Thread {
  uint3 tid;
  int warp, lane;
  St st = St::Ready;
  const char* file = nullptr;  // where it waits
  int line = 0;
  uint64_t result = 0;
  Fiber fiber;
};

struct Group {  // lanes of one warp meeting at one collective with one mask
  WarpOp op;
  unsigned mask = 0, arrived = 0;
  int bytes = 4;
  const char* file;
  int line;
  uint64_t val[32];
  int arg[32], width[32];
};

struct Warp {
  unsigned exists = 0, exited = 0;
  std::vector<Group> groups;
};

const char* op_name(WarpOp op) {
  switch (op) {
    case WarpOp::Sync: return "__syncwarp";
    case WarpOp::Shfl: return "__shfl_sync";
    case WarpOp::ShflUp: return "__shfl_up_sync";
    case WarpOp::ShflDown: return "__shfl_down_sync";
    case WarpOp::ShflXor: return "__shfl_xor_sync";
    case WarpOp::Ballot: return "__ballot_sync";
    case WarpOp::MatchAny: return "__match_any_sync";
    case WarpOp::Any: return "__any_sync";
    case WarpOp::All: return "__all_sync";
  }
  return "?";
}

struct Run {  // the launch being executed
  dim3 grid, block;
  size_t smem = 0;
  LaunchSite site{};
  void (*body)(void*) = nullptr;
  void* ctx = nullptr;
  std::vector<unsigned char> dyn;  // dynamic shared memory
  int n = 0;                       // threads per block
  std::vector<Thread> threads;
  std::vector<Warp> warps;
  int live = 0, exited = 0;
  int bar_count = 0;
  int bar_pred = 0;                   // threads at the barrier with a nonzero __syncthreads_count predicate
  int bar_counted = 0, bar_seen = 0;  // at the last release: bar_pred, and the threads it released
  const char* bar_file = nullptr;
  int bar_line = 0;
  Thread* cur = nullptr;
  bool failed = false;
  std::string error;
  // ready threads
  std::deque<int> fifo;
  std::vector<std::deque<int>> per_warp;
  int cur_warp = -1;
  std::mt19937_64 rng;
};
Run g_run;
void* g_sched_sp = nullptr;
#if CM_EMU_ASAN
void* g_sched_fake = nullptr;
const void* g_main_lo = nullptr;
size_t g_main_size = 0;
#endif

std::string where(const Thread& t) {
  char b[160];
  std::snprintf(b, sizeof b, "block (%u,%u,%u) thread (%u,%u,%u) (warp %d lane %d)", g_cur.bid.x, g_cur.bid.y,
                g_cur.bid.z, t.tid.x, t.tid.y, t.tid.z, t.warp, t.lane);
  return b;
}

void make_ready(int i) {
  Run& r = g_run;
  r.threads[(size_t)i].st = St::Ready;
  if (settings().schedule == Schedule::Warp) r.per_warp[(size_t)r.threads[(size_t)i].warp].push_back(i);
  else r.fifo.push_back(i);
}

int pick() {
  Run& r = g_run;
  switch (settings().schedule) {
    case Schedule::Fifo: {
      if (r.fifo.empty()) return -1;
      int i = r.fifo.front();
      r.fifo.pop_front();
      return i;
    }
    case Schedule::Random: {
      if (r.fifo.empty()) return -1;
      const size_t k = (size_t)(r.rng() % r.fifo.size());
      std::swap(r.fifo[k], r.fifo.back());
      int i = r.fifo.back();
      r.fifo.pop_back();
      return i;
    }
    case Schedule::Warp: {
      if (r.cur_warp < 0 || r.per_warp[(size_t)r.cur_warp].empty()) {
        int cand[64], nc = 0;
        for (size_t w = 0; w < r.per_warp.size(); ++w)
          if (!r.per_warp[w].empty()) cand[nc++] = (int)w;
        if (nc == 0) return -1;
        r.cur_warp = cand[r.rng() % (uint64_t)nc];
      }
      auto& q = r.per_warp[(size_t)r.cur_warp];
      int i = q.front();
      q.pop_front();
      return i;
    }
  }
  return -1;
}

// Fiber -> scheduler. `exiting`: the fiber never resumes (ASan may drop its fake stack).
void yield_to_scheduler(bool exiting) {
  Thread* t = g_run.cur;
#if CM_EMU_ASAN
  __sanitizer_start_switch_fiber(exiting ? nullptr : &t->fiber.fake, g_main_lo, g_main_size);
#endif
  cm_emu_switch(&t->fiber.sp, g_sched_sp);
#if CM_EMU_ASAN
  __sanitizer_finish_switch_fiber(t->fiber.fake, nullptr, nullptr);
#endif
  (void)exiting;
}

void fail_here(const std::string& msg) {
  Run& r = g_run;
  if (!r.failed) {
    r.failed = true;
    r.error = msg;
  }
}

// Called from a fiber after fail_here: never come back. The scheduler abandons a failed block's fibers, stacks and
// all, so nothing that owns heap memory may still be alive on this fiber's stack when it leaves: FAIL_FIBER builds
// and stores the message in one full expression, whose temporaries are destroyed before the switch.
[[noreturn]] void abandon_fiber() {
  yield_to_scheduler(true);
  std::abort();  // unreachable: the scheduler abandons a failed block
}
#define FAIL_FIBER(...)     \
  do {                      \
    fail_here(__VA_ARGS__); \
    abandon_fiber();        \
  } while (0)

std::string site(const char* f, int l) { return std::string(f ? f : "?") + ":" + std::to_string(l); }

void release_barrier() {
  Run& r = g_run;
  if (r.exited > 0 && settings().strict) {
    for (const Thread& t : r.threads)
      if (t.st == St::Exited) {
        fail_here("__syncthreads at " + site(r.bar_file, r.bar_line) + " is skipped by " + where(t) + " (and " +
                  std::to_string(r.exited - 1) +
                  " more), which exited before reaching it: every thread of a block must reach each barrier "
                  "(CM_EMU_STRICT=0 accepts this as sm_70+ hardware does)");
        return;
      }
  }
  r.bar_counted = r.bar_pred;
  r.bar_seen = r.bar_count;
  r.bar_count = 0;
  r.bar_pred = 0;
  for (size_t i = 0; i < r.threads.size(); ++i)
    if (r.threads[i].st == St::Barrier) make_ready((int)i);
}

// Lanes of `g` that can still arrive: named in the mask, existing, not exited (lenient mode) / all named (strict).
bool group_complete(const Warp& w, const Group& g) {
  const unsigned need = g.mask & w.exists & ~w.exited;
  return (g.arrived & need) == need;
}

void resolve(Warp& w, size_t gi) {
  Run& r = g_run;
  Group g = w.groups[gi];
  w.groups.erase(w.groups.begin() + (long)gi);
  const int base = (int)(&w - r.warps.data()) * 32;
  const unsigned arrived = g.arrived;
  const uint64_t vmask = g.bytes == 8 ? ~0ull : 0xffffffffull;
  for (int lane = 0; lane < 32; ++lane) {
    if (!(arrived >> lane & 1)) continue;
    Thread& t = r.threads[(size_t)(base + lane)];
    uint64_t res = 0;
    const int width = g.width[lane];
    auto from = [&](int src) -> uint64_t {
      if (!(arrived >> src & 1)) {
        if (settings().strict)
          fail_here(std::string(op_name(g.op)) + " at " + site(g.file, g.line) + ": lane " + std::to_string(lane) +
                    " of warp " + std::to_string(base / 32) + " reads lane " + std::to_string(src) +
                    ", which does not take part (mask 0x" + [&] {
                      char b[16];
                      std::snprintf(b, sizeof b, "%08x", g.mask);
                      return std::string(b);
                    }() + "): the value is undefined on the device");
        return 0xffffffffffffffffull & vmask;
      }
      return g.val[src] & vmask;
    };
    switch (g.op) {
      case WarpOp::Sync: break;
      case WarpOp::Shfl: {
        const int seg = lane & ~(width - 1);
        res = from(seg + (g.arg[lane] & (width - 1)));
        break;
      }
      case WarpOp::ShflUp: {
        const int d = g.arg[lane];
        res = (lane & (width - 1)) >= d ? from(lane - d) : g.val[lane] & vmask;
        break;
      }
      case WarpOp::ShflDown: {
        const int d = g.arg[lane];
        res = (lane & (width - 1)) + d < width ? from(lane + d) : g.val[lane] & vmask;
        break;
      }
      case WarpOp::ShflXor: {
        const int src = lane ^ g.arg[lane];
        const int seg = lane & ~(width - 1);
        res = src >= seg && src < seg + width && src < 32 ? from(src) : g.val[lane] & vmask;
        break;
      }
      case WarpOp::Ballot:
      case WarpOp::Any:
      case WarpOp::All: {
        unsigned b = 0;
        for (int l = 0; l < 32; ++l)
          if ((arrived >> l & 1) && g.val[l]) b |= 1u << l;
        res = g.op == WarpOp::Ballot ? b : g.op == WarpOp::Any ? (b != 0) : (b == arrived);
        break;
      }
      case WarpOp::MatchAny: {
        unsigned b = 0;
        for (int l = 0; l < 32; ++l)
          if ((arrived >> l & 1) && (g.val[l] & vmask) == (g.val[lane] & vmask)) b |= 1u << l;
        res = b;
        break;
      }
    }
    t.result = res;
    make_ready(base + lane);
  }
}

std::string hex(unsigned m) {
  char b[16];
  std::snprintf(b, sizeof b, "0x%08x", m);
  return b;
}

// A lane exited: barriers and collectives waiting for it may be complete now (or, strict, broken).
void on_exit(Thread& t) {
  Run& r = g_run;
  t.st = St::Exited;
  r.live--;
  r.exited++;
  Warp& w = r.warps[(size_t)t.warp];
  w.exited |= 1u << t.lane;
  for (size_t gi = 0; gi < w.groups.size();) {
    Group& g = w.groups[gi];
    if ((g.mask >> t.lane & 1) && !(g.arrived >> t.lane & 1)) {
      if (settings().strict) {
        fail_here(std::string(op_name(g.op)) + " at " + site(g.file, g.line) + " with mask " + hex(g.mask) +
                  " waits for " + where(t) + ", which exited without reaching it");
        return;
      }
      if (group_complete(w, g)) {
        resolve(w, gi);
        continue;
      }
    }
    ++gi;
  }
  if (r.bar_count > 0 && r.bar_count == r.live) release_barrier();
}

}  // namespace

// ---------------------------------------------------------------- device-side entry points
void syncthreads(const char* file, int line) {
  Run& r = g_run;
  Thread& t = *r.cur;
  if (r.bar_count == 0) {
    r.bar_file = file;
    r.bar_line = line;
  } else if (settings().strict && (r.bar_line != line || std::strcmp(r.bar_file, file) != 0)) {
    FAIL_FIBER("threads of one block wait at different barriers: " + where(t) + " at __syncthreads " +
               site(file, line) + ", others at " + site(r.bar_file, r.bar_line) +
               " (CM_EMU_STRICT=0 counts them as one barrier, as the hardware does)");
  }
  t.st = St::Barrier;
  t.file = file;
  t.line = line;
  if (++r.bar_count == r.live) release_barrier();
  if (r.failed) FAIL_FIBER(r.error);
  yield_to_scheduler(false);
}

int syncthreads_count(int pred, const char* file, int line, int* released) {
  Run& r = g_run;
  r.bar_pred += pred != 0;
  syncthreads(file, line);
  // Read before this thread's next barrier can complete: that needs every thread, this one included.
  if (released) *released = r.bar_seen;
  return r.bar_counted;
}

uint64_t warp_collective(WarpOp op, unsigned mask, uint64_t value, int bytes, int arg, int width, const char* file,
                         int line) {
  Run& r = g_run;
  Thread& t = *r.cur;
  Warp& w = r.warps[(size_t)t.warp];
  const bool strict = settings().strict;
  if (!(mask >> t.lane & 1))
    FAIL_FIBER(std::string(op_name(op)) + " at " + site(file, line) + ": " + where(t) + " calls it with mask " +
               hex(mask) + ", which does not name the calling lane");
  if (width < 1 || width > 32 || (width & (width - 1)))
    FAIL_FIBER(std::string(op_name(op)) + " at " + site(file, line) + ": width " + std::to_string(width) +
               " is not a power of two in [1, 32]");
  if (strict && (mask & ~w.exists))
    FAIL_FIBER(std::string(op_name(op)) + " at " + site(file, line) + ": mask " + hex(mask) +
               " names lanes that do not exist (block of " + std::to_string(r.n) + " threads)");
  if (strict && (mask & w.exited)) {
    int l = __builtin_ctz(mask & w.exited);
    FAIL_FIBER(std::string(op_name(op)) + " at " + site(file, line) + " (" + where(t) + "): mask " + hex(mask) +
               " names lane " + std::to_string(l) + ", which has exited");
  }
  size_t gi = 0;
  for (; gi < w.groups.size(); ++gi)
    if (w.groups[gi].mask == mask) break;
  if (strict)
    for (const Group& o : w.groups)
      if (o.mask != mask && (o.mask & mask))
        FAIL_FIBER(std::string(op_name(op)) + " at " + site(file, line) + " (" + where(t) + ") with mask " +
                   hex(mask) + " meets lanes waiting at " + op_name(o.op) + " " + site(o.file, o.line) +
                   " with the overlapping mask " + hex(o.mask));
  if (gi == w.groups.size()) {
    Group g;
    g.op = op;
    g.mask = mask;
    g.bytes = bytes;
    g.file = file;
    g.line = line;
    w.groups.push_back(g);
  } else {
    Group& g = w.groups[gi];
    if (g.op != op || g.bytes != bytes)
      FAIL_FIBER(std::string("lanes of one warp meet at different collectives: ") + where(t) + " at " +
                 op_name(op) + " " + site(file, line) + ", lanes " + hex(g.arrived) + " at " + op_name(g.op) + " " +
                 site(g.file, g.line));
    if (strict && (g.line != line || std::strcmp(g.file, file) != 0))
      FAIL_FIBER(std::string("lanes of one warp reach ") + op_name(op) + " from different call sites: " + where(t) +
                 " at " + site(file, line) + ", lanes " + hex(g.arrived) + " at " + site(g.file, g.line) +
                 " (divergent collective; CM_EMU_STRICT=0 accepts it as sm_70+ hardware does)");
  }
  Group& g = w.groups[gi];
  g.val[t.lane] = value;
  g.arg[t.lane] = arg;
  g.width[t.lane] = width;
  g.arrived |= 1u << t.lane;
  t.st = St::Warp;
  t.file = file;
  t.line = line;
  if (group_complete(w, g)) resolve(w, gi);
  if (r.failed) FAIL_FIBER(r.error);
  yield_to_scheduler(false);
  return t.result;
}

[[noreturn]] void kernel_error(const char* what) { FAIL_FIBER(what); }

void* dynamic_smem_raw() { return g_run.dyn.empty() ? nullptr : g_run.dyn.data(); }

void poison_shared(void* p, size_t nbytes) { std::memset(p, 0xff, nbytes); }

}  // namespace cm_emu

// The first code a fiber runs.
extern "C" void cm_emu_fiber_main() {
  using namespace cm_emu;
#if CM_EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &g_main_lo, &g_main_size);
#endif
  Run& r = g_run;
  bool escaped = false;
  try {
    r.body(r.ctx);
  } catch (...) {
    escaped = true;  // fail outside the handler, so the exception is freed before the fiber is abandoned
  }
  if (escaped) FAIL_FIBER("a C++ exception escaped a kernel thread (" + where(*r.cur) + ")");
  on_exit(*r.cur);
  yield_to_scheduler(true);
  std::abort();  // an exited fiber is never resumed
}

namespace cm_emu {
namespace {

// ---------------------------------------------------------------- runtime state
std::recursive_mutex g_mu;  // one launch or API call at a time
cudaError_t g_last = cudaSuccess;
cudaError_t g_pending = cudaSuccess;  // a kernel failure not yet reported by a synchronising call

void set_error(cudaError_t e) {
  if (e != cudaSuccess) g_last = e;
}

// The state of the block machinery when the scheduler runs a block.
void run_block() {
  Run& r = g_run;
  const int n = r.n;
  r.live = n;
  r.exited = 0;
  r.bar_count = 0;
  r.bar_pred = 0;
  r.cur_warp = -1;
  r.fifo.clear();
  const int nw = (n + 31) / 32;
  for (int w = 0; w < nw; ++w) {
    Warp& W = r.warps[(size_t)w];
    const int lanes = std::min(32, n - w * 32);
    W.exists = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1);
    W.exited = 0;
    W.groups.clear();
    r.per_warp[(size_t)w].clear();
  }
  for (int i = 0; i < n; ++i) {
    Thread& t = r.threads[(size_t)i];
    t.st = St::Ready;
    fiber_init(t.fiber);
    make_ready(i);
  }
  ++g_block_epoch;
  if (!r.dyn.empty()) std::memset(r.dyn.data(), 0xff, r.dyn.size());
  for (;;) {
    const int i = pick();
    if (i < 0) break;
    Thread& t = r.threads[(size_t)i];
    r.cur = &t;
    g_cur.tid = t.tid;
#if CM_EMU_ASAN
    __sanitizer_start_switch_fiber(&g_sched_fake, t.fiber.lo, kStack);
#endif
    cm_emu_switch(&g_sched_sp, t.fiber.sp);
#if CM_EMU_ASAN
    __sanitizer_finish_switch_fiber(g_sched_fake, nullptr, nullptr);  // "from" is the fiber: keep g_main_* as is
#endif
    r.cur = nullptr;
    if (r.failed) return;
  }
  if (r.live > 0) {  // nobody can run, somebody has not finished: a deadlock
    std::string msg = "deadlock: no thread can run; waiting:";
    int shown = 0;
    for (const Thread& t : r.threads) {
      if (t.st == St::Exited) continue;
      if (shown++ == 6) {
        msg += " ...";
        break;
      }
      msg += "\n  " + where(t) + (t.st == St::Barrier ? " at __syncthreads " : " at a warp collective ") +
             site(t.file, t.line);
    }
    if (r.exited) msg += "\n  (" + std::to_string(r.exited) + " threads of the block have exited)";
    fail_here(msg);
  }
}

}  // namespace

void run_grid(dim3 grid, dim3 block, size_t smem, cudaStream_t, LaunchSite site_, void (*body)(void*), void* ctx) {
  std::lock_guard<std::recursive_mutex> lock(g_mu);
  // Configuration, checked as sm_90 checks it (cudaErrorInvalidConfiguration, reported by cudaGetLastError).
  const uint64_t threads = (uint64_t)block.x * block.y * block.z;
  const char* bad = nullptr;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) bad = "an empty grid";
  else if (block.x == 0 || block.y == 0 || block.z == 0) bad = "an empty block";
  else if (threads > 1024) bad = "more than 1024 threads per block";
  else if (block.x > 1024 || block.y > 1024 || block.z > 64) bad = "a block dimension over (1024, 1024, 64)";
  else if (grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535) bad = "a grid over (2^31-1, 65535, 65535)";
  if (bad) {
    if (settings().abort_on_error) {
      std::fprintf(stderr, "cuda-emu: launch at %s:%d: %s\n", site_.file, site_.line, bad);
      std::abort();
    }
    set_error(cudaErrorInvalidConfiguration);
    return;
  }
  if (smem > 48 * 1024) {  // no kernel of ours opts in (cudaFuncAttributeMaxDynamicSharedMemorySize)
    if (settings().abort_on_error) {
      std::fprintf(stderr, "cuda-emu: launch at %s:%d: %zu bytes of dynamic shared memory (over 48 KiB)\n",
                   site_.file, site_.line, smem);
      std::abort();
    }
    set_error(cudaErrorInvalidValue);
    return;
  }
  Run& r = g_run;
  const Current saved = g_cur;
  r.grid = grid;
  r.block = block;
  r.smem = smem;
  r.site = site_;
  r.body = body;
  r.ctx = ctx;
  r.failed = false;
  r.error.clear();
  r.n = (int)threads;
  if (r.threads.size() < threads) r.threads.resize(threads);
  const int nw = (r.n + 31) / 32;
  if ((int)r.warps.size() < nw) r.warps.resize((size_t)nw);
  if ((int)r.per_warp.size() < nw) r.per_warp.resize((size_t)nw);
  for (int i = 0; i < r.n; ++i) {
    Thread& t = r.threads[(size_t)i];
    t.tid = uint3{(unsigned)(i % block.x), (unsigned)(i / block.x % block.y), (unsigned)(i / (block.x * block.y))};
    t.warp = i / 32;
    t.lane = i % 32;
  }
  r.dyn.assign(smem, 0xff);
  static uint64_t launches = 0;
  r.rng.seed(settings().seed * 0x9E3779B97F4A7C15ull + ++launches);
  g_cur.block = block;
  g_cur.grid = grid;
  const uint64_t nblocks = (uint64_t)grid.x * grid.y * grid.z;
  std::vector<uint32_t> order;
  if (settings().schedule != Schedule::Fifo && nblocks <= (1u << 22)) {
    order.resize(nblocks);
    for (uint64_t b = 0; b < nblocks; ++b) order[b] = (uint32_t)b;
    std::shuffle(order.begin(), order.end(), r.rng);
  }
  for (uint64_t k = 0; k < nblocks && !r.failed; ++k) {
    const uint64_t b = order.empty() ? k : order[k];
    g_cur.bid = uint3{(unsigned)(b % grid.x), (unsigned)(b / grid.x % grid.y), (unsigned)(b / ((uint64_t)grid.x * grid.y))};
    run_block();
  }
  if (r.failed) {
    std::fprintf(stderr, "cuda-emu: kernel launched at %s:%d failed in block (%u,%u,%u): %s\n", site_.file,
                 site_.line, g_cur.bid.x, g_cur.bid.y, g_cur.bid.z, r.error.c_str());
    if (settings().abort_on_error) std::abort();
    set_error(cudaErrorLaunchFailure);
    g_pending = cudaErrorLaunchFailure;
  }
  g_cur = saved;
}

// ---------------------------------------------------------------- device memory
namespace {
struct Block {
  size_t size;         // bytes from cudaMalloc
  size_t valid;        // bytes handed out by the engine's allocator (cudaEmuSetValidRange); size by default
};
std::map<uintptr_t, Block>& blocks() {
  static auto* m = new std::map<uintptr_t, Block>;  // never destroyed: device memory may be freed after main()
  return *m;
}
size_t g_allocated = 0;
constexpr size_t kTotalMem = size_t(80) << 30;  // what the emulated device reports (an 80 GB H100)

// The block containing [p, p + n), or null.
const std::pair<const uintptr_t, Block>* find_block(const void* p, size_t n, bool valid_only) {
  auto& m = blocks();
  const uintptr_t a = (uintptr_t)p;
  auto it = m.upper_bound(a);
  if (it == m.begin()) return nullptr;
  --it;
  const size_t lim = valid_only ? it->second.valid : it->second.size;
  if (a - it->first > lim || n > lim - (a - it->first)) return nullptr;
  return &*it;
}
}  // namespace

bool device_range(const void* p, size_t nbytes) {
  std::lock_guard<std::recursive_mutex> lock(g_mu);
  return find_block(p, nbytes, true) != nullptr;
}

bool check_kernel_pointer(const void* p, int i, LaunchSite s) {
  if (!p) return true;
  std::lock_guard<std::recursive_mutex> lock(g_mu);
  if (find_block(p, 0, true)) return true;
  const auto* any = find_block(p, 0, false);
  std::fprintf(stderr, "cuda-emu: kernel launched at %s:%d: pointer argument %d (%p) %s\n", s.file, s.line, i, p,
               any ? (any->second.valid == 0 ? "points into a freed block of the caching allocator"
                                             : "points past the bytes handed out of its block")
                   : "is not device memory (a host pointer, or freed)");
  if (settings().abort_on_error) std::abort();
  set_error(cudaErrorInvalidValue);
  return false;
}

}  // namespace cm_emu

using namespace cm_emu;

void cudaEmuSetValidRange(void* p, size_t valid, size_t total) {
  std::lock_guard<std::recursive_mutex> lock(g_mu);
  auto it = blocks().find((uintptr_t)p);
  if (it == blocks().end()) return;
  it->second.valid = std::min(valid, it->second.size);
#if CM_EMU_ASAN
  __asan_unpoison_memory_region(p, valid);
  if (total > valid) __asan_poison_memory_region((char*)p + valid, total - valid);
#else
  (void)total;
#endif
}

// ---------------------------------------------------------------- runtime API: errors
const char* cudaGetErrorName(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorInitializationError: return "cudaErrorInitializationError";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidDevicePointer: return "cudaErrorInvalidDevicePointer";
    case cudaErrorInvalidMemcpyDirection: return "cudaErrorInvalidMemcpyDirection";
    case cudaErrorInsufficientDriver: return "cudaErrorInsufficientDriver";
    case cudaErrorNoDevice: return "cudaErrorNoDevice";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    case cudaErrorInvalidResourceHandle: return "cudaErrorInvalidResourceHandle";
    case cudaErrorNotReady: return "cudaErrorNotReady";
    case cudaErrorIllegalAddress: return "cudaErrorIllegalAddress";
    case cudaErrorLaunchOutOfResources: return "cudaErrorLaunchOutOfResources";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
    case cudaErrorStreamCaptureUnsupported: return "cudaErrorStreamCaptureUnsupported";
    case cudaErrorStreamCaptureInvalidated: return "cudaErrorStreamCaptureInvalidated";
    case cudaErrorStreamCaptureUnmatched: return "cudaErrorStreamCaptureUnmatched";
    case cudaErrorStreamCaptureWrongThread: return "cudaErrorStreamCaptureWrongThread";
    case cudaErrorUnknown: return "cudaErrorUnknown";
  }
  return "cudaErrorUnknown";
}
const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInitializationError: return "initialization error";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidDevicePointer: return "invalid device pointer";
    case cudaErrorInvalidMemcpyDirection: return "invalid copy direction for memcpy";
    case cudaErrorInsufficientDriver: return "CUDA driver version is insufficient for CUDA runtime version";
    case cudaErrorNoDevice: return "no CUDA-capable device is detected";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    case cudaErrorInvalidResourceHandle: return "invalid resource handle";
    case cudaErrorNotReady: return "device not ready";
    case cudaErrorIllegalAddress: return "an illegal memory access was encountered";
    case cudaErrorLaunchOutOfResources: return "too many resources requested for launch";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
    case cudaErrorStreamCaptureUnsupported: return "operation not permitted when stream is capturing";
    case cudaErrorStreamCaptureInvalidated: return "operation failed due to a previous error during capture";
    case cudaErrorStreamCaptureUnmatched: return "operation not matched with a capture begin";
    case cudaErrorStreamCaptureWrongThread: return "capture was not initiated in this thread";
    case cudaErrorUnknown: return "unknown error";
  }
  return "unknown error";
}
cudaError_t cudaGetLastError() {
  std::lock_guard<std::recursive_mutex> lock(g_mu);
  cudaError_t e = g_last;
  g_last = cudaSuccess;
  if (e == g_pending) g_pending = cudaSuccess;
  return e;
}
cudaError_t cudaPeekAtLastError() {
  std::lock_guard<std::recursive_mutex> lock(g_mu);
  return g_last;
}
namespace {
// What a synchronising call returns: a kernel failure not reported yet, once.
cudaError_t sync_status() {
  cudaError_t e = g_pending;
  g_pending = cudaSuccess;
  if (e != cudaSuccess && g_last == e) g_last = cudaSuccess;
  return e;
}
cudaError_t ret(cudaError_t e) {
  set_error(e);
  return e;
}
}  // namespace

// ---------------------------------------------------------------- pinned host memory: the slowest device allowed
// A copy queued from pinned host memory (cudaHostAlloc) reads its source whenever the device gets to it, so the host
// may not write that memory until an event recorded after the copy, or a synchronisation, has shown the copy done.
// The emulator copies at once (the kernels queued after it see the bytes, in stream order) and models the slowest
// device the rules allow: the copy stays pending, and an event recorded after it unreached (cudaEventQuery:
// cudaErrorNotReady), until the host synchronises past it: cudaStreamSynchronize, cudaDeviceSynchronize,
// cudaEventSynchronize (up to its event), a copy to or from pageable host memory, cudaFree, cudaFreeHost. Then each
// pending copy's source must still hold the bytes it copied: a write in between is reported on stderr and returned
// by that synchronising call (cudaErrorUnknown; an abort with CM_EMU_ABORT=1). Copies into pinned memory are not
// deferred (the engine reads nothing through them).
namespace {
struct PendingRead {
  const char* src;
  std::vector<char> bytes;  // what the copy read
  uint64_t pos;             // its place among the queued pinned copies, from 1
};
std::map<uintptr_t, size_t>& pinned_blocks() {
  static auto* m = new std::map<uintptr_t, size_t>;
  return *m;
}
std::deque<PendingRead> g_reads;
uint64_t g_queued = 0;   // pinned copies queued so far
uint64_t g_reached = 0;  // the host has synchronised past the first g_reached of them

bool in_pinned(const void* p, size_t n) {
  auto& m = pinned_blocks();
  const uintptr_t a = (uintptr_t)p;
  auto it = m.upper_bound(a);
  if (it == m.begin()) return false;
  --it;
  return a - it->first <= it->second && n <= it->second - (a - it->first);
}

// The host has synchronised past the first pos pinned copies: check their sources.
cudaError_t reach(uint64_t pos) {
  cudaError_t e = cudaSuccess;
  while (!g_reads.empty() && g_reads.front().pos <= pos) {
    const PendingRead& r = g_reads.front();
    if (std::memcmp(r.src, r.bytes.data(), r.bytes.size()) != 0) {
      std::fprintf(stderr,
                   "cuda-emu: pinned host memory (%zu bytes at %p) was written while the copy queued from it could "
                   "still be reading it (no event after the copy, nor a synchronisation, had shown it done)\n",
                   r.bytes.size(), (const void*)r.src);
      if (settings().abort_on_error) std::abort();
      e = cudaErrorUnknown;
    }
    g_reads.pop_front();
  }
  g_reached = std::max(g_reached, pos);
  return e == cudaSuccess ? e : ret(e);
}
// A synchronising call up to the first pos pinned copies (all of them: sync_all): any kernel failure not reported
// yet, else what the copies' check found.
cudaError_t sync_to(uint64_t pos) {
  const cudaError_t r = reach(pos), k = sync_status();
  return k != cudaSuccess ? k : r;
}
cudaError_t sync_all() { return sync_to(g_queued); }
}  // namespace

// ---------------------------------------------------------------- runtime API: device
cudaError_t cudaGetDeviceCount(int* count) {
  if (!count) return ret(cudaErrorInvalidValue);
  *count = 1;
  return cudaSuccess;
}
cudaError_t cudaSetDevice(int device) { return device == 0 ? cudaSuccess : ret(cudaErrorInvalidDevice); }
cudaError_t cudaGetDevice(int* device) {
  if (!device) return ret(cudaErrorInvalidValue);
  *device = 0;
  return cudaSuccess;
}
cudaError_t cudaGetDeviceProperties(cudaDeviceProp* p, int device) {
  if (!p) return ret(cudaErrorInvalidValue);
  if (device != 0) return ret(cudaErrorInvalidDevice);
  std::memset(p, 0, sizeof *p);
  std::snprintf(p->name, sizeof p->name, "cuda-emu (CPU-hosted CUDA emulator, sm_90 limits)");
  p->totalGlobalMem = kTotalMem;
  p->sharedMemPerBlock = 48 << 10;
  p->sharedMemPerBlockOptin = 227 << 10;
  p->sharedMemPerMultiprocessor = 228 << 10;
  p->regsPerBlock = 65536;
  p->warpSize = 32;
  p->maxThreadsPerBlock = 1024;
  p->maxThreadsDim[0] = 1024;
  p->maxThreadsDim[1] = 1024;
  p->maxThreadsDim[2] = 64;
  p->maxGridSize[0] = 2147483647;
  p->maxGridSize[1] = 65535;
  p->maxGridSize[2] = 65535;
  p->major = 9;
  p->minor = 0;
  p->multiProcessorCount = 132;
  p->maxThreadsPerMultiProcessor = 2048;
  p->l2CacheSize = 50 << 20;
  return cudaSuccess;
}
cudaError_t cudaDeviceSynchronize() {
  std::lock_guard<std::recursive_mutex> lock(g_mu);
  return sync_all();
}
cudaError_t cudaMemGetInfo(size_t* free_b, size_t* total_b) {
  std::lock_guard<std::recursive_mutex> lock(g_mu);
  if (!free_b || !total_b) return ret(cudaErrorInvalidValue);
  *total_b = kTotalMem;
  *free_b = kTotalMem - std::min(kTotalMem, g_allocated);
  return cudaSuccess;
}

// ---------------------------------------------------------------- runtime API: streams and events
struct CUstream_st {
  unsigned flags = 0;
  bool capturing = false;
  std::vector<std::pair<std::pair<void (*)(void*), void (*)(void*)>, void*>> captured;  // (replay, destroy), ctx
};
struct CUevent_st {
  std::chrono::steady_clock::time_point t{};
  bool recorded = false;
  uint64_t pos = 0;  // the pinned-memory copies queued before it (g_queued at the record)
};
cudaError_t cudaStreamCreate(cudaStream_t* s) { return cudaStreamCreateWithFlags(s, cudaStreamDefault); }
cudaError_t cudaStreamCreateWithFlags(cudaStream_t* s, unsigned flags) {
  if (!s || flags > 1) return ret(cudaErrorInvalidValue);
  *s = new CUstream_st;
  (*s)->flags = flags;
  return cudaSuccess;
}
cudaError_t cudaStreamDestroy(cudaStream_t s) {
  if (!s) return ret(cudaErrorInvalidResourceHandle);
  delete s;
  return cudaSuccess;
}
cudaError_t cudaStreamSynchronize(cudaStream_t s) {
  std::lock_guard<std::recursive_mutex> lock(g_mu);
  if (s && s->capturing) return ret(cudaErrorStreamCaptureUnsupported);
  return sync_all();
}
cudaError_t cudaEventCreate(cudaEvent_t* e) {
  if (!e) return ret(cudaErrorInvalidValue);
  *e = new CUevent_st;
  return cudaSuccess;
}
cudaError_t cudaEventDestroy(cudaEvent_t e) {
  if (!e) return ret(cudaErrorInvalidResourceHandle);
  delete e;
  return cudaSuccess;
}
cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t) {
  if (!e) return ret(cudaErrorInvalidResourceHandle);
  std::lock_guard<std::recursive_mutex> lock(g_mu);
  e->t = std::chrono::steady_clock::now();
  e->recorded = true;
  e->pos = g_queued;
  return cudaSuccess;
}
cudaError_t cudaEventQuery(cudaEvent_t e) {
  if (!e) return ret(cudaErrorInvalidResourceHandle);
  std::lock_guard<std::recursive_mutex> lock(g_mu);
  return e->pos <= g_reached ? cudaSuccess : ret(cudaErrorNotReady);  // the slowest device: not before a wait
}
cudaError_t cudaEventSynchronize(cudaEvent_t e) {
  if (!e) return ret(cudaErrorInvalidResourceHandle);
  std::lock_guard<std::recursive_mutex> lock(g_mu);
  return sync_to(e->pos);
}
cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t a, cudaEvent_t b) {
  if (!ms) return ret(cudaErrorInvalidValue);
  if (!a || !b) return ret(cudaErrorInvalidResourceHandle);
  if (!a->recorded || !b->recorded) return ret(cudaErrorInvalidResourceHandle);
  *ms = std::chrono::duration<float, std::milli>(b->t - a->t).count();
  return cudaSuccess;
}

// ---------------------------------------------------------------- runtime API: memory
cudaError_t cudaMalloc(void** p, size_t n) {
  std::lock_guard<std::recursive_mutex> lock(g_mu);
  if (!p) return ret(cudaErrorInvalidValue);
  *p = nullptr;
  if (n == 0) return cudaSuccess;
  if (g_allocated + n > kTotalMem) return ret(cudaErrorMemoryAllocation);
  void* m = nullptr;
  if (posix_memalign(&m, 256, n) != 0 || !m) return ret(cudaErrorMemoryAllocation);
  // Fresh device memory holds garbage: 0xff bytes (NaN as f32, -1 as integers) make reads before writes show,
  // for blocks small enough to fill cheaply (a large block stays untouched, so its pages stay uncommitted).
  if (n <= (size_t(64) << 20)) std::memset(m, 0xff, n);
  blocks()[(uintptr_t)m] = Block{n, n};
  g_allocated += n;
  *p = m;
  return cudaSuccess;
}
cudaError_t cudaFree(void* p) {
  std::lock_guard<std::recursive_mutex> lock(g_mu);
  if (!p) return cudaSuccess;
  auto it = blocks().find((uintptr_t)p);
  if (it == blocks().end()) return ret(cudaErrorInvalidValue);
#if CM_EMU_ASAN
  __asan_unpoison_memory_region(p, it->second.size);
#endif
  g_allocated -= it->second.size;
  blocks().erase(it);
  std::free(p);
  return sync_all();
}
cudaError_t cudaHostAlloc(void** p, size_t n, unsigned flags) {
  std::lock_guard<std::recursive_mutex> lock(g_mu);
  if (!p || flags != cudaHostAllocDefault) return ret(cudaErrorInvalidValue);
  *p = nullptr;
  if (n == 0) return cudaSuccess;
  void* m = nullptr;
  if (posix_memalign(&m, 4096, n) != 0 || !m) return ret(cudaErrorMemoryAllocation);
  pinned_blocks()[(uintptr_t)m] = n;
  *p = m;
  return cudaSuccess;
}
cudaError_t cudaFreeHost(void* p) {
  std::lock_guard<std::recursive_mutex> lock(g_mu);
  if (!p) return cudaSuccess;
  auto it = pinned_blocks().find((uintptr_t)p);
  if (it == pinned_blocks().end()) return ret(cudaErrorInvalidValue);
  const cudaError_t r = sync_all();  // frees only once every copy from it is done
  pinned_blocks().erase(it);
  std::free(p);
  return r;
}

namespace {
struct CopyOp {
  void* dst;
  const void* src;
  size_t n;
  int value;  // memset when src == nullptr
};
void replay_copy(void* ctx) {
  auto* c = static_cast<CopyOp*>(ctx);
  if (c->src) std::memmove(c->dst, c->src, c->n);
  else std::memset(c->dst, c->value, c->n);
}
void destroy_copy(void* ctx) { delete static_cast<CopyOp*>(ctx); }

cudaError_t memcpy_impl(void* dst, const void* src, size_t n, cudaMemcpyKind kind, cudaStream_t s, bool async) {
  std::lock_guard<std::recursive_mutex> lock(g_mu);
  if (n == 0) return cudaSuccess;
  if (!dst || !src) return ret(cudaErrorInvalidValue);
  const bool dd = find_block(dst, n, true) != nullptr, sd = find_block(src, n, true) != nullptr;
  const bool d_any = find_block(dst, 0, false) != nullptr, s_any = find_block(src, 0, false) != nullptr;
  bool ok = true;
  switch (kind) {
    case cudaMemcpyHostToDevice: ok = dd && !s_any; break;
    case cudaMemcpyDeviceToHost: ok = sd && !d_any; break;
    case cudaMemcpyDeviceToDevice: ok = dd && sd; break;
    case cudaMemcpyHostToHost: ok = !d_any && !s_any; break;
    case cudaMemcpyDefault: ok = (dd || !d_any) && (sd || !s_any); break;
    default: return ret(cudaErrorInvalidMemcpyDirection);
  }
  if (!ok) {
    std::fprintf(stderr, "cuda-emu: cudaMemcpy of %zu bytes, kind %d: %s\n", n, (int)kind,
                 "a side is not where its kind says (a device range must lie inside one live block)");
    if (settings().abort_on_error) std::abort();
    return ret(cudaErrorInvalidValue);
  }
  if (s && s->capturing) {
    if (kind != cudaMemcpyDeviceToDevice) return ret(cudaErrorStreamCaptureUnsupported);  // host memory in a graph
    s->captured.push_back({{&replay_copy, &destroy_copy}, new CopyOp{dst, src, n, 0}});
    return cudaSuccess;
  }
  std::memmove(dst, src, n);
  if (dd && sd) return cudaSuccess;
  if (async && dd && in_pinned(src, n)) {  // queued: the source stays the copy's until the host waits past it
    g_reads.push_back({static_cast<const char*>(src), std::vector<char>((const char*)src, (const char*)src + n),
                       ++g_queued});
    return cudaSuccess;
  }
  return sync_all();  // pageable host memory (or a blocking copy): the stream is synchronised
}

cudaError_t memset_impl(void* p, int value, size_t n, cudaStream_t s) {
  std::lock_guard<std::recursive_mutex> lock(g_mu);
  if (n == 0) return cudaSuccess;
  if (!find_block(p, n, true)) {
    std::fprintf(stderr, "cuda-emu: cudaMemset of %zu bytes at %p: not inside one live device block\n", n, p);
    if (settings().abort_on_error) std::abort();
    return ret(cudaErrorInvalidValue);
  }
  if (s && s->capturing) {
    s->captured.push_back({{&replay_copy, &destroy_copy}, new CopyOp{p, nullptr, n, value}});
    return cudaSuccess;
  }
  std::memset(p, value, n);
  return cudaSuccess;
}
}  // namespace

cudaError_t cudaMemcpy(void* dst, const void* src, size_t n, cudaMemcpyKind kind) {
  return memcpy_impl(dst, src, n, kind, nullptr, false);
}
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t n, cudaMemcpyKind kind, cudaStream_t s) {
  return memcpy_impl(dst, src, n, kind, s, true);
}
cudaError_t cudaMemset(void* p, int value, size_t n) { return memset_impl(p, value, n, nullptr); }
cudaError_t cudaMemsetAsync(void* p, int value, size_t n, cudaStream_t s) { return memset_impl(p, value, n, s); }

// ---------------------------------------------------------------- stream capture and graphs
// Capture records kernel launches, device-to-device copies and memsets issued on the capturing stream; a graph
// replays them in order. Host copies are refused while capturing (as CUDA refuses synchronising calls).
struct CUgraph_st {
  int refs = 1;  // the graph and each executable instantiated from it
  std::vector<std::pair<std::pair<void (*)(void*), void (*)(void*)>, void*>> ops;
  ~CUgraph_st() {
    for (auto& o : ops) o.first.second(o.second);
  }
};
struct CUgraphExec_st {
  cudaGraph_t graph;
};

namespace cm_emu {
bool capturing(cudaStream_t s) { return s && s->capturing; }
void record_launch(cudaStream_t s, void (*replay)(void*), void (*destroy)(void*), void* ctx) {
  std::lock_guard<std::recursive_mutex> lock(g_mu);
  s->captured.push_back({{replay, destroy}, ctx});
}
}  // namespace cm_emu

cudaError_t cudaStreamBeginCapture(cudaStream_t s, cudaStreamCaptureMode) {
  if (!s) return ret(cudaErrorStreamCaptureUnsupported);  // the legacy stream cannot be captured
  if (s->capturing) return ret(cudaErrorInvalidValue);
  s->capturing = true;
  s->captured.clear();
  return cudaSuccess;
}
cudaError_t cudaStreamEndCapture(cudaStream_t s, cudaGraph_t* graph) {
  if (!graph) return ret(cudaErrorInvalidValue);
  if (!s || !s->capturing) return ret(cudaErrorStreamCaptureUnmatched);
  s->capturing = false;
  auto* g = new CUgraph_st;
  g->ops.swap(s->captured);
  *graph = g;
  return cudaSuccess;
}
cudaError_t cudaStreamIsCapturing(cudaStream_t s, cudaStreamCaptureStatus* status) {
  if (!status) return ret(cudaErrorInvalidValue);
  *status = s && s->capturing ? cudaStreamCaptureStatusActive : cudaStreamCaptureStatusNone;
  return cudaSuccess;
}
cudaError_t cudaGraphInstantiate(cudaGraphExec_t* exec, cudaGraph_t graph, unsigned long long) {
  if (!exec || !graph) return ret(cudaErrorInvalidValue);
  graph->refs++;
  *exec = new CUgraphExec_st{graph};
  return cudaSuccess;
}
cudaError_t cudaGraphLaunch(cudaGraphExec_t exec, cudaStream_t s) {
  if (!exec) return ret(cudaErrorInvalidValue);
  if (s && s->capturing) return ret(cudaErrorStreamCaptureUnsupported);
  for (auto& o : exec->graph->ops) o.first.first(o.second);
  return cudaSuccess;
}
cudaError_t cudaGraphDestroy(cudaGraph_t graph) {
  if (graph && --graph->refs == 0) delete graph;
  return cudaSuccess;
}
cudaError_t cudaGraphExecDestroy(cudaGraphExec_t exec) {
  if (!exec) return cudaSuccess;
  cudaGraphDestroy(exec->graph);
  delete exec;
  return cudaSuccess;
}
