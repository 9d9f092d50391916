// After a warm-up call, a forward pass (plain, hooked, token-subset, with probe) allocates nothing: every heap
// request in this process is counted while the calls run.
//
// The counting operators form consistent pairs, so memory checkers (valgrind, ASan) see matched calls: every
// operator new variant takes its block from the C allocator, every operator delete variant returns it with
// free(), and none is inlined. Without AddressSanitizer the C allocator itself is interposed too (catching Eigen's and the OpenMP
// runtime's requests), and operator new draws from glibc's own entry points so each request counts once;
// under ASan, which owns malloc, operator new is what is counted.
#include <doctest/doctest.h>

#include <atomic>
#include <cstdlib>
#include <new>
#include <numeric>
#include <vector>

#include "engine_fixture.hpp"
#include "sd3/flux_model.hpp"
#include "sd3/transformer.hpp"

namespace {
std::atomic<bool> counting{false};
std::atomic<long> allocations{0};
void note() {
    if (counting.load(std::memory_order_relaxed)) allocations.fetch_add(1, std::memory_order_relaxed);
}
}  // namespace

// Never inlined: a memory checker that replaces the global operators (valgrind does, even in the executable)
// must see every call, or it pairs its own operator new with an inlined free() and reports a mismatch.
#define NOT_INLINED [[gnu::noinline]]

#if defined(__SANITIZE_ADDRESS__)
namespace {
void* c_alloc(std::size_t n) { return std::malloc(n); }
void* c_aligned_alloc(std::size_t a, std::size_t n) { return std::aligned_alloc(a, (n + a - 1) / a * a); }
}  // namespace
#else
extern "C" {
void* __libc_malloc(std::size_t);
void* __libc_calloc(std::size_t, std::size_t);
void* __libc_realloc(void*, std::size_t);
void* __libc_memalign(std::size_t, std::size_t);
void* malloc(std::size_t n) { note(); return __libc_malloc(n); }
void* calloc(std::size_t n, std::size_t s) { note(); return __libc_calloc(n, s); }
void* realloc(void* p, std::size_t n) { note(); return __libc_realloc(p, n); }
void* memalign(std::size_t a, std::size_t n) { note(); return __libc_memalign(a, n); }
void* aligned_alloc(std::size_t a, std::size_t n) { note(); return __libc_memalign(a, n); }
int posix_memalign(void** out, std::size_t a, std::size_t n) {
    note();
    *out = __libc_memalign(a, n);
    return *out ? 0 : 12;  // ENOMEM
}
}
namespace {
void* c_alloc(std::size_t n) { return __libc_malloc(n); }
void* c_aligned_alloc(std::size_t a, std::size_t n) { return __libc_memalign(a, n); }
}  // namespace
#endif

NOT_INLINED void* operator new(std::size_t n) {
    note();
    if (void* p = c_alloc(n ? n : 1)) return p;
    throw std::bad_alloc();
}
NOT_INLINED void* operator new[](std::size_t n) { return operator new(n); }
NOT_INLINED void* operator new(std::size_t n, const std::nothrow_t&) noexcept {
    note();
    return c_alloc(n ? n : 1);
}
NOT_INLINED void* operator new[](std::size_t n, const std::nothrow_t& t) noexcept { return operator new(n, t); }
NOT_INLINED void* operator new(std::size_t n, std::align_val_t a) {
    note();
    if (void* p = c_aligned_alloc(static_cast<std::size_t>(a), n ? n : 1)) return p;
    throw std::bad_alloc();
}
NOT_INLINED void* operator new[](std::size_t n, std::align_val_t a) { return operator new(n, a); }
NOT_INLINED void* operator new(std::size_t n, std::align_val_t a, const std::nothrow_t&) noexcept {
    note();
    return c_aligned_alloc(static_cast<std::size_t>(a), n ? n : 1);
}
NOT_INLINED void* operator new[](std::size_t n, std::align_val_t a, const std::nothrow_t& t) noexcept { return operator new(n, a, t); }
NOT_INLINED void operator delete(void* p) noexcept { std::free(p); }
NOT_INLINED void operator delete[](void* p) noexcept { std::free(p); }
NOT_INLINED void operator delete(void* p, std::size_t) noexcept { std::free(p); }
NOT_INLINED void operator delete[](void* p, std::size_t) noexcept { std::free(p); }
NOT_INLINED void operator delete(void* p, const std::nothrow_t&) noexcept { std::free(p); }
NOT_INLINED void operator delete[](void* p, const std::nothrow_t&) noexcept { std::free(p); }
NOT_INLINED void operator delete(void* p, std::align_val_t) noexcept { std::free(p); }
NOT_INLINED void operator delete[](void* p, std::align_val_t) noexcept { std::free(p); }
NOT_INLINED void operator delete(void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }
NOT_INLINED void operator delete[](void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }
NOT_INLINED void operator delete(void* p, std::align_val_t, const std::nothrow_t&) noexcept { std::free(p); }
NOT_INLINED void operator delete[](void* p, std::align_val_t, const std::nothrow_t&) noexcept { std::free(p); }

TEST_CASE("forward passes allocate nothing after warm-up") {
    const test_util::random_problem p(3);
    const auto& c = p.model.config;
    sd3::transformer net(p.model, p.limits(), 2);
    sd3::kv_cache kv(c, p.batch, p.tokens());
    std::vector<float> v(p.velocity_size()), probe(p.batch * p.tokens());
    const int n = p.tokens() / 2;
    std::vector<std::int32_t> tokens(p.batch * n);
    for (int b = 0; b < p.batch; ++b)
        for (int i = 0; i < n; ++i) tokens[b * n + i] = 2 * i;
    std::vector<float> rows(p.batch * n * c.patch_features());
    std::vector<float> site(p.batch * p.tokens() * p.hidden());
    // MLP subset: the first n/2 active tokens of each sample (ids 0, 2, 4, ...).
    std::vector<std::int32_t> mlp_tokens(p.batch * (n / 2));
    for (int b = 0; b < p.batch; ++b)
        for (int i = 0; i < n / 2; ++i) mlp_tokens[b * (n / 2) + i] = 2 * i;
    std::vector<sd3::block_hooks> hooks(c.num_layers);
    for (auto& h : hooks) {
        h.mlp[0] = {sd3::module_mode::subset, site.data(), mlp_tokens};
        h.attention[0].rows = site.data();
    }

    sd3::forward_options full_opts;
    full_opts.kv = &kv;
    full_opts.attention_probe = probe;
    full_opts.probe_context_queries = true;
    sd3::forward_options subset_opts;
    subset_opts.image_tokens = tokens;
    subset_opts.kv = &kv;
    subset_opts.attention_probe = probe;
    subset_opts.blocks = hooks;

    auto run_all = [&] {
        net.forward(p.inputs(), v);
        net.forward(p.inputs(), v, full_opts);
        net.forward(p.inputs(), rows, subset_opts);
    };
    run_all();  // warm-up: the OpenMP pool starts, lazily sized runtime state settles
    allocations = 0;
    counting = true;
    run_all();
    run_all();
    counting = false;
    CHECK(allocations.load() == 0);
}

TEST_CASE("no allocation at benchmark-sized GEMMs either (full tiles, hidden 384, FF width 1536)") {
    // One block of the bench config: every GEMM shape of the real model, so Eigen's packing buffers are at
    // their largest and must still fit the stack allocation limit.
    sd3::transformer_config c = test_util::small_config(false);
    c.num_layers = 1;
    c.num_attention_heads = 6;
    c.attention_head_dim = 64;
    c.caption_projection_dim = 384;
    c.joint_attention_dim = 256;
    c.pooled_projection_dim = 64;
    c.pos_embed_max_size = 32;
    const auto model = sd3::model::random(c, 5);
    const int side = 64, L = 16;
    sd3::transformer net(model, {.max_batch = 1, .max_height = side, .max_width = side, .max_context_tokens = L}, 2);
    std::vector<float> latents(4 * side * side, 0.5f), ctx(L * 256, 0.1f), pooled(64, 0.2f), t = {500.0f}, v(latents.size());
    const sd3::forward_inputs in{.batch = 1, .height = side, .width = side, .context_tokens = L, .latents = latents, .timesteps = t, .context = ctx, .pooled = pooled};
    net.forward(in, v);
    allocations = 0;
    counting = true;
    net.forward(in, v);
    counting = false;
    CHECK(allocations.load() == 0);
}

TEST_CASE("flux: full and token-subset forwards with hooks and the probe allocate nothing after warm-up") {
    const auto model = sd3::flux_model::random(test_util::small_flux_config(), 9);
    const int rows = 4, cols = 6, N = rows * cols, L = 3, D = 32;
    sd3::transformer net(model, {.max_batch = 2, .max_height = rows, .max_width = cols, .max_context_tokens = L}, 2);
    net.set_min_chunk_work(0);  // every loop on the team
    std::vector<float> latents(2 * N * 8, 0.3f), ctx(2 * L * 12, 0.1f), pooled(2 * 10, 0.2f), t = {500.0f, 300.0f},
        guidance = {3.5f, 2.0f}, v(latents.size()), probe(2 * N);
    const sd3::forward_inputs in{.batch = 2, .height = rows, .width = cols, .context_tokens = L, .latents = latents,
                                 .timesteps = t, .context = ctx, .pooled = pooled, .guidance = guidance};
    sd3::kv_cache kv(net, 2, N);
    std::vector<std::vector<float>> sites(3 * 4);
    std::vector<sd3::block_hooks> hooks(3);
    for (int l = 0; l < 3; ++l)
        for (int s = 0; s < 2; ++s) {
            sites[l * 4 + s].assign(2 * (s ? L : N) * D, 0.0f);
            sites[l * 4 + 2 + s].assign(2 * (s ? L : N) * D, 0.0f);
            hooks[l].attention[s].rows = sites[l * 4 + s].data();
            hooks[l].mlp[s].rows = sites[l * 4 + 2 + s].data();
        }
    std::vector<std::int32_t> subset;
    for (int b = 0; b < 2; ++b)
        for (int i = 0; i < N; i += 3) subset.push_back(i);
    std::vector<float> rows_out(subset.size() * 8);
    sd3::forward_options full, partial;
    full.kv = partial.kv = &kv;
    full.attention_probe = partial.attention_probe = probe;
    full.blocks = hooks;
    partial.image_tokens = subset;
    net.forward(in, v, full);
    net.forward(in, rows_out, partial);
    allocations = 0;
    counting = true;
    net.forward(in, v, full);
    net.forward(in, rows_out, partial);
    counting = false;
    CHECK(allocations.load() == 0);
}
