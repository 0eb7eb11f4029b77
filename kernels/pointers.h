// Pointer tables: the device arrays of pointers that batched kernels read (the grouped GEMM's per-expert weight
// gradients, kernels/grouped_gemm.h), computed where they are read, so that a table of buffers allocated anew at
// every step costs no upload (and no wait for the staging ring an upload goes through, engine/cuda.h).
// Letters: G entries.
#pragma once
#include <cstdint>

namespace cm::cpu {

// out[e] = base + e * stride for e in [0, G): the table of G equal, consecutive blocks of one buffer.
void pointer_table(float** out, float* base, int64_t stride, int64_t G);

}  // namespace cm::cpu

#if CM_CUDA
// CUDA twin (kernels/cuda/pointers.cu): out in device memory, on the engine's stream, no wait.
namespace cm::cuda {
void pointer_table(float** out, float* base, int64_t stride, int64_t G);
}  // namespace cm::cuda
#endif
