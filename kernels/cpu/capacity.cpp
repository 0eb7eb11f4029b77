// CPU capacity filter: per expert over capacity, its assignments sorted by the rule of kernels/capacity.h, the ones
// past cap set to -1. Experts are independent (parallel over experts); the result is an integer function of the
// inputs.
#include "kernels/capacity.h"

#include <algorithm>
#include <cstring>
#include <vector>

namespace cm::cpu {

void capacity_filter(int32_t* expert_out, const int32_t* expert, const float* gate, const int32_t* assign_of,
                     const int64_t* offsets, int64_t A, int64_t N, int64_t cap) {
  if (A > 0) std::memcpy(expert_out, expert, (size_t)A * sizeof(int32_t));
  if (cap < 0) cap = 0;
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t e = 0; e < N; ++e) {
    const int64_t r0 = offsets[e], r1 = offsets[e + 1];
    if (r1 - r0 <= cap) continue;
    std::vector<int32_t> rows(assign_of + r0, assign_of + r1);
    std::sort(rows.begin(), rows.end(),
              [gate](int32_t a, int32_t b) { return shared::capacity_ahead(gate[a], a, gate[b], b); });
    for (size_t i = (size_t)cap; i < rows.size(); ++i) expert_out[rows[i]] = -1;
  }
}

}  // namespace cm::cpu
