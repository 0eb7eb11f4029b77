// Router level kernels (DESIGN.md 4.2): the work of one level of the tree router on the (token, node) pairs that
// are alive there, without leaving the device: the routed logits, the fused selection (softmax, biases, top-k,
// gates, path) and the integer histogram of the chosen children.
//
// Letters: T tokens, C channels (d_model), P pairs alive at the level, b branching (children per node), k children
// kept per pair, n nodes at the level. Pairs are token-major with a fixed fan-out Kp = P / T (the product of the
// top-k above): pair p belongs to token p / Kp, so no token array is needed. node[p] in [0, n) is the pair's node;
// its children are rows node[p] * b .. node[p] * b + b - 1 of the level's router matrix W [n * b, C].
//
// Determinism: every output element is written by one thread in a fixed order; no floating-point atomics. The
// weight gradient walks the pairs of each node in increasing p (a stable sort by node): per node one GEMM (CPU),
// one warp per row of dW (CUDA).
#pragma once
#include <cstdint>

#include "engine/hd.h"

namespace cm::cpu {

// logits [P, b]: logits[p, c] = dot(h[p / Kp], W[node[p] * b + c]). node == nullptr: one node (n = 1, Kp = 1), a
// plain product h W^T. Otherwise the pairs are grouped by node (stable), and each node's token rows meet its b
// rows in the GEMM's tiles (CPU: b < 16 children as W_j times the rows transposed, so that the pairs fill the
// vectors; more children as one grouped GEMM): the logits equal, bit for bit, those of the composite this replaced
// (sort, gather, per-node matmul, concat, unsort), and the GEMM's multiply-adds are counted by
// cpu::gemm_multiply_adds. node values must lie in [0, n) (the op checks them).
void route_logits_forward(float* logits,        // [P, b]
                          const float* h,       // [T, C]
                          const float* W,       // [n * b, C]
                          const int32_t* node,  // [P] or nullptr
                          int64_t P, int64_t Kp, int64_t n, int64_t b, int64_t C);

// dh [T, C] = sum over the token's pairs, in increasing node order, of dlogits[p] W[node[p] * b .. + b) (each
// pair's row one GEMM row, added to a zeroed row, as index_add did). Overwrites dh. The CPU makes each pair's row
// and adds it at once (no [P, C] intermediate); one node with 16 or more children is one GEMM.
void route_logits_backward_h(float* dh,             // [T, C]
                             const float* dlogits,  // [P, b]
                             const float* W,        // [n * b, C]
                             const int32_t* node,   // [P] or nullptr
                             int64_t T, int64_t Kp, int64_t n, int64_t b, int64_t C);

// dW [n * b, C]: node j's rows = its pairs' dlogits^T times their token rows, one GEMM per node over its pairs in
// increasing p (CPU: one grouped GEMM for all nodes, the token rows gathered in its packing). Rows of nodes no
// pair reached are 0. Overwrites dW.
void route_logits_backward_w(float* dW,             // [n * b, C]
                             const float* dlogits,  // [P, b]
                             const float* h,        // [T, C]
                             const int32_t* node,   // [P] or nullptr (then n = 1)
                             int64_t P, int64_t Kp, int64_t n, int64_t b, int64_t C);

// counts [n] (+)= #{i : ids[i] == j}; ids outside [0, n) are not counted. accumulate = false overwrites.
void route_histogram(int32_t* counts, const int32_t* ids, int64_t A, int64_t n, bool accumulate);

// The routing statistics' counters (model/stats.h), integers only (exact on both twins, in any order):
//   route_offset_counts: rows [N] = offsets[e + 1] - offsets[e], the rows of each expert in a dispatch plan (its
//                        offsets [N + 1], int64; each count fits i32: a forward has fewer than 2^31 slots);
//   route_counts_add:    acc [n] += counts [n], int64: a long run's totals cannot overflow.
void route_offset_counts(int32_t* rows, const int64_t* offsets, int64_t N);
void route_counts_add(int64_t* acc, const int32_t* counts, int64_t n);

// Auxiliary-loss-free balancing (DeepSeek-V3) at one level, after an optimizer step: for each node's b children,
// bias += rate * sign(mean load of the node's children - load), the loads summed since the last update (load
// [n * b], int64: route_counts_add's totals; the mean in double). load is zeroed for the next step.
void route_aux_bias_update(float* bias, int64_t* load, int64_t n, int64_t b, float rate);

// The (expert, input token) pair of each routed slot as one key for route_histogram over [N * V]:
// keys[a] = expert[a] * V + tokens[a / K] for expert[a] in [0, N) (else -1: not counted). tokens [A / K] in [0, V)
// (a token outside gives -1 too). The MoE layer's specialization counters (model/moe.h).
void route_pair_keys(int32_t* keys, const int32_t* expert, const int32_t* tokens, int64_t A, int64_t K, int64_t N,
                     int64_t V);

// Each token's highest-gate expert (ties: the earlier slot; a NaN gate never wins over the first slot's): top1 [T]
// = expert[t*K + argmax_j gate[t*K + j]], expert and gate [T*K]. The next AC layer's labels (model/moe.cpp).
void route_top1(int32_t* top1, const int32_t* expert, const float* gate, int64_t T, int64_t K);


// AC feature weights (DESIGN.md 4.7) of one batch, no gradient, on the tokens grouped by label (the previous MoE
// layer's top-1 expert): h [T, C]; order [T]: the tokens labelled k are order[offsets[k] .. offsets[k+1]), in
// increasing t; offsets [N + 1] (int64). For each labelled k (offsets[k+1] > offsets[k], n_k tokens) and feature q,
// in double: mean = sum_t h[t, q] / n_k, s = sum_t |h[t, q] - mean| / n_k (t increasing), w = 1 / (s + 1e-4); then
// w = min(w, clip) with clip = 10 x the mean of w over the labelled (k, q) (each labelled k's sum over q, those sums
// added in k order);
// m[k, q] = w / (the mean over labelled k' of w[k', q], summed in k order), as float; m = 1 for unlabelled k.
// has [N] i32: 1 for labelled k. run [N, C] (null: skipped): the running m of evaluation, for labelled k
// run = 0.9f * run + 0.1f * m. w [N * C + N + C + 2] double scratch. The arithmetic of model/router.cpp's
// ac_scales(): the same bits on both twins.
void ac_scales_forward(float* m, int32_t* has, float* run, double* w, const float* h, const int32_t* order,
                       const int64_t* offsets, int64_t N, int64_t C);

// The routing bias of a tree with branching [b_0 .. b_{D-1}] (N = prod b leaves, the experts; DESIGN.md 4.5), every
// level's [n_l * b_l] (n_l = prod of the branching above) concatenated into bias, level 0 first (sum_l n_l b_l
// floats): the logit bias the router adds at each level. From rel [N] (the experts' reliability), use [N] (their
// usage EMA) and pruned [N] (1 = pruned, 0 = not), float:
//   level D-1 (the experts):  r = rel[e],  u = use[e]
//   level l < D-1: child j of the level is node j of level l + 1, with children i = j * b_{l+1} + c:
//     su = sum_c u_i, sur = sum_c (double)u_i * r_i, sr = sum_c r_i (double, c increasing);
//     r = (float)(su > 0 ? sur / su : sr / b_{l+1}),  u = (float)su   (the usage-weighted mean of the children)
//   bias = log(r) (float log) when reliability, else 0; then -inf at level D-1 where pruned[e] != 0.
// log(1) == 0 exactly: a healthy model's bias is all zeros. The arithmetic of MoELayer::node_reliability(); the
// CPU twin gives its bits. branching [D] is a host array (a shape) on both twins.
void route_bias_forward(float* bias, const float* rel, const float* use, const float* pruned,
                        const int64_t* branching, int64_t D, bool reliability);

// The fused selection of one level. Per pair p at node j = node[p] (0 when node == nullptr):
//   s[p, c]         = logits[p, c] * inv_temp (skipped when inv_temp == 1) + lbias[j * b + c] (when lbias)
//   probs[p, :]     = softmax(s[p, :])                                  (cpu::softmax_forward's arithmetic)
//   score[p, c]     = probs[p, c] + abias[j * b + c] (when abias); -inf where lbias is -inf (a pruned child)
//   idx[p, 0..k)    = the k best scores in kernels/topk.h's order (larger first, ties to the lower index, NaN
//                     first), no gradient: the aux-free bias and the pruning only select
//   gate[p, i]      = probs[p, idx[p, i]], divided by sum_i probs[p, idx[p, i]] when renorm
//   path[p * k + i] = path_parent[p] * gate[p, i]  (path_parent == nullptr: gate)
//   child[p*k + i]  = j * b + idx[p, i]            (the pair's node at the next level, or the leaf)
// entropy [1] (when not null) = mean over pairs of -sum_c p log p, from s and probs (one log per row; rows summed in
// double in row order). A pruned child can only be picked when its node has fewer than k selectable children: the
// CPU kernel fails a CM_CHECK naming the node; the CUDA kernel writes NaN into that slot's path (the fault shows
// in the gates, nothing waits). idx [P, k] (when not null) receives idx.
void route_select_forward(float* probs,              // [P, b]
                          float* path,               // [P * k]
                          int32_t* child,            // [P * k]
                          int32_t* idx,              // [P, k] or nullptr
                          float* entropy,            // [1] or nullptr
                          const float* logits,       // [P, b]
                          const int32_t* node,       // [P] or nullptr
                          const float* path_parent,  // [P] or nullptr
                          const float* lbias,        // [n * b] or nullptr
                          const float* abias,        // [n * b] or nullptr
                          float inv_temp, int64_t P, int64_t n, int64_t b, int64_t k, bool renorm);

// The entropy statistic of route_select_forward: entropy [1] = the mean over the P rows of -sum_c p log p, from
// p = softmax(s) and s [P, b] (one log per row; rows summed in double in row order). Also used by the
// group-limited router, on its one softmax over all leaves.
void route_mean_entropy(float* entropy, const float* probs, const float* s, int64_t P, int64_t b);

// The group-limited selection (gate_mode group_limited, model/router.cpp route_grouped): the levels of a tree with
// branching [b_0 .. b_{D-1}] and top_k [k_0 .. k_{D-1}] (host arrays: a shape) only select, on one softmax over
// all N = prod b leaves, probs [T, N]. Token t starts at the root; at level l each node j it kept (in the order it
// kept them) keeps the k_l children i = j * b_l + c (c in [0, b_l)) with the best
//   score[i] = (float)(sum in double, leaf increasing, of probs[t, leaves under i]) + abias[i] (when abias)
// in kernels/topk.h's order (larger first, ties to the lower index, NaN first); -inf where lbias[i] is -inf (a
// pruned child: it ranks below every selectable child). The leaves under i are i * span .. (i + 1) * span - 1,
// span = N / (n_l * b_l). abias, lbias: every level's [n_l * b_l] concatenated, level 0 first (RouterBias::all),
// or nullptr.
// ids [T * (K_0 + K_1 + .. + K_{D-1})], K_l = k_0 * .. * k_l: every level's kept children, level l's block
// [T * K_l] at T * (K_0 + .. + K_{l-1}), token-major, a kept node's k_l children together in selection order. The
// last block [T * K] holds the experts: slot t * K + j. One node with fewer than k_l selectable children is an
// error: the CPU twin fails a CM_CHECK naming the level and node; the CUDA kernel records it in the device's
// index-error record (engine/cuda.h, raised at the next read-out) and keeps the pruned child.
void route_group_select(int32_t* ids,               // [T * sum_l K_l]
                        const float* probs,         // [T, N]
                        const float* abias,         // [sum_l n_l b_l] or nullptr
                        const float* lbias,         // [sum_l n_l b_l] or nullptr
                        const int64_t* branching,   // [D] host
                        const int64_t* top_k,       // [D] host
                        int64_t D, int64_t T);

// Backward of path with respect to probs and path_parent, from dpath [P * k]: dprobs [P, b] is 0 off the selected
// children (overwritten), dparent [P] (overwritten; skipped when nullptr) = sum_i dpath[p * k + i] gate[p, i].
// The CPU twin runs the arithmetic of the composite it replaces (gather, sum, div, mul and their backward rules), so
// gradients are the same bits. child from the forward gives idx = child % b.
void route_select_backward(float* dprobs,             // [P, b]
                           float* dparent,            // [P] or nullptr
                           const float* dpath,        // [P * k]
                           const float* probs,        // [P, b]
                           const int32_t* child,      // [P * k]
                           const float* path_parent,  // [P] or nullptr
                           int64_t P, int64_t b, int64_t k, bool renorm);

// route_select_backward carried on through the softmax and the temperature: dlogits [P, b] (overwritten) is the
// gradient of the logits when path is the only output differentiated, what softmax_backward and a product by
// inv_temp would make of route_select_backward's dprobs, without making the dense dprobs. The CPU twin reproduces
// those kernels' bits: softmax_backward's dot (dot_row, kernels/cpu/rows.h) over a row that is zero off the kept
// children gains only their terms. dparent as route_select_backward's.
void route_select_backward_logits(float* dlogits,            // [P, b]
                                  float* dparent,            // [P] or nullptr
                                  const float* dpath,        // [P * k]
                                  const float* probs,        // [P, b]
                                  const int32_t* child,      // [P * k]
                                  const float* path_parent,  // [P] or nullptr
                                  float inv_temp, int64_t P, int64_t b, int64_t k, bool renorm);

}  // namespace cm::cpu

namespace cm::shared {
// route_aux_bias_update at one node, the one definition both twins run (the CUDA one a thread per node): bias and
// load point at the node's b children.
CM_HD void aux_bias_node_update(float* bias, int64_t* load, int64_t b, float rate) {
  double mean = 0.0;
  for (int64_t c = 0; c < b; ++c) mean += (double)load[c];
  mean /= (double)b;
  for (int64_t c = 0; c < b; ++c) {
    const double d = mean - (double)load[c];
    bias[c] += rate * (float)((d > 0) - (d < 0));
  }
  for (int64_t c = 0; c < b; ++c) load[c] = 0;
}
}  // namespace cm::shared

#if CM_CUDA
// CUDA twins (kernels/cuda/route.cu), on device pointers, on the engine's stream, without waiting for it; node ==
// nullptr goes to cuBLAS. A node outside [0, n) gives NaN logits (forward) and is skipped (backward). The
// histogram adds integer counts with atomics: the counts are exact, so the result does not depend on the order.
namespace cm::cuda {

void route_logits_forward(float* logits, const float* h, const float* W, const int32_t* node, int64_t P, int64_t Kp,
                          int64_t n, int64_t b, int64_t C);
void route_logits_backward_h(float* dh, const float* dlogits, const float* W, const int32_t* node, int64_t T,
                             int64_t Kp, int64_t n, int64_t b, int64_t C);
void route_logits_backward_w(float* dW, const float* dlogits, const float* h, const int32_t* node, int64_t P,
                             int64_t Kp, int64_t n, int64_t b, int64_t C);
void route_histogram(int32_t* counts, const int32_t* ids, int64_t A, int64_t n, bool accumulate);
void route_pair_keys(int32_t* keys, const int32_t* expert, const int32_t* tokens, int64_t A, int64_t K, int64_t N,
                     int64_t V);
void route_top1(int32_t* top1, const int32_t* expert, const float* gate, int64_t T, int64_t K);
// One thread per element each, no atomics.
void route_offset_counts(int32_t* rows, const int64_t* offsets, int64_t N);
void route_counts_add(int64_t* acc, const int32_t* counts, int64_t n);
void route_aux_bias_update(float* bias, int64_t* load, int64_t n, int64_t b, float rate);
// A thread per (label, feature) for the sums over the label's tokens (32 tokens' loads in flight at a time), a warp
// per 32 labels for their sums over q, the clip's sum on one thread in k order, a thread per feature for its mean
// over k, a thread per (label, feature) for m: every sum in the CPU's order, the CPU's bits.
void ac_scales_forward(float* m, int32_t* has, float* run, double* w, const float* h, const int32_t* order,
                       const int64_t* offsets, int64_t N, int64_t C);
// One warp per pair; the probabilities use expf (within float rounding of the CPU's), the selection the same order.
void route_select_forward(float* probs, float* path, int32_t* child, int32_t* idx, float* entropy,
                          const float* logits, const int32_t* node, const float* path_parent, const float* lbias,
                          const float* abias, float inv_temp, int64_t P, int64_t n, int64_t b, int64_t k,
                          bool renorm);
void route_select_backward(float* dprobs, float* dparent, const float* dpath, const float* probs,
                           const int32_t* child, const float* path_parent, int64_t P, int64_t b, int64_t k,
                           bool renorm);
// One warp per pair; the dot over the kept children in the CPU twin's order, the pair's gradients in
// route_select_backward's (within float rounding of the CPU's).
void route_select_backward_logits(float* dlogits, float* dparent, const float* dpath, const float* probs,
                                  const int32_t* child, const float* path_parent, float inv_temp, int64_t P,
                                  int64_t b, int64_t k, bool renorm);
// One warp per row (the terms of route_select_forward's entropy), then the mean by sum_all (kernels/reduce.h).
void route_mean_entropy(float* entropy, const float* probs, const float* s, int64_t P, int64_t b);
// One warp per token walks the levels: per kept node the lanes score its children, then k rounds of warp arg-best
// (kernels/cuda/route.cu); depth at most 16.
void route_group_select(int32_t* ids, const float* probs, const float* abias, const float* lbias,
                        const int64_t* branching, const int64_t* top_k, int64_t D, int64_t T);
// One launch per level (a thread per node, the sums in double as on the CPU), then one for the logs and the pruned
// experts; the usage of the inner levels lives in scratch. log is the device's logf: within its rounding of the
// CPU's, and exactly 0 at 1.
void route_bias_forward(float* bias, const float* rel, const float* use, const float* pruned,
                        const int64_t* branching, int64_t D, bool reliability);

}  // namespace cm::cuda
#endif
