#include "demo/heatmap.hpp"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

namespace demo {

std::array<float, 3> heat_colour(float d, float scale) {
  if (!(scale > 0.f) || !std::isfinite(scale)) throw std::invalid_argument("heat map scale: must be finite and > 0, got " + std::to_string(scale));
  const float v = std::isnan(d) ? 1.f : std::clamp(d / scale, 0.f, 1.f);
  const float r = std::min(3.f * v, 1.f);
  const float g = std::clamp(3.f * v - 1.f, 0.f, 1.f);
  const float b = std::clamp(3.f * v - 2.f, 0.f, 1.f);
  return {r, g, b};
}

std::vector<float> difference_heatmap(std::span<const float> a, std::span<const float> b, std::size_t count, std::size_t channels,
                                      std::size_t height, std::size_t width, float scale) {
  const std::size_t plane = height * width, image = channels * plane;
  if (channels == 0 || plane == 0 || a.size() != count * image || b.size() != a.size())
    throw std::invalid_argument("heat map: images of " + std::to_string(a.size()) + " and " + std::to_string(b.size()) + " values for " +
                                std::to_string(count) + " x " + std::to_string(channels) + " x " + std::to_string(height) + " x " +
                                std::to_string(width));
  std::vector<float> out(count * 3 * plane);
  for (std::size_t i = 0; i < count; ++i)
    for (std::size_t px = 0; px < plane; ++px) {
      float d = 0.f;
      for (std::size_t c = 0; c < channels; ++c) d += std::fabs(a[i * image + c * plane + px] - b[i * image + c * plane + px]);
      const auto rgb = heat_colour(d / static_cast<float>(channels), scale);
      for (std::size_t c = 0; c < 3; ++c) out[(i * 3 + c) * plane + px] = 2.f * rgb[c] - 1.f;
    }
  return out;
}

std::vector<float> grey_to_rgb(std::span<const float> images, std::size_t count, std::size_t height, std::size_t width) {
  const std::size_t plane = height * width;
  if (images.size() != count * plane) throw std::invalid_argument("grey_to_rgb: " + std::to_string(images.size()) + " values for " + std::to_string(count) + " images");
  std::vector<float> out(count * 3 * plane);
  for (std::size_t i = 0; i < count; ++i)
    for (std::size_t c = 0; c < 3; ++c) std::copy_n(images.begin() + static_cast<std::ptrdiff_t>(i * plane), plane, out.begin() + static_cast<std::ptrdiff_t>((i * 3 + c) * plane));
  return out;
}

}  // namespace demo
