// CPU router level kernels (kernels/route.h). The logits of a level with several nodes: the pairs are grouped by
// node (a stable counting sort) and each node's pairs meet its b router rows in the GEMM's tiles (cpu::gemm's tile
// routine, the token rows gathered in the packing); the results go back to pair order. This is the arithmetic of
// the composite the op replaced (sort, index_select, per-node matmul, concat, index_select), so logits and
// gradients keep its bits, and it runs at the GEMM's speed. The backward passes are the same products' gradients,
// in the same order. A narrow level (b < 16 children, the cluster router's) computes its logits transposed and its
// dh by rows, so that b children do not leave most of each vector idle.
#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

#include "engine/check.h"
#include "kernels/cpu/gemm_tile.h"
#include "kernels/cpu/parallel.h"
#include "kernels/cpu/rows.h"
#include "kernels/cpu/stream.h"
#include "kernels/cpu/transpose.h"
#include "kernels/gemm.h"
#include "kernels/grouped_gemm.h"
#include "kernels/reduce.h"
#include "kernels/route.h"
#include "kernels/softmax.h"
#include "kernels/topk.h"

#if defined(__AVX512F__)
#if defined(__GNUC__) && !defined(__clang__)
// GCC 12 flags the self-initialised _mm512_undefined_ps() inside the AVX-512 unpack intrinsics (a false positive,
// as in kernels/cpu/gemm.cpp and topk.cpp); the pragma must precede the header for the warning's location to fall
// under it.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>
#endif

namespace cm::cpu {

namespace {

// A row's sum as cpu::sum_axis makes it: block_sum in double, then float (through sum_axis itself past a block of
// the long sums).
float sum_of_long_row(const float* a, int64_t n) {
  float s;
  sum_axis(&s, a, 1, n, 1, 1.f);
  return s;
}
// (Inline: the gates of a tree level's pairs are a few operations each, and a call per pair was a quarter of a
// 32-child level's selection.)
inline float sum_of_row(const float* a, int64_t n) {
  return n <= kSumBlock ? (float)block_sum(a, n) : sum_of_long_row(a, n);
}

// A logit bias of -inf marks a pruned child (route_bias_forward).
inline bool prunes(float lbias) { return std::isinf(lbias) && lbias < 0; }

// x % d for 32-bit x >= 0 and d >= 1 without a division instruction (Lemire, Kaser and Kurz, "Faster remainder by
// direct computation", 2019): exact for every such x and d; one 64-bit and one 128-bit multiply where an idiv takes
// 20 to 40 cycles.
struct FastMod {
  explicit FastMod(int64_t d) : M(~UINT64_C(0) / (uint64_t)d + 1), d((uint64_t)d) {}
  uint64_t operator()(uint32_t x) const { return (uint64_t)(((__uint128_t)(M * x) * d) >> 64); }
  uint64_t M, d;
};

// Pairs grouped by node: node j's pairs are order[offsets[j] .. offsets[j+1]), increasing p (stable); offsets has
// n + 1 entries (nodes no pair reached: empty ranges).
struct ByNode {
  std::vector<int64_t> offsets, pos;  // pos[p]: p's row in the node-major order
  std::vector<int32_t> order;         // i32: a grouped GEMM's row gather (kernels/grouped_gemm.h)
  ByNode(const int32_t* node, int64_t P, int64_t n) : offsets((size_t)n + 1, 0), pos((size_t)P), order((size_t)P) {
    for (int64_t p = 0; p < P; ++p) ++offsets[(size_t)node[p] + 1];
    for (int64_t j = 0; j < n; ++j) offsets[j + 1] += offsets[j];
    std::vector<int64_t> next(offsets.begin(), offsets.end() - 1);
    for (int64_t p = 0; p < P; ++p) {
      pos[(size_t)p] = next[node[p]]++;
      order[(size_t)pos[(size_t)p]] = (int32_t)p;
    }
  }
};

// A level is narrow when b < kNarrow: its b logits fill less than one 16-lane vector of the GEMM's register tile.
// A narrow level's logits are computed transposed, and its dh one row at a time (below).
constexpr int64_t kNarrow = 16;

}  // namespace

// The logits of a narrow level are computed transposed: lt [b, P] = W_j (the token rows of node j's pairs)^T, node
// by node, pairs in node-major order. W_j's b rows are broadcast and the pairs fill the vectors, where h W_j^T
// [P, b] would fill b lanes of each. A logit is the same chain of fused multiply-adds over C either way (a product
// commutes), so the bits are gemm's. The token rows are gathered in the packing; lt goes back to pair order.
// A wide level with nodes is one grouped GEMM, the gather folded into the packing of its rows.
void route_logits_forward(float* logits, const float* h, const float* W, const int32_t* node, int64_t P, int64_t Kp,
                          int64_t n, int64_t b, int64_t C) {
  if (P == 0 || b == 0) return;
  if (b >= kNarrow && !node) {  // one node: every pair is token p (Kp = 1)
    gemm(logits, b, h, C, W, C, P, b, C, false, true);
    return;
  }
  if (!node) n = 1;  // the contract's one node, whatever the caller passed
  std::optional<ByNode> g;
  if (node) g.emplace(node, P, n);
  const std::vector<int64_t> one_node = {0, P};
  const int64_t* offsets = g ? g->offsets.data() : one_node.data();
  const int32_t* order = g ? g->order.data() : nullptr;
  std::vector<float> out((size_t)(P * b));  // node-major: lt [b, P] (narrow), or [P, b] (wide)
  if (b >= kNarrow) {
    std::vector<const float*> Wj((size_t)n);
    for (int64_t j = 0; j < n; ++j) Wj[(size_t)j] = W + j * b * C;
    grouped_gemm_forward(out.data(), h, Wj.data(), offsets, n, P, b, C, nullptr, false, RowGather{order, Kp});
    for (int64_t p = 0; p < P; ++p) std::copy_n(out.data() + g->pos[(size_t)p] * b, b, logits + p * b);
    return;
  }
  // Work items: column tiles (pairs) of each node, at most the GEMM's widest tile.
  struct Item {
    int64_t j, c0, c1;
  };
  std::vector<Item> items;
  const int64_t NC = gemm_detail::tile_nc();
  for (int64_t j = 0; j < n; ++j)
    for (int64_t c0 = offsets[j]; c0 < offsets[j + 1]; c0 += NC)
      items.push_back({j, c0, std::min(offsets[j + 1], c0 + NC)});
  gemm_detail::count_multiply_adds(P * b * C);
  const int64_t n_items = (int64_t)items.size();
#pragma omp parallel for schedule(dynamic, 1) num_threads(gemm_detail::threads_for(2.0 * P * b * C)) if (n_items > 1)
  for (int64_t i = 0; i < n_items; ++i) {
    const Item& it = items[(size_t)i];
    gemm_detail::Operands o{W + it.j * b * C, h, out.data(), C, C, P, b, P, C, false, true, 1.0f, 0.0f};
    o.b_rows = order, o.b_div = Kp;  // column c of lt: token row order[c] / Kp (no node: row c)
    gemm_detail::gemm_tile(o, 0, b, it.c0, it.c1);
  }
  for (int64_t p = 0; p < P; ++p) {
    const int64_t at = g ? g->pos[(size_t)p] : p;
    for (int64_t c = 0; c < b; ++c) logits[p * b + c] = out[(size_t)(c * P + at)];
  }
}

// A narrow level's dh is made a pair's row at a time (gemm_row: the GEMM's bits for a row of dlogits W_j, with no
// packing for a K of b) and added into the token's row at once: no [P, C] intermediate. A wide level with nodes
// takes the same path; one node with many children (flat routing) is one GEMM, whose W is reused across rows.
void route_logits_backward_h(float* dh, const float* dlogits, const float* W, const int32_t* node, int64_t T,
                             int64_t Kp, int64_t /*n*/, int64_t b, int64_t C) {
  if (T == 0 || C == 0) return;
  if (!node && b >= kNarrow) {  // one node: dh = dlogits W, as matmul's backward computes it
    gemm(dh, C, dlogits, b, W, C, T, C, b, false, false);
    return;
  }
  gemm_detail::count_multiply_adds(T * Kp * b * C);
#pragma omp parallel num_threads(gemm_detail::threads_for(2.0 * T * Kp * b * C))
  {
    std::vector<int64_t> pairs((size_t)Kp);
    std::vector<float> row((size_t)C);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < T; ++t) {
      float* out = dh + t * C;
      if (!node) {  // one node: dh[t] = dlogits[t] W, the GEMM's row
        gemm_detail::gemm_row(out, dlogits + t * b, W, C, C, b);
        continue;
      }
      // dh[t] = 0 + its pairs' rows in increasing node order (the composite's index_add of node-major rows)
      for (int64_t i = 0; i < Kp; ++i) pairs[(size_t)i] = t * Kp + i;
      std::sort(pairs.begin(), pairs.end(),
                [&](int64_t x, int64_t y) { return node[x] != node[y] ? node[x] < node[y] : x < y; });
      std::fill(out, out + C, 0.f);
      for (int64_t p : pairs) {
        gemm_detail::gemm_row(row.data(), dlogits + p * b, W + (int64_t)node[p] * b * C, C, C, b);
#pragma omp simd
        for (int64_t q = 0; q < C; ++q) out[q] += row[(size_t)q];
      }
    }
  }
}

// dW: one grouped GEMM over the nodes (dW_j = dlogits_j^T h_j), the token rows gathered in the packing.
void route_logits_backward_w(float* dW, const float* dlogits, const float* h, const int32_t* node, int64_t P,
                             int64_t Kp, int64_t n, int64_t b, int64_t C) {
  if (n * b == 0 || C == 0) return;
  if (!node) {  // one node: dW = dlogits^T h, as matmul's backward computes it
    gemm(dW, C, dlogits, b, h, C, b, C, P, true, false);
    return;
  }
  const ByNode g(node, P, n);
  std::vector<float> dls((size_t)(P * b));  // [P, b] node-major
  for (int64_t i = 0; i < P; ++i) std::copy_n(dlogits + (int64_t)g.order[(size_t)i] * b, b, dls.data() + i * b);
  std::vector<float*> dWj((size_t)n);
  for (int64_t j = 0; j < n; ++j) dWj[(size_t)j] = dW + j * b * C;  // nodes no pair reached: 0
  grouped_gemm_backward_weight(dWj.data(), nullptr, dls.data(), h, g.offsets.data(), n, P, b, C, false,
                               RowGather{g.order.data(), Kp});
}

void route_histogram(int32_t* counts, const int32_t* ids, int64_t A, int64_t n, bool accumulate) {
  if (!accumulate) std::fill(counts, counts + n, 0);
  for (int64_t i = 0; i < A; ++i)
    if (ids[i] >= 0 && ids[i] < n) ++counts[ids[i]];
}

void route_offset_counts(int32_t* rows, const int64_t* offsets, int64_t N) {
  for (int64_t e = 0; e < N; ++e) rows[e] = (int32_t)(offsets[e + 1] - offsets[e]);
}

void route_counts_add(int64_t* acc, const int32_t* counts, int64_t n) {
  for (int64_t i = 0; i < n; ++i) acc[i] += counts[i];
}

void route_aux_bias_update(float* bias, int64_t* load, int64_t n, int64_t b, float rate) {
  for (int64_t node = 0; node < n; ++node) shared::aux_bias_node_update(bias + node * b, load + node * b, b, rate);
}

void ac_scales_forward(float* m, int32_t* has, float* run, double* w, const float* h, const int32_t* order,
                       const int64_t* offsets, int64_t N, int64_t C) {
  double wsum = 0.0;
  int64_t labelled = 0;
  for (int64_t k = 0; k < N; ++k) {
    const int64_t a = offsets[k], n = offsets[k + 1] - a;
    has[k] = n > 0;
    for (int64_t q = 0; q < C; ++q) w[k * C + q] = 0.0;
    if (n == 0) continue;
    ++labelled;
    double row = 0.0;  // the label's sum over q, then added to the others in k order (the CUDA twin's two steps)
    for (int64_t q = 0; q < C; ++q) {
      double mean = 0.0, mad = 0.0;
      for (int64_t i = a; i < a + n; ++i) mean += h[(int64_t)order[i] * C + q];
      mean /= (double)n;
      for (int64_t i = a; i < a + n; ++i) mad += std::fabs(h[(int64_t)order[i] * C + q] - mean);
      w[k * C + q] = 1.0 / (mad / (double)n + 1e-4);
      row += w[k * C + q];
    }
    wsum += row;
  }
  for (int64_t i = 0; i < N * C; ++i) m[i] = 1.0f;
  if (!labelled) return;
  const double clip = 10.0 * wsum / (double)(labelled * C);
  for (int64_t i = 0; i < N * C; ++i) w[i] = std::min(w[i], clip);
  for (int64_t q = 0; q < C; ++q) {
    double mq = 0.0;
    for (int64_t k = 0; k < N; ++k)
      if (has[k]) mq += w[k * C + q];
    mq /= (double)labelled;
    for (int64_t k = 0; k < N; ++k)
      if (has[k]) m[k * C + q] = (float)(w[k * C + q] / mq);
  }
  if (run)
    for (int64_t k = 0; k < N; ++k)
      if (has[k])
        // one fma, written out: the CUDA twin's bits whatever either compiler would contract
        for (int64_t q = 0; q < C; ++q) run[k * C + q] = std::fma(0.9f, run[k * C + q], 0.1f * m[k * C + q]);
}

void route_pair_keys(int32_t* keys, const int32_t* expert, const int32_t* tokens, int64_t A, int64_t K, int64_t N,
                     int64_t V) {
  for (int64_t a = 0; a < A; ++a) {
    const int64_t e = expert[a], v = tokens[a / K];
    keys[a] = e >= 0 && e < N && v >= 0 && v < V ? (int32_t)(e * V + v) : -1;
  }
}

void route_top1(int32_t* top1, const int32_t* expert, const float* gate, int64_t T, int64_t K) {
  for (int64_t t = 0; t < T; ++t) {
    int64_t best = 0;
    for (int64_t j = 1; j < K; ++j)
      if (gate[t * K + j] > gate[t * K + best]) best = j;
    top1[t] = expert[t * K + best];
  }
}

// Mean entropy (nats) of the rows of p = softmax(s), p and s [P, b], without a log per element. In a row,
// log p_c = s_c - max(s) - log Z and the largest probability is 1/Z, so
//   H = -sum_c p_c log p_c = -log(max p) * sum_c p_c - sum_c p_c (s_c - max s)
// (one log per row; equal to the per-element form up to float rounding of p). Only p_c > 0 count, as in
// -sum p log p: a pruned child (s = -inf, p = 0) adds nothing, and neither does a NaN row. Rows run in parallel;
// their entropies are summed in row order afterwards, so the result does not depend on the thread count.
namespace {

// One row's entropy (nats) from its probabilities p [b] and the scores s [b] they are the softmax of.
inline double row_entropy(const float* pr, const float* sr, int64_t b) {
  float pmax = 0.f, smax = -INFINITY;
#pragma omp simd reduction(max : pmax, smax)
  for (int64_t c = 0; c < b; ++c) {
    pmax = pr[c] > pmax ? pr[c] : pmax;
    smax = sr[c] > smax ? sr[c] : smax;
  }
  // Float sums within a row (a row's entropy is good to about 1e-6 relative), double across rows. The lane
  // split of the reductions is fixed at compile time: still deterministic.
  float psum = 0.f, ps = 0.f;
#pragma omp simd reduction(+ : psum, ps)
  for (int64_t c = 0; c < b; ++c) {
    const bool live = pr[c] > 0.f;  // selects, not ifs: 0 * (-inf - smax) would be NaN
    psum += live ? pr[c] : 0.f;
    ps += live ? pr[c] * (sr[c] - smax) : 0.f;
  }
  return pmax > 0.f ? -std::log((double)pmax) * psum - ps : 0.0;  // pmax = 0: a NaN row
}

// The mean of the rows' entropies, added in row order in double.
float mean_of_rows(const std::vector<double>& row, int64_t P) {
  double ent = 0.0;
  for (double h : row) ent += h;
  return (float)(ent / (double)std::max<int64_t>(P, 1));
}

}  // namespace

void route_mean_entropy(float* entropy, const float* p, const float* s, int64_t P, int64_t b) {
  std::vector<double> row((size_t)P);
#pragma omp parallel for schedule(static) if (P * b >= parallel_min_compute())
  for (int64_t r = 0; r < P; ++r) row[r] = row_entropy(p + r * b, s + r * b, b);
  entropy[0] = mean_of_rows(row, P);
}

void route_group_select(int32_t* ids, const float* probs, const float* abias, const float* lbias,
                        const int64_t* branching, const int64_t* top_k, int64_t D, int64_t T) {
  int64_t N = 1;
  for (int64_t l = 0; l < D; ++l) {
    CM_CHECK(branching[l] >= 1 && top_k[l] >= 1 && top_k[l] <= branching[l], "route_group_select: level ", l,
             " keeps ", top_k[l], " of ", branching[l], " children");
    N *= branching[l];
  }
  // Level l: P = T * Kp pairs (token p / Kp, node node[p]), token-major; n nodes, span leaves under each child.
  const int32_t* node = nullptr;  // [P] the previous level's block of ids; nullptr at the root (node 0)
  int32_t* out = ids;             // [P * k] this level's block
  int64_t P = T, Kp = 1, n = 1, span = N, bias_at = 0;
  for (int64_t l = 0; l < D; ++l) {
    const int64_t b = branching[l], k = top_k[l];
    span /= b;
    const float* ab = abias ? abias + bias_at : nullptr;  // [n * b] this level's
    const float* lb = lbias ? lbias + bias_at : nullptr;
    auto pruned = [&](int64_t i) { return lb && prunes(lb[i]); };
    std::vector<float> score((size_t)(P * b));  // [P, b]
    for (int64_t p = 0; p < P; ++p) {
      const int64_t j = node ? node[p] : 0;
      const float* leaf = probs + (p / Kp) * N + j * b * span;  // the leaves of node j, child by child
      for (int64_t c = 0; c < b; ++c) {
        double m = 0.0;
        for (int64_t i = 0; i < span; ++i) m += leaf[c * span + i];
        float v = (float)m;
        if (ab) v = v + ab[j * b + c];
        score[(size_t)(p * b + c)] = pruned(j * b + c) ? -INFINITY : v;
      }
    }
    std::vector<float> top((size_t)(P * k));  // the selected scores (unused: the gates are gathered from probs)
    std::vector<int32_t> idx((size_t)(P * k));
    topk_forward(top.data(), idx.data(), score.data(), P, b, k);
    for (int64_t i = 0; i < P * k; ++i) {
      const int64_t j = node ? node[i / k] : 0, child = j * b + idx[(size_t)i];
      CM_CHECK(!pruned(child), "level ", l, " node ", j, " has fewer than ", k, " selectable children");
      out[i] = (int32_t)child;
    }
    node = out;
    out += P * k;
    P *= k;
    Kp *= k;
    bias_at += n * b;
    n *= b;
  }
}

namespace {

// dst[j * ds + l] = src[l * ss + j] for a 16 x 16 block: rows to columns, in registers with AVX-512
// (kernels/cpu/transpose.h), where element-by-element loads cost a load and an insert for each of the 256.
inline void transpose_block(float* __restrict dst, int64_t ds, const float* __restrict src, int64_t ss) {
#if defined(__AVX512F__)
  transpose_strip(dst, ds, [&](int l) { return src + l * ss; }, 16, 16, 16);
#else
  for (int j = 0; j < 16; ++j)
    for (int l = 0; l < 16; ++l) dst[j * ds + l] = src[l * ss + j];
#endif
}

// Sixteen pairs' rows of B children at once, a pair per SIMD lane: the softmax, the selection scores and the top K
// (K <= 2) of rows [16, B] at x, with the bits of the row-by-row path (softmax_row, then topk_rows). A short row
// is a chain of reductions (max, sum, then top k's rounds); across sixteen rows each reduction step is one
// vertical vector operation, and the chains of different rows no longer wait on each other. The columns:
//   max      one lane's running max over the columns (exact in any order; the sign of a zero max changes no
//            x - max that matters: exp(+-0) = 1);
//   sum      softmax_row's order: lane sums acc[c % 16] added in column order, then the tree fold;
//   top K    K best kept per lane, a column displacing a kept one only when strictly greater: the largest first,
//            ties (and -0.0 against +0.0) to the lower index, as topk_rows orders them.
// A NaN score (a NaN or infinite logit, a NaN bias) ranks above every number in topk_rows: such a block returns
// false, and the caller runs those rows one by one (the same softmax bits either way).
// The arguments are route_select_forward's: scores = probs + abias (when given), -inf where lbias prunes;
// a[l] is lane l's node's first child. Writes probs [16, B], ix and sel [16, K].
template <int B, int K>
bool select_block16(float* __restrict probs, int32_t* __restrict ix, float* __restrict sel,
                    const float* __restrict x, const float* abias, const float* lbias, bool any_pruned,
                    const int64_t* a) {
  float e[B][16];
  if (B % 16 == 0)
    for (int j = 0; j < B; j += 16) transpose_block(&e[j][0], 16, x + j, B);
  else
    for (int j = 0; j < B; ++j)
      for (int l = 0; l < 16; ++l) e[j][l] = x[l * B + j];
  int32_t at[K][16];
  bool nan;
  const bool scored = abias || any_pruned;  // selection scores other than the probabilities themselves
#if defined(__AVX512F__)
  // The steps below, each written as the vector operation the portable loops mean (GCC left the k = 1 top-k and
  // the lane sums as scalar code, a cmov chain per lane: 3x the time of k = 2 at 32 children). The loops over the
  // columns are unrolled: the lane sums stay in registers (a loop kept them on the stack, a store and a load per
  // column), the exponentials are added as they are made, and the probabilities are scaled in the top k's pass
  // when they are the scores. The same operations on the same values as the portable code.
  __m512 inv;
  {
    __m512 m0 = _mm512_set1_ps(-INFINITY), m1 = m0;  // two chains: the max is exact in any order
#pragma GCC unroll 64
    for (int j = 0; j < B; j += 2) {  // (B is even)
      m0 = _mm512_max_ps(_mm512_loadu_ps(e[j]), m0);  // e > m ? e : m, as below
      m1 = _mm512_max_ps(_mm512_loadu_ps(e[j + 1]), m1);
    }
    const __m512 m = _mm512_max_ps(m1, m0);
    __m512 acc[16];
#pragma GCC unroll 16
    for (int q = 0; q < 16; ++q) acc[q] = _mm512_setzero_ps();
#pragma GCC unroll 64
    for (int j = 0; j < B; ++j) {
      const __m512 v = fast_exp16(_mm512_sub_ps(_mm512_loadu_ps(e[j]), m));
      _mm512_storeu_ps(e[j], v);
      // 0 + v is v (v >= +0, or NaN), so a lane sum's first term is taken as it is.
      acc[j % 16] = j < 16 ? v : _mm512_add_ps(acc[j % 16], v);
    }
    // The tree fold; lane sums q >= B are 0, and adding them changes nothing.
#pragma GCC unroll 4
    for (int w = 8; w >= 1; w /= 2)
#pragma GCC unroll 8
      for (int q = 0; q < w; ++q)
        if (q + w < B) acc[q] = _mm512_add_ps(acc[q], acc[q + w]);
    inv = _mm512_div_ps(_mm512_set1_ps(1.0f), acc[0]);
  }
  if (scored)  // the scores are made from the probabilities: scale them first
#pragma GCC unroll 64
    for (int j = 0; j < B; ++j) _mm512_storeu_ps(e[j], _mm512_mul_ps(_mm512_loadu_ps(e[j]), inv));
#else
  float m[16];
  for (int l = 0; l < 16; ++l) m[l] = -INFINITY;
  for (int j = 0; j < B; ++j)
    for (int l = 0; l < 16; ++l) m[l] = e[j][l] > m[l] ? e[j][l] : m[l];
  for (int j = 0; j < B; ++j)
    for (int l = 0; l < 16; ++l) e[j][l] = fast_exp(e[j][l] - m[l]);
  float acc[16][16] = {};  // acc[q][l]: lane sum q of row l
  for (int j = 0; j < B; ++j)
    for (int l = 0; l < 16; ++l) acc[j % 16][l] += e[j][l];
  for (int w = 8; w >= 1; w /= 2)
    for (int q = 0; q < w; ++q)
      for (int l = 0; l < 16; ++l) acc[q][l] += acc[q + w][l];
  float inv[16];
  for (int l = 0; l < 16; ++l) inv[l] = 1.0f / acc[0][l];
  for (int j = 0; j < B; ++j)
    for (int l = 0; l < 16; ++l) e[j][l] *= inv[l];
#endif
  // The selection scores (the probabilities themselves unless a bias or a pruned child is involved), a NaN
  // among them, then the top K per lane: loops over the lanes without branches, so that they vectorise.
  float biased_sc[B][16];
  if (scored)
    for (int j = 0; j < B; ++j)
      for (int l = 0; l < 16; ++l) {
        const float v = e[j][l] + (abias ? abias[a[l] + j] : 0.f);
        const float lb = any_pruned ? lbias[a[l] + j] : 0.f;  // selects, not a branch: the lanes vectorise
        biased_sc[j][l] = prunes(lb) ? -INFINITY : v;
      }
  const float(*sc)[16] = scored ? biased_sc : e;
#if defined(__AVX512F__)
  // Column j's scores: the biased ones, or the probabilities, scaled here and stored.
  auto top_k = [&](auto score) {
    constexpr __mmask16 all = 0xFFFF;  // (the masked forms, as in kernels/cpu/fastmath.h)
    // up = v > best (false against a NaN, as the scalar compare); best, at = up ? (v, j) : (best, at).
    __m512 b0 = score(0), b1 = b0;
    __mmask16 nan_lanes = _mm512_cmp_ps_mask(b0, b0, _CMP_UNORD_Q);
    __m512i a0 = _mm512_setzero_si512(), a1 = a0;
    if (K == 2) {
      const __m512 v = score(1);
      nan_lanes |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
      const __mmask16 up = _mm512_cmp_ps_mask(v, b0, _CMP_GT_OQ);
      b1 = _mm512_mask_blend_ps(up, v, b0);
      a1 = _mm512_mask_blend_epi32(up, _mm512_set1_epi32(1), a0);
      b0 = _mm512_mask_blend_ps(up, b0, v);
      a0 = _mm512_mask_blend_epi32(up, a0, _mm512_set1_epi32(1));
    }
    // The best values by max and min (max(v, b) is v > b ? v : b, min(v, b) is v < b ? v : b), so that a column's
    // compare is off the chain from one column's best to the next: the same values (up to the sign of an equal
    // zero, which no compare sees) and the same masks.
#pragma GCC unroll 64
    for (int j = K; j < B; ++j) {
      const __m512 v = score(j);
      nan_lanes |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
      const __m512i jv = _mm512_set1_epi32(j);
      const __mmask16 up0 = _mm512_cmp_ps_mask(v, b0, _CMP_GT_OQ);
      if (K == 2) {
        const __mmask16 up1 = _mm512_cmp_ps_mask(v, b1, _CMP_GT_OQ);
        b1 = _mm512_maskz_max_ps(all, _mm512_maskz_min_ps(all, v, b0), b1);
        a1 = _mm512_mask_blend_epi32(up0, _mm512_mask_blend_epi32(up1, a1, jv), a0);
      }
      b0 = _mm512_maskz_max_ps(all, v, b0);
      a0 = _mm512_mask_blend_epi32(up0, a0, jv);
    }
    _mm512_storeu_si512(at[0], a0);
    if (K == 2) _mm512_storeu_si512(at[K - 1], a1);
    return nan_lanes != 0;
  };
  if (scored)
    nan = top_k([&](int j) { return _mm512_loadu_ps(sc[j]); });
  else
    nan = top_k([&](int j) {
      const __m512 v = _mm512_mul_ps(_mm512_loadu_ps(e[j]), inv);
      _mm512_storeu_ps(e[j], v);
      return v;
    });
#else
  float best[K][16];
  int32_t nan_lane[16] = {};
  for (int j = 0; j < B; ++j)
    for (int l = 0; l < 16; ++l) nan_lane[l] |= sc[j][l] != sc[j][l];
  for (int l = 0; l < 16; ++l) best[0][l] = sc[0][l], at[0][l] = 0;
  if (K == 2)
    for (int l = 0; l < 16; ++l) {
      const bool up = sc[1][l] > best[0][l];
      best[K - 1][l] = up ? best[0][l] : sc[1][l];
      at[K - 1][l] = up ? 0 : 1;
      best[0][l] = up ? sc[1][l] : best[0][l];
      at[0][l] = up ? 1 : 0;
    }
  for (int j = K; j < B; ++j)
    for (int l = 0; l < 16; ++l) {
      const float v = sc[j][l];
      const bool up0 = v > best[0][l], up1 = v > best[K - 1][l];
      if (K == 2) {
        best[K - 1][l] = up0 ? best[0][l] : (up1 ? v : best[K - 1][l]);
        at[K - 1][l] = up0 ? at[0][l] : (up1 ? j : at[K - 1][l]);
      }
      best[0][l] = up0 ? v : best[0][l];
      at[0][l] = up0 ? j : at[0][l];
    }
  int32_t any = 0;
  for (int l = 0; l < 16; ++l) any |= nan_lane[l];
  nan = any != 0;
#endif
  if (nan) return false;
  if (B % 16 == 0)
    for (int j = 0; j < B; j += 16) transpose_block(probs + j, B, &e[j][0], 16);
  else
    for (int l = 0; l < 16; ++l)
      for (int j = 0; j < B; ++j) probs[l * B + j] = e[j][l];
  for (int l = 0; l < 16; ++l)
    for (int r = 0; r < K; ++r) {
      ix[l * K + r] = at[r][l];
      sel[l * K + r] = e[at[r][l]][l];
    }
  return true;
}

using SelectBlock = bool (*)(float*, int32_t*, float*, const float*, const float*, const float*, bool,
                             const int64_t*);

template <int K>
SelectBlock select_block_for(int64_t b) {
  switch (b) {
    case 2: return select_block16<2, K>;
    case 4: return select_block16<4, K>;
    case 8: return select_block16<8, K>;
    case 16: return select_block16<16, K>;
    case 32: return select_block16<32, K>;
    case 64: return select_block16<64, K>;  // (beyond, a block of rows in L1 holds fewer than sixteen)
    default: return nullptr;
  }
}

// The block kernel for b children and k kept, or nullptr: the row-by-row path then.
SelectBlock select_block(int64_t b, int64_t k) {
  return k == 1 ? select_block_for<1>(b) : k == 2 && b >= 2 ? select_block_for<2>(b) : nullptr;
}

#if defined(__AVX512F__)
// softmax_row, then topk_rows on its output, over a long row of unbiased scores (n > 64 children, a multiple of
// 16: flat routing over many experts), in three passes over the row where the two take five (max; exp and sum;
// scale; the top k's two steps):
//   1. the max (row_max);
//   2. e = exp(x - max) and its lane sums, as softmax_row makes them, each block also going down the top k's
//      lanes (LongTopK::down): e orders the children as the probabilities do, and as the scale rounds monotonically
//      the K-th largest probability is the K-th largest e times the scale;
//   3. the scale (y = e / sum as softmax_row's y *= inv) and the top k's second step against that w.
// Then the row's copy to stream_to by streaming stores, when given (in pass 3 itself, between its loads and
// stores, they made the selection at T = 16384, 1024 children slower: 630 against 580 ns a row at k = 1).
// The same operations on the same values: softmax_row's and topk_rows' bits. A row holding a NaN (then every
// probability is NaN) goes to topk_rows, which orders NaN as topk_forward does. At 1024 children and k = 2,
// 10% faster than the two kernels (bench/dispatch --select, one thread); the same at k = 1.
template <int K>
void softmax_topk_long(float* __restrict y, float* __restrict stream_to, int32_t* ix, const float* __restrict x,
                       int64_t n) {
  const __m512 mx = _mm512_set1_ps(row_max(x, n));
  LongTopK<K> top;
  __m512 acc = _mm512_setzero_ps();
  for (int64_t c = 0; c < n; c += 16) {
    const __m512 e = fast_exp16(_mm512_sub_ps(_mm512_loadu_ps(x + c), mx));
    _mm512_storeu_ps(y + c, e);
    acc = _mm512_add_ps(acc, e);
    top.down(e);
  }
  const float inv = 1.0f / fold16(acc);
  const bool nan = top.nan != 0;
  const float w = nan ? 0.f : top.kth() * inv;
  const __m512 iv = _mm512_set1_ps(inv), wv = _mm512_set1_ps(w);
  for (int64_t c = 0; c < n; c += 16) {
    const __m512 v = _mm512_mul_ps(_mm512_loadu_ps(y + c), iv);
    _mm512_storeu_ps(y + c, v);
    if (!nan) top.take(_mm512_cmp_ps_mask(v, wv, _CMP_GE_OQ), c, y, w);
  }
  if (stream_to) stream_row(stream_to, y, n);
  float val[K];
  if (nan)
    topk_rows(val, ix, y, 1, n, K);
  else
    top.result(val, ix, y);
}
#endif

using LongSelect = void (*)(float*, float*, int32_t*, const float*, int64_t);

// The fused long-row kernel for b children and k kept, or nullptr.
LongSelect long_select(int64_t b, int64_t k) {
#if defined(__AVX512F__)
  if (b > 64 && b % 16 == 0) return k == 1 ? softmax_topk_long<1> : k == 2 ? softmax_topk_long<2> : nullptr;
#else
  (void)b, (void)k;
#endif
  return nullptr;
}

}  // namespace

void route_select_forward(float* probs, float* path, int32_t* child, int32_t* idx, float* entropy,
                          const float* logits, const int32_t* node, const float* path_parent, const float* lbias,
                          const float* abias, float inv_temp, int64_t P, int64_t n, int64_t b, int64_t k,
                          bool renorm) {
  if (P == 0) {
    if (entropy) entropy[0] = 0.f;
    return;
  }
  auto at = [&](int64_t p) { return (node ? (int64_t)node[p] : 0) * b; };  // the pair's node's first child
  bool any_pruned = false;
  if (lbias)
    for (int64_t i = 0; i < n * b && !any_pruned; ++i) any_pruned = prunes(lbias[i]);
  const bool scaled = inv_temp != 1.f || lbias, biased = abias || any_pruned;
  std::vector<int32_t> own;
  int32_t* ix = idx;
  if (!ix) {
    own.resize((size_t)(P * k));
    ix = own.data();
  }
  std::vector<double> row_ent(entropy ? (size_t)P : 0);
  std::vector<float> sel((size_t)(P * k));

  // One pass over the rows in blocks of R that stay in L1 (R x b floats of probabilities, 4 KB): the scores and
  // the softmax of the block's rows, their entropy, then their top k and gates. Each step is the whole-array
  // kernel's own per-row arithmetic (kernels/cpu/rows.h: softmax_forward's softmax_row, topk_forward's topk_rows;
  // route_mean_entropy's row_entropy), so the bits are those of running the kernels one after the other over all
  // rows; the logits are read and the probabilities written once, where separate passes read them four times. A
  // block runs each step over its rows back to back, so the rows' dependency chains (a short row is mostly
  // reductions) overlap: on rows of 32, a row's softmax then its top k at once took 1.6x as long. (The entropy's
  // sums taken in the softmax's scale pass instead were slower at 16 and 32 children, 1.7x and 1.1x, faster only
  // at 1024, 0.9x.)
  // The row units open no parallel region of their own: one region here, whatever P (with a nested region per
  // block of rows, the selection without entropy took 9.1 ms at T = 16384, b = 1024; without them, 8.4).
  // A tree's short rows (b a power of 2 up to 64, k <= 2) go sixteen at a time through select_block16, which
  // computes the same bits with a row per SIMD lane.
  const int64_t R = std::max<int64_t>(1, 1024 / b), blocks = (P + R - 1) / R;
  const SelectBlock block16 = select_block(b, k);
  // Large probabilities (flat routing over many experts) are made row by row in L1 and written by streaming stores
  // (kernels/cpu/stream.h); not with the entropy statistic, which reads the block's rows back.
  const bool stream = !entropy && stream_rows(probs, P * b, b);
  // Long unbiased rows (flat routing over many experts) take softmax_topk_long: the same bits in fewer passes.
  const LongSelect fused = biased ? nullptr : long_select(b, k);
#pragma omp parallel if (P * b >= parallel_min_compute())
  {
    std::vector<float> s((size_t)(scaled ? R * b : 0)), scores((size_t)(biased ? b : 0));
    std::vector<float> top((size_t)k);  // the selected scores (unused: the gates come from probs)
    std::vector<float> buf((size_t)(stream ? b : 0));
    // One row by the row units: softmax_row, then the selection scores and topk_rows (or the two fused).
    auto select_row = [&](int64_t p, const float* sp) {
      float* pr = stream ? buf.data() : probs + p * b;
      if (fused) {
        fused(pr, stream ? probs + p * b : nullptr, ix + p * k, sp, b);
      } else {
        softmax_row(pr, sp, b);
        // Selection scores: the probabilities, + aux-free bias, -inf for pruned children (ranked below every
        // selectable child; NaN ranks first in topk_forward, but a softmax row is all NaN or NaN-free, and on an
        // all-NaN row this still takes the first k selectable children).
        const float* sc = pr;
        if (biased) {
          const int64_t a = at(p);
          for (int64_t c = 0; c < b; ++c) {
            const float v = pr[c] + (abias ? abias[a + c] : 0.f);
            const bool pruned = any_pruned && prunes(lbias[a + c]);
            scores[(size_t)c] = pruned ? -INFINITY : v;
          }
          sc = scores.data();
        }
        topk_rows(top.data(), ix + p * k, sc, 1, b, k);
#if defined(__AVX512F__)
        if (stream) stream_row(probs + p * b, pr, b);
#endif
      }
      for (int64_t j = 0; j < k; ++j) sel[(size_t)(p * k + j)] = pr[ix[p * k + j]];  // the kept probabilities
    };
#pragma omp for schedule(static) nowait  // the region's end is the barrier
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const int64_t p0 = blk * R, p1 = std::min(P, p0 + R);
      // s = logits / temperature + logit bias, as the ops did it: x * inv_temp, then + bias, in two passes (one
      // expression would let the compiler fuse them into an fma, which rounds once: not the ops' bits).
      if (scaled)
        for (int64_t p = p0; p < p1; ++p) {
          float* sr = s.data() + (p - p0) * b;
          std::copy(logits + p * b, logits + (p + 1) * b, sr);
          if (inv_temp != 1.f)
            for (int64_t c = 0; c < b; ++c) sr[c] = sr[c] * inv_temp;
          if (lbias) {
            const int64_t a = at(p);
            for (int64_t c = 0; c < b; ++c) sr[c] = sr[c] + lbias[a + c];
          }
        }
      auto row_in = [&](int64_t p) { return scaled ? s.data() + (p - p0) * b : logits + p * b; };
      int64_t p = p0;
      if (block16)  // sixteen rows at a time where the block kernel exists (b a power of 2 up to 64, k <= 2)
        for (; p + 16 <= p1; p += 16) {
          int64_t a16[16];
          for (int l = 0; l < 16; ++l) a16[l] = at(p + l);
          if (!block16(probs + p * b, ix + p * k, sel.data() + p * k, row_in(p), abias, lbias, any_pruned, a16))
            for (int l = 0; l < 16; ++l) select_row(p + l, row_in(p + l));  // a NaN score among them
        }
      for (; p < p1; ++p) select_row(p, row_in(p));
      if (entropy)
        for (int64_t q = p0; q < p1; ++q) row_ent[(size_t)q] = row_entropy(probs + q * b, row_in(q), b);
      // The block's gates, renormalised over the k kept siblings as div(sel, sum(sel, 1)) did (the sum as
      // cpu::sum_axis makes a row's: block_sum in double, then float), its path and its next nodes.
      for (int64_t q = p0; q < p1; ++q) {
        const int64_t a = at(q);
        const float* sq = sel.data() + q * k;
        const float S = renorm ? sum_of_row(sq, k) : 1.f;
        for (int64_t j = 0; j < k; ++j) {
          const int64_t i = q * k + j;
          const float gate = renorm ? sq[j] / S : sq[j];
          path[i] = path_parent ? path_parent[q] * gate : gate;
          child[i] = (int32_t)(a + ix[i]);
        }
      }
    }
    if (stream) stream_fence();
  }
  if (entropy) entropy[0] = mean_of_rows(row_ent, P);
  if (any_pruned)
    for (int64_t i = 0; i < P * k; ++i) {
      const float lb = lbias[at(i / k) + ix[i]];
      CM_CHECK(!prunes(lb), "node ", at(i / k) / b, " has fewer than ", k, " selectable children");
    }
}

namespace {

// The selection's backward, one pair at a time, into dprobs [P, b] (to_logits false) or straight into the logits'
// gradient [P, b] (to_logits: the softmax's and the temperature's rules applied to the pair's row as well).
void select_backward(float* out, bool to_logits, float inv_temp, float* dparent, const float* dpath,
                     const float* probs, const int32_t* child, const float* path_parent, int64_t P, int64_t b,
                     int64_t k, bool renorm) {
  if (P == 0) return;
  const FastMod col(b);  // a child's column in its node's row: child % b
  // The composite's rules, in its order, pair by pair: path = parent * gate (mul), gate = sel / sum(sel) (div,
  // sum), sel = gather(probs). The sums over the k siblings are the row sums cpu::sum_axis made for sum and sum_to
  // (block_sum in double, then float). One parallel region: the steps of a pair need only its own k slots. A large
  // output is made row by row in L1 and written by streaming stores (kernels/cpu/stream.h).
  const bool stream = stream_rows(out, P * b, b);
#pragma omp parallel if (P * b >= parallel_min_compute() || P * k >= parallel_min_compute() / 4)
  {
    std::vector<float> buf((size_t)(stream ? b : 0)), sel((size_t)k), gate((size_t)k), dsel((size_t)k),
        tmp((size_t)k);
    std::vector<int64_t> cols((size_t)k), at((size_t)k);  // the kept children's columns; at: ascending (to_logits)
#pragma omp for schedule(static) nowait  // the region's end is the barrier
    for (int64_t p = 0; p < P; ++p) {
      const int32_t* ch = child + p * k;
      const float* dp = dpath + p * k;
      const float* pr = probs + p * b;
      for (int64_t j = 0; j < k; ++j) {
        cols[(size_t)j] = col((uint32_t)ch[j]);
        sel[(size_t)j] = pr[cols[(size_t)j]];
      }
      float S = 1.f;
      if (renorm) {
        S = sum_of_row(sel.data(), k);
        for (int64_t j = 0; j < k; ++j) gate[(size_t)j] = sel[(size_t)j] / S;
      }
      const float* g = renorm ? gate.data() : sel.data();
      for (int64_t j = 0; j < k; ++j) dsel[(size_t)j] = path_parent ? dp[j] * path_parent[p] : dp[j];  // d gate
      if (path_parent && dparent) {
        for (int64_t j = 0; j < k; ++j) tmp[(size_t)j] = dp[j] * g[j];
        dparent[p] = sum_of_row(tmp.data(), k);
      }
      if (renorm) {  // d(a/S)/da = 1/S; d/dS = -sum(g/S * a / S), broadcast back over the k siblings
        for (int64_t j = 0; j < k; ++j) {
          dsel[(size_t)j] = dsel[(size_t)j] / S;
          tmp[(size_t)j] = (dsel[(size_t)j] * sel[(size_t)j]) / S;
        }
        const float db = sum_of_row(tmp.data(), k);
        for (int64_t j = 0; j < k; ++j) dsel[(size_t)j] = dsel[(size_t)j] + -db;
      }
      // The row of d probs: zeroed, then its k slots' gradients added (distinct children: 0.f + dsel each).
      float* row = stream ? buf.data() : out + p * b;
      if (!to_logits) {
        std::fill(row, row + b, 0.f);
        for (int64_t j = 0; j < k; ++j) row[cols[(size_t)j]] += dsel[(size_t)j];
      } else {
        // softmax_backward on that row without making it: its dot_row gains only the kept children's terms (a
        // zero term leaves a lane's sum as it is), added to their lanes in ascending column order; off the kept
        // children the row's gradient is probs * (0 - dot). Then the temperature's factor, as a separate product.
        for (int64_t j = 0; j < k; ++j) {  // insertion sort of the k slots by column (k is small)
          int64_t i = j;
          for (; i > 0 && cols[(size_t)at[(size_t)i - 1]] > cols[(size_t)j]; --i) at[(size_t)i] = at[(size_t)i - 1];
          at[(size_t)i] = j;
        }
#if defined(__AVX512F__)
        __m512 acc = _mm512_setzero_ps();  // in registers: lane c % 16 alone takes the term
        for (int64_t j : at) {
          const int64_t c = cols[(size_t)j];
          acc = _mm512_mask3_fmadd_ps(_mm512_set1_ps(0.f + dsel[(size_t)j]), _mm512_set1_ps(pr[c]), acc,
                                      (__mmask16)(1u << (c % 16)));
        }
#else
        float acc[16] = {0};
        for (int64_t j : at) {
          const int64_t c = cols[(size_t)j];
          acc[c % 16] = fmadd(0.f + dsel[(size_t)j], pr[c], acc[c % 16]);
        }
#endif
        const float dot = fold16(acc), off = 0.f - dot;
        for (int64_t c = 0; c < b; ++c) row[c] = pr[c] * off;
        for (int64_t j = 0; j < k; ++j) {
          const int64_t c = cols[(size_t)j];
          row[c] = pr[c] * ((0.f + dsel[(size_t)j]) - dot);
        }
        if (inv_temp != 1.f)
          for (int64_t c = 0; c < b; ++c) row[c] = row[c] * inv_temp;
      }
#if defined(__AVX512F__)
      if (stream) stream_row(out + p * b, row, b);
#endif
    }
    if (stream) stream_fence();
  }
}

}  // namespace

void route_select_backward(float* dprobs, float* dparent, const float* dpath, const float* probs,
                           const int32_t* child, const float* path_parent, int64_t P, int64_t b, int64_t k,
                           bool renorm) {
  select_backward(dprobs, false, 1.f, dparent, dpath, probs, child, path_parent, P, b, k, renorm);
}

void route_select_backward_logits(float* dlogits, float* dparent, const float* dpath, const float* probs,
                                  const int32_t* child, const float* path_parent, float inv_temp, int64_t P,
                                  int64_t b, int64_t k, bool renorm) {
  select_backward(dlogits, true, inv_temp, dparent, dpath, probs, child, path_parent, P, b, k, renorm);
}

void route_bias_forward(float* bias, const float* rel, const float* use, const float* pruned,
                        const int64_t* branching, int64_t D, bool reliability) {
  std::vector<int64_t> off((size_t)D + 1, 0);  // level l's entries: bias[off[l] .. off[l + 1])
  int64_t width = 1;
  for (int64_t l = 0; l < D; ++l) {
    width *= branching[l];
    off[(size_t)l + 1] = off[(size_t)l] + width;
  }
  const int64_t N = width, total = off[(size_t)D];
  if (reliability) {
    // The reliabilities first, in bias itself (level by level from the leaves up); the usage beside them.
    std::vector<float> u((size_t)total);
    std::copy(rel, rel + N, bias + off[(size_t)D - 1]);
    std::copy(use, use + N, u.begin() + off[(size_t)D - 1]);
    for (int64_t l = D - 2; l >= 0; --l) {
      const int64_t n = off[(size_t)l + 1] - off[(size_t)l], b = branching[l + 1];  // n: nodes of level l + 1
      const float* rc = bias + off[(size_t)l + 1];
      const float* uc = u.data() + off[(size_t)l + 1];
      for (int64_t j = 0; j < n; ++j) {
        double su = 0.0, sur = 0.0, sr = 0.0;
        for (int64_t c = 0; c < b; ++c) {
          su += uc[j * b + c];
          sur += (double)uc[j * b + c] * rc[j * b + c];
          sr += rc[j * b + c];
        }
        bias[off[(size_t)l] + j] = (float)(su > 0.0 ? sur / su : sr / (double)b);
        u[(size_t)(off[(size_t)l] + j)] = (float)su;
      }
    }
    for (int64_t i = 0; i < total; ++i) bias[i] = std::log(bias[i]);  // float log; log(1) == 0
  } else {
    std::fill(bias, bias + total, 0.f);
  }
  float* last = bias + off[(size_t)D - 1];
  for (int64_t e = 0; e < N; ++e)
    if (pruned[e] != 0.f) last[e] = -INFINITY;
}

}  // namespace cm::cpu
