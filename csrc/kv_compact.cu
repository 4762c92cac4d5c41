// Torch glue of kv_compact: checks, device guard, current stream, launcher (kernels/kv_compact.cuh).
#include <ATen/core/Tensor.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include "cuda_stream.h"
#include "kernels/kv_compact.cuh"

namespace eagle_kernels {
namespace {

void check_int_vector(const at::Tensor& t, const char* name, const at::Tensor& cache, int64_t batch) {
  TORCH_CHECK(t.device() == cache.device(), "kv_compact: ", name, " must be on ", cache.device());
  TORCH_CHECK(t.scalar_type() == at::kInt, "kv_compact: ", name, " must be int32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == batch, "kv_compact: ", name, " must have shape [", batch, "]");
  TORCH_CHECK(t.is_contiguous(), "kv_compact: ", name, " must be contiguous");
}

void kv_compact_cuda(const at::Tensor& cache, const at::Tensor& lengths, const at::Tensor& src,
                     const at::Tensor& counts) {
  TORCH_CHECK(cache.is_cuda(), "kv_compact: cache must be a CUDA tensor");
  TORCH_CHECK(cache.dim() == 6 && cache.size(1) == 2, "kv_compact: cache must be [L, 2, B, Hkv, S, D], got ",
              cache.sizes());
  TORCH_CHECK(cache.is_contiguous(), "kv_compact: cache must be contiguous");
  const auto dtype = cache.scalar_type();
  TORCH_CHECK(dtype == at::kBFloat16 || dtype == at::kHalf || dtype == at::kFloat,
              "kv_compact: cache must be bf16, fp16 or fp32, got ", dtype);
  const int64_t batch = cache.size(2);
  check_int_vector(lengths, "lengths", cache, batch);
  check_int_vector(counts, "counts", cache, batch);
  TORCH_CHECK(src.device() == cache.device(), "kv_compact: src must be on ", cache.device());
  TORCH_CHECK(src.scalar_type() == at::kInt || src.scalar_type() == at::kLong,
              "kv_compact: src must be int32 or int64, got ", src.scalar_type());
  TORCH_CHECK(src.dim() == 2 && src.size(0) == batch, "kv_compact: src must be [", batch, ", N], got ",
              src.sizes());
  TORCH_CHECK(src.is_contiguous(), "kv_compact: src must be contiguous");

  c10::DeviceGuard device_guard(cache.device());
  const cudaStream_t stream = current_cuda_stream(cache.device());
  const int64_t num_layers = cache.size(0), kv_heads = cache.size(3), max_len = cache.size(4);
  const int64_t head_dim = cache.size(5), elem_bytes = cache.element_size(), num_src = src.size(1);
  cudaError_t status;
  if (src.scalar_type() == at::kLong) {
    status = launch_kv_compact<int64_t>(cache.data_ptr(), lengths.data_ptr<int32_t>(),
                                        src.data_ptr<int64_t>(), counts.data_ptr<int32_t>(), num_layers,
                                        batch, kv_heads, max_len, head_dim, elem_bytes, num_src, stream);
  } else {
    status = launch_kv_compact<int32_t>(cache.data_ptr(), lengths.data_ptr<int32_t>(),
                                        src.data_ptr<int32_t>(), counts.data_ptr<int32_t>(), num_layers,
                                        batch, kv_heads, max_len, head_dim, elem_bytes, num_src, stream);
  }
  check_launch(status, "kv_compact");
}

}  // namespace
}  // namespace eagle_kernels

TORCH_LIBRARY_IMPL(eagle_kernels, CUDA, m) { m.impl("kv_compact", &eagle_kernels::kv_compact_cuda); }
