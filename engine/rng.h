// Counter-based random numbers (Philox4x32-10, Salmon et al. 2011).
// Element i of a draw depends only on (seed, offset + i), never on thread count, device or order of work, so
// CPU and CUDA produce the same numbers for a seed and any slice of a draw can be regenerated independently.
#pragma once
#include <cmath>
#include <cstdint>

#include "engine/hd.h"

namespace cm {

struct Philox4 {
  uint32_t v[4];
};

// One Philox4x32-10 block: 4 random 32-bit words for counter `ctr` under key `seed`.
CM_HD Philox4 philox4x32(uint64_t ctr, uint64_t seed) {
  uint32_t c0 = (uint32_t)ctr, c1 = (uint32_t)(ctr >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
  for (int r = 0; r < 10; ++r) {
    uint64_t p0 = (uint64_t)0xD2511F53u * c0, p1 = (uint64_t)0xCD9E8D57u * c2;
    uint32_t n0 = (uint32_t)(p1 >> 32) ^ c1 ^ k0, n2 = (uint32_t)(p0 >> 32) ^ c3 ^ k1;
    c1 = (uint32_t)p1;  // lo(p1)
    c3 = (uint32_t)p0;  // lo(p0)
    c0 = n0;
    c2 = n2;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// Uniform float in [0, 1) from 24 random bits: exactly representable, identical on every backend.
CM_HD float u32_to_unit(uint32_t x) { return (float)(x >> 8) * (1.0f / 16777216.0f); }

// Element i of the uniform stream (seed, offset): uses word i%4 of block (offset + i/4).
CM_HD float philox_uniform(uint64_t seed, uint64_t offset, uint64_t i) {
  Philox4 r = philox4x32(offset + i / 4, seed);
  return u32_to_unit(r.v[i % 4]);
}

// Element i of the standard normal stream: Box-Muller on words (0,1) of block (offset + i/2); even i takes the
// cosine, odd i the sine. Computed in double so CPU and GPU agree to the last bit of the float result.
CM_HD float philox_normal(uint64_t seed, uint64_t offset, uint64_t i) {
  Philox4 r = philox4x32(offset + i / 2, seed);
  double u1 = ((double)(r.v[0] >> 8) + 1.0) * (1.0 / 16777217.0);  // (0, 1]: log is finite
  double u2 = (double)(r.v[1] >> 8) * (1.0 / 16777216.0);
  double rad = std::sqrt(-2.0 * std::log(u1));
  double ang = 6.283185307179586 * u2;
  return (float)((i & 1) ? rad * std::sin(ang) : rad * std::cos(ang));
}

// A stream position: each draw of n elements consumes a fixed span of counters and advances the offset, so a
// sequence of draws is reproducible from (seed, offset) alone - which is what a checkpoint stores.
struct Generator {
  uint64_t seed = 0;
  uint64_t offset = 0;
  explicit Generator(uint64_t s = 0, uint64_t o = 0) : seed(s), offset(o) {}
  // Reserve counters for n elements; returns the offset the draw should use.
  uint64_t take(uint64_t n) {
    uint64_t o = offset;
    offset += n / 2 + 1;  // enough blocks for both uniform (4/block) and normal (2/block) draws
    return o;
  }
};

}  // namespace cm
