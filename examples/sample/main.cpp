// specdiff-sample: generates class-conditional digits with the C++ SD3 engine at full compute (no caching)
// and writes a PNG grid, one row per class. It also reports the shipped classifier's accuracy on the samples.
//
// Latents: sample k of the run (k = class * per_class + j) starts from quality::gaussian_noise(seed, stream = k),
// so any other program (an accelerated run, a benchmark) can regenerate exactly the same starting noise.
//
// Everything that can be checked before sampling is: option values and ranges, the model and classifier
// files, the output paths, the grid's size and the memory the run needs. Long runs report progress on stderr.

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <exception>
#include <filesystem>
#include <string>
#include <vector>

#include "quality/classifier.hpp"
#include "quality/cli.hpp"
#include "quality/default_model.hpp"
#include "quality/noise.hpp"
#include "quality/options.hpp"
#include "quality/png_grid.hpp"
#include "sd3/errors.hpp"
#include "sd3/files.hpp"
#include "sd3/model.hpp"
#include "sd3/resources.hpp"
#include "sd3/sampler.hpp"
#include "sd3/transformer.hpp"

namespace {

// Option bounds (docs/engine.md lists them). Counts are bounded so that their products fit 64 bits; the memory
// a run needs is then estimated and checked against the machine.
constexpr int max_count = 1 << 20;  // --per-class and --batch
constexpr int max_scale = 64;

struct options {
  std::filesystem::path model_dir = "models/mnist-sd3";
  int steps = 28;
  float cfg = 0.0f;    // unset: the model's sampling.json (quality::load_guidance_scale)
  bool cfg_given = false;
  double shift = 0.0;  // unset: the model's scheduler_config.json
  bool shift_given = false;
  std::string seed_text = "0";
  int per_class = 10;
  int classes = 10;
  int threads = 2;
  int batch = 10;
  int scale = 2;
  bool quiet = false;
  std::filesystem::path out = "docs/img/samples_full.png";
  std::filesystem::path raw;  // optional: the unclamped samples as raw little-endian float32 [N, C, H, W]
};

// Prints "step k of n" lines on stderr, at most every few seconds and only once a run has lasted that long,
// so short runs stay silent and a long one is never mute.
class progress_report {
 public:
  progress_report(long long total_steps, bool enabled) : total_(total_steps), enabled_(enabled) {}
  void step_done() {
    ++done_;
    if (!enabled_) return;
    const auto now = clock::now();
    if (now - last_ < interval) return;
    last_ = now;
    const double elapsed = std::chrono::duration<double>(now - start_).count();
    const double left = elapsed / static_cast<double>(done_) * static_cast<double>(total_ - done_);
    std::fprintf(stderr, "specdiff-sample: step %lld of %lld (%.1f%%), %.0f s elapsed, about %.0f s left\n", done_, total_,
                 100.0 * static_cast<double>(done_) / static_cast<double>(total_), elapsed, left);
  }

 private:
  using clock = std::chrono::steady_clock;
  static constexpr std::chrono::seconds interval{5};
  long long total_, done_ = 0;
  bool enabled_;
  clock::time_point start_ = clock::now(), last_ = clock::now();
};

int run(const options& opt) {
  using clock = std::chrono::steady_clock;
  const std::uint64_t seed = quality::parse_seed(opt.seed_text);
  // Outputs first: a path that cannot be written, --out and --raw naming one file, or an output that is one of the
  // model's files are reported before minutes of sampling.
  if (!opt.out.empty() && opt.out.has_parent_path()) sd3::prepare_output_folder(opt.out.parent_path(), "--out folder");
  sd3::file_plan plan;
  if (!opt.out.empty()) plan.output(opt.out, "--out");
  if (!opt.raw.empty()) plan.output(opt.raw, "--raw");
  plan.input(opt.model_dir, "--model");
  plan.check();

  const auto model = sd3::model::load(opt.model_dir / "transformer");
  const auto table = quality::class_embeddings::load(opt.model_dir);
  const auto classifier = quality::digit_classifier::load(opt.model_dir);
  const double shift = opt.shift_given ? opt.shift : quality::load_scheduler_shift(opt.model_dir);
  const float guidance = opt.cfg_given ? opt.cfg : static_cast<float>(quality::load_guidance_scale(opt.model_dir));
  const auto& cfg = model.config;
  if (opt.classes > table.null_class)
    throw std::invalid_argument(sd3::message("--classes: ", opt.classes, " is out of range; allowed: 1 to ", table.null_class,
                                             " (the model's labelled classes)"));
  if (table.pooled_dim != cfg.pooled_projection_dim || table.joint_attention_dim != cfg.joint_attention_dim)
    throw std::invalid_argument(sd3::message("model '", sd3::path_excerpt(opt.model_dir.string()),
                                             "': class embeddings (pooled ", table.pooled_dim, ", context ",
                                             table.joint_attention_dim, ") do not match the transformer (pooled_projection_dim ",
                                             cfg.pooled_projection_dim, ", joint_attention_dim ", cfg.joint_attention_dim, ")"));
  if (cfg.in_channels != cfg.out_channels)
    throw std::invalid_argument(sd3::message("model '", sd3::path_excerpt(opt.model_dir.string()), "': in_channels ",
                                             cfg.in_channels, " != out_channels ", cfg.out_channels));
  // The classifier judges the samples: a transformer of another image size is refused now, not after sampling.
  if (static_cast<std::size_t>(cfg.sample_size) != classifier.input_height() || static_cast<std::size_t>(cfg.sample_size) != classifier.input_width() ||
      static_cast<std::size_t>(cfg.in_channels) != classifier.input_channels())
    throw std::invalid_argument(sd3::message("model '", sd3::path_excerpt(opt.model_dir.string()), "': transformer/config.json sample_size ",
                                             cfg.sample_size, " and in_channels ", cfg.in_channels, " do not match the classifier's input ",
                                             classifier.input_channels(), "x", classifier.input_height(), "x", classifier.input_width(),
                                             " (classifier.json)"));
  const int side = cfg.sample_size, channels = cfg.in_channels;
  const std::size_t latent = sd3::saturating_product(channels, side, side);
  const std::int64_t total64 = std::int64_t{opt.classes} * opt.per_class;  // both <= 2^20: no overflow
  const int batch = static_cast<int>(std::min<std::int64_t>(opt.batch, total64));  // a larger batch would only waste memory
  // The images of the whole run stay in memory (for the grid); the engine checks its own workspaces.
  sd3::require_memory(sd3::message(total64, " samples (--classes ", opt.classes, " x --per-class ",
                                   opt.per_class, ") of ", channels, "x", side, "x", side),
                      sd3::saturating_product(total64, latent, 2 * sizeof(float)));  // the samples, and their clamped copy
  // The engine refuses limits whose workspaces would not fit, before allocating them.
  sd3::transformer net(model, {.max_batch = 2 * batch, .max_context_tokens = table.context_tokens}, opt.threads);
  if (!opt.out.empty())
    quality::grid_size(static_cast<std::size_t>(total64), static_cast<std::size_t>(channels), static_cast<std::size_t>(side),
                       static_cast<std::size_t>(side),
                       {.columns = static_cast<std::size_t>(opt.per_class), .scale = static_cast<std::size_t>(opt.scale)});
  const int total = static_cast<int>(total64);
  const sd3::flow_match_euler scheduler(opt.steps, shift);

  std::vector<int> labels(static_cast<std::size_t>(total));
  for (int k = 0; k < total; ++k) labels[static_cast<std::size_t>(k)] = k / opt.per_class;
  std::vector<float> images(static_cast<std::size_t>(total) * latent);
  const long long batches = (total + batch - 1) / batch;
  progress_report progress(batches * opt.steps, !opt.quiet);
  const auto start = clock::now();
  for (int first = 0; first < total; first += batch) {
    const int b = std::min(batch, total - first);
    const auto ub = static_cast<std::size_t>(b);
    const auto noise = quality::sample_latents(ub, latent, seed, static_cast<std::uint64_t>(first));
    const std::span<const int> batch_labels(labels.data() + first, ub);
    const std::vector<int> null_labels(ub, table.null_class);
    const std::size_t ctx = static_cast<std::size_t>(table.context_tokens) * table.joint_attention_dim;
    std::vector<float> context(ub * ctx), negative_context(ub * ctx);
    std::vector<float> pooled(ub * table.pooled_dim), negative_pooled(ub * table.pooled_dim);
    table.gather(batch_labels, context, pooled);
    table.gather(null_labels, negative_context, negative_pooled);
    const sd3::cfg_inputs in{.batch = b, .height = side, .width = side, .context_tokens = table.context_tokens,
                             .noise = noise, .context = context, .negative_context = negative_context,
                             .pooled = pooled, .negative_pooled = negative_pooled};
    const auto out = sd3::sample_cfg(net, scheduler, in, guidance, {},
                                     [&](int, float, std::span<const float>) { progress.step_done(); });
    std::copy(out.begin(), out.end(), images.begin() + static_cast<std::ptrdiff_t>(first * latent));
  }
  const double seconds = std::chrono::duration<double>(clock::now() - start).count();
  if (!opt.raw.empty())
    sd3::write_file(opt.raw, {reinterpret_cast<const char*>(images.data()), images.size() * sizeof(float)}, "--raw");
  // The model's data range is [-1, 1]; samples may overshoot slightly, the classifier and the grid see them clamped.
  for (float& v : images) v = std::clamp(v, -1.0f, 1.0f);

  const quality::image_batch grid_batch{images, static_cast<std::size_t>(total), static_cast<std::size_t>(channels),
                                        static_cast<std::size_t>(side), static_cast<std::size_t>(side)};
  if (!opt.out.empty()) {
    quality::write_png_grid(opt.out, grid_batch, {.columns = static_cast<std::size_t>(opt.per_class),
                                                  .scale = static_cast<std::size_t>(opt.scale)});
  }
  const auto predicted = classifier.predict(grid_batch);
  std::vector<int> correct(static_cast<std::size_t>(opt.classes), 0);
  int total_correct = 0;
  for (int k = 0; k < total; ++k) {
    const bool ok = predicted[static_cast<std::size_t>(k)] == labels[static_cast<std::size_t>(k)];
    correct[static_cast<std::size_t>(labels[static_cast<std::size_t>(k)])] += ok;
    total_correct += ok;
  }
  std::printf("model %s: %d layers, hidden %d, %d image tokens; steps %d, shift %.2f, cfg %.2f, seed %llu, threads %d\n",
              opt.model_dir.string().c_str(), cfg.num_layers, cfg.hidden(),
              (side / cfg.patch_size) * (side / cfg.patch_size), opt.steps, shift, static_cast<double>(guidance),
              static_cast<unsigned long long>(seed), opt.threads);
  std::printf("generated %d samples in %.2f s (%.3f s/sample)\n", total, seconds, seconds / total);
  std::printf("per-class accuracy:");
  for (int c = 0; c < opt.classes; ++c) std::printf(" %d:%d/%d", c, correct[static_cast<std::size_t>(c)], opt.per_class);
  std::printf("\nclassifier accuracy %.3f (%d/%d)\n", static_cast<double>(total_correct) / total, total_correct, total);
  if (!opt.out.empty()) std::printf("wrote %s\n", opt.out.string().c_str());
  if (std::fflush(stdout) != 0) throw std::runtime_error("stdout: write failed");
  return 0;
}

using quality::cli::checked;
using quality::cli::integer_in;

}  // namespace

int main(int argc, char** argv) {
  options opt;
  CLI::App app{"Full-compute class grid of the default SpecDiff model (C++ SD3 engine), with classifier accuracy"};
  app.add_option("--model", opt.model_dir, "model folder (transformer/, class_embeddings.safetensors, ...)")->capture_default_str();
  quality::cli::add_steps(app, opt.steps);
  auto* cfg = quality::cli::add_cfg(app, opt.cfg, "classifier-free guidance scale (<= 1: no guidance; default: the model's sampling.json, else 4)");
  auto* shift = app.add_option("--shift", opt.shift, "scheduler shift (default: the model's scheduler_config.json)")
      ->check(checked([](const std::string& t) {
        return quality::check_real(t, 0.0, quality::max_scheduler_shift, quality::interval::open_below);
      }, "REAL in (0, 1000]"));
  quality::cli::add_seed(app, opt.seed_text, "noise seed, 0 to 2^64-1 (sample k uses Philox stream k)");
  app.add_option("--per-class", opt.per_class, "samples per class (grid columns)")->capture_default_str()->check(integer_in(1, max_count));
  app.add_option("--classes", opt.classes, "classes 0..N-1 to draw (grid rows)")->capture_default_str()->check(integer_in(1, max_count));
  app.add_option("--batch", opt.batch, "samples per engine call (the model batch is twice this with CFG)")
      ->capture_default_str()
      ->check(integer_in(1, max_count));
  quality::cli::add_threads(app, opt.threads, "engine threads");
  app.add_option("--scale", opt.scale, "PNG upscaling factor")->capture_default_str()->check(integer_in(1, max_scale));
  app.add_option("--out", opt.out, "PNG path (empty: no image)")->capture_default_str();
  app.add_option("--raw", opt.raw, "also write the unclamped samples as raw float32 [N, C, H, W]");
  app.add_flag("--quiet", opt.quiet, "no progress lines on stderr");
  if (const auto status = quality::cli::parse(app, argc, argv)) return *status;
  opt.shift_given = shift->count() > 0;
  opt.cfg_given = cfg->count() > 0;
  return quality::cli::run("specdiff-sample", [&] { return run(opt); });
}
