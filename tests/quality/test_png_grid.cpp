#include <doctest/doctest.h>

#include <cmath>
#include <stdexcept>
#include <vector>

#include "quality/png_grid.hpp"
#include "test_support.hpp"

#define STB_IMAGE_STATIC
#define STB_IMAGE_IMPLEMENTATION
#include <stb_image.h>

TEST_CASE("make_grid places, maps and pads images as documented") {
  // Three 2x2 images in two columns: rows = 2, width = 2 * (2 + 1) + 1 = 7, height = 7.
  const std::vector<float> images{-1, 1, 0, 0.5f, /**/ 1, 1, 1, 1, /**/ -2, 2, -1, -1};
  const auto grid = quality::make_grid({images, 3, 1, 2, 2}, {.columns = 2, .padding = 1, .separator = 7});
  REQUIRE(grid.width == 7);
  REQUIRE(grid.height == 7);
  REQUIRE(grid.channels == 1);
  auto px = [&](std::size_t x, std::size_t y) { return static_cast<int>(grid.pixels[y * grid.width + x]); };
  // Image 0 at (1, 1): -1 -> 0, 1 -> 255, 0 -> round(127.5) = 128, 0.5 -> round(191.25) = 191.
  CHECK(px(1, 1) == 0);
  CHECK(px(2, 1) == 255);
  CHECK(px(1, 2) == 128);
  CHECK(px(2, 2) == 191);
  CHECK(px(4, 1) == 255);  // image 1 at (4, 1)
  CHECK(px(1, 4) == 0);    // image 2 at (1, 4): -2 clamps to 0
  CHECK(px(2, 4) == 255);  // 2 clamps to 255
  CHECK(px(0, 0) == 7);    // separator
  CHECK(px(3, 1) == 7);
  CHECK(px(4, 4) == 7);    // the empty last cell keeps the separator
}

TEST_CASE("write_png_grid writes a PNG that decodes to the grid, with upscaling") {
  test_support::temp_dir dir;
  const unsigned seed = test_support::fresh_seed();
  INFO("seed " << seed);
  std::vector<float> images(4 * 3 * 5 * 6);
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  for (auto& v : images) v = dist(rng);
  const quality::image_batch batch{images, 4, 3, 5, 6};
  const quality::grid_options options{.columns = 3, .padding = 2, .scale = 2};
  const auto path = dir.path() / "grid.png";
  quality::write_png_grid(path, batch, options);
  int w = 0, h = 0, c = 0;
  unsigned char* decoded = stbi_load(path.string().c_str(), &w, &h, &c, 0);
  REQUIRE(decoded != nullptr);
  const auto grid = quality::make_grid(batch, options);
  CHECK(static_cast<std::size_t>(w) == 3 * (12 + 2) + 2);
  CHECK(static_cast<std::size_t>(h) == 2 * (10 + 2) + 2);
  CHECK(c == 3);
  CHECK(std::equal(grid.pixels.begin(), grid.pixels.end(), decoded));
  // Image 3 (row 1, column 0), channel 2, source pixel (y 4, x 5) -> grid pixels (2 + 2*5.., 14 + 2*4..).
  const float v = images[((3 * 3 + 2) * 5 + 4) * 6 + 5];
  const auto expected = static_cast<int>(std::lround((v + 1.0f) / 2.0f * 255.0f));
  CHECK(static_cast<int>(decoded[((14 + 9) * w + 2 + 11) * 3 + 2]) == expected);
  stbi_image_free(decoded);
}

TEST_CASE("grid writer rejects bad input") {
  const std::vector<float> two(2 * 4 * 4, 0.0f);
  CHECK_THROWS_WITH_AS(quality::make_grid({two, 1, 2, 4, 4}), doctest::Contains("channels must be 1 or 3, got 2"),
                       std::invalid_argument);
  const std::vector<float> one(16, 0.0f);
  CHECK_THROWS_WITH_AS(quality::make_grid({one, 1, 1, 4, 4}, {.columns = 0}), doctest::Contains("columns 0"),
                       std::invalid_argument);
  CHECK_THROWS_WITH_AS(quality::make_grid({one, 1, 1, 4, 4}, {.low = 1.0f, .high = 1.0f}),
                       doctest::Contains("low must be < high"), std::invalid_argument);
  std::vector<float> nan = one;
  nan[3] = std::nanf("");
  CHECK_THROWS_AS(quality::make_grid({nan, 1, 1, 4, 4}), std::invalid_argument);
  test_support::temp_dir dir;
  CHECK_THROWS_WITH_AS(quality::write_png_grid(dir.path() / "no" / "such" / "dir.png", {one, 1, 1, 4, 4}),
                       doctest::Contains("cannot open for writing"), std::runtime_error);
}
