// MoE capacity filter (DESIGN.md 4.4): an expert takes at most `cap` assignments; the overflow is dropped lowest
// gate first. It runs between two dispatch plans (kernels/dispatch.h): the plan of the router's choices gives each
// expert's assignments in increasing a (assign_of, offsets); this filter rewrites `expert` with -1 for the dropped
// ones; the plan of the filtered ids is the one the experts use.
//
// Letters: A = T*K assignments, N experts, A' rows of the unfiltered plan (= A when the router drops nothing).
// The rule, one total order per expert ("a ranks ahead of b"):
//   gate[a] > gate[b], or gate[a] == gate[b] and a < b (ties: the earlier assignment stays);
//   a NaN gate ranks behind every number (dropped first), NaNs among themselves by index.
// An expert keeps the cap assignments that rank first. Integer output from comparisons only: the CUDA twin
// gives the CPU's ids exactly, for any thread count.
#pragma once
#include <cmath>
#include <cstdint>

#include "engine/hd.h"

namespace cm::shared {
// Does assignment a (gate ga) rank ahead of b (gate gb)? The rule above, for both twins: a strict total order, so
// sorting by it is well defined.
CM_HD bool capacity_ahead(float ga, int32_t a, float gb, int32_t b) {
  const bool na = std::isnan(ga), nb = std::isnan(gb);
  if (na != nb) return nb;  // a number ranks ahead of a NaN
  if (!na && ga != gb) return ga > gb;
  return a < b;
}
}  // namespace cm::shared

namespace cm::cpu {

void capacity_filter(int32_t* expert_out,       // [A] expert[a], or -1 where dropped
                     const int32_t* expert,     // [A] ids in [-1, N) (the plan's input)
                     const float* gate,         // [A]
                     const int32_t* assign_of,  // [A'] of dispatch_plan over `expert`
                     const int64_t* offsets,    // [N+1] of the same plan
                     int64_t A, int64_t N, int64_t cap);

}  // namespace cm::cpu

#if CM_CUDA
// CUDA twin (kernels/cuda/capacity.cu): same contract on device pointers (offsets too), on the engine's stream,
// no wait. Each row counts the rows of its expert that rank ahead of it, a block's rows together through shared
// memory: O(sum over experts of n_e^2) comparisons, for experts over capacity only, spread over the whole grid.
namespace cm::cuda {

void capacity_filter(int32_t* expert_out, const int32_t* expert, const float* gate, const int32_t* assign_of,
                     const int64_t* offsets, int64_t A, int64_t N, int64_t cap);

}  // namespace cm::cuda
#endif
