#pragma once
// Inference for the small digit classifier shipped with the default model (models/mnist-sd3/classifier.*):
// a sequential network described by classifier.json (conv2d, relu, maxpool2d, flatten, linear) whose weights
// are in classifier.safetensors. It judges class-conditional samples: "is this generated 3 a 3?".

#include <cstddef>
#include <filesystem>
#include <span>
#include <string>
#include <vector>

#include "quality/image_batch.hpp"

namespace quality {

class digit_classifier {
 public:
  struct layer {
    enum class kind { conv2d, relu, maxpool2d, flatten, linear } type;
    std::vector<float> weight;  // conv2d: [out, in, k, k]; linear: [out, in]
    std::vector<float> bias;    // [out]
    std::size_t in = 0, out = 0, kernel = 0, stride = 1, padding = 0;
  };

  /// Reads `dir`/classifier.json and `dir`/classifier.safetensors. Throws std::runtime_error naming the file
  /// and the layer or tensor when the description and the weights disagree.
  static digit_classifier load(const std::filesystem::path& dir);

  [[nodiscard]] std::size_t classes() const noexcept { return classes_; }
  [[nodiscard]] std::size_t input_channels() const noexcept { return channels_; }
  [[nodiscard]] std::size_t input_height() const noexcept { return height_; }
  [[nodiscard]] std::size_t input_width() const noexcept { return width_; }
  /// Values per image that features() returns: the size of the last layer's input.
  [[nodiscard]] std::size_t feature_size() const noexcept { return features_; }

  /// Logits, [count x classes] row-major. Throws std::invalid_argument when the batch's image shape is not
  /// the network's input shape or holds non-finite values.
  [[nodiscard]] std::vector<float> logits(const image_batch& images) const;
  /// The activations of every layer but the last, [count x feature_size()] row-major: for the shipped classifiers
  /// the 128 hidden units after the relu that feeds the final linear layer, the space the Fréchet distance
  /// (quality/frechet.hpp) compares in. Same checks as logits.
  [[nodiscard]] std::vector<float> features(const image_batch& images) const;
  /// Arg-max class per image.
  [[nodiscard]] std::vector<int> predict(const image_batch& images) const;
  /// Fraction of images whose predicted class equals labels[i]; labels.size() must equal images.count.
  [[nodiscard]] double accuracy(const image_batch& images, std::span<const int> labels) const;

 private:
  // The first `layer_count` layers applied to every image; `outputs` values per image come out.
  std::vector<float> run_layers(const image_batch& images, std::size_t layer_count, std::size_t outputs) const;

  std::vector<layer> layers_;
  std::size_t classes_ = 0, channels_ = 0, height_ = 0, width_ = 0, features_ = 0;
};

}  // namespace quality
