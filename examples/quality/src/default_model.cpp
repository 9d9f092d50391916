#include "quality/default_model.hpp"

#include <algorithm>
#include <fstream>
#include <nlohmann/json.hpp>
#include <stdexcept>
#include <string>

#include "sd3/safetensors.hpp"

namespace quality {

class_embeddings class_embeddings::load(const std::filesystem::path& dir) {
  const auto path = dir / "class_embeddings.safetensors";
  const sd3::safetensors_file file(path);
  const auto& pooled = file.info("pooled").shape;
  const auto& context = file.info("context").shape;
  if (pooled.size() != 2 || context.size() != 3 || pooled[0] != context[0] || pooled[0] < 2) {
    throw std::runtime_error("class_embeddings: '" + path.string() + "' needs pooled [K, P] and context [K, T, J] " +
                             "with the same K >= 2");
  }
  class_embeddings table;
  table.classes = static_cast<int>(pooled[0]);
  table.null_class = table.classes - 1;
  table.pooled_dim = static_cast<int>(pooled[1]);
  table.context_tokens = static_cast<int>(context[1]);
  table.joint_attention_dim = static_cast<int>(context[2]);
  table.pooled = file.read("pooled");
  table.context = file.read("context");
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

double load_scheduler_shift(const std::filesystem::path& dir) {
  const auto path = dir / "scheduler_config.json";
  std::ifstream in(path);
  if (!in) throw std::runtime_error("load_scheduler_shift: cannot open '" + path.string() + "'");
  double shift = 0.0;
  try {
    shift = nlohmann::json::parse(in).at("shift").get<double>();
  } catch (const nlohmann::json::exception& e) {
    throw std::runtime_error("load_scheduler_shift: '" + path.string() + "' has no numeric shift: " + e.what());
  }
  if (!(shift > 0.0)) {
    throw std::runtime_error("load_scheduler_shift: '" + path.string() + "' has shift " + std::to_string(shift) +
                             ", must be > 0");
  }
  return shift;
}

}  // namespace quality
