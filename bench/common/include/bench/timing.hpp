// Timing of repeated calls for the benchmarks: warm-up calls first (first touch, library initialisation),
// then each timed call on its own, sorted so that the median and the range are at hand.
#pragma once

#include <algorithm>
#include <chrono>
#include <vector>

namespace bench {

// Milliseconds of `reps` calls of fn after `warmup` untimed ones, ascending.
template <class F>
std::vector<double> time_ms(int warmup, int reps, F&& fn) {
    for (int i = 0; i < warmup; ++i) fn();
    std::vector<double> t;
    for (int i = 0; i < reps; ++i) {
        const auto t0 = std::chrono::steady_clock::now();
        fn();
        t.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
    }
    std::sort(t.begin(), t.end());
    return t;
}

inline double median(const std::vector<double>& sorted) { return sorted[sorted.size() / 2]; }

}  // namespace bench
