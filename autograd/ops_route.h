// Differentiable ops of the tree router's levels (kernels/route.h), on the device of their inputs.
// Letters: T tokens, C channels, P (token, node) pairs alive at a level (token-major, Kp = P / T per token), b
// branching, n nodes at the level.
#pragma once
#include "autograd/ops.h"

namespace cm {

// Routed logits of one level: logits [P, b], logits[p, c] = h[p / Kp] . W[node[p] * b + c].
// h [T, C]; W [n * b, C] (a node's b children are consecutive rows); node i32 [P] with P a multiple of T, on h's
// device, or undefined for a level with one node (then P = T). Gradients to h and W (not to node). On the CPU the
// node ids are checked against [0, n); on a device they come from route kernels (an id out of range gives NaN).
// This replaces "sort pairs by node, gather their token rows, one matmul per node, concat, unsort": one kernel each
// way, the same bits on the CPU (kernels/route.h).
Tensor routed_logits(const Tensor& h, const Tensor& W, const Tensor& node, int64_t b);

}  // namespace cm
