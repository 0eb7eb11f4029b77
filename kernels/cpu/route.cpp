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
#include "kernels/route.h"

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

}  // namespace cm::cpu
