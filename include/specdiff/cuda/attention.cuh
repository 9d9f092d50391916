// Attention received per token: column sums of head-averaged attention probabilities,
//   his[b][k] (+)= (1 / heads) * sum_h sum_q P[b][h][q][k],
// the `his` signal of the scorers. Two kernels: per chunk of (head, query) rows, partial column sums in
// double; then, per column, the chunks in a fixed order. No atomics, so results are bit-identical from run
// to run, and double accumulation keeps the float result within rounding of the exact sum.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "../attention.hpp"
#include "../common.hpp"
#include "../storage.hpp"
#include "error.cuh"
#include "rows.cuh"
#include "views.cuh"

namespace specdiff::gpu {

/// Layout of a probability tensor [batch][heads][queries][keys] in device memory. Strides are in elements;
/// zero means packed. A column range of a wider tensor (image keys inside joint attention) is a pointer
/// offset plus `keys` smaller than `row_stride`.
struct attention_shape {
  index_t batch = 1;
  index_t heads = 1;
  index_t queries = 0;
  index_t keys = 0;
  std::ptrdiff_t row_stride = 0;     ///< between query rows; 0 = keys
  std::ptrdiff_t head_stride = 0;    ///< between heads; 0 = queries * row_stride
  std::ptrdiff_t sample_stride = 0;  ///< between samples; 0 = heads * head_stride

  /// The same shape with packed strides filled in, validated.
  attention_shape resolved() const {
    attention_shape s = *this;
    if (s.batch <= 0) detail::fail("batch: must be positive, got ", s.batch);
    if (s.heads <= 0) detail::fail("heads: must be positive, got ", s.heads);
    if (s.queries <= 0) detail::fail("queries: must be positive, got ", s.queries);
    if (s.keys <= 0) detail::fail("keys: must be positive, got ", s.keys);
    if (s.row_stride == 0) s.row_stride = s.keys;
    if (s.head_stride == 0) s.head_stride = s.queries * s.row_stride;
    if (s.sample_stride == 0) s.sample_stride = s.heads * s.head_stride;
    if (s.row_stride < s.keys) detail::fail("row_stride: ", s.row_stride, " is smaller than keys ", s.keys);
    if (s.head_stride < (s.queries - 1) * s.row_stride + s.keys)
      detail::fail("head_stride: ", s.head_stride, " overlaps the previous head's ", s.queries, " rows of stride ", s.row_stride);
    if (s.sample_stride < (s.heads - 1) * s.head_stride + (s.queries - 1) * s.row_stride + s.keys)
      detail::fail("sample_stride: ", s.sample_stride, " overlaps the previous sample's ", s.heads, " heads");
    return s;
  }

  /// Elements from the first to one past the last element addressed (of a resolved shape).
  std::size_t extent() const {
    return static_cast<std::size_t>((batch - 1) * sample_stride + (heads - 1) * head_stride + (queries - 1) * row_stride + keys);
  }
};

/// Tuning: (head, query) rows per partial sum; 32 columns x RowLanes row lanes per block.
template <int RowsPerChunk = 256, int RowLanes = 8>
struct column_sum_policy {
  static_assert(RowsPerChunk >= RowLanes && RowLanes >= 1 && 32 * RowLanes <= 1024);
  static constexpr int rows_per_chunk = RowsPerChunk;
  static constexpr int row_lanes = RowLanes;
};

/// overwrite or accumulate: one definition for the host and device column sums (attention.hpp).
using specdiff::column_mode;

namespace detail {

template <class Policy, class T>
__global__ void __launch_bounds__(32 * Policy::row_lanes) column_partials_kernel(const T* p, attention_shape s, double* partial) {
  __shared__ double lanes[Policy::row_lanes][32];
  const index_t b = blockIdx.z, chunk = blockIdx.y, col = blockIdx.x * 32 + threadIdx.x;
  const index_t rows = s.heads * s.queries;
  const index_t r0 = chunk * Policy::rows_per_chunk;
  const index_t r1 = r0 + Policy::rows_per_chunk < rows ? r0 + Policy::rows_per_chunk : rows;
  double acc = 0.0;
  if (col < s.keys) {
    const T* base = p + static_cast<std::ptrdiff_t>(b) * s.sample_stride + col;
    for (index_t r = r0 + threadIdx.y; r < r1; r += Policy::row_lanes) {
      const index_t h = r / s.queries, q = r - h * s.queries;
      acc += storage_traits<T>::load(base[h * s.head_stride + q * s.row_stride]);
    }
  }
  lanes[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && col < s.keys) {
    double sum = 0.0;
    for (int y = 0; y < Policy::row_lanes; ++y) sum += lanes[y][threadIdx.x];  // fixed order: reproducible
    const index_t chunks = gridDim.y;
    partial[(static_cast<std::ptrdiff_t>(b) * chunks + chunk) * s.keys + col] = sum;
  }
}

/// out[b][k] = (or +=) factor * the sum of the chunks' partials of key k, in chunk order (reproducible). Shared by
/// the column sums of materialised probabilities (factor 1 / heads) and of the LSE kernels (lse.cuh).
template <int BlockThreads>
__global__ void __launch_bounds__(BlockThreads) column_finish_kernel(const double* partial, index_t batch, index_t keys, index_t chunks,
                                                                     double factor, column_mode mode, float* out) {
  const std::int64_t total = static_cast<std::int64_t>(batch) * keys;
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(BlockThreads) + threadIdx.x; i < total;
       i += static_cast<std::int64_t>(gridDim.x) * BlockThreads) {
    const std::int64_t b = i / keys, k = i - b * keys;
    double sum = 0.0;
    for (index_t c = 0; c < chunks; ++c) sum += partial[(b * chunks + c) * keys + k];
    const float v = static_cast<float>(sum * factor);
    out[i] = mode == column_mode::accumulate ? out[i] + v : v;
  }
}

template <int BlockThreads>
__global__ void __launch_bounds__(BlockThreads) add_kernel(device_span<const float> x, device_span<float> y) {
  for (index_t i = blockIdx.x * BlockThreads + threadIdx.x; i < y.size; i += gridDim.x * BlockThreads) y[i] += x[i];
}

}  // namespace detail

/// Column sums of head-averaged attention probabilities for one fixed shape. Workspace: CUB's two-phase
/// pattern — call reduce with a null workspace to get its size, or ask workspace_bytes().
template <class Policy = column_sum_policy<>>
class attention_column_sums {
 public:
  explicit attention_column_sums(attention_shape shape) : shape_(shape.resolved()) {
    const std::int64_t rows = static_cast<std::int64_t>(shape_.heads) * shape_.queries;
    if (rows > (1ll << 31) - 1) detail::fail("heads * queries: ", shape_.heads, " * ", shape_.queries, " exceeds 2^31 - 1");
    chunks_ = static_cast<index_t>((rows + Policy::rows_per_chunk - 1) / Policy::rows_per_chunk);
    if (chunks_ > 65535) detail::fail("heads * queries: ", rows, " rows need ", chunks_, " chunks of ", Policy::rows_per_chunk, ", more than 65535");
    if (shape_.batch > 65535) detail::fail("batch: ", shape_.batch, " exceeds 65535");
  }

  const attention_shape& shape() const { return shape_; }
  std::size_t workspace_bytes() const {
    return static_cast<std::size_t>(shape_.batch) * static_cast<std::size_t>(chunks_) * static_cast<std::size_t>(shape_.keys) * sizeof(double);
  }

  /// out[b * keys + k] = (or +=, mode accumulate) the head-averaged column sum of sample b's probabilities.
  /// `probabilities` spans extent() elements of T (float or bfloat16). With a null workspace, only sets
  /// workspace_bytes.
  template <class T>
  void reduce(void* workspace, std::size_t& workspace_bytes, device_span<const T> probabilities, device_span<float> out,
              column_mode mode, cudaStream_t stream) const {
    static_assert(view_element<std::remove_const_t<T>>,
                  "attention_column_sums::reduce: probabilities must be float or bfloat16 (specdiff::bfloat16 or __nv_bfloat16: one type to the device API)");
    if (workspace == nullptr) {
      workspace_bytes = this->workspace_bytes();
      return;
    }
    detail::expect_workspace(workspace, workspace_bytes, this->workspace_bytes());
    const std::size_t extent = shape_.extent();
    if (probabilities.data == nullptr) detail::fail("probabilities: null data");
    if (static_cast<std::size_t>(probabilities.size) < extent)
      detail::fail("probabilities: the shape addresses ", extent, " elements, the span holds ", probabilities.size);
    detail::expect_span("out", out, shape_.batch * shape_.keys);
    auto* partial = static_cast<double*>(workspace);
    const dim3 block(32, Policy::row_lanes);
    const dim3 grid(static_cast<unsigned>((shape_.keys + 31) / 32), static_cast<unsigned>(chunks_), static_cast<unsigned>(shape_.batch));
    detail::column_partials_kernel<Policy, T><<<grid, block, 0, stream>>>(probabilities.data, shape_, partial);
    SPECDIFF_CUDA_CHECK_LAUNCH("column_partials_kernel");
    const std::size_t total = static_cast<std::size_t>(shape_.batch) * static_cast<std::size_t>(shape_.keys);
    detail::column_finish_kernel<256><<<detail::blocks_for(total, 256), 256, 0, stream>>>(
        partial, shape_.batch, shape_.keys, chunks_, 1.0 / static_cast<double>(shape_.heads), mode, out.data);
    SPECDIFF_CUDA_CHECK_LAUNCH("column_finish_kernel");
  }

 private:
  attention_shape shape_;
  index_t chunks_ = 0;
};

/// total += layer: the accumulate-from-engine entry point, for engines whose attention kernel produces a
/// layer's column sums itself (flash attention never materialises P) and hands over one vector per layer.
inline void accumulate(device_span<const float> layer, device_span<float> total, cudaStream_t stream) {
  if (total.size <= 0) detail::fail("total: zero values");
  detail::expect_span("total", total, total.size);
  detail::expect_span("layer", layer, total.size);
  detail::add_kernel<256><<<detail::blocks_for(static_cast<std::size_t>(total.size), 256), 256, 0, stream>>>(layer, total);
  SPECDIFF_CUDA_CHECK_LAUNCH("add_kernel");
}

}  // namespace specdiff::gpu
