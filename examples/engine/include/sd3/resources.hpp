// Sizes computed from inputs (config fields, limits, command-line counts) are products of untrusted
// numbers: they are formed with saturating arithmetic (a result that does not fit is SIZE_MAX, which every
// budget refuses), and memory is estimated and checked before it is allocated, so a hostile size ends in a
// message stating how much would be needed instead of a wrapped product or a bare std::bad_alloc.
#pragma once

#include <cstddef>
#include <limits>
#include <string>
#include <string_view>
#include <type_traits>

namespace sd3 {

inline constexpr std::size_t size_overflow = std::numeric_limits<std::size_t>::max();

constexpr std::size_t saturating_mul(std::size_t a, std::size_t b) noexcept {
    if (a == 0 || b == 0) return 0;
    return a > size_overflow / b ? size_overflow : a * b;
}
constexpr std::size_t saturating_add(std::size_t a, std::size_t b) noexcept {
    return a > size_overflow - b ? size_overflow : a + b;
}
// An integer as a size; negative values count as 0 (callers validate signs first).
template <class Int>
constexpr std::size_t as_size(Int v) noexcept {
    if constexpr (std::is_signed_v<Int>) {
        if (v < 0) return 0;
    }
    return static_cast<std::size_t>(v);
}
// Product of integers, saturating.
template <class... Ints>
constexpr std::size_t saturating_product(Ints... factors) noexcept {
    std::size_t p = 1;
    ((p = saturating_mul(p, as_size(factors))), ...);
    return p;
}

// Physical memory of this machine in bytes (SIZE_MAX when it cannot be determined).
std::size_t physical_memory_bytes() noexcept;

// "512 B", "3.2 MiB", "1.5 TiB"; "more than 16 EiB" for SIZE_MAX.
std::string byte_text(std::size_t bytes);

// Throws std::invalid_argument "<what> need(s) <bytes>, more than this machine's <memory> of memory" when
// `bytes` exceeds the physical memory.
void require_memory(std::string_view what, std::size_t bytes);

}  // namespace sd3
