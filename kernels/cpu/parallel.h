// When a CPU kernel opens an OpenMP parallel region. (The GEMMs have their own rule, a FLOP count:
// kernels/cpu/gemm.cpp.)
//
// The programs wait passively between regions (OMP_WAIT_POLICY=passive, model/trainer.h): the other threads sleep,
// and each region's start wakes them through the kernel. On the 2-core machines this project is measured on that
// costs tens of microseconds, where one core streams a [768, 128] float tensor in 5-15: train_bench's step took 1-13%
// less time once its small kernels stopped opening regions (bench/RESULTS.md). So a kernel runs on threads only
// when its work on one is clearly longer than the wake-up:
//   parallel_min()          elements of a memory-bound pass (a copy, an add, a gather, a sum, a norm): 2^18, 1 MiB
//                           of floats per array;
//   parallel_min_compute()  elements of a pass with a transcendental, a random draw or a selection per element (exp,
//                           log, sigmoid, dropout, top-k): 2^16.
// Which thread computes what never changes a result (each kernel's contract), so these decide speed only. The test
// suite lowers them (tests/main.cpp), so that its small inputs take the threaded paths too.
#pragma once
#include <atomic>
#include <cstdint>

namespace cm::cpu {

namespace parallel_detail {
inline std::atomic<int64_t> min_memory{int64_t{1} << 18}, min_compute{int64_t{1} << 16};
}  // namespace parallel_detail

inline int64_t parallel_min() { return parallel_detail::min_memory.load(std::memory_order_relaxed); }
inline int64_t parallel_min_compute() { return parallel_detail::min_compute.load(std::memory_order_relaxed); }
inline void set_parallel_min(int64_t memory, int64_t compute) {
  parallel_detail::min_memory.store(memory, std::memory_order_relaxed);
  parallel_detail::min_compute.store(compute, std::memory_order_relaxed);
}

}  // namespace cm::cpu
