// AdamW with decoupled weight decay and per-parameter no-decay, global-norm gradient clipping, and the learning
// rate schedule (linear warmup, then cosine down to min_lr).
//
//   AdamW opt(model.named_parameters(), AdamWOptions{});
//   float norm = clip_grad_norm(model.named_parameters(), 1.0f);
//   opt.step(lr_at(step, sched));
//   opt.zero_grad();
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "engine/tensor.h"

namespace cm {

using NamedTensors = std::vector<std::pair<std::string, Tensor>>;

// The default no-decay rule: 1-D tensors (norm weights, biases) and embeddings (names containing "emb").
bool default_no_decay(const std::string& name, const Tensor& p);

struct AdamWOptions {
  float lr = 1e-3f;  // used by step() without an argument
  float beta1 = 0.9f;
  float beta2 = 0.95f;
  float eps = 1e-8f;
  float weight_decay = 0.1f;
  // true -> this parameter gets no weight decay
  std::function<bool(const std::string&, const Tensor&)> no_decay = default_no_decay;
};

class AdamW {
 public:
  AdamW(const NamedTensors& params, const AdamWOptions& opt = AdamWOptions());

  // One update of every parameter that has a gradient (parameters without one are left alone, moments too).
  // PyTorch's AdamW: p -= lr*wd*p; m,v EMAs; p -= lr * mhat / (sqrt(vhat) + eps), t = step_count() after += 1.
  void step(float lr);
  // The same, skipped by the kernels themselves when skip_if_nonfinite ([1], on the parameters' device: the
  // norm from clip_grad_norm_tensor) holds a NaN or an Inf, so that the host need not read it first. The step
  // count advances either way: it lives on the host, which does not know.
  void step(float lr, const Tensor& skip_if_nonfinite);
  void step() { step(opt_.lr); }
  // step(lr, skip) in two halves, for a step captured in a CUDA graph and replayed (engine/cuda.h, Graph):
  // prepare(lr) is the host's share (the step count, and on a device the learning rate and bias corrections
  // written into device memory, kernels/adamw.h adamw_hyper); step_prepared(skip) is the update, which reads them
  // there. A replay of a captured step_prepared() needs only prepare() on the host: the same bits as step().
  void prepare(float lr);
  void step_prepared(const Tensor& skip_if_nonfinite);
  void zero_grad();  // drops every parameter's gradient

  int64_t step_count() const { return t_; }
  void set_step_count(int64_t t) { t_ = t; }
  const AdamWOptions& options() const { return opt_; }
  bool decays(size_t i) const { return decay_[i]; }

  // "<param name>.exp_avg" and "<param name>.exp_avg_sq" for every parameter, in parameter order: the tensors
  // themselves, so a checkpoint loader can copy_ into them.
  NamedTensors state() const;

 private:
  void check_step(const Tensor& skip_if_nonfinite) const;  // throws before anything is updated

  AdamWOptions opt_;
  NamedTensors params_;
  std::vector<Tensor> m_, v_;  // same shapes as the parameters
  std::vector<bool> decay_;
  int64_t t_ = 0;
  float lr_ = 0.f;  // of the prepared step
  Tensor hyper_;    // [3] on the parameters' device (CUDA): adamw_hyper of the prepared step
};

// Scales every gradient by max_norm / total_norm when total_norm > max_norm. Returns total_norm (before clipping),
// the L2 norm over all gradients, accumulated in double in parameter order (deterministic). Non-finite norms are
// returned as they are and nothing is scaled (the caller decides to skip the step). max_norm <= 0: only measures.
float clip_grad_norm(const NamedTensors& params, float max_norm);
// The same without a read-out: returns the norm as a [1] tensor on the gradients' device, and the scaling reads it
// there (kernels/adamw.h clip_scale). The same bits as clip_grad_norm, which is this plus item().
Tensor clip_grad_norm_tensor(const NamedTensors& params, float max_norm);

// Sum of squares of each tensor's elements, in double, on the host: the norms of gradient clipping and of the
// experts' health checks. Non-finite exactly when the tensor holds a NaN or an Inf. CPU tensors: one pass in
// double (kernels/reduce.h). CUDA tensors: float sums formed on the device and brought back in one copy (so a
// finite tensor whose squares overflow float reads as Inf there).
std::vector<double> sums_of_squares(const std::vector<Tensor>& ts);

// The same sums as a float tensor [ts.size()] where the tensors live (one device), without a read-out: on the CPU
// the double sums rounded to float, on a device the float sums made there.
Tensor sums_of_squares_tensor(const std::vector<Tensor>& ts);

struct LRSchedule {
  float max_lr = 1e-3f;
  float min_lr = 1e-4f;
  int64_t warmup_steps = 100;
  int64_t total_steps = 1000;  // cosine reaches min_lr here and stays
};
// step is 0-based: step 0 of warmup gives max_lr / warmup_steps; step warmup_steps - 1 gives max_lr.
float lr_at(int64_t step, const LRSchedule& s);

}  // namespace cm
