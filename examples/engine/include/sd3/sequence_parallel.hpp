// Sequence-parallel forwards of the reference engine over ranks, by K/V exchange (docs/scale-out.md): each rank
// computes some of every sample's image tokens (its token shard in a full forward; its share of a plan's C1 set in
// a SpecDiff step) in a token-subset forward, and forward_options::kv_exchange all-gathers every layer's fresh keys
// and values, so that every query attends to every token as in one process. The engine itself stays free of any
// runtime: the collectives are a specdiff::communicator's (single_process, MPI, NCCL or the caller's own).
//
// Every rank calls every member in the same order with the same arguments (the plans agree on every rank, see
// specdiff::sharded_accelerator<..., global_plan>). Samples run one forward each (batch 1) with a K/V cache of their
// own: the engine's subset forward takes one token count for every sample of a call, and the ranks' shares of
// different samples' C1 sets differ in size. A rank that computes no token of a sample still joins that sample's
// exchanges (it sends nothing and stores what the others computed), so no rank waits for another.
// use_ulysses(true): every forward by head exchange instead (forward_options::ulysses with every rank's token list in
// ulysses.rank_tokens: its shard in a full forward, its share of C1 in a SpecDiff step, possibly none), each sample's
// K/V cache then holding the rank's heads/P heads of every token.
#pragma once

#include <algorithm>
#include <cstdint>
#include <span>
#include <stdexcept>
#include <vector>

#include <specdiff/communicator.hpp>

#include "sd3/errors.hpp"
#include "sd3/flux_model.hpp"
#include "sd3/sampler.hpp"
#include "sd3/transformer.hpp"

namespace sd3 {

/// Which tokens each rank computes for one sample: computed[r] = rank r's ascending global image-token ids.
using rank_tokens = std::span<const std::vector<std::int32_t>>;

template <specdiff::communicator Comm>
class sequence_parallel {
public:
    /// `net` runs every forward (its limits must hold batch 1 at the problem's size); `max_batch` samples of
    /// `tokens` image tokens each get a K/V cache. Throws std::invalid_argument when tokens < ranks.
    sequence_parallel(Comm& comm, transformer& net, int max_batch, int tokens)
        : comm_(comm), net_(net), tokens_(tokens), hidden_(net.hidden()), features_(net.patch_features()),
          shard_(specdiff::token_shard::of(tokens, comm.rank(), comm.size())) {
        if (max_batch < 1) throw std::invalid_argument(message("max_batch: must be >= 1, got ", max_batch));
        caches_.reserve(static_cast<std::size_t>(max_batch));
        for (int b = 0; b < max_batch; ++b) caches_.emplace_back(net, 1, tokens);
        const std::size_t rows = static_cast<std::size_t>(tokens) * static_cast<std::size_t>(hidden_);
        send_.resize(rows);
        recv_.resize(rows);
        counts_.resize(static_cast<std::size_t>(comm.size()));
        shards_.resize(static_cast<std::size_t>(comm.size()));
        for (int r = 0; r < comm.size(); ++r) {
            const auto s = specdiff::token_shard::of(tokens, r, comm.size());
            for (specdiff::index_t t = s.begin; t < s.begin + s.count; ++t)
                shards_[static_cast<std::size_t>(r)].push_back(static_cast<std::int32_t>(t));
        }
        const auto n = static_cast<std::size_t>(max_batch) * static_cast<std::size_t>(tokens) * static_cast<std::size_t>(features_);
        shard_rows_.resize(n);
        gathered_.resize(n);
        gather_recv_.resize(n);
        row_counts_.resize(static_cast<std::size_t>(comm.size()));
        rank_spans_.resize(static_cast<std::size_t>(comm.size()));
        if (net.arch() == architecture::sd3) dual_ = net.config().dual_attention_layers;
    }

    int rank() const { return comm_.rank(); }
    int ranks() const { return comm_.size(); }
    int tokens() const noexcept { return tokens_; }
    /// This rank's tokens of a full forward.
    const specdiff::token_shard& shard() const noexcept { return shard_; }
    /// Every rank's shard as token lists (what forward_sample takes for a full forward).
    rank_tokens shards() const noexcept { return shards_; }
    Comm& communicator() noexcept { return comm_; }
    /// Every forward (forward_full, forward_sample, sample) by head exchange (Ulysses, forward_options::ulysses with
    /// ulysses.rank_tokens) instead of the K/V exchange: needs an all_to_all_communicator and heads % ranks == 0
    /// (refused by name); any token count (the shards' blocks have counts). The K/V caches are remade with the rank's
    /// heads/P heads of every token (and full width again when it is switched off), empty, as reset() leaves them.
    void use_ulysses(bool on) {
        if (!on) {
            if (ulysses_) remake_caches(1);
            ulysses_ = false;
            return;
        }
        if constexpr (!specdiff::all_to_all_communicator<Comm>) {
            throw std::invalid_argument("ulysses: the communicator has no all_to_all (specdiff::all_to_all_communicator)");
        } else {
            const int heads = net_.arch() == architecture::sd3 ? net_.config().num_attention_heads : net_.flux().num_attention_heads;
            if (heads % ranks() != 0)
                throw std::invalid_argument(message("ulysses: heads = ", heads, " do not split over ranks = ", ranks(), " (heads % ranks must be 0)"));
            all_to_all_ = [this](std::span<const float> send, std::span<float> recv) { comm_.all_to_all(send, recv); };
            all_to_all_v_ = [this](std::span<const float> send, std::span<const std::int32_t> send_counts, std::span<float> recv,
                                   std::span<const std::int32_t> recv_counts) { comm_.all_to_all_v(send, send_counts, recv, recv_counts); };
            if (!ulysses_) remake_caches(ranks());
            ulysses_ = true;
        }
    }
    bool ulysses() const noexcept { return ulysses_; }
    /// Empties every K/V cache (as a new one is), for a new run that must not read the last one's keys and values.
    void reset() { remake_caches(ulysses_ ? ranks() : 1); }

    /// Sample `b` of `in` (batch B; its K/V cache is cache b) on this rank: a token-subset forward over
    /// computed[rank()] with every layer's keys and values exchanged. `rows`: [computed[rank()].size(),
    /// patch_features]. `probe` (empty, or [tokens]): this rank's partial column sums of the attention, zeros
    /// where it computes no token. With no token computed by any rank nothing runs (nothing changes).
    void forward_sample(const forward_inputs& in, int b, rank_tokens computed, std::span<float> rows,
                        std::span<float> probe = {}) {
        if (b < 0 || b >= in.batch || b >= static_cast<int>(caches_.size()))
            throw std::invalid_argument(message("sample: ", b, " is out of range [0, ", std::min<int>(in.batch, static_cast<int>(caches_.size())), ")"));
        if (computed.size() != static_cast<std::size_t>(ranks()))
            throw std::invalid_argument(message("computed: one token list per rank (", ranks(), "), got ", computed.size()));
        const auto& mine = computed[static_cast<std::size_t>(rank())];
        if (rows.size() != mine.size() * static_cast<std::size_t>(features_))
            throw std::invalid_argument(message("rows: expected ", mine.size() * static_cast<std::size_t>(features_), " floats, got ", rows.size()));
        if (!probe.empty() && probe.size() != static_cast<std::size_t>(tokens_))
            throw std::invalid_argument(message("probe: expected ", tokens_, " floats, got ", probe.size()));
        kv_cache& kv = caches_[static_cast<std::size_t>(b)];
        std::size_t any = 0;
        for (const auto& c : computed) any += c.size();
        if (any == 0) {
            std::fill(probe.begin(), probe.end(), 0.f);
            return;
        }
        if (ulysses_) {  // every rank runs the attention of its heads for every computed token, an empty share too
            for (std::size_t r = 0; r < computed.size(); ++r) rank_spans_[r] = computed[r];
            forward_options o;
            o.image_tokens = mine;
            o.select = mine.empty() ? image_selection::none : image_selection::listed;
            o.kv = &kv;
            o.attention_probe = probe;
            o.ulysses = {rank(), ranks(), all_to_all_, rank_spans_, all_to_all_v_};
            net_.forward(slice(in, b), rows, o);
            return;
        }
        const auto exchange = [&](int layer, attention_kind kind, kv_cache& cache) {
            for (float* table : {cache.keys(layer, 0, kind), cache.values(layer, 0, kind)}) exchange_rows(table, computed);
        };
        if (mine.empty()) {  // nothing to compute here: join the exchanges in the forward's order (store_kv's)
            std::fill(probe.begin(), probe.end(), 0.f);
            for (int layer = 0; layer < net_.blocks(); ++layer) {
                exchange(layer, attention_kind::joint, kv);
                if (std::find(dual_.begin(), dual_.end(), layer) != dual_.end()) exchange(layer, attention_kind::image_only, kv);
            }
            return;
        }
        forward_inputs one = slice(in, b);
        forward_options o;
        o.image_tokens = mine;
        o.kv = &kv;
        o.attention_probe = probe;
        o.kv_exchange = exchange;
        net_.forward(one, rows, o);
    }

    /// A full model call split over the ranks: every sample's shard here, then every rank's rows, so that every
    /// rank holds the whole `velocity` (as transformer::forward writes it). `probe` (empty, or [batch, tokens]):
    /// this rank's partial sums (sum them over ranks for one process's probe).
    void forward_full(const forward_inputs& in, std::span<float> velocity, std::span<float> probe = {}) {
        const std::size_t shard_floats = static_cast<std::size_t>(shard_.count) * static_cast<std::size_t>(features_);
        for (int b = 0; b < in.batch; ++b)
            forward_sample(in, b, shards_, std::span<float>(shard_rows_).subspan(static_cast<std::size_t>(b) * shard_floats, shard_floats),
                           probe.empty() ? probe : probe.subspan(static_cast<std::size_t>(b) * static_cast<std::size_t>(tokens_), static_cast<std::size_t>(tokens_)));
        gather_shards(in.batch, std::span<const float>(shard_rows_.data(), static_cast<std::size_t>(in.batch) * shard_floats), gathered_);
        net_.rows_to_velocity(in.batch, in.height, in.width,
                              std::span<const float>(gathered_.data(), static_cast<std::size_t>(in.batch) * static_cast<std::size_t>(tokens_) * static_cast<std::size_t>(features_)),
                              velocity);
    }

    /// Every rank's shard rows, [batch][shard][patch_features] here, into [batch][tokens][patch_features] on every rank.
    void gather_shards(int batch, std::span<const float> mine, std::span<float> all) {
        const auto f = static_cast<std::size_t>(features_);
        for (int r = 0; r < ranks(); ++r)
            row_counts_[static_cast<std::size_t>(r)] = static_cast<specdiff::index_t>(batch) * specdiff::token_shard::of(tokens_, r, ranks()).count * features_;
        const std::size_t total = static_cast<std::size_t>(batch) * static_cast<std::size_t>(tokens_) * f;
        if (all.size() != total) throw std::invalid_argument(message("all: expected ", total, " floats, got ", all.size()));
        if (total > gather_recv_.size())
            throw std::invalid_argument(message("batch: ", batch, " samples, more than the ", gather_recv_.size() / (static_cast<std::size_t>(tokens_) * f), " this was made for"));
        const std::span<float> recv(gather_recv_.data(), total);
        comm_.all_gather(mine, row_counts_, recv);
        std::size_t at = 0;  // [rank][sample][shard rows] -> [sample][token]
        for (int r = 0; r < ranks(); ++r) {
            const auto s = specdiff::token_shard::of(tokens_, r, ranks());
            for (int b = 0; b < batch; ++b, at += static_cast<std::size_t>(s.count) * f)
                std::copy_n(recv.begin() + static_cast<std::ptrdiff_t>(at), static_cast<std::size_t>(s.count) * f,
                            all.begin() + static_cast<std::ptrdiff_t>((static_cast<std::size_t>(b) * static_cast<std::size_t>(tokens_) + static_cast<std::size_t>(s.begin)) * f));
        }
    }

    /// Full RFlow (sd3::sample_cfg) with every model call split over the ranks; every rank returns the final latents.
    std::vector<float> sample(const flow_match_euler& scheduler, const cfg_inputs& in, float guidance, const step_fn& on_step = {}) {
        return sample_cfg(net_, scheduler, in, guidance, [&](const model_call& call) { forward_full(*call.inputs, call.velocity); }, on_step);
    }

    /// Sample b of a batch as a batch of one (views, no copy).
    static forward_inputs slice(const forward_inputs& in, int b) {
        const auto part = [&](std::span<const float> s) {
            if (s.empty()) return s;
            const std::size_t each = s.size() / static_cast<std::size_t>(in.batch);
            return s.subspan(static_cast<std::size_t>(b) * each, each);
        };
        forward_inputs one = in;
        one.batch = 1;
        one.latents = part(in.latents);
        one.timesteps = part(in.timesteps);
        one.context = part(in.context);
        one.pooled = part(in.pooled);
        one.guidance = part(in.guidance);
        return one;
    }

private:
    void remake_caches(int head_ranks) {
        for (auto& kv : caches_) kv = kv_cache(net_, 1, tokens_, head_ranks);
    }

    // One K/V table of one sample ([tokens][hidden]): each rank's computed rows to every rank.
    void exchange_rows(float* table, rank_tokens computed) {
        const auto d = static_cast<std::size_t>(hidden_);
        const auto& mine = computed[static_cast<std::size_t>(rank())];
        for (std::size_t i = 0; i < mine.size(); ++i)
            std::copy_n(table + static_cast<std::size_t>(mine[i]) * d, d, send_.begin() + static_cast<std::ptrdiff_t>(i * d));
        std::size_t total = 0;
        for (std::size_t r = 0; r < computed.size(); ++r) {
            counts_[r] = static_cast<specdiff::index_t>(computed[r].size() * d);
            total += computed[r].size() * d;
        }
        if (total > recv_.size()) throw std::invalid_argument(message("computed: ", total / d, " tokens in all, more than the ", tokens_, " a sample has"));
        comm_.all_gather(std::span<const float>(send_.data(), mine.size() * d), counts_, std::span<float>(recv_.data(), total));
        std::size_t at = 0;
        for (const auto& list : computed)
            for (const std::int32_t t : list) {
                std::copy_n(recv_.begin() + static_cast<std::ptrdiff_t>(at), d, table + static_cast<std::size_t>(t) * d);
                at += d;
            }
    }

    Comm& comm_;
    transformer& net_;
    int tokens_, hidden_, features_;
    specdiff::token_shard shard_;
    std::vector<kv_cache> caches_;
    std::vector<int> dual_;
    std::vector<std::vector<std::int32_t>> shards_;
    bool ulysses_ = false;
    all_to_all_fn all_to_all_;       // Ulysses: the communicator's collectives, made once (use_ulysses)
    all_to_all_v_fn all_to_all_v_;
    std::vector<std::span<const std::int32_t>> rank_spans_;  // Ulysses: ulysses.rank_tokens of a call
    std::vector<float> send_, recv_, shard_rows_, gathered_, gather_recv_;
    std::vector<specdiff::index_t> counts_, row_counts_;
};

}  // namespace sd3
