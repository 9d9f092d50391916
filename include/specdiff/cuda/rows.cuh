// Row element types: the engine's rows going into the device store and coming out of its fills (and so the
// device accelerator's computed and output rows) may be float, __half or bfloat16 (specdiff::bfloat16 or
// __nv_bfloat16: one type to the device API, see below), whatever the store keeps. The row type is a template parameter of the kernels, as an accessor
// policy is for mdspan: every element is loaded to float for arithmetic and stored back from float, so one
// kernel serves every pair of row type and storage type, and the arithmetic is the float path's.
//
// Converting a float down to half or bfloat16 can overflow: a finite value above the type's largest finite
// value (after rounding) becomes infinity. The kernels report that with status_conversion_overflow rather
// than leaving a silent infinity in a row; the row is still written, as the host conversion would write it.
#pragma once

#include "../common.hpp"  // first: the C++20 check
#include "../storage.hpp"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <concepts>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace specdiff {
/// __nv_bfloat16 as a storage and view element: the same conversions as specdiff::bfloat16 (rows.cuh's one bfloat16).
template <>
struct storage_traits<__nv_bfloat16> {
  SPECDIFF_HD static float load(__nv_bfloat16 x) { return __bfloat162float(x); }
  SPECDIFF_HD static __nv_bfloat16 store(float f) { return __float2bfloat16_rn(f); }
};
}  // namespace specdiff

namespace specdiff::gpu {

/// How a row element becomes a float and back. load is exact for every type here; store rounds to nearest,
/// ties to even (the CUDA intrinsics', which are host-and-device).
template <class T>
struct row_traits;

template <>
struct row_traits<float> {
  SPECDIFF_HD static float load(float x) { return x; }
  SPECDIFF_HD static float store(float x) { return x; }
};

template <>
struct row_traits<__half> {
  SPECDIFF_HD static float load(__half x) { return __half2float(x); }
  SPECDIFF_HD static __half store(float x) { return __float2half_rn(x); }
};

template <>
struct row_traits<__nv_bfloat16> {
  SPECDIFF_HD static float load(__nv_bfloat16 x) { return __bfloat162float(x); }
  SPECDIFF_HD static __nv_bfloat16 store(float x) { return __float2bfloat16_rn(x); }
};

// specdiff::bfloat16 and __nv_bfloat16 are the same 16 bits (the top half of a float) and both round to
// nearest even, so a pointer to one may be read as the other and a bfloat16 store holds exactly what an
// engine's bf16 tensor holds. The rounding itself is checked against __float2bfloat16_rn in cuda/host.
static_assert(sizeof(__nv_bfloat16) == sizeof(bfloat16) && alignof(__nv_bfloat16) == alignof(bfloat16),
              "specdiff::bfloat16 must have __nv_bfloat16's layout");
static_assert(std::is_trivially_copyable_v<__nv_bfloat16> && std::is_trivially_copyable_v<bfloat16>);

/// The library's bfloat16 as CUDA's, bit for bit.
SPECDIFF_HD inline __nv_bfloat16 to_nv_bfloat16(bfloat16 x) {
  __nv_bfloat16 y;
  memcpy(static_cast<void*>(&y), &x, sizeof y);  // void*: a byte copy between trivially copyable types
  return y;
}
/// CUDA's bfloat16 as the library's, bit for bit.
SPECDIFF_HD inline bfloat16 from_nv_bfloat16(__nv_bfloat16 x) {
  bfloat16 y;
  memcpy(static_cast<void*>(&y), &x, sizeof y);
  return y;
}

/// One bfloat16 in the device API: specdiff::bfloat16 (what the device API's own views and stores name) and
/// CUDA's __nv_bfloat16 (what an engine's tensors hold) are the same type to every device call: rows, LSE and
/// attention views, and storage all take either, with the same bits and the same rounding.
template <>
struct row_traits<bfloat16> {
  SPECDIFF_HD static float load(bfloat16 x) { return __bfloat162float(to_nv_bfloat16(x)); }
  SPECDIFF_HD static bfloat16 store(float x) { return from_nv_bfloat16(__float2bfloat16_rn(x)); }
};

/// The row element types the store and the accelerator take: float, __half, and bfloat16 (either spelling).
template <class T>
concept row_element =
    std::same_as<T, float> || std::same_as<T, __half> || std::same_as<T, __nv_bfloat16> || std::same_as<T, bfloat16>;

/// The element types of the attention views (Q, K, probabilities: lse.cuh, attention.cuh): float and
/// bfloat16 (either spelling).
template <class T>
concept view_element = std::same_as<T, float> || std::same_as<T, __nv_bfloat16> || std::same_as<T, bfloat16>;

namespace detail {

/// One accessor for every element type a kernel moves: the row types (row_traits) and the storage types
/// (storage_traits), so the store's kernels convert rows and entries the same way.
template <class T>
struct element_access : row_traits<T> {};
template <>
struct element_access<bfloat16> : storage_traits<bfloat16> {};

/// Converts a float to T and says whether a finite value became infinite (the overflow the kernels report).
template <class T>
SPECDIFF_HD inline T convert_checked(float x, bool& overflow) {
  const T y = element_access<T>::store(x);
  if constexpr (!std::is_same_v<T, float>) overflow |= isfinite(x) && isinf(element_access<T>::load(y));
  return y;
}

/// Elements of T per 16-byte unit.
template <class T>
inline constexpr int unit_elems = static_cast<int>(16 / sizeof(T));

#if defined(__CUDACC__)
/// N elements (a whole number of 16-byte units, 16-byte aligned) of T at p, as floats.
template <class T, int N>
__device__ inline void load_vec(const T* p, float* x) {
  static_assert(N % unit_elems<T> == 0);
#pragma unroll
  for (int u = 0; u < N / unit_elems<T>; ++u) {
    const uint4 bits = reinterpret_cast<const uint4*>(p)[u];
    T e[unit_elems<T>];
    memcpy(static_cast<void*>(e), &bits, sizeof bits);
#pragma unroll
    for (int i = 0; i < unit_elems<T>; ++i) x[u * unit_elems<T> + i] = element_access<T>::load(e[i]);
  }
}

/// N floats stored as T at p in 16-byte units; `overflow` collects finite values that became infinite.
template <class T, int N>
__device__ inline void store_vec(T* p, const float* x, bool& overflow) {
  static_assert(N % unit_elems<T> == 0);
#pragma unroll
  for (int u = 0; u < N / unit_elems<T>; ++u) {
    T e[unit_elems<T>];
#pragma unroll
    for (int i = 0; i < unit_elems<T>; ++i) e[i] = convert_checked<T>(x[u * unit_elems<T> + i], overflow);
    uint4 bits;
    memcpy(&bits, e, sizeof bits);
    reinterpret_cast<uint4*>(p)[u] = bits;
  }
}
#endif

}  // namespace detail
}  // namespace specdiff::gpu
