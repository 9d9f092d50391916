#pragma once
// Deterministic Gaussian noise from a seed: the same float values on every platform and compiler, so a
// full-compute run and an accelerated run (or a C++ and a Python run) start from identical latents.
//
// Element `i` of stream `stream` under `seed`:
//   1. Philox4x32-10 (Salmon et al., SC'11) with counter (p lo, p hi, stream lo, stream hi), p = i / 2,
//      and key (seed lo, seed hi), giving four 32-bit words w0..w3;
//   2. two 53-bit uniforms: u1 = ((w0:w1 >> 11) + 1) 2^-53 in (0, 1], u2 = (w2:w3 >> 11) 2^-53 in [0, 1);
//   3. Box-Muller: r = sqrt(-2 ln u1), theta = 2 pi u2; element i is r cos(theta) if i is even, r sin(theta) if odd;
//   4. rounded to float.
// Step 3 uses this library's own log / sin / cos (series in double with exact range reduction), built
// with -ffp-contract=off, so only IEEE-754 +, -, *, /, sqrt are involved: no platform libm.
// Convention for latents: stream = the sample's index in the run, index = position in its NCHW latent.

#include <array>
#include <cstdint>
#include <span>
#include <vector>

namespace quality {

/// One Philox4x32-10 block (the Random123 reference function).
std::array<std::uint32_t, 4> philox4x32_10(std::array<std::uint32_t, 4> counter, std::array<std::uint32_t, 2> key);

/// Writes elements first_index, first_index + 1, ... of (seed, stream) into out.
void fill_gaussian(std::span<float> out, std::uint64_t seed, std::uint64_t stream, std::uint64_t first_index = 0);

/// `count` elements of (seed, stream), starting at index 0.
std::vector<float> gaussian_noise(std::size_t count, std::uint64_t seed, std::uint64_t stream = 0);

/// Which noise a sample draws: the noise every tool evaluates on, or the noise learned weights are fitted on
/// (specdiff-calibrate). The two are separate key spaces by construction: sample k of the evaluation domain is
/// Philox stream k, whose high word is 0 (k < 2^32); sample k of the calibration domain is stream
/// (calibration_stream_tag << 32) | k. So for every seed the Philox counters of the two domains never coincide,
/// and with one key Philox is a bijection on counters: no block of calibration noise is a block of evaluation
/// noise of the same seed (different seeds have different keys, as any two seeds do).
enum class noise_domain { evaluation, calibration };
inline constexpr std::uint32_t calibration_stream_tag = 0x43414C49u;  // "CALI"
/// Samples per run the domains hold apart (stream high word 0 or the tag): samples are indexed below 2^32.
inline constexpr std::uint64_t max_domain_samples = std::uint64_t{1} << 32;
/// The Philox stream of sample `sample` in `domain`. Throws std::invalid_argument for sample >= 2^32.
std::uint64_t noise_stream(noise_domain domain, std::uint64_t sample);
/// "evaluation" / "calibration", as the learned files record it.
const char* noise_domain_name(noise_domain domain);

/// Initial latents of samples first_sample .. first_sample + samples - 1, `per_sample` values each: sample k
/// draws from stream noise_stream(domain, k) of `seed` (stream k for evaluation), so a sample's latents do not
/// depend on how runs are batched (the convention of specdiff-sample, the demo and the benchmarks, and of the
/// Python tools). Throws std::invalid_argument when a sample index reaches 2^32.
std::vector<float> sample_latents(std::size_t samples, std::size_t per_sample, std::uint64_t seed, std::uint64_t first_sample = 0,
                                  noise_domain domain = noise_domain::evaluation);

/// Natural log for finite x > 0, computed with basic IEEE operations only (within ~2 ulp of the true value).
/// Throws std::invalid_argument for x <= 0 or non-finite x.
double portable_log(double x);

/// sin and cos of 2 pi * turns for turns in [0, 1), basic IEEE operations only.
/// Throws std::invalid_argument for turns outside [0, 1).
void portable_sincos_turns(double turns, double& sin_out, double& cos_out);

}  // namespace quality
