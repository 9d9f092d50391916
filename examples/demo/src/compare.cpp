// specdiff-compare: SpecDiff and the recommended composition side by side on the same noise. Runs full RFlow, SpecDiff
// (--cache-rate, its schedule) and the forecast (--interval or --full-steps; by default TACache's compensation with the
// predictor-corrector at 0.5, docs/results.md: the library's best composition on the shipped models; --c3 and --correct
// choose another), prints each one's FLOP ratio, PSNR, SSIM and class accuracy against full compute,
// and writes OUT/compare.png: one column per sample; rows full RFlow, SpecDiff, SpecDiff's difference from full, the
// forecast, the forecast's difference (a heat map: black = equal, red, yellow, white = --heat-scale or more, in
// image units of [-1, 1]). Quality only: nothing is timed (the demo and specdiff-pareto time).
#include <CLI/CLI.hpp>
#include <cstdio>

#include "demo/heatmap.hpp"
#include "demo/support.hpp"
#include "quality/cli.hpp"
#include "quality/options.hpp"
#include "quality/png_grid.hpp"
#include "sd3/errors.hpp"
#include "sd3/files.hpp"
#include "sd3/transformer.hpp"
#include "sd3/workers.hpp"

int main(int argc, char** argv) {
  CLI::App app{"SpecDiff and the recommended composition (the forecast: TACache + corrector by default) side by side, with heat maps of their difference from full RFlow"};
  using quality::cli::integer_in;
  using quality::cli::real_in;
  std::string model_dir = demo::default_model_dir().string(), out_dir = "compare-out", seed_text = "0";
  int samples = 10, steps = 28, threads = std::min(sd3::usable_cores(), sd3::max_threads), interval = 4;
  double cache_rate = 0.9, heat_scale = 0.25;
  app.add_option("--model", model_dir, "model folder")->capture_default_str();
  app.add_option("--out", out_dir, "output folder (compare.png)")->capture_default_str();
  quality::cli::add_seed(app, seed_text);
  app.add_option("--samples", samples, "samples (class i % 10), one column each")->capture_default_str()->check(integer_in(1, 64));
  app.add_option("--steps", steps, "sampling steps")->capture_default_str()->check(integer_in(1, 1000));
  app.add_option("--threads", threads, "threads")->capture_default_str()->check(integer_in(1, sd3::max_threads));
  app.add_option("--cache-rate", cache_rate, "SpecDiff's cache rate")->capture_default_str()->check(real_in(0.0, 1.0, quality::interval::open_above));
  auto* iv = app.add_option("--interval", interval, "the forecast's full-step interval N (its learned weights: MODEL/learned_forecast_N<N>.json)")
      ->capture_default_str()->check(integer_in(1, demo::max_forecast_interval));
  int full_steps = 0;
  auto* fs = app.add_option("--full-steps", full_steps, "the forecast on this many placed full steps instead of --interval (MODEL/learned_forecast_F<K>.json)")
      ->check(integer_in(1, demo::max_forecast_interval))->excludes(iv);
  std::string c3 = "tacache";
  double correct = 0.5;
  app.add_option("--c3", c3, "the forecast's rule: tacache (TACache's compensation, fitted on calibration noise at start), learned "
                 "(MODEL/learned_forecast_*.json), foca, taylor, latest")
      ->capture_default_str()->check(quality::cli::checked([](const std::string& r) { return demo::c3_rule_error(r); }, "RULE"));
  app.add_option("--correct", correct, "the forecast's predictor-corrector weight in [0, 1] (0: off)")->capture_default_str()->check(real_in(0.0, 1.0));
  app.add_option("--heat-scale", heat_scale, "the difference drawn white (image range [-1, 1])")->capture_default_str()->check(real_in(1e-6, 2.0));
  if (const auto status = quality::cli::parse(app, argc, argv)) return *status;
  return quality::cli::run("specdiff-compare", [&] {
    const std::uint64_t seed = quality::parse_seed(seed_text);
    const auto png = std::filesystem::path(out_dir) / "compare.png";
    sd3::prepare_output_folder(out_dir, "--out");
    sd3::file_plan plan;
    plan.output(png, "--out compare.png");
    plan.input(model_dir, "--model");
    plan.check();
    const auto work = demo::make_workload(model_dir, samples, seed, steps, std::nullopt, threads);
    const auto& [model, batch, net, problem] = *work;
    demo::method_spec specdiff{.name = "specdiff", .cache_rate = cache_rate};
    demo::method_spec forecast{.name = "forecast", .c3 = c3};
    if (fs->count()) forecast.full_steps = full_steps;
    else forecast.interval = interval;
    if (correct > 0) forecast.correct = correct;
    forecast.learned_weights = model.learned_weights_for(forecast);
    forecast.full_step_list = model.full_steps_for(forecast);
    demo::check_method(specdiff, problem);
    std::unique_ptr<methods::tacache_table> tacache;  // its statistics, fitted on calibration noise before anything runs
    if (c3 == "tacache") tacache = demo::fit_tacache(model_dir, forecast, steps, std::nullopt, threads), forecast.tacache = tacache.get();
    demo::check_method(forecast, problem);
    const auto full = demo::run_method(problem, {.name = "full"});
    const auto a = demo::run_method(problem, specdiff), b = demo::run_method(problem, forecast);
    const auto full_images = demo::clamped_images(model, full.latents), a_images = demo::clamped_images(model, a.latents),
               b_images = demo::clamped_images(model, b.latents);
    const auto n = static_cast<std::size_t>(samples);
    const auto c = static_cast<std::size_t>(model.image_channels), h = static_cast<std::size_t>(model.image_height),
               w = static_cast<std::size_t>(model.image_width);
    auto rgb = [&](const std::vector<float>& images) {
      if (c == 3) return images;
      std::vector<float> grey(n * h * w);  // channels averaged (the shipped models have one)
      for (std::size_t i = 0; i < n; ++i)
        for (std::size_t px = 0; px < h * w; ++px) {
          float s = 0.f;
          for (std::size_t ch = 0; ch < c; ++ch) s += images[(i * c + ch) * h * w + px];
          grey[i * h * w + px] = s / static_cast<float>(c);
        }
      return demo::grey_to_rgb(grey, n, h, w);
    };
    std::vector<float> all;
    for (const auto& part : {rgb(full_images), rgb(a_images), demo::difference_heatmap(a_images, full_images, n, c, h, w, static_cast<float>(heat_scale)),
                             rgb(b_images), demo::difference_heatmap(b_images, full_images, n, c, h, w, static_cast<float>(heat_scale))})
      all.insert(all.end(), part.begin(), part.end());
    quality::grid_options g;
    g.columns = n;
    g.scale = 3;
    quality::write_png_grid(png, {all, 5 * n, 3, h, w}, g);
    std::printf("specdiff-compare: %d samples, seed %llu, model %s\n", samples, static_cast<unsigned long long>(seed), model_dir.c_str());
    std::printf("| method | FLOP ratio | PSNR dB | SSIM | class acc (full %.3f) |\n|---|---|---|---|---|\n", demo::class_accuracy(model, batch, full.latents));
    for (const auto& [spec, run] : {std::pair{&specdiff, &a}, std::pair{&forecast, &b}}) {
      const auto q = demo::evaluate(model, batch, full.latents, run->latents);
      std::printf("| %s | %.2f | %.2f | %.3f | %.3f |\n", spec->describe().c_str(), full.flops / run->flops, q.psnr_db.value_or(INFINITY), q.ssim,
                  q.class_acc);
    }
    std::printf("wrote %s: rows full RFlow, SpecDiff, |SpecDiff - full|, forecast, |forecast - full| (black 0, red, yellow, white >= %.3g)\n",
                png.string().c_str(), heat_scale);
    return 0;
  });
}
