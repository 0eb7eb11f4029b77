// Wall-clock timing shared by the CPU bench labs: one warm-up run (page faults, caches, the thread pool), then
// the median of `repeats` runs, in seconds.
#pragma once
#include <algorithm>
#include <chrono>
#include <vector>

namespace cm::bench {

template <class F>
double median_seconds(F&& f, int repeats) {
  f();
  std::vector<double> t;
  for (int r = 0; r < repeats; ++r) {
    auto t0 = std::chrono::steady_clock::now();
    f();
    t.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

}  // namespace cm::bench
