// Counters of the points where the host waits for tensor values: device-to-host copies and stream
// synchronisations. They exist in every build, so that a training step's host round trips can be counted (and
// tested) on a machine without a GPU.
//
// What counts:
//   - Every read-out of tensor values by the host (Tensor::item, to_f32_vector, to_i32_vector, copy_ or to() into
//     host memory, and the model's bookkeeping reads that go through note_host_read) counts one device-to-host copy
//     and one stream synchronisation, on any device. On CUDA both are real; on the CPU they mark the place where a
//     device build would wait, so the CPU build measures the same bookkeeping paths.
//   - CUDA builds also count the synchronisations that are not read-outs: a blocking upload, an explicit
//     cuda::sync(), an index check that waits for its answer.
//   - CUDA builds count every upload of host memory to the device (cuda::upload: batches, tables, pointer lists),
//     waiting or not: a step that re-sends what the device already holds shows here even when nothing waits.
// A training step that does not log should count 0 (train_lm prints "host syncs/step" in its done: line).
#pragma once
#include <cstdint>

namespace cm {

struct HostSyncStats {
  int64_t d2h_copies = 0;    // device-to-host copies (real on CUDA, would-be on the CPU)
  int64_t stream_syncs = 0;  // times the host waited for the stream (likewise)
  int64_t h2d_uploads = 0;   // host-to-device copies of host memory (CUDA builds; 0 on the CPU)
};
HostSyncStats host_sync_stats();
void reset_host_sync_stats();

// A read-out of tensor values by the host: one copy and one wait. Called by the engine's read-out entry points on
// CPU tensors (the CUDA copy counts itself in engine/cuda.cu) and by bookkeeping that reads host memory directly.
void note_host_read();
// The engine's CUDA side: one real device-to-host copy; one real stream synchronisation.
void note_d2h_copy();
void note_stream_sync();
// The engine's CUDA side: one upload of host memory to the device.
void note_h2d_upload();

}  // namespace cm
