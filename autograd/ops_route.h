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

// The fused selection of one level (kernels/route.h route_select_forward has the formulas): probabilities, the k
// kept children per pair (selected by probs + aux-free bias, pruned children never), their gates (renormalised over
// the k kept siblings when renorm) times the parent's path, and the next level's node ids.
//   logits [P, b]; node i32 [P] in [0, n) or undefined (n = 1); path_parent [P] or undefined (the root: path = gate);
//   logit_bias [n * b] (log reliability, -inf for pruned children; no gradient) or undefined; aux_bias [n * b]
//   (selection only) or undefined. All on logits' device.
// Gradients: probs -> logits; path -> probs (its selected columns) and path_parent. The selection has none.
// probs_grad: whether the caller also differentiates a loss of its own through probs (the router's load-balance
// term). Every gradient is correct either way; what differs is the arithmetic. With it, path's gradient joins that
// loss's gradient of probs, and one softmax backward takes both. Without it, path's gradient goes straight to the
// logits in one kernel (route_select_backward_logits): one pass over probs, where the dense [P, b] gradient of probs
// was written and read back (64 MB each way at 16384 tokens and 1024 experts). The bits are the same as with it
// when nothing else reaches probs.
struct LevelSelection {
  Tensor probs;    // [P, b] softmax(logits / temperature + logit_bias)
  Tensor path;     // [P * k] path_parent * gate, token-major like the pairs: pair p's kept children p*k .. p*k+k-1
  Tensor child;    // [P * k] i32: node * b + selected child (the next level's node ids, or the leaves)
  Tensor idx;      // [P, k] i32: the selected child within its node
  Tensor entropy;  // 0-d: mean entropy (nats) of the rows of probs, when asked; else undefined
};
LevelSelection route_select(const Tensor& logits, const Tensor& node, const Tensor& path_parent,
                            const Tensor& logit_bias, const Tensor& aux_bias, int64_t n, float temperature, int64_t k,
                            bool renorm, bool entropy, bool probs_grad);

}  // namespace cm
