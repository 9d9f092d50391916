#include <doctest/doctest.h>

#include <cmath>
#include <fstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "quality/classifier.hpp"
#include "sd3/safetensors.hpp"
#include "test_support.hpp"

using test_support::make_tensor;

namespace {

void write_text(const std::filesystem::path& path, const std::string& text) { std::ofstream(path) << text; }

// Network A: conv2d 1->2 (k 2, no padding), relu, maxpool 2, flatten, linear 2->3, on a 3x3 input.
void write_network_a(const std::filesystem::path& dir, std::size_t linear_in = 2) {
  write_text(dir / "classifier.json", R"({"input": {"channels": 1, "height": 3, "width": 3}, "classes": 3,
    "layers": [{"type": "conv2d", "weight": "c.w", "bias": "c.b", "stride": 1, "padding": 0}, {"type": "relu"},
               {"type": "maxpool2d", "kernel": 2, "stride": 2}, {"type": "flatten"},
               {"type": "linear", "weight": "l.w", "bias": "l.b"}]})");
  std::vector<float> lw{1, 1, 2, -1, 0, 0.5f};
  if (linear_in != 2) lw.assign(3 * linear_in, 0.0f);
  test_support::write_safetensors(dir / "classifier.safetensors",
      {make_tensor("c.w", "F32", {2, 1, 2, 2}, std::vector<float>{1, 0, 0, -1, 0.5f, 0.5f, 0.5f, 0.5f}),
       make_tensor("c.b", "F32", {2}, std::vector<float>{0, -10}),
       make_tensor("l.w", "F32", {3, static_cast<std::int64_t>(linear_in)}, lw),
       make_tensor("l.b", "F32", {3}, std::vector<float>{0.5f, 0, -1})});
}

}  // namespace

TEST_CASE("classifier layers match a hand-computed network") {
  test_support::temp_dir dir;
  write_network_a(dir.path());
  const auto net = quality::digit_classifier::load(dir.path());
  CHECK(net.classes() == 3);
  // conv ch0 = x00 - x11 = -4 everywhere -> relu 0; ch1 = sum/2 - 10 = [-4, -2, 2, 4] -> relu [0, 0, 2, 4];
  // maxpool -> [0, 4]; linear: [0 + 4 + 0.5, 0 - 4 + 0, 0 + 2 - 1] = [4.5, -4, 1].
  const std::vector<float> image{1, 2, 3, 4, 5, 6, 7, 8, 9};
  const quality::image_batch batch{image, 1, 1, 3, 3};
  CHECK(net.logits(batch) == std::vector<float>{4.5f, -4.0f, 1.0f});
  CHECK(net.predict(batch) == std::vector<int>{0});

  // Network B: a 3x3 conv with padding 1 on a 2x2 image; each output sums the in-bounds taps by hand.
  test_support::temp_dir dir_b;
  write_text(dir_b.path() / "classifier.json", R"({"input": {"channels": 1, "height": 2, "width": 2}, "classes": 2,
    "layers": [{"type": "conv2d", "weight": "c.w", "bias": "c.b", "stride": 1, "padding": 1}, {"type": "flatten"},
               {"type": "linear", "weight": "l.w", "bias": "l.b"}]})");
  test_support::write_safetensors(dir_b.path() / "classifier.safetensors",
      {make_tensor("c.w", "F32", {1, 1, 3, 3}, std::vector<float>{1, 2, 3, 4, 5, 6, 7, 8, 9}),
       make_tensor("c.b", "F32", {1}, std::vector<float>{0}),
       make_tensor("l.w", "F32", {2, 4}, std::vector<float>{1, 0, 0, 0, 0, 0, 1, 0}),
       make_tensor("l.b", "F32", {2}, std::vector<float>{0, 0})});
  const auto net_b = quality::digit_classifier::load(dir_b.path());
  const std::vector<float> small{1, 2, 3, 4};
  // out(0,0) = 5*1 + 6*2 + 8*3 + 9*4 = 77; out(1,0) = 2*1 + 3*2 + 5*3 + 6*4 = 47.
  CHECK(net_b.logits({small, 1, 1, 2, 2}) == std::vector<float>{77.0f, 47.0f});
}

TEST_CASE("C++ inference of the shipped classifier matches the PyTorch logits fixture") {
  const auto net = quality::digit_classifier::load(SPECDIFF_MODEL_DIR);
  const sd3::safetensors_file fixture(SPECDIFF_QUALITY_DATA_DIR "/classifier_fixture.safetensors");
  const auto images = fixture.read("images");
  const auto expected = fixture.read("logits");
  const auto labels64 = fixture.read_ints("labels");
  const auto n = static_cast<std::size_t>(fixture.info("images").shape[0]);
  REQUIRE(n >= 10);
  const quality::image_batch batch{images, n, 1, 32, 32};
  const auto got = net.logits(batch);
  REQUIRE(got.size() == expected.size());
  for (std::size_t i = 0; i < got.size(); ++i) CHECK(got[i] == doctest::Approx(expected[i]).epsilon(1e-4).scale(1.0));
  // The fixture's images are held-out real digits, two per class.
  const std::vector<int> labels(labels64.begin(), labels64.end());
  CHECK(net.accuracy(batch, labels) >= 0.9);
}

TEST_CASE("features are the activations entering the last layer, logits are unchanged") {
  test_support::temp_dir dir;
  write_network_a(dir.path());
  const auto net = quality::digit_classifier::load(dir.path());
  // Network A by hand (first test case): maxpool -> [0, 4], flatten keeps it; the last layer (linear) is left out.
  CHECK(net.feature_size() == 2);
  const std::vector<float> two{1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 8, 7, 6, 5, 4, 3, 2, 1};
  const quality::image_batch batch{two, 2, 1, 3, 3};
  // Second image: ch0 = x00 - x11 = 4 everywhere -> max 4; ch1 = sum/2 - 10 = [4, 2, -2, -4] -> relu, max 4;
  // its logits: [4 + 4 + 0.5, 8 - 4 + 0, 0 + 2 - 1] = [8.5, 4, 1].
  CHECK(net.features(batch) == std::vector<float>{0.0f, 4.0f, 4.0f, 4.0f});
  CHECK(net.logits(batch) == std::vector<float>{4.5f, -4.0f, 1.0f, 8.5f, 4.0f, 1.0f});
  std::vector<float> nan(two);
  nan[10] = std::nanf("");
  CHECK_THROWS_WITH_AS((void)net.features({nan, 2, 1, 3, 3}), doctest::Contains("non-finite"), std::invalid_argument);
  CHECK_THROWS_WITH_AS((void)net.features({two, 1, 2, 3, 3}), doctest::Contains("images are 2x3x3, the network takes 1x3x3"),
                       std::invalid_argument);
}

TEST_CASE("the shipped classifier's features give its logits through its last layer (fc2)") {
  const auto net = quality::digit_classifier::load(SPECDIFF_MODEL_DIR);
  REQUIRE(net.feature_size() == 128);
  const sd3::safetensors_file weights(SPECDIFF_MODEL_DIR "/classifier.safetensors");
  const auto w = weights.read("fc2.weight"), b = weights.read("fc2.bias");
  REQUIRE(w.size() == net.classes() * net.feature_size());
  const sd3::safetensors_file fixture(SPECDIFF_QUALITY_DATA_DIR "/classifier_fixture.safetensors");
  const auto images = fixture.read("images");
  const auto n = static_cast<std::size_t>(fixture.info("images").shape[0]);
  const quality::image_batch batch{images, n, 1, 32, 32};
  const auto features = net.features(batch), logits = net.logits(batch);
  REQUIRE(features.size() == n * 128);
  // The hidden units come after a relu.
  for (const float f : features) CHECK(f >= 0.0f);
  // An independent last layer in double: logits = fc2.weight features + fc2.bias.
  for (std::size_t i = 0; i < n; ++i)
    for (std::size_t k = 0; k < net.classes(); ++k) {
      double z = b[k];
      for (std::size_t j = 0; j < 128; ++j) z += static_cast<double>(w[k * 128 + j]) * features[i * 128 + j];
      CHECK(logits[i * net.classes() + k] == doctest::Approx(z).epsilon(1e-5).scale(1.0));
    }
}

TEST_CASE("classifier rejects bad input and inconsistent descriptions") {
  test_support::temp_dir dir;
  write_network_a(dir.path());
  const auto net = quality::digit_classifier::load(dir.path());
  const std::vector<float> image(16, 0.0f);
  CHECK_THROWS_WITH_AS((void)net.logits({image, 1, 1, 4, 4}), doctest::Contains("images are 1x4x4, the network takes 1x3x3"),
                       std::invalid_argument);
  std::vector<float> nan(9, 0.0f);
  nan[4] = std::nanf("");
  CHECK_THROWS_WITH_AS((void)net.logits({nan, 1, 1, 3, 3}), doctest::Contains("non-finite"), std::invalid_argument);
  const std::vector<float> ok(9, 0.0f);
  const std::vector<int> two_labels{0, 1};
  CHECK_THROWS_WITH_AS((void)net.accuracy({ok, 1, 1, 3, 3}, two_labels), doctest::Contains("labels has 2 entries for 1 images"),
                       std::invalid_argument);

  test_support::temp_dir empty;
  CHECK_THROWS_WITH_AS(quality::digit_classifier::load(empty.path()), doctest::Contains("cannot open"), std::runtime_error);
  test_support::temp_dir mismatch;
  write_network_a(mismatch.path(), 5);
  CHECK_THROWS_WITH_AS(quality::digit_classifier::load(mismatch.path()),
                       doctest::Contains("layer 4: linear expects 5 features, gets 2"), std::runtime_error);
  test_support::temp_dir unknown;
  write_network_a(unknown.path());
  write_text(unknown.path() / "classifier.json", R"({"input": {"channels": 1, "height": 3, "width": 3}, "classes": 3,
    "layers": [{"type": "softmax"}]})");
  CHECK_THROWS_WITH_AS(quality::digit_classifier::load(unknown.path()), doctest::Contains("unknown layer type 'softmax'"),
                       std::runtime_error);
}
