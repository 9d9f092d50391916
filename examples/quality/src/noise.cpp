// Built with -ffp-contract=off (see CMakeLists.txt): a fused multiply-add would round differently
// from a separate multiply and add, and that is exactly the platform dependence this file avoids.
#include "quality/noise.hpp"

#include <cmath>
#include <stdexcept>
#include <string>

namespace quality {
namespace {

constexpr std::uint32_t philox_m0 = 0xD2511F53u, philox_m1 = 0xCD9E8D57u;
constexpr std::uint32_t philox_w0 = 0x9E3779B9u, philox_w1 = 0xBB67AE85u;
constexpr double ln2 = 0.693147180559945309417232121458176568;
constexpr double half_pi = 1.57079632679489661923132169163975144;
constexpr double sqrt_half = 0.707106781186547524400844362104849039;

constexpr std::uint32_t lo32(std::uint64_t v) { return static_cast<std::uint32_t>(v); }
constexpr std::uint32_t hi32(std::uint64_t v) { return static_cast<std::uint32_t>(v >> 32); }

// sin(a), cos(a) for |a| <= pi/4 by Taylor series; 12 terms leave a remainder below 1e-30.
void sincos_reduced(double a, double& s, double& c) {
  const double a2 = a * a;
  double term_s = a, term_c = 1.0;
  s = 0.0;
  c = 0.0;
  for (int k = 1; k <= 12; ++k) {
    s += term_s;
    c += term_c;
    term_s = -term_s * a2 / static_cast<double>((2 * k) * (2 * k + 1));
    term_c = -term_c * a2 / static_cast<double>((2 * k - 1) * (2 * k));
  }
}

}  // namespace

std::array<std::uint32_t, 4> philox4x32_10(std::array<std::uint32_t, 4> c, std::array<std::uint32_t, 2> k) {
  for (int round = 0; round < 10; ++round) {
    const std::uint64_t p0 = static_cast<std::uint64_t>(philox_m0) * c[0];
    const std::uint64_t p1 = static_cast<std::uint64_t>(philox_m1) * c[2];
    c = {hi32(p1) ^ c[1] ^ k[0], lo32(p1), hi32(p0) ^ c[3] ^ k[1], lo32(p0)};
    k = {k[0] + philox_w0, k[1] + philox_w1};
  }
  return c;
}

double portable_log(double x) {
  if (!(x > 0.0) || !std::isfinite(x)) {
    throw std::invalid_argument("portable_log: x must be finite and > 0, got " + std::to_string(x));
  }
  int e = 0;
  double m = std::frexp(x, &e);  // exact: x = m 2^e, m in [0.5, 1)
  if (m < sqrt_half) {
    m *= 2.0;  // exact
    --e;
  }
  // m in [sqrt(1/2), sqrt(2)): log m = 2 atanh(s) = 2 (s + s^3/3 + s^5/5 + ...), |s| <= 0.172.
  const double s = (m - 1.0) / (m + 1.0), s2 = s * s;
  double sum = 0.0, power = s;
  for (int k = 0; k < 14; ++k) {
    sum += power / static_cast<double>(2 * k + 1);
    power *= s2;
  }
  return 2.0 * sum + static_cast<double>(e) * ln2;
}

void portable_sincos_turns(double turns, double& sin_out, double& cos_out) {
  if (!(turns >= 0.0 && turns < 1.0)) {
    throw std::invalid_argument("portable_sincos_turns: turns must be in [0, 1), got " + std::to_string(turns));
  }
  // Exact range reduction in units of quarter turns: 4 turns = q + f, q integer, f in [-1/2, 1/2].
  const double quarters = 4.0 * turns;
  const double q = std::floor(quarters + 0.5);
  double s = 0.0, c = 0.0;
  sincos_reduced((quarters - q) * half_pi, s, c);
  switch (static_cast<int>(q) & 3) {
    case 0: sin_out = s; cos_out = c; break;
    case 1: sin_out = c; cos_out = -s; break;
    case 2: sin_out = -s; cos_out = -c; break;
    default: sin_out = -c; cos_out = s; break;
  }
}

void fill_gaussian(std::span<float> out, std::uint64_t seed, std::uint64_t stream, std::uint64_t first_index) {
  const std::array<std::uint32_t, 2> key{lo32(seed), hi32(seed)};
  constexpr double two_pow_minus_53 = 1.0 / 9007199254740992.0;
  std::uint64_t cached_pair = ~std::uint64_t{0};
  double r = 0.0, sin_theta = 0.0, cos_theta = 0.0;
  for (std::size_t j = 0; j < out.size(); ++j) {
    const std::uint64_t index = first_index + j;
    const std::uint64_t pair = index / 2;
    if (pair != cached_pair) {
      const auto w = philox4x32_10({lo32(pair), hi32(pair), lo32(stream), hi32(stream)}, key);
      const std::uint64_t a = ((static_cast<std::uint64_t>(w[0]) << 32) | w[1]) >> 11;
      const std::uint64_t b = ((static_cast<std::uint64_t>(w[2]) << 32) | w[3]) >> 11;
      const double u1 = static_cast<double>(a + 1) * two_pow_minus_53;
      const double u2 = static_cast<double>(b) * two_pow_minus_53;
      r = std::sqrt(-2.0 * portable_log(u1));
      portable_sincos_turns(u2, sin_theta, cos_theta);
      cached_pair = pair;
    }
    out[j] = static_cast<float>(index % 2 == 0 ? r * cos_theta : r * sin_theta);
  }
}

std::vector<float> gaussian_noise(std::size_t count, std::uint64_t seed, std::uint64_t stream) {
  std::vector<float> out(count);
  fill_gaussian(out, seed, stream, 0);
  return out;
}

std::uint64_t noise_stream(noise_domain domain, std::uint64_t sample) {
  if (sample >= max_domain_samples) throw std::invalid_argument("noise sample index: must be < 2^32, got " + std::to_string(sample));
  return domain == noise_domain::calibration ? (std::uint64_t{calibration_stream_tag} << 32) | sample : sample;
}

const char* noise_domain_name(noise_domain domain) { return domain == noise_domain::calibration ? "calibration" : "evaluation"; }

std::vector<float> sample_latents(std::size_t samples, std::size_t per_sample, std::uint64_t seed, std::uint64_t first_sample,
                                  noise_domain domain) {
  if (samples > 0 && (first_sample >= max_domain_samples || samples - 1 >= max_domain_samples - first_sample))
    throw std::invalid_argument("noise samples: indices " + std::to_string(first_sample) + " .. +" + std::to_string(samples) + " pass 2^32");
  std::vector<float> out(samples * per_sample);
  for (std::size_t k = 0; k < samples; ++k)
    fill_gaussian(std::span<float>(out).subspan(k * per_sample, per_sample), seed, noise_stream(domain, first_sample + k), 0);
  return out;
}

}  // namespace quality
