// Issue 30's compositions beyond the learned forecast, each against an independent twin written from its definition:
// FoCa's forecast rule (c3 = foca), the predictor-corrector at full steps (forecast_options::correct) and TACache's
// direction-aware compensation (calibrate_tacache, forecast_options::tacache). Fresh random models and inputs each run.
#include <doctest/doctest.h>

#include <cmath>
#include <limits>
#include <random>
#include <span>
#include <vector>

#include "../common/testing.hpp"
#include "demo/support.hpp"
#include "methods/methods.hpp"
#include "sampling_inputs.hpp"
#include "sd3/model.hpp"

namespace {

struct fixture : methods_testing::sampling_inputs {
  sd3::model model;
  sd3::transformer net;
  fixture() : sampling_inputs(std::random_device{}()), model(sd3::model::random(methods_testing::small_config(), seed)), net(model, {4, 8, 8, 3}, 1) {}
};

double relative_error(const std::vector<float>& a, const std::vector<float>& b) {
  REQUIRE(a.size() == b.size());
  double err = 0, norm = 0;
  for (std::size_t i = 0; i < a.size(); ++i) err += (a[i] - b[i]) * static_cast<double>(a[i] - b[i]), norm += static_cast<double>(b[i]) * b[i];
  return std::sqrt(err / norm);
}

// The derivative at `at` of the quadratic through (t[i], f[i]), i = 0..2 (Lagrange, differentiated term by term).
double quadratic_slope(const double* t, const double* f, double at) {
  double s = 0;
  for (int i = 0; i < 3; ++i) {
    const int j = (i + 1) % 3, k = (i + 2) % 3;
    s += f[i] * ((at - t[j]) + (at - t[k])) / ((t[i] - t[j]) * (t[i] - t[k]));
  }
  return s;
}

// The value at `at` of the polynomial through the n points (t[i], f[i]).
double lagrange(const double* t, const double* f, int n, double at) {
  double s = 0;
  for (int i = 0; i < n; ++i) {
    double l = 1;
    for (int j = 0; j < n; ++j)
      if (j != i) l *= (at - t[j]) / (t[i] - t[j]);
    s += l * f[i];
  }
  return s;
}

// FoCa from its definition, per element: the value F at `at` whose quadratic through (t1, F1), (t0, F0), (at, F)
// has the slope there that the quadratic through the last three full outputs has at t0. The slope is affine in F:
// found from two trial values, not from the closed form the library uses. Fewer outputs: linear, then reuse.
double foca_twin(const std::vector<double>& t, const std::vector<double>& f, double at) {  // newest first
  if (t.size() == 1) return f[0];
  if (t.size() == 2) return f[0] + (at - t[0]) * (f[0] - f[1]) / (t[0] - t[1]);
  const double g = quadratic_slope(t.data(), f.data(), t[0]);
  const double tt[3] = {t[1], t[0], at};
  const double zero[3] = {f[1], f[0], 0.0}, one[3] = {f[1], f[0], 1.0};
  const double s0 = quadratic_slope(tt, zero, at), s1 = quadratic_slope(tt, one, at);
  return (g - s0) / (s1 - s0);
}

}  // namespace

TEST_CASE("forecast, c3 = foca: FoCa's BDF2 step from the last three full outputs over step indices, against its definition") {
  fixture f;
  INFO("seed ", f.seed);
  const auto p = f.problem_on(f.net, 12);
  for (int n : {2, 3}) {
    CAPTURE(n);
    methods::forecast_options o;
    o.interval = n;  // N = 2: warm-up 3, full steps 0, 1, 2, 4, 6, ...; N = 3: warm-up 2, full steps 0, 1, 4, 7, 10
    o.c3 = methods::c3_rule::foca;
    std::vector<std::vector<float>> outputs;  // the full steps' outputs, newest last
    std::vector<double> tags;
    auto full = [&](int k) { return k < o.warmup() || (k - o.warmup() + 1) % n == 0; };
    const auto expected = sd3::sample_cfg(f.net, p.schedule(p.steps), p.inputs, p.guidance, [&](const sd3::model_call& call) {
      if (full(call.step)) {
        f.net.forward(*call.inputs, call.velocity, {});
        outputs.emplace_back(call.velocity.begin(), call.velocity.end());
        tags.push_back(call.step);
        return;
      }
      const std::size_t m = std::min<std::size_t>(3, outputs.size());
      for (std::size_t e = 0; e < call.velocity.size(); ++e) {
        std::vector<double> t, v;
        for (std::size_t a = 0; a < m; ++a) t.push_back(tags[tags.size() - 1 - a]), v.push_back(outputs[outputs.size() - 1 - a][e]);
        call.velocity[e] = static_cast<float>(foca_twin(t, v, call.step));
      }
    });
    const auto run = methods::run_forecast(p, o);
    CHECK(run.dense_steps == static_cast<int>(outputs.size()));
    CHECK(relative_error(run.latents, expected) < 1e-5);
  }
}

TEST_CASE("forecast_options::correct: the forecast steps re-estimated through the next full output, the latent moved by a share") {
  fixture f;
  INFO("seed ", f.seed);
  const auto p = f.problem_on(f.net, 11);
  const sd3::flow_match_euler main = p.schedule(p.steps);
  methods::forecast_options o;
  o.interval = 3;  // warm-up 2: full steps 0, 1, 4, 7, 10
  o.c3 = methods::c3_rule::linear;
  const auto plain = methods::run_forecast(p, o);
  for (double weight : {0.5, 1.0}) {
    CAPTURE(weight);
    o.correct = weight;
    // The twin: Taylor order 1 over step indices between full steps; at each full step j the skipped steps k since
    // the previous one get the polynomial through the newest three full outputs at their timesteps, and
    // weight * sum_k s_k (interpolated - forecast) / s_j is added to step j's output.
    std::vector<std::vector<float>> outputs;
    std::vector<int> full_at;
    std::vector<std::pair<int, std::vector<float>>> pending;  // (step, its forecast output)
    auto full = [&](int k) { return k < 2 || (k - 1) % 3 == 0; };
    auto step_size = [&](int k) { return static_cast<double>(main.sigmas()[static_cast<std::size_t>(k) + 1]) - main.sigmas()[static_cast<std::size_t>(k)]; };
    const auto expected = sd3::sample_cfg(f.net, main, p.inputs, p.guidance, [&](const sd3::model_call& call) {
      if (!full(call.step)) {
        const auto &v = outputs.back(), &w = outputs[outputs.size() - 2];
        const double x = static_cast<double>(call.step - full_at.back()) / (full_at.back() - full_at[full_at.size() - 2]);
        for (std::size_t e = 0; e < v.size(); ++e) call.velocity[e] = static_cast<float>(v[e] + x * (v[e] - w[e]));
        pending.emplace_back(call.step, std::vector<float>(call.velocity.begin(), call.velocity.end()));
        return;
      }
      f.net.forward(*call.inputs, call.velocity, {});
      outputs.emplace_back(call.velocity.begin(), call.velocity.end());
      full_at.push_back(call.step);
      const int m = std::min<int>(3, static_cast<int>(outputs.size()));
      for (std::size_t e = 0; e < call.velocity.size(); ++e) {
        double t[3], v[3], shift = 0;
        for (int a = 0; a < m; ++a) {
          t[a] = main.timesteps()[static_cast<std::size_t>(full_at[full_at.size() - 1 - static_cast<std::size_t>(a)])];
          v[a] = outputs[outputs.size() - 1 - static_cast<std::size_t>(a)][e];
        }
        for (const auto& [k, forecast] : pending) shift += step_size(k) * (lagrange(t, v, m, main.timesteps()[static_cast<std::size_t>(k)]) - forecast[e]);
        call.velocity[e] = static_cast<float>(call.velocity[e] + weight * shift / step_size(call.step));
      }
      pending.clear();
    });
    const auto run = methods::run_forecast(p, o);
    CHECK(run.dense_steps == 5);
    CHECK(run.model_calls == plain.model_calls);  // no model call added
    CHECK(relative_error(run.latents, expected) < 1e-5);
    CHECK(run.latents != plain.latents);
  }
  for (double bad : {-0.1, 1.5, std::numeric_limits<double>::quiet_NaN()}) {
    o.correct = bad;
    testing::expect_error<std::invalid_argument>([&] { (void)methods::run_forecast(p, o); }, {"correct", "[0, 1]"});
  }
}

TEST_CASE("TACache: the fit is each step's least squares over the calibration vectors, the forecast its reconstruction") {
  fixture f;
  INFO("seed ", f.seed);
  const auto p = f.problem_on(f.net, 10);
  const sd3::flow_match_euler main = p.schedule(p.steps);
  methods::forecast_options o;
  o.interval = 3;  // full steps 0, 1, 4, 7
  methods::tacache_table table;
  (void)methods::calibrate_tacache(p, o, table);
  CHECK(table.full_steps == std::vector<int>{0, 1, 4, 7});
  CHECK(table.vectors == 2 * p.inputs.batch);
  // The twin records full RFlow's outputs (velocity layout: a sample's CFG half is one contiguous block, its elements
  // in another order than the rows', which inner products do not see) and solves each step's fit by Cramer's rule.
  std::vector<std::vector<float>> out;
  (void)sd3::sample_cfg(f.net, main, p.inputs, p.guidance, [&](const sd3::model_call& call) {
    f.net.forward(*call.inputs, call.velocity, {});
    out.emplace_back(call.velocity.begin(), call.velocity.end());
  });
  const std::size_t blocks = static_cast<std::size_t>(2 * p.inputs.batch), length = out[0].size() / blocks;
  auto dot = [&](const float* a, const float* b) {
    double s = 0;
    for (std::size_t i = 0; i < length; ++i) s += static_cast<double>(a[i]) * b[i];
    return s;
  };
  auto latest_full = [&](int k) { return k < 4 ? 1 : k < 7 ? 4 : 7; };
  for (int k : {2, 3, 5, 6, 8, 9}) {
    CAPTURE(k);
    const int a = latest_full(k), b = a == 1 ? 0 : a - 3;
    double nn = 0, np = 0, pp = 0, ny = 0, py = 0, ko = 0, oo = 0;
    for (std::size_t blk = 0; blk < blocks; ++blk) {
      const float *v = out[static_cast<std::size_t>(a)].data() + blk * length, *w = out[static_cast<std::size_t>(b)].data() + blk * length,
                  *y = out[static_cast<std::size_t>(k)].data() + blk * length;
      const double norm = std::sqrt(dot(v, v)), dv = dot(v, v) - dot(w, v), par = dv / norm;
      std::vector<float> o_vec(length);
      for (std::size_t i = 0; i < length; ++i) o_vec[i] = static_cast<float>(v[i] - w[i] - dv / (norm * norm) * v[i]);
      const double yu = dot(y, v) / norm;
      nn += norm * norm, np += norm * par, pp += par * par, ny += norm * yu, py += par * yu;
      ko += dot(y, o_vec.data()), oo += dot(o_vec.data(), o_vec.data());
    }
    const double det = nn * pp - np * np;
    CHECK(table.alpha[static_cast<std::size_t>(k)] == doctest::Approx((ny * pp - np * py) / det).epsilon(1e-4));
    CHECK(table.beta[static_cast<std::size_t>(k)] == doctest::Approx((nn * py - np * ny) / det).epsilon(1e-4));
    CHECK(table.gamma[static_cast<std::size_t>(k)] == doctest::Approx(ko / oo).epsilon(1e-4));
  }
  for (int k : {0, 1, 4, 7}) CHECK(std::isnan(table.alpha[static_cast<std::size_t>(k)]));
  // Before a second full step there is none to take a direction from: steps forecast from step 0 alone (warm-up 1)
  // get alpha only.
  methods::forecast_options early = o;
  early.warmup_steps = 1;  // full steps 0, 3, 6, 9
  methods::tacache_table t1;
  (void)methods::calibrate_tacache(p, early, t1);
  CHECK(t1.beta[1] == 0.0);
  CHECK(t1.gamma[1] == 0.0);
  double vy = 0, vv = 0;
  for (std::size_t blk = 0; blk < blocks; ++blk) {
    const float *v = out[0].data() + blk * length, *y = out[1].data() + blk * length;
    vy += dot(y, v), vv += dot(v, v);
  }
  CHECK(t1.alpha[1] == doctest::Approx(vy / vv).epsilon(1e-4));

  // The forecast with the table against the reconstruction written out: v_k = (alpha + beta p / |v|) v + gamma o.
  o.tacache = &table;
  std::vector<std::vector<float>> fulls;
  const auto expected = sd3::sample_cfg(f.net, main, p.inputs, p.guidance, [&](const sd3::model_call& call) {
    const auto k = static_cast<std::size_t>(call.step);
    if (call.step == 0 || call.step == 1 || call.step == 4 || call.step == 7) {
      f.net.forward(*call.inputs, call.velocity, {});
      fulls.emplace_back(call.velocity.begin(), call.velocity.end());
      return;
    }
    for (std::size_t blk = 0; blk < blocks; ++blk) {
      const float *v = fulls.back().data() + blk * length, *w = fulls[fulls.size() - 2].data() + blk * length;
      const double vv2 = dot(v, v), along = (vv2 - dot(w, v)) / vv2, norm = std::sqrt(vv2);
      const double scale = table.alpha[k] + table.beta[k] * along * norm / norm;
      for (std::size_t i = 0; i < length; ++i)
        call.velocity[blk * length + i] = static_cast<float>(scale * v[i] + table.gamma[k] * (v[i] - w[i] - along * v[i]));
    }
  });
  CHECK(relative_error(methods::run_forecast(p, o).latents, expected) < 1e-5);
}

TEST_CASE("TACache with alpha = 1 and beta = gamma = k / gap is linear extrapolation; a table for other steps is refused") {
  fixture f;
  INFO("seed ", f.seed);
  const auto p = f.problem_on(f.net, 10);
  methods::forecast_options o;
  o.interval = 3;  // full steps 0, 1, 4, 7: gaps 1, 3, 3
  methods::tacache_table t;
  (void)methods::calibrate_tacache(p, o, t);
  const auto gap = [](int k) { return k < 4 ? 1.0 : 3.0; };
  const auto latest = [](int k) { return k < 4 ? 1 : k < 7 ? 4 : 7; };
  for (int k : {2, 3, 5, 6, 8, 9}) {
    const auto i = static_cast<std::size_t>(k);
    t.alpha[i] = 1.0, t.beta[i] = t.gamma[i] = (k - latest(k)) / gap(k);
  }
  methods::forecast_options taylor = o;
  taylor.c3 = methods::c3_rule::linear;  // over step indices: v + (k - a) / gap (v - w)
  o.tacache = &t;
  CHECK(relative_error(methods::run_forecast(p, o).latents, methods::run_forecast(p, taylor).latents) < 1e-5);
  // other full steps (warm-up 3), and a table of another length: refused, naming the option
  o.warmup_steps = 3;
  testing::expect_error<std::invalid_argument>([&] { (void)methods::run_forecast(p, o); }, {"tacache", "full steps"});
  o.warmup_steps = 0;
  t.alpha.pop_back();
  testing::expect_error<std::invalid_argument>([&] { (void)methods::run_forecast(p, o); }, {"tacache", "steps"});
}

TEST_CASE("the demo's forecast spec: --correct and --c3 foca / tacache map to the options, bad ones refused by name") {
  demo::method_spec s{.name = "forecast", .interval = 3, .c3 = std::string("foca"), .correct = 0.5};
  const auto o = demo::forecast_options_of(s);
  CHECK(o.c3 == methods::c3_rule::foca);
  CHECK(o.correct == 0.5);
  CHECK(s.describe() == "forecast N=3 c3=foca corr=0.5");
  s.correct = 1.5;
  testing::expect_error<std::invalid_argument>([&] { (void)demo::forecast_options_of(s); }, {"correct", "1.5"});
  s.correct.reset();
  s.c3 = "tacache";  // its statistics come from the program (fit_tacache): without them, refused
  testing::expect_error<std::invalid_argument>([&] { (void)demo::forecast_options_of(s); }, {"tacache", "calibration noise"});
  const methods::tacache_table table;
  s.tacache = &table;
  CHECK(demo::forecast_options_of(s).tacache == &table);
  const demo::method_spec specdiff{.name = "specdiff", .c3 = std::string("tacache")};
  testing::expect_error<std::invalid_argument>([&] { demo::check_method(specdiff); }, {"tacache", "forecast only"});
}
