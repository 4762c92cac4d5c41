// Runs each eagle_kernels CUDA kernel on a tiny case through the C API (api.h) and checks the result against
// a host computation. Exit status: 0 passed, 1 failed, 77 no CUDA device (ctest reports that as skipped).
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "kernels/api.h"

namespace {

int failures = 0;

#define CHECK_CUDA(call)                                                                               \
  do {                                                                                                 \
    cudaError_t status_ = (call);                                                                      \
    if (status_ != cudaSuccess) {                                                                      \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(status_)); \
      std::exit(1);                                                                                    \
    }                                                                                                  \
  } while (0)

void expect(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "FAILED: %s\n", what);
    ++failures;
  }
}

template <typename T>
T* to_device(const std::vector<T>& host) {
  T* device = nullptr;
  CHECK_CUDA(cudaMalloc(&device, host.size() * sizeof(T) + 16));
  CHECK_CUDA(cudaMemcpy(device, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice));
  return device;
}

template <typename T>
std::vector<T> to_host(const T* device, size_t count) {
  std::vector<T> host(count);
  CHECK_CUDA(cudaMemcpy(host.data(), device, count * sizeof(T), cudaMemcpyDeviceToHost));
  return host;
}

// kv_compact on a [L, 2, B, H, S, D] cache of `elem_bytes`-byte elements (filled with distinct byte
// patterns).
void test_kv_compact(int64_t head_dim, int64_t elem_bytes) {
  const int64_t layers = 2, batch = 2, heads = 2, max_len = 16, num_src = 3;
  const std::vector<int32_t> lengths = {3, 0}, counts = {3, 2};
  const std::vector<int64_t> src = {2, 0, 1, 5, 1, 0};  // overlapping moves; the last entry is ignored
  const int64_t row_bytes = head_dim * elem_bytes, slabs = layers * 2 * batch * heads;
  std::vector<uint8_t> cache(static_cast<size_t>(slabs * max_len * row_bytes));
  for (size_t i = 0; i < cache.size(); ++i) cache[i] = static_cast<uint8_t>(i * 131 + 7);
  std::vector<uint8_t> expected = cache;
  for (int64_t slab = 0; slab < slabs; ++slab) {
    const int64_t b = (slab / heads) % batch;
    uint8_t* rows = expected.data() + slab * max_len * row_bytes;
    std::vector<uint8_t> staged(static_cast<size_t>(counts[b] * row_bytes));
    for (int64_t i = 0; i < counts[b]; ++i)
      std::memcpy(&staged[i * row_bytes], rows + (lengths[b] + src[b * num_src + i]) * row_bytes, row_bytes);
    for (int64_t i = 0; i < counts[b]; ++i)
      std::memcpy(rows + (lengths[b] + i) * row_bytes, &staged[i * row_bytes], row_bytes);
  }
  uint8_t* d_cache = to_device(cache);
  int32_t* d_lengths = to_device(lengths);
  int32_t* d_counts = to_device(counts);
  int64_t* d_src = to_device(src);
  CHECK_CUDA(eagle_kv_compact(d_cache, d_lengths, d_src, d_counts, layers, batch, heads, max_len, head_dim,
                              elem_bytes, num_src, nullptr));
  expect(to_host(d_cache, cache.size()) == expected, "kv_compact moves the accepted rows (overlap-safe)");
  cudaFree(d_cache), cudaFree(d_lengths), cudaFree(d_counts), cudaFree(d_src);
}

// node: 0 1 2 3 4 5; parent: -1 0 0 1 2 3; token: 10 5 6 7 8 9
void test_tree_verify_greedy() {
  const std::vector<int64_t> tokens = {10, 5, 6, 7, 8, 9, 10, 5, 6, 7, 8, 9};
  const std::vector<int32_t> parents = {-1, 0, 0, 1, 2, 3, -1, 0, 0, 1, 2, 3};
  const std::vector<int64_t> argmax = {6, 0, 8, 0, 3, 0, 99, 0, 0, 0, 0, 0};
  int64_t* d_tokens = to_device(tokens);
  int32_t* d_parents = to_device(parents);
  int64_t* d_argmax = to_device(argmax);
  int32_t *d_num, *d_nodes;
  int64_t* d_bonus;
  CHECK_CUDA(cudaMalloc(&d_num, 2 * sizeof(int32_t)));
  CHECK_CUDA(cudaMalloc(&d_nodes, 12 * sizeof(int32_t)));
  CHECK_CUDA(cudaMalloc(&d_bonus, 2 * sizeof(int64_t)));
  CHECK_CUDA(eagle_tree_verify_greedy(d_tokens, d_parents, d_argmax, 2, 6, d_num, d_nodes, d_bonus, nullptr));
  expect(to_host(d_num, 2) == std::vector<int32_t>({2, 0}), "greedy num_accepted");
  expect(to_host(d_nodes, 12) == std::vector<int32_t>({0, 2, 4, -1, -1, -1, 0, -1, -1, -1, -1, -1}),
         "greedy accepted_nodes");
  expect(to_host(d_bonus, 2) == std::vector<int64_t>({3, 99}), "greedy bonus");
  cudaFree(d_tokens), cudaFree(d_parents), cudaFree(d_argmax), cudaFree(d_num), cudaFree(d_nodes),
      cudaFree(d_bonus);
}

// The hand-built case of tests/test_tree_verify.py: node 1 rejected, node 2 accepted, node 3 rejected,
// bonus 2.
void test_tree_verify_sampling() {
  const std::vector<int64_t> tokens = {3, 2, 1, 0};
  const std::vector<int32_t> parents = {-1, 0, 0, 2};
  std::vector<float> probs(16, 0.25f);
  const float root[4] = {0.1f, 0.2f, 0.3f, 0.4f}, node2[4] = {0.5f, 0.25f, 0.125f, 0.125f};
  std::memcpy(&probs[0], root, sizeof(root));
  std::memcpy(&probs[8], node2, sizeof(node2));
  const std::vector<float> uniforms = {0.6f, 0.9f, 0.2f, 0.95f};
  int64_t* d_tokens = to_device(tokens);
  int32_t* d_parents = to_device(parents);
  float* d_probs = to_device(probs);
  float* d_uniforms = to_device(uniforms);
  int32_t *d_num, *d_nodes;
  int64_t* d_bonus;
  CHECK_CUDA(cudaMalloc(&d_num, sizeof(int32_t)));
  CHECK_CUDA(cudaMalloc(&d_nodes, 4 * sizeof(int32_t)));
  CHECK_CUDA(cudaMalloc(&d_bonus, sizeof(int64_t)));
  CHECK_CUDA(eagle_tree_verify_sampling(d_tokens, d_parents, d_probs, d_uniforms, 1, 4, 4, d_num, d_nodes,
                                        d_bonus, nullptr));
  expect(to_host(d_num, 1) == std::vector<int32_t>({1}), "sampling num_accepted");
  expect(to_host(d_nodes, 4) == std::vector<int32_t>({0, 2, -1, -1}), "sampling accepted_nodes");
  expect(to_host(d_bonus, 1) == std::vector<int64_t>({2}), "sampling bonus");
  cudaFree(d_tokens), cudaFree(d_parents), cudaFree(d_probs), cudaFree(d_uniforms), cudaFree(d_num),
      cudaFree(d_nodes), cudaFree(d_bonus);
}

// A leaf root over a large vocabulary: the bonus is the inverse CDF, computed here sequentially in double.
void test_sampling_inverse_cdf_large_vocab() {
  const int64_t vocab = 50000, draws = 64;
  std::vector<float> row(vocab);
  for (int64_t v = 0; v < vocab; ++v)
    row[v] = (v % 3 == 0) ? 0.0f : static_cast<float>((v * 7919) % 1000 + 1);
  std::vector<float> probs, uniforms;
  for (int64_t d = 0; d < draws; ++d) {
    probs.insert(probs.end(), row.begin(), row.end());
    uniforms.push_back(static_cast<float>((d * 0.618034) - static_cast<int64_t>(d * 0.618034)));
  }
  double total = 0.0;
  for (float p : row) total += p;
  std::vector<int64_t> expected(draws);
  for (int64_t d = 0; d < draws; ++d) {
    const double threshold = static_cast<double>(uniforms[d]) * total;
    double cdf = 0.0;
    int64_t v = 0;
    for (; v < vocab; ++v) {
      cdf += row[v];
      if (row[v] > 0.0f && cdf > threshold) break;
    }
    expected[d] = v;
  }
  const std::vector<int64_t> tokens(draws, 0);
  const std::vector<int32_t> parents(draws, -1);
  int64_t* d_tokens = to_device(tokens);
  int32_t* d_parents = to_device(parents);
  float* d_probs = to_device(probs);
  float* d_uniforms = to_device(uniforms);
  int32_t *d_num, *d_nodes;
  int64_t* d_bonus;
  CHECK_CUDA(cudaMalloc(&d_num, draws * sizeof(int32_t)));
  CHECK_CUDA(cudaMalloc(&d_nodes, draws * sizeof(int32_t)));
  CHECK_CUDA(cudaMalloc(&d_bonus, draws * sizeof(int64_t)));
  CHECK_CUDA(eagle_tree_verify_sampling(d_tokens, d_parents, d_probs, d_uniforms, draws, 1, vocab, d_num,
                                        d_nodes, d_bonus, nullptr));
  expect(to_host(d_bonus, draws) == expected, "sampling inverse CDF over 50000 entries");
  cudaFree(d_tokens), cudaFree(d_parents), cudaFree(d_probs), cudaFree(d_uniforms), cudaFree(d_num),
      cudaFree(d_nodes), cudaFree(d_bonus);
}

}  // namespace

int main() {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("no CUDA device: skipped\n");
    return 77;
  }
  test_kv_compact(8, 4);  // fp32 rows of 32 bytes: 16-byte vectors
  test_kv_compact(3, 2);  // 6-byte rows: 2-byte accesses
  test_tree_verify_greedy();
  test_tree_verify_sampling();
  test_sampling_inverse_cdf_large_vocab();
  CHECK_CUDA(cudaDeviceSynchronize());
  std::printf(failures == 0 ? "all kernel tests passed\n" : "%d kernel test(s) failed\n", failures);
  return failures == 0 ? 0 : 1;
}
