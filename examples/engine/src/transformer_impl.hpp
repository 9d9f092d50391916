// The engine's internals, shared by the stages of the forward (transformer.cpp and the stage files it names below) and
// flux_forward.cpp (FLUX's own): the element-wise helpers, the parallel loop, and transformer::impl, whose
// workspaces and stages are one two-stream MMDiT that SD3, MMDiT-X and FLUX blocks all run on. Not installed.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <span>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include <Eigen/Core>

#include "sd3/flux_model.hpp"
#include "sd3/gemm.hpp"
#include "sd3/model.hpp"
#include "sd3/transformer.hpp"
#include "sd3/workers.hpp"

namespace sd3 {
namespace detail {

using const_vec = Eigen::Map<const Eigen::ArrayXf>;
using vec = Eigen::Map<Eigen::ArrayXf>;

constexpr float norm_eps = 1e-6f; // LayerNorm and RMSNorm eps in SD3 and FLUX
constexpr double norm_work = 8;   // a norm's passes over a row, in the work units of parallel_for

inline int ceil_div(int a, int b) { return (a + b - 1) / b; }
inline std::size_t round_up(std::size_t a, std::size_t b) { return (a + b - 1) / b * b; }

constexpr int key_block = gemm::k_block;  // keys per step of the attention's online softmax

// Attention queries per task: whole register panels, about 64 rows (56 with AVX-512), so that every key block
// packed for a task serves enough queries.
inline int query_chunk() { return 64 / gemm::register_tile().rows * gemm::register_tile().rows; }

// Floats of a head's row in the attention's output and packed values: the head rounded up to whole register
// panels.
inline std::size_t padded_head(int head_dim) { return round_up(static_cast<std::size_t>(head_dim), gemm::register_tile().cols); }

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
inline void norm_modulate(const float* x, float* y, int D, const float* shift, const float* scale) {
    const const_vec xv(x, D);
    const float mean = xv.sum() / static_cast<float>(D);
    const float var = (xv - mean).square().sum() / static_cast<float>(D);
    const float rstd = 1.0f / std::sqrt(var + norm_eps);
    vec(y, D) = ((xv - mean) * rstd) * (1.0f + const_vec(scale, D)) + const_vec(shift, D);
}

// Per-head RMSNorm with learned weight, in place on `heads` contiguous vectors of length hd.
inline void rms_norm_heads(float* x, int heads, int hd, const float* weight) {
    for (int h = 0; h < heads; ++h) {
        vec v(x + static_cast<std::ptrdiff_t>(h) * hd, hd);
        const float ms = v.square().sum() / static_cast<float>(hd);
        v = (v * (1.0f / std::sqrt(ms + norm_eps))) * const_vec(weight, hd);
    }
}

inline void silu_inplace(float* x, int n) {
    vec v(x, n);
    v = v / (1.0f + (-v).exp());
}


// A hand-built model's weight or vector against the size its config needs (std::invalid_argument naming it), so
// that no GEMM reads out of bounds.
void check_linear(const std::string& name, const linear& l, int in, int out);
void check_vector(const std::string& name, const std::vector<float>& v, std::size_t n);

// The weights SD3 and FLUX models name alike: the timestep and pooled-text MLPs, context_embedder, norm_out, proj_out.
template <class Model>
void check_outer_weights(const Model& m) {
    const auto& c = m.config;
    const int d = c.hidden();
    check_linear("time_text_embed.timestep_embedder.linear_1", m.time_linear1, c.timestep_channels(), d);
    check_linear("time_text_embed.timestep_embedder.linear_2", m.time_linear2, d, d);
    check_linear("time_text_embed.text_embedder.linear_1", m.text_linear1, c.pooled_projection_dim, d);
    check_linear("time_text_embed.text_embedder.linear_2", m.text_linear2, d, d);
    check_linear("context_embedder", m.context_embedder, c.joint_attention_dim, d);
    check_linear("norm_out.linear", m.norm_out, d, 2 * d);
    check_linear("proj_out", m.proj_out, d, c.patch_features());
}

}  // namespace detail

// Where a stream's AdaLN chunks lie in its modulation row (offsets in floats; gate < 0: no gate).
struct chunk_offsets {
    int shift = 0, scale = 0, gate = -1;
};

// One block as the shared stages see it, built once per model: the weights of each stream ([0] image,
// [1] context) and where its modulation chunks are. SD3 and FLUX double-stream blocks are joint blocks; a
// FLUX single-stream block is one with the same weights for both streams, one modulation, and its MLP in
// parallel with the attention (both read the block's input).
struct block_plan {
    bool single = false;          // FLUX single-stream block
    bool context_outputs = true;  // false: SD3's last block (context_pre_only)
    const block_weights* joint = nullptr;  // joint blocks: the weights (MMDiT-X's second attention lives here)
    const linear* norm[2] = {};   // the modulation linears; single blocks: norm[1] = nullptr (the image's serves both)
    const linear* qkv[2] = {};
    const float* norm_q[2] = {};  // qk-norm RMS weights, nullptr without qk-norm
    const float* norm_k[2] = {};
    const linear* attention_out[2] = {};  // nullptr where there is no output (SD3's last block, context)
    const linear* ff1[2] = {};
    const linear* ff2[2] = {};
    chunk_offsets attention[2], mlp[2];
    bool dual_attention() const noexcept { return joint && joint->dual_attention; }
};

struct transformer::impl {
    const model* m = nullptr;        // SD3, SD3.5, MMDiT-X
    const flux_model* fx = nullptr;  // FLUX
    engine_limits limits;
    std::unique_ptr<workers> team;
    double min_chunk_work = default_min_chunk_work;
    detail::loop_split split() const { return {*team, min_chunk_work}; }
    detail::loop_split serial() const { return {*team, std::numeric_limits<double>::infinity()}; }  // one row per sample
    int D, F, P, hd, heads, max_tokens, max_ctx, max_tasks;
    int token_inputs = 0;  // floats of a token's input row: SD3's patch pixels, FLUX's packed channels
    std::vector<block_plan> plan;
    // FLUX single-stream blocks: proj_out split by its input columns into the attention's share (D -> D, no
    // bias) and the MLP's (4D -> D, with the bias), one pair per block (the module sites of module_hook).
    std::vector<linear> split_proj;

    // workspaces (sized once)
    detail::buffer tproj, temb, silu_temb, small_hidden, mod_img, mod_ctx, mod_final;
    detail::buffer x_img, x_ctx, nrm_img, nrm_ctx, qkv_img, qkv_ctx, att_img, att_ctx, out_img, out_ctx;
    detail::buffer hidden, patches, out_rows, scratch, probe_parts, kv_packed;
    detail::buffer nrm2_img;  // MMDiT-X: the image-only attention's modulated input (empty without dual-attention layers)
    // Ulysses (forward_options::ulysses): the all-to-all's send and receive blocks, and every token's q|k|v, the
    // context's q|k|v and both attention outputs of the rank's heads. Grown at the first such forward, kept after.
    detail::buffer u_send, u_recv, u_qkv, u_ctx, u_att, u_att_ctx;
    // per rank: image rows per sample (m_r), the first of them among all ranks' rows, and the all-to-all's counts
    std::vector<int> u_count, u_first;
    std::vector<std::int32_t> u_send_counts, u_recv_counts;
    bool subset = false;  // this call computes a token subset (image_tokens set, or select = none): rows out, not the image
    int head_share = 1;  // ranks the heads are split over while attend runs on the rank's heads (1 otherwise)
    detail::buffer rope_img, rope_ctx;  // FLUX: per token, the rotation's cos then sin for each pair of a head's dims
    std::vector<double> rope_frequencies;  // FLUX: per pair of a head's dims, its rotation frequency (made once)
    std::size_t scratch_slot = 0;  // floats per worker in `scratch`, a multiple of 16 (64 bytes)
    std::span<float> scratch_of(int worker) { return {scratch.data() + worker * scratch_slot, scratch_slot}; }
    // Every linear layer's weight packed for the GEMM once (the right operand of all its products).
    std::unordered_map<const linear*, gemm::packed_weights> packed;
    std::vector<std::int32_t> positions;

    // per-call state
    int B = 0, Hg = 0, Wg = 0, N = 0, n = 0, L = 0;
    const float* mod_of[2] = {};  // the current block's modulation per stream
    int mod_stride[2] = {};       // its floats per sample
    const std::int32_t* tokens = nullptr;  // active image tokens, [B * n] (nullptr = all)
    const forward_options* opts = nullptr;

    impl(const model& model_, const engine_limits& lim, int threads);
    impl(const flux_model& model_, const engine_limits& lim, int threads);
    int blocks() const noexcept { return static_cast<int>(plan.size()); }

    // ----- construction -----
    void size_workspaces(int threads, int modulation_width, int token_input_floats, bool dual, bool rope);
    static void check_limits(engine_limits& limits, int patch, int default_side);
    void check_flux_model() const;
    static block_plan joint_plan(const block_weights& w, bool qk_norm, int D);
    void plan_sd3();
    void plan_flux();
    static void check_threads(int t);
    void size_scratch(int t);
    void pack_weights(std::vector<const linear*> all);

    // One sample's and head's keys and values packed for the attention's products, image tokens then context:
    // keys as column panels of Q K^T's right operand, values (unless read in place) per key block as column
    // panels of P V's.
    struct packed_kv {
        float *k_img, *k_ctx, *v_img, *v_ctx;
    };
    // P V reads the value rows where they are when a head is whole register panels wide; else from packed copies.
    bool values_in_place() const { return hd % gemm::register_tile().cols == 0; }
    std::array<std::size_t, 4> kv_layout(int image_tokens, int context_tokens) const;
    std::size_t kv_slot_for(int image_tokens, int context_tokens) const;
    packed_kv kv_of(int b, int h);
    // Floats per worker in `scratch`: the larger of the attention's scratch and the GEMM's packing slab, a
    // multiple of 16 (64 bytes). Independent of the token counts: attention holds one key block at a time.
    static std::size_t scratch_slot_for(int head_dim);

    // Y[rows, W.out] = X[rows, W.in] * W^T + b, then epi(row, width) on each finished tile row. The parallel work
    // units are tiles of gemm::task_panels register panels of rows by all columns, so each packs its rows once;
    // columns are split too only where there are fewer row tiles than a few per worker.
    template <class Epilogue = detail::no_epilogue>
    void linear_rows(detail::loop_split s, const float* X, int ldx, int rows, const linear& W, float* Y, int ldy,
                     Epilogue epi = {}) {
        using detail::ceil_div;
        if (rows <= 0) return;
        const gemm::packed_weights& Pw = packed.at(&W);
        const gemm::tile_shape tile = gemm::register_tile();
        const int tr = gemm::task_panels * tile.rows, rt = ceil_div(rows, tr);
        const int wanted = 4 * s.team.size();
        const int ct = rt >= wanted ? 1 : std::min(ceil_div(W.out, tile.cols), ceil_div(wanted, rt));
        const int tc = ceil_div(ceil_div(W.out, ct), tile.cols) * tile.cols;
        const int ct_used = ceil_div(W.out, tc);
        detail::parallel_for(s, rt * ct_used, static_cast<double>(rows) * W.in * W.out, [&](int task, int worker) {
            const int r0 = (task / ct_used) * tr, c0 = (task % ct_used) * tc;
            const int nr = std::min(tr, rows - r0), nc = std::min(tc, W.out - c0);
            float* y = Y + static_cast<std::ptrdiff_t>(r0) * ldy + c0;
            gemm::multiply(X + static_cast<std::ptrdiff_t>(r0) * ldx, ldx, nr, Pw, c0, c0 + nc, y, ldy, scratch_of(worker),
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
    void qk_norm(float* qkv_row, const float* norm_q, const float* norm_k) const {
        detail::rms_norm_heads(qkv_row, heads, hd, norm_q);
        detail::rms_norm_heads(qkv_row + D, heads, hd, norm_k);
    }
    // sample b's modulation of the current block for a stream
    const float* modulation_of(stream s, int b) const {
        const int i = static_cast<int>(s);
        return mod_of[i] + static_cast<std::size_t>(b) * mod_stride[i];
    }

    // ----- validation (everything is checked before any state changes) -----
    void validate(const forward_inputs& in, std::span<float> velocity, const forward_options& o) const;
    void validate_hook(const module_hook& h, int layer, stream s, bool is_mlp, const forward_inputs& in,
                       std::span<const std::int32_t> active) const;
    void validate_attention2_hook(const module_hook& h, int layer) const;
    void validate_rank_tokens(const forward_inputs& in, const forward_options& o, int tokens_all) const;
    mutable std::vector<std::uint8_t> token_seen;  // validate_rank_tokens' per-token marks ([max_tokens], sized once)

    // ----- stages -----
    // Where each lives: embedding, modulation and the gated residual in modulation.cpp; the attention stage in
    // attention.cpp (its score product in attention_kernel.hpp), the probe in probe.cpp, the K/V cache and the
    // packed keys/values in kv_cache.cpp; the MLP in mlp.cpp; validation in validate.cpp; the blocks, the final
    // layer and run() in transformer.cpp; FLUX's own embedding and rotary positions in flux_forward.cpp.
    // The conditioning MLPs: timestep, guidance (nullptr without guidance_embeds), pooled text.
    struct conditioning_weights {
        const linear *time1, *time2, *guidance1, *guidance2, *text1, *text2;
        float (*timestep_scale)(float);  // how the model rescales the timesteps it is given (forward_inputs: sigma * 1000)
    };
    // [B] values, each mapped by `scale` (the model's own rescaling, in float like torch) -> [B, 256] sinusoids
    void timestep_projection(const float* values, float (*scale)(float), float* out) const;
    void embed_conditioning(const conditioning_weights& w, const forward_inputs& in);
    void embed(const forward_inputs& in);        // SD3: patches + position table
    void embed_flux(const forward_inputs& in);   // FLUX: packed tokens, rotary tables
    void rotary_tables(const forward_inputs& in);
    void rotate(const float* table, float* qkv_row) const;
    void modulation(const block_plan& p);
    void attention_stage(int layer, const block_plan& p, const block_hooks& h);
    void image_attention_stage(int layer, const block_weights& w, const module_hook& h);
    void store_kv(int layer, attention_kind kind);
    void attend(int layer, attention_kind kind, bool image_queries, bool context_queries);
    // attend under forward_options::ulysses: heads exchanged for tokens before, back after (attention.cpp).
    void ulysses_attend(int layer, attention_kind kind, bool image_queries, bool context_queries, bool context_out);
    // The attention probe (probe.cpp): a task's zeroed slice of probe_parts (nullptr: its queries are not counted),
    // one head's column sums into it, and the fixed-order reduction into forward_options::attention_probe.
    float* probe_part(int task, bool image_chunk);
    void probe_columns(const detail::attention_scratch& w, const float* packed_image_keys, int nq, int q_panels, float scale,
                       float* part) const;
    void reduce_probe(int per_sample, int image_chunks);
    void apply_module(stream s, const module_hook& h, const float* computed, int gate_offset);
    void mlp_compute(stream s, const module_hook& h, const block_plan& p, float* out);
    void joint_block(int layer, const block_plan& p, const block_hooks& h);
    void single_block(int layer, const block_plan& p, const block_hooks& h);
    void final_layer(std::span<float> velocity);
    int boundary(int next);
    void run(const forward_inputs& in, std::span<float> velocity, const forward_options& o);
};

}  // namespace sd3
