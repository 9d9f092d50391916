// Element types a cache may store: float, or bfloat16 to halve cache memory. Conversions are
// host-and-device so both backends round identically.
#pragma once

#include <concepts>
#include <cstdint>
#include <cstring>

#include "common.hpp"

namespace specdiff {

/// bfloat16: the top 16 bits of an IEEE float, rounded to nearest even. Same range as float, 8 bits of
/// mantissa — enough for features that are mixed and fed back into a network that runs in float.
struct bfloat16 {
  std::uint16_t bits = 0;
};

template <class T>
struct storage_traits;

template <>
struct storage_traits<float> {
  SPECDIFF_HD static float load(float x) { return x; }
  SPECDIFF_HD static float store(float x) { return x; }
};

template <>
struct storage_traits<bfloat16> {
  SPECDIFF_HD static float load(bfloat16 x) {
    const std::uint32_t u = static_cast<std::uint32_t>(x.bits) << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
  }
  SPECDIFF_HD static bfloat16 store(float f) {
    std::uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x007fffffu) != 0u)  // NaN: keep it a NaN
      return {static_cast<std::uint16_t>((u >> 16) | 0x0040u)};
    u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest, ties to even
    return {static_cast<std::uint16_t>(u >> 16)};
  }
};

template <class T>
concept storage_type = requires(T t, float f) {
  { storage_traits<T>::load(t) } -> std::same_as<float>;
  { storage_traits<T>::store(f) } -> std::same_as<T>;
};

}  // namespace specdiff
