// Fuzz target: the safetensors loader (model/checkpoint.*), the first thing that reads a checkpoint file.
// Input: the file's bytes. Properties beyond "no crash, no leak, no UB":
//   - every rejection is a cm::Error (anything else escaping, e.g. std::length_error or bad_alloc, is a finding);
//   - the metadata-only reader agrees with the full loader (both accept, with equal metadata, or both reject);
//   - an accepted file round-trips: saving what was loaded and loading that gives the same names, dtypes,
//     shapes, bytes and metadata.
#include <cstring>

#include "fuzz/fuzz_util.h"
#include "model/checkpoint.h"

using namespace cm;

static bool same_tensor(const Tensor& a, const Tensor& b) {
  if (a.dtype() != b.dtype() || a.shape() != b.shape()) return false;
  size_t nb = (size_t)a.numel() * dtype_size(a.dtype());
  return nb == 0 || std::memcmp(a.raw(), b.raw(), nb) == 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path = fuzz::write_file("in.safetensors", data, size);
  bool meta_ok = false, load_ok = false;
  Metadata meta;
  try {
    meta = read_safetensors_metadata(path);
    meta_ok = true;
  } catch (const Error&) {
  }
  SafeTensors st;
  try {
    st = load_safetensors(path);
    load_ok = true;
  } catch (const Error&) {
  }
  FUZZ_ASSERT(meta_ok == load_ok, "read_safetensors_metadata and load_safetensors disagree");
  if (!load_ok) return 0;
  FUZZ_ASSERT(meta == st.metadata, "metadata differs between the two readers");

  // Round trip. Names the writer refuses (empty, "__metadata__") cannot come out of the loader.
  const std::string out = fuzz::scratch_dir() + "/out.safetensors";
  save_safetensors(out, st.tensors, st.metadata);
  SafeTensors back = load_safetensors(out);
  FUZZ_ASSERT(back.metadata == st.metadata, "metadata changed in a save/load round trip");
  FUZZ_ASSERT(back.tensors.size() == st.tensors.size(), "tensor count changed in a round trip");
  for (size_t i = 0; i < st.tensors.size(); ++i) {
    FUZZ_ASSERT(back.tensors[i].first == st.tensors[i].first, "tensor name or order changed in a round trip");
    FUZZ_ASSERT(same_tensor(back.tensors[i].second, st.tensors[i].second), "tensor changed in a round trip");
  }
  return 0;
}
