// Grouped GEMM: one call runs every expert's matrix products over the expert-contiguous rows of the MoE dispatch
// (kernels/dispatch.h), instead of a loop of small GEMMs each with its own parallel region (CPU) or launch (CUDA).
//
// Letters: G groups (experts), M rows in all (A' of the dispatch: rows of every group together), Kd input
// features, N output features. Group g owns rows offsets[g] .. offsets[g+1]-1 of X, Y, dX and dY
// (offsets [G+1], int64, offsets[0] = 0, offsets[G] <= M, non-decreasing: what dispatch_offsets produces). Rows
// past offsets[G] belong to no group: they are neither read nor written (the unfilled rows of a dispatch plan the
// host does not wait for, whose buffer has a row for every slot, dropped or not).
// Group g has its own weight W[g], a Linear weight in PyTorch's layout: [N, Kd] row-major, so the forward is
// Y = X W^T. Weights, biases and their gradients are given as arrays of G pointers (each a separate tensor in the
// model); every matrix is dense row-major (leading dimension = its row length).
//
//   forward:         Y[rows g]  (+)= X[rows g] W[g]^T (+ b[g])          Y [M, N], X [M, Kd]
//   backward_input:  dX[rows g] (+)= dY[rows g] W[g]                    dX [M, Kd], dY [M, N]
//   backward_weight: dW[g]      (+)= dY[rows g]^T X[rows g]             dW[g] [N, Kd]
//                    dB[g]      (+)= column sums of dY[rows g]          dB[g] [N]
// (+)= : `accumulate` false overwrites, true adds. Forward with a bias and accumulate: Y = (Y + b) + X W^T.
// An empty group (offsets[g] == offsets[g+1]) in backward_weight leaves dW[g] and dB[g] untouched when
// accumulating and sets them to 0 (a sum over no rows) when not.
//
// The row gather (forward and backward_weight): with gather.index set, row i of the grouped X (i < M) is row
// gather.index[i] / gather.div of the X pointer passed, so the dispatch's permutation is folded into the packing
// and never materialised. For the MoE layer: X = the tokens [T, C], index = assign_of [A'] (kernels/dispatch.h),
// div = K (slots per token): row i reads token assign_of[i] / K, exactly dispatch_permute's xe[i]. The indices are
// not checked (assign_of from dispatch_plan is in range by construction). backward_input has no gather: its dX
// rows are the permuted rows, which dispatch_permute_backward then sums per token.
//
// Bits (CPU): each group's result is bit-identical to cm::cpu::gemm on that segment alone, with the same
// operands (a gathered X: the materialised permutation), alpha = 1 and beta = accumulate:
//   forward          = gemm(Y_g, X_g, W_g, trans_b); with a bias, = linear(X_g, W_g, b_g) (ops_matmul.cpp: Y_g
//                      prefilled with b_g, then accumulated) when not accumulating
//   backward_input   = gemm(dX_g, dY_g, W_g)
//   backward_weight  = gemm(dW_g, dY_g, X_g, trans_a); dB_g = linear's bias gradient (the ones-vector gemm)
// because every tile runs cpu::gemm's own tile routine (kernels/cpu/gemm_tile.h), whose arithmetic per element
// depends only on the inner size. So the results are bit-identical for any OMP_NUM_THREADS, and a model that
// switches its experts from per-segment linear() calls to these gets the same products, bit for bit.
//
// Bits (CUDA): every output element follows the CPU's sequence of operations (fused multiply-adds in increasing
// k from 0 per K block of gemm_k_block, each block's sum added to C in order, the bias added first), and one
// thread owns each output element (no atomics, dW walked in row order by one block). So the CUDA twin gives the
// CPU's bits on every run, against a CPU build whose GEMM uses fused multiply-adds (the AVX2 and AVX-512 paths;
// the plain C++ fallback rounds twice and agrees within tolerance only). One exception, by design: when dW[g] has
// few tiles, backward_weight cuts a group longer than a chunk into chunks and adds their products in order
// (cuda::grouped_wgrad_chunks below), still deterministic and the CPU's bits of those products. Checked under the
// emulator (emu/); no GPU run yet.
//
// Threads (CPU): one OpenMP region over (group, tile) work items for the whole call, dynamically scheduled; the
// tiling is cut from the total work and the thread count (it never changes a bit, see above). A group of several
// row tiles has its weight packed once, at the start of the region, for all of them (below). Calls under
// ~4 MFLOP in all run on the calling thread. Multiply-adds are counted in cm::cpu::gemm_multiply_adds().
#pragma once
#include <cstdint>

namespace cm {

// Optional row gather of X (above). index == nullptr: row i of X is X + i * Kd.
struct RowGather {
  const int32_t* index = nullptr;  // [M] on the backend's device; row i reads X row index[i] / div
  int64_t div = 1;                 // > 0
};

}  // namespace cm

namespace cm::cpu {

void grouped_gemm_forward(float* Y,                  // [M, N]
                          const float* X,            // [M, Kd], or the rows gather.index picks
                          const float* const* W,     // [G] -> each [N, Kd]
                          const int64_t* offsets,    // [G+1]
                          int64_t G, int64_t M, int64_t N, int64_t Kd,
                          const float* const* bias,  // [G] -> each [N], or nullptr (no bias)
                          bool accumulate, RowGather gather = {});

void grouped_gemm_backward_input(float* dX,               // [M, Kd]
                                 const float* dY,         // [M, N]
                                 const float* const* W,   // [G] -> each [N, Kd]
                                 const int64_t* offsets,  // [G+1]
                                 int64_t G, int64_t M, int64_t N, int64_t Kd, bool accumulate);

void grouped_gemm_backward_weight(float* const* dW,        // [G] -> each [N, Kd]
                                  float* const* dB,        // [G] -> each [N], or nullptr (no bias gradient)
                                  const float* dY,         // [M, N]
                                  const float* X,          // [M, Kd], or the rows gather.index picks
                                  const int64_t* offsets,  // [G+1]
                                  int64_t G, int64_t M, int64_t N, int64_t Kd, bool accumulate,
                                  RowGather gather = {});

// A popular expert (more rows than one tile) has its weight packed once per call and shared by its row tiles, in
// the forward and backward_input; off, every tile packs it for itself (the earlier behaviour). Both give the same
// bits. On by default; CM_GROUPED_SHARED_PACK=0 in the environment turns it off (before/after timings), as does
// the setter (tests).
void grouped_gemm_set_shared_packing(bool on);
bool grouped_gemm_shared_packing();

}  // namespace cm::cpu

#if CM_CUDA
#include <algorithm>
#include <vector>

// CUDA twins (kernels/cuda/grouped_gemm.cu): the same arguments, every one in device memory: the data, offsets,
// gather.index, and the pointer arrays themselves (W, bias, dW, dB: device arrays of G device pointers, see
// DevicePointers). Nothing is read back and nothing waits: the blocks find their group from the device offsets (a
// grid sized for the worst case, ceil(M / 64) + G row tiles; blocks past the last tile exit), so there is no host
// synchronisation. The offsets must satisfy the contract above; they are not checked (that would need a read-back).
// The pointer arrays belong to the caller and must stay alive until the kernels have run (stream order: until
// later work on the stream frees them, as for any tensor).
namespace cm::cuda {

void grouped_gemm_forward(float* Y, const float* X, const float* const* W, const int64_t* offsets, int64_t G,
                          int64_t M, int64_t N, int64_t Kd, const float* const* bias, bool accumulate,
                          RowGather gather = {});
void grouped_gemm_backward_input(float* dX, const float* dY, const float* const* W, const int64_t* offsets,
                                 int64_t G, int64_t M, int64_t N, int64_t Kd, bool accumulate);
void grouped_gemm_backward_weight(float* const* dW, float* const* dB, const float* dY, const float* X,
                                  const int64_t* offsets, int64_t G, int64_t M, int64_t N, int64_t Kd,
                                  bool accumulate, RowGather gather = {});

// backward_weight's chunks. A block owns a tile of dW[g] and walks the group's rows as its inner dimension, so a
// group far above the others (routing collapse, early in training) would keep its few tiles' blocks busy long after
// the rest of the GPU is idle. When dW[g] has few tiles, a group of more than `rows` rows is therefore cut into
// chunks of `rows` (the last one shorter): the first chunk is folded into dW[g] (dB[g]) as a group of that many
// rows would be, each further chunk's product (from zero, its own K blocks) goes to scratch, and those are added
// in chunk order, c = part + c. Deterministic; a group of at most `rows` rows keeps the CPU's bits, a longer one
// gets the CPU's bits of that sequence of products (tests/test_grouped_gemm.cpp builds it from cpu::gemm calls).
// `extra` = M / rows bounds the further chunks of one call (scratch: extra * (N * Kd + N) floats, at most 16 MB).
// rows == 0: no chunks (dW[g] large enough to fill the GPU on its own, or no group can be that long).
struct WgradChunks {
  int64_t rows = 0, extra = 0;
};
// Chunks on (the default) or off (every group walked by its own tiles' blocks alone): the bench's before/after
// (bench/cuda_routing.cu) and the tests' unchunked bits. Off, grouped_wgrad_chunks still answers the rule.
void grouped_wgrad_set_chunks(bool on);
inline WgradChunks grouped_wgrad_chunks(int64_t M, int64_t N, int64_t Kd) {
  constexpr int64_t kMinRows = 2048, kScratchFloats = int64_t{1} << 22;
  const int64_t per = N * (Kd > 0 ? Kd : 0) + N;  // one chunk's dW and dB
  const int64_t extra = per > 0 ? kScratchFloats / per : 0;
  if (extra == 0) return {};
  const int64_t rows = std::max(kMinRows, (M + extra - 1) / extra);
  if (M <= rows) return {};
  return {rows, M / rows};  // sum over groups of (ceil(rows_g / rows) - 1) <= M / rows
}

// A device copy of a host list of G device pointers, uploaded again only when the list changes: keep one per
// pointer set (e.g. per MoE layer and weight matrix) and call get() before each launch. Parameters keep their
// storage from step to step, so after the first step their lists upload nothing; a list of buffers allocated
// anew each step (gradients the graph creates) uploads each time it changes. An upload goes through cuda::upload:
// no wait, except when it recycles the pinned staging ring, which waits once for the copies still reading it; a
// get() that finds its list unchanged never waits. The array stays valid until a get() with another list, or the
// destruction; a captured CUDA graph keeps the array it saw, so refresh the lists before capturing. Not for
// static storage (its destructor frees device memory).
class DevicePointers {
 public:
  DevicePointers() = default;
  DevicePointers(const DevicePointers&) = delete;
  DevicePointers& operator=(const DevicePointers&) = delete;
  ~DevicePointers();
  template <class T>
  T* const* get(const std::vector<T*>& host) {  // T = float or const float
    return static_cast<T* const*>(upload_if_changed(std::vector<const void*>(host.begin(), host.end())));
  }

 private:
  void* upload_if_changed(const std::vector<const void*>& host);  // the device array
  std::vector<const void*> host_;  // the list last uploaded
  void* dev_ = nullptr;            // its device copy
};

}  // namespace cm::cuda
#endif
