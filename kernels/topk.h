// Top-k along the rows of a matrix: the router's expert selection (DESIGN.md section 3, step 1).
// x is R rows of n scores; for each row we return the k largest, sorted descending, and their column indices.
//
// Order, fixed so that every backend and every thread count picks the same experts:
//   - larger value first;
//   - ties: the lower index first (so k = 1 over a row of equal scores picks column 0, like argmax);
//   - NaN ranks above every number (as in PyTorch), so a broken router row shows up in the selection instead of
//     being silently skipped; NaNs among themselves follow the index rule. -0.0 and +0.0 tie.
//
// Paths, chosen per row by k and n (the same answer from each):
//   k <= 8, n <= 64 (a tree router's levels): k rounds of a vector max and a vector equality test over the row,
//          no branch per candidate (a row holding a NaN takes the next path);
//   k <= 8, n > 64 with AVX-512 (flat routing over many experts): two passes, no branch per candidate: the k
//          largest of each of 16 lanes by max/min (a sorting network's column per block of 16), which holds the
//          row's k-th largest score w; then the scores >= w in index order (one compare per block, almost always
//          none), those > w all kept and those == w by index (a row holding a NaN takes the next path);
//   k <= 8 (otherwise): one pass over the row keeping the best k in a small sorted array; a block of 16 scores
//          is skipped with one vectorised "any above the current k-th?" test, so most of a long row costs one
//          compare per element;
//   k > 8: nth_element + sort of the winners on an index array (O(n + k log k)).
#pragma once
#include <cstdint>

namespace cm::cpu {

// The k largest of each row, descending; ties -> lower index first.
// Requires 0 <= k <= n (the op checks; the kernel does not).
void topk_forward(float* values,     // [R, k]
                  int32_t* indices,  // [R, k] column in [0, n)
                  const float* x,    // [R, n]
                  int64_t R, int64_t n, int64_t k);

// Gradient of the values output: dx[r, indices[r, j]] = dvalues[r, j], every other element 0.
// Overwrites dx. Indices in a row are distinct (as topk_forward makes them), so no element is written twice.
void topk_backward(float* dx,               // [R, n]
                   const float* dvalues,    // [R, k]
                   const int32_t* indices,  // [R, k]
                   int64_t R, int64_t n, int64_t k);

}  // namespace cm::cpu

#if CM_CUDA
// CUDA twins (kernels/cuda/topk.cu): the same order and contracts on device pointers, launched on the engine's
// stream. k <= 8 runs one warp per row in a single pass over the row; larger k a slower block-per-row path.
namespace cm::cuda {

void topk_forward(float* values, int32_t* indices, const float* x, int64_t R, int64_t n, int64_t k);
void topk_backward(float* dx, const float* dvalues, const int32_t* indices, int64_t R, int64_t n, int64_t k);

// The router's fused softmax + top-k (DESIGN.md section 3, step 1). CPU equivalent: cpu::softmax_forward then
// cpu::topk_forward on the probabilities. Selection is made on the logits (softmax is monotonic), so where
// rounding makes two probabilities equal the larger logit still wins; on inputs whose probabilities are distinct
// the indices equal the CPU's exactly. gates[r, j] == probs[r, indices[r, j]] bit for bit.
void softmax_topk_forward(float* probs,       // [R, n] softmax of each row, or nullptr if not needed
                          float* gates,       // [R, k] probabilities of the selected columns, descending
                          int32_t* indices,   // [R, k]
                          const float* logits,  // [R, n]
                          int64_t R, int64_t n, int64_t k);
// Backward of both outputs at once: g = dprobs + scatter(dgates at indices); dlogits = probs * (g - sum(g * probs)).
// Overwrites dlogits. dprobs may be nullptr (only the gates were used).
void softmax_topk_backward(float* dlogits,         // [R, n]
                           const float* dprobs,    // [R, n] or nullptr
                           const float* dgates,    // [R, k]
                           const int32_t* indices, // [R, k]
                           const float* probs,     // [R, n] from the forward
                           int64_t R, int64_t n, int64_t k);

}  // namespace cm::cuda
#endif
