// Where an output forecast's full steps go (issue 30). A forecast that computes the network on a few steps and
// forecasts every other step's output from the last full ones (learned<Depth> weights, fitted by least squares on
// full calibration trajectories) is as good as the steps it computes: the same count of full steps placed where the
// trajectory bends forecasts better than an even spacing. Everything a teacher-forced fit and its error need is
// in the inner products of the step outputs with one another, summed over calibration trajectories:
//
//   trajectory_gram gram(steps);
//   gram.add(fit_rows, error_rows);               // per calibration trajectory: [steps][dim] each
//   auto best = rank_full_steps(gram, 7, opt, 5); // every 7-step set holding step 0, ranked by forecast_error
//   learned_table t = forecast_table(gram, timesteps, best[0].full_steps, opt);
//
// `fit` rows are what the weights are fitted on (both CFG halves' outputs, as history_fit sees them); `error` rows
// are what the error is measured in (the guided output the sampler steps with). forecast_error is the error the
// forecasts put into the final latent to first order, || sum_k s_k (y_k - sum_i w_ki y_h(k,i)) ||^2 over the error
// rows, with s_k the sampler's step size (Euler: sigma_{k+1} - sigma_k), relative to || sum_k s_k y_k ||^2:
// correlated errors of neighbouring forecast steps add up, as they do in the latent; how an error changes the
// later outputs (the trajectory drifting) is not modelled. Host only: a calibration tool's work.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <limits>
#include <span>
#include <vector>

#include "common.hpp"
#include "learned.hpp"

namespace specdiff {

/// Inner products <y_a, y_b> of the outputs of every pair of steps (a, b), summed over calibration trajectories,
/// over the fit rows and over the error rows.
class trajectory_gram {
 public:
  explicit trajectory_gram(int steps) : steps_(steps) {
    if (steps < 1) detail::fail("steps: must be >= 1, got ", steps);
    fit_.assign(static_cast<std::size_t>(steps) * static_cast<std::size_t>(steps), 0.0);
    error_.assign(fit_.size(), 0.0);
  }
  int steps() const { return steps_; }
  std::size_t trajectories() const { return trajectories_; }

  /// One trajectory: `fit` is [steps][fit_dim] and `error` [steps][error_dim], one step's rows after another.
  void add(std::span<const float> fit, std::span<const float> error) {
    const auto s = static_cast<std::size_t>(steps_);
    if (fit.empty() || fit.size() % s != 0) detail::fail("fit: size ", fit.size(), " is not a positive multiple of steps = ", steps_);
    if (error.empty() || error.size() % s != 0) detail::fail("error: size ", error.size(), " is not a positive multiple of steps = ", steps_);
    accumulate(fit, fit_);
    accumulate(error, error_);
    ++trajectories_;
  }
  double fit(int a, int b) const { return fit_[index(a, b)]; }
  double error(int a, int b) const { return error_[index(a, b)]; }

 private:
  std::size_t index(int a, int b) const {
    detail::expect_index("a", a, steps_);
    detail::expect_index("b", b, steps_);
    return static_cast<std::size_t>(a) * static_cast<std::size_t>(steps_) + static_cast<std::size_t>(b);
  }
  void accumulate(std::span<const float> rows, std::vector<double>& out) const {
    const auto s = static_cast<std::size_t>(steps_), dim = rows.size() / s;
    for (std::size_t a = 0; a < s; ++a)
      for (std::size_t b = 0; b <= a; ++b) {
        double sum = 0.0;
        const float *x = rows.data() + a * dim, *y = rows.data() + b * dim;
        for (std::size_t i = 0; i < dim; ++i) sum += static_cast<double>(x[i]) * static_cast<double>(y[i]);
        out[a * s + b] += sum;
        if (a != b) out[b * s + a] += sum;
      }
  }

  int steps_;
  std::vector<double> fit_, error_;
  std::size_t trajectories_ = 0;
};

struct forecast_steps_options {
  int depth = 3;        ///< cached full outputs a forecast reads, newest first (the learned table's depth)
  double ridge = 1e-3;  ///< toward reusing the latest output, relative to the history's mean Gram diagonal (history_fit::solve)
  /// Per step, how much its output moves the final latent (the sampler's step size); empty: 1 for every step.
  std::vector<double> step_weight = {};
};

namespace detail {
inline void check_forecast_steps(const trajectory_gram& g, std::span<const int> full_steps, const forecast_steps_options& o) {
  if (o.depth < 1 || o.depth > cache_shape::max_history) fail("depth: must lie in [1, ", cache_shape::max_history, "], got ", o.depth);
  if (!(o.ridge >= 0.0 && std::isfinite(o.ridge))) fail("ridge: must be finite and >= 0, got ", o.ridge);
  if (!o.step_weight.empty()) expect_size("step_weight", o.step_weight.size(), static_cast<std::size_t>(g.steps()));
  if (full_steps.empty() || full_steps[0] != 0) fail("full_steps: must start with step 0 (nothing to forecast from before it)");
  for (std::size_t i = 0; i < full_steps.size(); ++i) {
    expect_index("full_steps[i]", full_steps[i], g.steps());
    if (i > 0 && !(full_steps[i] > full_steps[i - 1]))
      fail("full_steps: must strictly increase, got ", full_steps[i - 1], " then ", full_steps[i], " at ", i);
  }
}
}  // namespace detail

/// The n = history.size() weights (newest first) of step `step`'s forecast from the outputs of the steps in
/// `history`, minimising sum ||y - sum_i w_i h_i||^2 + ridge * scale * ||w - e_1||^2 over the fit rows (scale: the
/// history's mean Gram diagonal), as history_fit::solve does. False when the system is singular.
inline bool forecast_weights(const trajectory_gram& g, int step, std::span<const int> history, double ridge, std::span<double> w) {
  const int n = static_cast<int>(history.size());
  if (n < 1 || n > cache_shape::max_history) detail::fail("history: must hold 1 to ", cache_shape::max_history, " steps, got ", n);
  detail::expect_size("w", w.size(), history.size());
  std::array<double, cache_shape::max_history * cache_shape::max_history> a{};
  double scale = 0.0;
  for (int i = 0; i < n; ++i) scale += g.fit(history[static_cast<std::size_t>(i)], history[static_cast<std::size_t>(i)]);
  scale = scale > 0.0 ? scale / n : 1.0;
  for (int i = 0; i < n; ++i) {
    const int hi = history[static_cast<std::size_t>(i)];
    for (int j = 0; j < n; ++j) a[static_cast<std::size_t>(i * n + j)] = g.fit(hi, history[static_cast<std::size_t>(j)]) + (i == j ? ridge * scale : 0.0);
    w[static_cast<std::size_t>(i)] = g.fit(hi, step) + (i == 0 ? ridge * scale : 0.0);
  }
  // Gaussian elimination with partial pivoting.
  for (int col = 0; col < n; ++col) {
    int pivot = col;
    for (int r = col + 1; r < n; ++r)
      if (std::abs(a[static_cast<std::size_t>(r * n + col)]) > std::abs(a[static_cast<std::size_t>(pivot * n + col)])) pivot = r;
    if (!(std::abs(a[static_cast<std::size_t>(pivot * n + col)]) > 1e-300)) return false;
    if (pivot != col) {
      for (int j = 0; j < n; ++j) std::swap(a[static_cast<std::size_t>(col * n + j)], a[static_cast<std::size_t>(pivot * n + j)]);
      std::swap(w[static_cast<std::size_t>(col)], w[static_cast<std::size_t>(pivot)]);
    }
    for (int r = col + 1; r < n; ++r) {
      const double f = a[static_cast<std::size_t>(r * n + col)] / a[static_cast<std::size_t>(col * n + col)];
      for (int j = col; j < n; ++j) a[static_cast<std::size_t>(r * n + j)] -= f * a[static_cast<std::size_t>(col * n + j)];
      w[static_cast<std::size_t>(r)] -= f * w[static_cast<std::size_t>(col)];
    }
  }
  for (int r = n - 1; r >= 0; --r) {
    double s = w[static_cast<std::size_t>(r)];
    for (int j = r + 1; j < n; ++j) s -= a[static_cast<std::size_t>(r * n + j)] * w[static_cast<std::size_t>(j)];
    w[static_cast<std::size_t>(r)] = s / a[static_cast<std::size_t>(r * n + r)];
  }
  for (int i = 0; i < n; ++i)
    if (!std::isfinite(w[static_cast<std::size_t>(i)])) return false;
  return true;
}

namespace detail {
// Visits every step k the forecast on `full_steps` forecasts, in order, with its history (its last
// min(depth, full steps before k) full steps, newest first) and the teacher-forced weights for that history;
// `fitted` is false where the fit is singular. The visitor returns false to stop. No allocation.
template <class Visit>
void visit_forecasts(const trajectory_gram& g, std::span<const int> full_steps, const forecast_steps_options& o, Visit&& visit) {
  std::array<int, cache_shape::max_history> history{};
  std::array<double, cache_shape::max_history> w{};
  std::size_t next = 0;  // full_steps[next] is the next full step at or after k
  for (int k = 0; k < g.steps(); ++k) {
    if (next < full_steps.size() && full_steps[next] == k) {
      ++next;
      continue;
    }
    const std::size_t n = std::min(static_cast<std::size_t>(o.depth), next);
    for (std::size_t i = 0; i < n; ++i) history[i] = full_steps[next - 1 - i];
    const std::span<const int> h(history.data(), n);
    const std::span<double> weights(w.data(), n);
    const bool fitted = forecast_weights(g, k, h, o.ridge, weights);
    if (!visit(k, h, std::span<const double>(weights), fitted)) return;
  }
}
}  // namespace detail

/// The teacher-forced forecast's first-order error in the final latent for a set of full steps (strictly
/// increasing, step 0 first): || sum_k s_k e_k ||^2 / || sum_k s_k y_k ||^2 over the error rows, e_k the forecast
/// error of every step k not in `full_steps` (from its last min(depth, full steps so far) full steps, newest first,
/// weights by forecast_weights) and s_k = step_weight[k]. Infinity when a fit is singular.
inline double forecast_error(const trajectory_gram& g, std::span<const int> full_steps, const forecast_steps_options& o) {
  detail::check_forecast_steps(g, full_steps, o);
  const auto steps = static_cast<std::size_t>(g.steps());
  const auto step_weight = [&](std::size_t k) { return o.step_weight.empty() ? 1.0 : o.step_weight[k]; };
  std::vector<double> c(steps, 0.0);  // the final latent's error as a combination of the step outputs
  bool singular = false;
  detail::visit_forecasts(g, full_steps, o, [&](int k, std::span<const int> history, std::span<const double> w, bool fitted) {
    if (!fitted) {
      singular = true;
      return false;
    }
    const double s = step_weight(static_cast<std::size_t>(k));
    c[static_cast<std::size_t>(k)] += s;
    for (std::size_t i = 0; i < history.size(); ++i) c[static_cast<std::size_t>(history[i])] -= s * w[i];
    return true;
  });
  if (singular) return std::numeric_limits<double>::infinity();
  double num = 0.0, den = 0.0;
  for (std::size_t a = 0; a < steps; ++a)
    for (std::size_t b = 0; b < steps; ++b) {
      const double e = g.error(static_cast<int>(a), static_cast<int>(b));
      num += c[a] * c[b] * e;
      den += step_weight(a) * step_weight(b) * e;
    }
  return den > 0.0 ? std::max(num, 0.0) / den : std::max(num, 0.0);
}

/// The learned table of a forecast on `full_steps`: at each forecast step k, the weights forecast_weights gives
/// for its history (length n = min(depth, full steps before k)); every other (step, length) unfitted (NaN).
/// `timesteps`: the run's main grid (falling), one per step of the gram.
inline learned_table forecast_table(const trajectory_gram& g, std::span<const float> timesteps, std::span<const int> full_steps,
                                    const forecast_steps_options& o) {
  detail::check_forecast_steps(g, full_steps, o);
  detail::expect_size("timesteps", timesteps.size(), static_cast<std::size_t>(g.steps()));
  const auto d = static_cast<std::size_t>(o.depth);
  std::vector<float> weights(timesteps.size() * d * d, 0.f);
  for (std::size_t row = 0; row < timesteps.size() * d; ++row) weights[row * d] = std::numeric_limits<float>::quiet_NaN();
  detail::visit_forecasts(g, full_steps, o, [&](int k, std::span<const int> history, std::span<const double> w, bool fitted) {
    if (!fitted) return true;  // stays unfitted: the forecast refuses the table for this schedule
    const std::size_t n = history.size();
    float* out = weights.data() + (static_cast<std::size_t>(k) * d + (n - 1)) * d;
    for (std::size_t i = 0; i < n; ++i) out[i] = static_cast<float>(w[i]);
    return true;
  });
  return learned_table(std::vector<float>(timesteps.begin(), timesteps.end()), o.depth, std::move(weights));
}

struct ranked_full_steps {
  std::vector<int> full_steps;
  double error = 0.0;  ///< forecast_error
};

/// Every set of `count` full steps that holds step 0, ranked by forecast_error (lowest first); the best `keep`
/// (ties: the earlier set in lexicographic order). Refuses when there are more than `max_sets` sets (the search
/// is exhaustive: C(steps - 1, count - 1) sets, each costing a few small solves and one steps^2 sum).
inline std::vector<ranked_full_steps> rank_full_steps(const trajectory_gram& g, int count, const forecast_steps_options& o, int keep,
                                                      std::size_t max_sets = 5'000'000) {
  const int steps = g.steps();
  if (count < 1 || count > steps) detail::fail("count: must lie in [1, steps = ", steps, "], got ", count);
  if (keep < 1) detail::fail("keep: must be >= 1, got ", keep);
  double sets = 1.0;  // C(steps - 1, count - 1)
  for (int i = 0; i < count - 1; ++i) sets = sets * (steps - 1 - i) / (i + 1);
  if (sets > static_cast<double>(max_sets))
    detail::fail("count: ", count, " full steps of ", steps, " make ", sets, " sets, more than max_sets = ", max_sets, " (the search is exhaustive)");
  std::vector<ranked_full_steps> best;
  std::vector<int> set(static_cast<std::size_t>(count));
  for (int i = 0; i < count; ++i) set[static_cast<std::size_t>(i)] = i;  // 0, 1, ..., count - 1: the first set
  const auto lower = [](const ranked_full_steps& a, const ranked_full_steps& b) { return a.error < b.error; };
  while (true) {
    const double e = forecast_error(g, set, o);
    if (static_cast<int>(best.size()) < keep || e < best.back().error) {
      ranked_full_steps r{set, e};
      best.insert(std::upper_bound(best.begin(), best.end(), r, lower), std::move(r));
      if (static_cast<int>(best.size()) > keep) best.pop_back();
    }
    // The next set in lexicographic order with set[0] = 0.
    int i = count - 1;
    while (i >= 1 && set[static_cast<std::size_t>(i)] == steps - count + i) --i;
    if (i < 1) break;
    ++set[static_cast<std::size_t>(i)];
    for (int j = i + 1; j < count; ++j) set[static_cast<std::size_t>(j)] = set[static_cast<std::size_t>(j - 1)] + 1;
  }
  return best;
}

/// Local search from `start` (a valid set, step 0 first) for counts too large to rank exhaustively: repeatedly moves
/// one full step (never step 0) to the free step within `reach` of it that lowers forecast_error most, until no move
/// lowers it. Returns the set reached and its error (a local minimum: never worse than `start`).
inline ranked_full_steps refine_full_steps(const trajectory_gram& g, std::vector<int> start, const forecast_steps_options& o, int reach = 3) {
  if (reach < 1) detail::fail("reach: must be >= 1, got ", reach);
  ranked_full_steps best{std::move(start), 0.0};
  best.error = forecast_error(g, best.full_steps, o);  // checks the set
  for (bool moved = true; moved;) {
    moved = false;
    ranked_full_steps step = best;
    for (std::size_t i = 1; i < best.full_steps.size(); ++i)
      for (int d = -reach; d <= reach; ++d) {
        const int to = best.full_steps[i] + d;
        if (d == 0 || to <= 0 || to >= g.steps() || std::find(best.full_steps.begin(), best.full_steps.end(), to) != best.full_steps.end()) continue;
        std::vector<int> set = best.full_steps;
        set[i] = to;
        std::sort(set.begin(), set.end());
        const double e = forecast_error(g, set, o);
        if (e < step.error) step = {std::move(set), e};
      }
    if (step.error < best.error) best = std::move(step), moved = true;
  }
  return best;
}

}  // namespace specdiff
