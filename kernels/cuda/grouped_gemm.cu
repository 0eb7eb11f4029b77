// Grouped GEMM on the GPU (contract in kernels/grouped_gemm.h): tiled fp32 kernels whose blocks find their group
// from the offsets in device memory, so that nothing is read back and one launch covers every group.
//
// Tiles: a block of 256 threads (16 x 16) computes a TM x TN = 64 x 64 tile of C; thread (tx, ty) owns the 4 x 4
// elements (ty + 16 r, tx + 16 s), so a warp reads two rows of As (broadcasts) and 16 consecutive columns of Bs per k.
// The inner dimension streams through shared memory TK = 16 at a time: As[k][i] = op(A)[i][k], Bs[k][j] =
// op(B)[k][j] (one padding column against bank conflicts when the stored operand runs along k).
//
//   forward, backward_input: grouped_rows_kernel. Row tile t of the whole call is the t-th tile when each group's
//     rows are cut into ceil(rows / TM) tiles, in group order. The grid is sized for the worst case,
//     ceil(M / TM) + G tiles by ceil(cols / TN); a block scans the offsets (256 groups per step, a block-wide prefix
//     sum of the groups' tile counts) to find its group, and exits when t is past the last tile.
//   backward_weight: grouped_wgrad_kernel. Block (g, tile of dW[g]) owns that tile of dW[g] [N, Kd] and walks
//     group g's rows in order as its inner dimension; the tiles in dW's first column band also sum their rows of dB.
//     One block per output element: deterministic, no atomics. When dW[g] has few tiles, a long group's rows past
//     its first chunk go to further blocks, chunk by chunk (grouped_wgrad_chunks, kernels/grouped_gemm.h), whose
//     partial products wgrad_chunks_add_kernel then adds in chunk order: a hot expert's few tiles no longer hold
//     the whole GPU to their length.
//
// The CPU's bits: every output element runs cm::cpu::gemm's sequence (kernels/gemm.h, gemm_k_block): per K block,
// acc = 0 and acc = fmaf(a_k, b_k, acc) in increasing k, then C = acc (first block, overwriting) or acc + C. The
// padding of a partial TK step is never multiplied (the k loop stops at the block's end), and a padded row or
// column is never stored, so edges change nothing.
#include <algorithm>
#include <atomic>
#include <climits>
#include <vector>

#include "kernels/cuda/common.cuh"
#include "kernels/gemm.h"
#include "kernels/grouped_gemm.h"

namespace cm::cuda {

namespace {

constexpr int TM = 64, TN = 64, TK = 16, kThreads = 256;

__host__ __device__ __forceinline__ int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

// A stored row-major matrix; its row r is at p + row(r) * ld, row(r) = rows[r] / div when gathered, else r.
struct Operand {
  const float* p;
  int64_t ld;
  const int32_t* rows;  // optional gather, nullptr: none
  int32_t div;
};
__device__ __forceinline__ const float* row_ptr(const Operand& o, int64_t r) {
  return o.p + (o.rows ? (int64_t)(o.rows[r] / o.div) : r) * o.ld;
}

// Folds op(A)[m0 : m0+mc, 0:K] op(B)[0:K, n0 : n0+nc] into this thread's c[4][4] with the CPU's write-back rule:
// per K block, c = have ? acc + c : acc (then have = true). A is stored [M, K] (TA false) or [K, M] (TA true); B is
// stored [K, N] (TB false) or [N, K] (TB true). With `sums`, thread i < TM also folds the K-block sums of
// op(A)[m0 + i][k] into colsum by the same rule (have_cs): the bias gradient, when op(A) = dY^T.
// Every thread of the block calls it (barriers inside).
template <bool TA, bool TB>
__device__ void tile_product(float (&c)[4][4], bool& have, float& colsum, bool& have_cs, bool sums, const Operand& A,
                             int64_t m0, int64_t mc, const Operand& B, int64_t n0, int64_t nc, int64_t K) {
  __shared__ float As[TK][TM + 1];
  __shared__ float Bs[TK][TN + 1];
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int64_t kb = cpu::gemm_k_block(K);  // the CPU GEMM's K blocks: its bits
  for (int64_t pc = 0; pc < K; pc += kb) {
    const int64_t kend = imin(K, pc + kb);
    float acc[4][4];
#pragma unroll
    for (int r = 0; r < 4; ++r)
#pragma unroll
      for (int s = 0; s < 4; ++s) acc[r][s] = 0.f;
    float cs = 0.f;
    for (int64_t k0 = pc; k0 < kend; k0 += TK) {
      const int kk = (int)imin(TK, kend - k0);
      for (int e = tid; e < TK * TM; e += kThreads) {  // consecutive threads read consecutive addresses
        const int i = TA ? e % TM : e / TK, k = TA ? e / TM : e % TK;
        float v = 0.f;
        if (i < mc && k < kk) v = TA ? row_ptr(A, k0 + k)[m0 + i] : row_ptr(A, m0 + i)[k0 + k];
        As[k][i] = v;
      }
      for (int e = tid; e < TK * TN; e += kThreads) {
        const int j = TB ? e / TK : e % TN, k = TB ? e % TK : e / TN;
        float v = 0.f;
        if (j < nc && k < kk) v = TB ? row_ptr(B, n0 + j)[k0 + k] : row_ptr(B, k0 + k)[n0 + j];
        Bs[k][j] = v;
      }
      __syncthreads();
      for (int k = 0; k < kk; ++k) {
        float a[4], b[4];
#pragma unroll
        for (int r = 0; r < 4; ++r) a[r] = As[k][ty + 16 * r], b[r] = Bs[k][tx + 16 * r];
#pragma unroll
        for (int r = 0; r < 4; ++r)
#pragma unroll
          for (int s = 0; s < 4; ++s) acc[r][s] = fmaf(a[r], b[s], acc[r][s]);
      }
      if (sums && tid < TM)
        for (int k = 0; k < kk; ++k) cs += As[k][tid];
      __syncthreads();  // As and Bs are refilled next
    }
#pragma unroll
    for (int r = 0; r < 4; ++r)
#pragma unroll
      for (int s = 0; s < 4; ++s) c[r][s] = have ? acc[r][s] + c[r][s] : acc[r][s];
    have = true;
    colsum = have_cs ? cs + colsum : cs;
    have_cs = true;
  }
}

// The group of unit t and the unit's first row within the group, where group g owns
// ceil((rows_g - skip) / unit) consecutive units (none when rows_g <= skip), in group order, the first starting at
// row `skip`; false when t is past the last unit. The row tiles: unit TM, skip 0; backward_weight's further chunks:
// unit = skip = the chunk rows. Every thread of the block calls it (barriers inside) and gets the same answer.
__device__ bool locate_unit(const int64_t* __restrict__ offsets, int64_t G, int64_t t, int64_t unit, int64_t skip,
                            int64_t& g_out, int64_t& m0_out) {
  __shared__ int64_t warp_tot[kThreads / kWarp];
  __shared__ int64_t found[2];  // group, first row
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  if (threadIdx.x == 0) found[0] = -1;
  __syncthreads();   // seen by every thread, also when G == 0 and the loop's barrier never runs
  int64_t base = 0;  // units of the groups before this step's 256
  for (int64_t g0 = 0; g0 < G; g0 += kThreads) {
    const int64_t g = g0 + threadIdx.x;
    const int64_t rows = g < G ? offsets[g + 1] - offsets[g] : 0;
    const int64_t n = rows > skip ? (rows - skip + unit - 1) / unit : 0;
    const int64_t incl = warp_inclusive_scan(n);
    if (lane == kWarp - 1) warp_tot[warp] = incl;
    __syncthreads();
    int64_t first = base + incl - n, total = base;  // first: this group's first unit
    for (int w = 0; w < kThreads / kWarp; ++w) {
      if (w < warp) first += warp_tot[w];
      total += warp_tot[w];
    }
    if (n > 0 && t >= first && t < first + n) found[0] = g, found[1] = skip + (t - first) * unit;  // one thread
    __syncthreads();
    if (found[0] >= 0) break;  // the same in every thread
    base = total;
  }
  g_out = found[0];
  m0_out = found[1];
  return g_out >= 0;
}

// C [M, cols] rows of group g (+)= A [M, K] rows of g (gathered) op(W[g]) (+ bias[g]):
//   forward         TB = true:  op(W[g]) = W[g]^T, W[g] [cols = N, K = Kd]
//   backward_input  TB = false: op(W[g]) = W[g],   W[g] [K = N, cols = Kd]
template <bool TB>
__global__ void __launch_bounds__(kThreads)
    grouped_rows_kernel(float* __restrict__ C, const float* __restrict__ A, const int32_t* __restrict__ a_rows,
                        int32_t a_div, const float* const* __restrict__ W, const float* const* __restrict__ bias,
                        const int64_t* __restrict__ offsets, int64_t G, int64_t cols, int64_t K, bool accumulate) {
  int64_t g, m0;
  if (!locate_unit(offsets, G, blockIdx.x, TM, 0, g, m0)) return;  // the whole block: past the last tile
  const int64_t r0 = offsets[g] + m0, mc = imin(TM, offsets[g + 1] - r0);
  const int64_t n0 = (int64_t)blockIdx.y * TN, nc = imin(TN, cols - n0);
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const float* b = bias ? bias[g] : nullptr;
  float c[4][4];
#pragma unroll
  for (int r = 0; r < 4; ++r)
#pragma unroll
    for (int s = 0; s < 4; ++s) {
      const int64_t i = ty + 16 * r, j = tx + 16 * s;
      float v = 0.f;
      if (i < mc && j < nc) {
        if (accumulate) v = C[(r0 + i) * cols + n0 + j];
        if (b) v = accumulate ? v + b[n0 + j] : b[n0 + j];  // the bias first, as linear() does
      }
      c[r][s] = v;
    }
  bool have = accumulate || b;
  float colsum = 0.f;
  bool have_cs = false;
  const Operand Aop{A, K, a_rows, a_div};
  const Operand Bop{W[g], TB ? K : cols, nullptr, 1};
  tile_product<false, TB>(c, have, colsum, have_cs, false, Aop, r0, mc, Bop, n0, nc, K);
#pragma unroll
  for (int r = 0; r < 4; ++r)
#pragma unroll
    for (int s = 0; s < 4; ++s) {
      const int64_t i = ty + 16 * r, j = tx + 16 * s;
      if (i < mc && j < nc) C[(r0 + i) * cols + n0 + j] = have ? c[r][s] : 0.f;  // K == 0: a sum over nothing
    }
}

// Block (slot, tile) of dW [N, Kd]: slot < G is group g = slot, which folds its first chunk (rows 0 .. min(rows,
// chunk) - 1; chunk 0: all of them) into dW[g][n0 : n0+TM, k0 : k0+TN] (+)= dY^T X (gathered), the rows as the
// inner dimension in order, and with k0 == 0 also dB[g][n0 : n0+TM] (+)= column sums of dY. Slot G + x is the
// call's further chunk x (locate_unit, group order): the same product from zero over the chunk's rows, into
// part[x] (dW's layout, then dB's N), and its group into part_group[x] (-1 when x is past the last chunk).
__global__ void __launch_bounds__(kThreads)
    grouped_wgrad_kernel(float* const* __restrict__ dW, float* const* __restrict__ dB, const float* __restrict__ dY,
                         const float* __restrict__ X, const int32_t* __restrict__ x_rows, int32_t x_div,
                         const int64_t* __restrict__ offsets, int64_t G, int64_t N, int64_t Kd, int64_t tiles_n,
                         int64_t tiles_k, bool accumulate, int64_t chunk, float* __restrict__ part,
                         int32_t* __restrict__ part_group) {
  const int64_t slot = blockIdx.x / (tiles_n * tiles_k), t = blockIdx.x % (tiles_n * tiles_k);
  const int64_t n0 = t / tiles_k * TM, k0 = t % tiles_k * TN;
  const bool further = slot >= G;
  int64_t g = slot, m0 = 0;
  if (further) {
    const bool found = locate_unit(offsets, G, slot - G, chunk, chunk, g, m0);
    if (t == 0 && threadIdx.x == 0) part_group[slot - G] = found ? (int32_t)g : -1;
    if (!found) return;  // the whole block
  }
  const int64_t all = offsets[g + 1] - offsets[g];
  if (all == 0 && accumulate) return;  // an empty group's gradients stay untouched
  const int64_t r0 = offsets[g] + m0, rows = chunk > 0 ? imin(chunk, all - m0) : all;
  const bool init = accumulate && !further;  // start from the stored values
  const int64_t mc = imin(TM, N - n0), nc = imin(TN, Kd - k0);  // nc may be 0 (Kd == 0): dB only
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  float* w = further ? part + (slot - G) * (N * Kd + N) : dW[g];
  float* db = dB && k0 == 0 ? (further ? w + N * Kd : dB[g]) : nullptr;
  float c[4][4];
#pragma unroll
  for (int r = 0; r < 4; ++r)
#pragma unroll
    for (int s = 0; s < 4; ++s) {
      const int64_t i = ty + 16 * r, j = tx + 16 * s;
      c[r][s] = init && i < mc && j < nc ? w[(n0 + i) * Kd + k0 + j] : 0.f;
    }
  bool have = init;
  float colsum = db && init && (int64_t)threadIdx.x < mc ? db[n0 + threadIdx.x] : 0.f;
  bool have_cs = init;
  const Operand Aop{dY + r0 * N, N, nullptr, 1};                                  // dY_g [rows, N]: op(A) = dY_g^T
  const Operand Bop{x_rows ? X : X + r0 * Kd, Kd, x_rows ? x_rows + r0 : nullptr, x_div};  // X_g [rows, Kd]
  tile_product<true, false>(c, have, colsum, have_cs, db != nullptr, Aop, n0, mc, Bop, k0, nc, rows);
#pragma unroll
  for (int r = 0; r < 4; ++r)
#pragma unroll
    for (int s = 0; s < 4; ++s) {
      const int64_t i = ty + 16 * r, j = tx + 16 * s;
      if (i < mc && j < nc) w[(n0 + i) * Kd + k0 + j] = have ? c[r][s] : 0.f;
    }
  if (db && (int64_t)threadIdx.x < mc) db[n0 + threadIdx.x] = have_cs ? colsum : 0.f;
}

// Element e of part's layout (dW's N * Kd, then dB's N) for the further chunks: the thread of a group's first
// further chunk adds that chunk and the group's next ones, in chunk order (c = part + c), into dW[g] or dB[g].
__global__ void wgrad_chunks_add_kernel(float* const* __restrict__ dW, float* const* __restrict__ dB,
                                        const float* __restrict__ part, const int32_t* __restrict__ part_group,
                                        int64_t extra, int64_t N, int64_t Kd) {
  const int64_t per = N * Kd + N;
  for (int64_t i = gtid(); i < extra * per; i += gstride()) {
    const int64_t x = i / per, e = i % per;
    const int32_t g = part_group[x];
    if (g < 0 || (x > 0 && part_group[x - 1] == g)) continue;  // no chunk, or not the group's first further one
    if (e >= N * Kd && !dB) continue;
    float* out = e < N * Kd ? dW[g] + e : dB[g] + (e - N * Kd);
    float c = *out;
    for (int64_t y = x; y < extra && part_group[y] == g; ++y) c = part[y * per + e] + c;
    *out = c;
  }
}

std::atomic<bool>& wgrad_chunks_on() {
  static std::atomic<bool> on{true};
  return on;
}

void check_args(const char* what, int64_t G, int64_t M, int64_t N, int64_t Kd, const RowGather& gather) {
  CM_CHECK(G >= 0 && M >= 0 && N >= 0 && Kd >= 0, what, ": G=", G, " M=", M, " N=", N, " Kd=", Kd);
  CM_CHECK(gather.div > 0 && gather.div <= INT32_MAX, what, ": gather.div=", gather.div);
  CM_CHECK(M == 0 || G > 0, what, ": M=", M, " rows in no group");
}

}  // namespace

void grouped_gemm_forward(float* Y, const float* X, const float* const* W, const int64_t* offsets, int64_t G,
                          int64_t M, int64_t N, int64_t Kd, const float* const* bias, bool accumulate,
                          RowGather gather) {
  check_args("cuda::grouped_gemm_forward", G, M, N, Kd, gather);
  if (M == 0 || N == 0) return;
  const int64_t tiles = ceil_div(M, TM) + G, col_tiles = ceil_div(N, TN);
  CM_CHECK(tiles <= INT_MAX && col_tiles <= 65535, "cuda::grouped_gemm_forward: M=", M, " N=", N, " too large");
  grouped_rows_kernel<true><<<dim3((unsigned)tiles, (unsigned)col_tiles), kThreads, 0, stream()>>>(
      Y, X, gather.index, (int32_t)gather.div, W, bias, offsets, G, N, Kd, accumulate);
  cudaCheckLaunch("grouped_rows_kernel<forward>");
}

void grouped_gemm_backward_input(float* dX, const float* dY, const float* const* W, const int64_t* offsets,
                                 int64_t G, int64_t M, int64_t N, int64_t Kd, bool accumulate) {
  check_args("cuda::grouped_gemm_backward_input", G, M, N, Kd, RowGather{});
  if (M == 0 || Kd == 0) return;
  const int64_t tiles = ceil_div(M, TM) + G, col_tiles = ceil_div(Kd, TN);
  CM_CHECK(tiles <= INT_MAX && col_tiles <= 65535, "cuda::grouped_gemm_backward_input: M=", M, " Kd=", Kd,
           " too large");
  grouped_rows_kernel<false><<<dim3((unsigned)tiles, (unsigned)col_tiles), kThreads, 0, stream()>>>(
      dX, dY, nullptr, 1, W, nullptr, offsets, G, Kd, N, accumulate);
  cudaCheckLaunch("grouped_rows_kernel<backward_input>");
}

void grouped_wgrad_set_chunks(bool on) { wgrad_chunks_on().store(on); }

void grouped_gemm_backward_weight(float* const* dW, float* const* dB, const float* dY, const float* X,
                                  const int64_t* offsets, int64_t G, int64_t M, int64_t N, int64_t Kd,
                                  bool accumulate, RowGather gather) {
  check_args("cuda::grouped_gemm_backward_weight", G, M, N, Kd, gather);
  if (G == 0 || N == 0) return;
  const int64_t tiles_n = ceil_div(N, TM), tiles_k = Kd > 0 ? ceil_div(Kd, TN) : 1;  // Kd == 0: dB only
  const WgradChunks ch = wgrad_chunks_on().load() ? grouped_wgrad_chunks(M, N, Kd) : WgradChunks{};
  CM_CHECK((G + ch.extra) * tiles_n * tiles_k <= INT_MAX, "cuda::grouped_gemm_backward_weight: G=", G, " N=", N,
           " Kd=", Kd, " too large");
  const int64_t per = N * Kd + N;
  Scratch s(ch.extra ? align256((size_t)(ch.extra * per) * 4) + (size_t)ch.extra * 4 : 0);
  float* part = ch.extra ? s.at<float>() : nullptr;
  int32_t* part_group = ch.extra ? s.at<int32_t>(align256((size_t)(ch.extra * per) * 4)) : nullptr;
  grouped_wgrad_kernel<<<(unsigned)((G + ch.extra) * tiles_n * tiles_k), kThreads, 0, stream()>>>(
      dW, dB, dY, X, gather.index, (int32_t)gather.div, offsets, G, N, Kd, tiles_n, tiles_k, accumulate, ch.rows,
      part, part_group);
  cudaCheckLaunch("grouped_wgrad_kernel");
  if (!ch.extra) return;
  wgrad_chunks_add_kernel<<<grid_for(ch.extra * per, kThreads), kThreads, 0, stream()>>>(dW, dB, part, part_group,
                                                                                         ch.extra, N, Kd);
  cudaCheckLaunch("wgrad_chunks_add_kernel");
}

// ---------------------------------------------------------------- DevicePointers

DevicePointers::~DevicePointers() { deallocate(dev_); }

void* DevicePointers::upload_if_changed(const std::vector<const void*>& host) {
  if (dev_ && host == host_) return dev_;
  host_ = host;
  deallocate(dev_);  // stream-ordered: kernels already queued with the old array read it before any reuse
  dev_ = allocate(std::max<size_t>(host.size(), 1) * sizeof(void*));
  if (!host.empty()) upload(dev_, host.data(), host.size() * sizeof(void*));
  return dev_;
}

}  // namespace cm::cuda
