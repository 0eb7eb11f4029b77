// Shared test utilities: random tensors, closeness with abs + rel * |ref| tolerances, gradient checks.
#pragma once
#include <doctest/doctest.h>

#include <cmath>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "autograd/gradcheck.h"
#include "autograd/ops.h"

namespace cm::test {

// Sets the OpenMP thread count for a scope (the thread-count invariance checks).
struct ThreadCount {
  int prev = 1;
  explicit ThreadCount(int n) {
#ifdef _OPENMP
    prev = omp_get_max_threads();
    omp_set_num_threads(n);
#else
    (void)n;
#endif
  }
  ~ThreadCount() {
#ifdef _OPENMP
    omp_set_num_threads(prev);
#endif
  }
};

// Uniform in [lo, hi) from a fixed seed: never all zeros.
inline Tensor uniform(const Shape& s, uint64_t seed, float lo = -1.f, float hi = 1.f) {
  Generator g(seed);
  Tensor t = Tensor::rand(s, g);
  float* p = t.f32();
  for (int64_t i = 0; i < t.numel(); ++i) p[i] = lo + (hi - lo) * p[i];
  return t;
}
inline Tensor param(const Shape& s, uint64_t seed, float lo = -1.f, float hi = 1.f) {
  Tensor t = uniform(s, seed, lo, hi);
  t.requires_grad_(true);
  return t;
}

// First index where |got - ref| > atol + rtol * |ref|, or -1. Shapes must match.
inline int64_t first_mismatch(const std::vector<float>& got, const std::vector<float>& ref, float atol,
                              float rtol) {
  if (got.size() != ref.size()) return 0;
  for (size_t i = 0; i < got.size(); ++i) {
    float d = std::fabs(got[i] - ref[i]);
    if (!(d <= atol + rtol * std::fabs(ref[i]))) return (int64_t)i;
  }
  return -1;
}

#if CM_CUDA
// The decorator of every CUDA case: skipped, and counted, when there is no device (the count is complete once
// static initialisation is over; "cuda: backend status" prints it).
inline int cuda_skipped = 0;
inline doctest::skip needs_device() {
  const bool skip = !cuda_available();
  if (skip) ++cuda_skipped;
  return doctest::skip(skip);
}
#endif

}  // namespace cm::test

// CHECK_CLOSE(tensor, std::vector<float> ref, atol, rtol): names the first bad element.
#define CHECK_CLOSE(t, ref, atol, rtol)                                                                \
  do {                                                                                                \
    std::vector<float> got_ = (t).to_f32_vector();                                                    \
    std::vector<float> ref_ = (ref);                                                                  \
    REQUIRE(got_.size() == ref_.size());                                                              \
    int64_t bad_ = ::cm::test::first_mismatch(got_, ref_, (atol), (rtol));                            \
    CHECK_MESSAGE(bad_ < 0, "element ", bad_, ": got ", (bad_ < 0 ? 0.f : got_[bad_]), " expected ", \
                  (bad_ < 0 ? 0.f : ref_[bad_]));                                                     \
  } while (0)

// CHECK_GRAD(fn, inputs...): finite-difference check of every input that requires grad.
#define CHECK_GRAD(fn, ...)                                      \
  do {                                                           \
    ::cm::GradcheckResult r_ = ::cm::gradcheck((fn), __VA_ARGS__); \
    CHECK_MESSAGE(r_.ok, r_.message);                            \
  } while (0)
