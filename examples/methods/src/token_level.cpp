// Token-level caching (SpecDiff, RAS): the computed image tokens run every block against cached K/V; the
// other tokens' model outputs come from the library's cache store. One runner, two policy sets.
#include <algorithm>
#include <array>
#include <cmath>
#include <stdexcept>
#include <limits>
#include <optional>
#include <utility>

#include <specdiff/specdiff.hpp>

#include "sd3/errors.hpp"
#include "methods/flops.hpp"
#include "methods/methods.hpp"

namespace methods {
namespace {

using specdiff::index_t;

// RAS's score as a plug-in scorer, in the log domain: log(metric · exp(scale · drop count)). The runner
// hands the metric as its logarithm, with scale · drop count already added when RAS's cumulative count is
// used (the accelerator's cache count restarts when a token is computed); `reset_scale` weighs the
// accelerator's count instead (the since_computed rule; 0 otherwise).
struct ras_scorer {
  static constexpr specdiff::signal needs = specdiff::signal::metric | specdiff::signal::cache_count;
  float reset_scale = 0.f;
  SPECDIFF_HD float score(const specdiff::token_signals& x) const { return x.metric + reset_scale * x.cache_count; }
};

// RAS's selection: of the k tokens to cache, the k·high_ratio highest-scored and the k·(1 - high_ratio)
// lowest-scored are cached (reused); the tokens in between are computed. |C1| stays ceil((1-CR)·N).
class ras_classifier {
 public:
  ras_classifier(double cache_rate, double high_ratio) : cache_rate_(cache_rate), high_ratio_(high_ratio) {
    specdiff::detail::expect_cache_rate(cache_rate);
    if (!(high_ratio >= 0.0 && high_ratio <= 1.0)) specdiff::detail::fail("high_ratio: must lie in [0, 1], got ", high_ratio);
  }
  void prepare(index_t tokens) { order_.reserve(static_cast<std::size_t>(tokens)); }
  index_t compute_count(index_t tokens) const { return specdiff::math::compute_count(cache_rate_, tokens); }
  void classify(std::span<const float> log_score, specdiff::token_plan& plan) {
    specdiff::rank_by_score(log_score, order_);
    const index_t n = plan.tokens();
    const index_t cached = n - compute_count(n);
    const auto high = static_cast<index_t>(std::floor(cached * high_ratio_));
    auto levels = plan.mutable_levels();
    for (index_t r = 0; r < n; ++r) {
      const bool reuse = r < high || r >= n - (cached - high);
      levels[static_cast<std::size_t>(order_[static_cast<std::size_t>(r)])] = reuse ? specdiff::level::reuse : specdiff::level::compute;
    }
    plan.commit_levels();
  }

 private:
  double cache_rate_, high_ratio_;
  std::vector<index_t> order_;
};
static_assert(specdiff::importance_scorer<ras_scorer> && specdiff::level_classifier<ras_classifier>);

// The shared loop. `after_step(acc, rows)` runs once the step's output rows are complete (RAS derives its
// metric there). The attention probe runs only when the scorer reads attention or a speculative pass
// records it. Everything is allocated before the clock starts.
template <class Accelerator, class AfterStep>
run_result run_token_level(const problem& p, Accelerator& acc, const std::optional<sd3::flow_match_euler>& speculative, bool context_queries,
                           AfterStep&& after_step, const progress_fn& progress, bool step_tags = false) {
  sd3::transformer& net = *p.net;
  const sd3::transformer& c = net;
  const int batch = model_batch(p), h = p.inputs.height, w = p.inputs.width, ctx = p.inputs.context_tokens;
  const int tokens = image_tokens(p), features = c.patch_features();
  constexpr bool probe_attention = specdiff::has(Accelerator::scorer_type::needs, specdiff::signal::attention);
  sd3::kv_cache kv(c, batch, tokens);
  std::vector<float> probe(probe_attention || speculative ? static_cast<std::size_t>(batch * tokens) : 0);
  std::vector<float> rows(static_cast<std::size_t>(batch * tokens * features)), compact(rows.size());
  const specdiff::matrix_view<float> row_view(rows.data(), batch * tokens, features);
  const std::span<const float> attention = probe_attention ? std::span<const float>(probe) : std::span<const float>();
  const sd3::flow_match_euler scheduler = p.schedule(p.steps);
  if (speculative) acc.begin_speculation(std::span<const float>(speculative->timesteps()));  // sizes the records
  run_result r;
  r.verified_errors.reserve(static_cast<std::size_t>(p.steps));
  const int spec_steps = speculative ? speculative->steps() : 0;
  const int total = spec_steps + p.steps;
  auto tick = [&] {
    ++r.model_calls;
    if (progress) progress(r.model_calls, total);
  };

  const auto start = std::chrono::steady_clock::now();
  if (speculative) {  // 1. the speculative pass: same noise and conditioning, every token computed
    r.speculative_latents = sd3::sample_cfg(net, *speculative, p.inputs, p.guidance, [&](const sd3::model_call& call) {
      sd3::forward_options options;
      options.attention_probe = probe;
      options.probe_context_queries = context_queries;
      net.forward(*call.inputs, call.velocity, options);
      {
        stopwatch::scope s(r.overhead_seconds);
        acc.record_speculation(call.step, probe);
      }
      r.flops += batch * full_forward_flops(c, tokens, ctx);
      tick();
    });
    r.speculative_seconds = seconds_since(start);
  }

  // 2. the main pass
  r.latents = sd3::sample_cfg(net, scheduler, p.inputs, p.guidance, [&](const sd3::model_call& call) {
    auto step = [&] {
      stopwatch::scope s(r.overhead_seconds);
      return acc.plan_step(call.step, step_tags ? static_cast<float>(p.steps - call.step) : call.timestep);
    }();
    const int computed = step.compute_count();
    sd3::forward_options options;
    options.kv = &kv;
    if (probe_attention) options.attention_probe = probe;
    options.probe_context_queries = context_queries;
    if (computed == 0) {  // no token: the network is skipped, every row comes from the cache
      stopwatch::scope s(r.overhead_seconds);
      acc.complete_step(std::move(step), specdiff::matrix_view<const float>(compact.data(), 0, features), row_view, attention);
    } else if (computed == tokens) {  // every token: the plain forward, so CR = 0 is bit-identical to full RFlow
      net.forward(*call.inputs, call.velocity, options);
      stopwatch::scope s(r.overhead_seconds);
      c.velocity_to_rows(batch, h, w, call.velocity, rows);
      acc.complete_step(std::move(step), row_view, attention);
    } else {
      options.image_tokens = step.compute_tokens();
      const std::span<float> out(compact.data(), static_cast<std::size_t>(batch * computed * features));
      net.forward(*call.inputs, out, options);
      stopwatch::scope s(r.overhead_seconds);
      acc.complete_step(std::move(step), specdiff::matrix_view<const float>(out.data(), batch * computed, features), row_view, attention);
    }
    {
      stopwatch::scope s(r.overhead_seconds);
      if (computed == tokens) ++r.dense_steps;
      else if (computed > 0) r.verified_errors.push_back(acc.feedback().last_error);  // no row computed: nothing verified
      after_step(acc, rows);
      c.rows_to_velocity(batch, h, w, rows, call.velocity);
    }
    if (computed > 0) r.flops += batch * subset_forward_flops(c, tokens, ctx, computed);
    tick();
  });
  r.seconds = seconds_since(start);
  return r;
}

/// run(approximator) with the approximator of a C3 rule (a learned one over the problem's main grid).
template <class Run>
run_result with_c3_rule(const problem& p, c3_rule rule, const specdiff::learned_table* learned, Run&& run) {
  switch (rule) {
    case c3_rule::latest: return run(specdiff::latest{});
    case c3_rule::linear: return run(specdiff::linear{});
    case c3_rule::foca: return run(specdiff::foca{});
    case c3_rule::learned: {
      if (learned == nullptr) throw std::invalid_argument("c3: 'learned' needs learned weights (a calibration: specdiff-calibrate)");
      const sd3::flow_match_euler main = p.schedule(p.steps);
      return run(learned->approximator<3>(std::span<const float>(main.timesteps())));
    }
    default: return run(specdiff::specdiff_weighted{});
  }
}

/// The method defaults are SD3's 28-step settings: reset steps past a shorter run are dropped.
std::vector<index_t> resets_within(const std::vector<int>& resets, int steps) {
  std::vector<index_t> kept;
  for (int r : resets)
    if (r < steps) kept.push_back(r);
  return kept;
}

}  // namespace

std::optional<sd3::flow_match_euler> speculative_pass(const problem& p, const specdiff_options& o) {
  if (o.spec_steps <= 0) return std::nullopt;
  if (o.spec_grid == specdiff::speculative_grid::sampler) return p.schedule(o.spec_steps);
  const sd3::flow_match_euler main = p.schedule(p.steps);
  const specdiff::step_schedule schedule{o.warmup_steps, o.refresh_interval, o.spec_steps, resets_within(o.reset_steps, p.steps)};
  return sd3::flow_match_euler::at_timesteps(specdiff::aligned_speculative_timesteps(std::span<const float>(main.timesteps()), o.spec_steps, schedule));
}

run_result run_specdiff(const problem& p, const specdiff_options& o, const progress_fn& progress) {
  const int tokens = image_tokens(p), batch = model_batch(p);
  const specdiff::accelerator_config config{.tokens = tokens, .batch = batch, .steps = p.steps, .feature_dim = p.net->patch_features(),
                                            .share_cfg_plan = o.share_cfg_plan && batch % 2 == 0 && p.guidance > 1.f};
  // One schedule type: SpecDiff's fixed dense steps, plus the error budget's (none when it is infinite).
  const specdiff::error_budget_schedule schedule{
      .fixed = {o.warmup_steps, o.refresh_interval, o.spec_steps, resets_within(o.reset_steps, p.steps)},
      .error_budget = static_cast<float>(o.error_budget),
      .max_partial_steps = o.max_partial_steps};
  const auto speculative = speculative_pass(p, o);
  // With no speculative pass the future factor is 1 (no_speculation): Score = his · star.
  auto run = [&](auto approximator) {
    auto with = [&](auto scorer, auto predictor, const std::optional<sd3::flow_match_euler>& pass) {
      const auto classifier = o.cache_rate_buckets.empty()
                                  ? specdiff::three_level_classifier(o.cache_rate, o.reuse_mass)
                                  : specdiff::three_level_classifier(o.cache_rate_buckets, o.bucket_error_step, o.reuse_mass);
      specdiff::accelerator acc(config, scorer, std::move(predictor), classifier, schedule, approximator);
      if (o.calibrate != nullptr) acc.calibrate(o.calibrate);
      return run_token_level(p, acc, pass, o.context_queries, [](auto&, const std::vector<float>&) {}, progress);
    };
    using rank = specdiff_options::ranking;
    // Round-robin reads nothing a speculative pass gives, so it runs none.
    if (o.rank == rank::round_robin) return with(specdiff::uniform_scorer{o.starvation_scale}, specdiff::no_speculation{}, std::nullopt);
    if (o.rank == rank::no_future || o.spec_steps <= 0) {
      // his·star: the pass still runs when spec_steps > 0 (equal FLOPs); its records are simply not read.
      if (o.spec_steps > 0) return with(specdiff::toca_scorer{o.starvation_scale}, specdiff::self_speculation{}, speculative);
      return with(specdiff::specdiff_scorer{o.starvation_scale}, specdiff::no_speculation{}, speculative);
    }
    return with(specdiff::specdiff_scorer{o.starvation_scale}, specdiff::self_speculation{}, speculative);
  };
  return with_c3_rule(p, o.c3, o.learned_weights, run);
}

specdiff_options specdiff_adaptive_defaults(double error_budget) {
  specdiff_options o;
  o.error_budget = error_budget;
  o.c3 = specdiff_options::c3_rule::specdiff;
  return o;
}

namespace {
specdiff::step_schedule forecast_schedule(const forecast_options& o, int steps) {
  if (o.interval < 1) throw std::invalid_argument(sd3::message("interval: must be >= 1, got ", o.interval));
  if (o.warmup_steps < 0) throw std::invalid_argument(sd3::message("warmup_steps: must be >= 0 (0: by the interval), got ", o.warmup_steps));
  if (!o.full_steps.empty()) {
    if (o.full_steps[0] != 0) throw std::invalid_argument(sd3::message("full_steps: must start with step 0, got ", o.full_steps[0]));
    for (std::size_t i = 0; i < o.full_steps.size(); ++i) {
      if (o.full_steps[i] < 0 || o.full_steps[i] >= steps)
        throw std::invalid_argument(sd3::message("full_steps: ", o.full_steps[i], " is out of range [0, ", steps, ") (the run's steps)"));
      if (i > 0 && o.full_steps[i] <= o.full_steps[i - 1])
        throw std::invalid_argument(sd3::message("full_steps: must strictly increase, got ", o.full_steps[i - 1], " then ", o.full_steps[i]));
    }
    return {1, 0, 0, std::vector<index_t>(o.full_steps.begin() + 1, o.full_steps.end())};
  }
  const int warmup = o.warmup();
  if (o.refresh == forecast_options::refresh_rule::library) return {warmup, o.interval, 0, {}};
  // diffusers' TaylorSeerCacheHook._measure_should_compute: full iff k < warm-up or (k - warm-up - 1) % N == 0.
  std::vector<index_t> full;
  for (int k = warmup + 1; k < steps; k += o.interval) full.push_back(k);
  return {warmup, 0, 0, std::move(full)};
}

// The Taylor rule of a forecast over step-index tags (diffusers' TaylorSeerCache divides its differences by the gap
// in forward calls): the accelerator is handed the tag steps - k, which falls by one per step.
bool forecast_on_steps(const forecast_options& o) {
  return (o.c3 == c3_rule::linear || o.c3 == c3_rule::foca) && o.variable == forecast_options::taylor_variable::step;
}

// The steps a forecast computes in full: step 0 (the accelerator's first step always computes) and the schedule's
// dense steps. Every reader of a forecast's schedule below goes through this mask.
std::vector<bool> full_step_mask(const specdiff::step_schedule& schedule, int steps) {
  std::vector<bool> full(static_cast<std::size_t>(steps));
  for (int k = 0; k < steps; ++k) full[static_cast<std::size_t>(k)] = k == 0 || schedule.is_dense(k, steps);
  return full;
}

// forecast_options::correct: at each full step the forecast steps since the previous one are re-estimated by
// interpolation through the newest three full outputs, and the latent moved by the difference (through the full
// step's own output). Its buffers are sized before the run: nothing is allocated per step.
class forecast_corrector {
 public:
  // full: the run's full_step_mask.
  forecast_corrector(const problem& p, std::vector<bool> full, std::size_t size, double weight) : weight_(weight), full_(std::move(full)) {
    const sd3::flow_match_euler main = p.schedule(p.steps);
    for (int k = 0; k < p.steps; ++k) {
      tag_.push_back(main.timesteps()[static_cast<std::size_t>(k)]);
      step_size_.push_back(static_cast<double>(main.sigmas()[static_cast<std::size_t>(k) + 1]) - main.sigmas()[static_cast<std::size_t>(k)]);
    }
    for (auto& f : ring_) f.assign(size, 0.f);
    forecast_sum_.assign(size, 0.0);
    pending_.reserve(static_cast<std::size_t>(p.steps));
  }
  // The step's output rows (after the forecast filled them): the next step in order.
  void after_step(std::vector<float>& rows) {
    const auto k = static_cast<std::size_t>(step_++);
    if (!full_[k]) {
      const double s = step_size_[k];
      for (std::size_t i = 0; i < rows.size(); ++i) forecast_sum_[i] += s * rows[i];
      pending_.push_back(k);
      return;
    }
    head_ = (head_ + 2) % 3;  // the newest full output goes first
    std::copy(rows.begin(), rows.end(), ring_[head_].begin());
    ring_tag_[head_] = tag_[k];
    count_ = std::min(count_ + 1, 3);
    if (pending_.empty()) return;
    float tags[3];
    for (int a = 0; a < count_; ++a) tags[a] = ring_tag_[(head_ + static_cast<std::size_t>(a)) % 3];
    double c[3] = {0.0, 0.0, 0.0};  // the interpolated outputs' sum, sum_k s_k w_a(k), per full output a
    for (std::size_t j : pending_) {
      float w[3];
      if (specdiff::math::polynomial_weights(tags, count_, tag_[j], w) != count_) throw std::logic_error("forecast_corrector: coincident timesteps");
      for (int a = 0; a < count_; ++a) c[a] += step_size_[j] * w[a];
    }
    const double inv = weight_ / step_size_[k];
    for (std::size_t i = 0; i < rows.size(); ++i) {
      double interpolated = 0.0;
      for (int a = 0; a < count_; ++a) interpolated += c[a] * ring_[(head_ + static_cast<std::size_t>(a)) % 3][i];
      rows[i] = static_cast<float>(rows[i] + (interpolated - forecast_sum_[i]) * inv);
    }
    std::fill(forecast_sum_.begin(), forecast_sum_.end(), 0.0);
    pending_.clear();
  }

 private:
  double weight_;
  std::vector<bool> full_;
  std::vector<float> tag_;
  std::vector<double> step_size_, forecast_sum_;
  std::array<std::vector<float>, 3> ring_;
  std::array<float, 3> ring_tag_{};
  std::size_t head_ = 0;
  int count_ = 0, step_ = 0;
  std::vector<std::size_t> pending_;
};

// The full steps of a full_step_mask, in order.
std::vector<int> full_step_list(const std::vector<bool>& mask) {
  std::vector<int> full;
  for (std::size_t k = 0; k < mask.size(); ++k)
    if (mask[k]) full.push_back(static_cast<int>(k));
  return full;
}

// Per sample vector (`length` floats of `rows`, block b), the projections TACache reads: |v|, p = <d, u>, and o = d - p u
// (written to `o`), with v the latest full output and d = v - the previous one; no previous: p = 0, o = 0.
struct tacache_projection {
  double norm = 0.0, parallel = 0.0;
};
tacache_projection tacache_project(const float* v, const float* previous, std::size_t length, float* o) {
  double vv = 0.0, dv = 0.0;
  for (std::size_t i = 0; i < length; ++i) {
    vv += static_cast<double>(v[i]) * v[i];
    if (previous != nullptr) dv += (static_cast<double>(v[i]) - previous[i]) * v[i];
  }
  tacache_projection r;
  r.norm = std::sqrt(vv);
  const double along = vv > 0.0 ? dv / vv : 0.0;  // d's coefficient on v
  r.parallel = along * r.norm;
  for (std::size_t i = 0; i < length; ++i)
    o[i] = previous == nullptr ? 0.f : static_cast<float>(static_cast<double>(v[i]) - previous[i] - along * v[i]);
  return r;
}

// TACache's forecast: keeps the last two full outputs and overwrites every forecast step's rows.
class tacache_filler {
 public:
  // is_full: the run's full_step_mask (the table's full_steps, checked equal by run_forecast).
  tacache_filler(const tacache_table& t, std::vector<bool> is_full, std::size_t blocks, std::size_t length)
      : t_(t), blocks_(blocks), length_(length), is_full_(std::move(is_full)) {
    for (auto& f : full_) f.assign(blocks * length, 0.f);
    o_.assign(length, 0.f);
  }
  void after_step(std::vector<float>& rows) {
    const auto k = static_cast<std::size_t>(step_++);
    if (is_full_[k]) {
      newest_ ^= 1;
      std::copy(rows.begin(), rows.end(), full_[newest_].begin());
      count_ = std::min(count_ + 1, 2);
      return;
    }
    const double alpha = t_.alpha[k], beta = t_.beta[k], gamma = t_.gamma[k];
    for (std::size_t b = 0; b < blocks_; ++b) {
      const float* v = full_[newest_].data() + b * length_;
      const float* previous = count_ > 1 ? full_[newest_ ^ 1].data() + b * length_ : nullptr;
      const auto pr = tacache_project(v, previous, length_, o_.data());
      const double scale = pr.norm > 0.0 ? alpha + beta * pr.parallel / pr.norm : alpha;  // along u, per unit of v
      float* out = rows.data() + b * length_;
      for (std::size_t i = 0; i < length_; ++i) out[i] = static_cast<float>(scale * v[i] + gamma * o_[i]);
    }
  }

 private:
  const tacache_table& t_;
  std::size_t blocks_, length_;
  std::array<std::vector<float>, 2> full_;
  std::vector<float> o_;
  std::vector<bool> is_full_;
  std::size_t newest_ = 1;
  int count_ = 0, step_ = 0;
};

void check_forecast_order(const forecast_options& o) {
  if (o.order < 1 || o.order > 2) throw std::invalid_argument(sd3::message("order: must be 1 or 2, got ", o.order));
  if (!(o.correct >= 0.0 && o.correct <= 1.0)) throw std::invalid_argument(sd3::message("correct: must lie in [0, 1], got ", o.correct));
}
}  // namespace

run_result run_forecast(const problem& p, const forecast_options& o, const progress_fn& progress) {
  const specdiff::accelerator_config config{.tokens = image_tokens(p), .batch = model_batch(p), .steps = p.steps, .feature_dim = p.net->patch_features()};
  const auto schedule = forecast_schedule(o, p.steps);
  const auto full = full_step_mask(schedule, p.steps);
  check_forecast_order(o);
  auto run = [&](auto approximator) {
    specdiff::accelerator acc(config, specdiff::uniform_scorer{}, specdiff::no_speculation{}, specdiff::all_approximate_classifier{}, schedule,
                              approximator);
    if (o.correct == 0.0 && o.tacache == nullptr)
      return run_token_level(p, acc, std::nullopt, false, [](auto&, const std::vector<float>&) {}, progress, forecast_on_steps(o));
    const std::size_t length = static_cast<std::size_t>(config.tokens) * static_cast<std::size_t>(config.feature_dim);
    std::optional<forecast_corrector> corrector;
    if (o.correct > 0.0) corrector.emplace(p, full, static_cast<std::size_t>(config.batch) * length, o.correct);
    std::optional<tacache_filler> filler;
    if (o.tacache != nullptr) filler.emplace(*o.tacache, full, static_cast<std::size_t>(config.batch), length);
    return run_token_level(p, acc, std::nullopt, false,
                           [&](auto&, std::vector<float>& rows) {
                             if (filler) filler->after_step(rows);
                             if (corrector) corrector->after_step(rows);
                           },
                           progress, forecast_on_steps(o));
  };
  // Order 1 over either variable is linear extrapolation through the last two full steps; order 2 is TaylorSeer's
  // recursive divided differences (every cached full step starts a difference, as diffusers' hook forms them).
  if (o.tacache != nullptr) {
    const auto& t = *o.tacache;
    if (t.full_steps != full_step_list(full))
      throw std::invalid_argument("tacache: the table was fitted for other full steps than this schedule's (calibrate_tacache with these options)");
    if (t.alpha.size() != static_cast<std::size_t>(p.steps) || t.beta.size() != t.alpha.size() || t.gamma.size() != t.alpha.size())
      throw std::invalid_argument(sd3::message("tacache: the table holds ", t.alpha.size(), " steps, the run has ", p.steps));
    return run(specdiff::latest{});  // every forecast row is overwritten by the filler
  }
  if (o.c3 == c3_rule::linear && o.order == 2) return run(specdiff::taylorseer<2>{});
  if (o.c3 == c3_rule::learned && o.learned_weights != nullptr) {
    // A table holds weights for the steps its calibration forecast: a step this schedule forecasts without them
    // would silently reuse the latest output, so a table fitted for another warm-up or interval is refused.
    const auto& table = *o.learned_weights;
    int cached = 0;
    for (int k = 0; k < p.steps && k < table.steps(); ++k) {
      if (full[static_cast<std::size_t>(k)]) {
        ++cached;
        continue;
      }
      const int n = std::min(cached, table.depth());
      if (std::isnan(table.weights(k, n)[0]))
        throw std::invalid_argument(sd3::message("learned weights: step ", k, " has none for a history of ", n, " full steps; they were fitted for ",
                                                 "another schedule than ",
                                                 o.full_steps.empty() ? sd3::message("warm-up ", o.warmup(), ", interval ", o.interval)
                                                                      : sd3::message("these ", o.full_steps.size(), " full steps"),
                                                 " (specdiff-calibrate --method forecast)"));
    }
  }
  return with_c3_rule(p, o.c3, o.learned_weights, run);
}

run_result calibrate_forecast(const problem& p, const forecast_options& o, specdiff::history_fit& fit, const progress_fn& progress) {
  using target = forecast_options::fit_target;
  const auto full_steps = full_step_mask(forecast_schedule(o, p.steps), p.steps);
  const sd3::transformer& c = *p.net;
  const int batch = model_batch(p), tokens = image_tokens(p), features = c.patch_features(), rows = batch * tokens;
  const sd3::flow_match_euler main = p.schedule(p.steps);
  if (fit.timesteps().size() != main.timesteps().size() || !std::equal(fit.timesteps().begin(), fit.timesteps().end(), main.timesteps().begin()))
    throw std::invalid_argument("fit: its timesteps are not this problem's main grid");
  // The guided output needs the CFG pair: [uncond; cond] halves of the model batch.
  const bool guided = o.fit_on == target::guided && batch == 2 * p.inputs.batch && p.guidance > 1.f;
  const int fit_rows = guided ? p.inputs.batch * tokens : rows;
  const bool on_forecast = o.trajectory == forecast_options::fit_trajectory::forecast;
  specdiff::host_cache_store<float> store({.layers = 1, .sites = 1, .tokens = fit_rows, .dim = features, .history_depth = fit.depth()});
  // The forecast trajectory's own history (every row of the batch), tagged as its approximator reads them.
  std::optional<specdiff::host_cache_store<float>> trajectory;
  if (on_forecast) trajectory.emplace(specdiff::cache_shape{1, 1, rows, features, 3});
  const specdiff::learned_table* table = o.learned_weights;
  std::optional<specdiff::learned<3>> learned_rule;
  if (table != nullptr) learned_rule.emplace(table->approximator<3>(std::span<const float>(main.timesteps())));
  std::vector<float> out(static_cast<std::size_t>(rows * features)), target_rows(static_cast<std::size_t>(fit_rows * features));
  std::vector<specdiff::index_t> all(static_cast<std::size_t>(rows));
  for (int i = 0; i < rows; ++i) all[static_cast<std::size_t>(i)] = i;
  const std::span<const specdiff::index_t> fit_all(all.data(), static_cast<std::size_t>(fit_rows));
  const specdiff::matrix_view<const float> view(out.data(), rows, features), fit_view(guided ? target_rows.data() : out.data(), fit_rows, features);
  run_result r;
  const auto start = std::chrono::steady_clock::now();
  r.latents = sd3::sample_cfg(*p.net, main, p.inputs, p.guidance, [&](const sd3::model_call& call) {
    p.net->forward(*call.inputs, call.velocity, {});
    c.velocity_to_rows(batch, p.inputs.height, p.inputs.width, call.velocity, out);
    if (guided) {  // v_u + g (v_c - v_u), as sample_cfg combines the halves
      const std::size_t half = static_cast<std::size_t>(fit_rows * features);
      for (std::size_t i = 0; i < half; ++i) target_rows[i] = out[i] + p.guidance * (out[half + i] - out[i]);
    }
    const bool full = full_steps[static_cast<std::size_t>(call.step)];
    const float step_tag = static_cast<float>(p.steps - call.step);
    if (full) {
      store.write(0, 0, call.timestep, fit_view);
      if (trajectory) trajectory->write(0, 0, table != nullptr ? call.timestep : step_tag, view);
    } else {
      fit.add(store, 0, 0, call.step, fit_all, fit_view, fit_all);
      if (trajectory) {  // the trajectory moves on with the forecast, not with the true output
        const specdiff::matrix_view<float> forecast(out.data(), rows, features);
        if (learned_rule) trajectory->fill(0, 0, call.timestep, all, *learned_rule, forecast);
        else trajectory->fill(0, 0, step_tag, all, specdiff::linear{}, forecast);
        c.rows_to_velocity(batch, p.inputs.height, p.inputs.width, out, call.velocity);
      }
    }
    r.flops += batch * full_forward_flops(c, tokens, p.inputs.context_tokens);
    ++r.model_calls;
    if (progress) progress(r.model_calls, p.steps);
  });
  r.seconds = seconds_since(start);
  return r;
}

run_result calibrate_tacache(const problem& p, const forecast_options& o, tacache_table& out, const progress_fn& progress) {
  const std::vector<bool> is_full = full_step_mask(forecast_schedule(o, p.steps), p.steps);
  const sd3::transformer& c = *p.net;
  const int batch = model_batch(p), tokens = image_tokens(p), features = c.patch_features();
  const std::size_t length = static_cast<std::size_t>(tokens) * static_cast<std::size_t>(features), blocks = static_cast<std::size_t>(batch);
  const auto steps = static_cast<std::size_t>(p.steps);
  out.full_steps = full_step_list(is_full);
  // Per step: the normal equations of y = alpha |v| + beta p (y = <v_k, u>), and <v_k, o>, <o, o>.
  struct sums {
    double nn = 0, np = 0, pp = 0, ny = 0, py = 0, ko = 0, oo = 0;
  };
  std::vector<sums> acc(steps);
  std::vector<float> out_rows(blocks * length), latest(out_rows.size()), previous(out_rows.size()), o_buf(length);
  int full_seen = 0;
  run_result r;
  const auto start = std::chrono::steady_clock::now();
  r.latents = sd3::sample_cfg(*p.net, p.schedule(p.steps), p.inputs, p.guidance, [&](const sd3::model_call& call) {
    p.net->forward(*call.inputs, call.velocity, {});
    c.velocity_to_rows(batch, p.inputs.height, p.inputs.width, call.velocity, out_rows);
    const auto k = static_cast<std::size_t>(call.step);
    if (is_full[k]) {
      std::swap(latest, previous);
      std::copy(out_rows.begin(), out_rows.end(), latest.begin());
      ++full_seen;
    } else {
      for (std::size_t b = 0; b < blocks; ++b) {
        const float* v = latest.data() + b * length;
        const auto pr = tacache_project(v, full_seen > 1 ? previous.data() + b * length : nullptr, length, o_buf.data());
        const float* y = out_rows.data() + b * length;
        double yv = 0, yo = 0, oo = 0;
        for (std::size_t i = 0; i < length; ++i) {
          yv += static_cast<double>(y[i]) * v[i];
          yo += static_cast<double>(y[i]) * o_buf[i];
          oo += static_cast<double>(o_buf[i]) * o_buf[i];
        }
        const double along = pr.norm > 0.0 ? yv / pr.norm : 0.0;
        auto& s = acc[k];
        s.nn += pr.norm * pr.norm, s.np += pr.norm * pr.parallel, s.pp += pr.parallel * pr.parallel;
        s.ny += pr.norm * along, s.py += pr.parallel * along, s.ko += yo, s.oo += oo;
      }
    }
    r.flops += batch * full_forward_flops(c, tokens, p.inputs.context_tokens);
    ++r.model_calls;
    if (progress) progress(r.model_calls, p.steps);
  });
  const double nan = std::numeric_limits<double>::quiet_NaN();
  out.alpha.assign(steps, nan), out.beta.assign(steps, nan), out.gamma.assign(steps, nan);
  for (std::size_t k = 0; k < steps; ++k) {
    if (is_full[k]) continue;
    const auto& s = acc[k];
    // A ridge of 1e-9 of the diagonal's scale keeps the 2 x 2 solve defined when p is ~0 (no previous full step).
    const double ridge = 1e-9 * (s.nn + s.pp), a = s.nn + ridge, b = s.np, d = s.pp + ridge, det = a * d - b * b;
    if (s.pp <= 0.0 || !(det > 0.0)) {
      out.alpha[k] = s.nn > 0.0 ? s.ny / s.nn : 1.0, out.beta[k] = 0.0;
    } else {
      out.alpha[k] = (d * s.ny - b * s.py) / det, out.beta[k] = (a * s.py - b * s.ny) / det;
    }
    out.gamma[k] = s.oo > 0.0 ? s.ko / s.oo : 0.0;
  }
  out.vectors = batch;
  r.seconds = seconds_since(start);
  return r;
}

run_result forecast_gram(const problem& p, specdiff::trajectory_gram& gram, std::vector<double>& step_weight, const progress_fn& progress) {
  const sd3::transformer& c = *p.net;
  const sd3::flow_match_euler main = p.schedule(p.steps);
  if (gram.steps() != p.steps) throw std::invalid_argument(sd3::message("gram: holds ", gram.steps(), " steps, the problem runs ", p.steps));
  const int batch = model_batch(p);
  const bool cfg = batch == 2 * p.inputs.batch && p.guidance > 1.f;
  const std::size_t per_step = static_cast<std::size_t>(batch) * static_cast<std::size_t>(image_tokens(p)) * static_cast<std::size_t>(c.patch_features());
  const std::size_t guided_size = cfg ? per_step / 2 : per_step;
  std::vector<float> fit(per_step * static_cast<std::size_t>(p.steps)), guided(guided_size * static_cast<std::size_t>(p.steps));
  step_weight.assign(static_cast<std::size_t>(p.steps), 0.0);
  run_result r;
  const auto start = std::chrono::steady_clock::now();
  r.latents = sd3::sample_cfg(*p.net, main, p.inputs, p.guidance, [&](const sd3::model_call& call) {
    p.net->forward(*call.inputs, call.velocity, {});
    // Inner products do not depend on the order of the values: the velocity's layout serves as well as the rows'.
    const std::size_t k = static_cast<std::size_t>(call.step);
    std::copy(call.velocity.begin(), call.velocity.end(), fit.begin() + static_cast<std::ptrdiff_t>(k * per_step));
    float* g = guided.data() + k * guided_size;
    for (std::size_t i = 0; i < guided_size; ++i)
      g[i] = cfg ? call.velocity[i] + p.guidance * (call.velocity[guided_size + i] - call.velocity[i]) : call.velocity[i];  // as sample_cfg
    step_weight[k] = static_cast<double>(call.sigma_next) - static_cast<double>(call.sigma);
    r.flops += batch * full_forward_flops(c, image_tokens(p), p.inputs.context_tokens);
    ++r.model_calls;
    if (progress) progress(r.model_calls, p.steps);
  });
  gram.add(fit, guided);
  r.seconds = seconds_since(start);
  return r;
}

run_result run_ras(const problem& p, const ras_options& o, const progress_fn& progress) {
  using input = ras_options::metric_input;
  using count_rule = ras_options::drop_count_rule;
  const int tokens = image_tokens(p), batch = model_batch(p);
  const sd3::transformer& c = *p.net;
  const bool cfg = batch % 2 == 0 && p.guidance > 1.f;
  // RAS selects on the guided output, so both CFG halves share one plan.
  const specdiff::accelerator_config config{.tokens = tokens, .batch = batch, .steps = p.steps, .feature_dim = c.patch_features(),
                                            .share_cfg_plan = cfg};
  const specdiff::step_schedule schedule{o.warmup_steps, 0, 0, resets_within(o.reset_steps, p.steps)};
  const bool cumulative = o.drop_count == count_rule::cumulative;
  specdiff::accelerator acc(config, ras_scorer{cumulative ? 0.f : o.starvation_scale}, specdiff::no_speculation{},
                            ras_classifier(o.cache_rate, o.high_ratio), schedule, specdiff::latest{});
  // Per token: the mean over the patch's pixels of the L2 norm of the velocity across channels (RAS's
  // `l2norm` metric; its default channel std is 0 for a one-channel model), on the guided velocity
  // v_u + g (v_c - v_u) as RAS's scheduler step receives it (ras_scheduling_flow_match_euler_discrete.py,
  // lines 201 and 105-108), or averaged over the two halves (halves_mean). RAS's common factor
  // (sigma_next - sigma) drops out of the ranking. drop_count: RAS adds one each time a token is cached and
  // never resets it within an image (same file, lines 93, 113 and 121).
  // An SD3 row is (pixel, channel); a FLUX row is a packed 2 x 2 patch with the channels outermost, a layout RAS (SD3
  // and Lumina only) never saw: its norm is taken over the whole row.
  const int channels = c.arch() == sd3::architecture::flux ? c.patch_features() : c.config().out_channels;
  const int pixels = c.patch_features() / channels;
  const int plans = static_cast<int>(config.plans());
  std::vector<float> metric(static_cast<std::size_t>(batch * tokens)), drop(static_cast<std::size_t>(plans * tokens), 0.f);
  auto patch_norm = [&](auto&& value) {  // value(px, ch) -> the velocity there
    double sum = 0;
    for (int px = 0; px < pixels; ++px) {
      double sq = 0;
      for (int ch = 0; ch < channels; ++ch) {
        const double v = value(px, ch);
        sq += v * v;
      }
      sum += std::sqrt(sq);
    }
    return static_cast<float>(sum / pixels);
  };
  auto after_step = [&](auto& a, const std::vector<float>& rows) {
    const std::size_t half = static_cast<std::size_t>(plans) * static_cast<std::size_t>(tokens);
    auto row = [&](std::size_t sample_token) { return rows.data() + sample_token * static_cast<std::size_t>(pixels * channels); };
    for (int plan = 0; plan < plans; ++plan) {
      const auto counts = a.cache_counts(plan);  // >= 1: cached in the step just done
      for (int token = 0; token < tokens; ++token) {
        const std::size_t t = static_cast<std::size_t>(plan) * static_cast<std::size_t>(tokens) + static_cast<std::size_t>(token);
        float m = 0.f;
        if (!cfg) {
          m = patch_norm([&](int px, int ch) { return row(t)[px * channels + ch]; });
        } else if (o.metric_on == input::guided) {
          const float *u = row(t), *v = row(t + half);
          m = patch_norm([&](int px, int ch) {
            const int k = px * channels + ch;
            return u[k] + p.guidance * (v[k] - u[k]);  // as sample_cfg combines them
          });
        } else {
          const float mu = patch_norm([&](int px, int ch) { return row(t)[px * channels + ch]; });
          const float mc = patch_norm([&](int px, int ch) { return row(t + half)[px * channels + ch]; });
          m = 0.5f * (mu + mc);
        }
        if (cumulative && counts[static_cast<std::size_t>(token)] > 0.f) drop[t] += 1.f;
        metric[t] = specdiff::math::safe_log(m) + (cumulative ? o.starvation_scale * drop[t] : 0.f);
        if (cfg) metric[t + half] = metric[t];  // both halves of the shared plan
      }
    }
    a.set_metric(metric);
  };
  return run_token_level(p, acc, std::nullopt, false, after_step, progress);
}

}  // namespace methods
