#include <doctest/doctest.h>

#include <cmath>
#include <specdiff/cache_store.hpp>

#include "../common/testing.hpp"

using namespace specdiff;

namespace {

// Row i of step value v: a recognisable pattern, token i, column c -> v * 100 + i + c / 10.
std::vector<float> pattern(index_t tokens, index_t dim, float v) {
  std::vector<float> m(static_cast<std::size_t>(tokens * dim));
  for (index_t i = 0; i < tokens; ++i)
    for (index_t c = 0; c < dim; ++c) m[static_cast<std::size_t>(i * dim + c)] = v * 100.f + static_cast<float>(i) + static_cast<float>(c) / 10.f;
  return m;
}

}  // namespace

TEST_CASE("write, scatter and per-token history with tags") {
  host_cache_store<float> s({2, 3, 4, 2, 3});
  auto step0 = pattern(4, 2, 0.f);
  s.write(1, 2, 1000.f, matrix_view<const float>(step0.data(), 4, 2));
  const std::vector<index_t> some = {1, 3};
  const std::vector<float> rows = {7.f, 8.f, 9.f, 10.f};  // token 1 -> (7, 8), token 3 -> (9, 10)
  s.scatter(1, 2, 900.f, some, matrix_view<const float>(rows.data(), 2, 2));
  CHECK(s.entries(1, 2, 0) == 1);
  CHECK(s.entries(1, 2, 1) == 2);
  CHECK(s.entries(0, 0, 1) == 0);  // other slots untouched
  CHECK(s.history(1, 2, 1, 0)[1] == 8.f);
  CHECK(s.history_tag(1, 2, 1, 0) == 900.f);
  CHECK(s.history(1, 2, 1, 1)[0] == step0[2]);
  CHECK(s.history_tag(1, 2, 1, 1) == 1000.f);
  CHECK(s.history(1, 2, 3, 0)[0] == 9.f);
}

TEST_CASE("the ring keeps the last history_depth rows") {
  host_cache_store<float> s({1, 1, 3, 1, 3});
  for (int k = 0; k < 5; ++k) {
    const std::vector<float> rows = {float(k), float(k + 10), float(k + 20)};
    s.write(0, 0, 1000.f - 100.f * k, matrix_view<const float>(rows.data(), 3, 1));
  }
  CHECK(s.entries(0, 0, 2) == 3);
  CHECK(s.history(0, 0, 2, 0)[0] == 24.f);
  CHECK(s.history(0, 0, 2, 1)[0] == 23.f);
  CHECK(s.history(0, 0, 2, 2)[0] == 22.f);
  CHECK(s.history_tag(0, 0, 2, 2) == 800.f);
}

TEST_CASE("fill: latest, SpecDiff mix and Taylor, against the formulas (fresh random)") {
  std::mt19937_64 rng(testing::fresh_seed());
  INFO("seed ", testing::fresh_seed());
  const index_t n = 37, dim = 19;
  host_cache_store<float> s({1, 1, n, dim, 3});
  std::vector<std::vector<float>> hist;
  const float tags[3] = {1000.f, 960.f, 930.f};
  for (int k = 0; k < 3; ++k) {
    hist.push_back(testing::random_vector(rng, static_cast<std::size_t>(n * dim), -2.f, 2.f));
    s.write(0, 0, tags[k], matrix_view<const float>(hist.back().data(), n, dim));
  }
  const std::vector<index_t> tokens = {0, 5, 36};
  std::vector<float> out(static_cast<std::size_t>(n * dim), -7.f);
  matrix_view<float> o(out.data(), n, dim);
  const float target = 900.f;

  s.fill(0, 0, target, tokens, specdiff_weighted{}, o);
  const double r[3] = {std::exp(-1.0) * (930 - 900), std::exp(-2.0) * (960 - 900), std::exp(-3.0) * (1000 - 900)};
  const double sum = r[0] + r[1] + r[2];
  for (index_t t : tokens)
    for (index_t c = 0; c < dim; ++c) {
      const auto at = static_cast<std::size_t>(t * dim + c);
      const double want = (r[0] * hist[2][at] + r[1] * hist[1][at] + r[2] * hist[0][at]) / sum;
      CHECK(out[at] == doctest::Approx(want).epsilon(1e-5));
    }
  CHECK(out[1 * dim] == -7.f);  // rows not listed are untouched

  s.fill(0, 0, 0.f, tokens, o);
  for (index_t c = 0; c < dim; ++c) CHECK(out[static_cast<std::size_t>(5 * dim + c)] == hist[2][static_cast<std::size_t>(5 * dim + c)]);

  // Taylor order 2 through (930, 960, 1000) reproduces a quadratic in t exactly
  host_cache_store<float> q({1, 1, 1, 1, 3});
  auto f = [](double t) { return 0.001 * t * t - 1.5 * t + 3.0; };
  for (float t : tags) {
    const float v = static_cast<float>(f(t));
    q.write(0, 0, t, matrix_view<const float>(&v, 1, 1));
  }
  float pred = 0.f;
  const std::vector<index_t> one = {0};
  q.fill(0, 0, target, one, taylor<2>{}, matrix_view<float>(&pred, 1, 1));
  CHECK(pred == doctest::Approx(f(target)).epsilon(1e-4));
}

TEST_CASE("approximators use what history there is") {
  host_cache_store<float> s({1, 1, 1, 1, 3});
  const float v = 4.f;
  s.write(0, 0, 1000.f, matrix_view<const float>(&v, 1, 1));
  float out = 0.f;
  const std::vector<index_t> one = {0};
  s.fill(0, 0, 900.f, one, specdiff_weighted{}, matrix_view<float>(&out, 1, 1));
  CHECK(out == 4.f);
  s.fill(0, 0, 900.f, one, taylor<2>{}, matrix_view<float>(&out, 1, 1));
  CHECK(out == 4.f);
  // a repeated tag makes extrapolation impossible: reported, not a division by zero
  s.write(0, 0, 1000.f, matrix_view<const float>(&v, 1, 1));
  testing::expect_error<std::logic_error>([&] { s.fill(0, 0, 900.f, one, linear{}, matrix_view<float>(&out, 1, 1)); }, {"repeated timestep"});
}

TEST_CASE("bfloat16 storage halves the memory and rounds to nearest even") {
  host_cache_store<float> f({2, 2, 64, 32, 3});
  host_cache_store<bfloat16> h({2, 2, 64, 32, 3});
  const std::size_t rows = 2 * 2 * 64, values = rows * 3 * 32;
  CHECK(f.memory_bytes() == values * 4 + rows * 3 * 4 + rows * 2);
  CHECK(h.memory_bytes() == values * 2 + rows * 3 * 4 + rows * 2);
  CHECK(storage_traits<bfloat16>::store(1.0f).bits == 0x3f80);
  CHECK(storage_traits<bfloat16>::load(storage_traits<bfloat16>::store(1.00390625f)) == 1.0f);  // tie -> even
  CHECK(storage_traits<bfloat16>::load(storage_traits<bfloat16>::store(1.01171875f)) == 1.015625f);  // tie -> even (up)
  CHECK(std::isnan(storage_traits<bfloat16>::load(storage_traits<bfloat16>::store(std::nanf("")))));
  std::mt19937_64 rng(testing::fresh_seed());
  auto rows_in = testing::random_vector(rng, 64 * 32, -100.f, 100.f);
  h.write(1, 1, 5.f, matrix_view<const float>(rows_in.data(), 64, 32));
  for (index_t i = 0; i < 64; ++i)
    for (index_t c = 0; c < 32; ++c) {
      const float x = rows_in[static_cast<std::size_t>(i * 32 + c)];
      CHECK(std::abs(storage_traits<bfloat16>::load(h.history(1, 1, i, 0)[static_cast<std::size_t>(c)]) - x) <= std::abs(x) * (1.f / 256.f));
    }
}

TEST_CASE("change_norm: L2 of the last two rows, +inf where unknown") {
  host_cache_store<float> s({1, 1, 2, 2, 3});
  const std::vector<float> a = {0.f, 0.f, 1.f, 1.f}, b = {3.f, 4.f, 1.f, 1.f};
  s.write(0, 0, 1.f, matrix_view<const float>(a.data(), 2, 2));
  std::vector<float> out(2);
  s.change_norm(0, 0, out);
  CHECK(std::isinf(out[0]));
  s.write(0, 0, 2.f, matrix_view<const float>(b.data(), 2, 2));
  s.change_norm(0, 0, out);
  CHECK(out[0] == doctest::Approx(5.0));
  CHECK(out[1] == 0.f);
}

TEST_CASE("cache store rejects bad input, naming the parameter") {
  testing::expect_error<std::invalid_argument>([] { host_cache_store<float> s({1, 1, 0, 4, 3}); }, {"tokens", "0"});
  testing::expect_error<std::invalid_argument>([] { host_cache_store<float> s({1, 1, 4, 4, 0}); }, {"history_depth", "0"});
  testing::expect_error<std::invalid_argument>([] { host_cache_store<float> s({0, 1, 4, 4, 3}); }, {"layers"});
  host_cache_store<float> s({2, 2, 3, 2, 3});
  std::vector<float> m(6, 1.f), out(6);
  const std::vector<index_t> tok = {0};
  testing::expect_error<std::invalid_argument>([&] { s.write(2, 0, 1.f, matrix_view<const float>(m.data(), 3, 2)); }, {"layer = 2", "[0, 2)"});
  testing::expect_error<std::invalid_argument>([&] { s.write(0, -1, 1.f, matrix_view<const float>(m.data(), 3, 2)); }, {"site = -1"});
  testing::expect_error<std::invalid_argument>([&] { s.write(0, 0, 1.f, matrix_view<const float>(m.data(), 2, 3)); }, {"rows", "3x2", "2x3"});
  testing::expect_error<std::logic_error>([&] { s.fill(0, 0, 0.f, tok, matrix_view<float>(out.data(), 3, 2)); }, {"never written", "token 0"});
  testing::expect_error<std::logic_error>([&] { (void)s.history(0, 0, 1, 0); }, {"history", "token 1"});
  m[3] = std::nanf("");
  testing::expect_error<std::invalid_argument>([&] { s.write(0, 0, 1.f, matrix_view<const float>(m.data(), 3, 2)); }, {"rows[1][1]", "not finite"});
  m[3] = INFINITY;
  testing::expect_error<std::invalid_argument>([&] { s.scatter(0, 0, 1.f, tok, matrix_view<const float>(m.data() + 2, 1, 2)); }, {"rows[0][1]"});
  m[3] = 1.f;
  const std::vector<index_t> bad = {3};
  testing::expect_error<std::invalid_argument>([&] { s.scatter(0, 0, 1.f, bad, matrix_view<const float>(m.data(), 1, 2)); }, {"tokens[i] = 3"});
  testing::expect_error<std::invalid_argument>([&] { s.write(0, 0, NAN, matrix_view<const float>(m.data(), 3, 2)); }, {"t:"});
  const std::vector<index_t> unsorted = {2, 1};
  testing::expect_error<std::invalid_argument>([&] { s.scatter(0, 0, 1.f, unsorted, matrix_view<const float>(m.data(), 2, 2)); }, {"strictly ascending", "2 then 1"});
  testing::expect_error<std::invalid_argument>([] { host_cache_store<float> s2({1 << 20, 1 << 20, 1 << 20, 1 << 20, 8}); }, {"overflows"});
}

TEST_CASE("a failed write leaves the store as it was (all or nothing)") {
  host_cache_store<float> s({1, 1, 3, 2, 3});
  std::vector<float> m = {1.f, 2.f, 3.f, 4.f, 5.f, 6.f};
  s.write(0, 0, 10.f, matrix_view<const float>(m.data(), 3, 2));
  m[5] = std::nanf("");  // the last row is bad: the first two must not be pushed either
  testing::expect_error<std::invalid_argument>([&] { s.write(0, 0, 9.f, matrix_view<const float>(m.data(), 3, 2)); }, {"rows[2][1]"});
  const std::vector<index_t> two = {0, 2};
  testing::expect_error<std::invalid_argument>([&] { s.write_rows(0, 0, 9.f, two, matrix_view<const float>(m.data(), 3, 2)); }, {"all[2][1]"});
  for (index_t i = 0; i < 3; ++i) {
    CHECK(s.entries(0, 0, i) == 1);
    CHECK(s.history_tag(0, 0, i, 0) == 10.f);
  }
}
