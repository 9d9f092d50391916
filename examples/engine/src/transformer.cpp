// The SD3 MMDiT forward. One implementation per stage (embedding, modulation, norm+modulate, linear, qk-norm,
// joint attention, gated residual, feed-forward, final layer); the plain forward is the hooked forward with
// default options. Linear layers run on sd3::gemm (weights packed once, in the constructor; row tiles are the
// parallel work units), attention on the same micro-kernel with an online softmax over key blocks; Eigen does
// the element-wise work. All scratch is sized in the constructor, so a forward does not allocate.
#include "sd3/transformer.hpp"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>
#include <unordered_map>

#include <Eigen/Core>

#include "sd3/errors.hpp"
#include "sd3/gemm.hpp"
#include "sd3/model.hpp"
#include "sd3/resources.hpp"
#include "sd3/workers.hpp"

namespace sd3 {
namespace {

using const_vec = Eigen::Map<const Eigen::ArrayXf>;
using vec = Eigen::Map<Eigen::ArrayXf>;

constexpr float norm_eps = 1e-6f; // LayerNorm and RMSNorm eps in SD3
constexpr double norm_work = 8;   // a norm's passes over a row, in the work units of parallel_for

int ceil_div(int a, int b) { return (a + b - 1) / b; }
std::size_t round_up(std::size_t a, std::size_t b) { return (a + b - 1) / b * b; }

constexpr int key_block = gemm::k_block;  // keys per step of the attention's online softmax

// Attention queries per task: whole register panels, about 64 rows (56 with AVX-512), so that every key block
// packed for a task serves enough queries.
int query_chunk() { return 64 / gemm::register_tile().rows * gemm::register_tile().rows; }

// Floats of a head's row in the attention's output and packed values: the head rounded up to whole register
// panels.
std::size_t padded_head(int head_dim) { return round_up(static_cast<std::size_t>(head_dim), gemm::register_tile().cols); }

// One worker's attention scratch: its query chunk packed, one key block's scores (then probabilities), and each
// query's running output, maximum, sum and log-sum-exp. The scores, written with row stride key_block, are
// already in the packed layout of the GEMM's left operand (gemm::pack_rows), so P V reads them in place. All
// offsets are multiples of 16 floats (64 bytes).
struct attention_scratch {
    float *q, *s, *o, *max, *sum, *lse;
    int out_stride;  // floats per row of `o`: the head size rounded up to whole register tiles

    attention_scratch(float* base, int head_dim) {
        std::size_t at = 0;
        for (auto [field, floats] : layout(head_dim)) {
            this->*field = base + at;
            at += floats;
        }
        out_stride = static_cast<int>(padded_head(head_dim));
    }
    static std::size_t floats(int head_dim) {
        std::size_t total = 0;
        for (auto [field, f] : layout(head_dim)) total += f;
        return total;
    }

private:
    using member = float* attention_scratch::*;
    static std::array<std::pair<member, std::size_t>, 6> layout(int head_dim) {
        const std::size_t rows = query_chunk(), hdp = padded_head(head_dim);
        const std::size_t packed = gemm::packed_rows_floats(query_chunk());  // also rows x key_block: S is packed as it is made
        auto r = [](std::size_t f) { return round_up(f, 16); };
        return {{{&attention_scratch::q, r(packed)},
                 {&attention_scratch::s, r(packed)},
                 {&attention_scratch::o, r(rows * hdp)},
                 {&attention_scratch::max, r(rows)},
                 {&attention_scratch::sum, r(rows)},
                 {&attention_scratch::lse, r(rows)}}};
    }
};

using buffer = aligned_floats;  // 64-byte aligned (sd3/gemm.hpp)

// Up to chunks_per_worker chunks per worker (each still above min_chunk_work), so that a worker slowed by another
// process claims fewer of them, and the last chunk the others may have to wait for is short. 16 rather than 4:
// with one core busy, full RFlow at 2 threads against 1 went from 1.10x to 0.95x the time (docs/engine.md).
constexpr int chunks_per_worker = 16;

// Where a loop runs: the team, and the least work worth a chunk (transformer::set_min_chunk_work).
struct loop_split {
    workers& team;
    double min_chunk_work;
};

// Runs f(item, worker) for item in [0, n), in contiguous chunks on the team; `work` estimates the multiply-adds
// (or element touches) of all n items. Which worker runs an item does not matter for results: every item writes
// disjoint memory, and reductions happen afterwards in a fixed order.
template <class F>
void parallel_for(loop_split split, int n, double work, F&& f) {
    if (n <= 0) return;
    workers& team = split.team;
    const double by_work = split.min_chunk_work > 0 ? std::floor(work / split.min_chunk_work) : static_cast<double>(n);
    const int chunks = static_cast<int>(std::min({static_cast<double>(n), static_cast<double>(chunks_per_worker) * team.size(), by_work}));
    if (chunks <= 1) {
        for (int i = 0; i < n; ++i) f(i, 0);
        return;
    }
    team.run(chunks, [&](int chunk, int worker) {
        const int end = static_cast<int>(static_cast<std::int64_t>(n) * (chunk + 1) / chunks);
        for (int i = static_cast<int>(static_cast<std::int64_t>(n) * chunk / chunks); i < end; ++i) f(i, worker);
    });
}

struct no_epilogue {
    void operator()(float*, int) const {}
};

// GELU, tanh approximation, written as torch's kernel writes it.
struct gelu_tanh_epilogue {
    void operator()(float* row, int n) const {
        constexpr float beta = 0.7978845608028654f;  // sqrt(2/pi)
        constexpr float kappa = 0.044715f;
        vec x(row, n);
        x = 0.5f * x * (1.0f + (beta * (x + kappa * x * x * x)).tanh());
    }
};

// y = LayerNorm(x) * (1 + scale) + shift (no affine, eps 1e-6).
void norm_modulate(const float* x, float* y, int D, const float* shift, const float* scale) {
    const const_vec xv(x, D);
    const float mean = xv.sum() / static_cast<float>(D);
    const float var = (xv - mean).square().sum() / static_cast<float>(D);
    const float rstd = 1.0f / std::sqrt(var + norm_eps);
    vec(y, D) = ((xv - mean) * rstd) * (1.0f + const_vec(scale, D)) + const_vec(shift, D);
}

// Per-head RMSNorm with learned weight, in place on `heads` contiguous vectors of length hd.
void rms_norm_heads(float* x, int heads, int hd, const float* weight) {
    for (int h = 0; h < heads; ++h) {
        vec v(x + static_cast<std::ptrdiff_t>(h) * hd, hd);
        const float ms = v.square().sum() / static_cast<float>(hd);
        v = (v * (1.0f / std::sqrt(ms + norm_eps))) * const_vec(weight, hd);
    }
}

void silu_inplace(float* x, int n) {
    vec v(x, n);
    v = v / (1.0f + (-v).exp());
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------------

kv_cache::kv_cache(const transformer_config& config, int max_batch, int max_image_tokens)
    : layers_(config.num_layers), max_batch_(max_batch), max_tokens_(max_image_tokens), hidden_(config.hidden()),
      dual_(config.dual_attention_layers) {
    config.validate();
    if (max_batch < 1) throw std::invalid_argument(message("kv_cache: max_batch = ", max_batch, " must be >= 1"));
    if (max_image_tokens < 1)
        throw std::invalid_argument(message("kv_cache: max_image_tokens = ", max_image_tokens, " must be >= 1"));
    slot_of_.assign(static_cast<std::size_t>(layers_), -1);
    for (std::size_t i = 0; i < dual_.size(); ++i) slot_of_[static_cast<std::size_t>(dual_[i])] = layers_ + static_cast<int>(i);
    const std::size_t slots = static_cast<std::size_t>(layers_) + dual_.size();
    const std::size_t n = saturating_product(slots, max_batch_, max_tokens_, hidden_);
    require_memory(message("kv_cache: keys and values for ", layers_, " layers (", dual_.size(),
                           " with a second attention), max_batch ", max_batch, " and ", max_image_tokens, " image tokens"),
                   saturating_product(n, 2, sizeof(float)));
    k_.assign(n, 0.0f);
    v_.assign(n, 0.0f);
}

// ---------------------------------------------------------------------------------------------------------------

struct transformer::impl {
    const model* m;
    engine_limits limits;
    std::unique_ptr<workers> team;
    double min_chunk_work = default_min_chunk_work;
    loop_split split() const { return {*team, min_chunk_work}; }
    loop_split serial() const { return {*team, std::numeric_limits<double>::infinity()}; }  // one row per sample
    int D, F, P, hd, heads, max_tokens, max_ctx, max_tasks;

    // workspaces (sized once)
    buffer tproj, temb, silu_temb, small_hidden, mod_img, mod_ctx, mod_final;
    buffer x_img, x_ctx, nrm_img, nrm_ctx, qkv_img, qkv_ctx, att_img, att_ctx, out_img, out_ctx;
    buffer hidden, patches, out_rows, scratch, probe_parts, kv_packed;
    buffer nrm2_img;  // MMDiT-X: the image-only attention's modulated input (empty without dual-attention layers)
    std::size_t scratch_slot = 0;  // floats per worker in `scratch`, a multiple of 16 (64 bytes)
    std::span<float> scratch_of(int worker) { return {scratch.data() + worker * scratch_slot, scratch_slot}; }
    // Every linear layer's weight packed for the GEMM once (the right operand of all its products).
    std::unordered_map<const linear*, gemm::packed_weights> packed;
    std::vector<std::int32_t> positions;

    // per-call state
    int B = 0, Hg = 0, Wg = 0, N = 0, n = 0, L = 0;
    int mod_stride = 0;  // floats per sample of the current block's image modulation (6D, or 9D with dual attention)
    const std::int32_t* tokens = nullptr;  // active image tokens, [B * n] (nullptr = all)
    const forward_options* opts = nullptr;

    impl(const model& model_, const engine_limits& lim, int threads) : m(&model_), limits(lim) {
        const auto& c = m->config;
        c.validate();
        if (static_cast<int>(m->blocks.size()) != c.num_layers)
            throw std::invalid_argument(message("transformer: model has ", m->blocks.size(), " blocks but config.num_layers = ",
                                                c.num_layers));
        if (limits.max_height == 0) limits.max_height = c.sample_size;
        if (limits.max_width == 0) limits.max_width = c.sample_size;
        auto bad_limit = [](const auto&... what) { throw std::invalid_argument(message("engine_limits.", what...)); };
        if (limits.max_batch < 1) bad_limit("max_batch = ", limits.max_batch, " must be >= 1");
        if (limits.max_context_tokens < 1) bad_limit("max_context_tokens = ", limits.max_context_tokens, " must be >= 1");
        if (limits.max_height < c.patch_size || limits.max_width < c.patch_size)
            bad_limit("max_height/max_width = ", limits.max_height, "/", limits.max_width, " must be >= patch_size ", c.patch_size);
        check_threads(threads);
        check_model();
        D = c.hidden();
        F = 4 * D;
        P = c.patch_features();
        hd = c.attention_head_dim;
        heads = c.num_attention_heads;
        if (hd > key_block)  // the attention kernel packs a head's query rows in one slab of the GEMM's depth
            throw std::invalid_argument(message("transformer: attention_head_dim = ", hd, " exceeds the attention kernel's ",
                                                key_block));
        // Counts the engine keeps in int, formed in 64 bits first: each limit may be in range while a product is not.
        const std::int64_t tokens64 = std::int64_t{limits.max_height / c.patch_size} * (limits.max_width / c.patch_size);
        const std::int64_t tasks64 = std::int64_t{limits.max_batch} *
                                     ((tokens64 + query_chunk() - 1) / query_chunk() + ceil_div(limits.max_context_tokens, query_chunk()));
        if (tokens64 > std::numeric_limits<int>::max() || tasks64 > std::numeric_limits<int>::max())
            bad_limit("max_batch/max_height/max_width = ", limits.max_batch, "/", limits.max_height, "/", limits.max_width,
                      " give ", tokens64, " image tokens per sample and ", tasks64, " attention tasks, more than the engine indexes");
        max_tokens = static_cast<int>(tokens64);
        max_ctx = limits.max_context_tokens;
        max_tasks = static_cast<int>(tasks64);
        const std::size_t Bm = limits.max_batch, Nm = max_tokens, Lm = max_ctx;
        const std::size_t rows = std::max(Nm, Lm);

        // Every workspace's element count, saturating: the total is checked against the machine's memory before
        // anything is allocated, so an absurd limit is refused with the amount it would need.
        const std::size_t per_sample = saturating_product(Bm, D), image = saturating_product(Bm, Nm, D),
                          context = saturating_product(Bm, Lm, D);
        const bool dual = !c.dual_attention_layers.empty();
        const std::size_t mod_width = dual ? 9 : 6;
        const std::size_t floats[] = {
            saturating_product(Bm, c.timestep_channels()),    // tproj
            saturating_mul(per_sample, 3 + mod_width + 6 + 2),  // temb, silu_temb, small_hidden, mod_img, mod_ctx, mod_final
            saturating_mul(image, 4 + 3 + (dual ? 1 : 0)),      // x, nrm, att, out, qkv (image stream), nrm2
            saturating_mul(context, 4 + 3),                     // the same for the context stream
            saturating_product(Bm, rows, F),                    // hidden
            saturating_product(Bm, Nm, c.patch_inputs()),       // patches
            saturating_product(Bm, Nm, P),                      // out_rows
            saturating_product(max_tasks, Nm),                  // probe_parts
            saturating_product(Bm, heads, kv_slot_for(max_tokens, max_ctx)),  // kv_packed
            saturating_product(Bm, rows),                       // positions (int32, same size as a float)
            saturating_mul(scratch_slot_for(hd), static_cast<std::size_t>(threads)),  // scratch
        };
        std::size_t total = 0;
        for (const std::size_t f : floats) total = saturating_add(total, f);
        require_memory(message("transformer: workspaces for max_batch ", limits.max_batch, ", max_height ", limits.max_height,
                               ", max_width ", limits.max_width, ", max_context_tokens ", limits.max_context_tokens, " and ",
                               threads, " threads"),
                       saturating_mul(total, sizeof(float)));

        tproj.resize(Bm * c.timestep_channels());
        temb.resize(Bm * D);
        silu_temb.resize(Bm * D);
        small_hidden.resize(Bm * D);
        mod_img.resize(Bm * mod_width * D);
        mod_ctx.resize(Bm * 6 * D);
        mod_final.resize(Bm * 2 * D);
        x_img.resize(Bm * Nm * D);
        nrm_img.resize(Bm * Nm * D);
        qkv_img.resize(Bm * Nm * 3 * D);
        att_img.resize(Bm * Nm * D);
        out_img.resize(Bm * Nm * D);
        if (dual) nrm2_img.resize(Bm * Nm * D);
        x_ctx.resize(Bm * Lm * D);
        nrm_ctx.resize(Bm * Lm * D);
        qkv_ctx.resize(Bm * Lm * 3 * D);
        att_ctx.resize(Bm * Lm * D);
        out_ctx.resize(Bm * Lm * D);
        hidden.resize(Bm * rows * F);
        patches.resize(Bm * Nm * c.patch_inputs());
        out_rows.resize(Bm * Nm * P);
        probe_parts.resize(static_cast<std::size_t>(max_tasks) * Nm);
        kv_packed.resize(Bm * heads * kv_slot_for(max_tokens, max_ctx));
        positions.resize(Bm * rows);
        size_scratch(threads);
        pack_weights();
        team = std::make_unique<workers>(threads);
    }

    // Every weight's size against the config, so a hand-built model cannot make a GEMM read out of bounds.
    void check_model() const {
        const auto& c = m->config;
        const int d = c.hidden(), hd_ = c.attention_head_dim;
        auto lin = [](const std::string& name, const linear& l, int in, int out) {
            if (l.in != in || l.out != out || l.weight.size() != static_cast<std::size_t>(in) * out ||
                l.bias.size() != static_cast<std::size_t>(out))
                throw std::invalid_argument("transformer: model weight '" + name + "' is " + std::to_string(l.out) + " x " +
                                            std::to_string(l.in) + " (" + std::to_string(l.weight.size()) + " weights, " +
                                            std::to_string(l.bias.size()) + " biases), config needs " + std::to_string(out) +
                                            " x " + std::to_string(in));
        };
        auto vecn = [](const std::string& name, const std::vector<float>& v, std::size_t n) {
            if (v.size() != n)
                throw std::invalid_argument("transformer: model tensor '" + name + "' has " + std::to_string(v.size()) +
                                            " values, config needs " + std::to_string(n));
        };
        lin("pos_embed.proj", m->patch_embed, c.in_channels * c.patch_size * c.patch_size, d);
        vecn("pos_embed.pos_embed", m->pos_table, static_cast<std::size_t>(c.pos_embed_max_size) * c.pos_embed_max_size * d);
        lin("time_text_embed.timestep_embedder.linear_1", m->time_linear1, c.timestep_channels(), d);
        lin("time_text_embed.timestep_embedder.linear_2", m->time_linear2, d, d);
        lin("time_text_embed.text_embedder.linear_1", m->text_linear1, c.pooled_projection_dim, d);
        lin("time_text_embed.text_embedder.linear_2", m->text_linear2, d, d);
        lin("context_embedder", m->context_embedder, c.joint_attention_dim, d);
        lin("norm_out.linear", m->norm_out, d, 2 * d);
        lin("proj_out", m->proj_out, d, c.patch_features());
        for (int l = 0; l < c.num_layers; ++l) {
            const auto& w = m->blocks[l];
            const std::string b = "transformer_blocks." + std::to_string(l) + ".";
            if (w.context_pre_only != (l == c.num_layers - 1))
                throw std::invalid_argument("transformer: " + b + "context_pre_only must be set on the last block only");
            if (w.dual_attention != c.dual_attention(l))
                throw std::invalid_argument("transformer: " + b + "dual_attention must be set exactly on the config's "
                                            "dual_attention_layers");
            lin(b + "norm1.linear", w.norm1, d, (w.dual_attention ? 9 : 6) * d);
            if (w.dual_attention) {
                lin(b + "attn2.to_qkv", w.attn2_qkv, d, 3 * d);
                lin(b + "attn2.to_out.0", w.attn2_out, d, d);
                if (c.qk_norm) {
                    vecn(b + "attn2.norm_q.weight", w.attn2_norm_q, hd_);
                    vecn(b + "attn2.norm_k.weight", w.attn2_norm_k, hd_);
                }
            }
            lin(b + "norm1_context.linear", w.norm1_context, d, (w.context_pre_only ? 2 : 6) * d);
            lin(b + "attn.to_qkv", w.to_qkv, d, 3 * d);
            lin(b + "attn.add_qkv", w.add_qkv, d, 3 * d);
            lin(b + "attn.to_out.0", w.to_out, d, d);
            lin(b + "ff.net.0.proj", w.ff1, d, 4 * d);
            lin(b + "ff.net.2", w.ff2, 4 * d, d);
            if (!w.context_pre_only) {
                lin(b + "attn.to_add_out", w.to_add_out, d, d);
                lin(b + "ff_context.net.0.proj", w.ff_context1, d, 4 * d);
                lin(b + "ff_context.net.2", w.ff_context2, 4 * d, d);
            }
            if (c.qk_norm) {
                vecn(b + "attn.norm_q.weight", w.norm_q, hd_);
                vecn(b + "attn.norm_k.weight", w.norm_k, hd_);
                vecn(b + "attn.norm_added_q.weight", w.norm_added_q, hd_);
                vecn(b + "attn.norm_added_k.weight", w.norm_added_k, hd_);
            }
        }
    }
    static void check_threads(int t) {
        if (t < 1 || t > max_threads)
            throw std::invalid_argument(message("transformer: threads = ", t, " is out of range [1, ", max_threads, "]"));
    }
    // One sample's and head's keys and values packed for the attention's products, image tokens then context:
    // keys as column panels of Q K^T's right operand, values (unless read in place) per key block as column
    // panels of P V's.
    struct packed_kv {
        float *k_img, *k_ctx, *v_img, *v_ctx;
    };
    // P V reads the value rows where they are when a head is whole register panels wide; else from packed copies.
    bool values_in_place() const { return hd % gemm::register_tile().cols == 0; }
    std::array<std::size_t, 4> kv_layout(int image_tokens, int context_tokens) const {
        const std::size_t cols = gemm::register_tile().cols, hdp = values_in_place() ? 0 : padded_head(hd);
        auto r = [](std::size_t f) { return round_up(f, 16); };
        return {r(round_up(as_size(image_tokens), cols) * hd), r(round_up(as_size(context_tokens), cols) * hd),
                r(as_size(image_tokens) * hdp), r(as_size(context_tokens) * hdp)};
    }
    std::size_t kv_slot_for(int image_tokens, int context_tokens) const {
        std::size_t total = 0;
        for (const std::size_t f : kv_layout(image_tokens, context_tokens)) total = saturating_add(total, f);
        return total;
    }
    packed_kv kv_of(int b, int h) {
        const auto sizes = kv_layout(N, L);
        float* at = kv_packed.data() + static_cast<std::size_t>(b * heads + h) * kv_slot_for(N, L);
        packed_kv p{};
        float** fields[] = {&p.k_img, &p.k_ctx, &p.v_img, &p.v_ctx};
        for (int i = 0; i < 4; ++i) {
            *fields[i] = at;
            at += sizes[i];
        }
        return p;
    }

    // Floats per worker in `scratch`: the larger of the attention's scratch and the GEMM's packing slab, a
    // multiple of 16 (64 bytes). Independent of the token counts: attention holds one key block at a time.
    static std::size_t scratch_slot_for(int head_dim) {
        return round_up(std::max(attention_scratch::floats(head_dim), gemm::workspace_floats()), 16);
    }
    // Sizes the per-worker scratch slots for `t` workers; on failure nothing changes.
    void size_scratch(int t) {
        const std::size_t slot = scratch_slot_for(hd);
        require_memory(message("transformer: scratch for ", t, " threads"), saturating_product(t, slot, sizeof(float)));
        buffer fresh(static_cast<std::size_t>(t) * slot, 0.0f);
        scratch.swap(fresh);
        scratch_slot = slot;
    }
    // Packs every linear layer's weight (checked by check_model) for the GEMM: a second copy of the weights, made
    // once so that no product repacks them.
    void pack_weights() {
        std::vector<const linear*> all{&m->patch_embed, &m->time_linear1, &m->time_linear2, &m->text_linear1,
                                       &m->text_linear2, &m->context_embedder, &m->norm_out, &m->proj_out};
        for (const auto& w : m->blocks)
            for (const linear* l : {&w.norm1, &w.norm1_context, &w.to_qkv, &w.add_qkv, &w.to_out, &w.ff1, &w.ff2,
                                    &w.to_add_out, &w.ff_context1, &w.ff_context2, &w.attn2_qkv, &w.attn2_out})
                if (!l->weight.empty()) all.push_back(l);
        std::size_t floats = 0;
        for (const linear* l : all) floats = saturating_add(floats, l->weight.size());
        require_memory(message("transformer: packed weights (", floats, " floats)"), saturating_mul(floats, sizeof(float)));
        for (const linear* l : all) packed.try_emplace(l, l->weight, l->out, l->in);
    }

    // Y[rows, W.out] = X[rows, W.in] * W^T + b, then epi(row, width) on each finished tile row. The parallel work
    // units are tiles of gemm::task_panels register panels of rows by all columns, so each packs its rows once;
    // columns are split too only where there are fewer row tiles than a few per worker.
    template <class Epilogue = no_epilogue>
    void linear_rows(loop_split s, const float* X, int ldx, int rows, const linear& W, float* Y, int ldy,
                     Epilogue epi = {}) {
        if (rows <= 0) return;
        const gemm::packed_weights& P = packed.at(&W);
        const gemm::tile_shape tile = gemm::register_tile();
        const int tr = gemm::task_panels * tile.rows, rt = ceil_div(rows, tr);
        const int wanted = 4 * s.team.size();
        const int ct = rt >= wanted ? 1 : std::min(ceil_div(W.out, tile.cols), ceil_div(wanted, rt));
        const int tc = ceil_div(ceil_div(W.out, ct), tile.cols) * tile.cols;
        const int ct_used = ceil_div(W.out, tc);
        parallel_for(s, rt * ct_used, static_cast<double>(rows) * W.in * W.out, [&](int task, int worker) {
            const int r0 = (task / ct_used) * tr, c0 = (task % ct_used) * tc;
            const int nr = std::min(tr, rows - r0), nc = std::min(tc, W.out - c0);
            float* y = Y + static_cast<std::ptrdiff_t>(r0) * ldy + c0;
            gemm::multiply(X + static_cast<std::ptrdiff_t>(r0) * ldx, ldx, nr, P, c0, c0 + nc, y, ldy, scratch_of(worker),
                           W.bias.data() + c0);
            for (int r = 0; r < nr; ++r) epi(y + static_cast<std::ptrdiff_t>(r) * ldy, nc);
        });
    }

    int tokens_of(stream s) const { return s == stream::image ? n : L; }        // active rows per sample
    int all_tokens_of(stream s) const { return s == stream::image ? N : L; }    // rows of a hook buffer per sample
    // absolute token id of active row r of sample b
    int token_id(stream s, int b, int r) const {
        return (s == stream::image && tokens) ? tokens[static_cast<std::size_t>(b) * n + r] : r;
    }
    float* x_of(stream s) { return s == stream::image ? x_img.data() : x_ctx.data(); }
    // Per-head RMS qk-norm of one q | k | v projection row, in place.
    void qk_norm(float* qkv_row, const std::vector<float>& norm_q, const std::vector<float>& norm_k) const {
        rms_norm_heads(qkv_row, heads, hd, norm_q.data());
        rms_norm_heads(qkv_row + D, heads, hd, norm_k.data());
    }
    // sample b's AdaLN-Zero chunks of the current block for a stream (the context's are always 6D wide)
    const float* modulation_of(stream s, int b) const {
        return s == stream::image ? mod_img.data() + static_cast<std::size_t>(b) * mod_stride
                                  : mod_ctx.data() + static_cast<std::size_t>(b) * 6 * D;
    }

    // ----- validation (everything is checked before any state changes) -----
    void validate(const forward_inputs& in, std::span<float> velocity, const forward_options& o) const;
    void validate_hook(const module_hook& h, int layer, stream s, bool is_mlp, const forward_inputs& in,
                       std::span<const std::int32_t> active) const;
    void validate_attention2_hook(const module_hook& h, int layer) const;

    // ----- stages -----
    void embed(const forward_inputs& in);
    void modulation(const block_weights& w);
    void attention_stage(int layer, const block_weights& w, const block_hooks& h);
    void image_attention_stage(int layer, const block_weights& w, const module_hook& h);
    void store_kv(int layer, attention_kind kind);
    void attend(int layer, attention_kind kind, bool image_queries, bool context_queries);
    void apply_module(stream s, const module_hook& h, const float* computed, int gate_offset);
    void mlp_stage(stream s, const module_hook& h, const linear& ff1, const linear& ff2);
    void final_layer(std::span<float> velocity);
    int boundary(int next);
    void run(const forward_inputs& in, std::span<float> velocity, const forward_options& o);
};

// ---------------------------------------------------------------------------------------------------------------

namespace {
[[noreturn]] void bad_arg(const std::string& what) { throw std::invalid_argument("transformer::forward: " + what); }

void check_size(const char* name, std::size_t got, std::size_t want) {
    if (got != want)
        bad_arg(std::string(name) + " holds " + std::to_string(got) + " floats, expected " + std::to_string(want));
}

// Checks [batch * count] ascending ids in [0, limit); returns count.
template <class Name>
int check_token_list(Name name_of, const char* suffix, std::span<const std::int32_t> ids, int batch, int limit) {
    auto name = [&] { return std::string(name_of()) + suffix; };
    if (ids.empty() || ids.size() % static_cast<std::size_t>(batch) != 0)
        bad_arg(name() + " has " + std::to_string(ids.size()) + " entries, not a positive multiple of batch " +
                std::to_string(batch));
    const int count = static_cast<int>(ids.size() / batch);
    for (int b = 0; b < batch; ++b)
        for (int i = 0; i < count; ++i) {
            const std::int32_t t = ids[static_cast<std::size_t>(b) * count + i];
            if (t < 0 || t >= limit)
                bad_arg(name() + "[" + std::to_string(b * count + i) + "] = " + std::to_string(t) +
                        " is outside [0, " + std::to_string(limit) + ")");
            if (i > 0 && t <= ids[static_cast<std::size_t>(b) * count + i - 1])
                bad_arg(name() + " of sample " + std::to_string(b) + " is not strictly ascending at position " +
                        std::to_string(i) + " (" + std::to_string(ids[static_cast<std::size_t>(b) * count + i - 1]) +
                        ", " + std::to_string(t) + ")");
        }
    return count;
}
}  // namespace

void transformer::impl::validate(const forward_inputs& in, std::span<float> velocity, const forward_options& o) const {
    const auto& c = m->config;
    if (in.batch < 1 || in.batch > limits.max_batch)
        bad_arg("batch = " + std::to_string(in.batch) + " outside [1, max_batch = " + std::to_string(limits.max_batch) + "]");
    if (in.height < 1 || in.width < 1 || in.height % c.patch_size || in.width % c.patch_size)
        bad_arg("height x width = " + std::to_string(in.height) + " x " + std::to_string(in.width) +
                " must be positive multiples of patch_size " + std::to_string(c.patch_size));
    if (in.height > limits.max_height || in.width > limits.max_width)
        bad_arg("height x width = " + std::to_string(in.height) + " x " + std::to_string(in.width) + " exceeds the limits " +
                std::to_string(limits.max_height) + " x " + std::to_string(limits.max_width));
    const int hg = in.height / c.patch_size, wg = in.width / c.patch_size;
    if (hg > c.pos_embed_max_size || wg > c.pos_embed_max_size)
        bad_arg("patch grid " + std::to_string(hg) + " x " + std::to_string(wg) + " exceeds pos_embed_max_size " +
                std::to_string(c.pos_embed_max_size));
    if (in.context_tokens < 1 || in.context_tokens > limits.max_context_tokens)
        bad_arg("context_tokens = " + std::to_string(in.context_tokens) + " outside [1, max_context_tokens = " +
                std::to_string(limits.max_context_tokens) + "]");
    const std::size_t B = in.batch;
    check_size("latents", in.latents.size(), B * c.in_channels * in.height * in.width);
    check_size("timesteps", in.timesteps.size(), B);
    check_size("context", in.context.size(), B * in.context_tokens * c.joint_attention_dim);
    check_size("pooled", in.pooled.size(), B * c.pooled_projection_dim);
    const int tokens_all = hg * wg;

    int active = tokens_all;
    if (!o.image_tokens.empty()) {
        active = check_token_list([] { return "image_tokens"; }, "", o.image_tokens, in.batch, tokens_all);
        if (!o.kv) bad_arg("a token-subset forward (image_tokens set) needs a kv_cache (options.kv is null)");
        check_size("velocity (token rows)", velocity.size(), B * active * c.patch_features());
    } else {
        check_size("velocity", velocity.size(), B * c.out_channels * in.height * in.width);
    }
    if (o.kv) {
        if (o.kv->layers() != c.num_layers || o.kv->hidden() != c.hidden())
            bad_arg("kv_cache has " + std::to_string(o.kv->layers()) + " layers x hidden " + std::to_string(o.kv->hidden()) +
                    ", model needs " + std::to_string(c.num_layers) + " x " + std::to_string(c.hidden()));
        if (o.kv->dual_attention_layers() != c.dual_attention_layers)
            bad_arg("kv_cache was made for " + std::to_string(o.kv->dual_attention_layers().size()) +
                    " dual-attention layers, the model has " + std::to_string(c.dual_attention_layers.size()) +
                    " (or other ones): make it from this model's config");
        if (o.kv->max_batch() < in.batch || o.kv->max_image_tokens() < tokens_all)
            bad_arg("kv_cache holds batch " + std::to_string(o.kv->max_batch()) + " x " + std::to_string(o.kv->max_image_tokens()) +
                    " tokens, call needs " + std::to_string(in.batch) + " x " + std::to_string(tokens_all));
    }
    if (!o.attention_probe.empty()) check_size("attention_probe", o.attention_probe.size(), B * tokens_all);
    if (!o.blocks.empty()) {
        if (o.blocks.size() != static_cast<std::size_t>(c.num_layers))
            bad_arg("blocks has " + std::to_string(o.blocks.size()) + " entries, expected 0 or num_layers = " +
                    std::to_string(c.num_layers));
        for (int l = 0; l < c.num_layers; ++l) {
            for (int s = 0; s < 2; ++s) {
                validate_hook(o.blocks[l].attention[s], l, static_cast<stream>(s), false, in, o.image_tokens);
                validate_hook(o.blocks[l].mlp[s], l, static_cast<stream>(s), true, in, o.image_tokens);
            }
            validate_attention2_hook(o.blocks[l].attention2, l);
        }
    }
}

void transformer::impl::validate_attention2_hook(const module_hook& h, int layer) const {
    auto site = [&] { return "blocks[" + std::to_string(layer) + "].attention2"; };
    const int mode = static_cast<int>(h.mode);
    if (!m->blocks[layer].dual_attention) {
        if (h.mode != module_mode::compute || h.rows || !h.tokens.empty())
            bad_arg(site() + ": block " + std::to_string(layer) +
                    " has no image-only attention (not in dual_attention_layers); leave this hook {compute, nullptr}");
        return;
    }
    if (mode < 0 || mode > 1) bad_arg(site() + ".mode = " + std::to_string(mode) + " is not compute (0) or reuse (1)");
    if (h.mode == module_mode::reuse && !h.rows) bad_arg(site() + ": mode reuse needs rows (got nullptr)");
    if (!h.tokens.empty()) bad_arg(site() + ".tokens is set but only MLP hooks take a token subset");
}

void transformer::impl::validate_hook(const module_hook& h, int layer, stream s, bool is_mlp, const forward_inputs& in,
                                      std::span<const std::int32_t> active) const {
    // Messages are built only on failure: validation runs on every call and must not allocate.
    auto site = [&] {
        return "blocks[" + std::to_string(layer) + "]." + (is_mlp ? "mlp" : "attention") + "[" +
               (s == stream::image ? "image" : "context") + "]";
    };
    const int mode = static_cast<int>(h.mode);
    if (mode < 0 || mode > 2) bad_arg(site() + ".mode = " + std::to_string(mode) + " is not a module_mode");
    if (s == stream::context && m->blocks[layer].context_pre_only) {
        if (h.mode != module_mode::compute || h.rows || !h.tokens.empty())
            bad_arg(site() + ": the last block (context_pre_only) has no context outputs; leave this hook {compute, nullptr}");
        return;
    }
    if (h.mode != module_mode::compute && !h.rows) bad_arg(site() + ": mode reuse/subset needs rows (got nullptr)");
    if (h.mode != module_mode::subset) {
        if (!h.tokens.empty()) bad_arg(site() + ".tokens is set but mode is not subset");
        return;
    }
    if (!is_mlp) bad_arg(site() + ".mode = subset: only the MLP takes a token subset (use options.image_tokens for attention)");
    const int limit = s == stream::image ? (in.height / m->config.patch_size) * (in.width / m->config.patch_size)
                                         : in.context_tokens;
    const int count = check_token_list(site, ".tokens", h.tokens, in.batch, limit);
    if (s == stream::image && !active.empty()) {
        const int n_active = static_cast<int>(active.size() / in.batch);
        for (int b = 0; b < in.batch; ++b) {
            int j = 0;
            for (int i = 0; i < count; ++i) {
                const std::int32_t t = h.tokens[static_cast<std::size_t>(b) * count + i];
                while (j < n_active && active[static_cast<std::size_t>(b) * n_active + j] < t) ++j;
                if (j == n_active || active[static_cast<std::size_t>(b) * n_active + j] != t)
                    bad_arg(site() + ".tokens: token " + std::to_string(t) + " of sample " + std::to_string(b) +
                            " is not among options.image_tokens (only active tokens can run the MLP)");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------

void transformer::impl::embed(const forward_inputs& in) {
    const auto& c = m->config;
    const int T = c.timestep_channels(), half = T / 2;
    // Sinusoidal timestep projection (flip_sin_to_cos: [cos, sin]), freq_i = exp(-ln(1e4) * i / half).
    // The exponent is formed in float like torch; exp is evaluated correctly rounded.
    for (int b = 0; b < B; ++b) {
        const float t = in.timesteps[b];
        for (int i = 0; i < half; ++i) {
            const float e = (static_cast<float>(-std::log(10000.0)) * static_cast<float>(i)) / static_cast<float>(half);
            const float freq = static_cast<float>(std::exp(static_cast<double>(e)));
            const float arg = t * freq;
            tproj[static_cast<std::size_t>(b) * T + i] = std::cos(arg);
            tproj[static_cast<std::size_t>(b) * T + half + i] = std::sin(arg);
        }
    }
    // temb = timestep MLP + pooled-text MLP
    linear_rows(serial(), tproj.data(), T, B, m->time_linear1, small_hidden.data(), D);
    silu_inplace(small_hidden.data(), B * D);
    linear_rows(serial(), small_hidden.data(), D, B, m->time_linear2, temb.data(), D);
    linear_rows(serial(), in.pooled.data(), c.pooled_projection_dim, B, m->text_linear1, small_hidden.data(), D);
    silu_inplace(small_hidden.data(), B * D);
    linear_rows(serial(), small_hidden.data(), D, B, m->text_linear2, silu_temb.data(), D);
    for (int i = 0; i < B * D; ++i) temb[i] += silu_temb[i];
    std::copy_n(temb.data(), B * D, silu_temb.data());
    silu_inplace(silu_temb.data(), B * D);  // every AdaLN linear reads SiLU(temb)

    linear_rows(split(), in.context.data(), c.joint_attention_dim, B * L, m->context_embedder, x_ctx.data(), D);

    // Patch embedding: im2col of the active tokens ((c, u, v) order, as the conv weight), GEMM, + cropped table.
    const int p = c.patch_size, C = c.in_channels, K = C * p * p, M = c.pos_embed_max_size;
    const int top = (M - Hg) / 2, left = (M - Wg) / 2;
    parallel_for(split(), B, static_cast<double>(B) * n * K, [&](int b, int) {
        for (int r = 0; r < n; ++r) {
            const int t = token_id(stream::image, b, r), i = t / Wg, j = t % Wg;
            float* dst = patches.data() + (static_cast<std::size_t>(b) * n + r) * K;
            for (int ch = 0; ch < C; ++ch)
                for (int u = 0; u < p; ++u)
                    for (int v = 0; v < p; ++v)
                        *dst++ = in.latents[((static_cast<std::size_t>(b) * C + ch) * in.height + i * p + u) * in.width + j * p + v];
        }
    });
    linear_rows(split(), patches.data(), K, B * n, m->patch_embed, x_img.data(), D);
    parallel_for(split(), B, static_cast<double>(B) * n * D, [&](int b, int) {
        for (int r = 0; r < n; ++r) {
            const int t = token_id(stream::image, b, r), i = t / Wg, j = t % Wg;
            vec(x_img.data() + (static_cast<std::size_t>(b) * n + r) * D, D) +=
                const_vec(m->pos_table.data() + (static_cast<std::size_t>(top + i) * M + left + j) * D, D);
        }
    });
}

void transformer::impl::modulation(const block_weights& w) {
    mod_stride = w.norm1.out;
    linear_rows(split(), silu_temb.data(), D, B, w.norm1, mod_img.data(), mod_stride);
    linear_rows(split(), silu_temb.data(), D, B, w.norm1_context, mod_ctx.data(), w.norm1_context.out);
}

void transformer::impl::attention_stage(int layer, const block_weights& w, const block_hooks& h) {
    const bool image_out = h.attention[0].mode == module_mode::compute;
    const bool context_out = !w.context_pre_only && h.attention[1].mode == module_mode::compute;
    const bool probe = !opts->attention_probe.empty();
    // MMDiT-X: the image-only attention reads LayerNorm(x) modulated by its own shift and scale, from x as it is
    // before the joint attention's residual (SD35AdaLayerNormZeroX), so its input is made first.
    if (w.dual_attention && h.attention2.mode == module_mode::compute) {
        parallel_for(split(), B * n, norm_work * B * n * D, [&](int r, int) {
            const float* mod = modulation_of(stream::image, r / n);
            norm_modulate(x_img.data() + static_cast<std::size_t>(r) * D, nrm2_img.data() + static_cast<std::size_t>(r) * D,
                          D, mod + 6 * D, mod + 7 * D);
        });
    }
    if (image_out || context_out) {
        // norm1 of both streams. AdaLayerNormZero chunks: shift, scale, gate (msa), shift, scale, gate (mlp);
        // the last block's context AdaLayerNormContinuous chunks are (scale, shift).
        const int shift_c = w.context_pre_only ? D : 0, scale_c = w.context_pre_only ? 0 : D;
        parallel_for(split(), B * n + B * L, norm_work * (B * n + B * L) * D, [&](int r, int) {
            if (r < B * n) {
                const float* mod = modulation_of(stream::image, r / n);
                norm_modulate(x_img.data() + static_cast<std::size_t>(r) * D, nrm_img.data() + static_cast<std::size_t>(r) * D,
                              D, mod, mod + D);
            } else {
                r -= B * n;
                const float* mod = mod_ctx.data() + static_cast<std::size_t>(r / L) * w.norm1_context.out;
                norm_modulate(x_ctx.data() + static_cast<std::size_t>(r) * D, nrm_ctx.data() + static_cast<std::size_t>(r) * D,
                              D, mod + shift_c, mod + scale_c);
            }
        });
        linear_rows(split(), nrm_img.data(), D, B * n, w.to_qkv, qkv_img.data(), 3 * D);
        linear_rows(split(), nrm_ctx.data(), D, B * L, w.add_qkv, qkv_ctx.data(), 3 * D);
        if (m->config.qk_norm) {
            parallel_for(split(), B * n + B * L, norm_work * (B * n + B * L) * 2 * D, [&](int r, int) {
                if (r < B * n) qk_norm(qkv_img.data() + static_cast<std::size_t>(r) * 3 * D, w.norm_q, w.norm_k);
                else qk_norm(qkv_ctx.data() + static_cast<std::size_t>(r - B * n) * 3 * D, w.norm_added_q, w.norm_added_k);
            });
        }
        store_kv(layer, attention_kind::joint);
        attend(layer, attention_kind::joint, image_out, context_out || (probe && opts->probe_context_queries));
        if (image_out) linear_rows(split(), att_img.data(), D, B * n, w.to_out, out_img.data(), D);
        if (context_out) linear_rows(split(), att_ctx.data(), D, B * L, w.to_add_out, out_ctx.data(), D);
    }
    apply_module(stream::image, h.attention[0], out_img.data(), 2 * D);
    if (!w.context_pre_only) apply_module(stream::context, h.attention[1], out_ctx.data(), 2 * D);
    if (w.dual_attention) image_attention_stage(layer, w, h.attention2);
}

// MMDiT-X's second attention (diffusers' attn2): self-attention over the image tokens alone, with its own
// projections and qk-norm, added with its own gate. Its keys and values have their own kv_cache slot, so a
// token-subset forward reads the cached tokens' rows as it does for the joint attention. Not in the probe: the
// probe is the attention image tokens receive in the joint attention, the one every SD3 block has.
void transformer::impl::image_attention_stage(int layer, const block_weights& w, const module_hook& h) {
    if (h.mode == module_mode::compute) {
        linear_rows(split(), nrm2_img.data(), D, B * n, w.attn2_qkv, qkv_img.data(), 3 * D);
        if (m->config.qk_norm) {
            parallel_for(split(), B * n, norm_work * B * n * 2 * D, [&](int r, int) {
                qk_norm(qkv_img.data() + static_cast<std::size_t>(r) * 3 * D, w.attn2_norm_q, w.attn2_norm_k);
            });
        }
        store_kv(layer, attention_kind::image_only);
        attend(layer, attention_kind::image_only, true, false);
        linear_rows(split(), att_img.data(), D, B * n, w.attn2_out, out_img.data(), D);
    }
    apply_module(stream::image, h, out_img.data(), 8 * D);
}

// The computed image tokens' keys and values into the cache (when there is one), for later subset forwards.
void transformer::impl::store_kv(int layer, attention_kind kind) {
    if (!opts->kv) return;
    parallel_for(split(), B, 2.0 * B * n * D, [&](int b, int) {
        float* keys = opts->kv->keys(layer, b, kind);
        float* values = opts->kv->values(layer, b, kind);
        for (int r = 0; r < n; ++r) {
            const float* row = qkv_img.data() + (static_cast<std::size_t>(b) * n + r) * 3 * D;
            const std::size_t t = static_cast<std::size_t>(token_id(stream::image, b, r)) * D;
            std::copy_n(row + D, D, keys + t);
            std::copy_n(row + 2 * D, D, values + t);
        }
    });
}

// softmax(Q K^T / sqrt(hd)) V over the keys [image tokens (all N); context tokens], per head; queries are the
// active image rows and/or the context rows. A task is one sample's chunk of queries; per head it walks the keys
// in blocks with an online softmax (running maximum and sum, the output rescaled when the maximum grows), so no
// buffer grows with the token count. With the probe it makes a second pass over the image keys: each query's
// probabilities are exp(score * scale - lse) from its log-sum-exp, summed into the task's column sums.
// attention_kind::image_only (MMDiT-X's attn2): the image tokens' keys alone, image queries, no probe.
void transformer::impl::attend(int layer, attention_kind kind, bool image_queries, bool context_queries) {
    const bool joint = kind == attention_kind::joint;
    const bool probe = joint && !opts->attention_probe.empty();
    const int Lk = joint ? L : 0;  // context keys
    const int qc = query_chunk();
    const int img_chunks = image_queries ? ceil_div(n, qc) : 0;
    const int ctx_chunks = context_queries ? ceil_div(L, qc) : 0;
    const int per_sample = img_chunks + ctx_chunks;
    const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
    const gemm::tile_shape tile = gemm::register_tile();
    const std::ptrdiff_t panel = static_cast<std::ptrdiff_t>(gemm::packed_rows_floats(tile.rows));
    // Where sample b's keys and values are: image rows in the cache (partial forwards) or in the projection rows
    // (full forward without cache, n == N); context rows in the projection rows.
    struct kv_rows {
        const float *k_img, *v_img, *k_ctx, *v_ctx;
        int ld_img, ld_ctx;
    };
    auto rows_of = [&](int b) {
        kv_rows r{};
        if (opts->kv) {
            r.k_img = opts->kv->keys(layer, b, kind);
            r.v_img = opts->kv->values(layer, b, kind);
            r.ld_img = D;
        } else {
            r.k_img = qkv_img.data() + static_cast<std::size_t>(b) * n * 3 * D + D;
            r.v_img = r.k_img + D;
            r.ld_img = 3 * D;
        }
        r.k_ctx = qkv_ctx.data() + static_cast<std::size_t>(b) * L * 3 * D + D;
        r.v_ctx = r.k_ctx + D;
        r.ld_ctx = 3 * D;
        return r;
    };
    const bool in_place = values_in_place();
    const auto hdp = static_cast<std::ptrdiff_t>(padded_head(hd));
    // Every sample's and head's keys (and values, unless read in place) packed once, for all the query chunks.
    parallel_for(split(), B * heads, 2.0 * B * (N + Lk) * D, [&](int task, int) {
        const int b = task / heads, h = task % heads;
        const packed_kv kv = kv_of(b, h);
        const kv_rows src = rows_of(b);
        gemm::pack_transposed(src.k_img + h * hd, src.ld_img, N, hd, kv.k_img);
        if (joint) gemm::pack_transposed(src.k_ctx + h * hd, src.ld_ctx, L, hd, kv.k_ctx);
        if (in_place) return;
        for (int j0 = 0; j0 < N; j0 += key_block)
            gemm::pack_columns(src.v_img + static_cast<std::ptrdiff_t>(j0) * src.ld_img + h * hd, src.ld_img,
                               std::min(key_block, N - j0), hd, kv.v_img + static_cast<std::ptrdiff_t>(j0) * hdp);
        for (int j0 = 0; j0 < Lk; j0 += key_block)
            gemm::pack_columns(src.v_ctx + static_cast<std::ptrdiff_t>(j0) * src.ld_ctx + h * hd, src.ld_ctx,
                               std::min(key_block, Lk - j0), hd, kv.v_ctx + static_cast<std::ptrdiff_t>(j0) * hdp);
    });
    const double attention_work = 2.0 * B * ((image_queries ? n : 0) + (context_queries ? L : 0)) * static_cast<double>(N + Lk) * D;
    parallel_for(split(), B * per_sample, attention_work, [&](int task, int worker) {
        const int b = task / per_sample, chunk = task % per_sample;
        const bool img = chunk < img_chunks;
        const int q0 = (img ? chunk : chunk - img_chunks) * qc;
        const int nq = std::min(qc, (img ? n : L) - q0);
        const int q_panels = ceil_div(nq, tile.rows);  // a short last chunk computes only its own panels
        const float* q = img ? qkv_img.data() + (static_cast<std::size_t>(b) * n + q0) * 3 * D
                             : qkv_ctx.data() + (static_cast<std::size_t>(b) * L + q0) * 3 * D;
        float* o = img ? att_img.data() + (static_cast<std::size_t>(b) * n + q0) * D
                       : att_ctx.data() + (static_cast<std::size_t>(b) * L + q0) * D;
        attention_scratch w(scratch_of(worker).data(), hd);
        float* part = probe && (img || opts->probe_context_queries) ? probe_parts.data() + static_cast<std::size_t>(task) * N
                                                                    : nullptr;
        if (part) std::fill_n(part, N, 0.0f);
        // S[0:qc, 0:nk) = Q K^T for the key block at j0 of packed keys (nk keys, the rest of S's columns unused).
        auto scores = [&](const float* keys, int j0, int nk) {
            for (int kp = 0; kp * tile.cols < nk; ++kp)
                for (int qp = 0; qp < q_panels; ++qp)
                    gemm::micro_kernel(hd, w.q + qp * panel, keys + static_cast<std::ptrdiff_t>(j0 + kp * tile.cols) * hd, tile.cols,
                                       w.s + qp * panel + kp * tile.cols, key_block, gemm::start::zero);
        };
        const kv_rows src = rows_of(b);
        for (int h = 0; h < heads; ++h) {
            const packed_kv kv = kv_of(b, h);
            gemm::pack_rows(q + h * hd, 3 * D, nq, hd, w.q);
            std::fill_n(w.o, static_cast<std::size_t>(qc) * w.out_stride, 0.0f);
            std::fill_n(w.max, qc, -std::numeric_limits<float>::infinity());
            std::fill_n(w.sum, qc, 0.0f);
            for (const auto& [keys, rows, ld, packed_values, count] :
                 {std::tuple{kv.k_img, src.v_img, src.ld_img, kv.v_img, N}, std::tuple{kv.k_ctx, src.v_ctx, src.ld_ctx, kv.v_ctx, Lk}}) {
                for (int j0 = 0; j0 < count; j0 += key_block) {
                    const int nk = std::min(key_block, count - j0);
                    scores(keys, j0, nk);
                    for (int r = 0; r < nq; ++r) {
                        vec row(w.s + static_cast<std::ptrdiff_t>(r) * key_block, nk);
                        const float mx = std::max(w.max[r], row.maxCoeff());
                        const float rescale = std::exp((w.max[r] - mx) * scale);  // 0 on the first block
                        row = ((row - mx) * scale).exp();
                        w.sum[r] = w.sum[r] * rescale + row.sum();
                        w.max[r] = mx;
                        vec(w.o + static_cast<std::ptrdiff_t>(r) * w.out_stride, hd) *= rescale;
                    }
                    for (int vp = 0; vp * tile.cols < hd; ++vp) {
                        const float* v = in_place ? rows + static_cast<std::ptrdiff_t>(j0) * ld + h * hd + vp * tile.cols
                                                  : packed_values + static_cast<std::ptrdiff_t>(j0) * hdp + vp * nk * tile.cols;
                        const std::ptrdiff_t ldv = in_place ? ld : tile.cols;
                        for (int qp = 0; qp < q_panels; ++qp)
                            gemm::micro_kernel(nk, w.s + qp * panel, v, ldv,
                                               w.o + static_cast<std::ptrdiff_t>(qp) * tile.rows * w.out_stride + vp * tile.cols,
                                               w.out_stride, gemm::start::c);
                    }
                }
            }
            for (int r = 0; r < nq; ++r) {
                vec(o + static_cast<std::ptrdiff_t>(r) * D + h * hd, hd) =
                    const_vec(w.o + static_cast<std::ptrdiff_t>(r) * w.out_stride, hd) * (1.0f / w.sum[r]);
                w.lse[r] = w.max[r] * scale + std::log(w.sum[r]);
            }
            if (!part) continue;
            for (int j0 = 0; j0 < N; j0 += key_block) {
                const int nk = std::min(key_block, N - j0);
                scores(kv.k_img, j0, nk);
                vec sums(part + j0, nk);
                for (int r = 0; r < nq; ++r)
                    sums += (const_vec(w.s + static_cast<std::ptrdiff_t>(r) * key_block, nk) * scale - w.lse[r]).exp();
            }
        }
    });
    if (probe) {  // fixed-order reduction: results do not depend on the thread count
        const int col_chunks = ceil_div(N, 256);
        parallel_for(split(), B * col_chunks, static_cast<double>(B) * N * per_sample, [&](int t, int) {
            const int b = t / col_chunks, c0 = (t % col_chunks) * 256, nc = std::min(256, N - c0);
            vec dst(opts->attention_probe.data() + static_cast<std::size_t>(b) * N + c0, nc);
            const int counted = opts->probe_context_queries ? per_sample : img_chunks;
            for (int chunk = 0; chunk < counted; ++chunk)
                dst += const_vec(probe_parts.data() + static_cast<std::size_t>(b * per_sample + chunk) * N + c0, nc) *
                       (1.0f / static_cast<float>(heads));
        });
    }
}

// Residual update x += gate * module_output for every active row of a stream. The output comes from the
// freshly computed rows (`computed`, mode compute) or from the hook's rows (reuse / subset).
void transformer::impl::apply_module(stream s, const module_hook& h, const float* computed, int gate_offset) {
    const int rows = tokens_of(s), all = all_tokens_of(s);
    float* x = x_of(s);
    const bool from_hook = h.mode != module_mode::compute;
    parallel_for(split(), B, 2.0 * B * rows * D, [&](int b, int) {
        const const_vec gate(modulation_of(s, b) + gate_offset, D);
        for (int r = 0; r < rows; ++r) {
            const std::size_t active_row = static_cast<std::size_t>(b) * rows + r;
            const std::size_t hook_row = static_cast<std::size_t>(b) * all + token_id(s, b, r);
            const float* src = from_hook ? h.rows + hook_row * D : computed + active_row * D;
            if (!from_hook && h.rows) std::copy_n(src, D, h.rows + hook_row * D);  // read-back for the caller's cache
            vec(x + active_row * D, D) += gate * const_vec(src, D);
        }
    });
}

void transformer::impl::mlp_stage(stream s, const module_hook& h, const linear& ff1, const linear& ff2) {
    if (h.mode != module_mode::reuse) {
        const int rows = tokens_of(s), all = all_tokens_of(s);
        // Rows to compute, as active-row positions per sample: all rows, or the hook's subset.
        int count = rows;
        const std::int32_t* pos = nullptr;
        if (h.mode == module_mode::subset) {
            count = static_cast<int>(h.tokens.size() / B);
            for (int b = 0; b < B; ++b) {
                int j = 0;
                for (int i = 0; i < count; ++i) {
                    const std::int32_t t = h.tokens[static_cast<std::size_t>(b) * count + i];
                    while (token_id(s, b, j) < t) ++j;  // validated: t is an active token
                    positions[static_cast<std::size_t>(b) * count + i] = j;
                }
            }
            pos = positions.data();
        }
        const float* x = x_of(s);
        float* nrm = s == stream::image ? nrm_img.data() : nrm_ctx.data();
        float* out = s == stream::image ? out_img.data() : out_ctx.data();
        parallel_for(split(), B * count, norm_work * B * count * D, [&](int r, int) {
            const int b = r / count, src_row = pos ? pos[r] : r % count;
            const float* md = modulation_of(s, b);
            norm_modulate(x + (static_cast<std::size_t>(b) * rows + src_row) * D, nrm + static_cast<std::size_t>(r) * D, D,
                          md + 3 * D, md + 4 * D);
        });
        linear_rows(split(), nrm, D, B * count, ff1, hidden.data(), F, gelu_tanh_epilogue{});
        linear_rows(split(), hidden.data(), F, B * count, ff2, out, D);
        if (h.mode == module_mode::subset) {  // computed rows go to the caller's buffer, which then feeds every row
            parallel_for(split(), B, static_cast<double>(B) * count * D, [&](int b, int) {
                for (int i = 0; i < count; ++i) {
                    const std::size_t r = static_cast<std::size_t>(b) * count + i;
                    std::copy_n(out + r * D, D, h.rows + (static_cast<std::size_t>(b) * all + h.tokens[r]) * D);
                }
            });
        }
    }
    apply_module(s, h, s == stream::image ? out_img.data() : out_ctx.data(), 5 * D);
}

void transformer::impl::final_layer(std::span<float> velocity) {
    const auto& c = m->config;
    // norm_out: AdaLayerNormContinuous, chunks (scale, shift)
    linear_rows(split(), silu_temb.data(), D, B, m->norm_out, mod_final.data(), 2 * D);
    parallel_for(split(), B * n, norm_work * B * n * D, [&](int r, int) {
        const float* md = mod_final.data() + static_cast<std::size_t>(r / n) * 2 * D;
        norm_modulate(x_img.data() + static_cast<std::size_t>(r) * D, nrm_img.data() + static_cast<std::size_t>(r) * D, D,
                      md + D, md);
    });
    const bool rows_out = tokens != nullptr;
    float* dst = rows_out ? velocity.data() : out_rows.data();
    linear_rows(split(), nrm_img.data(), D, B * n, m->proj_out, dst, P);
    if (!rows_out) {  // unpatchify: row (i, j) features (u, v, ch) -> image [ch, i*p+u, j*p+v]
        const int p = c.patch_size, C = c.out_channels, Hp = Hg * p, Wp = Wg * p;
        parallel_for(split(), B, static_cast<double>(B) * N * P, [&](int b, int) {
            for (int t = 0; t < N; ++t) {
                const int i = t / Wg, j = t % Wg;
                const float* row = out_rows.data() + (static_cast<std::size_t>(b) * N + t) * P;
                for (int u = 0; u < p; ++u)
                    for (int v = 0; v < p; ++v)
                        for (int ch = 0; ch < C; ++ch)
                            velocity[((static_cast<std::size_t>(b) * C + ch) * Hp + i * p + u) * Wp + j * p + v] =
                                row[(u * p + v) * C + ch];
            }
        });
    }
}

// Hands the hidden states before block `next` (num_layers: before the final layer) to the caller's callback;
// returns the block to run next, checked against its range.
int transformer::impl::boundary(int next) {
    const int layers = m->config.num_layers;
    const block_boundary b{next, std::span<float>(x_img.data(), static_cast<std::size_t>(B) * n * D),
                           std::span<float>(x_ctx.data(), static_cast<std::size_t>(B) * L * D),
                           next < layers ? std::span<const float>(mod_img.data(), static_cast<std::size_t>(B) * mod_stride)
                                         : std::span<const float>()};
    const int to = opts->between_blocks(b);
    const int last = next < layers ? layers : next;  // before the final layer only num_layers is allowed
    if (to < next || to > last)
        throw std::logic_error(message("transformer::forward: between_blocks returned ", to, " at next_layer ", next,
                                       ", expected a block in [", next, ", ", last, "]"));
    return to;
}

void transformer::impl::run(const forward_inputs& in, std::span<float> velocity, const forward_options& o) {
    validate(in, velocity, o);
    const auto& c = m->config;
    opts = &o;
    B = in.batch;
    Hg = in.height / c.patch_size;
    Wg = in.width / c.patch_size;
    N = Hg * Wg;
    L = in.context_tokens;
    tokens = o.image_tokens.empty() ? nullptr : o.image_tokens.data();
    n = tokens ? static_cast<int>(o.image_tokens.size() / B) : N;
    if (!o.attention_probe.empty()) std::fill(o.attention_probe.begin(), o.attention_probe.end(), 0.0f);

    embed(in);
    const block_hooks defaults{};
    for (int l = 0; l < c.num_layers;) {
        const auto& w = m->blocks[l];
        const block_hooks& h = o.blocks.empty() ? defaults : o.blocks[l];
        modulation(w);
        if (o.between_blocks) {
            const int next = boundary(l);
            if (next != l) {
                l = next;
                continue;
            }
        }
        attention_stage(l, w, h);
        mlp_stage(stream::image, h.mlp[0], w.ff1, w.ff2);
        if (!w.context_pre_only) mlp_stage(stream::context, h.mlp[1], w.ff_context1, w.ff_context2);
        ++l;
    }
    if (o.between_blocks) boundary(c.num_layers);
    final_layer(velocity);
    opts = nullptr;
}

// ---------------------------------------------------------------------------------------------------------------

transformer::transformer(const model& m, const engine_limits& limits, int threads)
    : impl_(std::make_unique<impl>(m, limits, threads)) {}
transformer::~transformer() = default;
transformer::transformer(transformer&&) noexcept = default;
transformer& transformer::operator=(transformer&&) noexcept = default;

const transformer_config& transformer::config() const noexcept { return impl_->m->config; }
const engine_limits& transformer::limits() const noexcept { return impl_->limits; }
int transformer::threads() const noexcept { return impl_->team->size(); }
void transformer::set_threads(int threads) {
    impl::check_threads(threads);
    if (threads == impl_->team->size()) return;
    auto team = std::make_unique<workers>(threads);  // may throw: nothing has changed yet
    impl_->size_scratch(threads);
    impl_->team = std::move(team);
}
workers& transformer::team() noexcept { return *impl_->team; }
void transformer::set_min_chunk_work(double multiply_adds) {
    if (!(multiply_adds >= 0) || !std::isfinite(multiply_adds))
        throw std::invalid_argument(message("transformer: min_chunk_work = ", multiply_adds, " must be finite and >= 0"));
    impl_->min_chunk_work = multiply_adds;
}

void transformer::forward(const forward_inputs& in, std::span<float> velocity) { impl_->run(in, velocity, {}); }
void transformer::forward(const forward_inputs& in, std::span<float> velocity, const forward_options& options) {
    impl_->run(in, velocity, options);
}

// ---------------------------------------------------------------------------------------------------------------

namespace {
void check_patch_args(const char* fn, const transformer_config& c, int batch, int height, int width, int channels,
                      std::span<const std::int32_t> tokens, std::size_t rows_size, std::size_t image_size, int& n) {
    const std::string f = fn;
    if (batch < 1 || height < 1 || width < 1 || channels < 1 || height % c.patch_size || width % c.patch_size)
        throw std::invalid_argument(f + ": batch/height/width/channels = " + std::to_string(batch) + "/" + std::to_string(height) +
                                    "/" + std::to_string(width) + "/" + std::to_string(channels) +
                                    " must be positive, height and width multiples of patch_size " + std::to_string(c.patch_size));
    const int all = (height / c.patch_size) * (width / c.patch_size);
    n = all;
    if (!tokens.empty()) {
        if (tokens.size() % static_cast<std::size_t>(batch))
            throw std::invalid_argument(f + ": tokens has " + std::to_string(tokens.size()) + " entries, not a multiple of batch " +
                                        std::to_string(batch));
        n = static_cast<int>(tokens.size() / batch);
        for (auto t : tokens)
            if (t < 0 || t >= all)
                throw std::invalid_argument(f + ": token id " + std::to_string(t) + " outside [0, " + std::to_string(all) + ")");
    }
    const std::size_t want_rows = static_cast<std::size_t>(batch) * n * c.patch_size * c.patch_size * channels;
    const std::size_t want_image = static_cast<std::size_t>(batch) * channels * height * width;
    if (rows_size != want_rows || image_size != want_image)
        throw std::invalid_argument(f + ": rows/image hold " + std::to_string(rows_size) + "/" + std::to_string(image_size) +
                                    " floats, expected " + std::to_string(want_rows) + "/" + std::to_string(want_image));
}

template <bool ToImage, class Rows, class Image>
void move_patches(const transformer_config& c, int batch, int height, int width, int channels,
                  std::span<const std::int32_t> tokens, int n, Rows rows, Image image) {
    const int p = c.patch_size, wg = width / p, feat = p * p * channels;
    for (int b = 0; b < batch; ++b)
        for (int r = 0; r < n; ++r) {
            const int t = tokens.empty() ? r : tokens[static_cast<std::size_t>(b) * n + r], i = t / wg, j = t % wg;
            for (int u = 0; u < p; ++u)
                for (int v = 0; v < p; ++v)
                    for (int ch = 0; ch < channels; ++ch) {
                        const std::size_t ri = (static_cast<std::size_t>(b) * n + r) * feat + (u * p + v) * channels + ch;
                        const std::size_t ii = ((static_cast<std::size_t>(b) * channels + ch) * height + i * p + u) * width + j * p + v;
                        if constexpr (ToImage) image[ii] = rows[ri];
                        else rows[ri] = image[ii];
                    }
        }
}
}  // namespace

void patches_to_image(const transformer_config& c, int batch, int height, int width, int channels,
                      std::span<const std::int32_t> tokens, std::span<const float> rows, std::span<float> image) {
    int n = 0;
    check_patch_args("patches_to_image", c, batch, height, width, channels, tokens, rows.size(), image.size(), n);
    move_patches<true>(c, batch, height, width, channels, tokens, n, rows, image);
}

void image_to_patches(const transformer_config& c, int batch, int height, int width, int channels,
                      std::span<const std::int32_t> tokens, std::span<const float> image, std::span<float> rows) {
    int n = 0;
    check_patch_args("image_to_patches", c, batch, height, width, channels, tokens, rows.size(), image.size(), n);
    move_patches<false>(c, batch, height, width, channels, tokens, n, rows, image);
}

}  // namespace sd3
