// Verification of one draft tree per sequence: greedy (token == target argmax at the parent) and lossless
// sampling (rejection sampling over the children of each accepted node, then a bonus token from the
// residual). Torch-free; one block per sequence; no host synchronisation.
//
// Semantics: eagle_kernels.reference.tree_verify_greedy / tree_verify_sampling. Outputs per sequence b:
// num_accepted[b] (int32, accepted nodes after the root), accepted_nodes[b, :] (int32 path from the root,
// -1 padded) and bonus[b] (int64).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

namespace eagle_kernels {

// Integer inputs may be int32 or int64 (token ids usually int64, parents int32): one reader for both.
struct IntView {
  const void* data;
  bool is_int64;
  __device__ __forceinline__ int64_t operator[](int64_t i) const {
    return is_int64 ? static_cast<const int64_t*>(data)[i]
                    : static_cast<int64_t>(static_cast<const int32_t*>(data)[i]);
  }
};

constexpr int kGreedyThreads = 128;

// accepted_nodes row: the path, then -1 padding.
__device__ __forceinline__ void write_path(int32_t* accepted_nodes_row, const int32_t* path, int path_len,
                                           int64_t num_nodes) {
  for (int64_t i = threadIdx.x; i < num_nodes; i += blockDim.x)
    accepted_nodes_row[i] = i < path_len ? path[i] : -1;
}

__global__ void tree_verify_greedy_kernel(IntView tokens, IntView parents, IntView target_argmax,
                                          int64_t num_nodes, int32_t* __restrict__ num_accepted,
                                          int32_t* __restrict__ accepted_nodes, int64_t* __restrict__ bonus) {
  extern __shared__ int32_t greedy_smem[];
  int32_t* parent_of = greedy_smem;             // [T]
  int32_t* matches = greedy_smem + num_nodes;   // [T]: token equals the target's argmax at the parent
  int32_t* path = greedy_smem + 2 * num_nodes;  // [T]
  __shared__ int path_len;
  const int64_t b = blockIdx.x;
  const int64_t row = b * num_nodes;
  // All loads in parallel; the walk below then reads shared memory only.
  for (int64_t i = threadIdx.x; i < num_nodes; i += blockDim.x) {
    const int64_t parent = i == 0 ? -1 : parents[row + i];
    parent_of[i] = static_cast<int32_t>(parent);
    matches[i] = parent >= 0 && parent < i && tokens[row + i] == target_argmax[row + parent];
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    // Parents precede children, so one pass in node order finds the path (the first matching child wins).
    int len = 1;
    path[0] = 0;
    for (int64_t i = 1; i < num_nodes; ++i) {
      if (parent_of[i] == path[len - 1] && matches[i]) path[len++] = static_cast<int32_t>(i);
    }
    path_len = len;
    num_accepted[b] = len - 1;
    bonus[b] = target_argmax[row + path[len - 1]];
  }
  __syncthreads();
  write_path(accepted_nodes + row, path, path_len, num_nodes);
}

constexpr int kSamplingThreads = 512;
constexpr int kScanItems = 8;  // consecutive vocabulary entries per thread in the inverse-CDF scan

// Block state of the sampling walk, in shared memory.
struct SamplingState {
  double residual_sum;  // sum of the current node's distribution minus the rejected tokens' mass
  int next_node;        // -1 when the walk stops
  int num_rejected;
  int found_index;    // inverse CDF result of the current chunk (INT32_MAX: not in this chunk)
  int last_positive;  // last index with positive residual mass seen so far (rounding fallback)
};

template <int kThreads>
__device__ double block_sum_row(const float* __restrict__ row, int64_t vocab) {
  using Reduce = cub::BlockReduce<double, kThreads>;
  __shared__ typename Reduce::TempStorage storage;
  __shared__ double total;
  double partial = 0.0;
  for (int64_t v = threadIdx.x; v < vocab; v += kThreads) partial += static_cast<double>(row[v]);
  const double reduced = Reduce(storage).Sum(partial);
  if (threadIdx.x == 0) total = reduced;
  __syncthreads();
  const double result = total;
  __syncthreads();  // `total` and the reduce storage are reused by the next call
  return result;
}

__device__ __forceinline__ bool is_rejected(int64_t v, const int64_t* rejected, int num_rejected) {
  for (int r = 0; r < num_rejected; ++r) {
    if (rejected[r] == v) return true;
  }
  return false;
}

// Smallest v with cumsum(p)[v] > threshold, where p is `row` with the rejected tokens zeroed. Block-parallel:
// chunks of kThreads * kScanItems entries, an exclusive scan of per-thread sums, then each thread finds its
// own first crossing and the smallest one wins (cumsum is monotone, so that is the global first crossing).
template <int kThreads>
__device__ int64_t block_inverse_cdf(const float* __restrict__ row, int64_t vocab, const int64_t* rejected,
                                     int num_rejected, double threshold, SamplingState& state) {
  using Scan = cub::BlockScan<double, kThreads>;
  __shared__ typename Scan::TempStorage scan_storage;
  __shared__ double chunk_total;
  if (threadIdx.x == 0) {
    state.found_index = INT32_MAX;
    state.last_positive = -1;
  }
  __syncthreads();
  double carry = 0.0;
  for (int64_t chunk = 0; chunk < vocab; chunk += static_cast<int64_t>(kThreads) * kScanItems) {
    const int64_t first = chunk + static_cast<int64_t>(threadIdx.x) * kScanItems;
    float values[kScanItems];
    double local = 0.0;
    int local_last_positive = -1;
#pragma unroll
    for (int k = 0; k < kScanItems; ++k) {
      const int64_t v = first + k;
      float p = v < vocab ? row[v] : 0.0f;
      if (p > 0.0f && is_rejected(v, rejected, num_rejected)) p = 0.0f;
      values[k] = p;
      local += static_cast<double>(p);
      if (p > 0.0f) local_last_positive = static_cast<int>(v);
    }
    double exclusive, aggregate;
    Scan(scan_storage).ExclusiveSum(local, exclusive, aggregate);
    if (threadIdx.x == 0) chunk_total = aggregate;
    double running = carry + exclusive;
    if (running + local > threshold) {
#pragma unroll
      for (int k = 0; k < kScanItems; ++k) {
        running += static_cast<double>(values[k]);
        if (values[k] > 0.0f && running > threshold) {
          atomicMin(&state.found_index, static_cast<int>(first + k));
          break;
        }
      }
    }
    if (local_last_positive >= 0) atomicMax(&state.last_positive, local_last_positive);
    __syncthreads();
    const bool found = state.found_index != INT32_MAX;
    carry += chunk_total;
    __syncthreads();  // scan storage and chunk_total are reused by the next chunk
    if (found) break;
  }
  const int found_index = state.found_index;
  const int last_positive = state.last_positive;
  __syncthreads();
  if (found_index != INT32_MAX) return found_index;
  // The threshold reached the total through rounding: the last entry with positive mass, as the reference.
  return last_positive >= 0 ? last_positive : 0;
}

// Shared layout: parents [T] int32, path [T] int32, rejected [T] int64 (tokens rejected at the current node).
template <int kThreads>
__global__ void __launch_bounds__(kThreads)
    tree_verify_sampling_kernel(IntView tokens, IntView parents, const float* __restrict__ target_probs,
                                const float* __restrict__ uniforms, int64_t num_nodes, int64_t vocab,
                                int32_t* __restrict__ num_accepted, int32_t* __restrict__ accepted_nodes,
                                int64_t* __restrict__ bonus) {
  extern __shared__ __align__(8) uint8_t sampling_smem[];
  int64_t* rejected = reinterpret_cast<int64_t*>(sampling_smem);          // [T]
  int32_t* parent_of = reinterpret_cast<int32_t*>(rejected + num_nodes);  // [T]
  int32_t* path = parent_of + num_nodes;                                  // [T]
  __shared__ SamplingState state;
  __shared__ int path_len;

  const int64_t b = blockIdx.x;
  const int64_t row = b * num_nodes;
  const float* probs = target_probs + row * vocab;
  for (int64_t i = threadIdx.x; i < num_nodes; i += kThreads) {
    parent_of[i] = i == 0 ? -1 : static_cast<int32_t>(parents[row + i]);
  }
  if (threadIdx.x == 0) {
    path[0] = 0;
    path_len = 1;
    state.num_rejected = 0;
  }
  __syncthreads();

  int node = 0;
  double node_sum = block_sum_row<kThreads>(probs, vocab);
  while (true) {
    if (threadIdx.x == 0) {
      // Children in increasing node order; the residual is the node's row minus the rejected tokens' mass,
      // so the distribution is never copied.
      double residual = node_sum;
      int next = -1;
      for (int64_t c = node + 1; c < num_nodes; ++c) {
        if (parent_of[c] != node) continue;
        const int64_t x = tokens[row + c];
        const bool seen = is_rejected(x, rejected, state.num_rejected);
        const double px = (seen || x < 0 || x >= vocab) ? 0.0 : static_cast<double>(probs[node * vocab + x]);
        if (static_cast<double>(uniforms[row + c]) * residual < px) {
          next = static_cast<int>(c);
          break;
        }
        if (!seen && px > 0.0) {
          rejected[state.num_rejected++] = x;
          residual -= px;
        }
      }
      state.residual_sum = residual;
      state.next_node = next;
      if (next >= 0) {
        path[path_len++] = next;
        state.num_rejected = 0;  // a fresh distribution at the accepted child
      }
    }
    __syncthreads();
    const int next = state.next_node;
    __syncthreads();
    if (next < 0) break;
    node = next;
    node_sum = block_sum_row<kThreads>(probs + node * vocab, vocab);
  }

  const double threshold = static_cast<double>(uniforms[row]) * state.residual_sum;
  const int64_t token = block_inverse_cdf<kThreads>(probs + node * vocab, vocab, rejected, state.num_rejected,
                                                    threshold, state);
  if (threadIdx.x == 0) {
    num_accepted[b] = path_len - 1;
    bonus[b] = token;
  }
  write_path(accepted_nodes + row, path, path_len, num_nodes);
}

// Greedy launcher. tokens, target_argmax: int32/int64 [B, T]; parents: int32/int64 [B, T]; outputs as above.
inline cudaError_t launch_tree_verify_greedy(IntView tokens, IntView parents, IntView target_argmax,
                                             int64_t batch, int64_t num_nodes, int32_t* num_accepted,
                                             int32_t* accepted_nodes, int64_t* bonus, cudaStream_t stream) {
  if (batch == 0 || num_nodes == 0) return cudaSuccess;
  const size_t smem = static_cast<size_t>(3 * num_nodes) * sizeof(int32_t);
  if (smem > 32 * 1024) {  // opt in well before the default 48 KiB (static + dynamic) limit
    cudaError_t err = cudaFuncSetAttribute(
        tree_verify_greedy_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  tree_verify_greedy_kernel<<<static_cast<unsigned>(batch), kGreedyThreads, smem, stream>>>(
      tokens, parents, target_argmax, num_nodes, num_accepted, accepted_nodes, bonus);
  return cudaGetLastError();
}

// Sampling launcher. target_probs: fp32 [B, T, V] contiguous; uniforms: fp32 [B, T]; others as greedy.
inline cudaError_t launch_tree_verify_sampling(IntView tokens, IntView parents, const float* target_probs,
                                               const float* uniforms, int64_t batch, int64_t num_nodes,
                                               int64_t vocab, int32_t* num_accepted, int32_t* accepted_nodes,
                                               int64_t* bonus, cudaStream_t stream) {
  if (batch == 0 || num_nodes == 0) return cudaSuccess;
  if (vocab <= 0 || vocab > INT32_MAX) return cudaErrorInvalidValue;
  const size_t smem = static_cast<size_t>(num_nodes) * (sizeof(int64_t) + 2 * sizeof(int32_t));
  auto kernel = tree_verify_sampling_kernel<kSamplingThreads>;
  if (smem > 32 * 1024) {  // the static shared memory of the reductions takes part of the default 48 KiB
    cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  kernel<<<static_cast<unsigned>(batch), kSamplingThreads, smem, stream>>>(
      tokens, parents, target_probs, uniforms, num_nodes, vocab, num_accepted, accepted_nodes, bonus);
  return cudaGetLastError();
}

}  // namespace eagle_kernels
