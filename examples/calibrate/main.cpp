// specdiff-calibrate: the learned C3 rule's weights for a model folder, by self-calibration. It runs the method
// the weights are for (SpecDiff-adaptive by default) on calibration samples — drawn from the calibration noise
// domain (quality::noise_domain::calibration: Philox streams no evaluation ever draws, for every seed) — with specdiff::history_fit attached to the accelerator: every partial step
// adds its computed rows and their histories, and a least-squares solve per (main step, history length) gives
// the weights (specdiff/learned.hpp). Writes MODEL/learned_c3.json unless told otherwise; prints the seconds.
#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <limits>
#include <optional>
#include <nlohmann/json.hpp>

#include "demo/support.hpp"
#include "quality/cli.hpp"
#include "quality/noise.hpp"
#include "quality/options.hpp"
#include "sd3/errors.hpp"
#include "sd3/files.hpp"
#include "sd3/transformer.hpp"
#include "sd3/workers.hpp"

namespace {

// --full-steps: one full RFlow run per calibration batch gives every step's output; the inner products of every pair
// (specdiff::trajectory_gram) rank every set of `count` full steps by the teacher-forced forecast's first-order error
// in the final latent; the best `verify` sets then run the learned forecast on the same calibration samples, and the
// best mean PSNR against the full run's images wins. Only calibration noise is read.
int calibrate_full_steps(const demo::workload& work, int count, int verify, double ridge, std::uint64_t seed, int samples, int threads,
                         const std::filesystem::path& out_path, std::chrono::steady_clock::time_point start) {
  const auto& problem = work.problem;
  const sd3::flow_match_euler main = problem.schedule(problem.steps);
  specdiff::trajectory_gram gram(problem.steps);
  specdiff::forecast_steps_options options{.depth = 3, .ridge = ridge};
  const auto full = methods::forecast_gram(problem, gram, options.step_weight);
  // The even schedules of the same count (the forecast's own rule, warm-up by the interval, 2 or 3), and a spread one.
  std::vector<std::vector<int>> evens;
  for (int n = 2; n <= problem.steps; ++n)
    for (int w : {0, 2, 3}) {
      methods::forecast_options even;
      even.interval = n, even.warmup_steps = w;
      std::vector<int> list;
      for (int k = 0; k < problem.steps; ++k)
        if (k < even.warmup() || (k - even.warmup() + 1) % n == 0) list.push_back(k);
      if (static_cast<int>(list.size()) == count && std::find(evens.begin(), evens.end(), list) == evens.end()) evens.push_back(list);
    }
  if (evens.empty()) {
    std::vector<int> list;
    for (int i = 0; i < count; ++i) list.push_back(static_cast<int>(static_cast<long long>(i) * problem.steps / count));
    evens.push_back(list);
  }
  double sets = 1.0;  // C(steps - 1, count - 1): rank them all when there are few enough, else search locally from the even ones
  for (int i = 0; i < count - 1; ++i) sets = sets * (problem.steps - 1 - i) / (i + 1);
  constexpr std::size_t max_sets = 5'000'000;
  std::vector<specdiff::ranked_full_steps> ranked;
  if (sets <= static_cast<double>(max_sets)) {
    ranked = specdiff::rank_full_steps(gram, count, options, verify, max_sets);
  } else {
    std::printf("%.3g sets of %d full steps: a local search from each even schedule instead of ranking them all\n", sets, count);
    for (const auto& even : evens) {
      auto r = specdiff::refine_full_steps(gram, even, options);
      if (std::none_of(ranked.begin(), ranked.end(), [&](const auto& x) { return x.full_steps == r.full_steps; })) ranked.push_back(std::move(r));
    }
  }
  // The even schedules run too, as the reference.
  for (const auto& list : evens)
    if (std::none_of(ranked.begin(), ranked.end(), [&](const auto& r) { return r.full_steps == list; }))
      ranked.push_back({list, specdiff::forecast_error(gram, list, options)});
  const double search_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::printf("searched the sets of %d full steps of %d in %.1f s; %zu run on the calibration samples:\n", count, problem.steps, search_seconds,
              ranked.size());
  std::optional<specdiff::learned_table> best_table;
  std::vector<int> best_steps;
  double best_psnr = -std::numeric_limits<double>::infinity(), best_error = 0.0;
  nlohmann::json candidates = nlohmann::json::array();
  for (const auto& r : ranked) {
    auto table = specdiff::forecast_table(gram, std::span<const float>(main.timesteps()), r.full_steps, options);
    methods::forecast_options o;
    o.c3 = methods::c3_rule::learned;
    o.learned_weights = &table;
    o.full_steps = r.full_steps;
    const auto run = methods::run_forecast(problem, o);
    const auto q = demo::evaluate(work.model, work.batch, full.latents, run.latents);
    const double psnr = q.psnr_db.value_or(std::numeric_limits<double>::infinity());
    std::string list;
    for (int k : r.full_steps) list += sd3::message(list.empty() ? "" : ",", k);
    std::printf("  steps %s: forecast error %.3e, PSNR %.2f dB, class acc %.3f\n", list.c_str(), r.error, psnr, q.class_acc);
    candidates.push_back({{"full_steps", r.full_steps}, {"forecast_error", r.error}, {"psnr_db", demo::json_number(psnr)}});
    if (psnr > best_psnr) best_psnr = psnr, best_steps = r.full_steps, best_error = r.error, best_table = std::move(table);
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  const nlohmann::json calibration{{"tool", "specdiff-calibrate"}, {"method", sd3::message("forecast, ", count, " full steps placed by rank_full_steps")},
                                   {"full_steps", best_steps}, {"forecast_error", best_error}, {"calibration_psnr_db", demo::json_number(best_psnr)},
                                   {"candidates", candidates}, {"fit_on", "halves"}, {"trajectory", "full"}, {"depth", options.depth},
                                   {"samples", samples}, {"seed", seed}, {"noise", quality::noise_domain_name(quality::noise_domain::calibration)},
                                   {"noise_stream_tag", quality::calibration_stream_tag}, {"steps", problem.steps}, {"cfg", problem.guidance},
                                   {"ridge", ridge}, {"seconds", seconds}, {"threads", threads}};
  sd3::write_file(out_path, methods::learned_c3_json(*best_table, calibration.dump()), "--out");
  std::printf("chose full steps %s (calibration PSNR %.2f dB) in %.1f s\nwrote %s\n", calibration["full_steps"].dump().c_str(), best_psnr, seconds,
              out_path.string().c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Fits a model's learned C3 weights (learned_c3.json) from calibration runs of SpecDiff's own schedule"};
  using quality::cli::checked;
  using quality::cli::integer_in;
  using quality::cli::real_in;
  std::string model_dir = demo::default_model_dir().string(), out, method = "specdiff-adaptive", seed_text = "1000";
  int samples = 8, steps = 28, interval = 3, threads = std::min(sd3::usable_cores(), sd3::max_threads), min_pairs = 16;
  double error_budget = 0.05, ridge = 1e-3, cache_rate = 0.9;
  app.add_option("--model", model_dir, "model folder")->capture_default_str();
  app.add_option("--out", out, "output file (default: MODEL/learned_c3.json)");
  app.add_option("--method", method, "the method the weights are for: specdiff-adaptive or specdiff")->capture_default_str()
      ->check(CLI::IsMember({"specdiff-adaptive", "specdiff", "forecast"}));
  app.add_option("--interval", interval, "forecast: the full-step interval N the weights are for")->capture_default_str()
      ->check(integer_in(1, demo::max_forecast_interval));
  app.add_option("--error-budget", error_budget, "specdiff-adaptive's budget during calibration")->capture_default_str()->check(real_in(0.0, 1000.0));
  app.add_option("--cache-rate", cache_rate, "cache rate during calibration")->capture_default_str()
      ->check(real_in(0.0, 1.0, quality::interval::open_above));
  app.add_option("--samples", samples, "calibration samples (class i % 10)")->capture_default_str()->check(integer_in(1, 4096));
  app.add_option("--seed", seed_text, "noise seed of the calibration samples (drawn from the calibration key space: never an evaluation's noise, whatever the seed)")->capture_default_str()
      ->check(checked([](const std::string& t) { return quality::check_seed(t); }, "UINT64"));
  app.add_option("--steps", steps, "sampling steps (the weights hold for this step count only)")->capture_default_str()->check(integer_in(1, 1000));
  app.add_option("--ridge", ridge, "ridge toward reusing the latest row, relative to the mean Gram diagonal")->capture_default_str()
      ->check(real_in(0.0, 1e6));
  app.add_option("--min-pairs", min_pairs, "a (step, history length) with fewer pairs stays unfitted (reuses the latest row)")
      ->capture_default_str()->check(integer_in(1, 1 << 30));
  std::string fit_on = "halves", trajectory = "full", start_weights, refresh = "library";
  int warmup = methods::forecast_options{}.warmup_steps;
  app.add_option("--warmup", warmup, "forecast: the full warm-up steps the weights are for (0: the forecast's default for the interval)")
      ->capture_default_str()->check(integer_in(0, 1000));
  app.add_option("--refresh", refresh, "forecast: the refresh rule after the warm-up the weights are for (methods::forecast_options)")
      ->capture_default_str()->check(CLI::IsMember({"library", "diffusers"}));
  app.add_option("--fit-on", fit_on, "forecast: fit on the CFG-guided output (what the sampler steps with) or on both halves' rows")
      ->capture_default_str()->check(CLI::IsMember({"guided", "halves"}));
  app.add_option("--trajectory", trajectory, "forecast: pairs on the full-compute trajectory (teacher forcing) or on the forecast's own")
      ->capture_default_str()->check(CLI::IsMember({"full", "forecast"}));
  app.add_option("--start-weights", start_weights,
                 "forecast --trajectory forecast: the learned file whose forecast the trajectory follows (default: the Taylor rule)");
  int full_steps = 0, verify = 8;
  app.add_option("--full-steps", full_steps,
                 "forecast: place this many full steps where they forecast best (specdiff::rank_full_steps over every set holding step 0, on the "
                 "calibration runs' outputs; the best --verify sets run the forecast and the best final PSNR against full RFlow wins); "
                 "writes MODEL/learned_forecast_F<count>.json with the steps (0: the interval's even steps)")
      ->capture_default_str()->check(integer_in(0, 1000));
  app.add_option("--verify", verify, "forecast --full-steps: how many of the best-ranked sets run the forecast on the calibration samples")
      ->capture_default_str()->check(integer_in(1, 1000));
  app.add_option("--threads", threads, "threads")->capture_default_str()->check(integer_in(1, sd3::max_threads));
  CLI11_PARSE(app, argc, argv);
  try {
    const bool forecast = method == "forecast";
    if (full_steps > 0 && !forecast) throw std::invalid_argument(sd3::message("--full-steps: only for --method forecast, got --method ", method));
    if (full_steps > steps) throw std::invalid_argument(sd3::message("--full-steps: ", full_steps, " is more than --steps ", steps));
    const auto out_path = !out.empty() ? std::filesystem::path(out)
                          : std::filesystem::path(model_dir) / (full_steps > 0 ? methods::learned_forecast_steps_file_name(full_steps)
                                                                : forecast       ? methods::learned_forecast_file_name(interval)
                                                                                 : methods::learned_c3_file_name);
    // Checked before the calibration runs: the output is writable and is none of the model's files but the
    // learned ones it is meant to replace.
    sd3::file_plan plan;
    plan.output(out_path, "--out");
    if (std::filesystem::is_directory(model_dir))
      for (const auto& entry : std::filesystem::directory_iterator(model_dir))
        if (!entry.path().filename().string().starts_with("learned_")) plan.input(entry.path(), "--model");
    plan.check();
    const std::uint64_t seed = quality::parse_seed(seed_text);
    const auto work = demo::make_workload(model_dir, samples, seed, steps, std::nullopt, threads, quality::noise_domain::calibration);
    const auto& problem = work->problem;
    const auto start = std::chrono::steady_clock::now();
    const sd3::flow_match_euler main = problem.schedule(problem.steps);
    specdiff::history_fit fit(std::span<const float>(main.timesteps()), 3);
    // SpecDiff: self-calibration under SpecDiff's C3 rule (the fit sees the computed rows' histories, which do not
    // depend on the rule; the rule only shifts the trajectory slightly). The forecast: full trajectories.
    const demo::method_spec spec =
        forecast ? demo::method_spec{.name = method, .interval = interval, .warmup = warmup, .refresh = refresh, .c3 = "taylor"}
                 : demo::method_spec{.name = method, .cache_rate = cache_rate,
                                     .error_budget = method == "specdiff-adaptive" ? std::optional(error_budget) : std::nullopt};
    if (full_steps > 0) return calibrate_full_steps(*work, full_steps, verify, ridge, seed, samples, threads, out_path, start);
    methods::run_result run;
    if (forecast) {
      auto options = demo::forecast_options_of(spec);
      options.fit_on = fit_on == "guided" ? methods::forecast_options::fit_target::guided : methods::forecast_options::fit_target::halves;
      options.trajectory = trajectory == "forecast" ? methods::forecast_options::fit_trajectory::forecast : methods::forecast_options::fit_trajectory::full;
      std::optional<specdiff::learned_table> start;
      if (!start_weights.empty()) {
        start = methods::load_learned_c3(start_weights);
        if (!start) throw std::invalid_argument(sd3::message("--start-weights: ", start_weights, " does not exist"));
        options.learned_weights = &*start;
      }
      run = methods::calibrate_forecast(problem, options, fit);
    } else {
      auto options = demo::specdiff_options_of(spec);
      options.calibrate = &fit;
      run = methods::run_specdiff(problem, options);
    }
    const auto table = fit.solve(ridge, static_cast<std::size_t>(min_pairs));
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    std::size_t fitted = 0, pairs = 0;
    for (int k = 0; k < table.steps(); ++k)
      for (int n = 1; n <= table.depth(); ++n) {
        fitted += !std::isnan(table.weights(k, n)[0]);
        pairs += fit.pairs(k, n);
      }
    const nlohmann::json calibration{{"tool", "specdiff-calibrate"}, {"method", forecast ? sd3::message("forecast N=", interval, " W=", demo::forecast_options_of(spec).warmup(), " refresh=", refresh, ", fit on ", fit_on, ", ", trajectory, " trajectory") : spec.describe()},
                                     {"warmup", forecast ? nlohmann::json(demo::forecast_options_of(spec).warmup()) : nlohmann::json(nullptr)},
                                     {"refresh", forecast ? nlohmann::json(refresh) : nlohmann::json(nullptr)}, {"samples", samples}, {"seed", seed},
                                     {"noise", quality::noise_domain_name(quality::noise_domain::calibration)},
                                     {"noise_stream_tag", quality::calibration_stream_tag},
                                     {"steps", steps}, {"cfg", problem.guidance}, {"ridge", ridge}, {"min_pairs", min_pairs},
                                     {"pairs", pairs}, {"fitted", fitted}, {"dense_steps", run.dense_steps}, {"seconds", seconds},
                                     {"threads", threads}};
    sd3::write_file(out_path, methods::learned_c3_json(table, calibration.dump()), "--out");
    std::printf("calibrated %s: %zu (step, length) cells of %d fitted from %zu pairs (%d samples, seed %llu, %s) in %.1f s\nwrote %s\n",
                model_dir.c_str(), fitted, table.steps() * table.depth(), pairs, samples, static_cast<unsigned long long>(seed),
                (forecast ? sd3::message("forecast N=", interval) : spec.describe()).c_str(), seconds, out_path.string().c_str());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "specdiff-calibrate: %s\n", e.what());
    return 1;
  }
  return 0;
}
