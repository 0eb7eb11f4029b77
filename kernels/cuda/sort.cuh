// The stable counting sort behind the MoE dispatch (kernels/cuda/dispatch.cu), offered to other CUDA kernel files
// as an LSD radix sort of (key, value) pairs: embedding backward sorts positions by token id with it, so that
// each id's rows are summed in increasing position, as on the CPU.
#pragma once
#include <cstdint>

namespace cm::cuda::detail {

// Stable sort of n pairs by key, keys in [0, 2^key_bits) (key_bits in 1..31). vals_in == nullptr means the values
// 0..n-1 (the sort then returns the permutation). 8 bits per pass: two passes for a vocabulary up to 65536.
// Outputs must not alias inputs. n < 2^31.
void stable_sort_pairs(int32_t* keys_out,       // [n]
                       int32_t* vals_out,       // [n]
                       const int32_t* keys_in,  // [n]
                       const int32_t* vals_in,  // [n] or nullptr
                       int64_t n, int key_bits);

}  // namespace cm::cuda::detail
