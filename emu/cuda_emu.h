// The CPU-hosted CUDA emulator, device side: force-included (g++ -include) into every .cu file of a CUDA_EMU=1
// build, the way nvcc includes cuda_runtime.h. It never defines __CUDACC__ (that changes libstdc++ and glibc);
// code that must see device helpers tests `defined(__CUDACC__) || defined(CM_CUDA_EMU)`.
//
// Model. A launch runs the grid's blocks one after another on the calling host thread. Each CUDA thread of a block
// is a fiber with a small stack of its own (emu/emu.cpp, hand-written x86-64 context switch); a fiber runs until
// it reaches a block barrier (__syncthreads), a warp collective (__syncwarp, __shfl*_sync, __ballot_sync,
// __match_any_sync) or its end, and a scheduler then picks the next fiber:
//   CM_EMU_SCHEDULE=fifo    threads in order, each until it blocks (the default)
//   CM_EMU_SCHEDULE=random  a random ready thread each time (blocks in a random order too)
//   CM_EMU_SCHEDULE=warp    one warp runs until all its lanes wait at a block barrier or have exited, then another
//                           warp chosen at random (blocks in a random order too)
//   CM_EMU_SEED=N           the seed of the random choices (default 1)
//   CM_EMU_STRICT=0         sm_70+ leniency: warp collectives reached from different call sites, masks naming
//                           exited lanes and barriers that exited threads skipped are accepted (default 1: reported)
//   CM_EMU_ABORT=1          abort() at the first error a kernel makes (default: the launch fails with
//                           cudaErrorLaunchFailure, reported by cudaGetLastError and the next synchronising call)
// Source rewrites (emu/cu2cpp.cpp, run by make on every .cu/.cuh into the build folder, line for line):
//   k<<<g, b, s, st>>>(args)  ->  ::cm_emu::launch(g, b, s, st, [](auto... a) { k(a...); })(args)
//   extern __shared__ T x[];  ->  T* x = ::cm_emu::dynamic_smem<T>();
//   __shared__ T x[N];        ->  the same, then CM_EMU_SHARED_EPOCH(x): filled with 0xff bytes when the first thread
//                                 of each block reaches it, so nothing survives from the previous block.
#pragma once
#if !defined(CM_CUDA_EMU) || defined(__CUDACC__)
#error "emu/cuda_emu.h is for g++ builds with CM_CUDA_EMU defined"
#endif
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <utility>

#include "cuda_runtime.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __shared__ static
#define __constant__ static

namespace cm_emu {

// ---------------------------------------------------------------- the running thread and block
struct Current {
  uint3 tid;          // threadIdx of the running fiber
  uint3 bid;          // blockIdx
  dim3 block, grid;   // blockDim, gridDim
};
extern Current g_cur;
extern unsigned long long g_block_epoch;  // bumped for every block run

}  // namespace cm_emu

#define threadIdx (static_cast<const uint3&>(::cm_emu::g_cur.tid))
#define blockIdx (static_cast<const uint3&>(::cm_emu::g_cur.bid))
#define blockDim (static_cast<const dim3&>(::cm_emu::g_cur.block))
#define gridDim (static_cast<const dim3&>(::cm_emu::g_cur.grid))
constexpr int warpSize = 32;

namespace cm_emu {

// ---------------------------------------------------------------- barriers and warp collectives (emu/emu.cpp)
enum class WarpOp : int { Sync, Shfl, ShflUp, ShflDown, ShflXor, Ballot, MatchAny, Any, All };
void syncthreads(const char* file, int line);
// The barrier; returns how many threads reached it with pred != 0, and *released how many it released.
int syncthreads_count(int pred, const char* file, int line, int* released);
// Waits until every lane named in `mask` has reached a collective of this kind; returns this lane's result.
// `value` is the lane's operand (the low `bytes` bytes of it), `arg` the source lane / delta / lane mask.
uint64_t warp_collective(WarpOp op, unsigned mask, uint64_t value, int bytes, int arg, int width, const char* file,
                         int line);
[[noreturn]] void kernel_error(const char* what);

template <class T>
inline uint64_t to_bits(T v) {
  static_assert(sizeof(T) == 4 || sizeof(T) == 8, "warp collectives move 32- or 64-bit values");
  static_assert(std::is_trivially_copyable<T>::value, "warp collectives move plain values");
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}
template <class T>
inline T from_bits(uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}

// Dynamic shared memory of the running block (the launch's third argument), poisoned for each block.
void* dynamic_smem_raw();
template <class T>
inline T* dynamic_smem() {
  return static_cast<T*>(dynamic_smem_raw());
}
void poison_shared(void* p, size_t nbytes);

// The environment's settings, changed at run time by the emulator's own tests (emu/selftest.cu).
// schedule: 0 fifo, 1 random, 2 warp.
struct Mode {
  int schedule;
  uint64_t seed;
  bool strict;
};
void set_mode(int schedule, uint64_t seed, bool strict);
Mode mode();

// ---------------------------------------------------------------- launches
// Runs the grid; `body` runs one CUDA thread (the fiber's entry). Checks the configuration as sm_90 does first.
struct LaunchSite {
  const char* file;
  int line;
};
void run_grid(dim3 grid, dim3 block, size_t smem, cudaStream_t stream, LaunchSite site, void (*body)(void*),
              void* ctx);
// [p, p + nbytes) lies inside one live device block (as handed out by the engine's allocator).
bool device_range(const void* p, size_t nbytes);
// Pointer argument i of a launch must lie in a live device block (or be null).
bool check_kernel_pointer(const void* p, int i, LaunchSite site);
// Under stream capture, a launch is recorded rather than run (see cudaStreamBeginCapture).
bool capturing(cudaStream_t s);
void record_launch(cudaStream_t s, void (*replay)(void*), void (*destroy)(void*), void* ctx);

template <class Fn, class... A>
struct Bound {
  dim3 grid, block;
  size_t smem;
  cudaStream_t stream;
  LaunchSite site;
  Fn fn;
  std::tuple<A...> args;
  static void body(void* p) {
    auto* b = static_cast<Bound*>(p);
    std::apply(b->fn, b->args);  // each thread copies the arguments into its kernel's parameters
  }
  static void replay(void* p) {
    auto* b = static_cast<Bound*>(p);
    run_grid(b->grid, b->block, b->smem, b->stream, b->site, &Bound::body, b);
  }
  static void destroy(void* p) { delete static_cast<Bound*>(p); }
};

template <class Fn>
struct Launcher {
  dim3 grid, block;
  size_t smem;
  cudaStream_t stream;
  LaunchSite site;
  Fn fn;
  template <class... A>
  void operator()(A... args) const {
    int i = 0;
    bool ok = true;
    auto check = [&](const auto& a) {
      using T = std::decay_t<decltype(a)>;
      if constexpr (std::is_pointer<T>::value) ok = check_kernel_pointer((const void*)a, i, site) && ok;
      ++i;
    };
    (check(args), ...);
    if (!ok) return;
    if (capturing(stream)) {
      auto* b = new Bound<Fn, A...>{grid, block, smem, stream, site, fn, std::tuple<A...>(args...)};
      record_launch(stream, &Bound<Fn, A...>::replay, &Bound<Fn, A...>::destroy, b);
      return;
    }
    Bound<Fn, A...> b{grid, block, smem, stream, site, fn, std::tuple<A...>(args...)};
    run_grid(grid, block, smem, stream, site, &Bound<Fn, A...>::body, &b);
  }
};

template <class Fn>
inline Launcher<Fn> launch(dim3 grid, dim3 block, size_t smem, cudaStream_t stream, Fn fn,
                           const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return Launcher<Fn>{grid, block, smem, stream, LaunchSite{file, line}, fn};
}
template <class Fn>
inline Launcher<Fn> launch(dim3 grid, dim3 block, size_t smem, Fn fn, const char* file = __builtin_FILE(),
                           int line = __builtin_LINE()) {
  return Launcher<Fn>{grid, block, smem, nullptr, LaunchSite{file, line}, fn};
}
template <class Fn>
inline Launcher<Fn> launch(dim3 grid, dim3 block, Fn fn, const char* file = __builtin_FILE(),
                           int line = __builtin_LINE()) {
  return Launcher<Fn>{grid, block, 0, nullptr, LaunchSite{file, line}, fn};
}

}  // namespace cm_emu

// After each `__shared__ T x[...];` (inserted by emu/cu2cpp.cpp on the same line).
#define CM_EMU_SHARED_EPOCH(v)                               \
  static unsigned long long cm_emu_epoch_##v = 0;            \
  if (cm_emu_epoch_##v != ::cm_emu::g_block_epoch) {         \
    cm_emu_epoch_##v = ::cm_emu::g_block_epoch;              \
    ::cm_emu::poison_shared((void*)&(v), sizeof(v));         \
  }

// ---------------------------------------------------------------- barriers and warp intrinsics
inline void __syncthreads(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  ::cm_emu::syncthreads(file, line);
}
inline int __syncthreads_count(int pred, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return ::cm_emu::syncthreads_count(pred, file, line, nullptr);
}
inline int __syncthreads_and(int pred, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  int released = 0;
  const int n = ::cm_emu::syncthreads_count(pred, file, line, &released);
  return n == released;
}
inline int __syncthreads_or(int pred, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return ::cm_emu::syncthreads_count(pred, file, line, nullptr) > 0;
}
inline void __syncwarp(unsigned mask = 0xffffffffu, const char* file = __builtin_FILE(),
                       int line = __builtin_LINE()) {
  (void)::cm_emu::warp_collective(::cm_emu::WarpOp::Sync, mask, 0, 4, 0, 32, file, line);
}
template <class T>
inline T __shfl_sync(unsigned mask, T v, int src, int width = 32, const char* file = __builtin_FILE(),
                     int line = __builtin_LINE()) {
  return ::cm_emu::from_bits<T>(::cm_emu::warp_collective(::cm_emu::WarpOp::Shfl, mask, ::cm_emu::to_bits(v),
                                                          sizeof(T), src, width, file, line));
}
template <class T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32, const char* file = __builtin_FILE(),
                        int line = __builtin_LINE()) {
  return ::cm_emu::from_bits<T>(::cm_emu::warp_collective(::cm_emu::WarpOp::ShflUp, mask, ::cm_emu::to_bits(v),
                                                          sizeof(T), (int)delta, width, file, line));
}
template <class T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32, const char* file = __builtin_FILE(),
                          int line = __builtin_LINE()) {
  return ::cm_emu::from_bits<T>(::cm_emu::warp_collective(::cm_emu::WarpOp::ShflDown, mask, ::cm_emu::to_bits(v),
                                                          sizeof(T), (int)delta, width, file, line));
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32, const char* file = __builtin_FILE(),
                         int line = __builtin_LINE()) {
  return ::cm_emu::from_bits<T>(::cm_emu::warp_collective(::cm_emu::WarpOp::ShflXor, mask, ::cm_emu::to_bits(v),
                                                          sizeof(T), lane_mask, width, file, line));
}
inline unsigned __ballot_sync(unsigned mask, int pred, const char* file = __builtin_FILE(),
                              int line = __builtin_LINE()) {
  return (unsigned)::cm_emu::warp_collective(::cm_emu::WarpOp::Ballot, mask, pred != 0, 4, 0, 32, file, line);
}
inline int __any_sync(unsigned mask, int pred, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return (int)::cm_emu::warp_collective(::cm_emu::WarpOp::Any, mask, pred != 0, 4, 0, 32, file, line);
}
inline int __all_sync(unsigned mask, int pred, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return (int)::cm_emu::warp_collective(::cm_emu::WarpOp::All, mask, pred != 0, 4, 0, 32, file, line);
}
template <class T>
inline unsigned __match_any_sync(unsigned mask, T v, const char* file = __builtin_FILE(),
                                 int line = __builtin_LINE()) {
  return (unsigned)::cm_emu::warp_collective(::cm_emu::WarpOp::MatchAny, mask, ::cm_emu::to_bits(v), sizeof(T), 0,
                                             32, file, line);
}

// CUDA's math headers put these in the global namespace for device code.
using std::isfinite;
using std::isinf;
using std::isnan;
using std::signbit;

// ---------------------------------------------------------------- integer and conversion intrinsics (PTX semantics)
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned)x); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll((unsigned long long)x); }
inline unsigned __brev(unsigned x) {
  unsigned r = 0;
  for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
  return r;
}
// cvt.rzi.s32.f32: truncation toward zero, NaN gives 0, out-of-range values saturate (C++ leaves both undefined).
inline int __float2int_rz(float x) {
  if (x != x) return 0;
  if (x >= 2147483648.0f) return std::numeric_limits<int>::max();
  if (x <= -2147483904.0f) return std::numeric_limits<int>::min();
  return (int)x;
}
inline int __float2int_rn(float x) {
  if (x != x) return 0;
  if (x >= 2147483648.0f) return std::numeric_limits<int>::max();
  if (x <= -2147483904.0f) return std::numeric_limits<int>::min();
  return (int)std::nearbyint(x);
}
inline long long __float2ll_rz(float x) {
  if (x != x) return std::numeric_limits<long long>::min();  // cvt.rzi.s64.f32: NaN gives 0x8000000000000000
  if (x >= 9223372036854775808.0f) return std::numeric_limits<long long>::max();
  if (x <= -9223372036854775808.0f) return std::numeric_limits<long long>::min();
  return (long long)x;
}
inline float __int_as_float(int x) { return ::cm_emu::from_bits<float>((uint32_t)x); }
inline int __float_as_int(float x) { return (int)(uint32_t)::cm_emu::to_bits(x); }
inline float __uint_as_float(unsigned x) { return ::cm_emu::from_bits<float>(x); }
inline unsigned __float_as_uint(float x) { return (uint32_t)::cm_emu::to_bits(x); }
inline float __fdividef(float a, float b) { return a / b; }
// Rounded products and sums that never fuse into an fma (the volatile result is a rounded float in memory).
inline float __fmul_rn(float a, float b) {
  volatile float r = a * b;
  return r;
}
inline float __fadd_rn(float a, float b) {
  volatile float r = a + b;
  return r;
}
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
template <class T>
inline T __ldg(const T* p) {
  return *p;
}

// ---------------------------------------------------------------- atomics
// Fibers of a launch share one host thread and switch only at barriers and collectives, so a read-modify-write
// is indivisible here as it is on the device.
#define CM_EMU_ATOMIC2(T)                          \
  inline T atomicAdd(T* p, T v) {                  \
    T o = *p;                                      \
    *p = o + v;                                    \
    return o;                                      \
  }                                                \
  inline T atomicExch(T* p, T v) {                 \
    T o = *p;                                      \
    *p = v;                                        \
    return o;                                      \
  }
#define CM_EMU_ATOMIC_INT(T)                       \
  CM_EMU_ATOMIC2(T)                                \
  inline T atomicMin(T* p, T v) {                  \
    T o = *p;                                      \
    if (v < o) *p = v;                             \
    return o;                                      \
  }                                                \
  inline T atomicMax(T* p, T v) {                  \
    T o = *p;                                      \
    if (v > o) *p = v;                             \
    return o;                                      \
  }                                                \
  inline T atomicCAS(T* p, T cmp, T v) {           \
    T o = *p;                                      \
    if (o == cmp) *p = v;                          \
    return o;                                      \
  }                                                \
  inline T atomicSub(T* p, T v) {                  \
    T o = *p;                                      \
    *p = o - v;                                    \
    return o;                                      \
  }
CM_EMU_ATOMIC_INT(int)
CM_EMU_ATOMIC_INT(unsigned)
CM_EMU_ATOMIC_INT(unsigned long long)
CM_EMU_ATOMIC_INT(long long)
CM_EMU_ATOMIC2(float)
CM_EMU_ATOMIC2(double)
#undef CM_EMU_ATOMIC_INT
#undef CM_EMU_ATOMIC2
