// Grouped GEMM on the CPU (contract in kernels/grouped_gemm.h): the whole call is one list of work items, each a
// tile of one group's product, and one OpenMP region over that list. Each item runs cpu::gemm's own tile routine
// (kernels/cpu/gemm_tile.h: packing, AVX-512/AVX2 micro-kernel, K blocks), with the group's weight as the B
// operand and the row gather, if any, folded into the packing of X.
//
// Why one region: with 16-64 experts of ~24-100 rows each, a loop of cpu::gemm calls pays a parallel region (a
// fork/join of the team, and idle threads at each join) per expert and per product, and each small call is cut
// for its own size. Here the items of every group share one dynamic schedule, so a thread that finishes a short
// expert takes the next tile of any other.
#include "kernels/grouped_gemm.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <new>
#include <string>
#include <vector>

#include "engine/check.h"
#include "kernels/cpu/gemm_tile.h"
#include "kernels/gemm.h"

namespace cm::cpu {
namespace {

using gemm_detail::Operands;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

void check_args(const char* what, const int64_t* offsets, int64_t G, int64_t M, int64_t N, int64_t Kd,
                const RowGather& gather) {
  CM_CHECK(G >= 0 && M >= 0 && N >= 0 && Kd >= 0, what, ": G=", G, " M=", M, " N=", N, " Kd=", Kd);
  CM_CHECK(offsets != nullptr, what, ": offsets is null");
  CM_CHECK(offsets[0] == 0 && offsets[G] <= M, what, ": offsets must run from 0 to at most M=", M, ", got ",
           offsets[0], " .. ", offsets[G]);
  for (int64_t g = 0; g < G; ++g)
    CM_CHECK(offsets[g + 1] >= offsets[g], what, ": offsets decrease at group ", g, " (", offsets[g], " > ",
             offsets[g + 1], ")");
  CM_CHECK(gather.div > 0, what, ": gather.div=", gather.div);
}

// Shared panels on (the default) or off (each tile packs its own: the earlier behaviour, the same bits).
std::atomic<int>& shared_packing_flag() {
  static std::atomic<int> on{[] {
    const char* e = std::getenv("CM_GROUPED_SHARED_PACK");
    return e && std::string(e) == "0" ? 0 : 1;
  }()};
  return on;
}
bool shared_packing() { return shared_packing_flag().load(std::memory_order_relaxed) != 0; }


// One work item: rows [m0, m1) and columns [n0, n1) of group g's product (rows and columns of its C).
struct Item {
  int64_t g, m0, m1, n0, n1;
};

// Tile width for C of `cols` columns: cut as cpu::gemm cuts it, into near-equal blocks at most NC wide, each a
// multiple of NR.
int64_t tile_width(int64_t cols) {
  const int64_t NR = gemm_detail::tile_nr(), NC = gemm_detail::tile_nc();
  const int64_t blocks = std::max<int64_t>(1, ceil_div(cols, NC));
  return std::max<int64_t>(NR, round_up(ceil_div(cols, blocks), NR));
}

// The work of a row-grouped product (forward, backward_input): group g's C is its rows x `cols`, cut into tiles.
// Tile height: about four items per thread over the whole call, between MR and 8 MR rows; a group shorter than a
// tile is one tile. Every tile needs its group's weight packed (W[g]^T or W[g], the B operand, kernels/cpu/gemm.cpp):
// a group of one row tile packs it inside the tile, in the thread's own buffer; a group of several row tiles
// (a popular expert) has each column block packed once, before the tiles, into a buffer they all read
// (`shared`), instead of once per tile. The values packed are the same, so the bits are.
struct RowWork {
  std::vector<Item> items;
  struct Pack {
    int64_t g, n0, n1;
    int64_t at;  // floats into the shared buffer
  };
  std::vector<Pack> packs;          // the shared panels to make first
  std::vector<int64_t> shared;      // [G * ncols]: where item (g, column block q) finds its panel, or -1
  int64_t ncols = 1, nb = 1, floats = 0;
};

RowWork row_work(const int64_t* offsets, int64_t G, int64_t M, int64_t K, int64_t cols, int threads) {
  RowWork w;
  const int64_t MR = gemm_detail::tile_mr();
  w.nb = tile_width(cols);
  w.ncols = ceil_div(cols, w.nb);
  const int64_t mb = std::clamp(round_up(ceil_div(M * w.ncols, 4 * (int64_t)threads), MR), (int64_t)MR, 8 * MR);
  w.items.reserve((size_t)((ceil_div(M, mb) + G) * w.ncols));
  w.shared.assign((size_t)(G * w.ncols), -1);
  for (int64_t g = 0; g < G; ++g) {
    const int64_t rows = offsets[g + 1] - offsets[g];
    for (int64_t m0 = 0; m0 < rows; m0 += mb)
      for (int64_t q = 0; q < w.ncols; ++q)
        w.items.push_back({g, m0, std::min(rows, m0 + mb), q * w.nb, std::min(cols, (q + 1) * w.nb)});
    if (rows <= mb || K == 0 || !shared_packing()) continue;
    for (int64_t q = 0; q < w.ncols; ++q) {
      const int64_t n0 = q * w.nb, n1 = std::min(cols, n0 + w.nb);
      w.shared[(size_t)(g * w.ncols + q)] = w.floats;
      w.packs.push_back({g, n0, n1, w.floats});
      w.floats += round_up(gemm_detail::packed_b_floats(K, n1 - n0), 16);  // each panel 64-byte aligned
    }
  }
  return w;
}

// The shared panels' buffer: the calling thread's, grown when a call needs more, 64-byte aligned.
float* shared_panels(int64_t floats) {
  struct Buffer {
    float* p = nullptr;
    int64_t n = 0;
    ~Buffer() { std::free(p); }
  };
  static thread_local Buffer buf;
  if (floats > buf.n) {
    std::free(buf.p);
    buf.n = round_up(floats, 16);
    buf.p = static_cast<float*>(std::aligned_alloc(64, sizeof(float) * (size_t)buf.n));
    if (!buf.p) throw std::bad_alloc();
  }
  return buf.p;
}

// C[m0:m1, n0:n1] (ldc) = 0: the sum over an empty inner dimension when not accumulating.
void zero_tile(float* C, int64_t ldc, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  for (int64_t i = m0; i < m1; ++i) std::fill(C + i * ldc + n0, C + i * ldc + n1, 0.0f);
}

// db[j] (+)= sum over the rows of dy [rows, ldy] of dy[r][j], for j in [j0, j1): the bias gradient, with the bits
// of linear's ones-vector gemm (M = 1, K = rows): per K block (gemm_k_block(rows)) acc = 0, acc = fma(1, x, acc)
// = acc + x in increasing row order, then db = acc (first block, overwriting) or db + acc. Columns in chunks of
// 64 kept in a local array, so the rows are walked contiguously.
void column_sums(float* db, const float* dy, int64_t ldy, int64_t rows, int64_t j0, int64_t j1, bool accumulate) {
  if (rows == 0) {
    if (!accumulate) std::fill(db + j0, db + j1, 0.0f);
    return;
  }
  const int64_t kb = gemm_k_block(rows);
  constexpr int64_t kChunk = 64;
  float acc[kChunk];
  for (int64_t c0 = j0; c0 < j1; c0 += kChunk) {
    const int64_t w = std::min(kChunk, j1 - c0);
    for (int64_t pc = 0; pc < rows; pc += kb) {
      const int64_t kc = std::min(kb, rows - pc);
      std::fill(acc, acc + w, 0.0f);
      for (int64_t r = pc; r < pc + kc; ++r) {
        const float* x = dy + r * ldy + c0;
        for (int64_t j = 0; j < w; ++j) acc[j] += x[j];
      }
      if (pc == 0 && !accumulate)
        std::copy(acc, acc + w, db + c0);
      else
        for (int64_t j = 0; j < w; ++j) db[c0 + j] += acc[j];
    }
  }
}

}  // namespace

void grouped_gemm_set_shared_packing(bool on) { shared_packing_flag().store(on ? 1 : 0); }
bool grouped_gemm_shared_packing() { return shared_packing(); }

void grouped_gemm_forward(float* Y, const float* X, const float* const* W, const int64_t* offsets, int64_t G,
                          int64_t M, int64_t N, int64_t Kd, const float* const* bias, bool accumulate,
                          RowGather gather) {
  check_args("cpu::grouped_gemm_forward", offsets, G, M, N, Kd, gather);
  if (M == 0 || N == 0) return;
  gemm_detail::count_multiply_adds(M * N * Kd);
  const int threads = gemm_detail::threads_for(2.0 * (double)M * (double)N * (double)Kd);
  const RowWork w = row_work(offsets, G, M, Kd, N, threads);
  const int64_t n_items = (int64_t)w.items.size(), n_packs = (int64_t)w.packs.size();
  float* panels = n_packs ? shared_panels(w.floats) : nullptr;
  // C_g [rows, N] = op(A) [rows, Kd] op(B) [Kd, N], A = X_g (gathered or not), op(B) = W[g]^T.
  auto operands = [&](int64_t g, float beta) {
    const int64_t r0 = offsets[g], rows = offsets[g + 1] - r0;
    Operands p{gather.index ? X : X + r0 * Kd, W[g], Y + r0 * N, Kd, Kd, N, rows, N, Kd, false, true, 1.0f, beta};
    if (gather.index) p.a_rows = gather.index + r0, p.a_div = gather.div;
    return p;
  };

#pragma omp parallel num_threads(threads) if (threads > 1)
  {
#pragma omp for schedule(dynamic, 1)
    for (int64_t j = 0; j < n_packs; ++j) {  // the popular experts' shared panels (the loop ends on a barrier)
      const RowWork::Pack& pk = w.packs[(size_t)j];
      gemm_detail::pack_b_panel(panels + pk.at, operands(pk.g, 0.0f), pk.n0, pk.n1);
    }
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < n_items; ++t) {
      const Item& it = w.items[(size_t)t];
      float* Yg = Y + offsets[it.g] * N;  // [rows, N]
      const float* b = bias ? bias[it.g] : nullptr;
      if (b)  // the bias first, then the product accumulated onto it: linear()'s order
        for (int64_t i = it.m0; i < it.m1; ++i) {
          float* y = Yg + i * N;
          for (int64_t j = it.n0; j < it.n1; ++j) y[j] = accumulate ? y[j] + b[j] : b[j];
        }
      const float beta = accumulate || b ? 1.0f : 0.0f;
      if (Kd == 0) {  // an empty product: C = beta * C
        if (beta == 0.0f) zero_tile(Yg, N, it.m0, it.m1, it.n0, it.n1);
        continue;
      }
      const int64_t at = w.shared[(size_t)(it.g * w.ncols + it.n0 / w.nb)];
      gemm_detail::gemm_tile(operands(it.g, beta), it.m0, it.m1, it.n0, it.n1, at >= 0 ? panels + at : nullptr);
    }
  }
}

void grouped_gemm_backward_input(float* dX, const float* dY, const float* const* W, const int64_t* offsets,
                                 int64_t G, int64_t M, int64_t N, int64_t Kd, bool accumulate) {
  check_args("cpu::grouped_gemm_backward_input", offsets, G, M, N, Kd, RowGather{});
  if (M == 0 || Kd == 0) return;
  gemm_detail::count_multiply_adds(M * N * Kd);
  const int threads = gemm_detail::threads_for(2.0 * (double)M * (double)N * (double)Kd);
  const RowWork w = row_work(offsets, G, M, N, Kd, threads);
  const int64_t n_items = (int64_t)w.items.size(), n_packs = (int64_t)w.packs.size();
  float* panels = n_packs ? shared_panels(w.floats) : nullptr;
  const float beta = accumulate ? 1.0f : 0.0f;
  // C_g [rows, Kd] = dY_g [rows, N] W[g] [N, Kd]
  auto operands = [&](int64_t g) {
    const int64_t r0 = offsets[g], rows = offsets[g + 1] - r0;
    return Operands{dY + r0 * N, W[g], dX + r0 * Kd, N, Kd, Kd, rows, Kd, N, false, false, 1.0f, beta};
  };

#pragma omp parallel num_threads(threads) if (threads > 1)
  {
#pragma omp for schedule(dynamic, 1)
    for (int64_t j = 0; j < n_packs; ++j) {  // the popular experts' shared panels (the loop ends on a barrier)
      const RowWork::Pack& pk = w.packs[(size_t)j];
      gemm_detail::pack_b_panel(panels + pk.at, operands(pk.g), pk.n0, pk.n1);
    }
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < n_items; ++t) {
      const Item& it = w.items[(size_t)t];
      if (N == 0) {
        if (!accumulate) zero_tile(dX + offsets[it.g] * Kd, Kd, it.m0, it.m1, it.n0, it.n1);
        continue;
      }
      const int64_t at = w.shared[(size_t)(it.g * w.ncols + it.n0 / w.nb)];
      gemm_detail::gemm_tile(operands(it.g), it.m0, it.m1, it.n0, it.n1, at >= 0 ? panels + at : nullptr);
    }
  }
}

void grouped_gemm_backward_weight(float* const* dW, float* const* dB, const float* dY, const float* X,
                                  const int64_t* offsets, int64_t G, int64_t M, int64_t N, int64_t Kd,
                                  bool accumulate, RowGather gather) {
  check_args("cpu::grouped_gemm_backward_weight", offsets, G, M, N, Kd, gather);
  if (N == 0) return;
  gemm_detail::count_multiply_adds(M * N * Kd);
  const int threads = gemm_detail::threads_for(2.0 * (double)M * (double)N * (double)Kd);
  // Items: tiles of each dW[g] [N, Kd], a group's K being its rows. Each dW[g] is cut into `split` row bands so
  // that the call has about four items per thread (bands at least 4 MR rows: each band packs X_g once); an empty
  // group has no items when accumulating (left untouched), else items that write zeros. The items with n0 == 0
  // also sum the bias gradient of their band. Kd == 0 keeps one empty-width column so that dB is still computed.
  const int64_t MR = gemm_detail::tile_mr();
  const int64_t nb = Kd > 0 ? tile_width(Kd) : 1, ncols = Kd > 0 ? ceil_div(Kd, nb) : 1;
  const int64_t active = std::max<int64_t>(1, G * ncols);
  const int64_t split = std::clamp(ceil_div(4 * (int64_t)threads, active), (int64_t)1,
                                   std::max<int64_t>(1, N / (4 * MR)));
  const int64_t mb = round_up(ceil_div(N, split), MR);
  std::vector<Item> items;
  for (int64_t g = 0; g < G; ++g) {
    if (accumulate && offsets[g + 1] == offsets[g]) continue;
    for (int64_t m0 = 0; m0 < N; m0 += mb)
      for (int64_t q = 0; q < ncols; ++q)
        items.push_back({g, m0, std::min(N, m0 + mb), q * nb, std::min(Kd, (q + 1) * nb)});
  }
  const int64_t n_items = (int64_t)items.size();
  const float beta = accumulate ? 1.0f : 0.0f;

#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (threads > 1)
  for (int64_t t = 0; t < n_items; ++t) {
    const Item& it = items[(size_t)t];
    const int64_t r0 = offsets[it.g], rows = offsets[it.g + 1] - r0;
    if (dB && it.n0 == 0) column_sums(dB[it.g], dY + r0 * N, N, rows, it.m0, it.m1, accumulate);
    if (it.n1 <= it.n0) continue;
    if (rows == 0) {  // not accumulating (else no item): a sum over no rows
      zero_tile(dW[it.g], Kd, it.m0, it.m1, it.n0, it.n1);
      continue;
    }
    // C_g [N, Kd] = op(A) [N, rows] op(B) [rows, Kd], op(A) = dY_g^T, B = X_g (gathered or not).
    Operands p{dY + r0 * N, gather.index ? X : X + r0 * Kd, dW[it.g], N, Kd, Kd, N, Kd, rows, true, false, 1.0f,
               beta};
    if (gather.index) p.b_rows = gather.index + r0, p.b_div = gather.div;
    gemm_detail::gemm_tile(p, it.m0, it.m1, it.n0, it.n1);
  }
}

}  // namespace cm::cpu
