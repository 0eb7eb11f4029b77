// The CUDA side of the engine: error reporting, lazy device/stream/cuBLAS setup, the caching allocator, and the
// memory hooks of engine/device.h (which engine/tensor.cpp calls). See engine/cuda.h for the ordering model.
#include "engine/cuda.h"

#include <atomic>
#include <cstring>
#include <vector>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <unordered_map>

#include "engine/check.h"
#include "engine/device.h"
#include "engine/host_sync.h"
#include "engine/ring.h"

namespace cm {

namespace cuda {

// ---------------------------------------------------------------- errors

void fail_cuda(cudaError_t err, const char* stmt, const char* file, int line) {
  // Clear the error so that a caller that catches cm::Error can go on (sticky errors - a kernel fault - stay:
  // the context is then unusable, which the next call will report again).
  (void)cudaGetLastError();
  fail("CUDA error ", (int)err, " (", cudaGetErrorName(err), ": ", cudaGetErrorString(err), ") in `", stmt,
       "` at ", file, ":", line);
}

void fail_cublas(cublasStatus_t st, const char* stmt, const char* file, int line) {
  fail("cuBLAS error ", (int)st, " (", cublasGetStatusName(st), ": ", cublasGetStatusString(st), ") in `", stmt,
       "` at ", file, ":", line);
}

namespace {
bool sync_after_launch() {
  static const bool on = [] {
    const char* e = std::getenv("CM_CUDA_SYNC");
    return e && e[0] && e[0] != '0';
  }();
  return on;
}
}  // namespace

bool sync_each_launch() { return sync_after_launch(); }

void check_launch(const char* kernel, const char* file, int line) {
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) fail("CUDA error ", (int)err, " (", cudaGetErrorString(err), ") launching ", kernel, " at ",
                               file, ":", line);
  if (sync_after_launch() && !capturing()) {  // a captured launch runs at replay: nothing to wait for now
    note_stream_sync();
    err = cudaStreamSynchronize(stream());
    if (err != cudaSuccess) {
      (void)cudaGetLastError();
      fail("CUDA error ", (int)err, " (", cudaGetErrorString(err), ") running ", kernel, " at ", file, ":", line);
    }
    check_index_errors();  // names the op of this very launch
  }
}

// ---------------------------------------------------------------- device, stream, handles

namespace {

struct Context {
  cudaStream_t stream = nullptr;
  cublasHandle_t cublas = nullptr;
  cudaDeviceProp props{};
  int64_t* index_error = nullptr;  // [4] on the device (see index_error_record)
};

// Created once, on first use, and never destroyed: tensors held by static objects may be freed after main()
// returns, and by then the CUDA runtime may be gone, so nothing here may call into it at exit.
Context& context() {
  static Context* ctx = nullptr;
  static std::once_flag once;
  std::call_once(once, [] {  // if this throws, the flag stays unset and the next call tries again
    CM_REQUIRE(cuda_device_present(), "no CUDA device is available (none found by the driver); use --device cpu");
    auto* c = new Context;
    cudaCheck(cudaSetDevice(0));
    cudaCheck(cudaGetDeviceProperties(&c->props, 0));
    // Non-blocking: our stream never waits for the legacy default stream, which nothing of ours uses.
    cudaCheck(cudaStreamCreateWithFlags(&c->stream, cudaStreamNonBlocking));
    cublasCheck(cublasCreate(&c->cublas));
    cublasCheck(cublasSetStream(c->cublas, c->stream));
    // Host pointers for alpha/beta; no atomics (results reproduce bit for bit, DESIGN.md section 6).
    cublasCheck(cublasSetPointerMode(c->cublas, CUBLAS_POINTER_MODE_HOST));
    cublasCheck(cublasSetAtomicsMode(c->cublas, CUBLAS_ATOMICS_NOT_ALLOWED));
    cudaCheck(cudaMalloc(&c->index_error, 4 * sizeof(int64_t)));
    cudaCheck(cudaMemsetAsync(c->index_error, 0, 4 * sizeof(int64_t), c->stream));
    ctx = c;
  });
  return *ctx;
}

std::atomic<int> g_precision{(int)MatmulPrecision::FP32};
std::atomic<bool> g_capturing{false};  // a Graph is recording stream()

// Nothing may wait for the stream or read host memory into it while it is recorded (engine/cuda.h, Graph).
void refuse_while_capturing(const char* what) {
  if (g_capturing.load(std::memory_order_relaxed))
    fail(what, " while a CUDA graph is being captured: a captured step must not wait for the device or read host "
               "memory (train_lm --cuda_graph needs a step with 0 host syncs)");
}

}  // namespace

bool capturing() { return g_capturing.load(std::memory_order_relaxed); }

cudaStream_t stream() { return context().stream; }
cublasHandle_t cublas() { return context().cublas; }
const cudaDeviceProp& props() { return context().props; }
void sync() {
  refuse_while_capturing("cuda::sync()");
  note_stream_sync();
  cudaCheck(cudaStreamSynchronize(stream()));
}

namespace {
// The record read back: throws naming what a kernel found, after clearing it (the next error is reported anew).
void raise_index_error(const int64_t rec[4]) {
  if (rec[0] == 0) return;
  cudaCheck(cudaMemsetAsync(context().index_error, 0, 4 * sizeof(int64_t), context().stream));
  static const char* const names[] = {"?", "index_select", "index_add", "gather", "scatter_add", "embedding",
                                      "cross_entropy", "dispatch_plan", "group_limited routing"};
  const int64_t op = rec[0] >= 1 && rec[0] <= 8 ? rec[0] : 0;
  if (op == (int64_t)IndexOp::Dispatch)
    fail("dispatch_plan: ", rec[1], " expert ids out of range [-1, ", rec[3],
         ") (found on the device; raised at the first read-out after it)");
  if (op == (int64_t)IndexOp::GroupSelect)
    fail("group_limited routing: level ", rec[1], " node ", rec[2], " has fewer than ", rec[3],
         " selectable children (found on the device; raised at the first read-out after it)");
  const char* what = op == (int64_t)IndexOp::Embedding ? "id" : op == (int64_t)IndexOp::CrossEntropy ? "target" : "index";
  fail(names[op], ": ", what, " ", rec[1], " (at position ", rec[2], ") is out of range [0, ", rec[3],
       ") (found on the device; the first bad index since the last read-out, CM_CUDA_SYNC=1 stops at its op)");
}
}  // namespace

int64_t* index_error_record() { return context().index_error; }

void check_index_errors() {
  refuse_while_capturing("an index check (a read-out)");
  int64_t rec[4] = {0, 0, 0, 0};
  note_d2h_copy();
  note_stream_sync();
  cudaCheck(cudaMemcpyAsync(rec, context().index_error, sizeof rec, cudaMemcpyDeviceToHost, stream()));
  cudaCheck(cudaStreamSynchronize(stream()));
  raise_index_error(rec);
}

void copy_to_host(void* dst, const void* src, size_t nbytes) {
  refuse_while_capturing("a device-to-host copy (a read-out of tensor values)");
  note_d2h_copy();
  note_stream_sync();
  // The index-error record comes back with the data, in the same wait: a bad index is reported at the first
  // read-out after it, whatever reads.
  int64_t rec[4] = {0, 0, 0, 0};
  cudaCheck(cudaMemcpyAsync(dst, src, nbytes, cudaMemcpyDeviceToHost, stream()));
  cudaCheck(cudaMemcpyAsync(rec, context().index_error, sizeof rec, cudaMemcpyDeviceToHost, stream()));
  cudaCheck(cudaStreamSynchronize(stream()));
  raise_index_error(rec);
}

void set_matmul_precision(MatmulPrecision p) { g_precision.store((int)p); }
MatmulPrecision matmul_precision() { return (MatmulPrecision)g_precision.load(); }

// ---------------------------------------------------------------- caching allocator

namespace {

struct Allocator {
  std::mutex mu;
  std::multimap<size_t, void*> cached;        // free blocks by size
  struct Live {
    size_t size;
    int pool;  // 0: the general cache; else the graph pool it returns to
  };
  std::unordered_map<void*, Live> live;       // blocks held by tensors
  // Graph pools (engine/cuda.h, Graph): free blocks of each live graph, by size. A block of a pool whose graph is
  // gone returns to the general cache.
  std::map<int, std::multimap<size_t, void*>> pools;
  int capture_pool = 0;  // while a capture runs, every request is served from this pool
  int next_pool = 1;
  MemStats st;
};

Allocator& allocator() {
  static Allocator* a = new Allocator;  // never destroyed, for the reason given at context()
  return *a;
}

constexpr size_t kSmall = size_t(1) << 20;      // 1 MiB
constexpr size_t kSmallRound = 512;
constexpr size_t kLargeRound = size_t(2) << 20;  // 2 MiB

size_t round_size(size_t n) {
  const size_t r = n <= kSmall ? kSmallRound : kLargeRound;
  return (n + r - 1) / r * r;
}

// Returns every cached block to the driver. Caller holds the lock. The stream is drained first: work issued
// before a block was freed may still be reading it.
void release_cached(Allocator& a) {
  if (a.cached.empty()) return;
  note_stream_sync();
  cudaCheck(cudaStreamSynchronize(stream()));
  for (auto& [size, p] : a.cached) {
    cudaCheck(cudaFree(p));
    a.st.reserved -= size;
    a.st.frees++;
  }
  a.cached.clear();
}

}  // namespace

void* allocate(size_t nbytes) {
  CM_CHECK(nbytes > 0, "zero-byte CUDA allocation");
  context();  // the device must exist before the first cudaMalloc
  const size_t size = round_size(nbytes);
  Allocator& a = allocator();
  std::lock_guard<std::mutex> lock(a.mu);
  a.st.requests++;
  void* p = nullptr;
  size_t got = 0;
  // Best fit among cached blocks, but never a block more than twice the request: a tiny tensor must not pin a
  // huge block that a later large request would have reused. While a graph is captured, its own pool's blocks.
  std::multimap<size_t, void*>& free_list = a.capture_pool ? a.pools[a.capture_pool] : a.cached;
  auto it = free_list.lower_bound(size);
  if (it != free_list.end() && it->first <= 2 * size) {
    p = it->second;
    got = it->first;
    free_list.erase(it);
  } else {
    cudaError_t err = cudaMalloc(&p, size);
    if (err == cudaErrorMemoryAllocation && !a.capture_pool) {  // releasing waits for the stream: not in a capture
      (void)cudaGetLastError();
      release_cached(a);
      err = cudaMalloc(&p, size);
    }
    if (err != cudaSuccess && err != cudaErrorMemoryAllocation) {
      // Not a lack of memory: usually a sticky error left by an earlier kernel fault (700, illegal address), which
      // cudaMalloc is only the first call to report. Name it as such, not as "out of memory".
      (void)cudaGetLastError();
      fail("CUDA error ", (int)err, " (", cudaGetErrorName(err), ": ", cudaGetErrorString(err), ") allocating ",
           nbytes, " bytes; if it names a kernel fault, an earlier kernel caused it (rerun with CM_CUDA_SYNC=1)");
    }
    if (err != cudaSuccess) {
      (void)cudaGetLastError();
      size_t free_b = 0, total_b = 0;
      (void)cudaMemGetInfo(&free_b, &total_b);
      (void)cudaGetLastError();
      fail("out of CUDA memory allocating ", nbytes, " bytes (", cudaGetErrorString(err), "); this process holds ",
           a.st.in_use, " bytes in tensors, ", a.st.reserved, " reserved; the device has ", free_b, " of ", total_b,
           " bytes free");
    }
    got = size;
    a.st.reserved += size;
    a.st.mallocs++;
  }
  a.live[p] = {got, a.capture_pool};
#if defined(CM_CUDA_EMU)
  // The rounded tail is poisoned: a read past the tensor is reported. Not in a graph's block: its replays use it
  // for every tensor the capture put there, of whatever size.
  cudaEmuSetValidRange(p, a.capture_pool ? got : nbytes, got);
#endif
  a.st.in_use += got;
  if (a.st.in_use > a.st.peak) a.st.peak = a.st.in_use;
  return p;
}

void deallocate(void* p) {
  // Called from Storage's destructor: must not throw and must not call the CUDA runtime (see context()).
  if (!p) return;
  Allocator& a = allocator();
  std::lock_guard<std::mutex> lock(a.mu);
  auto it = a.live.find(p);
  if (it == a.live.end()) {
    std::fprintf(stderr, "cm::cuda::deallocate: pointer %p was not allocated here; ignored\n", p);
    return;
  }
  const size_t size = it->second.size;
  a.st.in_use -= size;
  // A graph's block goes back to its pool; so does a block made before a capture and freed while it runs: the
  // graph's replays may use it, so no later eager tensor may get it.
  const int owner = it->second.pool ? it->second.pool : a.capture_pool;
  auto pool = owner ? a.pools.find(owner) : a.pools.end();
#if defined(CM_CUDA_EMU)
  // A cached block: any use of it is reported until it is handed out again. Not a graph's: its replays write it.
  cudaEmuSetValidRange(p, pool != a.pools.end() ? size : 0, size);
#endif
  if (pool != a.pools.end())
    pool->second.emplace(size, p);  // its graph's replays still write it: kept for that graph
  else
    a.cached.emplace(size, p);
  a.live.erase(it);
}

MemStats mem_stats() {
  Allocator& a = allocator();
  std::lock_guard<std::mutex> lock(a.mu);
  return a.st;
}

void reset_peak() {
  Allocator& a = allocator();
  std::lock_guard<std::mutex> lock(a.mu);
  a.st.peak = a.st.in_use;
}

void empty_cache() {
  if (!cuda_device_present()) return;
  Allocator& a = allocator();
  std::lock_guard<std::mutex> lock(a.mu);
  release_cached(a);
}

// ---------------------------------------------------------------- uploads through a pinned staging ring

namespace {

// Uploads (batches, routing plans, small tables) are copied on the host into a pinned ring buffer, and the copy to
// the device is queued from there: the host does not wait for the stream. The caller's buffer is free as soon as
// upload() returns (its bytes are in the ring). A region of the ring is written again only after the copy that read
// it has run: each upload records an event, and a new upload first waits for the events of the regions it
// overwrites (engine/ring.h) - normally long finished, since the ring holds many steps' uploads; a wait for a copy
// that has not run yet is counted as a stream synchronisation (engine/host_sync.h), one that has run costs and
// counts nothing. An upload larger than a quarter of the ring waits for its own copy instead.
// (Pageable memory cannot be used this way: CUDA only promises that an async copy from it "might be synchronous".)
constexpr size_t kRingBytes = size_t(8) << 20;

struct Ring {
  std::mutex mu;
  char* host = nullptr;                          // [kRingBytes] pinned
  StagingRing<cudaEvent_t> regions{kRingBytes};  // regions read by queued copies, each with its copy's event
  std::vector<cudaEvent_t> spare;                // recycled events
};

Ring& ring() {
  static Ring* r = [] {
    auto* x = new Ring;  // never destroyed, for the reason given at context()
    cudaCheck(cudaHostAlloc(reinterpret_cast<void**>(&x->host), kRingBytes, cudaHostAllocDefault));
    return x;
  }();
  return *r;
}

}  // namespace

void upload(void* dst, const void* src, size_t nbytes) {
  if (nbytes == 0) return;
  refuse_while_capturing("an upload from host memory");
  note_h2d_upload();
  cudaStream_t s = stream();
  if (nbytes > kRingBytes / 4) {  // large (initialisation, checkpoints): a plain copy that waits
    note_stream_sync();
    cudaCheck(cudaMemcpyAsync(dst, src, nbytes, cudaMemcpyHostToDevice, s));
    cudaCheck(cudaStreamSynchronize(s));
    return;
  }
  Ring& r = ring();
  std::lock_guard<std::mutex> lock(r.mu);
  // Wait for the copies that still read the region this one takes (or skips, wrapping: engine/ring.h). A copy
  // that has already run costs no wait (and counts none): usually all of them, the ring holding many steps.
  bool waited = false;
  const size_t n = (nbytes + 255) / 256 * 256;
  const size_t begin = r.regions.take(n, [&](cudaEvent_t done) {
    const cudaError_t q = cudaEventQuery(done);
    if (q == cudaErrorNotReady) {
      (void)cudaGetLastError();  // "not ready" is an answer, not an error
      if (!waited) note_stream_sync();
      waited = true;
      cudaCheck(cudaEventSynchronize(done));
    } else {
      cudaCheck(q);
    }
    r.spare.push_back(done);
  });
  std::memcpy(r.host + begin, src, nbytes);
  cudaCheck(cudaMemcpyAsync(dst, r.host + begin, nbytes, cudaMemcpyHostToDevice, s));
  cudaEvent_t ev;
  if (r.spare.empty()) {
    cudaCheck(cudaEventCreate(&ev));
  } else {
    ev = r.spare.back();
    r.spare.pop_back();
  }
  cudaCheck(cudaEventRecord(ev, s));
  r.regions.record(begin, n, ev);
}

// ---------------------------------------------------------------- graphs

namespace {
Graph* g_capturing_graph = nullptr;  // the graph capture_begin() started (g_capturing)
}  // namespace

void Graph::bind_generator(Generator* g) {
  CM_REQUIRE(!capturing_ && !exec_, "cuda::Graph: bind the generator before the capture");
  gen_ = g;
  if (!gen_base_) gen_base_ = static_cast<uint64_t*>(allocate(sizeof(uint64_t)));
}

bool Graph::draw_base(const Generator& g, uint64_t offset, const uint64_t** base, uint64_t* rel) {
  if (!capturing()) return false;
  Graph* cg = g_capturing_graph;
  CM_REQUIRE(cg && cg->gen_ == &g, "a random draw from a generator not bound to the CUDA graph being captured: its "
                                   "values would repeat at every replay (cuda::Graph::bind_generator)");
  *base = cg->gen_base_;
  *rel = offset - cg->gen_start_;
  return true;
}

void Graph::capture_begin() {
  CM_REQUIRE(!exec_ && !capturing_, "cuda::Graph: already captured (one capture per graph)");
  CM_REQUIRE(!capturing(), "cuda::Graph: another graph is being captured");
  cudaStream_t s = stream();
  if (gen_) gen_start_ = gen_->offset;
  {
    Allocator& a = allocator();
    std::lock_guard<std::mutex> lock(a.mu);
    pool_ = a.next_pool++;
    // The blocks the eager steps freed seed the graph's pool: the capture reuses them instead of holding a second
    // working set beside them for the rest of the run (its replays run after the work that freed them, in stream
    // order). Later eager work (evaluations) takes fresh blocks.
    std::multimap<size_t, void*>& pool = a.pools[pool_];
    pool.insert(a.cached.begin(), a.cached.end());
    a.cached.clear();
    a.capture_pool = pool_;
  }
  // Relaxed: the allocator may call cudaMalloc while the capture runs (it never frees or waits then).
  cudaError_t err = cudaStreamBeginCapture(s, cudaStreamCaptureModeRelaxed);
  if (err != cudaSuccess) {
    allocator().capture_pool = 0;
    cudaCheck(err);
  }
  capturing_ = true;
  g_capturing_graph = this;
  g_capturing.store(true);
}

namespace {
void stop_pool_capture() {
  Allocator& a = allocator();
  std::lock_guard<std::mutex> lock(a.mu);
  a.capture_pool = 0;
}
}  // namespace

void Graph::capture_end() {
  CM_REQUIRE(capturing_, "cuda::Graph: capture_end without capture_begin");
  capturing_ = false;
  g_capturing.store(false);
  g_capturing_graph = nullptr;
  stop_pool_capture();
  if (gen_) {  // nothing was drawn for real: each replay draws
    gen_draws_ = gen_->offset - gen_start_;
    gen_->offset = gen_start_;
  }
  cudaCheck(cudaStreamEndCapture(stream(), &graph_));
  cudaCheck(cudaGraphInstantiate(&exec_, graph_, 0));
}

void Graph::capture_abort() {
  if (!capturing_) return;
  capturing_ = false;
  g_capturing.store(false);
  g_capturing_graph = nullptr;
  stop_pool_capture();
  if (gen_) gen_->offset = gen_start_;
  cudaGraph_t g = nullptr;
  (void)cudaStreamEndCapture(stream(), &g);  // an invalidated capture reports an error here: nothing to keep
  if (g) (void)cudaGraphDestroy(g);
  (void)cudaGetLastError();
}

void Graph::replay() {
  CM_REQUIRE(exec_, "cuda::Graph: replay before a capture");
  if (gen_) {
    upload(gen_base_, &gen_->offset, sizeof(uint64_t));  // stream-ordered before the launch: no wait
    gen_->offset += gen_draws_;
  }
  cudaCheck(cudaGraphLaunch(exec_, stream()));
}

Graph::~Graph() {
  capture_abort();
  if (exec_ || graph_) {
    (void)cudaStreamSynchronize(stream());  // no replay may still run on what is released below
    if (exec_) (void)cudaGraphExecDestroy(exec_);
    if (graph_) (void)cudaGraphDestroy(graph_);
    (void)cudaGetLastError();
  }
  deallocate(gen_base_);
  if (pool_) {  // the pool's free blocks go to the general cache; its live ones will when freed
    Allocator& a = allocator();
    std::lock_guard<std::mutex> lock(a.mu);
    auto it = a.pools.find(pool_);
    if (it != a.pools.end()) {
      for (auto& kv : it->second) {
#if defined(CM_CUDA_EMU)
        cudaEmuSetValidRange(kv.second, 0, kv.first);
#endif
        a.cached.insert(kv);
      }
      a.pools.erase(it);
    }
  }
}

// ---------------------------------------------------------------- helpers

void axpy(float* y, const float* x, float alpha, int64_t n) {
  if (n <= 0) return;
  cublasCheck(cublasSaxpy_64(cublas(), n, &alpha, x, 1, y, 1));
}

}  // namespace cuda

// ---------------------------------------------------------------- engine/device.h hooks

bool cuda_device_present() {
  // Asked once: cudaGetDeviceCount fails with error 35 (cudaErrorInsufficientDriver) on a machine with the
  // toolkit but no driver, and with 100 (cudaErrorNoDevice) when the driver sees no GPU. Both mean "no device".
  static const bool present = [] {
    int n = 0;
    cudaError_t err = cudaGetDeviceCount(&n);
    if (err != cudaSuccess) {
      (void)cudaGetLastError();
      return false;
    }
    return n > 0;
  }();
  return present;
}

void* cuda_alloc(size_t nbytes) { return cuda::allocate(nbytes); }
void cuda_free(void* p) { cuda::deallocate(p); }

void cuda_copy(void* dst, const void* src, size_t nbytes, CopyKind kind) {
  if (nbytes == 0) return;
  cudaStream_t s = cuda::stream();
  switch (kind) {
    case CopyKind::HostToDevice:
      cuda::upload(dst, src, nbytes);
      break;
    case CopyKind::DeviceToHost:
      cuda::copy_to_host(dst, src, nbytes);  // waits: the host reads dst next
      break;
    case CopyKind::DeviceToDevice:
      cudaCheck(cudaMemcpyAsync(dst, src, nbytes, cudaMemcpyDeviceToDevice, s));
      break;
  }
}

}  // namespace cm
