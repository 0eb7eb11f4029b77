// AdamW, gradient clipping and the LR schedule. No autograd here: parameters are updated in place on raw data.
#include "model/optim.h"

#include <cmath>

#include "autograd/ops.h"
#include "kernels/adamw.h"

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
}

void AdamW::step(float lr) {
  NoGrad ng;
  ++t_;
  for (size_t i = 0; i < params_.size(); ++i) {
    const Tensor& p = params_[i].second;
    Tensor g = p.grad();
    if (!g.defined()) continue;
    CM_REQUIRE(g.shape() == p.shape(), "AdamW: gradient of '", params_[i].first, "' has shape ", shape_str(g.shape()),
               ", parameter ", shape_str(p.shape()));
    Tensor gc = g.contiguous();
    CM_REQUIRE(p.device() == Device::CPU, "AdamW: parameter '", params_[i].first, "' is on ",
               device_name(p.device()), "; only the CPU update exists so far");
    // The raw kernel (kernels/adamw.h): PyTorch's update, elementwise, bit-identical for any thread count.
    cpu::adamw_step(p.f32(), m_[i].f32(), v_[i].f32(), gc.f32(), p.numel(), lr, opt_.beta1, opt_.beta2, opt_.eps,
                    decay_[i] ? opt_.weight_decay : 0.f, t_);
  }
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

float clip_grad_norm(const NamedTensors& params, float max_norm) {
  NoGrad ng;
  double ss = 0.0;
  for (const auto& [name, p] : params) {
    Tensor g = p.grad();
    if (!g.defined()) continue;
    std::vector<float> v = g.to_f32_vector();
    double s = 0.0;
    for (float x : v) s += (double)x * x;
    ss += s;
  }
  float norm = (float)std::sqrt(ss);
  if (max_norm > 0.f && std::isfinite(norm) && norm > max_norm) {
    float scale = max_norm / (norm + 1e-6f);
    for (const auto& [name, p] : params) {
      Tensor g = p.grad();
      if (!g.defined()) continue;
      if (g.is_contiguous() && g.device() == Device::CPU) {
        float* d = g.f32();
        for (int64_t i = 0, n = g.numel(); i < n; ++i) d[i] *= scale;
      } else {
        p.set_grad(mul(g, scale));
      }
    }
  }
  return norm;
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
