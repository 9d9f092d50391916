// specdiff-demo under `mpirun -n 2 ... --sequence-parallel` against one process on the same seed (tests/mpi/demo_sp.cmake
// runs both): the same FLOP ratio and the same dense steps in their --json results, and both runs' final latents
// (--latents) within 1e-5 relative L2. Usage: specdiff_demo_compare SP.json ONE.json SP_LATENTS.json ONE_LATENTS.json
// [--per-shard]: the method ran with --shard-plan per-shard, whose plan is not one process's: its latents must differ
// (its difference is printed), full RFlow's must still match, and the FLOP ratio is the same (equal |C1| in all).
#include <cmath>
#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace {
nlohmann::json load(const char* path) {
  std::ifstream in(path);
  if (!in) throw std::runtime_error(std::string("cannot read ") + path);
  return nlohmann::json::parse(in);
}

double relative_l2(const std::vector<double>& got, const std::vector<double>& want) {
  if (got.size() != want.size() || want.empty()) return INFINITY;
  double e = 0, n = 0;
  for (std::size_t i = 0; i < want.size(); ++i) {
    e += (got[i] - want[i]) * (got[i] - want[i]);
    n += want[i] * want[i];
  }
  return std::sqrt(e / n);
}
}  // namespace

int main(int argc, char** argv) {
  const bool per_shard = argc == 6 && std::string(argv[5]) == "--per-shard";
  if (argc != 5 && !per_shard) {
    std::fprintf(stderr, "usage: specdiff_demo_compare SP.json ONE.json SP_LATENTS.json ONE_LATENTS.json\n");
    return 2;
  }
  try {
    const auto sp = load(argv[1]), one = load(argv[2]), sp_latents = load(argv[3]), one_latents = load(argv[4]);
    int failures = 0;
    const auto expect = [&](bool ok, const std::string& what) {
      std::printf("%s: %s\n", ok ? "ok" : "FAILED", what.c_str());
      failures += ok ? 0 : 1;
    };
    expect(sp.at("ranks") == 2 && one.at("ranks") == 1, "ranks " + sp.at("ranks").dump() + " and " + one.at("ranks").dump());
    const double a = sp.at("flops_ratio"), b = one.at("flops_ratio");
    expect(std::abs(a - b) <= 1e-12 * std::abs(b), "FLOP ratio " + std::to_string(a) + " and " + std::to_string(b));
    if (per_shard) expect(sp.at("shard_plan") == "per-shard", "shard plan " + sp.at("shard_plan").dump());
    expect(sp.at("dense_steps") == one.at("dense_steps"), "dense steps " + sp.at("dense_steps").dump() + " and " + one.at("dense_steps").dump());
    for (const char* run : {"full", "method"}) {
      const double e = relative_l2(sp_latents.at(run).get<std::vector<double>>(), one_latents.at(run).get<std::vector<double>>());
      if (per_shard && std::string(run) == "method")
        expect(e > 1e-5 && std::isfinite(e), std::string(run) + " latents (per-shard plan, not one process's): relative L2 " + std::to_string(e));
      else
        expect(e <= 1e-5, std::string(run) + " latents: relative L2 " + std::to_string(e) + " (at most 1e-5)");
    }
    return failures == 0 ? 0 : 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "specdiff_demo_compare: %s\n", e.what());
    return 2;
  }
}
