#pragma once
// Full-reference image quality: PSNR and SSIM between two batches of the same shape.
//
// PSNR (per image): 10 log10(R^2 / MSE), R = data_range (2 for images in [-1, 1]); +inf when MSE = 0.
//
// SSIM (per image), after Wang, Bovik, Sheikh & Simoncelli (2004) and their reference code:
//   - 11x11 Gaussian window, sigma 1.5, normalised to sum 1;
//   - C1 = (0.01 R)^2, C2 = (0.03 R)^2;
//   - local statistics are Gaussian-weighted means (no sample-covariance correction):
//       mu_x = w*x, sigma_x^2 = w*(x^2) - mu_x^2, sigma_xy = w*(xy) - mu_x mu_y;
//   - SSIM map = ((2 mu_x mu_y + C1)(2 sigma_xy + C2)) / ((mu_x^2 + mu_y^2 + C1)(sigma_x^2 + sigma_y^2 + C2)),
//     evaluated only where the window lies fully inside the image ("valid", no padding), so images must
//     be at least 11x11; the image's SSIM is the mean of that map, averaged over channels.
// Statistics are accumulated in double. Batch means are plain means of the per-image values.

#include <vector>

#include "quality/image_batch.hpp"

namespace quality {

inline constexpr int ssim_window = 11;
inline constexpr double ssim_sigma = 1.5;
inline constexpr double ssim_k1 = 0.01;
inline constexpr double ssim_k2 = 0.03;

/// Per-image PSNR in dB. Throws std::invalid_argument for shape mismatch, non-finite values or data_range <= 0.
std::vector<double> psnr_per_image(const image_batch& a, const image_batch& b, double data_range);
/// Mean of psnr_per_image (+inf if any pair is identical).
double mean_psnr(const image_batch& a, const image_batch& b, double data_range);

/// Per-image SSIM. Throws std::invalid_argument for shape mismatch, non-finite values, data_range <= 0
/// or images smaller than the 11x11 window.
std::vector<double> ssim_per_image(const image_batch& a, const image_batch& b, double data_range);
/// Mean of ssim_per_image.
double mean_ssim(const image_batch& a, const image_batch& b, double data_range);

}  // namespace quality
