// specdiff-tune: varies one SpecDiff setting at a time around the defaults, at a fixed cache rate, and
// prints speedup (against full RFlow timed before and after), FLOP ratio, PSNR, SSIM and class accuracy.
#include <CLI/CLI.hpp>
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>
#include <thread>

#include "demo/support.hpp"
#include "quality/cli.hpp"

namespace {

// Does a spread speculative grid make the future factor matter? Quality against full RFlow for S = 0 (no
// future) and S = 1..4 on both grids, everything else at the defaults.
int speculative_grid_table(const demo::workload& work, const methods::run_result& full, const methods::specdiff_options& base) {
  std::printf("| S | grid | speculative timesteps | FLOP ratio | PSNR dB | dPSNR vs S=0 | SSIM | class acc |\n|---|---|---|---|---|---|---|---|\n");
  double psnr0 = 0;
  for (int s = 0; s <= 4; ++s)
    for (auto grid : {specdiff::speculative_grid::sampler, specdiff::speculative_grid::aligned}) {
      if (s == 0 && grid == specdiff::speculative_grid::aligned) continue;
      auto o = base;
      o.spec_steps = s;
      o.spec_grid = grid;
      std::string ts;
      if (const auto pass = methods::speculative_pass(work.problem, o))
        for (float t : pass->timesteps()) ts += (ts.empty() ? "" : ", ") + std::to_string(static_cast<int>(std::lround(t)));
      const auto r = methods::run_specdiff(work.problem, o);
      const auto q = demo::evaluate(work.model, work.batch, full.latents, r.latents);
      const double psnr = q.psnr_db.value_or(INFINITY);
      if (s == 0) psnr0 = psnr;
      std::printf("| %d | %s | %s | %.2f | %.2f | %+.2f | %.3f | %.3f |\n", s, s == 0 ? "-" : grid == specdiff::speculative_grid::aligned ? "aligned" : "sampler",
                  ts.empty() ? "-" : ts.c_str(), full.flops / r.flops, psnr, psnr - psnr0, q.ssim, q.class_acc);
      std::fflush(stdout);
    }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"SpecDiff's settings, one at a time, against full RFlow"};
  int samples = 32, steps = 28, threads = sd3::usable_cores();
  double cache_rate = 0.9;
  float cfg = 0.f;  // unset: the model's sampling.json (else 4)
  std::string model_dir = demo::default_model_dir().string();
  bool grids = false;
  std::string only;
  // The options every tool shares, with their ranges (quality/cli.hpp).
  threads = std::min(threads, sd3::max_threads);
  quality::cli::add_samples(app, samples);
  quality::cli::add_steps(app, steps);
  app.add_option("--cache-rate", cache_rate)->capture_default_str()->check(CLI::Range(0.0, 0.999));
  auto* cfg_option = quality::cli::add_cfg(app, cfg);
  quality::cli::add_threads(app, threads);
  app.add_option("--model", model_dir)->capture_default_str();
  app.add_option("--only", only, "run only the default and the variants whose name contains this text (e.g. ranking)");
  app.add_flag("--speculative-grid", grids, "instead: the speculative pass's grid (aligned vs the sampler's) for S = 0..4");
  if (const auto status = quality::cli::parse(app, argc, argv)) return *status;
  try {
    const auto work = demo::make_workload(model_dir, samples, 0, steps, cfg_option->count() ? std::optional(cfg) : std::nullopt, threads);
    const auto& p = work->problem;
    const auto full = methods::run_full(p);
    using rule = methods::specdiff_options::c3_rule;
    methods::specdiff_options base;
    base.cache_rate = cache_rate;
    if (grids) return speculative_grid_table(*work, full, base);
    std::vector<std::pair<std::string, methods::specdiff_options>> variants = {{"default", base}};
    auto vary = [&](std::string name, auto change) {
      auto o = base;
      change(o);
      variants.emplace_back(std::move(name), o);
    };
    vary("C3 latest", [](auto& o) { o.c3 = rule::latest; });
    vary("C3 linear", [](auto& o) { o.c3 = rule::linear; });
    vary("reuse_mass 0", [](auto& o) { o.reuse_mass = 0.0; });
    vary("reuse_mass 0.3", [](auto& o) { o.reuse_mass = 0.3; });
    vary("S = 0 (no future)", [](auto& o) { o.spec_steps = 0; });
    vary("ranking his*star (future off, same pass)", [](auto& o) { o.rank = methods::specdiff_options::ranking::no_future; });
    vary("ranking round-robin (staleness only, no pass)", [](auto& o) { o.rank = methods::specdiff_options::ranking::round_robin; });
    vary("S = 3", [](auto& o) { o.spec_steps = 3; });
    vary("RAS schedule 4 + {12, 20}", [](auto& o) { o.warmup_steps = 4, o.reset_steps = {12, 20}; });
    vary("warm-up 2, no reset", [](auto& o) { o.reset_steps = {}; });
    vary("warm-up 3 + {14}", [](auto& o) { o.warmup_steps = 3; });
    vary("starvation 0.5", [](auto& o) { o.starvation_scale = 0.5f; });
    vary("starvation 2", [](auto& o) { o.starvation_scale = 2.f; });
    vary("plans per sample", [](auto& o) { o.share_cfg_plan = false; });
    vary("his/fut with context queries", [](auto& o) { o.context_queries = true; });
    vary("context queries + C3 latest", [](auto& o) { o.context_queries = true, o.c3 = rule::latest; });
    if (!only.empty()) std::erase_if(variants, [&](const auto& v) { return v.first != "default" && v.first.find(only) == std::string::npos; });
    std::printf("| variant (CR %.2f) | speedup | FLOP ratio | PSNR dB | SSIM | class acc |\n|---|---|---|---|---|---|\n", cache_rate);
    double full_seconds = full.seconds;
    for (const auto& [name, o] : variants) {
      const auto r = methods::run_specdiff(p, o);
      const auto again = methods::run_full(p);
      const double reference = 0.5 * (full_seconds + again.seconds);
      full_seconds = again.seconds;
      const auto q = demo::evaluate(work->model, work->batch, full.latents, r.latents);
      std::printf("| %s | %.2fx | %.2f | %.2f | %.3f | %.3f |\n", name.c_str(), reference / r.seconds, full.flops / r.flops,
                  q.psnr_db.value_or(INFINITY), q.ssim, q.class_acc);
      std::fflush(stdout);
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "specdiff-tune: %s\n", e.what());
    return 1;
  }
  return 0;
}
