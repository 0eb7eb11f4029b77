// Routing kernels on the GPU lab: the fused router softmax + top-k, the dispatch plan (histogram, scan, stable
// scatter), permute (gather rows to experts), unpermute (permute backward: rows back to tokens), combine (the
// gate-weighted sum per token), the load-balance loss, the sorted add of the embedding backward (and of
// index_add with long index lists) on skewed ids, and the experts' weight gradient with a hot expert. Each stage
// runs two versions:
//   naive: the straightforward CUDA code (a thread per row or per element, a single thread for the counting sort,
//          a block per expert column for the loss) - what one writes first;
//   ours:  the kernels of kernels/cuda/ (topk.cu, dispatch.cu, losses.cu, embedding.cu), as the engine calls them.
//   For the sorted add, "naive" is the kernel it replaced: after the same sort, one warp walks each id's whole run
//   (the space byte, 15-20% of the tokens of text, is one long run); ours cuts runs into chunks of kRunChunk.
// Validation first, against the CPU kernels (kernels/cpu/): integer outputs exactly, floats within abs + rel
// tolerances; a stage that fails validation prints FAIL and is not timed. Then timing with CUDA events: 3
// warm-up runs, the median of 20. GB/s counts the bytes a stage must move at least once (inputs read once,
// outputs written once); the device's measured copy bandwidth (a 512 MiB cudaMemcpy device to device, read +
// write) is printed first as the ceiling, and each line gives ours as a share of it. Inputs smaller than the L2
// cache are marked "(L2)": their timings measure the cache, not device memory.
// Notes: ours for the plan includes reading the out-of-range count back to the host (dispatch_plan waits for
// it); the naive plan is one thread, so it is timed at the smaller sizes only.
//
//   make -j2 USE_CUDA=1 build/bench/cuda_routing
//   ./build/bench/cuda_routing [--quick]
#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "engine/cuda.h"
#include "engine/rng.h"
#include "engine/tensor.h"
#include "kernels/copy.h"
#include "kernels/cuda/sort.cuh"
#include "kernels/dispatch.h"
#include "kernels/embedding.h"
#include "kernels/grouped_gemm.h"
#include "kernels/losses.h"
#include "kernels/softmax.h"
#include "kernels/topk.h"

using namespace cm;

namespace {

// ---------------------------------------------------------------- naive kernels

__device__ bool beats(float av, int ai, float bv, int bi) {
  const bool an = av != av, bn = bv != bv;
  if (an != bn) return an;
  if (!an && av != bv) return av > bv;
  return ai < bi;
}

// One thread per row: max, sum, probabilities, then k selection passes over the row.
__global__ void naive_softmax_topk(float* probs, float* gates, int32_t* idx, const float* x, int64_t R, int n, int k) {
  const int64_t r = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (r >= R) return;
  const float* xr = x + r * n;
  float m = -INFINITY;
  for (int c = 0; c < n; ++c) m = fmaxf(m, xr[c]);
  float s = 0.f;
  for (int c = 0; c < n; ++c) s += expf(xr[c] - m);
  for (int c = 0; c < n; ++c) probs[r * n + c] = expf(xr[c] - m) / s;
  float pv = 0.f;
  int pi = -1;
  for (int j = 0; j < k; ++j) {
    float bv = -INFINITY;
    int bi = INT_MAX;
    for (int c = 0; c < n; ++c)
      if ((j == 0 || beats(pv, pi, xr[c], c)) && beats(xr[c], c, bv, bi)) {
        bv = xr[c];
        bi = c;
      }
    gates[r * k + j] = expf(bv - m) / s;
    idx[r * k + j] = bi;
    pv = bv;
    pi = bi;
  }
}

// The whole counting sort in one thread: histogram, scan, stable scatter.
__global__ void naive_plan(int64_t* counts, int64_t* offsets, int32_t* row_of, int32_t* assign_of,
                           const int32_t* expert, int64_t A, int N) {
  for (int e = 0; e < N; ++e) counts[e] = 0;
  for (int64_t a = 0; a < A; ++a)
    if (expert[a] >= 0 && expert[a] < N) counts[expert[a]]++;
  offsets[0] = 0;
  for (int e = 0; e < N; ++e) offsets[e + 1] = offsets[e] + counts[e];
  for (int e = 0; e < N; ++e) counts[e] = 0;  // reused as the fill cursor, then restored
  for (int64_t a = 0; a < A; ++a) {
    const int32_t e = expert[a];
    if (e >= 0 && e < N) {
      const int64_t r = offsets[e] + counts[e]++;
      row_of[a] = (int32_t)r;
      assign_of[r] = (int32_t)a;
    } else {
      row_of[a] = -1;
    }
  }
}

// One thread per element, 64-bit division for the coordinates.
__global__ void naive_permute(float* xe, const float* x, const int32_t* assign_of, int64_t Ap, int64_t K, int64_t C) {
  const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= Ap * C) return;
  const int64_t r = i / C, c = i % C;
  xe[i] = x[(assign_of[r] / K) * C + c];
}

__global__ void naive_unpermute(float* dx, const float* dxe, const int32_t* row_of, int64_t T, int64_t K, int64_t C) {
  const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= T * C) return;
  const int64_t t = i / C, c = i % C;
  float acc = 0.f;
  for (int64_t j = 0; j < K; ++j) {
    const int64_t r = row_of[t * K + j];
    if (r >= 0) acc += dxe[r * C + c];
  }
  dx[i] = acc;
}

__global__ void naive_combine(float* out, const float* ye, const float* gate, const int32_t* row_of, int64_t T,
                              int64_t K, int64_t C) {
  const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= T * C) return;
  const int64_t t = i / C, c = i % C;
  float acc = 0.f;
  for (int64_t j = 0; j < K; ++j) {
    const int64_t r = row_of[t * K + j];
    if (r >= 0) acc += gate[t * K + j] * ye[r * C + c];
  }
  out[i] = acc;
}

// One block per expert: the column sum of probs (strided reads) and the count of its slots, then one thread.
__global__ void naive_lb_columns(float* frac, float* mean_prob, const float* probs, const int32_t* idx, int64_t R,
                                 int64_t E, int64_t K) {
  __shared__ float ss[256];
  __shared__ int sc[256];
  const int64_t e = blockIdx.x;
  float s = 0.f;
  int c = 0;
  for (int64_t r = threadIdx.x; r < R; r += blockDim.x) s += probs[r * E + e];
  for (int64_t i = threadIdx.x; i < R * K; i += blockDim.x) c += idx[i] == e;
  ss[threadIdx.x] = s;
  sc[threadIdx.x] = c;
  __syncthreads();
  if (threadIdx.x == 0) {
    float S = 0.f;
    int Cn = 0;
    for (int t = 0; t < blockDim.x; ++t) {
      S += ss[t];
      Cn += sc[t];
    }
    frac[e] = (float)Cn / (float)(R * K);
    mean_prob[e] = S / (float)R;
  }
}
__global__ void naive_lb_loss(float* loss, const float* frac, const float* mean_prob, int64_t E, float w) {
  float s = 0.f;
  for (int64_t e = 0; e < E; ++e) s += frac[e] * mean_prob[e];
  *loss = w * (float)E * s;
}

// The embedding backward before chunking: warp i looks at sorted position i; the first of each id's run walks the
// whole run in order.
__global__ void serial_run_backward(float* dweight, const float* dout, const int32_t* sorted_ids, const int32_t* pos,
                                    int64_t N, int64_t C) {
  const int lane = threadIdx.x % 32;
  for (int64_t i = (int64_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32; i < N;
       i += (int64_t)gridDim.x * (blockDim.x / 32)) {
    const int32_t v = sorted_ids[i];
    if (i > 0 && sorted_ids[i - 1] == v) continue;
    int64_t end = i + 1;
    while (end < N && sorted_ids[end] == v) ++end;
    float* dw = dweight + (int64_t)v * C;
    for (int64_t c = lane; c < C; c += 32) {
      float acc = dw[c];
      for (int64_t j = i; j < end; ++j) acc += dout[(int64_t)pos[j] * C + c];
      dw[c] = acc;
    }
  }
}

// ---------------------------------------------------------------- timing and checks

bool g_quick = false;

template <class F>
float median_ms(F f) {
  for (int i = 0; i < 3; ++i) f();
  cudaEvent_t a, b;
  cudaCheck(cudaEventCreate(&a));
  cudaCheck(cudaEventCreate(&b));
  std::vector<float> t;
  for (int i = 0; i < 20; ++i) {
    cudaCheck(cudaEventRecord(a, cuda::stream()));
    f();
    cudaCheck(cudaEventRecord(b, cuda::stream()));
    cudaCheck(cudaEventSynchronize(b));
    float ms = 0;
    cudaCheck(cudaEventElapsedTime(&ms, a, b));
    t.push_back(ms);
  }
  cudaCheck(cudaEventDestroy(a));
  cudaCheck(cudaEventDestroy(b));
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

double g_copy_gbs = 0;
size_t g_l2 = 0;

void report(const char* stage, const std::string& shape, double bytes, float ours, float naive) {
  const double gbs = bytes / (ours * 1e-3) / 1e9;
  std::printf("  %-14s %-28s ours %8.4f ms %7.1f GB/s (%3.0f%% of copy)", stage, shape.c_str(), ours, gbs,
              100.0 * gbs / g_copy_gbs);
  if (naive > 0)
    std::printf(" | naive %9.4f ms %7.1f GB/s | x%.1f", naive, bytes / (naive * 1e-3) / 1e9, naive / ours);
  std::printf("%s\n", bytes < (double)g_l2 ? " (L2)" : "");
}

bool close_all(const std::vector<float>& got, const std::vector<float>& ref, float atol, float rtol, const char* what) {
  if (got.size() != ref.size()) {
    std::printf("  FAIL %s: %zu vs %zu elements\n", what, got.size(), ref.size());
    return false;
  }
  for (size_t i = 0; i < got.size(); ++i)
    if (!(std::fabs(got[i] - ref[i]) <= atol + rtol * std::fabs(ref[i]))) {
      std::printf("  FAIL %s at %zu: %g vs %g\n", what, i, got[i], ref[i]);
      return false;
    }
  return true;
}

template <class T>
bool equal_all(const std::vector<T>& got, const std::vector<T>& ref, const char* what) {
  if (got == ref) return true;
  size_t i = 0;
  while (i < got.size() && i < ref.size() && got[i] == ref[i]) ++i;
  std::printf("  FAIL %s: first difference at %zu\n", what, i);
  return false;
}

std::vector<float> randoms(int64_t n, uint64_t seed, float lo, float hi) {
  std::vector<float> v((size_t)n);
  for (int64_t i = 0; i < n; ++i) v[(size_t)i] = lo + (hi - lo) * philox_uniform(seed, 0, (uint64_t)i);
  return v;
}

Tensor dev_f32(const std::vector<float>& v, const Shape& s) { return Tensor::from_vector(v, s, Device::CUDA); }
Tensor dev_i32(const std::vector<int32_t>& v, const Shape& s) { return Tensor::from_vector(v, s, Device::CUDA); }
Tensor dev_empty(const Shape& s, DType dt = DType::F32) { return Tensor::empty(s, dt, Device::CUDA); }
// On the engine's stream: a plain cudaMemcpy runs on the legacy default stream, which does not wait for the
// engine's non-blocking stream, and could read the counts before the kernels that write them have run.
std::vector<int64_t> read_i64(const Tensor& t, int64_t n) {
  std::vector<int64_t> r((size_t)n);
  cudaCheck(cudaMemcpyAsync(r.data(), t.raw(), (size_t)n * 8, cudaMemcpyDeviceToHost, cuda::stream()));
  cuda::sync();
  return r;
}
unsigned blocks(int64_t n, int threads) { return (unsigned)((n + threads - 1) / threads); }

// ---------------------------------------------------------------- stages

void lab_softmax_topk(int64_t R, int64_t n, int64_t k) {
  const std::string shape = "R=" + std::to_string(R) + " n=" + std::to_string(n) + " k=" + std::to_string(k);
  // Logits with distinct values (a random permutation of 0..n-1 per row, spaced 1e-2): the selection is unique.
  std::vector<float> x((size_t)(R * n));
  std::vector<int64_t> perm((size_t)n);
  for (int64_t r = 0; r < R; ++r) {
    for (int64_t c = 0; c < n; ++c) perm[(size_t)c] = c;
    for (int64_t c = n - 1; c > 0; --c) {
      const int64_t j = (int64_t)(philox_uniform(3, 0, (uint64_t)(r * n + c)) * (float)(c + 1)) % (c + 1);
      std::swap(perm[(size_t)c], perm[(size_t)j]);
    }
    for (int64_t c = 0; c < n; ++c) x[(size_t)(r * n + c)] = 1e-2f * (float)(perm[(size_t)c] - n / 2);
  }
  std::vector<float> p_ref((size_t)(R * n)), g_ref((size_t)(R * k));
  std::vector<int32_t> i_ref((size_t)(R * k));
  cpu::softmax_forward(p_ref.data(), x.data(), R, n);
  cpu::topk_forward(g_ref.data(), i_ref.data(), p_ref.data(), R, n, k);
  Tensor dx = dev_f32(x, {R, n}), p = dev_empty({R, n}), g = dev_empty({R, k}), ix = dev_empty({R, k}, DType::I32);
  Tensor np = dev_empty({R, n}), ng = dev_empty({R, k}), ni = dev_empty({R, k}, DType::I32);
  auto ours = [&] { cuda::softmax_topk_forward(p.f32(), g.f32(), ix.i32(), dx.f32(), R, n, k); };
  auto naive = [&] {
    naive_softmax_topk<<<blocks(R, 128), 128, 0, cuda::stream()>>>(np.f32(), ng.f32(), ni.i32(), dx.f32(), R, (int)n,
                                                                   (int)k);
    cudaCheckLaunch("naive_softmax_topk");
  };
  ours();
  naive();
  bool ok = equal_all(ix.to_i32_vector(), i_ref, "softmax_topk indices") &&
            close_all(g.to_f32_vector(), g_ref, 1e-7f, 1e-5f, "softmax_topk gates") &&
            close_all(p.to_f32_vector(), p_ref, 1e-7f, 1e-5f, "softmax_topk probs") &&
            equal_all(ni.to_i32_vector(), i_ref, "naive softmax_topk indices");
  if (!ok) return;
  const double bytes = 4.0 * (double)(R * n) * 2 + 8.0 * (double)(R * k);
  report("softmax+topk", shape, bytes, median_ms(ours), median_ms(naive));
}

void lab_dispatch(int64_t T, int64_t N, int64_t K, int64_t C) {
  const int64_t A = T * K;
  const std::string shape = "T=" + std::to_string(T) + " N=" + std::to_string(N) + " K=" + std::to_string(K) +
                            " C=" + std::to_string(C);
  // Experts: K distinct per token from a top-k of random logits; 5% dropped as a capacity filter would.
  std::vector<float> logits = randoms(T * N, 7, -1.f, 1.f);
  std::vector<float> tv((size_t)A);
  std::vector<int32_t> expert((size_t)A);
  cpu::topk_forward(tv.data(), expert.data(), logits.data(), T, N, K);
  for (int64_t a = 0; a < A; ++a)
    if (philox_uniform(11, 0, (uint64_t)a) < 0.05f) expert[(size_t)a] = -1;
  std::vector<int64_t> counts((size_t)N), offsets((size_t)N + 1);
  std::vector<int32_t> row_of((size_t)A), assign_of((size_t)A);
  cpu::dispatch_plan(counts.data(), offsets.data(), row_of.data(), assign_of.data(), expert.data(), A, N);
  const int64_t Ap = offsets[(size_t)N];

  // Plan.
  Tensor de = dev_i32(expert, {A}), dc = dev_empty({2 * N}, DType::I32), doff = dev_empty({2 * (N + 1)}, DType::I32);
  Tensor dro = dev_empty({A}, DType::I32), dao = dev_empty({A}, DType::I32);
  Tensor nc = dev_empty({2 * N}, DType::I32), noff = dev_empty({2 * (N + 1)}, DType::I32);
  Tensor nro = dev_empty({A}, DType::I32), nao = dev_empty({A}, DType::I32);
  auto plan_ours = [&] {
    cuda::dispatch_plan((int64_t*)dc.raw(), (int64_t*)doff.raw(), dro.i32(), dao.i32(), de.i32(), A, N);
  };
  auto plan_naive = [&] {
    naive_plan<<<1, 1, 0, cuda::stream()>>>((int64_t*)nc.raw(), (int64_t*)noff.raw(), nro.i32(), nao.i32(), de.i32(),
                                            A, (int)N);
    cudaCheckLaunch("naive_plan");
  };
  plan_ours();
  plan_naive();
  std::vector<int32_t> ao_got = dao.to_i32_vector(), ao_naive = nao.to_i32_vector();
  ao_got.resize((size_t)Ap);
  ao_naive.resize((size_t)Ap);
  std::vector<int32_t> ao_ref(assign_of.begin(), assign_of.begin() + Ap);
  bool ok = equal_all(read_i64(dc, N), counts, "plan counts") &&
            equal_all(read_i64(doff, N + 1), offsets, "plan offsets") &&
            equal_all(dro.to_i32_vector(), row_of, "plan row_of") && equal_all(ao_got, ao_ref, "plan assign_of") &&
            equal_all(nro.to_i32_vector(), row_of, "naive plan row_of") &&
            equal_all(ao_naive, ao_ref, "naive assign_of");
  if (ok) {
    const double bytes = 4.0 * (double)A * 2 + 4.0 * (double)Ap + 16.0 * (double)N;
    report("plan", shape, bytes, median_ms(plan_ours), A <= (1 << 17) ? median_ms(plan_naive) : 0.f);
  }

  // Permute.
  std::vector<float> x = randoms(T * C, 13, -1.f, 1.f), xe_ref((size_t)(Ap * C));
  cpu::dispatch_permute(xe_ref.data(), x.data(), assign_of.data(), Ap, K, C);
  Tensor dx = dev_f32(x, {T, C}), xe = dev_empty({Ap, C}), nxe = dev_empty({Ap, C});
  auto perm_ours = [&] { cuda::dispatch_permute(xe.f32(), dx.f32(), dao.i32(), Ap, K, C); };
  auto perm_naive = [&] {
    naive_permute<<<blocks(Ap * C, 256), 256, 0, cuda::stream()>>>(nxe.f32(), dx.f32(), dao.i32(), Ap, K, C);
    cudaCheckLaunch("naive_permute");
  };
  perm_ours();
  perm_naive();
  if (close_all(xe.to_f32_vector(), xe_ref, 0.f, 0.f, "permute") &&
      close_all(nxe.to_f32_vector(), xe_ref, 0.f, 0.f, "naive permute")) {
    const double bytes = 8.0 * (double)(Ap * C) + 4.0 * (double)Ap;
    report("permute", shape, bytes, median_ms(perm_ours), median_ms(perm_naive));
  }

  // Unpermute (permute backward).
  std::vector<float> dxe = randoms(Ap * C, 17, -1.f, 1.f), dx_ref((size_t)(T * C));
  cpu::dispatch_permute_backward(dx_ref.data(), dxe.data(), row_of.data(), T, K, C);
  Tensor ddxe = dev_f32(dxe, {Ap, C}), ddx = dev_empty({T, C}), nddx = dev_empty({T, C});
  auto unperm_ours = [&] { cuda::dispatch_permute_backward(ddx.f32(), ddxe.f32(), dro.i32(), T, K, C); };
  auto unperm_naive = [&] {
    naive_unpermute<<<blocks(T * C, 256), 256, 0, cuda::stream()>>>(nddx.f32(), ddxe.f32(), dro.i32(), T, K, C);
    cudaCheckLaunch("naive_unpermute");
  };
  unperm_ours();
  unperm_naive();
  if (close_all(ddx.to_f32_vector(), dx_ref, 1e-6f, 1e-6f, "unpermute") &&
      close_all(nddx.to_f32_vector(), dx_ref, 1e-6f, 1e-6f, "naive unpermute")) {
    const double bytes = 4.0 * (double)(Ap * C) + 4.0 * (double)(T * C) + 4.0 * (double)A;
    report("unpermute", shape, bytes, median_ms(unperm_ours), median_ms(unperm_naive));
  }

  // Combine.
  std::vector<float> ye = randoms(Ap * C, 19, -1.f, 1.f), gate = randoms(A, 23, 0.f, 1.f), out_ref((size_t)(T * C));
  cpu::dispatch_combine(out_ref.data(), ye.data(), gate.data(), row_of.data(), T, K, C);
  Tensor dye = dev_f32(ye, {Ap, C}), dg = dev_f32(gate, {A}), dout = dev_empty({T, C}), ndout = dev_empty({T, C});
  auto comb_ours = [&] { cuda::dispatch_combine(dout.f32(), dye.f32(), dg.f32(), dro.i32(), T, K, C); };
  auto comb_naive = [&] {
    naive_combine<<<blocks(T * C, 256), 256, 0, cuda::stream()>>>(ndout.f32(), dye.f32(), dg.f32(), dro.i32(), T, K,
                                                                  C);
    cudaCheckLaunch("naive_combine");
  };
  comb_ours();
  comb_naive();
  if (close_all(dout.to_f32_vector(), out_ref, 1e-6f, 1e-5f, "combine") &&
      close_all(ndout.to_f32_vector(), out_ref, 1e-6f, 1e-5f, "naive combine")) {
    const double bytes = 4.0 * (double)(Ap * C) + 4.0 * (double)(T * C) + 8.0 * (double)A;
    report("combine", shape, bytes, median_ms(comb_ours), median_ms(comb_naive));
  }
}

void lab_load_balance(int64_t R, int64_t E, int64_t K) {
  const std::string shape = "R=" + std::to_string(R) + " E=" + std::to_string(E) + " K=" + std::to_string(K);
  std::vector<float> logits = randoms(R * E, 29, -2.f, 2.f), p((size_t)(R * E)), v((size_t)(R * K));
  std::vector<int32_t> idx((size_t)(R * K));
  cpu::softmax_forward(p.data(), logits.data(), R, E);
  cpu::topk_forward(v.data(), idx.data(), p.data(), R, E, K);
  // Reference in double.
  std::vector<double> S((size_t)E, 0), cnt((size_t)E, 0);
  for (int64_t r = 0; r < R; ++r) {
    for (int64_t e = 0; e < E; ++e) S[(size_t)e] += p[(size_t)(r * E + e)];
    for (int64_t j = 0; j < K; ++j) cnt[(size_t)idx[(size_t)(r * K + j)]] += 1;
  }
  const float w = 0.01f;
  double loss_ref = 0;
  for (int64_t e = 0; e < E; ++e) loss_ref += (cnt[(size_t)e] / (double)(R * K)) * (S[(size_t)e] / (double)R);
  loss_ref *= (double)w * (double)E;
  Tensor dp = dev_f32(p, {R, E}), di = dev_i32(idx, {R, K});
  Tensor loss = dev_empty({1}), frac = dev_empty({E}), mp = dev_empty({E}), tok = dev_empty({1});
  Tensor nloss = dev_empty({1}), nfrac = dev_empty({E}), nmp = dev_empty({E});
  auto ours = [&] {
    cuda::load_balance_forward(loss.f32(), frac.f32(), mp.f32(), tok.f32(), dp.f32(), di.i32(), nullptr, nullptr, R, E,
                               K, 1, w);
  };
  auto naive = [&] {
    naive_lb_columns<<<(unsigned)E, 256, 0, cuda::stream()>>>(nfrac.f32(), nmp.f32(), dp.f32(), di.i32(), R, E, K);
    cudaCheckLaunch("naive_lb_columns");
    naive_lb_loss<<<1, 1, 0, cuda::stream()>>>(nloss.f32(), nfrac.f32(), nmp.f32(), E, w);
    cudaCheckLaunch("naive_lb_loss");
  };
  ours();
  naive();
  const std::vector<float> ref{(float)loss_ref};
  if (!close_all(loss.to_f32_vector(), ref, 1e-7f, 1e-5f, "load balance loss") ||
      !close_all(nloss.to_f32_vector(), ref, 1e-7f, 1e-4f, "naive load balance loss"))
    return;
  const double bytes = 4.0 * (double)(R * E) + 4.0 * (double)(R * K);
  report("load balance", shape, bytes, median_ms(ours), median_ms(naive));
}

// Embedding backward over N byte ids (V = 256), one id (the space, 32) holding `share` of them, the rest uniform.
void lab_embedding_backward(int64_t N, int64_t C, double share) {
  const int64_t V = 256;
  char shape_buf[64];
  std::snprintf(shape_buf, sizeof shape_buf, "N=%lld C=%lld space %.0f%%", (long long)N, (long long)C, 100 * share);
  const std::string shape = shape_buf;
  const std::vector<float> u = randoms(N, 41, 0.f, 1.f), w = randoms(N, 47, 0.f, 1.f),
                           dout = randoms(N * C, 43, -1.f, 1.f);
  std::vector<int32_t> ids((size_t)N);
  for (int64_t n = 0; n < N; ++n)
    ids[(size_t)n] = u[(size_t)n] < share ? 32 : (int32_t)std::min<int64_t>(V - 1, (int64_t)(w[(size_t)n] * V));
  std::vector<float> ref((size_t)(V * C), 0.f);
  cpu::embedding_backward(ref.data(), dout.data(), ids.data(), N, V, C);
  Tensor dDout = dev_f32(dout, {N, C}), dIds = dev_i32(ids, {N}), dw = dev_empty({V, C}), ndw = dev_empty({V, C});
  Tensor sorted = dev_empty({N}, DType::I32), pos = dev_empty({N}, DType::I32);
  auto ours = [&] {
    cuda::fill32(dw.raw(), 0u, V * C);
    cuda::embedding_backward(dw.f32(), dDout.f32(), dIds.i32(), N, V, C);
  };
  auto naive = [&] {
    cuda::fill32(ndw.raw(), 0u, V * C);
    cuda::detail::stable_sort_pairs(sorted.i32(), pos.i32(), dIds.i32(), nullptr, N, 8);
    serial_run_backward<<<blocks(N, 4), 128, 0, cuda::stream()>>>(ndw.f32(), dDout.f32(), sorted.i32(), pos.i32(), N, C);
    cudaCheckLaunch("serial_run_backward");
  };
  ours();
  naive();
  // Sums of up to 0.9 N terms of [-1, 1] in two orders: within float rounding of each other and of the CPU.
  if (!close_all(dw.to_f32_vector(), ref, 1e-2f, 1e-4f, "embedding backward") ||
      !close_all(ndw.to_f32_vector(), ref, 1e-2f, 1e-4f, "serial-run embedding backward"))
    return;
  const double bytes = 4.0 * (double)(N * C) + 4.0 * (double)N + 8.0 * (double)(V * C);
  report("emb backward", shape, bytes, median_ms(ours), median_ms(naive));
}

double copy_bandwidth() {
  const size_t n = size_t(512) << 20;
  void* a = cuda::allocate(n);
  void* b = cuda::allocate(n);
  cudaCheck(cudaMemsetAsync(a, 1, n, cuda::stream()));
  const float ms =
      median_ms([&] { cudaCheck(cudaMemcpyAsync(b, a, n, cudaMemcpyDeviceToDevice, cuda::stream())); });
  cuda::deallocate(a);
  cuda::deallocate(b);
  return 2.0 * (double)n / (ms * 1e-3) / 1e9;
}

}  // namespace

// The experts' weight gradient (kernels/grouped_gemm.h backward_weight) of G experts over M = T * K rows, one
// expert holding `share` of them (0: all even): chunked (ours, the engine's default) against each expert's rows
// walked by its own tiles' blocks alone (naive: grouped_wgrad_set_chunks(false), the kernel before chunks). Checked
// against each other within float tolerance (the chunked sums are another order), then timed.
void lab_grouped_wgrad(int64_t M, int64_t G, int64_t N, int64_t Kd, double share) {
  const std::string shape = "M=" + std::to_string(M) + " G=" + std::to_string(G) + " " + std::to_string(N) + "x" +
                            std::to_string(Kd) + " hot " + std::to_string((int)(100 * share)) + "%";
  std::vector<int64_t> off((size_t)G + 1, 0);
  const int64_t hot = (int64_t)(share * (double)M), rest = M - hot;
  for (int64_t g = 0; g < G; ++g) off[(size_t)g + 1] = off[(size_t)g] + (g == 0 ? hot : 0) + rest / G + (g < rest % G);
  std::vector<int32_t> words(2 * off.size());
  std::memcpy(words.data(), off.data(), off.size() * sizeof(int64_t));
  Tensor doff = dev_i32(words, {(int64_t)words.size()});
  Tensor dY = dev_f32(randoms(M * N, 41, -1.f, 1.f), {M, N}), X = dev_f32(randoms(M * Kd, 42, -1.f, 1.f), {M, Kd});
  Tensor dW = dev_empty({G, N, Kd}), ndW = dev_empty({G, N, Kd});
  std::vector<float*> hp, np;
  for (int64_t g = 0; g < G; ++g) hp.push_back(dW.f32() + g * N * Kd), np.push_back(ndW.f32() + g * N * Kd);
  cuda::DevicePointers pp, pn;
  float* const* dp = pp.get(hp);
  float* const* dn = pn.get(np);
  const int64_t* o = static_cast<const int64_t*>(doff.raw());
  auto ours = [&] { cuda::grouped_gemm_backward_weight(dp, nullptr, dY.f32(), X.f32(), o, G, M, N, Kd, false); };
  auto naive = [&] {
    cuda::grouped_wgrad_set_chunks(false);
    cuda::grouped_gemm_backward_weight(dn, nullptr, dY.f32(), X.f32(), o, G, M, N, Kd, false);
    cuda::grouped_wgrad_set_chunks(true);
  };
  ours();
  naive();
  // Two orders of a sum over up to M products of values in [-1, 1): their float roundings differ by about
  // 2^-24 sqrt(M) |partial sums| ~ 1e-3 at M = 2^17, more where a few elements' rounding adds up; a chunk left out
  // or added twice moves an element by the chunk's own sum, ~ sqrt(rows) / 3 (tens).
  if (!close_all(dW.to_f32_vector(), ndW.to_f32_vector(), 2e-7f * (float)M, 1e-4f,
                 "grouped wgrad, chunked against whole"))
    return;
  const float t_ours = median_ms(ours), t_naive = median_ms(naive);
  const double flops = 2.0 * (double)M * (double)N * (double)Kd;
  std::printf("  %-14s %-34s ours %8.4f ms %6.1f TFLOP/s | unchunked %8.4f ms %6.1f TFLOP/s | x%.1f\n",
              "expert wgrad", shape.c_str(), t_ours, flops / (t_ours * 1e-3) / 1e12, t_naive,
              flops / (t_naive * 1e-3) / 1e12, t_naive / t_ours);
}

int main(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) g_quick = g_quick || std::strcmp(argv[i], "--quick") == 0;
  try {
    if (!cuda_available()) {
      std::printf("cuda_routing: no CUDA device is available; nothing to measure\n");
      return 0;
    }
    const cudaDeviceProp& pr = cuda::props();
    g_l2 = (size_t)pr.l2CacheSize;
    g_copy_gbs = copy_bandwidth();
    std::printf("routing lab on %s (%d SMs, L2 %zu MiB): device copy %.0f GB/s (read + write), median of 20\n",
                pr.name, pr.multiProcessorCount, g_l2 >> 20, g_copy_gbs);
    const int64_t T = g_quick ? 8192 : 65536;
    for (int64_t n : {8, 64, 256, 1024})
      for (int64_t k : {1, 2, 8})
        if (k <= n) lab_softmax_topk(T, n, k);
    for (int64_t N : {8, 64, 256})
      for (int64_t K : {1, 2, 8})
        if (K <= N) lab_dispatch(T, N, K, g_quick ? 256 : 1024);
    for (int64_t E : {8, 64, 256})
      for (int64_t K : {1, 2})
        if (K <= E) lab_load_balance(T, E, K);
    for (double share : {0.0, 0.2, 0.9}) lab_embedding_backward(T, g_quick ? 256 : 768, share);
    // fine-grained experts (24 dW tiles each: chunked), then wide ones (256 tiles each: at most 3 chunks)
    for (double share : {0.0, 0.5, 0.9}) lab_grouped_wgrad(2 * T, 64, 384, 256, share);
    for (double share : {0.0, 0.9}) lab_grouped_wgrad(2 * T, 8, 1024, 1024, share);
    return 0;
  } catch (const Error& e) {
    std::fprintf(stderr, "cuda_routing: %s\n", e.what());
    return 2;
  }
}
