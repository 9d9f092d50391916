#include "quality/png_grid.hpp"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

// Static linkage keeps stb's symbols private to this file, so another target may embed its own copy.
#define STB_IMAGE_WRITE_STATIC
#define STB_IMAGE_WRITE_IMPLEMENTATION
#include <stb_image_write.h>

namespace quality {

grid_image make_grid(const image_batch& images, const grid_options& options) {
  validate(images, "images");
  if (images.channels != 1 && images.channels != 3) {
    throw std::invalid_argument("make_grid: images.channels must be 1 or 3, got " + std::to_string(images.channels));
  }
  if (options.columns == 0 || options.scale == 0) {
    throw std::invalid_argument("make_grid: columns and scale must be > 0, got columns " +
                                std::to_string(options.columns) + ", scale " + std::to_string(options.scale));
  }
  if (!(options.low < options.high)) {
    throw std::invalid_argument("make_grid: low must be < high, got low " + std::to_string(options.low) + ", high " +
                                std::to_string(options.high));
  }
  const std::size_t columns = std::min(options.columns, images.count);
  const std::size_t rows = (images.count + columns - 1) / columns;
  const std::size_t cell_w = images.width * options.scale, cell_h = images.height * options.scale;
  const std::size_t pad = options.padding, ch = images.channels;
  grid_image grid;
  grid.width = columns * (cell_w + pad) + pad;
  grid.height = rows * (cell_h + pad) + pad;
  grid.channels = ch;
  grid.pixels.assign(grid.width * grid.height * ch, options.separator);
  const float range = options.high - options.low;
  for (std::size_t n = 0; n < images.count; ++n) {
    const auto img = images.image(n);
    const std::size_t x0 = pad + (n % columns) * (cell_w + pad), y0 = pad + (n / columns) * (cell_h + pad);
    for (std::size_t y = 0; y < cell_h; ++y)
      for (std::size_t x = 0; x < cell_w; ++x)
        for (std::size_t c = 0; c < ch; ++c) {
          const float v = img[(c * images.height + y / options.scale) * images.width + x / options.scale];
          const float unit = std::clamp((v - options.low) / range, 0.0f, 1.0f);
          grid.pixels[((y0 + y) * grid.width + x0 + x) * ch + c] = static_cast<std::uint8_t>(std::lround(unit * 255.0f));
        }
  }
  return grid;
}

void write_png_grid(const std::filesystem::path& path, const image_batch& images, const grid_options& options) {
  const auto grid = make_grid(images, options);
  const int ok = stbi_write_png(path.string().c_str(), static_cast<int>(grid.width), static_cast<int>(grid.height),
                                static_cast<int>(grid.channels), grid.pixels.data(),
                                static_cast<int>(grid.width * grid.channels));
  if (!ok) throw std::runtime_error("write_png_grid: could not write '" + path.string() + "'");
}

}  // namespace quality
