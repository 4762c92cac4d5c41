// The current CUDA stream of a device, for the torch glue, without linking c10_cuda.
//
// Why not at::cuda::getCurrentCUDAStream(): it is defined in libc10_cuda, which a CPU build of torch does not
// ship, so an extension that calls it can be neither linked nor loaded where CI runs: CPU-only machines with
// a CUDA toolkit. c10's device-generic interface reaches the same stream through virtual calls: c10 core
// keeps a registry of per-device-type guard implementations, and CUDA builds of torch register theirs (from
// c10_cuda) when torch is imported. The same binary therefore links against c10 alone, loads under a CPU
// torch (where CUDA tensors, and so these code paths, cannot occur) and follows torch's current stream,
// CUDA-graph capture included, under a CUDA torch.
//
// DeviceGuardImplInterface::getStreamNativeHandle is recent (2026). With older torch headers the glue falls
// back to c10::cuda::getCurrentCUDAStream, which is then available because only CUDA builds of torch ship
// c10/cuda's generated headers (and setup.py's CUDAExtension links c10_cuda).
#pragma once

#include <c10/core/Device.h>
#include <c10/core/Stream.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#include <type_traits>
#include <utility>

#if __has_include(<c10/cuda/impl/cuda_cmake_macros.h>)
#include <c10/cuda/CUDAStream.h>
#define EAGLE_KERNELS_HAVE_C10_CUDA_HEADERS 1
#endif

namespace eagle_kernels {

template <typename Impl, typename = void>
struct HasStreamNativeHandle : std::false_type {};
template <typename Impl>
struct HasStreamNativeHandle<Impl, std::void_t<decltype(std::declval<const Impl&>().getStreamNativeHandle(
                                       std::declval<c10::Stream>()))>> : std::true_type {};

template <typename Impl = c10::impl::DeviceGuardImplInterface>
cudaStream_t current_cuda_stream(c10::Device device) {
  TORCH_CHECK(device.is_cuda(), "eagle_kernels: expected a CUDA device, got ", device);
  if constexpr (HasStreamNativeHandle<Impl>::value) {
    const Impl* cuda_impl = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA);
    return static_cast<cudaStream_t>(cuda_impl->getStreamNativeHandle(cuda_impl->getStream(device)));
  } else {
#ifdef EAGLE_KERNELS_HAVE_C10_CUDA_HEADERS
    return c10::cuda::getCurrentCUDAStream(device.index()).stream();
#else
    static_assert(HasStreamNativeHandle<Impl>::value,
                  "torch headers have neither DeviceGuardImplInterface::getStreamNativeHandle nor c10/cuda");
    return nullptr;
#endif
  }
}

inline void check_launch(cudaError_t status, const char* op) {
  TORCH_CHECK(status == cudaSuccess, "eagle_kernels.", op,
              ": CUDA launch failed: ", cudaGetErrorString(status));
}

}  // namespace eagle_kernels
