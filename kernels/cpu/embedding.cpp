// CPU embedding. Forward copies rows in parallel. Backward: counting sort of positions by id (serial, O(N + V)),
// then a parallel loop over distinct ids; see kernels/embedding.h for the determinism argument.
#include "kernels/embedding.h"

#include <cstring>
#include <vector>

#include "kernels/cpu/parallel.h"

namespace cm::cpu {

void embedding_forward(float* out, const float* weight, const int32_t* ids, int64_t N, int64_t V, int64_t C) {
  (void)V;
#pragma omp parallel for schedule(static) if (N * C >= parallel_min())
  for (int64_t n = 0; n < N; ++n) std::memcpy(out + n * C, weight + (int64_t)ids[n] * C, (size_t)C * sizeof(float));
}

void embedding_backward(float* dweight, const float* dout, const int32_t* ids, int64_t N, int64_t V, int64_t C) {
  if (N == 0 || C == 0) return;
  // start [V + 1]: exclusive scan of id counts; order [N]: positions grouped by id, increasing n inside a group.
  std::vector<int64_t> start((size_t)V + 1, 0), order((size_t)N);
  for (int64_t n = 0; n < N; ++n) start[(size_t)ids[n] + 1]++;
  for (int64_t v = 0; v < V; ++v) start[(size_t)v + 1] += start[(size_t)v];
  std::vector<int64_t> fill(start.begin(), start.end() - 1);
  for (int64_t n = 0; n < N; ++n) order[(size_t)fill[(size_t)ids[n]]++] = n;
  // Distinct ids only, so that a large vocabulary with few used rows does not cost O(V) parallel iterations.
  std::vector<int32_t> used;
  for (int64_t v = 0; v < V; ++v)
    if (start[(size_t)v + 1] > start[(size_t)v]) used.push_back((int32_t)v);
  const int64_t U = (int64_t)used.size();
#pragma omp parallel for schedule(static) if (N * C >= parallel_min())
  for (int64_t u = 0; u < U; ++u) {
    const int64_t v = used[(size_t)u];
    float* __restrict dw = dweight + v * C;
    for (int64_t j = start[(size_t)v]; j < start[(size_t)v + 1]; ++j) {
      const float* __restrict dy = dout + order[(size_t)j] * C;
      for (int64_t c = 0; c < C; ++c) dw[c] += dy[c];
    }
  }
}

}  // namespace cm::cpu
