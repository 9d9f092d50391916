// specdiff-pyref: one method of the demo on a model folder, final latents written as raw float32 (see CMakeLists.txt).
// The batch is the demo's: sample k draws Philox stream k of --seed (quality::sample_latents) and has label k % classes.
#include <CLI/CLI.hpp>
#include <cstdio>
#include <exception>
#include <optional>
#include <string>

#include "demo/support.hpp"
#include "sd3/files.hpp"

int main(int argc, char** argv) {
  CLI::App app{"specdiff-pyref: one demo method's final latents as raw float32 (the Python package's reference)"};
  demo::method_spec spec;
  std::string model_dir = demo::default_model_dir().string(), out, seed_text = "0";
  int samples = 4, steps = 28, threads = 1;
  double cache_rate = 0, error_budget = 0;
  int spec_steps = 0, interval = 0, order = 0;
  std::string c3;
  app.add_option("--model", model_dir, "model folder")->capture_default_str();
  app.add_option("--method", spec.name, demo::method_list())->capture_default_str();
  auto* cr = app.add_option("--cache-rate", cache_rate, "cache rate");
  auto* ss = app.add_option("--spec-steps", spec_steps, "speculative steps");
  auto* iv = app.add_option("--interval", interval, "full-step interval");
  auto* od = app.add_option("--order", order, "Taylor order");
  auto* eb = app.add_option("--error-budget", error_budget, "specdiff-adaptive's error budget");
  auto* c3o = app.add_option("--c3", c3, "C3 rule");
  double threshold = 0;
  auto* th = app.add_option("--threshold", threshold, "fbcache / teacache: the step gate's threshold");
  app.add_option("--samples", samples, "samples")->capture_default_str()->check(CLI::Range(1, 4096));
  app.add_option("--steps", steps, "steps")->capture_default_str()->check(CLI::Range(1, 1000));
  app.add_option("--seed", seed_text, "noise seed")->capture_default_str();
  app.add_option("--threads", threads, "engine threads")->capture_default_str()->check(CLI::Range(1, 64));
  app.add_option("--out", out, "raw float32 output file")->required();
  CLI11_PARSE(app, argc, argv);
  try {
    if (cr->count()) spec.cache_rate = cache_rate;
    if (ss->count()) spec.spec_steps = spec_steps;
    if (iv->count()) spec.interval = interval;
    if (od->count()) spec.order = order;
    if (eb->count()) spec.error_budget = error_budget;
    if (c3o->count()) spec.c3 = c3;
    if (th->count()) spec.threshold = threshold;
    const auto seed = static_cast<std::uint64_t>(std::stoull(seed_text));
    const auto work = demo::make_workload(model_dir, samples, seed, steps, std::nullopt, threads);
    spec.learned_weights = work->model.learned_weights_for(spec);
    demo::check_method(spec);
    const auto r = demo::run_method(work->problem, spec);
    sd3::write_file(out, {reinterpret_cast<const char*>(r.latents.data()), r.latents.size() * sizeof(float)}, "--out");
    std::printf("%s: %d model calls, %.4g FLOPs, %d dense steps\n", spec.describe().c_str(), r.model_calls, r.flops, r.dense_steps);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "specdiff-pyref: %s\n", e.what());
    return 1;
  }
  return 0;
}
