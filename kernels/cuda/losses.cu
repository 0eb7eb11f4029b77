// CUDA losses: cross-entropy fused with log-softmax (the twin of kernels/cpu/losses.cpp), and the router losses,
// load balance and z-loss, forward and backward (DESIGN.md section 4.3).
//
// Determinism: every sum over rows is cut into a fixed number of chunks that depends on the sizes only; chunk
// partials are written to scratch and added in chunk order by the next kernel. Counts are integers (shared-memory
// integer atomics are exact, so their order does not matter). No floating-point atomics anywhere.
// Scalar results (the losses) stay on the device; backward kernels read the upstream gradient from the device
// too (`dloss` [1]), so a training step needs no host round trip for them.
#include <algorithm>

#include "kernels/cuda/common.cuh"
#include "kernels/losses.h"

namespace cm::cuda {

namespace {

// ---------------------------------------------------------------- cross-entropy kernels

template <bool WARP>
__global__ void cross_entropy_forward_kernel(float* __restrict__ losses, float* __restrict__ lse,
                                             const float* __restrict__ logits, const int32_t* __restrict__ targets,
                                             int64_t N, int64_t V, int32_t ignore_index, int64_t* rec) {
  using G = Group<WARP>;
  __shared__ float sh[kWarp];
  for (int64_t n = G::first_row(); n < N; n += G::row_stride()) {
    const float* x = logits + n * V;
    float m = -INFINITY;
    for (int64_t v = G::rank(); v < V; v += G::size()) m = fmaxf(m, x[v]);
    m = G::max(m, sh);
    float s = 0.f;
    for (int64_t v = G::rank(); v < V; v += G::size()) s += expf(x[v] - m);
    s = G::sum(s, sh);
    if (G::rank() == 0) {
      const float ls = logf(s);
      lse[n] = m + ls;
      const int32_t t = targets[n];
      const bool bad = t != ignore_index && (t < 0 || t >= V);  // recorded (engine/cuda.h), never read
      if (bad) record_bad_index(rec, IndexOp::CrossEntropy, t, n, V);
      // lse - x[t] written as (m - x[t]) + log s: keeps the low bits when logits are large.
      losses[n] = t == ignore_index || bad ? 0.0f : (m - x[t]) + ls;
    }
  }
}

// dlogits = (softmax - onehot) * scale with scale = (gout ? gout[0] : 1) * scale_host; ignored rows get 0.
template <bool WARP>
__global__ void cross_entropy_backward_kernel(float* __restrict__ dlogits, const float* __restrict__ logits,
                                              const float* __restrict__ lse, const int32_t* __restrict__ targets,
                                              const float* __restrict__ gout, float scale_host, int64_t N, int64_t V,
                                              int32_t ignore_index) {
  using G = Group<WARP>;
  const float scale = gout ? gout[0] * scale_host : scale_host;
  for (int64_t n = G::first_row(); n < N; n += G::row_stride()) {
    const float* x = logits + n * V;
    float* dx = dlogits + n * V;
    const int32_t t = targets[n];
    if (t == ignore_index || t < 0 || t >= V) {  // ignored, or bad (the forward recorded it): a zero row
      for (int64_t v = G::rank(); v < V; v += G::size()) dx[v] = 0.f;
      continue;
    }
    const float l = lse[n];
    for (int64_t v = G::rank(); v < V; v += G::size()) {
      const float d = expf(x[v] - l) * scale;
      dx[v] = v == t ? d - scale : d;
    }
  }
}

// inv_valid[0] = 1 / (targets in [0, V) that are not ignore_index), 0 when there is none; bad targets are
// recorded. One block: integer counts, so the order of the additions does not matter.
__global__ void __launch_bounds__(1024)
    cross_entropy_inv_valid_kernel(float* __restrict__ inv_valid, const int32_t* __restrict__ targets, int64_t N,
                                   int64_t V, int32_t ignore_index, int64_t* rec) {
  __shared__ unsigned long long count;
  if (threadIdx.x == 0) count = 0;
  __syncthreads();
  unsigned long long mine = 0;
  for (int64_t n = threadIdx.x; n < N; n += blockDim.x) {
    const int32_t t = targets[n];
    if (t == ignore_index) continue;
    if (t >= 0 && t < V)
      ++mine;
    else
      record_bad_index(rec, IndexOp::CrossEntropy, t, n, V);
  }
  atomicAdd(&count, mine);
  __syncthreads();
  if (threadIdx.x == 0) inv_valid[0] = count > 0 ? 1.0f / (float)count : 0.0f;  // the host's formula
}

// ---------------------------------------------------------------- z-loss kernels

// lse[r] = logsumexp(logits[r]) (same numerics as the cross-entropy's).
template <bool WARP>
__global__ void row_logsumexp_kernel(float* __restrict__ lse, const float* __restrict__ logits, int64_t R,
                                     int64_t E) {
  using G = Group<WARP>;
  __shared__ float sh[kWarp];
  for (int64_t r = G::first_row(); r < R; r += G::row_stride()) {
    const float* x = logits + r * E;
    float m = -INFINITY;
    for (int64_t e = G::rank(); e < E; e += G::size()) m = fmaxf(m, x[e]);
    m = G::max(m, sh);
    float s = 0.f;
    for (int64_t e = G::rank(); e < E; e += G::size()) s += expf(x[e] - m);
    s = G::sum(s, sh);
    if (G::rank() == 0) lse[r] = m + logf(s);
  }
}

// One block: loss = weight / R * sum_r lse[r]^2, accumulated in double in a fixed order.
__global__ void __launch_bounds__(1024)
    z_loss_reduce_kernel(float* __restrict__ loss, const float* __restrict__ lse, int64_t R, float weight) {
  __shared__ double sh[kWarp];
  double acc = 0.0;
  for (int64_t r = threadIdx.x; r < R; r += blockDim.x) acc += (double)lse[r] * (double)lse[r];
  acc = block_sum(acc, sh);
  if (threadIdx.x == 0) *loss = R > 0 ? (float)((double)weight * acc / (double)R) : 0.f;
}

// dlogits[r, e] = dloss * weight * 2 lse[r] / R * softmax(logits[r])[e].
__global__ void z_loss_backward_kernel(float* __restrict__ dlogits, const float* __restrict__ dloss,
                                       const float* __restrict__ logits, const float* __restrict__ lse, int64_t R,
                                       int64_t E, float weight) {
  const float k = dloss[0] * weight * 2.0f / (float)R;
  const int64_t total = R * E;
  for (int64_t i = gtid(); i < total; i += gstride()) {
    const int64_t r = i / E;
    const float l = lse[r];
    dlogits[i] = k * l * expf(logits[i] - l);
  }
}

// ---------------------------------------------------------------- load-balance kernels
// Rows r in groups g = group[r] (all 0 without `group`; -1 skips the row). Per group: T_g rows, cnt[g, e] selected
// slots for e, S[g, e] = sum of probs[r, e] over its rows. Stage 1 writes per-chunk partials; stage 2 adds them
// in chunk order per (g, e); stage 3 the loss.

// Stage 1: block b takes rows [b * RC, (b + 1) * RC) and writes its partials S [G*E] f32, cnt [G*E] i32, T [G] i32
// to s_part, c_part, t_part at offset b. SHARED: accumulated in shared memory first (G * E <= kLbMaxGE), else
// straight into the block's own slice of the partials (no other block writes it: no race, integer atomics exact).
template <bool SHARED>
__global__ void lb_partial_kernel(float* __restrict__ s_part, int32_t* __restrict__ c_part,
                                  int32_t* __restrict__ t_part,
                                  const float* __restrict__ probs, const int32_t* __restrict__ indices,
                                  const int32_t* __restrict__ group, int64_t R, int64_t E, int64_t K, int64_t G,
                                  int64_t RC) {
  extern __shared__ float lb_smem[];
  const int64_t GE = G * E;
  float* S = SHARED ? lb_smem : s_part + blockIdx.x * GE;
  int32_t* cnt = SHARED ? (int32_t*)(S + GE) : c_part + blockIdx.x * GE;
  int32_t* T = SHARED ? cnt + GE : t_part + blockIdx.x * G;
  for (int64_t i = threadIdx.x; i < GE; i += blockDim.x) {
    S[i] = 0.f;
    cnt[i] = 0;
  }
  for (int64_t i = threadIdx.x; i < G; i += blockDim.x) T[i] = 0;
  __syncthreads();
  const int64_t r0 = (int64_t)blockIdx.x * RC, r1 = r0 + RC < R ? r0 + RC : R;
  // Probability sums: thread owns columns e, walks the rows in order (one writer per S entry: no race).
  for (int64_t e = threadIdx.x; e < E; e += blockDim.x)
    for (int64_t r = r0; r < r1; ++r) {
      const int32_t g = group ? group[r] : 0;
      if (g >= 0 && g < G) S[g * E + e] += probs[r * E + e];
    }
  // Slot counts and row counts: integer atomics, exact in any order.
  for (int64_t i = r0 * K + threadIdx.x; i < r1 * K; i += blockDim.x) {
    const int64_t r = i / K;
    const int32_t g = group ? group[r] : 0;
    const int32_t e = indices[i];
    if (g < 0 || g >= G) continue;
    if (e >= 0 && e < E) atomicAdd(&cnt[g * E + e], 1);
    if (i % K == 0) atomicAdd(&T[g], 1);
  }
  if (!SHARED) return;
  __syncthreads();
  for (int64_t i = threadIdx.x; i < GE; i += blockDim.x) {
    s_part[blockIdx.x * GE + i] = S[i];
    c_part[blockIdx.x * GE + i] = cnt[i];
  }
  for (int64_t i = threadIdx.x; i < G; i += blockDim.x) t_part[blockIdx.x * G + i] = T[i];
}

// Target shares, before stage 2 (kernels/losses.h): on [1] = 1 when some entry of log_bias [G, E] is nonzero (one
// block: the decision for the whole array), else 0; inv_share [G, E] = rsum / rho in double: rho a thread per
// (g, e), then a warp per group, whose lane 0 adds the group's rho in e order (the CPU twin's sum) and whose lanes
// write its shares. (One thread per group made a flat router's E exponentials one after another, twice.)
__global__ void __launch_bounds__(1024)
    lb_bias_on_kernel(int32_t* __restrict__ on, const float* __restrict__ log_bias, int64_t GE) {
  __shared__ int32_t sh[kWarp];
  int32_t any = 0;
  for (int64_t i = threadIdx.x; i < GE; i += blockDim.x) any |= log_bias[i] != 0.f;  // NaN counts as nonzero
  any = block_sum(any, sh);
  if (threadIdx.x == 0) *on = any > 0;
}

__global__ void lb_rho_kernel(double* __restrict__ rho, const float* __restrict__ log_bias, int64_t GE) {
  for (int64_t i = gtid(); i < GE; i += gstride()) rho[i] = exp((double)log_bias[i]);  // exp(-inf) = 0: pruned
}

__global__ void lb_inv_share_kernel(float* __restrict__ inv_share, const double* __restrict__ rho, int64_t E,
                                    int64_t G) {
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = (int64_t)gridDim.x * (blockDim.x / kWarp);
  for (int64_t g = (int64_t)blockIdx.x * (blockDim.x / kWarp) + threadIdx.x / kWarp; g < G; g += warps) {
    const double* r = rho + g * E;
    double rsum = 0.0;
    if (lane == 0)
      for (int64_t e = 0; e < E; ++e) rsum += r[e];
    rsum = __shfl_sync(0xffffffffu, rsum, 0);
    for (int64_t e = lane; e < E; e += kWarp) inv_share[g * E + e] = r[e] > 0.0 ? (float)(rsum / r[e]) : 0.f;
  }
}

// Stage 2: one thread per (g, e): frac, mean_prob, tokens, and term[g, e] = T_g * frac * mean_prob (* inv_share when
// on[0], which is set by lb_bias_on_kernel; on == nullptr: no target shares).
__global__ void lb_columns_kernel(float* __restrict__ frac, float* __restrict__ mean_prob, float* __restrict__ tokens,
                                  float* __restrict__ term, const float* __restrict__ s_part,
                                  const int32_t* __restrict__ c_part, const int32_t* __restrict__ t_part,
                                  const float* __restrict__ inv_share, const int32_t* __restrict__ on, int64_t E,
                                  int64_t K, int64_t G, int64_t chunks) {
  const int64_t GE = G * E;
  const bool shares = on && *on;
  for (int64_t i = gtid(); i < GE; i += gstride()) {
    const int64_t g = i / E;
    float s = 0.f;
    int64_t c = 0, t = 0;
    for (int64_t b = 0; b < chunks; ++b) {  // chunk order: deterministic
      s += s_part[b * GE + i];
      c += c_part[b * GE + i];
      t += t_part[b * G + g];
    }
    const float f = t > 0 ? (float)c / (float)(t * K) : 0.f;
    const float p = t > 0 ? s / (float)t : 0.f;
    frac[i] = f;
    mean_prob[i] = p;
    term[i] = (float)t * f * p * (shares ? inv_share[i] : 1.f);
    if (i % E == 0) tokens[g] = (float)t;
  }
}

// Stage 3, one block: loss = weight * scale * sum(term) / T_all (0 when no row counted), scale = E without
// target shares, else 1. Never inf or NaN for finite probabilities: an empty group contributes 0, T_all = 0 gives 0.
__global__ void __launch_bounds__(1024)
    lb_loss_kernel(float* __restrict__ loss, const float* __restrict__ term, const float* __restrict__ tokens,
                   const int32_t* __restrict__ on, int64_t E, int64_t G, float weight) {
  __shared__ double sh[kWarp];
  const double scale = on && *on ? 1.0 : (double)E;
  double acc = 0.0, tall = 0.0;
  for (int64_t i = threadIdx.x; i < G * E; i += blockDim.x) acc += (double)term[i];
  for (int64_t g = threadIdx.x; g < G; g += blockDim.x) tall += (double)tokens[g];
  acc = block_sum(acc, sh);
  tall = block_sum(tall, sh);
  if (threadIdx.x == 0) *loss = tall > 0 ? (float)((double)weight * scale * acc / tall) : 0.f;
}

// k = dloss * weight * scale / T_all, T_all the tokens added in group order (the CPU twin's float expressions and
// order): one thread, once, for every block of lb_backward_kernel.
__global__ void lb_scale_kernel(float* __restrict__ k, const float* __restrict__ dloss,
                                const float* __restrict__ tokens, const int32_t* __restrict__ on, int64_t E,
                                int64_t G, float weight) {
  if (blockIdx.x != 0 || threadIdx.x != 0) return;
  const double scale = on && *on ? 1.0 : (double)E;
  double tall = 0.0;
  for (int64_t g = 0; g < G; ++g) tall += (double)tokens[g];
  *k = tall > 0 ? (float)((double)dloss[0] * (double)weight * scale / tall) : 0.f;
}

// dprobs[r, e] = k * frac[g, e] (k * inv_share[g, e] * frac[g, e] with target shares: on[0]) for rows of group g in
// [0, G), else 0.
__global__ void lb_backward_kernel(float* __restrict__ dprobs, const float* __restrict__ k_in,
                                   const float* __restrict__ frac, const int32_t* __restrict__ group,
                                   const float* __restrict__ inv_share, const int32_t* __restrict__ on, int64_t R,
                                   int64_t E, int64_t G) {
  const bool shares = on && *on;
  const float k = *k_in;
  const int64_t total = R * E;
  for (int64_t i = gtid(); i < total; i += gstride()) {
    const int64_t r = i / E, e = i - r * E;
    const int32_t g = group ? group[r] : 0;
    const int64_t at = (int64_t)g * E + e;
    dprobs[i] = g < 0 || g >= G ? 0.f : shares ? (k * inv_share[at]) * frac[at] : k * frac[at];
  }
}

// ---------------------------------------------------------------- launchers


constexpr int64_t kLbMaxGE = 4096;  // stage 1's shared memory: 8 bytes per (g, e) + 4 per g, under 48 KB
static_assert(kLbMaxGE * 12 <= 48 * 1024, "stage 1's dynamic shared memory (G <= G * E) outgrows 48 KB");
constexpr int64_t kLbMaxScratch = int64_t(1) << 22;  // (g, e) partials in global scratch above kLbMaxGE

// The target shares of log_bias [G, E] into inv_share [G, E] and on [1] (both in the caller's scratch); nothing when
// log_bias is null.
void lb_target_shares(float* inv_share, int32_t* on, const float* log_bias, int64_t E, int64_t G) {
  if (!log_bias) return;
  lb_bias_on_kernel<<<1, 1024, 0, stream()>>>(on, log_bias, G * E);
  cudaCheckLaunch("lb_bias_on_kernel");
  Scratch rho((size_t)(G * E) * sizeof(double));
  lb_rho_kernel<<<grid_for(G * E, 256), 256, 0, stream()>>>(rho.at<double>(), log_bias, G * E);
  cudaCheckLaunch("lb_rho_kernel");
  lb_inv_share_kernel<<<grid_for(G, 256 / kWarp), 256, 0, stream()>>>(inv_share, rho.at<double>(), E, G);
  cudaCheckLaunch("lb_inv_share_kernel");
}

}  // namespace

void cross_entropy_forward(float* losses, float* lse, const float* logits, const int32_t* targets, int64_t N,
                           int64_t V, int32_t ignore_index) {
  CM_CHECK(N >= 0 && V >= 1, "cuda::cross_entropy_forward: N=", N, " V=", V);
  if (N == 0) return;
  CM_ROW_LAUNCH(cross_entropy_forward_kernel, N, V, losses, lse, logits, targets, N, V, ignore_index,
                index_error_record());
}

void cross_entropy_inv_valid(float* inv_valid, const int32_t* targets, int64_t N, int64_t V, int32_t ignore_index) {
  CM_CHECK(N >= 0 && V >= 0, "cuda::cross_entropy_inv_valid: N=", N, " V=", V);
  cross_entropy_inv_valid_kernel<<<1, 1024, 0, stream()>>>(inv_valid, targets, N, V, ignore_index,
                                                           index_error_record());
  cudaCheckLaunch("cross_entropy_inv_valid_kernel");
}

void cross_entropy_backward(float* dlogits, const float* logits, const float* lse, const int32_t* targets,
                            float scale, int64_t N, int64_t V, int32_t ignore_index) {
  cross_entropy_backward(dlogits, logits, lse, targets, nullptr, scale, N, V, ignore_index);
}

void cross_entropy_backward(float* dlogits, const float* logits, const float* lse, const int32_t* targets,
                            const float* gout, float scale, int64_t N, int64_t V, int32_t ignore_index) {
  CM_CHECK(N >= 0 && V >= 0, "cuda::cross_entropy_backward: N=", N, " V=", V);
  if (N == 0 || V == 0) return;
  CM_ROW_LAUNCH(cross_entropy_backward_kernel, N, V, dlogits, logits, lse, targets, gout, scale, N, V, ignore_index);
}

void z_loss_forward(float* loss, float* lse, const float* logits, int64_t R, int64_t E, float weight) {
  CM_CHECK(R >= 0 && E >= 1, "cuda::z_loss_forward: R=", R, " E=", E);
  if (R > 0) CM_ROW_LAUNCH(row_logsumexp_kernel, R, E, lse, logits, R, E);
  z_loss_reduce_kernel<<<1, 1024, 0, stream()>>>(loss, lse, R, weight);
  cudaCheckLaunch("z_loss_reduce_kernel");
}

void z_loss_backward(float* dlogits, const float* dloss, const float* logits, const float* lse, int64_t R,
                     int64_t E, float weight) {
  CM_CHECK(R >= 0 && E >= 1, "cuda::z_loss_backward: R=", R, " E=", E);
  if (R == 0) return;
  z_loss_backward_kernel<<<grid_for(R * E, 256), 256, 0, stream()>>>(dlogits, dloss, logits, lse, R, E, weight);
  cudaCheckLaunch("z_loss_backward_kernel");
}

void load_balance_forward(float* loss, float* frac, float* mean_prob, float* tokens, const float* probs,
                          const int32_t* indices, const int32_t* group, const float* log_bias, int64_t R, int64_t E,
                          int64_t K, int64_t G, float weight) {
  CM_CHECK(R >= 0 && E >= 1 && K >= 1 && G >= 1, "cuda::load_balance_forward: R=", R, " E=", E, " K=", K, " G=", G);
  CM_CHECK(group || G == 1, "cuda::load_balance_forward: G=", G, " groups need a group array");
  const int64_t GE = G * E;
  // Chunks: a constant target (about two per SM of an H100), so the chunking, and with it the rounding of the
  // probability sums, is a function of the sizes only: the same bits on every GPU model, not only on the same one.
  // Above kLbMaxGE the partials live in global scratch, capped at kLbMaxScratch (g, e) entries.
  const bool shared = GE <= kLbMaxGE;
  const int64_t chunks_target = shared ? 256 : std::max<int64_t>(1, std::min<int64_t>(256, kLbMaxScratch / GE));
  const int64_t RC = R > 0 ? ceil_div(R, chunks_target) : 1;
  const int64_t chunks = R > 0 ? ceil_div(R, RC) : 0;
  const size_t s_bytes = align256((size_t)(chunks * GE) * 4), c_bytes = s_bytes,
               t_bytes = align256((size_t)(chunks * G) * 4), term_bytes = align256((size_t)GE * 4),
               q_bytes = log_bias ? align256((size_t)GE * 4) + 256 : 0;
  Scratch s(s_bytes + c_bytes + t_bytes + term_bytes + q_bytes);
  float* s_part = s.at<float>();
  int32_t* c_part = s.at<int32_t>(s_bytes);
  int32_t* t_part = s.at<int32_t>(s_bytes + c_bytes);
  float* term = s.at<float>(s_bytes + c_bytes + t_bytes);
  float* inv_share = log_bias ? s.at<float>(s_bytes + c_bytes + t_bytes + term_bytes) : nullptr;
  int32_t* on = log_bias ? s.at<int32_t>(s_bytes + c_bytes + t_bytes + term_bytes + q_bytes - 256) : nullptr;
  lb_target_shares(inv_share, on, log_bias, E, G);
  if (chunks > 0 && shared) {
    const size_t smem = (size_t)GE * 8 + (size_t)G * 4;
    lb_partial_kernel<true><<<(unsigned)chunks, 256, smem, stream()>>>(s_part, c_part, t_part, probs, indices, group,
                                                                        R, E, K, G, RC);
    cudaCheckLaunch("lb_partial_kernel<shared>");
  } else if (chunks > 0) {
    lb_partial_kernel<false><<<(unsigned)chunks, 256, 0, stream()>>>(s_part, c_part, t_part, probs, indices, group,
                                                                      R, E, K, G, RC);
    cudaCheckLaunch("lb_partial_kernel<global>");
  }
  lb_columns_kernel<<<grid_for(GE, 256), 256, 0, stream()>>>(frac, mean_prob, tokens, term, s_part, c_part, t_part,
                                                             inv_share, on, E, K, G, chunks);
  cudaCheckLaunch("lb_columns_kernel");
  lb_loss_kernel<<<1, 1024, 0, stream()>>>(loss, term, tokens, on, E, G, weight);
  cudaCheckLaunch("lb_loss_kernel");
}

void load_balance_backward(float* dprobs, const float* dloss, const float* frac, const float* tokens,
                           const int32_t* group, const float* log_bias, int64_t R, int64_t E, int64_t G,
                           float weight) {
  CM_CHECK(R >= 0 && E >= 1 && G >= 1, "cuda::load_balance_backward: R=", R, " E=", E, " G=", G);
  if (R == 0) return;
  const size_t q_bytes = log_bias ? align256((size_t)(G * E) * 4) : 0;
  Scratch s(q_bytes + (log_bias ? 256 : 0) + 256);
  float* inv_share = log_bias ? s.at<float>() : nullptr;
  int32_t* on = log_bias ? s.at<int32_t>(q_bytes) : nullptr;
  float* k = s.at<float>(q_bytes + (log_bias ? 256 : 0));
  lb_target_shares(inv_share, on, log_bias, E, G);
  lb_scale_kernel<<<1, 1, 0, stream()>>>(k, dloss, tokens, on, E, G, weight);
  cudaCheckLaunch("lb_scale_kernel");
  lb_backward_kernel<<<grid_for(R * E, 256), 256, 0, stream()>>>(dprobs, k, frac, group, inv_share, on, R, E, G);
  cudaCheckLaunch("lb_backward_kernel");
}

}  // namespace cm::cuda
