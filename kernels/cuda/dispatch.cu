// CUDA MoE dispatch: the stable counting sort (histogram -> exclusive scan -> scatter) and the row kernels around
// the experts (permute, permute backward, combine, combine backward). Contracts are kernels/dispatch.h's; the
// permutation is an integer function of `expert` alone, so it equals the CPU's exactly.
//
// The counting sort, on A assignments and NB buckets (experts):
//   1. chunk_count:   the assignments are cut into G chunks of S (S >= 1024 and >= NB). One warp per chunk counts
//                     its chunk into per-warp shared counters: 32 ids at a time, __match_any_sync groups equal
//                     ids and the group's leader adds the group size. cc[e, g] = count of bucket e in chunk g.
//   2. bucket_totals: counts[e] = sum over g of cc[e, g] (integers: any order gives the same sum).
//   3. scan:          offsets = exclusive scan of counts (one block).
//   4. chunk_base:    cc[e, g] becomes offsets[e] + (count of e in chunks before g): where chunk g's first e goes.
//   5. chunk_scatter: the warp walks its chunk again in order; an element's row is its chunk base plus the count
//                     of its bucket seen so far in the chunk plus its rank in its 32-group. Stable by construction.
// All counts are integers and every element's position is computed, not raced for: no atomics at all.
// The same passes with "8 bits of the key" as the bucket make the LSD radix sort of kernels/cuda/sort.cuh.
#include <climits>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/sort.cuh"
#include "kernels/dispatch.h"

namespace cm::cuda {

namespace {

constexpr int kMaxBuckets = 12288;  // per-warp shared counters: 4 warps x 3072 or 1 warp x 12288 ints (48 KB)
// The chunk kernels' dynamic shared memory (wpb * NB <= kMaxBuckets ints, and no static shared memory) within the
// 48 KB a launch may ask for without opting in (cudaFuncAttributeMaxDynamicSharedMemorySize).
static_assert(kMaxBuckets * sizeof(int32_t) <= 48 * 1024, "the counting sort's counters outgrow 48 KB");

// ---------------------------------------------------------------- counting-sort kernels

// The bucket of element a, or -1 (dispatch: dropped, id -1, or out of range - the latter counted in `bad`), or -2
// past the end. RADIX: 8 bits of the key at `shift`.
template <bool RADIX>
__device__ __forceinline__ int bucket_of(const int32_t* keys, int64_t a, int64_t A, int shift, int NB, int& bad) {
  if (a >= A) return -2;
  const int32_t k = keys[a];
  if (RADIX) return (int)(((uint32_t)k >> shift) & (uint32_t)(NB - 1));
  if (k >= 0 && k < NB) return k;
  if (k != -1) ++bad;
  return -1;
}

template <bool RADIX>
__global__ void chunk_count_kernel(int32_t* __restrict__ cc, int32_t* __restrict__ bad_per_chunk,
                                   const int32_t* __restrict__ keys, int64_t A, int shift, int NB, int64_t S,
                                   int64_t G) {
  extern __shared__ int32_t smem[];
  const int lane = threadIdx.x % kWarp, wib = threadIdx.x / kWarp, wpb = blockDim.x / kWarp;
  int32_t* cnt = smem + wib * NB;
  for (int64_t g = (int64_t)blockIdx.x * wpb + wib; g < G; g += (int64_t)gridDim.x * wpb) {
    for (int e = lane; e < NB; e += kWarp) cnt[e] = 0;
    __syncwarp();
    int bad = 0;
    const int64_t a0 = g * S;
    for (int64_t p = 0; p < S && a0 + p < A; p += kWarp) {  // the bound is the same for every lane
      const int key = bucket_of<RADIX>(keys, a0 + p + lane, A, shift, NB, bad);
      const unsigned grp = __match_any_sync(0xffffffffu, key);
      if (key >= 0 && lane == __ffs(grp) - 1) cnt[key] += __popc(grp);
      __syncwarp();
    }
    for (int e = lane; e < NB; e += kWarp) cc[(int64_t)e * G + g] = cnt[e];
    if (bad_per_chunk) {
      bad = warp_sum(bad);
      if (lane == 0) bad_per_chunk[g] = bad;
    }
    __syncwarp();  // every lane has read the counters before the next chunk zeroes them
  }
}

// A warp per bucket: counts[e] = sum_g cc[e, g]. Warp NB sums the per-chunk bad counts into bad_total.
__global__ void bucket_totals_kernel(int64_t* __restrict__ counts, int64_t* __restrict__ bad_total,
                                     const int32_t* __restrict__ cc, const int32_t* __restrict__ bad_per_chunk,
                                     int NB, int64_t G) {
  const int lane = threadIdx.x % kWarp;
  const int64_t wstride = (int64_t)gridDim.x * (blockDim.x / kWarp);  // grid-stride over warps: the grid is capped
  for (int64_t w = (int64_t)blockIdx.x * (blockDim.x / kWarp) + threadIdx.x / kWarp; w <= NB; w += wstride) {
    if (w < NB) {
      int64_t s = 0;
      for (int64_t g = lane; g < G; g += kWarp) s += cc[w * G + g];
      s = warp_sum(s);
      if (lane == 0) counts[w] = s;
    } else if (bad_total) {
      int64_t s = 0;
      for (int64_t g = lane; g < G; g += kWarp) s += bad_per_chunk[g];
      s = warp_sum(s);
      if (lane == 0) *bad_total = s;
    }
  }
}

// One block: offsets[0] = 0, offsets[e + 1] = offsets[e] + counts[e]. Each thread scans a contiguous segment.
__global__ void __launch_bounds__(1024)
    exclusive_scan_kernel(int64_t* __restrict__ offsets, const int64_t* __restrict__ counts, int64_t NB) {
  __shared__ int64_t warp_tot[kWarp];
  const int tid = threadIdx.x, lane = tid % kWarp, warp = tid / kWarp, nwarps = blockDim.x / kWarp;
  const int64_t per = (NB + blockDim.x - 1) / blockDim.x;
  const int64_t lo = tid * per < NB ? tid * per : NB, hi = lo + per < NB ? lo + per : NB;
  int64_t local = 0;
  for (int64_t e = lo; e < hi; ++e) local += counts[e];
  const int64_t incl = warp_inclusive_scan(local);
  if (lane == kWarp - 1) warp_tot[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    const int64_t t = lane < nwarps ? warp_tot[lane] : 0;
    const int64_t ti = warp_inclusive_scan(t);
    if (lane < nwarps) warp_tot[lane] = ti - t;  // exclusive prefix of the warps' totals
  }
  __syncthreads();
  int64_t run = warp_tot[warp] + incl - local;
  for (int64_t e = lo; e < hi; ++e) {
    offsets[e] = run;
    run += counts[e];
  }
  if (tid == blockDim.x - 1) offsets[NB] = run;  // the last thread's segment ends at NB (or is empty at NB)
}

// One warp per bucket e: cc[e, g] <- offsets[e] + sum_{g' < g} cc[e, g'].
__global__ void chunk_base_kernel(int32_t* __restrict__ cc, const int64_t* __restrict__ offsets, int NB, int64_t G) {
  const int lane = threadIdx.x % kWarp;
  const int64_t wstride = (int64_t)gridDim.x * (blockDim.x / kWarp);  // grid-stride over buckets: the grid is capped
  for (int64_t e = (int64_t)blockIdx.x * (blockDim.x / kWarp) + threadIdx.x / kWarp; e < NB; e += wstride) {
    int64_t run = offsets[e];  // the bound is the same for the whole warp
    for (int64_t g0 = 0; g0 < G; g0 += kWarp) {
      const int64_t g = g0 + lane;
      const int64_t v = g < G ? cc[e * G + g] : 0;
      const int64_t incl = warp_inclusive_scan(v);
      if (g < G) cc[e * G + g] = (int32_t)(run + incl - v);
      run += __shfl_sync(0xffffffffu, incl, kWarp - 1);
    }
  }
}

// The stable scatter. Dispatch: row_of[a] = row (or -1), out_vals[row] = a. Radix: keys_out[pos] = keys[a],
// out_vals[pos] = vals_in ? vals_in[a] : a.
template <bool RADIX>
__global__ void chunk_scatter_kernel(int32_t* __restrict__ row_of, int32_t* __restrict__ out_vals,
                                     int32_t* __restrict__ keys_out, const int32_t* __restrict__ vals_in,
                                     const int32_t* __restrict__ base, const int32_t* __restrict__ keys, int64_t A,
                                     int shift, int NB, int64_t S, int64_t G) {
  extern __shared__ int32_t smem[];
  const int lane = threadIdx.x % kWarp, wib = threadIdx.x / kWarp, wpb = blockDim.x / kWarp;
  int32_t* cnt = smem + wib * NB;
  const unsigned lanes_below = (1u << lane) - 1u;
  for (int64_t g = (int64_t)blockIdx.x * wpb + wib; g < G; g += (int64_t)gridDim.x * wpb) {
    for (int e = lane; e < NB; e += kWarp) cnt[e] = 0;
    __syncwarp();
    int unused_bad = 0;
    const int64_t a0 = g * S;
    for (int64_t p = 0; p < S && a0 + p < A; p += kWarp) {
      const int64_t a = a0 + p + lane;
      const int key = bucket_of<RADIX>(keys, a, A, shift, NB, unused_bad);
      const unsigned grp = __match_any_sync(0xffffffffu, key);
      const int leader = __ffs(grp) - 1;
      int seen = (key >= 0 && lane == leader) ? cnt[key] : 0;
      seen = __shfl_sync(0xffffffffu, seen, leader);
      if (key >= 0) {
        const int32_t pos = base[(int64_t)key * G + g] + seen + __popc(grp & lanes_below);
        if (RADIX) {
          keys_out[pos] = keys[a];
          out_vals[pos] = vals_in ? vals_in[a] : (int32_t)a;
        } else {
          row_of[a] = pos;
          out_vals[pos] = (int32_t)a;
        }
      } else if (!RADIX && key == -1) {
        row_of[a] = -1;
      }
      __syncwarp();  // every lane has read cnt[key] (through its leader) before the leader moves it on
      if (key >= 0 && lane == leader) cnt[key] = seen + __popc(grp);
      __syncwarp();
    }
    __syncwarp();
  }
}

// ---------------------------------------------------------------- counting-sort launchers

struct Chunks {
  int64_t S = 0, G = 0;  // chunk size (a multiple of 32) and count
  int wpb = 1;           // warps per block for the chunk kernels
  size_t smem = 0;       // their dynamic shared memory
};

Chunks make_chunks(int64_t A, int NB) {
  Chunks c;
  c.S = NB > 1024 ? ceil_div(NB, kWarp) * kWarp : 1024;  // zeroing NB counters costs at most one pass of S
  c.G = ceil_div(A, c.S);
  c.wpb = NB <= kMaxBuckets / 4 ? 4 : (NB <= kMaxBuckets / 2 ? 2 : 1);
  c.smem = (size_t)c.wpb * NB * sizeof(int32_t);
  return c;
}

unsigned chunk_grid(const Chunks& c) { return grid_for(c.G, c.wpb); }

template <bool RADIX>
void run_count(int32_t* cc, int32_t* bad_per_chunk, const int32_t* keys, int64_t A, int shift, int NB,
               const Chunks& c) {
  if (c.G == 0) return;
  chunk_count_kernel<RADIX><<<chunk_grid(c), c.wpb * kWarp, c.smem, stream()>>>(cc, bad_per_chunk, keys, A, shift,
                                                                                NB, c.S, c.G);
  cudaCheckLaunch("chunk_count_kernel");
}

void run_totals(int64_t* counts, int64_t* bad_total, const int32_t* cc, const int32_t* bad_per_chunk, int NB,
                int64_t G) {
  const int64_t warps = NB + 1;
  bucket_totals_kernel<<<grid_for(warps, 4), 4 * kWarp, 0, stream()>>>(counts, bad_total, cc, bad_per_chunk, NB, G);
  cudaCheckLaunch("bucket_totals_kernel");
}

void run_scan(int64_t* offsets, const int64_t* counts, int64_t NB) {
  exclusive_scan_kernel<<<1, 1024, 0, stream()>>>(offsets, counts, NB);
  cudaCheckLaunch("exclusive_scan_kernel");
}

void run_base(int32_t* cc, const int64_t* offsets, int NB, int64_t G) {
  if (G == 0) return;
  chunk_base_kernel<<<grid_for(NB, 4), 4 * kWarp, 0, stream()>>>(cc, offsets, NB, G);
  cudaCheckLaunch("chunk_base_kernel");
}

template <bool RADIX>
void run_scatter(int32_t* row_of, int32_t* out_vals, int32_t* keys_out, const int32_t* vals_in, const int32_t* base,
                 const int32_t* keys, int64_t A, int shift, int NB, const Chunks& c) {
  if (c.G == 0) return;
  chunk_scatter_kernel<RADIX><<<chunk_grid(c), c.wpb * kWarp, c.smem, stream()>>>(
      row_of, out_vals, keys_out, vals_in, base, keys, A, shift, NB, c.S, c.G);
  cudaCheckLaunch("chunk_scatter_kernel");
}

void check_dispatch_sizes(const char* what, int64_t A, int64_t N) {
  CM_CHECK(A >= 0 && A < INT_MAX, what, ": ", A, " assignments (rows are i32, so A < 2^31)");
  CM_CHECK(N >= 1 && N <= kMaxBuckets, what, ": ", N, " experts; the CUDA counting sort supports 1..", kMaxBuckets);
}

int64_t read_back(const int64_t* dev) {
  int64_t h = 0;
  copy_to_host(&h, dev, sizeof h);
  return h;
}

// ---------------------------------------------------------------- row kernels (one warp per row)

// float4 when C % 4 == 0 and every row pointer is 16-byte aligned, else float. V is the access type; Cv = C in Vs.
__device__ __forceinline__ void fma_v(float& acc, float s, float y) { acc = fmaf(s, y, acc); }
__device__ __forceinline__ void fma_v(float4& acc, float s, float4 y) {
  acc.x = fmaf(s, y.x, acc.x);
  acc.y = fmaf(s, y.y, acc.y);
  acc.z = fmaf(s, y.z, acc.z);
  acc.w = fmaf(s, y.w, acc.w);
}
__device__ __forceinline__ void add_v(float& acc, float y) { acc += y; }
__device__ __forceinline__ void add_v(float4& acc, float4 y) {
  acc.x += y.x;
  acc.y += y.y;
  acc.z += y.z;
  acc.w += y.w;
}
template <class V>
__device__ __forceinline__ V zero_v();
template <>
__device__ __forceinline__ float zero_v<float>() {
  return 0.f;
}
template <>
__device__ __forceinline__ float4 zero_v<float4>() {
  return make_float4(0.f, 0.f, 0.f, 0.f);
}

#define CM_WARP_ROWS(r, R)                                                                          \
  for (int64_t r = (int64_t)blockIdx.x * (blockDim.x / kWarp) + threadIdx.x / kWarp; r < (R); \
       r += (int64_t)gridDim.x * (blockDim.x / kWarp))

template <class V>
__global__ void permute_kernel(V* __restrict__ xe, const V* __restrict__ x, const int32_t* __restrict__ assign_of,
                               int64_t Ap, int64_t K, int64_t Cv) {
  const int lane = threadIdx.x % kWarp;
  CM_WARP_ROWS(r, Ap) {
    const int64_t a = assign_of[r];
    V* dst = xe + r * Cv;
    if (a < 0) {  // a row no slot fills (a nowait plan's dropped share): zeros
      for (int64_t c = lane; c < Cv; c += kWarp) dst[c] = zero_v<V>();
      continue;
    }
    const V* src = x + a / K * Cv;
    for (int64_t c = lane; c < Cv; c += kWarp) dst[c] = src[c];
  }
}

template <class V>
__global__ void permute_backward_kernel(V* __restrict__ dx, const V* __restrict__ d_xe,
                                        const int32_t* __restrict__ row_of, int64_t T, int64_t K, int64_t Cv) {
  const int lane = threadIdx.x % kWarp;
  CM_WARP_ROWS(t, T) {
    V* o = dx + t * Cv;
    for (int64_t c = lane; c < Cv; c += kWarp) {
      V acc = zero_v<V>();
      for (int64_t j = 0; j < K; ++j) {  // slot order, as on the CPU
        const int64_t r = row_of[t * K + j];
        if (r >= 0) add_v(acc, d_xe[r * Cv + c]);
      }
      o[c] = acc;
    }
  }
}

template <class V>
__global__ void combine_kernel(V* __restrict__ out, const V* __restrict__ ye, const float* __restrict__ gate,
                               const int32_t* __restrict__ row_of, int64_t T, int64_t K, int64_t Cv) {
  const int lane = threadIdx.x % kWarp;
  CM_WARP_ROWS(t, T) {
    V* o = out + t * Cv;
    for (int64_t c = lane; c < Cv; c += kWarp) {
      V acc = zero_v<V>();
      for (int64_t j = 0; j < K; ++j) {
        const int64_t r = row_of[t * K + j];
        if (r >= 0) fma_v(acc, gate[t * K + j], ye[r * Cv + c]);
      }
      o[c] = acc;
    }
  }
}

// A warp per row of the plan, as the CPU twin walks them (assign_of: the row's slot): its d_ye row (written whole by
// the warp) and its slot's d_gate (a dot product). The dot mirrors the CPU's dot_row (kernels/cpu/rows.h): 16 partial
// sums, partial j over columns c = j mod 16 in increasing c, then halved 8, 4, 2, 1; lanes 0..15 hold the
// partials, so with the same fused multiply-adds the result can match the CPU's to the bit.
__global__ void combine_backward_kernel(float* __restrict__ d_ye, float* __restrict__ d_gate,
                                        const float* __restrict__ d_out, const float* __restrict__ ye,
                                        const float* __restrict__ gate, const int32_t* __restrict__ row_of,
                                        const int32_t* __restrict__ assign_of, int64_t T, int64_t Ap, int64_t K,
                                        int64_t C) {
  const int lane = threadIdx.x % kWarp;
  if (d_gate)  // dropped slots: 0 (a thread each; the kept slots' gates are written below, by their row's warp)
    for (int64_t a = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; a < T * K; a += (int64_t)gridDim.x * blockDim.x)
      if (row_of[a] < 0) d_gate[a] = 0.f;
  CM_WARP_ROWS(r, Ap) {
    const int64_t a = assign_of[r];
    if (a < 0) continue;  // a row no slot fills (the whole warp skips it)
    const float* g = d_out + a / K * C;
    if (d_ye) {
      const float s = gate[a];
      float* dy = d_ye + r * C;
      for (int64_t c = lane; c < C; c += kWarp) dy[c] = s * g[c];
    }
    if (d_gate) {
      const float* y = ye + r * C;
      float acc = 0.f;
      if (lane < 16)
        for (int64_t c = lane; c < C; c += 16) acc = fmaf(g[c], y[c], acc);
#pragma unroll
      for (int w = 8; w >= 1; w >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, w);
      if (lane == 0) d_gate[a] = acc;
    }
  }
}
#undef CM_WARP_ROWS

constexpr int kRowThreads = 128;  // 4 warps, one row each

bool vec4_ok(int64_t C, std::initializer_list<const void*> ptrs) {
  if (C % 4 != 0) return false;
  for (const void* p : ptrs)
    if (p && !aligned16(p)) return false;
  return true;
}

}  // namespace

// ---------------------------------------------------------------- public launchers

int64_t dispatch_histogram(int64_t* counts, const int32_t* expert, int64_t A, int64_t N) {
  check_dispatch_sizes("cuda::dispatch_histogram", A, N);
  const int NB = (int)N;
  Chunks c = make_chunks(A, NB);
  const size_t cc_bytes = align256((size_t)(NB * c.G) * 4), bad_bytes = align256((size_t)c.G * 4);
  Scratch s(cc_bytes + bad_bytes + 256);
  int32_t* cc = s.at<int32_t>();
  int32_t* badc = s.at<int32_t>(cc_bytes);
  int64_t* bad_total = s.at<int64_t>(cc_bytes + bad_bytes);
  run_count<false>(cc, badc, expert, A, 0, NB, c);
  run_totals(counts, bad_total, cc, badc, NB, c.G);
  return read_back(bad_total);
}

void dispatch_offsets(int64_t* offsets, const int64_t* counts, int64_t N) {
  CM_CHECK(N >= 0, "cuda::dispatch_offsets: N=", N);
  run_scan(offsets, counts, N);
}

void dispatch_scatter(int32_t* row_of, int32_t* assign_of, const int32_t* expert, const int64_t* offsets, int64_t A,
                      int64_t N) {
  check_dispatch_sizes("cuda::dispatch_scatter", A, N);
  const int NB = (int)N;
  Chunks c = make_chunks(A, NB);
  Scratch s((size_t)(NB * c.G) * 4);
  int32_t* cc = s.at<int32_t>();
  run_count<false>(cc, nullptr, expert, A, 0, NB, c);
  run_base(cc, offsets, NB, c.G);
  run_scatter<false>(row_of, assign_of, nullptr, nullptr, cc, expert, A, 0, NB, c);
}

namespace {
// assign_of[offsets[N] .. A) = -1: the rows of a nowait plan that no kept slot fills (dropped slots' share).
__global__ void unfilled_rows_kernel(int32_t* __restrict__ assign_of, const int64_t* __restrict__ offsets, int64_t N,
                                     int64_t A) {
  for (int64_t r = offsets[N] + blockIdx.x * (int64_t)blockDim.x + threadIdx.x; r < A;
       r += (int64_t)gridDim.x * blockDim.x)
    assign_of[r] = -1;
}

// An out-of-range count left in device memory becomes an error record (engine/cuda.h): index = how many.
__global__ void record_bad_ids_kernel(int64_t* rec, const int64_t* __restrict__ bad_total, int64_t N) {
  if (blockIdx.x == 0 && threadIdx.x == 0 && *bad_total > 0)
    record_bad_index(rec, IndexOp::Dispatch, *bad_total, -1, N);
}

// The plan's launches. The out-of-range count is read back (one wait), or with nowait recorded on the device.
int64_t plan(int64_t* counts, int64_t* offsets, int32_t* row_of, int32_t* assign_of, const int32_t* expert,
             int64_t A, int64_t N, bool nowait) {
  check_dispatch_sizes("cuda::dispatch_plan", A, N);
  const int NB = (int)N;
  Chunks c = make_chunks(A, NB);
  const size_t cc_bytes = align256((size_t)(NB * c.G) * 4), bad_bytes = align256((size_t)c.G * 4);
  Scratch s(cc_bytes + bad_bytes + 256);
  int32_t* cc = s.at<int32_t>();
  int32_t* badc = s.at<int32_t>(cc_bytes);
  int64_t* bad_total = s.at<int64_t>(cc_bytes + bad_bytes);
  run_count<false>(cc, badc, expert, A, 0, NB, c);  // one counting pass serves the counts and the scatter
  run_totals(counts, bad_total, cc, badc, NB, c.G);
  if (nowait) {
    record_bad_ids_kernel<<<1, 1, 0, stream()>>>(index_error_record(), bad_total, N);
    cudaCheckLaunch("record_bad_ids_kernel");
  }
  run_scan(offsets, counts, NB);
  run_base(cc, offsets, NB, c.G);
  run_scatter<false>(row_of, assign_of, nullptr, nullptr, cc, expert, A, 0, NB, c);
  if (nowait && A > 0) {
    unfilled_rows_kernel<<<grid_for(A, 256), 256, 0, stream()>>>(assign_of, offsets, N, A);
    cudaCheckLaunch("unfilled_rows_kernel");
  }
  return nowait ? 0 : read_back(bad_total);
}
}  // namespace

int64_t dispatch_plan(int64_t* counts, int64_t* offsets, int32_t* row_of, int32_t* assign_of, const int32_t* expert,
                      int64_t A, int64_t N) {
  return plan(counts, offsets, row_of, assign_of, expert, A, N, false);
}

void dispatch_plan_nowait(int64_t* counts, int64_t* offsets, int32_t* row_of, int32_t* assign_of,
                          const int32_t* expert, int64_t A, int64_t N) {
  plan(counts, offsets, row_of, assign_of, expert, A, N, true);
}

void dispatch_permute(float* xe, const float* x, const int32_t* assign_of, int64_t Ap, int64_t K, int64_t C) {
  CM_CHECK(Ap >= 0 && K >= 1 && C >= 0, "cuda::dispatch_permute: Ap=", Ap, " K=", K, " C=", C);
  if (Ap == 0 || C == 0) return;
  const unsigned g = grid_for(Ap, kRowThreads / kWarp);
  if (vec4_ok(C, {xe, x}))
    permute_kernel<float4><<<g, kRowThreads, 0, stream()>>>((float4*)xe, (const float4*)x, assign_of, Ap, K, C / 4);
  else
    permute_kernel<float><<<g, kRowThreads, 0, stream()>>>(xe, x, assign_of, Ap, K, C);
  cudaCheckLaunch("permute_kernel");
}

void dispatch_permute_backward(float* dx, const float* d_xe, const int32_t* row_of, int64_t T, int64_t K, int64_t C) {
  CM_CHECK(T >= 0 && K >= 1 && C >= 0, "cuda::dispatch_permute_backward: T=", T, " K=", K, " C=", C);
  if (T == 0 || C == 0) return;
  const unsigned g = grid_for(T, kRowThreads / kWarp);
  if (vec4_ok(C, {dx, d_xe}))
    permute_backward_kernel<float4>
        <<<g, kRowThreads, 0, stream()>>>((float4*)dx, (const float4*)d_xe, row_of, T, K, C / 4);
  else
    permute_backward_kernel<float><<<g, kRowThreads, 0, stream()>>>(dx, d_xe, row_of, T, K, C);
  cudaCheckLaunch("permute_backward_kernel");
}

void dispatch_combine(float* out, const float* ye, const float* gate, const int32_t* row_of, int64_t T, int64_t K,
                      int64_t C) {
  CM_CHECK(T >= 0 && K >= 1 && C >= 0, "cuda::dispatch_combine: T=", T, " K=", K, " C=", C);
  if (T == 0 || C == 0) return;
  const unsigned g = grid_for(T, kRowThreads / kWarp);
  if (vec4_ok(C, {out, ye}))
    combine_kernel<float4>
        <<<g, kRowThreads, 0, stream()>>>((float4*)out, (const float4*)ye, gate, row_of, T, K, C / 4);
  else
    combine_kernel<float><<<g, kRowThreads, 0, stream()>>>(out, ye, gate, row_of, T, K, C);
  cudaCheckLaunch("combine_kernel");
}

void dispatch_combine_backward(float* d_ye, float* d_gate, const float* d_out, const float* ye, const float* gate,
                               const int32_t* row_of, const int32_t* assign_of, int64_t T, int64_t Ap, int64_t K,
                               int64_t C) {
  CM_CHECK(T >= 0 && Ap >= 0 && K >= 1 && C >= 0, "cuda::dispatch_combine_backward: T=", T, " A'=", Ap, " K=", K,
           " C=", C);
  if (T == 0 || (!d_ye && !d_gate)) return;
  combine_backward_kernel<<<grid_for(Ap > T ? Ap : T, kRowThreads / kWarp), kRowThreads, 0, stream()>>>(
      d_ye, d_gate, d_out, ye, gate, row_of, assign_of, T, Ap, K, C);
  cudaCheckLaunch("combine_backward_kernel");
}

// ---------------------------------------------------------------- radix sort for other kernel files

namespace detail {

void stable_sort_pairs(int32_t* keys_out, int32_t* vals_out, const int32_t* keys_in, const int32_t* vals_in,
                       int64_t n, int key_bits) {
  CM_CHECK(n >= 0 && n < INT_MAX, "stable_sort_pairs: n=", n);
  CM_CHECK(key_bits >= 1 && key_bits <= 31, "stable_sort_pairs: key_bits=", key_bits);
  if (n == 0) return;
  constexpr int NB = 256;
  const int passes = (key_bits + 7) / 8;
  Chunks c = make_chunks(n, NB);
  const size_t cc_bytes = align256((size_t)(NB * c.G) * 4), cnt_bytes = align256(NB * 8),
               off_bytes = align256((NB + 1) * 8), buf_bytes = align256((size_t)n * 4);
  Scratch s(cc_bytes + cnt_bytes + off_bytes + (passes > 1 ? 4 * buf_bytes : 0));
  int32_t* cc = s.at<int32_t>();
  int64_t* counts = s.at<int64_t>(cc_bytes);
  int64_t* offsets = s.at<int64_t>(cc_bytes + cnt_bytes);
  const size_t b0 = cc_bytes + cnt_bytes + off_bytes;
  int32_t* tk[2] = {s.at<int32_t>(b0), s.at<int32_t>(b0 + buf_bytes)};
  int32_t* tv[2] = {s.at<int32_t>(b0 + 2 * buf_bytes), s.at<int32_t>(b0 + 3 * buf_bytes)};
  const int32_t* src_k = keys_in;
  const int32_t* src_v = vals_in;
  for (int p = 0; p < passes; ++p) {
    const bool last = p == passes - 1;
    int32_t* dk = last ? keys_out : tk[p % 2];
    int32_t* dv = last ? vals_out : tv[p % 2];
    const int shift = 8 * p;
    run_count<true>(cc, nullptr, src_k, n, shift, NB, c);
    run_totals(counts, nullptr, cc, nullptr, NB, c.G);
    run_scan(offsets, counts, NB);
    run_base(cc, offsets, NB, c.G);
    run_scatter<true>(nullptr, dv, dk, src_v, cc, src_k, n, shift, NB, c);
    src_k = dk;
    src_v = dv;
  }
}

}  // namespace detail

}  // namespace cm::cuda
