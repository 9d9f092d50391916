// Times the engine's forward on one SD3 config with random weights: the full forward, a token-subset forward
// (SpecDiff's partial step: the C1 image tokens against cached keys and values) and, with --gemms, every linear
// layer's GEMM alone. Reports GFLOP/s and the fraction of the core's FP32 FMA peak (measured, or --peak) for each,
// and the subset forward's speedup against its FLOP ratio. Default config: 12 blocks, hidden 384 = 6 heads x 64,
// 1024 image tokens from a 64x64 latent with patch 2, 77 context tokens, batch 2; --config takes a diffusers
// config.json instead (e.g. models/mnist-sd3/transformer/config.json). tools/bench_forward_torch.py times the
// same config in PyTorch; bench/forward/run.sh runs both, interleaved.
#include <algorithm>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include "bench/timing.hpp"
#include "sd3/config.hpp"
#include "sd3/gemm.hpp"
#include "sd3/model.hpp"
#include "sd3/transformer.hpp"

namespace {

// FLOPs (2 per multiply-add) of one forward: per sample n of the N image tokens computed (n = N for the full
// forward) and L context tokens; batch B. Counts the GEMMs and the attention's two products; norms, activations and the softmax
// are left out (they are not multiply-adds).
double forward_flops(const sd3::transformer_config& c, int B, int N, int n, int L) {
    const double D = c.hidden(), macs_per_row_block = 12 * D * D;  // qkv 3D^2 + out D^2 + MLP 8D^2
    double macs = 0;
    for (int l = 0; l < c.num_layers; ++l) {
        const bool last = l == c.num_layers - 1;  // context_pre_only: context rows give keys and values only
        macs += D * 6 * D + D * (last ? 2 : 6) * D;                             // AdaLN modulation (per sample)
        macs += double(n) * macs_per_row_block + double(L) * (last ? 3 * D * D : macs_per_row_block);
        macs += 2.0 * (n + (last ? 0 : L)) * double(N + L) * D;                  // Q K^T and P V
    }
    macs += double(L) * c.joint_attention_dim * D + double(n) * c.patch_inputs() * D;  // context and patch embedding
    macs += D * 2 * D + double(n) * D * c.patch_features();                            // final layer
    return 2.0 * B * macs;
}

using bench::median;
using bench::time_ms;

}  // namespace

int main(int argc, char** argv) {
    CLI::App app{"SD3 engine forward timing"};
    int threads = 2, batch = 2, reps = 5, warmup = 1, layers = 12, heads = 6, head_dim = 64, latent = 64, context = 77;
    bool qk_norm = false, gemms = false, profile_subset = false;
    double subset = 0.0, peak = 0.0;
    std::string config_json;
    app.add_option("--threads", threads, "engine threads")->check(CLI::PositiveNumber);
    app.add_option("--batch", batch)->check(CLI::PositiveNumber);
    app.add_option("--reps", reps, "timed forwards")->check(CLI::PositiveNumber);
    app.add_option("--warmup", warmup)->check(CLI::NonNegativeNumber);
    app.add_option("--config", config_json, "a diffusers transformer config.json (replaces the shape options)")
        ->check(CLI::ExistingFile);
    app.add_option("--layers", layers)->check(CLI::PositiveNumber);
    app.add_option("--heads", heads)->check(CLI::PositiveNumber);
    app.add_option("--head-dim", head_dim)->check(CLI::PositiveNumber);
    app.add_option("--latent", latent, "latent side in pixels (tokens = (latent/2)^2); with --config, its sample_size")
        ->check(CLI::PositiveNumber);
    app.add_option("--context", context, "context tokens")->check(CLI::PositiveNumber);
    app.add_flag("--qk-norm", qk_norm, "RMS qk-norm (SD3.5 style)");
    app.add_option("--subset", subset, "also time a token-subset forward computing this fraction of the image tokens")
        ->check(CLI::Range(0.0, 1.0));
    app.add_flag("--gemms", gemms, "also time each linear layer's GEMM alone (one thread)");
    app.add_flag("--profile-subset", profile_subset, "time the full forward once only (to profile the subset forward)");
    app.add_option("--peak", peak, "the core's FP32 FMA peak in GFLOP/s (default: measured)")->check(CLI::PositiveNumber);
    CLI11_PARSE(app, argc, argv);

    sd3::transformer_config c;
    if (!config_json.empty()) {
        c = sd3::load_transformer_config(config_json);
        if (app.count("--latent") == 0) latent = c.sample_size;
    } else {
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
    }
    if (peak == 0.0) peak = sd3::gemm::measure_peak_gflops(0.3);
    const auto model = sd3::model::random(c, 42);
    sd3::transformer net(model, {.max_batch = batch, .max_height = latent, .max_width = latent, .max_context_tokens = context},
                         threads);

    const int side = latent / c.patch_size, N = side * side, C = c.in_channels;
    std::mt19937 rng(1);
    std::normal_distribution<float> normal;
    std::vector<float> latents(static_cast<std::size_t>(batch) * C * latent * latent),
        ctx(static_cast<std::size_t>(batch) * context * c.joint_attention_dim), pooled(static_cast<std::size_t>(batch) * c.pooled_projection_dim),
        t(batch, 500.0f), v(latents.size());
    for (auto* x : {&latents, &ctx, &pooled})
        for (auto& e : *x) e = normal(rng);
    const sd3::forward_inputs in{.batch = batch, .height = latent, .width = latent, .context_tokens = context, .latents = latents, .timesteps = t, .context = ctx, .pooled = pooled};

    const auto ms = time_ms(profile_subset ? 0 : warmup, profile_subset ? 1 : reps, [&] { net.forward(in, v); });
    const double full_flops = forward_flops(c, batch, N, N, context);
    auto rate = [&](double flops, double t_ms) { return flops / (t_ms * 1e-3) / 1e9; };
    std::printf("engine forward: layers %d hidden %d tokens %d context %d batch %d threads %d: median %.1f ms, min %.1f ms (%d reps)\n",
                c.num_layers, c.hidden(), N, context, batch, threads, median(ms), ms.front(), reps);
    std::printf("  %.1f GFLOP, %.1f GFLOP/s = %.0f%% of %d x %.1f GFLOP/s (the core's FP32 FMA peak%s)\n", full_flops / 1e9,
                rate(full_flops, median(ms)), 100.0 * rate(full_flops, median(ms)) / (peak * threads), threads, peak,
                app.count("--peak") ? ", given" : ", measured");
    std::printf("RESULT median_ms=%.3f min_ms=%.3f\n", median(ms), ms.front());
    if (subset > 0.0) {  // token-subset forward (K/V of the other tokens from the cache): cost should follow n
        const int n = std::max(1, static_cast<int>(subset * N + 0.5));
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
        // Full and subset forwards in pairs, each pair's ratio taken a second apart: the machine's speed drifts
        // from one minute to the next (a shared VM), and the ratio of two medians taken minutes apart drifts with it.
        for (int i = 0; i < warmup; ++i) net.forward(in, rows, part);
        std::vector<double> sub, ratios;
        for (int i = 0; i < reps; ++i) {
            const double full_ms = time_ms(0, 1, [&] { net.forward(in, v); }).front();
            const double sub_ms = time_ms(0, 1, [&] { net.forward(in, rows, part); }).front();
            sub.push_back(sub_ms);
            ratios.push_back(full_ms / sub_ms);
        }
        std::sort(sub.begin(), sub.end());
        std::sort(ratios.begin(), ratios.end());
        const double sub_flops = forward_flops(c, batch, N, n, context);
        const double speedup = median(ratios), flop_speedup = full_flops / sub_flops;
        std::printf("engine subset forward: %d of %d tokens (%.0f%%): median %.1f ms, %.1f GFLOP/s; speedup %.2fx (per pair, "
                    "%.2f-%.2f) against a FLOP ratio of %.2fx = %.2f of it\n",
                    n, N, 100.0 * n / N, median(sub), rate(sub_flops, median(sub)), speedup, ratios.front(), ratios.back(),
                    flop_speedup, speedup / flop_speedup);
        std::printf("RESULT subset_median_ms=%.3f speedup=%.3f flop_speedup=%.3f\n", median(sub), speedup, flop_speedup);
    }
    if (gemms) {  // each linear layer's GEMM as the engine runs it at one thread (row tiles of all columns)
        const int n = subset > 0.0 ? std::max(1, static_cast<int>(subset * N + 0.5)) : 0;
        sd3::aligned_floats workspace(sd3::gemm::workspace_floats());
        std::printf("GEMMs (one thread; rows x depth -> outputs):\n");
        const auto& blk = model.blocks.front();
        struct shape {
            const char* name;
            const sd3::linear* w;
            int rows;
        };
        std::vector<shape> shapes;
        for (const int r : {batch * N, batch * n}) {
            if (r == 0) continue;
            shapes.push_back({"attn.to_qkv", &blk.to_qkv, r});
            shapes.push_back({"attn.to_out", &blk.to_out, r});
            shapes.push_back({"ff.net.0", &blk.ff1, r});
            shapes.push_back({"ff.net.2", &blk.ff2, r});
        }
        shapes.push_back({"attn.add_qkv (context)", &blk.add_qkv, batch * context});
        shapes.push_back({"ff_context.net.0 (context)", &blk.ff_context1, batch * context});
        for (const auto& s : shapes) {
            const sd3::gemm::packed_weights w(s.w->weight, s.w->out, s.w->in);
            std::vector<float> a(static_cast<std::size_t>(s.rows) * s.w->in), y(static_cast<std::size_t>(s.rows) * s.w->out);
            for (auto& e : a) e = normal(rng);
            const int tile = sd3::gemm::task_panels * sd3::gemm::register_tile().rows;  // the engine's work unit
            const auto g = time_ms(1, std::max(reps, 5), [&] {
                for (int r0 = 0; r0 < s.rows; r0 += tile)
                    sd3::gemm::multiply(a.data() + static_cast<std::ptrdiff_t>(r0) * s.w->in, s.w->in, std::min(tile, s.rows - r0), w,
                                        0, s.w->out, y.data() + static_cast<std::ptrdiff_t>(r0) * s.w->out, s.w->out, workspace,
                                        s.w->bias.data());
            });
            const double gf = rate(2.0 * s.rows * s.w->in * s.w->out, median(g));
            std::printf("  %-28s %6d x %5d -> %5d: %7.1f GFLOP/s = %3.0f%% of peak\n", s.name, s.rows, s.w->in, s.w->out, gf,
                        100.0 * gf / peak);
            std::printf("RESULT gemm=%s rows=%d gflops=%.1f peak_fraction=%.3f\n", s.name, s.rows, gf, gf / peak);
        }
    }
    return 0;
}
