// Rectified-flow sampling with classifier-free guidance on the device (the GPU twin of sd3::sample_cfg), either
// with a full forward every step or with SpecDiff: the speculative pass and the main pass driven by
// specdiff::gpu::accelerator, the C1 tokens of each partial step run through sd3::gpu::transformer's token-subset
// forward against its K/V cache, the other rows filled by the accelerator's cache store.
//
//     sd3::gpu::sampler s(net, sd3::flow_match_euler(28), inputs, sd3::gpu::specdiff_settings{}, stream);
//     s.run();                        // enqueues a whole run: no allocation, no host synchronisation
//     s.capture(); s.replay();        // or record it once as a CUDA graph and launch that
//     std::vector<float> rows = s.latent_rows();
//
// The state stays on the device as token rows (sd3::gpu::transformer's layout) for the whole run; the latents come
// back as rows, which sd3::patches_to_image turns into diffusers' image layout.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <vector>

#include <cuda_runtime_api.h>

#include "sd3/cuda/transformer.hpp"
#include "sd3/sampler.hpp"

namespace sd3::gpu {

// SpecDiff's settings: methods::specdiff_options' defaults (the paper's), for the same plans as the CPU runner.
struct specdiff_settings {
    double cache_rate = 0.9;
    int speculative_steps = 2;          // >= 1: the speculative pass is what ranks the tokens
    double reuse_mass = 0.10;
    int warmup_steps = 2;
    int refresh_interval = 0;
    std::vector<int> reset_steps = {14};  // entries past the run's steps are dropped, as the CPU runner does
    bool share_cfg_plan = true;         // with guidance > 1: the uncond and cond halves share one plan
    int probe_query_step = 1;           // the attention probe: 1 exact, s > 1 the estimate (forward_options)
};

// What to sample, in host memory; the sampler copies it to the device once.
struct sampling_inputs {
    int batch = 0;  // images
    int grid_height = 0;
    int grid_width = 0;
    int context_tokens = 0;
    float guidance = 1.f;  // > 1: CFG, model batch [uncond; cond] (diffusers' order)
    std::span<const float> noise_rows;        // [batch][grid_height * grid_width][patch_inputs]
    std::span<const float> context;           // [batch][context_tokens][joint_attention_dim]
    std::span<const float> negative_context;  // same; needed only when guidance > 1
    std::span<const float> pooled;            // [batch][pooled_projection_dim]
    std::span<const float> negative_pooled;   // same; needed only when guidance > 1
};

class sampler {
public:
    // settings: nullopt = full compute every step. Checks everything on the host (std::invalid_argument naming
    // the argument), then allocates all device memory (a workspace of its own among it) and builds the accelerator;
    // `net` must outlive the sampler, and samplers on other streams may share it.
    sampler(const transformer& net, const flow_match_euler& schedule, const sampling_inputs& in, std::optional<specdiff_settings> settings,
            cudaStream_t stream);
    ~sampler();
    sampler(const sampler&) = delete;
    sampler& operator=(const sampler&) = delete;

    // Enqueues a whole run on the stream, from the noise: the accelerator is reset first, so runs repeat.
    void run();
    // Records run() into a CUDA graph (cudaStreamCaptureModeGlobal: a hidden allocation or synchronisation fails
    // the capture), replacing an earlier one; replay() launches it. A failed capture throws specdiff::gpu::cuda_error
    // with the runtime's last error cleared, so the sampler still runs eagerly (a capture needs a stream of its own:
    // the legacy default stream, nullptr, cannot be captured).
    void capture();
    void replay();

    // Per-step timing of eager runs (CUDA events around the accelerator's calls and the forward; capture() records
    // none): after a run() with profiling on, step_times() gives each main step's milliseconds (waits for the stream).
    struct step_time {
        bool dense = false;
        int computed = 0;        // C1 tokens per sample
        float library_ms = 0;    // plan_step + complete_step: scoring, classification, gathers, cache fills
        float forward_ms = 0;    // the network (with the attention probe)
    };
    void set_profiling(bool on);
    std::vector<step_time> step_times() const;

    int model_batch() const noexcept;
    int steps() const noexcept;
    int speculative_steps() const noexcept;
    // Main step k's C1 tokens per model sample: the count is host-known; the ids, [model batch][count], are what
    // the last run recorded (waits for the stream). Dense steps list every token.
    int compute_count(int step) const;
    std::vector<std::int32_t> compute_tokens(int step) const;
    // The final latents, [batch][tokens][patch_inputs] (waits for the stream).
    std::vector<float> latent_rows() const;
    // Throws std::runtime_error when a status word (the accelerator's classifier and store, the transformer's token
    // check) reports bad data. Waits for the stream.
    void check_status() const;
    // Device bytes the sampler holds besides the transformer's weights: the K/V cache, the accelerator's memory
    // (cache store, plans, records), and its buffers (the forward's workspace, latents, rows).
    std::size_t kv_cache_bytes() const noexcept;
    std::size_t accelerator_bytes() const noexcept;
    std::size_t buffer_bytes() const noexcept;

private:
    struct impl;
    std::unique_ptr<impl> impl_;
};

}  // namespace sd3::gpu
