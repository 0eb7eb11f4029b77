// CPU twin of the dense FFN's fault guard and health update (contract in kernels/health.h).
#include "kernels/health.h"

#include <algorithm>
#include <cmath>
#include <cstring>

namespace cm::cpu {

void ffn_guard_forward(float* out, int32_t* all_ok, double* pend, double* norms, const float* y, int64_t n, int64_t C,
                       const float* state, float factor, bool zero_bad, bool count) {
  const float ema = state[1];
#pragma omp parallel for schedule(static) if (n * C >= (1 << 16))
  for (int64_t i = 0; i < n; ++i) {
    const float* r = y + i * C;
    double ss = 0.0;
    for (int64_t c = 0; c < C; ++c) ss += (double)r[c] * r[c];
    norms[i] = std::sqrt(ss);
  }
  // Classification and counters in row order (deterministic double sums).
  int64_t bad = 0, good = 0;
  double norm_sum = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const double nm = norms[i];
    if (!std::isfinite(nm) || (ema > 0.f && nm > (double)factor * ema)) {
      ++bad;
      norms[i] = -1.0;  // marks the row for the copy below
    } else {
      ++good;
      norm_sum += nm;
    }
  }
  *all_ok = bad == 0 ? 1 : 0;
  if (count) {
    pend[0] += (double)n;
    pend[1] += (double)bad;
    pend[2] += (double)good;
    pend[3] += norm_sum;
  }
  if (!out) return;
#pragma omp parallel for schedule(static) if (n * C >= (1 << 16))
  for (int64_t i = 0; i < n; ++i) {
    if (zero_bad && norms[i] < 0.0)
      std::memset(out + i * C, 0, (size_t)C * sizeof(float));
    else if (out != y)
      std::memcpy(out + i * C, y + i * C, (size_t)C * sizeof(float));
  }
}

void ffn_guard_backward(float* dx, const float* g, const int32_t* all_ok, int64_t n) {
  if (*all_ok) {
    if (dx != g) std::memcpy(dx, g, (size_t)n * sizeof(float));
  } else {
    std::memset(dx, 0, (size_t)n * sizeof(float));
  }
}

void ffn_health_update(float* state, double* pend, const float* sums, int64_t nw, int64_t ng, float decay,
                       float factor, float rel_min, bool use_reliability) {
  double wss = 0.0, gss = 0.0;
  for (int64_t i = 0; i < nw; ++i) wss += (double)sums[i];
  for (int64_t i = nw; i < nw + ng; ++i) gss += (double)sums[i];
  const double wn = std::sqrt(wss);
  float& rel = state[0];
  float& ema = state[1];
  float& wema = state[2];
  float& use = state[3];
  const bool weights_ok =
      std::isfinite(wn) && (wema <= 0.f || (wn <= (double)factor * wema && wn >= (double)wema / factor));
  if (weights_ok) wema = wema > 0.f ? decay * wema + (1.f - decay) * (float)wn : (float)wn;
  const double rows = pend[0], bad = pend[1], good = pend[2];
  if (good > 0.0 && bad == 0.0) {
    const float mean = (float)(pend[3] / good);
    ema = ema > 0.f ? decay * ema + (1.f - decay) * mean : mean;
  }
  if (use_reliability) {
    const bool grads_ok = std::isfinite(gss);
    bool update = true;
    float health = 0.f;
    if (weights_ok && grads_ok) {
      if (rows > 0.0) health = 1.f - (float)bad / (float)rows;
      else update = false;  // no evidence this step: the reliability stays
    }
    if (update) rel = std::clamp(decay * rel + (1.f - decay) * health, rel_min, 1.f);
  }
  // The layer's one expert takes all of its traffic (routed == rows), written as MoELayer's share for its bits.
  if (rows > 0.0) use = decay * use + (1.f - decay) * (float)rows / (float)rows;
  pend[0] = pend[1] = pend[2] = pend[3] = 0.0;
}

}  // namespace cm::cpu
