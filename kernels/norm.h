// Normalisation over the last axis: LayerNorm and RMSNorm on row-major [N, C] buffers.
// Letters: N rows (B*T tokens), C channels.
//
//   layernorm: y = (x - mean) * rstd * weight + bias,  rstd = 1 / sqrt(var + eps), var the biased variance
//   rmsnorm:   y = x * rstd * weight,                   rstd = 1 / sqrt(mean(x^2) + eps)
//
// The forward saves mean/rstd per row; the backward recomputes xhat from them instead of storing [N, C].
// Backward outputs are overwritten (not accumulated). dweight/dbias sum over all N rows: rows are cut into a fixed
// number of chunks that depends only on N (never on the thread count), each chunk sums its rows in order, then the
// chunk partials are added in chunk order; so the gradients are bit-identical for any number of threads.
#pragma once
#include <cstdint>

namespace cm::cpu {

// out [N, C], mean [N], rstd [N]; inp [N, C], weight [C], bias [C] or nullptr (no bias).
void layernorm_forward(float* out, float* mean, float* rstd, const float* inp, const float* weight,
                       const float* bias, int64_t N, int64_t C, float eps);
// dinp [N, C], dweight [C], dbias [C] or nullptr; dout [N, C], inp [N, C], weight [C], mean [N], rstd [N].
void layernorm_backward(float* dinp, float* dweight, float* dbias, const float* dout, const float* inp,
                        const float* weight, const float* mean, const float* rstd, int64_t N, int64_t C);

// out [N, C], rstd [N]; inp [N, C], weight [C].
void rmsnorm_forward(float* out, float* rstd, const float* inp, const float* weight, int64_t N, int64_t C, float eps);
// dinp [N, C], dweight [C]; dout [N, C], inp [N, C], weight [C], rstd [N].
void rmsnorm_backward(float* dinp, float* dweight, const float* dout, const float* inp, const float* weight,
                      const float* rstd, int64_t N, int64_t C);

}  // namespace cm::cpu

#if CM_CUDA
// CUDA twins (kernels/cuda/norm.cu): the same contracts on device pointers, launched on the engine's stream.
// dweight/dbias use the CPU's row chunking, so they do not depend on the launch shape either.
namespace cm::cuda {

void layernorm_forward(float* out, float* mean, float* rstd, const float* inp, const float* weight, const float* bias,
                       int64_t N, int64_t C, float eps);
void layernorm_backward(float* dinp, float* dweight, float* dbias, const float* dout, const float* inp,
                        const float* weight, const float* mean, const float* rstd, int64_t N, int64_t C);
void rmsnorm_forward(float* out, float* rstd, const float* inp, const float* weight, int64_t N, int64_t C, float eps);
void rmsnorm_backward(float* dinp, float* dweight, const float* dout, const float* inp, const float* weight,
                      const float* rstd, int64_t N, int64_t C);

}  // namespace cm::cuda
#endif
