// The shipped FLUX model against diffusers: tools/train_flux_model.py evaluate --dump sampled 4 digits (labels 0, 3,
// 7, 9) in 4 steps with FluxPipeline's schedule and CFG 4 from specdiff's Philox noise; the C++ engine, loading the
// model folder as the demo does, must land on the same latents, and unpack them to the same images.
#include <doctest/doctest.h>

#include <cmath>
#include <vector>

#include "demo/support.hpp"
#include "sd3/safetensors.hpp"
#include "sd3/sampler.hpp"

namespace {
double rel_l2(std::span<const float> a, std::span<const float> b) {
  double num = 0, den = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    num += (static_cast<double>(a[i]) - b[i]) * (static_cast<double>(a[i]) - b[i]);
    den += static_cast<double>(b[i]) * b[i];
  }
  return std::sqrt(num / den);
}
}  // namespace

TEST_CASE("models/mnist-flux: the C++ engine samples what diffusers sampled (FluxPipeline's schedule, CFG, packing)") {
  const auto m = demo::conditional_model::load(SPECDIFF_FLUX_MODEL_DIR);
  REQUIRE(m.flux());
  const sd3::safetensors_file dump(SPECDIFF_FLUX_SAMPLE);
  const auto noise = dump.read("noise"), expected = dump.read("latents"), images = dump.read("images");
  const auto labels64 = dump.read_ints("labels");
  const std::vector<int> labels(labels64.begin(), labels64.end());
  const int batch = static_cast<int>(labels.size());
  const auto steps = static_cast<int>(dump.info("timesteps").shape.at(0));

  // The schedule from the folder's scheduler_config.json (dynamic shifting: mu from 256 tokens) is the dump's.
  const auto schedule = m.schedule(steps);
  const auto sigmas = dump.read("sigmas");
  REQUIRE(schedule.sigmas().size() == sigmas.size());
  for (std::size_t i = 0; i < sigmas.size(); ++i) CHECK(schedule.sigmas()[i] == doctest::Approx(sigmas[i]).epsilon(1e-6));

  const auto& e = m.classes;
  const std::size_t ctx = static_cast<std::size_t>(batch) * e.context_tokens * e.joint_attention_dim,
                    pool = static_cast<std::size_t>(batch) * e.pooled_dim;
  std::vector<float> context(ctx), negative_context(ctx), pooled(pool), negative_pooled(pool);
  e.gather(labels, context, pooled);
  e.gather(std::vector<int>(labels.size(), e.null_class), negative_context, negative_pooled);
  auto net = m.engine({.max_batch = 2 * batch, .max_height = 0, .max_width = 0, .max_context_tokens = e.context_tokens}, 2);
  const sd3::cfg_inputs in{.batch = batch, .height = m.latent_height(), .width = m.latent_width(),
                           .context_tokens = e.context_tokens, .noise = noise, .context = context,
                           .negative_context = negative_context, .pooled = pooled, .negative_pooled = negative_pooled};
  const auto out = sd3::sample_cfg(*net, schedule, in, static_cast<float>(dump.read_doubles("guidance_scale").at(0)));
  const double err = rel_l2(out, expected);
  MESSAGE("mnist-flux 4-step sampling, relative L2 error against diffusers " << err);
  CHECK(err <= 1e-5);
  CHECK(rel_l2(m.images(out), images) <= 1e-5);  // FluxPipeline's unpacking
}
