// Config parsing, model loading, forward argument checks, and the sampler's arithmetic and callbacks.
#include <doctest/doctest.h>

#include <algorithm>
#include <array>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "engine_fixture.hpp"
#include "sd3/config.hpp"
#include "sd3/flux_model.hpp"
#include "sd3/model.hpp"
#include "sd3/safetensors.hpp"
#include "sd3/sampler.hpp"
#include "sd3/transformer.hpp"
#include "test_util.hpp"

namespace fs = std::filesystem;

namespace {

const char* base_config = R"({"_class_name": "SD3Transformer2DModel", "sample_size": 8, "patch_size": 2, "in_channels": 4,
  "out_channels": null, "num_layers": 2, "attention_head_dim": 16, "num_attention_heads": 2, "joint_attention_dim": 16,
  "caption_projection_dim": 32, "pooled_projection_dim": 8, "pos_embed_max_size": 8, "qk_norm": null,
  "dual_attention_layers": [], "_diffusers_version": "0.31.0"})";

std::string with(const std::string& key, const std::string& value) {
    std::string s = base_config;
    const auto at = s.find("\"" + key + "\"");
    REQUIRE(at != std::string::npos);
    const auto colon = s.find(':', at), end = s.find_first_of(",}", colon);
    return s.substr(0, colon + 1) + " " + value + s.substr(end);
}

void expect_config_error(const std::string& json, const std::string& fragment) {
    CAPTURE(json);
    CHECK_THROWS_WITH_AS(sd3::parse_transformer_config(json, "cfg.json"), doctest::Contains(fragment.c_str()), std::invalid_argument);
}

}  // namespace

TEST_CASE("config.json parsing follows diffusers' defaults and rejects unsupported features") {
    const auto c = sd3::parse_transformer_config(base_config);
    CHECK(c.out_channels == 4);  // null -> in_channels
    CHECK(c.hidden() == 32);
    CHECK_FALSE(c.qk_norm);
    CHECK(sd3::parse_transformer_config(with("qk_norm", "\"rms_norm\"")).qk_norm);
    CHECK(sd3::parse_transformer_config(with("out_channels", "3")).out_channels == 3);
    const auto defaults = sd3::parse_transformer_config("{}");  // diffusers' class defaults (SD3 medium)
    CHECK(defaults.num_layers == 18);
    CHECK(defaults.hidden() == 1152);
    CHECK(defaults.pos_embed_max_size == 96);

    // MMDiT-X: the indices as diffusers reads them (a set: any order, repeats harmless), kept ascending.
    CHECK(sd3::parse_transformer_config(with("dual_attention_layers", "[1, 0, 1]")).dual_attention_layers == std::vector<int>{0, 1});
    CHECK(sd3::parse_transformer_config(with("dual_attention_layers", "null")).dual_attention_layers.empty());
    expect_config_error(with("dual_attention_layers", "[0, 2]"), "dual_attention_layers[1] = 2 is outside [0, num_layers = 2)");
    expect_config_error(with("dual_attention_layers", "[-1]"), "dual_attention_layers entry -1");
    expect_config_error(with("dual_attention_layers", "[\"0\"]"), "dual_attention_layers entry \"0\"");
    expect_config_error(with("dual_attention_layers", "[18446744073709551615]"), "dual_attention_layers entry 18446744073709551615");
    expect_config_error(with("dual_attention_layers", "7"), "dual_attention_layers = 7 must be an array");
    expect_config_error(with("qk_norm", "\"layer_norm\""), "qk_norm = \"layer_norm\"");
    expect_config_error(with("pos_embed_max_size", "null"), "pos_embed_max_size");
    expect_config_error(with("caption_projection_dim", "48"), "caption_projection_dim = 48");
    expect_config_error(with("patch_size", "0"), "patch_size = 0");
    expect_config_error(with("num_layers", "2.5"), "num_layers must be an integer");
    expect_config_error(with("_class_name", "\"FluxTransformer2DModel\""), "FluxTransformer2DModel");
    expect_config_error("{\"sample_size\": ", "not valid JSON");
    expect_config_error("[]", "not a JSON object");
    CHECK_THROWS_WITH_AS(sd3::load_transformer_config("/nonexistent/config.json"), doctest::Contains("/nonexistent/config.json"),
                         std::runtime_error);
}

TEST_CASE("flux: config.json parsing and the model's weights by diffusers' names") {
    const auto dir = test_util::parity_dir() / "flux";
    const auto c = sd3::load_flux_config(dir / "config.json");
    CHECK(c.hidden() == 32);
    CHECK(c.num_layers == 2);
    CHECK(c.num_single_layers == 2);
    CHECK(c.guidance_embeds);
    CHECK(c.axes_dims_rope == std::array<int, 3>{4, 6, 6});
    CHECK(c.out_channels() == 8);
    const auto m = sd3::flux_model::load(dir);
    const sd3::safetensors_file io(dir / "io.safetensors");
    CHECK(m.parameter_count() == static_cast<std::size_t>(io.read_ints("parameter_count").at(0)));  // diffusers' count
    CHECK(sd3::flux_model::random(c, 5).parameter_count() == m.parameter_count());
    CHECK(m.single_blocks.at(1).proj_out.in == 5 * 32);
    const auto defaults = sd3::parse_flux_config("{}");  // diffusers' class defaults (FLUX.1)
    CHECK(defaults.hidden() == 3072);
    CHECK(defaults.num_single_layers == 38);
    CHECK_FALSE(defaults.guidance_embeds);

    auto expect_error = [](const std::string& json, const char* fragment) {
        CAPTURE(json);
        CHECK_THROWS_WITH_AS(sd3::parse_flux_config(json, "flux.json"), doctest::Contains(fragment), std::invalid_argument);
    };
    expect_error(R"({"axes_dims_rope": [16, 56, 55]})", "axes_dims_rope[2] = 55 must be even");
    expect_error(R"({"axes_dims_rope": [16, 56, 54]})", "axes_dims_rope add up to 126, not attention_head_dim = 128");
    expect_error(R"({"axes_dims_rope": [16, 56]})", "axes_dims_rope = [16,56] must be 3 integers");
    expect_error(R"({"axes_dims_rope": [16, -56, 56]})", "must be 3 integers");
    expect_error(R"({"guidance_embeds": 1})", "guidance_embeds must be true or false, got 1");
    expect_error(R"({"out_channels": 16})", "out_channels = 16 is not supported");
    expect_error(R"({"num_single_layers": 0})", "num_single_layers = 0");
    expect_error(R"({"_class_name": "SD3Transformer2DModel"})", "expected \"FluxTransformer2DModel\"");
    CHECK_THROWS_WITH_AS(sd3::parse_transformer_config(R"({"_class_name": "FluxTransformer2DModel"})"),
                         doctest::Contains("expected \"SD3Transformer2DModel\""), std::invalid_argument);
}

TEST_CASE("model loading checks every tensor's presence and shape") {
    const auto dir = test_util::scratch_dir() / "model_errors";
    fs::create_directories(dir);
    // A valid folder made by copying the parity model, then broken one tensor at a time.
    const auto src = test_util::parity_dir() / "plain";
    const sd3::safetensors_file good(src / "diffusion_pytorch_model.safetensors");
    const auto config = sd3::load_transformer_config(src / "config.json");
    fs::copy_file(src / "config.json", dir / "config.json", fs::copy_options::overwrite_existing);

    std::vector<std::vector<float>> values;
    std::vector<sd3::tensor_to_save> tensors;
    for (const auto& t : good.tensors()) {
        values.push_back(good.read(t.name));
        tensors.push_back({t.name, t.shape, {}, t.type});
    }
    for (std::size_t i = 0; i < tensors.size(); ++i) tensors[i].values = values[i];
    auto save = [&](const std::vector<sd3::tensor_to_save>& ts) { sd3::save_safetensors(dir / "diffusion_pytorch_model.safetensors", ts); };

    save(tensors);
    const auto m = sd3::model::load(dir);
    const auto reference = sd3::model::load(src);
    CHECK(m.parameter_count() == reference.parameter_count());
    CHECK(m.blocks[0].to_qkv.weight == reference.blocks[0].to_qkv.weight);

    SUBCASE("missing tensor") {
        auto ts = tensors;
        std::erase_if(ts, [](const auto& t) { return t.name == "transformer_blocks.1.attn.add_k_proj.weight"; });
        save(ts);
        CHECK_THROWS_WITH_AS(sd3::model::load(dir), doctest::Contains("'transformer_blocks.1.attn.add_k_proj.weight'"),
                             std::runtime_error);
    }
    SUBCASE("shape disagreeing with the config") {
        auto ts = tensors;
        for (auto& t : ts)
            if (t.name == "proj_out.weight") t.shape = {t.shape[1], t.shape[0]};
        save(ts);
        CHECK_THROWS_WITH_AS(sd3::model::load(dir), doctest::Contains("'proj_out.weight': shape [24, 12]"), std::runtime_error);
    }
    SUBCASE("config asking for qk-norm weights the file lacks") {
        auto c = config;
        c.qk_norm = true;
        save(tensors);
        const sd3::safetensors_file f(dir / "diffusion_pytorch_model.safetensors");
        CHECK_THROWS_WITH_AS(sd3::model::from_safetensors(c, f), doctest::Contains("attn.norm_q.weight"), std::runtime_error);
    }
    SUBCASE("missing folder") {
        CHECK_THROWS_WITH_AS(sd3::model::load(dir / "nope"), doctest::Contains("config.json"), std::runtime_error);
    }
}

TEST_CASE("forward rejects bad arguments with messages naming them") {
    const test_util::random_problem p(7);
    sd3::transformer net(p.model, p.limits(), 1);
    std::vector<float> v(p.velocity_size());
    auto expect = [&](const sd3::forward_inputs& in, std::span<float> out, const sd3::forward_options& o, const char* fragment) {
        CAPTURE(fragment);
        CHECK_THROWS_WITH_AS(net.forward(in, out, o), doctest::Contains(fragment), std::invalid_argument);
    };
    const sd3::forward_options none;
    auto in = p.inputs();

    auto bad = in;
    bad.batch = 5;
    expect(bad, v, none, "batch = 5");
    bad = in;
    bad.height = 7;
    expect(bad, v, none, "height x width = 7 x 12");
    bad = in;
    bad.width = 14;
    expect(bad, v, none, "exceeds the limits");
    bad = in;
    bad.context_tokens = 9;
    expect(bad, v, none, "context_tokens = 9");
    bad = in;
    bad.latents = bad.latents.first(10);
    expect(bad, v, none, "latents holds 10 floats");
    bad = in;
    bad.timesteps = bad.timesteps.first(1);
    expect(bad, v, none, "timesteps");
    bad = in;
    bad.pooled = {};
    expect(bad, v, none, "pooled");
    expect(in, std::span<float>(v).first(3), none, "velocity holds 3 floats");

    sd3::kv_cache kv(p.model.config, 2, p.tokens());
    const std::vector<std::int32_t> unsorted = {3, 1, 4, 5}, outside = {0, 24, 1, 2}, odd = {1, 2, 3};
    std::vector<float> rows(2 * 2 * p.model.config.patch_features());
    sd3::forward_options o;
    o.image_tokens = unsorted;
    o.kv = &kv;
    expect(in, rows, o, "not strictly ascending");
    o.image_tokens = outside;
    expect(in, rows, o, "image_tokens[1] = 24");
    o.image_tokens = odd;
    expect(in, rows, o, "not a positive multiple of batch 2");
    const std::vector<std::int32_t> fine = {1, 2, 0, 5};
    o.image_tokens = fine;
    o.kv = nullptr;
    expect(in, rows, o, "needs a kv_cache");
    o.kv = &kv;
    expect(in, v, o, "velocity (token rows)");
    sd3::kv_cache small_kv(p.model.config, 1, p.tokens());
    o.kv = &small_kv;
    expect(in, rows, o, "kv_cache holds batch 1");

    std::vector<float> probe(5);
    sd3::forward_options po;
    po.attention_probe = probe;
    expect(in, v, po, "attention_probe holds 5 floats");

    std::vector<sd3::block_hooks> hooks(2);
    sd3::forward_options ho;
    ho.blocks = hooks;
    expect(in, v, ho, "blocks has 2 entries");
    hooks.resize(3);
    ho.blocks = hooks;
    hooks[1].mlp[0].mode = sd3::module_mode::reuse;
    expect(in, v, ho, "blocks[1].mlp[image]: mode reuse/subset needs rows");
    std::vector<float> buf(p.batch * p.tokens() * p.hidden());
    hooks[1].mlp[0].rows = buf.data();
    hooks[1].attention[0] = {sd3::module_mode::subset, buf.data(), fine};
    expect(in, v, ho, "only the MLP takes a token subset");
    hooks[1].attention[0] = {};
    hooks[2].mlp[1].rows = buf.data();
    expect(in, v, ho, "blocks[2].mlp[context]: the last block");
    hooks[2].mlp[1] = {};
    hooks[0].mlp[0] = {sd3::module_mode::compute, buf.data(), fine};
    expect(in, v, ho, "tokens is set but mode is not subset");
    const std::vector<std::int32_t> not_active = {1, 3, 0, 5};
    hooks[0].mlp[0] = {sd3::module_mode::subset, buf.data(), not_active};
    sd3::forward_options both;
    both.blocks = hooks;
    both.image_tokens = fine;
    both.kv = &kv;
    expect(in, rows, both, "token 3 of sample 0 is not among options.image_tokens");
    hooks[0].mlp[0].mode = static_cast<sd3::module_mode>(7);
    expect(in, v, ho, "is not a module_mode");
    hooks[0].mlp[0] = {};
    hooks[1].attention2.rows = buf.data();
    expect(in, v, ho, "blocks[1].attention2: block 1 has no image-only attention");

    // MMDiT-X: the image-only attention's hook and cache.
    const test_util::random_problem x(7, true, {1});
    sd3::transformer xnet(x.model, x.limits(), 1);
    std::vector<sd3::block_hooks> xhooks(3);
    sd3::forward_options xo;
    xo.blocks = xhooks;
    xhooks[1].attention2.mode = sd3::module_mode::reuse;
    CHECK_THROWS_WITH_AS(xnet.forward(in, v, xo), doctest::Contains("blocks[1].attention2: mode reuse needs rows"), std::invalid_argument);
    xhooks[1].attention2 = {sd3::module_mode::subset, buf.data(), {}};
    CHECK_THROWS_WITH_AS(xnet.forward(in, v, xo), doctest::Contains("blocks[1].attention2.mode = 2 is not compute (0) or reuse (1)"),
                         std::invalid_argument);
    xhooks[1].attention2 = {sd3::module_mode::reuse, buf.data(), fine};
    CHECK_THROWS_WITH_AS(xnet.forward(in, v, xo), doctest::Contains("attention2.tokens is set"), std::invalid_argument);
    sd3::forward_options xkv;
    xkv.image_tokens = fine;
    xkv.kv = &kv;  // made for the SD3 config: no slots for the image-only attention
    CHECK_THROWS_WITH_AS(xnet.forward(in, rows, xkv), doctest::Contains("kv_cache was made for 0 dual-attention layers"),
                         std::invalid_argument);
    auto xbroken = x.model;
    xbroken.blocks[1].attn2_out.bias.pop_back();
    CHECK_THROWS_WITH_AS(sd3::transformer(xbroken, x.limits(), 1), doctest::Contains("'transformer_blocks.1.attn2.to_out.0'"),
                         std::invalid_argument);
    xbroken = x.model;
    xbroken.blocks[0].dual_attention = true;
    CHECK_THROWS_WITH_AS(sd3::transformer(xbroken, x.limits(), 1), doctest::Contains("transformer_blocks.0.dual_attention"),
                         std::invalid_argument);

    CHECK_THROWS_WITH_AS(sd3::transformer(p.model, p.limits(), 0), doctest::Contains("threads = 0"), std::invalid_argument);
    CHECK_THROWS_WITH_AS(net.set_threads(-1), doctest::Contains("threads = -1"), std::invalid_argument);
    CHECK_THROWS_WITH_AS(net.set_min_chunk_work(-1), doctest::Contains("min_chunk_work = -1"), std::invalid_argument);
    CHECK_THROWS_WITH_AS(net.set_min_chunk_work(std::nan("")), doctest::Contains("min_chunk_work = nan"), std::invalid_argument);
    auto lim = p.limits();
    lim.max_batch = 0;
    CHECK_THROWS_WITH_AS(sd3::transformer(p.model, lim, 1), doctest::Contains("max_batch = 0"), std::invalid_argument);
    CHECK_THROWS_WITH_AS(sd3::kv_cache(p.model.config, 0, 4), doctest::Contains("max_batch = 0"), std::invalid_argument);

    auto broken = p.model;
    broken.blocks[1].ff2.bias.pop_back();
    CHECK_THROWS_WITH_AS(sd3::transformer(broken, p.limits(), 1), doctest::Contains("'transformer_blocks.1.ff.net.2'"),
                         std::invalid_argument);
    broken = p.model;
    broken.pos_table.resize(10);
    CHECK_THROWS_WITH_AS(sd3::transformer(broken, p.limits(), 1), doctest::Contains("'pos_embed.pos_embed' has 10 values"),
                         std::invalid_argument);

    // A failed call leaves the engine usable.
    std::vector<float> again(p.velocity_size()), first(p.velocity_size());
    net.forward(in, first);
    net.forward(in, again);
    CHECK(first == again);
}

TEST_CASE("flow_match_euler: SD3 schedule values and argument checks") {
    // diffusers' SD3 schedule (shift 3, 28 steps): 1.0, 0.98738, ..., 0.11091, 0.0089286, 0
    const sd3::flow_match_euler s(28, 3.0);
    REQUIRE(s.sigmas().size() == 29);
    CHECK(s.sigmas()[0] == 1.0f);
    CHECK(s.sigmas()[1] == doctest::Approx(0.98738).epsilon(1e-5));
    CHECK(s.sigmas()[26] == doctest::Approx(0.11091).epsilon(1e-4));
    CHECK(s.sigmas()[27] == doctest::Approx(0.0089286).epsilon(1e-4));
    CHECK(s.sigmas()[28] == 0.0f);
    CHECK(s.timesteps()[0] == 1000.0f);
    for (int i = 0; i < 28; ++i) CHECK(s.timesteps()[i] == s.sigmas()[i] * 1000.0f);
    // shift 1 is a plain linear schedule from 1 to 0.001
    const sd3::flow_match_euler lin(4, 1.0);
    CHECK(lin.sigmas()[1] == doctest::Approx(1.0 - 0.999 / 3).epsilon(1e-6));
    CHECK(lin.sigmas()[3] == doctest::Approx(0.001).epsilon(1e-6));
    const sd3::flow_match_euler one(1, 3.0);
    CHECK(one.sigmas() == std::vector<float>{1.0f, 0.0f});

    std::vector<float> x = {1.0f, 2.0f}, v = {0.5f, -1.0f};
    lin.step(0, v, x);
    const float dt = lin.sigmas()[1] - lin.sigmas()[0];
    CHECK(x[0] == 1.0f + dt * 0.5f);
    CHECK(x[1] == 2.0f - dt);

    CHECK_THROWS_WITH_AS(sd3::flow_match_euler(0), doctest::Contains("steps = 0"), std::invalid_argument);
    CHECK_THROWS_WITH_AS(sd3::flow_match_euler(4, -1.0), doctest::Contains("shift"), std::invalid_argument);
    CHECK_THROWS_WITH_AS(lin.step(4, v, x), doctest::Contains("i = 4"), std::invalid_argument);
    CHECK_THROWS_WITH_AS(lin.step(0, std::vector<float>(3), x), doctest::Contains("velocity has 3"), std::invalid_argument);
}

TEST_CASE("flow_match_euler::flux: FLUX's schedule by hand, and argument checks") {
    // mu: linear through (256, 0.5) and (4096, 1.15); 1024 tokens (a 1024x1024 FLUX.1 image is 4096) -> 0.63.
    CHECK(sd3::flux_mu(256) == doctest::Approx(0.5));
    CHECK(sd3::flux_mu(4096) == doctest::Approx(1.15));
    CHECK(sd3::flux_mu(1024) == doctest::Approx(0.5 + 768 * 0.65 / 3840));
    CHECK(sd3::flux_mu(100, 0, 100, 1.0, 2.0) == doctest::Approx(2.0));
    // mu = 0 leaves sigmas = linspace(1, 1/n, n): 1, 0.75, 0.5, 0.25, then 0; timesteps = sigma * 1000.
    const auto plain = sd3::flow_match_euler::flux(4, 0.0);
    CHECK(plain.sigmas() == std::vector<float>{1.0f, 0.75f, 0.5f, 0.25f, 0.0f});
    CHECK(plain.timesteps() == std::vector<float>{1000.0f, 750.0f, 500.0f, 250.0f});
    // mu = ln 3: sigma -> 3 / (3 + 1/sigma - 1); 0.5 -> 0.75, 0.25 -> 0.5.
    const auto shifted = sd3::flow_match_euler::flux(4, std::log(3.0));
    CHECK(shifted.sigmas()[2] == doctest::Approx(0.75).epsilon(1e-7));
    CHECK(shifted.sigmas()[3] == doctest::Approx(0.5).epsilon(1e-7));
    CHECK(sd3::flow_match_euler::flux(1, 0.7).sigmas() == std::vector<float>{1.0f, 0.0f});

    CHECK_THROWS_WITH_AS(sd3::flow_match_euler::flux(0, 0.5), doctest::Contains("steps = 0"), std::invalid_argument);
    CHECK_THROWS_WITH_AS(sd3::flow_match_euler::flux(4, std::nan("")), doctest::Contains("mu = nan"), std::invalid_argument);
    CHECK_THROWS_WITH_AS(sd3::flow_match_euler::flux(4, 1e6), doctest::Contains("mu = 1e+06 gives sigma"), std::invalid_argument);
    CHECK_THROWS_WITH_AS(sd3::flux_mu(0), doctest::Contains("image_seq_len = 0"), std::invalid_argument);
    CHECK_THROWS_WITH_AS(sd3::flux_mu(10, 256, 256), doctest::Contains("max_seq_len = 256"), std::invalid_argument);
}

TEST_CASE("sample_cfg: guidance arithmetic and the model-call hook") {
    const test_util::random_problem p(test_util::fresh_seed());
    sd3::transformer net(p.model, p.limits(), 2);
    const sd3::flow_match_euler sched(5, 3.0);
    std::mt19937 rng(11);
    std::normal_distribution<float> normal;
    std::vector<float> neg_ctx(p.context.size()), neg_pooled(p.pooled.size());
    for (auto* vv : {&neg_ctx, &neg_pooled})
        for (auto& x : *vv) x = normal(rng);
    const sd3::cfg_inputs in{p.batch, p.height, p.width, p.context_tokens, p.latents, p.context, neg_ctx, p.pooled, neg_pooled};
    const std::size_t half = p.latents.size();

    SUBCASE("a model hook calling the transformer reproduces the default loop") {
        const auto plain = sd3::sample_cfg(net, sched, in, 4.0f);
        int calls = 0;
        const auto hooked = sd3::sample_cfg(net, sched, in, 4.0f, [&](const sd3::model_call& call) {
            CHECK(call.step == calls++);
            CHECK(call.inputs->batch == 2 * p.batch);
            CHECK(call.timestep == sched.timesteps()[call.step]);
            CHECK(call.sigma_next == sched.sigmas()[call.step + 1]);
            // [uncond; cond]: the second half carries the prompt
            CHECK(std::equal(p.context.begin(), p.context.end(), call.inputs->context.begin() + p.context.size()));
            CHECK(std::equal(neg_ctx.begin(), neg_ctx.end(), call.inputs->context.begin()));
            net.forward(*call.inputs, call.velocity);
        });
        CHECK(calls == 5);
        CHECK(plain == hooked);
    }
    SUBCASE("constant velocities: x_T = noise - (v_u + g (v_c - v_u))") {
        const float vu = 0.25f, vc = -0.5f, g = 3.0f;
        const auto out = sd3::sample_cfg(net, sched, in, g, [&](const sd3::model_call& call) {
            std::fill(call.velocity.begin(), call.velocity.begin() + half, vu);
            std::fill(call.velocity.begin() + half, call.velocity.end(), vc);
        });
        const float v = vu + g * (vc - vu);
        for (std::size_t i = 0; i < out.size(); ++i) CHECK(out[i] == doctest::Approx(p.latents[i] - v).epsilon(1e-5));
    }
    SUBCASE("guidance <= 1 runs the conditional batch alone") {
        int calls = 0;
        std::vector<float> seen;
        const auto out = sd3::sample_cfg(
            net, sched, in, 1.0f,
            [&](const sd3::model_call& call) {
                ++calls;
                CHECK(call.inputs->batch == p.batch);
                // v = x: each step multiplies by (1 + dt)
                std::copy(call.inputs->latents.begin(), call.inputs->latents.end(), call.velocity.begin());
            },
            [&](int, float sigma, std::span<const float>) { seen.push_back(sigma); });
        CHECK(calls == 5);
        CHECK(seen.back() == 0.0f);
        double factor = 1.0;
        for (int i = 0; i < 5; ++i) factor *= 1.0 + (double(sched.sigmas()[i + 1]) - sched.sigmas()[i]);
        for (std::size_t i = 0; i < out.size(); ++i) CHECK(out[i] == doctest::Approx(p.latents[i] * factor).epsilon(1e-5));
    }
    SUBCASE("argument checks") {
        sd3::transformer small(p.model, {.max_batch = 2, .max_height = 8, .max_width = 12, .max_context_tokens = 8}, 1);
        CHECK_THROWS_WITH_AS(sd3::sample_cfg(small, sched, in, 4.0f), doctest::Contains("model batch 4"), std::invalid_argument);
        auto bad = in;
        bad.negative_pooled = {};
        CHECK_THROWS_WITH_AS(sd3::sample_cfg(net, sched, bad, 4.0f), doctest::Contains("negative_pooled"), std::invalid_argument);
        bad = in;
        bad.noise = bad.noise.first(4);
        CHECK_THROWS_WITH_AS(sd3::sample_cfg(net, sched, bad, 4.0f), doctest::Contains("noise holds 4"), std::invalid_argument);
    }
}

TEST_CASE("batching does not change a sample's velocity, bit for bit (the documented contract)") {
    // docs/engine.md, "Reproducibility": every GEMM row and every attention query is computed by the same
    // chain of operations whatever else is in the call (sd3/gemm.hpp), so a sample's result does not depend on
    // the batch it is computed in.
    const auto seed = test_util::fresh_seed();
    const test_util::random_problem p(seed);
    const auto& c = p.model.config;
    sd3::transformer net(p.model, p.limits(), 2);
    std::vector<float> batched(p.velocity_size());
    net.forward(p.inputs(), batched);
    const std::size_t latent = static_cast<std::size_t>(c.in_channels) * p.height * p.width;
    const std::size_t ctx = static_cast<std::size_t>(p.context_tokens) * c.joint_attention_dim;
    const std::size_t out = static_cast<std::size_t>(c.out_channels) * p.height * p.width;
    for (int b = 0; b < p.batch; ++b) {
        const auto at = static_cast<std::size_t>(b);
        const sd3::forward_inputs one{.batch = 1, .height = p.height, .width = p.width, .context_tokens = p.context_tokens, .latents = std::span<const float>(p.latents).subspan(at * latent, latent), .timesteps = std::span<const float>(p.timesteps).subspan(at, 1), .context = std::span<const float>(p.context).subspan(at * ctx, ctx), .pooled = std::span<const float>(p.pooled).subspan(at * c.pooled_projection_dim, c.pooled_projection_dim)};
        std::vector<float> alone(out);
        net.forward(one, alone);
        const std::span<const float> in_batch(batched.data() + at * out, out);
        CHECK(std::equal(alone.begin(), alone.end(), in_batch.begin()));
    }
}
