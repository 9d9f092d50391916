// Parity with diffusers 0.31 (fixtures from tools/make_parity_fixtures.py): the transformer at two timestep
// pairs for two tiny random models, the scheduler tables, and a full 8-step CFG sampling run.
#include <doctest/doctest.h>

#include <string>
#include <vector>

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
};

void check_transformer(const std::string& variant, int threads) {
    CAPTURE(variant);
    CAPTURE(threads);
    const fixture fx(variant);
    const auto latents = fx.get("latents"), context = fx.get("context"), pooled = fx.get("pooled");
    sd3::transformer net(fx.model, {.max_batch = 2, .max_height = 6, .max_width = 10, .max_context_tokens = 8}, threads);
    for (const char* t : {"0", "1"}) {
        const auto timesteps = fx.get((std::string("t") + t).c_str());
        const auto expected = fx.get((std::string("out_t") + t).c_str());
        const sd3::forward_inputs in{fx.dim("latents", 0), fx.dim("latents", 2), fx.dim("latents", 3), fx.dim("context", 1),
                                     latents, timesteps, context, pooled};
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
TEST_CASE("diffusers_parity: transformer multithreaded") {
    check_transformer("rms", 3);
    check_transformer("plain", 2);
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
