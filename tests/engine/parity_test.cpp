// Parity with diffusers 0.31 (fixtures from tools/make_parity_fixtures.py): the transformer at two timestep
// pairs for two tiny random models, the scheduler tables, and a full 8-step CFG sampling run.
#include <doctest/doctest.h>

#include <string>
#include <vector>

#include "sd3/flux_model.hpp"
#include "sd3/model.hpp"
#include "sd3/safetensors.hpp"
#include "sd3/sampler.hpp"
#include "sd3/transformer.hpp"
#include "test_util.hpp"

namespace {

constexpr double tolerance = 1e-5;  // relative L2, float32

struct fixture {
    sd3::model model;
    sd3::safetensors_file io;
    explicit fixture(const std::string& variant)
        : model(sd3::model::load(test_util::parity_dir() / variant)), io(test_util::parity_dir() / variant / "io.safetensors") {}
    std::vector<float> get(const char* name) const { return io.read(name); }
    int dim(const char* name, int i) const { return static_cast<int>(io.info(name).shape.at(i)); }
    // Room for the fixture's own inputs, at batch `batch`.
    sd3::engine_limits limits(int batch = 2) const {
        return {.max_batch = batch, .max_height = dim("latents", 2), .max_width = dim("latents", 3),
                .max_context_tokens = dim("context", 1)};
    }
};

void check_transformer(const std::string& variant, int threads) {
    CAPTURE(variant);
    CAPTURE(threads);
    const fixture fx(variant);
    const auto latents = fx.get("latents"), context = fx.get("context"), pooled = fx.get("pooled");
    sd3::transformer net(fx.model, fx.limits(), threads);
    net.set_min_chunk_work(0);  // the fixtures are small: split every loop, so that the parallel paths are the ones tested
    for (const char* t : {"0", "1"}) {
        const auto timesteps = fx.get((std::string("t") + t).c_str());
        const auto expected = fx.get((std::string("out_t") + t).c_str());
        const sd3::forward_inputs in{.batch = fx.dim("latents", 0), .height = fx.dim("latents", 2), .width = fx.dim("latents", 3), .context_tokens = fx.dim("context", 1), .latents = latents, .timesteps = timesteps, .context = context, .pooled = pooled};
        std::vector<float> v(expected.size());
        net.forward(in, v);
        const double err = test_util::rel_l2(v, expected);
        MESSAGE(variant << " t" << std::string(t) << " relative L2 error " << err);
        CHECK(err <= tolerance);
    }
}

}  // namespace

TEST_CASE("diffusers_parity: transformer with RMS qk-norm, F32 weights") { check_transformer("rms", 1); }
TEST_CASE("diffusers_parity: transformer without qk-norm, F16/BF16 weights, out_channels != in_channels") {
    check_transformer("plain", 1);
}
// 360 image tokens: the engine's attention walks the image keys in two blocks (online softmax across them), and a
// head of 32 floats is read in place by P V where the register tile is 32 (AVX-512) or 16 wide.
TEST_CASE("diffusers_parity: transformer with more image tokens than one attention key block") { check_transformer("long", 1); }
// SD3.5-medium's MMDiT-X blocks: a second, image-only attention (attn2) in blocks 0 and 2 of 3, with qk-norm.
TEST_CASE("diffusers_parity: mmditx transformer (dual attention layers, RMS qk-norm)") { check_transformer("mmditx", 1); }
TEST_CASE("diffusers_parity: transformer multithreaded") {
    check_transformer("rms", 3);
    check_transformer("plain", 2);
    check_transformer("long", 2);
    check_transformer("mmditx", 2);
}

TEST_CASE("diffusers_parity: FlowMatchEulerDiscreteScheduler tables") {
    const fixture fx("rms");
    const auto sigmas = fx.get("sigmas"), timesteps = fx.get("timesteps");
    const sd3::flow_match_euler s(static_cast<int>(timesteps.size()), fx.get("shift").at(0));
    REQUIRE(s.sigmas().size() == sigmas.size());
    REQUIRE(s.timesteps().size() == timesteps.size());
    for (std::size_t i = 0; i < sigmas.size(); ++i) CHECK(s.sigmas()[i] == doctest::Approx(sigmas[i]).epsilon(1e-7));
    for (std::size_t i = 0; i < timesteps.size(); ++i) CHECK(s.timesteps()[i] == doctest::Approx(timesteps[i]).epsilon(1e-7));
    CHECK(s.sigmas().front() == 1.0f);
    CHECK(s.sigmas().back() == 0.0f);
}

// FLUX's schedule: FluxPipeline's sigmas linspace(1, 1/n, n) and calculate_shift's mu from the image's token count,
// through retrieve_timesteps into FLUX.1-dev's scheduler config, as diffusers' own code computes them.
TEST_CASE("diffusers_parity: flux schedule (sigmas linspace, mu from the image's token count)") {
    const sd3::safetensors_file f(test_util::parity_dir() / "flux_schedule.safetensors");
    int cases = 0;
    for (int i = 0; f.contains("mu." + std::to_string(i)); ++i, ++cases) {
        const std::string k = std::to_string(i);
        const int steps = static_cast<int>(f.read_ints("steps." + k).at(0));
        const int seq_len = static_cast<int>(f.read_ints("seq_len." + k).at(0));
        CAPTURE(steps);
        CAPTURE(seq_len);
        const double mu = f.read_doubles("mu." + k).at(0);
        CHECK(sd3::flux_mu(seq_len) == doctest::Approx(mu).epsilon(1e-12));
        const auto s = sd3::flow_match_euler::flux(steps, sd3::flux_mu(seq_len));
        const auto sigmas = f.read("sigmas." + k), timesteps = f.read("timesteps." + k);
        REQUIRE(s.sigmas().size() == sigmas.size());
        REQUIRE(s.timesteps().size() == timesteps.size());
        for (std::size_t j = 0; j < sigmas.size(); ++j) CHECK(s.sigmas()[j] == doctest::Approx(sigmas[j]).epsilon(1e-7));
        for (std::size_t j = 0; j < timesteps.size(); ++j) CHECK(s.timesteps()[j] == doctest::Approx(timesteps[j]).epsilon(1e-7));
    }
    CHECK(cases == 5);
}

TEST_CASE("diffusers_parity: 8-step CFG sampling") {
    const fixture fx("rms");
    const auto noise = fx.get("noise"), context = fx.get("context"), neg_context = fx.get("neg_context");
    const auto pooled = fx.get("pooled"), neg_pooled = fx.get("neg_pooled"), expected = fx.get("sample");
    const sd3::flow_match_euler sched(static_cast<int>(fx.get("timesteps").size()), fx.get("shift").at(0));
    sd3::transformer net(fx.model, {.max_batch = 4, .max_height = 6, .max_width = 10, .max_context_tokens = 5}, 2);
    const sd3::cfg_inputs in{fx.dim("noise", 0), fx.dim("noise", 2), fx.dim("noise", 3), fx.dim("context", 1),
                             noise, context, neg_context, pooled, neg_pooled};
    int steps_seen = 0;
    const auto out = sd3::sample_cfg(net, sched, in, fx.get("guidance").at(0), {},
                                     [&](int step, float, std::span<const float>) { CHECK(step == steps_seen++); });
    CHECK(steps_seen == sched.steps());
    const double err = test_util::rel_l2(out, expected);
    MESSAGE("sampling relative L2 error " << err);
    CHECK(err <= tolerance);
}

TEST_CASE("diffusers_parity: dynamic-shift schedule (mu)") {
    const fixture fx("rms");
    const auto sigmas = fx.get("sigmas_mu"), timesteps = fx.get("timesteps_mu");
    const sd3::flow_match_euler s(static_cast<int>(timesteps.size()), 1.0, 1000, 0.7);
    REQUIRE(s.sigmas().size() == sigmas.size());
    for (std::size_t i = 0; i < sigmas.size(); ++i) CHECK(s.sigmas()[i] == doctest::Approx(sigmas[i]).epsilon(1e-7));
    for (std::size_t i = 0; i < timesteps.size(); ++i) CHECK(s.timesteps()[i] == doctest::Approx(timesteps[i]).epsilon(1e-7));
}

// The hooks' read-back rows are diffusers' module outputs before the gate, and the probe is the attention each
// image key receives (head-averaged, summed over queries and layers), computed by a probing processor in diffusers.
TEST_CASE("diffusers_parity: module read-back hooks and attention probe") {
    for (const std::string variant : {"rms", "plain", "long", "mmditx"}) {
        CAPTURE(variant);
        const fixture fx(variant);
        const auto& c = fx.model.config;
        const auto latents = fx.get("latents"), context = fx.get("context"), pooled = fx.get("pooled");
        const auto timesteps = fx.get("t0"), expected = fx.get("out_t0");
        const int B = fx.dim("latents", 0), N = (fx.dim("latents", 2) / 2) * (fx.dim("latents", 3) / 2), L = fx.dim("context", 1);
        const int D = c.hidden();
        sd3::transformer net(fx.model, fx.limits(), 2);
        const sd3::forward_inputs in{.batch = B, .height = fx.dim("latents", 2), .width = fx.dim("latents", 3), .context_tokens = L, .latents = latents, .timesteps = timesteps, .context = context, .pooled = pooled};

        // rows[l][0..4] = attn image, attn context, mlp image, mlp context, image-only attention (MMDiT-X)
        std::vector<std::vector<std::vector<float>>> rows(c.num_layers);
        std::vector<sd3::block_hooks> hooks(c.num_layers);
        for (int l = 0; l < c.num_layers; ++l) {
            const bool last = l == c.num_layers - 1;
            rows[l] = {std::vector<float>(B * N * D), std::vector<float>(B * L * D), std::vector<float>(B * N * D),
                       std::vector<float>(B * L * D), std::vector<float>(B * N * D)};
            hooks[l].attention[0].rows = rows[l][0].data();
            hooks[l].mlp[0].rows = rows[l][2].data();
            if (c.dual_attention(l)) hooks[l].attention2.rows = rows[l][4].data();
            if (!last) {
                hooks[l].attention[1].rows = rows[l][1].data();
                hooks[l].mlp[1].rows = rows[l][3].data();
            }
        }
        for (bool context_queries : {false, true}) {
            CAPTURE(context_queries);
            std::vector<float> v(expected.size()), probe(B * N);
            sd3::forward_options opts;
            opts.attention_probe = probe;
            opts.probe_context_queries = context_queries;
            opts.blocks = hooks;
            net.forward(in, v, opts);
            CHECK(test_util::rel_l2(v, expected) <= tolerance);
            auto want = fx.get("probe_img");
            if (context_queries) {
                const auto extra = fx.get("probe_ctx");
                for (std::size_t i = 0; i < want.size(); ++i) want[i] += extra[i];
            }
            const double perr = test_util::rel_l2(probe, want);
            MESSAGE(variant << " probe relative L2 error " << perr);
            CHECK(perr <= tolerance);
        }
        for (int l = 0; l < c.num_layers; ++l) {
            const std::string s = std::to_string(l);
            CHECK(test_util::rel_l2(rows[l][0], fx.get(("attn_img." + s).c_str())) <= tolerance);
            CHECK(test_util::rel_l2(rows[l][2], fx.get(("mlp_img." + s).c_str())) <= tolerance);
            if (l + 1 < c.num_layers) {
                CHECK(test_util::rel_l2(rows[l][1], fx.get(("attn_ctx." + s).c_str())) <= tolerance);
                CHECK(test_util::rel_l2(rows[l][3], fx.get(("mlp_ctx." + s).c_str())) <= tolerance);
            }
            CHECK(c.dual_attention(l) == fx.io.contains("attn2_img." + s));
            if (c.dual_attention(l)) CHECK(test_util::rel_l2(rows[l][4], fx.get(("attn2_img." + s).c_str())) <= tolerance);
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// FLUX (fixture flux/: a tiny random FluxTransformer2DModel with a guidance embedding, 2 double-stream and
// 2 single-stream blocks, rotary dims (4, 6, 6), a 3 x 5 token grid and 5 text tokens).

namespace {

struct flux_fixture {
    sd3::flux_model model;
    sd3::safetensors_file io;
    flux_fixture()
        : model(sd3::flux_model::load(test_util::parity_dir() / "flux")), io(test_util::parity_dir() / "flux" / "io.safetensors") {}
    std::vector<float> get(const char* name) const { return io.read(name); }
    int batch() const { return static_cast<int>(io.info("latents").shape.at(0)); }
    int text() const { return static_cast<int>(io.info("context").shape.at(1)); }
    static constexpr int rows = 3, cols = 5;  // the fixture's token grid (img_ids)
    sd3::engine_limits limits() const {
        return {.max_batch = batch(), .max_height = rows, .max_width = cols, .max_context_tokens = text()};
    }
};

// The fixture's inputs at timestep pair `i` (the pipeline's t, before its / 1000), with its ids given or defaulted.
struct flux_call {
    std::vector<float> latents, context, pooled, guidance, timesteps, image_ids, text_ids;
    sd3::forward_inputs inputs(const flux_fixture& fx, bool explicit_ids) const {
        return {.batch = fx.batch(), .height = flux_fixture::rows, .width = flux_fixture::cols, .context_tokens = fx.text(),
                .latents = latents, .timesteps = timesteps, .context = context, .pooled = pooled, .guidance = guidance,
                .image_ids = explicit_ids ? std::span<const float>(image_ids) : std::span<const float>(),
                .text_ids = explicit_ids ? std::span<const float>(text_ids) : std::span<const float>()};
    }
};
flux_call flux_inputs(const flux_fixture& fx, int i) {
    const std::string t = std::to_string(i);
    return {fx.get("latents"), fx.get("context"), fx.get("pooled"), fx.get("guidance"), fx.get(("timestep" + t).c_str()),
            fx.get("img_ids"), fx.get("txt_ids")};
}

// Runs the fixture's t0 forward and returns, for each block boundary `next` in `boundaries`, the [context, image]
// hidden states the block before it left (diffusers' block outputs).
std::vector<std::pair<std::vector<float>, std::vector<float>>> flux_block_outputs(const std::vector<int>& boundaries) {
    const flux_fixture fx;
    const flux_call call = flux_inputs(fx, 0);
    sd3::transformer net(fx.model, fx.limits(), 2);
    net.set_min_chunk_work(0);
    std::vector<std::pair<std::vector<float>, std::vector<float>>> seen(boundaries.size());
    sd3::forward_options opts;
    opts.between_blocks = [&](const sd3::block_boundary& b) {
        for (std::size_t i = 0; i < boundaries.size(); ++i)
            if (b.next_layer == boundaries[i]) seen[i] = {{b.context.begin(), b.context.end()}, {b.image.begin(), b.image.end()}};
        return b.next_layer;
    };
    std::vector<float> v(call.latents.size());
    net.forward(call.inputs(fx, true), v, opts);
    return seen;
}

}  // namespace

namespace {
// The hidden states at `boundaries` against diffusers' outputs of the blocks `prefix`0, `prefix`1.
void check_flux_blocks(const char* prefix, const std::vector<int>& boundaries) {
    const flux_fixture fx;
    const auto seen = flux_block_outputs(boundaries);
    for (std::size_t k = 0; k < boundaries.size(); ++k) {
        CAPTURE(k);
        const std::string name = prefix + std::to_string(k);
        const double ctx = test_util::rel_l2(seen[k].first, fx.get((name + "_context").c_str()));
        const double img = test_util::rel_l2(seen[k].second, fx.get((name + "_image").c_str()));
        MESSAGE("flux " << name << " relative L2 error: context " << ctx << ", image " << img);
        CHECK(ctx <= tolerance);
        CHECK(img <= tolerance);
    }
}
}  // namespace

TEST_CASE("diffusers_parity: flux double-stream blocks (rotary qk, [context; image] attention)") {
    check_flux_blocks("double", {1, 2});  // after double-stream blocks 0 and 1
}

TEST_CASE("diffusers_parity: flux single-stream blocks (parallel attention and MLP)") {
    check_flux_blocks("single", {3, 4});  // after single-stream blocks 0 and 1 (4: the final layer is next)
}

TEST_CASE("diffusers_parity: flux transformer (guidance embedding, both timestep pairs, ids given or FluxPipeline's)") {
    const flux_fixture fx;
    for (int threads : {1, 2})
        for (bool explicit_ids : {true, false})
            for (int i : {0, 1}) {
                CAPTURE(threads);
                CAPTURE(explicit_ids);
                CAPTURE(i);
                const flux_call call = flux_inputs(fx, i);
                sd3::transformer net(fx.model, fx.limits(), threads);
                net.set_min_chunk_work(0);
                const auto expected = fx.get(("out_t" + std::to_string(i)).c_str());
                std::vector<float> v(expected.size());
                net.forward(call.inputs(fx, explicit_ids), v);
                const double err = test_util::rel_l2(v, expected);
                MESSAGE("flux t" << i << " relative L2 error " << err);
                CHECK(err <= tolerance);
            }
}

TEST_CASE("diffusers_parity: flux sampling (FluxPipeline's loop: sigmas linspace, mu, guidance embedding)") {
    const flux_fixture fx;
    const flux_call call = flux_inputs(fx, 0);
    const int steps = static_cast<int>(fx.io.read_ints("sample_steps").at(0));
    const double mu = sd3::flux_mu(flux_fixture::rows * flux_fixture::cols);  // the fixture holds it rounded to float
    CHECK(mu == doctest::Approx(fx.get("sample_mu").at(0)).epsilon(1e-6));
    sd3::transformer net(fx.model, fx.limits(), 2);
    const sd3::cfg_inputs in{.batch = fx.batch(), .height = flux_fixture::rows, .width = flux_fixture::cols,
                             .context_tokens = fx.text(), .noise = call.latents, .context = call.context, .negative_context = {}, .pooled = call.pooled,
                             .negative_pooled = {}};
    // The fixture gives each sample its own guidance (3.5, 1.0); the sampler gives one to the batch: run each sample.
    const auto expected = fx.get("sample_out");
    const std::size_t latent = call.latents.size() / fx.batch(), ctx = call.context.size() / fx.batch(),
                      pooled = call.pooled.size() / fx.batch();
    for (int b = 0; b < fx.batch(); ++b) {
        CAPTURE(b);
        const auto at = static_cast<std::size_t>(b);
        sd3::cfg_inputs one = in;
        one.batch = 1;
        one.noise = std::span<const float>(call.latents).subspan(at * latent, latent);
        one.context = std::span<const float>(call.context).subspan(at * ctx, ctx);
        one.pooled = std::span<const float>(call.pooled).subspan(at * pooled, pooled);
        const auto out = sd3::sample_cfg(net, sd3::flow_match_euler::flux(steps, mu), one, call.guidance[at]);
        const double err = test_util::rel_l2(out, std::span<const float>(expected).subspan(at * latent, latent));
        MESSAGE("flux sampling sample " << b << " relative L2 error " << err);
        CHECK(err <= tolerance);
    }
}

TEST_CASE("diffusers_parity: flux latent packing (FluxPipeline._pack_latents) and its inverse; bad sizes refused") {
    const flux_fixture fx;
    const auto image = fx.get("pack_in"), expected = fx.get("pack_out");
    std::vector<float> packed(image.size()), back(image.size());
    sd3::flux_pack_latents(2, 3, 4, 6, image, packed);
    CHECK(packed == expected);
    sd3::flux_unpack_latents(2, 3, 4, 6, packed, back);
    CHECK(back == image);
    std::vector<float> odd(180), short_out(10);
    CHECK_THROWS_WITH_AS(sd3::flux_pack_latents(2, 3, 5, 6, odd, odd), doctest::Contains("height/width = 2/3/5/6"), std::invalid_argument);
    CHECK_THROWS_WITH_AS(sd3::flux_unpack_latents(2, 3, 4, 6, packed, short_out), doctest::Contains("expected positive sizes"),
                         std::invalid_argument);
}
