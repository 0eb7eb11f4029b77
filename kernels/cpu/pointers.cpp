// Pointer tables (kernels/pointers.h).
#include "kernels/pointers.h"

namespace cm::cpu {

void pointer_table(float** out, float* base, int64_t stride, int64_t G) {
  for (int64_t e = 0; e < G; ++e) out[e] = base + e * stride;
}

}  // namespace cm::cpu
