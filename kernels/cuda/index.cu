// CUDA indexing kernels, twins of kernels/cpu/index.cpp (contracts and the [O, D, I] layout in kernels/index.h).
// Copies are one thread per output element. The adding kernels (index_add, scatter_add) give each (o, i) column
// one thread that adds its contributions in increasing source position j: the same order as the CPU for every
// output element, no two threads write one element, and no atomics; results match the CPU bit for bit.
// The column walk has O * I threads, each a chain of n dependent read-modify-writes (the compiler cannot overlap
// them: two j may hit one row). That is fine for short index lists; index_add with a long one (the backward of
// index_select over many rows) first sorts the positions by index (a stable radix sort), then adds each run of
// equal indices in chunks of kRunChunk, one warp per chunk, the chunk sums in chunk order (kernels/index.h:
// bit-identical to the CPU for runs up to kRunChunk, deterministic and within rounding beyond). The embedding
// backward uses the same sorted add (index_add_sorted).
#include <climits>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/sort.cuh"
#include "kernels/index.h"

namespace cm::cuda {

namespace {

constexpr int kThreads = 256;

// ---------------------------------------------------------------- kernels

__global__ void first_bad_kernel(unsigned long long* __restrict__ first, const int32_t* __restrict__ index,
                                 int64_t n, int64_t D) {
  for (int64_t p = gtid(); p < n; p += gstride())
    if (index[p] < 0 || index[p] >= D) atomicMin(first, (unsigned long long)p);  // integer min: order-free
}

// dst[o, at + d, i] = src[o, d, i] (concat) or dst[o, d, i] = src[o, at + d, i] (split): a copy of an [O, n, I]
// box between two [O, *, I] layouts; n = the box's middle extent, so = source/destination middle extents.
template <class T>
__global__ void box_copy_kernel(T* __restrict__ dst, const T* __restrict__ src, int64_t O, int64_t n, int64_t I,
                                int64_t dst_mid, int64_t dst_at, int64_t src_mid, int64_t src_at) {
  const int64_t total = O * n * I;
  for (int64_t e = gtid(); e < total; e += gstride()) {
    const int64_t i = e % I, on = e / I, d = on % n, o = on / n;
    dst[(o * dst_mid + dst_at + d) * I + i] = src[(o * src_mid + src_at + d) * I + i];
  }
}

// A bad index (outside [0, D)) is recorded (engine/cuda.h) and never used: its outputs are 0, its additions skipped.
__device__ __forceinline__ bool index_ok(int64_t* rec, IndexOp op, int32_t d, int64_t pos, int64_t D) {
  if (d >= 0 && d < D) return true;
  record_bad_index(rec, op, d, pos, D);
  return false;
}

template <class T>
__global__ void index_select_kernel(T* __restrict__ out, const T* __restrict__ a, const int32_t* __restrict__ index,
                                    int64_t O, int64_t D, int64_t n, int64_t I, int64_t* rec) {
  const int64_t total = O * n * I;
  for (int64_t e = gtid(); e < total; e += gstride()) {
    const int64_t i = e % I, oj = e / I, j = oj % n, o = oj / n;
    const int32_t d = index[j];
    out[e] = index_ok(rec, IndexOp::IndexSelect, d, j, D) ? a[(o * D + d) * I + i] : T(0);
  }
}

__global__ void index_add_kernel(float* __restrict__ out, const float* __restrict__ src,
                                 const int32_t* __restrict__ index, int64_t O, int64_t D, int64_t n, int64_t I,
                                 int64_t* rec) {
  const int64_t cols = O * I;
  for (int64_t c = gtid(); c < cols; c += gstride()) {
    const int64_t o = c / I, i = c - o * I;
    for (int64_t j = 0; j < n; ++j) {
      const int32_t d = index[j];
      if (index_ok(rec, IndexOp::IndexAdd, d, j, D)) out[(o * D + d) * I + i] += src[(o * n + j) * I + i];
    }
  }
}

// ---------------------------------------------------------------- the sorted add
// sorted [n]: index values in the order stable_sort_pairs leaves them, pos [n]: each one's source position. A run
// is a maximal range of equal sort keys; chunk c of the run starting at s covers [s + c L, min(s + (c + 1) L, e)),
// L = kRunChunk, e the run's end. Warp task (o, p): only chunk heads work.

// The order stable_sort_pairs sorts by (kernels/cuda/dispatch.cu): 8-bit digits from the lowest, ceil(key_bits / 8)
// of them, unsigned. Values in [0, 2^key_bits) keep their order; a bad one (recorded, skipped) lands where its low
// bits put it, so runs are found by this key, and a value that differs from its run's first is skipped too.
__device__ __forceinline__ uint32_t order_key(int32_t v, uint32_t mask) { return (uint32_t)v & mask; }

// First position in [lo, hi) whose key is >= key (below: > key); the keys are sorted.
__device__ __forceinline__ int64_t first_key_at_least(const int32_t* sorted, int64_t lo, int64_t hi, uint32_t key,
                                                      uint32_t mask, bool strictly_above) {
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    const uint32_t k = order_key(sorted[mid], mask);
    if (k < key || (strictly_above && k == key))
      lo = mid + 1;
    else
      hi = mid;
  }
  return lo;
}

// Where a chunk's sum waits for the combine (runs longer than L only), per (o, column i): slot 2 w + (p is the run's
// first position), w = p / L. Unique: in one window [w L, (w + 1) L) of positions at most one long run starts (it
// then covers the rest of the window), and at most one later chunk of a long run begins (a run's chunk heads are L
// apart, and a long run starting inside the window cannot have a second head there).
__device__ __forceinline__ int64_t chunk_slot(int64_t p, bool run_start) { return 2 * (p / kRunChunk) + run_start; }

// Pass 1: each chunk adds its sources in increasing sorted position. A whole run (m <= L) goes straight into the row,
// the CPU's serial order; chunk 0 of a long run starts from the row's value, a later chunk from -0.0 (x + -0.0 == x
// for every x, -0.0 included), and their sums go to slots part [slots, O, I].
__global__ void run_chunk_kernel(float* __restrict__ out, float* __restrict__ part, const float* __restrict__ src,
                                 const int32_t* __restrict__ sorted, const int32_t* __restrict__ pos, int64_t O,
                                 int64_t D, int64_t n, int64_t I, uint32_t mask, IndexOp op, int64_t* rec) {
  const int lane = threadIdx.x % kWarp;
  const int64_t tasks = O * n;
  for (int64_t w = (int64_t)blockIdx.x * (blockDim.x / kWarp) + threadIdx.x / kWarp; w < tasks;
       w += (int64_t)gridDim.x * (blockDim.x / kWarp)) {
    const int64_t o = w / n, p = w - o * n;
    const uint32_t key = order_key(sorted[p], mask);
    const int64_t s = first_key_at_least(sorted, 0, p, key, mask, false);  // the run's first position
    if ((p - s) % kRunChunk != 0) continue;                                 // not a chunk head (uniform in the warp)
    const int64_t e = first_key_at_least(sorted, p + 1, n, key, mask, true);  // the run's end
    const int32_t d = sorted[s];
    if (d < 0 || d >= D) {  // a bad value: the run is skipped (sums of such a step are not to be trusted)
      if (lane == 0) record_bad_index(rec, op, d, pos[s], D);  // where d is (position p may hold another value)
      continue;
    }
    const int64_t q1 = p + kRunChunk < e ? p + kRunChunk : e;
    const bool whole = e - s <= kRunChunk;
    float* row = out + (o * D + d) * I;
    float* dst = whole ? row : part + (chunk_slot(p, p == s) * O + o) * I;
    for (int64_t i = lane; i < I; i += kWarp) {
      float acc = p == s ? row[i] : -0.0f;
      for (int64_t q = p; q < q1; ++q) {
        const int32_t v = sorted[q];
        if (v == d)
          acc += src[(o * n + pos[q]) * I + i];
        else if (i == 0)  // another value with the same low bits: a bad one, recorded once per chunk lane 0 sees it
          record_bad_index(rec, op, v, pos[q], D);
      }
      dst[i] = acc;
    }
  }
}

// Pass 2: the row of each long run becomes chunk 0's sum + chunk 1's + ... in chunk order.
__global__ void run_combine_kernel(float* __restrict__ out, const float* __restrict__ part,
                                   const int32_t* __restrict__ sorted, int64_t O, int64_t D, int64_t n, int64_t I,
                                   uint32_t mask) {
  const int lane = threadIdx.x % kWarp;
  const int64_t tasks = O * n;
  for (int64_t w = (int64_t)blockIdx.x * (blockDim.x / kWarp) + threadIdx.x / kWarp; w < tasks;
       w += (int64_t)gridDim.x * (blockDim.x / kWarp)) {
    const int64_t o = w / n, p = w - o * n;
    const uint32_t key = order_key(sorted[p], mask);
    if (p > 0 && order_key(sorted[p - 1], mask) == key) continue;  // not a run's first position
    const int64_t e = first_key_at_least(sorted, p + 1, n, key, mask, true);
    const int32_t d = sorted[p];
    if (e - p <= kRunChunk || d < 0 || d >= D) continue;  // a whole run is in its row already; a bad one skipped
    float* row = out + (o * D + d) * I;
    for (int64_t i = lane; i < I; i += kWarp) {
      float acc = part[(chunk_slot(p, true) * O + o) * I + i];
      for (int64_t c = p + kRunChunk; c < e; c += kRunChunk) acc += part[(chunk_slot(c, false) * O + o) * I + i];
      row[i] = acc;
    }
  }
}

template <class T>
__global__ void gather_kernel(T* __restrict__ out, const T* __restrict__ a, const int32_t* __restrict__ index,
                              int64_t O, int64_t D, int64_t m, int64_t I, int64_t* rec) {
  const int64_t total = O * m * I;
  for (int64_t e = gtid(); e < total; e += gstride()) {
    const int64_t i = e % I, o = e / I / m;
    const int32_t d = index[e];
    out[e] = index_ok(rec, IndexOp::Gather, d, e, D) ? a[(o * D + d) * I + i] : T(0);
  }
}

__global__ void scatter_add_kernel(float* __restrict__ out, const float* __restrict__ src,
                                   const int32_t* __restrict__ index, int64_t O, int64_t D, int64_t m, int64_t I,
                                   int64_t* rec) {
  const int64_t cols = O * I;
  for (int64_t c = gtid(); c < cols; c += gstride()) {
    const int64_t o = c / I, i = c - o * I;
    for (int64_t j = 0; j < m; ++j) {
      const int64_t s = (o * m + j) * I + i;
      const int32_t d = index[s];
      if (index_ok(rec, IndexOp::ScatterAdd, d, s, D)) out[(o * D + d) * I + i] += src[s];
    }
  }
}

// Operands: 0 mask, 1 a, 2 b.
__global__ void where_kernel(float* __restrict__ out, const int32_t* __restrict__ mask, const float* __restrict__ a,
                             const float* __restrict__ b, Strided<3> L, int64_t n) {
  for (int64_t e = gtid(); e < n; e += gstride()) {
    int64_t off[3];
    strided_offsets<3>(L, e, off);
    out[e] = mask[off[0]] != 0 ? a[off[1]] : b[off[2]];
  }
}

__global__ void masked_fill_kernel(float* out, const float* a, const int32_t* __restrict__ mask, float value,
                                   Strided<1> L, int64_t n) {
  for (int64_t e = gtid(); e < n; e += gstride()) {
    int64_t off[1];
    strided_offsets<1>(L, e, off);
    out[e] = mask[off[0]] != 0 ? value : a[e];
  }
}

template <class T>
void box_copy(T* dst, const T* src, int64_t O, int64_t n, int64_t I, int64_t dst_mid, int64_t dst_at, int64_t src_mid,
              int64_t src_at, const char* what) {
  CM_CHECK(O >= 0 && n >= 0 && I >= 0 && dst_at >= 0 && src_at >= 0, what, ": bad sizes");
  const int64_t total = O * n * I;
  if (total == 0) return;
  box_copy_kernel<T><<<grid_for(total, kThreads), kThreads, 0, stream()>>>(dst, src, O, n, I, dst_mid, dst_at,
                                                                          src_mid, src_at);
  cudaCheckLaunch(what);
}

template <class T>
void index_select_impl(T* out, const T* a, const int32_t* index, int64_t O, int64_t D, int64_t n, int64_t I) {
  CM_CHECK(O >= 0 && D >= 0 && n >= 0 && I >= 0, "cuda::index_select: bad sizes");
  const int64_t total = O * n * I;
  if (total == 0) return;
  index_select_kernel<T><<<grid_for(total, kThreads), kThreads, 0, stream()>>>(out, a, index, O, D, n, I,
                                                                             index_error_record());
  cudaCheckLaunch("index_select_kernel");
}

template <class T>
void gather_impl(T* out, const T* a, const int32_t* index, int64_t O, int64_t D, int64_t m, int64_t I) {
  CM_CHECK(O >= 0 && D >= 0 && m >= 0 && I >= 0, "cuda::gather: bad sizes");
  const int64_t total = O * m * I;
  if (total == 0) return;
  gather_kernel<T><<<grid_for(total, kThreads), kThreads, 0, stream()>>>(out, a, index, O, D, m, I,
                                                                       index_error_record());
  cudaCheckLaunch("gather_kernel");
}

}  // namespace

// ---------------------------------------------------------------- launchers

int64_t index_first_bad(const int32_t* index, int64_t n, int64_t D) {
  CM_CHECK(n >= 0, "cuda::index_first_bad: n=", n);
  if (n == 0) return -1;
  Scratch s(sizeof(unsigned long long));
  unsigned long long* first = s.at<unsigned long long>();
  const unsigned long long none = ~0ull;
  cudaCheck(cudaMemsetAsync(first, 0xff, sizeof none, stream()));  // none: every byte 0xff
  first_bad_kernel<<<grid_for(n, kThreads), kThreads, 0, stream()>>>(first, index, n, D);
  cudaCheckLaunch("first_bad_kernel");
  unsigned long long h = 0;
  copy_to_host(&h, first, sizeof h);
  return h == none ? -1 : (int64_t)h;
}

void concat_piece(float* dst, const float* src, int64_t O, int64_t Dd, int64_t at, int64_t Ds, int64_t I) {
  box_copy(dst, src, O, Ds, I, Dd, at, Ds, 0, "cuda::concat_piece");
}
void concat_piece(int32_t* dst, const int32_t* src, int64_t O, int64_t Dd, int64_t at, int64_t Ds, int64_t I) {
  box_copy(dst, src, O, Ds, I, Dd, at, Ds, 0, "cuda::concat_piece");
}
void split_piece(float* dst, const float* src, int64_t O, int64_t Ds, int64_t at, int64_t Dd, int64_t I) {
  box_copy(dst, src, O, Dd, I, Dd, 0, Ds, at, "cuda::split_piece");
}
void split_piece(int32_t* dst, const int32_t* src, int64_t O, int64_t Ds, int64_t at, int64_t Dd, int64_t I) {
  box_copy(dst, src, O, Dd, I, Dd, 0, Ds, at, "cuda::split_piece");
}

void index_select(float* out, const float* a, const int32_t* index, int64_t O, int64_t D, int64_t n, int64_t I) {
  index_select_impl(out, a, index, O, D, n, I);
}
void index_select(int32_t* out, const int32_t* a, const int32_t* index, int64_t O, int64_t D, int64_t n, int64_t I) {
  index_select_impl(out, a, index, O, D, n, I);
}

void index_add(float* out, const float* src, const int32_t* index, int64_t O, int64_t D, int64_t n, int64_t I) {
  CM_CHECK(O >= 0 && D >= 0 && n >= 0 && I >= 0, "cuda::index_add: bad sizes");
  if (O * I == 0 || n == 0) return;
  if (n < 64 || n >= INT32_MAX || D > INT32_MAX) {  // short lists: the column walk
    index_add_kernel<<<grid_for(O * I, kThreads), kThreads, 0, stream()>>>(out, src, index, O, D, n, I,
                                                                         index_error_record());
    cudaCheckLaunch("index_add_kernel");
    return;
  }
  int bits = 1;
  while (bits < 31 && (int64_t(1) << bits) < D) ++bits;  // index values in [0, D)
  const size_t bytes = align256((size_t)n * 4);
  Scratch s(2 * bytes);
  int32_t* sorted = s.at<int32_t>();
  int32_t* pos = s.at<int32_t>(bytes);
  detail::stable_sort_pairs(sorted, pos, index, nullptr, n, bits);
  index_add_sorted(out, src, sorted, pos, O, D, n, I, bits, IndexOp::IndexAdd);
}

void index_add_sorted(float* out, const float* src, const int32_t* sorted, const int32_t* pos, int64_t O, int64_t D,
                      int64_t n, int64_t I, int key_bits, IndexOp op) {
  CM_CHECK(O >= 0 && D >= 0 && n >= 0 && n < INT32_MAX && I >= 0 && key_bits >= 1 && key_bits <= 31,
           "cuda::index_add_sorted: O=", O, " D=", D, " n=", n, " I=", I, " key_bits=", key_bits);
  if (O * I == 0 || n == 0) return;
  const int digits = (key_bits + 7) / 8;  // stable_sort_pairs' passes
  const uint32_t mask = digits >= 4 ? 0xffffffffu : (1u << (8 * digits)) - 1u;
  // Chunk sums of long runs: two slots per window of kRunChunk positions (chunk_slot), each [O, I].
  const int64_t slots = 2 * ceil_div(n, kRunChunk);
  Scratch s((size_t)(slots * O * I) * 4);
  float* part = s.at<float>();
  const unsigned grid = grid_for(O * n, kThreads / kWarp);
  run_chunk_kernel<<<grid, kThreads, 0, stream()>>>(out, part, src, sorted, pos, O, D, n, I, mask, op,
                                                    index_error_record());
  cudaCheckLaunch("run_chunk_kernel");
  run_combine_kernel<<<grid, kThreads, 0, stream()>>>(out, part, sorted, O, D, n, I, mask);
  cudaCheckLaunch("run_combine_kernel");
}

void gather(float* out, const float* a, const int32_t* index, int64_t O, int64_t D, int64_t m, int64_t I) {
  gather_impl(out, a, index, O, D, m, I);
}
void gather(int32_t* out, const int32_t* a, const int32_t* index, int64_t O, int64_t D, int64_t m, int64_t I) {
  gather_impl(out, a, index, O, D, m, I);
}

void scatter_add(float* out, const float* src, const int32_t* index, int64_t O, int64_t D, int64_t m, int64_t I) {
  CM_CHECK(O >= 0 && D >= 0 && m >= 0 && I >= 0, "cuda::scatter_add: bad sizes");
  if (O * I == 0 || m == 0) return;
  scatter_add_kernel<<<grid_for(O * I, kThreads), kThreads, 0, stream()>>>(out, src, index, O, D, m, I,
                                                                           index_error_record());
  cudaCheckLaunch("scatter_add_kernel");
}

void where(float* out, const int32_t* mask, const float* a, const float* b, int64_t ndim, const int64_t* shape,
           const int64_t* mask_strides, const int64_t* a_strides, const int64_t* b_strides) {
  int64_t n = 1;
  for (int64_t d = 0; d < ndim; ++d) n *= shape[d];
  if (n == 0) return;
  const int64_t* st[3] = {mask_strides, a_strides, b_strides};
  const Strided<3> L = collapse_strided<3>(ndim, shape, st);
  where_kernel<<<grid_for(n, kThreads), kThreads, 0, stream()>>>(out, mask, a, b, L, n);
  cudaCheckLaunch("where_kernel");
}

void masked_fill(float* out, const float* a, const int32_t* mask, float value, int64_t ndim, const int64_t* shape,
                 const int64_t* mask_strides) {
  int64_t n = 1;
  for (int64_t d = 0; d < ndim; ++d) n *= shape[d];
  if (n == 0) return;
  const int64_t* st[1] = {mask_strides};
  const Strided<1> L = collapse_strided<1>(ndim, shape, st);
  masked_fill_kernel<<<grid_for(n, kThreads), kThreads, 0, stream()>>>(out, a, mask, value, L, n);
  cudaCheckLaunch("masked_fill_kernel");
}

}  // namespace cm::cuda
