// MoE dispatch ops (autograd/ops_moe.h): each forward calls its kernels once and records its backward beside it.
#include "autograd/ops_moe.h"

#include <algorithm>
#include <cstring>

#include "engine/dispatch.h"
#include "engine/host_sync.h"
#include "kernels/capacity.h"
#include "kernels/dispatch.h"
#include "kernels/elementwise.h"
#include "kernels/gemm.h"
#include "kernels/grouped_gemm.h"
#include "kernels/health.h"
#include "kernels/pointers.h"

namespace cm {

namespace {

// Data of t as a contiguous tensor, without recording a clone in the graph (the op records itself on t).
Tensor dense(const Tensor& t) {
  NoGrad g;
  return t.contiguous();
}

void require(const char* op, const char* what, const Tensor& t, DType dt, int64_t rank) {
  CM_REQUIRE(t.defined(), op, ": ", what, " is undefined");
  CM_REQUIRE(t.dtype() == dt && t.dim() == rank, op, ": ", what, " must be ", dtype_name(dt), " of rank ", rank,
             ", got ", dtype_name(t.dtype()), " ", shape_str(t.shape()));
}

}  // namespace

// ---------------------------------------------------------------- plan and capacity

// The checked, contiguous ids [A] and a plan of their sizes with row_of [A] allocated (both makers below).
static DispatchPlan plan_shell(const Tensor& expert_in, int64_t K, int64_t N, Tensor& expert) {
  require("make_dispatch_plan", "expert", expert_in, DType::I32, 1);
  CM_REQUIRE(K >= 1 && N >= 1 && expert_in.numel() % K == 0, "make_dispatch_plan: ", expert_in.numel(),
             " slots for K = ", K, ", N = ", N);
  expert = dense(expert_in);
  DispatchPlan p;
  p.T = expert.numel() / K;
  p.K = K;
  p.N = N;
  p.row_of = Tensor::empty({expert.numel()}, DType::I32, expert.device());
  return p;
}

DispatchPlan make_dispatch_plan(const Tensor& expert_in, int64_t K, int64_t N, const std::vector<int32_t>* host_ids) {
  Tensor expert;
  DispatchPlan p = plan_shell(expert_in, K, N, expert);
  const Device dev = expert.device();
  const int64_t A = expert.numel();
  Tensor assign_of = Tensor::empty({A}, DType::I32, dev);  // A' <= A rows, known once the offsets are
  p.offsets.resize((size_t)(N + 1));
  if (host_ids) {
    // The host already holds the ids: count them here (the histogram and scan of dispatch_plan, on integers: the
    // same offsets), upload the offsets (no wait), scatter on the device. Nothing is read back.
    CM_CHECK((int64_t)host_ids->size() == A, "make_dispatch_plan: ", host_ids->size(), " host ids for ", A, " slots");
    std::vector<int64_t> counts((size_t)N, 0);
    int64_t bad = 0;
    for (int32_t e : *host_ids) {
      if (e >= 0 && e < N) ++counts[e];
      else bad += e != -1;
    }
    CM_CHECK(bad == 0, "make_dispatch_plan: ", bad, " expert ids outside [-1, ", N, ")");
    cpu::dispatch_offsets(p.offsets.data(), counts.data(), N);
    std::vector<int32_t> words((size_t)(2 * (N + 1)));  // the int64 offsets as i32 words (tensors are f32/i32)
    std::memcpy(words.data(), p.offsets.data(), (size_t)(N + 1) * sizeof(int64_t));
    p.offsets_dev = Tensor::from_vector(words, {2 * (N + 1)}, dev);
    CM_KERNEL(dev, dispatch_scatter, p.row_of.i32(), assign_of.i32(), expert.i32(), p.offsets_ptr(), A, N);
  } else {
    Tensor counts = Tensor::empty({2 * N}, DType::I32, dev);  // int64 [N] in i32 storage
    p.offsets_dev = Tensor::empty({2 * (N + 1)}, DType::I32, dev);
    int64_t* off = (int64_t*)p.offsets_dev.raw();
    const int64_t bad = CM_KERNEL(dev, dispatch_plan, (int64_t*)counts.raw(), off, p.row_of.i32(), assign_of.i32(),
                                  expert.i32(), A, N);
    CM_CHECK(bad == 0, "make_dispatch_plan: ", bad, " expert ids outside [-1, ", N, ")");
    if (dev == Device::CPU) {
      // A device build waits twice here (engine/host_sync.h counts both on the CPU too): for the kernels'
      // out-of-range count, and for the offsets, which size the experts' GEMMs and the guard's loop.
      note_host_read();
      note_host_read();
      std::memcpy(p.offsets.data(), off, (size_t)(N + 1) * sizeof(int64_t));
    } else {
      const Tensor h = p.offsets_dev.to(Device::CPU);
      std::memcpy(p.offsets.data(), h.raw(), (size_t)(N + 1) * sizeof(int64_t));
    }
  }
  p.rows = p.offsets[N];
  p.assign_of = assign_of.slice(0, 0, p.rows);  // a prefix: still contiguous
  return p;
}

DispatchPlan make_dispatch_plan_nowait(const Tensor& expert_in, int64_t K, int64_t N) {
  Tensor expert;
  DispatchPlan p = plan_shell(expert_in, K, N, expert);
  const Device dev = expert.device();
  const int64_t A = expert.numel();
  p.rows = A;  // dropless: every slot has a row
  p.assign_of = Tensor::empty({A}, DType::I32, dev);
  p.offsets_dev = Tensor::empty({2 * (N + 1)}, DType::I32, dev);
  Tensor counts = Tensor::empty({2 * N}, DType::I32, dev);  // int64 [N] in i32 storage
  CM_KERNEL(dev, dispatch_plan_nowait, (int64_t*)counts.raw(), (int64_t*)p.offsets_dev.raw(), p.row_of.i32(),
            p.assign_of.i32(), expert.i32(), A, N);
  return p;
}

Tensor capacity_filter(const Tensor& expert_in, const Tensor& gate_in, const DispatchPlan& plan, int64_t cap) {
  require("capacity_filter", "expert", expert_in, DType::I32, 1);
  require("capacity_filter", "gate", gate_in, DType::F32, 1);
  const int64_t A = expert_in.numel();
  CM_REQUIRE(gate_in.numel() == A && plan.T * plan.K == A, "capacity_filter: expert ", A, ", gate ",
             gate_in.numel(), " and a plan of ", plan.T * plan.K, " slots differ");
  common_device("capacity_filter", {&expert_in, &gate_in, &plan.row_of});
  const Tensor expert = dense(expert_in), gate = dense(gate_in.detach());
  Tensor out = Tensor::empty({A}, DType::I32, expert.device());
  CM_KERNEL(expert.device(), capacity_filter, out.i32(), expert.i32(), gate.f32(), plan.assign_of.i32(),
            plan.offsets_ptr(), A, plan.N, cap);
  return out;
}

// ---------------------------------------------------------------- permute and combine

Tensor moe_permute(const Tensor& x_in, const DispatchPlan& plan) {
  require("moe_permute", "x", x_in, DType::F32, 2);
  CM_REQUIRE(x_in.size(0) == plan.T, "moe_permute: x ", shape_str(x_in.shape()), " for a plan of ", plan.T,
             " tokens");
  common_device("moe_permute", {&x_in, &plan.row_of});
  const Tensor x = dense(x_in);
  const int64_t T = plan.T, K = plan.K, C = x.size(1), Ap = plan.rows;
  Tensor xe = Tensor::empty({Ap, C}, DType::F32, x.device());
  CM_KERNEL(x.device(), dispatch_permute, xe.f32(), x.f32(), plan.assign_of.i32(), Ap, K, C);
  return record("moe_permute", xe, {x_in}, [row_of = plan.row_of, T, K, C](const Tensor& g_in) {
    const Tensor g = g_in.contiguous();  // [A', C]
    Tensor dx = Tensor::empty({T, C}, DType::F32, g.device());
    CM_KERNEL(g.device(), dispatch_permute_backward, dx.f32(), g.f32(), row_of.i32(), T, K, C);
    return grads{dx};
  });
}

Tensor moe_combine(const Tensor& ye_in, const Tensor& gate_in, const DispatchPlan& plan) {
  require("moe_combine", "ye", ye_in, DType::F32, 2);
  require("moe_combine", "gate", gate_in, DType::F32, 1);
  const int64_t T = plan.T, K = plan.K, C = ye_in.size(1), Ap = plan.rows;
  CM_REQUIRE(ye_in.size(0) == Ap && gate_in.numel() == T * K, "moe_combine: ye ", shape_str(ye_in.shape()),
             " and gate ", shape_str(gate_in.shape()), " for a plan of ", Ap, " rows, ", T, " x ", K, " slots");
  common_device("moe_combine", {&ye_in, &gate_in, &plan.row_of, &plan.assign_of});
  const Tensor ye = dense(ye_in), gate = dense(gate_in);
  Tensor out = Tensor::empty({T, C}, DType::F32, ye.device());
  CM_KERNEL(ye.device(), dispatch_combine, out.f32(), ye.f32(), gate.f32(), plan.row_of.i32(), T, K, C);
  const bool need_ye = ye_in.requires_grad(), need_gate = gate_in.requires_grad();
  return record("moe_combine", out, {ye_in, gate_in},
                [ye = ye.detach(), gate = gate.detach(), row_of = plan.row_of, assign_of = plan.assign_of, T, K, C,
                 Ap, need_ye, need_gate](const Tensor& g_in) {
                  const Tensor g = g_in.contiguous();  // [T, C]
                  Tensor d_ye, d_gate;
                  if (need_ye) d_ye = Tensor::empty({Ap, C}, DType::F32, g.device());
                  if (need_gate) d_gate = Tensor::empty({T * K}, DType::F32, g.device());
                  // Overwrites both: each kept slot's row of d_ye (all of them but a nowait plan's unfilled rows,
                  // which nothing reads); a dropped slot's d_gate is 0.
                  CM_KERNEL(g.device(), dispatch_combine_backward, need_ye ? d_ye.f32() : nullptr,
                            need_gate ? d_gate.f32() : nullptr, g.f32(), ye.f32(), gate.f32(), row_of.i32(),
                            assign_of.i32(), T, Ap, K, C);
                  return grads{d_ye, d_gate};
                });
}

// ---------------------------------------------------------------- grouped linear

// The pointer lists of one call site (autograd/ops_moe.h): the weights' and the biases' device addresses, as the
// CUDA kernels read them (in device memory). Parameters keep their storage from step to step, so each list is
// uploaded once (cuda::DevicePointers: again only when it changes). The CPU kernels read host arrays: nothing here.
struct GroupedLinearCache {
#if CM_CUDA
  cuda::DevicePointers w, b;
#endif
};

std::shared_ptr<GroupedLinearCache> make_grouped_linear_cache() { return std::make_shared<GroupedLinearCache>(); }

namespace {

// The grouped GEMM calls of kernels/grouped_gemm.h on the tensors' backend, with the lists where the kernels read
// them: host arrays on the CPU; on CUDA the cache's device copies of the weight and bias lists, and the device
// offsets (the plan's). Nothing is uploaded per call once the cache holds the lists, and nothing waits.
struct GroupedGemm {
  Device dev;
  const int64_t* off_host;  // [G+1]
  const int64_t* off_dev;   // [G+1] on dev (CUDA only)
  int64_t G;
  GroupedLinearCache* lists;
  const float* const* weights(const std::vector<const float*>& w) const {
#if CM_CUDA
    if (dev == Device::CUDA) return lists->w.get(w);
#endif
    return w.data();
  }
  const float* const* biases(const std::vector<const float*>& b) const {
#if CM_CUDA
    if (dev == Device::CUDA) return lists->b.get(b);
#endif
    return b.data();
  }
  void forward(float* Y, const float* X, const std::vector<const float*>& W, const std::vector<const float*>* B,
               int64_t M, int64_t N, int64_t Kd) const {
    CM_KERNEL(dev, grouped_gemm_forward, Y, X, weights(W), dev == Device::CPU ? off_host : off_dev, G, M, N, Kd,
              B ? biases(*B) : nullptr, false);
  }
  void backward_input(float* dX, const float* dY, const std::vector<const float*>& W, int64_t M, int64_t N,
                      int64_t Kd) const {
    CM_KERNEL(dev, grouped_gemm_backward_input, dX, dY, weights(W), dev == Device::CPU ? off_host : off_dev, G, M, N,
              Kd, false);
  }
  // dW, dB: tables of G pointers in dev's memory (pointer_table).
  void backward_weight(float* const* dW, float* const* dB, const float* dY, const float* X, int64_t M, int64_t N,
                       int64_t Kd) const {
    CM_KERNEL(dev, grouped_gemm_backward_weight, dW, dB, dY, X, dev == Device::CPU ? off_host : off_dev, G, M, N, Kd,
              false);
  }
};

// The offsets as the kernels read them on dev: int64 [G+1] (in i32 words). Given by the plan, or uploaded here.
Tensor device_offsets(const std::vector<int64_t>& offsets, const Tensor& given, Device dev) {
  if (given.defined()) {
    CM_CHECK(given.device() == dev && (offsets.empty() || given.numel() == 2 * (int64_t)offsets.size()),
             "grouped_linear: device offsets ",
             shape_str(given.shape()), " for ", offsets.size(), " offsets");
    return given;
  }
  std::vector<int32_t> words(2 * offsets.size());
  std::memcpy(words.data(), offsets.data(), offsets.size() * sizeof(int64_t));
  return Tensor::from_vector(words, {(int64_t)words.size()}, dev);
}

// G gradient blocks of one shape, consecutive in one buffer on dev, and the table of their addresses in dev's memory,
// made there (kernels/pointers.h): a buffer allocated anew at every backward costs no upload. views[e] is block e.
// The buffer is partitioned (engine/tensor.h): once `all` is gone with the GradBlocks, each expert's weight takes its
// block as its gradient, where a shared buffer was copied out expert by expert (every expert weight's gradient,
// copied at every backward).
struct GradBlocks {
  Tensor all, table;  // f32 [G * numel(shape)]; G pointers (8 bytes each, in i32 storage)
  std::vector<Tensor> views;
  GradBlocks(int64_t G, const Shape& shape, Device dev) {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    all = Tensor::empty({G * n}, DType::F32, dev);
    table = Tensor::empty({2 * G}, DType::I32, dev);
    CM_KERNEL(dev, pointer_table, (float**)table.raw(), all.f32(), n, G);
    for (int64_t e = 0; e < G; ++e) views.push_back(all.slice(0, e * n, (e + 1) * n).view(shape));
    all.impl().storage->partitioned = true;
  }
  float* const* ptrs() const { return (float* const*)table.raw(); }
};

}  // namespace

// The one place that turns "every expert's Linear on its rows" into kernel calls: the grouped GEMM
// (kernels/grouped_gemm.h), one call per product on either backend, bit-identical on the CPU to linear() on each
// expert's rows.
Tensor grouped_linear(const Tensor& x_in, const std::vector<Tensor>& w_in, const std::vector<Tensor>& b_in,
                      const std::vector<int64_t>& offsets, const Tensor& ok, const Tensor& offsets_dev,
                      const std::shared_ptr<GroupedLinearCache>& cache) {
  const int64_t G = (int64_t)w_in.size();
  require("grouped_linear", "x", x_in, DType::F32, 2);
  // Host offsets, or none: then the device offsets alone place the rows (the host does not wait for them).
  const bool host_offsets = !offsets.empty();
  CM_REQUIRE(G >= 1 && (host_offsets ? (int64_t)offsets.size() == G + 1 && offsets[0] == 0 &&
                                           offsets[G] == x_in.size(0)
                                     : offsets_dev.defined() && offsets_dev.numel() == 2 * (G + 1)),
             "grouped_linear: ", G, " weights, ", host_offsets ? offsets.size() : offsets_dev.numel() / 2,
             " offsets, for x ", shape_str(x_in.shape()));
  CM_REQUIRE(!ok.defined() || (ok.dtype() == DType::I32 && ok.numel() == G && ok.device() == x_in.device() &&
                                ok.is_contiguous()),
             "grouped_linear: ok flags ", ok.defined() ? shape_str(ok.shape()) : "", " for ", G, " experts");
  const bool has_b = !b_in.empty() && b_in[0].defined();
  CM_REQUIRE(!has_b || (int64_t)b_in.size() == G, "grouped_linear: ", b_in.size(), " biases for ", G, " weights");
  const int64_t in = x_in.size(1), out = w_in[0].size(0);
  for (int64_t e = 0; e < G; ++e) {
    require("grouped_linear", "w", w_in[e], DType::F32, 2);
    CM_REQUIRE(w_in[e].size(0) == out && w_in[e].size(1) == in, "grouped_linear: w[", e, "] ",
               shape_str(w_in[e].shape()), " for x ", shape_str(x_in.shape()), " and ", out, " outputs");
    CM_REQUIRE(!host_offsets || offsets[e] <= offsets[e + 1], "grouped_linear: offsets decrease at expert ", e);
    common_device("grouped_linear", {&x_in, &w_in[e]});
    if (has_b) {
      require("grouped_linear", "b", b_in[e], DType::F32, 1);
      CM_REQUIRE(b_in[e].size(0) == out, "grouped_linear: b[", e, "] ", shape_str(b_in[e].shape()), " for ", out,
                 " outputs");
      common_device("grouped_linear", {&x_in, &b_in[e]});
    }
  }
  const Device dev = x_in.device();
  const Tensor x = dense(x_in);
  std::vector<Tensor> w, b;  // contiguous, detached: kept alive by the backward closure
  std::vector<const float*> wp((size_t)G), bp((size_t)G);
  for (int64_t e = 0; e < G; ++e) {
    w.push_back(dense(w_in[e]).detach());
    wp[e] = w[e].f32();
    if (has_b) {
      b.push_back(dense(b_in[e]).detach());
      bp[e] = b[e].f32();
    }
  }
  const Tensor off_dev = host_offsets && dev == Device::CPU ? Tensor() : device_offsets(offsets, offsets_dev, dev);
  // What the kernels read on dev: the host array on the CPU when there is one, else the device offsets (on the CPU
  // a CPU tensor, host memory).
  const int64_t* off_k = host_offsets && dev == Device::CPU ? offsets.data() : (const int64_t*)off_dev.raw();
  // Without a caller's cache, this call's own (its lists are uploaded; the backward reuses them).
  const std::shared_ptr<GroupedLinearCache> lists = cache ? cache : make_grouped_linear_cache();
  const int64_t R = x.size(0);
  Tensor y = Tensor::empty({R, out}, DType::F32, dev);
  const GroupedGemm gg{dev, off_k, off_dev.defined() ? (const int64_t*)off_dev.raw() : nullptr, G,
                       lists.get()};
  gg.forward(y.f32(), x.f32(), wp, has_b ? &bp : nullptr, R, out, in);

  std::vector<Tensor> inputs = {x_in};
  inputs.insert(inputs.end(), w_in.begin(), w_in.end());
  if (has_b) inputs.insert(inputs.end(), b_in.begin(), b_in.end());
  std::vector<char> need((size_t)inputs.size());
  for (size_t i = 0; i < inputs.size(); ++i) need[i] = inputs[i].requires_grad();
  return record("grouped_linear", y, inputs,
                [x = x.detach(), w, wp, offsets, off_dev, lists, ok, has_b, need, G, in, out,
                 host_offsets](const Tensor& g_in) {
                  const Tensor g = g_in.contiguous();  // [A', out]
                  const Device dev = g.device();
                  const int64_t R = x.size(0);
                  const int64_t* off_k =
                      host_offsets && dev == Device::CPU ? offsets.data() : (const int64_t*)off_dev.raw();
                  const GroupedGemm gg{dev, off_k,
                                       off_dev.defined() ? (const int64_t*)off_dev.raw() : nullptr, G, lists.get()};
                  grads gs(1 + (size_t)G * (has_b ? 2 : 1));
                  // A cut expert's rows and weight blocks are zeroed where the verdict lives (its NaN weights give
                  // NaN products): kernels/health.h expert_rows_zero.
                  if (need[0]) {  // dx [A', in] = g w per expert
                    gs[0] = Tensor::empty({R, in}, DType::F32, dev);
                    gg.backward_input(gs[0].f32(), g.f32(), wp, R, out, in);
                    if (ok.defined()) CM_KERNEL(dev, expert_rows_zero, gs[0].f32(), ok.i32(), off_k, G, in);
                  }
                  // dw[e] [out, in] = g^T x over its rows, db[e] = column sums of g (every expert at once; an empty
                  // expert's are dropped when the host knows it: no gradient, as if it had not run; else zeros)
                  const GradBlocks dw(G, {out, in}, dev);
                  const GradBlocks db(has_b ? G : 0, {out}, dev);
                  gg.backward_weight(dw.ptrs(), has_b ? db.ptrs() : nullptr, g.f32(), x.f32(), R, out, in);
                  if (ok.defined()) {
                    CM_KERNEL(dev, expert_rows_zero, dw.all.f32(), ok.i32(), nullptr, G, out * in);
                    if (has_b) CM_KERNEL(dev, expert_rows_zero, db.all.f32(), ok.i32(), nullptr, G, out);
                  }
                  for (int64_t e = 0; e < G; ++e) {
                    if (host_offsets && offsets[e + 1] == offsets[e]) continue;
                    if (need[1 + e]) gs[1 + e] = dw.views[e];
                    if (has_b && need[1 + G + e]) gs[1 + G + e] = db.views[e];
                  }
                  return gs;
                });
}

}  // namespace cm
