// Host synchronisation counters (engine/host_sync.h). Relaxed atomics: the counts are read between steps, by the
// thread that made them, so no ordering is needed; atomics only keep concurrent callers from losing counts.
#include "engine/host_sync.h"

#include <atomic>

namespace cm {

namespace {
std::atomic<int64_t> g_d2h{0};
std::atomic<int64_t> g_syncs{0};
std::atomic<int64_t> g_h2d{0};
}  // namespace

HostSyncStats host_sync_stats() {
  HostSyncStats s;
  s.d2h_copies = g_d2h.load(std::memory_order_relaxed);
  s.stream_syncs = g_syncs.load(std::memory_order_relaxed);
  s.h2d_uploads = g_h2d.load(std::memory_order_relaxed);
  return s;
}

void reset_host_sync_stats() {
  g_d2h.store(0, std::memory_order_relaxed);
  g_syncs.store(0, std::memory_order_relaxed);
  g_h2d.store(0, std::memory_order_relaxed);
}

void note_host_read() {
  note_d2h_copy();
  note_stream_sync();
}
void note_d2h_copy() { g_d2h.fetch_add(1, std::memory_order_relaxed); }
void note_stream_sync() { g_syncs.fetch_add(1, std::memory_order_relaxed); }
void note_h2d_upload() { g_h2d.fetch_add(1, std::memory_order_relaxed); }

}  // namespace cm
