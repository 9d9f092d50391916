// Times one full forward of the engine on a mid-size SD3 config with random weights (default: 12 blocks,
// hidden 384 = 6 heads x 64, 1024 image tokens from a 64x64 latent with patch 2, 77 context tokens, batch 2).
// The same config is timed in PyTorch by tools/bench_forward_torch.py; bench/forward/run.sh runs both.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <random>
#include <vector>

#include <CLI/CLI.hpp>

#include "sd3/model.hpp"
#include "sd3/transformer.hpp"

int main(int argc, char** argv) {
    CLI::App app{"SD3 engine forward timing"};
    int threads = 2, batch = 2, reps = 5, warmup = 1, layers = 12, heads = 6, head_dim = 64, latent = 64, context = 77;
    bool qk_norm = false;
    double subset = 0.0;
    app.add_option("--threads", threads, "engine threads")->check(CLI::PositiveNumber);
    app.add_option("--batch", batch)->check(CLI::PositiveNumber);
    app.add_option("--reps", reps, "timed forwards")->check(CLI::PositiveNumber);
    app.add_option("--warmup", warmup)->check(CLI::NonNegativeNumber);
    app.add_option("--layers", layers)->check(CLI::PositiveNumber);
    app.add_option("--heads", heads)->check(CLI::PositiveNumber);
    app.add_option("--head-dim", head_dim)->check(CLI::PositiveNumber);
    app.add_option("--latent", latent, "latent side in pixels (tokens = (latent/2)^2)")->check(CLI::PositiveNumber);
    app.add_option("--context", context, "context tokens")->check(CLI::PositiveNumber);
    app.add_flag("--qk-norm", qk_norm, "RMS qk-norm (SD3.5 style)");
    app.add_option("--subset", subset, "also time a token-subset forward computing this fraction of the image tokens")
        ->check(CLI::Range(0.0, 1.0));
    CLI11_PARSE(app, argc, argv);

    sd3::transformer_config c;
    c.sample_size = latent;
    c.patch_size = 2;
    c.in_channels = c.out_channels = 16;
    c.num_layers = layers;
    c.num_attention_heads = heads;
    c.attention_head_dim = head_dim;
    c.caption_projection_dim = heads * head_dim;
    c.joint_attention_dim = 4096;
    c.pooled_projection_dim = 2048;
    c.pos_embed_max_size = std::max(96, latent / 2);
    c.qk_norm = qk_norm;
    const auto model = sd3::model::random(c, 42);
    sd3::transformer net(model, {.max_batch = batch, .max_height = latent, .max_width = latent, .max_context_tokens = context},
                         threads);

    std::mt19937 rng(1);
    std::normal_distribution<float> normal;
    std::vector<float> latents(static_cast<std::size_t>(batch) * 16 * latent * latent), ctx(static_cast<std::size_t>(batch) * context * 4096),
        pooled(static_cast<std::size_t>(batch) * 2048), t(batch, 500.0f), v(latents.size());
    for (auto* x : {&latents, &ctx, &pooled})
        for (auto& e : *x) e = normal(rng);
    const sd3::forward_inputs in{batch, latent, latent, context, latents, t, ctx, pooled};

    for (int i = 0; i < warmup; ++i) net.forward(in, v);
    std::vector<double> ms;
    for (int i = 0; i < reps; ++i) {
        const auto t0 = std::chrono::steady_clock::now();
        net.forward(in, v);
        ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
    }
    auto time_it = [&](auto&& fn) {
        for (int i = 0; i < warmup; ++i) fn();
        std::vector<double> t_ms;
        for (int i = 0; i < reps; ++i) {
            const auto t0 = std::chrono::steady_clock::now();
            fn();
            t_ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
        }
        std::sort(t_ms.begin(), t_ms.end());
        return t_ms;
    };
    std::sort(ms.begin(), ms.end());
    std::printf("engine forward: layers %d hidden %d tokens %d context %d batch %d threads %d: median %.1f ms, min %.1f ms (%d reps)\n",
                layers, c.hidden(), (latent / 2) * (latent / 2), context, batch, threads, ms[ms.size() / 2], ms.front(), reps);
    std::printf("RESULT median_ms=%.3f min_ms=%.3f\n", ms[ms.size() / 2], ms.front());
    if (subset > 0.0) {  // token-subset forward (K/V of the other tokens from the cache): cost should follow n
        const int N = (latent / 2) * (latent / 2), n = std::max(1, static_cast<int>(subset * N + 0.5));
        sd3::kv_cache kv(c, batch, N);
        std::vector<std::int32_t> tokens;
        for (int b = 0; b < batch; ++b)
            for (int i = 0; i < n; ++i) tokens.push_back(static_cast<std::int32_t>(static_cast<long>(i) * N / n));
        std::vector<float> rows(static_cast<std::size_t>(batch) * n * c.patch_features());
        sd3::forward_options full;
        full.kv = &kv;
        net.forward(in, v, full);
        sd3::forward_options part = full;
        part.image_tokens = tokens;
        const auto sub = time_it([&] { net.forward(in, rows, part); });
        std::printf("engine subset forward: %d of %d tokens (%.0f%%): median %.1f ms = %.2f of the full forward\n", n, N,
                    100.0 * n / N, sub[sub.size() / 2], sub[sub.size() / 2] / ms[ms.size() / 2]);
    }
    return 0;
}
