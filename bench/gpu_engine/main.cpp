// specdiff-gpu-bench: the GPU engine's speed (issue 13). Two parts:
//  (a) SD3-medium shapes with random weights: one full forward against token-subset forwards at several cache
//      rates (wall-time ratio beside the FLOP ratio), the attention probe's cost, the model-FLOP utilisation of the
//      full forward, the library's share of a cached step (a SpecDiff run of the device sampler with per-step CUDA
//      events), and the caches' memory beside the forward's activations;
//  (b) mnist-sd3 end to end: full RFlow against SpecDiff (CR 0.9) on the device sampler, both captured as CUDA
//      graphs and replayed: speedup, FLOP ratio and PSNR, the numbers the CPU demo's JSON has.
// Timing: CUDA events, warm-up calls first, then alternating full / method calls, medians with min and max; the
// JSON holds every number and the card it came from. Exits 77 when no GPU is usable.
#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include <cuda_runtime_api.h>

#include <specdiff/specdiff.hpp>

#include "methods/flops.hpp"
#include "quality/classifier.hpp"
#include "quality/default_model.hpp"
#include "quality/image_batch.hpp"
#include "quality/metrics.hpp"
#include "quality/noise.hpp"
#include "sd3/cuda/sampler.hpp"
#include "sd3/cuda/transformer.hpp"
#include "sd3/model.hpp"

namespace {

using json = nlohmann::json;

void ok(cudaError_t e, const char* what) {
    if (e != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(e));
}

template <class T>
struct device_vector {
    T* p = nullptr;
    std::size_t n = 0;
    explicit device_vector(std::size_t count) : n(count) {
        void* m = nullptr;
        ok(cudaMalloc(&m, std::max<std::size_t>(n, 1) * sizeof(T)), "cudaMalloc");
        p = static_cast<T*>(m);
    }
    explicit device_vector(const std::vector<T>& h) : device_vector(h.size()) {
        ok(cudaMemcpy(p, h.data(), n * sizeof(T), cudaMemcpyHostToDevice), "cudaMemcpy");
    }
    device_vector(const device_vector&) = delete;
    device_vector& operator=(const device_vector&) = delete;
    ~device_vector() { cudaFree(p); }
};

struct stats {
    double median = 0, min = 0, max = 0;
};
stats summarise(std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return {v[v.size() / 2], v.front(), v.back()};
}
json to_json(const stats& s) { return {{"median", s.median}, {"min", s.min}, {"max", s.max}}; }

// Milliseconds of fn on `stream`, by CUDA events.
template <class F>
double event_ms(cudaStream_t stream, F&& fn) {
    cudaEvent_t a, b;
    ok(cudaEventCreate(&a), "cudaEventCreate");
    ok(cudaEventCreate(&b), "cudaEventCreate");
    ok(cudaEventRecord(a, stream), "cudaEventRecord");
    fn();
    ok(cudaEventRecord(b, stream), "cudaEventRecord");
    ok(cudaEventSynchronize(b), "cudaEventSynchronize");
    float ms = 0;
    ok(cudaEventElapsedTime(&ms, a, b), "cudaEventElapsedTime");
    cudaEventDestroy(a);
    cudaEventDestroy(b);
    return ms;
}

// Warm-up calls of both, then `repeats` pairs in alternating order; the medians of each.
template <class A, class B>
std::pair<stats, stats> alternate(cudaStream_t stream, int warmup, int repeats, A&& a, B&& b) {
    for (int i = 0; i < warmup; ++i) {
        a();
        b();
    }
    ok(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
    std::vector<double> ta, tb;
    for (int r = 0; r < repeats; ++r) {
        if (r % 2 == 0) {
            ta.push_back(event_ms(stream, a));
            tb.push_back(event_ms(stream, b));
        } else {
            tb.push_back(event_ms(stream, b));
            ta.push_back(event_ms(stream, a));
        }
    }
    return {summarise(ta), summarise(tb)};
}

struct shape {
    std::string name;
    int layers, heads, head_dim, grid, context_tokens, joint_dim, pooled_dim, pos_side, batch;
};

// SD3-medium (stabilityai/stable-diffusion-3-medium-diffusers transformer/config.json) at 1024 x 1024 (a 128 x 128
// latent: 64 x 64 = 4096 tokens), 333 context tokens (77 CLIP + 256 T5), a CFG batch of 2; and a small shape
// for short device sessions.
shape preset(const std::string& name) {
    if (name == "sd3-medium") return {name, 24, 24, 64, 64, 333, 4096, 2048, 192, 2};
    if (name == "small") return {name, 4, 8, 64, 32, 77, 512, 256, 64, 2};
    throw std::invalid_argument("--shapes: expected sd3-medium or small, got '" + name + "'");
}

// A random model with these shapes. Only two distinct blocks are drawn (a joint block, repeated, and the
// context-pre-only last one): the weights' values do not change the work, and drawing 2 B normals would take
// minutes of a short device session.
sd3::model random_model(const shape& s, std::uint64_t seed) {
    sd3::transformer_config c;
    c.sample_size = s.grid * 2;
    c.patch_size = 2;
    c.in_channels = c.out_channels = 16;
    c.num_layers = 2;
    c.attention_head_dim = s.head_dim;
    c.num_attention_heads = s.heads;
    c.joint_attention_dim = s.joint_dim;
    c.caption_projection_dim = s.heads * s.head_dim;
    c.pooled_projection_dim = s.pooled_dim;
    c.pos_embed_max_size = s.pos_side;
    auto m = sd3::model::random(c, seed);
    const auto joint = m.blocks.front(), last = m.blocks.back();
    m.blocks.assign(static_cast<std::size_t>(s.layers - 1), joint);
    m.blocks.push_back(last);
    m.config.num_layers = s.layers;
    return m;
}

std::vector<float> normal_vector(std::size_t n, std::mt19937_64& rng) {
    std::normal_distribution<float> d;
    std::vector<float> v(n);
    for (auto& x : v) x = d(rng);
    return v;
}

// Peak dense bf16 tensor throughput of the card (FLOP/s; NVIDIA's data sheets), 0 when unknown.
double bf16_peak(const std::string& card) {
    if (card.find("H100") != std::string::npos) return card.find("PCIe") != std::string::npos ? 756e12 : 989e12;
    if (card.find("H200") != std::string::npos) return 989e12;
    if (card.find("A100") != std::string::npos) return 312e12;
    return 0;
}

struct options {
    std::string shapes = "sd3-medium";
    int layers = 0;  // 0: the shape's
    std::vector<double> cache_rates = {0.5, 0.75, 0.9, 0.95, 0.99};
    std::string precision = "bf16";
    int repeats = 10, warmup = 3, steps = 28;
    bool skip_shapes = false, skip_mnist = false;
    std::string model = "models/mnist-sd3";
    int mnist_samples = 16;
    double mnist_cache_rate = 0.9;
    std::string json_path;
};

// The probe estimate's query stride the benchmark times beside the exact sums (odd: docs/cuda.md's table keeps rho
// about 0.98 at 4096 tokens with s = 9).
constexpr int probe_estimate_step = 9;

json bench_shapes(const options& o, const std::string& card, cudaStream_t stream) {
    shape s = preset(o.shapes);
    if (o.layers > 0) s.layers = o.layers;
    const auto type = o.precision == "fp32" ? sd3::gpu::precision::fp32 : sd3::gpu::precision::bf16;
    std::mt19937_64 rng(7);
    std::fprintf(stderr, "building a random %s model (%d blocks, hidden %d)...\n", s.name.c_str(), s.layers, s.heads * s.head_dim);
    const sd3::model model = random_model(s, 1);
    const int N = s.grid * s.grid, B = s.batch, L = s.context_tokens;
    const sd3::gpu::transformer net(model, type, {.max_batch = B, .max_image_tokens = N, .max_context_tokens = L});
    sd3::gpu::workspace ws(net);
    sd3::gpu::kv_cache kv(net, B, N);
    const device_vector<float> latents(normal_vector(static_cast<std::size_t>(B) * N * net.patch_inputs(), rng));
    const device_vector<float> context(normal_vector(static_cast<std::size_t>(B) * L * s.joint_dim, rng));
    const device_vector<float> pooled(normal_vector(static_cast<std::size_t>(B) * s.pooled_dim, rng));
    device_vector<float> velocity(static_cast<std::size_t>(B) * N * net.patch_features()), probe(static_cast<std::size_t>(B) * N);
    const sd3::gpu::forward_inputs in{.batch = B, .grid_height = s.grid, .grid_width = s.grid, .context_tokens = L, .latent_rows = latents.p,
                                      .latent_batch = 0, .timestep = 500.f, .context = context.p, .pooled = pooled.p};
    auto full = [&] { net.forward(in, velocity.p, {.kv = &kv}, ws, stream); };
    const double full_flops = B * methods::full_forward_flops(model.config, N, L);

    json rows = json::array();
    stats full_ms;
    double probe_ms_near_09 = 0, closest = 1;  // the exact probe's extra time on the partial forward nearest CR 0.9
    for (const double cr : o.cache_rates) {
        const int n = specdiff::math::compute_count(cr, N);
        std::vector<std::int32_t> ids;
        std::vector<std::int32_t> all(static_cast<std::size_t>(N));
        for (int b = 0; b < B; ++b) {
            std::iota(all.begin(), all.end(), 0);
            std::shuffle(all.begin(), all.end(), rng);
            std::vector<std::int32_t> pick(all.begin(), all.begin() + n);
            std::sort(pick.begin(), pick.end());
            ids.insert(ids.end(), pick.begin(), pick.end());
        }
        const device_vector<std::int32_t> device_ids(ids);
        const sd3::gpu::forward_options partial_options{.image_tokens = device_ids.p, .tokens_per_sample = n, .kv = &kv};
        auto partial = [&] { net.forward(in, velocity.p, partial_options, ws, stream); };
        auto probed = [&](int query_step) {
            return [&, query_step] {
                auto po = partial_options;
                po.attention_probe = probe.p;
                po.probe_query_step = query_step;
                net.forward(in, velocity.p, po, ws, stream);
            };
        };
        const auto [f, p] = alternate(stream, o.warmup, o.repeats, full, partial);
        const auto [pp, pe] = alternate(stream, 1, o.repeats, probed(1), probed(probe_estimate_step));
        full_ms = f;
        if (std::abs(cr - 0.9) < closest) {
            closest = std::abs(cr - 0.9);
            probe_ms_near_09 = std::max(0.0, pp.median - p.median);
        }
        const double partial_flops = B * methods::subset_forward_flops(model.config, N, L, n);
        const double wall = f.median / p.median, flops = full_flops / partial_flops;
        std::fprintf(stderr, "CR %.2f: %d tokens, full %.2f ms, partial %.2f ms, wall %.2fx, FLOP %.2fx (%.0f%%), probe +%.1f%% (estimate s=%d: +%.1f%%)\n",
                     cr, n, f.median, p.median, wall, flops, 100 * wall / flops, 100 * (pp.median / p.median - 1), probe_estimate_step,
                     100 * (pe.median / p.median - 1));
        rows.push_back({{"cache_rate", cr}, {"computed_tokens", n}, {"full_ms", to_json(f)}, {"partial_ms", to_json(p)}, {"partial_probe_ms", to_json(pp)}, {"partial_probe_estimate_ms", to_json(pe)},
                        {"wall_ratio", wall}, {"flop_ratio", flops}, {"wall_over_flop", wall / flops}, {"probe_share", pp.median / p.median - 1}, {"probe_estimate_share", pe.median / p.median - 1},
                        {"probe_estimate_query_step", probe_estimate_step}});
    }
    const double peak = type == sd3::gpu::precision::bf16 ? bf16_peak(card) : 0;
    const double achieved = full_flops / (full_ms.median * 1e-3);
    // The full forward through the reference attention kernels (attention.cuh) beside the default path (bf16: the
    // FlashAttention-2-class kernel), alternating: what the new kernel buys.
    auto full_reference = [&] { net.forward(in, velocity.p, {.kv = &kv, .reference_attention = true}, ws, stream); };
    const auto [full_again, reference_ms] = alternate(stream, 1, o.repeats, full, full_reference);
    std::fprintf(stderr, "full forward: %.2f ms, with the reference attention kernels %.2f ms (%.2fx)\n", full_again.median, reference_ms.median,
                 reference_ms.median / full_again.median);

    // The library's share of a cached step: a SpecDiff run (CR 0.9) of the device sampler with per-step events.
    std::mt19937_64 noise_rng(11);
    const int images = B / 2;
    const auto noise = normal_vector(static_cast<std::size_t>(images) * N * net.patch_inputs(), noise_rng);
    const auto ctx = normal_vector(static_cast<std::size_t>(images) * L * s.joint_dim, noise_rng), neg_ctx = normal_vector(ctx.size(), noise_rng);
    const auto pool = normal_vector(static_cast<std::size_t>(images) * s.pooled_dim, noise_rng), neg_pool = normal_vector(pool.size(), noise_rng);
    const sd3::gpu::sampling_inputs si{.batch = images, .grid_height = s.grid, .grid_width = s.grid, .context_tokens = L, .guidance = 4.f,
                                       .noise_rows = noise, .context = ctx, .negative_context = neg_ctx, .pooled = pool, .negative_pooled = neg_pool};
    sd3::gpu::sampler sampler(net, sd3::flow_match_euler(o.steps), si, sd3::gpu::specdiff_settings{}, stream);
    sampler.run();  // warm-up
    sampler.set_profiling(true);
    sampler.run();
    // The probe is the library's work too (SpecDiff's scorer needs it), though it runs inside the forward: the share
    // with it counts the exact probe's extra time measured above on the partial forward nearest CR 0.9.
    std::vector<double> shares, shares_with_probe, library;
    for (const auto& t : sampler.step_times())
        if (!t.dense) {
            shares.push_back(t.library_ms / (t.library_ms + t.forward_ms));
            shares_with_probe.push_back(std::min(1.0, (t.library_ms + probe_ms_near_09) / (t.library_ms + t.forward_ms)));
            library.push_back(t.library_ms);
        }
    sampler.check_status();
    const stats share = summarise(shares.empty() ? std::vector<double>{0} : shares);
    const stats share_with_probe = summarise(shares_with_probe.empty() ? std::vector<double>{0} : shares_with_probe);
    const double caches = static_cast<double>(sampler.kv_cache_bytes() + sampler.accelerator_bytes());
    std::fprintf(stderr, "full forward: %.2f ms, %.1f TFLOP/s%s; library share of a cached step (CR 0.9): median %.2f%%, %.2f%% with the probe; "
                         "caches %.0f MiB, forward activations %.0f MiB\n",
                 full_ms.median, achieved / 1e12, peak > 0 ? (", MFU " + std::to_string(100 * achieved / peak) + "%").c_str() : "", 100 * share.median,
                 100 * share_with_probe.median, caches / (1 << 20), static_cast<double>(ws.bytes()) / (1 << 20));
    return {{"shape", {{"name", s.name}, {"layers", s.layers}, {"heads", s.heads}, {"head_dim", s.head_dim}, {"hidden", s.heads * s.head_dim},
                       {"image_tokens", N}, {"context_tokens", L}, {"batch", B}}},
            {"precision", sd3::gpu::name(type)},
            {"partial_forwards", rows},
            {"full_forward_ms", to_json(full_ms)},
            {"full_forward_flops", full_flops},
            {"achieved_flops_per_s", achieved},
            {"bf16_peak_flops_per_s", peak},
            {"mfu", peak > 0 ? json(achieved / peak) : json(nullptr)},
            {"library_share_of_cached_step", to_json(share)},
            {"library_share_of_cached_step_with_probe", to_json(share_with_probe)},
            {"probe_ms_per_partial_forward_near_cr_0_9", probe_ms_near_09},
            {"full_forward_ms_reference_attention", to_json(reference_ms)},
            {"full_forward_ms_alternated_with_reference", to_json(full_again)},
            {"library_ms_per_cached_step", to_json(summarise(library.empty() ? std::vector<double>{0} : library))},
            {"cache_bytes", {{"kv_cache", sampler.kv_cache_bytes()}, {"accelerator", sampler.accelerator_bytes()}}},
            {"forward_activation_bytes", ws.bytes()},
            {"weight_bytes", net.weight_bytes()}};
}

json bench_mnist(const options& o, cudaStream_t stream) {
    const std::filesystem::path dir(o.model);
    const auto model = sd3::model::load(dir / "transformer");
    const auto classes = quality::class_embeddings::load(dir);
    const float guidance = static_cast<float>(quality::load_guidance_scale(dir));
    const auto& c = model.config;
    const int samples = o.mnist_samples, side = c.sample_size, grid = side / c.patch_size, N = grid * grid;
    const auto schedule = quality::load_schedule(dir, N)(o.steps);
    const auto noise = quality::sample_latents(static_cast<std::size_t>(samples), static_cast<std::size_t>(c.in_channels) * side * side, 0);
    std::vector<int> labels, nulls(static_cast<std::size_t>(samples), classes.null_class);
    for (int i = 0; i < samples; ++i) labels.push_back(i % classes.null_class);
    std::vector<float> ctx(static_cast<std::size_t>(samples) * classes.context_tokens * classes.joint_attention_dim), neg_ctx(ctx.size()),
        pool(static_cast<std::size_t>(samples) * classes.pooled_dim), neg_pool(pool.size());
    classes.gather(labels, ctx, pool);
    classes.gather(nulls, neg_ctx, neg_pool);
    std::vector<float> rows(static_cast<std::size_t>(samples) * N * c.patch_inputs());
    sd3::image_to_patches(c, samples, side, side, c.in_channels, {}, noise, rows);
    const bool cfg = guidance > 1.f;
    sd3::gpu::transformer net(model, sd3::gpu::precision::fp32,
                              {.max_batch = cfg ? 2 * samples : samples, .max_image_tokens = N, .max_context_tokens = classes.context_tokens});
    const sd3::gpu::sampling_inputs in{.batch = samples, .grid_height = grid, .grid_width = grid, .context_tokens = classes.context_tokens,
                                       .guidance = guidance, .noise_rows = rows, .context = ctx, .negative_context = neg_ctx, .pooled = pool,
                                       .negative_pooled = neg_pool};
    sd3::gpu::specdiff_settings settings;
    settings.cache_rate = o.mnist_cache_rate;
    sd3::gpu::sampler full(net, schedule, in, std::nullopt, stream), spec(net, schedule, in, settings, stream);
    full.capture();
    spec.capture();
    const auto [tf, ts] = alternate(stream, 1, o.repeats, [&] { full.replay(); }, [&] { spec.replay(); });
    spec.check_status();
    // Quality against full compute, on the clamped images (the demo's PSNR).
    auto images = [&](const sd3::gpu::sampler& s) {
        std::vector<float> img(static_cast<std::size_t>(samples) * c.out_channels * side * side);
        sd3::patches_to_image(c, samples, side, side, c.out_channels, {}, s.latent_rows(), img);
        for (auto& x : img) x = std::clamp(x, -1.f, 1.f);
        return img;
    };
    const auto ref = images(full), got = images(spec);
    const quality::image_batch a{ref, static_cast<std::size_t>(samples), static_cast<std::size_t>(c.out_channels), static_cast<std::size_t>(side),
                                 static_cast<std::size_t>(side)};
    const quality::image_batch b{got, a.count, a.channels, a.height, a.width};
    const double psnr = quality::mean_psnr(a, b, 2.0), ssim = quality::mean_ssim(a, b, 2.0);
    const auto classifier = quality::digit_classifier::load(dir);
    const double acc = classifier.accuracy(b, labels), acc_full = classifier.accuracy(a, labels);
    const int batch = full.model_batch();
    double spec_flops = spec.speculative_steps() * batch * methods::full_forward_flops(c, N, classes.context_tokens);
    for (int k = 0; k < spec.steps(); ++k) {
        const int n = spec.compute_count(k);
        if (n > 0) spec_flops += batch * methods::subset_forward_flops(c, N, classes.context_tokens, n);
    }
    const double full_flops = spec.steps() * batch * methods::full_forward_flops(c, N, classes.context_tokens);
    std::fprintf(stderr, "mnist-sd3, %d samples: full %.2f ms, SpecDiff CR %.2f %.2f ms: %.2fx wall, %.2fx FLOP, PSNR %.2f dB, SSIM %.3f, "
                         "class accuracy %.3f (full %.3f)\n",
                 samples, tf.median, o.mnist_cache_rate, ts.median, tf.median / ts.median, full_flops / spec_flops, psnr, ssim, acc, acc_full);
    // The demo's JSON names (examples/demo/src/main.cpp), times in seconds, spreads min and max over the timed runs
    // (speedup_spread pairs the extremes: fastest full over slowest SpecDiff, and the reverse).
    return {{"model", o.model},
            {"method", "specdiff"},
            {"settings", "cache_rate=" + std::to_string(o.mnist_cache_rate) + " (the paper's other defaults), fp32, CUDA graphs"},
            {"speedup", tf.median / ts.median},
            {"speedup_spread", {tf.min / ts.max, tf.max / ts.min}},
            {"flops_ratio", full_flops / spec_flops},
            {"psnr_db", psnr},
            {"ssim", ssim},
            {"class_acc", acc},
            {"class_acc_full", acc_full},
            {"seconds_full", tf.median * 1e-3},
            {"seconds_method", ts.median * 1e-3},
            {"seconds_full_spread", {tf.min * 1e-3, tf.max * 1e-3}},
            {"seconds_method_spread", {ts.min * 1e-3, ts.max * 1e-3}},
            {"samples", samples},
            {"steps", o.steps},
            {"cfg", guidance},
            {"seed", 0},
            {"repeats", o.repeats}};
}

}  // namespace

int main(int argc, char** argv) {
    options o;
    CLI::App app{"specdiff-gpu-bench: the GPU engine's forwards at SD3-medium shapes, and SpecDiff end to end on mnist-sd3 (issue 13)"};
    app.add_option("--shapes", o.shapes, "shapes of part (a): sd3-medium (24 blocks, hidden 1536, 24 heads, 4096 image + 333 context tokens, "
                                         "batch 2) or small (4 blocks, hidden 512, 1024 + 77 tokens: short device sessions)")
        ->capture_default_str()
        ->check(CLI::IsMember({"sd3-medium", "small"}));
    app.add_option("--layers", o.layers, "blocks of part (a) (0: the shape's)")->check(CLI::Range(0, 64));
    app.add_option("--cache-rates", o.cache_rates, "cache rates of the partial forwards")->capture_default_str()->check(CLI::Range(0.0, 0.999999))->delimiter(',');
    app.add_option("--precision", o.precision, "operands of part (a): bf16 or fp32")->capture_default_str()->check(CLI::IsMember({"bf16", "fp32"}));
    app.add_option("--repeats", o.repeats, "timed repeats (alternating order)")->capture_default_str()->check(CLI::Range(1, 1000));
    app.add_option("--warmup", o.warmup, "untimed calls first")->capture_default_str()->check(CLI::Range(0, 100));
    app.add_option("--steps", o.steps, "sampling steps")->capture_default_str()->check(CLI::Range(1, 1000));
    app.add_flag("--skip-shapes", o.skip_shapes, "skip part (a)");
    app.add_flag("--skip-mnist", o.skip_mnist, "skip part (b)");
    app.add_option("--model", o.model, "part (b)'s model folder")->capture_default_str();
    app.add_option("--samples", o.mnist_samples, "part (b)'s images (class i % 10)")->capture_default_str()->check(CLI::Range(1, 256));
    app.add_option("--cache-rate", o.mnist_cache_rate, "part (b)'s SpecDiff cache rate")->capture_default_str()->check(CLI::Range(0.0, 0.999999));
    app.add_option("--json", o.json_path, "write every number here");
    CLI11_PARSE(app, argc, argv);

    int devices = 0;
    if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
        std::printf("SKIPPED: no usable CUDA device\n");
        return 77;
    }
    try {
        cudaDeviceProp prop{};
        ok(cudaGetDeviceProperties(&prop, 0), "cudaGetDeviceProperties");
        int driver = 0;
        cudaDriverGetVersion(&driver);
        cudaStream_t stream = nullptr;
        ok(cudaStreamCreate(&stream), "cudaStreamCreate");
        json out{{"card", prop.name}, {"driver_api", driver}, {"sm", std::to_string(prop.major) + std::to_string(prop.minor)}, {"complete", false}};
        // The JSON is rewritten after each part (a temporary file renamed over it), so a run cut short by its time
        // limit keeps every part it finished; "complete" says whether both parts ran.
        auto save = [&] {
            if (o.json_path.empty()) return;
            const std::string tmp = o.json_path + ".tmp";
            {
                std::ofstream f(tmp);
                f << out.dump(2) << '\n';
                if (!f) throw std::runtime_error("--json: cannot write '" + tmp + "'");
            }
            if (std::rename(tmp.c_str(), o.json_path.c_str()) != 0) throw std::runtime_error("--json: cannot rename '" + tmp + "' to '" + o.json_path + "'");
        };
        save();
        if (!o.skip_shapes) {
            out["shapes"] = bench_shapes(o, prop.name, stream);
            save();
        }
        if (!o.skip_mnist) {
            out["mnist"] = bench_mnist(o, stream);
            save();
        }
        cudaStreamDestroy(stream);
        out["complete"] = true;
        save();
        std::printf("%s\n", out.dump(2).c_str());
    } catch (const std::exception& e) {
        std::fprintf(stderr, "specdiff-gpu-bench: %s\n", e.what());
        return 1;
    }
    return 0;
}
