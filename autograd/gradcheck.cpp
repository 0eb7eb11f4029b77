#include "autograd/gradcheck.h"

#include <cmath>

#include "autograd/graph.h"

namespace cm {

namespace {
// L = sum(out * w), accumulated in double so that the finite differences see the op's rounding, not ours.
double weighted_sum(const Tensor& out, const std::vector<float>& w) {
  std::vector<float> v = out.to_f32_vector();
  double acc = 0;
  for (size_t i = 0; i < v.size(); ++i) acc += (double)v[i] * (double)w[i];
  return acc;
}
}  // namespace

GradcheckResult gradcheck(const GradcheckFn& fn, const std::vector<Tensor>& inputs, float eps, float atol,
                          float rtol) {
  GradcheckResult res;
  for (const Tensor& x : inputs) {
    if (!x.defined() || !x.requires_grad()) continue;
    CM_REQUIRE(x.device() == Device::CPU && x.is_contiguous() && x.is_leaf(),
               "gradcheck: inputs that require grad must be contiguous CPU leaves");
    x.zero_grad();
  }

  // Analytic: one backward with W as the output gradient.
  Tensor out = fn(inputs);
  CM_REQUIRE(out.dtype() == DType::F32, "gradcheck: the function must return an f32 tensor");
  Generator gen(0x5EED);
  Tensor w = Tensor::rand(out.shape(), gen);
  {
    float* p = w.f32();
    for (int64_t i = 0; i < w.numel(); ++i) p[i] = 2.f * p[i] - 1.f;  // U[-1, 1)
  }
  std::vector<float> wv = w.to_f32_vector();
  if (!out.requires_grad()) {
    res.ok = false;
    res.message = "gradcheck: the output does not require grad (no input reached it)";
    return res;
  }
  out.backward(w.to(out.device()));

  // Numeric: central differences, one element at a time.
  NoGrad guard;
  for (size_t k = 0; k < inputs.size(); ++k) {
    const Tensor& x = inputs[k];
    if (!x.defined() || !x.requires_grad()) continue;
    Tensor g = x.grad();
    std::vector<float> ana = g.defined() ? g.to_f32_vector() : std::vector<float>((size_t)x.numel(), 0.f);
    float* p = x.f32();
    for (int64_t i = 0; i < x.numel(); ++i) {
      const float orig = p[i];
      p[i] = orig + eps;
      double lp = weighted_sum(fn(inputs), wv);
      p[i] = orig - eps;
      double lm = weighted_sum(fn(inputs), wv);
      p[i] = orig;
      // The actual step is the float distance between the two perturbed points, not 2*eps.
      double h = (double)(orig + eps) - (double)(orig - eps);
      double num = (lp - lm) / h;
      double a = ana[(size_t)i];
      if (!(std::fabs(num - a) <= atol + rtol * std::fabs(num))) {
        res.ok = false;
        res.message = str("gradient mismatch at input ", k, " (shape ", shape_str(x.shape()), ") element ", i,
                          ": analytic ", a, ", numeric ", num);
        return res;
      }
    }
  }
  return res;
}

}  // namespace cm
