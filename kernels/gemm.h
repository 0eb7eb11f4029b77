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

}  // namespace cm::cpu
