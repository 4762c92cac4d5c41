// Every schema of the eagle_kernels op library, in one place (sgl-kernel's convention: outputs are mutated
// arguments annotated `Tensor(a!)`, ops return `()`, so callers allocate outputs and a round can be captured
// in a CUDA graph). The CUDA implementations register themselves from kv_compact.cu and tree_verify.cu with
// TORCH_LIBRARY_IMPL(eagle_kernels, CUDA, m); this file needs no CUDA at all.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

TORCH_LIBRARY(eagle_kernels, m) {
  // cache [L, 2, B, Hkv, S, D] bf16/fp16/fp32; lengths, counts int32 [B]; src int32/int64 [B, N].
  m.def("kv_compact(Tensor(a!) cache, Tensor lengths, Tensor src, Tensor counts) -> ()");
  // tokens, target_argmax int32/int64 [B, T]; parents int32 [B, T];
  // num_accepted int32 [B], accepted_nodes int32 [B, T], bonus int64 [B].
  m.def(
      "tree_verify_greedy(Tensor tokens, Tensor parents, Tensor target_argmax, Tensor(a!) num_accepted, "
      "Tensor(b!) accepted_nodes, Tensor(c!) bonus) -> ()");
  // target_probs fp32 [B, T, V]; uniforms fp32 [B, T]; the rest as tree_verify_greedy.
  m.def(
      "tree_verify_sampling(Tensor tokens, Tensor parents, Tensor target_probs, Tensor uniforms, "
      "Tensor(a!) num_accepted, Tensor(b!) accepted_nodes, Tensor(c!) bonus) -> ()");
}

// Meta kernels: the ops only mutate their arguments, so under fake tensors (torch.compile tracing) there is
// nothing to compute.
TORCH_LIBRARY_IMPL(eagle_kernels, Meta, m) {
  m.impl("kv_compact", [](const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&) {});
  m.impl("tree_verify_greedy", [](const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                  const at::Tensor&, const at::Tensor&) {});
  m.impl("tree_verify_sampling",
         [](const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
            const at::Tensor&, const at::Tensor&) {});
}
