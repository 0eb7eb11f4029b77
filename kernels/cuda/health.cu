// CUDA twin of the experts' fault guard and health update (contract in kernels/health.h). Row norms: a warp per 32
// rows reads them in coalesced tiles, and each lane walks its row in column order, so the double sum has the CPU's
// order and bits. The classification and the counters: one warp per expert, 256 rows' loads at a time, its sums in
// row order (deterministic, as on the CPU), small next to the GEMMs that made y. The health update is one
// thread's loop over the experts, as on the CPU.
#include <algorithm>

#include "kernels/health.h"
#include "kernels/cuda/common.cuh"

namespace cm::cuda {

namespace {

constexpr int kThreads = 256;

// Row norms, a warp per 32 rows (warp_row_sums, common.cuh): each row's double sum of squares walks its columns in
// order, the CPU twin's order and bits.
constexpr int kNormThreads = 128;
__global__ void row_norms_kernel(double* __restrict__ norms, const float* __restrict__ y, int64_t S, int64_t C) {
  constexpr int kWarps = kNormThreads / kWarp;
  __shared__ float tiles[kWarps][kWarp][kWarp + 1];
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = (int64_t)gridDim.x * kWarps;
  for (int64_t r0 = ((int64_t)blockIdx.x * kWarps + threadIdx.x / kWarp) * kWarp; r0 < S; r0 += warps * kWarp) {
    const int rows = (int)(S - r0 < kWarp ? S - r0 : kWarp);
    const double ss = warp_row_sums(y, r0, rows, C, tiles[threadIdx.x / kWarp], [](float x) {
      const double v = x;
      return v * v;  // exact: a float squared in double
    });
    if (lane < rows) norms[r0 + lane] = sqrt(ss);
  }
}

// A warp per expert (block b's warp w: expert 8 b + w) classifies its rows (bad rows get norm -1), 256 at a time:
// each lane loads its 8 rows of the 256 at once (the loads in flight together, where one row's load a step left
// the warp waiting on each), then for each 32 in order each lane judges its row, the warp counts by ballot, and
// every lane adds the good rows' norms in row order (each taken from its lane by a shuffle): the CPU twin's
// serial double sum, its bits. Lane 0 writes the expert's flag and counters; thread 0 adds its block's row
// counts into counts (integer atomics: exact in any order; zeroed by the launcher). (One block of 8 warps for
// every expert made a dense layer's rows one warp's walk, a load at a time.)
constexpr int kClassifyBatch = 8;
__global__ void classify_kernel(int32_t* __restrict__ ok, int32_t* __restrict__ counts, double* __restrict__ pend,
                                double* __restrict__ norms, const int64_t* __restrict__ offsets, int64_t N, int64_t S,
                                const float* __restrict__ state, float factor, bool count, bool count_traffic) {
  constexpr int kWarps = kThreads / kWarp;
  __shared__ int64_t inf_rows[kWarps], far_rows[kWarps];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  int64_t nonfinite = 0, outlier = 0;
  const int64_t e = (int64_t)blockIdx.x * kWarps + warp;
  if (e < N) {  // the same for the whole warp
    const int64_t a = offsets ? offsets[e] : 0, z = offsets ? offsets[e + 1] : S;
    const float ema = state[N + e];
    int64_t bad = 0, good = 0;
    double norm_sum = 0.0;
    for (int64_t i0 = a; i0 < z; i0 += kClassifyBatch * kWarp) {
      double nm[kClassifyBatch];
#pragma unroll
      for (int j = 0; j < kClassifyBatch; ++j) {
        const int64_t i = i0 + j * kWarp + lane;
        nm[j] = i < z ? norms[i] : 0.0;
      }
#pragma unroll
      for (int j = 0; j < kClassifyBatch; ++j) {
        // Past z for the whole warp in a last batch's tail: nothing counted. (An early break there made ptxas fail
        // to allocate this kernel's registers, nvcc 13.0.)
        const int64_t i = i0 + j * kWarp + lane;
        const bool in = i < z;
        const bool inf = in && shared::guard_nonfinite(nm[j]), far = in && shared::guard_outlier(nm[j], ema, factor);
        if (inf || far) norms[i] = -1.0;
        const unsigned inf_m = __ballot_sync(0xffffffffu, inf), far_m = __ballot_sync(0xffffffffu, far),
                       good_m = __ballot_sync(0xffffffffu, in && !inf && !far);
        bad += __popc(inf_m | far_m);
        nonfinite += __popc(inf_m);
        outlier += __popc(far_m);
        good += __popc(good_m);
        for (int l = 0; l < kWarp; ++l) {
          const double v = __shfl_sync(0xffffffffu, nm[j], l);
          if (good_m >> l & 1u) norm_sum += v;
        }
      }
    }
    if (lane == 0) shared::guard_record(ok, pend, e, N, z - a, bad, good, norm_sum, count, count_traffic);
  }
  if (lane == 0) {
    inf_rows[warp] = nonfinite;
    far_rows[warp] = outlier;
  }
  __syncthreads();
  if (threadIdx.x == 0 && counts) {
    int64_t a = 0, b = 0;
    for (int w = 0; w < kWarps; ++w) {
      a += inf_rows[w];
      b += far_rows[w];
    }
    if (a) atomicAdd(counts, (int32_t)a);
    if (b) atomicAdd(counts + 1, (int32_t)b);
  }
}

__global__ void guard_copy_kernel(float* out, const float* y, const double* __restrict__ norms, int64_t S, int64_t C,
                                  bool zero_bad) {
  const int64_t total = S * C;
  for (int64_t k = gtid(); k < total; k += gstride()) {
    if (zero_bad && norms[k / C] < 0.0) out[k] = 0.f;
    else if (out != y) out[k] = y[k];
  }
}

__global__ void gate_backward_kernel(float* __restrict__ dx, const float* __restrict__ g,
                                     const int32_t* __restrict__ ok, int64_t n) {
  const bool pass = *ok != 0;
  for (int64_t i = gtid(); i < n; i += gstride()) dx[i] = pass ? g[i] : 0.f;
}

// The gridDim.y blocks of column e zero expert e's rows when it was cut (a block per row in turn, its threads along
// the row): a cut expert that had most of the rows is spread over them, and a step with no cut expert costs one
// read of ok per block.
__global__ void rows_zero_kernel(float* __restrict__ x, const int32_t* __restrict__ ok,
                                 const int64_t* __restrict__ offsets, int64_t cols) {
  const int64_t e = blockIdx.x;
  if (ok[e]) return;
  const int64_t a = offsets ? offsets[e] : e, z = offsets ? offsets[e + 1] : e + 1;
  for (int64_t r = a + blockIdx.y; r < z; r += gridDim.y)
    for (int64_t k = threadIdx.x; k < cols; k += blockDim.x) x[r * cols + k] = 0.f;
}

__global__ void traffic_add_kernel(double* __restrict__ pend, const int32_t* __restrict__ counts, int64_t N) {
  for (int64_t e = gtid(); e < N; e += gstride()) pend[4 * N + e] += (double)counts[e];
}

__global__ void health_update_kernel(float* __restrict__ state, double* __restrict__ pend,
                                     const float* __restrict__ sums, const int64_t* __restrict__ meta,
                                     const float* __restrict__ pruned, int64_t N, float decay, float factor,
                                     float rel_min, bool use_reliability) {
  if (blockIdx.x != 0 || threadIdx.x != 0) return;
  int64_t at = 0;
  for (int64_t e = 0; e < N; ++e) {
    const int64_t nw = meta[e], ng = meta[N + e];
    if (pruned && pruned[e] != 0.f) {
      at += nw + ng;
      continue;
    }
    if (nw == 0) continue;
    double wss = 0.0, gss = 0.0;
    for (int64_t i = at; i < at + nw; ++i) wss += (double)sums[i];
    for (int64_t i = at + nw; i < at + nw + ng; ++i) gss += (double)sums[i];
    at += nw + ng;
    const double wn = sqrt(wss);
    float rel = state[e], ema = state[N + e], wema = state[2 * N + e];
    const bool weights_ok =
        isfinite(wn) && (wema <= 0.f || (wn <= (double)factor * wema && wn >= (double)wema / factor));
    if (weights_ok) wema = wema > 0.f ? decay * wema + (1.f - decay) * (float)wn : (float)wn;
    const double rows = pend[e], bad = pend[N + e], good = pend[2 * N + e];
    if (good > 0.0 && bad == 0.0) {
      const float mean = (float)(pend[3 * N + e] / good);
      ema = ema > 0.f ? decay * ema + (1.f - decay) * mean : mean;
    }
    if (use_reliability) {
      const bool grads_ok = isfinite(gss);
      bool update = true;
      float health = 0.f;
      if (weights_ok && grads_ok) {
        if (rows > 0.0) health = 1.f - (float)bad / (float)rows;
        else update = false;  // no evidence this step: the reliability stays
      }
      if (update) rel = fminf(fmaxf(decay * rel + (1.f - decay) * health, rel_min), 1.f);
    }
    state[e] = rel;
    state[N + e] = ema;
    state[2 * N + e] = wema;
  }
  double total = 0.0;
  for (int64_t e = 0; e < N; ++e) total += pend[4 * N + e];
  if (total > 0.0)
    for (int64_t e = 0; e < N; ++e)
      state[3 * N + e] = decay * state[3 * N + e] + (1.f - decay) * (float)pend[4 * N + e] / (float)total;
  for (int64_t i = 0; i < 5 * N; ++i) pend[i] = 0.0;
}

// One thread: the CPU's pass (kernels/health.h shared::expert_prune_pass).
__global__ void prune_update_kernel(float* __restrict__ low_steps, float* __restrict__ pruned,
                                    int64_t* __restrict__ load, const float* __restrict__ state, int64_t N, int64_t b,
                                    int64_t k, float threshold, int64_t window, bool use_reliability) {
  if (blockIdx.x != 0 || threadIdx.x != 0) return;
  shared::expert_prune_pass(low_steps, pruned, load, state, N, b, k, threshold, window, use_reliability);
}

}  // namespace

void expert_guard_forward(float* out, int32_t* ok, int32_t* counts, double* pend, double* norms, const float* y,
                          const int64_t* offsets, int64_t N, int64_t S, int64_t C, const float* state, float factor,
                          bool zero_bad, bool count, bool count_traffic) {
  CM_CHECK(S >= 0 && C > 0 && N >= 1 && (offsets || N == 1), "cuda::expert_guard_forward: bad sizes S = ", S,
           ", C = ", C, ", N = ", N);
  if (S > 0) {
    row_norms_kernel<<<grid_for(ceil_div(S, kWarp), kNormThreads / kWarp), kNormThreads, 0, stream()>>>(norms, y, S,
                                                                                                      C);
    cudaCheckLaunch("row_norms_kernel");
  }
  if (counts) cudaCheck(cudaMemsetAsync(counts, 0, 2 * sizeof(int32_t), stream()));
  classify_kernel<<<(unsigned)ceil_div(N, kThreads / kWarp), kThreads, 0, stream()>>>(
      ok, counts, pend, norms, offsets, N, S, state, factor, count, count_traffic);
  cudaCheckLaunch("classify_kernel");
  if (out && S > 0 && (zero_bad || out != y)) {
    guard_copy_kernel<<<grid_for(S * C, kThreads), kThreads, 0, stream()>>>(out, y, norms, S, C, zero_bad);
    cudaCheckLaunch("guard_copy_kernel");
  }
}

void expert_gate_backward(float* dx, const float* g, const int32_t* ok, int64_t n) {
  if (n <= 0) return;
  gate_backward_kernel<<<grid_for(n, kThreads), kThreads, 0, stream()>>>(dx, g, ok, n);
  cudaCheckLaunch("gate_backward_kernel");
}

void expert_rows_zero(float* x, const int32_t* ok, const int64_t* offsets, int64_t N, int64_t cols) {
  if (N <= 0 || cols <= 0) return;
  const unsigned per_expert = (unsigned)std::clamp<int64_t>(4096 / N, 1, 32);  // at most max(N, 4096) blocks
  rows_zero_kernel<<<dim3((unsigned)N, per_expert), kThreads, 0, stream()>>>(x, ok, offsets, cols);
  cudaCheckLaunch("rows_zero_kernel");
}

void expert_traffic_add(double* pend, const int32_t* counts, int64_t N) {
  if (N <= 0) return;
  traffic_add_kernel<<<grid_for(N, kThreads), kThreads, 0, stream()>>>(pend, counts, N);
  cudaCheckLaunch("traffic_add_kernel");
}

void expert_health_update(float* state, double* pend, const float* sums, const int64_t* meta, const float* pruned,
                          int64_t N, float decay, float factor, float rel_min, bool use_reliability) {
  health_update_kernel<<<1, 1, 0, stream()>>>(state, pend, sums, meta, pruned, N, decay, factor, rel_min,
                                              use_reliability);
  cudaCheckLaunch("health_update_kernel");
}

void expert_prune_update(float* low_steps, float* pruned, int64_t* load, const float* state, int64_t N, int64_t b,
                         int64_t k, float threshold, int64_t window, bool use_reliability) {
  CM_CHECK(N >= 1 && b >= 1 && N % b == 0, "cuda::expert_prune_update: N = ", N, ", b = ", b);
  prune_update_kernel<<<1, 1, 0, stream()>>>(low_steps, pruned, load, state, N, b, k, threshold, window,
                                             use_reliability);
  cudaCheckLaunch("prune_update_kernel");
}

}  // namespace cm::cuda
