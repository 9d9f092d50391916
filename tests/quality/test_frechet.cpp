#include <doctest/doctest.h>

#include <cmath>
#include <limits>
#include <random>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "quality/classifier.hpp"
#include "quality/frechet.hpp"
#include "sd3/safetensors.hpp"
#include "test_support.hpp"

using test_support::make_tensor;

namespace {

std::vector<double> diagonal(const std::vector<double>& d) {
  std::vector<double> m(d.size() * d.size(), 0.0);
  for (std::size_t i = 0; i < d.size(); ++i) m[i * d.size() + i] = d[i];
  return m;
}

// `count` correlated feature rows: standard normal z times a random mixing matrix, plus an offset.
std::vector<double> random_features(std::mt19937_64& rng, std::size_t count, std::size_t dim, double offset) {
  std::normal_distribution<double> normal;
  std::vector<double> mix(dim * dim), out(count * dim, offset), z(dim);
  for (auto& m : mix) m = normal(rng);
  for (std::size_t n = 0; n < count; ++n) {
    for (auto& v : z) v = normal(rng);
    for (std::size_t j = 0; j < dim; ++j)
      for (std::size_t i = 0; i < dim; ++i) out[n * dim + j] += z[i] * mix[i * dim + j];
  }
  return out;
}

// A rotation of feature space as a product of plane (Givens) rotations, applied to every row.
struct rotation {
  struct plane {
    std::size_t i, j;
    double c, s;
  };
  std::vector<plane> planes;
  rotation(std::mt19937_64& rng, std::size_t dim) {
    std::uniform_int_distribution<std::size_t> index(0, dim - 1);
    std::uniform_real_distribution<double> angle(0.0, 6.283185307179586);
    for (std::size_t k = 0; k < 4 * dim; ++k) {
      const std::size_t i = index(rng), j = index(rng);
      if (i == j) continue;
      const double a = angle(rng);
      planes.push_back({i, j, std::cos(a), std::sin(a)});
    }
  }
  std::vector<double> apply(std::vector<double> rows, std::size_t dim) const {
    for (std::size_t n = 0; n < rows.size() / dim; ++n)
      for (const auto& p : planes) {
        double& x = rows[n * dim + p.i];
        double& y = rows[n * dim + p.j];
        const double xi = x, yj = y;
        x = p.c * xi - p.s * yj;
        y = p.s * xi + p.c * yj;
      }
    return rows;
  }
};

double scale_of(const quality::feature_statistics& a, const quality::feature_statistics& b) {
  double s = 1.0;
  for (std::size_t i = 0; i < a.dim; ++i) s += a.covariance[i * a.dim + i] + b.covariance[i * b.dim + i] + std::pow(a.mean[i] - b.mean[i], 2);
  return s;
}

}  // namespace

TEST_CASE("feature statistics: mean and sample covariance (n - 1) by hand") {
  // Rows (1, 2), (3, 4), (5, 0): mean (3, 2); deviations (-2, 0), (0, 2), (2, -2);
  // covariance = [[4 + 0 + 4, 0 + 0 - 4], [-4, 0 + 4 + 4]] / 2 = [[4, -2], [-2, 4]].
  const std::vector<double> rows{1, 2, 3, 4, 5, 0};
  const auto s = quality::compute_feature_statistics(rows, 3, 2);
  CHECK(s.dim == 2);
  CHECK(s.mean == std::vector<double>{3, 2});
  CHECK(s.covariance == std::vector<double>{4, -2, -2, 4});
  const std::vector<float> rows_f{1, 2, 3, 4, 5, 0};
  CHECK(quality::compute_feature_statistics(rows_f, 3, 2).covariance == s.covariance);
}

TEST_CASE("Frechet distance by hand: diagonal covariances, a 2x2 non-diagonal case, identical sets") {
  // Diagonal: FD = |m1 - m2|^2 + sum (sqrt a_i - sqrt b_i)^2 = (1 + 4 + 0) + (2 - 3)^2 + (1 - 0.5)^2 + 0 = 6.25.
  const std::vector<double> m1{0, 0, 1}, m2{1, -2, 1};
  CHECK(quality::frechet_distance(m1, diagonal({4, 1, 9}), m2, diagonal({9, 0.25, 9})) == doctest::Approx(6.25).epsilon(1e-12));

  // C1 = diag(4, 1), C2 = [[2, 1], [1, 2]], m1 = (0, 0), m2 = (1, 2). C1 C2 = [[8, 4], [1, 2]] has trace 10 and
  // determinant 12, and for a 2x2 matrix with eigenvalues l1, l2 >= 0, tr(M^(1/2)) = sqrt(l1) + sqrt(l2)
  // = sqrt(tr M + 2 sqrt(det M)). So FD = 5 + 5 + 4 - 2 sqrt(10 + 4 sqrt 3) = 5.771219...
  const double expected = 14.0 - 2.0 * std::sqrt(10.0 + 4.0 * std::sqrt(3.0));
  const std::vector<double> c1{4, 0, 0, 1}, c2{2, 1, 1, 2}, a{0, 0}, b{1, 2};
  CHECK(quality::frechet_distance(a, c1, b, c2) == doctest::Approx(expected).epsilon(1e-12));
  // The non-diagonal covariance first: its eigen-decomposition is then the one taken.
  CHECK(quality::frechet_distance(b, c2, a, c1) == doctest::Approx(expected).epsilon(1e-12));

  const unsigned seed = test_support::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  const auto rows = random_features(rng, 50, 8, 3.0);
  const auto s = quality::compute_feature_statistics(rows, 50, 8);
  // 0 within 1e-9 relative to the terms that cancel (tr C1 + tr C2): the trace term is rounded at that scale.
  CHECK(std::abs(quality::frechet_distance(s, s)) < 1e-9 * scale_of(s, s));
  // Random diagonal covariances against the closed form.
  std::uniform_real_distribution<double> u(0.0, 5.0);
  std::vector<double> da(6), db(6), ma(6), mb(6);
  double closed = 0;
  for (std::size_t i = 0; i < 6; ++i) {
    da[i] = u(rng), db[i] = u(rng), ma[i] = u(rng) - 2.5, mb[i] = u(rng) - 2.5;
    closed += std::pow(ma[i] - mb[i], 2) + std::pow(std::sqrt(da[i]) - std::sqrt(db[i]), 2);
  }
  CHECK(quality::frechet_distance(ma, diagonal(da), mb, diagonal(db)) == doctest::Approx(closed).epsilon(1e-10));
}

TEST_CASE("Frechet distance matches the numpy reference (tests/data/quality/fd_fixture.safetensors)") {
  // Written by tools/train_default_model.py fd-fixture: numpy eigh, no scipy.
  const sd3::safetensors_file fixture(SPECDIFF_QUALITY_DATA_DIR "/fd_fixture.safetensors");
  for (const std::string k : {"case0", "case1"}) {
    INFO(k);
    const auto& a_shape = fixture.info(k + ".a").shape;
    const auto& b_shape = fixture.info(k + ".b").shape;
    REQUIRE(a_shape.size() == 2);
    REQUIRE(b_shape.size() == 2);
    const auto a = quality::compute_feature_statistics(fixture.read_doubles(k + ".a"), static_cast<std::size_t>(a_shape[0]),
                                                       static_cast<std::size_t>(a_shape[1]));
    const auto b = quality::compute_feature_statistics(fixture.read_doubles(k + ".b"), static_cast<std::size_t>(b_shape[0]),
                                                       static_cast<std::size_t>(b_shape[1]));
    const double expected = fixture.read_doubles(k + ".fd").at(0);
    CHECK(quality::frechet_distance(a, b) == doctest::Approx(expected).epsilon(1e-6));
  }
}

TEST_CASE("Frechet distance on fresh random sets: symmetric, non-negative, rotation invariant, mean shift exact") {
  const unsigned seed = test_support::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  // Full-rank sets, and rank-deficient ones (fewer rows than features, as the demo's 8-16 samples in 128 features).
  for (const auto& [n1, n2, dim] : std::vector<std::tuple<std::size_t, std::size_t, std::size_t>>{{60, 45, 7}, {6, 9, 16}, {2, 3, 5}}) {
    INFO("n1 " << n1 << " n2 " << n2 << " dim " << dim);
    const auto rows_a = random_features(rng, n1, dim, 0.0), rows_b = random_features(rng, n2, dim, 0.7);
    const auto a = quality::compute_feature_statistics(rows_a, n1, dim), b = quality::compute_feature_statistics(rows_b, n2, dim);
    const double scale = scale_of(a, b), ab = quality::frechet_distance(a, b);
    // Rank-deficient covariances leave eigenvalues of R C2 R that are 0 up to rounding (about 1e-16 of the largest),
    // and their square roots (about 1e-8 of its root) enter the trace term: a looser, still tight, tolerance.
    const double tolerance = n1 > dim && n2 > dim ? 1e-9 : 1e-7;
    CHECK(ab >= -tolerance * scale);
    CHECK(ab > 1e-3 * scale);  // different sets are apart
    CHECK(quality::frechet_distance(b, a) == doctest::Approx(ab).epsilon(tolerance).scale(scale));

    const rotation q(rng, dim);
    const auto ra = quality::compute_feature_statistics(q.apply(rows_a, dim), n1, dim);
    const auto rb = quality::compute_feature_statistics(q.apply(rows_b, dim), n2, dim);
    CHECK(quality::frechet_distance(ra, rb) == doctest::Approx(ab).epsilon(tolerance).scale(scale));

    // Shifting one set by s changes only the mean term: |m1 - m2 - s|^2 - |m1 - m2|^2.
    std::normal_distribution<double> normal;
    std::vector<double> shift(dim), shifted(rows_b);
    double change = 0;
    for (std::size_t i = 0; i < dim; ++i) {
      shift[i] = normal(rng);
      change += std::pow(a.mean[i] - b.mean[i] - shift[i], 2) - std::pow(a.mean[i] - b.mean[i], 2);
    }
    for (std::size_t n = 0; n < n2; ++n)
      for (std::size_t i = 0; i < dim; ++i) shifted[n * dim + i] += shift[i];
    const auto sb = quality::compute_feature_statistics(shifted, n2, dim);
    CHECK(quality::frechet_distance(a, sb) == doctest::Approx(ab + change).epsilon(tolerance).scale(scale));
  }
}

TEST_CASE("Frechet distance refuses bad input, naming the argument and the value") {
  const std::vector<double> m{0, 0}, c{1, 0, 0, 1};
  const auto fd = [](std::vector<double> m1, std::vector<double> c1, std::vector<double> m2, std::vector<double> c2) {
    return [=] { (void)quality::frechet_distance(m1, c1, m2, c2); };
  };
  const double nan = std::numeric_limits<double>::quiet_NaN(), inf = std::numeric_limits<double>::infinity();
  CHECK_THROWS_WITH_AS(fd({}, {}, {}, {})(), doctest::Contains("frechet_distance: mean1 is empty"), std::invalid_argument);
  CHECK_THROWS_WITH_AS(fd(m, c, {0, 0, 0}, c)(), doctest::Contains("mean2 has 3 values, mean1 has 2"), std::invalid_argument);
  CHECK_THROWS_WITH_AS(fd(m, c, m, {1, 0, 0})(), doctest::Contains("covariance2 has 3 values, expected 2 x 2 = 4"), std::invalid_argument);
  CHECK_THROWS_WITH_AS(fd({0, nan}, c, m, c)(), doctest::Contains("mean1[1] = nan is not finite"), std::invalid_argument);
  CHECK_THROWS_WITH_AS(fd(m, c, m, {1, 0, inf, 1})(), doctest::Contains("covariance2[1, 0] = inf is not finite"), std::invalid_argument);
  CHECK_THROWS_WITH_AS(fd(m, {1, 0.5, 0.25, 1}, m, c)(),
                       doctest::Contains("covariance1[0, 1] = 0.5 but covariance1[1, 0] = 0.25: not symmetric"), std::invalid_argument);
  CHECK_THROWS_WITH_AS(fd(m, c, m, {1, 0, 0, -2})(), doctest::Contains("covariance2[1, 1] = -2 is a negative variance"),
                       std::invalid_argument);
  // Within the tolerance (1e-9 of the largest entry) is symmetric: a BLAS-computed covariance may differ in the last bits.
  const std::vector<double> nearly{4, 1 + 1e-12, 1, 4}, exactly{4, 1, 1, 4};
  CHECK(quality::frechet_distance(m, nearly, m, c) == doctest::Approx(quality::frechet_distance(m, exactly, m, c)));

  const std::vector<double> rows{1, 2, 3, 4};
  CHECK_THROWS_WITH_AS(quality::compute_feature_statistics(rows, 1, 4), doctest::Contains("count = 1"), std::invalid_argument);
  CHECK_THROWS_WITH_AS(quality::compute_feature_statistics(rows, 2, 0), doctest::Contains("dim = 0"), std::invalid_argument);
  CHECK_THROWS_WITH_AS(quality::compute_feature_statistics(rows, 3, 2), doctest::Contains("features has 4 values, expected count x dim = 3 x 2"),
                       std::invalid_argument);
  const std::vector<float> bad{1, 2, 3, std::nanf("")};
  CHECK_THROWS_WITH_AS(quality::compute_feature_statistics(bad, 2, 2), doctest::Contains("features[1, 1] = nan is not finite"),
                       std::invalid_argument);
}

TEST_CASE("fd reference files: the shipped one loads, damaged ones are refused naming the file") {
  const auto net = quality::digit_classifier::load(SPECDIFF_MODEL_DIR);
  const auto shipped = quality::load_fd_reference(SPECDIFF_MODEL_DIR "/fd_reference.safetensors", net.feature_size());
  CHECK(shipped.dim == 128);
  CHECK(shipped.mean.size() == 128);
  CHECK(shipped.covariance.size() == 128 * 128);

  test_support::temp_dir dir;
  const auto path = dir.path() / "fd_reference.safetensors";
  const auto write = [&](std::vector<test_support::raw_tensor> tensors) { test_support::write_safetensors(path, tensors); };
  const auto load = [&](std::size_t dim) { return [&, dim] { (void)quality::load_fd_reference(path, dim); }; };
  const std::vector<double> mean{1, 2}, cov{2, 1, 1, 3};

  write({make_tensor("mean", "F64", {2}, mean), make_tensor("covariance", "F64", {2, 2}, cov)});
  const auto ok = quality::load_fd_reference(path, 2);
  CHECK(ok.mean == mean);
  CHECK(ok.covariance == cov);
  CHECK_THROWS_WITH_AS(load(3)(), doctest::Contains("tensor 'mean' is [2], expected [3] (the classifier's feature size)"), std::runtime_error);
  const std::string path_text = path.string();
  CHECK_THROWS_WITH_AS(load(3)(), doctest::Contains(path_text.c_str()), std::runtime_error);

  write({make_tensor("mean", "F64", {2}, mean)});
  CHECK_THROWS_WITH_AS(load(2)(), doctest::Contains("no tensor 'covariance'"), std::runtime_error);
  write({make_tensor("mean", "F64", {2}, mean), make_tensor("covariance", "F32", {2, 2}, std::vector<float>{2, 1, 1, 3})});
  CHECK_THROWS_WITH_AS(load(2)(), doctest::Contains("tensor 'covariance' is F32, expected F64"), std::runtime_error);
  write({make_tensor("mean", "F64", {2}, mean), make_tensor("covariance", "F64", {4}, cov)});
  CHECK_THROWS_WITH_AS(load(2)(), doctest::Contains("tensor 'covariance' is [4], expected [2, 2]"), std::runtime_error);
  write({make_tensor("mean", "F64", {2}, mean), make_tensor("covariance", "F64", {2, 2}, std::vector<double>{2, 1, 0.5, 3})});
  CHECK_THROWS_WITH_AS(load(2)(), doctest::Contains("covariance[0, 1] = 1 but covariance[1, 0] = 0.5: not symmetric"), std::runtime_error);
  write({make_tensor("mean", "F64", {2}, std::vector<double>{1, std::nan("")}), make_tensor("covariance", "F64", {2, 2}, cov)});
  CHECK_THROWS_WITH_AS(load(2)(), doctest::Contains("mean[1] = nan is not finite"), std::runtime_error);
  CHECK_THROWS_WITH_AS(quality::load_fd_reference(dir.path() / "absent.safetensors", 2), doctest::Contains("absent.safetensors"),
                       std::runtime_error);
}

TEST_CASE("classifier FD: held-out digits are near the reference set, noise is far, bad input refused") {
  const auto net = quality::digit_classifier::load(SPECDIFF_MODEL_DIR);
  const auto reference = quality::load_fd_reference(SPECDIFF_MODEL_DIR "/fd_reference.safetensors", net.feature_size());
  const sd3::safetensors_file fixture(SPECDIFF_QUALITY_DATA_DIR "/classifier_fixture.safetensors");
  const auto digits = fixture.read("images");
  const auto n = static_cast<std::size_t>(fixture.info("images").shape[0]);
  const quality::image_batch real{digits, n, 1, 32, 32};

  const unsigned seed = test_support::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::vector<float> noise(digits.size());
  for (auto& v : noise) v = u(rng);
  const quality::image_batch noisy{noise, n, 1, 32, 32};

  // The fixture's images are 20 of the reference set's own held-out digits (two per class).
  const double fd_real = quality::classifier_fd(net, real, reference), fd_noise = quality::classifier_fd(net, noisy, reference);
  INFO("fd real " << fd_real << ", fd noise " << fd_noise);
  CHECK(fd_real >= 0.0);
  CHECK(fd_noise > 3.0 * fd_real);
  // It is the FD of the features' statistics (the classifier's features, as compute_feature_statistics takes them).
  const auto features = net.features(real);
  CHECK(fd_real == doctest::Approx(quality::frechet_distance(quality::compute_feature_statistics(features, n, 128), reference)));

  CHECK_THROWS_WITH_AS((void)quality::classifier_fd(net, {std::span(digits).first(32 * 32), 1, 1, 32, 32}, reference), doctest::Contains("images.count = 1"),
                       std::invalid_argument);
  quality::feature_statistics small{2, {0, 0}, {1, 0, 0, 1}};
  CHECK_THROWS_WITH_AS((void)quality::classifier_fd(net, real, small), doctest::Contains("reference statistics have 2 features, the classifier gives 128"),
                       std::invalid_argument);
}
