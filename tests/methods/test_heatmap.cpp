// The side-by-side's heat map (demo/heatmap.hpp): colours and per-pixel differences by hand.
#include <doctest/doctest.h>

#include <cmath>
#include <random>
#include <stdexcept>
#include <vector>

#include "demo/heatmap.hpp"

TEST_CASE("heat map: the colour scale by hand, and |a - b| per pixel averaged over channels") {
  using demo::heat_colour;
  auto same = [](std::array<float, 3> x, std::array<float, 3> y) {
    for (int i = 0; i < 3; ++i) CHECK(x[static_cast<std::size_t>(i)] == doctest::Approx(y[static_cast<std::size_t>(i)]));
  };
  same(heat_colour(0.f, 0.5f), {0, 0, 0});
  same(heat_colour(0.5f / 6, 0.5f), {0.5f, 0, 0});    // a sixth of the scale: half-way to red
  same(heat_colour(0.5f / 3, 0.5f), {1, 0, 0});       // a third: red
  same(heat_colour(0.5f * 2 / 3, 0.5f), {1, 1, 0});   // two thirds: yellow
  same(heat_colour(0.5f, 0.5f), {1, 1, 1});           // the scale: white
  same(heat_colour(7.f, 0.5f), {1, 1, 1});            // clamped
  CHECK_THROWS_AS((void)heat_colour(0.1f, 0.f), std::invalid_argument);

  // Fresh random 2-channel images: the map of pixel (i, px) is the colour of the channel mean of |a - b|, in [-1, 1].
  std::mt19937 rng(std::random_device{}());
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  const std::size_t count = 3, channels = 2, h = 4, w = 5, plane = h * w;
  std::vector<float> a(count * channels * plane), b(a.size());
  for (auto& x : a) x = u(rng);
  for (auto& x : b) x = u(rng);
  const auto map = demo::difference_heatmap(a, b, count, channels, h, w, 0.7f);
  REQUIRE(map.size() == count * 3 * plane);
  for (std::size_t i = 0; i < count; ++i)
    for (std::size_t px = 0; px < plane; ++px) {
      const float d = (std::fabs(a[(i * 2) * plane + px] - b[(i * 2) * plane + px]) + std::fabs(a[(i * 2 + 1) * plane + px] - b[(i * 2 + 1) * plane + px])) / 2;
      const auto rgb = heat_colour(d, 0.7f);
      for (std::size_t c = 0; c < 3; ++c) CHECK(map[(i * 3 + c) * plane + px] == doctest::Approx(2 * rgb[c] - 1));
    }
  CHECK_THROWS_AS((void)demo::difference_heatmap(a, std::vector<float>(5), count, channels, h, w, 0.7f), std::invalid_argument);
  const auto rgb = demo::grey_to_rgb(std::vector<float>{0.25f, -0.5f}, 2, 1, 1);
  CHECK(rgb == std::vector<float>{0.25f, 0.25f, 0.25f, -0.5f, -0.5f, -0.5f});
}
