// Checkpoints in the safetensors layout (https://github.com/huggingface/safetensors), so that
// `safetensors.torch.load_file` opens them:
//
//   [8 bytes] N, little-endian u64: the header's length
//   [N bytes] JSON: {"__metadata__": {string: string}, name: {"dtype": "F32"|"I32", "shape": [...],
//              "data_offsets": [begin, end]}, ...}, padded with spaces to a multiple of 8
//   [rest]    the tensors' raw little-endian bytes; offsets are relative to the end of the header, and the
//             tensors tile the buffer exactly (no holes, no overlaps)
//
// Saving is atomic: write `<path>.tmp`, fsync, rename over `path`, fsync the directory. A crash leaves either the
// old file or the new one, never a torn one. Loading validates everything (sizes, offsets, dtypes, shapes, JSON)
// before anything is handed out, and every problem is a cm::Error that names the file and what is wrong.
#pragma once
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "engine/tensor.h"

namespace cm {

using NamedTensors = std::vector<std::pair<std::string, Tensor>>;
using Metadata = std::vector<std::pair<std::string, std::string>>;

struct SafeTensors {
  std::string path;
  Metadata metadata;
  NamedTensors tensors;  // CPU, contiguous, in file order
  const Tensor* find(const std::string& name) const;
  const std::string* meta(const std::string& key) const;
  // A metadata value that must be present; the error names the file and the key.
  const std::string& require_meta(const std::string& key) const;
};

// Tensors may live on any device and have any layout; names must be unique and non-empty, and may not be
// "__metadata__".
void save_safetensors(const std::string& path, const NamedTensors& tensors, const Metadata& metadata);
SafeTensors load_safetensors(const std::string& path);
// Only the header's metadata (cheap: the tensors are not read). The header is validated as by load_safetensors.
Metadata read_safetensors_metadata(const std::string& path);

// Copy `file`'s tensors into `dst` (matched by name; dtypes and shapes must agree; `dst` may live on any device).
// The file must hold exactly the names in `dst`, apart from names starting with `ignore_prefix` (sample.cpp
// skips the optimizer's "adamw." moments). Everything is checked before the first byte is copied, so a mismatch
// leaves `dst` untouched.
void restore_tensors(const SafeTensors& file, const NamedTensors& dst, const std::string& ignore_prefix = "");

// ---------------------------------------------------------------- checkpoint files in an out_dir
// Names: ckpt_<step, 8 digits>.safetensors, so that lexical order is step order (llm.c's model_00005000.bin).
std::string checkpoint_path(const std::string& out_dir, int64_t step);
// The newest checkpoint in out_dir, or "" when there is none (a missing directory has none).
std::string latest_checkpoint(const std::string& out_dir);
// Delete all but the `keep_last` newest checkpoints (keep_last = 0 keeps all). Returns the paths removed.
std::vector<std::string> prune_checkpoints(const std::string& out_dir, int64_t keep_last);

}  // namespace cm
