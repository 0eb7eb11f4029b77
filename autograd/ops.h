// Differentiable ops. Every op here works on any device the inputs live on (CPU; CUDA when built), records
// itself for autograd when an input requires grad, and checks its arguments with messages that name the shapes.
// Letters: B batch, T sequence, C channels, V vocabulary, H heads, D head size, N experts, K selected per token.
// Integer tensors (indices, targets, masks) are i32. Masks: nonzero = true.
#pragma once
#include <utility>
#include <vector>

#include "autograd/graph.h"

namespace cm {

// ---------------------------------------------------------------- elementwise (ops_elementwise.cpp)
// Binary ops broadcast like NumPy/PyTorch: shapes align from the right, size-1 dims stretch.
Tensor add(const Tensor& a, const Tensor& b);
Tensor sub(const Tensor& a, const Tensor& b);
Tensor mul(const Tensor& a, const Tensor& b);
Tensor div(const Tensor& a, const Tensor& b);
Tensor add(const Tensor& a, float s);
Tensor mul(const Tensor& a, float s);
Tensor rsub(float s, const Tensor& a);  // s - a
Tensor rdiv(float s, const Tensor& a);  // s / a
Tensor neg(const Tensor& a);
Tensor exp(const Tensor& a);
Tensor log(const Tensor& a);
Tensor sqrt(const Tensor& a);
Tensor tanh(const Tensor& a);
Tensor sigmoid(const Tensor& a);
Tensor relu(const Tensor& a);
enum class GeluKind { Tanh, Exact };
Tensor gelu(const Tensor& a, GeluKind kind = GeluKind::Tanh);
Tensor silu(const Tensor& a);
Tensor pow(const Tensor& a, float p);  // a^p; for non-integer p, a must be positive
Tensor square(const Tensor& a);
// Sum a (broadcast) gradient down to `shape` (the inverse of broadcasting). Differentiable.
Tensor sum_to(const Tensor& a, const Shape& shape);
// Broadcast a to `shape` (materialised). Differentiable.
Tensor expand(const Tensor& a, const Shape& shape);

inline Tensor operator+(const Tensor& a, const Tensor& b) { return add(a, b); }
inline Tensor operator-(const Tensor& a, const Tensor& b) { return sub(a, b); }
inline Tensor operator*(const Tensor& a, const Tensor& b) { return mul(a, b); }
inline Tensor operator/(const Tensor& a, const Tensor& b) { return div(a, b); }
inline Tensor operator+(const Tensor& a, float s) { return add(a, s); }
inline Tensor operator+(float s, const Tensor& a) { return add(a, s); }
inline Tensor operator-(const Tensor& a, float s) { return add(a, -s); }
inline Tensor operator-(float s, const Tensor& a) { return rsub(s, a); }
inline Tensor operator*(const Tensor& a, float s) { return mul(a, s); }
inline Tensor operator*(float s, const Tensor& a) { return mul(a, s); }
inline Tensor operator/(const Tensor& a, float s) { return mul(a, 1.0f / s); }
inline Tensor operator/(float s, const Tensor& a) { return rdiv(s, a); }
inline Tensor operator-(const Tensor& a) { return neg(a); }

// ---------------------------------------------------------------- reductions (ops_reduce.cpp)
// Over all elements: a 0-d tensor. Over an axis: that axis removed (or kept with size 1).
Tensor sum(const Tensor& a);
Tensor sum(const Tensor& a, int64_t dim, bool keepdim = false);
Tensor mean(const Tensor& a);
Tensor mean(const Tensor& a, int64_t dim, bool keepdim = false);
// max: gradient flows to the first position of the maximum.
Tensor max(const Tensor& a);
Tensor max(const Tensor& a, int64_t dim, bool keepdim = false);
Tensor argmax(const Tensor& a, int64_t dim);  // i32, not differentiable

// ---------------------------------------------------------------- matrix products (ops_matmul.cpp)
// a [M,K] (or [K,M] when trans_a) times b [K,N] (or [N,K] when trans_b).
// Ranks: 2x2; 3x3 batched [B,..]x[B,..]; a of rank >= 3 times a 2-D b (leading dims flattened into M).
Tensor matmul(const Tensor& a, const Tensor& b, bool trans_a = false, bool trans_b = false);
// y = x W^T + b with PyTorch's layout: x [..., in], w [out, in], b [out] or undefined.
Tensor linear(const Tensor& x, const Tensor& w, const Tensor& b = Tensor());

// ---------------------------------------------------------------- neural-net ops (ops_nn.cpp)
Tensor softmax(const Tensor& a);      // over the last axis, numerically stable
Tensor log_softmax(const Tensor& a);  // over the last axis
// Mean cross-entropy of logits [N, V] against i32 targets [N]; targets equal to ignore_index are skipped
// (and the mean is over the rest). Fused with log-softmax.
Tensor cross_entropy(const Tensor& logits, const Tensor& targets, int32_t ignore_index = -100);
// Router z-loss of logits [R, E]: weight * mean_r logsumexp(logits[r])^2, a 0-d tensor; one fused kernel each way
// (kernels/losses.h z_loss_forward/backward), the gradient read where it is.
Tensor router_z_loss(const Tensor& logits, float weight);
// Load balance of one routing level, a 0-d tensor (kernels/losses.h load_balance_forward has the formula):
// probs [R, E] (the only differentiable input), indices i32 [R, K] the chosen children (outside [0, E): not
// counted), group i32 [R] each row's parent (outside [0, G): the row is skipped) or undefined for one group,
// log_bias [G, E] or [G * E] f32: the level's logit bias (log reliability, -inf: pruned, no gradient), whose
// exp gives target shares proportional to it when some entry is nonzero (the kernel decides, on the device), or
// undefined: E everywhere, the balanced target. Balanced flat usage gives `weight`. One kernel each way; nothing is
// read on the host.
Tensor router_balance_loss(const Tensor& probs, const Tensor& indices, const Tensor& group, int64_t G,
                           const Tensor& log_bias, float weight);
// weight [V, C], ids i32 of any shape -> [..., C]. Backward scatters into weight rows.
Tensor embedding(const Tensor& weight, const Tensor& ids);
// Normalise over the last axis. weight/bias [C]; bias may be undefined.
Tensor layernorm(const Tensor& x, const Tensor& weight, const Tensor& bias, float eps = 1e-5f);
Tensor rmsnorm(const Tensor& x, const Tensor& weight, float eps = 1e-6f);
// Inverted dropout: keeps with probability 1-p and scales by 1/(1-p); mask from the counter-based RNG.
Tensor dropout(const Tensor& x, float p, bool training, Generator& gen);
// Causal self-attention on q, k, v [B, H, T, D] -> [B, H, T, D], built from primitives
// (scores = q k^T / sqrt(D), masked_fill of the future with -inf, softmax, times v).
Tensor causal_attention(const Tensor& q, const Tensor& k, const Tensor& v);

// ---------------------------------------------------------------- indexing (ops_index.cpp)
Tensor concat(const std::vector<Tensor>& xs, int64_t dim);
std::vector<Tensor> split(const Tensor& a, const std::vector<int64_t>& sizes, int64_t dim);
// Indices are i32 in [0, size along dim); anything else (negative included) is an error naming index and bound.
Tensor index_select(const Tensor& a, int64_t dim, const Tensor& index);  // index i32 [n]
// out = a, then out.select(dim, index[i]) += src.select(dim, i) for each i (PyTorch's index_add). index i32 [n];
// src is a with size n along dim. Sequential over i: deterministic. Gradient to a and src.
Tensor index_add(const Tensor& a, int64_t dim, const Tensor& index, const Tensor& src);
// index has a's rank and a's sizes outside dim; out has index's shape: out[..i..] = a[..index[..i..]..].
Tensor gather(const Tensor& a, int64_t dim, const Tensor& index);
// out = a with src added at index along dim (index and src have the same shape, as in gather). Repeated indices
// add in source order: deterministic. Gradient to a and src.
Tensor scatter_add(const Tensor& a, int64_t dim, const Tensor& index, const Tensor& src);
// The k largest along the last axis, sorted descending (ties: lower index first; NaN ranks above numbers).
// Values are differentiable, indices are i32. k > n is an error.
std::pair<Tensor, Tensor> topk(const Tensor& a, int64_t k);
Tensor where(const Tensor& mask, const Tensor& a, const Tensor& b);  // mask broadcast with a and b
Tensor masked_fill(const Tensor& a, const Tensor& mask, float value);  // mask broadcast to a's shape

}  // namespace cm
