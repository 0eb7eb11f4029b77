// CUDA twins of kernels/copy.h: the strided copy behind contiguous()/clone()/copy_ on the device, dtype
// conversion, and a 32-bit fill.
#include "kernels/copy.h"
#include "kernels/cuda/common.cuh"

namespace cm::cuda {

namespace {

constexpr int kMaxRank = 8;

// Shape and strides travel by value in the kernel's parameters (a few hundred bytes, well under the limit).
struct Layout {
  int64_t shape[kMaxRank];
  int64_t dst[kMaxRank];
  int64_t src[kMaxRank];
  int rank;
};

// ---------------------------------------------------------------- kernels

// One element per thread (grid-stride): the linear index over `shape` is split into coordinates from the last dim,
// which is also the fastest-moving dim of the destination in the usual case (dst contiguous), so writes coalesce.
// I is the index type: 32-bit when every offset fits (integer division is several times cheaper), else 64-bit.
template <class E, class I>
__global__ void strided_copy_kernel(E* __restrict__ dst, const E* __restrict__ src, Layout L, I n) {
  for (I i = (I)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (I)gridDim.x * blockDim.x) {
    I rem = i, doff = 0, soff = 0;
#pragma unroll
    for (int d = kMaxRank - 1; d >= 0; --d) {
      if (d >= L.rank) continue;
      const I s = (I)L.shape[d];
      const I c = rem % s;
      rem /= s;
      doff += c * (I)L.dst[d];
      soff += c * (I)L.src[d];
    }
    dst[doff] = src[soff];
  }
}

__global__ void f32_to_i32_kernel(int32_t* __restrict__ dst, const float* __restrict__ src, int64_t n) {
  for (int64_t i = gtid(); i < n; i += gstride()) dst[i] = __float2int_rz(src[i]);
}

__global__ void i32_to_f32_kernel(float* __restrict__ dst, const int32_t* __restrict__ src, int64_t n) {
  for (int64_t i = gtid(); i < n; i += gstride()) dst[i] = (float)src[i];
}

__global__ void fill32_kernel(uint32_t* __restrict__ dst, uint32_t bits, int64_t n) {
  for (int64_t i = gtid(); i < n; i += gstride()) dst[i] = bits;
}

// Merges dims that are one block of memory on both sides (stride[d] == stride[d+1] * shape[d+1]) and drops size-1
// dims: a transpose of a [B, T, C] tensor becomes a 2-d or 3-d copy, and fewer dims mean fewer divisions.
Layout collapse(const int64_t* dst_strides, const int64_t* src_strides, const int64_t* shape, int64_t rank) {
  int64_t sh[64], ds[64], ss[64];
  int r = 0;
  for (int64_t d = 0; d < rank; ++d) {
    if (shape[d] == 1) continue;
    if (r > 0 && ds[r - 1] == dst_strides[d] * shape[d] && ss[r - 1] == src_strides[d] * shape[d]) {
      sh[r - 1] *= shape[d];
      ds[r - 1] = dst_strides[d];
      ss[r - 1] = src_strides[d];
      continue;
    }
    sh[r] = shape[d];
    ds[r] = dst_strides[d];
    ss[r] = src_strides[d];
    ++r;
  }
  CM_REQUIRE(r <= kMaxRank, "cuda::strided_copy: ", r, " non-mergeable dims; at most ", kMaxRank, " supported");
  Layout L{};
  L.rank = r;
  for (int d = 0; d < r; ++d) {
    L.shape[d] = sh[d];
    L.dst[d] = ds[d];
    L.src[d] = ss[d];
  }
  return L;
}

template <class E>
void launch_strided(void* dst, const void* src, const Layout& L, int64_t n) {
  // The largest offset either side can reach decides whether 32-bit indexing is safe.
  int64_t maxoff = 0;
  for (int d = 0; d < L.rank; ++d) {
    const int64_t ad = L.dst[d] < 0 ? -L.dst[d] : L.dst[d], as = L.src[d] < 0 ? -L.src[d] : L.src[d];
    maxoff += (L.shape[d] - 1) * (ad > as ? ad : as);
  }
  const int threads = 256;
  const unsigned blocks = grid_for(n, threads);
  // Margin below 2^31: the grid-stride step (up to 2^24) must not overflow the index either.
  if (n < (int64_t(1) << 30) && maxoff < (int64_t(1) << 30)) {
    strided_copy_kernel<E, int32_t><<<blocks, threads, 0, stream()>>>((E*)dst, (const E*)src, L, (int32_t)n);
  } else {
    strided_copy_kernel<E, int64_t><<<blocks, threads, 0, stream()>>>((E*)dst, (const E*)src, L, n);
  }
  cudaCheckLaunch("strided_copy_kernel");
}

}  // namespace

// ---------------------------------------------------------------- launchers

void strided_copy(void* dst, const int64_t* dst_strides, const void* src, const int64_t* src_strides,
                  const int64_t* shape, int64_t rank, int64_t esize) {
  CM_CHECK(esize == 1 || esize == 2 || esize == 4 || esize == 8, "cuda::strided_copy: element size ", esize);
  CM_CHECK(rank >= 0 && rank <= 64, "cuda::strided_copy: rank ", rank);
  int64_t n = 1;
  for (int64_t d = 0; d < rank; ++d) n *= shape[d];
  if (n == 0) return;
  Layout L = collapse(dst_strides, src_strides, shape, rank);
  // One dense run on both sides (rank 0, or everything merged into stride-1 dims): a plain memcpy.
  if (L.rank == 0 || (L.rank == 1 && L.dst[0] == 1 && L.src[0] == 1)) {
    cudaCheck(cudaMemcpyAsync(dst, src, (size_t)(n * esize), cudaMemcpyDeviceToDevice, stream()));
    return;
  }
  switch (esize) {
    case 1: launch_strided<uint8_t>(dst, src, L, n); break;
    case 2: launch_strided<uint16_t>(dst, src, L, n); break;
    case 4: launch_strided<uint32_t>(dst, src, L, n); break;
    default: launch_strided<uint64_t>(dst, src, L, n); break;
  }
}

void f32_to_i32(int32_t* dst, const float* src, int64_t n) {
  if (n <= 0) return;
  f32_to_i32_kernel<<<grid_for(n, 256), 256, 0, stream()>>>(dst, src, n);
  cudaCheckLaunch("f32_to_i32_kernel");
}

void i32_to_f32(float* dst, const int32_t* src, int64_t n) {
  if (n <= 0) return;
  i32_to_f32_kernel<<<grid_for(n, 256), 256, 0, stream()>>>(dst, src, n);
  cudaCheckLaunch("i32_to_f32_kernel");
}

void fill32(void* dst, uint32_t bits, int64_t n) {
  if (n <= 0) return;
  fill32_kernel<<<grid_for(n, 256), 256, 0, stream()>>>((uint32_t*)dst, bits, n);
  cudaCheckLaunch("fill32_kernel");
}

}  // namespace cm::cuda
