// Recording and the reverse sweep.
#include "autograd/graph.h"

#include <algorithm>
#include <unordered_map>

#include "kernels/copy.h"
#include "kernels/cpu/parallel.h"
#if CM_CUDA
#include "engine/cuda.h"
#endif

namespace cm {

namespace {
thread_local bool g_grad_mode = true;

// a += b for a contiguous f32 tensor a and a same-shape b on the same device (gradient accumulation needs
// nothing fancier).
void accumulate(const Tensor& a, const Tensor& b) {
  CM_CHECK(a.device() == b.device(), "gradients of one tensor on two devices: ", device_name(a.device()), " and ",
           device_name(b.device()));
  Tensor bc = b.contiguous();
#if CM_CUDA
  if (a.device() == Device::CUDA) {
    cuda::axpy(a.f32(), bc.f32(), 1.0f, a.numel());
    return;
  }
#endif
  float* __restrict pa = a.f32();
  const float* __restrict pb = bc.f32();
  const int64_t n = a.numel();
#pragma omp parallel for schedule(static) if (n >= cpu::parallel_min())
  for (int64_t i = 0; i < n; ++i) pa[i] += pb[i];
}

// A fresh contiguous copy that no other tensor aliases (gradients are accumulated into in place).
Tensor own_copy(const Tensor& g) {
  Tensor c = Tensor::empty(g.shape(), g.dtype(), g.device());
  c.copy_(g);
  return c;
}

// Can the sweep add into t in place? Only when nothing else holds it or its storage, or the storage's other
// holders are the tensors of its other blocks (Storage::partitioned).
bool owned(const Tensor& t) {
  return t.impl_ptr().use_count() == 1 && (t.impl().storage.use_count() == 1 || t.impl().storage->partitioned) &&
         t.is_contiguous();
}

// target += g (w null), or target's window w += g. target is owned and contiguous.
void add_into(const Tensor& target, const Tensor& g, const Window* w, const char* op) {
  if (!w) return accumulate(target, g);
  Tensor view = target.slice(w->dim, w->start, w->end, w->step);  // the sweep runs under NoGrad: not recorded
  CM_CHECK(view.shape() == g.shape(), "op '", op, "' gave its window a gradient of shape ", shape_str(g.shape()),
           ", expected ", shape_str(view.shape()));
  if (view.is_contiguous()) return accumulate(view, g);  // a block of rows: in place
  if (view.device() == Device::CPU) {  // in place through the window's strides
    const Tensor gc = g.contiguous();
    cpu::strided_add(view.f32(), view.strides().data(), gc.f32(), view.shape().data(), view.dim());
    return;
  }
  Tensor sum = view.contiguous();
  accumulate(sum, g);
  view.copy_(sum);
}
}  // namespace

bool grad_mode_enabled() { return g_grad_mode; }
NoGrad::NoGrad() : prev_(g_grad_mode) { g_grad_mode = false; }
NoGrad::~NoGrad() { g_grad_mode = prev_; }

bool needs_grad(std::initializer_list<const Tensor*> inputs) {
  if (!g_grad_mode) return false;
  for (const Tensor* t : inputs)
    if (t->defined() && t->requires_grad()) return true;
  return false;
}

Tensor record(const char* name, Tensor out, std::vector<Tensor> inputs, BackwardFn backward) {
  if (!g_grad_mode) return out;
  bool any = false;
  for (const Tensor& t : inputs) any = any || (t.defined() && t.requires_grad());
  if (!any) return out;
  auto node = std::make_shared<Node>();
  node->name = name;
  node->inputs = std::move(inputs);
  node->backward = std::move(backward);
  out.impl().requires_grad = true;
  out.impl().grad_fn = std::move(node);
  return out;
}

Tensor record_window(const char* name, Tensor out, const Tensor& input, Window w) {
  out = record(name, std::move(out), {input}, [](const Tensor& g) { return grads{g}; });
  if (out.impl().grad_fn) {
    out.impl().grad_fn->windowed = true;
    out.impl().grad_fn->window = w;
  }
  return out;
}

// Destroying a long chain recursively (tensor -> node -> input tensor -> node ...) would overflow the stack,
// so a node hands its inputs to a worklist and unlinks every node that would die with them.
Node::~Node() {
  std::vector<Tensor> work = std::move(inputs);
  while (!work.empty()) {
    Tensor t = std::move(work.back());
    work.pop_back();
    if (!t.defined()) continue;
    const auto& impl = t.impl_ptr();
    if (impl.use_count() == 1 && impl->grad_fn && impl->grad_fn.use_count() == 1) {
      for (Tensor& in : impl->grad_fn->inputs) work.push_back(std::move(in));
      impl->grad_fn->inputs.clear();
    }
  }
}

void run_backward(const Tensor& root, const Tensor& grad_root) {
  NoGrad guard;
  CM_REQUIRE(root.requires_grad(), "backward() on a tensor that does not require grad");
  CM_REQUIRE(grad_root.shape() == root.shape(), "backward(): gradient shape ", shape_str(grad_root.shape()),
             " does not match output shape ", shape_str(root.shape()));
  CM_REQUIRE(grad_root.device() == root.device(), "backward(): gradient on ", device_name(grad_root.device()),
             " for an output on ", device_name(root.device()));
  if (!root.impl().grad_fn) {  // a leaf: its gradient is the seed
    if (root.grad().defined())
      accumulate(root.grad(), grad_root);
    else
      root.set_grad(own_copy(grad_root));
    return;
  }

  // Iterative post-order DFS: every node comes after all nodes it consumes. `order` holds shared pointers so no
  // node dies (and cascades) while the sweep runs.
  std::vector<std::shared_ptr<Node>> order;
  std::unordered_map<Node*, int> seen;
  std::vector<std::pair<std::shared_ptr<Node>, size_t>> stack;
  stack.push_back({root.impl().grad_fn, 0});
  seen[root.impl().grad_fn.get()] = 1;
  while (!stack.empty()) {
    auto& [node, next] = stack.back();
    if (next < node->inputs.size()) {
      const Tensor& in = node->inputs[next++];
      if (in.defined() && in.impl().grad_fn && !seen.count(in.impl().grad_fn.get())) {
        seen[in.impl().grad_fn.get()] = 1;
        stack.push_back({in.impl().grad_fn, 0});
      }
    } else {
      order.push_back(node);
      stack.pop_back();
    }
  }

  std::unordered_map<Node*, Tensor> pending;  // gradient w.r.t. each node's output, summed over its consumers
  pending[root.impl().grad_fn.get()] = grad_root;
  for (auto it = order.rbegin(); it != order.rend(); ++it) {
    Node* node = it->get();
    CM_REQUIRE(node->backward, "backward through a graph that was already freed (backward() called twice?)");
    auto found = pending.find(node);
    if (found == pending.end()) continue;  // no gradient reaches this node
    Tensor gout = std::move(found->second);
    pending.erase(found);
    grads gin = node->backward(gout);
    CM_CHECK(gin.size() == node->inputs.size(), "op '", node->name, "' returned ", gin.size(), " gradients for ",
             node->inputs.size(), " inputs");
    const Window* w = node->windowed ? &node->window : nullptr;  // gin[0] is then the window's gradient
    for (size_t i = 0; i < gin.size(); ++i) {
      const Tensor& in = node->inputs[i];
      if (!gin[i].defined() || !in.defined() || !in.requires_grad()) continue;
      if (!w)
        CM_CHECK(gin[i].shape() == in.shape(), "op '", node->name, "' gave input ", i, " a gradient of shape ",
                 shape_str(gin[i].shape()), ", expected ", shape_str(in.shape()));
      // Checked here, where the rule that made it is known: further on, a gradient on the wrong device would fail
      // in whichever op consumes it next, or in set_grad on a leaf, and neither message would name this rule.
      CM_CHECK(gin[i].device() == in.device(), "op '", node->name, "' gave input ", i, " a gradient on ",
               device_name(gin[i].device()), ", the input is on ", device_name(in.device()));
      if (in.impl().grad_fn) {
        Tensor& slot = pending[in.impl().grad_fn.get()];
        if (!slot.defined() && !w) {
          slot = gin[i];  // kept as it is: copied only if a second gradient has to be added to it
          continue;
        }
        if (!slot.defined())
          slot = Tensor::zeros(in.shape(), DType::F32, in.device());
        else if (!owned(slot))  // the first gradient may alias another tensor: accumulate into a private copy
          slot = own_copy(slot);
        add_into(slot, gin[i], w, node->name);
      } else if (!in.grad().defined() && !w) {
        // A leaf's first gradient: taken as it is when nothing else holds it (a rule's fresh result, as PyTorch's
        // AccumulateGrad takes it), else a private copy that later gradients can be added into. With zero_grad
        // dropping the gradients every step, the copy was a pass over every parameter's gradient per step.
        in.set_grad(owned(gin[i]) ? gin[i] : own_copy(gin[i]));
      } else {
        if (!in.grad().defined()) in.set_grad(Tensor::zeros(in.shape(), DType::F32, in.device()));
        add_into(in.grad(), gin[i], w, node->name);
      }
    }
  }
  // Free the graph: saved tensors and closures go now; the nodes themselves die with `order`, one at a time.
  for (auto& n : order) {
    n->backward = nullptr;
    n->inputs.clear();
  }
}

void Tensor::backward(const Tensor& grad_output) const {
  if (grad_output.defined()) {
    run_backward(*this, grad_output);
    return;
  }
  CM_REQUIRE(numel() == 1, "backward() without a gradient needs a one-element output, got shape ",
             shape_str(shape()));
  run_backward(*this, Tensor::full(shape(), 1.f, DType::F32, device()));
}

}  // namespace cm
