#pragma once
// A read-only view of a batch of images that lives in the caller's memory.

#include <cstddef>
#include <span>

namespace quality {

/// `count` images, each `channels x height x width` floats, stored contiguously in NCHW order.
struct image_batch {
  std::span<const float> data;
  std::size_t count = 0;
  std::size_t channels = 1;
  std::size_t height = 0;
  std::size_t width = 0;

  [[nodiscard]] std::size_t image_size() const noexcept { return channels * height * width; }
  [[nodiscard]] std::span<const float> image(std::size_t i) const {
    return data.subspan(i * image_size(), image_size());
  }
};

/// Throws std::invalid_argument (naming `name`) when the dimensions are zero or disagree with the
/// span's length, or when any value is NaN or infinite.
void validate(const image_batch& batch, const char* name);

}  // namespace quality
