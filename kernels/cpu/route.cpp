// CPU router level kernels (kernels/route.h). The logits of a level with several nodes are dot products of a
// token row with its node's b rows. Each element runs the CPU GEMM's sequence (acc = 0; acc = fma(h_q, w_q, acc)
// for q in a K block in increasing q; out = acc for the first block, out + acc after), so a pair's logits equal
// those that matmul would give on its node's segment: the router's decisions do not move when the grouping does.
// The K blocks are cpu::gemm's own (gemm_k_block, kernels/gemm.h).
// The chains are vectorised across the b children (W of the node packed as [C][b]), not along q, to keep that
// order.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <vector>

#include "kernels/gemm.h"
#include "kernels/reduce.h"
#include "kernels/route.h"
#include "kernels/softmax.h"
#include "kernels/topk.h"
#include "engine/check.h"

namespace cm::cpu {

namespace {

std::atomic<int64_t> logit_macs{0};

constexpr int64_t kParallelMin = 1 << 15;  // multiply-adds below which a parallel region costs more than it saves

}  // namespace

int64_t route_logits_multiply_adds() { return logit_macs.load(std::memory_order_relaxed); }

void route_logits_forward(float* logits, const float* h, const float* W, const int32_t* node, int64_t P, int64_t Kp,
                          int64_t n, int64_t b, int64_t C) {
  if (P == 0 || b == 0) return;
  if (!node) {  // one node: every pair is token p (Kp = 1)
    gemm(logits, b, h, C, W, C, P, b, C, false, true);
    return;
  }
  if (C == 0) {
    std::fill(logits, logits + P * b, 0.f);
    return;
  }
  logit_macs.fetch_add(P * b * C, std::memory_order_relaxed);
  // Wt [n][C][b]: node j's rows transposed, so the b chains of a pair advance together along q.
  std::vector<float> Wt((size_t)(n * C * b));
  for (int64_t j = 0; j < n; ++j)
    for (int64_t c = 0; c < b; ++c)
      for (int64_t q = 0; q < C; ++q) Wt[(size_t)((j * C + q) * b + c)] = W[(j * b + c) * C + q];
  const int64_t kb = gemm_k_block(C);
#pragma omp parallel if (P * b * C >= kParallelMin)
  {
    std::vector<float> acc((size_t)b);
#pragma omp for schedule(static)
    for (int64_t p = 0; p < P; ++p) {
      const float* hr = h + (p / Kp) * C;
      const float* wt = Wt.data() + (size_t)node[p] * C * b;
      float* out = logits + p * b;
      float* a = acc.data();
      for (int64_t q0 = 0; q0 < C; q0 += kb) {
        const int64_t q1 = std::min(C, q0 + kb);
        std::fill(a, a + b, 0.f);
        for (int64_t q = q0; q < q1; ++q) {
          const float hq = hr[q];
          const float* w = wt + q * b;
#pragma omp simd
          for (int64_t c = 0; c < b; ++c) a[c] = std::fma(hq, w[c], a[c]);
        }
        if (q0 == 0)
          std::copy(a, a + b, out);
        else
          for (int64_t c = 0; c < b; ++c) out[c] += a[c];
      }
    }
  }
}

void route_logits_backward_h(float* dh, const float* dlogits, const float* W, const int32_t* node, int64_t T,
                             int64_t Kp, int64_t /*n*/, int64_t b, int64_t C) {
  if (T == 0 || C == 0) return;
  if (!node) {  // one node: dh = dlogits W, as matmul's backward computes it
    gemm(dh, C, dlogits, b, W, C, T, C, b, false, false);
    return;
  }
#pragma omp parallel if (T * Kp * b * C >= kParallelMin)
  {
    std::vector<float> acc((size_t)C);
    std::vector<int64_t> ord((size_t)Kp);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < T; ++t) {
      float* out = dh + t * C;
      std::fill(out, out + C, 0.f);
      // The token's pairs by increasing node (a token's pairs are distinct nodes; ties keep pair order).
      for (int64_t i = 0; i < Kp; ++i) ord[(size_t)i] = t * Kp + i;
      std::stable_sort(ord.begin(), ord.end(), [&](int64_t x, int64_t y) { return node[x] < node[y]; });
      for (int64_t p : ord) {
        const float* g = dlogits + p * b;
        const float* w = W + (int64_t)node[p] * b * C;
        float* a = acc.data();
        std::fill(a, a + C, 0.f);
        for (int64_t c = 0; c < b; ++c) {
          const float gc = g[c];
          const float* wr = w + c * C;
#pragma omp simd
          for (int64_t q = 0; q < C; ++q) a[q] = std::fma(gc, wr[q], a[q]);
        }
#pragma omp simd
        for (int64_t q = 0; q < C; ++q) out[q] += a[q];
      }
    }
  }
}

void route_logits_backward_w(float* dW, const float* dlogits, const float* h, const int32_t* node, int64_t P,
                             int64_t Kp, int64_t n, int64_t b, int64_t C) {
  if (n * b == 0 || C == 0) return;
  if (!node) {  // one node: dW = dlogits^T h, as matmul's backward computes it
    gemm(dW, C, dlogits, b, h, C, b, C, P, true, false);
    return;
  }
  // Stable counting sort of the pairs by node: node j's pairs are order[offsets[j] .. offsets[j+1]), increasing p.
  std::vector<int64_t> offsets((size_t)n + 1, 0);
  for (int64_t p = 0; p < P; ++p) ++offsets[(size_t)node[p] + 1];
  for (int64_t j = 0; j < n; ++j) offsets[j + 1] += offsets[j];
  std::vector<int64_t> order((size_t)P), next(offsets.begin(), offsets.end() - 1);
  for (int64_t p = 0; p < P; ++p) order[(size_t)next[node[p]]++] = p;
#pragma omp parallel if (P * b * C >= kParallelMin)
  {
    std::vector<float> acc((size_t)C);
#pragma omp for schedule(static)
    for (int64_t row = 0; row < n * b; ++row) {
      const int64_t j = row / b, c = row % b;
      const int64_t a0 = offsets[j], a1 = offsets[j + 1];
      float* out = dW + row * C;
      std::fill(out, out + C, 0.f);
      const int64_t kb = gemm_k_block(a1 - a0);
      float* a = acc.data();
      for (int64_t s0 = a0; s0 < a1; s0 += kb) {
        const int64_t s1 = std::min(a1, s0 + kb);
        std::fill(a, a + C, 0.f);
        for (int64_t s = s0; s < s1; ++s) {
          const int64_t p = order[(size_t)s];
          const float g = dlogits[p * b + c];
          const float* hr = h + (p / Kp) * C;
#pragma omp simd
          for (int64_t q = 0; q < C; ++q) a[q] = std::fma(g, hr[q], a[q]);
        }
        if (s0 == a0)
          std::copy(a, a + C, out);
        else
#pragma omp simd
          for (int64_t q = 0; q < C; ++q) out[q] += a[q];
      }
    }
  }
}

void route_histogram(int32_t* counts, const int32_t* ids, int64_t A, int64_t n, bool accumulate) {
  if (!accumulate) std::fill(counts, counts + n, 0);
  for (int64_t i = 0; i < A; ++i)
    if (ids[i] >= 0 && ids[i] < n) ++counts[ids[i]];
}

// Mean entropy (nats) of the rows of p = softmax(s), p and s [P, b], without a log per element. In a row,
// log p_c = s_c - max(s) - log Z and the largest probability is 1/Z, so
//   H = -sum_c p_c log p_c = -log(max p) * sum_c p_c - sum_c p_c (s_c - max s)
// (one log per row; equal to the per-element form up to float rounding of p). Only p_c > 0 count, as in
// -sum p log p: a pruned child (s = -inf, p = 0) adds nothing, and neither does a NaN row. Rows run in parallel;
// their entropies are summed in row order afterwards, so the result does not depend on the thread count.
float route_mean_entropy(const float* p, const float* s, int64_t P, int64_t b) {
  std::vector<double> row((size_t)P);
#pragma omp parallel for schedule(static) if (P * b >= (1 << 15))
  for (int64_t r = 0; r < P; ++r) {
    const float* pr = p + r * b;
    const float* sr = s + r * b;
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
    row[r] = pmax > 0.f ? -std::log((double)pmax) * psum - ps : 0.0;  // pmax = 0: a NaN row
  }
  double ent = 0.0;
  for (double h : row) ent += h;
  return (float)(ent / (double)std::max<int64_t>(P, 1));
}

void route_select_forward(float* probs, float* path, int32_t* child, int32_t* idx, float* entropy,
                          const float* logits, const int32_t* node, const float* path_parent, const float* lbias,
                          const float* abias, float inv_temp, int64_t P, int64_t n, int64_t b, int64_t k,
                          bool renorm) {
  if (P == 0) {
    if (entropy) entropy[0] = 0.f;
    return;
  }
  auto at = [&](int64_t p) { return (node ? (int64_t)node[p] : 0) * b; };  // the pair's node's first child
  // s = logits / temperature + logit bias, as the ops did it: x * inv_temp, then + bias, in two passes (one
  // expression would let the compiler fuse them into an fma, which rounds once: not the ops' bits).
  const float* sp = logits;
  std::vector<float> s;
  if (inv_temp != 1.f || lbias) {
    s.assign(logits, logits + P * b);
    if (inv_temp != 1.f)
      for (float& v : s) v = v * inv_temp;
    if (lbias)
      for (int64_t p = 0; p < P; ++p) {
        const int64_t a = at(p);
        for (int64_t c = 0; c < b; ++c) s[(size_t)(p * b + c)] = s[(size_t)(p * b + c)] + lbias[a + c];
      }
    sp = s.data();
  }
  softmax_forward(probs, sp, P, b);
  if (entropy) entropy[0] = route_mean_entropy(probs, sp, P, b);

  // Selection scores: the probabilities, + aux-free bias, -inf for pruned children (ranked below every selectable
  // child; NaN ranks first in topk_forward, but a softmax row is all NaN or NaN-free, and on an all-NaN row this
  // still takes the first k selectable children).
  bool any_pruned = false;
  if (lbias)
    for (int64_t i = 0; i < n * b && !any_pruned; ++i) any_pruned = std::isinf(lbias[i]) && lbias[i] < 0;
  const float* scores = probs;
  std::vector<float> biased;
  if (abias || any_pruned) {
    biased.resize((size_t)(P * b));
    for (int64_t p = 0; p < P; ++p) {
      const int64_t a = at(p);
      for (int64_t c = 0; c < b; ++c) {
        const float v = probs[p * b + c] + (abias ? abias[a + c] : 0.f);
        const bool pruned = any_pruned && std::isinf(lbias[a + c]) && lbias[a + c] < 0;
        biased[(size_t)(p * b + c)] = pruned ? -INFINITY : v;
      }
    }
    scores = biased.data();
  }
  std::vector<float> top((size_t)(P * k));  // the selected scores (unused: the gates come from probs)
  std::vector<int32_t> own;
  int32_t* ix = idx;
  if (!ix) {
    own.resize((size_t)(P * k));
    ix = own.data();
  }
  topk_forward(top.data(), ix, scores, P, b, k);
  if (any_pruned)
    for (int64_t i = 0; i < P * k; ++i) {
      const float lb = lbias[at(i / k) + ix[i]];
      CM_CHECK(!(std::isinf(lb) && lb < 0), "node ", at(i / k) / b, " has fewer than ", k, " selectable children");
    }

  // gates, renormalised over the k kept siblings as div(sel, sum(sel, 1)) did; path; next nodes.
  std::vector<float> sel((size_t)(P * k));
  for (int64_t i = 0; i < P * k; ++i) sel[(size_t)i] = probs[(i / k) * b + ix[i]];
  if (renorm) {
    std::vector<float> S((size_t)P);
    sum_axis(S.data(), sel.data(), P, k, 1, 1.f);
    for (int64_t i = 0; i < P * k; ++i) sel[(size_t)i] = sel[(size_t)i] / S[(size_t)(i / k)];
  }
  for (int64_t i = 0; i < P * k; ++i) {
    path[i] = path_parent ? path_parent[i / k] * sel[(size_t)i] : sel[(size_t)i];
    child[i] = (int32_t)(at(i / k) + ix[i]);
  }
}

void route_select_backward(float* dprobs, float* dparent, const float* dpath, const float* probs,
                           const int32_t* child, const float* path_parent, int64_t P, int64_t b, int64_t k,
                           bool renorm) {
  if (P == 0) return;
  const int64_t A = P * k;
  // The composite's rules, in its order: path = parent * gate (mul), gate = sel / sum(sel) (div, sum), sel =
  // gather(probs). Sums over the k siblings go through cpu::sum_axis, as sum and sum_to did.
  std::vector<float> sel((size_t)A), gate((size_t)A), S;
  for (int64_t i = 0; i < A; ++i) sel[(size_t)i] = probs[(i / k) * b + child[i] % b];
  gate = sel;
  if (renorm) {
    S.resize((size_t)P);
    sum_axis(S.data(), sel.data(), P, k, 1, 1.f);
    for (int64_t i = 0; i < A; ++i) gate[(size_t)i] = sel[(size_t)i] / S[(size_t)(i / k)];
  }
  std::vector<float> dgate((size_t)A), tmp((size_t)A);
  for (int64_t i = 0; i < A; ++i) dgate[(size_t)i] = path_parent ? dpath[i] * path_parent[i / k] : dpath[i];
  if (path_parent && dparent) {
    for (int64_t i = 0; i < A; ++i) tmp[(size_t)i] = dpath[i] * gate[(size_t)i];
    sum_axis(dparent, tmp.data(), P, k, 1, 1.f);
  }
  std::vector<float> dsel = dgate;
  if (renorm) {  // d(a/S)/da = 1/S; d/dS = -sum(g/S * a / S), broadcast back over the k siblings
    std::vector<float> db((size_t)P);
    for (int64_t i = 0; i < A; ++i) {
      dsel[(size_t)i] = dgate[(size_t)i] / S[(size_t)(i / k)];
      tmp[(size_t)i] = (dsel[(size_t)i] * sel[(size_t)i]) / S[(size_t)(i / k)];
    }
    sum_axis(db.data(), tmp.data(), P, k, 1, 1.f);
    for (int64_t i = 0; i < A; ++i) dsel[(size_t)i] = dsel[(size_t)i] + -db[(size_t)(i / k)];
  }
  std::fill(dprobs, dprobs + P * b, 0.f);
  for (int64_t i = 0; i < A; ++i) dprobs[(i / k) * b + child[i] % b] += dsel[(size_t)i];
}

}  // namespace cm::cpu
