// Calibration noise and evaluation noise cannot overlap: the calibration domain's Philox streams carry a tag in
// their high word that no evaluation stream has (quality::noise_stream), so for one seed (one key) the two domains
// feed Philox disjoint counters, and Philox under one key is a bijection on counters. These tests check the
// construction (the stream words) and its consequence on the latents the tools draw, for a sweep of seeds that
// covers the edges of what the tools accept (0 to 2^64 - 1), and that the benchmarks refuse a seed whose
// evaluation noise an old learned file was fitted on.
#include <doctest/doctest.h>

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "demo/support.hpp"
#include "quality/noise.hpp"

namespace {

using quality::noise_domain;

constexpr std::uint64_t max_seed = std::numeric_limits<std::uint64_t>::max();

// The seeds of the sweep: the edges of the accepted range, the word boundaries, the seeds the project's tables
// use, and fresh random ones.
std::vector<std::uint64_t> seed_sweep() {
  std::vector<std::uint64_t> seeds = {0,       1,       2,       999,          1000,         1001,          2000,
                                      4095,    4096,    0xFFFFFFFFull, 0x100000000ull, 0x8000000000000000ull, max_seed - 1,
                                      max_seed};
  std::mt19937_64 rng(std::random_device{}());
  for (int i = 0; i < 6; ++i) seeds.push_back(rng());
  return seeds;
}

}  // namespace

TEST_CASE("calibration noise: the two domains' Philox streams are disjoint for every sample index the tools use") {
  // Evaluation: stream = sample (high word 0); calibration: the tag in the high word. The tools draw at most 4096
  // samples per run, and noise_stream accepts any index below 2^32.
  const std::vector<std::uint64_t> samples = {0, 1, 7, 15, 4095, 4096, 0xFFFFFFFFull};
  for (std::uint64_t k : samples) {
    const std::uint64_t e = quality::noise_stream(noise_domain::evaluation, k), c = quality::noise_stream(noise_domain::calibration, k);
    CHECK(e == k);  // the evaluation noise every table and the Python package use is unchanged
    CHECK((e >> 32) == 0u);
    CHECK((c >> 32) == quality::calibration_stream_tag);
    CHECK((c & 0xFFFFFFFFull) == k);
    for (std::uint64_t j : samples) CHECK(quality::noise_stream(noise_domain::evaluation, j) != c);
  }
  CHECK(quality::calibration_stream_tag != 0u);
  CHECK_THROWS_AS((void)quality::noise_stream(noise_domain::calibration, quality::max_domain_samples), std::invalid_argument);
  CHECK_THROWS_AS((void)quality::noise_stream(noise_domain::evaluation, quality::max_domain_samples), std::invalid_argument);
  CHECK_THROWS_AS((void)quality::sample_latents(2, 4, 0, quality::max_domain_samples - 1, noise_domain::calibration), std::invalid_argument);
  CHECK_NOTHROW((void)quality::sample_latents(1, 4, 0, quality::max_domain_samples - 1, noise_domain::calibration));
}

TEST_CASE("calibration noise: no calibration sample equals an evaluation sample, for a sweep of seeds incl. the edges") {
  // 8 calibration samples (specdiff-calibrate's default) against 16 evaluation samples (the benchmarks'), each a
  // 256-value latent as mnist-sd3's, of the same seed and of the neighbouring seeds. Any one value may repeat by
  // chance (floats from 53-bit uniforms); a whole sample may not, and no Philox pair of values may.
  constexpr std::size_t per = 256, cal = 8, eval = 16;
  for (std::uint64_t seed : seed_sweep()) {
    CAPTURE(seed);
    const auto c = quality::sample_latents(cal, per, seed, 0, noise_domain::calibration);
    const auto e = quality::sample_latents(eval, per, seed, 0, noise_domain::evaluation);
    CHECK(e == quality::sample_latents(eval, per, seed));  // the default is evaluation noise
    std::vector<std::uint64_t> others = {seed};
    if (seed > 0) others.push_back(seed - 1);
    if (seed < max_seed) others.push_back(seed + 1);
    for (std::uint64_t other : others) {
      const auto e2 = other == seed ? e : quality::sample_latents(eval, per, other, 0, noise_domain::evaluation);
      for (std::size_t i = 0; i < cal; ++i)
        for (std::size_t j = 0; j < eval; ++j) {
          const auto a = c.begin() + static_cast<std::ptrdiff_t>(i * per), b = e2.begin() + static_cast<std::ptrdiff_t>(j * per);
          CHECK_FALSE(std::equal(a, a + per, b));
          std::size_t same_pairs = 0;  // values 2m and 2m + 1 come from one Philox block
          for (std::size_t m = 0; m < per; m += 2) same_pairs += a[m] == b[m] && a[m + 1] == b[m + 1];
          CHECK(same_pairs == 0u);
        }
    }
  }
}

TEST_CASE("calibration noise: the benchmarks refuse evaluation on a seed an old learned file was fitted on") {
  const auto dir = std::filesystem::temp_directory_path() / ("specdiff_calibration_noise_" + std::to_string(std::random_device{}()));
  std::filesystem::create_directories(dir);
  auto write = [&](const std::string& name, const std::string& calibration) {
    std::ofstream(dir / name) << R"({"format": "specdiff-learned-c3", "version": 1, "depth": 3, "timesteps": [1000, 500],)"
                              << R"( "weights": [[null, null, null], [[1], [1, 0], [1, 0, 0]]], "calibration": )" << calibration << "}";
  };
  write("learned_forecast_N3.json", R"({"seed": 1000, "samples": 8})");  // made before the calibration key space
  write("learned_c3.json", R"({"seed": 1000, "noise": "calibration"})");
  CHECK(demo::calibration_noise_overlaps(dir, 2000).empty());
  const auto found = demo::calibration_noise_overlaps(dir, 1000);
  REQUIRE(found.size() == 1u);
  CHECK(found[0].find("learned_forecast_N3.json") != std::string::npos);
  CHECK(found[0].find("1000") != std::string::npos);
  CHECK_THROWS_AS(demo::refuse_calibration_noise(dir, 1000), std::invalid_argument);
  CHECK_NOTHROW(demo::refuse_calibration_noise(dir, 0));
  // A file that records neither its noise nor its seed is reported for every seed.
  write("learned_forecast_N2.json", "{}");
  CHECK(demo::calibration_noise_overlaps(dir, 5).size() == 1u);
  // ... and so are the placed full steps' files (learned_forecast_F<count>.json).
  write("learned_forecast_F7.json", R"({"seed": 5, "full_steps": [0, 1]})");
  CHECK(demo::calibration_noise_overlaps(dir, 5).size() == 2u);
  std::filesystem::remove_all(dir);
}

TEST_CASE("calibration noise: the shipped learned files were fitted on calibration noise") {
  for (const char* name : {"mnist-sd3", "canvas-sd3", "mnist-flux"}) {
    const std::string model = name;
    CAPTURE(model);
    const auto dir = std::filesystem::path(SPECDIFF_SOURCE_DIR) / "models" / model;
    for (std::uint64_t seed : {std::uint64_t{0}, std::uint64_t{1000}, std::uint64_t{2000}, max_seed})
      CHECK(demo::calibration_noise_overlaps(dir, seed).empty());
  }
}
