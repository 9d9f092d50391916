// specdiff-demo: full RFlow and an accelerated method on the default model, from the same seed.
// Writes PNG grids, prints a table, optionally a JSON object (docs/results.md explains every key).
#include <CLI/CLI.hpp>
#include <algorithm>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <thread>

#include "demo/support.hpp"
#include "quality/cli.hpp"
#include "quality/options.hpp"
#include "quality/png_grid.hpp"
#include "sd3/errors.hpp"
#include "sd3/files.hpp"
#include "sd3/transformer.hpp"

namespace {

using quality::cli::checked;
using quality::cli::integer_in;
using quality::cli::real_in;

// Which of the method options each method reads; any other given option would be silently ignored, so it is refused.
struct method_option {
  const char* flag;
  CLI::Option* option;
  std::vector<std::string> methods;
};
void check_method_options(const std::string& method, const std::vector<method_option>& table) {
  for (const auto& o : table) {
    if (o.option->count() == 0 || std::find(o.methods.begin(), o.methods.end(), method) != o.methods.end()) continue;
    std::string users;
    for (const auto& m : o.methods) users += (users.empty() ? "" : ", ") + m;
    throw CLI::ValidationError(o.flag, sd3::message("--method ", method, " does not use it (used by: ", users, ")"));
  }
}

// A one-line progress bar on stderr (only when it is a terminal, or when asked).
methods::progress_fn progress_bar(const std::string& label, bool enabled) {
  if (!enabled) return {};
  return [label](int done, int total) {
    const int width = 28, filled = total > 0 ? done * width / total : width;
    std::fprintf(stderr, "\r  %-28s [%s%s] %3d/%d", label.c_str(), std::string(static_cast<std::size_t>(filled), '#').c_str(),
                 std::string(static_cast<std::size_t>(width - filled), '.').c_str(), done, total);
    if (done == total) std::fprintf(stderr, "\n");
    std::fflush(stderr);
  };
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"SpecDiff demo: full RFlow vs an accelerated method on the default model, same noise"};
  demo::method_spec spec;
  int steps = 28, samples = 16, threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency())), repeats = 1;
  float cfg = 0.f;
  std::string seed_text = "0";
  std::string out_dir = "demo-out", json_path, model_dir = demo::default_model_dir().string();
  bool no_progress = false;
  double cache_rate = 0;
  int spec_steps = 0, interval = 0, order = 0, fast_steps = 0;
  app.add_option("--method", spec.name, "full|specdiff|ras|toca|fora|taylorseer|steps")->capture_default_str()
      ->check(checked([](const std::string& m) {
        return demo::known_method(m) ? std::string()
                                     : sd3::message("'", sd3::excerpt(m), "' is not a method; allowed: full, specdiff, ras, toca, fora, taylorseer, steps");
      }, "METHOD"));
  auto* cr = app.add_option("--cache-rate", cache_rate, "share of image tokens not computed on a partial step, [0, 1) (specdiff 0.9, ras 0.5, toca 0.9)")
      ->check(real_in(0.0, 1.0, quality::interval::open_above));
  auto* ss = app.add_option("--spec-steps", spec_steps, "SpecDiff's speculative steps, 0 to --steps (default 2)")->check(integer_in(0, 1000));
  auto* iv = app.add_option("--interval", interval, "full-step interval (toca 5, fora 3, taylorseer 6; specdiff: refresh interval)")->check(integer_in(1, 1000));
  auto* od = app.add_option("--order", order, "TaylorSeer's order, 1 or 2 (default 1)")->check(integer_in(1, 2));
  auto* fs = app.add_option("--fast-steps", fast_steps, "steps of the plain fewer-step baseline (method steps, default 10)")->check(integer_in(1, 1000));
  app.add_option("--steps", steps, "sampling steps")->capture_default_str()->check(integer_in(1, 1000));
  auto* cf = app.add_option("--cfg", cfg, "classifier-free guidance scale (default: the model's, see models/mnist-sd3/README.md)")->check(real_in(0.0, 100.0));
  app.add_option("--samples", samples, "samples (class i % 10)")->capture_default_str()->check(integer_in(1, 4096));
  app.add_option("--seed", seed_text, "noise seed, 0 to 2^64-1")->capture_default_str()
      ->check(checked([](const std::string& t) { return quality::check_seed(t); }, "UINT64"));
  threads = std::min(threads, sd3::max_threads);
  app.add_option("--threads", threads, "threads")->capture_default_str()->check(integer_in(1, sd3::max_threads));
  app.add_option("--repeats", repeats, "interleaved timing repeats (full, method, full, method, ...)")->capture_default_str()->check(integer_in(1, 100));
  app.add_option("--out", out_dir, "folder for the PNG grids")->capture_default_str();
  app.add_option("--json", json_path, "write the results as one JSON object to this file");
  app.add_option("--model", model_dir, "model folder")->capture_default_str();
  app.add_flag("--no-progress", no_progress, "no progress bar");
  try {
    app.parse(argc, argv);
    // Checks that involve two options, after both are known.
    if (ss->count() && spec_steps > steps)
      throw CLI::ValidationError("--spec-steps", sd3::message("'", spec_steps, "' is out of range; allowed: 0 to --steps (", steps, ")"));
    check_method_options(spec.name, {{"--cache-rate", cr, {"specdiff", "ras", "toca"}},
                                     {"--spec-steps", ss, {"specdiff"}},
                                     {"--interval", iv, {"specdiff", "toca", "fora", "taylorseer"}},
                                     {"--order", od, {"taylorseer"}},
                                     {"--fast-steps", fs, {"steps"}}});
  } catch (const CLI::Success& e) {  // --help
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    app.exit(e);
    return 2;  // a usage error, told apart from a failed run (1)
  }
  if (cr->count()) spec.cache_rate = cache_rate;
  if (ss->count()) spec.spec_steps = spec_steps;
  if (iv->count()) spec.interval = interval;
  if (od->count()) spec.order = order;
  if (fs->count()) spec.fast_steps = fast_steps;

  try {
    const std::uint64_t seed = quality::parse_seed(seed_text);
    // Every output is checked before the work: a path that cannot be written fails now, not after sampling.
    const auto full_png = std::filesystem::path(out_dir) / "full.png", method_png = std::filesystem::path(out_dir) / (spec.name + ".png");
    sd3::prepare_output_folder(out_dir, "--out");
    sd3::require_writable_file(full_png, "--out grid");
    sd3::require_writable_file(method_png, "--out grid");
    if (!json_path.empty()) sd3::require_writable_file(json_path, "--json");

    const float guidance = cf->count() ? cfg : 4.f;
    const auto work = demo::make_workload(model_dir, samples, seed, steps, guidance, threads);
    const auto& [model, batch, net, problem] = *work;
    const demo::method_spec full_spec{"full", {}, {}, {}, {}, {}};
    const bool bar = !no_progress;

    std::printf("SpecDiff demo: %d samples, %d steps, cfg %.1f, seed %llu, %d threads, model %s\n", samples, steps, guidance,
                static_cast<unsigned long long>(seed), threads, model_dir.c_str());
    methods::run_result full, accelerated;
    double seconds_full = 0, seconds_method = 0, overhead = 0;
    for (int r = 0; r < repeats; ++r) {
      full = demo::run_method(problem, full_spec, progress_bar("full RFlow", bar));
      accelerated = demo::run_method(problem, spec, progress_bar(spec.describe(), bar));
      seconds_full += full.seconds;
      seconds_method += accelerated.seconds;
      overhead += accelerated.overhead_seconds;
    }
    const auto q = demo::evaluate(model, batch, full.latents, accelerated.latents);
    const double acc_full = demo::class_accuracy(model, batch, full.latents);
    const double speedup = seconds_full / seconds_method, flops_ratio = full.flops / accelerated.flops;
    const double overhead_share = overhead / seconds_method;

    auto grid = [&](const std::filesystem::path& path, const std::vector<float>& latents) {
      const auto images = demo::clamp_images(latents);
      quality::grid_options g;
      g.columns = static_cast<std::size_t>(std::min(samples, 10));
      g.scale = 2;
      quality::write_png_grid(path, demo::as_image_batch(model, batch, images), g);
    };
    grid(full_png, full.latents);
    grid(method_png, accelerated.latents);

    std::printf("\n%-26s %9s %8s %11s %8s %7s %9s %9s\n", "method", "seconds", "speedup", "FLOP ratio", "PSNR dB", "SSIM", "class acc", "overhead");
    std::printf("%-26s %9.2f %7.2fx %11.2f %8s %7.3f %9.3f %9s\n", "full RFlow", seconds_full / repeats, 1.0, 1.0, "-", 1.0, acc_full, "-");
    const std::string psnr = q.psnr_db ? std::to_string(*q.psnr_db).substr(0, 6) : "inf";
    std::printf("%-26s %9.2f %7.2fx %11.2f %8s %7.3f %9.3f %8.1f%%\n", spec.describe().c_str(), seconds_method / repeats, speedup, flops_ratio,
                psnr.c_str(), q.ssim, q.class_acc, 100 * overhead_share);
    std::printf("\ngrids: %s, %s\n", full_png.string().c_str(), method_png.string().c_str());

    if (!json_path.empty()) {
      nlohmann::json j;
      j["method"] = spec.name;
      j["settings"] = spec.describe();
      j["speedup"] = speedup;
      j["flops_ratio"] = flops_ratio;
      j["psnr_db"] = q.psnr_db ? nlohmann::json(*q.psnr_db) : nlohmann::json(nullptr);
      j["ssim"] = q.ssim;
      j["class_acc"] = q.class_acc;
      j["class_acc_full"] = acc_full;
      j["seconds_full"] = seconds_full / repeats;
      j["seconds_method"] = seconds_method / repeats;
      j["overhead_share"] = overhead_share;
      j["samples"] = samples;
      j["steps"] = steps;
      j["cfg"] = guidance;
      j["seed"] = seed;
      j["threads"] = threads;
      j["repeats"] = repeats;
      const std::string text = j.dump(2) + "\n";
      sd3::write_file(json_path, text, "--json");
      std::printf("json: %s\n", json_path.c_str());
    }
    if (std::fflush(stdout) != 0) throw std::runtime_error("stdout: write failed");
  } catch (const std::exception& e) {
    std::fprintf(stderr, "specdiff-demo: %s\n", e.what());
    return 1;
  }
  return 0;
}
