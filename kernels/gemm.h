// Matrix products on raw row-major float pointers: C = alpha * op(A) * op(B) + beta * C, op = identity or
// transpose. The same two entry points exist in namespace cm::cuda (cuBLAS) with the same arguments.
//
// Shapes (row-major, leading dimension = distance in elements between consecutive rows):
//   op(A) is [M, K]: A is stored [M, K] (lda >= K), or [K, M] when trans_a (lda >= M)
//   op(B) is [K, N]: B is stored [K, N] (ldb >= N), or [N, K] when trans_b (ldb >= K)
//   C     is [M, N], ldc >= N
// Leading dimensions larger than the row length let the caller pass sub-matrices (e.g. a column slice).
//
// Contract:
//   - beta == 0 never reads C (C may hold garbage or NaN); beta == 1 is the accumulate form used for gradients.
//   - K == 0 or alpha == 0: C = beta * C and A, B are not read.
//   - Deterministic: every C element is computed by one thread with the same sequence of floating-point
//     operations whatever the number of threads, so results are bit-identical for any OMP_NUM_THREADS.
//   - C must not alias A or B.
#pragma once
#include <cstdint>

namespace cm::cpu {

// The K blocks of the CPU GEMM: K is cut into ceil(K / 384) blocks of this size (the last one shorter), a function
// of K alone. Every C element accumulates each block from 0 in increasing k with fused multiply-adds, then adds
// the block's sum to C (the first block: alpha * sum + beta * C). Kernels that promise the CPU GEMM's bits (the
// grouped GEMM's CUDA twin) follow the same blocks.
constexpr int64_t kGemmKC = 384;
constexpr int64_t gemm_k_block(int64_t K) {
  return K <= 0 ? 0 : (K + (K + kGemmKC - 1) / kGemmKC - 1) / ((K + kGemmKC - 1) / kGemmKC);
}

void gemm(float* C,        // [M, N], ldc
          int64_t ldc,
          const float* A,  // [M, K] or [K, M] (trans_a), lda
          int64_t lda,
          const float* B,  // [K, N] or [N, K] (trans_b), ldb
          int64_t ldb, int64_t M, int64_t N, int64_t K, bool trans_a, bool trans_b, float alpha = 1.0f,
          float beta = 0.0f);

// `batch` independent products; matrix b of each operand starts at base + b * stride (elements).
// A stride of 0 reuses the same matrix for every batch entry (e.g. one weight for all); stride_c must not be 0
// when batch > 1.
void gemm_strided_batched(float* C,        // [batch][M, N]
                          int64_t ldc, int64_t stride_c,
                          const float* A,  // [batch][M, K] or [batch][K, M] (trans_a)
                          int64_t lda, int64_t stride_a,
                          const float* B,  // [batch][K, N] or [batch][N, K] (trans_b)
                          int64_t ldb, int64_t stride_b, int64_t batch, int64_t M, int64_t N, int64_t K,
                          bool trans_a, bool trans_b, float alpha = 1.0f, float beta = 0.0f);

// Multiply-adds (M * N * K per product) that the two functions above have been asked for since the program
// started, from any thread. Tests read it before and after a piece of work to count the products it actually
// issued (e.g. that a tree router evaluates only its kept nodes), rather than trusting a formula.
int64_t gemm_multiply_adds();

}  // namespace cm::cpu

#if CM_CUDA
// CUDA twins (kernels/cuda/gemm.cu): cuBLAS with the same row-major arguments, on device pointers, on the engine's
// stream. Precision follows cuda::set_matmul_precision (engine/cuda.h): FP32 by default, TF32/BF16 opt-in.
// Same determinism guarantee as cuBLAS: the same bits for the same call on the same GPU model.
namespace cm::cuda {

void gemm(float* C, int64_t ldc, const float* A, int64_t lda, const float* B, int64_t ldb, int64_t M, int64_t N,
          int64_t K, bool trans_a, bool trans_b, float alpha = 1.0f, float beta = 0.0f);
void gemm_strided_batched(float* C, int64_t ldc, int64_t stride_c, const float* A, int64_t lda, int64_t stride_a,
                          const float* B, int64_t ldb, int64_t stride_b, int64_t batch, int64_t M, int64_t N,
                          int64_t K, bool trans_a, bool trans_b, float alpha = 1.0f, float beta = 0.0f);

// Per-expert products over the expert-contiguous rows of the MoE dispatch (kernels/dispatch.h): segment g owns
// rows [offsets[g], offsets[g+1]) (offsets is a HOST array [G+1], e.g. the dispatch offsets read back once).
//   gemm_segments:       C[rows] = alpha * A[rows] op(B_g) + beta * C[rows]      A [A', K] (lda), C [A', N] (ldc),
//                        B_g = B + g * stride_b: [K, N] or [N, K] (trans_b)      (expert forward, input gradient)
//   gemm_segments_wgrad: C_g = alpha * A[rows]^T B[rows] + beta * C_g            A [A', M] (lda), B [A', N] (ldb),
//                        C_g = C + g * stride_c: [M, N] (ldc)                     (expert weight gradient)
// One cuBLAS call per non-empty segment (an empty segment's C_g is still scaled by beta in the wgrad form).
void gemm_segments(float* C, int64_t ldc, const float* A, int64_t lda, const float* B, int64_t ldb, int64_t stride_b,
                   const int64_t* offsets, int64_t G, int64_t N, int64_t K, bool trans_b, float alpha = 1.0f,
                   float beta = 0.0f);
void gemm_segments_wgrad(float* C, int64_t ldc, int64_t stride_c, const float* A, int64_t lda, const float* B,
                         int64_t ldb, const int64_t* offsets, int64_t G, int64_t M, int64_t N, float alpha = 1.0f,
                         float beta = 0.0f);

}  // namespace cm::cuda
#endif
