// Shared vocabulary: index type, token levels, row-major matrix views, error helpers.
#pragma once

// Every specdiff header includes this one before any code of its own, so a build below C++20 fails with this
// message as its first error, not with a parse error at the first requires-clause or std::span. MSVC leaves
// __cplusplus at 199711L unless /Zc:__cplusplus is given; _MSVC_LANG holds its real language level.
#if defined(_MSVC_LANG) ? (_MSVC_LANG < 202002L) : (__cplusplus < 202002L)
#error "specdiff needs C++20: compile with -std=c++20 (MSVC: /std:c++20). With CMake, link specdiff::specdiff (C++ sources) or specdiff::cuda (CUDA sources, nvcc), which carry the flag."
#endif

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <span>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>

#if defined(__CUDACC__)
#define SPECDIFF_HD __host__ __device__
#else
#define SPECDIFF_HD
#endif

namespace specdiff {

/// Token and row indices. 32 bits: a DiT never has 2^31 tokens, and half-width indices halve sort traffic.
using index_t = std::int32_t;

/// The three levels of SpecDiff. The numeric values are the order of the segments in a token_plan.
enum class level : std::uint8_t {
  compute = 0,      ///< C1: run through the network
  reuse = 1,        ///< C2: take the latest cached feature unchanged
  approximate = 2,  ///< C3: weighted mix of the cached history
};
inline constexpr int level_count = 3;

/// Where a view's memory lives. Part of the view's type, so a device pointer is never taken for a host one.
enum class memory_space { host, device };

/// A non-owning row-major matrix: `rows` rows of `cols` values, row r starting at data + r * stride.
/// Like Eigen::Map / mdspan with a strided layout; the engine owns the memory. Device views
/// (gpu::device_matrix) are the same type with Space = device.
template <class T, memory_space Space = memory_space::host>
struct matrix_view {
  T* data = nullptr;
  index_t rows = 0;
  index_t cols = 0;
  std::ptrdiff_t stride = 0;  ///< elements between row starts; >= cols

  constexpr matrix_view() = default;
  constexpr matrix_view(T* d, index_t r, index_t c) : data(d), rows(r), cols(c), stride(c) {}
  constexpr matrix_view(T* d, index_t r, index_t c, std::ptrdiff_t s) : data(d), rows(r), cols(c), stride(s) {}
  template <class U>
    requires std::is_convertible_v<U*, T*>
  constexpr matrix_view(const matrix_view<U, Space>& o) : data(o.data), rows(o.rows), cols(o.cols), stride(o.stride) {}

  SPECDIFF_HD T* row_ptr(index_t r) const { return data + static_cast<std::ptrdiff_t>(r) * stride; }
  std::span<T> row(index_t r) const
    requires(Space == memory_space::host)
  {
    return {row_ptr(r), static_cast<std::size_t>(cols)};
  }
  bool empty() const { return rows == 0 || cols == 0; }
};

namespace detail {

template <class... Parts>
std::string cat(const Parts&... parts) {
  std::ostringstream os;
  (os << ... << parts);
  return os.str();
}

template <class... Parts>
[[noreturn]] void fail(const Parts&... parts) {
  throw std::invalid_argument(cat(parts...));
}

template <class... Parts>
[[noreturn]] void fail_logic(const Parts&... parts) {
  throw std::logic_error(cat(parts...));
}

inline void expect_size(std::string_view name, std::size_t got, std::size_t want) {
  if (got != want) fail(name, ": expected ", want, " values, got ", got);
}

inline void expect_finite(std::string_view name, std::span<const float> values) {
  for (std::size_t i = 0; i < values.size(); ++i)
    if (!std::isfinite(values[i])) fail(name, "[", i, "] is not finite (", values[i], ")");
}

template <class T, memory_space Space>
void expect_matrix(std::string_view name, const matrix_view<T, Space>& m, index_t rows, index_t cols) {
  if (m.rows != rows || m.cols != cols)
    fail(name, ": expected a ", rows, "x", cols, " matrix, got ", m.rows, "x", m.cols);
  if (m.stride < m.cols) fail(name, ": stride ", m.stride, " is smaller than cols ", m.cols);
  if (m.data == nullptr && rows > 0 && cols > 0) fail(name, ": null data for a ", rows, "x", cols, " matrix");
}

/// Row r of a matrix holds finite values only; names the first bad element.
template <memory_space Space>
void expect_finite_row(std::string_view name, const matrix_view<const float, Space>& m, index_t r) {
  static_assert(Space == memory_space::host, "expect_finite_row reads host memory");
  const float* src = m.row_ptr(r);
  for (index_t c = 0; c < m.cols; ++c)
    if (!std::isfinite(src[c])) fail(name, "[", r, "][", c, "] is not finite (", src[c], ")");
}

/// The bytes a view spans, [begin, end): for overlap checks (addresses only: host or device memory alike).
struct byte_extent {
  std::uintptr_t begin = 0, end = 0;
  bool empty() const { return begin == end; }
};
template <class T>
byte_extent extent_of(const T* data, std::size_t count) {
  if (data == nullptr || count == 0) return {};
  const auto b = reinterpret_cast<std::uintptr_t>(data);
  return {b, b + count * sizeof(T)};
}
template <class T, memory_space Space>
byte_extent extent_of(const matrix_view<T, Space>& m) {
  if (m.data == nullptr || m.rows <= 0 || m.cols <= 0) return {};
  const auto last = static_cast<std::size_t>(m.rows - 1) * static_cast<std::size_t>(m.stride) + static_cast<std::size_t>(m.cols);
  return extent_of(static_cast<const T*>(m.data), last);
}
template <class T>
byte_extent extent_of(std::span<T> s) {
  return extent_of(static_cast<const T*>(s.data()), s.size());
}

/// Two views a call takes must not share memory (one is read while the other is written); refused naming both.
inline void expect_disjoint(std::string_view a, byte_extent ea, std::string_view b, byte_extent eb) {
  if (ea.empty() || eb.empty()) return;
  if (ea.begin < eb.end && eb.begin < ea.end)
    fail(a, " and ", b, " overlap in memory (bytes [", ea.begin, ", ", ea.end, ") and [", eb.begin, ", ", eb.end, ")): ", a,
         " must not alias ", b, "; pass separate buffers");
}

inline void expect_index(std::string_view name, index_t value, index_t bound) {
  if (value < 0 || value >= bound) fail(name, " = ", value, " is out of range [0, ", bound, ")");
}

/// The product of positive sizes, or an error naming it ("batch * tokens") and its factors when it does not
/// fit `Result` (index_t for row counts, std::size_t for element counts and bytes).
template <class Result, class... Sizes>
Result checked_product(std::string_view name, Sizes... factors) {
  static_assert(sizeof...(Sizes) >= 1);
  unsigned long long product = 1;
  bool overflow = false;
  for (const long long f : {static_cast<long long>(factors)...}) {
    if (f < 0) fail(name, ": negative factor ", f);
    const auto u = static_cast<unsigned long long>(f);
    if (u != 0 && product > static_cast<unsigned long long>(std::numeric_limits<Result>::max()) / u) overflow = true;
    product *= u;
  }
  if (overflow || product > static_cast<unsigned long long>(std::numeric_limits<Result>::max())) {
    std::ostringstream factors_text;
    const char* sep = "";
    for (const long long f : {static_cast<long long>(factors)...}) {
      factors_text << sep << f;
      sep = " * ";
    }
    fail(name, ": ", factors_text.str(), " overflows (the largest supported is ", std::numeric_limits<Result>::max(), ")");
  }
  return static_cast<Result>(product);
}

/// SpecDiff's cache rate: the share of tokens not computed on a partial step, in [0, 1).
inline void expect_cache_rate(double cache_rate) {
  if (!(cache_rate >= 0.0 && cache_rate < 1.0)) fail("cache_rate: must lie in [0, 1), got ", cache_rate);
}

/// The score mass C2 may take, in [0, 1].
inline void expect_reuse_mass(double reuse_mass) {
  if (!(reuse_mass >= 0.0 && reuse_mass <= 1.0)) fail("reuse_mass: must lie in [0, 1], got ", reuse_mass);
}

}  // namespace detail
}  // namespace specdiff
