// Torch glue of tree_verify_greedy / tree_verify_sampling: checks, device guard, current stream, launchers
// (kernels/tree_verify.cuh).
#include <ATen/core/Tensor.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include "cuda_stream.h"
#include "kernels/tree_verify.cuh"

namespace eagle_kernels {
namespace {

IntView int_view(const at::Tensor& t, const char* op, const char* name, const at::Tensor& like) {
  TORCH_CHECK(t.device() == like.device(), op, ": ", name, " must be on ", like.device());
  TORCH_CHECK(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong, op, ": ", name,
              " must be int32 or int64, got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == like.sizes(), op, ": ", name, " must have shape ", like.sizes(), ", got ",
              t.sizes());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
  return IntView{t.data_ptr(), t.scalar_type() == at::kLong};
}

void check_outputs(const char* op, const at::Tensor& tokens, const at::Tensor& num_accepted,
                   const at::Tensor& accepted_nodes, const at::Tensor& bonus) {
  const int64_t batch = tokens.size(0);
  const struct {
    const at::Tensor& tensor;
    const char* name;
    at::ScalarType dtype;
    std::vector<int64_t> shape;
  } outputs[] = {{num_accepted, "num_accepted", at::kInt, {batch}},
                 {accepted_nodes, "accepted_nodes", at::kInt, {batch, tokens.size(1)}},
                 {bonus, "bonus", at::kLong, {batch}}};
  for (const auto& out : outputs) {
    TORCH_CHECK(out.tensor.device() == tokens.device(), op, ": ", out.name, " must be on ", tokens.device());
    TORCH_CHECK(out.tensor.scalar_type() == out.dtype, op, ": ", out.name, " must be ", out.dtype);
    TORCH_CHECK(out.tensor.sizes() == c10::IntArrayRef(out.shape), op, ": ", out.name, " must have shape ",
                c10::IntArrayRef(out.shape), ", got ", out.tensor.sizes());
    TORCH_CHECK(out.tensor.is_contiguous(), op, ": ", out.name, " must be contiguous");
  }
}

void tree_verify_greedy_cuda(const at::Tensor& tokens, const at::Tensor& parents,
                             const at::Tensor& target_argmax, const at::Tensor& num_accepted,
                             const at::Tensor& accepted_nodes, const at::Tensor& bonus) {
  const char* op = "tree_verify_greedy";
  TORCH_CHECK(tokens.is_cuda() && tokens.dim() == 2, op, ": tokens must be a CUDA [B, T] tensor");
  const IntView tokens_view = int_view(tokens, op, "tokens", tokens);
  const IntView parents_view = int_view(parents, op, "parents", tokens);
  const IntView argmax_view = int_view(target_argmax, op, "target_argmax", tokens);
  check_outputs(op, tokens, num_accepted, accepted_nodes, bonus);

  c10::DeviceGuard device_guard(tokens.device());
  const cudaStream_t stream = current_cuda_stream(tokens.device());
  check_launch(
      launch_tree_verify_greedy(tokens_view, parents_view, argmax_view, tokens.size(0), tokens.size(1),
                                num_accepted.data_ptr<int32_t>(), accepted_nodes.data_ptr<int32_t>(),
                                bonus.data_ptr<int64_t>(), stream),
      op);
}

void tree_verify_sampling_cuda(const at::Tensor& tokens, const at::Tensor& parents,
                               const at::Tensor& target_probs, const at::Tensor& uniforms,
                               const at::Tensor& num_accepted, const at::Tensor& accepted_nodes,
                               const at::Tensor& bonus) {
  const char* op = "tree_verify_sampling";
  TORCH_CHECK(tokens.is_cuda() && tokens.dim() == 2, op, ": tokens must be a CUDA [B, T] tensor");
  const IntView tokens_view = int_view(tokens, op, "tokens", tokens);
  const IntView parents_view = int_view(parents, op, "parents", tokens);
  const int64_t batch = tokens.size(0), num_nodes = tokens.size(1);
  TORCH_CHECK(target_probs.device() == tokens.device() && uniforms.device() == tokens.device(), op,
              ": target_probs and uniforms must be on ", tokens.device());
  TORCH_CHECK(target_probs.scalar_type() == at::kFloat && uniforms.scalar_type() == at::kFloat, op,
              ": target_probs and uniforms must be float32");
  TORCH_CHECK(target_probs.dim() == 3 && target_probs.size(0) == batch && target_probs.size(1) == num_nodes,
              op, ": target_probs must be [B, T, V], got ", target_probs.sizes());
  TORCH_CHECK(uniforms.sizes() == tokens.sizes(), op, ": uniforms must be [B, T], got ", uniforms.sizes());
  TORCH_CHECK(target_probs.is_contiguous() && uniforms.is_contiguous(), op,
              ": target_probs and uniforms must be contiguous");
  check_outputs(op, tokens, num_accepted, accepted_nodes, bonus);

  c10::DeviceGuard device_guard(tokens.device());
  const cudaStream_t stream = current_cuda_stream(tokens.device());
  check_launch(launch_tree_verify_sampling(
                   tokens_view, parents_view, target_probs.data_ptr<float>(), uniforms.data_ptr<float>(),
                   batch, num_nodes, target_probs.size(2), num_accepted.data_ptr<int32_t>(),
                   accepted_nodes.data_ptr<int32_t>(), bonus.data_ptr<int64_t>(), stream),
               op);
}

}  // namespace
}  // namespace eagle_kernels

TORCH_LIBRARY_IMPL(eagle_kernels, CUDA, m) {
  m.impl("tree_verify_greedy", &eagle_kernels::tree_verify_greedy_cuda);
  m.impl("tree_verify_sampling", &eagle_kernels::tree_verify_sampling_cuda);
}
