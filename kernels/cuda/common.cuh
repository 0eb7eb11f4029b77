// Helpers shared by the CUDA kernel files: grid sizing, warp and block reductions, vector-load checks.
// Reductions here combine values in a fixed tree for a given blockDim: the same inputs give the same bits on every
// run (no atomics, no dependence on scheduling).
#pragma once
#include <cstdint>
#include <limits>

#include "engine/check.h"
#include "engine/cuda.h"

namespace cm::cuda {

constexpr int kWarp = 32;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Blocks for a grid-stride loop over n items with `threads` per block. Capped: past a few waves of the chip more
// blocks only add scheduling work; the loop covers the rest. n == 0 must be handled by the caller (no launch).
inline unsigned grid_for(int64_t n, int threads, int64_t cap = kGridCap) {
  int64_t b = ceil_div(n, threads);
  return (unsigned)(b < cap ? (b < 1 ? 1 : b) : cap);
}

// 16-byte vector access is legal when the pointer is 16-byte aligned (views can start at any element).
inline bool aligned16(const void* p) { return ((uintptr_t)p & 15) == 0; }

// Temporary device memory for one launcher call, from the caching allocator. Freeing it as soon as the launches
// are issued is safe: work issued later on the same stream runs after them (see engine/cuda.h).
class Scratch {
 public:
  explicit Scratch(size_t nbytes) : p_(nbytes ? allocate(nbytes) : nullptr) {}
  ~Scratch() { deallocate(p_); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  template <class T>
  T* at(size_t byte_offset = 0) const {
    return (T*)((char*)p_ + byte_offset);
  }

 private:
  void* p_;
};

// Bytes rounded up to 256 so that sub-buffers carved out of one Scratch stay aligned for any vector access.
inline size_t align256(size_t n) { return (n + 255) / 256 * 256; }

// A broadcast walk over a contiguous output of `rank` dims and K strided operands, the dims collapsed on the host
// (size-1 dims dropped; neighbours merged when every operand steps through them as one). It travels by value in
// kernel parameters; offsets() turns the output's linear index into each operand's element offset.
constexpr int kMaxDims = 8;
template <int K>
struct Strided {
  int64_t shape[kMaxDims];
  int64_t st[K][kMaxDims];
  int rank;
};

// strides[k] points at operand k's D strides (0 along a broadcast dim). Throws if more than kMaxDims dims remain.
template <int K>
Strided<K> collapse_strided(int64_t D, const int64_t* shape, const int64_t* const* strides) {
  Strided<K> L{};
  int r = 0;
  for (int64_t d = 0; d < D; ++d) {
    if (shape[d] == 1) continue;
    if (r > 0) {
      bool merge = true;
      for (int k = 0; k < K; ++k) merge = merge && L.st[k][r - 1] == strides[k][d] * shape[d];
      if (merge) {
        L.shape[r - 1] *= shape[d];
        for (int k = 0; k < K; ++k) L.st[k][r - 1] = strides[k][d];
        continue;
      }
    }
    CM_REQUIRE(r < kMaxDims, "CUDA broadcast: more than ", kMaxDims, " dims remain after merging");
    L.shape[r] = shape[d];
    for (int k = 0; k < K; ++k) L.st[k][r] = strides[k][d];
    ++r;
  }
  L.rank = r;
  return L;
}

#if defined(__CUDACC__) || defined(CM_CUDA_EMU)  // device code: nvcc, or g++ against the emulator (emu/)

// Records a bad index in the device record of engine/cuda.h (index_error_record): the first one wins, later ones
// are dropped. Only the thread whose compare-and-swap claimed the record writes the other fields.
__device__ __forceinline__ void record_bad_index(int64_t* rec, IndexOp op, int64_t index, int64_t pos,
                                                 int64_t bound) {
  if (atomicCAS((unsigned long long*)rec, 0ull, (unsigned long long)op) == 0ull) {
    rec[1] = index;
    rec[2] = pos;
    rec[3] = bound;
  }
}

// Element offsets of every operand for output element i (row-major over L.shape).
template <int K>
__device__ __forceinline__ void strided_offsets(const Strided<K>& L, int64_t i, int64_t (&off)[K]) {
#pragma unroll
  for (int k = 0; k < K; ++k) off[k] = 0;
#pragma unroll
  for (int d = kMaxDims - 1; d >= 0; --d) {
    if (d >= L.rank) continue;
    const int64_t c = i % L.shape[d];
    i /= L.shape[d];
#pragma unroll
    for (int k = 0; k < K; ++k) off[k] += c * L.st[k][d];
  }
}

// The grid-stride index in 64 bits: n may exceed 2^31.
__device__ __forceinline__ int64_t gtid() { return (int64_t)blockIdx.x * blockDim.x + threadIdx.x; }
__device__ __forceinline__ int64_t gstride() { return (int64_t)gridDim.x * blockDim.x; }

// The segment s whose [offsets[s], offsets[s + 1]) holds r, for 0 <= r < offsets[n] (binary search over n + 1
// nondecreasing offsets; empty segments are skipped).
__device__ __forceinline__ int64_t segment_of(const int64_t* offsets, int64_t n, int64_t r) {
  int64_t lo = 0, hi = n;  // invariant: offsets[lo] <= r < offsets[hi]
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) / 2;
    if (offsets[mid] <= r) lo = mid;
    else hi = mid;
  }
  return lo;
}

// Lane l's sum in double of term(a[r0 + l][c]) over the row's C columns in column order (0 for lanes at or past
// `rows`, rows <= 32), the loop a thread walking its own row would run, with coalesced loads: the warp reads its
// rows 32 x 32 at a time into its tile, a row per load (32 consecutive values), then each lane adds its row's
// terms from the tile. (A thread reading its own row put 32 rows' cache lines behind every load.) Every lane of
// the warp calls it. The + 1 column puts lane l's row l in bank l + c.
template <class T, class F>
__device__ double warp_row_sums(const T* __restrict__ a, int64_t r0, int rows, int64_t C, T (*tile)[kWarp + 1],
                                F term) {
  const int lane = threadIdx.x % kWarp;
  double s = 0.0;
  for (int64_t c0 = 0; c0 < C; c0 += kWarp) {
    const int cols = (int)(C - c0 < kWarp ? C - c0 : kWarp);
    if (lane < cols)
      for (int r = 0; r < rows; ++r) tile[r][lane] = a[(r0 + r) * C + c0 + lane];
    __syncwarp();
    if (lane < rows)
      for (int c = 0; c < cols; ++c) s += term(tile[lane][c]);
    __syncwarp();  // the tile is read before the next one is written
  }
  return s;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ int64_t warp_sum(int64_t v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ int warp_sum(int v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
// Inclusive prefix sum over the warp's lanes.
template <class T>
__device__ __forceinline__ T warp_inclusive_scan(T v) {
  const int lane = threadIdx.x % kWarp;
#pragma unroll
  for (int o = 1; o < kWarp; o <<= 1) {
    const T u = __shfl_up_sync(0xffffffffu, v, o);
    if (lane >= o) v += u;
  }
  return v;
}
// fmaxf drops NaN; callers that must propagate NaN say so and use their own combine.
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sum over the block; every thread gets the result. `shared` holds at least 32 floats. blockDim.x a multiple of
// 32. Contains __syncthreads: every thread of the block must call it.
template <class T>
__device__ __forceinline__ T block_sum(T v, T* shared) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, nwarps = blockDim.x / kWarp;
  v = warp_sum(v);
  __syncthreads();  // shared may still be read by a previous call
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  T r = lane < nwarps ? shared[lane] : T(0);
  return warp_sum(r);
}

__device__ __forceinline__ float block_max(float v, float* shared) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, nwarps = blockDim.x / kWarp;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  float r = lane < nwarps ? shared[lane] : -INFINITY;
  return warp_max(r);
}

// Arg-best ordering shared by top-k and the max reductions: a (value, index) ranks before b when it is NaN and b
// is not (the first NaN wins, as on the CPU), then by larger value, then (equal values or two NaNs) lower index.
template <class I>
__device__ __forceinline__ bool beats(float av, I ai, float bv, I bi) {
  const bool an = av != av, bn = bv != bv;
  if (an != bn) return an;
  if (!an && av != bv) return av > bv;
  return ai < bi;
}

// Warp arg-best over one candidate per lane; every lane gets the winner.
template <class I>
__device__ __forceinline__ void warp_best(float& v, I& i) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, v, o);
    const I oi = __shfl_xor_sync(0xffffffffu, i, o);
    if (beats(ov, oi, v, i)) {
      v = ov;
      i = oi;
    }
  }
}

// Block arg-best; every thread gets the winner. sv/si hold 32 entries. Contains __syncthreads.
template <class I>
__device__ __forceinline__ void block_best(float& v, I& i, float* sv, I* si) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, nwarps = blockDim.x / kWarp;
  warp_best(v, i);
  __syncthreads();
  if (lane == 0) {
    sv[warp] = v;
    si[warp] = i;
  }
  __syncthreads();
  v = lane < nwarps ? sv[lane] : -INFINITY;
  i = lane < nwarps ? si[lane] : std::numeric_limits<I>::max();
  warp_best(v, i);
}

// Row kernels: a row is handled by a group, a warp (WARP) or the whole block. Group<WARP> gives the thread's rank
// in its group, the group size, the rows it takes in a grid-stride loop (the same for every thread of a group, so
// group reductions inside the loop are safe), and the group's reductions (`sh`: 32 floats of shared memory; unused
// by warps).
template <bool WARP>
struct Group {
  __device__ __forceinline__ static int rank() { return WARP ? threadIdx.x % kWarp : threadIdx.x; }
  __device__ __forceinline__ static int size() { return WARP ? kWarp : blockDim.x; }
  __device__ __forceinline__ static int64_t first_row() {
    return WARP ? (int64_t)blockIdx.x * (blockDim.x / kWarp) + threadIdx.x / kWarp : (int64_t)blockIdx.x;
  }
  __device__ __forceinline__ static int64_t row_stride() {
    return WARP ? (int64_t)gridDim.x * (blockDim.x / kWarp) : (int64_t)gridDim.x;
  }
  __device__ __forceinline__ static float sum(float v, float* sh) { return WARP ? warp_sum(v) : block_sum(v, sh); }
  __device__ __forceinline__ static float max(float v, float* sh) { return WARP ? warp_max(v) : block_max(v, sh); }
};

#endif  // __CUDACC__ || CM_CUDA_EMU

// Row kernels launch as KERNEL<true> (a warp per row, 4 rows per block) for rows up to kWarpRowMax elements, else
// KERNEL<false> (a block of kBlockRowThreads per row). Arguments after C are the kernel's.
constexpr int kWarpRowMax = 1024;
constexpr int kWarpRowThreads = 128;
constexpr int kBlockRowThreads = 512;
#define CM_ROW_LAUNCH(KERNEL, N, C, ...)                                                                     \
  do {                                                                                                       \
    if ((C) <= ::cm::cuda::kWarpRowMax)                                                                      \
      KERNEL<true><<<::cm::cuda::grid_for((N), ::cm::cuda::kWarpRowThreads / ::cm::cuda::kWarp),            \
                     ::cm::cuda::kWarpRowThreads, 0, ::cm::cuda::stream()>>>(__VA_ARGS__);                   \
    else                                                                                                     \
      KERNEL<false><<<::cm::cuda::grid_for((N), 1), ::cm::cuda::kBlockRowThreads, 0, ::cm::cuda::stream()>>>( \
          __VA_ARGS__);                                                                                      \
    cudaCheckLaunch(#KERNEL);                                                                                \
  } while (0)

}  // namespace cm::cuda
