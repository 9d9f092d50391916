// Rectified-flow sampling: diffusers' FlowMatchEulerDiscreteScheduler and the SD3 pipeline's denoising loop
// with classifier-free guidance.
#pragma once

#include <functional>
#include <optional>
#include <span>
#include <vector>

#include "sd3/transformer.hpp"

namespace sd3 {

// FlowMatchEulerDiscreteScheduler(num_train_timesteps, shift[, use_dynamic_shifting]) after set_timesteps(steps[, mu]):
//   sigma_max, sigma_min: the training table linspace(1, T, T)/T reversed, shifted once (float32);
//   sigmas = shift(linspace(sigma_max*T, sigma_min*T, steps) / T), i.e. the endpoints are shifted twice, then a
//   0 appended; timesteps = sigmas * T (float32). With `mu` (dynamic shifting) the second shift is
//   exp(mu) / (exp(mu) + (1/sigma - 1)) instead and the training table is not shifted.
class flow_match_euler {
public:
    // Most steps (and training timesteps) accepted; the tables hold one float per step.
    static constexpr int max_steps = 100000;
    // Throws std::invalid_argument naming the argument: steps or num_train_timesteps outside their range, a
    // shift that is not finite and > 0, a non-finite mu, or a shift / mu so extreme that a sigma leaves [0, 1].
    explicit flow_match_euler(int steps, double shift = 3.0, int num_train_timesteps = 1000,
                              std::optional<double> mu = std::nullopt);
    // The Euler sampler over given timesteps (strictly falling, in (0, T]): sigma = t / T, then 0. What a
    // speculative pass at chosen main-grid timesteps integrates along (specdiff::aligned_speculative_timesteps).
    static flow_match_euler at_timesteps(std::span<const float> timesteps, int num_train_timesteps = 1000);
    // diffusers' FLUX pipeline: set_timesteps(sigmas = linspace(1, 1/steps, steps), mu) with dynamic shifting,
    // sigma -> exp(mu) / (exp(mu) + 1/sigma - 1), in float64 then float32 (the unshifted table plays no part).
    // mu from flux_mu(image tokens). Throws std::invalid_argument naming steps or mu when out of range.
    static flow_match_euler flux(int steps, double mu, int num_train_timesteps = 1000);
    int steps() const noexcept { return static_cast<int>(timesteps_.size()); }
    const std::vector<float>& sigmas() const noexcept { return sigmas_; }       // steps + 1 values, last 0
    const std::vector<float>& timesteps() const noexcept { return timesteps_; } // steps values
    // Euler update of step i: latents += (sigma[i+1] - sigma[i]) * velocity.
    void step(int i, std::span<const float> velocity, std::span<float> latents) const;

private:
    flow_match_euler() = default;
    // Appends sigma[i] = shifted(base[i]) in float32, timestep = sigma * T, then the final 0; refuses (naming
    // `knob`) a shift that takes a sigma out of [0, 1].
    template <class Shift, class Knob>
    void set_sigmas(std::span<const double> base, Shift shifted, float T, Knob knob);
    std::vector<float> sigmas_, timesteps_;
};

// The FLUX pipeline's resolution-dependent shift (calculate_shift): linear in the image's token count through
// (base_seq_len, base_shift) and (max_seq_len, max_shift); the defaults are FLUX.1-dev's scheduler_config.json.
// Throws std::invalid_argument naming the argument when image_seq_len < 1 or max_seq_len <= base_seq_len.
double flux_mu(int image_seq_len, int base_seq_len = 256, int max_seq_len = 4096, double base_shift = 0.5,
               double max_shift = 1.15);

// How a pipeline builds its schedule for a step count from the model's scheduler_config.json: SD3's (the
// scheduler's own sigmas with a fixed shift) or, with dynamic shifting, FluxPipeline's (sigmas
// linspace(1, 1/n, n) shifted by mu, which the pipeline computes from the image's token count: flux_mu).
struct schedule_rule {
    double shift = 3.0;
    std::optional<double> flux_mu;  // set: FluxPipeline's schedule with this mu
    flow_match_euler operator()(int steps) const {
        return flux_mu ? flow_match_euler::flux(steps, *flux_mu) : flow_match_euler(steps, shift);
    }
};

// Conditioning for sample_cfg, diffusers' names: context = prompt_embeds, pooled = pooled_prompt_embeds.
struct cfg_inputs {
    int batch = 0;
    int height = 0;  // SD3: latent pixels; FLUX: the token grid (forward_inputs)
    int width = 0;
    int context_tokens = 0;
    std::span<const float> noise;             // initial latents: SD3 [batch, in_channels, height, width], FLUX [batch, height * width, in_channels]
    std::span<const float> context;           // [batch, context_tokens, joint_attention_dim]
    std::span<const float> negative_context;  // same shape; needed only when guidance > 1
    std::span<const float> pooled;            // [batch, pooled_projection_dim]
    std::span<const float> negative_pooled;   // same shape; needed only when guidance > 1
};

// One model evaluation requested by the sampler. With guidance > 1 the model batch is [uncond; cond]
// (2 * batch samples, diffusers' order); the callee fills `velocity` [model batch, out_channels, H, W].
struct model_call {
    int step = 0;
    float timestep = 0;  // sigma * 1000, the value every sample of the batch gets
    float sigma = 0;
    float sigma_next = 0;
    const forward_inputs* inputs = nullptr;
    std::span<float> velocity;
};

// Replaces the model call (e.g. a caching policy that runs a token-subset forward); empty = net.forward.
using model_fn = std::function<void(const model_call&)>;
// Observes the latents after each Euler step (step index, the sigma reached, latents [batch, C, H, W]).
using step_fn = std::function<void(int step, float sigma, std::span<const float> latents)>;

// The SD3 pipeline loop: for each step, v = model([uncond; cond], t), v = v_u + guidance (v_c - v_u)
// (guidance > 1, else the cond batch alone), latents = Euler step. Returns the final latents. A FLUX model with
// a guidance embedding (FLUX.1-dev) is given `guidance` as its input instead, with one batch (FluxPipeline's loop);
// a FLUX model without one is guided by CFG like SD3.
// The transformer's max_batch must hold the model batch. Buffers are allocated once per call, not per step.
std::vector<float> sample_cfg(transformer& net, const flow_match_euler& scheduler, const cfg_inputs& in, float guidance,
                              const model_fn& model = {}, const step_fn& on_step = {});

}  // namespace sd3
