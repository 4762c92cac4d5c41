// The current CUDA stream of a device, for the torch glue, without linking c10_cuda.
//
// Why not at::cuda::getCurrentCUDAStream(): it is defined in libc10_cuda, which a CPU build of torch does not
// ship, so an extension that calls it cannot be linked (or loaded) where CI runs: CPU-only machines with a CUDA
// toolkit. c10's device-generic interface reaches the same stream through a virtual call: c10 core keeps a
// registry of per-device-type guard implementations, and CUDA builds of torch register theirs (from c10_cuda)
// when torch is imported. The same binary therefore links against c10 alone, loads under a CPU torch (where
// CUDA tensors, and so these code paths, cannot occur) and follows torch's current stream, CUDA-graph capture
// included, under a CUDA torch.
#pragma once

#include <c10/core/Device.h>
#include <c10/core/Stream.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

namespace eagle_kernels {

inline cudaStream_t current_cuda_stream(c10::Device device) {
  TORCH_CHECK(device.is_cuda(), "eagle_kernels: expected a CUDA device, got ", device);
  const c10::impl::DeviceGuardImplInterface* cuda_impl = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA);
  return static_cast<cudaStream_t>(cuda_impl->getStreamNativeHandle(cuda_impl->getStream(device)));
}

inline void check_launch(cudaError_t status, const char* op) {
  TORCH_CHECK(status == cudaSuccess, "eagle_kernels.", op, ": CUDA launch failed: ", cudaGetErrorString(status));
}

}  // namespace eagle_kernels
