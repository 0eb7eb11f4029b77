// Softmax family: softmax and log-softmax over the last axis of a row-major [N, C] buffer.
// Letters: N rows (everything but the last axis, flattened), C the axis being normalised (classes, keys, ...).
//
// Numerics: every row is shifted by its maximum before exponentiating, so logits of any magnitude (1e4, -1e30)
// give finite results; a -inf entry (a masked position) gives exactly 0. A row that is entirely -inf, or holds a
// NaN or +inf, gives NaN in that row: PyTorch does the same, and the model's fault detection wants to see it.
// Backward kernels overwrite their output (they do not accumulate); autograd does the accumulation.
// Determinism: each row is computed by one thread in a fixed order, so results do not depend on thread count.
#pragma once
#include <cstdint>
#include <cstring>

namespace cm::cpu {

// out [N, C] = softmax(inp [N, C]) per row.
void softmax_forward(float* out, const float* inp, int64_t N, int64_t C);
// dinp [N, C] = out * (dout - sum_c(dout * out)), from the forward's out [N, C] and dout [N, C].
void softmax_backward(float* dinp, const float* dout, const float* out, int64_t N, int64_t C);

// out [N, C] = inp - max - log(sum(exp(inp - max))) per row.
void log_softmax_forward(float* out, const float* inp, int64_t N, int64_t C);
// dinp [N, C] = dout - exp(out) * sum_c(dout), from the forward's out [N, C] (log-probabilities) and dout [N, C].
void log_softmax_backward(float* dinp, const float* dout, const float* out, int64_t N, int64_t C);

// ---------------------------------------------------------------- shared CPU helper
// exp(x) in plain branch-free float code that GCC vectorises (glibc's expf is only vectorised under -ffast-math,
// which we do not use). Cephes' expf: x = n ln2 + r with |r| <= ln2/2, a degree-6 polynomial for e^r, 2^n put
// into the exponent bits. Relative error ~2 ulp. exp(-inf) = 0 and exp(x < -87.3) = 0 (no denormals);
// exp(x > 88.7) = +inf; NaN stays NaN. Used by the softmax and cross-entropy kernels.
inline float exp_approx(float x) {
  const float hi = 88.3762626647949f, lo = -87.3365447504f;
  float xc = x > hi ? hi : x;
  xc = xc < lo ? lo : xc;
  // n = round(x / ln2) with the 1.5 * 2^23 trick: exact for |n| < 2^22, no libm call, vectorises.
  const float magic = 12582912.0f;
  float n = (xc * 1.44269504088896341f + magic) - magic;
  // r = x - n ln2, with ln2 split in a high part (exact product) and a low correction.
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500E-4f;
  p = p * r + 1.3981999507E-3f;
  p = p * r + 8.3334519073E-3f;
  p = p * r + 4.1665795894E-2f;
  p = p * r + 1.6666665459E-1f;
  p = p * r + 5.0000001201E-1f;
  float er = p * r * r + r + 1.0f;
  int32_t bits = ((int32_t)n + 127) << 23;  // n in [-126, 127]: a normal power of two
  float two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  float y = er * two_n;
  y = x < lo ? 0.0f : y;
  y = x > hi ? __builtin_inff() : y;
  y = x != x ? x : y;
  return y;
}

}  // namespace cm::cpu
