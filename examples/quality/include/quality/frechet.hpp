#pragma once
// Fréchet distance between two sets of feature vectors, each summarised by its mean and covariance (the FID
// of Heusel et al., 2017, here in the digit classifier's feature space instead of Inception's):
//
//   FD = |m1 - m2|^2 + tr(C1) + tr(C2) - 2 tr((C1 C2)^(1/2))
//
// The trace of the matrix square root is computed from symmetric matrices only: C1 = V W V^T, R = V W^(1/2) V^T,
// and tr((C1 C2)^(1/2)) = sum of sqrt(max(0, eigenvalues of R C2 R)) (R C2 R is similar to C1 C2 and symmetric
// positive semi-definite, so no complex square root is needed). Everything is in double.
//
// With fewer feature vectors than dimensions the covariance is rank-deficient; the formula still holds, but FD
// is then biased upward (more so the fewer the samples): compare FDs only between sets of the same size.

#include <cstddef>
#include <filesystem>
#include <span>
#include <vector>

#include "quality/classifier.hpp"
#include "quality/image_batch.hpp"

namespace quality {

/// The reference statistics of a model folder: the classifier features of held-out real images
/// (tools/train_default_model.py fd-reference).
inline constexpr const char* fd_reference_file_name = "fd_reference.safetensors";

/// Mean and covariance of a set of feature vectors: what a Fréchet distance compares.
struct feature_statistics {
  std::size_t dim = 0;
  std::vector<double> mean;        ///< [dim]
  std::vector<double> covariance;  ///< [dim, dim], row-major, symmetric
};

/// Mean and sample covariance (n - 1 in the denominator) of `count` rows of `dim` features, row-major.
/// Throws std::invalid_argument naming the value for count < 2, dim == 0, a size that is not count * dim, or a
/// non-finite feature.
feature_statistics compute_feature_statistics(std::span<const double> features, std::size_t count, std::size_t dim);
feature_statistics compute_feature_statistics(std::span<const float> features, std::size_t count, std::size_t dim);

/// The Fréchet distance (see the top of this file). Throws std::invalid_argument naming the argument and the
/// value for: an empty mean, means of different sizes, a covariance that is not [dim, dim], a non-finite value,
/// a negative variance, or a covariance that is not symmetric (relative tolerance 1e-9 of its largest entry).
/// Rounding can leave a result of about -1e-12 for identical statistics; it is returned as computed.
double frechet_distance(std::span<const double> mean1, std::span<const double> covariance1, std::span<const double> mean2,
                        std::span<const double> covariance2);
double frechet_distance(const feature_statistics& a, const feature_statistics& b);

/// Reads reference statistics: tensors `mean` [d] and `covariance` [d, d], both F64. Throws std::runtime_error
/// naming the file when a tensor is missing, not F64 or of the wrong shape, when d is not `expected_dim` (the
/// classifier's feature size), or when the values fail frechet_distance's checks.
feature_statistics load_fd_reference(const std::filesystem::path& file, std::size_t expected_dim);

/// FD between the classifier features of `images` (at least 2) and `reference`. The images are taken as given:
/// clamp them to the classifier's input range first, as its accuracy is measured. Throws std::invalid_argument
/// for an invalid batch, fewer than 2 images, or a reference whose dim is not the classifier's feature size.
double classifier_fd(const digit_classifier& classifier, const image_batch& images, const feature_statistics& reference);

}  // namespace quality
