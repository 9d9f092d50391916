#include <doctest/doctest.h>

#include <cmath>
#include <numbers>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "quality/noise.hpp"
#include "sd3/safetensors.hpp"
#include "test_support.hpp"

TEST_CASE("philox4x32-10 reproduces the Random123 known-answer vectors") {
  using A4 = std::array<std::uint32_t, 4>;
  CHECK(quality::philox4x32_10({0, 0, 0, 0}, {0, 0}) == A4{0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u});
  CHECK(quality::philox4x32_10({0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu}, {0xffffffffu, 0xffffffffu}) ==
        A4{0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu});
  CHECK(quality::philox4x32_10({0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u}, {0xa4093822u, 0x299f31d0u}) ==
        A4{0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u});
}

TEST_CASE("gaussian noise matches the independent Python reference (tools/train_default_model.py noise)") {
  const sd3::safetensors_file ref(SPECDIFF_QUALITY_DATA_DIR "/noise_reference.safetensors");
  for (int k = 0; k < 3; ++k) {
    const std::string name = "case" + std::to_string(k);
    const auto ss = ref.read_ints(name + ".seed_stream");
    const std::uint64_t seed = static_cast<std::uint64_t>(ss[0]) | static_cast<std::uint64_t>(ss[1]) << 32;
    const std::uint64_t stream = static_cast<std::uint64_t>(ss[2]) | static_cast<std::uint64_t>(ss[3]) << 32;
    const auto expected = ref.read_doubles(name + ".values");
    const auto got = quality::gaussian_noise(expected.size(), seed, stream);
    INFO("case " << k << " seed " << seed << " stream " << stream);
    for (std::size_t i = 0; i < expected.size(); ++i) {
      // The reference rounds libm's double result; ours rounds a series in double: allow one float ulp.
      const float e = static_cast<float>(expected[i]);
      CHECK(std::fabs(got[i] - e) <= std::fabs(std::nextafter(e, 2 * e + 1) - e));
    }
  }
}

TEST_CASE("gaussian noise is deterministic and addressable by index") {
  const std::uint64_t seed = test_support::fresh_seed();
  INFO("seed " << seed);
  const auto a = quality::gaussian_noise(1025, seed, 3);
  CHECK(a == quality::gaussian_noise(1025, seed, 3));
  // Any sub-range equals the same slice of the whole sequence (odd start splits a Box-Muller pair).
  std::vector<float> part(100);
  quality::fill_gaussian(part, seed, 3, 517);
  CHECK(std::equal(part.begin(), part.end(), a.begin() + 517));
  // Other seeds and other streams give other values.
  const auto other_seed = quality::gaussian_noise(1025, seed + 1, 3);
  const auto other_stream = quality::gaussian_noise(1025, seed, 4);
  std::size_t same_seed = 0, same_stream = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    same_seed += a[i] == other_seed[i];
    same_stream += a[i] == other_stream[i];
  }
  CHECK(same_seed == 0);
  CHECK(same_stream == 0);
}

TEST_CASE("gaussian noise has standard normal moments") {
  const std::uint64_t seed = test_support::fresh_seed();
  INFO("seed " << seed);
  const std::size_t n = 1u << 20;
  const auto z = quality::gaussian_noise(n, seed, 0);
  double m1 = 0, m2 = 0, m3 = 0, m4 = 0, inside_one_sigma = 0;
  for (float v : z) {
    const double x = v;
    m1 += x, m2 += x * x, m3 += x * x * x, m4 += x * x * x * x;
    inside_one_sigma += std::fabs(x) < 1.0;
  }
  m1 /= n, m2 /= n, m3 /= n, m4 /= n;
  // Bounds are about 5 standard errors of each estimator at n = 2^20.
  CHECK(std::fabs(m1) < 5.0 / 1024);
  CHECK(std::fabs(m2 - 1.0) < 5.0 * std::sqrt(2.0) / 1024);
  CHECK(std::fabs(m3) < 5.0 * std::sqrt(15.0) / 1024);
  CHECK(std::fabs(m4 - 3.0) < 5.0 * std::sqrt(96.0) / 1024);
  CHECK(std::fabs(inside_one_sigma / n - 0.682689492) < 5.0 * 0.4655 / 1024);
}

TEST_CASE("portable log / sincos agree with the C library to double precision") {
  const unsigned seed = test_support::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> unit(0.0, 1.0);
  for (int i = 0; i < 20000; ++i) {
    const double x = std::ldexp(unit(rng) + 0.5, static_cast<int>(rng() % 120) - 60);
    CHECK(quality::portable_log(x) == doctest::Approx(std::log(x)).epsilon(1e-15));
    const double t = unit(rng);
    double s = 0, c = 0;
    quality::portable_sincos_turns(t, s, c);
    const double theta = 2.0 * std::numbers::pi * t;
    CHECK(std::fabs(s - std::sin(theta)) < 1e-15);
    CHECK(std::fabs(c - std::cos(theta)) < 1e-15);
  }
  CHECK(quality::portable_log(1.0) == 0.0);
  CHECK(quality::portable_log(0x1p-53) == doctest::Approx(-53 * std::log(2.0)).epsilon(1e-16));
  double s = 1, c = 0;
  quality::portable_sincos_turns(0.0, s, c);
  CHECK(s == 0.0);
  CHECK(c == 1.0);
  quality::portable_sincos_turns(0.25, s, c);
  CHECK(s == 1.0);
  CHECK(std::fabs(c) == 0.0);
}

TEST_CASE("portable math rejects arguments outside its domain") {
  CHECK_THROWS_WITH_AS(quality::portable_log(0.0), doctest::Contains("x must be finite and > 0, got 0"), std::invalid_argument);
  CHECK_THROWS_AS(quality::portable_log(-1.0), std::invalid_argument);
  CHECK_THROWS_AS(quality::portable_log(std::nan("")), std::invalid_argument);
  CHECK_THROWS_AS(quality::portable_log(HUGE_VAL), std::invalid_argument);
  double s = 0, c = 0;
  CHECK_THROWS_WITH_AS(quality::portable_sincos_turns(1.0, s, c), doctest::Contains("turns must be in [0, 1), got 1"),
                       std::invalid_argument);
  CHECK_THROWS_AS(quality::portable_sincos_turns(-0.1, s, c), std::invalid_argument);
}

TEST_CASE("sample latents: sample k is stream k, whatever the batching") {
  const std::uint64_t seed = std::random_device{}();
  INFO("seed ", seed);
  const std::size_t per_sample = 37;
  const auto all = quality::sample_latents(5, per_sample, seed);
  REQUIRE(all.size() == 5 * per_sample);
  for (std::size_t k = 0; k < 5; ++k) {
    const auto stream = quality::gaussian_noise(per_sample, seed, k);
    CHECK(std::equal(stream.begin(), stream.end(), all.begin() + static_cast<std::ptrdiff_t>(k * per_sample)));
  }
  const auto tail = quality::sample_latents(2, per_sample, seed, 3);  // samples 3 and 4 on their own
  CHECK(std::equal(tail.begin(), tail.end(), all.begin() + static_cast<std::ptrdiff_t>(3 * per_sample)));
  CHECK(quality::sample_latents(1, per_sample, seed + 1) != quality::sample_latents(1, per_sample, seed));
}
