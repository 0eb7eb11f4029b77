// The op dispatch: a raw kernel has the same name and arguments in cm::cpu and cm::cuda (kernels/<family>.h), so an
// op calls it once and the device its data lives on picks the twin:
//   CM_KERNEL(x.device(), softmax_forward, y.f32(), x.f32(), N, C);
// In a build without CUDA only the CPU branch exists (no tensor can live on a GPU there).
#pragma once
#include <initializer_list>

#include "engine/tensor.h"

#if CM_CUDA
#define CM_KERNEL(dev, fn, ...) \
  ((dev) == ::cm::Device::CUDA ? ::cm::cuda::fn(__VA_ARGS__) : ::cm::cpu::fn(__VA_ARGS__))
#else
#define CM_KERNEL(dev, fn, ...) ((void)(dev), ::cm::cpu::fn(__VA_ARGS__))
#endif

namespace cm {

// All defined tensors of one op live on one device; the message names the op and both devices.
inline Device common_device(const char* op, std::initializer_list<const Tensor*> ts) {
  const Tensor* first = nullptr;
  for (const Tensor* t : ts) {
    if (!t->defined()) continue;
    if (!first) {
      first = t;
      continue;
    }
    CM_REQUIRE(t->device() == first->device(), op, ": tensors on different devices (", device_name(first->device()),
               " ", shape_str(first->shape()), " and ", device_name(t->device()), " ", shape_str(t->shape()),
               "); move them to one device with .to()");
  }
  return first ? first->device() : Device::CPU;
}

}  // namespace cm
