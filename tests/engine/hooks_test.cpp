// Caching hooks: bit-identity of the hooked forward when nothing is skipped, exact reuse of read-back module
// outputs, MLP token subsets, the token-subset forward with its K/V cache, and the probe's additivity.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

#include "engine_fixture.hpp"
#include "sd3/flux_model.hpp"
#include "sd3/transformer.hpp"
#include "test_util.hpp"

namespace {

using test_util::random_problem;

// Per layer, caller buffers for the module sites (attention/MLP x image/context, and the image-only attention
// of MMDiT-X blocks), wired into block_hooks.
struct site_buffers {
    std::vector<std::vector<float>> attn_img, attn_ctx, mlp_img, mlp_ctx, attn2_img;
    std::vector<sd3::block_hooks> hooks;
    std::vector<bool> dual;

    explicit site_buffers(const random_problem& p, float fill = 0.0f) {
        const int layers = p.model.config.num_layers, D = p.hidden();
        const std::size_t img = static_cast<std::size_t>(p.batch) * p.tokens() * D, ctx = static_cast<std::size_t>(p.batch) * p.context_tokens * D;
        attn_img.assign(layers, std::vector<float>(img, fill));
        mlp_img.assign(layers, std::vector<float>(img, fill));
        attn_ctx.assign(layers, std::vector<float>(ctx, fill));
        mlp_ctx.assign(layers, std::vector<float>(ctx, fill));
        attn2_img.assign(layers, std::vector<float>(img, fill));
        for (int l = 0; l < layers; ++l) dual.push_back(p.model.config.dual_attention(l));
        hooks.resize(layers);
        wire();
    }
    // Points every hook at this object's buffers (call again after copying).
    void wire() {
        for (std::size_t l = 0; l < hooks.size(); ++l) {
            hooks[l].attention[0].rows = attn_img[l].data();
            hooks[l].mlp[0].rows = mlp_img[l].data();
            if (l + 1 < hooks.size()) {
                hooks[l].attention[1].rows = attn_ctx[l].data();
                hooks[l].mlp[1].rows = mlp_ctx[l].data();
            }
            if (dual[l]) hooks[l].attention2.rows = attn2_img[l].data();
        }
    }
    void set_mode(sd3::module_mode attention, sd3::module_mode mlp) {
        for (std::size_t l = 0; l < hooks.size(); ++l) {
            for (int s = 0; s < 2; ++s) {
                if (s == 1 && l + 1 == hooks.size()) continue;  // the last block has no context outputs
                hooks[l].attention[s].mode = attention;
                hooks[l].mlp[s].mode = mlp;
            }
            if (dual[l]) hooks[l].attention2.mode = attention;
        }
    }
};

// The architectures the hook tests run on: SD3, and MMDiT-X with the image-only attention in the first and the
// last (context_pre_only) of the three blocks.
const std::vector<int> mmditx_layers{0, 2};

// forward_options from named parts (designated initializers that skip members trip -Wmissing-field-initializers).
sd3::forward_options options(std::span<const std::int32_t> image_tokens = {}, sd3::kv_cache* kv = nullptr,
                             std::span<float> probe = {}, std::span<const sd3::block_hooks> blocks = {},
                             bool probe_context_queries = false) {
    sd3::forward_options o;
    o.image_tokens = image_tokens;
    o.kv = kv;
    o.attention_probe = probe;
    o.probe_context_queries = probe_context_queries;
    o.blocks = blocks;
    return o;
}

std::vector<std::int32_t> all_tokens(int batch, int n) {
    std::vector<std::int32_t> t(static_cast<std::size_t>(batch) * n);
    for (int b = 0; b < batch; ++b) std::iota(t.begin() + b * n, t.begin() + (b + 1) * n, 0);
    return t;
}

// Per sample, `count` distinct ascending ids drawn from [0, n).
std::vector<std::int32_t> random_tokens(std::mt19937& rng, int batch, int n, int count) {
    std::vector<std::int32_t> out;
    for (int b = 0; b < batch; ++b) {
        std::vector<std::int32_t> ids(n);
        std::iota(ids.begin(), ids.end(), 0);
        std::shuffle(ids.begin(), ids.end(), rng);
        ids.resize(count);
        std::sort(ids.begin(), ids.end());
        out.insert(out.end(), ids.begin(), ids.end());
    }
    return out;
}

std::vector<float> to_image(const random_problem& p, std::span<const std::int32_t> tokens, std::span<const float> rows) {
    std::vector<float> img(p.velocity_size(), 0.0f);
    sd3::patches_to_image(p.model.config, p.batch, p.height, p.width, p.model.config.out_channels, tokens, rows, img);
    return img;
}

std::vector<float> to_rows(const random_problem& p, std::span<const std::int32_t> tokens, std::span<const float> image) {
    const int n = static_cast<int>(tokens.size() / p.batch);
    std::vector<float> rows(static_cast<std::size_t>(p.batch) * n * p.model.config.patch_features());
    sd3::image_to_patches(p.model.config, p.batch, p.height, p.width, p.model.config.out_channels, tokens, image, rows);
    return rows;
}

bool bit_equal(const std::vector<float>& a, const std::vector<float>& b) {
    return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

void check_bit_identity(const random_problem& p) {
    sd3::transformer net(p.model, p.limits(), 2);
    std::vector<float> plain(p.velocity_size());
    net.forward(p.inputs(), plain);

    sd3::kv_cache kv(p.model.config, 2, p.tokens());
    std::vector<float> probe(p.batch * p.tokens());
    site_buffers sites(p);

    SUBCASE("full forward with cache, probe and read-back at every site") {
        std::vector<float> v(p.velocity_size());
        net.forward(p.inputs(), v, options({}, &kv, probe, sites.hooks));
        CHECK(bit_equal(v, plain));
        for (float x : probe) CHECK(x > 0.0f);
    }
    SUBCASE("token-subset forward over all tokens") {
        const auto tokens = all_tokens(p.batch, p.tokens());
        std::vector<float> rows(p.batch * p.tokens() * p.model.config.patch_features());
        net.forward(p.inputs(), rows, options(tokens, &kv, probe, sites.hooks));
        CHECK(bit_equal(to_image(p, tokens, rows), plain));
    }
    SUBCASE("MLP subset mode listing every token") {
        const auto img = all_tokens(p.batch, p.tokens()), ctx = all_tokens(p.batch, p.context_tokens);
        sites.set_mode(sd3::module_mode::compute, sd3::module_mode::subset);
        for (std::size_t l = 0; l < sites.hooks.size(); ++l) {
            sites.hooks[l].mlp[0].tokens = img;
            if (l + 1 < sites.hooks.size()) sites.hooks[l].mlp[1].tokens = ctx;
        }
        std::vector<float> v(p.velocity_size());
        net.forward(p.inputs(), v, options({}, nullptr, {}, sites.hooks));
        CHECK(bit_equal(v, plain));
    }
    SUBCASE("thread count does not change a bit") {
        std::vector<float> probe2(probe.size()), v1(p.velocity_size()), v3(p.velocity_size());
        net.set_threads(1);
        net.forward(p.inputs(), v1, options({}, nullptr, probe, {}, true));
        net.set_threads(3);
        net.set_min_chunk_work(0);  // split every loop of this small problem
        net.forward(p.inputs(), v3, options({}, nullptr, probe2, {}, true));
        CHECK(bit_equal(v1, plain));
        CHECK(bit_equal(v3, plain));
        CHECK(bit_equal(probe, probe2));
    }
}

void check_reuse(const random_problem& p) {
    sd3::transformer net(p.model, p.limits(), 2);
    std::vector<float> plain(p.velocity_size()), v(p.velocity_size());
    site_buffers sites(p);
    net.forward(p.inputs(), plain, options({}, nullptr, {}, sites.hooks));  // read-back fills every site

    SUBCASE("every module reused") {
        sites.set_mode(sd3::module_mode::reuse, sd3::module_mode::reuse);
        net.forward(p.inputs(), v, options({}, nullptr, {}, sites.hooks));
        CHECK(bit_equal(v, plain));
    }
    SUBCASE("mixed: attention reused in one layer, MLPs in another") {
        sites.hooks[1].attention[0].mode = sites.hooks[1].attention[1].mode = sd3::module_mode::reuse;
        sites.hooks[0].mlp[0].mode = sites.hooks[2].mlp[0].mode = sd3::module_mode::reuse;
        net.forward(p.inputs(), v, options({}, nullptr, {}, sites.hooks));
        CHECK(bit_equal(v, plain));
    }
    SUBCASE("reused rows are really used: perturbing them changes the output") {
        sites.set_mode(sd3::module_mode::reuse, sd3::module_mode::reuse);
        sites.mlp_img[1][5] += 1.0f;
        net.forward(p.inputs(), v, options({}, nullptr, {}, sites.hooks));
        CHECK_FALSE(bit_equal(v, plain));
        CHECK(test_util::rel_l2(v, plain) > 1e-6);
    }
    if (!p.model.config.dual_attention_layers.empty()) {
        SUBCASE("MMDiT-X: the image-only attentions reused alone, and their rows really used") {
            for (const int l : p.model.config.dual_attention_layers) sites.hooks[l].attention2.mode = sd3::module_mode::reuse;
            net.forward(p.inputs(), v, options({}, nullptr, {}, sites.hooks));
            CHECK(bit_equal(v, plain));
            for (const int l : p.model.config.dual_attention_layers) {
                CAPTURE(l);
                std::vector<float> w(p.velocity_size());
                sites.attn2_img[l][3] += 1.0f;
                net.forward(p.inputs(), w, options({}, nullptr, {}, sites.hooks));
                CHECK(test_util::rel_l2(w, plain) > 1e-6);
                sites.attn2_img[l][3] -= 1.0f;
            }
        }
    }
    SUBCASE("rows from another timestep give another output") {
        auto other = p;
        other.timesteps = {p.timesteps[1], p.timesteps[0]};
        site_buffers stale(other);
        std::vector<float> w(p.velocity_size());
        net.forward(other.inputs(), w, options({}, nullptr, {}, stale.hooks));
        stale.set_mode(sd3::module_mode::reuse, sd3::module_mode::reuse);
        net.forward(p.inputs(), v, options({}, nullptr, {}, stale.hooks));
        CHECK(test_util::rel_l2(v, plain) > 1e-3);
    }
}

}  // namespace

TEST_CASE("hooked forward with every token computed is bit-identical to the plain forward") {
    check_bit_identity(random_problem(test_util::fresh_seed()));
}
TEST_CASE("mmditx: hooked forward with every token computed is bit-identical to the plain forward") {
    check_bit_identity(random_problem(test_util::fresh_seed(), true, mmditx_layers));
}
TEST_CASE("reusing read-back module outputs reproduces the forward exactly") { check_reuse(random_problem(test_util::fresh_seed())); }
TEST_CASE("mmditx: reusing read-back module outputs reproduces the forward exactly") {
    check_reuse(random_problem(test_util::fresh_seed(), true, mmditx_layers));
}

TEST_CASE("MLP token subset recomputes the listed tokens and reads the others") {
    const auto seed = test_util::fresh_seed();
    std::mt19937 rng(seed);
    const random_problem p(seed);
    sd3::transformer net(p.model, p.limits(), 2);
    std::vector<float> plain(p.velocity_size()), v(p.velocity_size());
    site_buffers full(p);
    net.forward(p.inputs(), plain, options({}, nullptr, {}, full.hooks));

    // Same inputs: buffers hold this forward's own MLP outputs for the tokens not listed, garbage (NaN) for the
    // listed ones, which must be recomputed before they are read.
    site_buffers wired = full;
    wired.wire();
    const int D = p.hidden(), layers = p.model.config.num_layers;
    std::vector<std::vector<std::int32_t>> img_subsets, ctx_subsets;
    for (int l = 0; l < layers; ++l) {
        img_subsets.push_back(random_tokens(rng, p.batch, p.tokens(), p.tokens() / 3));
        ctx_subsets.push_back(random_tokens(rng, p.batch, p.context_tokens, 3));
    }
    const float nan = std::numeric_limits<float>::quiet_NaN();
    for (int l = 0; l < layers; ++l) {
        const bool last = l + 1 == layers;
        wired.hooks[l].mlp[0].mode = sd3::module_mode::subset;
        wired.hooks[l].mlp[0].tokens = img_subsets[l];
        const int m = p.tokens() / 3;
        for (int i = 0; i < p.batch * m; ++i) {
            const int b = i / m;
            std::fill_n(wired.mlp_img[l].begin() + (static_cast<std::size_t>(b) * p.tokens() + img_subsets[l][i]) * D, D, nan);
        }
        if (!last) {
            wired.hooks[l].mlp[1].mode = sd3::module_mode::subset;
            wired.hooks[l].mlp[1].tokens = ctx_subsets[l];
            for (int i = 0; i < p.batch * 3; ++i) {
                const int b = i / 3;
                std::fill_n(wired.mlp_ctx[l].begin() + (static_cast<std::size_t>(b) * p.context_tokens + ctx_subsets[l][i]) * D, D, nan);
            }
        }
    }
    net.forward(p.inputs(), v, options({}, nullptr, {}, wired.hooks));
    CHECK(test_util::rel_l2(v, plain) <= 1e-5);
    for (int l = 0; l < layers; ++l) {
        CHECK(test_util::rel_l2(wired.mlp_img[l], full.mlp_img[l]) <= 1e-5);  // NaN rows were refreshed
        if (l + 1 < layers) CHECK(test_util::rel_l2(wired.mlp_ctx[l], full.mlp_ctx[l]) <= 1e-5);
    }
}

namespace {

void check_token_subset(const random_problem& p, std::uint32_t seed) {
    std::mt19937 rng(seed);
    const auto& c = p.model.config;
    const int N = p.tokens(), D = p.hidden(), P = c.patch_features();
    sd3::transformer net(p.model, p.limits(), 2);
    sd3::kv_cache kv(c, 2, N);
    std::vector<float> full(p.velocity_size()), probe_full(p.batch * N);
    net.forward(p.inputs(), full, options({}, &kv, probe_full));

    SUBCASE("same inputs: subset rows equal the full forward's rows; probes of a partition add up") {
        // Split the tokens of each sample into two halves; each half's forward sees the other half's K/V from the
        // cache, which the full forward filled with exactly the values it would compute itself.
        std::vector<std::int32_t> first, second;
        for (int b = 0; b < p.batch; ++b) {
            std::vector<std::int32_t> ids(N);
            std::iota(ids.begin(), ids.end(), 0);
            std::shuffle(ids.begin(), ids.end(), rng);
            std::sort(ids.begin(), ids.begin() + N / 2);
            std::sort(ids.begin() + N / 2, ids.end());
            first.insert(first.end(), ids.begin(), ids.begin() + N / 2);
            second.insert(second.end(), ids.begin() + N / 2, ids.end());
        }
        std::vector<float> probe_a(p.batch * N), probe_b(p.batch * N);
        std::vector<float> rows_a(p.batch * (N / 2) * P), rows_b(p.batch * (N - N / 2) * P);
        net.forward(p.inputs(), rows_a, options(first, &kv, probe_a));
        net.forward(p.inputs(), rows_b, options(second, &kv, probe_b));
        CHECK(test_util::rel_l2(rows_a, to_rows(p, first, full)) <= 1e-5);
        CHECK(test_util::rel_l2(rows_b, to_rows(p, second, full)) <= 1e-5);
        std::vector<float> sum(probe_a.size());
        for (std::size_t i = 0; i < sum.size(); ++i) sum[i] = probe_a[i] + probe_b[i];
        CHECK(test_util::rel_l2(sum, probe_full) <= 1e-5);
    }
    SUBCASE("other inputs: rows of tokens not computed keep their cached K/V, computed rows are refreshed") {
        const sd3::kv_cache before = kv;
        auto other = p;
        other.timesteps = {p.timesteps[0] * 0.5f + 1.0f, p.timesteps[1] * 0.5f + 1.0f};
        const int n = N / 4;
        const auto tokens = random_tokens(rng, p.batch, N, n);
        std::vector<float> rows(p.batch * n * P);
        net.forward(other.inputs(), rows, options(tokens, &kv));
        for (int l = 0; l < c.num_layers; ++l)
            for (const auto a : {sd3::attention_kind::joint, sd3::attention_kind::image_only}) {
                if (a == sd3::attention_kind::image_only && !c.dual_attention(l)) {
                    CHECK(kv.keys(l, 0, a) == nullptr);
                    continue;
                }
                for (int b = 0; b < p.batch; ++b)
                    for (int t = 0; t < N; ++t) {
                        const bool computed = std::binary_search(tokens.begin() + b * n, tokens.begin() + (b + 1) * n, t);
                        const bool same =
                            std::memcmp(kv.keys(l, b, a) + t * D, before.keys(l, b, a) + t * D, D * sizeof(float)) == 0 &&
                            std::memcmp(kv.values(l, b, a) + t * D, before.values(l, b, a) + t * D, D * sizeof(float)) == 0;
                        CHECK(same != computed);
                    }
            }
        // With every token listed, each layer refreshes the whole cache before reading it: the full forward's bits.
        std::vector<float> full_other(p.velocity_size());
        net.forward(other.inputs(), full_other);
        const auto all = all_tokens(p.batch, N);
        std::vector<float> all_rows(p.batch * N * P);
        net.forward(other.inputs(), all_rows, options(all, &kv));
        CHECK(bit_equal(to_image(p, all, all_rows), full_other));
        // A stale cache makes the subset forward differ from the fresh full forward (the K/V really come from it).
        CHECK(test_util::rel_l2(rows, to_rows(p, tokens, full_other)) > 1e-6);
    }
}

}  // namespace

TEST_CASE("token-subset forward: computed tokens see cached keys/values, cache rows refresh") {
    const auto seed = test_util::fresh_seed();
    check_token_subset(random_problem(seed), seed);
}
TEST_CASE("mmditx: token-subset forward: computed tokens see cached keys/values of both attentions, cache rows refresh") {
    const auto seed = test_util::fresh_seed();
    check_token_subset(random_problem(seed, true, mmditx_layers), seed);
}

TEST_CASE("patches_to_image and image_to_patches follow diffusers' (p, q, c) row layout") {
    const auto c = test_util::small_config();
    // 1 sample, 2 channels, 4 x 6 image (2 x 3 patches); pixel value encodes (channel, y, x).
    const int C = 2, H = 4, W = 6;
    std::vector<float> img(C * H * W);
    for (int ch = 0; ch < C; ++ch)
        for (int y = 0; y < H; ++y)
            for (int x = 0; x < W; ++x) img[(ch * H + y) * W + x] = 100.0f * ch + 10.0f * y + x;
    const std::vector<std::int32_t> tokens = {1, 5};  // patch (0, 1) and patch (1, 2)
    std::vector<float> rows(2 * 8);
    sd3::image_to_patches(c, 1, H, W, C, tokens, img, rows);
    // token 1 covers y 0..1, x 2..3; features (u, v, ch)
    const std::vector<float> want = {2, 102, 3, 103, 12, 112, 13, 113, 24, 124, 25, 125, 34, 134, 35, 135};
    CHECK(rows == want);
    std::vector<float> back(img.size(), -1.0f);
    sd3::patches_to_image(c, 1, H, W, C, tokens, rows, back);
    CHECK(back[(0 * H + 0) * W + 2] == 2.0f);
    CHECK(back[(1 * H + 3) * W + 5] == 135.0f);
    CHECK(back[0] == -1.0f);  // untouched
    std::vector<float> all_rows(6 * 8), again(img.size());
    sd3::image_to_patches(c, 1, H, W, C, {}, img, all_rows);
    sd3::patches_to_image(c, 1, H, W, C, {}, all_rows, again);
    CHECK(again == img);
    CHECK_THROWS_WITH_AS(sd3::image_to_patches(c, 1, H, W, C, std::vector<std::int32_t>{6, 7}, img, rows),
                         doctest::Contains("token id 6"), std::invalid_argument);
    CHECK_THROWS_WITH_AS(sd3::patches_to_image(c, 1, 5, W, C, {}, all_rows, again), doctest::Contains("height"),
                         std::invalid_argument);
}

// ---------------------------------------------------------------------------------------------------------------
// FLUX: the same contracts on a random FLUX model (one double-stream and two single-stream blocks, guidance
// embedding, a non-square 4 x 5 token grid): every block has both streams' attention and MLP sites.

namespace {

struct flux_problem {
    std::uint32_t seed;
    sd3::flux_model model;
    static constexpr int batch = 2, rows = 4, cols = 5, context_tokens = 3, N = rows * cols;
    std::vector<float> latents, timesteps, context, pooled, guidance;

    explicit flux_problem(std::uint32_t seed_) : seed(seed_), model(sd3::flux_model::random(test_util::small_flux_config(), seed_)) {
        std::mt19937 rng(seed_);
        std::normal_distribution<float> n(0.0f, 1.0f);
        auto fill = [&](std::vector<float>& v, std::size_t count) {
            v.resize(count);
            for (auto& x : v) x = n(rng);
        };
        fill(latents, static_cast<std::size_t>(batch) * N * 8);
        fill(context, static_cast<std::size_t>(batch) * context_tokens * 12);
        fill(pooled, static_cast<std::size_t>(batch) * 10);
        timesteps = {std::uniform_real_distribution<float>(1.0f, 1000.0f)(rng), 500.0f};
        guidance = {3.5f, 1.0f};
    }
    sd3::forward_inputs inputs() const {
        return {.batch = batch, .height = rows, .width = cols, .context_tokens = context_tokens, .latents = latents,
                .timesteps = timesteps, .context = context, .pooled = pooled, .guidance = guidance};
    }
    sd3::engine_limits limits() const { return {.max_batch = batch, .max_height = rows, .max_width = cols, .max_context_tokens = 4}; }
};

// Read-back buffers at every site of every block (both streams everywhere in FLUX).
struct flux_sites {
    std::vector<std::vector<float>> rows;  // [block * 4 + site]: attention image, attention context, MLP image, MLP context
    std::vector<sd3::block_hooks> hooks;
    explicit flux_sites(int blocks) : rows(static_cast<std::size_t>(blocks) * 4), hooks(static_cast<std::size_t>(blocks)) {
        const std::size_t img = static_cast<std::size_t>(flux_problem::batch) * flux_problem::N * 32,
                          ctx = static_cast<std::size_t>(flux_problem::batch) * flux_problem::context_tokens * 32;
        for (int l = 0; l < blocks; ++l) {
            for (int s = 0; s < 4; ++s) rows[l * 4 + s].assign(s % 2 ? ctx : img, 0.0f);
            hooks[l].attention[0].rows = rows[l * 4 + 0].data();
            hooks[l].attention[1].rows = rows[l * 4 + 1].data();
            hooks[l].mlp[0].rows = rows[l * 4 + 2].data();
            hooks[l].mlp[1].rows = rows[l * 4 + 3].data();
        }
    }
    void reuse_all() {
        for (auto& h : hooks)
            for (int s = 0; s < 2; ++s) h.attention[s].mode = h.mlp[s].mode = sd3::module_mode::reuse;
    }
};

}  // namespace

TEST_CASE("flux: hooked forwards — read-back, reuse, MLP subsets, token subsets against the K/V cache, the probe") {
    const flux_problem p(test_util::fresh_seed());
    INFO("seed ", p.seed);
    sd3::transformer net(p.model, p.limits(), 2);
    net.set_min_chunk_work(0);
    const int blocks = net.blocks(), P = net.patch_features(), N = flux_problem::N;
    REQUIRE(blocks == 3);
    CHECK(net.sites(0).single_stream == false);
    CHECK(net.sites(2).single_stream == true);
    CHECK(net.sites(2).context_outputs == true);
    const std::size_t out = static_cast<std::size_t>(flux_problem::batch) * N * P;
    std::vector<float> plain(out);
    net.forward(p.inputs(), plain);

    sd3::kv_cache kv(net, flux_problem::batch, N);
    std::vector<float> probe(flux_problem::batch * N), v(out);
    flux_sites sites(blocks);
    net.forward(p.inputs(), v, options({}, &kv, probe, sites.hooks));
    CHECK(bit_equal(v, plain));  // hooks that only read back change nothing
    for (float x : probe) CHECK(x > 0.0f);

    SUBCASE("every module reused from its read-back rows: the same output; perturbed rows change it") {
        sites.reuse_all();
        net.forward(p.inputs(), v, options({}, nullptr, {}, sites.hooks));
        CHECK(bit_equal(v, plain));
        // The first single-stream block's sites are really read, each of them, by the last block computing again (the
        // last block's context rows feed nothing: FLUX drops the context stream after it, as diffusers does).
        for (int s = 0; s < 2; ++s) sites.hooks[2].attention[s].mode = sites.hooks[2].mlp[s].mode = sd3::module_mode::compute;
        net.forward(p.inputs(), v, options({}, nullptr, {}, sites.hooks));
        CHECK(bit_equal(v, plain));
        for (int site = 0; site < 4; ++site) {
            CAPTURE(site);
            sites.rows[4 * 1 + site][1] += 1.0f;
            net.forward(p.inputs(), v, options({}, nullptr, {}, sites.hooks));
            CHECK(test_util::rel_l2(v, plain) > 1e-7);
            sites.rows[4 * 1 + site][1] -= 1.0f;
        }
    }
    SUBCASE("MLP subset listing every token of both streams: the same output") {
        const auto img = all_tokens(flux_problem::batch, N), ctx = all_tokens(flux_problem::batch, flux_problem::context_tokens);
        for (auto& h : sites.hooks) {
            h.mlp[0].mode = h.mlp[1].mode = sd3::module_mode::subset;
            h.mlp[0].tokens = img;
            h.mlp[1].tokens = ctx;
        }
        net.forward(p.inputs(), v, options({}, nullptr, {}, sites.hooks));
        CHECK(bit_equal(v, plain));
    }
    SUBCASE("two token subsets that partition the grid: their rows are the full forward's, their probes add up") {
        std::mt19937 rng(p.seed);
        const auto first = random_tokens(rng, flux_problem::batch, N, N / 2);
        std::vector<std::int32_t> second;
        for (int b = 0; b < flux_problem::batch; ++b)
            for (int t = 0; t < N; ++t)
                if (!std::binary_search(first.begin() + b * (N / 2), first.begin() + (b + 1) * (N / 2), t)) second.push_back(t);
        auto rows_of = [&](const std::vector<std::int32_t>& tokens) {  // the full forward's velocity rows of `tokens`
            const std::size_t n = tokens.size() / flux_problem::batch;
            std::vector<float> r;
            for (int b = 0; b < flux_problem::batch; ++b)
                for (std::size_t i = 0; i < n; ++i) {
                    const float* row = plain.data() + (static_cast<std::size_t>(b) * N + tokens[b * n + i]) * P;
                    r.insert(r.end(), row, row + P);
                }
            return r;
        };
        std::vector<float> a(first.size() * P), b(second.size() * P), probe_a(probe.size()), probe_b(probe.size());
        net.forward(p.inputs(), a, options(first, &kv, probe_a));
        net.forward(p.inputs(), b, options(second, &kv, probe_b));
        CHECK(test_util::rel_l2(a, rows_of(first)) <= 1e-5);
        CHECK(test_util::rel_l2(b, rows_of(second)) <= 1e-5);
        std::vector<float> sum(probe.size());
        for (std::size_t i = 0; i < sum.size(); ++i) sum[i] = probe_a[i] + probe_b[i];
        CHECK(test_util::rel_l2(sum, probe) <= 1e-5);
        // A cache from other inputs makes the subset differ: its keys and values are really read.
        auto other = p;
        other.timesteps = {p.timesteps[0] * 0.5f + 1.0f, 250.0f};
        std::vector<float> scratch(out);
        net.forward(other.inputs(), scratch, options({}, &kv));
        net.forward(p.inputs(), a, options(first, &kv));
        CHECK(test_util::rel_l2(a, rows_of(first)) > 1e-6);
    }
    SUBCASE("refusals name the problem") {
        sd3::kv_cache flux1_sized(sd3::flux_config{}, 1, 1);  // FLUX.1's 57 blocks, not this model's 3
        const auto bad = options({}, &flux1_sized);
        CHECK_THROWS_WITH_AS(net.forward(p.inputs(), v, bad), doctest::Contains("kv_cache has 57 layers"), std::invalid_argument);
        auto no_guidance = p.inputs();
        no_guidance.guidance = {};
        CHECK_THROWS_WITH_AS(net.forward(no_guidance, v), doctest::Contains("guidance holds 0 floats"), std::invalid_argument);
        std::vector<float> ids(N * 3, 0.0f);
        ids[7] = std::numeric_limits<float>::quiet_NaN();
        auto bad_ids = p.inputs();
        bad_ids.image_ids = ids;
        CHECK_THROWS_WITH_AS(net.forward(bad_ids, v), doctest::Contains("image_ids[7] = nan is not finite"), std::invalid_argument);
        CHECK_THROWS_WITH_AS(sd3::transformer(p.model, sd3::engine_limits{}), doctest::Contains("token grid"), std::invalid_argument);
        CHECK_THROWS_AS((void)net.config(), std::logic_error);
    }
}
