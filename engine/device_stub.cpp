// CPU-only builds: the CUDA memory hooks exist and explain themselves.
#if !CM_CUDA
#include "engine/check.h"
#include "engine/device.h"

namespace cm {

void* cuda_alloc(size_t) { fail("this build has no CUDA support (nvcc was not found at build time)"); }
void cuda_free(void*) {}
void cuda_copy(void*, const void*, size_t, CopyKind) { fail("this build has no CUDA support"); }
bool cuda_device_present() { return false; }

}  // namespace cm
#endif
