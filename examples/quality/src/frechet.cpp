#include "quality/frechet.hpp"

#include <Eigen/Eigenvalues>
#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

#include "sd3/errors.hpp"
#include "sd3/safetensors.hpp"

namespace quality {
namespace {

using matrix = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using const_matrix_view = Eigen::Map<const matrix>;

// Relative tolerance of the symmetry check: a covariance computed as X^T X by a BLAS may differ from its transpose
// in the last bits; anything larger is not a covariance.
constexpr double symmetry_tolerance = 1e-9;

void require_finite(std::span<const double> values, const char* name, std::size_t dim) {
  for (std::size_t i = 0; i < values.size(); ++i) {
    if (std::isfinite(values[i])) continue;
    if (dim == 0) throw std::invalid_argument(sd3::message(name, "[", i, "] = ", values[i], " is not finite"));
    throw std::invalid_argument(sd3::message(name, "[", i / dim, ", ", i % dim, "] = ", values[i], " is not finite"));
  }
}

// A [dim, dim] covariance: finite, non-negative diagonal, symmetric within symmetry_tolerance.
void require_covariance(std::span<const double> c, const char* name, std::size_t dim) {
  if (c.size() != dim * dim)
    throw std::invalid_argument(sd3::message(name, " has ", c.size(), " values, expected ", dim, " x ", dim, " = ", dim * dim));
  require_finite(c, name, dim);
  double largest = 0;
  for (const double v : c) largest = std::max(largest, std::abs(v));
  const double tolerance = symmetry_tolerance * std::max(1.0, largest);
  for (std::size_t i = 0; i < dim; ++i) {
    if (c[i * dim + i] < 0)
      throw std::invalid_argument(sd3::message(name, "[", i, ", ", i, "] = ", c[i * dim + i], " is a negative variance"));
    for (std::size_t j = i + 1; j < dim; ++j)
      if (std::abs(c[i * dim + j] - c[j * dim + i]) > tolerance)
        throw std::invalid_argument(sd3::message(name, "[", i, ", ", j, "] = ", c[i * dim + j], " but ", name, "[", j, ", ", i,
                                                 "] = ", c[j * dim + i], ": not symmetric"));
  }
}

template <class T>
feature_statistics statistics_of(std::span<const T> features, std::size_t count, std::size_t dim) {
  const char* fn = "compute_feature_statistics: ";
  if (count < 2) throw std::invalid_argument(sd3::message(fn, "count = ", count, ": a sample covariance needs at least 2 rows"));
  if (dim == 0) throw std::invalid_argument(sd3::message(fn, "dim = 0"));
  if (features.size() / dim != count || features.size() % dim != 0)
    throw std::invalid_argument(sd3::message(fn, "features has ", features.size(), " values, expected count x dim = ", count, " x ", dim));
  for (std::size_t i = 0; i < features.size(); ++i)
    if (!std::isfinite(features[i]))
      throw std::invalid_argument(sd3::message(fn, "features[", i / dim, ", ", i % dim, "] = ", features[i], " is not finite"));

  feature_statistics s{dim, std::vector<double>(dim, 0.0), std::vector<double>(dim * dim, 0.0)};
  for (std::size_t n = 0; n < count; ++n)
    for (std::size_t i = 0; i < dim; ++i) s.mean[i] += static_cast<double>(features[n * dim + i]);
  for (auto& m : s.mean) m /= static_cast<double>(count);
  // Deviations from the mean first (two passes): the one-pass sum of squares loses digits when the mean is large.
  std::vector<double> deviation(dim);
  for (std::size_t n = 0; n < count; ++n) {
    for (std::size_t i = 0; i < dim; ++i) deviation[i] = static_cast<double>(features[n * dim + i]) - s.mean[i];
    for (std::size_t i = 0; i < dim; ++i)
      for (std::size_t j = i; j < dim; ++j) s.covariance[i * dim + j] += deviation[i] * deviation[j];
  }
  for (std::size_t i = 0; i < dim; ++i)
    for (std::size_t j = i; j < dim; ++j) {
      const double c = s.covariance[i * dim + j] / static_cast<double>(count - 1);
      s.covariance[i * dim + j] = s.covariance[j * dim + i] = c;  // exactly symmetric
    }
  return s;
}

}  // namespace

feature_statistics compute_feature_statistics(std::span<const double> features, std::size_t count, std::size_t dim) {
  return statistics_of(features, count, dim);
}
feature_statistics compute_feature_statistics(std::span<const float> features, std::size_t count, std::size_t dim) {
  return statistics_of(features, count, dim);
}

double frechet_distance(std::span<const double> mean1, std::span<const double> covariance1, std::span<const double> mean2,
                        std::span<const double> covariance2) {
  const std::size_t dim = mean1.size();
  try {
    if (dim == 0) throw std::invalid_argument("mean1 is empty");
    if (mean2.size() != dim) throw std::invalid_argument(sd3::message("mean2 has ", mean2.size(), " values, mean1 has ", dim));
    require_finite(mean1, "mean1", 0);
    require_finite(mean2, "mean2", 0);
    require_covariance(covariance1, "covariance1", dim);
    require_covariance(covariance2, "covariance2", dim);
  } catch (const std::invalid_argument& e) {
    throw std::invalid_argument(sd3::message("frechet_distance: ", e.what()));
  }
  const auto d = static_cast<Eigen::Index>(dim);
  const const_matrix_view c1(covariance1.data(), d, d), c2(covariance2.data(), d, d);

  // R = C1^(1/2) from C1's eigen-decomposition; eigenvalues below 0 are rounding (C1 is semi-definite) and count as 0.
  const Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd> eig1(c1);
  const Eigen::VectorXd root_w = eig1.eigenvalues().cwiseMax(0.0).cwiseSqrt();
  const Eigen::MatrixXd root1 = eig1.eigenvectors() * root_w.asDiagonal() * eig1.eigenvectors().transpose();
  Eigen::MatrixXd middle = root1 * c2 * root1;
  middle = 0.5 * (middle + middle.transpose());  // symmetric up to rounding; make it exactly so for the solver
  const Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd> eig_middle(middle, Eigen::EigenvaluesOnly);
  const double trace_root = eig_middle.eigenvalues().cwiseMax(0.0).cwiseSqrt().sum();

  double mean_term = 0;
  for (std::size_t i = 0; i < dim; ++i) mean_term += (mean1[i] - mean2[i]) * (mean1[i] - mean2[i]);
  return mean_term + c1.trace() + c2.trace() - 2.0 * trace_root;
}

double frechet_distance(const feature_statistics& a, const feature_statistics& b) {
  return frechet_distance(a.mean, a.covariance, b.mean, b.covariance);
}

feature_statistics load_fd_reference(const std::filesystem::path& file, std::size_t expected_dim) {
  const auto fail = [&](const std::string& what) {
    return std::runtime_error(sd3::message("fd reference '", sd3::path_excerpt(file.string()), "': ", what));
  };
  const sd3::safetensors_file st(file);  // names the file itself when it is missing or damaged
  for (const char* name : {"mean", "covariance"}) {
    if (!st.contains(name)) throw fail(sd3::message("no tensor '", name, "'"));
    if (st.info(name).type != sd3::dtype::f64)
      throw fail(sd3::message("tensor '", name, "' is ", sd3::dtype_name(st.info(name).type), ", expected F64"));
  }
  const auto& mean_shape = st.info("mean").shape;
  const auto& cov_shape = st.info("covariance").shape;
  const auto shape_text = [](const std::vector<std::int64_t>& s) {
    std::string t = "[";
    for (std::size_t i = 0; i < s.size(); ++i) t += (i ? ", " : "") + std::to_string(s[i]);
    return t + "]";
  };
  const auto d = static_cast<std::int64_t>(expected_dim);
  if (mean_shape != std::vector<std::int64_t>{d})
    throw fail(sd3::message("tensor 'mean' is ", shape_text(mean_shape), ", expected [", d, "] (the classifier's feature size)"));
  if (cov_shape != std::vector<std::int64_t>{d, d})
    throw fail(sd3::message("tensor 'covariance' is ", shape_text(cov_shape), ", expected [", d, ", ", d, "] (the classifier's feature size)"));
  feature_statistics s{expected_dim, st.read_doubles("mean"), st.read_doubles("covariance")};
  try {
    require_finite(s.mean, "mean", 0);
    require_covariance(s.covariance, "covariance", expected_dim);
  } catch (const std::invalid_argument& e) {
    throw fail(e.what());
  }
  return s;
}

double classifier_fd(const digit_classifier& classifier, const image_batch& images, const feature_statistics& reference) {
  if (reference.dim != classifier.feature_size())
    throw std::invalid_argument(sd3::message("classifier_fd: reference statistics have ", reference.dim, " features, the classifier gives ",
                                             classifier.feature_size()));
  if (images.count < 2)
    throw std::invalid_argument(sd3::message("classifier_fd: images.count = ", images.count, ": a covariance needs at least 2 images"));
  const auto features = classifier.features(images);
  return frechet_distance(compute_feature_statistics(std::span<const float>(features), images.count, classifier.feature_size()), reference);
}

}  // namespace quality
