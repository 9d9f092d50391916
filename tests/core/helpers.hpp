// Test helpers: seeded random inputs and exception-message checks.
#pragma once

#include <doctest/doctest.h>

#include <random>
#include <string>
#include <vector>

namespace testing {

// Fresh inputs every run, reproducible from the printed seed.
inline std::uint64_t fresh_seed() {
  static const std::uint64_t seed = std::random_device{}();
  return seed;
}

inline std::vector<float> random_vector(std::mt19937_64& rng, std::size_t n, float lo, float hi) {
  std::uniform_real_distribution<float> d(lo, hi);
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

// Runs f, expects an exception of type E whose message contains every fragment.
template <class E, class F>
void expect_error(F&& f, std::initializer_list<const char*> fragments) {
  bool thrown = false;
  try {
    f();
  } catch (const E& e) {
    thrown = true;
    const std::string msg = e.what();
    for (const char* frag : fragments) {
      INFO("message: ", msg);
      CHECK(msg.find(frag) != std::string::npos);
    }
  }
  CHECK_MESSAGE(thrown, "expected an exception");
}

}  // namespace testing
