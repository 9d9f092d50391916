// gpu/engine_fa2: the FlashAttention-2-class kernel (examples/engine_cuda/src/attention_fa2.cuh) against an fp64
// host twin of the same bf16 inputs and against the reference kernel (attention.cuh) and the library's LSE column
// sums on the same inputs (attention_check.cu), at ragged sizes (query and key counts not multiples of the 64-row
// tiles), with and without the split over keys and its LSE merge, head sizes 64 and 128; then the engine's bf16
// forward through it against the same forward through the reference kernels.
#include <doctest/doctest.h>

#include <cmath>
#include <random>
#include <vector>

#include <cuda_runtime_api.h>

#include "../../examples/engine_cuda/src/attention_check.hpp"
#include "../common/testing.hpp"
#include "../engine/engine_fixture.hpp"
#include "sd3/cuda/transformer.hpp"
#include "sd3/model.hpp"
#include "sd3/transformer.hpp"

namespace {

double rel_l2(const std::vector<float>& got, const std::vector<float>& want) {
    REQUIRE(got.size() == want.size());
    double diff = 0, norm = 0;
    for (std::size_t i = 0; i < got.size(); ++i) {
        diff += (static_cast<double>(got[i]) - want[i]) * (static_cast<double>(got[i]) - want[i]);
        norm += static_cast<double>(want[i]) * want[i];
    }
    return std::sqrt(diff / std::max(norm, 1e-300));
}

struct device_floats {
    float* p = nullptr;
    std::size_t n = 0;
    explicit device_floats(std::size_t count) : n(count) { REQUIRE(cudaMalloc(reinterpret_cast<void**>(&p), std::max<std::size_t>(n, 1) * sizeof(float)) == cudaSuccess); }
    explicit device_floats(const std::vector<float>& h) : device_floats(h.size()) {
        REQUIRE(cudaMemcpy(p, h.data(), n * sizeof(float), cudaMemcpyHostToDevice) == cudaSuccess);
    }
    device_floats(const device_floats&) = delete;
    device_floats& operator=(const device_floats&) = delete;
    ~device_floats() { cudaFree(p); }
    std::vector<float> download() const {
        std::vector<float> h(n);
        REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
        REQUIRE(cudaMemcpy(h.data(), p, n * sizeof(float), cudaMemcpyDeviceToHost) == cudaSuccess);
        return h;
    }
};

}  // namespace

TEST_SUITE("engine_fa2") {
    TEST_CASE("attention and probe match the fp64 twin of their bf16 inputs as closely as the reference kernels do, ragged sizes, split or not") {
        const std::uint64_t seed = testing::rng(20)();
        using case_t = sd3::gpu::detail::attention_case;
        const std::vector<case_t> cases = {
            {.batch = 2, .heads = 2, .head_dim = 64, .image_queries = 37, .context_queries = 5, .image_keys = 35, .context_keys = 5, .splits = 1},
            {.batch = 2, .heads = 3, .head_dim = 64, .image_queries = 130, .context_queries = 7, .image_keys = 200, .context_keys = 9, .splits = 1},
            {.batch = 2, .heads = 3, .head_dim = 64, .image_queries = 130, .context_queries = 7, .image_keys = 200, .context_keys = 9, .splits = 3},
            // the last block: no context queries; one query; more splits than a tile each would allow
            {.batch = 1, .heads = 2, .head_dim = 64, .image_queries = 1, .context_queries = 0, .image_keys = 300, .context_keys = 13, .splits = 4},
            {.batch = 2, .heads = 2, .head_dim = 64, .image_queries = 65, .context_queries = 3, .image_keys = 63, .context_keys = 2, .splits = 8},
            // sharp softmax (logits x 4): the online maximum moves between tiles
            {.batch = 1, .heads = 2, .head_dim = 64, .image_queries = 70, .context_queries = 6, .image_keys = 190, .context_keys = 4, .splits = 2,
             .logit_scale = 4.f},
            {.batch = 2, .heads = 2, .head_dim = 128, .image_queries = 70, .context_queries = 3, .image_keys = 129, .context_keys = 4, .splits = 1},
            {.batch = 2, .heads = 2, .head_dim = 128, .image_queries = 70, .context_queries = 3, .image_keys = 129, .context_keys = 4, .splits = 2},
        };
        for (std::size_t k = 0; k < cases.size(); ++k) {
            case_t c = cases[k];
            c.seed = seed + k;
            INFO("case ", k, " seed ", testing::fresh_seed());
            const auto e = sd3::gpu::detail::compare_attention(c);
            INFO(e.describe());
            // Outputs are bf16 and both kernels round P to bf16 before P·V: the new one may differ from the twin by
            // those roundings, as the reference does (bound: twice the reference's error plus 2^-9 of the largest
            // output), and never by more than 5e-2 of the largest output (a wrong tile or mask is O(1)).
            CHECK(e.fa2_out <= 2 * e.reference_out + 1.0 / 512);
            CHECK(e.fa2_out <= 5e-2);
            // The LSE is fp32 throughout: about 2^-24 x (head_dim terms) of |logits| + log(keys).
            CHECK(e.fa2_lse <= 1e-3);
            CHECK(e.reference_lse <= 1e-3);
            // The probe from exact bf16 inputs: fp32 logits and exponentials against the fp64 twin.
            CHECK(e.fa2_probe <= 1e-3);
            CHECK(e.library_probe <= 1e-3);
        }
    }

    TEST_CASE("the engine's bf16 forward through the fa2 path equals the reference path to bf16 rounding, probe and partial forward included") {
        auto rng = testing::rng(21);
        auto config = test_util::small_config(true);
        config.attention_head_dim = 64;
        config.caption_projection_dim = config.num_attention_heads * 64;
        const auto model = sd3::model::random(config, rng());
        const int B = 2, gh = 7, gw = 5, L = 5, N = gh * gw;
        const sd3::gpu::transformer net(model, sd3::gpu::precision::bf16, {.max_batch = B, .max_image_tokens = N, .max_context_tokens = L});
        sd3::gpu::workspace ws(net);
        sd3::gpu::kv_cache kv_fast(net, B, N), kv_ref(net, B, N);
        std::normal_distribution<float> normal;
        std::vector<float> rows(static_cast<std::size_t>(B) * N * net.patch_inputs()), ctx(static_cast<std::size_t>(B) * L * config.joint_attention_dim),
            pooled(static_cast<std::size_t>(B) * config.pooled_projection_dim);
        for (auto* v : {&rows, &ctx, &pooled})
            for (auto& x : *v) x = normal(rng);
        const device_floats d_rows(rows), d_ctx(ctx), d_pooled(pooled);
        const sd3::gpu::forward_inputs in{.batch = B, .grid_height = gh, .grid_width = gw, .context_tokens = L, .latent_rows = d_rows.p,
                                          .latent_batch = 0, .timestep = 500.f, .context = d_ctx.p, .pooled = d_pooled.p};
        const std::size_t out_size = static_cast<std::size_t>(B) * N * net.patch_features();
        device_floats fast(out_size), ref(out_size), probe_fast(static_cast<std::size_t>(B) * N), probe_ref(probe_fast.n);
        net.forward(in, fast.p, {.kv = &kv_fast, .attention_probe = probe_fast.p}, ws, nullptr);
        net.forward(in, ref.p, {.kv = &kv_ref, .attention_probe = probe_ref.p, .reference_attention = true}, ws, nullptr);
        INFO("seed ", testing::fresh_seed());
        const double out_err = rel_l2(fast.download(), ref.download()), probe_err = rel_l2(probe_fast.download(), probe_ref.download());
        INFO("full forward: velocity ", out_err, ", probe ", probe_err);
        // Each path is held within 2e-2 (probe: 5.7e-2) of the CPU engine by engine_parity / engine_partial, so by the
        // triangle inequality the two are within twice that of each other; a broken kernel is O(1) away.
        CHECK(out_err <= 4e-2);
        CHECK(probe_err <= 0.114);
        // A token-subset forward (every third token) against the caches both full forwards filled.
        std::vector<std::int32_t> ids;
        for (int b = 0; b < B; ++b)
            for (int t = 0; t < N; t += 3) ids.push_back(t);
        const int n = static_cast<int>(ids.size()) / B;
        std::int32_t* d_ids = nullptr;
        REQUIRE(cudaMalloc(reinterpret_cast<void**>(&d_ids), ids.size() * sizeof(std::int32_t)) == cudaSuccess);
        REQUIRE(cudaMemcpy(d_ids, ids.data(), ids.size() * sizeof(std::int32_t), cudaMemcpyHostToDevice) == cudaSuccess);
        device_floats sub_fast(static_cast<std::size_t>(B) * n * net.patch_features()), sub_ref(sub_fast.n);
        net.forward(in, sub_fast.p, {.image_tokens = d_ids, .tokens_per_sample = n, .kv = &kv_fast, .attention_probe = probe_fast.p}, ws, nullptr);
        net.forward(in, sub_ref.p, {.image_tokens = d_ids, .tokens_per_sample = n, .kv = &kv_ref, .attention_probe = probe_ref.p, .reference_attention = true}, ws,
                    nullptr);
        const double sub_err = rel_l2(sub_fast.download(), sub_ref.download()), sub_probe = rel_l2(probe_fast.download(), probe_ref.download());
        INFO("partial forward: C1 rows ", sub_err, ", probe ", sub_probe);
        CHECK(sub_err <= 4e-2);
        CHECK(sub_probe <= 0.114);
        CHECK(ws.read_status(nullptr) == 0u);
        cudaFree(d_ids);
    }
}
