// Matrix products on the GPU: cuBLAS behind the row-major contract of kernels/gemm.h.
//
// cuBLAS is column-major. A row-major [r, c] matrix with leading dimension ld is, read column-major, its transpose
// [c, r] with the same ld. So the row-major product C = op(A) op(B) is computed as the column-major product
// C^T = op(B)^T op(A)^T: swap the operands, keep each one's transpose flag, and pass (m, n) = (N, M).
//
// Precision (engine/cuda.h, set_matmul_precision): FP32 asks cuBLAS for CUBLAS_COMPUTE_32F (IEEE fp32 inputs and
// accumulation; the handle keeps the default math mode, so no TF32 unless NVIDIA_TF32_OVERRIDE says so), TF32 for
// CUBLAS_COMPUTE_32F_FAST_TF32, BF16 for CUBLAS_COMPUTE_32F_FAST_16BF. Operands stay f32 in memory either way; a
// true bf16 storage path would add CUDA_R_16BF operand types here and leave the signature's layout untouched.
// Determinism: cuBLAS gives the same bits for the same call on the same GPU model (one stream, no atomics mode).
#include "kernels/cuda/common.cuh"
#include "kernels/gemm.h"

namespace cm::cuda {

namespace {

cublasComputeType_t compute_type() {
  switch (matmul_precision()) {
    case MatmulPrecision::TF32: return CUBLAS_COMPUTE_32F_FAST_TF32;
    case MatmulPrecision::BF16: return CUBLAS_COMPUTE_32F_FAST_16BF;
    default: return CUBLAS_COMPUTE_32F;
  }
}

// C [M, N] (ldc) = beta * C, for the K == 0 / alpha == 0 cases: BLAS semantics, and beta == 0 never reads C.
__global__ void scale_matrix_kernel(float* __restrict__ C, int64_t ldc, int64_t M, int64_t N, float beta) {
  const int64_t n = M * N;
  for (int64_t e = gtid(); e < n; e += gstride()) {
    const int64_t i = e / N, j = e - i * N;
    float* c = C + i * ldc + j;
    *c = beta == 0.f ? 0.f : beta * *c;
  }
}

void scale_batch(float* C, int64_t ldc, int64_t stride_c, int64_t batch, int64_t M, int64_t N, float beta) {
  if (beta == 1.f) return;
  for (int64_t b = 0; b < batch; ++b) {
    scale_matrix_kernel<<<grid_for(M * N, 256), 256, 0, stream()>>>(C + b * stride_c, ldc, M, N, beta);
    cudaCheckLaunch("scale_matrix_kernel");
  }
}

void check_gemm(const char* what, int64_t ldc, int64_t lda, int64_t ldb, int64_t M, int64_t N, int64_t K,
                bool trans_a, bool trans_b) {
  CM_CHECK(M >= 0 && N >= 0 && K >= 0, what, ": M=", M, " N=", N, " K=", K);
  CM_CHECK(ldc >= N, what, ": ldc=", ldc, " < N=", N);
  CM_CHECK(lda >= (trans_a ? M : K), what, ": lda=", lda, " too small for ", trans_a ? "[K, M]" : "[M, K]");
  CM_CHECK(ldb >= (trans_b ? K : N), what, ": ldb=", ldb, " too small for ", trans_b ? "[N, K]" : "[K, N]");
}

// cuBLAS wants every leading dimension >= 1 even for empty extents.
inline int64_t ld1(int64_t ld) { return ld > 0 ? ld : 1; }

}  // namespace

void gemm(float* C, int64_t ldc, const float* A, int64_t lda, const float* B, int64_t ldb, int64_t M, int64_t N,
          int64_t K, bool trans_a, bool trans_b, float alpha, float beta) {
  check_gemm("cuda::gemm", ldc, lda, ldb, M, N, K, trans_a, trans_b);
  if (M == 0 || N == 0) return;
  if (K == 0 || alpha == 0.f) return scale_batch(C, ldc, 0, 1, M, N, beta);
  cublasCheck(cublasGemmEx_64(cublas(), trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, N,
                              M, K, &alpha, B, CUDA_R_32F, ld1(ldb), A, CUDA_R_32F, ld1(lda), &beta, C, CUDA_R_32F,
                              ld1(ldc), compute_type(), CUBLAS_GEMM_DEFAULT));
}

void gemm_strided_batched(float* C, int64_t ldc, int64_t stride_c, const float* A, int64_t lda, int64_t stride_a,
                          const float* B, int64_t ldb, int64_t stride_b, int64_t batch, int64_t M, int64_t N,
                          int64_t K, bool trans_a, bool trans_b, float alpha, float beta) {
  check_gemm("cuda::gemm_strided_batched", ldc, lda, ldb, M, N, K, trans_a, trans_b);
  CM_CHECK(batch >= 0, "cuda::gemm_strided_batched: batch=", batch);
  CM_CHECK(batch <= 1 || stride_c != 0, "cuda::gemm_strided_batched: stride_c must not be 0 when batch > 1");
  if (batch == 0 || M == 0 || N == 0) return;
  if (K == 0 || alpha == 0.f) return scale_batch(C, ldc, stride_c, batch, M, N, beta);
  cublasCheck(cublasGemmStridedBatchedEx_64(
      cublas(), trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, N, M, K, &alpha, B,
      CUDA_R_32F, ld1(ldb), stride_b, A, CUDA_R_32F, ld1(lda), stride_a, &beta, C, CUDA_R_32F, ld1(ldc), stride_c,
      batch, compute_type(), CUBLAS_GEMM_DEFAULT));
}

void gemm_segments(float* C, int64_t ldc, const float* A, int64_t lda, const float* B, int64_t ldb, int64_t stride_b,
                   const int64_t* offsets, int64_t G, int64_t N, int64_t K, bool trans_b, float alpha, float beta) {
  CM_CHECK(G >= 0, "cuda::gemm_segments: G=", G);
  for (int64_t g = 0; g < G; ++g) {
    const int64_t r0 = offsets[g], rows = offsets[g + 1] - offsets[g];
    CM_CHECK(rows >= 0, "cuda::gemm_segments: offsets decrease at segment ", g);
    if (rows == 0) continue;
    gemm(C + r0 * ldc, ldc, A + r0 * lda, lda, B + g * stride_b, ldb, rows, N, K, false, trans_b, alpha, beta);
  }
}

void gemm_segments_wgrad(float* C, int64_t ldc, int64_t stride_c, const float* A, int64_t lda, const float* B,
                         int64_t ldb, const int64_t* offsets, int64_t G, int64_t M, int64_t N, float alpha,
                         float beta) {
  CM_CHECK(G >= 0, "cuda::gemm_segments_wgrad: G=", G);
  for (int64_t g = 0; g < G; ++g) {
    const int64_t r0 = offsets[g], rows = offsets[g + 1] - offsets[g];
    CM_CHECK(rows >= 0, "cuda::gemm_segments_wgrad: offsets decrease at segment ", g);
    // rows == 0 still scales C_g by beta (the K == 0 case of gemm), as a loop of CPU gemms would.
    gemm(C + g * stride_c, ldc, A + r0 * lda, lda, B + r0 * ldb, ldb, M, N, rows, true, false, alpha, beta);
  }
}

}  // namespace cm::cuda
