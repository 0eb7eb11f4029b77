// The CPU SGEMM's unit of work, shared by cm::cpu::gemm (kernels/cpu/gemm.cpp) and the grouped GEMM
// (kernels/cpu/grouped_gemm.cpp): one tile of C computed start to finish (packing, every K block, write-back) by
// the calling thread. Internal to kernels/cpu: not a kernel API of its own.
//
// The determinism argument of kernels/cpu/gemm.cpp holds for every caller: the arithmetic of a C element depends
// only on K (its K blocks, gemm_k_block in kernels/gemm.h), alpha and beta, never on the tile that holds it. So a
// product cut into tiles in any way, by any thread, gives the bits of cm::cpu::gemm on the same operands.
#pragma once
#include <cstdint>

namespace cm::cpu::gemm_detail {

// One product C = alpha * op(A) op(B) + beta * C, with the shapes and leading dimensions of kernels/gemm.h.
struct Operands {
  const float* A;
  const float* B;
  float* C;
  int64_t lda, ldb, ldc, M, N, K;
  bool ta, tb;
  float alpha, beta;
  // Optional row gathers of the stored matrices, folded into the packing (nothing is copied beforehand):
  //   a_rows: row i of A (op(A) = A, [M, K]) is A + (a_rows[i] / a_div) * lda      [M]; not for ta
  //   b_rows: row k of B (op(B) = B, [K, N]) is B + (b_rows[k] / b_div) * ldb      [K]
  //           or, with tb, row j of B (op(B) = B^T, B [N, K]: column j of op(B))  [N]
  // nullptr: row i is A + i * lda (resp. B + k * ldb, B + j * ldb). The indices are not checked.
  const int32_t* a_rows = nullptr;
  int64_t a_div = 1;
  const int32_t* b_rows = nullptr;
  int64_t b_div = 1;
};

// C[m0:m1, n0:n1] of the product (rows and columns of op(A) op(B)); n1 - n0 <= tile_nc(); K > 0.
// packed_b: null, the tile packs op(B)[:, n0:n1] itself (into this thread's buffer, once per K block); or that
// panel as pack_b_panel made it, shared by every tile of those columns (the grouped GEMM packs an expert's weight
// once for all its row tiles). Either way the micro-kernel sees the same values: the same bits.
void gemm_tile(const Operands& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1, const float* packed_b = nullptr);

// op(B)[:, n0:n1] packed for gemm_tile, every K block (gemm_k_block(K)) in turn: dst [packed_b_floats(K, n1 - n0)].
int64_t packed_b_floats(int64_t K, int64_t cols);
void pack_b_panel(float* dst, const Operands& p, int64_t n0, int64_t n1);

// One row of a product without packing: c[0:N] = a[0:K] B, B [K, N] row-major at ldb (op(B) = B), with the
// arithmetic of gemm_tile for a C element (K blocks of gemm_k_block(K); alpha = 1, beta = 0), so the bits of
// cm::cpu::gemm's row. For products with a short K (a router level's b children) whose rows go to different
// places: a tile would pack B and A for arithmetic that costs less than the packing. Not counted in
// gemm_multiply_adds (the caller counts).
void gemm_row(float* c, const float* a, const float* B, int64_t ldb, int64_t N, int64_t K);

int tile_mr();       // rows of the register tile: tile heights are multiples of it
int tile_nr();       // columns of the register tile: tile widths are multiples of it
int64_t tile_nc();   // the widest tile
int max_threads();   // OpenMP threads available here (1 inside a parallel region)
int threads_for(double flops);  // the GEMMs' rule: products under ~4 MFLOP on the calling thread, else max_threads()
void count_multiply_adds(int64_t n);  // adds to cm::cpu::gemm_multiply_adds()

}  // namespace cm::cpu::gemm_detail
