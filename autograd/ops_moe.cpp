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

DispatchPlan make_dispatch_plan(const Tensor& expert_in, int64_t K, int64_t N, const std::vector<int32_t>* host_ids) {
  require("make_dispatch_plan", "expert", expert_in, DType::I32, 1);
  CM_REQUIRE(K >= 1 && N >= 1 && expert_in.numel() % K == 0, "make_dispatch_plan: ", expert_in.numel(),
             " slots for K = ", K, ", N = ", N);
  const Tensor expert = dense(expert_in);
  const Device dev = expert.device();
  const int64_t A = expert.numel();
  DispatchPlan p;
  p.T = A / K;
  p.K = K;
  p.N = N;
  p.row_of = Tensor::empty({A}, DType::I32, dev);
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
  common_device("moe_combine", {&ye_in, &gate_in, &plan.row_of});
  const Tensor ye = dense(ye_in), gate = dense(gate_in);
  Tensor out = Tensor::empty({T, C}, DType::F32, ye.device());
  CM_KERNEL(ye.device(), dispatch_combine, out.f32(), ye.f32(), gate.f32(), plan.row_of.i32(), T, K, C);
  const bool need_ye = ye_in.requires_grad(), need_gate = gate_in.requires_grad();
  return record("moe_combine", out, {ye_in, gate_in},
                [ye = ye.detach(), gate = gate.detach(), row_of = plan.row_of, T, K, C, Ap, need_ye,
                 need_gate](const Tensor& g_in) {
                  const Tensor g = g_in.contiguous();  // [T, C]
                  Tensor d_ye, d_gate;
                  if (need_ye) d_ye = Tensor::empty({Ap, C}, DType::F32, g.device());
                  if (need_gate) d_gate = Tensor::empty({T * K}, DType::F32, g.device());
                  // Overwrites both: every row of d_ye is some kept slot's; a dropped slot's d_gate is 0.
                  CM_KERNEL(g.device(), dispatch_combine_backward, need_ye ? d_ye.f32() : nullptr,
                            need_gate ? d_gate.f32() : nullptr, g.f32(), ye.f32(), gate.f32(), row_of.i32(), T, K,
                            C);
                  return grads{d_ye, d_gate};
                });
}

// ---------------------------------------------------------------- grouped linear

// The one place that turns "every expert's Linear on its rows" into kernel calls. CPU: the grouped GEMM
// (kernels/grouped_gemm.h), one call per product, bit-identical to linear() on each expert's rows. CUDA: one GEMM
// per non-empty expert with linear()'s arguments, until the grouped kernel's CUDA twin replaces the loops.
Tensor grouped_linear(const Tensor& x_in, const std::vector<Tensor>& w_in, const std::vector<Tensor>& b_in,
                      const std::vector<int64_t>& offsets, const ExpertCut& cut) {
  const int64_t G = (int64_t)w_in.size();
  require("grouped_linear", "x", x_in, DType::F32, 2);
  CM_REQUIRE(G >= 1 && (int64_t)offsets.size() == G + 1 && offsets[0] == 0 && offsets[G] == x_in.size(0),
             "grouped_linear: ", G, " weights, ", offsets.size(), " offsets, for x ", shape_str(x_in.shape()));
  CM_REQUIRE(!cut || (int64_t)cut->size() == G, "grouped_linear: cut flags for ", cut ? cut->size() : 0, " of ", G,
             " experts");
  const bool has_b = !b_in.empty() && b_in[0].defined();
  CM_REQUIRE(!has_b || (int64_t)b_in.size() == G, "grouped_linear: ", b_in.size(), " biases for ", G, " weights");
  const int64_t in = x_in.size(1), out = w_in[0].size(0);
  for (int64_t e = 0; e < G; ++e) {
    require("grouped_linear", "w", w_in[e], DType::F32, 2);
    CM_REQUIRE(w_in[e].size(0) == out && w_in[e].size(1) == in, "grouped_linear: w[", e, "] ",
               shape_str(w_in[e].shape()), " for x ", shape_str(x_in.shape()), " and ", out, " outputs");
    CM_REQUIRE(offsets[e] <= offsets[e + 1], "grouped_linear: offsets decrease at expert ", e);
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
  std::vector<Tensor> w, b;
  for (int64_t e = 0; e < G; ++e) {
    w.push_back(dense(w_in[e]).detach());
    if (has_b) b.push_back(dense(b_in[e]).detach());
  }
  const int64_t R = x.size(0);
  Tensor y = Tensor::empty({R, out}, DType::F32, dev);
  std::vector<const float*> wp((size_t)G), bp((size_t)G);
  for (int64_t e = 0; e < G; ++e) {
    wp[e] = w[e].f32();
    if (has_b) bp[e] = b[e].f32();
  }
  if (dev == Device::CPU) {  // one call, one parallel region over every expert's tiles
    cpu::grouped_gemm_forward(y.f32(), x.f32(), wp.data(), offsets.data(), G, R, out, in,
                              has_b ? bp.data() : nullptr, false);
  } else  // CUDA: one cuBLAS product per non-empty expert (cuda::grouped_gemm_* replaces this loop)
  for (int64_t e = 0; e < G; ++e) {
    const int64_t r0 = offsets[e], n = offsets[e + 1] - r0;
    if (n == 0 || out == 0) continue;
    float* ye = y.f32() + r0 * out;
    if (has_b) {  // rows start as b, the product accumulates onto them (as linear() does)
      const int64_t shape[2] = {n, out}, strides[2] = {0, 1};
      CM_KERNEL(dev, broadcast_to, ye, b[e].f32(), 2, shape, strides);
    }
    CM_KERNEL(dev, gemm, ye, out, x.f32() + r0 * in, in, w[e].f32(), in, n, out, in, false, true, 1.0f,
              has_b ? 1.0f : 0.0f);
  }

  std::vector<Tensor> inputs = {x_in};
  inputs.insert(inputs.end(), w_in.begin(), w_in.end());
  if (has_b) inputs.insert(inputs.end(), b_in.begin(), b_in.end());
  std::vector<char> need((size_t)inputs.size());
  for (size_t i = 0; i < inputs.size(); ++i) need[i] = inputs[i].requires_grad();
  return record("grouped_linear", y, inputs,
                [x = x.detach(), w, offsets, cut, has_b, need, G, in, out](const Tensor& g_in) {
                  const Tensor g = g_in.contiguous();  // [A', out]
                  const Device dev = g.device();
                  const int64_t R = x.size(0);
                  auto is_cut = [&](int64_t e) { return cut && (*cut)[e]; };
                  bool any_cut = false;
                  int64_t max_rows = 0;
                  for (int64_t e = 0; e < G; ++e) {
                    any_cut = any_cut || is_cut(e);
                    max_rows = std::max(max_rows, offsets[e + 1] - offsets[e]);
                  }
                  grads gs(1 + (size_t)G * (has_b ? 2 : 1));
                  Tensor ones;  // [max_rows]: the bias gradient is ones^T g, by the GEMM (as in linear())
                  if (has_b) ones = Tensor::ones({max_rows}, DType::F32, dev);
                  if (need[0])  // cut experts' rows stay 0
                    gs[0] = any_cut ? Tensor::zeros({R, in}, DType::F32, dev)
                                    : Tensor::empty({R, in}, DType::F32, dev);
                  if (dev == Device::CPU) {  // grouped: every expert at once, then drop what must not flow
                    std::vector<const float*> wp((size_t)G);
                    std::vector<float*> dwp((size_t)G), dbp((size_t)G);
                    std::vector<Tensor> dw((size_t)G), db((size_t)G);
                    for (int64_t e = 0; e < G; ++e) {
                      wp[e] = w[e].f32();
                      dw[e] = Tensor::empty({out, in}, DType::F32, dev);
                      dwp[e] = dw[e].f32();
                      if (has_b) {
                        db[e] = Tensor::empty({out}, DType::F32, dev);
                        dbp[e] = db[e].f32();
                      }
                    }
                    if (need[0]) {
                      float* dx = gs[0].f32();
                      cpu::grouped_gemm_backward_input(dx, g.f32(), wp.data(), offsets.data(), G, R, out, in, false);
                      for (int64_t e = 0; e < G; ++e)  // a cut expert's rows (NaN weights give NaN here) pass 0
                        if (is_cut(e)) std::fill(dx + offsets[e] * in, dx + offsets[e + 1] * in, 0.f);
                    }
                    cpu::grouped_gemm_backward_weight(dwp.data(), has_b ? dbp.data() : nullptr, g.f32(), x.f32(),
                                                      offsets.data(), G, R, out, in, false);
                    for (int64_t e = 0; e < G; ++e) {
                      if (offsets[e + 1] == offsets[e] || is_cut(e)) continue;  // no rows, or cut: no gradient
                      if (need[1 + e]) gs[1 + e] = dw[e];
                      if (has_b && need[1 + G + e]) gs[1 + G + e] = db[e];
                    }
                    return gs;
                  }
                  for (int64_t e = 0; e < G; ++e) {
                    const int64_t r0 = offsets[e], n = offsets[e + 1] - r0;
                    if (n == 0 || is_cut(e)) continue;  // no rows, or cut by the fault guard: no gradient
                    const float* ge = g.f32() + r0 * out;
                    if (need[0])  // dx [n, in] = g [n, out] w [out, in]
                      CM_KERNEL(dev, gemm, gs[0].f32() + r0 * in, in, ge, out, w[e].f32(), in, n, in, out, false,
                                false, 1.0f, 0.0f);
                    if (need[1 + e]) {  // dw [out, in] = g^T [out, n] x [n, in]
                      Tensor dw = Tensor::empty({out, in}, DType::F32, dev);
                      CM_KERNEL(dev, gemm, dw.f32(), in, ge, out, x.f32() + r0 * in, in, out, in, n, true, false,
                                1.0f, 0.0f);
                      gs[1 + e] = dw;
                    }
                    if (has_b && need[1 + G + e]) {  // db [1, out] = ones [1, n] g [n, out]
                      Tensor db = Tensor::empty({out}, DType::F32, dev);
                      CM_KERNEL(dev, gemm, db.f32(), out, ones.f32(), n, ge, out, 1, out, n, false, false, 1.0f, 0.0f);
                      gs[1 + G + e] = db;
                    }
                  }
                  return gs;
                });
}

}  // namespace cm
