#include <doctest/doctest.h>

#include <specdiff/predictors.hpp>

#include "../common/testing.hpp"

using namespace specdiff;

TEST_CASE("self_speculation answers with the nearest future record") {
  self_speculation p(2);
  const std::vector<float> ts = {1000.f, 600.f, 200.f};
  p.begin(ts);
  p.record(0, std::vector<float>{1.f, 2.f});
  p.record(1, std::vector<float>{3.f, 4.f});
  p.record(2, std::vector<float>{5.f, 6.f});
  CHECK(p.nearest_future(1000.f) == 0);  // equal timestep counts as the future
  CHECK(p.nearest_future(999.f) == 1);   // next speculative step ahead is t = 600
  CHECK(p.nearest_future(600.f) == 1);
  CHECK(p.nearest_future(400.f) == 2);
  CHECK(p.future(400.f)[1] == 6.f);
  // fallback: nothing lies ahead of t = 100 -> the last record (nearest in the past)
  CHECK(p.nearest_future(100.f) == 2);
  CHECK(p.future(0.f)[0] == 5.f);
}

TEST_CASE("self_speculation errors") {
  self_speculation p(2);
  testing::expect_error<std::logic_error>([&] { (void)p.future(10.f); }, {"begin"});
  testing::expect_error<std::invalid_argument>([&] { p.begin(std::vector<float>{}); }, {"timesteps"});
  testing::expect_error<std::invalid_argument>([&] { p.begin(std::vector<float>{1.f, 2.f}); }, {"strictly decrease"});
  p.begin(std::vector<float>{1000.f, 500.f});
  testing::expect_error<std::invalid_argument>([&] { p.record(2, std::vector<float>{1.f, 1.f}); }, {"step = 2"});
  testing::expect_error<std::invalid_argument>([&] { p.record(0, std::vector<float>{1.f}); }, {"scores", "expected 2"});
  testing::expect_error<std::invalid_argument>([&] { p.record(0, std::vector<float>{1.f, std::nanf("")}); }, {"scores[1]"});
  testing::expect_error<std::logic_error>([&] { (void)p.future(700.f); }, {"never recorded"});
  testing::expect_error<std::invalid_argument>([] { self_speculation bad(0); }, {"values"});
}

TEST_CASE("no_speculation answers all-ones") {
  no_speculation p(5);
  p.begin(std::vector<float>{1.f});
  for (float v : p.future(123.f)) CHECK(v == 1.f);
  CHECK(p.future(0.f).size() == 5);
}
