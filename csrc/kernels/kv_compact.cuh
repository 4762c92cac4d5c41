// KV-cache compaction after verification: move each sequence's accepted tree rows to the front of its tree
// region, for every layer, K and V, in one launch. Torch-free: usable from the torch glue and from CMake.
//
// Semantics (eagle_kernels.reference.kv_compact): cache [L, 2, B, H, S, D] (contiguous); for every sequence b
// and i < counts[b], row lengths[b] + src[b, i] moves to row lengths[b] + i. Sources and destinations may
// overlap, so every block reads all accepted rows it owns before it writes any.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace eagle_kernels {

// Raw bytes of one vector load/store; the widest width dividing both the row size and the base alignment.
template <int kBytes>
struct VectorOf;
template <>
struct VectorOf<16> {
  using type = uint4;
};
template <>
struct VectorOf<8> {
  using type = uint2;
};
template <>
struct VectorOf<4> {
  using type = uint32_t;
};
template <>
struct VectorOf<2> {
  using type = uint16_t;
};
template <>
struct VectorOf<1> {
  using type = uint8_t;
};

constexpr int kKvCompactThreads = 128;
// Shared-memory staging budget per block. Rows are staged in column tiles so that any number of accepted rows
// fits: columns are independent, so reading all rows of one tile before writing it is enough for overlap
// safety.
constexpr int kKvCompactSmemBytes = 32 * 1024;

// One block per (layer, K/V, batch, kv head) slab of S rows.
template <int kVecBytes, typename IndexT>
__global__ void kv_compact_kernel(uint8_t* __restrict__ cache, const int32_t* __restrict__ lengths,
                                  const IndexT* __restrict__ src, const int32_t* __restrict__ counts,
                                  int64_t batch, int64_t kv_heads, int64_t max_len, int64_t row_bytes,
                                  int64_t num_src, int64_t tile_vecs) {
  using Vec = typename VectorOf<kVecBytes>::type;
  extern __shared__ __align__(16) uint8_t kv_compact_smem[];
  Vec* staged = reinterpret_cast<Vec*>(kv_compact_smem);

  const int64_t slab = blockIdx.x;
  const int64_t b = (slab / kv_heads) % batch;
  int64_t count = counts[b];
  count = count < 0 ? 0 : (count > num_src ? num_src : count);
  if (count == 0) return;
  const int64_t base = lengths[b];
  const IndexT* seq_src = src + b * num_src;
  Vec* slab_rows = reinterpret_cast<Vec*>(cache + slab * max_len * row_bytes);
  const int64_t row_vecs = row_bytes / kVecBytes;

  for (int64_t tile_start = 0; tile_start < row_vecs; tile_start += tile_vecs) {
    const int64_t width = row_vecs - tile_start < tile_vecs ? row_vecs - tile_start : tile_vecs;
    const int64_t items = count * width;
    for (int64_t t = threadIdx.x; t < items; t += blockDim.x) {
      const int64_t i = t / width, j = t % width;
      int64_t row = base + static_cast<int64_t>(seq_src[i]);
      row = row < 0 ? 0 : (row >= max_len ? max_len - 1 : row);  // clamped like the reference
      staged[t] = slab_rows[row * row_vecs + tile_start + j];
    }
    __syncthreads();  // every source of this tile is read before any destination is written
    for (int64_t t = threadIdx.x; t < items; t += blockDim.x) {
      const int64_t i = t / width, j = t % width;
      const int64_t row = base + i;
      if (row < max_len) slab_rows[row * row_vecs + tile_start + j] = staged[t];
    }
    __syncthreads();  // the staging buffer is reused by the next tile
  }
}

template <int kVecBytes, typename IndexT>
cudaError_t launch_kv_compact_vec(void* cache, const int32_t* lengths, const IndexT* src,
                                  const int32_t* counts, int64_t num_slabs, int64_t batch, int64_t kv_heads,
                                  int64_t max_len, int64_t row_bytes, int64_t num_src, cudaStream_t stream) {
  const int64_t row_vecs = row_bytes / kVecBytes;
  int64_t tile_vecs = kKvCompactSmemBytes / (kVecBytes * num_src);
  tile_vecs = tile_vecs < 1 ? 1 : (tile_vecs > row_vecs ? row_vecs : tile_vecs);
  const size_t smem = static_cast<size_t>(num_src * tile_vecs * kVecBytes);
  if (smem > 32 * 1024) {  // past the staging budget (one row tile per row): opt in up to the device maximum
    cudaError_t err =
        cudaFuncSetAttribute(kv_compact_kernel<kVecBytes, IndexT>,
                             cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  kv_compact_kernel<kVecBytes, IndexT><<<static_cast<unsigned>(num_slabs), kKvCompactThreads, smem, stream>>>(
      static_cast<uint8_t*>(cache), lengths, src, counts, batch, kv_heads, max_len, row_bytes, num_src,
      tile_vecs);
  return cudaGetLastError();
}

// Launcher. cache: contiguous [num_layers, 2, batch, kv_heads, max_len, head_dim] of any element type of
// `elem_bytes` bytes; lengths, counts: int32 [batch]; src: IndexT (int32 or int64) [batch, num_src].
// All pointers are device pointers. Returns the launch status; never synchronises.
template <typename IndexT>
cudaError_t launch_kv_compact(void* cache, const int32_t* lengths, const IndexT* src, const int32_t* counts,
                              int64_t num_layers, int64_t batch, int64_t kv_heads, int64_t max_len,
                              int64_t head_dim, int64_t elem_bytes, int64_t num_src, cudaStream_t stream) {
  const int64_t num_slabs = num_layers * 2 * batch * kv_heads;
  if (num_slabs == 0 || num_src == 0 || head_dim == 0) return cudaSuccess;
  if (num_slabs > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  const int64_t row_bytes = head_dim * elem_bytes;
  // 16-byte accesses when every row starts 16-byte aligned, else the widest width that divides both.
  const uint64_t alignment = static_cast<uint64_t>(row_bytes) | reinterpret_cast<uintptr_t>(cache);
#define EAGLE_KV_COMPACT_CASE(BYTES)                                                                     \
  if (alignment % BYTES == 0)                                                                            \
    return launch_kv_compact_vec<BYTES, IndexT>(cache, lengths, src, counts, num_slabs, batch, kv_heads, \
                                                max_len, row_bytes, num_src, stream);
  EAGLE_KV_COMPACT_CASE(16)
  EAGLE_KV_COMPACT_CASE(8)
  EAGLE_KV_COMPACT_CASE(4)
  EAGLE_KV_COMPACT_CASE(2)
#undef EAGLE_KV_COMPACT_CASE
  return launch_kv_compact_vec<1, IndexT>(cache, lengths, src, counts, num_slabs, batch, kv_heads, max_len,
                                          row_bytes, num_src, stream);
}

}  // namespace eagle_kernels
