// Finite-difference gradient check. Reduces the op's output to a scalar L = sum(out * W) with fixed random W (so
// every output element and every index matters), computes dL/dx by backward, and compares it with central
// differences (L(x + eps) - L(x - eps)) / 2eps, accumulated in double, for every element of every f32 input
// that requires grad. Passes when |num - ana| <= atol + rtol * |num| everywhere: with the defaults, a gradient off
// by a factor of 2 or with a transposed index fails, and fp32 rounding does not.
#pragma once
#include <functional>
#include <string>
#include <vector>

#include "engine/tensor.h"

namespace cm {

struct GradcheckResult {
  bool ok = true;
  std::string message;  // the first mismatch: input, element, analytic and numeric values
};

using GradcheckFn = std::function<Tensor(const std::vector<Tensor>&)>;

// inputs: CPU tensors; those with requires_grad are checked (they are perturbed in place and restored).
GradcheckResult gradcheck(const GradcheckFn& fn, const std::vector<Tensor>& inputs, float eps = 1e-2f,
                          float atol = 2e-3f, float rtol = 2e-2f);

}  // namespace cm
