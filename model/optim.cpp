// AdamW, gradient clipping and the LR schedule. No autograd here: parameters are updated in place on raw data.
#include "model/optim.h"

#include <algorithm>
#include <cmath>
#include <functional>

#include "autograd/ops.h"
#include "engine/dispatch.h"
#include "engine/host_sync.h"
#include "kernels/adamw.h"
#include "kernels/elementwise.h"
#include "kernels/reduce.h"

namespace cm {

bool default_no_decay(const std::string& name, const Tensor& p) {
  return p.dim() < 2 || name.find("emb") != std::string::npos;
}

AdamW::AdamW(const NamedTensors& params, const AdamWOptions& opt) : opt_(opt), params_(params) {
  CM_REQUIRE(opt.beta1 >= 0.f && opt.beta1 < 1.f, "AdamW beta1 = ", opt.beta1, ": expected [0, 1)");
  CM_REQUIRE(opt.beta2 >= 0.f && opt.beta2 < 1.f, "AdamW beta2 = ", opt.beta2, ": expected [0, 1)");
  CM_REQUIRE(opt.eps > 0.f, "AdamW eps = ", opt.eps, ": expected > 0");
  CM_REQUIRE(opt.weight_decay >= 0.f, "AdamW weight_decay = ", opt.weight_decay, ": expected >= 0");
  for (const auto& [name, p] : params_) {
    CM_REQUIRE(p.defined() && p.dtype() == DType::F32, "AdamW: parameter '", name, "' must be a defined f32 tensor");
    CM_REQUIRE(p.is_contiguous(), "AdamW: parameter '", name, "' must be contiguous");
    m_.push_back(Tensor::zeros(p.shape(), DType::F32, p.device()));
    v_.push_back(Tensor::zeros(p.shape(), DType::F32, p.device()));
    decay_.push_back(!(opt.no_decay && opt.no_decay(name, p)));
  }
  // The fused CUDA step updates its tensors concurrently, so two entries over the same memory would race there
  // (and be updated twice, in turn, on the CPU): a parameter listed twice, or views that overlap, are refused.
  struct Span {
    const Storage* storage;
    int64_t begin, end;  // elements (parameters are contiguous)
    size_t index;
  };
  std::vector<Span> spans;
  for (size_t i = 0; i < params_.size(); ++i) {
    const Tensor& p = params_[i].second;
    if (p.numel() > 0) spans.push_back({p.impl().storage.get(), p.offset(), p.offset() + p.numel(), i});
  }
  std::sort(spans.begin(), spans.end(), [](const Span& a, const Span& b) {
    if (a.storage != b.storage) return std::less<const Storage*>()(a.storage, b.storage);
    return a.begin != b.begin ? a.begin < b.begin : a.index < b.index;  // the message names them in list order
  });
  for (size_t k = 1; k < spans.size(); ++k) {
    const Span &a = spans[k - 1], &b = spans[k];
    CM_REQUIRE(a.storage != b.storage || b.begin >= a.end, "AdamW: parameters '", params_[a.index].first, "' and '",
               params_[b.index].first, "' share memory (one tensor listed twice, or overlapping views)");
  }
}

void AdamW::step(float lr) { step(lr, Tensor()); }

void AdamW::step(float lr, const Tensor& skip_if_nonfinite) {
  check_step(skip_if_nonfinite);  // a refusal leaves the step count as it was
  prepare(lr);
  step_prepared(skip_if_nonfinite);
}

void AdamW::prepare(float lr) {
  ++t_;
  lr_ = lr;
  Device dev = Device::CPU;
  for (const auto& kv : params_)
    if (kv.second.device() != Device::CPU) dev = kv.second.device();
  if (dev == Device::CPU) return;
  float h[3];
  cpu::adamw_hyper(h, lr, opt_.beta1, opt_.beta2, t_);
  if (!hyper_.defined() || hyper_.device() != dev) hyper_ = Tensor::empty({3}, DType::F32, dev);
  hyper_.copy_(Tensor::from_vector(std::vector<float>(h, h + 3), {3}));  // an upload: no wait
}

void AdamW::check_step(const Tensor& skip_if_nonfinite) const {
  if (skip_if_nonfinite.defined()) {
    CM_REQUIRE(skip_if_nonfinite.numel() == 1 && skip_if_nonfinite.dtype() == DType::F32 &&
                   skip_if_nonfinite.is_contiguous(),
               "AdamW: the skip flag must be one f32 value, got ", shape_str(skip_if_nonfinite.shape()));
    for (const auto& [name, p] : params_)
      CM_REQUIRE(p.device() == skip_if_nonfinite.device(), "AdamW: the skip flag is on ",
                 device_name(skip_if_nonfinite.device()), ", parameter '", name, "' on ", device_name(p.device()));
  }
  // Every parameter is checked before any is updated: a refusal leaves parameters, moments and the step count as
  // they were (the CPU updates happen in step_prepared's loop, the CUDA ones after it).
  for (size_t i = 0; i < params_.size(); ++i) {
    const Tensor& p = params_[i].second;
    Tensor g = p.grad();
    if (!g.defined()) continue;
    CM_REQUIRE(g.shape() == p.shape(), "AdamW: gradient of '", params_[i].first, "' has shape ", shape_str(g.shape()),
               ", parameter ", shape_str(p.shape()));
    CM_REQUIRE(g.device() == p.device(), "AdamW: gradient of '", params_[i].first, "' is on ",
               device_name(g.device()), ", the parameter on ", device_name(p.device()));
    // The moments were made where the parameter was when this optimizer was built. A model moved since (its
    // to() swaps the parameters' storage in place) would hand the kernel pointers of another device: host
    // memory to a CUDA kernel (an illegal address) or device memory to the CPU loop (a segfault).
    CM_REQUIRE(m_[i].device() == p.device() && v_[i].device() == p.device(), "AdamW: parameter '",
               params_[i].first, "' is on ", device_name(p.device()), " but its moments are on ",
               device_name(m_[i].device()), ": build the optimizer after moving the model (ClusterMoELM::to)");
  }
}

void AdamW::step_prepared(const Tensor& skip_if_nonfinite) {
  NoGrad ng;
  check_step(skip_if_nonfinite);
  CM_REQUIRE(t_ >= 1, "AdamW: step_prepared() before prepare()");
  const float* skip = skip_if_nonfinite.defined() ? skip_if_nonfinite.f32() : nullptr;
  const float lr = lr_;
  // The parameters with a gradient, per device, as slices of the fused step (kernels/adamw.h): PyTorch's update,
  // elementwise, bit-identical for any thread count. The slices never share memory (checked by the constructor):
  // the kernels update them concurrently.
  std::vector<AdamWSlice> host, device;
  std::vector<size_t> host_index;  // parameter index of each host slice
  std::vector<Tensor> host_grads;  // the gradient each host slice reads
  std::vector<Tensor> keep;        // contiguous gradients the slices point into, alive until the kernels ran
  for (size_t i = 0; i < params_.size(); ++i) {
    const Tensor& p = params_[i].second;
    Tensor g = p.grad();
    if (!g.defined()) continue;
    const float wd = decay_[i] ? opt_.weight_decay : 0.f;
    keep.push_back(g.contiguous());
    const AdamWSlice s{p.f32(), m_[i].f32(), v_[i].f32(), keep.back().f32(), p.numel(), wd};
    if (p.device() == Device::CPU) {
      host.push_back(s);
      host_index.push_back(i);
      host_grads.push_back(g);
    } else {
      device.push_back(s);
    }
  }
  // CPU: one parallel region over every tensor, which also sums the squares of each updated parameter and of its
  // gradient on its way (see sums()).
  sums_.clear();
  if (!host.empty()) {
    std::vector<double> sp(opt_.step_sums ? host.size() : 0), sg(sp.size());
    cpu::adamw_step_multi(host.data(), (int64_t)host.size(), lr, opt_.beta1, opt_.beta2, opt_.eps, t_, skip,
                          opt_.step_sums ? sp.data() : nullptr, opt_.step_sums ? sg.data() : nullptr);
    for (size_t j = 0; j < sp.size(); ++j) {
      const Tensor &p = params_[host_index[j]].second, &g = host_grads[j];
      sums_.push_back({p.impl().storage, g.impl().storage, p.offset(), g.offset(), p.numel(), g.is_contiguous(),
                       sp[j], sg[j]});
    }
  }
#if CM_CUDA
  // CUDA: one fused launch (per 48 tensors), the same arithmetic as the CPU kernel.
  if (!device.empty())
    cuda::adamw_step_multi(device.data(), (int64_t)device.size(), lr, opt_.beta1, opt_.beta2, opt_.eps, t_, skip,
                           hyper_.f32());
#endif
}

void AdamW::zero_grad() {
  for (auto& [name, p] : params_) p.zero_grad();
}

NamedTensors AdamW::state() const {
  NamedTensors s;
  for (size_t i = 0; i < params_.size(); ++i) {
    s.emplace_back(params_[i].first + ".exp_avg", m_[i]);
    s.emplace_back(params_[i].first + ".exp_avg_sq", v_[i]);
  }
  return s;
}

// ---------------------------------------------------------------- FreshSums

namespace {
thread_local const FreshSums* fresh_sums = nullptr;  // the innermost live scope of this thread
}

bool FreshSums::Key::operator<(const Key& o) const {
  if (storage != o.storage) return std::less<const void*>()(storage, o.storage);
  return offset != o.offset ? offset < o.offset : numel < o.numel;
}

FreshSums::FreshSums(const AdamW& opt) : outer_(fresh_sums) {
  for (const AdamW::Sums& s : opt.sums_) {
    if (auto p = s.param.lock()) {
      sums_.push_back({{p.get(), s.param_offset, s.numel}, s.param_sum});
      alive_.push_back(std::move(p));
    }
    // A non-contiguous gradient was summed as its contiguous copy: its own tensor is not looked up (find).
    if (auto g = s.grad.lock(); g && s.grad_contiguous) {
      sums_.push_back({{g.get(), s.grad_offset, s.numel}, s.grad_sum});
      alive_.push_back(std::move(g));
    }
  }
  std::sort(sums_.begin(), sums_.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
  fresh_sums = this;
}

FreshSums::~FreshSums() { fresh_sums = outer_; }

bool FreshSums::find(const Tensor& t, double& sum) const {
  if (!t.defined() || t.device() != Device::CPU || !t.is_contiguous()) return false;
  const Key k{t.impl().storage.get(), t.offset(), t.numel()};
  auto it = std::lower_bound(sums_.begin(), sums_.end(), k, [](const auto& a, const Key& b) { return a.first < b; });
  if (it == sums_.end() || k < it->first) return false;
  sum = it->second;
  return true;
}

// Each CPU tensor's sum of squares in double, into out at its index (one parallel region over the tensors rather
// than one per tensor: an expert layer has dozens of them, and each region's start costs more than a small tensor's
// sum). Each sum is the same whatever thread computes it. Returns the CUDA tensors' [1] float sums, in order.
static std::vector<Tensor> sums_on_host_or_device(const std::vector<Tensor>& ts, std::vector<double>& out) {
  out.assign(ts.size(), 0.0);
  std::vector<Tensor> on_device;  // [1] sums, one per CUDA tensor, in order
  std::vector<std::pair<size_t, Tensor>> on_host;
  for (size_t i = 0; i < ts.size(); ++i) {
    CM_REQUIRE(ts[i].dtype() == DType::F32, "sums_of_squares: tensor ", i, " is ", dtype_name(ts[i].dtype()));
    if (ts[i].device() == Device::CPU) {
      if (!(fresh_sums && fresh_sums->find(ts[i], out[i]))) on_host.emplace_back(i, ts[i].contiguous());
    } else
      on_device.push_back(sum(square(ts[i])).view({1}));
  }
  const int64_t nh = (int64_t)on_host.size();
#pragma omp parallel for schedule(dynamic, 1) if (nh > 1)
  for (int64_t j = 0; j < nh; ++j) {
    const Tensor& t = on_host[(size_t)j].second;
    out[on_host[(size_t)j].first] = cpu::sum_squares(t.f32(), t.numel());
  }
  return on_device;
}

std::vector<double> sums_of_squares(const std::vector<Tensor>& ts) {
  NoGrad ng;
  std::vector<double> out;
  std::vector<Tensor> on_device = sums_on_host_or_device(ts, out);
  if (on_device.size() < ts.size()) note_host_read();  // the host reads CPU values here (engine/host_sync.h)
  if (!on_device.empty()) {
    std::vector<float> v = (on_device.size() == 1 ? on_device[0] : concat(on_device, 0)).to_f32_vector();
    size_t j = 0;
    for (size_t i = 0; i < ts.size(); ++i)
      if (ts[i].device() != Device::CPU) out[i] = (double)v[j++];
  }
  return out;
}

Tensor sums_of_squares_tensor(const std::vector<Tensor>& ts) {
  NoGrad ng;
  CM_REQUIRE(!ts.empty(), "sums_of_squares_tensor: no tensors");
  const Device dev = ts[0].device();
  for (const Tensor& t : ts)
    CM_REQUIRE(t.device() == dev, "sums_of_squares_tensor: tensors on ", device_name(dev), " and ",
               device_name(t.device()));
  std::vector<double> host;
  std::vector<Tensor> on_device = sums_on_host_or_device(ts, host);
  if (dev != Device::CPU) return on_device.size() == 1 ? on_device[0] : concat(on_device, 0);
  Tensor out = Tensor::empty({(int64_t)ts.size()}, DType::F32, dev);
  for (size_t i = 0; i < ts.size(); ++i) out.f32()[i] = (float)host[i];
  return out;
}

Tensor clip_grad_norm_tensor(const NamedTensors& params, float max_norm) {
  NoGrad ng;
  std::vector<Tensor> grads;
  Device dev = Device::CPU;
  for (const auto& [name, p] : params)
    if (p.grad().defined()) {
      if (grads.empty()) dev = p.device();
      CM_REQUIRE(p.device() == dev, "clip_grad_norm: parameter '", name, "' is on ", device_name(p.device()),
                 ", others on ", device_name(dev));
      grads.push_back(p.grad());
    }
  // The norm [1]: the per-tensor sums added in double in parameter order (deterministic), then sqrt. On the CPU
  // the host adds them (they are its own memory: no read-out); on a device one thread does, there.
  std::vector<double> host;
  std::vector<Tensor> dsums = sums_on_host_or_device(grads, host);
  Tensor norm = Tensor::empty({1}, DType::F32, dev);
  if (dev == Device::CPU) {
    double ss = 0.0;
    for (double s : host) ss += s;
    norm.f32()[0] = (float)std::sqrt(ss);
  } else {
#if CM_CUDA
    Tensor all = dsums.size() == 1 ? dsums[0] : concat(dsums, 0);
    cuda::norm_from_sums(norm.f32(), all.f32(), all.numel());
#endif
  }
  if (max_norm > 0.f) {
    for (const auto& [name, p] : params) {
      Tensor g = p.grad();
      if (!g.defined()) continue;
      if (!g.is_contiguous()) {
        g = g.contiguous();
        p.set_grad(g);
      }
      CM_KERNEL(dev, clip_scale, g.f32(), g.numel(), norm.f32(), max_norm);  // in place; reads the norm there
    }
  }
  return norm;
}

float clip_grad_norm(const NamedTensors& params, float max_norm) {
  return clip_grad_norm_tensor(params, max_norm).item();
}

float lr_at(int64_t step, const LRSchedule& s) {
  if (s.warmup_steps > 0 && step < s.warmup_steps) return s.max_lr * (float)(step + 1) / (float)s.warmup_steps;
  if (step >= s.total_steps) return s.min_lr;
  int64_t span = s.total_steps - s.warmup_steps;
  if (span <= 0) return s.min_lr;
  double progress = (double)(step - s.warmup_steps) / (double)span;  // [0, 1)
  double cosine = 0.5 * (1.0 + std::cos(M_PI * progress));
  return (float)(s.min_lr + (s.max_lr - s.min_lr) * cosine);
}

}  // namespace cm
