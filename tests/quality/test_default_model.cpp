#include <doctest/doctest.h>

#include <fstream>
#include <stdexcept>
#include <vector>

#include "quality/default_model.hpp"
#include "test_support.hpp"

using test_support::make_tensor;

TEST_CASE("class_embeddings gathers each label's rows") {
  test_support::temp_dir dir;
  // 3 classes (the last is null), 2 context tokens of width 2, pooled width 3; values encode their position.
  std::vector<float> pooled(3 * 3), context(3 * 2 * 2);
  for (std::size_t i = 0; i < pooled.size(); ++i) pooled[i] = 100.0f + static_cast<float>(i);
  for (std::size_t i = 0; i < context.size(); ++i) context[i] = static_cast<float>(i);
  test_support::write_safetensors(dir.path() / "class_embeddings.safetensors",
                                  {make_tensor("pooled", "F32", {3, 3}, pooled), make_tensor("context", "F32", {3, 2, 2}, context)});
  const auto table = quality::class_embeddings::load(dir.path());
  CHECK(table.classes == 3);
  CHECK(table.null_class == 2);
  CHECK(table.context_tokens == 2);
  CHECK(table.joint_attention_dim == 2);
  CHECK(table.pooled_dim == 3);
  const std::vector<int> labels{2, 0};
  std::vector<float> ctx(2 * 4), pool(2 * 3);
  table.gather(labels, ctx, pool);
  CHECK(ctx == std::vector<float>{8, 9, 10, 11, 0, 1, 2, 3});
  CHECK(pool == std::vector<float>{106, 107, 108, 100, 101, 102});

  const std::vector<int> bad{0, 3};
  CHECK_THROWS_WITH_AS(table.gather(bad, ctx, pool), doctest::Contains("label 3 at index 1 is outside [0, 3)"),
                       std::invalid_argument);
  std::vector<float> short_ctx(3);
  CHECK_THROWS_WITH_AS(table.gather(labels, short_ctx, pool), doctest::Contains("need context_out 8"), std::invalid_argument);
}

TEST_CASE("the shipped default model's conditioning files load") {
  const auto table = quality::class_embeddings::load(SPECDIFF_MODEL_DIR);
  CHECK(table.classes == 11);
  CHECK(table.null_class == 10);
  CHECK(table.pooled.size() == static_cast<std::size_t>(table.classes * table.pooled_dim));
  const double shift = quality::load_scheduler_shift(SPECDIFF_MODEL_DIR);
  CHECK((shift == 1.0 || shift == 3.0));
}

TEST_CASE("load_schedule: a fixed shift, or FluxPipeline's schedule with mu from the token count") {
  test_support::temp_dir dir;
  std::ofstream(dir.path() / "scheduler_config.json") << R"({"shift": 3.0, "use_dynamic_shifting": false})";
  auto rule = quality::load_schedule(dir.path(), 256);
  CHECK(rule.shift == 3.0);
  CHECK_FALSE(rule.flux_mu.has_value());
  CHECK(rule(4).sigmas() == sd3::flow_match_euler(4, 3.0).sigmas());
  // FLUX.1's keys: mu linear through (256, 0.5) and (4096, 1.15); 1024 tokens -> 0.5 + 768 * 0.65 / 3840.
  std::ofstream(dir.path() / "scheduler_config.json")
      << R"({"shift": 3.0, "use_dynamic_shifting": true, "base_image_seq_len": 256, "max_image_seq_len": 4096,
             "base_shift": 0.5, "max_shift": 1.15})";
  rule = quality::load_schedule(dir.path(), 1024);
  REQUIRE(rule.flux_mu.has_value());
  CHECK(*rule.flux_mu == doctest::Approx(0.5 + 768 * 0.65 / 3840));
  CHECK(rule(5).sigmas() == sd3::flow_match_euler::flux(5, *rule.flux_mu).sigmas());
  std::ofstream(dir.path() / "scheduler_config.json") << R"({"shift": 3.0, "use_dynamic_shifting": true, "max_shift": 2.0})";
  CHECK(*quality::load_schedule(dir.path(), 4096).flux_mu == doctest::Approx(2.0));  // absent keys: FLUX.1's
  std::ofstream(dir.path() / "scheduler_config.json") << R"({"shift": 3.0, "use_dynamic_shifting": "yes"})";
  CHECK_THROWS_WITH_AS(quality::load_schedule(dir.path(), 256), doctest::Contains("use_dynamic_shifting \"yes\""), std::runtime_error);
  std::ofstream(dir.path() / "scheduler_config.json") << R"({"shift": 3.0, "use_dynamic_shifting": true, "max_image_seq_len": 100})";
  CHECK_THROWS_WITH_AS(quality::load_schedule(dir.path(), 256), doctest::Contains("max_seq_len"), std::runtime_error);
}

TEST_CASE("default-model loaders reject broken files") {
  test_support::temp_dir dir;
  CHECK_THROWS_WITH_AS(quality::load_scheduler_shift(dir.path()), doctest::Contains("cannot open"), std::runtime_error);
  std::ofstream(dir.path() / "scheduler_config.json") << R"({"shift": -1})";
  CHECK_THROWS_WITH_AS(quality::load_scheduler_shift(dir.path()), doctest::Contains("has shift -1"), std::runtime_error);
  std::ofstream(dir.path() / "scheduler_config.json") << R"({"num_train_timesteps": 1000})";
  CHECK_THROWS_WITH_AS(quality::load_scheduler_shift(dir.path()), doctest::Contains("no numeric shift"), std::runtime_error);
  // sampling.json: absent means the default guidance; present, it must hold a guidance_scale in [0, 100].
  CHECK(quality::load_guidance_scale(dir.path()) == quality::default_guidance_scale);
  std::ofstream(dir.path() / "sampling.json") << R"({"guidance_scale": 7.5})";
  CHECK(quality::load_guidance_scale(dir.path()) == 7.5);
  std::ofstream(dir.path() / "sampling.json") << R"({"guidance_scale": 0})";
  CHECK(quality::load_guidance_scale(dir.path()) == 0.0);
  std::ofstream(dir.path() / "sampling.json") << R"({"guidance_scale": 101})";
  CHECK_THROWS_WITH_AS(quality::load_guidance_scale(dir.path()), doctest::Contains("has guidance_scale 101, allowed: [0, 100]"),
                       std::runtime_error);
  std::ofstream(dir.path() / "sampling.json") << R"({"guidance_scale": "8"})";
  CHECK_THROWS_WITH_AS(quality::load_guidance_scale(dir.path()), doctest::Contains("no numeric guidance_scale"), std::runtime_error);
  std::ofstream(dir.path() / "sampling.json") << R"({"guidance_scale": )";
  CHECK_THROWS_WITH_AS(quality::load_guidance_scale(dir.path()), doctest::Contains("sampling.json' is not valid JSON"), std::runtime_error);
  std::filesystem::remove(dir.path() / "sampling.json");
  std::filesystem::create_directory(dir.path() / "sampling.json");  // not a regular file
  CHECK_THROWS_AS(quality::load_guidance_scale(dir.path()), std::runtime_error);
  test_support::write_safetensors(dir.path() / "class_embeddings.safetensors",
                                  {make_tensor("pooled", "F32", {3, 3}, std::vector<float>(9)),
                                   make_tensor("context", "F32", {2, 2, 2}, std::vector<float>(8))});
  CHECK_THROWS_WITH_AS(quality::class_embeddings::load(dir.path()), doctest::Contains("the same K"), std::runtime_error);
}
