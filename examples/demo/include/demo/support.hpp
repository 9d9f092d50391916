// What the demo and the Pareto benchmark share: the default model with its class conditioning, problems
// built from a seed, methods chosen by name, and the quality of a run against full RFlow.
#pragma once

#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <variant>
#include <vector>

#include <nlohmann/json.hpp>

#include "methods/learned_file.hpp"
#include "methods/methods.hpp"
#include "quality/classifier.hpp"
#include "quality/default_model.hpp"
#include "quality/frechet.hpp"
#include "quality/noise.hpp"
#include "sd3/flux_model.hpp"
#include "sd3/model.hpp"
#include "sd3/transformer.hpp"

namespace demo {

/// The default model folder of the source tree (models/mnist-sd3).
std::filesystem::path default_model_dir();

/// A class-conditional model in pixel space, SD3 (models/mnist-sd3, canvas-sd3) or FLUX (models/mnist-flux): the
/// transformer (the folder's transformer/config.json names its class), a class-embedding table feeding both
/// paths (pooled projection and context tokens; the last row is the null class for CFG), the schedule it samples
/// with, the digit classifier that judges its samples, and the statistics of the classifier's features over
/// held-out real images that the Fréchet distance compares with (empty for a folder without fd_reference.safetensors).
/// A FLUX model's latents are its images packed 2 x 2 into tokens (FluxPipeline's layout).
struct conditional_model {
  std::variant<sd3::model, sd3::flux_model> network;
  quality::class_embeddings classes;
  sd3::schedule_rule schedule;
  quality::digit_classifier classifier;
  double guidance = quality::default_guidance_scale;  ///< the folder's sampling.json (quality::load_guidance_scale)
  std::optional<quality::feature_statistics> fd_reference;
  int image_channels = 0, image_height = 0, image_width = 0;  ///< the samples as images (the classifier's input)
  /// The folder's learned weights (made by specdiff-calibrate; empty if none): SpecDiff-adaptive's C3 rule
  /// (methods::learned_c3_file_name) and the output forecast's per full-step interval (learned_forecast_file_name).
  std::optional<specdiff::learned_table> learned_c3;
  std::map<int, specdiff::learned_table> learned_forecast;
  /// The forecast's calibrations with placed full steps (methods::learned_forecast_steps_file_name), per count: the
  /// table and its full steps.
  std::map<int, std::pair<specdiff::learned_table, std::vector<int>>> learned_forecast_steps;
  /// The full steps a forecast spec with `full_steps` runs on (nullptr: not such a spec, or the folder has none).
  const std::vector<int>* full_steps_for(const struct method_spec& spec) const;
  /// The table a spec's learned C3 rule reads (nullptr: the folder has none for it).
  const specdiff::learned_table* learned_weights_for(const struct method_spec& spec) const;

  static conditional_model load(const std::filesystem::path& dir);
  bool flux() const noexcept { return network.index() == 1; }
  /// forward_inputs' height and width: the image (SD3, pixel space) or its token grid (FLUX).
  int latent_height() const noexcept { return flux() ? image_height / 2 : image_height; }
  int latent_width() const noexcept { return flux() ? image_width / 2 : image_width; }
  /// The image tokens of one sample, and the engine's and a method's per-layer state sized by them.
  int image_tokens() const noexcept;
  int blocks() const noexcept;
  int hidden() const noexcept;
  std::unique_ptr<sd3::transformer> engine(const sd3::engine_limits& limits, int threads) const;
  /// Latents [samples, ...] as images [samples, channels, height, width]: a copy (SD3) or unpacked (FLUX).
  std::vector<float> images(std::span<const float> latents) const;
};

/// The inputs of one batch of samples: noise from (seed, sample i's stream in `domain`: stream i for evaluation,
/// quality::noise_stream), labels i % classes, the class rows.
struct sample_batch {
  quality::noise_domain domain = quality::noise_domain::evaluation;
  std::vector<int> labels;
  std::vector<float> noise, context, negative_context, pooled, negative_pooled;
  int height = 0, width = 0;
};
sample_batch make_batch(const conditional_model& m, int samples, std::uint64_t seed,
                        quality::noise_domain domain = quality::noise_domain::evaluation);
/// `guidance`: the CFG scale; empty = the model's (conditional_model::guidance).
methods::problem make_problem(sd3::transformer& net, const conditional_model& m, const sample_batch& b, int steps,
                              std::optional<float> guidance);

/// Everything a run needs, built once: the model, a batch from the seed, an engine sized for the CFG
/// batch, and the problem over them (it points into this object, which therefore stays put).
struct workload {
  conditional_model model;
  sample_batch batch;
  std::unique_ptr<sd3::transformer> net;
  methods::problem problem;
};
/// The learned files in `model_dir` whose calibration drew *evaluation* noise of `seed` (files from before the
/// calibration key space, whose `calibration` object has no "noise": "calibration", and whose seed is `seed`): a
/// run evaluated on that seed would be judged on the trajectories its weights were fitted on. One message per file
/// naming it; empty when there is none. Files that record neither domain nor seed are reported too.
std::vector<std::string> calibration_noise_overlaps(const std::filesystem::path& model_dir, std::uint64_t seed);
/// Throws std::invalid_argument with every calibration_noise_overlaps message (the demo and the benchmarks call
/// it through make_workload for evaluation noise).
void refuse_calibration_noise(const std::filesystem::path& model_dir, std::uint64_t seed);
/// Builds the workload; with evaluation noise (the default) it first refuses a seed whose noise some learned file
/// of the folder was fitted on (refuse_calibration_noise).
std::unique_ptr<workload> make_workload(const std::filesystem::path& model_dir, int samples, std::uint64_t seed, int steps,
                                        std::optional<float> guidance,
                                        int threads, quality::noise_domain domain = quality::noise_domain::evaluation);

/// A measured number as the results' JSON writes it: itself when finite, else the string "inf", "-inf" or "nan"
/// (JSON has no such numbers and nlohmann would write null, which the results reserve for "not measured").
nlohmann::json json_number(double v);
/// Every non-finite number in `j`, at any depth, replaced as json_number does (before dump()).
void mark_non_finite(nlohmann::json& j);

/// The methods, as the command line names them (docs/methods.md).
inline constexpr const char* method_names[] = {"full",       "specdiff", "specdiff-adaptive", "forecast", "ras", "toca", "fora",
                                               "taylorseer", "fbcache",  "teacache",          "steps"};
/// The C3 rules of the SpecDiff methods (methods::specdiff_options::c3_rule).
/// The largest full-step interval the demo accepts (--interval), and so the largest N of a learned_forecast_N file.
inline constexpr int max_forecast_interval = 1000;
/// The C3 rules of the token-level methods (methods::c3_rule).
inline constexpr const char* c3_rule_names[] = {"specdiff", "latest", "taylor", "learned", "foca", "tacache"};
/// The dense-step schedules of the token-level methods, by whose default they are: SpecDiff's (2 warm-up steps +
/// a reset at 14) and RAS's (4 + {12, 20}). Either method can run on either, for comparisons at equal schedules.
inline constexpr const char* dense_schedule_names[] = {"specdiff", "ras"};

/// A method and its settings, as the command line names them. Unset settings take the method's default.
struct method_spec {
  std::string name = "specdiff";  ///< one of method_names
  // Each member has an initializer so that designated initializers may name only some ({.name = "fora",
  // .interval = 4}) under -Wmissing-field-initializers.
  std::optional<double> cache_rate = {};
  std::optional<int> spec_steps = {}, interval = {}, order = {}, fast_steps = {};
  /// forecast: warm-up steps and the refresh rule after them ("library" or "diffusers": methods::forecast_options)
  std::optional<int> warmup = {};
  std::optional<std::string> refresh = {};
  /// forecast: run on the model folder's placed full steps for this count (learned_forecast_F<count>.json; the steps
  /// themselves in `full_step_list`, set with learned_weights by conditional_model::full_steps_for)
  std::optional<int> full_steps = {};
  const std::vector<int>* full_step_list = nullptr;
  std::optional<double> threshold = {};   ///< fbcache, teacache: the gate's threshold
  std::optional<std::string> dense = {};  ///< specdiff, ras: one of dense_schedule_names
  std::optional<double> error_budget = {};  ///< specdiff-adaptive (default 0.05)
  /// specdiff-adaptive: the cache rate moves between cache_rate and this in three buckets with the verified error
  std::optional<double> cache_rate_min = {};
  std::optional<std::string> c3 = {};       ///< specdiff, specdiff-adaptive, forecast: one of c3_rule_names
  /// c3 = learned: the weights (the model folder's, conditional_model::learned_c3); not owned.
  const specdiff::learned_table* learned_weights = nullptr;
  /// forecast: the predictor-corrector's weight in [0, 1] (methods::forecast_options::correct; none = 0, off)
  std::optional<double> correct = {};
  /// forecast, c3 = tacache: TACache's statistics for this spec's schedule (methods::calibrate_tacache on calibration
  /// noise; the program fits them, as specdiff-pareto does); not owned.
  const methods::tacache_table* tacache = nullptr;
  /// The settings actually used (defaults filled in), for tables and JSON.
  std::string describe() const;
};
methods::run_result run_method(const methods::problem& p, const method_spec& spec, const methods::progress_fn& progress = {});
/// TACache's statistics for a forecast spec's schedule (its interval and warm-up, or its placed full steps: set
/// full_step_list first), fitted by methods::calibrate_tacache on calibration noise — the calibration key space, seed
/// 1000, 8 samples, as the learned files are — at `steps` and the guidance `cfg` (the model's when empty).
std::unique_ptr<methods::tacache_table> fit_tacache(const std::filesystem::path& model_dir, const method_spec& spec, int steps,
                                                    std::optional<float> cfg, int threads);
/// Throws what run_method would throw for the spec's settings (a C3 rule without its learned weights, an
/// unknown schedule, ...), without running anything: programs check before the first, untimed full run.
void check_method(const method_spec& spec);
/// check_method, and the learned weights the spec reads (if any) against the problem's own time grid: weights
/// fitted for 28 steps are refused for a run of 10 before any sampling, naming --steps and the file
/// (std::invalid_argument; learned_weights_mismatch says why without throwing, "" when they fit or none are read).
void check_method(const method_spec& spec, const methods::problem& p);
std::string learned_weights_mismatch(const method_spec& spec, const methods::problem& p);
/// The options a specdiff or specdiff-adaptive spec runs with (defaults filled in, --c3 and --dense applied).
methods::specdiff_options specdiff_options_of(const method_spec& spec);
/// The options a forecast spec runs with.
methods::forecast_options forecast_options_of(const method_spec& spec);
bool known_method(const std::string& name);
/// "full, specdiff, ..." for messages and help texts.
std::string method_list();
/// Empty for one of dense_schedule_names, else "'NAME' is not a schedule; allowed: ...".
std::string dense_schedule_error(const std::string& name);
/// Empty for one of c3_rule_names, else "'NAME' is not a C3 rule; allowed: ...".
std::string c3_rule_error(const std::string& name);

/// Quality of a run's images against full RFlow's, both clamped to the image range [-1, 1]. These take a run's
/// latents (methods::run_result::latents) and judge them as images (conditional_model::images).
struct quality_report {
  std::optional<double> psnr_db;  ///< empty when the images are identical (infinite PSNR)
  double ssim = 1.0;
  double class_acc = 0.0;         ///< the classifier's accuracy against the requested labels
  std::optional<double> fd;       ///< image_fd of the run's images
};
quality_report evaluate(const conditional_model& m, const sample_batch& b, std::span<const float> reference, std::span<const float> latents);
double class_accuracy(const conditional_model& m, const sample_batch& b, std::span<const float> latents);
/// Fréchet distance between the classifier features of the (clamped) images and the model's reference set;
/// empty when the model has no reference statistics or the batch has fewer than 2 samples. With few samples
/// it is biased upward: compare it only between runs of the same sample count.
std::optional<double> image_fd(const conditional_model& m, const sample_batch& b, std::span<const float> latents);
/// Why image_fd is empty for this model and batch ("" when it is not).
std::string fd_unavailable_reason(const conditional_model& m, const sample_batch& b);
/// A run's latents as images clamped to [-1, 1].
std::vector<float> clamped_images(const conditional_model& m, std::span<const float> latents);
/// A batch's images (already clamped) as the quality tools take them.
quality::image_batch as_image_batch(const conditional_model& m, const sample_batch& b, std::span<const float> images);

}  // namespace demo
