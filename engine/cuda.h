// The CUDA runtime as the engine sees it: checked calls, the device, the one stream every kernel runs on, the
// cuBLAS handle and its precision setting, and the caching allocator with its statistics.
// Only CUDA builds compile this (every includer guards it with `#if CM_CUDA`); .cpp files may include it too,
// since the Makefile puts the toolkit's include directory on their path in CUDA builds.
//
// Ordering model: all device work (kernels, cuBLAS, device-to-device copies) is issued on stream(), in program
// order. That is what makes the caching allocator safe without events: a block freed by the host is only reused
// by work issued later on the same stream, which runs after every earlier use of the block has finished.
// Device-to-host copies synchronise the stream (the host reads the result right after), and so does sync().
// Host-to-device copies (cuda_copy, upload) do not: the bytes go through a pinned staging ring (see upload), so the
// host buffer may still be freed as soon as the call returns. engine/host_sync.h counts every wait.
//
// Traps:
//   - Kernel launches report configuration errors at once, but faults inside a kernel (a bad address) only at the
//     next synchronising call, which then names the wrong statement. Set CM_CUDA_SYNC=1 in the environment to
//     synchronise after every launch while hunting such a fault: slow, but the error names its kernel.
//   - No CUDA call is made before cuda_device_present() has said yes: on a machine with the toolkit but no driver
//     the first runtime call fails with error 35 (cudaErrorInsufficientDriver), which means "no device".
#pragma once
#if CM_CUDA
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace cm::cuda {

// ---------------------------------------------------------------- checked calls
// cudaCheck(cudaMemcpyAsync(...)): throws cm::Error("CUDA error 700 (an illegal memory access ...) in
// `cudaMemcpyAsync(...)` at engine/cuda.cu:123"). cublasCheck does the same for cublasStatus_t.
[[noreturn]] void fail_cuda(cudaError_t err, const char* stmt, const char* file, int line);
[[noreturn]] void fail_cublas(cublasStatus_t st, const char* stmt, const char* file, int line);
#define cudaCheck(stmt)                                                                   \
  do {                                                                                    \
    cudaError_t cm_err_ = (stmt);                                                         \
    if (cm_err_ != cudaSuccess) ::cm::cuda::fail_cuda(cm_err_, #stmt, __FILE__, __LINE__); \
  } while (0)
#define cublasCheck(stmt)                                                                           \
  do {                                                                                              \
    cublasStatus_t cm_st_ = (stmt);                                                                 \
    if (cm_st_ != CUBLAS_STATUS_SUCCESS) ::cm::cuda::fail_cublas(cm_st_, #stmt, __FILE__, __LINE__); \
  } while (0)
// After every kernel launch: launch-configuration errors now; with CM_CUDA_SYNC=1, execution errors too.
void check_launch(const char* kernel, const char* file, int line);
bool sync_each_launch();  // CM_CUDA_SYNC is set (and not 0)
#define cudaCheckLaunch(kernel) ::cm::cuda::check_launch(kernel, __FILE__, __LINE__)

// ---------------------------------------------------------------- bad indices found on the device
// Kernels that take indices (index_select, index_add, gather, scatter_add, embedding, cross-entropy targets) check
// each one against its bound themselves, so no op waits for a check before launching. A bad index is never used
// (a gather writes 0, an add skips it, a target adds no loss), and the first one is recorded in a small device
// record. The host learns of it at the next read-out of device values (copy_to_host brings the record back in the
// same wait), or right after the kernel with CM_CUDA_SYNC=1: either throws cm::Error naming the op, the index, its
// position and the bound, and clears the record. Results computed since then are not to be trusted: the
// exception stops whatever was going on (train_lm reads its losses at every logged step).
enum class IndexOp : int32_t { None = 0, IndexSelect, IndexAdd, Gather, ScatterAdd, Embedding, CrossEntropy };
int64_t* index_error_record();  // [4] on the device: op (IndexOp), index, position, bound; all 0 when clean
void check_index_errors();      // one copy and one wait; throws if a kernel recorded a bad index

// ---------------------------------------------------------------- device, stream, handles
// Created on first use (device 0 of those CUDA_VISIBLE_DEVICES shows); each throws cm::Error when no device.
cudaStream_t stream();
cublasHandle_t cublas();
const cudaDeviceProp& props();
void sync();  // waits for all work on stream(); reports any pending kernel fault
// dst (host) <- src (device), nbytes, on stream(); returns when dst holds the values. Every device-to-host copy of
// the engine and the kernels goes through here or cuda_copy, so that engine/host_sync.h counts it.
void copy_to_host(void* dst, const void* src, size_t nbytes);

// Matrix-product precision for cuda::gemm*. FP32 (the default) is IEEE fp32 throughout. TF32 rounds the inputs to
// 10-bit mantissas on the tensor cores (fp32 accumulation); BF16 rounds them to bf16 (8-bit mantissas). Both are
// opt-in until their accuracy is measured on the model (DESIGN.md section 6). Inputs and outputs stay f32.
enum class MatmulPrecision { FP32, TF32, BF16 };
void set_matmul_precision(MatmulPrecision p);
MatmulPrecision matmul_precision();

// ---------------------------------------------------------------- caching allocator
// Blocks come from cudaMalloc once and are kept: a freed block goes to a free list keyed by its (rounded) size and
// serves a later request of up to the same size and at least half of it. After the first training step every
// request finds a block, so the steady state makes no cudaMalloc and no cudaFree (cudaFree synchronises the whole
// device). When cudaMalloc runs out of memory the free lists are released and the call retried once.
// Rounding: up to 1 MiB, a multiple of 512 bytes; above, a multiple of 2 MiB.
struct MemStats {
  size_t in_use = 0;      // bytes in blocks held by live tensors (rounded sizes)
  size_t peak = 0;        // highest in_use since start or reset_peak()
  size_t reserved = 0;    // bytes obtained from cudaMalloc and not yet returned (in_use + cached)
  int64_t mallocs = 0;    // cudaMalloc calls so far: flat from step to step in a steady state
  int64_t frees = 0;      // cudaFree calls so far (empty_cache, out-of-memory retries)
  int64_t requests = 0;   // allocations served (from the cache or not)
};
MemStats mem_stats();
void reset_peak();
void empty_cache();  // returns every cached (unused) block to the driver

void* allocate(size_t nbytes);  // nbytes > 0; 256-byte aligned
void deallocate(void* p);       // p from allocate, or nullptr

// dst (device) <- src (host), nbytes, queued on stream() without waiting for it: src is copied into a pinned
// staging ring first, so the caller may free it at once. Uploads over 2 MiB wait for their copy instead.
void upload(void* dst, const void* src, size_t nbytes);

// ---------------------------------------------------------------- small device helpers used by the engine
// y [n] += alpha * x [n] (cuBLAS axpy: elementwise, deterministic). Gradient accumulation on the device.
void axpy(float* y, const float* x, float alpha, int64_t n);

}  // namespace cm::cuda

#endif  // CM_CUDA
