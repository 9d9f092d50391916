#include "demo/support.hpp"

#include <algorithm>
#include <cmath>
#include <sstream>
#include <stdexcept>

#include <nlohmann/json.hpp>

#include "quality/metrics.hpp"
#include "quality/noise.hpp"
#include "sd3/errors.hpp"
#include "sd3/files.hpp"
#include "sd3/json_input.hpp"
#include "sd3/resources.hpp"

namespace demo {

std::filesystem::path default_model_dir() { return std::filesystem::path(SPECDIFF_SOURCE_DIR) / "models" / "mnist-sd3"; }

conditional_model conditional_model::load(const std::filesystem::path& dir) {
  if (!std::filesystem::is_directory(dir)) throw std::runtime_error("model: " + dir.string() + " is not a folder");
  const auto net_dir = dir / "transformer";
  // The transformer's class, as diffusers' config.json names it in `_class_name` (each loader checks the file whole
  // and refuses the other's class).
  const auto config = sd3::read_json_file(net_dir / "config.json", "model", "transformer config");
  const auto name = config.is_object() ? config.find("_class_name") : config.end();
  const bool is_flux = name != config.end() && name->is_string() && name->get<std::string>() == "FluxTransformer2DModel";
  conditional_model m{is_flux ? decltype(network){sd3::flux_model::load(net_dir)} : decltype(network){sd3::model::load(net_dir)},
                      quality::class_embeddings::load(dir), {}, quality::digit_classifier::load(dir),
                      quality::load_guidance_scale(dir), std::nullopt, 0, 0, 0, std::nullopt, {}, {}};
  // Older model folders have no reference statistics: FD is then reported as unavailable, not as an error.
  if (const auto reference = dir / quality::fd_reference_file_name; std::filesystem::exists(reference))
    m.fd_reference = quality::load_fd_reference(reference, m.classifier.feature_size());
  m.learned_c3 = methods::load_learned_c3(dir / methods::learned_c3_file_name);
  for (const auto& entry : std::filesystem::directory_iterator(dir))  // learned_forecast_N<interval>.json, each N
    if (const auto interval = methods::learned_forecast_interval(entry.path().filename().string()); interval && *interval <= max_forecast_interval)
      m.learned_forecast.emplace(*interval, *methods::load_learned_c3(entry.path()));
  for (const auto& entry : std::filesystem::directory_iterator(dir))  // learned_forecast_F<count>.json: placed full steps
    if (const auto count = methods::learned_forecast_steps_count(entry.path().filename().string()); count && *count <= max_forecast_interval) {
      auto steps = methods::learned_forecast_full_steps(entry.path());
      if (static_cast<int>(steps.size()) != *count)
        throw std::runtime_error(sd3::message("learned weights: ", entry.path().string(), ": calibration.full_steps lists ", steps.size(),
                                              " steps, the file name says ", *count));
      m.learned_forecast_steps.emplace(*count, std::pair{*methods::load_learned_c3(entry.path()), std::move(steps)});
    }
  auto fail = [&](const auto&... what) { throw std::runtime_error(sd3::message("model: ", dir.string(), ": ", what...)); };
  int pooled_dim = 0, joint_dim = 0, in_channels = 0;
  if (const auto* f = std::get_if<sd3::flux_model>(&m.network)) {
    // The images are the classifier's; the latents are them packed 2 x 2.
    m.image_channels = static_cast<int>(m.classifier.input_channels());
    m.image_height = static_cast<int>(m.classifier.input_height());
    m.image_width = static_cast<int>(m.classifier.input_width());
    if (f->config.in_channels != 4 * m.image_channels || m.image_height % 2 || m.image_width % 2)
      fail("FLUX in_channels ", f->config.in_channels, " must be 4 x the classifier's ", m.image_channels,
           " image channels, its image sides (", m.image_height, " x ", m.image_width, ") even");
    pooled_dim = f->config.pooled_projection_dim, joint_dim = f->config.joint_attention_dim;
  } else {
    const auto& c = std::get<sd3::model>(m.network).config;
    // The samples are the classifier's images: a transformer of another size is refused now, by name, before
    // any size is derived from sample_size (a huge one overflowed int here, issue 28) and before sampling.
    if (static_cast<std::size_t>(c.sample_size) != m.classifier.input_height() ||
        static_cast<std::size_t>(c.sample_size) != m.classifier.input_width() ||
        static_cast<std::size_t>(c.in_channels) != m.classifier.input_channels())
      fail("transformer/config.json sample_size ", c.sample_size, " and in_channels ", c.in_channels, " do not match the classifier's input ",
           m.classifier.input_channels(), "x", m.classifier.input_height(), "x", m.classifier.input_width(),
           " (classifier.json): the samples could not be judged");
    m.image_channels = c.in_channels, m.image_height = m.image_width = c.sample_size;
    in_channels = c.in_channels;
    pooled_dim = c.pooled_projection_dim, joint_dim = c.joint_attention_dim;
    if (c.out_channels != c.in_channels) fail("out_channels ", c.out_channels, " != in_channels ", in_channels);
  }
  m.schedule = quality::load_schedule(dir, m.image_tokens());
  if (m.classes.pooled_dim != pooled_dim || m.classes.joint_attention_dim != joint_dim)
    fail("class embeddings (pooled ", m.classes.pooled_dim, ", context ", m.classes.joint_attention_dim,
         ") do not match the transformer (pooled_projection_dim ", pooled_dim, ", joint_attention_dim ", joint_dim, ")");
  return m;
}

int conditional_model::image_tokens() const noexcept {
  if (flux()) return latent_height() * latent_width();
  const int p = std::get<sd3::model>(network).config.patch_size;
  return (image_height / p) * (image_width / p);
}
int conditional_model::blocks() const noexcept {
  if (const auto* f = std::get_if<sd3::flux_model>(&network)) return f->config.num_layers + f->config.num_single_layers;
  return std::get<sd3::model>(network).config.num_layers;
}
int conditional_model::hidden() const noexcept {
  return std::visit([](const auto& n) { return n.config.hidden(); }, network);
}
std::unique_ptr<sd3::transformer> conditional_model::engine(const sd3::engine_limits& limits, int threads) const {
  sd3::engine_limits l = limits;
  l.max_height = latent_height(), l.max_width = latent_width();
  return std::visit([&](const auto& n) { return std::make_unique<sd3::transformer>(n, l, threads); }, network);
}
std::vector<float> conditional_model::images(std::span<const float> latents) const {
  std::vector<float> out(latents.size());
  if (!flux()) {
    std::copy(latents.begin(), latents.end(), out.begin());
    return out;
  }
  const std::size_t per = static_cast<std::size_t>(image_channels) * image_height * image_width;
  sd3::flux_unpack_latents(static_cast<int>(latents.size() / per), image_channels, image_height, image_width, latents, out);
  return out;
}

sample_batch make_batch(const conditional_model& m, int samples, std::uint64_t seed, quality::noise_domain domain) {
  if (samples < 1) throw std::invalid_argument("samples: must be >= 1, got " + std::to_string(samples));
  const auto& e = m.classes;
  sample_batch b;
  b.height = m.latent_height(), b.width = m.latent_width();
  // The same noise image for every architecture; FLUX packs it as FluxPipeline.prepare_latents does.
  const std::size_t per = static_cast<std::size_t>(m.image_channels) * m.image_height * m.image_width;
  b.domain = domain;
  b.noise = quality::sample_latents(static_cast<std::size_t>(samples), per, seed, 0, domain);
  if (m.flux()) {
    std::vector<float> packed(b.noise.size());
    sd3::flux_pack_latents(samples, m.image_channels, m.image_height, m.image_width, b.noise, packed);
    b.noise = std::move(packed);
  }
  const int labelled = e.null_class;  // classes 0 .. null_class - 1
  for (int i = 0; i < samples; ++i) b.labels.push_back(i % labelled);
  const std::vector<int> nulls(static_cast<std::size_t>(samples), e.null_class);
  const std::size_t ctx = static_cast<std::size_t>(samples) * e.context_tokens * e.joint_attention_dim, pool = static_cast<std::size_t>(samples) * e.pooled_dim;
  b.context.resize(ctx), b.negative_context.resize(ctx), b.pooled.resize(pool), b.negative_pooled.resize(pool);
  e.gather(b.labels, b.context, b.pooled);
  e.gather(nulls, b.negative_context, b.negative_pooled);
  return b;
}

methods::problem make_problem(sd3::transformer& net, const conditional_model& m, const sample_batch& b, int steps,
                              std::optional<float> guidance) {
  methods::problem p;
  p.net = &net;
  p.inputs.batch = static_cast<int>(b.labels.size());
  p.inputs.height = b.height;
  p.inputs.width = b.width;
  p.inputs.context_tokens = m.classes.context_tokens;
  p.inputs.noise = b.noise;
  p.inputs.context = b.context;
  p.inputs.negative_context = b.negative_context;
  p.inputs.pooled = b.pooled;
  p.inputs.negative_pooled = b.negative_pooled;
  p.steps = steps;
  p.guidance = guidance.value_or(static_cast<float>(m.guidance));
  p.schedule = m.schedule;
  return p;
}

std::vector<std::string> calibration_noise_overlaps(const std::filesystem::path& model_dir, std::uint64_t seed) {
  std::vector<std::string> found;
  if (!std::filesystem::is_directory(model_dir)) return found;
  std::vector<std::filesystem::path> files;
  for (const auto& entry : std::filesystem::directory_iterator(model_dir)) {
    const auto name = entry.path().filename().string();
    if (name == methods::learned_c3_file_name || methods::learned_forecast_interval(name) || methods::learned_forecast_steps_count(name))
      files.push_back(entry.path());
  }
  std::ranges::sort(files);
  for (const auto& file : files) {
    const auto calibration = sd3::parse_json(methods::learned_c3_calibration(file));
    const auto noise = calibration.find("noise");
    if (noise != calibration.end() && noise->is_string() && noise->get<std::string>() == quality::noise_domain_name(quality::noise_domain::calibration))
      continue;  // fitted on calibration noise: a key space no evaluation draws from
    const auto s = calibration.find("seed");
    if (s == calibration.end() || !s->is_number_unsigned())
      found.push_back(sd3::message(file.string(), " records neither its calibration noise nor its seed; refit it with specdiff-calibrate"));
    else if (s->get<std::uint64_t>() == seed)
      found.push_back(sd3::message(file.string(), " was fitted on the evaluation noise of seed ", seed,
                                   " (a file from before the calibration key space): evaluating --seed ", seed,
                                   " would judge it on its own calibration trajectories; refit it with specdiff-calibrate or pick another --seed"));
  }
  return found;
}

void refuse_calibration_noise(const std::filesystem::path& model_dir, std::uint64_t seed) {
  const auto found = calibration_noise_overlaps(model_dir, seed);
  if (found.empty()) return;
  std::string text = "evaluation on calibration noise refused:";
  for (const auto& f : found) text += "\n  " + f;
  throw std::invalid_argument(text);
}

std::unique_ptr<workload> make_workload(const std::filesystem::path& model_dir, int samples, std::uint64_t seed, int steps,
                                        std::optional<float> guidance, int threads, quality::noise_domain domain) {
  if (samples < 1) throw std::invalid_argument(sd3::message("samples: must be >= 1, got ", samples));
  if (domain == quality::noise_domain::evaluation) refuse_calibration_noise(model_dir, seed);
  auto w = std::make_unique<workload>(workload{conditional_model::load(model_dir), {}, nullptr, {}});
  // The largest per-run state of any method, checked before anything is sized from `samples`: per block, the
  // CFG batch's image rows at up to three sites (MMDiT-X: two attentions and the MLP) with up to three cached
  // steps each (TaylorSeer order 2) and the token-level methods' K/V, which that bounds; the engine checks its own
  // workspaces when it is built.
  const auto& m = w->model;
  const std::size_t rows = sd3::saturating_product(2 * std::int64_t{samples}, m.image_tokens());
  sd3::require_memory(sd3::message("demo: the methods' caches for ", samples, " samples"),
                      sd3::saturating_product(m.blocks(), rows, m.hidden(), 3 * (1 + 3), sizeof(float)));
  w->batch = make_batch(w->model, samples, seed, domain);
  sd3::engine_limits limits;
  limits.max_batch = 2 * samples;
  limits.max_context_tokens = w->model.classes.context_tokens;
  w->net = w->model.engine(limits, threads);
  w->problem = make_problem(*w->net, w->model, w->batch, steps, guidance);
  return w;
}

nlohmann::json json_number(double v) {
  if (std::isfinite(v)) return v;
  return std::isnan(v) ? "nan" : v > 0 ? "inf" : "-inf";
}

void mark_non_finite(nlohmann::json& j) {
  if (j.is_number_float()) {
    j = json_number(j.get<double>());
  } else if (j.is_structured()) {
    for (auto& v : j) mark_non_finite(v);
  }
}

bool known_method(const std::string& name) { return std::ranges::find(method_names, name) != std::end(method_names); }

namespace {
// "a, b, c" from a list of names, and the error for a name not in it ("" when it is).
template <std::size_t N>
std::string joined(const char* const (&names)[N]) {
  std::string list;
  for (const char* name : names) list += (list.empty() ? "" : ", ") + std::string(name);
  return list;
}
template <std::size_t N>
std::string not_one_of(const char* const (&names)[N], const std::string& name, const char* what) {
  if (std::ranges::find(names, name) != std::end(names)) return "";
  return sd3::message("'", sd3::excerpt(name), "' is not ", what, "; allowed: ", joined(names));
}
}  // namespace

std::string dense_schedule_error(const std::string& name) { return not_one_of(dense_schedule_names, name, "a schedule"); }
std::string c3_rule_error(const std::string& name) { return not_one_of(c3_rule_names, name, "a C3 rule"); }
std::string method_list() { return joined(method_names); }

namespace {

// A token-level method's dense steps on the named schedule (none named: the method's own default).
template <class Options>
void apply_dense_schedule(Options& o, const std::optional<std::string>& dense) {
  if (!dense) return;
  if (const auto error = dense_schedule_error(*dense); !error.empty()) throw std::invalid_argument(sd3::message("dense schedule: ", error));
  if (*dense == "specdiff") {
    const methods::specdiff_options d;
    o.warmup_steps = d.warmup_steps, o.reset_steps = d.reset_steps;
  } else {
    const methods::ras_options d;
    o.warmup_steps = d.warmup_steps, o.reset_steps = d.reset_steps;
  }
}

// The spec's C3 rule (`fallback` when unset), checked against the learned table it needs.
methods::c3_rule c3_of(const method_spec& s, methods::c3_rule fallback, const char* file_name) {
  using rule = methods::c3_rule;
  rule r = fallback;
  if (s.c3) {
    if (const auto error = c3_rule_error(*s.c3); !error.empty()) throw std::invalid_argument(sd3::message("c3: ", error));
    if (*s.c3 == "tacache") {  // not a C3 rule of the accelerator: the forecast's TACache option (forecast_of)
      if (s.name != "forecast") throw std::invalid_argument(sd3::message("c3: 'tacache' is for --method forecast only, not ", s.name));
      return rule::latest;
    }
    r = *s.c3 == "latest"    ? rule::latest
        : *s.c3 == "taylor"  ? rule::linear
        : *s.c3 == "learned" ? rule::learned
        : *s.c3 == "foca"    ? rule::foca
                             : rule::specdiff;
  }
  if (r == rule::learned && s.learned_weights == nullptr)
    throw std::invalid_argument(sd3::message("c3: 'learned' needs the model folder's ", file_name, " (make it with specdiff-calibrate --model DIR",
                                             s.name != "forecast" ? std::string()
                                             : s.full_steps       ? sd3::message(" --method forecast --full-steps ", *s.full_steps)
                                                                  : sd3::message(" --method forecast --interval ", s.interval.value_or(3)),
                                             ")"));
  return r;
}

methods::specdiff_options specdiff_of(const method_spec& s) {
  methods::specdiff_options o = s.name == "specdiff-adaptive" ? methods::specdiff_adaptive_defaults(s.error_budget.value_or(0.05))
                                                              : methods::specdiff_options{};
  o.c3 = c3_of(s, o.c3, methods::learned_c3_file_name);
  o.learned_weights = s.learned_weights;
  o.cache_rate = s.cache_rate.value_or(o.cache_rate);
  if (s.cache_rate_min) {  // three buckets from cache_rate down to the minimum
    if (!(*s.cache_rate_min < o.cache_rate))
      throw std::invalid_argument(sd3::message("cache_rate_min: must be below the cache rate (", o.cache_rate, "), got ", *s.cache_rate_min));
    o.cache_rate_buckets = {o.cache_rate, 0.5 * (o.cache_rate + *s.cache_rate_min), *s.cache_rate_min};
  }
  o.spec_steps = s.spec_steps.value_or(o.spec_steps);
  if (s.interval) o.refresh_interval = *s.interval;
  apply_dense_schedule(o, s.dense);
  return o;
}
methods::forecast_options forecast_of(const method_spec& s) {
  methods::forecast_options o;
  o.interval = s.interval.value_or(o.interval);
  o.c3 = c3_of(s, o.c3, (s.full_steps ? methods::learned_forecast_steps_file_name(*s.full_steps) : methods::learned_forecast_file_name(o.interval)).c_str());
  if (s.full_steps) {
    if (s.interval || s.warmup || s.refresh)
      throw std::invalid_argument("full_steps: the placed full steps replace interval, warm-up and refresh; give none of them");
    if (s.full_step_list == nullptr)
      throw std::invalid_argument(sd3::message("full_steps: needs the model folder's ", methods::learned_forecast_steps_file_name(*s.full_steps),
                                               " (make it with specdiff-calibrate --model DIR --method forecast --full-steps ", *s.full_steps, ")"));
    o.full_steps = *s.full_step_list;
  }
  o.learned_weights = s.learned_weights;
  o.order = s.order.value_or(o.order);
  o.warmup_steps = s.warmup.value_or(o.warmup_steps);
  if (s.correct && !(*s.correct >= 0.0 && *s.correct <= 1.0))
    throw std::invalid_argument(sd3::message("correct: must lie in [0, 1], got ", *s.correct));
  o.correct = s.correct.value_or(0.0);
  if (s.c3 == "tacache") {
    if (s.tacache == nullptr)
      throw std::invalid_argument("c3: 'tacache' needs its statistics fitted on calibration noise for this schedule (methods::calibrate_tacache; "
                                  "specdiff-pareto fits them)");
    o.tacache = s.tacache;
  }
  if (s.refresh) {
    if (*s.refresh != "library" && *s.refresh != "diffusers")
      throw std::invalid_argument(sd3::message("refresh: '", sd3::excerpt(*s.refresh), "' is not a refresh rule; allowed: library, diffusers"));
    o.refresh = *s.refresh == "diffusers" ? methods::forecast_options::refresh_rule::diffusers : methods::forecast_options::refresh_rule::library;
  }
  return o;
}
methods::ras_options ras_of(const method_spec& s) {
  methods::ras_options o;
  o.cache_rate = s.cache_rate.value_or(o.cache_rate);
  apply_dense_schedule(o, s.dense);
  return o;
}
methods::fbcache_options fbcache_of(const method_spec& s) {
  methods::fbcache_options o;
  o.threshold = s.threshold.value_or(o.threshold);
  return o;
}
methods::teacache_options teacache_of(const method_spec& s) {
  methods::teacache_options o;
  o.threshold = s.threshold.value_or(o.threshold);
  return o;
}
// Peers' defaults (docs/results.md): ToCa FLUX (R = 0.1, N = 5, 3 full steps first), FORA (N = 3),
// TaylorSeer FLUX (N = 6, order 1, 3 full steps first).
methods::module_cache_options module_of(const method_spec& s) {
  using kind = methods::module_cache_options::kind;
  methods::module_cache_options o;
  if (s.name == "toca") {
    o.method = kind::toca;
    o.interval = s.interval.value_or(5);
    o.warmup_steps = 3;
    o.cache_rate = s.cache_rate.value_or(0.9);
  } else if (s.name == "fora") {
    o.method = kind::fora;
    o.interval = s.interval.value_or(3);
    o.warmup_steps = 1;
  } else {
    o.method = kind::taylorseer;
    o.interval = s.interval.value_or(6);
    o.warmup_steps = 3;
    o.order = s.order.value_or(1);
  }
  return o;
}

}  // namespace

std::unique_ptr<methods::tacache_table> fit_tacache(const std::filesystem::path& model_dir, const method_spec& spec, int steps,
                                                    std::optional<float> cfg, int threads) {
  if (spec.name != "forecast") throw std::invalid_argument(sd3::message("c3: 'tacache' is for --method forecast only, not ", spec.name));
  method_spec schedule = spec;  // the schedule only: the statistics do not depend on the rule or the corrector
  schedule.c3 = "latest", schedule.correct.reset(), schedule.tacache = nullptr, schedule.learned_weights = nullptr;
  const auto calibration = make_workload(model_dir, 8, 1000, steps, cfg, threads, quality::noise_domain::calibration);
  auto table = std::make_unique<methods::tacache_table>();
  (void)methods::calibrate_tacache(calibration->problem, forecast_of(schedule), *table);
  return table;
}

std::string method_spec::describe() const {
  std::ostringstream os;
  os << name;
  if (name == "specdiff" || name == "specdiff-adaptive") {
    const auto o = specdiff_of(*this);
    os << " cr=" << o.cache_rate << " S=" << o.spec_steps;
    if (name == "specdiff-adaptive") os << " budget=" << o.error_budget;
    if (cache_rate_min) os << " cr_min=" << *cache_rate_min;
    if (c3) os << " c3=" << *c3;
  } else if (name == "forecast") {
    if (full_steps) os << " F=" << *full_steps << " c3=" << c3.value_or("learned");
    else os << " N=" << interval.value_or(methods::forecast_options{}.interval) << " c3=" << c3.value_or("learned");
    if (order && c3 == "taylor") os << " O=" << *order;
    if (warmup) os << " W=" << *warmup;
    if (refresh) os << " refresh=" << *refresh;
    if (correct) os << " corr=" << *correct;
  } else if (name == "ras") {
    os << " cr=" << ras_of(*this).cache_rate;
  } else if (name == "fbcache") {
    os << " t=" << fbcache_of(*this).threshold;
  } else if (name == "teacache") {
    os << " t=" << teacache_of(*this).threshold;
  } else if (name == "toca") {
    const auto o = module_of(*this);
    os << " N=" << o.interval << " cr=" << o.cache_rate;
  } else if (name == "fora") {
    os << " N=" << module_of(*this).interval;
  } else if (name == "taylorseer") {
    const auto o = module_of(*this);
    os << " N=" << o.interval << " O=" << o.order;
  } else if (name == "steps") {
    os << " n=" << fast_steps.value_or(10);
  }
  if (dense) os << " dense=" << *dense;
  return os.str();
}

methods::specdiff_options specdiff_options_of(const method_spec& spec) { return specdiff_of(spec); }
methods::forecast_options forecast_options_of(const method_spec& spec) { return forecast_of(spec); }

const specdiff::learned_table* conditional_model::learned_weights_for(const method_spec& spec) const {
  if (spec.name != "forecast") return learned_c3 ? &*learned_c3 : nullptr;
  if (spec.full_steps) {
    const auto it = learned_forecast_steps.find(*spec.full_steps);
    return it == learned_forecast_steps.end() ? nullptr : &it->second.first;
  }
  const auto it = learned_forecast.find(spec.interval.value_or(methods::forecast_options{}.interval));
  return it == learned_forecast.end() ? nullptr : &it->second;
}

const std::vector<int>* conditional_model::full_steps_for(const method_spec& spec) const {
  if (spec.name != "forecast" || !spec.full_steps) return nullptr;
  const auto it = learned_forecast_steps.find(*spec.full_steps);
  return it == learned_forecast_steps.end() ? nullptr : &it->second.second;
}

namespace {
[[noreturn]] void unknown_method(const std::string& name) {
  throw std::invalid_argument(sd3::message("method: unknown '", sd3::excerpt(name), "' (", method_list(), ")"));
}
}  // namespace

void check_method(const method_spec& s) {
  if (s.name == "specdiff" || s.name == "specdiff-adaptive") (void)specdiff_of(s);
  else if (s.name == "forecast") (void)forecast_of(s);
  else if (s.name == "ras") (void)ras_of(s);
  else if (s.name == "toca" || s.name == "fora" || s.name == "taylorseer") (void)module_of(s);
  else if (!known_method(s.name)) unknown_method(s.name);
}

std::string learned_weights_mismatch(const method_spec& s, const methods::problem& p) {
  const specdiff::learned_table* table = nullptr;
  std::string file;
  if (s.name == "specdiff" || s.name == "specdiff-adaptive") {
    if (specdiff_of(s).c3 == methods::c3_rule::learned) table = s.learned_weights, file = methods::learned_c3_file_name;
  } else if (s.name == "forecast") {
    const auto o = forecast_of(s);
    if (o.c3 == methods::c3_rule::learned)
      table = s.learned_weights,
      file = s.full_steps ? methods::learned_forecast_steps_file_name(*s.full_steps) : methods::learned_forecast_file_name(o.interval);
  }
  if (table == nullptr) return "";
  const auto grid = p.schedule(p.steps).timesteps();
  const auto calibrate = sd3::message("; make weights for this run with specdiff-calibrate --model DIR --steps ", p.steps,
                                      s.name != "forecast" ? std::string()
                                      : s.full_steps       ? sd3::message(" --method forecast --full-steps ", *s.full_steps)
                                                           : sd3::message(" --method forecast --interval ", forecast_of(s).interval),
                                      ", or choose another --c3 rule");
  if (static_cast<std::size_t>(table->steps()) != grid.size())
    return sd3::message("--steps ", p.steps, ": --method ", s.name, " reads the model's ", file, ", which holds weights for ", table->steps(),
                        " steps", calibrate);
  for (std::size_t i = 0; i < grid.size(); ++i)
    if (grid[i] != table->timesteps()[i])
      return sd3::message("--steps ", p.steps, ": --method ", s.name, " reads the model's ", file, ", fitted on another time grid (step ", i,
                          " at t = ", table->timesteps()[i], ", this run's at t = ", grid[i], ")", calibrate);
  return "";
}

void check_method(const method_spec& s, const methods::problem& p) {
  check_method(s);
  if (const auto why = learned_weights_mismatch(s, p); !why.empty()) throw std::invalid_argument(why);
}

methods::run_result run_method(const methods::problem& p, const method_spec& s, const methods::progress_fn& progress) {
  if (s.name == "full") return methods::run_full(p, progress);
  if (s.name == "steps") return methods::run_steps(p, s.fast_steps.value_or(10), progress);
  if (s.name == "specdiff" || s.name == "specdiff-adaptive") return methods::run_specdiff(p, specdiff_of(s), progress);
  if (s.name == "forecast") return methods::run_forecast(p, forecast_of(s), progress);
  if (s.name == "ras") return methods::run_ras(p, ras_of(s), progress);
  if (s.name == "toca" || s.name == "fora" || s.name == "taylorseer") return methods::run_module_cache(p, module_of(s), progress);
  if (s.name == "fbcache") return methods::run_fbcache(p, fbcache_of(s), progress);
  if (s.name == "teacache") return methods::run_teacache(p, teacache_of(s), progress);
  unknown_method(s.name);
}

std::vector<float> clamped_images(const conditional_model& m, std::span<const float> latents) {
  std::vector<float> out = m.images(latents);
  for (auto& x : out) x = std::clamp(x, -1.f, 1.f);
  return out;
}

quality::image_batch as_image_batch(const conditional_model& m, const sample_batch& b, std::span<const float> images) {
  return {images, b.labels.size(), static_cast<std::size_t>(m.image_channels), static_cast<std::size_t>(m.image_height),
          static_cast<std::size_t>(m.image_width)};
}

double class_accuracy(const conditional_model& m, const sample_batch& b, std::span<const float> latents) {
  const auto clamped = clamped_images(m, latents);
  return m.classifier.accuracy(as_image_batch(m, b, clamped), b.labels);
}

quality_report evaluate(const conditional_model& m, const sample_batch& b, std::span<const float> reference, std::span<const float> latents) {
  const auto ref = clamped_images(m, reference), img = clamped_images(m, latents);
  const auto ref_batch = as_image_batch(m, b, ref), img_batch = as_image_batch(m, b, img);
  quality_report r;
  const double psnr = quality::mean_psnr(ref_batch, img_batch, 2.0);
  if (std::isfinite(psnr)) r.psnr_db = psnr;
  r.ssim = quality::mean_ssim(ref_batch, img_batch, 2.0);
  r.class_acc = m.classifier.accuracy(img_batch, b.labels);  // on the clamped images, as class_accuracy does
  if (fd_unavailable_reason(m, b).empty()) r.fd = quality::classifier_fd(m.classifier, img_batch, *m.fd_reference);
  return r;
}

std::string fd_unavailable_reason(const conditional_model& m, const sample_batch& b) {
  if (!m.fd_reference) return sd3::message("the model folder has no ", quality::fd_reference_file_name);
  if (b.labels.size() < 2) return "it needs at least 2 samples";
  return "";
}

std::optional<double> image_fd(const conditional_model& m, const sample_batch& b, std::span<const float> latents) {
  if (!fd_unavailable_reason(m, b).empty()) return std::nullopt;
  const auto clamped = clamped_images(m, latents);  // as class_accuracy measures them
  return quality::classifier_fd(m.classifier, as_image_batch(m, b, clamped), *m.fd_reference);
}

}  // namespace demo
