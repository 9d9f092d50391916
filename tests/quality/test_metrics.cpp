#include <doctest/doctest.h>

#include <cmath>
#include <limits>
#include <random>
#include <stdexcept>
#include <vector>

#include "quality/metrics.hpp"
#include "test_support.hpp"

using quality::image_batch;

namespace {

image_batch view(const std::vector<float>& v, std::size_t n, std::size_t c, std::size_t h, std::size_t w) {
  return {v, n, c, h, w};
}

std::vector<float> random_images(std::size_t size, unsigned seed, float lo = -1.0f, float hi = 1.0f) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(lo, hi);
  std::vector<float> v(size);
  for (auto& x : v) x = dist(rng);
  return v;
}

// Direct (non-separable) SSIM of one single-channel image: every 11x11 window fully inside the image,
// weights evaluated from the 2-D Gaussian formula at each offset. Independent of the separable code path.
double brute_force_ssim(const float* a, const float* b, std::size_t h, std::size_t w, double range) {
  double weight[11][11], total = 0.0;
  for (int i = 0; i < 11; ++i)
    for (int j = 0; j < 11; ++j) total += weight[i][j] = std::exp(-((i - 5) * (i - 5) + (j - 5) * (j - 5)) / (2 * 1.5 * 1.5));
  const double c1 = 0.01 * range * 0.01 * range, c2 = 0.03 * range * 0.03 * range;
  double sum = 0.0;
  std::size_t windows = 0;
  for (std::size_t y = 0; y + 11 <= h; ++y)
    for (std::size_t x = 0; x + 11 <= w; ++x) {
      double mx = 0, my = 0, sxx = 0, syy = 0, sxy = 0;
      for (int i = 0; i < 11; ++i)
        for (int j = 0; j < 11; ++j) {
          const double g = weight[i][j] / total, p = a[(y + i) * w + x + j], q = b[(y + i) * w + x + j];
          mx += g * p, my += g * q, sxx += g * p * p, syy += g * q * q, sxy += g * p * q;
        }
      const double vx = sxx - mx * mx, vy = syy - my * my, cov = sxy - mx * my;
      sum += ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2));
      ++windows;
    }
  return sum / static_cast<double>(windows);
}

}  // namespace

TEST_CASE("psnr matches hand-computed values") {
  // 4x4 image of zeros against 0.1 everywhere: MSE = 0.01, range 1 -> 10 log10(1 / 0.01) = 20 dB.
  const std::vector<float> zeros(16, 0.0f), tenth(16, 0.1f);
  CHECK(quality::mean_psnr(view(zeros, 1, 1, 4, 4), view(tenth, 1, 1, 4, 4), 1.0) == doctest::Approx(20.0).epsilon(1e-6));
  // One pixel off by 1 of 16: MSE = 1/16; range 2 -> 10 log10(4 * 16) = 18.0618 dB.
  std::vector<float> one = zeros;
  one[5] = 1.0f;
  CHECK(quality::mean_psnr(view(zeros, 1, 1, 4, 4), view(one, 1, 1, 4, 4), 2.0) ==
        doctest::Approx(10.0 * std::log10(64.0)).epsilon(1e-12));
  // Per-image values of a 2-image batch, and their mean.
  std::vector<float> a(32, 0.0f), b(32, 0.0f);
  for (std::size_t i = 0; i < 16; ++i) b[i] = 0.1f;   // image 0: 20 dB
  for (std::size_t i = 16; i < 32; ++i) b[i] = 0.01f;  // image 1: 40 dB
  const auto per = quality::psnr_per_image(view(a, 2, 1, 4, 4), view(b, 2, 1, 4, 4), 1.0);
  REQUIRE(per.size() == 2);
  CHECK(per[0] == doctest::Approx(20.0).epsilon(1e-6));
  CHECK(per[1] == doctest::Approx(40.0).epsilon(1e-5));
  CHECK(quality::mean_psnr(view(a, 2, 1, 4, 4), view(b, 2, 1, 4, 4), 1.0) == doctest::Approx(30.0).epsilon(1e-5));
}

TEST_CASE("psnr properties on fresh random images: identical -> inf, symmetric, more noise -> lower") {
  const unsigned seed = test_support::fresh_seed();
  INFO("seed " << seed);
  const auto a = random_images(3 * 2 * 16 * 16, seed);
  auto b = a, c = a;
  std::mt19937 rng(seed + 1);
  std::normal_distribution<float> noise(0.0f, 1.0f);
  for (std::size_t i = 0; i < a.size(); ++i) {
    const float n = noise(rng);
    b[i] += 0.05f * n;
    c[i] += 0.2f * n;
  }
  const auto A = view(a, 3, 2, 16, 16), B = view(b, 3, 2, 16, 16), C = view(c, 3, 2, 16, 16);
  CHECK(std::isinf(quality::mean_psnr(A, A, 2.0)));
  CHECK(quality::mean_psnr(A, B, 2.0) == quality::mean_psnr(B, A, 2.0));
  CHECK(quality::mean_psnr(A, B, 2.0) > quality::mean_psnr(A, C, 2.0));
  // Scaling the error by 4 costs exactly 20 log10(4) dB.
  CHECK(quality::mean_psnr(A, B, 2.0) - quality::mean_psnr(A, C, 2.0) == doctest::Approx(20 * std::log10(4.0)).epsilon(1e-3));
}

TEST_CASE("ssim of constant images matches the closed form") {
  // Constant images: sigma terms vanish, SSIM = (2 c1 c2 + C1) / (c1^2 + c2^2 + C1), C1 = (0.01 R)^2.
  const std::vector<float> x(16 * 16, 0.5f), y(16 * 16, 0.25f);
  const double C1 = 1e-4;
  const double expected = (2 * 0.5 * 0.25 + C1) / (0.25 + 0.0625 + C1);
  CHECK(quality::mean_ssim(view(x, 1, 1, 16, 16), view(y, 1, 1, 16, 16), 1.0) == doctest::Approx(expected).epsilon(1e-9));
  // Range 2 changes C1 to 4e-4.
  const double expected2 = (2 * 0.5 * 0.25 + 4e-4) / (0.25 + 0.0625 + 4e-4);
  CHECK(quality::mean_ssim(view(x, 1, 1, 16, 16), view(y, 1, 1, 16, 16), 2.0) == doctest::Approx(expected2).epsilon(1e-9));
}

TEST_CASE("ssim matches a direct 2-D window computation on fresh random images") {
  const unsigned seed = test_support::fresh_seed();
  INFO("seed " << seed);
  const std::size_t h = 19, w = 23;
  const auto a = random_images(2 * 3 * h * w, seed);
  auto b = a;
  std::mt19937 rng(seed ^ 0x9e37u);
  std::normal_distribution<float> noise(0.0f, 0.3f);
  for (auto& v : b) v += noise(rng);
  const auto per = quality::ssim_per_image(view(a, 2, 3, h, w), view(b, 2, 3, h, w), 2.0);
  for (std::size_t n = 0; n < 2; ++n) {
    double expected = 0.0;
    for (std::size_t c = 0; c < 3; ++c)
      expected += brute_force_ssim(&a[(n * 3 + c) * h * w], &b[(n * 3 + c) * h * w], h, w, 2.0) / 3.0;
    CHECK(per[n] == doctest::Approx(expected).epsilon(1e-10));
  }
}

TEST_CASE("ssim properties: identical -> 1, symmetric, bounded, more noise -> lower") {
  const unsigned seed = test_support::fresh_seed();
  INFO("seed " << seed);
  const auto a = random_images(4 * 32 * 32, seed);
  auto b = a, c = a;
  std::mt19937 rng(seed + 7);
  std::normal_distribution<float> noise(0.0f, 1.0f);
  for (std::size_t i = 0; i < a.size(); ++i) {
    const float n = noise(rng);
    b[i] += 0.05f * n;
    c[i] += 0.5f * n;
  }
  const auto A = view(a, 4, 1, 32, 32), B = view(b, 4, 1, 32, 32), C = view(c, 4, 1, 32, 32);
  CHECK(quality::mean_ssim(A, A, 2.0) == doctest::Approx(1.0).epsilon(1e-12));
  CHECK(quality::mean_ssim(A, B, 2.0) == doctest::Approx(quality::mean_ssim(B, A, 2.0)).epsilon(1e-14));
  CHECK(quality::mean_ssim(A, B, 2.0) < 1.0);
  CHECK(quality::mean_ssim(A, C, 2.0) < quality::mean_ssim(A, B, 2.0));
  for (double s : quality::ssim_per_image(A, C, 2.0)) CHECK((s > -1.0 && s < 1.0));
}

TEST_CASE("metrics reject bad input with messages naming the problem") {
  const std::vector<float> a(2 * 16 * 16, 0.0f), b(16 * 16, 0.0f);
  CHECK_THROWS_WITH_AS(quality::mean_psnr(view(a, 2, 1, 16, 16), view(b, 1, 1, 16, 16), 1.0),
                       doctest::Contains("differ in shape: a is 2x1x16x16, b is 1x1x16x16"), std::invalid_argument);
  CHECK_THROWS_WITH_AS(quality::mean_ssim(view(a, 2, 1, 16, 16), view(a, 2, 1, 8, 32), 1.0),
                       doctest::Contains("differ in shape"), std::invalid_argument);
  // The span does not hold what the shape says.
  CHECK_THROWS_WITH_AS(quality::mean_psnr(view(b, 2, 1, 16, 16), view(b, 2, 1, 16, 16), 1.0),
                       doctest::Contains("a: data holds 256 floats but shape 2x1x16x16 needs 512"), std::invalid_argument);
  std::vector<float> nan = b;
  nan[37] = std::numeric_limits<float>::quiet_NaN();
  CHECK_THROWS_WITH_AS(quality::mean_ssim(view(b, 1, 1, 16, 16), view(nan, 1, 1, 16, 16), 1.0),
                       doctest::Contains("b: non-finite value nan in image 0 at element 37"), std::invalid_argument);
  std::vector<float> inf = b;
  inf[0] = std::numeric_limits<float>::infinity();
  CHECK_THROWS_AS(quality::mean_psnr(view(inf, 1, 1, 16, 16), view(b, 1, 1, 16, 16), 1.0), std::invalid_argument);
  CHECK_THROWS_WITH_AS(quality::mean_psnr(view(b, 1, 1, 16, 16), view(b, 1, 1, 16, 16), 0.0),
                       doctest::Contains("data_range must be finite and > 0, got 0"), std::invalid_argument);
  CHECK_THROWS_WITH_AS(quality::mean_ssim(view(b, 4, 1, 8, 8), view(b, 4, 1, 8, 8), 1.0),
                       doctest::Contains("at least 11x11"), std::invalid_argument);
  CHECK_THROWS_WITH_AS(quality::mean_ssim(view(b, 0, 1, 16, 16), view(b, 0, 1, 16, 16), 1.0),
                       doctest::Contains("every dimension must be > 0"), std::invalid_argument);
}
