#include <doctest/doctest.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "demo/support.hpp"
#include "demo/timing.hpp"

namespace {

// A fresh folder under the system temp dir, removed when the object dies.
struct temp_dir {
  std::filesystem::path path = std::filesystem::temp_directory_path() / ("specdiff-demo-" + std::to_string(std::random_device{}()));
  temp_dir() { std::filesystem::create_directories(path); }
  ~temp_dir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
  temp_dir(const temp_dir&) = delete;
  temp_dir& operator=(const temp_dir&) = delete;
};

}  // namespace

TEST_CASE("median and spread by hand, a comparison's speedup is median / median, its range the per-pair ratios'") {
  CHECK(demo::median(std::vector<double>{3, 1, 2}) == 2);
  CHECK(demo::median(std::vector<double>{4, 1, 3, 2}) == 2.5);
  CHECK(demo::median(std::vector<double>{7}) == 7);
  CHECK(demo::spread_of(std::vector<double>{3, 1, 2}).min == 1);
  CHECK(demo::spread_of(std::vector<double>{3, 1, 2}).max == 3);
  CHECK_THROWS_AS(demo::median(std::vector<double>{}), std::invalid_argument);
  CHECK_THROWS_AS(demo::spread_of(std::vector<double>{}), std::invalid_argument);

  demo::timed_comparison c;
  c.full_seconds = {2, 4, 3};
  c.method_seconds = {1, 1, 2};
  c.method_overhead_shares = {0.1, 0.3, 0.2};
  CHECK(c.seconds_full() == 3);
  CHECK(c.seconds_method() == 1);
  CHECK(c.speedup() == 3);  // not the mean of the ratios (2.5) nor a ratio of sums (9 / 4)
  CHECK(c.speedup_spread().min == 1.5);
  CHECK(c.speedup_spread().max == 4);
  CHECK(c.overhead_share() == doctest::Approx(0.2));
}

TEST_CASE("time_against_full: warm-up of each, then pairs in alternating order, every run's images the same") {
  const auto work = demo::make_workload(SPECDIFF_MODEL_DIR, 2, 7, 2, 4.f, 1);
  const demo::method_spec steps{.name = "steps", .fast_steps = 1};
  std::vector<std::string> order;
  const auto record = [&](const std::string& label) -> methods::progress_fn {
    order.push_back(label);
    return {};
  };
  const auto c = demo::time_against_full(work->problem, steps, {3, true}, record);
  CHECK(order == std::vector<std::string>{"full RFlow (warm-up)", "steps n=1 (warm-up)", "full RFlow 1/3", "steps n=1 1/3", "steps n=1 2/3",
                                          "full RFlow 2/3", "full RFlow 3/3", "steps n=1 3/3"});
  REQUIRE(c.full_seconds.size() == 3);
  REQUIRE(c.method_seconds.size() == 3);
  CHECK(c.method_overhead_shares.size() == 3);
  CHECK(c.method_speculative_shares == std::vector<double>{0, 0, 0});  // no speculative pass outside SpecDiff
  for (const double s : c.full_seconds) CHECK(s > 0);
  CHECK(c.full.model_calls == 2);
  CHECK(c.method.model_calls == 1);
  // Deterministic sampling: the kept runs give the images of a fresh run.
  CHECK(c.full.latents == methods::run_full(work->problem).latents);

  order.clear();
  const auto d = demo::time_against_full(work->problem, steps, {2, false}, record);
  CHECK(order == std::vector<std::string>{"steps n=1 (warm-up)", "full RFlow 1/2", "steps n=1 1/2", "steps n=1 2/2", "full RFlow 2/2"});
  CHECK(d.full_seconds.size() == 2);
  CHECK_THROWS_WITH_AS(demo::time_against_full(work->problem, steps, {0, true}), doctest::Contains("repeats: must be >= 1, got 0"),
                       std::invalid_argument);

  // SpecDiff's speculative pass is a part of each of its runs, and its share the median of the runs' shares.
  const demo::method_spec specdiff{.name = "specdiff", .spec_steps = 1};
  const auto s = demo::time_against_full(work->problem, specdiff, {3, false});
  REQUIRE(s.method_speculative_shares.size() == 3);
  for (const double share : s.method_speculative_shares) {
    CHECK(share > 0.0);
    CHECK(share < 1.0);
  }
  CHECK(s.speculative_share() == demo::median(s.method_speculative_shares));
  CHECK(s.method.speculative_seconds / s.method.seconds == s.method_speculative_shares.back());
}

TEST_CASE("FD of a run's images: measured against the model's reference, unavailable without it or with one sample") {
  const auto work = demo::make_workload(SPECDIFF_MODEL_DIR, 3, 11, 2, 4.f, 1);
  const auto& m = work->model;
  REQUIRE(m.fd_reference);
  const auto run = methods::run_full(work->problem);
  const auto fd = demo::image_fd(m, work->batch, run.latents);
  REQUIRE(fd);
  // Independently: clamp, classify, take the statistics, compare.
  auto images = run.latents;
  for (auto& x : images) x = std::clamp(x, -1.f, 1.f);
  const auto features = m.classifier.features(demo::as_image_batch(m, work->batch, images));
  CHECK(*fd == doctest::Approx(quality::frechet_distance(quality::compute_feature_statistics(features, 3, 128), *m.fd_reference)));
  CHECK(demo::evaluate(m, work->batch, run.latents, run.latents).fd == fd);
  CHECK(demo::fd_unavailable_reason(m, work->batch).empty());

  const auto one = demo::make_workload(SPECDIFF_MODEL_DIR, 1, 11, 1, 4.f, 1);
  const auto single = methods::run_full(one->problem);
  CHECK_FALSE(demo::image_fd(one->model, one->batch, single.latents));
  CHECK(demo::fd_unavailable_reason(one->model, one->batch) == "it needs at least 2 samples");

  // An older model folder: everything but fd_reference.safetensors.
  temp_dir old;
  for (const auto& entry : std::filesystem::directory_iterator(SPECDIFF_MODEL_DIR))
    if (entry.path().filename() != quality::fd_reference_file_name) std::filesystem::create_symlink(entry.path(), old.path / entry.path().filename());
  const auto older = demo::make_workload(old.path, 2, 11, 1, 4.f, 1);
  CHECK_FALSE(older->model.fd_reference);
  const auto r = methods::run_full(older->problem);
  CHECK_FALSE(demo::evaluate(older->model, older->batch, r.latents, r.latents).fd);
  CHECK(demo::fd_unavailable_reason(older->model, older->batch) == "the model folder has no fd_reference.safetensors");
}

TEST_CASE("the CFG scale: the model folder's sampling.json unless the caller gives one") {
  CHECK(demo::make_workload(SPECDIFF_MODEL_DIR, 1, 0, 1, std::nullopt, 1)->problem.guidance == 4.f);  // mnist-sd3's file
  CHECK(demo::make_workload(SPECDIFF_MODEL_DIR, 1, 0, 1, 2.5f, 1)->problem.guidance == 2.5f);
  temp_dir folder;  // the same model with its own sampling.json, then without one
  for (const auto& entry : std::filesystem::directory_iterator(SPECDIFF_MODEL_DIR))
    if (entry.path().filename() != "sampling.json") std::filesystem::create_symlink(entry.path(), folder.path / entry.path().filename());
  std::ofstream(folder.path / "sampling.json") << R"({"guidance_scale": 6.5})";
  const auto own = demo::make_workload(folder.path, 1, 0, 1, std::nullopt, 1);
  CHECK(own->model.guidance == 6.5);
  CHECK(own->problem.guidance == 6.5f);
  CHECK(demo::make_workload(folder.path, 1, 0, 1, 1.f, 1)->problem.guidance == 1.f);
  std::filesystem::remove(folder.path / "sampling.json");
  CHECK(demo::make_workload(folder.path, 1, 0, 1, std::nullopt, 1)->problem.guidance == static_cast<float>(quality::default_guidance_scale));
}
