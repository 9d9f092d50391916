// The attention stage: norm+modulate, the q|k|v projections, qk-norm and rotary positions, the joint (and
// MMDiT-X's image-only) attention with an online softmax over key blocks, and the output projection. The K/V cache
// is in kv_cache.cpp, the attention probe's column sums in probe.cpp.
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>

#include "sd3/errors.hpp"
#include "sd3/flux_model.hpp"
#include "sd3/gemm.hpp"
#include "sd3/model.hpp"
#include "sd3/resources.hpp"
#include "sd3/transformer.hpp"
#include "sd3/workers.hpp"
#include "attention_kernel.hpp"
#include "transformer_impl.hpp"

namespace sd3 {
using namespace detail;

// The attention of both streams up to its output projection: out_img / out_ctx hold each computed stream's module
// output (before the gate); the caller applies them. Skipped when neither stream's output is computed (then the
// block's keys and values are not refreshed either).
void transformer::impl::attention_stage(int layer, const block_plan& p, const block_hooks& h) {
    const bool image_out = h.attention[0].mode == module_mode::compute;
    const bool context_out = p.context_outputs && h.attention[1].mode == module_mode::compute;
    const bool probe = !opts->attention_probe.empty();
    if (!image_out && !context_out) return;
    parallel_for(split(), B * n + B * L, norm_work * (B * n + B * L) * D, [&](int r, int) {
        const stream s = r < B * n ? stream::image : stream::context;
        const int row = s == stream::image ? r : r - B * n, per = tokens_of(s);
        const float* mod = modulation_of(s, row / per);
        const chunk_offsets& at = p.attention[static_cast<int>(s)];
        float* nrm = s == stream::image ? nrm_img.data() : nrm_ctx.data();
        norm_modulate(x_of(s) + static_cast<std::size_t>(row) * D, nrm + static_cast<std::size_t>(row) * D, D, mod + at.shift,
                      mod + at.scale);
    });
    linear_rows(split(), nrm_img.data(), D, B * n, *p.qkv[0], qkv_img.data(), 3 * D);
    linear_rows(split(), nrm_ctx.data(), D, B * L, *p.qkv[1], qkv_ctx.data(), 3 * D);
    const bool rope = fx != nullptr;  // FLUX: rotary q and k
    if (p.norm_q[0] || rope) {
        parallel_for(split(), B * n + B * L, norm_work * (B * n + B * L) * 2 * D, [&](int r, int) {
            const bool img = r < B * n;
            const int s = img ? 0 : 1, row = img ? r : r - B * n;
            float* qkv = (img ? qkv_img.data() : qkv_ctx.data()) + static_cast<std::size_t>(row) * 3 * D;
            if (p.norm_q[s]) qk_norm(qkv, p.norm_q[s], p.norm_k[s]);
            if (rope) {
                const int token = img ? token_id(stream::image, row / n, row % n) : row % L;
                rotate((img ? rope_img.data() : rope_ctx.data()) + static_cast<std::size_t>(token) * hd, qkv);
            }
        });
    }
    const bool context_queries = context_out || (probe && opts->probe_context_queries);
    if (opts->ulysses) {
        ulysses_attend(layer, attention_kind::joint, image_out, context_queries, context_out);
    } else {
        store_kv(layer, attention_kind::joint);
        attend(layer, attention_kind::joint, image_out, context_queries);
    }
    if (image_out) linear_rows(split(), att_img.data(), D, B * n, *p.attention_out[0], out_img.data(), D);
    if (context_out) linear_rows(split(), att_ctx.data(), D, B * L, *p.attention_out[1], out_ctx.data(), D);
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
                qk_norm(qkv_img.data() + static_cast<std::size_t>(r) * 3 * D, w.attn2_norm_q.data(), w.attn2_norm_k.data());
            });
        }
        if (opts->ulysses) {
            ulysses_attend(layer, attention_kind::image_only, true, false, false);
        } else {
            store_kv(layer, attention_kind::image_only);
            attend(layer, attention_kind::image_only, true, false);
        }
        linear_rows(split(), att_img.data(), D, B * n, w.attn2_out, out_img.data(), D);
    }
    apply_module(stream::image, h, out_img.data(), 8 * D);
}

namespace {
void grow(buffer& b, std::size_t floats) {
    if (b.size() < floats) b.resize(floats);
}
}  // namespace

// Ulysses (forward_options::ulysses, docs/scale-out.md): this rank computed q|k|v (after qk-norm and rotary
// positions, which are per token) of its n image tokens for all heads, and of every context token. Rank r computed
// m_r tokens per sample (its shard, or its list in ulysses.rank_tokens, possibly none), M = sum m_r in all. One
// all-to-all (equal blocks for shards, per-rank counts for lists) turns the image rows into all M tokens' rows of the
// rank's heads/P heads (blocks [source rank][sample][its token]; rows placed in rank order, which is token order for
// shards); the context rows are sliced to the same heads locally. The computed tokens' keys and values go into the
// rank's K/V cache when there is one; attend then runs as a forward of M image queries of a model with heads/P heads
// and width D/P (the members it reads are swapped for the time of the call), its keys every token's from that cache
// (or, in a full forward without one, the exchanged rows themselves), the probe's head average still over all heads.
// A second all-to-all takes each token's output of these heads back to the rank that owns the token; the context's
// output (every rank needs all heads) is gathered over heads by a third one, every block of its send the same.
void transformer::impl::ulysses_attend(int layer, attention_kind kind, bool image_queries, bool context_queries, bool context_out) {
    const head_exchange& x = opts->ulysses;
    const int ranks = x.ranks, Dl = D / ranks, Hl = heads / ranks;
    const bool joint = kind == attention_kind::joint, lists = !x.rank_tokens.empty();
    const auto sz = [](auto... v) { return (static_cast<std::size_t>(v) * ...); };
    if (u_count.size() < static_cast<std::size_t>(ranks)) {  // grown at the first call with more ranks, kept after
        u_count.resize(static_cast<std::size_t>(ranks));
        u_first.resize(static_cast<std::size_t>(ranks));
        u_send_counts.resize(static_cast<std::size_t>(ranks));
        u_recv_counts.resize(static_cast<std::size_t>(ranks));
    }
    int M = 0;
    for (int r = 0; r < ranks; ++r) {
        const auto ru = static_cast<std::size_t>(r);
        u_count[ru] = lists ? static_cast<int>(x.rank_tokens[ru].size() / static_cast<std::size_t>(B)) : n;
        u_first[ru] = M;
        M += u_count[ru];
    }
    // rank r's row i of sample b: its token id, and its row among the received blocks
    const auto id_of = [&](int r, int b, int i) {
        const auto ru = static_cast<std::size_t>(r);
        return lists ? x.rank_tokens[ru][sz(b, u_count[ru]) + static_cast<std::size_t>(i)] : r * n + i;
    };
    const auto block_row = [&](int r, int b, int i) {
        const auto ru = static_cast<std::size_t>(r);
        return sz(B, u_first[ru]) + sz(b, u_count[ru]) + static_cast<std::size_t>(i);
    };
    const auto rank_of = [&](int j) {  // the rank whose rows hold position j of [0, M)
        int r = 0;
        while (r + 1 < ranks && u_first[static_cast<std::size_t>(r) + 1] <= j) ++r;
        return r;
    };
    const std::size_t image_floats = sz(B, n, 3, D), all_floats = sz(B, M, 3, Dl), context_floats = sz(B, L, D);
    grow(u_send, std::max({image_floats, sz(B, M, Dl), context_floats}));
    grow(u_recv, std::max({all_floats, sz(B, n, D), context_floats}));
    grow(u_qkv, all_floats);
    grow(u_ctx, sz(B, L, 3, Dl));
    grow(u_att, sz(B, M, Dl));
    grow(u_att_ctx, sz(B, L, Dl));
    // [token][q|k|v][all heads] -> send blocks [rank][sample][token][q|k|v][the rank's heads]
    parallel_for(split(), B * n, 3.0 * B * n * D, [&](int r, int) {
        const int b = r / n, i = r % n;
        const float* src = qkv_img.data() + sz(r, 3, D);
        for (int p = 0; p < ranks; ++p)
            for (int c = 0; c < 3; ++c)
                std::copy_n(src + c * D + p * Dl, Dl, u_send.data() + sz((p * B + b) * n + i, 3, Dl) + sz(c, Dl));
    });
    if (lists) {
        for (int p = 0; p < ranks; ++p) {
            u_send_counts[static_cast<std::size_t>(p)] = static_cast<std::int32_t>(sz(B, n, 3, Dl));
            u_recv_counts[static_cast<std::size_t>(p)] = static_cast<std::int32_t>(sz(B, u_count[static_cast<std::size_t>(p)], 3, Dl));
        }
        x.all_to_all_v(std::span<const float>(u_send.data(), image_floats), std::span<const std::int32_t>(u_send_counts.data(), static_cast<std::size_t>(ranks)),
                       std::span<float>(u_recv.data(), all_floats), std::span<const std::int32_t>(u_recv_counts.data(), static_cast<std::size_t>(ranks)));
    } else {
        x.all_to_all(std::span<const float>(u_send.data(), image_floats), std::span<float>(u_recv.data(), image_floats));
    }
    kv_cache* kv = opts->kv;
    parallel_for(split(), B * M, 3.0 * B * M * Dl, [&](int r, int) {  // -> [sample][all computed tokens][q|k|v of the rank's heads]
        const int b = r / M, j = r % M, from = rank_of(j), i = j - u_first[static_cast<std::size_t>(from)];
        const float* row = u_recv.data() + sz(block_row(from, b, i), 3, Dl);
        std::copy_n(row, 3 * Dl, u_qkv.data() + sz(r, 3, Dl));
        if (kv) {  // the rank's K/V cache of every token, refreshed at the computed ones before attend reads it
            const auto t = static_cast<std::size_t>(id_of(from, b, i));
            std::copy_n(row + Dl, Dl, kv->keys(layer, b, kind) + t * static_cast<std::size_t>(Dl));
            std::copy_n(row + 2 * Dl, Dl, kv->values(layer, b, kind) + t * static_cast<std::size_t>(Dl));
        }
    });
    if (joint) {
        parallel_for(split(), B * L, 3.0 * B * L * Dl, [&](int r, int) {
            for (int c = 0; c < 3; ++c)
                std::copy_n(qkv_ctx.data() + sz(r, 3, D) + sz(c, D) + sz(x.rank, Dl), Dl, u_ctx.data() + sz(r, 3, Dl) + sz(c, Dl));
        });
    }
    {
        // attend over the rank's heads: every computed token's queries, keys and values, as a forward of heads/P heads
        struct swapped {
            impl& e;
            int n, D, heads;
            explicit swapped(impl& s) : e(s), n(s.n), D(s.D), heads(s.heads) { swap_buffers(); }
            ~swapped() {
                swap_buffers();
                e.n = n;
                e.D = D;
                e.heads = heads;
                e.head_share = 1;
            }
            void swap_buffers() {
                std::swap(e.qkv_img, e.u_qkv);
                std::swap(e.qkv_ctx, e.u_ctx);
                std::swap(e.att_img, e.u_att);
                std::swap(e.att_ctx, e.u_att_ctx);
            }
        } guard(*this);
        n = M;
        D = Dl;
        heads = Hl;
        head_share = ranks;
        attend(layer, kind, image_queries, context_queries);
    }
    if (image_queries) {  // [sample][computed tokens][the rank's heads] -> blocks [owner rank][sample][its token] -> att_img
        parallel_for(split(), B * M, 1.0 * B * M * Dl, [&](int r, int) {
            const int b = r / M, j = r % M, to = rank_of(j), i = j - u_first[static_cast<std::size_t>(to)];
            std::copy_n(u_att.data() + sz(r, Dl), Dl, u_send.data() + sz(block_row(to, b, i), Dl));
        });
        if (lists) {
            for (int p = 0; p < ranks; ++p) {
                u_send_counts[static_cast<std::size_t>(p)] = static_cast<std::int32_t>(sz(B, u_count[static_cast<std::size_t>(p)], Dl));
                u_recv_counts[static_cast<std::size_t>(p)] = static_cast<std::int32_t>(sz(B, n, Dl));
            }
            x.all_to_all_v(std::span<const float>(u_send.data(), sz(B, M, Dl)), std::span<const std::int32_t>(u_send_counts.data(), static_cast<std::size_t>(ranks)),
                           std::span<float>(u_recv.data(), sz(B, n, D)), std::span<const std::int32_t>(u_recv_counts.data(), static_cast<std::size_t>(ranks)));
        } else {
            x.all_to_all(std::span<const float>(u_send.data(), sz(B, n, D)), std::span<float>(u_recv.data(), sz(B, n, D)));
        }
        parallel_for(split(), B * n, 1.0 * B * n * D, [&](int r, int) {
            const int b = r / n, i = r % n;
            for (int p = 0; p < ranks; ++p)
                std::copy_n(u_recv.data() + sz((p * B + b) * n + i, Dl), Dl, att_img.data() + sz(r, D) + sz(p, Dl));
        });
    }
    if (joint && context_out) {  // the context's output of the rank's heads to every rank: an all-gather over heads
        const std::size_t block = sz(B, L, Dl);
        for (int p = 0; p < ranks; ++p) std::copy_n(u_att_ctx.data(), block, u_send.data() + sz(p) * block);
        x.all_to_all(std::span<const float>(u_send.data(), context_floats), std::span<float>(u_recv.data(), context_floats));
        parallel_for(split(), B * L, 1.0 * B * L * D, [&](int r, int) {
            for (int p = 0; p < ranks; ++p)
                std::copy_n(u_recv.data() + sz(p) * block + sz(r, Dl), Dl, att_ctx.data() + sz(r, D) + sz(p, Dl));
        });
    }
}

// softmax(Q K^T / sqrt(hd)) V over the keys [image tokens (all N); context tokens], per head; queries are the
// active image rows and/or the context rows. A task is one sample's chunk of queries; per head it walks the keys
// in blocks with an online softmax (running maximum and sum, the output rescaled when the maximum grows), so no
// buffer grows with the token count. With the probe (probe.cpp) each task then makes a second pass over the image
// keys, and the tasks' column sums are reduced after the loop.
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
        float* part = probe ? probe_part(task, img) : nullptr;
        auto scores = [&](const float* keys, int j0, int nk) { block_scores(w, hd, keys, j0, nk, q_panels); };
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
            if (part) probe_columns(w, kv.k_img, nq, q_panels, scale, part);
        }
    });
    if (probe) reduce_probe(per_sample, img_chunks);
}

}  // namespace sd3
