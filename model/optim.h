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
#include <memory>
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
  // true -> a CPU step also sums the squares of every updated parameter and of its gradient, in its own pass,
  // for the code that reads them right after the step (FreshSums below).
  bool step_sums = false;
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
  // The last step's sums of squares of each updated CPU parameter and of its gradient, made by the step's own
  // pass: a parameter (or gradient) is known by its storage, offset and size.
  struct Sums {
    // The step's tensors, known by storage, offset and size. Weak: the gradients are freed by zero_grad, and a
    // storage made later at the same address is another tensor.
    std::weak_ptr<Storage> param, grad;
    int64_t param_offset, grad_offset, numel;
    bool grad_contiguous;
    double param_sum, grad_sum;
  };
  std::vector<Sums> sums_;
  friend class FreshSums;
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

// While a FreshSums lives, on the thread that made it, sums_of_squares() and sums_of_squares_tensor() take the sum
// of a CPU parameter that the optimizer's last step updated, or of the gradient that step read, from that step
// (AdamWOptions::step_sums: made in the update's own pass, with sums_of_squares's bits) instead of reading the
// tensor again. The step's trainer wraps the experts' health checks in one:
//   opt.step(); { FreshSums fresh(opt); model.after_step(); }   // after_step reads no weight or gradient
// A tensor is known by its storage, offset and size. Only for code that writes no parameter or gradient inside
// the scope: the sums are of the values the step left. Other tensors, CUDA ones, and an optimizer without
// step_sums are summed as usual. Scopes nest (the innermost one answers).
class FreshSums {
 public:
  explicit FreshSums(const AdamW& opt);
  ~FreshSums();
  FreshSums(const FreshSums&) = delete;
  FreshSums& operator=(const FreshSums&) = delete;
  // The step's sum for this tensor, or false.
  bool find(const Tensor& t, double& sum) const;

 private:
  struct Key {
    const void* storage;
    int64_t offset, numel;
    bool operator<(const Key& o) const;
  };
  std::vector<std::pair<Key, double>> sums_;  // sorted by key
  std::vector<std::shared_ptr<Storage>> alive_;  // the keys' storages, held for the scope's life
  const FreshSums* outer_;
};

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
