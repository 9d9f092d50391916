#include <doctest/doctest.h>

#include <algorithm>
#include <specdiff/predictors.hpp>
#include <specdiff/schedules.hpp>

#include "../common/testing.hpp"

using namespace specdiff;

TEST_CASE("self_speculation answers with the nearest future record") {
  self_speculation p;
  p.prepare(2);
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
  self_speculation p;
  p.prepare(2);
  testing::expect_error<std::logic_error>([&] { (void)p.future(10.f); }, {"not begun"});
  testing::expect_error<std::invalid_argument>([&] { p.begin(std::vector<float>{}); }, {"timesteps"});
  testing::expect_error<std::invalid_argument>([&] { p.begin(std::vector<float>{1.f, 2.f}); }, {"strictly decrease"});
  p.begin(std::vector<float>{1000.f, 500.f});
  testing::expect_error<std::invalid_argument>([&] { p.record(2, std::vector<float>{1.f, 1.f}); }, {"step = 2"});
  testing::expect_error<std::invalid_argument>([&] { p.record(0, std::vector<float>{1.f}); }, {"scores", "expected 2"});
  testing::expect_error<std::invalid_argument>([&] { p.record(0, std::vector<float>{1.f, std::nanf("")}); }, {"scores[1]"});
  testing::expect_error<std::logic_error>([&] { (void)p.future(700.f); }, {"never recorded"});
  testing::expect_error<std::invalid_argument>([] { self_speculation{}.prepare(0); }, {"values"});
  testing::expect_error<std::logic_error>([] { self_speculation{}.begin(std::vector<float>{1.f}); }, {"prepared"});
  CHECK_FALSE(p.ready());
  p.record(0, std::vector<float>{1.f, 1.f});
  testing::expect_error<std::logic_error>([&] { p.record(0, std::vector<float>{1.f, 1.f}); }, {"already recorded"});
  CHECK_FALSE(p.ready());
  p.record(1, std::vector<float>{1.f, 1.f});
  CHECK(p.ready());
  p.clear();
  CHECK_FALSE(p.ready());
  testing::expect_error<std::logic_error>([&] { p.record(0, std::vector<float>{1.f, 1.f}); }, {"not begun"});
}

TEST_CASE("no_speculation answers all-ones") {
  no_speculation p;
  p.prepare(5);
  p.begin(std::vector<float>{1.f});
  for (float v : p.future(123.f)) CHECK(v == 1.f);
  CHECK(p.future(0.f).size() == 5);
}

TEST_CASE("aligned speculative grid: the first main timestep, then the middles of equal runs of partial steps") {
  std::vector<float> ts;
  for (int i = 0; i < 28; ++i) ts.push_back(1000.f - 35.f * static_cast<float>(i));
  const step_schedule sched{2, 0, 3, {14}};  // dense 0, 1, 14; partial P = {2..13, 15..27}: 25 steps
  // S = 3: two runs; their middles are P[floor(25/4)] = P[6] = step 8 and P[floor(75/4)] = P[18] = step 21
  const auto g3 = aligned_speculative_timesteps(ts, 3, sched);
  REQUIRE(g3.size() == 3);
  CHECK(g3[0] == ts[0]);
  CHECK(g3[1] == ts[8]);
  CHECK(g3[2] == ts[21]);
  // S = 2: one run, its middle P[12] = step 15
  CHECK(aligned_speculative_timesteps(ts, 2, sched) == std::vector<float>{ts[0], ts[15]});
  const auto g1 = aligned_speculative_timesteps(ts, 1, sched);
  CHECK(g1 == std::vector<float>{ts[0]});
  CHECK(aligned_speculative_timesteps(ts, 0, sched).empty());
  // the partial steps up to a record read it as their nearest future; those after the last read it back
  self_speculation p;
  p.prepare(1);
  p.begin(g3);
  for (int k = 2; k <= 8; ++k) CHECK(p.nearest_future(ts[static_cast<std::size_t>(k)]) == 1);
  for (int k = 9; k <= 27; ++k) CHECK(p.nearest_future(ts[static_cast<std::size_t>(k)]) == 2);
  // fresh random grids: strictly falling, all from the main grid, first = ts[0]
  auto rng = testing::rng(77);
  for (int trial = 0; trial < 50; ++trial) {
    const int steps = std::uniform_int_distribution<int>(1, 40)(rng);
    const int s = std::uniform_int_distribution<int>(0, steps)(rng);
    std::vector<float> main_ts;
    for (int i = 0; i < steps; ++i) main_ts.push_back(1000.f * (1.f - static_cast<float>(i) / static_cast<float>(steps)));
    const step_schedule random_schedule{std::uniform_int_distribution<int>(0, steps)(rng), 0, 0, {}};
    const auto g = aligned_speculative_timesteps(main_ts, s, random_schedule);
    INFO("steps ", steps, " S ", s, " seed ", testing::fresh_seed());
    REQUIRE(g.size() == static_cast<std::size_t>(s));
    for (std::size_t j = 0; j < g.size(); ++j) {
      CHECK(std::find(main_ts.begin(), main_ts.end(), g[j]) != main_ts.end());
      if (j > 0) CHECK(g[j] < g[j - 1]);
    }
    if (s > 0) CHECK(g[0] == main_ts[0]);
  }
  testing::expect_error<std::invalid_argument>([&] { (void)aligned_speculative_timesteps(ts, 29, sched); }, {"speculative_steps", "29"});
  testing::expect_error<std::invalid_argument>([&] { (void)aligned_speculative_timesteps(std::vector<float>{1.f, 2.f}, 1, dense_schedule{}); }, {"main_timesteps", "strictly decrease"});
}
