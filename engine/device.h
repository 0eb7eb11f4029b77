// The CUDA side of memory, as seen by the engine. Declared always; defined by engine/cuda.cu in CUDA builds.
// In CPU-only builds these throw cm::Error("... built without CUDA").
#pragma once
#include <cstddef>

namespace cm {

void* cuda_alloc(size_t nbytes);  // from the caching allocator
void cuda_free(void* p);          // back to the caching allocator
enum class CopyKind { HostToDevice, DeviceToHost, DeviceToDevice };
// On the engine's stream. DeviceToHost returns when the copy is complete. HostToDevice returns once the source has
// been staged (the host buffer may be reused or freed at once), without waiting for the device; DeviceToDevice
// returns at once.
void cuda_copy(void* dst, const void* src, size_t nbytes, CopyKind kind);
bool cuda_device_present();  // built with CUDA and cudaGetDeviceCount reports a device; never throws

}  // namespace cm
