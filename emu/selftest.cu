// The emulator's own tests (suite "emu", CUDA_EMU=1 builds only): each property the emulator claims is shown to
// hold on a kernel that respects it and to be reported on one that breaks it. Kernels here are deliberately small.
#include <doctest/doctest.h>

#include <cstring>
#include <vector>

#include "engine/cuda.h"

namespace {

// Restores the environment's schedule when a case changes it.
struct ModeGuard {
  cm_emu::Mode saved = cm_emu::mode();
  ModeGuard(int schedule, uint64_t seed, bool strict) { cm_emu::set_mode(schedule, seed, strict); }
  ~ModeGuard() { cm_emu::set_mode(saved.schedule, saved.seed, saved.strict); }
};

template <class T>
T* dalloc(size_t n) {
  void* p = nullptr;
  REQUIRE(cudaMalloc(&p, n * sizeof(T)) == cudaSuccess);
  return (T*)p;
}
template <class T>
std::vector<T> down(const T* d, size_t n) {
  std::vector<T> h(n);
  REQUIRE(cudaMemcpy(h.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost) == cudaSuccess);
  return h;
}

__device__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
// Block sum with both barriers (first_barrier) or without the first one: then a warp that runs ahead into the
// next call overwrites sh[warp] before slower warps have read it (a write-after-read race).
__device__ float block_sum(float v, float* sh, bool first_barrier) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nw = blockDim.x / 32;
  v = warp_sum(v);
  if (first_barrier) __syncthreads();
  if (lane == 0) sh[warp] = v;
  __syncthreads();
  return warp_sum(lane < nw ? sh[lane] : 0.f);
}
__global__ void two_sums_kernel(float* out, bool first_barrier) {
  __shared__ float sh[32];
  const float a = block_sum((float)threadIdx.x, sh, first_barrier);
  const float b = block_sum(1.f, sh, first_barrier);
  if (threadIdx.x == 0) {
    out[2 * blockIdx.x] = a;
    out[2 * blockIdx.x + 1] = b;
  }
}

bool two_sums_right(bool first_barrier) {
  const int blocks = 4, threads = 256;
  float* d = dalloc<float>(2 * blocks);
  two_sums_kernel<<<blocks, threads>>>(d, first_barrier);
  REQUIRE(cudaGetLastError() == cudaSuccess);
  std::vector<float> h = down(d, 2 * blocks);
  cudaFree(d);
  bool ok = true;
  for (int b = 0; b < blocks; ++b) ok = ok && h[2 * b] == 255.f * 256.f / 2 && h[2 * b + 1] == 256.f;
  return ok;
}

// Per block of 96 threads, three rounds of __syncthreads_count / _and / _or on thread-dependent predicates (the _or's
// on the _count's answer); thread 0 writes each round's answers.
__global__ void vote_kernel(int* out) {
  for (int round = 0; round < 3; ++round) {
    const int c = __syncthreads_count((int)threadIdx.x % (round + 2) == 0);
    const int all = __syncthreads_and((int)threadIdx.x < 96 - round);
    const int any = __syncthreads_or((int)threadIdx.x == 95 - c % 7);
    if (threadIdx.x == 0) {
      out[blockIdx.x * 9 + round * 3] = c;
      out[blockIdx.x * 9 + round * 3 + 1] = all;
      out[blockIdx.x * 9 + round * 3 + 2] = any;
    }
  }
}

}  // namespace

TEST_SUITE("emu") {

TEST_CASE("emu: __syncthreads_count, _and and _or count the whole block, every round, under every schedule") {
  int* d = dalloc<int>(2 * 9);
  for (int sched = 0; sched < 3; ++sched) {
    ModeGuard guard(sched, 7, true);
    vote_kernel<<<2, 96>>>(d);
    REQUIRE(cudaGetLastError() == cudaSuccess);
    const std::vector<int> h = down(d, 2 * 9);
    // Round r: threads with tid % (r + 2) == 0 count (48, 32, 24 of 96); all < 96 - r holds only in round 0; the
    // one thread 95 - c % 7 exists in every round.
    const std::vector<int> want = {48, 1, 1, 32, 0, 1, 24, 0, 1};
    CHECK(std::vector<int>(h.begin(), h.begin() + 9) == want);
    CHECK(std::vector<int>(h.begin() + 9, h.end()) == want);
  }
  cudaFree(d);
}

TEST_CASE("emu: a block reduction is right under every schedule; without its first barrier only warp-priority "
          "exposes the race") {
  for (int sched = 0; sched < 3; ++sched)
    for (uint64_t seed = 1; seed <= 3; ++seed) {
      CAPTURE(sched);
      CAPTURE(seed);
      ModeGuard g(sched, seed, true);
      CHECK(two_sums_right(true));
      if (sched == 0) CHECK(two_sums_right(false));  // FIFO: every warp reads before any warp runs ahead
      if (sched == 2) CHECK_FALSE(two_sums_right(false));
    }
}

namespace {
__global__ void early_exit_kernel(int* out) {
  if (threadIdx.x == 5) return;  // skips the barrier below
  __syncthreads();
  out[threadIdx.x] = 1;
}
__global__ void split_barrier_kernel(int* out) {
  if (threadIdx.x < 32) __syncthreads();
  else __syncthreads();
  out[threadIdx.x] = 1;
}
__global__ void divergent_shfl_kernel(int* out) {
  int v = threadIdx.x;
  if (threadIdx.x % 2) v = __shfl_xor_sync(0xffffffffu, v, 1);
  else v = __shfl_xor_sync(0xffffffffu, v, 1);
  out[threadIdx.x] = v;
}
__global__ void deadlock_kernel(int* out) {
  if (threadIdx.x < 16) __syncthreads();  // waits for lanes 16..31, which wait for lanes 0..15
  else __syncwarp();
  out[threadIdx.x] = 1;
}
__global__ void exited_lane_kernel(int* out) {
  if (threadIdx.x == 3) return;
  out[threadIdx.x] = __shfl_sync(0xffffffffu, (int)threadIdx.x, 0);  // mask names the exited lane 3
}
}  // namespace

TEST_CASE("emu: barriers and warp collectives that the hardware does not promise are reported") {
  int* d = dalloc<int>(64);
  (void)cudaGetLastError();
  early_exit_kernel<<<1, 64>>>(d);
  CHECK(cudaGetLastError() == cudaErrorLaunchFailure);
  split_barrier_kernel<<<1, 64>>>(d);
  CHECK(cudaGetLastError() == cudaErrorLaunchFailure);
  divergent_shfl_kernel<<<1, 32>>>(d);
  CHECK(cudaGetLastError() == cudaErrorLaunchFailure);
  deadlock_kernel<<<1, 32>>>(d);
  CHECK(cudaGetLastError() == cudaErrorLaunchFailure);
  exited_lane_kernel<<<1, 32>>>(d);
  CHECK(cudaGetLastError() == cudaErrorLaunchFailure);
  CHECK(cudaDeviceSynchronize() == cudaSuccess);  // reported once, not sticky
  {
    ModeGuard lenient(cm_emu::mode().schedule, cm_emu::mode().seed, false);  // sm_70+ leniency
    split_barrier_kernel<<<1, 64>>>(d);
    CHECK(cudaGetLastError() == cudaSuccess);
    divergent_shfl_kernel<<<1, 32>>>(d);
    CHECK(cudaGetLastError() == cudaSuccess);
    std::vector<int> h = down(d, 32);
    for (int i = 0; i < 32; ++i) CHECK(h[(size_t)i] == (i ^ 1));
    deadlock_kernel<<<1, 32>>>(d);  // a deadlock stays one
    CHECK(cudaGetLastError() == cudaErrorLaunchFailure);
  }
  cudaFree(d);
}

namespace {
__global__ void shuffles_kernel(long long* out, int width) {
  const int lane = threadIdx.x;
  const long long v = (long long)lane * 1000000007LL;  // 64-bit values
  out[0 * 32 + lane] = __shfl_sync(0xffffffffu, v, 31 - lane, width);
  out[1 * 32 + lane] = __shfl_up_sync(0xffffffffu, v, 3, width);
  out[2 * 32 + lane] = __shfl_down_sync(0xffffffffu, v, 5, width);
  out[3 * 32 + lane] = __shfl_xor_sync(0xffffffffu, v, 9, width);
  out[4 * 32 + lane] = __ballot_sync(0xffffffffu, lane % 3 == 0);
  out[5 * 32 + lane] = __match_any_sync(0xffffffffu, lane % 4);
  out[6 * 32 + lane] = __shfl_sync(0xffffffffu, (float)lane + 0.5f, lane + 1, width) == (float)((lane / width) * width + (lane + 1) % width) + 0.5f;
}
}  // namespace

TEST_CASE("emu: shuffles (index, up, down, xor; widths; 64-bit), ballot and match_any follow the PTX rules") {
  long long* d = dalloc<long long>(7 * 32);
  for (int width : {32, 16, 8}) {
    CAPTURE(width);
    shuffles_kernel<<<1, 32>>>(d, width);
    REQUIRE(cudaGetLastError() == cudaSuccess);
    std::vector<long long> h = down(d, 7 * 32);
    for (int lane = 0; lane < 32; ++lane) {
      CAPTURE(lane);
      const int seg = lane / width * width, l = lane % width;
      auto val = [](int src) { return (long long)src * 1000000007LL; };
      CHECK(h[(size_t)(0 * 32 + lane)] == val(seg + (31 - lane) % width));
      CHECK(h[(size_t)(1 * 32 + lane)] == (l >= 3 ? val(lane - 3) : val(lane)));
      CHECK(h[(size_t)(2 * 32 + lane)] == (l + 5 < width ? val(lane + 5) : val(lane)));
      const int x = lane ^ 9;
      CHECK(h[(size_t)(3 * 32 + lane)] == (x >= seg && x < seg + width ? val(x) : val(lane)));
      CHECK(h[(size_t)(4 * 32 + lane)] == 0x49249249LL);
      CHECK(h[(size_t)(5 * 32 + lane)] == (long long)(0x11111111u << (lane % 4)));
      CHECK(h[(size_t)(6 * 32 + lane)] == 1);
    }
  }
  cudaFree(d);
}

namespace {
__global__ void shared_carry_kernel(unsigned* out) {
  __shared__ unsigned s;
  if (threadIdx.x == 0) {
    out[blockIdx.x] = s;  // read before any write in this block: must not see the previous block's value
    s = 42;
  }
}
__global__ void dynamic_smem_kernel(unsigned* out) {
  extern __shared__ unsigned dyn[];
  if (threadIdx.x == 0) {
    out[blockIdx.x] = dyn[1];
    dyn[1] = 7;
  }
}
__global__ void convert_kernel(int* out, const float* in) { out[threadIdx.x] = __float2int_rz(in[threadIdx.x]); }
__global__ void nothing_kernel(int* out) { out[0] = 1; }
}  // namespace

TEST_CASE("emu: shared memory is poisoned for every block, static and dynamic") {
  unsigned* d = dalloc<unsigned>(3);
  shared_carry_kernel<<<3, 32>>>(d);
  REQUIRE(cudaGetLastError() == cudaSuccess);
  for (unsigned v : down(d, 3)) CHECK(v == 0xffffffffu);
  dynamic_smem_kernel<<<3, 32, 64>>>(d);
  REQUIRE(cudaGetLastError() == cudaSuccess);
  for (unsigned v : down(d, 3)) CHECK(v == 0xffffffffu);
  cudaFree(d);
}

TEST_CASE("emu: __float2int_rz has PTX semantics (NaN gives 0, out of range saturates)") {
  const std::vector<float> in = {1.9f, -1.9f, NAN, 3e9f, -3e9f, INFINITY, -INFINITY, -0.0f};
  const std::vector<int> want = {1, -1, 0, 2147483647, -2147483647 - 1, 2147483647, -2147483647 - 1, 0};
  float* din = dalloc<float>(in.size());
  int* dout = dalloc<int>(in.size());
  REQUIRE(cudaMemcpy(din, in.data(), in.size() * 4, cudaMemcpyHostToDevice) == cudaSuccess);
  convert_kernel<<<1, (unsigned)in.size()>>>(dout, din);
  REQUIRE(cudaGetLastError() == cudaSuccess);
  CHECK(down(dout, in.size()) == want);
  cudaFree(din);
  cudaFree(dout);
}

TEST_CASE("emu: launch limits as on sm_90, and pointer arguments must be device memory") {
  int* d = dalloc<int>(1);
  (void)cudaGetLastError();
  nothing_kernel<<<1, 1025>>>(d);
  CHECK(cudaGetLastError() == cudaErrorInvalidConfiguration);
  nothing_kernel<<<0, 32>>>(d);
  CHECK(cudaGetLastError() == cudaErrorInvalidConfiguration);
  nothing_kernel<<<dim3(1, 65536), 32>>>(d);
  CHECK(cudaGetLastError() == cudaErrorInvalidConfiguration);
  nothing_kernel<<<dim3(1, 1, 65536), 32>>>(d);
  CHECK(cudaGetLastError() == cudaErrorInvalidConfiguration);
  nothing_kernel<<<dim3(1, 65535), dim3(1, 1, 64)>>>(d);
  CHECK(cudaGetLastError() == cudaSuccess);
  nothing_kernel<<<1, dim3(1, 1, 65)>>>(d);
  CHECK(cudaGetLastError() == cudaErrorInvalidConfiguration);
  dynamic_smem_kernel<<<1, 32, 48 * 1024 + 4>>>((unsigned*)d);
  CHECK(cudaGetLastError() == cudaErrorInvalidValue);
  dynamic_smem_kernel<<<1, 32, 48 * 1024>>>((unsigned*)d);
  CHECK(cudaGetLastError() == cudaSuccess);
  int host = 0;
  nothing_kernel<<<1, 1>>>(&host);
  CHECK(cudaGetLastError() == cudaErrorInvalidValue);
  CHECK(host == 0);  // not run
  nothing_kernel<<<1, 1>>>(d + 2);  // past the end of a one-int block (d + 1 would be one past the end: allowed)
  CHECK(cudaGetLastError() == cudaErrorInvalidValue);
  CHECK(cudaMemcpy(&host, &host, 4, cudaMemcpyHostToDevice) == cudaErrorInvalidValue);
  CHECK(cudaMemcpy(d, &host, 8, cudaMemcpyHostToDevice) == cudaErrorInvalidValue);  // 8 bytes into 4
  (void)cudaGetLastError();
  cudaFree(d);
  nothing_kernel<<<1, 1>>>(d);  // freed
  CHECK(cudaGetLastError() == cudaErrorInvalidValue);
}

TEST_CASE("emu: cuBLAS GemmEx is the column-major product, checks its arguments, and TF32/BF16 round inputs") {
  cublasHandle_t h;
  REQUIRE(cublasCreate(&h) == CUBLAS_STATUS_SUCCESS);
  const int m = 3, n = 2, k = 4;
  std::vector<float> A(m * k), B(k * n);  // column-major, lda = m, ldb = k
  for (int i = 0; i < m * k; ++i) A[(size_t)i] = (float)(i + 1);
  for (int i = 0; i < k * n; ++i) B[(size_t)i] = (float)(2 * i - 3);
  float *dA = dalloc<float>(A.size()), *dB = dalloc<float>(B.size()), *dC = dalloc<float>(m * n);
  cudaMemcpy(dA, A.data(), A.size() * 4, cudaMemcpyHostToDevice);
  cudaMemcpy(dB, B.data(), B.size() * 4, cudaMemcpyHostToDevice);
  const float one = 1.f, zero = 0.f;
  REQUIRE(cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_N, m, n, k, &one, dA, CUDA_R_32F, m, dB, CUDA_R_32F, k, &zero, dC,
                       CUDA_R_32F, m, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT) == CUBLAS_STATUS_SUCCESS);
  std::vector<float> C = down(dC, m * n);
  for (int i = 0; i < m; ++i)
    for (int j = 0; j < n; ++j) {
      float s = 0;
      for (int p = 0; p < k; ++p) s += A[(size_t)(i + p * m)] * B[(size_t)(p + j * k)];
      CHECK(C[(size_t)(i + j * m)] == s);
    }
  // Transposed B: the same product from B^T stored [n, k] column-major (ldb = n).
  std::vector<float> Bt(n * k);
  for (int p = 0; p < k; ++p)
    for (int j = 0; j < n; ++j) Bt[(size_t)(j + p * n)] = B[(size_t)(p + j * k)];
  cudaMemcpy(dB, Bt.data(), Bt.size() * 4, cudaMemcpyHostToDevice);
  REQUIRE(cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_T, m, n, k, &one, dA, CUDA_R_32F, m, dB, CUDA_R_32F, n, &zero, dC,
                       CUDA_R_32F, m, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT) == CUBLAS_STATUS_SUCCESS);
  CHECK(down(dC, m * n) == C);
  // Argument checks.
  CHECK(cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_N, m, n, k, &one, dA, CUDA_R_32F, m - 1, dB, CUDA_R_32F, k, &zero, dC,
                     CUDA_R_32F, m, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT) == CUBLAS_STATUS_INVALID_VALUE);
  CHECK(cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_N, 0, 0, 0, &one, dA, CUDA_R_32F, 0, dB, CUDA_R_32F, 1, &zero, dC,
                     CUDA_R_32F, 1, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT) == CUBLAS_STATUS_INVALID_VALUE);
  CHECK(cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_N, m, n, -1, &one, dA, CUDA_R_32F, m, dB, CUDA_R_32F, k, &zero, dC,
                     CUDA_R_32F, m, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT) == CUBLAS_STATUS_INVALID_VALUE);
  CHECK(cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_N, m, n, k, &one, dA, CUDA_R_16BF, m, dB, CUDA_R_32F, k, &zero, dC,
                     CUDA_R_32F, m, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT) == CUBLAS_STATUS_NOT_SUPPORTED);
  CHECK(cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_N, m, n, k, &one, A.data(), CUDA_R_32F, m, dB, CUDA_R_32F, k, &zero,
                     dC, CUDA_R_32F, m, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT) == CUBLAS_STATUS_EXECUTION_FAILED);
  // 1 + 2^-12 survives fp32 but not TF32 (10 mantissa bits) or BF16 (7).
  const float x = 1.f + 1.f / 4096.f;
  cudaMemcpy(dA, &x, 4, cudaMemcpyHostToDevice);
  cudaMemcpy(dB, &one, 4, cudaMemcpyHostToDevice);
  for (auto [ct, want] : {std::pair{CUBLAS_COMPUTE_32F, x}, std::pair{CUBLAS_COMPUTE_32F_FAST_TF32, 1.f},
                          std::pair{CUBLAS_COMPUTE_32F_FAST_16BF, 1.f}}) {
    REQUIRE(cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_N, 1, 1, 1, &one, dA, CUDA_R_32F, 1, dB, CUDA_R_32F, 1, &zero, dC,
                         CUDA_R_32F, 1, ct, CUBLAS_GEMM_DEFAULT) == CUBLAS_STATUS_SUCCESS);
    CHECK(down(dC, 1)[0] == want);
  }
  cudaFree(dA);
  cudaFree(dB);
  cudaFree(dC);
  cublasDestroy(h);
}

namespace {
__global__ void add_one_kernel(float* x, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) x[i] += 1.f;
}
}  // namespace

TEST_CASE("emu: stream capture records launches and device copies; a graph replays them") {
  cudaStream_t s;
  REQUIRE(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking) == cudaSuccess);
  const int n = 100;
  float *a = dalloc<float>(n), *b = dalloc<float>(n);
  REQUIRE(cudaMemsetAsync(a, 0, n * 4, s) == cudaSuccess);
  REQUIRE(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal) == cudaSuccess);
  add_one_kernel<<<4, 32, 0, s>>>(a, n);
  REQUIRE(cudaMemcpyAsync(b, a, n * 4, cudaMemcpyDeviceToDevice, s) == cudaSuccess);
  float host[1];
  CHECK(cudaMemcpyAsync(host, a, 4, cudaMemcpyDeviceToHost, s) == cudaErrorStreamCaptureUnsupported);
  CHECK(cudaGetLastError() == cudaErrorStreamCaptureUnsupported);  // and cleared: later launches must not see it
  cudaGraph_t g;
  REQUIRE(cudaStreamEndCapture(s, &g) == cudaSuccess);
  CHECK(down(a, 1)[0] == 0.f);  // captured, not run
  cudaGraphExec_t e;
  REQUIRE(cudaGraphInstantiate(&e, g, 0) == cudaSuccess);
  REQUIRE(cudaGraphDestroy(g) == cudaSuccess);  // the executable keeps what it needs
  for (int r = 0; r < 3; ++r) REQUIRE(cudaGraphLaunch(e, s) == cudaSuccess);
  REQUIRE(cudaStreamSynchronize(s) == cudaSuccess);
  CHECK(down(a, n) == std::vector<float>(n, 3.f));
  CHECK(down(b, n) == std::vector<float>(n, 3.f));
  cudaGraphExecDestroy(e);
  cudaFree(a);
  cudaFree(b);
  cudaStreamDestroy(s);
}

TEST_CASE("emu: a copy from pinned memory is pending until the host waits past it; a write before is reported") {
  cudaStream_t s;
  REQUIRE(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking) == cudaSuccess);
  const int n = 64;
  float* h = nullptr;
  REQUIRE(cudaHostAlloc((void**)&h, n * 4, cudaHostAllocDefault) == cudaSuccess);
  float* d = dalloc<float>(n);
  cudaEvent_t e;
  REQUIRE(cudaEventCreate(&e) == cudaSuccess);
  for (int i = 0; i < n; ++i) h[i] = (float)i;
  // Waited for by its event: the host may write the source afterwards.
  REQUIRE(cudaMemcpyAsync(d, h, n * 4, cudaMemcpyHostToDevice, s) == cudaSuccess);
  REQUIRE(cudaEventRecord(e, s) == cudaSuccess);
  CHECK(cudaEventQuery(e) == cudaErrorNotReady);  // the slowest device: not before a wait
  CHECK(cudaGetLastError() == cudaErrorNotReady);
  REQUIRE(cudaEventSynchronize(e) == cudaSuccess);
  CHECK(cudaEventQuery(e) == cudaSuccess);
  h[0] = -1.f;
  CHECK(cudaStreamSynchronize(s) == cudaSuccess);
  // Written before any wait: the synchronisation reports it; the device got the bytes of the copy's time.
  REQUIRE(cudaMemcpyAsync(d, h, n * 4, cudaMemcpyHostToDevice, s) == cudaSuccess);
  REQUIRE(cudaEventRecord(e, s) == cudaSuccess);
  h[1] = -2.f;
  CHECK(cudaStreamSynchronize(s) == cudaErrorUnknown);
  CHECK(cudaGetLastError() == cudaErrorUnknown);
  CHECK(down(d, 2) == std::vector<float>{-1.f, 1.f});
  CHECK(cudaEventQuery(e) == cudaSuccess);  // the synchronisation reached it
  // cudaFreeHost waits for the copies from it, and reports a write made before.
  REQUIRE(cudaMemcpyAsync(d, h, n * 4, cudaMemcpyHostToDevice, s) == cudaSuccess);
  h[2] = -3.f;
  CHECK(cudaFreeHost(h) == cudaErrorUnknown);
  CHECK(cudaGetLastError() == cudaErrorUnknown);
  // Pageable memory: the copy has read it when the call returns.
  std::vector<float> pageable(n, 5.f);
  REQUIRE(cudaMemcpyAsync(d, pageable.data(), n * 4, cudaMemcpyHostToDevice, s) == cudaSuccess);
  pageable[0] = 6.f;
  CHECK(cudaStreamSynchronize(s) == cudaSuccess);
  CHECK(down(d, 1)[0] == 5.f);
  cudaEventDestroy(e);
  cudaFree(d);
  cudaStreamDestroy(s);
}

}  // TEST_SUITE("emu")
