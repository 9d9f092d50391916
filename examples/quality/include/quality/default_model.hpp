#pragma once
// The default model's conditioning files (models/mnist-sd3/): the learned class-embedding table that feeds
// both MMDiT conditioning paths, and the scheduler shift it samples best with. The transformer itself is a
// plain diffusers folder (transformer/) that the engine loads.

#include <filesystem>
#include <span>
#include <vector>

#include "sd3/sampler.hpp"

namespace quality {

struct class_embeddings {
  int classes = 0;         // table rows, the null class included
  int null_class = 0;      // the "no label" row that classifier-free guidance uses (the last row)
  int context_tokens = 0;
  int joint_attention_dim = 0;
  int pooled_dim = 0;
  std::vector<float> pooled;   // [classes, pooled_dim]
  std::vector<float> context;  // [classes, context_tokens, joint_attention_dim]

  /// Reads `dir`/class_embeddings.safetensors (tensors `pooled` [K, P] and `context` [K, T, J]).
  /// Throws std::runtime_error naming the file when a tensor is missing, the shapes disagree (or a dimension
  /// exceeds 2^20), or a value is not finite.
  static class_embeddings load(const std::filesystem::path& dir);

  /// Writes, for each label, its context rows [T, J] and pooled row [P] (the layouts sd3::cfg_inputs takes).
  /// Throws std::invalid_argument for a label outside [0, classes) or output spans of the wrong size.
  void gather(std::span<const int> labels, std::span<float> context_out, std::span<float> pooled_out) const;
};

/// Largest scheduler shift accepted from a file or the command line (SD3 uses 3; larger values squeeze
/// every step against sigma = 1).
inline constexpr double max_scheduler_shift = 1000.0;

/// `shift` from `dir`/scheduler_config.json (diffusers FlowMatchEulerDiscreteScheduler config).
/// Throws std::runtime_error naming the file when it is missing, not a regular file, or has no `shift` in
/// (0, max_scheduler_shift].
double load_scheduler_shift(const std::filesystem::path& dir);

/// How the model's pipeline builds its schedule, from the same file: the fixed `shift`, or, with
/// `use_dynamic_shifting` true (FLUX), FluxPipeline's schedule with mu = sd3::flux_mu(image_tokens,
/// base_image_seq_len, max_image_seq_len, base_shift, max_shift) (absent keys: FLUX.1's 256, 4096, 0.5, 1.15).
/// Throws std::runtime_error naming the file and key for a value out of range or of the wrong type.
sd3::schedule_rule load_schedule(const std::filesystem::path& dir, int image_tokens);

/// Classifier-free guidance scale of a model folder without `sampling.json`, and the largest accepted.
inline constexpr double default_guidance_scale = 4.0;
inline constexpr double max_guidance_scale = 100.0;

/// The guidance scale the model samples best with: `guidance_scale` from `dir`/sampling.json (our file; diffusers
/// keeps it out of the model folder), in [0, max_guidance_scale]; default_guidance_scale when the file is absent.
/// Throws std::runtime_error naming the file when it is there but not a regular file, not JSON, or out of range.
double load_guidance_scale(const std::filesystem::path& dir);

}  // namespace quality
