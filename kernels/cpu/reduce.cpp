// CPU reductions. Determinism comes from the shape of the work, never from the thread count:
//   - a long sum is cut into fixed kBlock-element blocks; each block is summed by one thread into 8 double lanes
//     (lane j takes elements j, j+8, ...), and the block partials are added in block order;
//   - an axis sum over [O, R, I] gives each output element to one thread, which adds its R values in order.
#include "kernels/reduce.h"

#include <cstddef>
#include <vector>

namespace cm::cpu {
namespace {

constexpr int64_t kBlock = 8192;           // elements per partial of a long sum (fixed: part of the result)
constexpr int64_t kChunk = 256;            // inner elements per tile of an axis reduction
constexpr int64_t kParallelMin = 1 << 15;  // below this many inputs threads cost more than they save

// Sum of a [n] (n <= a few blocks) in double: 8 independent lanes (the compiler vectorises the lane loop), then a
// fixed pairwise combine of the lanes.
inline double block_sum(const float* a, int64_t n) {
  double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) acc[j] += (double)a[i + j];
  for (int j = 0; i < n; ++i, ++j) acc[j] += (double)a[i];
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

// Sum of a [n] by blocks. `parallel` only decides who computes the partials, not how they are combined, so both
// settings give the same bits.
double long_sum(const float* a, int64_t n, bool parallel) {
  if (n <= kBlock) return block_sum(a, n);
  const int64_t nb = (n + kBlock - 1) / kBlock;
  std::vector<double> part(nb);
#pragma omp parallel for schedule(static) if (parallel && n >= kParallelMin)
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t lo = b * kBlock, len = (n - lo < kBlock) ? n - lo : kBlock;
    part[b] = block_sum(a + lo, len);
  }
  double s = 0;
  for (int64_t b = 0; b < nb; ++b) s += part[b];
  return s;
}

// "v beats best" for a max that keeps the FIRST maximum and lets NaN win (and stay).
inline bool beats(float v, float best) { return v > best || (v != v && best == best); }

}  // namespace

// ---------------------------------------------------------------- sums
void sum_all(float* out, const float* a, int64_t n, float scale) {
  out[0] = (float)((double)scale * long_sum(a, n, true));
}

void sum_axis(float* out, const float* a, int64_t O, int64_t R, int64_t I, float scale) {
  const double sc = scale;
  if (I == 1) {  // each output is a contiguous row of R
    if (O == 1) return sum_all(out, a, R, scale);
#pragma omp parallel for schedule(static) if (O * R >= kParallelMin)
    for (int64_t o = 0; o < O; ++o) out[o] = (float)(sc * long_sum(a + o * R, R, false));
    return;
  }
  // Tiles of (o, kChunk inner elements): a thread walks r in order and adds whole contiguous row pieces into
  // double accumulators, so the loads stream through memory and the adds vectorise.
  const int64_t chunks = (I + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static) if (O * R * I >= kParallelMin)
  for (int64_t t = 0; t < O * chunks; ++t) {
    const int64_t o = t / chunks, i0 = (t % chunks) * kChunk;
    const int64_t w = (I - i0 < kChunk) ? I - i0 : kChunk;
    double acc[kChunk];
    for (int64_t i = 0; i < w; ++i) acc[i] = 0;
    for (int64_t r = 0; r < R; ++r) {
      const float* row = a + (o * R + r) * I + i0;
      for (int64_t i = 0; i < w; ++i) acc[i] += (double)row[i];
    }
    float* dst = out + o * I + i0;
    for (int64_t i = 0; i < w; ++i) dst[i] = (float)(sc * acc[i]);
  }
}

void sum_to(float* out, const float* a, int64_t D, const int64_t* a_shape, const int64_t* out_shape) {
  // Collapse to alternating groups of kept and reduced dims: [3, 4, 5] -> [1, 4, 1] is (reduce 3, keep 4,
  // reduce 5). Size-1 dims of a take no part.
  struct Group {
    int64_t size;
    bool reduce;
  };
  std::vector<Group> g;
  int64_t out_n = 1;
  for (int64_t d = 0; d < D; ++d) {
    out_n *= out_shape[d];
    if (a_shape[d] == 1) continue;
    const bool red = out_shape[d] == 1;
    if (!g.empty() && g.back().reduce == red)
      g.back().size *= a_shape[d];
    else
      g.push_back({a_shape[d], red});
  }
  if (out_n == 0) return;
  int64_t nred = 0;
  for (const Group& x : g) nred += x.reduce;
  if (nred == 0) {  // nothing to reduce: a copy
#pragma omp parallel for schedule(static) if (out_n >= kParallelMin)
    for (int64_t i = 0; i < out_n; ++i) out[i] = a[i];
    return;
  }
  // Reduce the innermost reduced group first, then the next one out; each pass is a [O, R, I] sum_axis whose
  // inner part holds only kept groups. Intermediate results live in float (one extra rounding per pass).
  std::vector<float> cur, next;
  const float* src = a;
  for (int64_t k = (int64_t)g.size() - 1; k >= 0; --k) {
    if (!g[k].reduce) continue;
    int64_t O = 1, I = 1;
    for (int64_t j = 0; j < k; ++j) O *= g[j].size;
    for (int64_t j = k + 1; j < (int64_t)g.size(); ++j) I *= g[j].size;
    float* dst = out;
    if (--nred > 0) {
      next.resize((size_t)(O * I));
      dst = next.data();
    }
    sum_axis(dst, src, O, g[k].size, I, 1.f);
    g.erase(g.begin() + k);
    cur.swap(next);
    src = cur.data();
  }
}

// ---------------------------------------------------------------- max
void max_all(float* out, int64_t* idx, const float* a, int64_t n) {
  const int64_t nb = (n + kBlock - 1) / kBlock;
  std::vector<float> bv(nb);
  std::vector<int64_t> bi(nb);
#pragma omp parallel for schedule(static) if (n >= kParallelMin)
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t lo = b * kBlock, hi = (n - lo < kBlock) ? n : lo + kBlock;
    float best = a[lo];
    int64_t at = lo;
    for (int64_t i = lo + 1; i < hi; ++i)
      if (beats(a[i], best)) best = a[i], at = i;
    bv[b] = best;
    bi[b] = at;
  }
  // Blocks in order, strict "beats": a tie keeps the earlier block, so the first maximum wins overall.
  float best = bv[0];
  int64_t at = bi[0];
  for (int64_t b = 1; b < nb; ++b)
    if (beats(bv[b], best)) best = bv[b], at = bi[b];
  if (out) out[0] = best;
  if (idx) idx[0] = at;
}

void max_axis(float* out, int32_t* idx, const float* a, int64_t O, int64_t R, int64_t I) {
  const int64_t chunks = (I + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static) if (O * R * I >= kParallelMin)
  for (int64_t t = 0; t < O * chunks; ++t) {
    const int64_t o = t / chunks, i0 = (t % chunks) * kChunk;
    const int64_t w = (I - i0 < kChunk) ? I - i0 : kChunk;
    const float* base = a + o * R * I + i0;
    float best[kChunk];
    int32_t at[kChunk];
    for (int64_t i = 0; i < w; ++i) best[i] = base[i], at[i] = 0;
    for (int64_t r = 1; r < R; ++r) {
      const float* row = base + r * I;
      for (int64_t i = 0; i < w; ++i)
        if (beats(row[i], best[i])) best[i] = row[i], at[i] = (int32_t)r;
    }
    if (out)
      for (int64_t i = 0; i < w; ++i) out[o * I + i0 + i] = best[i];
    if (idx)
      for (int64_t i = 0; i < w; ++i) idx[o * I + i0 + i] = at[i];
  }
}

void max_axis_backward(float* dx, const float* dy, const int32_t* idx, int64_t O, int64_t R, int64_t I) {
#pragma omp parallel for schedule(static) if (O * R * I >= kParallelMin)
  for (int64_t o = 0; o < O; ++o) {
    float* d = dx + o * R * I;
    for (int64_t j = 0; j < R * I; ++j) d[j] = 0.f;
    for (int64_t i = 0; i < I; ++i) d[(int64_t)idx[o * I + i] * I + i] = dy[o * I + i];
  }
}

}  // namespace cm::cpu
