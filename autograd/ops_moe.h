// Differentiable MoE dispatch (DESIGN.md section 3) on the kernels of kernels/dispatch.h, kernels/capacity.h and
// kernels/grouped_gemm.h, on the device of their inputs:
//
//   expert [T*K] i32 (router's choices) --capacity_filter--> expert with -1 for dropped slots
//                                       --make_dispatch_plan--> DispatchPlan (row_of, assign_of, offsets)
//   x [T, C]                            --moe_permute-->        xe [A', C]   each expert's rows contiguous
//   xe                                  --grouped_linear x3-->  ye [A', C]   every expert's FFN, all at once
//   ye, gate [T*K]                      --moe_combine-->        out [T, C]   gate-weighted, slots in slot order
//
// Backward reuses the plan: combine -> (d_ye, d_gate), permute -> index-free sums per token. Every output element
// has one writer adding in a fixed order: no atomics, the same bits for any thread count.
// Letters: T tokens, K slots per token, C channels, N experts, A' kept slots (rows), in/out a Linear's features.
#pragma once
#include <memory>
#include <vector>

#include "autograd/ops.h"

namespace cm {

// The permutation of one MoE forward: a stable counting sort of the kept slots by expert (kernels/dispatch.h).
struct DispatchPlan {
  int64_t T = 0, K = 1, N = 1;
  int64_t rows = 0;               // A' kept slots; T*K for a plan made without the host (its kept count is
                                  // offsets[N], on the device: the rows past it belong to no expert)
  Tensor row_of;                  // i32 [T*K] row of slot a in the expert-contiguous buffer, -1 if dropped
  Tensor assign_of;               // i32 [rows] slot of each row (increasing within an expert), -1 for a row no
                                  // slot fills
  Tensor offsets_dev;             // the kernels' int64 [N+1] offsets, held in an i32 tensor [2(N+1)] on the
                                  // plan's device (tensors have f32/i32 dtypes only)
  std::vector<int64_t> offsets;   // [N+1] host copy: expert e's rows are offsets[e] .. offsets[e+1]; empty for a
                                  // plan made without the host (make_dispatch_plan_nowait)
  const int64_t* offsets_ptr() const { return (const int64_t*)offsets_dev.raw(); }
};

// expert i32 [T*K], ids in [-1, N) (-1: dropped). host_ids: the same ids on the host, when the caller has them
// (the router's read-out): the offsets are counted there and uploaded, and nothing waits. Without them, the
// kernels' plan runs on expert's device and a device build waits twice (out-of-range count, offsets).
DispatchPlan make_dispatch_plan(const Tensor& expert, int64_t K, int64_t N,
                                const std::vector<int32_t>* host_ids = nullptr);

// A plan the host does not wait for: the offsets stay on the device (no host copy: `offsets` empty), and the
// buffer has a row for every slot (rows = T*K) whatever the drops (ids of -1, capacity_filter's). The kept rows
// come first, as make_dispatch_plan places them; the rest are unfilled (assign_of -1): moe_permute gives them zeros
// and grouped_linear, bounded by the device offsets, never computes them; moe_combine reads rows by row_of only. An
// out-of-range id is an error found on the device (kernels/dispatch.h dispatch_plan_nowait). The training step's
// plan (model/moe.cpp).
DispatchPlan make_dispatch_plan_nowait(const Tensor& expert, int64_t K, int64_t N);

// Capacity filter (kernels/capacity.h): expert i32 [T*K] with -1 for the slots past each expert's cap, lowest gate
// dropped first (ties: the later slot). plan: a plan of expert (either maker); gate [T*K] (values only).
Tensor capacity_filter(const Tensor& expert, const Tensor& gate, const DispatchPlan& plan, int64_t cap);

// x [T, C] -> xe [A', C]: xe[r] = x[assign_of[r] / K]. Backward: dx[t] = sum of t's rows' gradients, slot order.
Tensor moe_permute(const Tensor& x, const DispatchPlan& plan);

// ye [A', C], gate [T*K] -> out [T, C]: out[t] = sum over t's kept slots j, in slot order, of gate[tK+j] *
// ye[row_of[tK+j]] (0 for a token whose slots were all dropped). Gradient to ye and gate.
Tensor moe_combine(const Tensor& ye, const Tensor& gate, const DispatchPlan& plan);

// All experts' Linear layers at once: for each expert e with rows r in [offsets[e], offsets[e+1]),
//   y[r] = x[r] w[e]^T + b[e]                x [A', in], w[e] [out, in], b[e] [out] (or all undefined), y [A', out]
// Backward: dx[r] = g[r] w[e]; dw[e] = g[rows]^T x[rows]; db[e] = column sums of g[rows]. An expert with no rows
// gets no gradient at all (undefined, as if it had not run). offsets: host [N+1] (plan.offsets), or empty when the
// host does not know them (make_dispatch_plan_nowait): then offsets_dev says where the rows are, and every expert
// gets a gradient, zero for one without rows (as PyTorch's grouped products give).
// ok (i32 [N] on x's device, or undefined): the fault guard's verdict, written after the forward (model/health.h),
// read by the backward where it lives: an expert with ok[e] == 0 is cut, its rows get a zero input gradient and its
// weights a zero gradient (selected, never multiplied: with NaN weights even a zero output gradient gives NaN).
// Per expert it is the same arithmetic as linear() on the expert's rows, so the result is bit-identical to it.
// offsets_dev: the same offsets as the kernels read them on x's device (DispatchPlan::offsets_dev); uploaded from
// `offsets` when undefined (a CPU x needs none). The weight gradients of all experts are views of one buffer.
// cache: the call site's pointer lists (one per MoE layer and weight family, make_grouped_linear_cache): on CUDA the
// kernels read the weight and bias lists from device memory, uploaded once into the cache and reused while the
// parameters keep their storage; null: each call uploads its own. The weight-gradient lists are made on the device.
struct GroupedLinearCache;
std::shared_ptr<GroupedLinearCache> make_grouped_linear_cache();
Tensor grouped_linear(const Tensor& x, const std::vector<Tensor>& w, const std::vector<Tensor>& b,
                      const std::vector<int64_t>& offsets, const Tensor& ok = Tensor(),
                      const Tensor& offsets_dev = Tensor(),
                      const std::shared_ptr<GroupedLinearCache>& cache = nullptr);

}  // namespace cm
