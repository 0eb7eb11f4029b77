// The CUDA sorted add's exact order (kernels/index.h, cuda::index_add_sorted: index_add of 64 or more indices, and
// the embedding backward), computed on the host, and its stated bound against the CPU's serial order. Used by the
// cuda suites to check the order bit for bit and the tolerance against the CPU twin.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace cm::test {

// out [O, D, I] += src [O, n, I] at index [n] (all in [0, D)), each index value's sources in increasing position,
// cut into chunks of L: chunk 0 continues from the row's value, a later chunk sums from -0.0, and the row becomes
// the chunk sums added in chunk order. A run of at most L is the CPU's serial order.
inline std::vector<float> chunked_add(std::vector<float> out, const std::vector<float>& src,
                                      const std::vector<int32_t>& index, int64_t O, int64_t D, int64_t n, int64_t I,
                                      int64_t L) {
  std::vector<std::vector<int64_t>> at((size_t)D);
  for (int64_t j = 0; j < n; ++j) at[(size_t)index[(size_t)j]].push_back(j);
  for (int64_t o = 0; o < O; ++o)
    for (int64_t d = 0; d < D; ++d) {
      const std::vector<int64_t>& js = at[(size_t)d];
      const int64_t m = (int64_t)js.size();
      for (int64_t i = 0; i < I && m > 0; ++i) {
        auto s = [&](int64_t q) { return src[(size_t)((o * n + js[(size_t)q]) * I + i)]; };
        float acc = out[(size_t)((o * D + d) * I + i)];
        for (int64_t q = 0; q < std::min(m, L); ++q) acc += s(q);
        for (int64_t c = L; c < m; c += L) {
          float part = -0.0f;
          for (int64_t q = c; q < std::min(m, c + L); ++q) part += s(q);
          acc += part;
        }
        out[(size_t)((o * D + d) * I + i)] = acc;
      }
    }
  return out;
}

// kernels/index.h's bound between the chunked and the serial order, per output element:
// (m + L + m / L) * 2^-24 * (|out| + sum |src|) for a row that m sources reach (0 for the others: the same bits).
inline std::vector<double> chunked_add_bound(const std::vector<float>& out, const std::vector<float>& src,
                                             const std::vector<int32_t>& index, int64_t O, int64_t D, int64_t n,
                                             int64_t I, int64_t L) {
  std::vector<double> mass(out.size(), 0.0), bound(out.size(), 0.0);
  std::vector<int64_t> m((size_t)D, 0);
  for (int64_t j = 0; j < n; ++j) ++m[(size_t)index[(size_t)j]];
  for (int64_t o = 0; o < O; ++o)
    for (int64_t j = 0; j < n; ++j)
      for (int64_t i = 0; i < I; ++i)
        mass[(size_t)((o * D + index[(size_t)j]) * I + i)] += std::fabs((double)src[(size_t)((o * n + j) * I + i)]);
  for (int64_t o = 0; o < O; ++o)
    for (int64_t d = 0; d < D; ++d)
      for (int64_t i = 0; i < I; ++i) {
        const size_t e = (size_t)((o * D + d) * I + i);
        const double md = (double)m[(size_t)d];
        if (md > (double)L) bound[e] = (md + (double)L + md / (double)L) * std::ldexp(1.0, -24) * (std::fabs(out[e]) + mass[e]);
      }
  return bound;
}

}  // namespace cm::test
