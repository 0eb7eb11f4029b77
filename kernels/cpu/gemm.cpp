// CPU SGEMM in the GotoBLAS/BLIS style: pack, block for the caches, register-tiled micro-kernel.
//
// Loop nest for one tile of C (the unit of work a thread takes):
//   jc over N in blocks of NC             (the task's column block; at most one here, tiles are <= NC wide)
//     pc over K in blocks of kc <= KC     pack op(B)[pc:pc+kc, jc:jc+nc] -> Bp, lives in L2 (kc*nc*4 bytes)
//       ir over M in steps of MR          pack op(A)[ir:ir+MR, pc:pc+kc] -> Ap, lives in L1 (MR*kc*4 bytes)
//         jr over nc in steps of NR       micro-kernel: C[ir:ir+MR, jc+jr:jc+jr+NR] (+)= Ap * Bp[:, jr:jr+NR]
// The micro-kernel keeps an MR x NR block of C in registers (12 x 32 floats = 24 zmm on AVX-512), and for each
// k broadcasts one A value per row and loads NR values of B: 24 FMAs per 2 loads of B + 12 broadcasts.
//
// Packed layouts (the micro-kernel walks both with unit stride in k):
//   Ap: [kc][MR]  Ap[k*MR + i] = op(A)[ir+i][pc+k]    (rows past the edge are simply not read)
//   Bp: panels of NR columns, panel p at Bp + p*NR*kc, each [kc][w] with w = 16*ceil(cols/16) <= NR,
//       Bp[k*w + j] = op(B)[pc+k][jc+p*NR+j], zero-padded up to w.
// Packing op(A) = A (row-major [M, K]) and op(B) = B^T is a transpose: done 16x16 in registers on AVX-512.
// Packing costs O(MK + KN) per tile against O(MNK) flops, so small products pay little; packing buffers are
// per thread and allocated once.
//
// Threads: C is cut into tiles (at most NC wide), each tile is one OpenMP task computed start to finish
// (all of K) by one thread, which packs its own panels. Products under ~4 MFLOP run on the calling thread.
//
// Determinism: for every C element the arithmetic is acc = 0; acc = fma(a_k, b_k, acc) for k in the K block in
// increasing k; C = alpha*acc + beta'*C (beta' = beta for the first K block, 1 after). The K blocks depend only
// on K, and every micro-kernel shape (full or edge) runs this same sequence, so how C is cut into tiles and
// tiles into threads cannot change a bit. Threads own disjoint tiles of C.
#include "kernels/gemm.h"
#include "kernels/cpu/gemm_tile.h"
#include "kernels/cpu/transpose.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <utility>

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX512F__) || defined(__AVX2__)
#if defined(__GNUC__) && !defined(__clang__)
// GCC 12 flags the self-initialised _mm512_undefined_ps() inside the AVX-512 shuffle intrinsics (a false
// positive); the pragma must precede the header for the warning's location to fall under it.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>
#endif

namespace cm::cpu {
using gemm_detail::Operands;
namespace {

// ---------------------------------------------------------------- a 16-float vector, three ways
// The kernel is written once against V; MR and NVMAX (vectors per row of the register tile) fit each ISA's
// register file: AVX-512 32 zmm (12x2 accumulators), AVX2 16 ymm (6x1 pairs = 12 ymm), plain C++ (4x1).
#if defined(__AVX512F__)
struct V {
  __m512 x;
};
inline V vzero() { return {_mm512_setzero_ps()}; }
inline V vbcast(float a) { return {_mm512_set1_ps(a)}; }
inline V vload(const float* p) { return {_mm512_loadu_ps(p)}; }
inline V vload(const float* p, int n) { return {_mm512_maskz_loadu_ps((__mmask16)((1u << n) - 1), p)}; }
inline void vstore(float* p, V v) { _mm512_storeu_ps(p, v.x); }
inline void vstore(float* p, V v, int n) { _mm512_mask_storeu_ps(p, (__mmask16)((1u << n) - 1), v.x); }
inline V vfma(V a, V b, V c) { return {_mm512_fmadd_ps(a.x, b.x, c.x)}; }
inline V vmul(V a, V b) { return {_mm512_mul_ps(a.x, b.x)}; }
constexpr int MR = 12, NVMAX = 2;
#elif defined(__AVX2__) && defined(__FMA__)
struct V {
  __m256 lo, hi;
};
inline __m256i vmask8(int n) {  // first n lanes on (n may be <= 0 or >= 8)
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), lane);
}
inline V vzero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
inline V vbcast(float a) { return {_mm256_set1_ps(a), _mm256_set1_ps(a)}; }
inline V vload(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
inline V vload(const float* p, int n) {
  return {_mm256_maskload_ps(p, vmask8(n)), _mm256_maskload_ps(p + 8, vmask8(n - 8))};
}
inline void vstore(float* p, V v) { _mm256_storeu_ps(p, v.lo), _mm256_storeu_ps(p + 8, v.hi); }
inline void vstore(float* p, V v, int n) {
  _mm256_maskstore_ps(p, vmask8(n), v.lo), _mm256_maskstore_ps(p + 8, vmask8(n - 8), v.hi);
}
inline V vfma(V a, V b, V c) { return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)}; }
inline V vmul(V a, V b) { return {_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)}; }
constexpr int MR = 6, NVMAX = 1;
#else
struct V {
  float x[16];
};
inline V vzero() { return V{}; }
inline V vbcast(float a) {
  V v;
  for (int l = 0; l < 16; ++l) v.x[l] = a;
  return v;
}
inline V vload(const float* p, int n = 16) {
  V v{};
  for (int l = 0; l < n; ++l) v.x[l] = p[l];
  return v;
}
inline void vstore(float* p, V v, int n = 16) {
  for (int l = 0; l < n; ++l) p[l] = v.x[l];
}
inline V vfma(V a, V b, V c) {
  for (int l = 0; l < 16; ++l) c.x[l] = a.x[l] * b.x[l] + c.x[l];
  return c;
}
inline V vmul(V a, V b) {
  for (int l = 0; l < 16; ++l) a.x[l] *= b.x[l];
  return a;
}
constexpr int MR = 4, NVMAX = 1;
#endif

constexpr int NR = 16 * NVMAX;  // register tile width (floats)
constexpr int64_t KC = kGemmKC; // K block: Ap (MR*KC*4 = 18 KiB) stays in L1 while Bp panels stream past it
constexpr int64_t NC = 512;     // N block: Bp (KC*NC*4 = 768 KiB) stays in L2 while every Ap meets it

// ---------------------------------------------------------------- micro-kernel
// C[0:MI, 0:n] (+)= Ap[0:kc, 0:MI]^T * Bp[0:kc, 0:n], with the write-back rule from the header comment.
// MI <= MR rows, NV vectors per row, n <= 16*NV valid columns (the rest is computed on zero padding, not stored).
template <int MI, int NV>
void micro_kernel(int64_t kc,
                  const float* __restrict a,  // Ap [kc][MR]
                  const float* __restrict b,  // Bp panel [kc][16*NV]
                  float* __restrict c,        // C tile, row stride ldc
                  int64_t ldc, int n, float alpha, float beta) {
  V acc[MI][NV];
  for (int i = 0; i < MI; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v] = vzero();
  for (int64_t k = 0; k < kc; ++k) {
    V bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = vload(b + 16 * v);
    for (int i = 0; i < MI; ++i) {
      V ai = vbcast(a[i]);
      for (int v = 0; v < NV; ++v) acc[i][v] = vfma(ai, bv[v], acc[i][v]);
    }
    a += MR;
    b += 16 * NV;
  }
  const V va = vbcast(alpha), vb = vbcast(beta);
  for (int i = 0; i < MI; ++i) {
    float* ci = c + i * ldc;
    for (int v = 0; v < NV; ++v) {
      const int w = n - 16 * v;  // valid columns in this vector (>= 1 by construction of NV)
      V r = vmul(va, acc[i][v]);
      if (beta != 0.0f) {  // beta == 0 must not read C: it may be NaN
        V cv = w >= 16 ? vload(ci + 16 * v) : vload(ci + 16 * v, w);
        r = vfma(va, acc[i][v], vmul(vb, cv));
      }
      if (w >= 16)
        vstore(ci + 16 * v, r);
      else
        vstore(ci + 16 * v, r, w);
    }
  }
}

using KernelFn = void (*)(int64_t, const float*, const float*, float*, int64_t, int, float, float);

template <int NV, int... I>
constexpr auto kernel_row(std::integer_sequence<int, I...>) {
  return std::array<KernelFn, sizeof...(I)>{&micro_kernel<I + 1, NV>...};
}
template <int... V1>
constexpr auto kernel_table(std::integer_sequence<int, V1...>) {
  return std::array<std::array<KernelFn, MR>, NVMAX>{kernel_row<V1 + 1>(std::make_integer_sequence<int, MR>{})...};
}
// kKernels[nv-1][mi-1]
constexpr auto kKernels = kernel_table(std::make_integer_sequence<int, NVMAX>{});

// ---------------------------------------------------------------- packing
// Stored row r of an operand, through the optional gather (gemm_tile.h): row i of op(A) = A, row k of op(B) = B,
// or column j of op(B) = B^T.
inline const float* a_row(const Operands& p, int64_t i) {
  return p.A + (p.a_rows ? (int64_t)p.a_rows[i] / p.a_div : i) * p.lda;
}
inline const float* b_row(const Operands& p, int64_t r) {
  return p.B + (p.b_rows ? (int64_t)p.b_rows[r] / p.b_div : r) * p.ldb;
}

// Ap[k*MR + i] = op(A)[i0+i][k0+k], i < mi.
void pack_a(float* __restrict ap, const Operands& p, int64_t i0, int mi, int64_t k0, int64_t kc) {
  if (p.ta) {  // op(A)[i][k] = A[k*lda + i]: each k is a contiguous run of mi floats
    const float* src = p.A + k0 * p.lda + i0;
    for (int64_t k = 0; k < kc; ++k) vstore(ap + k * MR, vload(src + k * p.lda, mi), mi);  // mi <= MR < 16
    return;
  }
  // op(A)[i][k] = A[i*lda + k] (or the gathered row's): a transpose of the mi x kc block
  const float* src[MR];
  for (int i = 0; i < mi; ++i) src[i] = a_row(p, i0 + i) + k0;
#if defined(__AVX512F__)
  for (int64_t k = 0; k < kc; k += 16)
    transpose_strip(ap + k * MR, MR, [&](int i) { return src[i] + k; }, mi, (int)std::min<int64_t>(16, kc - k), MR);
#else
  for (int64_t k = 0; k < kc; ++k)
    for (int i = 0; i < mi; ++i) ap[k * MR + i] = src[i][k];
#endif
}

// Bp panels for op(B)[k0:k0+kc, j0:j0+nc] (layout in the header comment).
void pack_b(float* __restrict bp, const Operands& p, int64_t k0, int64_t kc, int64_t j0, int64_t nc) {
  for (int64_t jp = 0; jp < nc; jp += NR) {
    const int cols = (int)std::min<int64_t>(NR, nc - jp);
    const int w = (cols + 15) / 16 * 16;
    float* __restrict dst = bp + jp * kc;
    if (!p.tb) {  // op(B)[k][j] = B[k*ldb + j] (or the gathered row's): rows of the panel are contiguous runs
      for (int64_t k = 0; k < kc; ++k) {
        const float* src = b_row(p, k0 + k) + j0 + jp;
        for (int v = 0; v < w; v += 16) {
          const int n = cols - v;  // loads past the edge read 0: the zero padding
          vstore(dst + k * w + v, n >= 16 ? vload(src + v) : vload(src + v, n));
        }
      }
      continue;
    }
    // op(B)[k][j] = B[j*ldb + k] (or the gathered row j's): a transpose, 16 columns by 16 k at a time
#if defined(__AVX512F__)
    for (int v = 0; v < w; v += 16) {
      const int rows = std::min(16, cols - v);
      const float* src[16];
      for (int i = 0; i < rows; ++i) src[i] = b_row(p, j0 + jp + v + i) + k0;
      for (int64_t k = 0; k < kc; k += 16)
        transpose_strip(dst + k * w + v, w, [&](int i) { return src[i] + k; }, rows,
                        (int)std::min<int64_t>(16, kc - k), 16);
    }
#else
    for (int j = 0; j < w; ++j) {
      const float* src = j < cols ? b_row(p, j0 + jp + j) + k0 : nullptr;
      for (int64_t k = 0; k < kc; ++k) dst[k * w + j] = src ? src[k] : 0.0f;
    }
#endif
  }
}

// Per-thread packing buffers, allocated once per thread (OpenMP keeps its threads alive).
struct PackBuffers {
  float* a = nullptr;  // MR * KC
  float* b = nullptr;  // KC * NC
  PackBuffers() {
    a = static_cast<float*>(std::aligned_alloc(64, sizeof(float) * MR * KC));
    b = static_cast<float*>(std::aligned_alloc(64, sizeof(float) * KC * NC));
    if (!a || !b) throw std::bad_alloc();
  }
  ~PackBuffers() {
    std::free(a);
    std::free(b);
  }
};
PackBuffers& pack_buffers() {
  static thread_local PackBuffers bufs;
  return bufs;
}

}  // namespace

// C[m0:m1, n0:n1] of one product (n1 - n0 <= NC). The K blocks come from gemm_k_block (kernels/gemm.h): a
// function of K alone, part of the determinism contract.
void gemm_detail::gemm_tile(const Operands& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1,
                            const float* packed_b) {
  PackBuffers& buf = pack_buffers();
  const int64_t kb = gemm_k_block(p.K);
  const int64_t nc = n1 - n0;
  const int64_t w16 = (nc + 15) / 16 * 16;  // a K block's panels hold kc x w16 floats (zero-padded columns)
  for (int64_t pc = 0; pc < p.K; pc += kb) {
    const int64_t kc = std::min(kb, p.K - pc);
    const float beta = pc == 0 ? p.beta : 1.0f;
    const float* bp = buf.b;
    if (packed_b)
      bp = packed_b + pc * w16;  // the K blocks before this one: pc rows of w16
    else
      pack_b(buf.b, p, pc, kc, n0, nc);
    for (int64_t ir = m0; ir < m1; ir += MR) {
      const int mi = (int)std::min<int64_t>(MR, m1 - ir);
      pack_a(buf.a, p, ir, mi, pc, kc);
      float* crow = p.C + ir * p.ldc + n0;
      for (int64_t jr = 0; jr < nc; jr += NR) {
        const int nj = (int)std::min<int64_t>(NR, nc - jr);
        kKernels[(nj + 15) / 16 - 1][mi - 1](kc, buf.a, bp + jr * kc, crow + jr, p.ldc, nj, p.alpha, beta);
      }
    }
  }
}

namespace {

// gemm_row's columns [0, 16 * NV) of c (NV full vectors, or the last one w lanes wide): every K block's FMA chains
// in registers, then the micro-kernel's write-back with alpha = 1 (C = acc, then C = acc + C).
template <int NV>
__attribute__((always_inline)) inline void row_vectors(float* c, const float* a, const float* B, int64_t ldb,
                                                       int64_t K, int64_t kb, int w) {
  const V one = vbcast(1.0f);
  for (int64_t pc = 0; pc < K; pc += kb) {
    const int64_t k1 = std::min(K, pc + kb);
    V acc[NV];
    for (int v = 0; v < NV; ++v) acc[v] = vzero();
    for (int64_t k = pc; k < k1; ++k) {
      const V ak = vbcast(a[k]);
      const float* bk = B + k * ldb;
      for (int v = 0; v < NV; ++v)
        acc[v] = vfma(ak, v < NV - 1 || w == 16 ? vload(bk + 16 * v) : vload(bk + 16 * v, w), acc[v]);
    }
    for (int v = 0; v < NV; ++v) {
      const int wv = v < NV - 1 ? 16 : w;
      V r = acc[v];
      if (pc > 0) r = vfma(one, acc[v], vmul(one, wv == 16 ? vload(c + 16 * v) : vload(c + 16 * v, wv)));
      if (wv == 16)
        vstore(c + 16 * v, r);
      else
        vstore(c + 16 * v, r, wv);
    }
  }
}

}  // namespace

void gemm_detail::gemm_row(float* c, const float* a, const float* B, int64_t ldb, int64_t N, int64_t K) {
  if (N <= 0) return;
  if (K <= 0) {
    std::fill(c, c + N, 0.0f);
    return;
  }
  const int64_t kb = gemm_k_block(K);
  int64_t j = 0;
  for (; j + 128 <= N; j += 128) row_vectors<8>(c + j, a, B + j, ldb, K, kb, 16);  // 8 independent FMA chains
  for (; j < N; j += 16) row_vectors<1>(c + j, a, B + j, ldb, K, kb, (int)std::min<int64_t>(16, N - j));
}

int64_t gemm_detail::packed_b_floats(int64_t K, int64_t cols) { return K * ((cols + 15) / 16 * 16); }

void gemm_detail::pack_b_panel(float* dst, const Operands& p, int64_t n0, int64_t n1) {
  const int64_t kb = gemm_k_block(p.K), w16 = (n1 - n0 + 15) / 16 * 16;
  for (int64_t pc = 0; pc < p.K; pc += kb) pack_b(dst + pc * w16, p, pc, std::min(kb, p.K - pc), n0, n1 - n0);
}

namespace {

// C = beta * C for the degenerate products (K == 0 or alpha == 0).
void scale_c(float* C, int64_t ldc, int64_t M, int64_t N, float beta) {
  for (int64_t i = 0; i < M; ++i) {
    float* __restrict c = C + i * ldc;
    if (beta == 0.0f)
      std::fill(c, c + N, 0.0f);
    else
      for (int64_t j = 0; j < N; ++j) c[j] *= beta;
  }
}

std::atomic<int64_t> multiply_adds{0};  // see gemm_multiply_adds()

}  // namespace

int gemm_detail::max_threads() {
#ifdef _OPENMP
  return omp_in_parallel() ? 1 : omp_get_max_threads();
#else
  return 1;
#endif
}
int gemm_detail::threads_for(double flops) { return flops < 4e6 ? 1 : max_threads(); }
int gemm_detail::tile_mr() { return MR; }
int gemm_detail::tile_nr() { return NR; }
int64_t gemm_detail::tile_nc() { return NC; }
void gemm_detail::count_multiply_adds(int64_t n) { multiply_adds.fetch_add(n, std::memory_order_relaxed); }

int64_t gemm_multiply_adds() { return multiply_adds.load(std::memory_order_relaxed); }

void gemm_strided_batched(float* C, int64_t ldc, int64_t stride_c, const float* A, int64_t lda, int64_t stride_a,
                          const float* B, int64_t ldb, int64_t stride_b, int64_t batch, int64_t M, int64_t N,
                          int64_t K, bool trans_a, bool trans_b, float alpha, float beta) {
  if (batch <= 0 || M <= 0 || N <= 0) return;
  multiply_adds.fetch_add(batch * M * N * std::max<int64_t>(K, 0), std::memory_order_relaxed);
  if (K <= 0 || alpha == 0.0f) {
    for (int64_t b = 0; b < batch; ++b) scale_c(C + b * stride_c, ldc, M, N, beta);
    return;
  }
  // Work split: tiles of C at most NC wide and at least 4*MR tall, at least two per thread, and for a single
  // product a multiple of the thread count (6 tiles, not 3 or 4, for 2 threads and 3 column blocks). Every
  // task packs its own panels, so more tiles cost more packing; dynamic scheduling absorbs uneven edge tiles
  // and neighbours on the same cores. Small products stay on the calling thread.
  const double flops = 2.0 * (double)M * (double)N * (double)K * (double)batch;
  const int threads = gemm_detail::threads_for(flops);
  const int64_t ncb = (N + NC - 1) / NC;
  const int64_t nb = ((N + ncb - 1) / ncb + NR - 1) / NR * NR;  // tile width, a multiple of NR, <= NC
  const int64_t ncols = (N + nb - 1) / nb;
  int64_t nrows = 1;
  if (threads > 1) {
    const int64_t per_matrix = (2 * threads + batch - 1) / batch;
    const int64_t max_rows = std::max<int64_t>(1, M / (4 * MR));
    nrows = std::min((per_matrix + ncols - 1) / ncols, max_rows);
    while (batch == 1 && (nrows * ncols) % threads != 0 && nrows < max_rows) ++nrows;
  }
  const int64_t mb = ((M + nrows - 1) / nrows + MR - 1) / MR * MR;  // tile height, a multiple of MR
  nrows = (M + mb - 1) / mb;
  const int64_t tiles = nrows * ncols, tasks = batch * tiles;

#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (threads > 1)
  for (int64_t t = 0; t < tasks; ++t) {
    const int64_t b = t / tiles, r = (t % tiles) / ncols, q = t % ncols;
    Operands p{A + b * stride_a, B + b * stride_b, C + b * stride_c, lda, ldb, ldc, M, N, K,
               trans_a,          trans_b,          alpha,            beta};
    gemm_detail::gemm_tile(p, r * mb, std::min(M, (r + 1) * mb), q * nb, std::min(N, (q + 1) * nb));
  }
}

void gemm(float* C, int64_t ldc, const float* A, int64_t lda, const float* B, int64_t ldb, int64_t M, int64_t N,
          int64_t K, bool trans_a, bool trans_b, float alpha, float beta) {
  gemm_strided_batched(C, ldc, 0, A, lda, 0, B, ldb, 0, 1, M, N, K, trans_a, trans_b, alpha, beta);
}

}  // namespace cm::cpu
