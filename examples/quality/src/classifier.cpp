#include "quality/classifier.hpp"

#include <algorithm>
#include <nlohmann/json.hpp>
#include <stdexcept>

#include "sd3/errors.hpp"
#include "sd3/files.hpp"
#include "sd3/json_input.hpp"
#include "sd3/resources.hpp"
#include "sd3/safetensors.hpp"

namespace quality {
namespace {

// Shape of the activation flowing between layers: c x h x w before flatten, c features after it.
struct activation_shape {
  std::size_t c, h, w;
  bool flat;
};

// Largest value accepted for any size in classifier.json (image sides, channels, classes, kernel, stride,
// padding): keeps every shape product far from overflow.
constexpr std::size_t max_description_size = 4096;

// The work of one image through the network, estimated at load and refused above these bounds (issue 28:
// zero-element tensors with "padding": 4096 asked for gigabytes and minutes per image). The shipped
// classifier needs about 5 M multiply-adds and 33 K activation values per image.
constexpr std::size_t max_activation_values = std::size_t{1} << 24;  // one layer's output, per image
constexpr std::size_t max_image_operations = std::size_t{1} << 30;   // multiply-adds (or visits) per image

std::runtime_error layer_error(const std::filesystem::path& json, std::size_t index, const std::string& what) {
  return std::runtime_error(sd3::message("digit_classifier: '", sd3::path_excerpt(json.string()), "' layer ", index, ": ", what));
}

// A size field of the description: an integer in [least, max_description_size].
std::size_t size_field(const nlohmann::json& spec, const char* key, std::size_t least, const std::filesystem::path& json,
                       const std::string& where) {
  const auto& v = spec.at(key);
  if (!v.is_number_unsigned() || v.get<std::uint64_t>() < least || v.get<std::uint64_t>() > max_description_size)
    throw std::runtime_error(sd3::message("digit_classifier: '", sd3::path_excerpt(json.string()), "' ", where, key, " = ",
                                          sd3::json_excerpt(v), " is not an integer in [", least, ", ", max_description_size,
                                          "]"));
  return v.get<std::size_t>();
}
std::size_t size_field(const nlohmann::json& spec, const char* key, std::size_t least, std::size_t fallback,
                       const std::filesystem::path& json, const std::string& where) {
  return spec.contains(key) ? size_field(spec, key, least, json, where) : fallback;
}

void conv2d(const digit_classifier::layer& l, const std::vector<float>& in, std::size_t h, std::size_t w,
            std::vector<float>& out, std::size_t oh, std::size_t ow) {
  out.assign(l.out * oh * ow, 0.0f);
  const auto k = l.kernel;
  for (std::size_t o = 0; o < l.out; ++o)
    for (std::size_t y = 0; y < oh; ++y)
      for (std::size_t x = 0; x < ow; ++x) {
        float acc = l.bias[o];
        for (std::size_t i = 0; i < l.in; ++i)
          for (std::size_t ky = 0; ky < k; ++ky) {
            // Input row = y*stride + ky - padding; skipped when it falls in the zero padding.
            const std::size_t sy = y * l.stride + ky;
            if (sy < l.padding || sy - l.padding >= h) continue;
            for (std::size_t kx = 0; kx < k; ++kx) {
              const std::size_t sx = x * l.stride + kx;
              if (sx < l.padding || sx - l.padding >= w) continue;
              acc += l.weight[((o * l.in + i) * k + ky) * k + kx] * in[(i * h + sy - l.padding) * w + sx - l.padding];
            }
          }
        out[(o * oh + y) * ow + x] = acc;
      }
}

void maxpool(const std::vector<float>& in, std::size_t c, std::size_t h, std::size_t w, std::size_t k,
             std::size_t stride, std::vector<float>& out, std::size_t oh, std::size_t ow) {
  out.assign(c * oh * ow, 0.0f);
  for (std::size_t ch = 0; ch < c; ++ch)
    for (std::size_t y = 0; y < oh; ++y)
      for (std::size_t x = 0; x < ow; ++x) {
        float m = in[(ch * h + y * stride) * w + x * stride];
        for (std::size_t ky = 0; ky < k; ++ky)
          for (std::size_t kx = 0; kx < k; ++kx) m = std::max(m, in[(ch * h + y * stride + ky) * w + x * stride + kx]);
        out[(ch * oh + y) * ow + x] = m;
      }
}

}  // namespace

digit_classifier digit_classifier::load(const std::filesystem::path& dir) {
  const auto json_path = dir / "classifier.json";
  const auto desc = sd3::read_json_file(json_path, "digit_classifier", "description");
  const sd3::safetensors_file weights(dir / "classifier.safetensors");
  digit_classifier net;
  try {
    net.channels_ = size_field(desc.at("input"), "channels", 1, json_path, "input.");
    net.height_ = size_field(desc.at("input"), "height", 1, json_path, "input.");
    net.width_ = size_field(desc.at("input"), "width", 1, json_path, "input.");
    net.classes_ = size_field(desc, "classes", 1, json_path, "");
    activation_shape shape{net.channels_, net.height_, net.width_, false};
    std::size_t index = 0, operations = 0;
    for (const auto& spec : desc.at("layers")) {
      net.features_ = shape.c * shape.h * shape.w;  // this layer's input: the features if it is the last one
      layer l{};
      const auto where = sd3::message("layer ", index, ": ");
      const auto type = spec.at("type").get<std::string>();
      if (type == "conv2d" || type == "linear") {
        const auto wname = spec.at("weight").get<std::string>(), bname = spec.at("bias").get<std::string>();
        const auto& wshape = weights.info(wname).shape;
        l.weight = weights.read_finite(wname);  // a NaN weight would otherwise make every prediction class 0
        l.bias = weights.read_finite(bname);
        if (type == "conv2d") {
          if (shape.flat) throw layer_error(json_path, index, "conv2d after flatten");
          if (wshape.size() != 4 || wshape[2] != wshape[3])
            throw layer_error(json_path, index, "conv2d weight '" + wname + "' must be [out, in, k, k]");
          l.type = layer::kind::conv2d;
          l.out = static_cast<std::size_t>(wshape[0]);
          l.in = static_cast<std::size_t>(wshape[1]);
          l.kernel = static_cast<std::size_t>(wshape[2]);
          l.stride = size_field(spec, "stride", 1, 1, json_path, where);
          l.padding = size_field(spec, "padding", 0, 0, json_path, where);
          if (l.in != shape.c)
            throw layer_error(json_path, index, "conv2d expects " + std::to_string(l.in) + " input channels, gets " +
                                                    std::to_string(shape.c));
          if (l.stride == 0 || shape.h + 2 * l.padding < l.kernel || shape.w + 2 * l.padding < l.kernel)
            throw layer_error(json_path, index, "conv2d kernel/stride do not fit the input");
          shape = {l.out, (shape.h + 2 * l.padding - l.kernel) / l.stride + 1,
                   (shape.w + 2 * l.padding - l.kernel) / l.stride + 1, false};
          // Every output value visits in * k * k inputs (padding included), at least once even when in is 0.
          operations = sd3::saturating_add(operations, sd3::saturating_product(shape.c, shape.h, shape.w,
                                                                                 std::max<std::size_t>(1, sd3::saturating_product(l.in, l.kernel, l.kernel))));
        } else {
          if (!shape.flat) throw layer_error(json_path, index, "linear before flatten");
          if (wshape.size() != 2) throw layer_error(json_path, index, "linear weight '" + wname + "' must be [out, in]");
          l.type = layer::kind::linear;
          l.out = static_cast<std::size_t>(wshape[0]);
          l.in = static_cast<std::size_t>(wshape[1]);
          if (l.in != shape.c)
            throw layer_error(json_path, index, "linear expects " + std::to_string(l.in) + " features, gets " +
                                                    std::to_string(shape.c));
          shape.c = l.out;
          operations = sd3::saturating_add(operations, sd3::saturating_product(l.out, std::max<std::size_t>(1, l.in)));
        }
        if (l.bias.size() != l.out)
          throw layer_error(json_path, index, "bias '" + bname + "' has " + std::to_string(l.bias.size()) +
                                                  " values, expected " + std::to_string(l.out));
      } else if (type == "relu") {
        l.type = layer::kind::relu;
      } else if (type == "maxpool2d") {
        if (shape.flat) throw layer_error(json_path, index, "maxpool2d after flatten");
        l.type = layer::kind::maxpool2d;
        l.kernel = size_field(spec, "kernel", 1, json_path, where);
        l.stride = size_field(spec, "stride", 1, l.kernel, json_path, where);
        if (l.kernel == 0 || l.stride == 0 || shape.h < l.kernel || shape.w < l.kernel)
          throw layer_error(json_path, index, "maxpool2d kernel/stride do not fit the input");
        shape = {shape.c, (shape.h - l.kernel) / l.stride + 1, (shape.w - l.kernel) / l.stride + 1, false};
        operations = sd3::saturating_add(operations, sd3::saturating_product(shape.c, shape.h, shape.w, l.kernel, l.kernel));
      } else if (type == "flatten") {
        l.type = layer::kind::flatten;
        shape = {shape.c * shape.h * shape.w, 1, 1, true};
      } else {
        throw layer_error(json_path, index, sd3::message("unknown layer type '", sd3::excerpt(type), "'"));
      }
      const std::size_t values = sd3::saturating_product(shape.c, shape.h, shape.w);
      if (values > max_activation_values)
        throw layer_error(json_path, index, sd3::message("outputs ", shape.c, "x", shape.h, "x", shape.w, " = ",
                                                         values == sd3::size_overflow ? std::string("more than 2^64") : std::to_string(values),
                                                         " values per image (padding ", l.padding, " included); the limit is ", max_activation_values));
      if (operations > max_image_operations)
        throw layer_error(json_path, index, sd3::message("the network up to here needs ",
                                                         operations == sd3::size_overflow ? std::string("more than 2^64") : std::to_string(operations),
                                                         " multiply-adds per image (padding included); the limit is ", max_image_operations));
      net.layers_.push_back(std::move(l));
      ++index;
    }
    if (!shape.flat || shape.c != net.classes_)
      throw std::runtime_error("digit_classifier: '" + json_path.string() + "' network ends with " +
                               std::to_string(shape.c) + " outputs, expected " + std::to_string(net.classes_) +
                               " flat class logits");
  } catch (const nlohmann::json::exception& e) {
    throw std::runtime_error(sd3::message("digit_classifier: '", sd3::path_excerpt(json_path.string()), "' is malformed: ",
                                          sd3::excerpt(e.what(), 4 * sd3::max_quoted_chars)));
  }
  return net;
}

std::vector<float> digit_classifier::logits(const image_batch& images) const { return run_layers(images, layers_.size(), classes_); }

std::vector<float> digit_classifier::features(const image_batch& images) const {
  return run_layers(images, layers_.size() - 1, features_);  // load() refuses a network without layers
}

std::vector<float> digit_classifier::run_layers(const image_batch& images, std::size_t layer_count, std::size_t outputs) const {
  validate(images, "images");
  if (images.channels != channels_ || images.height != height_ || images.width != width_) {
    throw std::invalid_argument("digit_classifier: images are " + std::to_string(images.channels) + "x" +
                                std::to_string(images.height) + "x" + std::to_string(images.width) +
                                ", the network takes " + std::to_string(channels_) + "x" + std::to_string(height_) +
                                "x" + std::to_string(width_));
  }
  std::vector<float> out(images.count * outputs), a, b;
  for (std::size_t n = 0; n < images.count; ++n) {
    const auto img = images.image(n);
    a.assign(img.begin(), img.end());
    std::size_t c = channels_, h = height_, w = width_;
    for (const auto& l : std::span(layers_).first(layer_count)) {
      switch (l.type) {
        case layer::kind::conv2d: {
          const std::size_t oh = (h + 2 * l.padding - l.kernel) / l.stride + 1;
          const std::size_t ow = (w + 2 * l.padding - l.kernel) / l.stride + 1;
          conv2d(l, a, h, w, b, oh, ow);
          c = l.out, h = oh, w = ow;
          std::swap(a, b);
          break;
        }
        case layer::kind::relu:
          for (float& v : a) v = std::max(v, 0.0f);
          break;
        case layer::kind::maxpool2d: {
          const std::size_t oh = (h - l.kernel) / l.stride + 1, ow = (w - l.kernel) / l.stride + 1;
          maxpool(a, c, h, w, l.kernel, l.stride, b, oh, ow);
          h = oh, w = ow;
          std::swap(a, b);
          break;
        }
        case layer::kind::flatten:  // C, H, W order is already the memory order
          c = c * h * w, h = 1, w = 1;
          break;
        case layer::kind::linear:
          b.assign(l.out, 0.0f);
          for (std::size_t o = 0; o < l.out; ++o) {
            float acc = l.bias[o];
            for (std::size_t i = 0; i < l.in; ++i) acc += l.weight[o * l.in + i] * a[i];
            b[o] = acc;
          }
          c = l.out;
          std::swap(a, b);
          break;
      }
    }
    std::copy(a.begin(), a.end(), out.begin() + static_cast<std::ptrdiff_t>(n * outputs));
  }
  return out;
}

std::vector<int> digit_classifier::predict(const image_batch& images) const {
  const auto z = logits(images);
  std::vector<int> out(images.count);
  for (std::size_t n = 0; n < images.count; ++n) {
    const auto row = z.begin() + static_cast<std::ptrdiff_t>(n * classes_);
    out[n] = static_cast<int>(std::max_element(row, row + static_cast<std::ptrdiff_t>(classes_)) - row);
  }
  return out;
}

double digit_classifier::accuracy(const image_batch& images, std::span<const int> labels) const {
  if (labels.size() != images.count) {
    throw std::invalid_argument("digit_classifier::accuracy: labels has " + std::to_string(labels.size()) +
                                " entries for " + std::to_string(images.count) + " images");
  }
  const auto pred = predict(images);
  std::size_t correct = 0;
  for (std::size_t n = 0; n < pred.size(); ++n) correct += pred[n] == labels[n];
  return static_cast<double>(correct) / static_cast<double>(pred.size());
}

}  // namespace quality
