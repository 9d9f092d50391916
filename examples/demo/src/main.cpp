// specdiff-demo: full RFlow and an accelerated method on the default model, from the same seed.
// Writes PNG grids, prints a table, optionally a JSON object (docs/results.md explains every key).
#include <CLI/CLI.hpp>
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <nlohmann/json.hpp>
#include <numeric>
#include <thread>

#include "demo/sequence_parallel.hpp"
#include "demo/support.hpp"
#include "demo/timing.hpp"
#include "quality/cli.hpp"
#include "quality/options.hpp"
#include "quality/png_grid.hpp"
#include "sd3/errors.hpp"
#include "sd3/files.hpp"
#include "sd3/transformer.hpp"
#ifdef SPECDIFF_DEMO_MPI
#include <mpi.h>

#include <specdiff/mpi/communicator.hpp>
#endif

namespace {

// --sequence-parallel: MPI starts before the options are parsed (every rank parses them and refuses bad input the
// same way, before any collective) and is finalized when main returns. A rank that fails later brings every rank
// down through the communicator (MPI_Abort with its message), so none waits for it.
struct mpi_session {
  bool active = false;
  mpi_session([[maybe_unused]] int& argc, [[maybe_unused]] char**& argv) {
#ifdef SPECDIFF_DEMO_MPI
    for (int i = 1; i < argc; ++i)
      if (std::string(argv[i]) == "--sequence-parallel") active = true;
    if (active) MPI_Init(&argc, &argv);
#endif
  }
  ~mpi_session() {
#ifdef SPECDIFF_DEMO_MPI
    if (active) MPI_Finalize();
#endif
  }
  mpi_session(const mpi_session&) = delete;
  mpi_session& operator=(const mpi_session&) = delete;
};

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

// `value` with `digits` decimals.
std::string format_fixed(double value, int digits) {
  char text[64];
  std::snprintf(text, sizeof text, "%.*f", digits, value);
  return text;
}

}  // namespace

int main(int argc, char** argv) {
  const mpi_session mpi(argc, argv);
  CLI::App app{"SpecDiff demo: full RFlow vs an accelerated method on the default model, same noise"};
  demo::method_spec spec;
  int steps = 28, samples = 16, threads = sd3::usable_cores(), repeats = 3;
  float cfg = 0.f;
  std::string seed_text = "0";
  std::string out_dir = "demo-out", json_path, model_dir = demo::default_model_dir().string();
  bool no_progress = false;
  double cache_rate = 0;
  int spec_steps = 0, interval = 0, order = 0, fast_steps = 0;
  double threshold = 0, error_budget = 0;
  std::string dense, c3;
  app.add_option("--method", spec.name, demo::method_list())->capture_default_str()
      ->check(checked([](const std::string& m) {
        return demo::known_method(m) ? std::string() : sd3::message("'", sd3::excerpt(m), "' is not a method; allowed: ", demo::method_list());
      }, "METHOD"));
  auto* cr = app.add_option("--cache-rate", cache_rate, "share of image tokens not computed on a partial step, [0, 1) (specdiff 0.9, ras 0.5, toca 0.9)")
      ->check(real_in(0.0, 1.0, quality::interval::open_above));
  auto* ss = app.add_option("--spec-steps", spec_steps, "SpecDiff's speculative steps, 0 to --steps (default 2)")->check(integer_in(0, 1000));
  auto* iv = app.add_option("--interval", interval, "full-step interval (toca 5, fora 3, taylorseer 6, forecast 3; specdiff: refresh interval)")->check(integer_in(1, 1000));
  auto* od = app.add_option("--order", order, "Taylor order, 1 or 2 (default 1): taylorseer, and forecast with --c3 taylor")->check(integer_in(1, 2));
  auto* fs = app.add_option("--fast-steps", fast_steps, "steps of the plain fewer-step baseline (method steps, default 10)")->check(integer_in(1, 1000));
  auto* th = app.add_option("--threshold", threshold, "the step-level gate's threshold (fbcache 0.05, teacache 0.6)")->check(real_in(0.0, 1000.0));
  auto* ds = app.add_option("--dense", dense, "dense-step schedule of a token-level method: specdiff (2 + {14}) or ras (4 + {12, 20}); default: the method's own")
      ->check(checked([](const std::string& d) { return demo::dense_schedule_error(d); }, "SCHEDULE"));
  auto* eb = app.add_option("--error-budget", error_budget,
                            "specdiff-adaptive: a dense step once the error verified since the last one exceeds this (default 0.05)")
      ->check(real_in(0.0, 1000.0));
  double cache_rate_min = 0;
  auto* crm = app.add_option("--cache-rate-min", cache_rate_min,
                             "specdiff-adaptive: the cache rate moves from --cache-rate down to this in 3 buckets as the verified error grows")
      ->check(real_in(0.0, 1.0, quality::interval::open_above));
  auto* c3o = app.add_option("--c3", c3, "C3 rule of specdiff / specdiff-adaptive (default specdiff) and forecast (default learned): specdiff, latest, taylor, learned "
                             "(the model folder's learned_c3.json / learned_forecast.json), foca (FoCa's BDF2 forecast); forecast also tacache "
                             "(TACache's compensation, fitted on calibration noise at start)")
      ->check(checked([](const std::string& r) { return demo::c3_rule_error(r); }, "RULE"));
  double correct = 0;
  auto* cor = app.add_option("--correct", correct, "forecast: predictor-corrector weight in [0, 1] (0.5 recommended; default 0, off): the steps forecast "
                             "since the last full step re-estimated through the next one")
      ->check(real_in(0.0, 1.0));
  int full_steps = 0;
  auto* fst = app.add_option("--full-steps", full_steps, "forecast: this many full steps, placed where they forecast best (the model folder's "
                             "learned_forecast_F<count>.json, made by specdiff-calibrate --full-steps); replaces --interval")
      ->check(integer_in(1, 1000));
  quality::cli::add_steps(app, steps);
  auto* cf = quality::cli::add_cfg(app, cfg);
  quality::cli::add_samples(app, samples);
  quality::cli::add_seed(app, seed_text);
  threads = std::min(threads, sd3::max_threads);
  auto* threads_option = quality::cli::add_threads(app, threads);
  app.add_option("--repeats", repeats, "timed pairs after an untimed warm-up of each, alternating (full, method; method, full; ...); medians are reported")
      ->capture_default_str()->check(integer_in(1, 100));
  app.add_option("--out", out_dir, "folder for the PNG grids")->capture_default_str();
  app.add_option("--json", json_path, "write the results as one JSON object to this file");
  app.add_option("--model", model_dir, "model folder")->capture_default_str();
  app.add_flag("--no-progress", no_progress, "no progress bar");
  bool sequence_parallel = false;
  std::string latents_path;
  app.add_flag("--sequence-parallel", sequence_parallel,
               "split every sample's image tokens over the ranks of mpirun -n P (full, specdiff; docs/scale-out.md); rank 0 prints and writes");
  std::string shard_plan_name = "global";
  auto* spo = app.add_option("--shard-plan", shard_plan_name,
                             "with --sequence-parallel, specdiff: global (every rank makes one process's plan; an all-reduce per step) or "
                             "per-shard (each rank plans its own tokens, no exchange; docs/scale-out.md)")
      ->capture_default_str()->check(checked([](const std::string& v) {
        return v == "global" || v == "per-shard" ? std::string() : sd3::message("'", sd3::excerpt(v), "' is not a shard plan; allowed: global, per-shard");
      }, "PLAN"));
  bool ulysses = false;
  app.add_flag("--ulysses", ulysses,
               "with --sequence-parallel (full, specdiff): every forward by head exchange (Ulysses: q|k|v all-to-all over heads; "
               "SpecDiff's partial steps with per-rank counts) instead of the K/V exchange (docs/scale-out.md)");
  app.add_option("--latents", latents_path, "write both runs' final latents as one JSON object {\"full\": [...], \"method\": [...]}, to compare runs");
  // Checks that involve two options, after both are known.
  const auto cross_checks = [&] {
    if (ss->count() && spec_steps > steps)
      throw CLI::ValidationError("--spec-steps", sd3::message("'", spec_steps, "' is out of range; allowed: 0 to --steps (", steps, ")"));
    // SpecDiff's default speculative steps must fit --steps too: name the option that sets them.
    if (const int spec_default = methods::specdiff_options{}.spec_steps;
        !ss->count() && (spec.name == "specdiff" || spec.name == "specdiff-adaptive") && spec_default > steps)
      throw CLI::ValidationError("--steps", sd3::message("'", steps, "' is fewer than SpecDiff's speculative steps (--spec-steps, default ",
                                                         spec_default, "); give --spec-steps 0 to ", steps, " or more --steps"));
    if (fs->count() && fast_steps > steps)
      throw CLI::ValidationError("--fast-steps", sd3::message("'", fast_steps, "' is out of range; allowed: 1 to --steps (", steps,
                                                              "): the fewer-step baseline runs fewer steps than full RFlow"));
    if (const int fast_default = 10; !fs->count() && spec.name == "steps" && fast_default > steps)
      throw CLI::ValidationError("--steps", sd3::message("'", steps, "' is fewer than the baseline's steps (--fast-steps, default ",
                                                         fast_default, "); give --fast-steps 1 to ", steps));
    if (sequence_parallel) {
#ifndef SPECDIFF_DEMO_MPI
      throw CLI::ValidationError("--sequence-parallel", "this demo was built without MPI (install libopenmpi-dev, reconfigure and rebuild)");
#endif
      demo::method_spec s = spec;
      if (c3o->count()) s.c3 = c3;
      if (const auto why = demo::sequence_parallel_refusal(s); !why.empty()) throw CLI::ValidationError("--sequence-parallel", why);
    }
    if (spo->count() && !sequence_parallel) throw CLI::ValidationError("--shard-plan", "needs --sequence-parallel");
    if (ulysses && !sequence_parallel) throw CLI::ValidationError("--ulysses", "needs --sequence-parallel");
    if (spo->count() && spec.name != "specdiff")
      throw CLI::ValidationError("--shard-plan", sd3::message("--method ", spec.name, " does not use it (used by: specdiff)"));
    check_method_options(spec.name, {{"--cache-rate", cr, {"specdiff", "specdiff-adaptive", "ras", "toca"}},
                                     {"--spec-steps", ss, {"specdiff", "specdiff-adaptive"}},
                                     {"--interval", iv, {"specdiff", "specdiff-adaptive", "forecast", "toca", "fora", "taylorseer"}},
                                     {"--error-budget", eb, {"specdiff-adaptive"}},
                                     {"--cache-rate-min", crm, {"specdiff-adaptive"}},
                                     {"--c3", c3o, {"specdiff", "specdiff-adaptive", "forecast"}},
                                     {"--order", od, {"taylorseer", "forecast"}},
                                     {"--full-steps", fst, {"forecast"}},
                                     {"--correct", cor, {"forecast"}},
                                     {"--fast-steps", fs, {"steps"}},
                                     {"--threshold", th, {"fbcache", "teacache"}},
                                     {"--dense", ds, {"specdiff", "specdiff-adaptive", "ras"}}});
  };
  if (const auto status = quality::cli::parse(app, argc, argv, cross_checks)) return *status;
  if (cr->count()) spec.cache_rate = cache_rate;
  if (ss->count()) spec.spec_steps = spec_steps;
  if (iv->count()) spec.interval = interval;
  if (od->count()) spec.order = order;
  if (fs->count()) spec.fast_steps = fast_steps;
  if (th->count()) spec.threshold = threshold;
  if (ds->count()) spec.dense = dense;
  if (eb->count()) spec.error_budget = error_budget;
  if (crm->count()) spec.cache_rate_min = cache_rate_min;
  if (c3o->count()) spec.c3 = c3;
  if (fst->count()) spec.full_steps = full_steps;
  if (cor->count()) spec.correct = correct;

#ifdef SPECDIFF_DEMO_MPI
  std::optional<specdiff::mpi_communicator> comm;
  if (sequence_parallel) comm.emplace();
  const int rank = comm ? comm->rank() : 0, ranks = comm ? comm->size() : 1;
#else
  const int rank = 0, ranks = 1;
#endif
  // Rank 0 prints and writes; the others compute their share and stay silent (their errors still reach stderr).
  if (rank != 0 && std::freopen("/dev/null", "w", stdout) == nullptr) return 1;
  if (ranks > 1 && threads_option->count() == 0) threads = std::max(1, threads / ranks);  // the cores are shared
  try {
    const std::uint64_t seed = quality::parse_seed(seed_text);
    // Every output is checked before the work: a path that cannot be written, two outputs that are one file, or an
    // output that is one of the model's files fail now, not after sampling.
    const auto full_png = std::filesystem::path(out_dir) / "full.png", method_png = std::filesystem::path(out_dir) / (spec.name + ".png");
    sd3::file_plan plan;
    if (rank == 0) {
      sd3::prepare_output_folder(out_dir, "--out");
      plan.output(full_png, "--out grid");
      if (method_png != full_png) plan.output(method_png, "--out grid");  // --method full: one grid
      if (!json_path.empty()) plan.output(json_path, "--json");
      if (!latents_path.empty()) plan.output(latents_path, "--latents");
    }
    plan.input(model_dir, "--model");
    plan.check();

    const auto work = demo::make_workload(model_dir, samples, seed, steps, cf->count() ? std::optional(cfg) : std::nullopt, threads);
    const auto& [model, batch, net, problem] = *work;
    spec.learned_weights = model.learned_weights_for(spec);
    spec.full_step_list = model.full_steps_for(spec);
    std::unique_ptr<methods::tacache_table> tacache;  // --c3 tacache: its statistics, fitted on calibration noise first
    if (spec.c3 == "tacache")
      tacache = demo::fit_tacache(model_dir, spec, steps, cf->count() ? std::optional(cfg) : std::nullopt, threads), spec.tacache = tacache.get();
    demo::check_method(spec, problem);  // before minutes of sampling (learned weights against --steps too)
    const float guidance = problem.guidance;
    const bool bar = !no_progress && rank == 0;

    std::printf("SpecDiff demo: %d samples, %d steps, cfg %.1f, seed %llu, %d threads, %d timed repeats, model %s\n", samples, steps,
                guidance, static_cast<unsigned long long>(seed), threads, repeats, model_dir.c_str());
    demo::timing_options timing_options{repeats, true};
    if (ranks > 1)
      std::printf("sequence-parallel: every sample's image tokens split over %d ranks (%s; docs/scale-out.md)\n", ranks,
                  ulysses ? "Ulysses head exchange" : "K/V exchange");
#ifdef SPECDIFF_DEMO_MPI
    std::optional<demo::sequence_parallel_runner<specdiff::mpi_communicator>> runner;
    if (comm) {
      runner.emplace(*comm, problem, shard_plan_name == "per-shard" ? demo::shard_plan::per_shard : demo::shard_plan::global);
      runner->use_ulysses(ulysses);
      timing_options.run = [&](const methods::problem&, const demo::method_spec& s, const methods::progress_fn& f) { return runner->run(s, f); };
    }
#endif
    const auto timing = demo::time_against_full(problem, spec, timing_options,
                                                [&](const std::string& label) { return progress_bar(label, bar); });
    const auto& full = timing.full;
    const auto& accelerated = timing.method;
    const auto q = demo::evaluate(model, batch, full.latents, accelerated.latents);
    const double acc_full = demo::class_accuracy(model, batch, full.latents);
    const auto fd_full = demo::image_fd(model, batch, full.latents);
    const double speedup = timing.speedup(), flops_ratio = full.flops / accelerated.flops, overhead_share = timing.overhead_share();
    // Only SpecDiff runs a speculative pass; its share of the run is inside `seconds` and inside the speedup.
    const bool speculative_pass = spec.name == "specdiff" || spec.name == "specdiff-adaptive";
    // Token-level methods: the free verification (mean over partial steps) and the dense steps of the main pass.
    const bool token_level = speculative_pass || spec.name == "ras" || spec.name == "forecast";
    const auto& verified = accelerated.verified_errors;
    const double verified_mean = verified.empty() ? 0.0 : std::accumulate(verified.begin(), verified.end(), 0.0) / static_cast<double>(verified.size());
    const double speculative_share = timing.speculative_share();
    const auto full_spread = timing.seconds_full_spread(), method_spread = timing.seconds_method_spread(),
               speedup_spread = timing.speedup_spread();

    auto grid = [&](const std::filesystem::path& path, const std::vector<float>& latents) {
      const auto images = demo::clamped_images(model, latents);
      quality::grid_options g;
      g.columns = static_cast<std::size_t>(std::min(samples, 10));
      g.scale = 2;
      quality::write_png_grid(path, demo::as_image_batch(model, batch, images), g);
    };
    if (rank == 0) {
      grid(full_png, full.latents);
      if (method_png != full_png) grid(method_png, accelerated.latents);
      if (!latents_path.empty()) {
        nlohmann::json l;
        l["full"] = full.latents;
        l["method"] = accelerated.latents;
        sd3::write_file(latents_path, l.dump() + "\n", "--latents");
      }
    }

    // Medians of the timed runs with their (min-max); the speedup's range is that of the per-pair ratios.
    const auto range = [](double lo, double hi, const char* unit) { return sd3::message("(", format_fixed(lo, 2), "-", format_fixed(hi, 2), unit, ")"); };
    const auto fd_text = [](const std::optional<double>& fd) { return fd ? format_fixed(*fd, 2) : std::string("-"); };
    const std::string spec_text = speculative_pass ? format_fixed(100 * speculative_share, 1) + "%" : "-";
    std::printf("\n%-26s %-21s %-21s %10s %8s %6s %9s %8s %8s %10s\n", "method", "seconds (min-max)", "speedup (min-max)", "FLOP ratio",
                "PSNR dB", "SSIM", "class acc", "FD", "overhead", "spec. pass");
    std::printf("%-26s %7.2f %-13s %6.2fx %-13s %10.2f %8s %6.3f %9.3f %8s %8s %10s\n", "full RFlow", timing.seconds_full(),
                range(full_spread.min, full_spread.max, "").c_str(), 1.0, "", 1.0, "-", 1.0, acc_full, fd_text(fd_full).c_str(), "-", "-");
    const std::string psnr = q.psnr_db ? format_fixed(*q.psnr_db, 2) : "inf";
    std::printf("%-26s %7.2f %-13s %6.2fx %-13s %10.2f %8s %6.3f %9.3f %8s %7.1f%% %10s\n", spec.describe().c_str(), timing.seconds_method(),
                range(method_spread.min, method_spread.max, "").c_str(), speedup, range(speedup_spread.min, speedup_spread.max, "x").c_str(),
                flops_ratio, psnr.c_str(), q.ssim, q.class_acc, fd_text(q.fd).c_str(), 100 * overhead_share, spec_text.c_str());
    if (token_level && ranks > 1)  // the shards' verification errors are not summed over the ranks yet
      std::printf("\nmain pass: %d dense steps of %d; free verification: not measured with --sequence-parallel\n", accelerated.dense_steps, steps);
    else if (token_level)
      std::printf("\nmain pass: %d dense steps of %d; free verification (the C3 rule's relative error on the computed rows): %.4f per "
                  "partial step\n", accelerated.dense_steps, steps, verified_mean);
    if (const auto why = demo::fd_unavailable_reason(model, batch); !why.empty()) std::printf("\nFD not measured: %s.\n", why.c_str());
    else
      std::printf("\nFD: Frechet distance of the classifier's features to held-out real digits (lower is closer; full RFlow's is the\n"
                  "baseline; biased upward at few samples, so compare only runs with the same --samples).\n");
    // A wide spread says the machine was busy while timing: the median is then the best estimate, its range the honest one.
    const double spread_percent = 100 * std::max(full_spread.max / full_spread.min, method_spread.max / method_spread.min) - 100;
    if (repeats > 1 && spread_percent > 10) {
      std::printf("note: the timed runs of one method differ by up to %.0f%%: the machine was busy; read the speedup with its range.\n",
                  spread_percent);
    }
    std::printf("grids: %s, %s\n", full_png.string().c_str(), method_png.string().c_str());

    if (!json_path.empty()) {
      // null: not measured; a measured value that is not finite is written as the string "inf", "-inf" or "nan"
      // (JSON has no such numbers, and null must keep one meaning; docs/results.md).
      const auto optional_number = [](const std::optional<double>& v) { return v ? demo::json_number(*v) : nlohmann::json(nullptr); };
      nlohmann::json j;
      j["method"] = spec.name;
      j["settings"] = spec.describe();
      j["speedup"] = speedup;
      j["speedup_spread"] = {speedup_spread.min, speedup_spread.max};
      j["flops_ratio"] = flops_ratio;
      j["psnr_db"] = q.psnr_db ? demo::json_number(*q.psnr_db) : nlohmann::json("inf");  // identical images: infinite PSNR
      j["ssim"] = q.ssim;
      j["class_acc"] = q.class_acc;
      j["class_acc_full"] = acc_full;
      j["fd"] = optional_number(q.fd);
      j["fd_full"] = optional_number(fd_full);
      j["seconds_full"] = timing.seconds_full();
      j["seconds_method"] = timing.seconds_method();
      j["seconds_full_spread"] = {full_spread.min, full_spread.max};
      j["seconds_method_spread"] = {method_spread.min, method_spread.max};
      j["seconds_full_runs"] = timing.full_seconds;  // in pair order: pair k = (seconds_full_runs[k], seconds_method_runs[k])
      j["seconds_method_runs"] = timing.method_seconds;
      j["overhead_share"] = overhead_share;
      j["speculative_share"] = speculative_pass ? nlohmann::json(speculative_share) : nlohmann::json(nullptr);
      j["verified_error"] = token_level && !verified.empty() ? nlohmann::json(verified_mean) : nlohmann::json(nullptr);
      j["verified_errors"] = verified;
      j["dense_steps"] = token_level ? nlohmann::json(accelerated.dense_steps) : nlohmann::json(nullptr);
      j["samples"] = samples;
      j["steps"] = steps;
      j["cfg"] = guidance;
      j["seed"] = seed;
      j["threads"] = threads;
      j["repeats"] = repeats;
      demo::mark_non_finite(j);
      j["ranks"] = ranks;
      j["shard_plan"] = ranks > 1 && spec.name == "specdiff" ? nlohmann::json(shard_plan_name) : nlohmann::json(nullptr);
      const std::string text = j.dump(2) + "\n";
      if (rank == 0) sd3::write_file(json_path, text, "--json");
      std::printf("json: %s\n", json_path.c_str());
    }
    if (std::fflush(stdout) != 0) throw std::runtime_error("stdout: write failed");
  } catch (const std::exception& e) {
#ifdef SPECDIFF_DEMO_MPI
    if (comm && comm->size() > 1) comm->fail(std::current_exception());  // "specdiff: rank r of P: ...", every rank ends
#endif
    std::fprintf(stderr, "specdiff-demo: %s\n", e.what());
    return 1;
  }
  return 0;
}
