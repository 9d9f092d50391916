// Views over caller-owned device memory, and the workspace carving shared by the device models.
// Device views are the host views with memory_space::device: distinct types, one definition.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <string_view>
#include <type_traits>

#include "../common.hpp"

namespace specdiff::gpu {

/// `size` contiguous values in device memory.
template <class T>
struct device_span {
  T* data = nullptr;
  index_t size = 0;

  constexpr device_span() = default;
  constexpr device_span(T* d, index_t n) : data(d), size(n) {}
  template <class U>
    requires std::is_convertible_v<U*, T*>
  constexpr device_span(const device_span<U>& o) : data(o.data), size(o.size) {}

  SPECDIFF_HD T& operator[](index_t i) const { return data[i]; }
};

/// Row-major matrix in device memory: the library's matrix_view in the device memory space.
template <class T>
using device_matrix = matrix_view<T, memory_space::device>;

namespace detail {

using specdiff::detail::expect_matrix;
using specdiff::detail::fail;

template <class T>
void expect_span(std::string_view name, const device_span<T>& s, index_t size) {
  if (s.size != size) fail(name, ": expected ", size, " values, got ", s.size);
  if (s.data == nullptr && size > 0) fail(name, ": null data for ", size, " values");
}

/// Whether rows of `m` can be moved in 16-byte units: aligned base, and row starts and widths that stay on
/// 16-byte boundaries.
template <class T>
bool vectorisable(const device_matrix<T>& m) {
  return reinterpret_cast<std::uintptr_t>(m.data) % 16 == 0 && (static_cast<std::size_t>(m.cols) * sizeof(T)) % 16 == 0 &&
         (static_cast<std::size_t>(m.stride) * sizeof(T)) % 16 == 0;
}

/// Lays sub-buffers out in one caller-supplied workspace, each aligned like cudaMalloc's results.
class workspace_layout {
 public:
  static constexpr std::size_t alignment = 256;

  /// Reserves `bytes` and returns the offset of the new sub-buffer.
  std::size_t add(std::size_t bytes) {
    const std::size_t offset = total_;
    total_ += (bytes + alignment - 1) / alignment * alignment;
    return offset;
  }
  std::size_t bytes() const { return total_; }

  template <class T>
  static T* at(void* base, std::size_t offset) {
    return reinterpret_cast<T*>(static_cast<unsigned char*>(base) + offset);
  }

 private:
  std::size_t total_ = 0;
};

/// Caller memory for a workspace or a store: large enough, non-null, aligned like cudaMalloc's results.
/// `what` names the parameter pair ("workspace" -> workspace / workspace_bytes).
inline void expect_memory(std::string_view what, const void* memory, std::size_t bytes, std::size_t required) {
  if (bytes < required) fail(what, "_bytes: ", bytes, " bytes supplied, ", required, " needed (ask the size query)");
  if (memory == nullptr) fail(what, ": null pointer with ", what, "_bytes = ", bytes);
  if (reinterpret_cast<std::uintptr_t>(memory) % workspace_layout::alignment != 0)
    fail(what, ": must be ", workspace_layout::alignment, "-byte aligned (as cudaMalloc returns), got address ", memory);
}

inline void expect_workspace(const void* workspace, std::size_t bytes, std::size_t required) {
  expect_memory("workspace", workspace, bytes, required);
}

/// Blocks for `work` items at `per_block` items per block, at least 1, capped so that grid-stride loops
/// cover the rest.
inline unsigned blocks_for(std::size_t work, std::size_t per_block, std::size_t cap = 1u << 16) {
  std::size_t blocks = (work + per_block - 1) / per_block;
  if (blocks < 1) blocks = 1;
  if (blocks > cap) blocks = cap;
  return static_cast<unsigned>(blocks);
}

}  // namespace detail
}  // namespace specdiff::gpu
