#pragma once
// Lays a batch of images out as a grid (row-major: image i goes to row i / columns, column i % columns)
// and writes it as an 8-bit PNG with stb_image_write.

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <vector>

#include "quality/image_batch.hpp"

namespace quality {

struct grid_options {
  std::size_t columns = 10;
  float low = -1.0f;         // value mapped to 0
  float high = 1.0f;         // value mapped to 255 (values outside [low, high] are clamped)
  std::size_t padding = 2;   // pixels of separator around every cell
  std::uint8_t separator = 128;
  std::size_t scale = 1;     // nearest-neighbour upscaling of every image
};

/// Pixels of the grid, interleaved (HWC, channels = images.channels, which must be 1 or 3).
struct grid_image {
  std::vector<std::uint8_t> pixels;
  std::size_t width = 0, height = 0, channels = 0;
};

/// Throws std::invalid_argument for an invalid batch, channels other than 1 or 3, columns or scale of 0,
/// or low >= high.
grid_image make_grid(const image_batch& images, const grid_options& options = {});

/// make_grid, then writes a PNG. Throws std::runtime_error naming the path if writing fails.
void write_png_grid(const std::filesystem::path& path, const image_batch& images, const grid_options& options = {});

}  // namespace quality
