// Plain C entry points of the eagle_kernels CUDA kernels, for use outside Python (CMake static library
// `eagle_kernels_cuda`). Device pointers in, cudaError_t out; every call is asynchronous on `stream`.
// Semantics and shapes: eagle_kernels/reference.py (kv_compact, tree_verify_greedy, tree_verify_sampling).
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// cache: contiguous [num_layers, 2, batch, kv_heads, max_len, head_dim] of elem_bytes-byte elements;
// lengths, counts: int32 [batch]; src: int64 [batch, num_src].
cudaError_t eagle_kv_compact(void* cache, const int32_t* lengths, const int64_t* src, const int32_t* counts,
                             int64_t num_layers, int64_t batch, int64_t kv_heads, int64_t max_len,
                             int64_t head_dim, int64_t elem_bytes, int64_t num_src, cudaStream_t stream);

// tokens, target_argmax: int64 [batch, num_nodes]; parents: int32 [batch, num_nodes];
// outputs num_accepted int32 [batch], accepted_nodes int32 [batch, num_nodes], bonus int64 [batch].
cudaError_t eagle_tree_verify_greedy(const int64_t* tokens, const int32_t* parents,
                                     const int64_t* target_argmax, int64_t batch, int64_t num_nodes,
                                     int32_t* num_accepted, int32_t* accepted_nodes, int64_t* bonus,
                                     cudaStream_t stream);

// target_probs: fp32 [batch, num_nodes, vocab]; uniforms: fp32 [batch, num_nodes]; the rest as greedy.
cudaError_t eagle_tree_verify_sampling(const int64_t* tokens, const int32_t* parents,
                                       const float* target_probs, const float* uniforms, int64_t batch,
                                       int64_t num_nodes, int64_t vocab, int32_t* num_accepted,
                                       int32_t* accepted_nodes, int64_t* bonus, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
