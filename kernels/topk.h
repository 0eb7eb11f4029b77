// Top-k along the rows of a matrix: the router's expert selection (DESIGN.md section 3, step 1).
// x is R rows of n scores; for each row we return the k largest, sorted descending, and their column indices.
//
// Order, fixed so that every backend and every thread count picks the same experts:
//   - larger value first;
//   - ties: the lower index first (so k = 1 over a row of equal scores picks column 0, like argmax);
//   - NaN ranks above every number (as in PyTorch), so a broken router row shows up in the selection instead of
//     being silently skipped; NaNs among themselves follow the index rule. -0.0 and +0.0 tie.
//
// Two paths, chosen per call by k:
//   k <= 8 (routing: n = 4..1024 experts, k = 1..8): one pass over the row keeping the best k in a small sorted
//          array; a block of 16 scores is skipped with one vectorised "any above the current k-th?" test, so
//          most of a long row costs one compare per element.
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
