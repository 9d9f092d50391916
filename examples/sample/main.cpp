// specdiff-sample: generates class-conditional digits with the C++ SD3 engine at full compute (no caching)
// and writes a PNG grid, one row per class. It also reports the shipped classifier's accuracy on the samples.
//
// Latents: sample k of the run (k = class * per_class + j) starts from quality::gaussian_noise(seed, stream = k),
// so any other program (an accelerated run, a benchmark) can regenerate exactly the same starting noise.

#include <CLI/CLI.hpp>
#include <chrono>
#include <cstdio>
#include <exception>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "quality/classifier.hpp"
#include "quality/default_model.hpp"
#include "quality/noise.hpp"
#include "quality/png_grid.hpp"
#include "sd3/model.hpp"
#include "sd3/sampler.hpp"
#include "sd3/transformer.hpp"

namespace {

struct options {
  std::filesystem::path model_dir = "models/mnist-sd3";
  int steps = 28;
  float cfg = 4.0f;
  double shift = 0.0;  // 0 = the model's scheduler_config.json
  std::uint64_t seed = 0;
  int per_class = 10;
  int classes = 10;
  int threads = 2;
  int batch = 10;
  int scale = 2;
  std::filesystem::path out = "docs/img/samples_full.png";
  std::filesystem::path raw;  // optional: the unclamped samples as raw little-endian float32 [N, C, H, W]
};

int run(const options& opt) {
  using clock = std::chrono::steady_clock;
  const auto model = sd3::model::load(opt.model_dir / "transformer");
  const auto table = quality::class_embeddings::load(opt.model_dir);
  const double shift = opt.shift > 0.0 ? opt.shift : quality::load_scheduler_shift(opt.model_dir);
  const auto& cfg = model.config;
  if (opt.classes < 1 || opt.classes > table.null_class) {
    throw std::invalid_argument("--classes must be in [1, " + std::to_string(table.null_class) + "], got " +
                                std::to_string(opt.classes));
  }
  if (opt.per_class < 1 || opt.batch < 1 || opt.steps < 1 || opt.threads < 1 || opt.scale < 1) {
    throw std::invalid_argument("--per-class, --batch, --steps, --threads and --scale must be >= 1");
  }
  const int side = cfg.sample_size, channels = cfg.in_channels;
  const std::size_t latent = static_cast<std::size_t>(channels) * side * side;
  const int total = opt.classes * opt.per_class;

  sd3::transformer net(model, {.max_batch = 2 * opt.batch, .max_context_tokens = table.context_tokens}, opt.threads);
  const sd3::flow_match_euler scheduler(opt.steps, shift);

  std::vector<int> labels(static_cast<std::size_t>(total));
  for (int k = 0; k < total; ++k) labels[static_cast<std::size_t>(k)] = k / opt.per_class;
  std::vector<float> images(static_cast<std::size_t>(total) * latent);
  const auto start = clock::now();
  for (int first = 0; first < total; first += opt.batch) {
    const int b = std::min(opt.batch, total - first);
    const auto ub = static_cast<std::size_t>(b);
    const auto noise = quality::sample_latents(ub, latent, opt.seed, static_cast<std::uint64_t>(first));
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
    const auto out = sd3::sample_cfg(net, scheduler, in, opt.cfg);
    std::copy(out.begin(), out.end(), images.begin() + static_cast<std::ptrdiff_t>(first * latent));
  }
  const double seconds = std::chrono::duration<double>(clock::now() - start).count();
  if (!opt.raw.empty()) {
    std::ofstream raw(opt.raw, std::ios::binary);
    raw.write(reinterpret_cast<const char*>(images.data()), static_cast<std::streamsize>(images.size() * sizeof(float)));
    if (!raw) throw std::runtime_error("--raw: could not write '" + opt.raw.string() + "'");
  }
  // The model's data range is [-1, 1]; samples may overshoot slightly, the classifier and the grid see them clamped.
  for (float& v : images) v = std::clamp(v, -1.0f, 1.0f);

  const quality::image_batch batch{images, static_cast<std::size_t>(total), static_cast<std::size_t>(channels),
                                   static_cast<std::size_t>(side), static_cast<std::size_t>(side)};
  if (!opt.out.empty()) {
    if (opt.out.has_parent_path()) std::filesystem::create_directories(opt.out.parent_path());
    quality::write_png_grid(opt.out, batch, {.columns = static_cast<std::size_t>(opt.per_class),
                                             .scale = static_cast<std::size_t>(opt.scale)});
  }
  const auto classifier = quality::digit_classifier::load(opt.model_dir);
  const auto predicted = classifier.predict(batch);
  std::vector<int> correct(static_cast<std::size_t>(opt.classes), 0);
  int total_correct = 0;
  for (int k = 0; k < total; ++k) {
    const bool ok = predicted[static_cast<std::size_t>(k)] == labels[static_cast<std::size_t>(k)];
    correct[static_cast<std::size_t>(labels[static_cast<std::size_t>(k)])] += ok;
    total_correct += ok;
  }
  std::printf("model %s: %d layers, hidden %d, %d image tokens; steps %d, shift %.2f, cfg %.2f, seed %llu, threads %d\n",
              opt.model_dir.string().c_str(), cfg.num_layers, cfg.hidden(),
              (side / cfg.patch_size) * (side / cfg.patch_size), opt.steps, shift, static_cast<double>(opt.cfg),
              static_cast<unsigned long long>(opt.seed), opt.threads);
  std::printf("generated %d samples in %.2f s (%.3f s/sample)\n", total, seconds, seconds / total);
  std::printf("per-class accuracy:");
  for (int c = 0; c < opt.classes; ++c) std::printf(" %d:%d/%d", c, correct[static_cast<std::size_t>(c)], opt.per_class);
  std::printf("\nclassifier accuracy %.3f (%d/%d)\n", static_cast<double>(total_correct) / total, total_correct, total);
  if (!opt.out.empty()) std::printf("wrote %s\n", opt.out.string().c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  options opt;
  CLI::App app{"Full-compute class grid of the default SpecDiff model (C++ SD3 engine), with classifier accuracy"};
  app.add_option("--model", opt.model_dir, "model folder (transformer/, class_embeddings.safetensors, ...)")->capture_default_str();
  app.add_option("--steps", opt.steps, "sampling steps")->capture_default_str();
  app.add_option("--cfg", opt.cfg, "classifier-free guidance scale (<= 1: no guidance)")->capture_default_str();
  app.add_option("--shift", opt.shift, "scheduler shift (0: the model's scheduler_config.json)")->capture_default_str();
  app.add_option("--seed", opt.seed, "noise seed (sample k uses Philox stream k)")->capture_default_str();
  app.add_option("--per-class", opt.per_class, "samples per class (grid columns)")->capture_default_str();
  app.add_option("--classes", opt.classes, "classes 0..N-1 to draw (grid rows)")->capture_default_str();
  app.add_option("--batch", opt.batch, "samples per engine call (the model batch is twice this with CFG)")->capture_default_str();
  app.add_option("--threads", opt.threads, "engine threads")->capture_default_str();
  app.add_option("--scale", opt.scale, "PNG upscaling factor")->capture_default_str();
  app.add_option("--out", opt.out, "PNG path (empty: no image)")->capture_default_str();
  app.add_option("--raw", opt.raw, "also write the unclamped samples as raw float32 [N, C, H, W]");
  CLI11_PARSE(app, argc, argv);
  try {
    return run(opt);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "specdiff-sample: %s\n", e.what());
    return 1;
  }
}
