// The output forecast's schedule and Taylor rule against an independent twin of diffusers' TaylorSeerCache (lite
// mode: the model output forecast between full steps, differences divided by the gap in forward calls), its
// calibration options (the guided target, the forecast's own trajectory), and the refusal of a learned table
// fitted for another schedule. Fresh random models and inputs each run (the seed is printed on failure).
#include <doctest/doctest.h>

#include <cmath>
#include <map>
#include <optional>
#include <random>
#include <vector>

#include "../common/testing.hpp"
#include "methods/methods.hpp"
#include "sampling_inputs.hpp"
#include "sd3/model.hpp"

namespace {

struct fixture : methods_testing::sampling_inputs {
  sd3::model model;
  sd3::transformer net;
  fixture() : sampling_inputs(std::random_device{}()), model(sd3::model::random(methods_testing::small_config(), seed)), net(model, {4, 8, 8, 3}, 1) {}
};

// diffusers' TaylorSeerState as its hook uses it (hooks/taylorseer_cache.py, read at 0.42.1; written here from the
// algorithm, not copied): on a full step the order-0 factor is the output and the order-(j+1) factor is
// (new order-j factor - previous order-j factor) / (steps since the last full step), formed while the previous
// update had an order-j factor; a skipped step is sum_i factor_i * offset^i / i!, offset = steps since the last
// full step. Factors are kept in float here (diffusers' default is bfloat16).
struct taylorseer_twin {
  int max_order;
  std::optional<int> last;
  std::map<int, std::vector<float>> factors;
  void update(const std::vector<float>& out, int step) {
    std::map<int, std::vector<float>> next{{0, out}};
    if (last) {
      const float gap = static_cast<float>(step - *last);
      for (int j = 0; j < max_order; ++j) {
        const auto prev = factors.find(j);
        if (prev == factors.end()) break;
        std::vector<float> d(out.size());
        for (std::size_t i = 0; i < d.size(); ++i) d[i] = (next[j][i] - prev->second[i]) / gap;
        next[j + 1] = std::move(d);
      }
    }
    factors = std::move(next);
    last = step;
  }
  void predict(int step, std::span<float> out) const {
    const double x = step - *last;
    double coeff = 1;
    std::fill(out.begin(), out.end(), 0.f);
    for (int i = 0; i < static_cast<int>(factors.size()); ++i) {
      if (i > 0) coeff *= x / i;
      const auto& f = factors.at(i);
      for (std::size_t e = 0; e < out.size(); ++e) out[e] += static_cast<float>(coeff * f[e]);
    }
  }
};

// diffusers' refresh rule: full iff step < warm-up or (step - warm-up - 1) % N == 0.
bool diffusers_full(int step, int warmup, int n) { return step < warmup || (step - warmup - 1) % n == 0; }

}  // namespace

TEST_CASE("forecast: the Taylor rule over step indices on diffusers' refresh steps is its TaylorSeerCache lite (a twin)") {
  fixture f;
  INFO("seed ", f.seed);
  const auto p = f.problem_on(f.net, 11);
  for (int order : {1, 2})
    for (int n : {2, 3}) {
      CAPTURE(order);
      CAPTURE(n);
      constexpr int warmup = 3;
      taylorseer_twin twin{order, {}, {}};
      int full_steps = 0;
      const auto expected = sd3::sample_cfg(f.net, p.schedule(p.steps), p.inputs, p.guidance, [&](const sd3::model_call& call) {
        if (diffusers_full(call.step, warmup, n)) {
          f.net.forward(*call.inputs, call.velocity, {});
          twin.update(std::vector<float>(call.velocity.begin(), call.velocity.end()), call.step);
          ++full_steps;
        } else {
          twin.predict(call.step, call.velocity);
        }
      });
      methods::forecast_options o;
      o.interval = n;
      o.warmup_steps = warmup;
      o.refresh = methods::forecast_options::refresh_rule::diffusers;
      o.c3 = methods::c3_rule::linear;
      o.order = order;
      const auto run = methods::run_forecast(p, o);
      CHECK(run.dense_steps == full_steps);
      REQUIRE(run.latents.size() == expected.size());
      double err = 0, norm = 0;
      for (std::size_t i = 0; i < expected.size(); ++i) {
        err += (run.latents[i] - expected[i]) * (run.latents[i] - expected[i]);
        norm += expected[i] * expected[i];
      }
      CHECK(std::sqrt(err / norm) < 1e-5);
      // Over timesteps instead of step indices the same steps give another forecast (the schedule's steps are uneven).
      o.variable = methods::forecast_options::taylor_variable::timestep;
      if (order == 1) CHECK(methods::run_forecast(p, o).latents != run.latents);
    }
}

TEST_CASE("forecast: the full steps of each refresh rule and warm-up, by hand") {
  fixture f;
  INFO("seed ", f.seed);
  const auto p = f.problem_on(f.net, 12);
  methods::forecast_options o;
  o.c3 = methods::c3_rule::latest;
  auto full_steps = [&](int n, int warmup, methods::forecast_options::refresh_rule rule) {
    o.interval = n, o.warmup_steps = warmup, o.refresh = rule;
    return methods::run_forecast(p, o).dense_steps;
  };
  using rule = methods::forecast_options::refresh_rule;
  CHECK(full_steps(2, 3, rule::diffusers) == 7);  // 0, 1, 2, 4, 6, 8, 10
  CHECK(full_steps(3, 3, rule::diffusers) == 6);  // 0, 1, 2, 4, 7, 10
  CHECK(full_steps(2, 3, rule::library) == 7);    // 0, 1, 2, 4, 6, 8, 10: the same steps at N = 2
  CHECK(full_steps(3, 3, rule::library) == 6);    // 0, 1, 2, 5, 8, 11
  CHECK(full_steps(3, 2, rule::library) == 5);    // 0, 1, 4, 7, 10
  CHECK(full_steps(2, 0, rule::library) == 7);    // the default warm-up at N = 2 is 3
  CHECK(full_steps(3, 0, rule::library) == 5);    // ... and 2 from N = 3
  o.warmup_steps = -1;
  testing::expect_error<std::invalid_argument>([&] { (void)methods::run_forecast(p, o); }, {"warmup_steps", "-1"});
  o.warmup_steps = 0, o.c3 = methods::c3_rule::linear, o.order = 3;
  testing::expect_error<std::invalid_argument>([&] { (void)methods::run_forecast(p, o); }, {"order", "3"});
}

TEST_CASE("forecast calibration: guided target, the forecast's own trajectory, and a table for another schedule refused") {
  fixture f;
  INFO("seed ", f.seed);
  const auto p = f.problem_on(f.net, 10);
  const sd3::flow_match_euler main = p.schedule(p.steps);
  methods::forecast_options o;
  o.interval = 3;  // warm-up 2: full steps 0, 1, 4, 7
  const std::size_t half_rows = static_cast<std::size_t>(p.inputs.batch * 16);
  auto pairs = [](const specdiff::history_fit& fit, int k) {
    std::size_t n = 0;
    for (int h = 1; h <= 3; ++h) n += fit.pairs(k, h);
    return n;
  };
  // halves (the default): a pair per row of the CFG batch; guided: a pair per row of the guided output
  specdiff::history_fit halves(main.timesteps(), 3), guided(main.timesteps(), 3);
  (void)methods::calibrate_forecast(p, o, halves);
  o.fit_on = methods::forecast_options::fit_target::guided;
  const auto teacher = methods::calibrate_forecast(p, o, guided);
  for (int k : {2, 3, 5, 6, 8, 9}) {
    CHECK(pairs(halves, k) == 2 * half_rows);
    CHECK(pairs(guided, k) == half_rows);
  }
  CHECK(pairs(guided, 4) == 0u);
  // On the forecast's own trajectory the latents are the forecast's: with no table, the Taylor rule over steps ...
  o.trajectory = methods::forecast_options::fit_trajectory::forecast;
  specdiff::history_fit own(main.timesteps(), 3);
  const auto on_policy = methods::calibrate_forecast(p, o, own);
  methods::forecast_options run = o;
  run.c3 = methods::c3_rule::linear;
  const auto taylor = methods::run_forecast(p, run);
  REQUIRE(on_policy.latents.size() == taylor.latents.size());
  for (std::size_t i = 0; i < taylor.latents.size(); ++i) CHECK(on_policy.latents[i] == doctest::Approx(taylor.latents[i]).epsilon(1e-5));
  CHECK(on_policy.latents != teacher.latents);
  CHECK(pairs(own, 5) == half_rows);
  // ... and with a table, the learned forecast's.
  const auto table = halves.solve(1e-3, 1);
  o.learned_weights = &table;
  specdiff::history_fit again(main.timesteps(), 3);
  const auto on_table = methods::calibrate_forecast(p, o, again);
  run.c3 = methods::c3_rule::learned;
  run.learned_weights = &table;
  const auto learned = methods::run_forecast(p, run);
  for (std::size_t i = 0; i < learned.latents.size(); ++i) CHECK(on_table.latents[i] == doctest::Approx(learned.latents[i]).epsilon(1e-5));
  // A table fitted for warm-up 2 has no weights for step 3 after warm-up 3's full step 2 (a history of 3 rows): refused.
  run.warmup_steps = 3;
  testing::expect_error<std::invalid_argument>([&] { (void)methods::run_forecast(p, run); }, {"learned weights", "step", "warm-up 3"});
}
