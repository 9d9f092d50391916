// Shared test helpers: fresh seeded randomness (reproducible with SPECDIFF_TEST_SEED=<n>) and checks of
// exception messages. Used by the core, methods and CUDA suites.
#pragma once

#include <doctest/doctest.h>

#include <cstdint>
#include <cstdlib>
#include <exception>
#include <initializer_list>
#include <random>
#include <string>
#include <vector>

namespace testing {

/// Fresh every run; SPECDIFF_TEST_SEED=<n> reproduces a run. Tests print it with INFO on failure.
inline std::uint64_t fresh_seed() {
  static const std::uint64_t s = [] {
    if (const char* env = std::getenv("SPECDIFF_TEST_SEED")) return static_cast<std::uint64_t>(std::strtoull(env, nullptr, 10));
    return static_cast<std::uint64_t>(std::random_device{}()) << 32 | std::random_device{}();
  }();
  return s;
}

/// A generator per test, seeded from the run seed and the test's own salt.
inline std::mt19937_64 rng(std::uint64_t salt) { return std::mt19937_64(fresh_seed() ^ (salt * 0x9e3779b97f4a7c15ull)); }

inline std::vector<float> random_vector(std::mt19937_64& rng, std::size_t n, float lo, float hi) {
  std::uniform_real_distribution<float> d(lo, hi);
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

/// Runs f, expects an exception of type E whose message contains every fragment (and, when given, is shorter
/// than max_length characters). Another exception type fails the check, naming its message.
template <class E, class F>
void expect_error(F&& f, std::initializer_list<const char*> fragments, std::size_t max_length = std::string::npos) {
  bool thrown = false;
  try {
    f();
  } catch (const E& e) {
    thrown = true;
    const std::string msg = e.what();
    INFO("message: ", msg);
    for (const char* frag : fragments) CHECK_MESSAGE(msg.find(frag) != std::string::npos, "missing '", frag, "'");
    if (max_length != std::string::npos) CHECK(msg.size() < max_length);
  } catch (const std::exception& e) {
    FAIL("wrong exception type: ", e.what());
  }
  CHECK_MESSAGE(thrown, "expected an exception");
}

}  // namespace testing
