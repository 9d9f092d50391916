// Placed full steps for the output forecast (specdiff/forecast_steps.hpp, methods::forecast_gram, forecast_options::
// full_steps): the inner products, weights, first-order error and ranking against independent computations on the
// raw vectors (fresh random ones each run), and the forecast on placed steps against a hand-written loop on a fresh
// random model. The seed is printed on failure.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <random>
#include <vector>

#include <specdiff/forecast_steps.hpp>

#include "methods/learned_file.hpp"
#include "methods/methods.hpp"
#include "sampling_inputs.hpp"
#include "sd3/model.hpp"

namespace {

// Random "trajectories": steps x dim outputs that move smoothly (a random polynomial in the step plus noise), so
// that forecasts are neither exact nor useless.
struct random_trajectories {
  std::uint64_t seed;
  int steps, fit_dim, error_dim;
  std::vector<std::vector<float>> fit, error;  // per trajectory, [steps][dim]
  random_trajectories(std::uint64_t s, int steps_, int count, int fit_dim_, int error_dim_)
      : seed(s), steps(steps_), fit_dim(fit_dim_), error_dim(error_dim_) {
    std::mt19937_64 rng(seed);
    std::normal_distribution<float> n(0.f, 1.f);
    auto make = [&](int dim) {
      std::vector<float> a(static_cast<std::size_t>(dim)), b(a.size()), c(a.size()), out(static_cast<std::size_t>(steps * dim));
      for (auto* v : {&a, &b, &c})
        for (auto& x : *v) x = n(rng);
      for (int k = 0; k < steps; ++k) {
        const float t = static_cast<float>(k) / static_cast<float>(steps);
        for (int i = 0; i < dim; ++i)
          out[static_cast<std::size_t>(k * dim + i)] = a[static_cast<std::size_t>(i)] + t * b[static_cast<std::size_t>(i)] +
                                                       3.f * t * t * c[static_cast<std::size_t>(i)] + 0.05f * n(rng);
      }
      return out;
    };
    for (int j = 0; j < count; ++j) fit.push_back(make(fit_dim)), error.push_back(make(error_dim));
  }
  specdiff::trajectory_gram gram() const {
    specdiff::trajectory_gram g(steps);
    for (std::size_t j = 0; j < fit.size(); ++j) g.add(fit[j], error[j]);
    return g;
  }
};

// Weights by an independent route: ridge least squares as an augmented ordinary least-squares problem over the raw
// rows, solved by Cramer's rule (n <= 3): rows [h_1 .. h_n | y] plus sqrt(ridge * scale) * [e_i | e_1[i]].
std::vector<double> reference_weights(const random_trajectories& t, int step, const std::vector<int>& history, double ridge) {
  const int n = static_cast<int>(history.size());
  std::vector<double> a(static_cast<std::size_t>(n * n), 0.0), b(static_cast<std::size_t>(n), 0.0);
  double scale = 0.0;
  for (const auto& tr : t.fit)
    for (int d = 0; d < t.fit_dim; ++d) {
      const double y = tr[static_cast<std::size_t>(step * t.fit_dim + d)];
      for (int i = 0; i < n; ++i) {
        const double hi = tr[static_cast<std::size_t>(history[static_cast<std::size_t>(i)] * t.fit_dim + d)];
        b[static_cast<std::size_t>(i)] += hi * y;
        for (int j = 0; j < n; ++j) a[static_cast<std::size_t>(i * n + j)] += hi * tr[static_cast<std::size_t>(history[static_cast<std::size_t>(j)] * t.fit_dim + d)];
      }
    }
  for (int i = 0; i < n; ++i) scale += a[static_cast<std::size_t>(i * n + i)];
  scale /= n;
  for (int i = 0; i < n; ++i) a[static_cast<std::size_t>(i * n + i)] += ridge * scale;
  b[0] += ridge * scale;
  auto det = [&](const std::vector<double>& m) {
    if (n == 1) return m[0];
    if (n == 2) return m[0] * m[3] - m[1] * m[2];
    return m[0] * (m[4] * m[8] - m[5] * m[7]) - m[1] * (m[3] * m[8] - m[5] * m[6]) + m[2] * (m[3] * m[7] - m[4] * m[6]);
  };
  const double d = det(a);
  std::vector<double> w(static_cast<std::size_t>(n));
  for (int c = 0; c < n; ++c) {
    auto m = a;
    for (int r = 0; r < n; ++r) m[static_cast<std::size_t>(r * n + c)] = b[static_cast<std::size_t>(r)];
    w[static_cast<std::size_t>(c)] = det(m) / d;
  }
  return w;
}

// The first-order error on the raw error rows: E = sum_k s_k (y_k - sum_i w_ki y_h(k,i)) summed into one vector per
// trajectory, ||E||^2 / ||sum_k s_k y_k||^2 over all trajectories.
double reference_error(const random_trajectories& t, const std::vector<int>& full, int depth, double ridge, const std::vector<double>& s) {
  double num = 0.0, den = 0.0;
  for (const auto& tr : t.error) {
    std::vector<double> e(static_cast<std::size_t>(t.error_dim), 0.0), y(e.size(), 0.0);
    std::vector<int> seen;
    for (int k = 0; k < t.steps; ++k) {
      const double sk = s[static_cast<std::size_t>(k)];
      for (int d = 0; d < t.error_dim; ++d) y[static_cast<std::size_t>(d)] += sk * tr[static_cast<std::size_t>(k * t.error_dim + d)];
      if (std::find(full.begin(), full.end(), k) != full.end()) {
        seen.insert(seen.begin(), k);  // newest first
        continue;
      }
      const std::vector<int> history(seen.begin(), seen.begin() + std::min<std::ptrdiff_t>(depth, static_cast<std::ptrdiff_t>(seen.size())));
      const auto w = reference_weights(t, k, history, ridge);
      for (int d = 0; d < t.error_dim; ++d) {
        double f = 0.0;
        for (std::size_t i = 0; i < history.size(); ++i) f += w[i] * tr[static_cast<std::size_t>(history[i] * t.error_dim + d)];
        e[static_cast<std::size_t>(d)] += sk * (tr[static_cast<std::size_t>(k * t.error_dim + d)] - f);
      }
    }
    for (int d = 0; d < t.error_dim; ++d) num += e[static_cast<std::size_t>(d)] * e[static_cast<std::size_t>(d)], den += y[static_cast<std::size_t>(d)] * y[static_cast<std::size_t>(d)];
  }
  return num / den;
}

bool close(double a, double b, double tol) { return std::abs(a - b) <= tol * std::max({1.0, std::abs(a), std::abs(b)}); }

}  // namespace

TEST_CASE("forecast steps: the gram, the weights and the first-order error against the raw vectors") {
  const std::uint64_t seed = std::random_device{}();
  INFO("seed ", seed);
  const random_trajectories t(seed, 9, 3, 40, 17);
  const auto g = t.gram();
  CHECK(g.trajectories() == 3);
  for (int a = 0; a < t.steps; ++a)
    for (int b = 0; b < t.steps; ++b) {
      double fit = 0, err = 0;
      for (std::size_t j = 0; j < t.fit.size(); ++j) {
        for (int d = 0; d < t.fit_dim; ++d) fit += static_cast<double>(t.fit[j][static_cast<std::size_t>(a * t.fit_dim + d)]) * t.fit[j][static_cast<std::size_t>(b * t.fit_dim + d)];
        for (int d = 0; d < t.error_dim; ++d) err += static_cast<double>(t.error[j][static_cast<std::size_t>(a * t.error_dim + d)]) * t.error[j][static_cast<std::size_t>(b * t.error_dim + d)];
      }
      CHECK(close(g.fit(a, b), fit, 1e-9));
      CHECK(close(g.error(a, b), err, 1e-9));
    }
  for (double ridge : {0.0, 1e-3, 0.5})
    for (const std::vector<int>& history : {std::vector<int>{3}, std::vector<int>{4, 1}, std::vector<int>{5, 2, 0}}) {
      CAPTURE(ridge);
      std::vector<double> w(history.size());
      REQUIRE(specdiff::forecast_weights(g, 7, history, ridge, w));
      const auto ref = reference_weights(t, 7, history, ridge);
      for (std::size_t i = 0; i < w.size(); ++i) CHECK(close(w[i], ref[i], 1e-7));
    }
  std::mt19937_64 rng(seed ^ 0x5eedu);
  std::uniform_real_distribution<double> u(-0.2, -0.01);
  std::vector<double> s(static_cast<std::size_t>(t.steps));
  for (auto& x : s) x = u(rng);
  for (const std::vector<int>& full : {std::vector<int>{0}, std::vector<int>{0, 1, 5}, std::vector<int>{0, 3, 4, 8}, std::vector<int>{0, 2, 4, 6, 7}})
    for (int depth : {1, 2, 3}) {
      CAPTURE(depth);
      const specdiff::forecast_steps_options o{.depth = depth, .ridge = 1e-3, .step_weight = s};
      CHECK(close(specdiff::forecast_error(g, full, o), reference_error(t, full, depth, 1e-3, s), 1e-6));
    }
  // Every step full: nothing forecast, no error.
  std::vector<int> all(static_cast<std::size_t>(t.steps));
  for (int k = 0; k < t.steps; ++k) all[static_cast<std::size_t>(k)] = k;
  CHECK(specdiff::forecast_error(g, all, {}) == 0.0);
}

TEST_CASE("forecast steps: an exact linear trajectory is forecast exactly from two full steps") {
  // y_k = a + k b: with ridge 0 the weights at step k from (j, i), newest first, are ((k - i) / (j - i), (j - k) / (j - i)).
  const std::uint64_t seed = std::random_device{}();
  INFO("seed ", seed);
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> n(0.f, 1.f);
  const int steps = 8, dim = 30;
  std::vector<float> a(dim), b(dim), rows(static_cast<std::size_t>(steps * dim));
  for (auto& x : a) x = n(rng);
  for (auto& x : b) x = n(rng);
  for (int k = 0; k < steps; ++k)
    for (int d = 0; d < dim; ++d) rows[static_cast<std::size_t>(k * dim + d)] = a[static_cast<std::size_t>(d)] + static_cast<float>(k) * b[static_cast<std::size_t>(d)];
  specdiff::trajectory_gram g(steps);
  g.add(rows, rows);
  std::vector<double> w(2);
  REQUIRE(specdiff::forecast_weights(g, 6, std::vector<int>{4, 1}, 0.0, w));
  CHECK(w[0] == doctest::Approx(5.0 / 3.0).epsilon(1e-6));
  CHECK(w[1] == doctest::Approx(-2.0 / 3.0).epsilon(1e-6));
  CHECK(specdiff::forecast_error(g, std::vector<int>{0, 1, 4}, {.depth = 2, .ridge = 0.0}) < 1e-10);
}

TEST_CASE("forecast steps: the ranking is the exhaustive minimum, sorted, and refuses by name") {
  const std::uint64_t seed = std::random_device{}();
  INFO("seed ", seed);
  const random_trajectories t(seed, 9, 2, 25, 25);
  const auto g = t.gram();
  const specdiff::forecast_steps_options o{.depth = 3, .ridge = 1e-3};
  const int count = 4, keep = 5;
  // Every 4-step set holding 0, by bit mask (an independent enumeration).
  std::vector<std::pair<double, std::vector<int>>> all;
  for (unsigned mask = 0; mask < (1u << (t.steps - 1)); ++mask) {
    if (__builtin_popcount(mask) != count - 1) continue;
    std::vector<int> set{0};
    for (int k = 1; k < t.steps; ++k)
      if (mask & (1u << (k - 1))) set.push_back(k);
    all.emplace_back(reference_error(t, set, 3, 1e-3, std::vector<double>(static_cast<std::size_t>(t.steps), 1.0)), set);
  }
  CHECK(all.size() == 56);  // C(8, 3)
  std::stable_sort(all.begin(), all.end(), [](const auto& x, const auto& y) { return x.first < y.first; });
  const auto ranked = specdiff::rank_full_steps(g, count, o, keep);
  REQUIRE(ranked.size() == static_cast<std::size_t>(keep));
  for (std::size_t i = 0; i < ranked.size(); ++i) {
    CHECK(close(ranked[i].error, all[i].first, 1e-6));
    if (i > 0) CHECK(ranked[i].error >= ranked[i - 1].error);
    CHECK(ranked[i].full_steps.size() == static_cast<std::size_t>(count));
    CHECK(ranked[i].full_steps[0] == 0);
  }
  CHECK(ranked[0].full_steps == all[0].second);
  CHECK_THROWS_WITH_AS(specdiff::rank_full_steps(g, 0, o, 1), doctest::Contains("count"), std::invalid_argument);
  CHECK_THROWS_WITH_AS(specdiff::rank_full_steps(g, 10, o, 1), doctest::Contains("count"), std::invalid_argument);
  CHECK_THROWS_WITH_AS(specdiff::rank_full_steps(g, 2, o, 0), doctest::Contains("keep"), std::invalid_argument);
  CHECK_THROWS_WITH_AS(specdiff::rank_full_steps(g, 5, o, 1, 10), doctest::Contains("max_sets"), std::invalid_argument);
  CHECK_THROWS_WITH_AS(specdiff::forecast_error(g, std::vector<int>{1, 2}, o), doctest::Contains("full_steps"), std::invalid_argument);
  CHECK_THROWS_WITH_AS(specdiff::forecast_error(g, std::vector<int>{0, 3, 3}, o), doctest::Contains("full_steps"), std::invalid_argument);
  CHECK_THROWS_WITH_AS(specdiff::forecast_error(g, std::vector<int>{0, 9}, o), doctest::Contains("full_steps"), std::invalid_argument);
  CHECK_THROWS_WITH_AS(specdiff::forecast_error(g, std::vector<int>{0}, {.depth = 0}), doctest::Contains("depth"), std::invalid_argument);
  CHECK_THROWS_WITH_AS(specdiff::forecast_error(g, std::vector<int>{0}, {.step_weight = {1.0}}), doctest::Contains("step_weight"), std::invalid_argument);
  CHECK_THROWS_WITH_AS(specdiff::trajectory_gram(0), doctest::Contains("steps"), std::invalid_argument);
  specdiff::trajectory_gram bad(3);
  CHECK_THROWS_WITH_AS(bad.add(std::vector<float>(7), std::vector<float>(3)), doctest::Contains("fit"), std::invalid_argument);
  CHECK_THROWS_WITH_AS(bad.add(std::vector<float>(6), std::vector<float>(4)), doctest::Contains("error"), std::invalid_argument);
}

TEST_CASE("forecast steps: the local search ends no worse than it starts, where no single move within reach helps") {
  const std::uint64_t seed = std::random_device{}();
  INFO("seed ", seed);
  const random_trajectories t(seed, 12, 2, 20, 20);
  const auto g = t.gram();
  const specdiff::forecast_steps_options o{.depth = 3, .ridge = 1e-3};
  for (int reach : {1, 3}) {
    CAPTURE(reach);
    const std::vector<int> start{0, 1, 2, 6, 11};
    const auto r = specdiff::refine_full_steps(g, start, o, reach);
    CHECK(r.error <= specdiff::forecast_error(g, start, o));
    CHECK(r.error == specdiff::forecast_error(g, r.full_steps, o));
    CHECK(r.full_steps.size() == start.size());
    CHECK(r.full_steps[0] == 0);
    // Every single move of a step other than 0 by at most `reach` to a free step: none lowers the error.
    for (std::size_t i = 1; i < r.full_steps.size(); ++i)
      for (int d = -reach; d <= reach; ++d) {
        const int to = r.full_steps[i] + d;
        if (d == 0 || to <= 0 || to >= t.steps || std::find(r.full_steps.begin(), r.full_steps.end(), to) != r.full_steps.end()) continue;
        auto set = r.full_steps;
        set[i] = to;
        std::sort(set.begin(), set.end());
        CHECK(reference_error(t, set, 3, 1e-3, std::vector<double>(12, 1.0)) >= r.error * (1 - 1e-9));
      }
  }
  CHECK_THROWS_WITH_AS(specdiff::refine_full_steps(g, {0, 3}, o, 0), doctest::Contains("reach"), std::invalid_argument);
  CHECK_THROWS_WITH_AS(specdiff::refine_full_steps(g, {2, 3}, o), doctest::Contains("full_steps"), std::invalid_argument);
}

namespace {
struct model_fixture : methods_testing::sampling_inputs {
  sd3::model model;
  sd3::transformer net;
  model_fixture() : sampling_inputs(std::random_device{}()), model(sd3::model::random(methods_testing::small_config(), seed)), net(model, {4, 8, 8, 3}, 1) {}
};
}  // namespace

TEST_CASE("forecast steps: the learned forecast on placed full steps is the hand-written loop with the table's weights") {
  model_fixture f;
  INFO("seed ", f.seed);
  const auto p = f.problem_on(f.net, 10);
  specdiff::trajectory_gram g(p.steps);
  std::vector<double> step_weight;
  const auto full_run = methods::forecast_gram(p, g, step_weight);
  CHECK(full_run.model_calls == p.steps);
  CHECK(full_run.latents == methods::run_full(p).latents);  // the gram's run is full RFlow
  const auto grid = p.schedule(p.steps);
  for (int k = 0; k < p.steps; ++k) CHECK(step_weight[static_cast<std::size_t>(k)] == doctest::Approx(grid.sigmas()[static_cast<std::size_t>(k + 1)] - grid.sigmas()[static_cast<std::size_t>(k)]));
  const std::vector<int> full{0, 3, 4, 8};
  const specdiff::forecast_steps_options o{.depth = 3, .ridge = 1e-3, .step_weight = step_weight};
  const auto table = specdiff::forecast_table(g, std::span<const float>(grid.timesteps()), full, o);
  // The table: weights exactly where the schedule forecasts, for the history length it has there.
  for (int k = 0; k < p.steps; ++k) {
    const bool is_full = std::find(full.begin(), full.end(), k) != full.end();
    const int seen = static_cast<int>(std::count_if(full.begin(), full.end(), [&](int s) { return s < k; }));
    for (int n = 1; n <= 3; ++n) CHECK(std::isnan(table.weights(k, n)[0]) == (is_full || n != std::min(3, seen)));
  }
  // The hand-written loop: full steps run the network and keep the output; other steps are sum_i w_i y_h(i).
  std::vector<std::vector<float>> kept;  // newest first
  const auto expected = sd3::sample_cfg(f.net, grid, p.inputs, p.guidance, [&](const sd3::model_call& call) {
    if (std::find(full.begin(), full.end(), call.step) != full.end()) {
      f.net.forward(*call.inputs, call.velocity, {});
      kept.insert(kept.begin(), std::vector<float>(call.velocity.begin(), call.velocity.end()));
      return;
    }
    const int n = std::min<int>(3, static_cast<int>(kept.size()));
    const auto w = table.weights(call.step, n);
    for (std::size_t e = 0; e < call.velocity.size(); ++e) {
      float v = 0.f;
      for (int i = 0; i < n; ++i) v += w[static_cast<std::size_t>(i)] * kept[static_cast<std::size_t>(i)][e];
      call.velocity[e] = v;
    }
  });
  methods::forecast_options fo;
  fo.c3 = methods::c3_rule::learned;
  fo.learned_weights = &table;
  fo.full_steps = full;
  const auto run = methods::run_forecast(p, fo);
  CHECK(run.dense_steps == 4);
  CHECK(run.model_calls == p.steps);
  CHECK(full_run.flops / run.flops == doctest::Approx(10.0 / 4.0));
  double err = 0, norm = 0;
  for (std::size_t i = 0; i < expected.size(); ++i) err += (run.latents[i] - expected[i]) * (run.latents[i] - expected[i]), norm += expected[i] * expected[i];
  CHECK(std::sqrt(err / norm) < 1e-5);
  // A table for other steps is refused; so are steps that do not start at 0, fall, or pass the run's end.
  fo.full_steps = {0, 2, 5};
  CHECK_THROWS_WITH_AS(methods::run_forecast(p, fo), doctest::Contains("these 3 full steps"), std::invalid_argument);
  fo.c3 = methods::c3_rule::latest;
  for (const std::vector<int>& bad : {std::vector<int>{1, 4}, std::vector<int>{0, 4, 4}, std::vector<int>{0, 10}}) {
    fo.full_steps = bad;
    CHECK_THROWS_WITH_AS(methods::run_forecast(p, fo), doctest::Contains("full_steps"), std::invalid_argument);
  }
}

TEST_CASE("forecast steps: the file name and the full steps a learned file records") {
  CHECK(methods::learned_forecast_steps_file_name(7) == "learned_forecast_F7.json");
  CHECK(methods::learned_forecast_steps_count("learned_forecast_F7.json") == 7);
  for (const char* name : {"learned_forecast_F07.json", "learned_forecast_F0.json", "learned_forecast_F-1.json", "learned_forecast_N7.json",
                           "learned_forecast_F7.jsonx", "learned_forecast_F.json"})
    CHECK_FALSE(methods::learned_forecast_steps_count(name).has_value());
  CHECK_FALSE(methods::learned_forecast_interval("learned_forecast_F7.json").has_value());
  const auto dir = std::filesystem::temp_directory_path() / ("specdiff_forecast_steps_" + std::to_string(std::random_device{}()));
  std::filesystem::create_directories(dir);
  const specdiff::learned_table table({3.f, 2.f, 1.f}, 3, std::vector<float>(27, 0.f));
  auto write = [&](const std::string& calibration) {
    const auto path = dir / "learned_forecast_F2.json";
    std::ofstream(path) << methods::learned_c3_json(table, calibration);
    return path;
  };
  CHECK(methods::learned_forecast_full_steps(write(R"({"full_steps": [0, 2]})")) == std::vector<int>{0, 2});
  CHECK(methods::learned_forecast_full_steps(write(R"({})")).empty());
  for (const char* bad : {R"({"full_steps": [1, 2]})", R"({"full_steps": [0, 2, 2]})", R"({"full_steps": []})", R"({"full_steps": [0, "a"]})",
                          R"({"full_steps": 3})", R"({"full_steps": [0, -1]})"})
    CHECK_THROWS_WITH_AS(methods::learned_forecast_full_steps(write(bad)), doctest::Contains("calibration.full_steps"), std::runtime_error);
  std::filesystem::remove_all(dir);
}
