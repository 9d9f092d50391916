#include "quality/png_grid.hpp"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>

#include "sd3/errors.hpp"
#include "sd3/files.hpp"
#include "sd3/resources.hpp"

// Static linkage keeps stb's symbols private to this file, so another target may embed its own copy.
#define STB_IMAGE_WRITE_STATIC
#define STB_IMAGE_WRITE_IMPLEMENTATION
#define STBI_WRITE_NO_STDIO  // files are written by sd3::write_file, which checks every byte
#include <stb_image_write.h>

namespace quality {

grid_image grid_size(std::size_t count, std::size_t channels, std::size_t height, std::size_t width,
                     const grid_options& options) {
  auto bad = [](const auto&... what) { throw std::invalid_argument(sd3::message("make_grid: ", what...)); };
  if (channels != 1 && channels != 3) bad("images.channels must be 1 or 3, got ", channels);
  if (count == 0 || height == 0 || width == 0) bad("count/height/width must be > 0, got ", count, "/", height, "/", width);
  if (options.columns == 0 || options.scale == 0)
    bad("columns and scale must be > 0, got columns ", options.columns, ", scale ", options.scale);
  if (!(options.low < options.high)) bad("low must be < high, got low ", options.low, ", high ", options.high);
  const std::size_t columns = std::min(options.columns, count);
  const std::size_t rows = (count + columns - 1) / columns;
  // Saturating: a hostile scale or count gives a huge size that the limits below refuse, never a wrapped one.
  const std::size_t cell_w = sd3::saturating_mul(width, options.scale), cell_h = sd3::saturating_mul(height, options.scale);
  const std::size_t pad = options.padding;
  grid_image grid;
  grid.width = sd3::saturating_add(sd3::saturating_mul(columns, sd3::saturating_add(cell_w, pad)), pad);
  grid.height = sd3::saturating_add(sd3::saturating_mul(rows, sd3::saturating_add(cell_h, pad)), pad);
  grid.channels = channels;
  const std::size_t bytes = sd3::saturating_product(grid.width, grid.height, channels);
  if (grid.width > max_grid_side || grid.height > max_grid_side || bytes > max_grid_bytes)
    bad(count, " images of ", height, "x", width, " at scale ", options.scale, " in ", columns, " columns make a ",
        sd3::byte_text(bytes), " grid (", grid.width == sd3::size_overflow ? std::string("?") : std::to_string(grid.width),
        " x ", grid.height == sd3::size_overflow ? std::string("?") : std::to_string(grid.height),
        " pixels); the limit is ", max_grid_side, " pixels a side and ", sd3::byte_text(max_grid_bytes));
  return grid;
}

grid_image make_grid(const image_batch& images, const grid_options& options) {
  validate(images, "images");
  grid_image grid = grid_size(images.count, images.channels, images.height, images.width, options);
  const std::size_t columns = std::min(options.columns, images.count);
  const std::size_t cell_w = images.width * options.scale, cell_h = images.height * options.scale;
  const std::size_t pad = options.padding, ch = images.channels;
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
  // Encoded in memory, then written with every byte checked: stbi_write_png ignores fwrite's result, so a
  // full disk would pass as success.
  std::vector<char> png;
  const auto append = [](void* context, void* data, int size) {
    auto& out = *static_cast<std::vector<char>*>(context);
    const auto* bytes = static_cast<const char*>(data);
    out.insert(out.end(), bytes, bytes + size);
  };
  const int ok = stbi_write_png_to_func(append, &png, static_cast<int>(grid.width), static_cast<int>(grid.height),
                                        static_cast<int>(grid.channels), grid.pixels.data(),
                                        static_cast<int>(grid.width * grid.channels));
  if (!ok) throw std::runtime_error(sd3::message("write_png_grid: could not encode '", sd3::path_excerpt(path.string()), "'"));
  sd3::write_file(path, png, "write_png_grid: output file");
}

}  // namespace quality
