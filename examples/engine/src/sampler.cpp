#include "sd3/sampler.hpp"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

#include "sd3/errors.hpp"
#include "sd3/flux_model.hpp"

namespace sd3 {
namespace {
// numpy.linspace(start, stop, n) in float64: the last value is `stop` itself.
std::vector<double> linspace(double start, double stop, int n) {
    std::vector<double> v(static_cast<std::size_t>(n));
    const double step = n > 1 ? (stop - start) / (n - 1) : 0.0;
    for (int i = 0; i < n; ++i) v[static_cast<std::size_t>(i)] = (n > 1 && i == n - 1) ? stop : start + i * step;
    return v;
}

// Dynamic shifting (time_shift with exponent 1): sigma -> exp(mu) / (exp(mu) + 1/sigma - 1).
auto exponential_shift(double mu) {
    return [e = std::exp(mu)](double s) { return e / (e + (1.0 / s - 1.0)); };
}
}  // namespace

flow_match_euler::flow_match_euler(int steps, double shift, int num_train_timesteps, std::optional<double> mu) {
    auto bad = [](const auto&... what) { throw std::invalid_argument(message("flow_match_euler: ", what...)); };
    if (steps < 1 || steps > max_steps) bad("steps = ", steps, " is out of range [1, ", max_steps, "]");
    if (!(shift > 0) || !std::isfinite(shift)) bad("shift = ", shift, " must be finite and > 0");
    if (num_train_timesteps < 2 || num_train_timesteps > max_steps)
        bad("num_train_timesteps = ", num_train_timesteps, " is out of range [2, ", max_steps, "]");
    if (mu && !std::isfinite(*mu)) bad("mu = ", *mu, " must be finite");
    const float T = static_cast<float>(num_train_timesteps);
    // Training table ends (float32 torch arithmetic in diffusers' __init__): sigma = t / T for t = T .. 1.
    auto train_sigma = [&](float t) {
        const float s = t / T;
        if (mu) return s;  // dynamic shifting: the table is not shifted
        const float a = static_cast<float>(shift) * s;
        const float d = 1.0f + static_cast<float>(shift - 1.0) * s;
        return a / d;
    };
    const double sigma_max = train_sigma(T), sigma_min = train_sigma(1.0f);
    // set_timesteps: numpy float64 linspace between the ends on the t scale, shifted again, then float32.
    std::vector<double> base = linspace(sigma_max * num_train_timesteps, sigma_min * num_train_timesteps, steps);
    for (double& t : base) t /= num_train_timesteps;
    if (mu) set_sigmas(base, exponential_shift(*mu), T, [&] { return message("mu = ", *mu); });
    else set_sigmas(base, [shift](double s) { return shift * s / (1.0 + (shift - 1.0) * s); }, T, [&] { return message("shift = ", shift); });
}

template <class Shift, class Knob>
void flow_match_euler::set_sigmas(std::span<const double> base, Shift shifted, float T, Knob knob) {
    for (const double s : base) {
        sigmas_.push_back(static_cast<float>(shifted(s)));
        timesteps_.push_back(sigmas_.back() * T);
    }
    sigmas_.push_back(0.0f);
    // A finite but extreme shift (or mu) overflows the shift formula; report it by name, not as NaN timesteps later.
    for (std::size_t i = 0; i < base.size(); ++i)
        if (!(sigmas_[i] >= 0.0f && sigmas_[i] <= 1.0f))
            throw std::invalid_argument(message("flow_match_euler: ", knob(), " gives sigma[", i, "] = ", sigmas_[i], ", outside [0, 1]"));
}

flow_match_euler flow_match_euler::flux(int steps, double mu, int num_train_timesteps) {
    auto bad = [](const auto&... what) { throw std::invalid_argument(message("flow_match_euler::flux: ", what...)); };
    if (steps < 1 || steps > max_steps) bad("steps = ", steps, " is out of range [1, ", max_steps, "]");
    if (!std::isfinite(mu)) bad("mu = ", mu, " must be finite");
    if (num_train_timesteps < 2 || num_train_timesteps > max_steps)
        bad("num_train_timesteps = ", num_train_timesteps, " is out of range [2, ", max_steps, "]");
    const std::vector<double> base = linspace(1.0, 1.0 / steps, steps);  // FluxPipeline's sigmas
    flow_match_euler s;
    s.set_sigmas(base, exponential_shift(mu), static_cast<float>(num_train_timesteps), [&] { return message("mu = ", mu); });
    return s;
}

double flux_mu(int image_seq_len, int base_seq_len, int max_seq_len, double base_shift, double max_shift) {
    auto bad = [](const auto&... what) { throw std::invalid_argument(message("flux_mu: ", what...)); };
    if (image_seq_len < 1) bad("image_seq_len = ", image_seq_len, " must be >= 1");
    if (max_seq_len <= base_seq_len) bad("max_seq_len = ", max_seq_len, " must exceed base_seq_len = ", base_seq_len);
    if (!std::isfinite(base_shift) || !std::isfinite(max_shift))
        bad("base_shift / max_shift = ", base_shift, " / ", max_shift, " must be finite");
    const double m = (max_shift - base_shift) / (max_seq_len - base_seq_len);
    const double b = base_shift - m * base_seq_len;
    return image_seq_len * m + b;
}

flow_match_euler flow_match_euler::at_timesteps(std::span<const float> timesteps, int num_train_timesteps) {
    if (timesteps.empty()) throw std::invalid_argument("flow_match_euler::at_timesteps: timesteps is empty");
    if (num_train_timesteps < 2)
        throw std::invalid_argument("flow_match_euler::at_timesteps: num_train_timesteps = " + std::to_string(num_train_timesteps) + " must be >= 2");
    const float T = static_cast<float>(num_train_timesteps);
    flow_match_euler s;
    for (std::size_t i = 0; i < timesteps.size(); ++i) {
        const float t = timesteps[i];
        if (!(t > 0.f && t <= T) || (i > 0 && !(t < timesteps[i - 1])))
            throw std::invalid_argument("flow_match_euler::at_timesteps: timesteps[" + std::to_string(i) + "] = " + std::to_string(t) +
                                        " must lie in (0, " + std::to_string(num_train_timesteps) + "] and below the previous one");
        s.timesteps_.push_back(t);
        s.sigmas_.push_back(t / T);
    }
    s.sigmas_.push_back(0.0f);
    return s;
}

void flow_match_euler::step(int i, std::span<const float> velocity, std::span<float> latents) const {
    if (i < 0 || i >= steps())
        throw std::invalid_argument("flow_match_euler::step: i = " + std::to_string(i) + " outside [0, " + std::to_string(steps()) + ")");
    if (velocity.size() != latents.size())
        throw std::invalid_argument("flow_match_euler::step: velocity has " + std::to_string(velocity.size()) +
                                    " values, latents " + std::to_string(latents.size()));
    const float dt = sigmas_[i + 1] - sigmas_[i];
    for (std::size_t k = 0; k < latents.size(); ++k) latents[k] = latents[k] + dt * velocity[k];
}

std::vector<float> sample_cfg(transformer& net, const flow_match_euler& scheduler, const cfg_inputs& in, float guidance,
                              const model_fn& model, const step_fn& on_step) {
    // What the loop needs of the model. A FLUX model with a guidance embedding takes the scale as an input
    // (FluxPipeline: one batch, no CFG); every other model is guided by CFG.
    const bool flux = net.arch() == architecture::flux;
    const int in_channels = flux ? net.flux().in_channels : net.config().in_channels;
    const int out_channels = flux ? net.flux().patch_features() : net.config().out_channels;
    const int joint_dim = flux ? net.flux().joint_attention_dim : net.config().joint_attention_dim;
    const int pooled_dim = flux ? net.flux().pooled_projection_dim : net.config().pooled_projection_dim;
    const bool embedded = flux && net.flux().guidance_embeds;
    const bool cfg = !embedded && guidance > 1.0f;  // diffusers: do_classifier_free_guidance = guidance_scale > 1
    auto bad = [](const std::string& what) { throw std::invalid_argument("sample_cfg: " + what); };
    if (in.batch < 1) bad("batch = " + std::to_string(in.batch) + " must be >= 1");
    if (!std::isfinite(guidance)) bad("guidance must be finite");
    const int mb = cfg ? 2 * in.batch : in.batch;
    if (mb > net.limits().max_batch)
        bad("model batch " + std::to_string(mb) + (cfg ? " (2 x batch for guidance)" : "") + " exceeds the transformer's max_batch " +
            std::to_string(net.limits().max_batch));
    if (in_channels != out_channels)
        bad("in_channels " + std::to_string(in_channels) + " != out_channels " + std::to_string(out_channels) +
            ": the velocity cannot update the latents");
    const std::size_t B = in.batch, latent = static_cast<std::size_t>(in_channels) * in.height * in.width;
    const std::size_t ctx = static_cast<std::size_t>(in.context_tokens) * joint_dim, pooled = pooled_dim;
    auto check = [&](const char* name, std::size_t got, std::size_t want) {
        if (got != want) bad(std::string(name) + " holds " + std::to_string(got) + " floats, expected " + std::to_string(want));
    };
    check("noise", in.noise.size(), B * latent);
    check("context", in.context.size(), B * ctx);
    check("pooled", in.pooled.size(), B * pooled);
    if (cfg) {
        check("negative_context", in.negative_context.size(), B * ctx);
        check("negative_pooled", in.negative_pooled.size(), B * pooled);
    }

    // Batched model inputs, [uncond; cond] as the pipeline concatenates them.
    std::vector<float> latents(in.noise.begin(), in.noise.end());
    std::vector<float> model_latents(mb * latent), context(mb * ctx), pooled_in(mb * pooled), t(mb), v(mb * latent);
    std::vector<float> scales(embedded ? B : 0, guidance);
    auto place = [&](std::span<const float> src, std::vector<float>& dst, std::size_t at) { std::copy(src.begin(), src.end(), dst.begin() + at); };
    if (cfg) {
        place(in.negative_context, context, 0);
        place(in.context, context, B * ctx);
        place(in.negative_pooled, pooled_in, 0);
        place(in.pooled, pooled_in, B * pooled);
    } else {
        place(in.context, context, 0);
        place(in.pooled, pooled_in, 0);
    }
    const forward_inputs fi{.batch = mb,
                            .height = in.height,
                            .width = in.width,
                            .context_tokens = in.context_tokens,
                            .latents = model_latents,
                            .timesteps = t,
                            .context = context,
                            .pooled = pooled_in,
                            .guidance = scales};

    for (int i = 0; i < scheduler.steps(); ++i) {
        const float ts = scheduler.timesteps()[i];
        std::fill(t.begin(), t.end(), ts);
        for (int r = 0; r < (cfg ? 2 : 1); ++r) std::copy(latents.begin(), latents.end(), model_latents.begin() + r * B * latent);
        const model_call call{i, ts, scheduler.sigmas()[i], scheduler.sigmas()[i + 1], &fi, v};
        if (model) model(call);
        else net.forward(fi, v);
        if (cfg)  // v = v_u + g (v_c - v_u), written over the uncond half
            for (std::size_t k = 0; k < B * latent; ++k) v[k] = v[k] + guidance * (v[B * latent + k] - v[k]);
        scheduler.step(i, std::span<const float>(v.data(), B * latent), latents);
        if (on_step) on_step(i, scheduler.sigmas()[i + 1], latents);
    }
    return latents;
}

}  // namespace sd3
