#include "quality/default_model.hpp"

#include <algorithm>
#include <nlohmann/json.hpp>
#include <stdexcept>
#include <string>

#include "sd3/errors.hpp"
#include "sd3/files.hpp"
#include "sd3/json_input.hpp"
#include "sd3/safetensors.hpp"

namespace quality {

class_embeddings class_embeddings::load(const std::filesystem::path& dir) {
  const auto path = dir / "class_embeddings.safetensors";
  const sd3::safetensors_file file(path);
  const auto& pooled = file.info("pooled").shape;
  const auto& context = file.info("context").shape;
  // Every dimension bounded, so the int fields below and the products programs form from them cannot overflow.
  constexpr std::int64_t most = 1 << 20;
  const auto in_range = [&](const std::vector<std::int64_t>& shape) {
    return std::all_of(shape.begin(), shape.end(), [&](std::int64_t d) { return d >= 1 && d <= most; });
  };
  if (pooled.size() != 2 || context.size() != 3 || pooled[0] != context[0] || pooled[0] < 2 || !in_range(pooled) ||
      !in_range(context)) {
    throw std::runtime_error(sd3::message("class_embeddings: '", sd3::path_excerpt(path.string()),
                                          "' needs pooled [K, P] and context [K, T, J] with the same K >= 2 and every "
                                          "dimension in [1, ", most, "]"));
  }
  class_embeddings table;
  table.classes = static_cast<int>(pooled[0]);
  table.null_class = table.classes - 1;
  table.pooled_dim = static_cast<int>(pooled[1]);
  table.context_tokens = static_cast<int>(context[1]);
  table.joint_attention_dim = static_cast<int>(context[2]);
  table.pooled = file.read_finite("pooled");
  table.context = file.read_finite("context");
  return table;
}

void class_embeddings::gather(std::span<const int> labels, std::span<float> context_out,
                              std::span<float> pooled_out) const {
  const std::size_t ctx = static_cast<std::size_t>(context_tokens) * static_cast<std::size_t>(joint_attention_dim);
  const auto pdim = static_cast<std::size_t>(pooled_dim);
  if (context_out.size() != labels.size() * ctx || pooled_out.size() != labels.size() * pdim) {
    throw std::invalid_argument("class_embeddings::gather: " + std::to_string(labels.size()) + " labels need context_out " +
                                std::to_string(labels.size() * ctx) + " and pooled_out " +
                                std::to_string(labels.size() * pdim) + " floats, got " +
                                std::to_string(context_out.size()) + " and " + std::to_string(pooled_out.size()));
  }
  for (std::size_t i = 0; i < labels.size(); ++i) {
    const int label = labels[i];
    if (label < 0 || label >= classes) {
      throw std::invalid_argument("class_embeddings::gather: label " + std::to_string(label) + " at index " +
                                  std::to_string(i) + " is outside [0, " + std::to_string(classes) + ")");
    }
    const auto row = static_cast<std::size_t>(label);
    std::copy_n(context.begin() + static_cast<std::ptrdiff_t>(row * ctx), ctx,
                context_out.begin() + static_cast<std::ptrdiff_t>(i * ctx));
    std::copy_n(pooled.begin() + static_cast<std::ptrdiff_t>(row * pdim), pdim,
                pooled_out.begin() + static_cast<std::ptrdiff_t>(i * pdim));
  }
}

namespace {
// The number `key` of `config` (the JSON object read from `path`), in (lo, hi] (or [lo, hi] when lo_inclusive);
// errors name `fn`, the file and the value.
double json_number(const nlohmann::json& config, const char* fn, const std::filesystem::path& path, const char* key, double lo,
                   bool lo_inclusive, double hi) {
  auto fail = [&](const auto&... why) {
    throw std::runtime_error(sd3::message(fn, ": '", sd3::path_excerpt(path.string()), "' ", why...));
  };
  const auto it = config.is_object() ? config.find(key) : config.end();
  if (it == config.end() || !it->is_number()) fail("has no numeric ", key);
  const double v = it->get<double>();
  if (!((lo_inclusive ? v >= lo : v > lo) && v <= hi))
    fail("has ", key, " ", sd3::json_excerpt(*it), ", allowed: ", lo_inclusive ? "[" : "(", lo, ", ", hi, "]");
  return v;
}

// scheduler_config.json, read once; its `shift` checked as load_scheduler_shift checks it.
struct scheduler_file {
  std::filesystem::path path;
  nlohmann::json config;
  double shift;
  explicit scheduler_file(const std::filesystem::path& dir)
      : path(dir / "scheduler_config.json"),
        config(sd3::read_json_file(path, "load_scheduler_shift", "scheduler config")),
        shift(json_number(config, "load_scheduler_shift", path, "shift", 0.0, false, max_scheduler_shift)) {}
};
}  // namespace

double load_scheduler_shift(const std::filesystem::path& dir) { return scheduler_file(dir).shift; }

sd3::schedule_rule load_schedule(const std::filesystem::path& dir, int image_tokens) {
  const scheduler_file file(dir);
  // Plain references, not a structured binding: clang 14 (the fuzz build's compiler) cannot capture one in a lambda.
  const auto& path = file.path;
  const auto& config = file.config;
  const double shift = file.shift;
  sd3::schedule_rule rule{shift, std::nullopt};
  const auto dynamic = config.find("use_dynamic_shifting");
  if (dynamic == config.end() || dynamic->is_null()) return rule;
  if (!dynamic->is_boolean())
    throw std::runtime_error(sd3::message("load_schedule: '", sd3::path_excerpt(path.string()), "' has use_dynamic_shifting ",
                                          sd3::json_excerpt(*dynamic), ", expected true or false"));
  if (!dynamic->get<bool>()) return rule;
  auto number = [&](const char* key, double fallback, double lo, double hi) {
    return config.contains(key) ? json_number(config, "load_schedule", path, key, lo, true, hi) : fallback;
  };
  const double base = number("base_image_seq_len", 256, 1, 1 << 30), top = number("max_image_seq_len", 4096, 1, 1 << 30);
  const double base_shift = number("base_shift", 0.5, -100, 100), max_shift = number("max_shift", 1.15, -100, 100);
  try {
    rule.flux_mu = sd3::flux_mu(image_tokens, static_cast<int>(base), static_cast<int>(top), base_shift, max_shift);
  } catch (const std::invalid_argument& e) {
    throw std::runtime_error(sd3::message("load_schedule: '", sd3::path_excerpt(path.string()), "': ", e.what()));
  }
  return rule;
}

double load_guidance_scale(const std::filesystem::path& dir) {
  const auto path = dir / "sampling.json";
  std::error_code ec;
  if (!std::filesystem::exists(std::filesystem::symlink_status(path, ec))) return default_guidance_scale;
  return json_number(sd3::read_json_file(path, "load_guidance_scale", "sampling defaults"), "load_guidance_scale", path, "guidance_scale", 0.0,
                     true, max_guidance_scale);
}

}  // namespace quality
