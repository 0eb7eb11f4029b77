// MoE dispatch: the counting sort that makes each expert's rows contiguous, and the gather/combine around the
// experts (DESIGN.md section 3, steps 2-5).
//
// Letters: T tokens, K slots per token, C channels, N experts.
//   A  = T*K assignments, row-major [T, K]: assignment a belongs to token a / K, slot a % K.
//   expert[a] in [0, N) is the chosen expert, or -1 when the capacity filter dropped the assignment.
//   A' = number of kept assignments = rows of the expert-contiguous buffer; expert e owns rows
//        offsets[e] .. offsets[e+1]-1.
//   row_of[a]      row of assignment a in that buffer, -1 if dropped       [A]
//   assign_of[row] the assignment that a row came from (the inverse)       [A']
// The sort is stable: within one expert, rows keep increasing a (so increasing token). The permutation is an
// integer function of `expert` alone: the same for any thread count and on every backend.
//
// One layer, forward:  dispatch_plan -> dispatch_permute -> expert FFN per segment -> dispatch_combine
//            backward: dispatch_combine_backward -> expert FFN backward -> dispatch_permute_backward
// Every output element is written by one thread in a fixed order (combine and permute_backward are token-parallel
// and add a token's slots in slot order): no atomics, bit-identical results for any thread count.
//
// Sizes: A must be < 2^31 (rows are i32, the dtype tensors hold them in); row * C is computed in int64.
#pragma once
#include <cstdint>

namespace cm::cpu {

// counts[e] = #{a : expert[a] == e}. Ids of -1 are skipped. Returns how many ids lie outside [-1, N): those are
// skipped as well (nothing is written out of bounds), and a caller must treat a nonzero return as an error.
int64_t dispatch_histogram(int64_t* counts,        // [N]
                           const int32_t* expert,  // [A]
                           int64_t A, int64_t N);

// Exclusive scan: offsets[0] = 0, offsets[e+1] = offsets[e] + counts[e]; offsets[N] = A'.
void dispatch_offsets(int64_t* offsets,       // [N+1]
                      const int64_t* counts,  // [N]
                      int64_t N);

// Stable counting-sort scatter: fills row_of (every a; -1 where dropped or out of range) and assign_of (every
// row). offsets must come from dispatch_offsets over the same `expert`.
void dispatch_scatter(int32_t* row_of,         // [A]
                      int32_t* assign_of,      // [A']
                      const int32_t* expert,   // [A]
                      const int64_t* offsets,  // [N+1]
                      int64_t A, int64_t N);

// The three above in one call. Returns dispatch_histogram's count of out-of-range ids.
int64_t dispatch_plan(int64_t* counts,        // [N]
                      int64_t* offsets,       // [N+1]
                      int32_t* row_of,        // [A]
                      int32_t* assign_of,     // [A'] (size it with A when A' is not known yet)
                      const int32_t* expert,  // [A]
                      int64_t A, int64_t N);
// The same without a read-out, for a plan the host does not wait for: an out-of-range id is an error found where the
// ids are (CUDA: recorded in the engine's device error record, IndexOp::Dispatch, and raised at the next read-out of
// any device value, engine/cuda.h; the CPU twin throws at once). The host cannot size assign_of by A' here: it is
// [A], and its rows past offsets[N] (as many as the dropped ids) are set to -1, which dispatch_permute fills with
// zeros. So a buffer of A rows serves any number of drops: the experts compute rows offsets[0] .. offsets[N].
void dispatch_plan_nowait(int64_t* counts, int64_t* offsets, int32_t* row_of, int32_t* assign_of,
                          const int32_t* expert, int64_t A, int64_t N);

// Gather tokens into the expert-contiguous buffer: xe[row] = x[assign_of[row] / K], or zeros where assign_of[row]
// is -1 (a nowait plan's unfilled rows). Row-parallel copy.
void dispatch_permute(float* xe,                 // [A', C]
                      const float* x,            // [T, C]
                      const int32_t* assign_of,  // [A']
                      int64_t Ap, int64_t K, int64_t C);

// Backward of dispatch_permute: dx[t] = sum over t's kept slots j, in slot order, of d_xe[row_of[t*K + j]].
// Overwrites dx; a token whose slots were all dropped gets 0.
void dispatch_permute_backward(float* dx,              // [T, C]
                               const float* d_xe,      // [A', C]
                               const int32_t* row_of,  // [T*K]
                               int64_t T, int64_t K, int64_t C);

// Combine: out[t] = sum over t's kept slots j, in slot order, of gate[t*K + j] * ye[row_of[t*K + j]].
// Overwrites out; a token whose slots were all dropped gets 0. Gates of dropped slots are not read.
void dispatch_combine(float* out,             // [T, C]
                      const float* ye,        // [A', C] expert outputs, expert-contiguous
                      const float* gate,      // [T*K]
                      const int32_t* row_of,  // [T*K]
                      int64_t T, int64_t K, int64_t C);

// Backward of dispatch_combine, row-parallel (the rows of d_ye and ye in sequence; the plan's assign_of gives each
// row's slot a, -1 for a row no slot fills, whose d_ye row is left as it is):
//   d_ye[r]   = gate[a] * d_out[a / K]             (overwrites)
//   d_gate[a] = dot(d_out[a / K], ye[r])           (overwrites; 0 for a dropped slot, row_of[a] = -1)
// The dot is summed in a fixed order of 16 partial sums, so it does not depend on threads either.
// Pass nullptr for an output you do not need (e.g. d_gate when gates are constants).
void dispatch_combine_backward(float* d_ye,               // [A', C] or nullptr
                               float* d_gate,             // [T*K] or nullptr
                               const float* d_out,        // [T, C]
                               const float* ye,           // [A', C]
                               const float* gate,         // [T*K]
                               const int32_t* row_of,     // [T*K]
                               const int32_t* assign_of,  // [A']
                               int64_t T, int64_t Ap, int64_t K, int64_t C);

}  // namespace cm::cpu

#if CM_CUDA
// CUDA twins (kernels/cuda/dispatch.cu): the same contracts on device pointers, launched on the engine's stream.
// The permutation equals the CPU's exactly (an integer function of `expert`; no atomics anywhere). The functions
// that return the out-of-range count (histogram, plan) wait for the stream to read it back; the others return at
// once. Limits: 1 <= N <= 12288 experts (per-warp shared counters), A < 2^31.
namespace cm::cuda {

int64_t dispatch_histogram(int64_t* counts, const int32_t* expert, int64_t A, int64_t N);
void dispatch_offsets(int64_t* offsets, const int64_t* counts, int64_t N);
void dispatch_scatter(int32_t* row_of, int32_t* assign_of, const int32_t* expert, const int64_t* offsets, int64_t A,
                      int64_t N);
int64_t dispatch_plan(int64_t* counts, int64_t* offsets, int32_t* row_of, int32_t* assign_of, const int32_t* expert,
                      int64_t A, int64_t N);
void dispatch_plan_nowait(int64_t* counts, int64_t* offsets, int32_t* row_of, int32_t* assign_of,
                          const int32_t* expert, int64_t A, int64_t N);
void dispatch_permute(float* xe, const float* x, const int32_t* assign_of, int64_t Ap, int64_t K, int64_t C);
void dispatch_permute_backward(float* dx, const float* d_xe, const int32_t* row_of, int64_t T, int64_t K, int64_t C);
void dispatch_combine(float* out, const float* ye, const float* gate, const int32_t* row_of, int64_t T, int64_t K,
                      int64_t C);
void dispatch_combine_backward(float* d_ye, float* d_gate, const float* d_out, const float* ye, const float* gate,
                               const int32_t* row_of, const int32_t* assign_of, int64_t T, int64_t Ap, int64_t K,
                               int64_t C);

}  // namespace cm::cuda
#endif
