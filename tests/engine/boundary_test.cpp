// The block-boundary callback (forward_options::between_blocks) that step-level caches (First-Block cache,
// DBCache, TeaCache) drive: going on changes nothing, jumping over blocks with their recorded output state
// gives the full forward's bits, the modulation span holds the AdaLN-Zero chunks the block then uses, and a
// return value out of range is refused.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "engine_fixture.hpp"
#include "sd3/transformer.hpp"

namespace {

using test_util::random_problem;

// What a callback saw at each boundary.
struct snapshot {
    int next_layer = 0;
    std::vector<float> image, context, modulation;
};

}  // namespace

TEST_CASE("between_blocks: going on is the plain forward, boundaries come in order with the documented shapes") {
    const std::uint32_t seed = std::random_device{}();
    INFO("seed ", seed);
    random_problem p(seed);
    sd3::transformer net(p.model, p.limits());
    const int layers = p.model.config.num_layers, D = p.hidden();
    std::vector<float> plain(p.velocity_size()), hooked(p.velocity_size());
    net.forward(p.inputs(), plain);

    std::vector<snapshot> seen;
    sd3::forward_options o;
    o.between_blocks = [&](const sd3::block_boundary& b) {
        seen.push_back({b.next_layer, {b.image.begin(), b.image.end()}, {b.context.begin(), b.context.end()},
                        {b.modulation.begin(), b.modulation.end()}});
        return b.next_layer;
    };
    net.forward(p.inputs(), hooked, o);
    CHECK(hooked == plain);
    REQUIRE(seen.size() == static_cast<std::size_t>(layers + 1));
    for (int l = 0; l <= layers; ++l) {
        const auto& s = seen[static_cast<std::size_t>(l)];
        CHECK(s.next_layer == l);
        CHECK(s.image.size() == static_cast<std::size_t>(p.batch) * p.tokens() * D);
        CHECK(s.context.size() == static_cast<std::size_t>(p.batch) * p.context_tokens * D);
        CHECK(s.modulation.size() == (l < layers ? static_cast<std::size_t>(p.batch) * 6 * D : 0u));
    }
    // each block moves the image stream
    CHECK(seen[0].image != seen[1].image);
}

TEST_CASE("between_blocks: jumping over blocks with their recorded output gives the full forward's bits") {
    const std::uint32_t seed = std::random_device{}();
    INFO("seed ", seed);
    random_problem p(seed);
    sd3::transformer net(p.model, p.limits());
    const int layers = p.model.config.num_layers;
    REQUIRE(layers == 3);
    std::vector<float> full(p.velocity_size());
    std::vector<snapshot> seen;
    sd3::forward_options record;
    record.between_blocks = [&](const sd3::block_boundary& b) {
        seen.push_back({b.next_layer, {b.image.begin(), b.image.end()}, {b.context.begin(), b.context.end()}, {}});
        return b.next_layer;
    };
    net.forward(p.inputs(), full, record);
    REQUIRE(seen.size() == 4u);

    // Middle skip (DBCache with F1 B1): at boundary 1 write the state block 1 would produce, go to block 2.
    std::vector<float> out(p.velocity_size());
    sd3::forward_options middle;
    int calls = 0;
    middle.between_blocks = [&](const sd3::block_boundary& b) {
        ++calls;
        if (b.next_layer != 1) return b.next_layer;
        std::copy(seen[2].image.begin(), seen[2].image.end(), b.image.begin());
        std::copy(seen[2].context.begin(), seen[2].context.end(), b.context.begin());
        return 2;
    };
    net.forward(p.inputs(), out, middle);
    CHECK(out == full);
    CHECK(calls == 4);  // boundaries 0, 1, then 2 (where the jump lands, announced again) and the final layer's

    // Whole skip (TeaCache): at boundary 0 write the last block's output, go straight to the final layer.
    std::vector<int> boundaries;
    sd3::forward_options whole;
    whole.between_blocks = [&](const sd3::block_boundary& b) {
        boundaries.push_back(b.next_layer);
        if (b.next_layer != 0) return b.next_layer;
        std::copy(seen[3].image.begin(), seen[3].image.end(), b.image.begin());
        return layers;
    };
    std::fill(out.begin(), out.end(), 0.f);
    net.forward(p.inputs(), out, whole);
    CHECK(out == full);
    CHECK(boundaries == std::vector<int>{0, layers});

    // Without the jump the overwritten state would run through the blocks again: a different result.
    sd3::forward_options no_jump;
    no_jump.between_blocks = [&](const sd3::block_boundary& b) {
        if (b.next_layer == 0) std::copy(seen[3].image.begin(), seen[3].image.end(), b.image.begin());
        return b.next_layer;
    };
    net.forward(p.inputs(), out, no_jump);
    CHECK(out != full);
}

TEST_CASE("between_blocks: the modulation span holds the gates the block applies") {
    // A block adds gate_msa * attention + gate_mlp * MLP to the image stream (the module outputs read back before
    // the gate): the gates at offsets 2D and 5D of the boundary's modulation must reproduce that update.
    const std::uint32_t seed = std::random_device{}();
    INFO("seed ", seed);
    random_problem p(seed);
    sd3::transformer net(p.model, p.limits());
    const int layers = p.model.config.num_layers, D = p.hidden(), N = p.tokens();
    const std::size_t rows = static_cast<std::size_t>(p.batch) * N * D;
    std::vector<std::vector<float>> attention(static_cast<std::size_t>(layers), std::vector<float>(rows)),
        mlp(static_cast<std::size_t>(layers), std::vector<float>(rows));
    std::vector<sd3::block_hooks> hooks(static_cast<std::size_t>(layers));
    for (int l = 0; l < layers; ++l) {
        hooks[static_cast<std::size_t>(l)].attention[0].rows = attention[static_cast<std::size_t>(l)].data();
        hooks[static_cast<std::size_t>(l)].mlp[0].rows = mlp[static_cast<std::size_t>(l)].data();
    }
    std::vector<snapshot> seen;
    sd3::forward_options o;
    o.blocks = hooks;
    o.between_blocks = [&](const sd3::block_boundary& b) {
        seen.push_back({b.next_layer, {b.image.begin(), b.image.end()}, {}, {b.modulation.begin(), b.modulation.end()}});
        return b.next_layer;
    };
    std::vector<float> velocity(p.velocity_size());
    net.forward(p.inputs(), velocity, o);
    for (int l = 0; l < layers; ++l) {
        const auto& before = seen[static_cast<std::size_t>(l)];
        const auto& after = seen[static_cast<std::size_t>(l + 1)];
        double worst = 0;
        for (int b = 0; b < p.batch; ++b)
            for (int t = 0; t < N; ++t)
                for (int i = 0; i < D; ++i) {
                    const std::size_t r = (static_cast<std::size_t>(b) * N + t) * D + static_cast<std::size_t>(i);
                    const float* mod = before.modulation.data() + static_cast<std::size_t>(b) * 6 * D;
                    const float expect = before.image[r] + mod[2 * D + i] * attention[static_cast<std::size_t>(l)][r] +
                                         mod[5 * D + i] * mlp[static_cast<std::size_t>(l)][r];
                    worst = std::max(worst, static_cast<double>(std::fabs(expect - after.image[r])) / (1.0 + std::fabs(expect)));
                }
        INFO("layer ", l);
        CHECK(worst < 1e-5);
    }
}

TEST_CASE("between_blocks: a return value out of range is refused by name") {
    random_problem p(7);
    sd3::transformer net(p.model, p.limits());
    const int layers = p.model.config.num_layers;
    std::vector<float> velocity(p.velocity_size());
    auto expect_refused = [&](auto callback, const std::string& fragment) {
        sd3::forward_options o;
        o.between_blocks = callback;
        try {
            net.forward(p.inputs(), velocity, o);
            FAIL("expected std::logic_error");
        } catch (const std::logic_error& e) {
            const std::string msg = e.what();
            INFO(msg);
            CHECK(msg.find("between_blocks") != std::string::npos);
            CHECK(msg.find(fragment) != std::string::npos);
        }
    };
    expect_refused([](const sd3::block_boundary& b) { return b.next_layer == 1 ? 0 : b.next_layer; }, "returned 0 at next_layer 1");
    expect_refused([&](const sd3::block_boundary& b) { return b.next_layer == 0 ? layers + 1 : b.next_layer; },
                   "returned " + std::to_string(layers + 1) + " at next_layer 0");
    expect_refused([&](const sd3::block_boundary& b) { return b.next_layer == layers ? 0 : b.next_layer; },
                   "expected a block in [" + std::to_string(layers) + ", " + std::to_string(layers) + "]");
    // the engine is still usable afterwards
    std::vector<float> plain(p.velocity_size()), again(p.velocity_size());
    net.forward(p.inputs(), plain);
    sd3::forward_options o;
    o.between_blocks = [](const sd3::block_boundary& b) { return b.next_layer; };
    net.forward(p.inputs(), again, o);
    CHECK(again == plain);
}
