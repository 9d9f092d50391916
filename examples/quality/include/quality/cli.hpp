#pragma once
// The command-line rules every program follows (specdiff-demo, specdiff-sample, specdiff-calibrate,
// specdiff-pareto and any tool added later), in one place so that the next tool cannot miss one:
//   - option values are checked strictly by the validators below (the whole text a number of the right kind in
//     the allowed range; the message names the option, quotes the value and states what is allowed); the options
//     every tool shares (--seed, --cfg, --steps, --threads, --samples) are added by add_*() with one range each;
//   - parse() turns a usage error into exit status 2 (a failed run is 1, --help 0);
//   - every file a tool writes is declared to an sd3::file_plan with the files it reads, and checked before any
//     work (writable, no two outputs the same file, no output an input); every file is written with
//     sd3::write_file (a temporary file renamed into place after a checked write, fsync and close);
//   - run() reports an error as "<tool>: <message>" with status 1 and checks that stdout was written.
// Header-only: include it only from a target that links CLI11 (sd3quality itself does not).

#include <CLI/CLI.hpp>
#include <cstdio>
#include <exception>
#include <functional>
#include <optional>
#include <string>
#include <utility>

#include "quality/options.hpp"
#include "sd3/errors.hpp"
#include "sd3/transformer.hpp"  // sd3::max_threads

namespace quality::cli {

/// A validator from a check that returns "" for acceptable text, else the reason.
template <class Check>
CLI::Validator checked(Check check, std::string description) {
  return CLI::Validator([check](std::string& text) { return check(text); }, std::move(description));
}
inline CLI::Validator integer_in(long long lo, long long hi) {
  return checked([lo, hi](const std::string& t) { return check_integer(t, lo, hi); }, sd3::message("INT in [", lo, ", ", hi, "]"));
}
inline CLI::Validator real_in(double lo, double hi, interval ends = interval::closed) {
  return checked([=](const std::string& t) { return check_real(t, lo, hi, ends); }, "REAL");
}

/// The shared options' bounds (docs/engine.md, "Reliability").
inline constexpr int max_steps = 1000;
inline constexpr int max_samples = 4096;
inline constexpr double max_cfg = 100.0;

/// --seed into `text` (read it with quality::parse_seed): 0 to 2^64 - 1, a sign or a larger value refused.
inline CLI::Option* add_seed(CLI::App& app, std::string& text, const std::string& help = "noise seed, 0 to 2^64-1") {
  return app.add_option("--seed", text, help)->capture_default_str()->check(checked([](const std::string& t) { return check_seed(t); }, "UINT64"));
}
/// --cfg: a finite number in [0, 100]; empty text, NaN, infinities refused. Unset: the model's sampling.json.
inline CLI::Option* add_cfg(CLI::App& app, float& cfg,
                            const std::string& help = "classifier-free guidance scale (default: the model's sampling.json, else 4)") {
  return app.add_option("--cfg", cfg, help)
      ->check(checked([](const std::string& t) { return check_real(t, 0.0, max_cfg); }, "REAL in [0, 100]"));
}
/// --steps: 1 to 1000.
inline CLI::Option* add_steps(CLI::App& app, int& steps, const std::string& help = "sampling steps") {
  return app.add_option("--steps", steps, help)->capture_default_str()->check(integer_in(1, max_steps));
}
/// --threads: 1 to sd3::max_threads.
inline CLI::Option* add_threads(CLI::App& app, int& threads, const std::string& help = "threads") {
  return app.add_option("--threads", threads, help)->capture_default_str()->check(integer_in(1, sd3::max_threads));
}
/// --samples: 1 to 4096.
inline CLI::Option* add_samples(CLI::App& app, int& samples, const std::string& help = "samples (class i % 10)") {
  return app.add_option("--samples", samples, help)->capture_default_str()->check(integer_in(1, max_samples));
}

/// Parses the command line, then runs `cross_checks` (checks between options; they throw CLI::ValidationError).
/// Returns the exit status to leave with (0 after --help, 2 after a usage error), or nothing to go on.
inline std::optional<int> parse(CLI::App& app, int argc, char** argv, const std::function<void()>& cross_checks = {}) {
  try {
    app.parse(argc, argv);
    if (cross_checks) cross_checks();
  } catch (const CLI::Success& e) {  // --help
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    app.exit(e);
    return 2;  // a usage error, told apart from a failed run (1)
  }
  return std::nullopt;
}

/// Runs a tool's work: an exception is reported as "<tool>: <message>" with status 1; stdout must have been
/// written completely (a full disk under a redirected stdout is a failure too).
template <class Work>
int run(const char* tool, Work&& work) {
  try {
    const int status = std::forward<Work>(work)();
    if (std::fflush(stdout) != 0 || std::ferror(stdout)) throw std::runtime_error("stdout: write failed");
    return status;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s: %s\n", tool, e.what());
    return 1;
  }
}

}  // namespace quality::cli
