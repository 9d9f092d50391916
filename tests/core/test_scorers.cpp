#include <doctest/doctest.h>

#include <cmath>
#include <limits>
#include <specdiff/scorers.hpp>

#include "../common/testing.hpp"

using namespace specdiff;

TEST_CASE("SpecDiff scorer: log(his * fut * exp(cf)), hand computed") {
  const std::vector<float> his = {0.5f, 2.f, 1.f}, fut = {4.f, 0.25f, 1.f}, cf = {0.f, 1.f, 3.f};
  std::vector<float> out(3);
  score_tokens(specdiff_scorer{}, {.attention = his, .future = fut, .cache_count = cf}, out);
  CHECK(out[0] == doctest::Approx(std::log(2.0)));
  CHECK(out[1] == doctest::Approx(std::log(0.5) + 1.0));
  CHECK(out[2] == doctest::Approx(3.0));
  // the ranking equals the ranking of the product form
  CHECK(out[2] > out[0]);
  CHECK(out[0] > out[1]);
}

TEST_CASE("scorers read only their signals") {
  const std::vector<float> his = {1.f, 3.f}, cf = {2.f, 0.f}, change = {0.5f, std::numeric_limits<float>::infinity()};
  std::vector<float> out(2);
  score_tokens(toca_scorer{0.5f}, {.attention = his, .cache_count = cf}, out);
  CHECK(out[0] == doctest::Approx(1.0));
  CHECK(out[1] == doctest::Approx(std::log(3.0)));
  score_tokens(feature_change_scorer{}, {.cache_count = cf, .feature_change = change}, out);
  CHECK(out[0] == doctest::Approx(std::log(0.5) + 2.0));
  CHECK(std::isfinite(out[1]));  // unknown change ranks first but stays finite
  CHECK(out[1] > 80.f);
  score_tokens(uniform_scorer{}, {.cache_count = cf}, out);
  CHECK(out[0] == 0.f);
  CHECK(out[1] == 0.f);
  score_tokens(uniform_scorer{1.f}, {.cache_count = cf}, out);
  CHECK(out[0] == 2.f);
}

namespace {
// A scorer of one's own (RAS-style, from the engine metric): one struct, host loop and CUDA kernel alike.
struct metric_scorer {
  static constexpr signal needs = signal::metric | signal::cache_count;
  SPECDIFF_HD float score(const token_signals& x) const { return math::log_score(x.metric, 1.f, x.cache_count, 0.5f); }
};
struct neutral_probe {
  static constexpr signal needs = signal::metric;
  float score(const token_signals& x) const { return x.attention + x.future + x.cache_count + x.feature_change; }
};
}  // namespace

TEST_CASE("a scorer sees neutral values for the signals it does not need") {
  std::vector<float> out(2);
  const std::vector<float> metric = {2.f, 8.f}, cf = {0.f, 2.f};
  score_tokens(metric_scorer{}, {.cache_count = cf, .metric = metric}, out);
  CHECK(out[0] == doctest::Approx(std::log(2.0)));
  CHECK(out[1] == doctest::Approx(std::log(8.0) + 1.0));
  // not needed: attention and future are 1, cache_count 0
  score_tokens(neutral_probe{}, {.metric = metric}, out);
  CHECK(out[0] == 2.f);
  CHECK(out[1] == 2.f);
}

TEST_CASE("scorers reject bad input, naming the parameter") {
  const std::vector<float> good = {1.f, 1.f}, short_ = {1.f}, nan = {1.f, std::nanf("")};
  std::vector<float> out(2), none;
  testing::expect_error<std::invalid_argument>([&] { score_tokens(specdiff_scorer{}, {.attention = good, .future = short_, .cache_count = good}, out); }, {"future", "expected 2", "got 1"});
  testing::expect_error<std::invalid_argument>([&] { score_tokens(specdiff_scorer{}, {.attention = nan, .future = good, .cache_count = good}, out); }, {"attention[1]", "not finite"});
  testing::expect_error<std::invalid_argument>([&] { score_tokens(toca_scorer{}, {.attention = good}, out); }, {"cache_count"});
  testing::expect_error<std::invalid_argument>([&] { score_tokens(specdiff_scorer{}, {.attention = good, .future = good, .cache_count = good}, none); }, {"zero tokens"});
  testing::expect_error<std::invalid_argument>([&] { score_tokens(metric_scorer{}, {.cache_count = good, .metric = short_}, out); }, {"metric", "expected 2", "got 1"});
  testing::expect_error<std::invalid_argument>([&] { score_tokens(feature_change_scorer{}, {.cache_count = good, .feature_change = nan}, out); }, {"feature_change[1]", "not finite"});
}
