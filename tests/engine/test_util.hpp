// Helpers shared by the engine tests.
#pragma once

#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <random>
#include <span>
#include <string>
#include <unistd.h>

namespace test_util {

// A per-process scratch folder under the system temp dir.
inline const std::filesystem::path& scratch_dir() {
    static const std::filesystem::path dir = [] {
        auto d = std::filesystem::temp_directory_path() / ("sd3engine_test_" + std::to_string(::getpid()));
        std::filesystem::create_directories(d);
        return d;
    }();
    return dir;
}

// A fresh seed per run (reported, and overridable with SD3_TEST_SEED to reproduce a failure).
inline std::uint32_t fresh_seed() {
    std::uint32_t seed;
    if (const char* s = std::getenv("SD3_TEST_SEED")) seed = static_cast<std::uint32_t>(std::strtoul(s, nullptr, 10));
    else seed = std::random_device{}();
    MESSAGE("random seed " << seed << " (set SD3_TEST_SEED to reproduce)");
    return seed;
}

// ||a - b|| / ||b||
inline double rel_l2(std::span<const float> a, std::span<const float> b) {
    REQUIRE(a.size() == b.size());
    double num = 0, den = 0;
    for (std::size_t i = 0; i < a.size(); ++i) {
        num += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
        den += double(b[i]) * b[i];
    }
    return std::sqrt(num / den);
}

inline std::filesystem::path parity_dir() { return SD3_PARITY_DIR; }

}  // namespace test_util
