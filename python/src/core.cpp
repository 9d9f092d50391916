// specdiff._core: the library's accelerator over caller memory (NumPy arrays, CPU torch tensors through DLPack:
// no copy), composed as the C++ methods compose it (examples/methods: run_specdiff, run_forecast), plus the
// engine's noise generator and the learned-weights file format. Every decision (scores, plans, levels, stores,
// approximators, schedules, verification, learned weights) is the headers'; Python only runs the network.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/unique_ptr.h>
#include <nanobind/stl/vector.h>

#include <cstdint>
#include <limits>
#include <memory>
#include <optional>
#include <span>
#include <stdexcept>
#include <string>
#include <vector>

#include <specdiff/specdiff.hpp>

#include "methods/learned_file.hpp"
#include "methods/methods.hpp"
#include "quality/metrics.hpp"
#include "quality/noise.hpp"

#include "dense_steps.hpp"

#ifdef SPECDIFF_PY_CUDA
#include "device.hpp"
#endif

namespace nb = nanobind;
using specdiff::index_t;

namespace {

using specdiff_python::within;

using const_rows = nb::ndarray<const float, nb::ndim<2>, nb::c_contig, nb::device::cpu>;
using rows_out = nb::ndarray<float, nb::ndim<2>, nb::c_contig, nb::device::cpu>;
using const_vector = nb::ndarray<const float, nb::ndim<1>, nb::c_contig, nb::device::cpu>;

specdiff::matrix_view<const float> view(const const_rows& a, const char* name) {
  if (a.shape(0) > static_cast<std::size_t>(std::numeric_limits<index_t>::max()) || a.shape(1) > static_cast<std::size_t>(std::numeric_limits<index_t>::max()))
    throw std::invalid_argument(std::string(name) + ": too many rows or columns");
  return {a.data(), static_cast<index_t>(a.shape(0)), static_cast<index_t>(a.shape(1))};
}
specdiff::matrix_view<float> view(const rows_out& a, const char* name) {
  if (a.shape(0) > static_cast<std::size_t>(std::numeric_limits<index_t>::max()) || a.shape(1) > static_cast<std::size_t>(std::numeric_limits<index_t>::max()))
    throw std::invalid_argument(std::string(name) + ": too many rows or columns");
  return {a.data(), static_cast<index_t>(a.shape(0)), static_cast<index_t>(a.shape(1))};
}
std::span<const float> span_of(const std::optional<const_vector>& a) {
  if (!a) return {};
  return {a->data(), a->shape(0)};
}

// One composed accelerator behind a virtual interface (the policies are template arguments).
class method {
 public:
  virtual ~method() = default;
  virtual void begin_speculation(std::span<const float> timesteps) = 0;
  virtual void record_speculation(index_t step, std::span<const float> attention) = 0;
  virtual index_t plan_step(index_t k, float t) = 0;
  virtual std::span<const index_t> compute_tokens() const = 0;
  virtual bool dense() const = 0;
  virtual void complete_step(specdiff::matrix_view<const float> computed, specdiff::matrix_view<float> output, std::span<const float> attention) = 0;
  virtual void complete_step_in_place(specdiff::matrix_view<float> output, std::span<const float> attention) = 0;
  virtual void abandon() = 0;
  virtual void reset() = 0;
  virtual std::vector<float> verified_error() const = 0;
  virtual float last_error() const = 0;
  virtual const specdiff::accelerator_config& config() const = 0;
  virtual bool reads_attention() const = 0;
  virtual bool speculates() const = 0;
  virtual index_t next_step() const = 0;
};

template <class Acc>
class method_of final : public method {
 public:
  // `step_tags`: the accelerator is handed steps - k instead of t (the forecast's Taylor rule over step indices).
  template <class... Args>
  explicit method_of(bool step_tags, Args&&... args) : acc_(std::forward<Args>(args)...), step_tags_(step_tags) {}
  void begin_speculation(std::span<const float> timesteps) override { acc_.begin_speculation(timesteps); }
  void record_speculation(index_t step, std::span<const float> attention) override { acc_.record_speculation(step, attention); }
  index_t plan_step(index_t k, float t) override {
    if (step_) throw std::logic_error("plan_step: step " + std::to_string(step_->index()) + " is planned and not completed; complete_step it first");
    step_.emplace(acc_.plan_step(k, step_tags_ ? static_cast<float>(acc_.config().steps - k) : t));
    return step_->compute_count();
  }
  std::span<const index_t> compute_tokens() const override { return live().compute_tokens(); }
  bool dense() const override { return live().dense(); }
  void complete_step(specdiff::matrix_view<const float> computed, specdiff::matrix_view<float> output, std::span<const float> attention) override {
    live();
    acc_.complete_step(std::move(*step_), computed, output, attention);  // throws before consuming on bad input
    step_.reset();
  }
  void complete_step_in_place(specdiff::matrix_view<float> output, std::span<const float> attention) override {
    live();
    acc_.complete_step(std::move(*step_), output, attention);
    step_.reset();
  }
  void abandon() override { step_.reset(); }
  void reset() override {
    step_.reset();
    acc_.reset();
  }
  std::vector<float> verified_error() const override {
    const auto v = acc_.verified_error();
    return {v.begin(), v.end()};
  }
  float last_error() const override { return acc_.feedback().last_error; }
  const specdiff::accelerator_config& config() const override { return acc_.config(); }
  bool reads_attention() const override { return specdiff::has(Acc::scorer_type::needs, specdiff::signal::attention); }
  bool speculates() const override { return !std::is_same_v<typename Acc::predictor_type, specdiff::no_speculation>; }
  index_t next_step() const override { return acc_.next_step(); }

 private:
  const typename Acc::step& live() const {
    if (!step_) throw std::logic_error("no step is planned: call plan_step first");
    return *step_;
  }
  Acc acc_;
  std::optional<typename Acc::step> step_;
  bool step_tags_;
};

template <class Scorer, class Predictor, class Classifier, class Schedule, class Approx>
std::unique_ptr<method> make(bool step_tags, const specdiff::accelerator_config& c, Scorer s, Predictor p, Classifier cl, Schedule sch, Approx a) {
  using acc = specdiff::accelerator<Scorer, Predictor, Classifier, Schedule, Approx>;
  return std::make_unique<method_of<acc>>(step_tags, c, std::move(s), std::move(p), std::move(cl), std::move(sch), a);
}

template <class Run>
std::unique_ptr<method> with_c3(const std::string& c3, const specdiff::learned_table* learned, std::span<const float> timesteps, Run&& run) {
  if (c3 == "specdiff") return run(specdiff::specdiff_weighted{});
  if (c3 == "latest") return run(specdiff::latest{});
  if (c3 == "taylor" || c3 == "linear") return run(specdiff::linear{});
  if (c3 == "learned") {
    if (learned == nullptr) throw std::invalid_argument("c3: 'learned' needs learned weights (a calibration)");
    return run(learned->approximator<3>(timesteps));
  }
  throw std::invalid_argument("c3: '" + c3 + "' is not a C3 rule; allowed: specdiff, latest, taylor, learned");
}

// SpecDiff and SpecDiff-adaptive (methods::run_specdiff's composition, its default ranking).
std::unique_ptr<method> make_specdiff(int tokens, int batch, int steps, int feature_dim, bool share_cfg_plan, double cache_rate, int spec_steps,
                                      double reuse_mass, int warmup_steps, int refresh_interval, const std::vector<int>& dense_steps,
                                      float starvation_scale, double error_budget, int max_partial_steps, const std::vector<double>& cache_rate_buckets,
                                      float bucket_error_step, const std::string& c3, const specdiff::learned_table* learned,
                                      const std::vector<float>& timesteps) {
  const specdiff::accelerator_config config{.tokens = tokens, .batch = batch, .steps = steps, .feature_dim = feature_dim, .share_cfg_plan = share_cfg_plan};
  const specdiff::error_budget_schedule schedule{.fixed = {warmup_steps, refresh_interval, spec_steps, within(dense_steps, steps)},
                                                 .error_budget = static_cast<float>(error_budget),
                                                 .max_partial_steps = max_partial_steps};
  auto classifier = cache_rate_buckets.empty() ? specdiff::three_level_classifier(cache_rate, reuse_mass)
                                               : specdiff::three_level_classifier(cache_rate_buckets, bucket_error_step, reuse_mass);
  return with_c3(c3, learned, timesteps, [&](auto approx) {
    if (spec_steps <= 0)
      return make(false, config, specdiff::specdiff_scorer{starvation_scale}, specdiff::no_speculation{}, classifier, schedule, approx);
    return make(false, config, specdiff::specdiff_scorer{starvation_scale}, specdiff::self_speculation{}, classifier, schedule, approx);
  });
}

// The output forecast (methods::run_forecast's composition).
std::unique_ptr<method> make_forecast(int tokens, int batch, int steps, int feature_dim, int interval, int warmup_steps, const std::string& c3,
                                      int order, bool step_variable, const specdiff::learned_table* learned, const std::vector<float>& timesteps) {
  if (interval < 1) throw std::invalid_argument("interval: must be >= 1, got " + std::to_string(interval));
  if (warmup_steps < 1) throw std::invalid_argument("warmup_steps: must be >= 1, got " + std::to_string(warmup_steps));
  if (order < 1 || order > 2) throw std::invalid_argument("order: must be 1 or 2, got " + std::to_string(order));
  const specdiff::accelerator_config config{.tokens = tokens, .batch = batch, .steps = steps, .feature_dim = feature_dim};
  const specdiff::step_schedule schedule{warmup_steps, interval, 0, {}};
  const bool linear = c3 == "taylor" || c3 == "linear";
  const bool tags = linear && step_variable;
  if (linear && order == 2)
    return make(tags, config, specdiff::uniform_scorer{}, specdiff::no_speculation{}, specdiff::all_approximate_classifier{}, schedule,
                specdiff::taylorseer<2>{});
  return with_c3(c3, learned, timesteps, [&](auto approx) {
    return make(tags, config, specdiff::uniform_scorer{}, specdiff::no_speculation{}, specdiff::all_approximate_classifier{}, schedule, approx);
  });
}

// The learned forecast's calibration on full runs (methods::calibrate_forecast's loop): each full step's rows are
// cached; every other step adds each row's (cached history, true row) pair to the least-squares moments.
class forecast_calibration {
 public:
  forecast_calibration(const std::vector<float>& timesteps, int rows, int feature_dim, int interval, int warmup_steps, int depth)
      : fit_(timesteps, depth),
        schedule_{warmup_steps, interval, 0, {}},
        store_({.layers = 1, .sites = 1, .tokens = rows, .dim = feature_dim, .history_depth = depth}),
        all_(static_cast<std::size_t>(rows)) {
    if (interval < 1) throw std::invalid_argument("interval: must be >= 1, got " + std::to_string(interval));
    if (warmup_steps < 1) throw std::invalid_argument("warmup_steps: must be >= 1, got " + std::to_string(warmup_steps));
    schedule_.validate(static_cast<index_t>(timesteps.size()));
    for (int i = 0; i < rows; ++i) all_[static_cast<std::size_t>(i)] = i;
  }
  void begin_run() { store_.clear(); }
  void observe(int step, const const_rows& rows) {
    const auto v = view(rows, "rows");
    const auto steps = static_cast<index_t>(fit_.timesteps().size());
    specdiff::detail::expect_index("step", step, steps);
    if (step == 0 || schedule_.is_dense(step, steps)) store_.write(0, 0, fit_.timesteps()[static_cast<std::size_t>(step)], v);
    else fit_.add(store_, 0, 0, step, all_, v, all_);
  }
  std::size_t pairs(int step, int n) const { return fit_.pairs(step, n); }
  specdiff::learned_table solve(double ridge, std::size_t min_pairs) const { return fit_.solve(ridge, min_pairs); }

 private:
  specdiff::history_fit fit_;
  specdiff::step_schedule schedule_;
  specdiff::host_cache_store<float> store_;
  std::vector<index_t> all_;
};


#ifdef SPECDIFF_PY_CUDA
// A torch CUDA tensor (or any DLPack array) handed to the device accelerator: checked here, by name, since a typed
// nanobind signature would refuse it with a generic overload error that names no argument.
struct device_array {
  float* data;
  index_t rows, cols;
};
device_array device_rows(const nb::ndarray<>& a, const char* name, int device, std::size_t ndim) {
  if (a.device_type() != nb::device::cuda::value)
    throw std::invalid_argument(std::string(name) + ": not a CUDA tensor (DLPack device type " + std::to_string(a.device_type()) +
                                "); the device accelerator takes CUDA tensors on device " + std::to_string(device));
  if (a.device_id() != device)
    throw std::invalid_argument(std::string(name) + ": on CUDA device " + std::to_string(a.device_id()) + "; the accelerator lives on device " +
                                std::to_string(device));
  if (a.dtype() != nb::dtype<float>())
    throw std::invalid_argument(std::string(name) + ": dtype is not float32 (DLPack code " + std::to_string(a.dtype().code) + ", " +
                                std::to_string(a.dtype().bits) + " bits); the accelerator's rows and signals are float32");
  if (a.ndim() != ndim)
    throw std::invalid_argument(std::string(name) + ": " + std::to_string(a.ndim()) + " dimensions; expected " + std::to_string(ndim));
  const std::size_t cols = ndim == 2 ? a.shape(1) : 1;
  if (a.size() > 0 && ((ndim == 2 && a.shape(0) > 1 && a.stride(0) != static_cast<int64_t>(cols)) || (a.shape(ndim - 1) > 1 && a.stride(ndim - 1) != 1)))
    throw std::invalid_argument(std::string(name) + ": not C-contiguous; pass tensor.contiguous()");
  if (a.size() > static_cast<std::size_t>(std::numeric_limits<index_t>::max()))
    throw std::invalid_argument(std::string(name) + ": too many elements");
  return {static_cast<float*>(a.data()), static_cast<index_t>(ndim == 2 ? a.shape(0) : a.shape(0)), static_cast<index_t>(cols)};
}
#endif

}  // namespace

NB_MODULE(_core, m) {
  m.doc() = "SpecDiff's C++ accelerator over CPU tensors (zero-copy), the engine's noise, the learned-weights files";
  nb::register_exception_translator([](const std::exception_ptr& p, void*) {
    try {
      std::rethrow_exception(p);
    } catch (const std::logic_error& e) {  // invalid_argument derives from logic_error: keep it a ValueError
      if (dynamic_cast<const std::invalid_argument*>(&e) || dynamic_cast<const std::out_of_range*>(&e) || dynamic_cast<const std::length_error*>(&e))
        PyErr_SetString(PyExc_ValueError, e.what());
      else
        PyErr_SetString(PyExc_RuntimeError, e.what());
    }
  });

  nb::class_<specdiff::learned_table>(m, "LearnedTable", "Per-step least-squares weights of a C3 / forecast rule (specdiff::learned_table)")
      .def(nb::init<std::vector<float>, int, std::vector<float>>(), nb::arg("timesteps"), nb::arg("depth"), nb::arg("weights"))
      .def_prop_ro("steps", &specdiff::learned_table::steps)
      .def_prop_ro("depth", &specdiff::learned_table::depth)
      .def_prop_ro("timesteps", [](const specdiff::learned_table& t) { return std::vector<float>(t.timesteps().begin(), t.timesteps().end()); })
      .def("weights", [](const specdiff::learned_table& t, int step, int n) { auto w = t.weights(step, n); return std::vector<float>(w.begin(), w.end()); },
           nb::arg("step"), nb::arg("n"));
  m.def("load_learned", [](const std::string& path) { return methods::load_learned_c3(path); }, nb::arg("path"),
        "Reads a learned-weights file (learned_c3.json / learned_forecast_N<k>.json); None when the path does not exist.");
  m.def("learned_json", [](const specdiff::learned_table& t, const std::string& calibration) { return methods::learned_c3_json(t, calibration); },
        nb::arg("table"), nb::arg("calibration") = "{}", "The file text of a learned table (`calibration`: a JSON object's text).");
  m.def("learned_forecast_file_name", &methods::learned_forecast_file_name, nb::arg("interval"));

  m.def("sample_latents", [](std::size_t samples, std::size_t per_sample, std::uint64_t seed, std::uint64_t first_sample) {
          auto* v = new std::vector<float>(quality::sample_latents(samples, per_sample, seed, first_sample));
          nb::capsule owner(v, [](void* p) noexcept { delete static_cast<std::vector<float>*>(p); });
          return nb::ndarray<nb::numpy, float, nb::ndim<2>>(v->data(), {samples, per_sample}, owner);
        },
        nb::arg("samples"), nb::arg("per_sample"), nb::arg("seed"), nb::arg("first_sample") = 0,
        "The engine's initial latents (quality::sample_latents: Philox4x32-10 + portable Box-Muller), [samples, per_sample] float32: "
        "sample k draws stream k of `seed`, the same values as the C++ demo and tools.");

  // The step-level gate of FBCache / TeaCache (specdiff::relative_change_gate, step_cache.hpp) and the change it
  // reads (specdiff::relative_l1): the decision stays in the header; Python measures the proxy and keeps the caches.
  nb::class_<specdiff::relative_change_gate>(m, "StepGate", "specdiff::relative_change_gate: skip a step while the (rescaled, optionally "
                                                            "accumulated) relative change of a proxy stays below the threshold")
      .def("__init__",
           [](specdiff::relative_change_gate* g, double threshold, int warmup_steps, int max_consecutive_skips, int max_skips, bool accumulate,
              bool compute_last, const std::string& rescale) {
             specdiff::gate_options o;
             o.threshold = threshold;
             o.warmup_steps = warmup_steps;
             o.max_consecutive_skips = max_consecutive_skips;
             o.max_skips = max_skips;
             o.accumulate = accumulate;
             o.compute_last = compute_last;
             if (rescale == "teacache_flux") o.rescale = specdiff::change_rescale::teacache_flux();
             else if (rescale != "identity") throw std::invalid_argument("rescale: '" + rescale + "'; allowed: identity, teacache_flux");
             new (g) specdiff::relative_change_gate(o);
           },
           nb::arg("threshold"), nb::arg("warmup_steps") = 0, nb::arg("max_consecutive_skips") = -1, nb::arg("max_skips") = -1,
           nb::arg("accumulate") = false, nb::arg("compute_last") = false, nb::arg("rescale") = "identity")
      .def("advance", &specdiff::relative_change_gate::advance, nb::arg("step"), nb::arg("steps"), nb::arg("change"),
           "Decides step `step` of `steps` for the measured change (inf: no reference yet) and keeps the state; True = compute")
      .def("reset", &specdiff::relative_change_gate::reset)
      .def_prop_ro("skips", [](const specdiff::relative_change_gate& g) { return g.state().skips; });
  using any_floats = nb::ndarray<const float, nb::c_contig, nb::device::cpu>;
  m.def("relative_l1", [](const any_floats& now, const any_floats& before) {
    return specdiff::relative_l1({now.data(), now.size()}, {before.data(), before.size()});
  }, nb::arg("now").noconvert(), nb::arg("before").noconvert(), "specdiff::relative_l1: sum|now - before| / sum|before|, accumulated in double");

  // The C++ tools' image metrics (quality/metrics.hpp: per-image PSNR and Gaussian-window SSIM, averaged), so that a
  // benchmark in Python reports the same numbers as specdiff-demo / specdiff-pareto for the same images.
  using images4 = nb::ndarray<const float, nb::ndim<4>, nb::c_contig, nb::device::cpu>;
  m.def("image_quality", [](const images4& reference, const images4& images, double data_range) {
    for (std::size_t d = 0; d < 4; ++d)
      if (reference.shape(d) != images.shape(d))
        throw std::invalid_argument("images: shape differs from reference's in dimension " + std::to_string(d));
    auto batch = [](const images4& a) {
      return quality::image_batch{{a.data(), a.size()}, a.shape(0), a.shape(1), a.shape(2), a.shape(3)};
    };
    const auto ref = batch(reference), img = batch(images);
    return std::make_pair(quality::mean_psnr(ref, img, data_range), quality::mean_ssim(ref, img, data_range));
  }, nb::arg("reference"), nb::arg("images"), nb::arg("data_range") = 2.0,
     "(mean PSNR dB, mean SSIM) of images [N, C, H, W] against reference, float32 C-contiguous: quality::mean_psnr / mean_ssim, "
     "as the C++ tools compute them (clamp first where they do).");

  // The forecast's warm-up when the config leaves it unset: the C++ method's own rule (methods::forecast_options::warmup),
  // so the Python default cannot drift from the demo's.
  m.def("forecast_default_warmup", [](int interval) {
    if (interval < 1) throw std::invalid_argument("interval: must be >= 1, got " + std::to_string(interval));
    return methods::forecast_options{.interval = interval}.warmup();
  }, nb::arg("interval"));
  m.def("aligned_speculative_timesteps",
        [](const std::vector<float>& main, int spec_steps, int warmup_steps, int refresh_interval, const std::vector<int>& dense_steps) {
          const int steps = static_cast<int>(main.size());
          const specdiff::step_schedule s{warmup_steps, refresh_interval, spec_steps, within(dense_steps, steps)};
          return specdiff::aligned_speculative_timesteps(std::span<const float>(main), spec_steps, s);
        },
        nb::arg("main_timesteps"), nb::arg("spec_steps"), nb::arg("warmup_steps"), nb::arg("refresh_interval"), nb::arg("dense_steps"));

  nb::class_<method>(m, "Accelerator", "A composed specdiff::accelerator (make it with specdiff_accelerator / forecast_accelerator)")
      .def("begin_speculation", [](method& a, const std::vector<float>& t) { a.begin_speculation(t); }, nb::arg("timesteps"))
      .def("record_speculation", [](method& a, int s, const const_vector& att) { a.record_speculation(s, {att.data(), att.shape(0)}); },
           nb::arg("step"), nb::arg("attention").noconvert())
      .def("plan_step", &method::plan_step, nb::arg("k"), nb::arg("t"), "Plans main step k at timestep t; returns C1 tokens per sample.")
      .def("compute_tokens",
           [](nb::handle self) {
             const method& a = nb::cast<const method&>(self);
             const auto ids = a.compute_tokens();
             const auto batch = static_cast<std::size_t>(a.config().batch);
             // A view of the accelerator's buffer (no copy): valid until the next plan_step.
             return nb::ndarray<nb::numpy, const std::int32_t, nb::ndim<2>>(ids.data(), {batch, ids.size() / batch}, self);
           },
           "[batch, compute_count] C1 token ids of the planned step, each row ascending (a view, valid until the next plan_step)")
      .def_prop_ro("dense", &method::dense)
      .def("complete_step",
           [](method& a, const const_rows& computed, const rows_out& output, const std::optional<const_vector>& attention) {
             a.complete_step(view(computed, "computed"), view(output, "output"), span_of(attention));
           },
           nb::arg("computed").noconvert(), nb::arg("output").noconvert(), nb::arg("attention").noconvert().none() = nb::none(),
           "computed: [batch * compute_count, F] rows of the C1 tokens, sample by sample; output: [batch * tokens, F], filled whole")
      .def("complete_step_in_place",
           [](method& a, const rows_out& output, const std::optional<const_vector>& attention) { a.complete_step_in_place(view(output, "output"), span_of(attention)); },
           nb::arg("output").noconvert(), nb::arg("attention").noconvert().none() = nb::none())
      .def("abandon", &method::abandon)
      .def("reset", &method::reset)
      .def_prop_ro("verified_error", &method::verified_error)
      .def_prop_ro("last_error", &method::last_error)
      .def_prop_ro("reads_attention", &method::reads_attention)
      .def_prop_ro("speculates", &method::speculates)
      .def_prop_ro("next_step", &method::next_step)
      .def_prop_ro("tokens", [](const method& a) { return a.config().tokens; })
      .def_prop_ro("batch", [](const method& a) { return a.config().batch; })
      .def_prop_ro("steps", [](const method& a) { return a.config().steps; })
      .def_prop_ro("feature_dim", [](const method& a) { return a.config().feature_dim; });

  m.def("specdiff_accelerator",
        [](int tokens, int batch, int steps, int feature_dim, bool share_cfg_plan, double cache_rate, int spec_steps, double reuse_mass, int warmup_steps,
           int refresh_interval, const std::vector<int>& dense_steps, float starvation_scale, double error_budget, int max_partial_steps,
           const std::vector<double>& cache_rate_buckets, float bucket_error_step, const std::string& c3, const specdiff::learned_table* learned,
           const std::vector<float>& timesteps) {
          return make_specdiff(tokens, batch, steps, feature_dim, share_cfg_plan, cache_rate, spec_steps, reuse_mass, warmup_steps, refresh_interval,
                               dense_steps, starvation_scale, error_budget, max_partial_steps, cache_rate_buckets, bucket_error_step, c3, learned, timesteps);
        },
        nb::arg("tokens"), nb::arg("batch"), nb::arg("steps"), nb::arg("feature_dim"), nb::arg("share_cfg_plan"), nb::arg("cache_rate"),
        nb::arg("spec_steps"), nb::arg("reuse_mass"), nb::arg("warmup_steps"), nb::arg("refresh_interval"), nb::arg("dense_steps"),
        nb::arg("starvation_scale"), nb::arg("error_budget"), nb::arg("max_partial_steps"), nb::arg("cache_rate_buckets"), nb::arg("bucket_error_step"),
        nb::arg("c3"), nb::arg("learned").none(), nb::arg("timesteps"), nb::keep_alive<0, 18>());
  m.def("forecast_accelerator", &make_forecast, nb::arg("tokens"), nb::arg("batch"), nb::arg("steps"), nb::arg("feature_dim"), nb::arg("interval"),
        nb::arg("warmup_steps"), nb::arg("c3"), nb::arg("order"), nb::arg("step_variable"), nb::arg("learned").none(), nb::arg("timesteps"),
        nb::keep_alive<0, 10>());

  nb::class_<forecast_calibration>(m, "ForecastCalibration", "The learned forecast's least-squares fit over full runs (calibrate_forecast's loop)")
      .def(nb::init<const std::vector<float>&, int, int, int, int, int>(), nb::arg("timesteps"), nb::arg("rows"), nb::arg("feature_dim"),
           nb::arg("interval"), nb::arg("warmup_steps"), nb::arg("depth") = 3)
      .def("begin_run", &forecast_calibration::begin_run)
      .def("observe", &forecast_calibration::observe, nb::arg("step"), nb::arg("rows").noconvert())
      .def("pairs", &forecast_calibration::pairs, nb::arg("step"), nb::arg("n"))
      .def("solve", &forecast_calibration::solve, nb::arg("ridge") = 1e-3, nb::arg("min_pairs") = 16);

#ifdef SPECDIFF_PY_CUDA
  using specdiff_python::device_method;
  m.attr("cuda") = true;
  m.def("cuda_device_count", &specdiff_python::device_count, "CUDA devices the runtime sees (0 without a driver or device)");
  nb::class_<device_method>(m, "DeviceAccelerator",
                            "specdiff::gpu::accelerator over CUDA tensors (float32, C-contiguous, on the accelerator's device), every call "
                            "enqueued on its stream (torch.cuda.current_stream().cuda_stream); no call synchronises but check_status()")
      .def("begin_speculation", [](device_method& a, const std::vector<float>& t) { a.begin_speculation(t); }, nb::arg("timesteps"))
      .def("record_speculation",
           [](device_method& a, int step, const nb::ndarray<>& attention) {
             const auto v = device_rows(attention, "attention", a.device(), 1);
             a.record_speculation(step, v.data, v.rows);
           },
           nb::arg("step"), nb::arg("attention"))
      .def("plan_step", &device_method::plan_step, nb::arg("k"), nb::arg("t"), "Plans step k at timestep t; returns the compute count per sample")
      .def_prop_ro("dense", &device_method::dense)
      .def("compute_tokens",
           [](nb::handle self, index_t count) {
             auto& a = nb::cast<device_method&>(self);
             return nb::ndarray<nb::pytorch, const index_t, nb::ndim<2>>(a.compute_tokens(), {static_cast<std::size_t>(a.batch()), static_cast<std::size_t>(count)},
                                                                         self, {}, nb::dtype<index_t>(), nb::device::cuda::value, a.device());
           },
           nb::arg("count"), "The planned step's C1 token ids [batch, count] (int32, a view of the accelerator's device memory)")
      .def("gather_rows",
           [](device_method& a, const nb::ndarray<>& full, const nb::ndarray<>& compact) {
             const auto f = device_rows(full, "full", a.device(), 2), c = device_rows(compact, "compact", a.device(), 2);
             a.gather_rows(f.data, f.rows, c.data, c.rows, f.cols);
           },
           nb::arg("full"), nb::arg("compact"), "compact[r] = full[the r-th planned row] (gpu::gather_rows), on the stream")
      .def("complete_step",
           [](device_method& a, const nb::ndarray<>& computed, const nb::ndarray<>& output, const std::optional<nb::ndarray<>>& attention) {
             const auto c = device_rows(computed, "computed", a.device(), 2), o = device_rows(output, "output", a.device(), 2);
             const auto at = attention ? device_rows(*attention, "attention", a.device(), 1) : device_array{nullptr, 0, 1};
             if (c.cols != o.cols && c.rows != 0)
               throw std::invalid_argument("computed: " + std::to_string(c.cols) + " columns; output has " + std::to_string(o.cols));
             a.complete_step(c.data, c.rows, o.data, o.rows, o.cols, at.data, at.rows);
           },
           nb::arg("computed"), nb::arg("output"), nb::arg("attention").none() = nb::none())
      .def("complete_step_in_place",
           [](device_method& a, const nb::ndarray<>& output, const std::optional<nb::ndarray<>>& attention) {
             const auto o = device_rows(output, "output", a.device(), 2);
             const auto at = attention ? device_rows(*attention, "attention", a.device(), 1) : device_array{nullptr, 0, 1};
             a.complete_step_in_place(o.data, o.rows, o.cols, at.data, at.rows);
           },
           nb::arg("output"), nb::arg("attention").none() = nb::none())
      .def("abandon", &device_method::abandon)
      .def("reset", &device_method::reset)
      .def("check_status", &device_method::check_status, "Synchronises the stream and raises on a status the device raised")
      .def_prop_rw("stream", &device_method::stream, &device_method::set_stream)
      .def_prop_ro("reads_attention", &device_method::reads_attention)
      .def_prop_ro("speculates", &device_method::speculates)
      .def_prop_ro("next_step", &device_method::next_step)
      .def_prop_ro("device", &device_method::device)
      .def_prop_ro("tokens", &device_method::tokens)
      .def_prop_ro("batch", &device_method::batch)
      .def_prop_ro("steps", &device_method::steps)
      .def_prop_ro("feature_dim", &device_method::feature_dim)
      .def_prop_ro("memory_bytes", &device_method::memory_bytes);
  m.def("device_specdiff_accelerator", &specdiff_python::make_device_specdiff, nb::arg("tokens"), nb::arg("batch"), nb::arg("steps"),
        nb::arg("feature_dim"), nb::arg("share_cfg_plan"), nb::arg("cache_rate"), nb::arg("spec_steps"), nb::arg("reuse_mass"), nb::arg("warmup_steps"),
        nb::arg("refresh_interval"), nb::arg("dense_steps"), nb::arg("starvation_scale"), nb::arg("c3"), nb::arg("stream"),
        "SpecDiff on the device (fixed cache rate), on `stream` (an integer cudaStream_t: torch.cuda.current_stream().cuda_stream)");
  m.def("device_forecast_accelerator", &specdiff_python::make_device_forecast, nb::arg("tokens"), nb::arg("batch"), nb::arg("steps"),
        nb::arg("feature_dim"), nb::arg("interval"), nb::arg("warmup_steps"), nb::arg("c3"), nb::arg("order"), nb::arg("step_variable"), nb::arg("stream"),
        "The output forecast on the device (taylor / latest), on `stream`");
#else
  m.attr("cuda") = false;
#endif
}
