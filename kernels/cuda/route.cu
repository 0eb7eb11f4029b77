// CUDA router level kernels (kernels/route.h). Nothing here waits for the stream.
//   logits forward:  the pairs sorted by node (as for dW below), then one grouped GEMM (kernels/cuda/grouped_gemm.cu,
//                    the token rows gathered, each node's b rows of W as its weight) and the rows put back in pair
//                    order: the CPU twin's GEMM, so its bits, and each W tile read once per 64 pairs of its node.
//   dh:              the same sort, each pair's row dlogits[p] W_j by the grouped GEMM's backward (the CPU's
//                    gemm_row bits), then a thread per (token, channel) adds its pairs' rows to 0 in increasing
//                    node order, as the CPU does: its bits.
//   dW:              the same sort (integer histogram, dispatch_offsets, the stable dispatch_scatter); then each
//                    node's pairs in the CPU GEMM's K blocks, summed side by side and added in block order.
//   selection:       one warp per pair: softmax of the scaled, biased logits (warp max and sum), the probabilities
//                    written, then k rounds of warp arg-best over probs + aux-free bias (pruned children -inf) in
//                    kernels/topk.h's order; lanes 0..k-1 write the gates, path and child ids.
//   entropy:         one warp per row, the same per-row terms as the selection's (RowEntropy), then the rows'
//                    mean by sum_all (kernels/reduce.h: fixed blocks of rows in double, then their sums).
//   group_limited:   one warp per token walks the levels: per kept node, the lanes score its children (a double
//                    sum over each child's leaves in leaf order, + aux-free bias), once when they fit the warp's
//                    shared cache, then k rounds of warp arg-best in kernels/topk.h's order.
// All floating-point sums have a fixed order: the same bits on every run. Only the integer counts use atomics.
#include <climits>
#include <cstdint>
#include <vector>

#include "kernels/cuda/common.cuh"
#include "kernels/dispatch.h"
#include "kernels/gemm.h"
#include "kernels/grouped_gemm.h"
#include "kernels/reduce.h"
#include "kernels/route.h"

namespace cm::cuda {

namespace {

constexpr int kThreads = 128;  // 4 warps per block

// W_j of a routed level's nodes, for the grouped GEMM: ptr[j] = W + j * b * C (made on the device: no upload).
__global__ void node_weights_kernel(const float** __restrict__ ptr, const float* __restrict__ W, int64_t n,
                                    int64_t bC) {
  for (int64_t j = gtid(); j < n; j += gstride()) ptr[j] = W + j * bC;
}

// logits[p] = rows[row_of[p]]: the node-major rows back in pair order; NaN for a pair whose node is out of range
// (it has no row; the index check reports it).
__global__ void unsort_rows_kernel(float* __restrict__ logits, const float* __restrict__ rows,
                                   const int32_t* __restrict__ row_of, int64_t P, int64_t b) {
  for (int64_t i = gtid(); i < P * b; i += gstride()) {
    const int32_t r = row_of[i / b];
    logits[i] = r >= 0 ? rows[(int64_t)r * b + i % b] : NAN;
  }
}

// dlogits' rows in node-major order for the grouped GEMM: sorted[i] = dlogits[order[i]].
__global__ void sort_rows_kernel(float* __restrict__ sorted, const float* __restrict__ dlogits,
                                 const int32_t* __restrict__ order, const int64_t* __restrict__ offsets, int64_t n,
                                 int64_t b) {
  const int64_t rows = offsets[n];
  for (int64_t i = gtid(); i < rows * b; i += gstride()) sorted[i] = dlogits[(int64_t)order[i / b] * b + i % b];
}

// dh[t, q] = 0 + the rows of token t's pairs (rows [row_of[p], C]), in increasing (node, p) order: the CPU twin's
// sum. Pairs out of range (no row) add nothing.
__global__ void pair_rows_sum_kernel(float* __restrict__ dh, const float* __restrict__ rows,
                                     const int32_t* __restrict__ row_of, const int32_t* __restrict__ node, int64_t T,
                                     int64_t Kp, int64_t C) {
  for (int64_t i = gtid(); i < T * C; i += gstride()) {
    const int64_t t = i / C, q = i % C;
    const int32_t* nt = node + t * Kp;
    float acc = 0.f;
    for (int64_t m = 0, last = -1; m < Kp; ++m) {  // the next pair in (node, p) order after `last`
      int64_t next = -1;
      for (int64_t k = 0; k < Kp; ++k) {
        const bool after = last < 0 || nt[k] > nt[last] || (nt[k] == nt[last] && k > last);
        if (after && (next < 0 || nt[k] < nt[next] || (nt[k] == nt[next] && k < next))) next = k;
      }
      last = next;
      const int32_t r = row_of[t * Kp + next];
      if (r >= 0) acc += rows[(int64_t)r * C + q];
    }
    dh[i] = acc;
  }
}

__global__ void count_kernel(unsigned long long* __restrict__ counts, const int32_t* __restrict__ ids, int64_t A,
                             int64_t n) {
  for (int64_t i = gtid(); i < A; i += gstride()) {
    const int32_t j = ids[i];
    if (j >= 0 && j < n) atomicAdd(counts + j, 1ull);
  }
}

__global__ void histogram_kernel(int32_t* __restrict__ counts, const int32_t* __restrict__ ids, int64_t A, int64_t n) {
  for (int64_t i = gtid(); i < A; i += gstride()) {
    const int32_t j = ids[i];
    if (j >= 0 && j < n) atomicAdd(counts + j, 1);
  }
}

// dW of a routed level, element by element as the CPU twin's grouped GEMM makes it (kernels/grouped_gemm.h,
// backward_weight): node j's pairs, in order (order[offsets[j] .. offsets[j + 1]), stable), in K blocks of
// gemm_k_block(m_j) pairs; per block the sum from 0 by fused multiply-adds in pair order; then dW = block 0's sum,
// dW = block i's + dW. The blocks run side by side (a node's pairs were one warp's serial walk: a few warps for the
// whole level), their sums in part, and a second kernel adds them in block order: the CPU's bits on every run.

// cnt[j] = the number of K blocks of node j's pairs (0 for a node no pair reached).
__global__ void w_blocks_kernel(unsigned long long* __restrict__ cnt, const int64_t* __restrict__ offsets, int64_t n) {
  for (int64_t j = gtid(); j < n; j += gstride()) {
    const int64_t m = offsets[j + 1] - offsets[j], kb = cpu::gemm_k_block(m);
    cnt[j] = m > 0 ? (unsigned long long)((m + kb - 1) / kb) : 0ull;
  }
}

// One warp per (K block g, child c), lanes over C: part[g, c, :] = that block's sum. first[j] is node j's first
// block (first[n] blocks in all); tasks = an upper bound on blocks * b (the host does not read first[n]).
__global__ void w_block_sums_kernel(float* __restrict__ part, const float* __restrict__ dlogits,
                                    const float* __restrict__ h, const int32_t* __restrict__ order,
                                    const int64_t* __restrict__ offsets, const int64_t* __restrict__ first,
                                    int64_t Kp, int64_t n, int64_t b, int64_t C, int64_t tasks) {
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = (int64_t)gridDim.x * (blockDim.x / kWarp);
  for (int64_t w = (int64_t)blockIdx.x * (blockDim.x / kWarp) + threadIdx.x / kWarp; w < tasks; w += warps) {
    const int64_t g = w / b, c = w % b;
    if (g >= first[n]) continue;
    const int64_t j = segment_of(first, n, g);  // the node of block g
    const int64_t a = offsets[j], z = offsets[j + 1], kb = cpu::gemm_k_block(z - a);
    const int64_t s0 = a + (g - first[j]) * kb, s1 = s0 + kb < z ? s0 + kb : z;
    for (int64_t q = lane; q < C; q += kWarp) {
      float acc = 0.f;
      for (int64_t s = s0; s < s1; ++s) {
        const int64_t p = order[s];
        acc = fmaf(dlogits[p * b + c], h[(p / Kp) * C + q], acc);
      }
      part[(g * b + c) * C + q] = acc;
    }
  }
}

// dW[j, c, q] = its node's block sums added in block order (0 for a node no pair reached).
__global__ void w_blocks_add_kernel(float* __restrict__ dW, const float* __restrict__ part,
                                    const int64_t* __restrict__ first, int64_t n, int64_t b, int64_t C) {
  const int64_t bc = b * C;
  for (int64_t i = gtid(); i < n * bc; i += gstride()) {
    const int64_t j = i / bc, r = i - j * bc, g0 = first[j], g1 = first[j + 1];
    float v = 0.f;
    if (g1 > g0) {
      v = part[g0 * bc + r];
      for (int64_t g = g0 + 1; g < g1; ++g) v = part[g * bc + r] + v;
    }
    dW[i] = v;
  }
}

// ---------------------------------------------------------------- the fused selection, one warp per pair

// One row's entropy from its probabilities p = softmax(s) and s, as kernels/cpu/route.cpp row_entropy:
// H = -log(max p) * sum p - sum p (s - max s). Each lane adds the columns it owns; warp_entropy combines them.
struct RowEntropy {
  float pmax = 0.f, psum = 0.f, ps = 0.f;
  // One column: p its probability, sm = s - max s. Only p > 0 counts (pruned children, NaN rows add nothing).
  __device__ void add(float p, float sm) {
    if (p > 0.f) {
      pmax = fmaxf(pmax, p);
      psum += p;
      ps += p * sm;
    }
  }
  // The row's entropy, on every lane (all 32 lanes must call it).
  __device__ float warp_entropy() const {
    const float mx = warp_max(pmax), sp = warp_sum(psum), sps = warp_sum(ps);
    return mx > 0.f ? -logf(mx) * sp - sps : 0.f;
  }
};

__global__ void select_kernel(float* __restrict__ probs, float* __restrict__ path, int32_t* __restrict__ child,
                              int32_t* __restrict__ idx, float* __restrict__ ent_rows, const float* __restrict__ logits,
                              const int32_t* __restrict__ node, const float* __restrict__ path_parent,
                              const float* __restrict__ lbias, const float* __restrict__ abias, float inv_temp,
                              int64_t P, int64_t n, int b, int k, bool renorm) {
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = (int64_t)gridDim.x * (blockDim.x / kWarp);
  for (int64_t p = (int64_t)blockIdx.x * (blockDim.x / kWarp) + threadIdx.x / kWarp; p < P; p += warps) {
    const int64_t j = node ? (int64_t)node[p] : 0;
    const bool ok = j >= 0 && j < n;
    const int64_t a = (ok ? j : 0) * b;
    const float* lr = logits + p * b;
    float* pr = probs + p * b;
    auto s_of = [&](int c) {
      float v = lr[c];
      // Two roundings, as the CPU's two passes make them: written as one expression, nvcc fuses them into an fma.
      if (inv_temp != 1.f) v = __fmul_rn(v, inv_temp);
      if (lbias) v = __fadd_rn(v, lbias[a + c]);
      return ok ? v : NAN;
    };
    float m = -INFINITY;
    for (int c = lane; c < b; c += kWarp) m = fmaxf(m, s_of(c));
    m = warp_max(m);
    float sum = 0.f;
    for (int c = lane; c < b; c += kWarp) sum += expf(s_of(c) - m);
    const float inv = 1.0f / warp_sum(sum);
    RowEntropy ent;
    for (int c = lane; c < b; c += kWarp) {
      const float sc = s_of(c), pc = expf(sc - m) * inv;
      pr[c] = pc;
      ent.add(pc, sc - m);
    }
    __syncwarp();  // the selection below reads probabilities other lanes wrote
    if (ent_rows) {
      const float e = ent.warp_entropy();
      if (lane == 0) ent_rows[p] = e;
    }
    // k rounds of arg-best over the scores; round i takes the best that ranks below winner i-1 (a strict order:
    // "below the previous winner" is "not taken yet"). Each lane rereads only the probabilities it wrote. Slot i
    // belongs to lane i % 32: the round writes its child and index, and its kept probability into path (NaN for a
    // pruned child or a bad node), which the same lane turns into the gate once the rounds have the renorm's sum.
    float pv = 0.f, total = 0.f;
    int pi = -1;
    for (int i = 0; i < k; ++i) {
      float v = -INFINITY;
      int vi = INT_MAX;
      for (int c = lane; c < b; c += kWarp) {
        float sc = pr[c] + (abias ? abias[a + c] : 0.f);
        if (lbias && isinf(lbias[a + c]) && lbias[a + c] < 0) sc = -INFINITY;
        if ((i == 0 || beats(pv, pi, sc, c)) && beats(sc, c, v, vi)) {
          v = sc;
          vi = c;
        }
      }
      warp_best(v, vi);
      const float g = pr[vi];  // every lane reads the winner's probability (written by its lane: sync first)
      total += g;              // renorm's sum, in selection order (the CPU sums in double: within rounding)
      if (lane == i % kWarp) {
        const bool bad = lbias && isinf(lbias[a + vi]) && lbias[a + vi] < 0;
        path[p * k + i] = bad || !ok ? NAN : g;
        child[p * k + i] = (int32_t)(a + vi);
        if (idx) idx[p * k + i] = vi;
      }
      pv = v;
      pi = vi;
      __syncwarp();
    }
    for (int i = lane; i < k; i += kWarp) {
      const float sel = path[p * k + i];
      const float gate = renorm ? sel / total : sel;
      path[p * k + i] = path_parent ? path_parent[p] * gate : gate;  // a NaN kept probability stays NaN
    }
  }
}

__global__ void select_backward_kernel(float* __restrict__ dprobs, float* __restrict__ dparent,
                                       const float* __restrict__ dpath, const float* __restrict__ probs,
                                       const int32_t* __restrict__ child, const float* __restrict__ path_parent,
                                       int64_t P, int b, int k, bool renorm) {
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = (int64_t)gridDim.x * (blockDim.x / kWarp);
  for (int64_t p = (int64_t)blockIdx.x * (blockDim.x / kWarp) + threadIdx.x / kWarp; p < P; p += warps) {
    float* dr = dprobs + p * b;
    for (int c = lane; c < b; c += kWarp) dr[c] = 0.f;
    __syncwarp();
    if (lane == 0) {
      const float* pr = probs + p * b;
      const float par = path_parent ? path_parent[p] : 1.f;
      float S = 0.f, dot = 0.f, dp = 0.f;
      for (int i = 0; i < k; ++i) S += pr[child[p * k + i] % b];
      for (int i = 0; i < k; ++i) {
        const float sel = pr[child[p * k + i] % b], gate = renorm ? sel / S : sel;
        const float dg = path_parent ? dpath[p * k + i] * par : dpath[p * k + i];
        dp += dpath[p * k + i] * gate;
        dot += dg * sel;
      }
      for (int i = 0; i < k; ++i) {
        const float dg = path_parent ? dpath[p * k + i] * par : dpath[p * k + i];
        // renorm: d(sel_i / S) = dg_i / S - sum_j dg_j sel_j / S^2
        // into the zeroed row, as the CPU adds it (0.f + -0.f is +0.f)
        dr[child[p * k + i] % b] = 0.f + (renorm ? dg / S - dot / (S * S) : dg);
      }
      if (dparent) dparent[p] = dp;
    }
    __syncwarp();
  }
}

// route_select_backward on through the softmax and the temperature, one warp per pair: every lane works out the
// pair's kept gradients (k is small), the softmax's dot takes them in the CPU twin's order (16 lane sums in ascending
// column order, then the tree fold), and the lanes write the row's gradient.
__global__ void select_backward_logits_kernel(float* __restrict__ dlogits, float* __restrict__ dparent,
                                              const float* __restrict__ dpath, const float* __restrict__ probs,
                                              const int32_t* __restrict__ child,
                                              const float* __restrict__ path_parent, float inv_temp, int64_t P, int b,
                                              int k, bool renorm) {
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = (int64_t)gridDim.x * (blockDim.x / kWarp);
  for (int64_t p = (int64_t)blockIdx.x * (blockDim.x / kWarp) + threadIdx.x / kWarp; p < P; p += warps) {
    const float* pr = probs + p * b;
    const int32_t* ch = child + p * k;
    const float* dp = dpath + p * k;
    const float par = path_parent ? path_parent[p] : 1.f;
    float S = 0.f, dot = 0.f, dpar = 0.f;
    for (int i = 0; i < k; ++i) S += pr[ch[i] % b];
    for (int i = 0; i < k; ++i) {
      const float sel = pr[ch[i] % b], gate = renorm ? sel / S : sel;
      const float dg = path_parent ? dp[i] * par : dp[i];
      dpar += dp[i] * gate;
      dot += dg * sel;
    }
    // d of kept probability i, as a zeroed row's entry after the add (0.f + d)
    auto dsel = [&](int i) {
      const float dg = path_parent ? dp[i] * par : dp[i];
      return 0.f + (renorm ? dg / S - dot / (S * S) : dg);
    };
    float acc[16];
    for (int j = 0; j < 16; ++j) acc[j] = 0.f;
    for (int n = 0, last = -1; n < k; ++n) {  // the kept children in ascending column order
      int next = -1;
      for (int i = 0; i < k; ++i) {
        const int c = ch[i] % b;
        if (c > last && (next < 0 || c < ch[next] % b)) next = i;
      }
      last = ch[next] % b;
      acc[last % 16] = fmaf(dsel(next), pr[last], acc[last % 16]);
    }
    for (int w = 8; w >= 1; w /= 2)
      for (int j = 0; j < w; ++j) acc[j] += acc[j + w];
    const float sdot = acc[0];
    for (int c = lane; c < b; c += kWarp) {
      float v = pr[c] * (0.f - sdot);
      for (int i = 0; i < k; ++i)
        if (ch[i] % b == c) v = pr[c] * (dsel(i) - sdot);
      dlogits[p * b + c] = inv_temp != 1.f ? v * inv_temp : v;
    }
    if (lane == 0 && dparent) dparent[p] = dpar;
  }
}

// Each row's entropy, one warp per row: rows [P] from probs and s [P, b].
__global__ void entropy_rows_kernel(float* __restrict__ rows, const float* __restrict__ probs,
                                    const float* __restrict__ s, int64_t P, int b) {
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = (int64_t)gridDim.x * (blockDim.x / kWarp);
  for (int64_t p = (int64_t)blockIdx.x * (blockDim.x / kWarp) + threadIdx.x / kWarp; p < P; p += warps) {
    const float* pr = probs + p * b;
    const float* sr = s + p * b;
    float m = -INFINITY;
    for (int c = lane; c < b; c += kWarp) m = fmaxf(m, sr[c]);
    m = warp_max(m);
    RowEntropy ent;
    for (int c = lane; c < b; c += kWarp) ent.add(pr[c], sr[c] - m);
    const float e = ent.warp_entropy();
    if (lane == 0) rows[p] = e;
  }
}

// ---------------------------------------------------------------- group_limited selection, one warp per token

constexpr int kMaxDepth = 16;
struct TreeShape {  // passed by value: the launch carries the shape, no upload
  int D;
  int64_t b[kMaxDepth], k[kMaxDepth];
};
// A warp keeps a node's child scores in shared memory when the widest level has at most this many children (32 KB
// for the block's four warps); wider levels score a lane's children again in each round.
constexpr int64_t kGroupCache = 2048;

// The score of child i of a level (kernels/route.h route_group_select): its leaves' probability mass, summed in
// double in leaf order as on the CPU (the same bits), + aux-free bias; -inf for a pruned child.
__device__ __forceinline__ float group_score(const float* prow, int64_t i, int64_t span, const float* ab,
                                             const float* lb) {
  if (lb && isinf(lb[i]) && lb[i] < 0) return -INFINITY;
  double m = 0.0;
  for (int64_t q = 0; q < span; ++q) m += prow[i * span + q];
  float v = (float)m;
  if (ab) v = v + ab[i];
  return v;
}

__global__ void group_select_kernel(int32_t* __restrict__ ids, const float* __restrict__ probs,
                                    const float* __restrict__ abias, const float* __restrict__ lbias, TreeShape sh,
                                    int64_t T, int64_t N, int64_t cache, int64_t* err) {
  extern __shared__ float gs_smem[];
  float* scores = gs_smem + (threadIdx.x / kWarp) * cache;  // this warp's [cache] (none when cache is 0)
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = (int64_t)gridDim.x * (blockDim.x / kWarp);
  for (int64_t t = (int64_t)blockIdx.x * (blockDim.x / kWarp) + threadIdx.x / kWarp; t < T; t += warps) {
    const float* prow = probs + t * N;   // [N] the token's one softmax over all leaves
    const int32_t* parent = nullptr;     // [Kp] the nodes the token kept at the level above (its block of ids)
    int32_t* level_ids = ids;            // the level's block [T * Kp * k]
    int64_t Kp = 1, n = 1, span = N, bias_at = 0;
    for (int l = 0; l < sh.D; ++l) {
      const int b = (int)sh.b[l];
      const int64_t k = sh.k[l];
      span /= b;  // leaves under one child
      const float* ab = abias ? abias + bias_at : nullptr;  // [n * b] this level's
      const float* lb = lbias ? lbias + bias_at : nullptr;
      int32_t* out = level_ids + t * Kp * k;  // the token's Kp * k kept children, node after node
      for (int64_t q = 0; q < Kp; ++q) {
        const int64_t j = parent ? (int64_t)parent[q] : 0;
        // Lane c scores children c, c + 32, ...; with the cache, once: a lane rereads only the scores it wrote.
        if (cache)
          for (int c = lane; c < b; c += kWarp) scores[c] = group_score(prow, j * b + c, span, ab, lb);
        // k rounds of warp arg-best over the node's children; round r takes the best that ranks below winner r-1 (a
        // strict order: "below the previous winner" is "not taken yet").
        float pv = 0.f;
        int pi = -1;
        for (int64_t r = 0; r < k; ++r) {
          float v = -INFINITY;
          int vi = INT_MAX;
          for (int c = lane; c < b; c += kWarp) {
            const float sc = cache ? scores[c] : group_score(prow, j * b + c, span, ab, lb);
            if ((r == 0 || beats(pv, pi, sc, c)) && beats(sc, c, v, vi)) {
              v = sc;
              vi = c;
            }
          }
          warp_best(v, vi);
          if (lane == 0) {
            // A pruned child won: its node has fewer than k selectable children (recorded; raised at a read-out).
            if (lb && isinf(lb[j * b + vi]) && lb[j * b + vi] < 0) record_bad_index(err, IndexOp::GroupSelect, l, j, k);
            out[q * k + r] = (int32_t)(j * b + vi);
          }
          pv = v;
          pi = vi;
        }
      }
      __syncwarp();  // the next level reads the ids lane 0 wrote
      parent = out;
      level_ids += T * Kp * k;
      Kp *= k;
      bias_at += n * b;
      n *= b;
    }
  }
}

void check_sizes(const char* what, int64_t P, int64_t Kp, int64_t b, int64_t C) {
  CM_CHECK(P >= 0 && Kp >= 1 && b >= 0 && C >= 0 && P % Kp == 0, what, ": P=", P, " Kp=", Kp, " b=", b, " C=", C);
}

// A routed level's P pairs grouped by node on the device, by the dispatch plan's stable counting sort: offsets
// [n + 1] (node j's rows), row_of [P] (a pair's row in node-major order; -1 for a node out of range), order [P]
// (the pair at each row), and, given W [n * b, C], the nodes' weights for the grouped GEMM (wj[j] = W + j * b * C).
// Everything lives in scratch of its own, freed with it (later work on the stream runs after what reads it).
struct NodeSort {
  Scratch s;
  int64_t* offsets;
  int32_t *row_of, *order;
  const float** wj;
  NodeSort(const char* what, const int32_t* node, int64_t P, int64_t n, const float* W = nullptr, int64_t bC = 0)
      : s(bytes(P, n)) {
    CM_CHECK(n >= 1 && n <= 12288, what, ": n=", n, " nodes (the dispatch sort takes 1..12288)");
    const size_t cb = align256((size_t)n * 8), ob = align256((size_t)(n + 1) * 8), pb = align256((size_t)P * 4 + 4);
    auto* counts = s.at<unsigned long long>();
    offsets = s.at<int64_t>(cb);
    row_of = s.at<int32_t>(cb + ob);
    order = s.at<int32_t>(cb + ob + pb);
    wj = s.at<const float*>(cb + ob + 2 * pb);
    cudaCheck(cudaMemsetAsync(counts, 0, (size_t)n * 8, stream()));
    if (P > 0) {
      count_kernel<<<grid_for(P, kThreads), kThreads, 0, stream()>>>(counts, node, P, n);
      cudaCheckLaunch("route count_kernel");
    }
    dispatch_offsets(offsets, (const int64_t*)counts, n);
    if (P > 0) dispatch_scatter(row_of, order, node, offsets, P, n);
    if (W) {
      node_weights_kernel<<<grid_for(n, kThreads), kThreads, 0, stream()>>>(wj, W, n, bC);
      cudaCheckLaunch("route node_weights_kernel");
    }
  }
  static size_t bytes(int64_t P, int64_t n) {
    return 2 * align256((size_t)n * 8) + align256((size_t)(n + 1) * 8) + 2 * align256((size_t)P * 4 + 4);
  }
};

}  // namespace

void route_logits_forward(float* logits, const float* h, const float* W, const int32_t* node, int64_t P, int64_t Kp,
                          int64_t n, int64_t b, int64_t C) {
  check_sizes("cuda::route_logits_forward", P, Kp, b, C);
  if (P * b == 0) return;
  if (!node) {  // one node: h W^T by cuBLAS
    gemm(logits, b, h, C, W, C, P, b, C, false, true);
    return;
  }
  const NodeSort g("cuda::route_logits_forward", node, P, n, W, b * C);
  Scratch rows((size_t)(P * b) * 4);  // the logits node-major
  grouped_gemm_forward(rows.at<float>(), h, g.wj, g.offsets, n, P, b, C, nullptr, false, RowGather{g.order, Kp});
  unsort_rows_kernel<<<grid_for(P * b, kThreads), kThreads, 0, stream()>>>(logits, rows.at<float>(), g.row_of, P, b);
  cudaCheckLaunch("route unsort_rows_kernel");
}

void route_logits_backward_h(float* dh, const float* dlogits, const float* W, const int32_t* node, int64_t T,
                             int64_t Kp, int64_t n, int64_t b, int64_t C) {
  check_sizes("cuda::route_logits_backward_h", T * Kp, Kp, b, C);
  if (T * C == 0) return;
  if (!node) {  // one node: dlogits W by cuBLAS
    gemm(dh, C, dlogits, b, W, C, T, C, b, false, false);
    return;
  }
  const int64_t P = T * Kp;
  const NodeSort g("cuda::route_logits_backward_h", node, P, n, W, b * C);
  Scratch dls((size_t)(P * b) * 4), rows((size_t)(P * C) * 4);  // dlogits and the pairs' rows, node-major
  sort_rows_kernel<<<grid_for(P * b, kThreads), kThreads, 0, stream()>>>(dls.at<float>(), dlogits, g.order,
                                                                        g.offsets, n, b);
  cudaCheckLaunch("route sort_rows_kernel");
  grouped_gemm_backward_input(rows.at<float>(), dls.at<float>(), g.wj, g.offsets, n, P, b, C, false);
  pair_rows_sum_kernel<<<grid_for(T * C, kThreads), kThreads, 0, stream()>>>(dh, rows.at<float>(), g.row_of, node, T,
                                                                            Kp, C);
  cudaCheckLaunch("route pair_rows_sum_kernel");
}

void route_logits_backward_w(float* dW, const float* dlogits, const float* h, const int32_t* node, int64_t P,
                             int64_t Kp, int64_t n, int64_t b, int64_t C) {
  check_sizes("cuda::route_logits_backward_w", P, Kp, b, C);
  if (n * b * C == 0) return;
  if (!node) {  // one node: dlogits^T h by cuBLAS
    gemm(dW, C, dlogits, b, h, C, b, C, P, true, false);
    return;
  }
  const NodeSort g("cuda::route_logits_backward_w", node, P, n);
  const int64_t* offsets = g.offsets;
  const int32_t* order = g.order;
  // Scratch: blocks per node [n] (u64), their offsets [n+1] (i64), the block sums [blocks, b, C]. Blocks: at most
  // ceil(m_j / 384) per node, so at most P / 384 + n in all.
  const int64_t max_blocks = P / cpu::kGemmKC + n;
  const size_t cb = align256((size_t)n * 8), ob = align256((size_t)(n + 1) * 8);
  Scratch s(cb + ob + (size_t)(max_blocks * b * C) * 4);
  unsigned long long* blocks = s.at<unsigned long long>();
  int64_t* first = s.at<int64_t>(cb);
  float* part = s.at<float>(cb + ob);
  w_blocks_kernel<<<grid_for(n, kThreads), kThreads, 0, stream()>>>(blocks, offsets, n);
  cudaCheckLaunch("route w_blocks_kernel");
  dispatch_offsets(first, (const int64_t*)blocks, n);
  if (P > 0) {
    const int64_t tasks = max_blocks * b;
    w_block_sums_kernel<<<grid_for(tasks, kThreads / kWarp), kThreads, 0, stream()>>>(
        part, dlogits, h, order, offsets, first, Kp, n, b, C, tasks);
    cudaCheckLaunch("route w_block_sums_kernel");
  }
  w_blocks_add_kernel<<<grid_for(n * b * C, kThreads), kThreads, 0, stream()>>>(dW, part, first, n, b, C);
  cudaCheckLaunch("route w_blocks_add_kernel");
}

void route_histogram(int32_t* counts, const int32_t* ids, int64_t A, int64_t n, bool accumulate) {
  CM_CHECK(A >= 0 && n >= 0, "cuda::route_histogram: A=", A, " n=", n);
  if (n == 0) return;
  if (!accumulate) cudaCheck(cudaMemsetAsync(counts, 0, (size_t)n * 4, stream()));
  if (A == 0) return;
  histogram_kernel<<<grid_for(A, kThreads), kThreads, 0, stream()>>>(counts, ids, A, n);
  cudaCheckLaunch("route histogram_kernel");
}

namespace {
__global__ void pair_keys_kernel(int32_t* __restrict__ keys, const int32_t* __restrict__ expert,
                                 const int32_t* __restrict__ tokens, int64_t A, int64_t K, int64_t N, int64_t V) {
  for (int64_t a = gtid(); a < A; a += gstride()) {
    const int64_t e = expert[a], v = tokens[a / K];
    keys[a] = e >= 0 && e < N && v >= 0 && v < V ? (int32_t)(e * V + v) : -1;
  }
}
__global__ void top1_kernel(int32_t* __restrict__ top1, const int32_t* __restrict__ expert,
                            const float* __restrict__ gate, int64_t T, int64_t K) {
  for (int64_t t = gtid(); t < T; t += gstride()) {
    int64_t best = 0;
    for (int64_t j = 1; j < K; ++j)
      if (gate[t * K + j] > gate[t * K + best]) best = j;
    top1[t] = expert[t * K + best];
  }
}
}  // namespace

namespace {
__global__ void offset_counts_kernel(int32_t* __restrict__ rows, const int64_t* __restrict__ offsets, int64_t N) {
  for (int64_t e = gtid(); e < N; e += gstride()) rows[e] = (int32_t)(offsets[e + 1] - offsets[e]);
}
__global__ void counts_add_kernel(int64_t* __restrict__ acc, const int32_t* __restrict__ counts, int64_t n) {
  for (int64_t i = gtid(); i < n; i += gstride()) acc[i] += counts[i];
}
// One thread per node: the CPU's arithmetic (kernels/route.h shared::aux_bias_node_update).
__global__ void aux_bias_update_kernel(float* __restrict__ bias, int64_t* __restrict__ load, int64_t n, int64_t b,
                                       float rate) {
  for (int64_t node = gtid(); node < n; node += gstride())
    shared::aux_bias_node_update(bias + node * b, load + node * b, b, rate);
}
}  // namespace

void route_offset_counts(int32_t* rows, const int64_t* offsets, int64_t N) {
  CM_CHECK(N >= 0, "cuda::route_offset_counts: N=", N);
  if (N == 0) return;
  offset_counts_kernel<<<grid_for(N, kThreads), kThreads, 0, stream()>>>(rows, offsets, N);
  cudaCheckLaunch("route offset_counts_kernel");
}

void route_counts_add(int64_t* acc, const int32_t* counts, int64_t n) {
  CM_CHECK(n >= 0, "cuda::route_counts_add: n=", n);
  if (n == 0) return;
  counts_add_kernel<<<grid_for(n, kThreads), kThreads, 0, stream()>>>(acc, counts, n);
  cudaCheckLaunch("route counts_add_kernel");
}

void route_aux_bias_update(float* bias, int64_t* load, int64_t n, int64_t b, float rate) {
  CM_CHECK(n >= 0 && b >= 1, "cuda::route_aux_bias_update: n=", n, " b=", b);
  if (n == 0) return;
  aux_bias_update_kernel<<<grid_for(n, kThreads), kThreads, 0, stream()>>>(bias, load, n, b, rate);
  cudaCheckLaunch("route aux_bias_update_kernel");
}

namespace {
// w and has of each (label, feature). Block (k, kThreads features): thread q walks label k's tokens in order (the CPU's
// sums: the mean, then the mean absolute deviation), kAcTokens at a time: their ids staged in shared memory, then
// that many loads of h in flight per thread before its adds (a thread walking the tokens alone waited on every load,
// order[j] then h, in turn: a hot label's C threads for thousands of tokens).
constexpr int kAcTokens = 32;
__global__ void __launch_bounds__(kThreads)
    ac_weights_kernel(double* __restrict__ w, int32_t* __restrict__ has, const float* __restrict__ h,
                      const int32_t* __restrict__ order, const int64_t* __restrict__ offsets, int64_t C) {
  __shared__ int64_t tok[kAcTokens];
  const int64_t k = blockIdx.x, q = (int64_t)blockIdx.y * kThreads + threadIdx.x;
  const int64_t a = offsets[k], n = offsets[k + 1] - a;
  if (blockIdx.y == 0 && threadIdx.x == 0) has[k] = n > 0;
  if (n == 0) {  // the same for the whole block
    if (q < C) w[k * C + q] = 0.0;
    return;
  }
  double mean = 0.0, mad = 0.0;
  for (int pass = 0; pass < 2; ++pass) {
    for (int64_t j0 = 0; j0 < n; j0 += kAcTokens) {
      const int cnt = (int)(n - j0 < kAcTokens ? n - j0 : kAcTokens);
      if ((int)threadIdx.x < cnt) tok[threadIdx.x] = order[a + j0 + threadIdx.x];
      __syncthreads();
      float v[kAcTokens];
#pragma unroll
      for (int j = 0; j < kAcTokens; ++j) v[j] = q < C && j < cnt ? h[tok[j] * C + q] : 0.f;
      for (int j = 0; j < cnt; ++j) {
        if (pass == 0)
          mean += v[j];
        else
          mad += fabs(v[j] - mean);
      }
      __syncthreads();  // tok is rewritten next
    }
    if (pass == 0) mean /= (double)n;
  }
  if (q < C) w[k * C + q] = 1.0 / (mad / (double)n + 1e-4);
}

// rows[k] = the sum of w[k, :] over q in q order (0 for an unlabelled k), a warp per 32 rows (warp_row_sums,
// common.cuh).
constexpr int kAcRowWarps = 4;
__global__ void ac_rows_kernel(double* __restrict__ rows, const double* __restrict__ w,
                               const int64_t* __restrict__ offsets, int64_t N, int64_t C) {
  __shared__ double tiles[kAcRowWarps][kWarp][kWarp + 1];
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = (int64_t)gridDim.x * kAcRowWarps;
  for (int64_t r0 = ((int64_t)blockIdx.x * kAcRowWarps + threadIdx.x / kWarp) * kWarp; r0 < N; r0 += warps * kWarp) {
    const int nr = (int)(N - r0 < kWarp ? N - r0 : kWarp);
    const double row = warp_row_sums(w, r0, nr, C, tiles[threadIdx.x / kWarp], [](double x) { return x; });
    if (lane < nr) rows[r0 + lane] = offsets[r0 + lane + 1] != offsets[r0 + lane] ? row : 0.0;
  }
}

// One thread: the clip from the labelled rows' sums added in k order (the CPU twin's), into clip[0]; the labelled
// count into clip[1].
__global__ void ac_clip_kernel(double* __restrict__ clip, const double* __restrict__ rows,
                               const int64_t* __restrict__ offsets, int64_t N, int64_t C) {
  if (blockIdx.x != 0 || threadIdx.x != 0) return;
  double wsum = 0.0;
  int64_t labelled = 0;
  for (int64_t k = 0; k < N; ++k) {
    if (offsets[k + 1] == offsets[k]) continue;
    ++labelled;
    wsum += rows[k];
  }
  clip[0] = labelled ? 10.0 * wsum / (double)(labelled * C) : 0.0;
  clip[1] = (double)labelled;
}

__device__ __forceinline__ double clipped(double w, double cl) { return cl < w ? cl : w; }  // std::min's (NaN stays)

// Thread q: the clipped weights' mean over the labelled k, in k order, into mq[q] (consecutive q: coalesced).
__global__ void ac_mean_kernel(double* __restrict__ mq, const double* __restrict__ w, const double* __restrict__ clip,
                               const int32_t* __restrict__ has, int64_t N, int64_t C) {
  const double cl = clip[0], labelled = clip[1];
  if (labelled == 0.0) return;  // m = 1 everywhere: mq unread
  for (int64_t q = gtid(); q < C; q += gstride()) {
    double acc = 0.0;
    for (int64_t k = 0; k < N; ++k)
      if (has[k]) acc += clipped(w[k * C + q], cl);
    mq[q] = acc / labelled;
  }
}

// Thread (k, q): m, and the running m of a labelled k.
__global__ void ac_scale_kernel(float* __restrict__ m, float* __restrict__ run, const double* __restrict__ w,
                                const double* __restrict__ clip, const double* __restrict__ mq,
                                const int32_t* __restrict__ has, int64_t N, int64_t C) {
  const double cl = clip[0];
  const bool any = clip[1] != 0.0;
  for (int64_t i = gtid(); i < N * C; i += gstride()) {
    const int64_t k = i / C, q = i - k * C;
    const bool on = any && has[k];
    m[i] = on ? (float)(clipped(w[i], cl) / mq[q]) : 1.0f;
    if (run && on) run[i] = fmaf(0.9f, run[i], 0.1f * m[i]);  // the CPU twin's one fma
  }
}
}  // namespace

void ac_scales_forward(float* m, int32_t* has, float* run, double* w, const float* h, const int32_t* order,
                       const int64_t* offsets, int64_t N, int64_t C) {
  CM_CHECK(N >= 1 && C >= 1 && N <= INT32_MAX && ceil_div(C, kThreads) <= 65535, "cuda::ac_scales_forward: N=", N,
           " C=", C);
  double* rows = w + N * C;  // each label's sum of w
  double* clip = rows + N;   // the clip and the labelled count
  double* mq = clip + 2;     // each feature's mean clipped weight
  ac_weights_kernel<<<dim3((unsigned)N, (unsigned)ceil_div(C, kThreads)), kThreads, 0, stream()>>>(w, has, h, order,
                                                                                                  offsets, C);
  cudaCheckLaunch("route ac_weights_kernel");
  ac_rows_kernel<<<grid_for(ceil_div(N, kWarp), kAcRowWarps), kAcRowWarps * kWarp, 0, stream()>>>(rows, w, offsets,
                                                                                                   N, C);
  cudaCheckLaunch("route ac_rows_kernel");
  ac_clip_kernel<<<1, 1, 0, stream()>>>(clip, rows, offsets, N, C);
  cudaCheckLaunch("route ac_clip_kernel");
  ac_mean_kernel<<<grid_for(C, kThreads), kThreads, 0, stream()>>>(mq, w, clip, has, N, C);
  cudaCheckLaunch("route ac_mean_kernel");
  ac_scale_kernel<<<grid_for(N * C, kThreads), kThreads, 0, stream()>>>(m, run, w, clip, mq, has, N, C);
  cudaCheckLaunch("route ac_scale_kernel");
}

void route_pair_keys(int32_t* keys, const int32_t* expert, const int32_t* tokens, int64_t A, int64_t K, int64_t N,
                     int64_t V) {
  CM_CHECK(A >= 0 && K >= 1 && N * V <= INT32_MAX, "cuda::route_pair_keys: A=", A, " K=", K, " N=", N, " V=", V);
  if (A == 0) return;
  pair_keys_kernel<<<grid_for(A, kThreads), kThreads, 0, stream()>>>(keys, expert, tokens, A, K, N, V);
  cudaCheckLaunch("route pair_keys_kernel");
}

void route_top1(int32_t* top1, const int32_t* expert, const float* gate, int64_t T, int64_t K) {
  CM_CHECK(T >= 0 && K >= 1, "cuda::route_top1: T=", T, " K=", K);
  if (T == 0) return;
  top1_kernel<<<grid_for(T, kThreads), kThreads, 0, stream()>>>(top1, expert, gate, T, K);
  cudaCheckLaunch("route top1_kernel");
}


void route_select_forward(float* probs, float* path, int32_t* child, int32_t* idx, float* entropy,
                          const float* logits, const int32_t* node, const float* path_parent, const float* lbias,
                          const float* abias, float inv_temp, int64_t P, int64_t n, int64_t b, int64_t k,
                          bool renorm) {
  CM_CHECK(P >= 0 && n >= 1 && b >= 1 && k >= 1 && k <= b && b <= INT32_MAX, "cuda::route_select_forward: P=", P,
           " n=", n, " b=", b, " k=", k);
  if (P == 0) {
    if (entropy) cudaCheck(cudaMemsetAsync(entropy, 0, 4, stream()));
    return;
  }
  Scratch s(entropy ? (size_t)P * 4 : 0);
  select_kernel<<<grid_for(P, kThreads / kWarp), kThreads, 0, stream()>>>(
      probs, path, child, idx, entropy ? s.at<float>() : nullptr, logits, node, path_parent, lbias, abias, inv_temp, P,
      n, (int)b, (int)k, renorm);
  cudaCheckLaunch("route select_kernel");
  if (entropy)  // the mean: fixed blocks of rows, in double
    sum_all(entropy, s.at<float>(), P, (float)(1.0 / (double)P));
}

void route_select_backward(float* dprobs, float* dparent, const float* dpath, const float* probs,
                           const int32_t* child, const float* path_parent, int64_t P, int64_t b, int64_t k,
                           bool renorm) {
  CM_CHECK(P >= 0 && b >= 1 && k >= 1 && k <= b, "cuda::route_select_backward: P=", P, " b=", b, " k=", k);
  if (P == 0) return;
  select_backward_kernel<<<grid_for(P, kThreads / kWarp), kThreads, 0, stream()>>>(dprobs, dparent, dpath, probs,
                                                                                   child, path_parent, P, (int)b,
                                                                                   (int)k, renorm);
  cudaCheckLaunch("route select_backward_kernel");
}

void route_select_backward_logits(float* dlogits, float* dparent, const float* dpath, const float* probs,
                                  const int32_t* child, const float* path_parent, float inv_temp, int64_t P,
                                  int64_t b, int64_t k, bool renorm) {
  CM_CHECK(P >= 0 && b >= 1 && k >= 1 && k <= b && b <= INT32_MAX, "cuda::route_select_backward_logits: P=", P,
           " b=", b, " k=", k);
  if (P == 0) return;
  select_backward_logits_kernel<<<grid_for(P, kThreads / kWarp), kThreads, 0, stream()>>>(
      dlogits, dparent, dpath, probs, child, path_parent, inv_temp, P, (int)b, (int)k, renorm);
  cudaCheckLaunch("route select_backward_logits_kernel");
}

void route_mean_entropy(float* entropy, const float* probs, const float* s, int64_t P, int64_t b) {
  CM_CHECK(P >= 0 && b >= 1 && b <= INT32_MAX, "cuda::route_mean_entropy: P=", P, " b=", b);
  if (P == 0) {
    cudaCheck(cudaMemsetAsync(entropy, 0, 4, stream()));
    return;
  }
  Scratch rows((size_t)P * 4);
  entropy_rows_kernel<<<grid_for(P, kThreads / kWarp), kThreads, 0, stream()>>>(rows.at<float>(), probs, s, P, (int)b);
  cudaCheckLaunch("route entropy_rows_kernel");
  sum_all(entropy, rows.at<float>(), P, (float)(1.0 / (double)P));
}

void route_group_select(int32_t* ids, const float* probs, const float* abias, const float* lbias,
                        const int64_t* branching, const int64_t* top_k, int64_t D, int64_t T) {
  CM_CHECK(D >= 1 && D <= kMaxDepth && T >= 0, "cuda::route_group_select: depth ", D, " (1..", kMaxDepth, "), T=", T);
  TreeShape sh{};
  sh.D = (int)D;
  int64_t N = 1, widest = 1;
  for (int64_t l = 0; l < D; ++l) {
    CM_CHECK(branching[l] >= 1 && top_k[l] >= 1 && top_k[l] <= branching[l], "cuda::route_group_select: level ", l,
             " keeps ", top_k[l], " of ", branching[l], " children");
    sh.b[l] = branching[l];
    sh.k[l] = top_k[l];
    N *= branching[l];
    widest = branching[l] > widest ? branching[l] : widest;
  }
  if (T == 0) return;
  CM_CHECK(widest <= INT32_MAX, "cuda::route_group_select: ", widest, " children at one level");
  const int64_t cache = widest <= kGroupCache ? widest : 0;
  const size_t smem = (size_t)(kThreads / kWarp * cache) * sizeof(float);
  group_select_kernel<<<grid_for(T, kThreads / kWarp), kThreads, smem, stream()>>>(ids, probs, abias, lbias, sh, T, N,
                                                                                  cache, index_error_record());
  cudaCheckLaunch("route group_select_kernel");
}

namespace {
// route_bias_forward: the leaves' reliability and usage into level D-1 (r into bias, u into scratch) ...
__global__ void bias_leaves_kernel(float* __restrict__ r_out, float* __restrict__ u_out, const float* __restrict__ rel,
                                   const float* __restrict__ use, int64_t N) {
  for (int64_t e = gtid(); e < N; e += gstride()) {
    r_out[e] = rel[e];
    u_out[e] = use[e];
  }
}
// ... each inner level from the one below it, one thread per node (the CPU's sums, in double, c increasing) ...
__global__ void bias_level_kernel(float* __restrict__ r_out, float* __restrict__ u_out, const float* __restrict__ rc,
                                  const float* __restrict__ uc, int64_t n, int64_t b) {
  for (int64_t j = gtid(); j < n; j += gstride()) {
    double su = 0.0, sur = 0.0, sr = 0.0;
    for (int64_t c = 0; c < b; ++c) {
      su += uc[j * b + c];
      sur += (double)uc[j * b + c] * rc[j * b + c];
      sr += rc[j * b + c];
    }
    r_out[j] = (float)(su > 0.0 ? sur / su : sr / (double)b);
    u_out[j] = (float)su;
  }
}
// ... then the logs (or zeros) and the pruned experts' -inf in level D-1, which starts at `last`.
__global__ void bias_log_kernel(float* __restrict__ bias, const float* __restrict__ pruned, int64_t total,
                                int64_t last, bool reliability) {
  for (int64_t i = gtid(); i < total; i += gstride()) {
    float v = reliability ? logf(bias[i]) : 0.f;
    if (i >= last && pruned[i - last] != 0.f) v = -INFINITY;
    bias[i] = v;
  }
}
}  // namespace

void route_bias_forward(float* bias, const float* rel, const float* use, const float* pruned,
                        const int64_t* branching, int64_t D, bool reliability) {
  CM_CHECK(D >= 1, "cuda::route_bias_forward: D=", D);
  std::vector<int64_t> off((size_t)D + 1, 0);  // level l's entries: bias[off[l] .. off[l + 1])
  int64_t width = 1;
  for (int64_t l = 0; l < D; ++l) {
    CM_CHECK(branching[l] >= 1, "cuda::route_bias_forward: level ", l, " branching ", branching[l]);
    width *= branching[l];
    off[(size_t)l + 1] = off[(size_t)l] + width;
  }
  const int64_t N = width, total = off[(size_t)D], last = off[(size_t)D - 1];
  if (reliability) {
    Scratch u((size_t)total * 4);  // the usage of every level, laid out as bias
    float* uw = u.at<float>();
    bias_leaves_kernel<<<grid_for(N, kThreads), kThreads, 0, stream()>>>(bias + last, uw + last, rel, use, N);
    cudaCheckLaunch("route bias_leaves_kernel");
    for (int64_t l = D - 2; l >= 0; --l) {
      const int64_t n = off[(size_t)l + 1] - off[(size_t)l], b = branching[l + 1];
      bias_level_kernel<<<grid_for(n, kThreads), kThreads, 0, stream()>>>(
          bias + off[(size_t)l], uw + off[(size_t)l], bias + off[(size_t)l + 1], uw + off[(size_t)l + 1], n, b);
      cudaCheckLaunch("route bias_level_kernel");
    }
  }
  bias_log_kernel<<<grid_for(total, kThreads), kThreads, 0, stream()>>>(bias, pruned, total, last, reliability);
  cudaCheckLaunch("route bias_log_kernel");
}

}  // namespace cm::cuda
