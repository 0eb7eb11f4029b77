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

// Load-balance loss of one routing level (DESIGN.md 4.3), the model's: one call per router level. Letters: R rows
// (a token at a parent node: a (token, node) pair), E children per parent, K chosen per row, G parents (groups).
// Row r belongs to group g = group[r] (its parent; group == nullptr means one group, G = 1; a g outside [0, G),
// e.g. -1, skips the row) and chose K of the E children: indices [R, K] (entries outside [0, E), e.g. dropped
// slots, are not counted). Per group:
//   T_g = rows in g,  frac[g, e] = (slots of g that chose e) / (T_g K),  mean_prob[g, e] = mean over g's rows of
//   probs[r, e];
//   loss [1] = weight * sum_g (T_g / T_all) * sum_e inv_share[g, e] frac[g, e] mean_prob[g, e],  T_all = sum_g T_g.
// The target shares come from the level's logit bias log_bias [G, E] (the router's: log reliability of each child,
// -inf for a pruned one), read where it lives, never by the host: when some entry is nonzero (one decision for the
// whole array), rho = exp((double)log_bias) per child, rsum = sum of rho over the group in child order (double), and
// inv_share[g, e] = (float)(rsum / rho) (0 where rho == 0: a pruned child takes no part), the target share of a child
// proportional to its reliability. log_bias == nullptr, or all zeros: inv_share = E everywhere (the balanced target
// 1/E), evaluated as E * sum_e frac mean_prob: flat routing (G = 1) then gives the Switch loss, whose balanced value
// is `weight` (the same bits as with no bias at all). Empty groups contribute 0 and T_all = 0 gives 0: never inf or
// NaN for finite probabilities. tokens [G] = T_g (as floats) is saved for backward.
// The CPU sums run in double in row order, one thread per block of columns: the same bits for any thread count.
void load_balance_forward(float* loss, float* frac, float* mean_prob, float* tokens, const float* probs,
                          const int32_t* indices, const int32_t* group, const float* log_bias, int64_t R, int64_t E,
                          int64_t K, int64_t G, float weight);
// frac carries no gradient: dprobs [R, E] = k * frac[g, e] for rows of group g, 0 for skipped rows (overwritten),
// with k = (float)(dloss[0] * weight * E / T_all) without target shares (log_bias null or all zero), else
// dprobs = (k * inv_share[g, e]) * frac[g, e] with k = (float)(dloss[0] * weight / T_all) (T_all summed in double in
// group order; inv_share made from log_bias [G, E] as in the forward). The CUDA twin evaluates the same float
// expressions: given the same frac, tokens and inverse shares, the same bits.
void load_balance_backward(float* dprobs, const float* dloss, const float* frac, const float* tokens,
                           const int32_t* group, const float* log_bias, int64_t R, int64_t E, int64_t G,
                           float weight);

}  // namespace cm::cpu

#if CM_CUDA
// CUDA twins (kernels/cuda/losses.cu), launched on the engine's stream.
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

// Load balance: the contract of cpu::load_balance_forward/backward. The sums over rows are cut into at most 256
// chunks (a function of R, and of G * E above 4096) whose float partials are added in chunk order: deterministic,
// and within float rounding of the CPU's double sums (tests/test_cuda.cpp: loss and mean_prob to 1e-5 relative;
// frac, tokens and the backward bit for bit). G * E <= 4096 keeps a chunk's sums in shared memory; larger levels
// keep them in global scratch, with fewer chunks: about 2^22 (g, e) partials (32 MiB), at least one chunk.
// The inverse shares are made on the device from log_bias (the any-nonzero decision by one block, the exponentials
// in double a thread each, each group's sum in child order by one lane): the host never reads the bias.
void load_balance_forward(float* loss, float* frac, float* mean_prob, float* tokens, const float* probs,
                          const int32_t* indices, const int32_t* group, const float* log_bias, int64_t R, int64_t E,
                          int64_t K, int64_t G, float weight);
void load_balance_backward(float* dprobs, const float* dloss, const float* frac, const float* tokens,
                           const int32_t* group, const float* log_bias, int64_t R, int64_t E, int64_t G,
                           float weight);

}  // namespace cm::cuda
#endif
