// CM_HD: a function that both backends compile from one definition, the CPU kernel calling it on the host and the
// CUDA kernel on the device (nvcc), so the twins cannot drift apart. Plain inline elsewhere (g++, the emulator).
#pragma once

#if defined(__CUDACC__)
#define CM_HD __host__ __device__ __forceinline__
#else
#define CM_HD inline
#endif
