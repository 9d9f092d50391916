// Gather and scatter of token rows between a full matrix (every token of every sample) and a compact one
// (the listed rows, sample b's r-th at row b * capacity + r): what an engine does around a partial forward
// of the C1 tokens. Rows move in 16-byte units when both matrices allow it (aligned base, row width and
// stride multiples of 16 bytes), element by element otherwise.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "error.cuh"
#include "plan.cuh"
#include "status.cuh"
#include "views.cuh"

namespace specdiff::gpu {

/// Tuning: threads per block, and 16-byte units each thread moves per round (loads first, then stores,
/// to keep several loads in flight).
template <int BlockThreads = 256, int ItemsPerThread = 4>
struct copy_policy {
  static_assert(BlockThreads % 32 == 0 && BlockThreads <= 1024 && ItemsPerThread >= 1);
  static constexpr int block_threads = BlockThreads;
  static constexpr int items_per_thread = ItemsPerThread;
};

namespace detail {

template <class Policy, class Unit, class Rows, bool Gather>
__global__ void __launch_bounds__(Policy::block_threads)
    copy_rows_kernel(const Unit* src, std::ptrdiff_t src_stride, Unit* dst, std::ptrdiff_t dst_stride, index_t units_per_row, Rows rows,
                     index_t capacity, index_t extent, std::uint32_t* status) {
  constexpr unsigned threads = Policy::block_threads, items = Policy::items_per_thread;
  const index_t b = blockIdx.y;
  const index_t n = clamped_size(rows, b, capacity, status);
  const unsigned work = static_cast<unsigned>(n) * static_cast<unsigned>(units_per_row);  // < 2^31, checked on the host
  for (unsigned base = blockIdx.x * threads * items; base < work; base += gridDim.x * threads * items) {
    Unit v[items];
    std::ptrdiff_t to[items];
#pragma unroll
    for (unsigned k = 0; k < items; ++k) {
      const unsigned u = base + k * threads + threadIdx.x;
      to[k] = -1;
      if (u >= work) continue;
      const index_t r = static_cast<index_t>(u / static_cast<unsigned>(units_per_row));
      const index_t c = static_cast<index_t>(u) - r * units_per_row;
      const index_t full = rows.row(b, r);
      if (full < 0 || full >= extent) {
        raise_status(status, status_index_out_of_range);
        continue;
      }
      const std::ptrdiff_t compact = static_cast<std::ptrdiff_t>(b) * capacity + r;
      v[k] = src[(Gather ? full : compact) * src_stride + c];
      to[k] = (Gather ? compact : full) * dst_stride + c;
    }
#pragma unroll
    for (unsigned k = 0; k < items; ++k)
      if (to[k] >= 0) dst[to[k]] = v[k];
  }
}

template <class Policy, bool Gather, class T, class Rows>
void copy_rows(device_matrix<const T> src, const Rows& rows, device_matrix<T> dst, cudaStream_t stream, std::uint32_t* status) {
  rows.validate();
  const device_matrix<const T> full = Gather ? src : device_matrix<const T>(dst);
  const device_matrix<const T> compact = Gather ? device_matrix<const T>(dst) : src;
  const char* full_name = Gather ? "full (source)" : "full (destination)";
  const char* compact_name = Gather ? "compact (destination)" : "compact (source)";
  expect_matrix(full_name, full, rows.extent(), full.cols);
  const long long compact_rows = static_cast<long long>(rows.samples()) * rows.capacity();
  if (compact.rows < compact_rows)
    fail(compact_name, ": ", compact.rows, " rows, the row set needs ", rows.samples(), " x ", rows.capacity(), " = ", compact_rows);
  expect_matrix(compact_name, compact, compact.rows, full.cols);
  specdiff::detail::expect_disjoint(Gather ? "full" : "compact", specdiff::detail::extent_of(src), Gather ? "compact" : "full",
                                    specdiff::detail::extent_of(dst));  // the kernel reads one while it writes the other
  if (rows.samples() > 65535) fail("rows: ", rows.samples(), " samples exceed 65535");
  if (full.cols == 0 || rows.capacity() == 0) return;

  const bool vector = vectorisable(src) && vectorisable(dst);
  const index_t unit_bytes = vector ? 16 : static_cast<index_t>(sizeof(T));
  const index_t units = static_cast<index_t>(static_cast<std::size_t>(full.cols) * sizeof(T) / static_cast<std::size_t>(unit_bytes));
  if (static_cast<long long>(rows.capacity()) * units > (1ll << 31) - 1) fail("rows: capacity ", rows.capacity(), " x ", units, " units exceeds 2^31 - 1");
  const std::size_t per_block = static_cast<std::size_t>(Policy::block_threads) * Policy::items_per_thread;
  const dim3 grid(blocks_for(static_cast<std::size_t>(rows.capacity()) * static_cast<std::size_t>(units), per_block),
                  static_cast<unsigned>(rows.samples()));
  const auto stride = [&](const auto& m) { return static_cast<std::ptrdiff_t>(m.stride * static_cast<std::ptrdiff_t>(sizeof(T)) / unit_bytes); };
  if (vector) {
    copy_rows_kernel<Policy, uint4, Rows, Gather><<<grid, Policy::block_threads, 0, stream>>>(
        reinterpret_cast<const uint4*>(src.data), stride(src), reinterpret_cast<uint4*>(dst.data), stride(dst), units, rows, rows.capacity(),
        rows.extent(), status);
  } else {
    copy_rows_kernel<Policy, std::remove_const_t<T>, Rows, Gather><<<grid, Policy::block_threads, 0, stream>>>(
        src.data, src.stride, dst.data, dst.stride, units, rows, rows.capacity(), rows.extent(), status);
  }
  SPECDIFF_CUDA_CHECK_LAUNCH("copy_rows_kernel");
}

}  // namespace detail

/// compact[b * capacity + r] = full[rows.row(b, r)] for every listed row. `status` (may be null) collects
/// status_index_out_of_range / status_count_over_capacity.
template <class Policy = copy_policy<>, class T, class Rows>
void gather_rows(std::type_identity_t<device_matrix<const T>> full, const Rows& rows, device_matrix<T> compact, cudaStream_t stream,
                 std::uint32_t* status = nullptr) {
  detail::copy_rows<Policy, true>(full, rows, compact, stream, status);
}

/// full[rows.row(b, r)] = compact[b * capacity + r] for every listed row (rows must not repeat).
template <class Policy = copy_policy<>, class T, class Rows>
void scatter_rows(std::type_identity_t<device_matrix<const T>> compact, const Rows& rows, device_matrix<T> full, cudaStream_t stream,
                  std::uint32_t* status = nullptr) {
  detail::copy_rows<Policy, false>(compact, rows, full, stream, status);
}

}  // namespace specdiff::gpu
