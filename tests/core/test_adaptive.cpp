// Free verification, the error-budget schedule and the learned approximator (issue: beyond the paper), each
// against a hand computation or an independent reference, on fixed and fresh random inputs.
#include <doctest/doctest.h>

#include <cmath>
#include <map>
#include <set>
#include <specdiff/specdiff.hpp>

#include "../common/testing.hpp"

using namespace specdiff;

namespace {

std::vector<index_t> iota_ids(std::size_t n) {
  std::vector<index_t> v(n);
  for (std::size_t i = 0; i < n; ++i) v[i] = static_cast<index_t>(i);
  return v;
}

// A toy model with one sample per row block: velocity of (sample, token, channel) at t, smooth in t.
float velocity(index_t sample, index_t token, index_t c, float t) {
  const float u = t / 1000.f;
  return std::sin(0.7f * static_cast<float>(token) + 0.3f * static_cast<float>(sample + c)) * u * u + 0.2f * static_cast<float>(c + 1) * u;
}

// Runs every step of a token-level accelerator with compact rows, keeping the test's own copy of every row's
// history; `on_partial(step, c1 rows' [(sample, token)], hist before the step)` sees each partial step.
template <class Acc, class OnStep>
void run_toy(Acc& acc, const std::vector<float>& ts, OnStep&& on_step) {
  const auto& cfg = acc.config();
  const index_t rows = cfg.batch * cfg.tokens, dim = cfg.feature_dim;
  std::vector<float> out(static_cast<std::size_t>(rows * dim)), attn(static_cast<std::size_t>(rows), 1.f);
  acc.begin_speculation(std::vector<float>{ts.front()});
  for (index_t r = 0; r < rows; ++r) attn[static_cast<std::size_t>(r)] = 1.f + 0.1f * static_cast<float>(r % 7);
  acc.record_speculation(0, attn);
  std::vector<std::vector<std::pair<float, std::vector<float>>>> hist(static_cast<std::size_t>(rows));
  for (index_t k = 0; k < cfg.steps; ++k) {
    const float t = ts[static_cast<std::size_t>(k)];
    auto s = acc.plan_step(k, t);
    const index_t m = s.compute_count();
    const auto ids = s.compute_tokens();
    std::vector<float> computed(static_cast<std::size_t>(cfg.batch * m * dim));
    std::vector<std::pair<index_t, index_t>> c1;
    for (index_t b = 0; b < cfg.batch; ++b)
      for (index_t i = 0; i < m; ++i) {
        const index_t token = ids[static_cast<std::size_t>(b * m + i)];
        c1.emplace_back(b, token);
        for (index_t c = 0; c < dim; ++c) computed[static_cast<std::size_t>((b * m + i) * dim + c)] = velocity(b, token, c, t);
      }
    const bool dense = s.dense();
    on_step(k, dense, c1, hist);
    acc.complete_step(std::move(s), matrix_view<const float>(computed.data(), cfg.batch * m, dim), matrix_view<float>(out.data(), rows, dim), attn);
    for (std::size_t j = 0; j < c1.size(); ++j) {
      auto [b, token] = c1[j];
      std::vector<float> row(computed.begin() + static_cast<std::ptrdiff_t>(j * static_cast<std::size_t>(dim)),
                             computed.begin() + static_cast<std::ptrdiff_t>((j + 1) * static_cast<std::size_t>(dim)));
      hist[static_cast<std::size_t>(b * cfg.tokens + token)].emplace_back(t, std::move(row));
    }
  }
}

std::vector<float> falling_timesteps(index_t steps) {
  std::vector<float> ts;
  for (index_t k = 0; k < steps; ++k) ts.push_back(1000.f * (1.f - static_cast<float>(k) / static_cast<float>(steps)));
  return ts;
}

}  // namespace

TEST_CASE("cache store: prediction_error is the approximator's mix against the computed rows (by hand)") {
  host_cache_store<float> store({.layers = 1, .sites = 1, .tokens = 3, .dim = 2, .history_depth = 3});
  const std::vector<float> a = {1, 2, 0, 0, 5, 5}, b = {2, 4, 1, 1, 5, 5};
  store.write(0, 0, 900.f, matrix_view<const float>(a.data(), 3, 2));
  store.write(0, 0, 800.f, matrix_view<const float>(b.data(), 3, 2));
  // Linear extrapolation to 700 from (800, 900): 2 b - a. Token 0: (3, 6) against (3, 7); token 2: (5, 5) exact.
  const std::vector<float> truth = {5, 5, 3, 7};  // compact rows: row 0 is token 2, row 1 is token 0
  const std::vector<index_t> tokens = {0, 2}, truth_rows = {1, 0};
  std::vector<float> err2(2), norm2(2);
  store.prediction_error(0, 0, 700.f, tokens, linear{}, matrix_view<const float>(truth.data(), 2, 2), truth_rows, err2, norm2);
  CHECK(err2[0] == doctest::Approx(1.0));
  CHECK(norm2[0] == doctest::Approx(58.0));
  CHECK(err2[1] == doctest::Approx(0.0));
  CHECK(norm2[1] == doctest::Approx(50.0));
  // bad arguments name themselves and change nothing
  testing::expect_error<std::invalid_argument>([&] {
    store.prediction_error(0, 0, 700.f, tokens, linear{}, matrix_view<const float>(truth.data(), 2, 2), std::vector<index_t>{1, 2}, err2, norm2);
  }, {"truth_rows[i]", "2"});
  testing::expect_error<std::invalid_argument>([&] {
    store.prediction_error(0, 0, 700.f, tokens, linear{}, matrix_view<const float>(truth.data(), 4, 1), truth_rows, err2, norm2);
  }, {"truth", "2 columns"});
  CHECK(err2[1] == doctest::Approx(0.0));
}

TEST_CASE("cache store: prediction_error on fresh random rows matches the fill") {
  auto rng = testing::rng(41);
  INFO("SPECDIFF_TEST_SEED=", testing::fresh_seed());
  const index_t tokens = 17, dim = 5;
  host_cache_store<float> store({.layers = 2, .sites = 2, .tokens = tokens, .dim = dim, .history_depth = 3});
  for (float t : {950.f, 700.f, 610.f}) {
    const auto rows = testing::random_vector(rng, static_cast<std::size_t>(tokens * dim), -2.f, 2.f);
    store.write(1, 0, t, matrix_view<const float>(rows.data(), tokens, dim));
  }
  const auto truth = testing::random_vector(rng, static_cast<std::size_t>(tokens * dim), -2.f, 2.f);
  const auto ids = iota_ids(static_cast<std::size_t>(tokens));
  std::vector<float> filled(truth.size()), err2(ids.size()), norm2(ids.size());
  store.fill(1, 0, 500.f, ids, specdiff_weighted{}, matrix_view<float>(filled.data(), tokens, dim));
  store.prediction_error(1, 0, 500.f, ids, specdiff_weighted{}, matrix_view<const float>(truth.data(), tokens, dim), ids, err2, norm2);
  for (index_t i = 0; i < tokens; ++i) {
    double e = 0, n = 0;
    for (index_t c = 0; c < dim; ++c) {
      const double y = truth[static_cast<std::size_t>(i * dim + c)], d = filled[static_cast<std::size_t>(i * dim + c)] - y;
      e += d * d;
      n += y * y;
    }
    CHECK(err2[static_cast<std::size_t>(i)] == doctest::Approx(e).epsilon(1e-5));
    CHECK(norm2[static_cast<std::size_t>(i)] == doctest::Approx(n).epsilon(1e-5));
  }
}

TEST_CASE("accelerator: the verified error is the approximator's relative L2 error on each sample's C1 rows") {
  const index_t tokens = 24, batch = 2, steps = 8, dim = 3;
  using A = accelerator<specdiff_scorer, self_speculation, three_level_classifier, step_schedule, linear>;
  A acc({.tokens = tokens, .batch = batch, .steps = steps, .feature_dim = dim}, specdiff_scorer{}, self_speculation{},
        three_level_classifier(0.75), step_schedule{2, 0, 1, {5}});
  // What the last completed step should report (checked when the next step starts, and after the run).
  std::vector<double> want(batch, 0.0);
  double accumulated = 0;
  int partial_run = 0, partial_steps = 0;
  auto check_reported = [&] {
    for (index_t b = 0; b < batch; ++b) CHECK(acc.verified_error()[static_cast<std::size_t>(b)] == doctest::Approx(want[static_cast<std::size_t>(b)]).epsilon(1e-4));
    CHECK(acc.feedback().last_error == doctest::Approx((want[0] + want[1]) / 2).epsilon(1e-4));
    CHECK(acc.feedback().accumulated_error == doctest::Approx(accumulated).epsilon(1e-4));
    CHECK(acc.feedback().partial_run == partial_run);
  };
  run_toy(acc, falling_timesteps(steps), [&](index_t k, bool dense, const auto& c1, const auto& hist) {
    INFO("step ", k);
    if (k > 0) check_reported();
    if (dense) {
      std::ranges::fill(want, 0.0);
      accumulated = 0, partial_run = 0;
      return;
    }
    // by hand: linear extrapolation from each C1 token's last two rows, against the row computed now
    const float t = 1000.f * (1.f - static_cast<float>(k) / steps);
    std::vector<double> e(batch, 0.0), n(batch, 0.0);
    for (auto [b, token] : c1) {
      const auto& h = hist[static_cast<std::size_t>(b * tokens + token)];
      const auto& [t0, r0] = h[h.size() - 1];
      const auto& [t1, r1] = h[h.size() - 2];
      for (index_t c = 0; c < dim; ++c) {
        const auto i = static_cast<std::size_t>(c);
        const double pred = r0[i] + (double{r0[i]} - r1[i]) * (t - t0) / (t0 - t1), y = velocity(b, token, c, t);
        e[static_cast<std::size_t>(b)] += (pred - y) * (pred - y);
        n[static_cast<std::size_t>(b)] += y * y;
      }
    }
    for (std::size_t b = 0; b < want.size(); ++b) want[b] = std::sqrt(e[b] / n[b]);
    accumulated += (want[0] + want[1]) / 2, ++partial_run, ++partial_steps;
  });
  check_reported();
  CHECK(partial_steps == 5);  // steps 0, 1 (warm-up) and 5 (reset) dense
  CHECK(acc.feedback().last_error > 0.f);
  acc.reset();
  CHECK(acc.feedback().accumulated_error == 0.f);
  CHECK(acc.verified_error()[0] == 0.f);
}

TEST_CASE("error_budget_schedule: dense when the accumulated verified error exceeds the budget") {
  const error_budget_schedule s{.fixed = {.warmup_steps = 2, .refresh_interval = 0, .speculative = 2, .dense_steps = {9}}, .error_budget = 0.1f,
                                .max_partial_steps = 4};
  CHECK(s.is_dense(1, 12));
  CHECK(s.is_dense(9, 12));
  CHECK_FALSE(s.is_dense(3, 12));
  CHECK_FALSE(s.is_dense(3, 12, {.last_error = 0.05f, .accumulated_error = 0.1f, .partial_run = 2}));
  CHECK(s.is_dense(3, 12, {.last_error = 0.05f, .accumulated_error = 0.11f, .partial_run = 2}));
  CHECK(s.is_dense(3, 12, {.last_error = 0.f, .accumulated_error = 0.f, .partial_run = 4}));
  CHECK(s.is_dense(9, 12, {}));
  CHECK(s.speculative_steps() == 2);
  testing::expect_error<std::invalid_argument>([] { error_budget_schedule{.error_budget = -1.f}.validate(10); }, {"error_budget", "-1"});
  testing::expect_error<std::invalid_argument>([] { error_budget_schedule{.error_budget = NAN}.validate(10); }, {"error_budget", "nan"});
  testing::expect_error<std::invalid_argument>([] { error_budget_schedule{.max_partial_steps = -2}.validate(10); }, {"max_partial_steps", "-2"});
  testing::expect_error<std::invalid_argument>([] { error_budget_schedule{.fixed = {.dense_steps = {10}}}.validate(10); }, {"dense_steps", "10"});
}

TEST_CASE("accelerator: an error-budget schedule makes exactly the steps dense whose accumulated verified error is over budget") {
  const index_t tokens = 32, steps = 14, dim = 2;
  using A = accelerator<specdiff_scorer, self_speculation, three_level_classifier, error_budget_schedule, specdiff_weighted>;
  for (float budget : {0.f, 0.02f, 0.08f, 1e9f}) {
    INFO("budget ", budget);
    A acc({.tokens = tokens, .batch = 1, .steps = steps, .feature_dim = dim}, specdiff_scorer{}, self_speculation{}, three_level_classifier(0.8),
          error_budget_schedule{.fixed = {.warmup_steps = 2, .refresh_interval = 0, .speculative = 1, .dense_steps = {}}, .error_budget = budget});
    int dense_steps = 0;
    run_toy(acc, falling_timesteps(steps), [&](index_t k, bool dense, const auto&, const auto&) {
      const bool want = k < 2 || acc.feedback().accumulated_error > budget;  // the feedback before this step
      CHECK(dense == want);
      dense_steps += dense;
    });
    if (budget == 0.f) CHECK(dense_steps == 2 + (steps - 2) / 2);  // partial, dense, partial, dense, ...
    if (budget == 1e9f) CHECK(dense_steps == 2);
  }
}

TEST_CASE("learned: the table's weights per (step, history length), the latest row where none were fitted") {
  const float nan = NAN;
  // 2 steps, depth 2: step 0 has only n = 1 fitted, step 1 both.
  const learned_table table({800.f, 600.f}, 2, {0.9f, 0.f, nan, 0.f, 1.1f, 0.f, 1.5f, -0.5f});
  const auto a = table.approximator<2>(std::vector<float>{800.f, 600.f});
  float w[2] = {}, tags[2] = {900.f, 1000.f};
  CHECK(a.weights(tags, 1, 800.f, w) == 1);
  CHECK(w[0] == 0.9f);
  CHECK(a.weights(tags, 2, 600.f, w) == 2);
  CHECK((w[0] == 1.5f && w[1] == -0.5f));
  CHECK(a.weights(tags, 2, 800.f, w) == 2);  // not fitted: reuse the latest
  CHECK((w[0] == 1.f && w[1] == 0.f));
  CHECK(a.weights(tags, 1, 700.f, w) == 1);  // not a step of the table
  CHECK(w[0] == 1.f);
  CHECK(a.weights(tags, 0, 600.f, w) == 0);
  CHECK(table.weights(1, 2)[1] == -0.5f);
  testing::expect_error<std::invalid_argument>([&] { (void)table.approximator<2>(std::vector<float>{800.f, 500.f}); }, {"run_timesteps", "step 1", "600"});
  testing::expect_error<std::invalid_argument>([&] { (void)table.approximator<3>(std::vector<float>{800.f, 600.f}); }, {"depth 2"});
  testing::expect_error<std::invalid_argument>([] { learned_table({800.f, 900.f}, 1, {1.f, 1.f}); }, {"timesteps", "decrease"});
  testing::expect_error<std::invalid_argument>([] { learned_table({800.f}, 2, {1.f, 0.f, 1.f}); }, {"weights", "4", "3"});
  testing::expect_error<std::invalid_argument>([] { learned_table({800.f}, 1, {INFINITY}); }, {"weights", "step 0", "not finite"});
  testing::expect_error<std::invalid_argument>([] { learned_table({800.f}, 9, std::vector<float>(81)); }, {"depth", "9"});
}

TEST_CASE("history_fit: recovers the weights that generated the rows (fresh random histories)") {
  auto rng = testing::rng(43);
  INFO("SPECDIFF_TEST_SEED=", testing::fresh_seed());
  const index_t tokens = 40, dim = 6;
  const std::vector<float> ts = {900.f, 700.f, 500.f, 300.f};
  host_cache_store<float> store({.layers = 1, .sites = 1, .tokens = tokens, .dim = dim, .history_depth = 3});
  for (float t : {1000.f, 950.f, 920.f}) {
    const auto rows = testing::random_vector(rng, static_cast<std::size_t>(tokens * dim), -1.f, 1.f);
    store.write(0, 0, t, matrix_view<const float>(rows.data(), tokens, dim));
  }
  const auto w = testing::random_vector(rng, 3, -1.f, 2.f);
  std::vector<float> truth(static_cast<std::size_t>(tokens * dim));
  for (index_t i = 0; i < tokens; ++i)
    for (index_t c = 0; c < dim; ++c) {
      float y = 0;
      for (int k = 0; k < 3; ++k) y += w[static_cast<std::size_t>(k)] * store.history(0, 0, i, k)[static_cast<std::size_t>(c)];
      truth[static_cast<std::size_t>(i * dim + c)] = y;
    }
  history_fit fit(ts, 3);
  const auto ids = iota_ids(static_cast<std::size_t>(tokens));
  fit.add(store, 0, 0, 2, ids, matrix_view<const float>(truth.data(), tokens, dim), ids);
  CHECK(fit.pairs(2, 3) == static_cast<std::size_t>(tokens));
  CHECK(fit.pairs(1, 3) == 0);
  const auto table = fit.solve(0.0);
  for (int k = 0; k < 3; ++k) CHECK(table.weights(2, 3)[static_cast<std::size_t>(k)] == doctest::Approx(w[static_cast<std::size_t>(k)]).epsilon(1e-3));
  CHECK(std::isnan(table.weights(1, 3)[0]));  // no pairs: not fitted
  // a strong ridge pulls toward reusing the latest row
  const auto shrunk = fit.solve(1e6);
  CHECK(shrunk.weights(2, 3)[0] == doctest::Approx(1.0).epsilon(1e-3));
  CHECK(std::abs(shrunk.weights(2, 3)[1]) < 1e-3);
  // too few pairs: not fitted
  CHECK(std::isnan(fit.solve(0.0, tokens + 1).weights(2, 3)[0]));
  // bad input names itself and adds nothing
  testing::expect_error<std::invalid_argument>([&] {
    fit.add(store, 0, 0, 2, ids, matrix_view<const float>(truth.data(), tokens, dim), std::vector<index_t>(ids.size(), tokens));
  }, {"truth_rows[i]", "40"});
  testing::expect_error<std::invalid_argument>([&] { fit.add(store, 0, 0, 4, ids, matrix_view<const float>(truth.data(), tokens, dim), ids); }, {"step", "4"});
  CHECK(fit.pairs(2, 3) == static_cast<std::size_t>(tokens));
  fit.clear();
  CHECK(fit.pairs(2, 3) == 0);
}

TEST_CASE("accelerator: self-calibration adds each partial step's C1 rows and the fit is least-squares optimal on them") {
  const index_t tokens = 30, steps = 10, dim = 2;
  using A = accelerator<specdiff_scorer, self_speculation, three_level_classifier, step_schedule, specdiff_weighted>;
  A acc({.tokens = tokens, .batch = 1, .steps = steps, .feature_dim = dim}, specdiff_scorer{}, self_speculation{}, three_level_classifier(0.6),
        step_schedule{2, 0, 1, {}});
  const auto ts = falling_timesteps(steps);
  history_fit fit(ts, 3);
  testing::expect_error<std::invalid_argument>([&] {
    history_fit wrong(std::vector<float>{1.f, 0.5f}, 3);
    acc.calibrate(&wrong);
  }, {"timesteps", "10", "2"});
  acc.calibrate(&fit);
  // the test's own (history, row) pairs per (step, n)
  std::map<std::pair<index_t, int>, std::vector<std::pair<std::vector<std::vector<float>>, std::vector<float>>>> pairs;
  run_toy(acc, ts, [&](index_t k, bool dense, const auto& c1, const auto& hist) {
    if (dense) return;
    for (auto [b, token] : c1) {
      const auto& h = hist[static_cast<std::size_t>(b * tokens + token)];
      const int n = std::min<int>(3, static_cast<int>(h.size()));
      std::vector<std::vector<float>> rows;
      for (int i = 0; i < n; ++i) rows.push_back(h[h.size() - 1 - static_cast<std::size_t>(i)].second);
      std::vector<float> y;
      for (index_t c = 0; c < dim; ++c) y.push_back(velocity(b, token, c, ts[static_cast<std::size_t>(k)]));
      pairs[{k, n}].emplace_back(std::move(rows), std::move(y));
    }
  });
  const auto table = fit.solve(0.0, 1);
  int checked = 0;
  for (const auto& [key, list] : pairs) {
    const auto [k, n] = key;
    INFO("step ", k, " n ", n);
    CHECK(fit.pairs(static_cast<int>(k), n) == list.size());
    if (static_cast<int>(list.size() * dim) < 2 * n) continue;  // too few equations to pin down n weights
    // optimality: the residual is orthogonal to every history row (the normal equations)
    const auto w = table.weights(static_cast<int>(k), n);
    REQUIRE_FALSE(std::isnan(w[0]));
    std::vector<double> grad(static_cast<std::size_t>(n), 0.0);
    double scale = 0;
    for (const auto& [rows, y] : list)
      for (index_t c = 0; c < dim; ++c) {
        double r = y[static_cast<std::size_t>(c)];
        for (int i = 0; i < n; ++i) r -= w[static_cast<std::size_t>(i)] * rows[static_cast<std::size_t>(i)][static_cast<std::size_t>(c)];
        for (int i = 0; i < n; ++i) grad[static_cast<std::size_t>(i)] += r * rows[static_cast<std::size_t>(i)][static_cast<std::size_t>(c)];
        scale += double{y[static_cast<std::size_t>(c)]} * y[static_cast<std::size_t>(c)];
      }
    for (double g : grad) CHECK(std::abs(g) < 1e-3 * scale + 1e-6);
    ++checked;
  }
  CHECK(checked >= 4);
  acc.calibrate(nullptr);
}

TEST_CASE("three_level_classifier with cache-rate buckets: the bucket follows the last verified error") {
  const std::vector<double> rates = {0.95, 0.9, 0.8};
  three_level_classifier c(rates, 0.1f);
  CHECK(c.buckets() == 3);
  CHECK(c.compute_count(100) == 5);  // bucket 0 before any feedback
  const std::vector<std::pair<float, double>> cases = {{0.f, 0.95}, {0.05f, 0.95}, {0.1f, 0.9}, {0.19f, 0.9},
                                                        {0.2f, 0.8}, {3.f, 0.8},    {INFINITY, 0.8}, {NAN, 0.8}};
  for (auto [e, rate] : cases) {
    c.adapt({.last_error = e, .accumulated_error = e, .partial_run = 1});
    INFO("error ", e);
    CHECK(c.cache_rate() == rate);
  }
  CHECK(c.compute_count(100) == 20);
  three_level_classifier fixed(0.9);
  fixed.adapt({.last_error = 5.f});
  CHECK(fixed.cache_rate() == 0.9);  // one bucket: SpecDiff's fixed rate
  testing::expect_error<std::invalid_argument>([] { three_level_classifier(std::vector<double>{0.8, 0.9}, 0.1f); }, {"cache_rates", "fall"});
  testing::expect_error<std::invalid_argument>([] { three_level_classifier(std::vector<double>{}, 0.1f); }, {"cache_rates", "1 to 8"});
  testing::expect_error<std::invalid_argument>([] { three_level_classifier(std::vector<double>{0.9, 1.5}, 0.1f); }, {"cache_rate", "1.5"});
  testing::expect_error<std::invalid_argument>([] { three_level_classifier(std::vector<double>{0.9}, 0.f); }, {"error_step", "0"});
}

TEST_CASE("accelerator: with cache-rate buckets each partial step computes the count its bucket gives") {
  const index_t tokens = 40, steps = 12, dim = 2;
  using A = accelerator<specdiff_scorer, self_speculation, three_level_classifier, step_schedule, specdiff_weighted>;
  const std::vector<double> rates = {0.9, 0.75, 0.5};
  for (float error_step : {0.01f, 0.05f, 0.2f}) {
    INFO("error_step ", error_step);
    A acc({.tokens = tokens, .batch = 2, .steps = steps, .feature_dim = dim}, specdiff_scorer{}, self_speculation{},
          three_level_classifier(rates, error_step), step_schedule{2, 0, 1, {7}});
    std::set<index_t> counts;
    run_toy(acc, falling_timesteps(steps), [&](index_t k, bool dense, const auto& c1, const auto&) {
      if (dense) return;
      // by hand: the bucket from the error verified on the last completed step (0 after a dense one)
      const float e = acc.feedback().last_error;
      const double rate = e == 0.f ? 0.9 : e < error_step ? 0.9 : e < 2 * error_step ? 0.75 : 0.5;
      const auto want = static_cast<index_t>(std::ceil((1.0 - rate) * tokens - 1e-9 * tokens));
      INFO("step ", k, " error ", e);
      CHECK(static_cast<index_t>(c1.size()) == 2 * want);
      CHECK(acc.partial_compute_count() == want);
      counts.insert(want);
    });
    if (error_step == 0.01f) CHECK(counts.count(20) == 1);  // errors of a few percent: the lowest rate is reached
  }
}
