// The bookkeeping of a staging ring: regions of a fixed buffer handed out in ring order, each read later by someone
// else (engine/cuda.cu: the pinned upload ring, read by queued host-to-device copies). A region may be written
// again only once its reader is done, so take() first retires, oldest first, every pending region the new one
// would overwrite; the caller's retire(tag) waits for that region's reader (the CUDA ring: its copy's event).
// Plain bookkeeping, no device: the CPU suite tests it (tests/test_tensor.cpp).
//
// Regions are handed out in ring order, so the pending ones, oldest first, lie from the head on round the ring.
// When a region does not fit before the end, the ring wraps to 0 and the tail it skips is given up too: the
// previous lap's regions there are retired before those at the start. (Checking only whether the oldest pending
// region overlaps the new one left a previous lap's region in that skipped tail at the front for good: no later
// region overlaps it, so from then on nothing was retired and every region was written with its reader unchecked.)
#pragma once
#include <cstddef>
#include <deque>

#include "engine/check.h"

namespace cm {

template <class Tag>
class StagingRing {
 public:
  explicit StagingRing(size_t bytes) : bytes_(bytes) {}

  // The offset of a region of n bytes (1 <= n <= the ring's size), after retire(tag) has been called on every
  // pending region it overlaps or, wrapping, skips (they leave the ring). The region is pending from record().
  template <class Retire>
  size_t take(size_t n, Retire&& retire) {
    CM_CHECK(n >= 1 && n <= bytes_, "StagingRing: a region of ", n, " bytes in a ring of ", bytes_);
    size_t begin = head_;
    if (begin + n > bytes_) {  // wrap: what lies past the head is the previous lap's tail, and older than the start
      while (!uses_.empty() && uses_.front().begin >= head_) pop(retire);
      begin = 0;
    }
    const size_t end = begin + n;
    while (!uses_.empty() && uses_.front().begin < end && begin < uses_.front().end) pop(retire);
    head_ = end;
    return begin;
  }
  // The region take() returned at begin (n bytes) is read by the reader tag stands for.
  void record(size_t begin, size_t n, Tag tag) { uses_.push_back({begin, begin + n, tag}); }

  size_t pending() const { return uses_.size(); }
  // Whether a pending region overlaps [begin, begin + n).
  bool pending_overlaps(size_t begin, size_t n) const {
    for (const Use& u : uses_)
      if (u.begin < begin + n && begin < u.end) return true;
    return false;
  }

 private:
  struct Use {
    size_t begin, end;
    Tag tag;
  };
  template <class Retire>
  void pop(Retire& retire) {
    retire(uses_.front().tag);
    uses_.pop_front();
  }

  size_t bytes_;
  size_t head_ = 0;       // the next free byte
  std::deque<Use> uses_;  // pending regions, oldest first
};

}  // namespace cm
