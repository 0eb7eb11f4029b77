// A buffer kept in two places: the host tensor, which checkpoints and tests read and write, and a working copy on
// the device where the model computes, which the model updates there without the host looking (the AC running m,
// the aux-free bias: model/router.h; model/health.h keeps the layer's health state the same way).
//
// on(host, dev) gives the working copy. It uploads the host tensor first when the copy is missing, when the host
// tensor was written since the last upload or pull (a loaded checkpoint, a test's copy_), or when the copy lives on
// another device (the model moved: the old copy's values are pulled first). pull(host) brings the working copy's
// values into the host tensor (one read-out), unless the host tensor was written since: then the host's values
// win, and the next on() uploads them.
#pragma once
#include <vector>

#include "engine/tensor.h"

namespace cm {

class DeviceMirror {
 public:
  const Tensor& on(const Tensor& host, Device dev);  // host: f32 on the CPU
  void pull(const Tensor& host) const;

 private:
  bool host_unchanged(const Tensor& host) const;
  mutable Tensor copy_;
  mutable std::vector<float> seen_;  // the host tensor as of the last upload or pull
};

}  // namespace cm
