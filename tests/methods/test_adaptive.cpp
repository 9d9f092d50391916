// SpecDiff-adaptive on a small random SD3 model: the error budget's two ends, the learned C3 rule against the
// rules it can express, self-calibration through the method, and the learned file's round trip and refusals.
#include <doctest/doctest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <random>

#include "../common/testing.hpp"
#include "methods/learned_file.hpp"
#include "methods/methods.hpp"
#include "sampling_inputs.hpp"
#include "sd3/model.hpp"

namespace {

struct fixture : methods_testing::sampling_inputs {
  sd3::model model;
  sd3::transformer net;
  fixture() : sampling_inputs(std::random_device{}()), model(sd3::model::random(methods_testing::small_config(), seed)), net(model, {4, 8, 8, 3}, 1) {}
};

// A table over the problem's timesteps whose every (step, n) has the same weights (first n of `w`).
specdiff::learned_table constant_table(const methods::problem& p, std::vector<float> w) {
  const sd3::flow_match_euler main = p.schedule(p.steps);
  std::vector<float> weights;
  for (int k = 0; k < p.steps; ++k)
    for (int n = 1; n <= 3; ++n)
      for (int i = 0; i < 3; ++i) weights.push_back(i < n ? w[static_cast<std::size_t>(i)] : 0.f);
  return specdiff::learned_table(main.timesteps(), 3, weights);
}

}  // namespace

TEST_CASE("specdiff-adaptive: an infinite budget is SpecDiff, a zero budget makes every other step dense") {
  fixture f;
  INFO("seed ", f.seed);
  const auto p = f.problem_on(f.net, 10);
  methods::specdiff_options o;
  o.cache_rate = 0.75;
  o.reset_steps = {};
  const auto fixed = methods::run_specdiff(p, o);
  CHECK(fixed.dense_steps == o.warmup_steps);
  CHECK(fixed.verified_errors.size() == static_cast<std::size_t>(p.steps - o.warmup_steps));
  for (float e : fixed.verified_errors) CHECK((std::isfinite(e) && e > 0.f));
  auto adaptive = methods::specdiff_adaptive_defaults(1e30);
  adaptive.cache_rate = 0.75;
  adaptive.reset_steps = {};
  CHECK(methods::run_specdiff(p, adaptive).latents == fixed.latents);  // a budget never reached changes nothing
  adaptive.error_budget = 0.0;
  const auto eager = methods::run_specdiff(p, adaptive);
  CHECK(eager.dense_steps == o.warmup_steps + (p.steps - o.warmup_steps) / 2);  // partial, dense, partial, ...
  CHECK(eager.flops > fixed.flops);
  CHECK(eager.dense_steps + static_cast<int>(eager.verified_errors.size()) == p.steps);
}

TEST_CASE("learned C3 rule: weights (1, 0, 0) are C3 = latest bit for bit, and a fit changes the result") {
  fixture f;
  INFO("seed ", f.seed);
  const auto p = f.problem_on(f.net, 10);
  auto o = methods::specdiff_adaptive_defaults(0.5);
  o.cache_rate = 0.75;
  o.c3 = methods::specdiff_options::c3_rule::latest;
  const auto latest = methods::run_specdiff(p, o);
  const auto identity = constant_table(p, {1.f, 0.f, 0.f});
  o.c3 = methods::specdiff_options::c3_rule::learned;
  o.learned_weights = &identity;
  CHECK(methods::run_specdiff(p, o).latents == latest.latents);
  // self-calibration through the method: pairs on partial steps only, and the fitted rule is another rule
  const sd3::flow_match_euler main = p.schedule(p.steps);
  specdiff::history_fit fit(main.timesteps(), 3);
  auto calibrating = o;
  calibrating.c3 = methods::specdiff_options::c3_rule::specdiff;
  calibrating.learned_weights = nullptr;
  calibrating.calibrate = &fit;
  const auto run = methods::run_specdiff(p, calibrating);
  std::size_t pairs = 0;
  for (int k = 0; k < p.steps; ++k)
    for (int n = 1; n <= 3; ++n) pairs += fit.pairs(k, n);
  const auto computed_per_partial = static_cast<std::size_t>(2 * p.inputs.batch * std::ceil(0.25 * 16));  // CFG batch x |C1|
  CHECK(pairs == run.verified_errors.size() * computed_per_partial);
  const auto fitted = fit.solve(1e-3, 1);
  o.learned_weights = &fitted;
  const auto learned = methods::run_specdiff(p, o);
  CHECK(learned.latents != latest.latents);
  for (float x : learned.latents) REQUIRE(std::isfinite(x));
  // a table for another grid is refused by name
  auto wrong_steps = f.problem_on(f.net, 9);
  testing::expect_error<std::invalid_argument>([&] { (void)methods::run_specdiff(wrong_steps, o); }, {"run_timesteps"});
  o.learned_weights = nullptr;
  testing::expect_error<std::invalid_argument>([&] { (void)methods::run_specdiff(p, o); }, {"c3", "learned"});
}

TEST_CASE("learned_c3.json: round trip, and every lie refused by name") {
  const auto dir = std::filesystem::temp_directory_path() / ("specdiff_learned_" + std::to_string(std::random_device{}()));
  std::filesystem::create_directories(dir);
  const auto path = dir / "learned_c3.json";
  const float nan = NAN;
  const specdiff::learned_table table({900.f, 512.5f}, 2, {1.f, 0.f, nan, 0.f, 0.75f, 0.f, 1.25f, -0.25f});
  {
    std::ofstream(path) << methods::learned_c3_json(table, R"({"samples": 4})");
  }
  const auto back = methods::load_learned_c3(path);
  REQUIRE(back.has_value());
  CHECK(back->depth() == 2);
  CHECK(std::vector<float>(back->timesteps().begin(), back->timesteps().end()) == std::vector<float>{900.f, 512.5f});
  CHECK(std::isnan(back->weights(0, 2)[0]));
  CHECK(back->weights(1, 2)[1] == -0.25f);
  CHECK(methods::learned_c3_calibration(path).find("\"samples\":4") != std::string::npos);
  CHECK_FALSE(methods::load_learned_c3(dir / "absent.json").has_value());
  auto refused = [&](const std::string& text, std::initializer_list<const char*> fragments) {
    std::ofstream(path, std::ios::trunc) << text;
    testing::expect_error<std::runtime_error>([&] { (void)methods::load_learned_c3(path); }, fragments);
  };
  const std::string good = methods::learned_c3_json(table, "{}");
  refused(good.substr(0, good.size() / 2), {"learned_c3.json"});
  refused(R"({"format": "other", "version": 1})", {"format"});
  refused(R"({"format": "specdiff-learned-c3", "version": 2})", {"version", "2"});
  refused(R"({"format": "specdiff-learned-c3", "version": 1, "depth": 9})", {"depth", "9"});
  refused(R"({"format": "specdiff-learned-c3", "version": 1, "depth": 1, "timesteps": [1], "weights": []})", {"weights", "one entry per timestep"});
  refused(R"({"format": "specdiff-learned-c3", "version": 1, "depth": 1, "timesteps": [1], "weights": [[[1, 2]]]})", {"weights[0][0]", "1 numbers"});
  refused(R"({"format": "specdiff-learned-c3", "version": 1, "depth": 1, "timesteps": [1], "weights": [[["x"]]]})", {"weights[0][0][0]", "finite"});
  refused(R"({"format": "specdiff-learned-c3", "version": 1, "depth": 1, "timesteps": [1, 2], "weights": [[[1]], [[1]]]})", {"timesteps", "decrease"});
  std::filesystem::remove(path);
  std::filesystem::create_directory(path);  // a folder where the file should be
  testing::expect_error<std::runtime_error>([&] { (void)methods::load_learned_c3(path); }, {"learned_c3.json"});
  std::filesystem::remove_all(dir);
}

TEST_CASE("forecast: N = 1 is full RFlow bit for bit, skipped steps cost nothing, and the learned rule reproduces the ones it can express") {
  fixture f;
  INFO("seed ", f.seed);
  const auto p = f.problem_on(f.net, 10);
  const auto full = methods::run_full(p);
  methods::forecast_options o;
  o.interval = 1;
  o.c3 = methods::c3_rule::linear;
  CHECK(methods::run_forecast(p, o).latents == full.latents);
  o.interval = 3;  // full steps 0, 1, 4, 7: the others skip the network
  const auto linear = methods::run_forecast(p, o);
  CHECK(linear.dense_steps == 4);
  CHECK(linear.model_calls == p.steps);
  CHECK(linear.flops == doctest::Approx(full.flops * 4 / p.steps));
  CHECK(linear.latents != full.latents);
  o.c3 = methods::c3_rule::latest;
  const auto latest = methods::run_forecast(p, o);
  const auto identity = constant_table(p, {1.f, 0.f, 0.f});
  o.c3 = methods::c3_rule::learned;
  o.learned_weights = &identity;
  CHECK(methods::run_forecast(p, o).latents == latest.latents);
  // calibration: one pair per row of the CFG batch on every skipped step, none on full steps
  const sd3::flow_match_euler main = p.schedule(p.steps);
  specdiff::history_fit fit(main.timesteps(), 3);
  const auto calibration = methods::calibrate_forecast(p, o, fit);
  CHECK(calibration.latents == full.latents);  // teacher-forced: the full trajectory
  const std::size_t rows = static_cast<std::size_t>(2 * p.inputs.batch * 16);
  for (int k = 0; k < p.steps; ++k) {
    std::size_t pairs = 0;
    for (int n = 1; n <= 3; ++n) pairs += fit.pairs(k, n);
    CHECK(pairs == ((k == 0 || k == 1 || k == 4 || k == 7) ? 0 : rows));
  }
  // the fitted rule (its least-squares optimality is tested in tests/core) runs and is another rule than reuse
  const auto fitted = fit.solve(1e-3, 1);
  o.learned_weights = &fitted;
  const auto learned = methods::run_forecast(p, o);
  CHECK(learned.latents != latest.latents);
  for (float x : learned.latents) REQUIRE(std::isfinite(x));
  o.interval = 0;
  testing::expect_error<std::invalid_argument>([&] { (void)methods::run_forecast(p, o); }, {"interval", "0"});
}
