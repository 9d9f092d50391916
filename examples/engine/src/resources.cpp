#include "sd3/resources.hpp"

#include <cstdio>
#include <stdexcept>

#include <unistd.h>

#include "sd3/errors.hpp"

namespace sd3 {

std::size_t physical_memory_bytes() noexcept {
    const long pages = ::sysconf(_SC_PHYS_PAGES), page = ::sysconf(_SC_PAGESIZE);
    if (pages <= 0 || page <= 0) return size_overflow;
    return saturating_mul(static_cast<std::size_t>(pages), static_cast<std::size_t>(page));
}

std::string byte_text(std::size_t bytes) {
    if (bytes == size_overflow) return "more than 16 EiB";
    static constexpr const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
    double v = static_cast<double>(bytes);
    int u = 0;
    while (v >= 1024.0 && u < 6) v /= 1024.0, ++u;
    char text[32];
    std::snprintf(text, sizeof text, u == 0 ? "%.0f %s" : "%.1f %s", v, units[u]);
    return text;
}

void require_memory(std::string_view what, std::size_t bytes) {
    const std::size_t available = physical_memory_bytes();
    if (bytes > available)
        throw std::invalid_argument(message(what, " need ", byte_text(bytes), ", more than this machine's ",
                                            byte_text(available), " of memory"));
}

}  // namespace sd3
