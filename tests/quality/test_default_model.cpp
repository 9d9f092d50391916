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
