// Loss kernels. Cross-entropy of logits [N, V] against integer targets [N], fused with log-softmax: the
// probabilities are never stored; backward recomputes them from the logits and the saved per-row logsumexp.
// Letters: N rows (tokens), V classes (vocabulary).
//
// Targets: ignore_index or in [0, V). On the CPU the op checks them before (an error names the first bad one); the
// CUDA kernels check each one themselves and record a bad one (engine/cuda.h), treating its row as ignored, so no
// step waits for the check. Rows whose target is ignore_index get loss 0 and a zero gradient row.
#pragma once
#include <cstdint>

namespace cm::cpu {

// losses [N]: -log softmax(logits[n])[targets[n]], 0 for ignored rows.
// lse [N]: logsumexp of each row (saved for backward; written for ignored rows too).
// logits [N, V], targets [N].
void cross_entropy_forward(float* losses, float* lse, const float* logits, const int32_t* targets, int64_t N,
                           int64_t V, int32_t ignore_index);

// dlogits [N, V] = (softmax(logits) - onehot(targets)) * scale, overwritten; rows with an ignored target are 0.
// scale is d(loss)/d(sum of row losses): for a mean over the valid rows, gout / count_valid.
// logits [N, V], lse [N] from the forward, targets [N].
void cross_entropy_backward(float* dlogits, const float* logits, const float* lse, const int32_t* targets,
                            float scale, int64_t N, int64_t V, int32_t ignore_index);

// inv_valid [1] = 1 / (number of targets [N] in [0, V) that are not ignore_index), 0 when there is none: the
// scale of the mean loss, formed where the targets are (a device step does not copy them to the host).
void cross_entropy_inv_valid(float* inv_valid, const int32_t* targets, int64_t N, int64_t V, int32_t ignore_index);

// Router z-loss on logits [R, E]: loss [1] = weight * mean_r logsumexp(logits[r])^2 (the squares summed in double
// in row order); lse [R] saved for backward. R = 0 gives 0.
void z_loss_forward(float* loss, float* lse, const float* logits, int64_t R, int64_t E, float weight);
// dlogits [R, E] = dloss[0] * weight * 2 lse[r] / R * softmax(logits[r]) (overwritten); dloss [1] is read here.
void z_loss_backward(float* dlogits, const float* dloss, const float* logits, const float* lse, int64_t R,
                     int64_t E, float weight);

}  // namespace cm::cpu

#if CM_CUDA
// CUDA twins (kernels/cuda/losses.cu), launched on the engine's stream, and the router losses, which only the
// GPU has as kernels (on the CPU the model composes them from ops; the CUDA tests hold double-precision references).
namespace cm::cuda {

void cross_entropy_forward(float* losses, float* lse, const float* logits, const int32_t* targets, int64_t N,
                           int64_t V, int32_t ignore_index);
void cross_entropy_backward(float* dlogits, const float* logits, const float* lse, const int32_t* targets,
                            float scale, int64_t N, int64_t V, int32_t ignore_index);
void cross_entropy_inv_valid(float* inv_valid, const int32_t* targets, int64_t N, int64_t V, int32_t ignore_index);
// The same with scale = gout[0] * scale: gout [1] is the upstream gradient, on the device (no host round trip).
void cross_entropy_backward(float* dlogits, const float* logits, const float* lse, const int32_t* targets,
                            const float* gout, float scale, int64_t N, int64_t V, int32_t ignore_index);

// Router z-loss on logits [R, E]: loss [1] = weight * mean_r logsumexp(logits[r])^2; lse [R] saved for backward.
void z_loss_forward(float* loss, float* lse, const float* logits, int64_t R, int64_t E, float weight);
// dlogits [R, E] = dloss[0] * weight * 2 lse[r] / R * softmax(logits[r]) (overwritten); dloss [1] on the device.
void z_loss_backward(float* dlogits, const float* dloss, const float* logits, const float* lse, int64_t R,
                     int64_t E, float weight);

// Load-balance loss of one routing level (DESIGN.md 4.3). Row r (a token at a parent node) belongs to group
// g = group[r] (its parent; group == nullptr means one group, G = 1; g = -1 skips the row) and chose K of the E
// children: indices [R, K] (entries outside [0, E), e.g. dropped slots, are not counted). Per group:
//   T_g = rows in g,  frac[g, e] = (slots of g that chose e) / (T_g K),  mean_prob[g, e] = mean over g's rows of
//   probs[r, e];  loss [1] = weight * E * sum_g (T_g / T_all) * sum_e frac[g, e] mean_prob[g, e],
// T_all = sum_g T_g. Flat routing (G = 1) gives the Switch loss, whose balanced value is `weight`. Empty groups
// contribute 0 and T_all = 0 gives 0: never inf or NaN. tokens [G] = T_g (as floats) is saved for backward.
// Limits: G * E <= 4096. Deterministic: fixed chunking, partials added in chunk order.
void load_balance_forward(float* loss, float* frac, float* mean_prob, float* tokens, const float* probs,
                          const int32_t* indices, const int32_t* group, int64_t R, int64_t E, int64_t K, int64_t G,
                          float weight);
// frac carries no gradient: dprobs [R, E] = dloss[0] * weight * E * frac[g, e] / T_all for rows of group g,
// 0 for skipped rows (overwritten).
void load_balance_backward(float* dprobs, const float* dloss, const float* frac, const float* tokens,
                           const int32_t* group, int64_t R, int64_t E, int64_t G, float weight);

}  // namespace cm::cuda
#endif
