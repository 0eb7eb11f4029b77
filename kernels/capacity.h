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
#include <cstdint>

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
// no wait. One thread per row counts the rows of its expert that rank ahead of it: O(sum over experts of n_e^2)
// comparisons, for experts over capacity only.
namespace cm::cuda {

void capacity_filter(int32_t* expert_out, const int32_t* expert, const float* gate, const int32_t* assign_of,
                     const int64_t* offsets, int64_t A, int64_t N, int64_t cap);

}  // namespace cm::cuda
#endif
