// The device token plan and the row sets that device operations walk.
//
// device_plan_view is token_plan's layout in caller device memory: per sample, `order` holds the C1 | C2 | C3
// index lists (each ascending), `levels` the level of every token, `counts` the three list lengths. C1's
// length is static (math::compute_count); C2's and C3's live only on the device, so operations over a level
// read the count there and size their grids by a host-known capacity instead.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../common.hpp"
#include "error.cuh"
#include "status.cuh"
#include "views.cuh"

namespace specdiff::gpu {

struct device_plan_view {
  index_t* order = nullptr;        ///< [batch][tokens]: C1 | C2 | C3 token indices, each list ascending
  level* levels = nullptr;         ///< [batch][tokens]
  index_t* counts = nullptr;       ///< [batch][3]: |C1|, |C2|, |C3|
  std::uint32_t* status = nullptr; ///< status bits raised by the classifier (may be null)
  index_t batch = 0;
  index_t tokens = 0;

  /// Bytes `carve` needs for a plan of this size.
  static std::size_t bytes(index_t batch, index_t tokens) {
    validate(batch, tokens);
    return layout(batch, tokens).bytes();
  }

  /// A plan laid out in `memory` (256-byte aligned, `bytes(batch, tokens)` long). The contents are whatever
  /// the memory held: a classifier (or fill_plan) writes them.
  static device_plan_view carve(void* memory, std::size_t memory_bytes, index_t batch, index_t tokens) {
    validate(batch, tokens);
    detail::expect_memory("memory", memory, memory_bytes, bytes(batch, tokens));
    device_plan_view p;
    const std::size_t n = static_cast<std::size_t>(batch) * static_cast<std::size_t>(tokens);
    detail::workspace_layout l;
    p.order = detail::workspace_layout::at<index_t>(memory, l.add(n * sizeof(index_t)));
    p.counts = detail::workspace_layout::at<index_t>(memory, l.add(static_cast<std::size_t>(batch) * level_count * sizeof(index_t)));
    p.status = detail::workspace_layout::at<std::uint32_t>(memory, l.add(sizeof(std::uint32_t)));
    p.levels = detail::workspace_layout::at<level>(memory, l.add(n * sizeof(level)));
    p.batch = batch;
    p.tokens = tokens;
    return p;
  }

#if defined(__CUDACC__)
  __device__ index_t count(index_t b, level l) const { return counts[b * level_count + static_cast<int>(l)]; }
  /// Offset of level l's list inside sample b's segment of `order`.
  __device__ index_t begin(index_t b, level l) const {
    index_t o = 0;
    for (int k = 0; k < static_cast<int>(l); ++k) o += counts[b * level_count + k];
    return o;
  }
#endif

 private:
  static void validate(index_t batch, index_t tokens) {
    if (batch <= 0) detail::fail("batch: must be positive, got ", batch);
    if (tokens <= 0) detail::fail("tokens: must be positive, got ", tokens);
    if (static_cast<long long>(batch) * tokens > (1ll << 30)) detail::fail("batch * tokens: ", batch, " * ", tokens, " exceeds 2^30");
  }
  static detail::workspace_layout layout(index_t batch, index_t tokens) {
    const std::size_t n = static_cast<std::size_t>(batch) * static_cast<std::size_t>(tokens);
    detail::workspace_layout l;
    l.add(n * sizeof(index_t));
    l.add(static_cast<std::size_t>(batch) * level_count * sizeof(index_t));
    l.add(sizeof(std::uint32_t));
    l.add(n * sizeof(level));
    return l;
  }
};

// --- row sets ----------------------------------------------------------------------------------------
// A row set names, per sample b, `size(b)` rows of a full matrix (`extent()` rows: every sample's tokens)
// by `row(b, r)`. Host side it tells how to size a launch (`samples()` x `capacity()`); a compact matrix
// pairs sample b's r-th listed row with its row b * capacity() + r.

/// Every row of a matrix, in order (a dense step).
struct all_rows {
  index_t rows = 0;

  index_t samples() const { return 1; }
  index_t capacity() const { return rows; }
  index_t extent() const { return rows; }
  void validate() const {
    if (rows < 0) detail::fail("rows: must be >= 0, got ", rows);
  }
#if defined(__CUDACC__)
  __device__ index_t size(index_t) const { return rows; }
  __device__ index_t row(index_t, index_t r) const { return r; }
#endif
};

/// A device list of row indices whose length the host knows (static counts, such as C1's).
struct index_list {
  const index_t* indices = nullptr;
  index_t count = 0;
  index_t rows = 0;  ///< rows of the full matrix the indices address

  index_t samples() const { return 1; }
  index_t capacity() const { return count; }
  index_t extent() const { return rows; }
  void validate() const {
    if (count < 0) detail::fail("count: must be >= 0, got ", count);
    if (rows < 0) detail::fail("rows: must be >= 0, got ", rows);
    if (indices == nullptr && count > 0) detail::fail("indices: null pointer for ", count, " indices");
  }
#if defined(__CUDACC__)
  __device__ index_t size(index_t) const { return count; }
  __device__ index_t row(index_t, index_t r) const { return indices[r]; }
#endif
};

/// One level of a device plan, every sample: sample b's token i is row b * tokens + i of the full matrix.
/// The count is read on the device; `capacity` bounds it (C1: the static compute count; C2/C3: tokens).
struct plan_rows {
  device_plan_view plan;
  level lvl = level::compute;
  index_t cap = 0;

  index_t samples() const { return plan.batch; }
  index_t capacity() const { return cap; }
  index_t extent() const { return plan.batch * plan.tokens; }
  void validate() const {
    if (plan.order == nullptr || plan.counts == nullptr) detail::fail("plan: null order or counts");
    if (plan.batch <= 0 || plan.tokens <= 0) detail::fail("plan: empty plan (", plan.batch, " x ", plan.tokens, ")");
    if (cap < 0 || cap > plan.tokens) detail::fail("capacity: must lie in [0, ", plan.tokens, "], got ", cap);
    if (static_cast<unsigned>(lvl) >= static_cast<unsigned>(level_count)) detail::fail("level: ", static_cast<unsigned>(lvl), " is not a level");
  }
#if defined(__CUDACC__)
  __device__ index_t size(index_t b) const { return plan.count(b, lvl); }
  __device__ index_t row(index_t b, index_t r) const {
    const index_t at = plan.begin(b, lvl) + r;
    if (at < 0 || at >= plan.tokens) return -1;  // corrupt counts: report, never read past the segment
    return b * plan.tokens + plan.order[static_cast<std::ptrdiff_t>(b) * plan.tokens + at];
  }
#endif
};

/// The rows of one level of `plan`; capacity defaults to every token of a sample.
inline plan_rows rows_of(const device_plan_view& plan, level l) { return {plan, l, plan.tokens}; }
inline plan_rows rows_of(const device_plan_view& plan, level l, index_t capacity) { return {plan, l, capacity}; }

namespace detail {

#if defined(__CUDACC__)
/// Rows of sample b, clamped to the launch's capacity (raising status_count_over_capacity when cut).
template <class Rows>
__device__ index_t clamped_size(const Rows& rows, index_t b, index_t capacity, std::uint32_t* status) {
  const index_t n = rows.size(b);
  if (n > capacity || n < 0) {
    if (threadIdx.x == 0) raise_status(status, status_count_over_capacity);
    return n < 0 ? 0 : capacity;
  }
  return n;
}

template <int BlockThreads>
__global__ void __launch_bounds__(BlockThreads) fill_plan_kernel(device_plan_view plan, level l) {
  const index_t n = plan.tokens;
  const std::int64_t total = static_cast<std::int64_t>(plan.batch) * n;
  for (std::int64_t p = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; p < total;
       p += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const auto b = static_cast<index_t>(p / n);
    const auto i = static_cast<index_t>(p % n);
    plan.levels[p] = l;
    plan.order[p] = i;  // one level: its list is every token, ascending
    if (i == 0)
      for (int k = 0; k < level_count; ++k) plan.counts[b * level_count + k] = k == static_cast<int>(l) ? n : 0;
  }
}
#endif

}  // namespace detail

#if defined(__CUDACC__)
/// Every token of every sample in level `l` (token_plan::set_all): dense steps, FORA's all-reuse.
inline void fill_plan(const device_plan_view& plan, level l, cudaStream_t stream) {
  if (plan.order == nullptr || plan.levels == nullptr || plan.counts == nullptr) detail::fail("plan: null order, levels or counts");
  if (static_cast<unsigned>(l) >= static_cast<unsigned>(level_count)) detail::fail("level: ", static_cast<unsigned>(l), " is not a level");
  const std::size_t total = static_cast<std::size_t>(plan.batch) * static_cast<std::size_t>(plan.tokens);
  detail::fill_plan_kernel<256><<<detail::blocks_for(total, 256), 256, 0, stream>>>(plan, l);
  SPECDIFF_CUDA_CHECK_LAUNCH("fill_plan_kernel");
}
#endif

}  // namespace specdiff::gpu
