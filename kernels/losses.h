// Loss kernels. Cross-entropy of logits [N, V] against integer targets [N], fused with log-softmax: the
// probabilities are never stored; backward recomputes them from the logits and the saved per-row logsumexp.
// Letters: N rows (tokens), V classes (vocabulary).
//
// Preconditions (checked by the op, not here, so that a device twin has the same contract): every target is
// ignore_index or in [0, V). Rows whose target is ignore_index get loss 0 and a zero gradient row.
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

}  // namespace cm::cpu
