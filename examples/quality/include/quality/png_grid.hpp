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

/// Largest grid built: each side at most max_grid_side pixels and at most max_grid_bytes of pixels, so a large
/// scale or image count is refused up front instead of ending in std::bad_alloc (or an int overflow in the
/// PNG writer).
inline constexpr std::size_t max_grid_side = 32768;
inline constexpr std::size_t max_grid_bytes = std::size_t{256} << 20;

/// The grid's size for `count` images of channels x height x width (pixels left empty), so a program can check
/// its options before doing the work that produces the images. Throws std::invalid_argument naming the values
/// for channels other than 1 or 3, zero sizes, columns or scale of 0, low >= high, or a grid over the limits.
grid_image grid_size(std::size_t count, std::size_t channels, std::size_t height, std::size_t width,
                     const grid_options& options = {});

/// Throws std::invalid_argument for an invalid batch, or as grid_size does.
grid_image make_grid(const image_batch& images, const grid_options& options = {});

/// make_grid, then writes a PNG. Throws std::runtime_error naming the path if the path is not a regular file
/// that can be written, or if any write fails (a full disk included).
void write_png_grid(const std::filesystem::path& path, const image_batch& images, const grid_options& options = {});

}  // namespace quality
