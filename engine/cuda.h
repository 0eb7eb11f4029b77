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

#include "engine/rng.h"

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

// True in a CUDA_EMU=1 build: the CUDA code runs on the CPU-hosted emulator of emu/ (README, "Testing CUDA without a
// GPU"). Tests shrink shapes that only cost time there; nothing else may depend on it.
constexpr bool emulated() {
#if defined(CM_CUDA_EMU)
  return true;
#else
  return false;
#endif
}

// Grid caps of the launchers (kernels/cuda/): past them, grid-stride loops take more turns. Under the emulator they
// are 256 times smaller, so that the tests reach a loop's second turn and its tail at sizes a CPU runs in seconds;
// the loops are the same code. kGridCap: blocks of an element loop or of block-per-row kernels (warp-per-row
// kernels: kGridCap blocks of 4 warps); kGridCapY: gridDim.y of binary_rows; kColumnCap: blocks of column sums.
constexpr int64_t kGridCap = emulated() ? int64_t(1) << 8 : int64_t(1) << 16;
constexpr int64_t kGridCapY = emulated() ? 255 : 65535;
constexpr int64_t kColumnCap = emulated() ? 16 : 4096;

// ---------------------------------------------------------------- bad indices found on the device
// Kernels that take indices (index_select, index_add, gather, scatter_add, embedding, cross-entropy targets) check
// each one against its bound themselves, so no op waits for a check before launching. A bad index is never used
// (a gather writes 0, an add skips it, a target adds no loss), and the first one is recorded in a small device
// record. The host learns of it at the next read-out of device values (copy_to_host brings the record back in the
// same wait), or right after the kernel with CM_CUDA_SYNC=1: either throws cm::Error naming the op, the index, its
// position and the bound, and clears the record. Results computed since then are not to be trusted: the
// exception stops whatever was going on (train_lm reads its losses at every logged step).
// Dispatch: the dispatch plan's out-of-range expert ids (index = how many, position -1). GroupSelect: a node of the
// group-limited selection with fewer than k selectable children (index = level, position = node, bound = k).
enum class IndexOp : int32_t {
  None = 0, IndexSelect, IndexAdd, Gather, ScatterAdd, Embedding, CrossEntropy, Dispatch, GroupSelect
};
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

// ---------------------------------------------------------------- CUDA graphs
// A Graph records the work a piece of host code issues on stream() once (capture) and replays it (replay), without
// the host code: one launch for a whole training step (train_lm --cuda_graph). What the replay computes is what
// the capture recorded: the same kernels, with the same arguments, on the same addresses. So:
//   - Memory: while capturing, the caching allocator serves every request from a pool of the graph's own (fresh
//     cudaMalloc blocks, handed out and reused in stream order as usual). Those blocks never go back to the
//     general cache while the graph lives, not even when their tensors are freed: a replay writes into them.
//     Tensors made before the capture (parameters, optimizer moments, input buffers) keep their addresses.
//   - Values that change between replays (the batch, the learning rate, the step count) must live in device
//     memory made before the capture and be written there before each replay (upload() is stream-ordered).
//   - Nothing may wait for the host or read from it while capturing: a device-to-host copy, sync() and upload()
//     throw cm::Error naming what was attempted; the capture is then abandoned (capture_abort, or ~Graph).
class Graph {
 public:
  Graph() = default;
  ~Graph();
  Graph(const Graph&) = delete;
  Graph& operator=(const Graph&) = delete;
  void capture_begin();  // stream() records from here
  void capture_end();    // stops recording and instantiates the graph
  void capture_abort();  // stops recording, drops what was recorded (after an error during the capture)
  void replay();         // launches the recorded work on stream(); returns without waiting
  bool ready() const { return exec_ != nullptr; }

  // Random draws in a captured step (dropout): bind the generator before capture_begin. Draws from it while
  // capturing take their offsets relative to a device copy of its offset at the start of the step, which replay()
  // writes from the host generator and then advances the host generator by what the capture drew: each replay
  // draws what the uncaptured step would have drawn. capture_end() puts the generator back where the capture found
  // it (the capture ran nothing). A draw from another generator while capturing is refused (its masks would repeat).
  void bind_generator(Generator* g);
  // For an op drawing `offset` from g: not capturing, false (use offset as it is); capturing, true with *base (device
  // u64 [1]) and *rel so that the kernel uses *base + rel. Throws for a generator not bound to the capturing graph.
  static bool draw_base(const Generator& g, uint64_t offset, const uint64_t** base, uint64_t* rel);

 private:
  cudaGraph_t graph_ = nullptr;
  cudaGraphExec_t exec_ = nullptr;
  int pool_ = 0;  // the allocator pool of this graph (0: none yet)
  bool capturing_ = false;
  Generator* gen_ = nullptr;      // bound generator, or null
  uint64_t* gen_base_ = nullptr;  // [1] on the device: the generator's offset at the start of the step
  uint64_t gen_start_ = 0;        // the generator's offset when the capture began
  uint64_t gen_draws_ = 0;        // counters the captured step draws
};
bool capturing();  // stream() is being captured

// ---------------------------------------------------------------- small device helpers used by the engine
// y [n] += alpha * x [n] (cuBLAS axpy: elementwise, deterministic). Gradient accumulation on the device.
void axpy(float* y, const float* x, float alpha, int64_t n);

}  // namespace cm::cuda

#endif  // CM_CUDA
