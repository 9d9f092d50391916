// specdiff-pareto: sweeps each method's parameters on one batch of samples and writes results.csv,
// results.json and pareto.svg (speedup against PSNR and against class accuracy).
//
// Timing (demo/timing.hpp, the demo's protocol): full RFlow runs once untimed first (the process's warm-up and
// the quality reference: sampling is deterministic); then each setting gets an untimed warm-up run and
// `--repeats` timed pairs with full RFlow, alternating which runs first, and its speedup is median(full) /
// median(setting) with the range of the per-pair ratios. Full RFlow's row reports the median and range of all
// its timed runs. FD (the Fréchet distance of the classifier features to the model's held-out real digits) is
// in every row; full RFlow's is the baseline, and it is only comparable between runs of the same --samples.
#include <CLI/CLI.hpp>
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <sstream>
#include <thread>

#include "demo/support.hpp"
#include "demo/timing.hpp"
#include "quality/cli.hpp"
#include "quality/options.hpp"
#include "sd3/errors.hpp"
#include "sd3/files.hpp"
#include "sd3/transformer.hpp"

namespace {

struct row {
  demo::method_spec spec;
  double seconds = 0, seconds_full = 0, speedup = 0, flops_ratio = 0, overhead_share = 0;  // seconds: medians
  std::optional<double> speculative_share;  // SpecDiff's speculative pass / its run (medians); empty for the others
  std::optional<int> dense_steps;            // token-level methods: dense main steps
  std::optional<double> verified_error;      // token-level methods: mean free verification per partial step
  demo::spread seconds_spread, seconds_full_spread, speedup_spread;
  demo::quality_report quality;
};

std::string optional_text(const std::optional<double>& v) { return v ? std::to_string(*v) : ""; }

// What a token-level run reports about its steps (empty for the other methods).
void record_steps(row& x, const methods::run_result& run) {
  if (run.dense_steps == 0) return;
  x.dense_steps = run.dense_steps;
  double sum = 0;
  for (float e : run.verified_errors) sum += e;
  if (!run.verified_errors.empty()) x.verified_error = sum / static_cast<double>(run.verified_errors.size());
}

// Every method over its own knob; the token-level methods (SpecDiff, RAS) on both dense-step schedules, so that
// each pair can be compared on equal schedules as well as on its authors' own.
std::vector<demo::method_spec> sweep(bool quick) {
  using values = std::vector<double>;
  using counts = std::vector<int>;
  std::vector<demo::method_spec> s;
  const values rates = quick ? values{0.9} : values{0.6, 0.8, 0.9, 0.95};
  for (const char* method : {"specdiff", "ras"})
    for (const char* dense : {"specdiff", "ras"})
      for (double cr : rates) s.push_back({.name = method, .cache_rate = cr, .dense = dense});
  // SpecDiff-adaptive over its one knob, with SpecDiff's C3 rule and with the model's learned one.
  for (const char* c3 : {"specdiff", "learned"})
    for (double budget : quick ? values{0.4} : values{0.1, 0.2, 0.4, 0.8, 1.6})
      s.push_back({.name = "specdiff-adaptive", .error_budget = budget, .c3 = std::string(c3)});
  // ... and with the cache rate moving between 0.95 and 0.8 with the verified error (learned C3 rule)
  for (double budget : quick ? values{} : values{0.2, 0.4, 0.8})
    s.push_back({.name = "specdiff-adaptive", .cache_rate = 0.95, .error_budget = budget, .cache_rate_min = 0.8, .c3 = std::string("learned")});
  // The output forecast between full steps (L2P's structure) with learned weights, and the Taylor rule there over step
  // indices (diffusers' TaylorSeerCache lite: order 1 and 2); intervals from FLOP ratio 1.87 (N=2) to 5.6 (N=8).
  for (int n : quick ? counts{3} : counts{2, 3, 4, 5, 6, 7, 8}) s.push_back({.name = "forecast", .interval = n, .c3 = std::string("learned")});
  // ... and on full steps placed where they forecast best (learned_forecast_F<count>.json, specdiff-calibrate --full-steps): 5 to 15 of 28
  // (the counts a model has files for; the shipped mnist-flux has 9 and 11 too).
  for (int f : quick ? counts{} : counts{5, 6, 7, 8, 9, 10, 11, 15}) s.push_back({.name = "forecast", .full_steps = f, .c3 = std::string("learned")});
  // ... both again with the predictor-corrector (forecast_options::correct = 0.5: the skipped steps re-estimated through
  // the next full output, FoCa's "calibrate" at the output; issue 30), at no extra FLOPs.
  for (int n : quick ? counts{3} : counts{2, 3, 4, 5, 6, 7, 8})
    s.push_back({.name = "forecast", .interval = n, .c3 = std::string("learned"), .correct = 0.5});
  for (int f : quick ? counts{} : counts{5, 6, 7, 8, 9, 10, 11, 15})
    s.push_back({.name = "forecast", .full_steps = f, .c3 = std::string("learned"), .correct = 0.5});
  // ... and TACache's direction-aware compensation with the same corrector on the same steps (its per-step statistics
  // fitted here, on calibration noise: tacache_for below).
  for (int n : quick ? counts{} : counts{2, 3, 4, 6}) s.push_back({.name = "forecast", .interval = n, .c3 = std::string("tacache"), .correct = 0.5});
  for (int f : quick ? counts{} : counts{5, 6, 7, 8, 9, 10, 11, 15})
    s.push_back({.name = "forecast", .full_steps = f, .c3 = std::string("tacache"), .correct = 0.5});
  for (int o : quick ? counts{1} : counts{1, 2})
    for (int n : quick ? counts{3} : counts{2, 3, 4, 6}) s.push_back({.name = "forecast", .interval = n, .order = o, .c3 = std::string("taylor")});
  // ... and on diffusers' refresh steps (warm-up 3, then k full iff (k - 4) % N == 0): its TaylorSeerCache lite, order 1.
  for (int n : quick ? counts{} : counts{2, 3, 4, 6})
    s.push_back({.name = "forecast", .interval = n, .order = 1, .warmup = 3, .refresh = std::string("diffusers"), .c3 = std::string("taylor")});
  // Every family from FLOP ratio ~1.5 to ~6 (issue 30): the module-level peers from N = 2, fewer steps from 18 to 5.
  for (int n : quick ? counts{3} : counts{2, 3, 5, 8}) s.push_back({.name = "toca", .cache_rate = 0.9, .interval = n});
  for (int n : quick ? counts{3} : counts{2, 3, 4, 6, 8}) s.push_back({.name = "fora", .interval = n});
  for (int n : quick ? counts{4} : counts{2, 3, 4, 6, 8})
    for (int o : quick ? counts{1} : counts{1, 2}) s.push_back({.name = "taylorseer", .interval = n, .order = o});
  for (double t : quick ? values{0.12} : values{0.05, 0.12, 0.2, 0.3}) s.push_back({.name = "fbcache", .threshold = t});
  for (double t : quick ? values{0.6} : values{0.25, 0.4, 0.6, 1.0, 1.5}) s.push_back({.name = "teacache", .threshold = t});
  for (int n : quick ? counts{10} : counts{5, 7, 10, 14, 18}) s.push_back({.name = "steps", .fast_steps = n});
  return s;
}

// Two scatter panels: speedup (x; the FLOP ratio in a quality-only sweep) against PSNR and against class accuracy
// (y), one colour per method.
std::string svg(const std::vector<row>& rows, double full_acc, bool timed) {
  const auto x_of = [&](const row& r) { return timed ? r.speedup : r.flops_ratio; };
  const std::vector<std::pair<std::string, std::string>> colours = {{"specdiff", "#d62728"}, {"ras", "#1f77b4"}, {"toca", "#2ca02c"},
                                                                   {"fora", "#9467bd"}, {"taylorseer", "#ff7f0e"}, {"fbcache", "#8c564b"},
                                                                   {"teacache", "#e377c2"}, {"steps", "#7f7f7f"},
                                                                   {"specdiff-adaptive", "#17becf"}, {"forecast", "#bcbd22"}};
  auto colour = [&](const std::string& m) {
    for (auto& [k, c] : colours) if (k == m) return c;
    return std::string("#000");
  };
  double max_speed = 1, min_psnr = 1e9, max_psnr = 0;
  for (const auto& r : rows) {
    max_speed = std::max(max_speed, x_of(r));
    if (r.quality.psnr_db) min_psnr = std::min(min_psnr, *r.quality.psnr_db), max_psnr = std::max(max_psnr, *r.quality.psnr_db);
  }
  if (min_psnr > max_psnr) min_psnr = 0, max_psnr = 40;
  min_psnr = std::floor(min_psnr / 5) * 5, max_psnr = std::ceil(max_psnr / 5) * 5 + (max_psnr == min_psnr ? 5 : 0);
  const double xmax = std::ceil(max_speed + 0.5);
  const int w = 460, h = 340, left = 60, top = 40, pw = 370, ph = 250;
  std::ostringstream s;
  s << "<svg xmlns='http://www.w3.org/2000/svg' width='" << 2 * w << "' height='" << h + 60 << "' font-family='sans-serif' font-size='12'>\n";
  s << "<rect width='100%' height='100%' fill='white'/>\n";
  for (int panel = 0; panel < 2; ++panel) {
    const int ox = panel * w + left;
    const double ylo = panel == 0 ? min_psnr : 0.0, yhi = panel == 0 ? max_psnr : 1.0;
    auto X = [&](double v) { return ox + (v - 1.0) / (xmax - 1.0) * pw; };
    auto Y = [&](double v) { return top + ph - (v - ylo) / (yhi - ylo) * ph; };
    s << "<text x='" << ox + pw / 2 << "' y='20' text-anchor='middle' font-size='14'>" << (panel == 0 ? "PSNR vs full RFlow (dB)" : "class accuracy") << "</text>\n";
    s << "<rect x='" << ox << "' y='" << top << "' width='" << pw << "' height='" << ph << "' fill='none' stroke='#333'/>\n";
    for (int i = 0; i <= 4; ++i) {
      const double yv = ylo + (yhi - ylo) * i / 4, xv = 1.0 + (xmax - 1.0) * i / 4;
      s << "<line x1='" << ox << "' x2='" << ox + pw << "' y1='" << Y(yv) << "' y2='" << Y(yv) << "' stroke='#eee'/>";
      s << "<text x='" << ox - 6 << "' y='" << Y(yv) + 4 << "' text-anchor='end'>" << std::round(yv * 100) / 100 << "</text>";
      s << "<text x='" << X(xv) << "' y='" << top + ph + 16 << "' text-anchor='middle'>" << std::round(xv * 10) / 10 << "x</text>\n";
    }
    s << "<text x='" << ox + pw / 2 << "' y='" << top + ph + 34 << "' text-anchor='middle'>" << (timed ? "speedup (wall time)" : "FLOP ratio (untimed sweep)") << "</text>\n";
    if (panel == 1)
      s << "<line x1='" << ox << "' x2='" << ox + pw << "' y1='" << Y(full_acc) << "' y2='" << Y(full_acc) << "' stroke='#333' stroke-dasharray='4 3'/>"
        << "<text x='" << ox + pw - 4 << "' y='" << Y(full_acc) - 4 << "' text-anchor='end'>full RFlow</text>\n";
    for (const auto& r : rows) {
      const double y = panel == 0 ? (r.quality.psnr_db ? *r.quality.psnr_db : yhi) : r.quality.class_acc;
      s << "<circle cx='" << X(x_of(r)) << "' cy='" << Y(std::clamp(y, ylo, yhi)) << "' r='4.5' fill='" << colour(r.spec.name) << "'><title>"
        << r.spec.describe() << "</title></circle>\n";
    }
  }
  // The legend, five entries to a row (the svg's height leaves room for two rows).
  for (std::size_t i = 0; i < colours.size(); ++i) {
    const auto& [k, c] = colours[i];
    const auto lx = left + static_cast<int>(i % 5) * 170, ly = h + 20 + static_cast<int>(i / 5) * 20;
    s << "<circle cx='" << lx << "' cy='" << ly << "' r='5' fill='" << c << "'/><text x='" << lx + 9 << "' y='" << ly + 4 << "'>" << k << "</text>\n";
  }
  s << "</svg>\n";
  return s.str();
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Speed/quality sweep of SpecDiff and its peers on the default model"};
  int samples = 64, steps = 28, threads = sd3::usable_cores(), repeats = 3;
  float cfg = 0.f;  // unset: the model's sampling.json (else 4)
  std::string seed_text = "0";
  std::string out_dir = "pareto-out", model_dir = demo::default_model_dir().string(), only;
  bool quick = false;
  // The options and outputs follow the rules every tool shares (quality/cli.hpp).
  threads = std::min(threads, sd3::max_threads);
  quality::cli::add_samples(app, samples);
  quality::cli::add_steps(app, steps);
  auto* cfg_option = quality::cli::add_cfg(app, cfg);
  quality::cli::add_seed(app, seed_text);
  quality::cli::add_threads(app, threads);
  app.add_option("--repeats", repeats, "timed pairs with full RFlow per setting, after an untimed warm-up; medians are reported. 0: quality only (each setting "
                 "runs once, untimed: for FD at hundreds of samples; no speedup columns, the plot against the FLOP ratio)")
      ->capture_default_str()->check(quality::cli::integer_in(0, 100));
  app.add_option("--out", out_dir, "output folder")->capture_default_str();
  app.add_option("--model", model_dir)->capture_default_str();
  app.add_option("--only", only, "run only this method's settings")
      ->check(quality::cli::checked([](const std::string& m) {
        return demo::known_method(m) ? std::string() : sd3::message("'", sd3::excerpt(m), "' is not a method; allowed: ", demo::method_list());
      }, "METHOD"));
  app.add_flag("--quick", quick, "one setting per method (a smoke run)");
  if (const auto status = quality::cli::parse(app, argc, argv)) return *status;

  return quality::cli::run("specdiff-pareto", [&] {
    const std::uint64_t seed = quality::parse_seed(seed_text);
    // Every output is checked before the sweep: unwritable paths, two outputs that are one file, an output that
    // is one of the model's files.
    const auto dir = std::filesystem::path(out_dir);
    sd3::prepare_output_folder(dir, "--out");
    sd3::file_plan plan;
    plan.output(dir / "results.csv", "--out results.csv");
    plan.output(dir / "results.json", "--out results.json");
    plan.output(dir / "pareto.svg", "--out pareto.svg");
    plan.input(model_dir, "--model");
    plan.check();
    const auto work = demo::make_workload(model_dir, samples, seed, steps, cfg_option->count() ? std::optional(cfg) : std::nullopt, threads);
    const auto& [model, batch, net, problem] = *work;
    auto specs = sweep(quick);
    if (!only.empty()) std::erase_if(specs, [&](const demo::method_spec& s) { return s.name != only; });
    // Placed full steps come in the counts the model folder has files for (learned_forecast_F<count>.json): the others
    // are not settings of this model, left out without a word.
    std::erase_if(specs, [&](const demo::method_spec& s) { return s.full_steps && model.full_steps_for(s) == nullptr; });
    // The learned C3 rule needs the model folder's calibration (specdiff-calibrate): without it those rows are left out.
    const auto before = specs.size();
    std::erase_if(specs, [&](const demo::method_spec& s) {
      return (s.c3 == "learned" || (s.name == "forecast" && !s.c3)) && model.learned_weights_for(s) == nullptr;
    });
    if (specs.size() != before)
        std::fprintf(stderr, "the model folder lacks calibrations (%s, learned_forecast_N*.json): %zu learned settings left out (make them "
                   "with specdiff-calibrate)\n", methods::learned_c3_file_name, before - specs.size());
    for (auto& s : specs) s.learned_weights = model.learned_weights_for(s), s.full_step_list = model.full_steps_for(s);
    // TACache's statistics, one table per schedule, fitted on calibration noise (the calibration key space, seed 1000,
    // 8 samples: what the learned files are fitted on) at this run's steps and guidance — no evaluation seed draws it.
    std::vector<std::unique_ptr<methods::tacache_table>> tacache_tables;
    for (auto& s : specs)
      if (s.c3 == "tacache") {
        tacache_tables.push_back(demo::fit_tacache(model_dir, s, steps, cfg_option->count() ? std::optional(cfg) : std::nullopt, threads));
        s.tacache = tacache_tables.back().get();
      }
    // Learned weights fitted for another step count (or time grid) cannot run at --steps: those settings are left
    // out too, each file named once, before any sampling (they used to stop the sweep half-way).
    std::vector<std::string> mismatches;
    std::erase_if(specs, [&](const demo::method_spec& s) {
      const auto why = demo::learned_weights_mismatch(s, problem);
      if (!why.empty() && std::find(mismatches.begin(), mismatches.end(), why) == mismatches.end()) mismatches.push_back(why);
      return !why.empty();
    });
    for (const auto& why : mismatches) std::fprintf(stderr, "left out: %s\n", why.c_str());
    if (specs.empty()) throw std::invalid_argument(sd3::message("no setting of the sweep", only.empty() ? "" : " for --only " + only, " can run"));
    for (const auto& s : specs) demo::check_method(s, problem);

    const demo::method_spec full_spec{.name = "full"};
    // Untimed: the process's warm-up for full RFlow and the images every setting's quality is measured against.
    const auto full = demo::run_method(problem, full_spec);
    const double full_acc = demo::class_accuracy(model, batch, full.latents);
    const auto full_fd = demo::image_fd(model, batch, full.latents);
    if (const auto why = demo::fd_unavailable_reason(model, batch); !why.empty()) std::fprintf(stderr, "FD not measured: %s\n", why.c_str());
    std::vector<double> full_times;  // every timed run of full RFlow
    std::vector<row> rows;
    for (const auto& spec : specs) {
      if (repeats == 0) {  // quality only: one untimed run
        row x;
        x.spec = spec;
        const auto run = demo::run_method(problem, spec);
        x.flops_ratio = full.flops / run.flops;
        x.quality = demo::evaluate(model, batch, full.latents, run.latents);
        record_steps(x, run);
        rows.push_back(x);
        std::fprintf(stderr, "%-26s untimed  FLOP ratio %5.2f  PSNR %6.2f  SSIM %.3f  acc %.3f  FD %s\n", spec.describe().c_str(), x.flops_ratio,
                     x.quality.psnr_db.value_or(INFINITY), x.quality.ssim, x.quality.class_acc, optional_text(x.quality.fd).c_str());
        continue;
      }
      const auto t = demo::time_against_full(problem, spec, {repeats, false});
      full_times.insert(full_times.end(), t.full_seconds.begin(), t.full_seconds.end());
      row x;
      x.spec = spec;
      x.seconds = t.seconds_method();
      x.seconds_full = t.seconds_full();
      x.speedup = t.speedup();
      x.seconds_spread = t.seconds_method_spread();
      x.seconds_full_spread = t.seconds_full_spread();
      x.speedup_spread = t.speedup_spread();
      x.flops_ratio = full.flops / t.method.flops;
      x.overhead_share = t.overhead_share();
      if (spec.name == "specdiff" || spec.name == "specdiff-adaptive") x.speculative_share = t.speculative_share();
      x.quality = demo::evaluate(model, batch, full.latents, t.method.latents);
      record_steps(x, t.method);
      rows.push_back(x);
      std::fprintf(stderr, "%-26s %7.2f s (full %.2f s)  speedup %.2fx (%.2f-%.2f)  FLOP ratio %5.2f  PSNR %6.2f  SSIM %.3f  acc %.3f  FD %s\n",
                   spec.describe().c_str(), x.seconds, x.seconds_full, x.speedup, x.speedup_spread.min, x.speedup_spread.max, x.flops_ratio,
                   x.quality.psnr_db.value_or(INFINITY), x.quality.ssim, x.quality.class_acc, optional_text(x.quality.fd).c_str());
    }
    if (rows.empty()) throw std::invalid_argument("--only: no setting of method '" + only + "' in the sweep");
    if (repeats == 0) full_times.push_back(full.seconds);  // the reference run's own time, untimed protocol
    const double full_median = demo::median(full_times);
    const auto full_spread = demo::spread_of(full_times);

    std::ostringstream csv;
    // Every row has every column; full RFlow's row comes first (its speedup range and PSNR are empty: not measured).
    csv << "method,settings,speedup,speedup_min,speedup_max,flops_ratio,psnr_db,ssim,class_acc,fd,seconds_full,seconds_full_min,"
           "seconds_full_max,seconds_method,seconds_method_min,seconds_method_max,overhead_share,speculative_share,dense_steps,verified_error\n";
    csv << "full,\"" << steps << " steps\",1,,,1,,1," << full_acc << "," << optional_text(full_fd) << "," << full_median << "," << full_spread.min
        << "," << full_spread.max << "," << full_median << "," << full_spread.min << "," << full_spread.max << ",0,," << steps << ",\n";
    // null / empty: not measured; a measured value that is not finite is written as "inf", "-inf" or "nan", and the PSNR
    // of images identical to full RFlow's as "inf" (docs/results.md).
    const auto number = [](const std::optional<double>& v) { return v ? demo::json_number(*v) : nlohmann::json(nullptr); };
    const auto psnr_text = [](const std::optional<double>& v) { return v ? std::to_string(*v) : std::string("inf"); };
    const auto pair = [](const demo::spread& s) { return nlohmann::json::array({s.min, s.max}); };
    nlohmann::json j = nlohmann::json::array();
    std::printf("| method | settings | speedup (min-max) | FLOP ratio | PSNR dB | SSIM | class acc | FD | overhead |\n|---|---|---|---|---|---|---|---|---|\n");
    std::printf("| full | %d steps | 1.00x | 1.00 | - | 1.000 | %.3f | %s | - |\n", steps, full_acc, full_fd ? std::to_string(*full_fd).substr(0, 6).c_str() : "-");
    for (const auto& r : rows) {
      const auto timed = [&](double v) {  // empty in a quality-only sweep (--repeats 0)
        std::ostringstream o;
        if (repeats > 0) o << v;
        return o.str();
      };
      csv << r.spec.name << ",\"" << r.spec.describe() << "\"," << timed(r.speedup) << "," << timed(r.speedup_spread.min) << ","
          << timed(r.speedup_spread.max) << "," << r.flops_ratio << "," << psnr_text(r.quality.psnr_db) << "," << r.quality.ssim << ","
          << r.quality.class_acc << "," << optional_text(r.quality.fd) << "," << timed(r.seconds_full) << "," << timed(r.seconds_full_spread.min)
          << "," << timed(r.seconds_full_spread.max) << "," << timed(r.seconds) << "," << timed(r.seconds_spread.min) << ","
          << timed(r.seconds_spread.max) << "," << timed(r.overhead_share) << "," << optional_text(r.speculative_share) << ","
          << (r.dense_steps ? std::to_string(*r.dense_steps) : "") << "," << optional_text(r.verified_error) << "\n";
      j.push_back({{"method", r.spec.name}, {"settings", r.spec.describe()}, {"speedup", r.speedup}, {"speedup_spread", pair(r.speedup_spread)},
                   {"flops_ratio", r.flops_ratio}, {"psnr_db", r.quality.psnr_db ? demo::json_number(*r.quality.psnr_db) : nlohmann::json("inf")}, {"ssim", r.quality.ssim},
                   {"class_acc", r.quality.class_acc}, {"fd", number(r.quality.fd)}, {"seconds_full", r.seconds_full},
                   {"seconds_full_spread", pair(r.seconds_full_spread)}, {"seconds_method", r.seconds},
                   {"seconds_method_spread", pair(r.seconds_spread)}, {"overhead_share", r.overhead_share},
                   {"speculative_share", number(r.speculative_share)},
                   {"dense_steps", r.dense_steps ? nlohmann::json(*r.dense_steps) : nlohmann::json(nullptr)},
                   {"verified_error", number(r.verified_error)}});
      char speed[64] = "untimed", overhead[16] = "-";  // a quality-only sweep (--repeats 0) has neither
      if (repeats > 0) {
        std::snprintf(speed, sizeof speed, "%.2fx (%.2f-%.2f)", r.speedup, r.speedup_spread.min, r.speedup_spread.max);
        std::snprintf(overhead, sizeof overhead, "%.1f%%", 100 * r.overhead_share);
      }
      std::printf("| %s | %s | %s | %.2f | %s | %.3f | %.3f | %s | %s |\n", r.spec.name.c_str(), r.spec.describe().c_str(), speed, r.flops_ratio,
                  r.quality.psnr_db ? std::to_string(*r.quality.psnr_db).substr(0, 5).c_str() : "inf", r.quality.ssim, r.quality.class_acc,
                  r.quality.fd ? std::to_string(*r.quality.fd).substr(0, 6).c_str() : "-", overhead);
    }
    nlohmann::json all{{"samples", samples}, {"steps", steps}, {"cfg", problem.guidance}, {"seed", seed}, {"threads", threads}, {"repeats", repeats},
                       {"class_acc_full", full_acc}, {"fd_full", number(full_fd)}, {"seconds_full", full_median},
                       {"seconds_full_spread", pair(full_spread)}, {"seconds_full_runs", full_times}, {"results", j}};
    demo::mark_non_finite(all);
    sd3::write_file(dir / "results.csv", csv.str(), "--out results.csv");
    sd3::write_file(dir / "results.json", all.dump(2) + "\n", "--out results.json");
    sd3::write_file(dir / "pareto.svg", svg(rows, full_acc, repeats > 0), "--out pareto.svg");
    std::fprintf(stderr, "wrote %s/{results.csv,results.json,pareto.svg}\n", out_dir.c_str());
    return 0;
  });
}
