// Streaming (non-temporal) stores for outputs too large to stay in the cache until they are read. A plain store
// first reads the line it writes (for ownership), so writing n bytes moves 2n; a streaming store writes the line
// whole and moves n. Below the threshold the next kernel reads the output back from the cache, which a streaming
// store would have bypassed, so they are used only on large outputs: at 16384 tokens and 1024 experts, the router's
// [T, N] probabilities and their two gradients (64 MB each), where they took the selection's backward from 13-17 ms
// to 10-11 (bench/dispatch --layer). The values are the same either way.
#pragma once
#include <cstdint>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace cm::cpu {

// 32 MB: the last-level cache a core shares on most machines (this project's 2-core VM: 32 MB). Not
// sysconf(_SC_LEVEL3_CACHE_SIZE), which reports the whole host's (320 MB there), as glibc's memcpy does: it streams
// only above 240 MB there. At 16 MB (flat routing over 256 experts) streaming was no faster.
constexpr int64_t kStreamBytes = (int64_t)32 << 20;

// Whether rows of `row` floats, n floats in all from dst, are written by streaming stores: at least min_bytes,
// whole 64-byte lines per row, dst aligned to them (a tensor's storage is), and AVX-512 to store them with.
inline bool stream_rows(const float* dst, int64_t n, int64_t row, int64_t min_bytes = kStreamBytes) {
#if defined(__AVX512F__)
  return n * (int64_t)sizeof(float) >= min_bytes && row % 16 == 0 && ((uintptr_t)dst & 63) == 0;
#else
  (void)dst, (void)n, (void)row, (void)min_bytes;
  return false;
#endif
}

#if defined(__AVX512F__)
// dst[0, n) = src[0, n) by streaming stores; n a multiple of 16, dst 64-byte aligned.
inline void stream_row(float* dst, const float* src, int64_t n) {
  for (int64_t c = 0; c < n; c += 16) _mm512_stream_ps(dst + c, _mm512_loadu_ps(src + c));
}
#endif

#if defined(__AVX512F__)
// dst[0, n) = s * src[0, n) by streaming stores (the products a scalar loop makes); n a multiple of 16, dst 64-byte
// aligned.
inline void stream_scaled_row(float* dst, const float* src, float s, int64_t n) {
  const __m512 sv = _mm512_set1_ps(s);
  for (int64_t c = 0; c < n; c += 16) _mm512_stream_ps(dst + c, _mm512_mul_ps(sv, _mm512_loadu_ps(src + c)));
}
#endif

// Orders the calling thread's streaming stores before its later stores (and so before a barrier that publishes
// them to other threads): they are weakly ordered.
inline void stream_fence() {
#if defined(__AVX512F__)
  _mm_sfence();
#endif
}

}  // namespace cm::cpu
