// The host's read-out of a forward's routing statistics (model/stats.h).
#include "model/stats.h"

#include <cstring>

#include "engine/dispatch.h"
#include "kernels/route.h"

namespace cm {

void LayerRoutingStats::read() {
  std::vector<LayerRoutingStats> one(1);
  std::swap(one[0], *this);
  read_routing_stats(one);
  std::swap(one[0], *this);
}

void read_routing_stats(std::vector<LayerRoutingStats>& layers) {
  // Per unread layer its 4 tensors, in order: routed, rows, entropy, guard_counts (undefined ones give no words).
  std::vector<Tensor> want;
  Device dev = Device::CPU;
  for (const LayerRoutingStats& s : layers) {
    if (s.read_) continue;
    for (const Tensor* t : {&s.routed, &s.rows, &s.entropy, &s.guard_counts}) {
      want.push_back(*t);
      if (t->defined()) dev = t->device();
    }
  }
  const std::vector<std::vector<int32_t>> got = read_out_words(want, dev);
  size_t at = 0;
  for (LayerRoutingStats& s : layers) {
    if (s.read_) continue;
    const std::vector<int32_t>&routed = got[at], &rows = got[at + 1], &entropy = got[at + 2], &guard = got[at + 3];
    at += 4;
    const size_t N = (size_t)s.num_experts;
    if (!routed.empty()) {
      CM_CHECK(routed.size() == N, "layer ", s.layer, ": ", routed.size(), " routed counts for ", N, " experts");
      s.expert_share.assign(N, 0.f);
      for (size_t e = 0; e < N; ++e) s.expert_share[e] = s.slots ? (float)routed[e] / (float)s.slots : 0.f;
    }
    if (!rows.empty()) {
      CM_CHECK(rows.size() == N, "layer ", s.layer, ": ", rows.size(), " row counts for ", N, " experts");
      s.expert_rows.assign(rows.begin(), rows.end());
      int64_t kept = 0;
      for (int32_t r : rows) kept += r;
      s.dropped_fraction = s.slots ? (float)(s.slots - kept) / (float)s.slots : 0.f;
    }
    if (!entropy.empty()) std::memcpy(&s.router_entropy, entropy.data(), 4);
    if (!guard.empty()) {
      s.nonfinite_rows = guard[0];
      s.outlier_rows = guard[1];
    }
    s.read_ = true;
  }
}

void add_counts(Tensor& acc, const Tensor& counts, int64_t n) {
  const Device dev = counts.device();
  if (acc.defined() && acc.device() != dev) acc = acc.to(dev);
  if (!acc.defined()) acc = Tensor::zeros({2 * n}, DType::I32, dev);
  CM_KERNEL(dev, route_counts_add, static_cast<int64_t*>(acc.raw()), counts.contiguous().i32(), n);
}

}  // namespace cm
