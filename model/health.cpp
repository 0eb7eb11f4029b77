// The experts' fault guard and health state on the layer's device (model/health.h, kernels/health.h).
#include "model/health.h"

#include <cstring>

#include "autograd/graph.h"
#include "engine/dispatch.h"
#include "kernels/health.h"
#include "model/optim.h"

namespace cm {

namespace {
double* as_f64(const Tensor& t) { return static_cast<double*>(t.raw()); }  // an f32 [2k] tensor holding k doubles
const int64_t* as_i64(const Tensor& t) { return static_cast<const int64_t*>(t.raw()); }

// The layer's host buffers, field-major [4, N]: its own host memory, so reading them is no read-out
// (engine/host_sync.h).
std::vector<float> host_values(const HealthBuffers& h) {
  const int64_t N = h.reliability.numel();
  std::vector<float> v((size_t)(4 * N));
  const Tensor* f[4] = {&h.reliability, &h.norm_ema, &h.wnorm_ema, &h.usage_ema};
  for (int k = 0; k < 4; ++k) std::memcpy(v.data() + k * N, f[k]->f32(), (size_t)N * sizeof(float));
  return v;
}
bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}
}  // namespace

void ExpertHealth::ensure(Device dev, const HealthBuffers& host) {
  if (state_.defined() && state_.device() != dev) {  // the model moved: the old copy's news first
    pull(host);
    state_ = pend_ = meta_ = Tensor();
  }
  const std::vector<float> v = host_values(host);
  if (state_.defined() && same_bits(v, seen_)) return;
  const int64_t N = host.reliability.numel();
  const Tensor up = Tensor::from_vector(v, {4, N});
  if (!state_.defined()) {
    state_ = up.to(dev);  // an upload from the staging ring: no wait
    pend_ = Tensor::zeros({10 * N}, DType::F32, dev);  // all-zero bits: doubles 0.0
  } else {
    state_.copy_(up);  // written on the host since: into the same device memory
  }
  seen_ = v;
}

const Tensor& ExpertHealth::state(Device dev, const HealthBuffers& host) {
  ensure(dev, host);
  return state_;
}

void ExpertHealth::begin(Device dev) { ok_ = Tensor::empty({1}, DType::I32, dev); }

Tensor ExpertHealth::gate(const Tensor& t) const {
  CM_CHECK(ok_.defined(), "expert health: gate() before begin()");
  return record("ffn_gate", t.detach(), {t}, [ok = ok_, shape = t.shape()](const Tensor& gy) {
    Tensor g = gy.contiguous();
    Tensor dx = Tensor::empty(shape, DType::F32, g.device());
    CM_KERNEL(g.device(), expert_gate_backward, dx.f32(), g.f32(), ok.i32(), g.numel());
    return grads{dx};
  });
}

Tensor ExpertHealth::guard(const Tensor& y, bool training, bool zero_bad, float factor, const HealthBuffers& host,
                           Tensor* counts) {
  if (!training && !zero_bad) return y;
  CM_CHECK(y.dim() == 2 && y.dtype() == DType::F32, "ffn guard: y must be f32 [n, C]");
  CM_CHECK(host.reliability.numel() == 1, "ffn guard: a dense FFN is one expert");
  const Device dev = y.device();
  ensure(dev, host);
  const int64_t n = y.size(0), C = y.size(1);
  const Tensor yc = y.detach().contiguous();
  if (!zero_bad || !ok_.defined() || ok_.device() != dev) begin(dev);
  Tensor ok = ok_;
  ok_ = Tensor();  // one forward's flag: the next forward begins its own
  Tensor norms = Tensor::empty({2 * std::max<int64_t>(n, 1)}, DType::F32, dev);  // double [n] scratch
  Tensor out = zero_bad ? Tensor::empty({n, C}, DType::F32, dev) : Tensor();
  Tensor cnt = Tensor::empty({2}, DType::I32, dev);
  {
    NoGrad ng;
    CM_KERNEL(dev, expert_guard_forward, zero_bad ? out.f32() : nullptr, ok.i32(), cnt.i32(), as_f64(pend_),
              as_f64(norms), yc.f32(), nullptr, 1, n, C, state_.f32(), factor, zero_bad, training, true);
  }
  if (counts) *counts = cnt;
  if (!zero_bad) return y;
  // The whole output leaves the graph when any row was bad, decided where the flag lives.
  return record("ffn_guard", out, {y}, [ok, shape = y.shape()](const Tensor& gy) {
    Tensor g = gy.contiguous();
    Tensor dx = Tensor::empty(shape, DType::F32, g.device());
    CM_KERNEL(g.device(), expert_gate_backward, dx.f32(), g.f32(), ok.i32(), g.numel());
    return grads{dx};
  });
}

Tensor ExpertHealth::guard_experts(const Tensor& ys, const Tensor& offsets_dev, const Tensor& ok, bool training,
                                   bool zero_bad, float factor, const HealthBuffers& host) {
  const int64_t N = host.reliability.numel(), S = ys.size(0), C = ys.size(1);
  const Device dev = ys.device();
  CM_CHECK(ys.dim() == 2 && ys.dtype() == DType::F32 && ys.is_contiguous(), "expert guard: ys must be contiguous f32");
  CM_CHECK(offsets_dev.device() == dev && offsets_dev.numel() == 2 * (N + 1), "expert guard: offsets for ", N,
           " experts");
  CM_CHECK(!ok.defined() || (ok.device() == dev && ok.numel() == N), "expert guard: ok flags for ", N, " experts");
  ensure(dev, host);
  const Tensor flags = ok.defined() ? ok : Tensor::empty({N}, DType::I32, dev);
  Tensor norms = Tensor::empty({2 * std::max<int64_t>(S, 1)}, DType::F32, dev);  // double [S] scratch
  Tensor counts = Tensor::empty({2}, DType::I32, dev);
  float* y = zero_bad ? ys.f32() : nullptr;  // in place: only the bad rows are written
  CM_KERNEL(dev, expert_guard_forward, y, flags.i32(), counts.i32(), as_f64(pend_), as_f64(norms), ys.f32(),
            as_i64(offsets_dev), N, S, C, state_.f32(), factor, zero_bad, training, false);
  return counts;
}

void ExpertHealth::add_traffic(const Tensor& counts, const HealthBuffers& host) {
  const int64_t N = host.reliability.numel();
  CM_CHECK(counts.dtype() == DType::I32 && counts.numel() == N && counts.is_contiguous(), "expert health: traffic ",
           shape_str(counts.shape()), " for ", N, " experts");
  ensure(counts.device(), host);
  CM_KERNEL(counts.device(), expert_traffic_add, as_f64(pend_), counts.i32(), N);
}

void ExpertHealth::after_step(const std::vector<Tensor>& ts, const std::vector<int64_t>& meta, const Tensor& pruned,
                              float decay, float factor, float rel_min, bool use_reliability,
                              const HealthBuffers& host) {
  if (ts.empty()) return;
  NoGrad ng;
  const Device dev = ts[0].device();  // where the weights are: the state follows them
  ensure(dev, host);
  const int64_t N = state_.size(1);
  CM_CHECK((int64_t)meta.size() == 2 * N, "expert health: meta for ", meta.size() / 2, " of ", N, " experts");
  for (const Tensor& t : ts)
    CM_CHECK(t.device() == dev, "expert health: a weight or gradient on ", device_name(t.device()), ", the state on ",
             device_name(dev));
  // The meta lives on the device, uploaded again only when it changes (pruning, gradients appearing).
  if (!meta_.defined() || meta != meta_seen_) {
    std::vector<int32_t> words(meta.size() * 2);
    std::memcpy(words.data(), meta.data(), meta.size() * sizeof(int64_t));
    meta_ = Tensor::from_vector(words, {(int64_t)words.size()}, dev);  // an upload: no wait
    meta_seen_ = meta;
  }
  const Tensor sums = sums_of_squares_tensor(ts);  // on dev, no read-out
  CM_CHECK(!pruned.defined() || (pruned.numel() == N && pruned.device() == dev), "expert health: pruned flags ",
           shape_str(pruned.shape()), " for ", N, " experts on ", device_name(dev));
  CM_KERNEL(dev, expert_health_update, state_.f32(), as_f64(pend_), sums.f32(), as_i64(meta_),
            pruned.defined() ? pruned.f32() : nullptr, N, decay, factor, rel_min, use_reliability);
}

void ExpertHealth::pull(const HealthBuffers& host) const {
  if (!state_.defined()) return;
  // The host was written since: that wins (the next forward uploads it).
  if (!same_bits(host_values(host), seen_)) return;
  const std::vector<float> d = state_.to_f32_vector();  // one read-out
  const int64_t N = host.reliability.numel();
  const Tensor* f[4] = {&host.reliability, &host.norm_ema, &host.wnorm_ema, &host.usage_ema};
  for (int k = 0; k < 4; ++k) std::memcpy(f[k]->f32(), d.data() + k * N, (size_t)N * sizeof(float));
  seen_ = d;
}

}  // namespace cm
