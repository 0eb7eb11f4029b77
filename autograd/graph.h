// The autograd graph: every recorded op output owns a Node that knows the op's inputs and how to turn the
// gradient of the output into gradients of the inputs. backward() walks the graph in reverse topological order
// (iteratively: a chain of a million ops does not touch the C stack), accumulates on fan-out, then frees it.
//
// Writing an op (see autograd/ops_*.cpp):
//   Tensor y = ...forward...;
//   return record("exp", y, {x}, [yd = y.detach()](const Tensor& gy) { return grads{mul(gy, yd)}; });
// Traps:
//   - Never capture the output tensor itself in the closure: output -> node -> closure -> output is a cycle that
//     leaks. Capture y.detach() (same storage, no history).
//   - The closure returns one gradient per input, in order; an undefined Tensor means "no gradient".
//   - Gradients must have exactly the input's shape (broadcasting ops reduce with sum_to).
//   - The closure runs under NoGrad: ops inside it are not recorded.
#pragma once
#include <functional>
#include <vector>

#include "engine/tensor.h"

namespace cm {

using grads = std::vector<Tensor>;
using BackwardFn = std::function<grads(const Tensor& grad_output)>;

// Where a view sits in its one input (slice, a piece of split): [start, end) with step along dim.
struct Window {
  int64_t dim = 0, start = 0, end = 0, step = 1;
};

struct Node {
  const char* name = "";
  std::vector<Tensor> inputs;  // the op's inputs, kept alive until backward frees the graph
  BackwardFn backward;
  // Window nodes (record_window): the gradient of the output is added straight into this window of the input's
  // gradient, which is allocated once at full size; backward is not called.
  bool windowed = false;
  Window window;
  Node() = default;
  ~Node();  // iterative: destroying a long chain never recurses deeply
  Node(const Node&) = delete;
  Node& operator=(const Node&) = delete;
};

// Is recording on? (thread-local; off inside NoGrad and inside backward)
bool grad_mode_enabled();

// RAII guard: ops in its scope are not recorded (evaluation, sampling, optimizer steps).
class NoGrad {
 public:
  NoGrad();
  ~NoGrad();
  NoGrad(const NoGrad&) = delete;
  NoGrad& operator=(const NoGrad&) = delete;

 private:
  bool prev_;
};

// Attach history to `out` when recording is on and some input requires grad; returns `out`.
Tensor record(const char* name, Tensor out, std::vector<Tensor> inputs, BackwardFn backward);

// For ops whose output is a window of their single input (slice, the pieces of split). The obvious backward,
// "zeros the size of the input with g in the window", costs a full pass over the input per view, so k views of one
// tensor (an MoE layer's k expert segments, a router level's node blocks) cost k full passes. Recorded this way,
// the sweep allocates the input's gradient once and adds each view's gradient into its own window: O(window).
Tensor record_window(const char* name, Tensor out, const Tensor& input, Window w);

// Does any input require grad while recording is on? (lets an op skip saving buffers for backward)
bool needs_grad(std::initializer_list<const Tensor*> inputs);

// The reverse sweep used by Tensor::backward.
void run_backward(const Tensor& root, const Tensor& grad_root);

}  // namespace cm
