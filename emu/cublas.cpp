// cuBLAS for the CUDA emulator: the calls of emu/include/cublas_v2.h on the CPU GEMM of kernels/gemm.h.
// Arguments are checked as cuBLAS checks them (a negative size or a leading dimension below its minimum is
// CUBLAS_STATUS_INVALID_VALUE even where the product is empty; an unsupported type is NOT_SUPPORTED), and every
// matrix must lie in device memory (a host pointer faults on a GPU: EXECUTION_FAILED here, with a message).
// TF32 and BF16 compute types round both inputs to 10 and 7 stored mantissa bits (round to nearest even) before a
// full-precision product, which is what tensor cores compute up to the order of the fp32 sums.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "emu/cuda_emu.h"
#include "emu/include/cublas_v2.h"
#include "kernels/gemm.h"

struct cublasContext {
  cudaStream_t stream = nullptr;
  cublasPointerMode_t pointer_mode = CUBLAS_POINTER_MODE_HOST;
  cublasAtomicsMode_t atomics = CUBLAS_ATOMICS_NOT_ALLOWED;
  cublasMath_t math = CUBLAS_DEFAULT_MATH;
};

const char* cublasGetStatusName(cublasStatus_t st) {
  switch (st) {
    case CUBLAS_STATUS_SUCCESS: return "CUBLAS_STATUS_SUCCESS";
    case CUBLAS_STATUS_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED";
    case CUBLAS_STATUS_ALLOC_FAILED: return "CUBLAS_STATUS_ALLOC_FAILED";
    case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_ARCH_MISMATCH: return "CUBLAS_STATUS_ARCH_MISMATCH";
    case CUBLAS_STATUS_MAPPING_ERROR: return "CUBLAS_STATUS_MAPPING_ERROR";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "CUBLAS_STATUS_EXECUTION_FAILED";
    case CUBLAS_STATUS_INTERNAL_ERROR: return "CUBLAS_STATUS_INTERNAL_ERROR";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
    case CUBLAS_STATUS_LICENSE_ERROR: return "CUBLAS_STATUS_LICENSE_ERROR";
  }
  return "<unknown>";
}
const char* cublasGetStatusString(cublasStatus_t st) {
  switch (st) {
    case CUBLAS_STATUS_SUCCESS: return "success";
    case CUBLAS_STATUS_NOT_INITIALIZED: return "the library was not initialized";
    case CUBLAS_STATUS_ALLOC_FAILED: return "the resource allocation failed";
    case CUBLAS_STATUS_INVALID_VALUE: return "an invalid numeric value was used as an argument";
    case CUBLAS_STATUS_ARCH_MISMATCH: return "an absent device architectural feature is required";
    case CUBLAS_STATUS_MAPPING_ERROR: return "an access to GPU memory space failed";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "the GPU program failed to execute";
    case CUBLAS_STATUS_INTERNAL_ERROR: return "an internal operation failed";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "the functionality requested is not supported";
    case CUBLAS_STATUS_LICENSE_ERROR: return "there is an error with the license";
  }
  return "unknown error";
}

cublasStatus_t cublasCreate(cublasHandle_t* h) {
  if (!h) return CUBLAS_STATUS_INVALID_VALUE;
  *h = new cublasContext;
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasDestroy(cublasHandle_t h) {
  if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
  delete h;
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasSetStream(cublasHandle_t h, cudaStream_t s) {
  if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
  h->stream = s;
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasGetStream(cublasHandle_t h, cudaStream_t* s) {
  if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (!s) return CUBLAS_STATUS_INVALID_VALUE;
  *s = h->stream;
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasSetPointerMode(cublasHandle_t h, cublasPointerMode_t mode) {
  if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (mode != CUBLAS_POINTER_MODE_HOST && mode != CUBLAS_POINTER_MODE_DEVICE) return CUBLAS_STATUS_INVALID_VALUE;
  h->pointer_mode = mode;
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasGetPointerMode(cublasHandle_t h, cublasPointerMode_t* mode) {
  if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (!mode) return CUBLAS_STATUS_INVALID_VALUE;
  *mode = h->pointer_mode;
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasSetAtomicsMode(cublasHandle_t h, cublasAtomicsMode_t mode) {
  if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (mode != CUBLAS_ATOMICS_NOT_ALLOWED && mode != CUBLAS_ATOMICS_ALLOWED) return CUBLAS_STATUS_INVALID_VALUE;
  h->atomics = mode;
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasSetMathMode(cublasHandle_t h, cublasMath_t mode) {
  if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
  if ((int)mode < 0 || (int)mode > 3) return CUBLAS_STATUS_INVALID_VALUE;
  h->math = mode;
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasGetMathMode(cublasHandle_t h, cublasMath_t* mode) {
  if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (!mode) return CUBLAS_STATUS_INVALID_VALUE;
  *mode = h->math;
  return CUBLAS_STATUS_SUCCESS;
}

namespace {

enum class Round { None, TF32, BF16 };

float round_bits(float x, int drop) {
  uint32_t b;
  std::memcpy(&b, &x, 4);
  if ((b & 0x7f800000u) == 0x7f800000u) return x;  // inf, NaN
  const uint32_t half = (1u << (drop - 1)) - 1 + ((b >> drop) & 1u);
  b = (b + half) & ~((1u << drop) - 1);
  std::memcpy(&x, &b, 4);
  return x;
}

// Elements spanned by a column-major [rows, cols] matrix with leading dimension ld.
int64_t extent(int64_t rows, int64_t cols, int64_t ld) { return rows == 0 || cols == 0 ? 0 : ld * (cols - 1) + rows; }

bool on_device(const void* p, int64_t elems, const char* what, const char* call) {
  if (elems == 0 || cm_emu::device_range(p, (size_t)elems * 4)) return true;
  std::fprintf(stderr, "cuda-emu: %s: matrix %s (%p, %lld floats) is not inside one device block\n", call, what, p,
               (long long)elems);
  return false;
}

cublasStatus_t gemm_batched(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int64_t m, int64_t n,
                            int64_t k, const void* alpha_p, const void* A, cudaDataType_t at, int64_t lda,
                            long long sa, const void* B, cudaDataType_t bt, int64_t ldb, long long sb,
                            const void* beta_p, void* C, cudaDataType_t ct, int64_t ldc, long long sc, int64_t batch,
                            cublasComputeType_t compute, cublasGemmAlgo_t algo, const char* call) {
  if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (cm_emu::capturing(h->stream)) {
    // Stream capture: recorded, run at each replay. Host-mode alpha and beta are read now, as cuBLAS reads them at
    // the call; the arguments are checked when the replay runs (a failure is printed there).
    struct Rec {
      cublasHandle_t h;
      cublasOperation_t ta, tb;
      int64_t m, n, k;
      float alpha, beta;
      const void *alpha_p, *beta_p, *A, *B;
      cudaDataType_t at, bt, ct;
      int64_t lda, ldb, ldc;
      long long sa, sb, sc;
      void* C;
      int64_t batch;
      cublasComputeType_t compute;
      cublasGemmAlgo_t algo;
      const char* call;
      static void replay(void* p) {
        Rec* r = static_cast<Rec*>(p);
        const bool host = r->h->pointer_mode == CUBLAS_POINTER_MODE_HOST;
        gemm_batched(r->h, r->ta, r->tb, r->m, r->n, r->k, host ? &r->alpha : r->alpha_p, r->A, r->at, r->lda, r->sa,
                     r->B, r->bt, r->ldb, r->sb, host ? &r->beta : r->beta_p, r->C, r->ct, r->ldc, r->sc, r->batch,
                     r->compute, r->algo, r->call);
      }
      static void destroy(void* p) { delete static_cast<Rec*>(p); }
    };
    if (!alpha_p || !beta_p) return CUBLAS_STATUS_INVALID_VALUE;
    auto* r = new Rec{h,  ta,  tb,  m,  n,  k,  0.f, 0.f,   alpha_p, beta_p, A,    B,   at,
                      bt, ct,  lda, ldb, ldc, sa, sb, sc,  C,     batch,   compute, algo, call};
    if (h->pointer_mode == CUBLAS_POINTER_MODE_HOST) {
      std::memcpy(&r->alpha, alpha_p, 4);
      std::memcpy(&r->beta, beta_p, 4);
    }
    cm_emu::record_launch(h->stream, &Rec::replay, &Rec::destroy, r);
    return CUBLAS_STATUS_SUCCESS;
  }
  auto op_ok = [](cublasOperation_t o) { return o == CUBLAS_OP_N || o == CUBLAS_OP_T || o == CUBLAS_OP_C; };
  if (!op_ok(ta) || !op_ok(tb)) return CUBLAS_STATUS_INVALID_VALUE;
  if (m < 0 || n < 0 || k < 0 || batch < 0) return CUBLAS_STATUS_INVALID_VALUE;
  const bool ta_n = ta == CUBLAS_OP_N, tb_n = tb == CUBLAS_OP_N;
  const int64_t a_rows = ta_n ? m : k, a_cols = ta_n ? k : m, b_rows = tb_n ? k : n, b_cols = tb_n ? n : k;
  if (lda < (a_rows > 1 ? a_rows : 1) || ldb < (b_rows > 1 ? b_rows : 1) || ldc < (m > 1 ? m : 1))
    return CUBLAS_STATUS_INVALID_VALUE;
  if (at != CUDA_R_32F || bt != CUDA_R_32F || ct != CUDA_R_32F) return CUBLAS_STATUS_NOT_SUPPORTED;
  Round rnd = Round::None;
  switch (compute) {
    case CUBLAS_COMPUTE_32F: rnd = h->math == CUBLAS_TF32_TENSOR_OP_MATH ? Round::TF32 : Round::None; break;
    case CUBLAS_COMPUTE_32F_PEDANTIC: break;
    case CUBLAS_COMPUTE_32F_FAST_TF32: rnd = Round::TF32; break;
    case CUBLAS_COMPUTE_32F_FAST_16BF: rnd = Round::BF16; break;
    default: return CUBLAS_STATUS_NOT_SUPPORTED;
  }
  if (algo != CUBLAS_GEMM_DEFAULT && algo != CUBLAS_GEMM_DEFAULT_TENSOR_OP) return CUBLAS_STATUS_INVALID_VALUE;
  if (!alpha_p || !beta_p) return CUBLAS_STATUS_INVALID_VALUE;
  float alpha, beta;
  if (h->pointer_mode == CUBLAS_POINTER_MODE_DEVICE) {
    if (!on_device(alpha_p, 1, "alpha", call) || !on_device(beta_p, 1, "beta", call))
      return CUBLAS_STATUS_EXECUTION_FAILED;
  }
  std::memcpy(&alpha, alpha_p, 4);
  std::memcpy(&beta, beta_p, 4);
  if (m == 0 || n == 0 || batch == 0) return CUBLAS_STATUS_SUCCESS;
  const bool reads_ab = k > 0 && alpha != 0.f;
  for (int64_t b = 0; b < batch; ++b) {
    const float* Ab = (const float*)A + b * sa;
    const float* Bb = (const float*)B + b * sb;
    float* Cb = (float*)C + b * sc;
    if ((reads_ab && (!on_device(Ab, extent(a_rows, a_cols, lda), "A", call) ||
                      !on_device(Bb, extent(b_rows, b_cols, ldb), "B", call))) ||
        !on_device(Cb, extent(m, n, ldc), "C", call))
      return CUBLAS_STATUS_EXECUTION_FAILED;
    std::vector<float> ra, rb;
    if (reads_ab && rnd != Round::None) {
      const int drop = rnd == Round::TF32 ? 13 : 16;
      ra.assign(Ab, Ab + extent(a_rows, a_cols, lda));
      rb.assign(Bb, Bb + extent(b_rows, b_cols, ldb));
      for (float& x : ra) x = round_bits(x, drop);
      for (float& x : rb) x = round_bits(x, drop);
      Ab = ra.data();
      Bb = rb.data();
    }
    // Column-major C [m, n] = op(A) op(B) is row-major C^T [n, m] = op(B)^T op(A)^T: B is the row-major left
    // operand ([n, k] as stored when tb == N), A the right one.
    cm::cpu::gemm(Cb, ldc, Bb, ldb, Ab, lda, n, m, k, !tb_n, !ta_n, alpha, beta);
  }
  return CUBLAS_STATUS_SUCCESS;
}

}  // namespace

cublasStatus_t cublasGemmEx(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                            const void* alpha, const void* A, cudaDataType_t at, int lda, const void* B,
                            cudaDataType_t bt, int ldb, const void* beta, void* C, cudaDataType_t ct, int ldc,
                            cublasComputeType_t compute, cublasGemmAlgo_t algo) {
  return gemm_batched(h, ta, tb, m, n, k, alpha, A, at, lda, 0, B, bt, ldb, 0, beta, C, ct, ldc, 0, 1, compute, algo,
                      "cublasGemmEx");
}
cublasStatus_t cublasGemmEx_64(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int64_t m, int64_t n,
                               int64_t k, const void* alpha, const void* A, cudaDataType_t at, int64_t lda,
                               const void* B, cudaDataType_t bt, int64_t ldb, const void* beta, void* C,
                               cudaDataType_t ct, int64_t ldc, cublasComputeType_t compute, cublasGemmAlgo_t algo) {
  return gemm_batched(h, ta, tb, m, n, k, alpha, A, at, lda, 0, B, bt, ldb, 0, beta, C, ct, ldc, 0, 1, compute, algo,
                      "cublasGemmEx_64");
}
cublasStatus_t cublasGemmStridedBatchedEx(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n,
                                          int k, const void* alpha, const void* A, cudaDataType_t at, int lda,
                                          long long sa, const void* B, cudaDataType_t bt, int ldb, long long sb,
                                          const void* beta, void* C, cudaDataType_t ct, int ldc, long long sc,
                                          int batch, cublasComputeType_t compute, cublasGemmAlgo_t algo) {
  return gemm_batched(h, ta, tb, m, n, k, alpha, A, at, lda, sa, B, bt, ldb, sb, beta, C, ct, ldc, sc, batch, compute,
                      algo, "cublasGemmStridedBatchedEx");
}
cublasStatus_t cublasGemmStridedBatchedEx_64(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int64_t m,
                                             int64_t n, int64_t k, const void* alpha, const void* A,
                                             cudaDataType_t at, int64_t lda, long long sa, const void* B,
                                             cudaDataType_t bt, int64_t ldb, long long sb, const void* beta, void* C,
                                             cudaDataType_t ct, int64_t ldc, long long sc, int64_t batch,
                                             cublasComputeType_t compute, cublasGemmAlgo_t algo) {
  return gemm_batched(h, ta, tb, m, n, k, alpha, A, at, lda, sa, B, bt, ldb, sb, beta, C, ct, ldc, sc, batch, compute,
                      algo, "cublasGemmStridedBatchedEx_64");
}

cublasStatus_t cublasSaxpy_64(cublasHandle_t h, int64_t n, const float* alpha, const float* x, int64_t incx, float* y,
                              int64_t incy) {
  if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (!alpha) return CUBLAS_STATUS_INVALID_VALUE;
  if (cm_emu::capturing(h->stream)) {  // recorded, as gemm_batched does
    struct Rec {
      cublasHandle_t h;
      int64_t n;
      float a;
      const float* alpha_p;
      const float* x;
      int64_t incx;
      float* y;
      int64_t incy;
      static void replay(void* p) {
        Rec* r = static_cast<Rec*>(p);
        cublasSaxpy_64(r->h, r->n, r->h->pointer_mode == CUBLAS_POINTER_MODE_HOST ? &r->a : r->alpha_p, r->x,
                       r->incx, r->y, r->incy);
      }
      static void destroy(void* p) { delete static_cast<Rec*>(p); }
    };
    auto* r = new Rec{h, n, 0.f, alpha, x, incx, y, incy};
    if (h->pointer_mode == CUBLAS_POINTER_MODE_HOST) std::memcpy(&r->a, alpha, 4);
    cm_emu::record_launch(h->stream, &Rec::replay, &Rec::destroy, r);
    return CUBLAS_STATUS_SUCCESS;
  }
  if (n <= 0) return CUBLAS_STATUS_SUCCESS;
  if (incx == 0 || incy == 0) return CUBLAS_STATUS_INVALID_VALUE;
  float a;
  if (h->pointer_mode == CUBLAS_POINTER_MODE_DEVICE && !on_device(alpha, 1, "alpha", "cublasSaxpy"))
    return CUBLAS_STATUS_EXECUTION_FAILED;
  std::memcpy(&a, alpha, 4);
  const int64_t ax = incx < 0 ? -incx : incx, ay = incy < 0 ? -incy : incy;
  const float* x0 = incx < 0 ? x - (n - 1) * ax : x;
  float* y0 = incy < 0 ? y - (n - 1) * ay : y;
  if (!on_device(x0, (n - 1) * ax + 1, "x", "cublasSaxpy") || !on_device(y0, (n - 1) * ay + 1, "y", "cublasSaxpy"))
    return CUBLAS_STATUS_EXECUTION_FAILED;
  const int64_t sx = incx < 0 ? (n - 1) * ax : 0, sy = incy < 0 ? (n - 1) * ay : 0;
  for (int64_t i = 0; i < n; ++i) {  // one fused multiply-add per element, as the device computes it
    float& yi = y0[sy + i * incy];
    yi = std::fma(a, x0[sx + i * incx], yi);
  }
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasSaxpy(cublasHandle_t h, int n, const float* alpha, const float* x, int incx, float* y,
                           int incy) {
  return cublasSaxpy_64(h, n, alpha, x, incx, y, incy);
}
