// The dense FFN's fault guard and health state on the layer's device (model/health.h, kernels/health.h).
#include "model/health.h"

#include <cstring>

#include "autograd/graph.h"
#include "engine/dispatch.h"
#include "kernels/health.h"
#include "model/optim.h"

namespace cm {

namespace {
double* as_f64(const Tensor& t) { return static_cast<double*>(t.raw()); }  // an f32 [2k] tensor holding k doubles

// The layer's host buffers: its own host memory, so reading them is no read-out (engine/host_sync.h).
void host_values(const FfnHealthBuffers& h, float v[4]) {
  v[0] = h.reliability.f32()[0];
  v[1] = h.norm_ema.f32()[0];
  v[2] = h.wnorm_ema.f32()[0];
  v[3] = h.usage_ema.f32()[0];
}
bool same_bits(const float a[4], const float b[4]) { return std::memcmp(a, b, 4 * sizeof(float)) == 0; }
}  // namespace

void FfnHealth::ensure(Device dev, const FfnHealthBuffers& host) {
  if (state_.defined() && state_.device() != dev) {  // the model moved: the old copy's news first
    pull(host);
    state_ = pend_ = Tensor();
  }
  float v[4];
  host_values(host, v);
  if (state_.defined() && same_bits(v, seen_)) return;
  const Tensor up = Tensor::from_vector(std::vector<float>(v, v + 4), {4});
  if (!state_.defined()) {
    state_ = up.to(dev);  // an upload from the staging ring: no wait
    pend_ = Tensor::zeros({8}, DType::F32, dev);  // all-zero bits: four doubles 0.0
  } else {
    state_.copy_(up);  // written on the host since: into the same device memory
  }
  std::memcpy(seen_, v, sizeof seen_);
}

void FfnHealth::begin(Device dev) { ok_ = Tensor::empty({1}, DType::I32, dev); }

Tensor FfnHealth::gate(const Tensor& t) const {
  CM_CHECK(ok_.defined(), "ffn health: gate() before begin()");
  return record("ffn_gate", t.detach(), {t}, [ok = ok_, shape = t.shape()](const Tensor& gy) {
    Tensor g = gy.contiguous();
    Tensor dx = Tensor::empty(shape, DType::F32, g.device());
    CM_KERNEL(g.device(), ffn_guard_backward, dx.f32(), g.f32(), ok.i32(), g.numel());
    return grads{dx};
  });
}

Tensor FfnHealth::guard(const Tensor& y, bool training, bool zero_bad, float factor, const FfnHealthBuffers& host) {
  if (!training && !zero_bad) return y;
  CM_CHECK(y.dim() == 2 && y.dtype() == DType::F32, "ffn guard: y must be f32 [n, C]");
  const Device dev = y.device();
  ensure(dev, host);
  const int64_t n = y.size(0), C = y.size(1);
  const Tensor yc = y.detach().contiguous();
  if (!zero_bad || !ok_.defined() || ok_.device() != dev) begin(dev);
  Tensor ok = ok_;
  ok_ = Tensor();  // one forward's flag: the next forward begins its own
  Tensor norms = Tensor::empty({2 * std::max<int64_t>(n, 1)}, DType::F32, dev);  // double [n] scratch
  Tensor out = zero_bad ? Tensor::empty({n, C}, DType::F32, dev) : Tensor();
  {
    NoGrad ng;
    CM_KERNEL(dev, ffn_guard_forward, zero_bad ? out.f32() : nullptr, ok.i32(), as_f64(pend_), as_f64(norms),
              yc.f32(), n, C, state_.f32(), factor, zero_bad, training);
  }
  if (!zero_bad) return y;
  // The whole output leaves the graph when any row was bad, decided where the flag lives.
  return record("ffn_guard", out, {y}, [ok, shape = y.shape()](const Tensor& gy) {
    Tensor g = gy.contiguous();
    Tensor dx = Tensor::empty(shape, DType::F32, g.device());
    CM_KERNEL(g.device(), ffn_guard_backward, dx.f32(), g.f32(), ok.i32(), g.numel());
    return grads{dx};
  });
}

void FfnHealth::after_step(const std::vector<Tensor>& weights, const std::vector<Tensor>& grads_, float decay,
                           float factor, float rel_min, bool use_reliability) {
  if (!state_.defined() || weights.empty()) return;
  NoGrad ng;
  const Device dev = state_.device();
  std::vector<Tensor> ts = weights;
  if (use_reliability) ts.insert(ts.end(), grads_.begin(), grads_.end());
  for (const Tensor& t : ts)
    CM_CHECK(t.device() == dev, "ffn health: a weight or gradient on ", device_name(t.device()), ", the state on ",
             device_name(dev));
  Tensor sums = sums_of_squares_tensor(ts);  // [m] float sums, on dev, no read-out
  CM_KERNEL(dev, ffn_health_update, state_.f32(), as_f64(pend_), sums.f32(), (int64_t)weights.size(),
            use_reliability ? (int64_t)grads_.size() : 0, decay, factor, rel_min, use_reliability);
}

void FfnHealth::pull(const FfnHealthBuffers& host) const {
  if (!state_.defined()) return;
  float v[4];
  host_values(host, v);
  if (!same_bits(v, seen_)) return;  // the host was written since: that wins (the next forward uploads it)
  const std::vector<float> d = state_.to_f32_vector();  // one read-out
  host.reliability.f32()[0] = d[0];
  host.norm_ema.f32()[0] = d[1];
  host.wnorm_ema.f32()[0] = d[2];
  host.usage_ema.f32()[0] = d[3];
  std::memcpy(seen_, d.data(), sizeof seen_);
}

}  // namespace cm
