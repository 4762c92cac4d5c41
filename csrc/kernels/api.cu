// The C entry points of api.h: thin forwards to the launchers of the .cuh kernels.
#include "api.h"
#include "kv_compact.cuh"
#include "tree_verify.cuh"

extern "C" {

cudaError_t eagle_kv_compact(void* cache, const int32_t* lengths, const int64_t* src, const int32_t* counts,
                             int64_t num_layers, int64_t batch, int64_t kv_heads, int64_t max_len,
                             int64_t head_dim, int64_t elem_bytes, int64_t num_src, cudaStream_t stream) {
  return eagle_kernels::launch_kv_compact<int64_t>(cache, lengths, src, counts, num_layers, batch, kv_heads,
                                                   max_len, head_dim, elem_bytes, num_src, stream);
}

cudaError_t eagle_tree_verify_greedy(const int64_t* tokens, const int32_t* parents,
                                     const int64_t* target_argmax, int64_t batch, int64_t num_nodes,
                                     int32_t* num_accepted, int32_t* accepted_nodes, int64_t* bonus,
                                     cudaStream_t stream) {
  using eagle_kernels::IntView;
  return eagle_kernels::launch_tree_verify_greedy(IntView{tokens, true}, IntView{parents, false},
                                                  IntView{target_argmax, true}, batch, num_nodes,
                                                  num_accepted, accepted_nodes, bonus, stream);
}

cudaError_t eagle_tree_verify_sampling(const int64_t* tokens, const int32_t* parents,
                                       const float* target_probs, const float* uniforms, int64_t batch,
                                       int64_t num_nodes, int64_t vocab, int32_t* num_accepted,
                                       int32_t* accepted_nodes, int64_t* bonus, cudaStream_t stream) {
  using eagle_kernels::IntView;
  return eagle_kernels::launch_tree_verify_sampling(IntView{tokens, true}, IntView{parents, false},
                                                    target_probs, uniforms, batch, num_nodes, vocab,
                                                    num_accepted, accepted_nodes, bonus, stream);
}

}  // extern "C"
