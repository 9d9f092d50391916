// specdiff-load: how the engine's threads hold up when the machine is busy. Full RFlow and SpecDiff (CR 0.9 by
// default) at 1 and 2 threads, first on the machine as it is, then with a CPU-bound process pinned to one core,
// which this program starts (a forked child that spins; it ends itself after --competitor-seconds even if this
// program dies) and stops. The question is a ratio (2 threads against 1 under the same load), and a shared
// machine's speed drifts by tens of percent over minutes, so every round runs all four (threads, method)
// combinations back to back, in an order that alternates from round to round, after one untimed warm-up of
// each; per case the medians over --repeats rounds with their range, and the per-round ratios' medians.
// Prints a Markdown table, writes JSON.
#include <CLI/CLI.hpp>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <stdexcept>
#include <string>
#include <vector>

#include <sched.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include "demo/support.hpp"
#include "demo/timing.hpp"
#include "quality/cli.hpp"
#include "sd3/files.hpp"
#include <memory>
#include "sd3/transformer.hpp"

namespace {

// A child process spinning on one core, for at most `seconds`; killed when this object goes.
class competitor {
 public:
  competitor(int core, unsigned seconds) {
    const pid_t parent = getpid();
    pid_ = fork();
    if (pid_ < 0) throw std::runtime_error("competitor: fork failed");
    if (pid_ == 0) {
      prctl(PR_SET_PDEATHSIG, SIGKILL);  // dies with the benchmark
      if (getppid() != parent) _exit(0);
      cpu_set_t set;
      CPU_ZERO(&set);
      CPU_SET(core, &set);
      if (sched_setaffinity(0, sizeof(set), &set) != 0) _exit(2);
      alarm(seconds);  // bounded in time whatever happens to the parent
      volatile unsigned long long spin = 0;
      for (;;) spin = spin + 1;
    }
    usleep(100000);  // let it start and settle on its core
    int status = 0;
    if (waitpid(pid_, &status, WNOHANG) == pid_)
      throw std::runtime_error("competitor: the child exited at once (cannot pin it to core " + std::to_string(core) + "?)");
  }
  ~competitor() {
    kill(pid_, SIGKILL);
    waitpid(pid_, nullptr, 0);
  }
  competitor(const competitor&) = delete;
  competitor& operator=(const competitor&) = delete;

 private:
  pid_t pid_ = -1;
};

struct result {
  std::string load;
  int threads = 0;
  std::vector<double> full_seconds, specdiff_seconds;
};

double median_of(std::vector<double> v) { return demo::median(v); }

std::string range(const demo::spread& s, const char* format) {
  char a[32], b[32];
  std::snprintf(a, sizeof a, format, s.min);
  std::snprintf(b, sizeof b, format, s.max);
  return std::string(a) + "-" + b;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Full RFlow and SpecDiff at 1 and 2 threads, idle and with a competing process pinned to one core"};
  int samples = 16, steps = 28, repeats = 3, core = 0;
  unsigned competitor_seconds = 900;
  double cache_rate = 0.9;
  float cfg = 0.f;  // unset: the model's sampling.json (else 4)
  std::string model_dir = demo::default_model_dir().string(), out = "load.json";
  std::vector<int> thread_counts{1, 2};
  app.add_option("--model", model_dir)->capture_default_str();
  // The options every tool shares, with their ranges, and its output checked before any work (quality/cli.hpp).
  quality::cli::add_samples(app, samples);
  quality::cli::add_steps(app, steps);
  auto* cfg_option = quality::cli::add_cfg(app, cfg);
  app.add_option("--cache-rate", cache_rate)->capture_default_str()->check(CLI::Range(0.0, 0.99));
  app.add_option("--repeats", repeats, "timed pairs per case, after an untimed warm-up")->capture_default_str()->check(CLI::Range(1, 100));
  app.add_option("--threads", thread_counts, "thread counts to run")->capture_default_str()->check(CLI::Range(1, sd3::max_threads));
  app.add_option("--core", core, "the core the competing process is pinned to")->capture_default_str()->check(CLI::Range(0, 1023));
  app.add_option("--competitor-seconds", competitor_seconds, "the competing process ends itself after this long")
      ->capture_default_str()->check(CLI::Range(1u, 86400u));
  app.add_option("--json", out, "output file")->capture_default_str();
  if (const auto status = quality::cli::parse(app, argc, argv)) return *status;

  try {
    sd3::file_plan plan;
    plan.output(out, "--json");
    plan.input(model_dir, "--model");
    plan.check();
    const demo::method_spec full_spec{.name = "full"}, spec{.name = "specdiff", .cache_rate = cache_rate};
    std::vector<result> results;
    float guidance = cfg;  // the scale the runs used (the model's unless --cfg)
    nlohmann::json rows = nlohmann::json::array();
    std::printf("| load | threads | full RFlow s (range) | SpecDiff s (range) | speedup (range) | full: these threads / %d thread(s) |\n"
                "|---|---|---|---|---|---|\n", thread_counts.front());
    for (const std::string load : {"idle", "one core busy"}) {
      std::unique_ptr<competitor> busy;
      if (load != "idle") busy = std::make_unique<competitor>(core, competitor_seconds);
      std::vector<std::unique_ptr<demo::workload>> work;
      std::vector<result> cases;
      for (const int threads : thread_counts) {
        work.push_back(demo::make_workload(model_dir, samples, 0, steps, cfg_option->count() ? std::optional(cfg) : std::nullopt, threads));
        guidance = work.back()->problem.guidance;
        cases.push_back({load, threads, {}, {}});
        demo::run_method(work.back()->problem, full_spec);  // warm-up, untimed
        demo::run_method(work.back()->problem, spec);
      }
      const std::size_t n = thread_counts.size();
      for (int round = 0; round < repeats; ++round) {
        std::fprintf(stderr, "%s: round %d/%d\n", load.c_str(), round + 1, repeats);
        for (std::size_t k = 0; k < n; ++k) {
          const std::size_t i = round % 2 == 0 ? k : n - 1 - k;
          const auto& p = work[i]->problem;
          const bool full_first = (round + static_cast<int>(k)) % 2 == 0;
          const double a = demo::run_method(p, full_first ? full_spec : spec).seconds;
          const double b = demo::run_method(p, full_first ? spec : full_spec).seconds;
          cases[i].full_seconds.push_back(full_first ? a : b);
          cases[i].specdiff_seconds.push_back(full_first ? b : a);
        }
      }
      for (std::size_t i = 0; i < n; ++i) {
        const auto& c = cases[i];
        std::vector<double> speedups, against_first;
        for (int r = 0; r < repeats; ++r) {
          speedups.push_back(c.full_seconds[r] / c.specdiff_seconds[r]);
          against_first.push_back(c.full_seconds[r] / cases[0].full_seconds[r]);
        }
        const double full = median_of(c.full_seconds), method = median_of(c.specdiff_seconds);
        std::printf("| %s | %d | %.2f (%s) | %.2f (%s) | %.2fx (%s) | %.2f (%s) |\n", load.c_str(), c.threads, full,
                    range(demo::spread_of(c.full_seconds), "%.2f").c_str(), method, range(demo::spread_of(c.specdiff_seconds), "%.2f").c_str(),
                    median_of(speedups), range(demo::spread_of(speedups), "%.2f").c_str(), median_of(against_first),
                    range(demo::spread_of(against_first), "%.2f").c_str());
        std::fflush(stdout);
        rows.push_back({{"load", load}, {"threads", c.threads}, {"seconds_full", full}, {"seconds_full_runs", c.full_seconds},
                        {"seconds_specdiff", method}, {"seconds_specdiff_runs", c.specdiff_seconds}, {"speedup", median_of(speedups)},
                        {"speedup_runs", speedups}, {"full_against_first_threads", median_of(against_first)}});
      }
    }
    const nlohmann::json all{{"model", model_dir}, {"samples", samples}, {"steps", steps}, {"cfg", guidance}, {"cache_rate", cache_rate},
                             {"repeats", repeats}, {"competitor_core", core}, {"results", rows}};
    sd3::write_file(out, all.dump(2) + "\n", "--json");
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
